//! Dropping root: bind the (possibly privileged) ports, open the log and pid files, then
//! become `user`/`group` for good, before the first client is accepted. Every child is forked
//! from the unprivileged parent, so no session ever runs as root.
//!
//! The order is the only safe one: supplementary groups first (root's groups would otherwise
//! stay), then the gid (only root may still change it), then the uid (after which nothing can
//! be changed back). Any failing step stops the start; half-dropped privileges are worse than
//! none because they look dropped. Afterwards we check that root cannot be regained.

use nix::unistd::{setgid, setgroups, setuid, Gid, Group, Uid, User};

/// Who to become, resolved from names (or numbers) at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Resolves `user` (name or uid) and `group` (name or gid; default: the user's primary group).
/// Errors name the key at fault (`user` or `group`) and the reason.
pub fn resolve(user: &str, group: Option<&str>) -> Result<Identity, (&'static str, String)> {
    let account = lookup_user(user).map_err(|reason| ("user", reason))?;
    let gid = match group {
        Some(group) => lookup_group(group).map_err(|reason| ("group", reason))?,
        None => account.gid,
    };
    Ok(Identity {
        user: account.name,
        uid: account.uid,
        gid,
    })
}

fn lookup_user(user: &str) -> Result<User, String> {
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    };
    found
        .map_err(|e| format!("cannot look up user `{user}`: {e}"))?
        .ok_or_else(|| format!("no user `{user}` on this system"))
}

fn lookup_group(group: &str) -> Result<Gid, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    Group::from_name(group)
        .map_err(|e| format!("cannot look up group `{group}`: {e}"))?
        .map(|g| g.gid)
        .ok_or_else(|| format!("no group `{group}` on this system"))
}

/// Becomes `who`: setgroups, setgid, setuid, in that order, then proves root is gone.
pub fn drop_to(who: &Identity) -> Result<(), String> {
    let step =
        |what: &str, e: nix::Error| format!("cannot drop privileges to {}: {what}: {e}", who.user);
    setgroups(&[who.gid]).map_err(|e| step("setgroups", e))?;
    setgid(who.gid).map_err(|e| step("setgid", e))?;
    setuid(who.uid).map_err(|e| step("setuid", e))?;
    if !who.uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
        return Err(format!(
            "dropped to {} but could switch back to root: refusing to run",
            who.user
        ));
    }
    Ok(())
}

//! Dropping root: bind the (possibly privileged) ports, open the log and pid files, then
//! become `user`/`group` for good, before the first client is accepted. Every child is forked
//! from the unprivileged parent, so no session ever runs as root.
//!
//! The order is the only safe one: supplementary groups first (root's groups would otherwise
//! stay), then the gid (only root may still change it), then the uid (after which nothing can
//! be changed back). Any failing step stops the start; half-dropped privileges are worse than
//! none because they look dropped. Afterwards we check that root cannot be regained.

use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
use std::process::{Command, Stdio};

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

/// A `passwd` entry: what dropping privileges needs of it.
#[derive(Debug, PartialEq, Eq)]
struct Account {
    name: String,
    uid: Uid,
    gid: Gid,
}

fn lookup_user(user: &str) -> Result<Account, String> {
    // getent takes a name or a uid for the same key, as getpwnam/getpwuid would.
    let entry = getent("passwd", user)
        .map_err(|e| format!("cannot look up user `{user}`: {e}"))?
        .ok_or_else(|| format!("no user `{user}` on this system"))?;
    parse_passwd(&entry).ok_or_else(|| format!("getent gave a malformed passwd entry: {entry:?}"))
}

fn lookup_group(group: &str) -> Result<Gid, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    let entry = getent("group", group)
        .map_err(|e| format!("cannot look up group `{group}`: {e}"))?
        .ok_or_else(|| format!("no group `{group}` on this system"))?;
    parse_group_gid(&entry).ok_or_else(|| format!("getent gave a malformed group entry: {entry:?}"))
}

/// Asks the system's own `getent` for `key` in NSS `database`: `Ok(None)` when there is no
/// such entry.
///
/// Why a separate process rather than getpwnam(3): forkecho is linked statically
/// (`.cargo/config.toml`; fork then copies half as many mappings), and a static glibc that
/// reaches an NSS module (`systemd`, `sss`, `ldap` in nsswitch.conf, consulted for any name
/// not in /etc/passwd) loads a second, dynamic libc into the process and crashes. `getent` is
/// the C library's own dynamically linked tool, so every NSS source works exactly as for any
/// other program on the host. It runs only while loading a config, before the first fork or
/// between two loop iterations; `output()` waits for it itself (no thread), so the reaper
/// never sees it.
fn getent(database: &str, key: &str) -> Result<Option<String>, String> {
    let output = Command::new("getent")
        .args([database, "--", key])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `getent`, the C library's NSS lookup tool: {e}"))?;
    match output.status.code() {
        Some(0) => {
            let text = String::from_utf8_lossy(&output.stdout);
            Ok(text.lines().next().map(str::to_owned))
        }
        // getent(1): 2 = "one or more supplied key could not be found in the database".
        Some(2) => Ok(None),
        _ => Err(format!(
            "`getent {database}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

/// `name:password:uid:gid:gecos:home:shell`
fn parse_passwd(line: &str) -> Option<Account> {
    let fields: Vec<&str> = line.split(':').collect();
    match fields[..] {
        [name, _, uid, gid, _, _, _] => Some(Account {
            name: name.to_owned(),
            uid: Uid::from_raw(uid.parse().ok()?),
            gid: Gid::from_raw(gid.parse().ok()?),
        }),
        _ => None,
    }
}

/// `name:password:gid:members`
fn parse_group_gid(line: &str) -> Option<Gid> {
    let fields: Vec<&str> = line.split(':').collect();
    match fields[..] {
        [_, _, gid, _] => Some(Gid::from_raw(gid.parse().ok()?)),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_entries_parse_into_name_uid_and_gid() {
        let entry = "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin";
        assert_eq!(
            parse_passwd(entry),
            Some(Account {
                name: "nobody".into(),
                uid: Uid::from_raw(65534),
                gid: Gid::from_raw(65534),
            })
        );
        assert_eq!(parse_passwd("nobody:x:65534"), None);
        assert_eq!(parse_passwd("nobody:x:abc:1:::"), None);
    }

    #[test]
    fn group_entries_parse_into_their_gid() {
        assert_eq!(
            parse_group_gid("nogroup:x:65534:"),
            Some(Gid::from_raw(65534))
        );
        assert_eq!(
            parse_group_gid("wheel:x:10:alice,bob"),
            Some(Gid::from_raw(10))
        );
        assert_eq!(parse_group_gid("wheel:x:ten:"), None);
    }

    #[test]
    fn lookups_go_through_nss_and_tell_missing_from_failed() {
        let root = lookup_user("root").expect("root exists everywhere");
        assert_eq!((root.name.as_str(), root.uid.as_raw()), ("root", 0));
        assert_eq!(lookup_user("0").expect("uid 0").name, "root");
        let missing = lookup_user("no-such-user-here").unwrap_err();
        assert_eq!(missing, "no user `no-such-user-here` on this system");
        // A name that looks like an option is a key, not a flag to getent.
        assert!(lookup_user("--help").unwrap_err().starts_with("no user"));
    }
}

//! Dropping root: bind the (possibly privileged) ports, open the log and pid files, then
//! become `user`/`group` for good, before the first client is accepted. Every child is forked
//! from the unprivileged parent, so no session ever runs as root.
//!
//! The order is the only safe one: supplementary groups first (root's groups would otherwise
//! stay), then the gid (only root may still change it), then the uid (after which nothing can
//! be changed back). Any failing step stops the start; half-dropped privileges are worse than
//! none because they look dropped. Afterwards we check that root cannot be regained.

use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

/// Longest a user or group lookup may take before the config load fails.
const LOOKUP_TIMEOUT_SECS: u32 = 10;

/// Who to become, resolved from names (or numbers) at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Why `user` or `group` could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupError {
    /// The key at fault: `user` or `group`.
    pub key: &'static str,
    pub reason: String,
}

/// Resolves `user` (name or uid) and `group` (name or gid; default: the user's primary group).
///
/// A numeric `user` with a numeric `group` needs no name service at all: the numbers are used
/// as they are (a container without `getent` or a passwd entry runs `--user 65534 --group
/// 65534`). Anything else is looked up through `getent`.
pub fn resolve(user: &str, group: Option<&str>) -> Result<Identity, LookupError> {
    let failed = |key| move |reason| LookupError { key, reason };
    if let (Ok(uid), Some(Ok(gid))) = (user.parse::<u32>(), group.map(str::parse::<u32>)) {
        // (uid_t)-1 means "leave unchanged" to setuid and setgid: not an identity.
        if uid == u32::MAX {
            return Err(failed("user")(format!("{uid} is not a valid uid")));
        }
        if gid == u32::MAX {
            return Err(failed("group")(format!("{gid} is not a valid gid")));
        }
        return Ok(Identity {
            user: user.to_string(),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
        });
    }
    let account = lookup_user(user).map_err(failed("user"))?;
    let gid = match group {
        Some(group) => lookup_group(group).map_err(failed("group"))?,
        None => account.gid,
    };
    Ok(Identity {
        user: account.name,
        uid: account.uid,
        gid,
    })
}

/// The uid of `user` (a name, looked up, or a number, taken as it is): for owning a file.
pub fn uid_of(user: &str) -> Result<u32, String> {
    match user.parse::<u32>() {
        Ok(u32::MAX) => Err(format!("{user} is not a valid uid")),
        Ok(uid) => Ok(uid),
        Err(_) => lookup_user(user).map(|account| account.uid.as_raw()),
    }
}

/// The gid of `group` (a name, looked up, or a number, taken as it is).
pub fn gid_of(group: &str) -> Result<u32, String> {
    match group.parse::<u32>() {
        Ok(u32::MAX) => Err(format!("{group} is not a valid gid")),
        _ => lookup_group(group).map(|gid| gid.as_raw()),
    }
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
    let account = getent("passwd", user)
        .map_err(|e| format!("cannot look up user `{user}`: {e}"))?
        .map(|entry| {
            parse_passwd(&entry)
                .ok_or_else(|| format!("getent gave a malformed passwd entry: {entry:?}"))
        })
        .transpose()?;
    // getent reads a numeric key with strtoul and truncates it to uid_t: `4294967296` or
    // ` 0` would come back as root. Only an entry that is the one asked for counts.
    account
        .filter(|a| match user.parse::<u32>() {
            Ok(uid) => a.uid.as_raw() == uid,
            Err(_) => a.name == user,
        })
        .ok_or_else(|| not_found("user", user))
}

fn lookup_group(group: &str) -> Result<Gid, String> {
    if let Ok(gid) = group.parse::<u32>() {
        // A gid needs no entry: setgid takes any number (files may be owned by bare gids).
        return Ok(Gid::from_raw(gid));
    }
    let entry = getent("group", group)
        .map_err(|e| format!("cannot look up group `{group}`: {e}"))?
        .ok_or_else(|| not_found("group", group))?;
    let (name, gid) = parse_group(&entry)
        .ok_or_else(|| format!("getent gave a malformed group entry: {entry:?}"))?;
    // As for users: ` 0` must not resolve to gid 0.
    if name != group {
        return Err(not_found("group", group));
    }
    Ok(gid)
}

/// getent exits 2 both when the name does not exist and when the name service holding it
/// (LDAP, sssd) did not answer; the message says so rather than guessing.
fn not_found(what: &str, key: &str) -> String {
    format!("no {what} `{key}` on this system (or its name service did not answer getent)")
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
///
/// The absolute paths come first because forkecho usually runs this as root: a directory in
/// `PATH` that someone else can write must not be able to answer for it.
fn getent(database: &str, key: &str) -> Result<Option<String>, String> {
    // A NUL cannot be passed as an argument, and `:` or a newline cannot be in a name.
    if key.is_empty() || key.contains(['\0', ':', '\n']) {
        return Ok(None);
    }
    let program = ["/usr/bin/getent", "/bin/getent"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .unwrap_or("getent");
    run_getent(program, database, key, LOOKUP_TIMEOUT_SECS)
}

/// Runs `program database -- key` as getent, for at most `timeout_secs`.
fn run_getent(
    program: &str,
    database: &str,
    key: &str,
    timeout_secs: u32,
) -> Result<Option<String>, String> {
    let mut command = Command::new(program);
    command.args([database, "--", key]).stdin(Stdio::null());
    // Safe: alarm(2) is async-signal-safe, and the only call between fork and exec.
    // Why: a name service that does not answer (LDAP, sssd over the network) must not hang a
    // start or a reload, during which the loop neither accepts nor reaps. The timer survives
    // exec and SIGALRM's default action ends getent; output() keeps draining its pipes
    // meanwhile, so a long entry cannot stall it either.
    unsafe {
        command.pre_exec(move || {
            libc::alarm(timeout_secs);
            Ok(())
        });
    }
    let output = command
        .output()
        .map_err(|e| format!("cannot run `getent`, the C library's NSS lookup tool: {e}"))?;
    if output.status.signal() == Some(libc::SIGALRM) {
        return Err(format!(
            "`getent {database}` gave no answer within {timeout_secs} s (is a name service \
             down?)"
        ));
    }
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
fn parse_group(line: &str) -> Option<(&str, Gid)> {
    let fields: Vec<&str> = line.split(':').collect();
    match fields[..] {
        [name, _, gid, _] => Some((name, Gid::from_raw(gid.parse().ok()?))),
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
    fn numeric_user_and_group_need_no_name_service() {
        // No passwd entry has this uid; a lookup would say "no user".
        let who = resolve("4000123", Some("4000124")).unwrap();
        assert_eq!((who.uid.as_raw(), who.gid.as_raw()), (4000123, 4000124));
        assert_eq!(who.user, "4000123");
        assert_eq!(resolve("4294967295", Some("1")).unwrap_err().key, "user");
        assert_eq!(resolve("1", Some("4294967295")).unwrap_err().key, "group");
        let err = resolve("4000123", None).unwrap_err();
        assert_eq!(err.key, "user");
        let err = resolve("root", Some("no-such-group-here")).unwrap_err();
        assert_eq!(err.key, "group");
    }

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
    fn group_entries_parse_into_name_and_gid() {
        let nogroup = Some(("nogroup", Gid::from_raw(65534)));
        assert_eq!(parse_group("nogroup:x:65534:"), nogroup);
        let wheel = Some(("wheel", Gid::from_raw(10)));
        assert_eq!(parse_group("wheel:x:10:alice,bob"), wheel);
        assert_eq!(parse_group("wheel:x:ten:"), None);
    }

    #[test]
    fn keys_getent_would_misread_are_not_found() {
        // strtoul in getent would truncate or skip these to uid/gid 0 (root).
        for key in ["4294967296", "-4294967296", " 0", "0x0", "", "a:b", "a\0b"] {
            let err = lookup_user(key).unwrap_err();
            assert!(
                err.starts_with(&format!("no user `{key}`")),
                "{key:?}: {err}"
            );
        }
        for key in [" 0", "0x0", "4294967296"] {
            let err = lookup_group(key).unwrap_err();
            assert!(
                err.starts_with(&format!("no group `{key}`")),
                "{key:?}: {err}"
            );
        }
    }

    #[test]
    fn a_lookup_that_hangs_is_ended_and_reported() {
        // `sh -c -- 'exec sleep 30'` stands in for a getent stuck on a dead name service (a
        // script file of our own could hit ETXTBSY while other tests fork).
        let started = std::time::Instant::now();
        let err = run_getent("/bin/sh", "-c", "exec sleep 30", 1).unwrap_err();
        assert_eq!(
            err,
            "`getent -c` gave no answer within 1 s (is a name service down?)"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn lookups_go_through_nss_and_tell_missing_from_failed() {
        let root = lookup_user("root").expect("root exists everywhere");
        assert_eq!((root.name.as_str(), root.uid.as_raw()), ("root", 0));
        assert_eq!(lookup_user("0").expect("uid 0").name, "root");
        let missing = lookup_user("no-such-user-here").unwrap_err();
        assert_eq!(missing, not_found("user", "no-such-user-here"));
        // A name that looks like an option is a key, not a flag to getent.
        assert!(lookup_user("--help").unwrap_err().starts_with("no user"));
    }
}

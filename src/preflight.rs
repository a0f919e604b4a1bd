//! `--check-config`'s look at the host, beyond what the configuration says: what can be known
//! without disturbing a running instance, which operators check before every reload while the
//! daemon holds its ports, its pid file's lock and its log. A listen address must be one of
//! this host's, on a port this process may bind; the log and pid files must be regular files
//! that can be written (a pid file also read, and holding nothing but a pid, as the start
//! requires), or be creatable. Whether a port is in use is not checked: the running instance
//! is what uses it.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use socket2::{Domain, Socket, Type};

use crate::config::Config;
use crate::listen::ListenAddr;

/// Something the host will refuse when forkecho starts with this configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static str,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.reason)
    }
}

/// The first problem found, in the order of the keys' documentation.
pub fn check(config: &Config) -> Result<(), Problem> {
    for (i, addr) in config.listen.iter().enumerate() {
        let checked = match addr {
            ListenAddr::Ip(ip) => check_address(*ip),
            ListenAddr::Unix(path) => check_socket_path(path),
        };
        checked.map_err(|reason| {
            let (key, prefix) = config.listen_key_of(i);
            Problem {
                key,
                reason: format!("{prefix}{reason}"),
            }
        })?;
    }
    if let Some(path) = &config.pid_file {
        let problem = |reason| Problem {
            key: "pid_file",
            reason,
        };
        // Never followed through a symlink, opened for reading and writing.
        check_writable(path, false, libc::R_OK | libc::W_OK).map_err(problem)?;
        crate::pidfile::inspect(path).map_err(|e| problem(e.to_string()))?;
    }
    if config
        .listen
        .iter()
        .any(|a| matches!(a, ListenAddr::Unix(_)))
    {
        let settings = config.bind_settings();
        check_socket_owner(settings.unix_owner, settings.unix_group)?;
    }
    if let Some(addr) = config.metrics_listen {
        check_address(addr).map_err(|reason| Problem {
            key: "metrics_listen",
            reason,
        })?;
    }
    if let Some(path) = config.control_socket_path() {
        check_socket_path(&path).map_err(|reason| Problem {
            key: "control_socket",
            reason,
        })?;
    }
    if let Some(path) = &config.log_file {
        check_writable(path, true, libc::W_OK).map_err(|reason| Problem {
            key: "log_file",
            reason,
        })?;
    }
    Ok(())
}

/// A UNIX-domain socket can be made at `path`: its directory exists and this process may
/// create (and remove) files in it, and nothing but a socket (the running instance's, or a
/// stale one the start replaces) is there already.
fn check_socket_path(path: &Path) -> Result<(), String> {
    let shown = format!("unix:{}", path.display());
    let dir = path.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(format!("{shown}: {} is not a directory", dir.display()))
        }
        Ok(_) if !may_write(dir, libc::W_OK | libc::X_OK) => {
            return Err(format!(
                "{shown}: the socket cannot be made there: {} is not writable",
                dir.display()
            ))
        }
        Ok(_) => {}
        Err(e) => {
            return Err(format!(
                "{shown}: directory {}: {}",
                dir.display(),
                crate::os_error_text(&e)
            ))
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => Err(format!(
            "{shown}: it is {}, not a socket; the start would refuse it and leave it as it is",
            crate::listen::what_is_there(&meta)
        )),
        _ => Ok(()),
    }
}

/// The socket files can be given to `owner` and `group`: as root (or with CAP_CHOWN), or to
/// this process's own user and one of its groups. The key at fault is returned with the
/// reason.
fn check_socket_owner(owner: Option<u32>, group: Option<u32>) -> Result<(), Problem> {
    if nix::unistd::geteuid().is_root() || crate::exec::has_capability(CAP_CHOWN) {
        return Ok(());
    }
    if let Some(uid) = owner.filter(|&uid| uid != nix::unistd::geteuid().as_raw()) {
        return Err(Problem {
            key: "unix_socket_owner",
            reason: format!("giving the socket file to uid {uid} needs root or CAP_CHOWN"),
        });
    }
    let groups = nix::unistd::getgroups().unwrap_or_default();
    let mine = |gid: u32| {
        gid == nix::unistd::getegid().as_raw() || groups.iter().any(|g| g.as_raw() == gid)
    };
    if let Some(gid) = group.filter(|&gid| !mine(gid)) {
        return Err(Problem {
            key: "unix_socket_group",
            reason: format!(
                "giving the socket file to gid {gid}, not one of this user's groups, needs \
                 root or CAP_CHOWN"
            ),
        });
    }
    Ok(())
}

const CAP_CHOWN: u32 = 0;

/// `addr`'s IP is one this host can bind: binding it with port 0 (any free port, so a port the
/// running instance holds does not matter) succeeds. Wildcards always can.
fn check_address(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_unspecified() {
        return Ok(());
    }
    let start = crate::listen::unprivileged_port_start();
    if addr.port() != 0 && addr.port() < start && !crate::listen::can_bind_privileged_ports() {
        return Err(format!(
            "{addr}: a port below {start} needs root or CAP_NET_BIND_SERVICE"
        ));
    }
    // The address as given, scope id (`%ifindex` of a link-local address) included.
    let mut probe_addr = addr;
    probe_addr.set_port(0);
    let probe = || -> io::Result<()> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&probe_addr.into())
    };
    match probe() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Err(format!(
            "{addr}: {} is not an address of this host",
            addr.ip()
        )),
        Err(e) => Err(format!("{addr}: {}", crate::os_error_text(&e))),
    }
}

/// `path` is a regular file this process may access with `mode`, or may be created in an
/// existing directory it may write. With `follow`, a symlink is followed, to where the file
/// would be created if it is dangling. Nothing is opened or created.
fn check_writable(path: &Path, follow: bool, mode: libc::c_int) -> Result<(), String> {
    if follow {
        if let Some(target) = dangling_symlink_target(path) {
            return check_writable(&target, false, mode);
        }
    }
    let shown = path.display();
    let metadata = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    match metadata {
        Ok(m) if !m.is_file() => Err(format!(
            "{shown} is {}, not a regular file",
            crate::file_kind(m.file_type())
        )),
        Ok(_) if !may_write(path, mode) => {
            Err(format!("{shown} cannot be written (permission denied)"))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let dir = dir.unwrap_or(Path::new("."));
            match std::fs::metadata(dir) {
                // Creating a file needs to write the directory and to enter it.
                Ok(m) if m.is_dir() && may_write(dir, libc::W_OK | libc::X_OK) => Ok(()),
                Ok(m) if m.is_dir() => Err(format!(
                    "{shown} cannot be created: {} is not writable",
                    dir.display()
                )),
                Ok(_) => Err(format!(
                    "{shown} cannot be created: {} is not a directory",
                    dir.display()
                )),
                Err(_) => Err(format!(
                    "{shown} cannot be created: {} does not exist",
                    dir.display()
                )),
            }
        }
        Err(e) => Err(format!("{shown}: {}", crate::os_error_text(&e))),
    }
}

/// Where a symlink at `path` points, if it does and its target does not exist (opening it to
/// create would create the target).
fn dangling_symlink_target(path: &Path) -> Option<std::path::PathBuf> {
    let link = std::fs::read_link(path).ok()?;
    if std::fs::metadata(path).is_ok() {
        return None;
    }
    Some(match path.parent() {
        Some(dir) if link.is_relative() => dir.join(link),
        _ => link,
    })
}

/// access(2) with `mode`, as this process's real ids (who the start will run as: the files
/// are opened before root is dropped).
fn may_write(path: &Path, mode: libc::c_int) -> bool {
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // Safe: access only reads a NUL-terminated path.
    unsafe { libc::access(path.as_ptr(), mode) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_not_on_this_host_are_found_without_binding_their_port() {
        assert!(check_address("127.0.0.1:1".parse().unwrap()).is_ok());
        assert!(check_address("0.0.0.0:2333".parse().unwrap()).is_ok());
        // TEST-NET-1 (RFC 5737): never a local address.
        let e = check_address("192.0.2.1:2333".parse().unwrap()).unwrap_err();
        assert_eq!(
            e,
            "192.0.2.1:2333: 192.0.2.1 is not an address of this host"
        );
    }

    #[test]
    fn files_must_be_regular_and_writable_or_creatable() {
        let dir = std::env::temp_dir().join(format!("forkecho-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = libc::W_OK;
        assert!(check_writable(&dir.join("new.log"), true, w).is_ok());
        let e = check_writable(&dir.join("missing/new.log"), true, w).unwrap_err();
        assert!(e.ends_with("missing does not exist"), "{e}");
        let e = check_writable(&dir, true, w).unwrap_err();
        assert!(e.ends_with("is a directory, not a regular file"), "{e}");
        let dangling = dir.join("dangling.log");
        std::os::unix::fs::symlink(dir.join("gone/x.log"), &dangling).unwrap();
        let e = check_writable(&dangling, true, w).unwrap_err();
        assert!(e.ends_with("gone does not exist"), "{e}");
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = check_writable(&fifo, false, w).unwrap_err();
        assert!(e.ends_with("is a FIFO, not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

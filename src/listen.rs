//! Binding the listening sockets, with the options a restartable forking server needs: TCP
//! addresses, and UNIX-domain sockets at a path in the file system.
//!
//! A UNIX-domain socket is a file, and files outlive processes. At start a socket file left
//! by a server that died is replaced only when nothing answers on it (a connect is refused);
//! one a live server answers on, or anything that is not a socket, is refused and left as it
//! is. The file a listener created is removed when the listener is closed, if the path still
//! holds that file (see `SocketFile`).

use std::fmt;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use mio::net::{TcpListener, UnixListener};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::conn::{Credentials, Local, Peer};

/// Where to listen: an IP address and port, or a UNIX-domain socket's path (`unix:/path`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Ip(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// The IP address and port, for a TCP address.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            ListenAddr::Ip(addr) => Some(*addr),
            ListenAddr::Unix(_) => None,
        }
    }

    /// True when `self` and `other` cannot both be bound: see [`overlap`]; two paths only
    /// when they are the same.
    pub fn overlaps(&self, other: &ListenAddr) -> bool {
        match (self, other) {
            (ListenAddr::Ip(a), ListenAddr::Ip(b)) => overlap(*a, *b),
            (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
            _ => false,
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    /// As [`fmt::Display`] writes it.
    fn from_str(s: &str) -> Result<ListenAddr, String> {
        match s.strip_prefix("unix:") {
            Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
            None => s
                .parse()
                .map(ListenAddr::Ip)
                .map_err(|_| format!("`{s}` is not a listen address")),
        }
    }
}

/// `127.0.0.1:2333`, `[::1]:2333` or `unix:/run/forkecho.sock`: as the configuration writes it.
impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Ip(addr) => addr.fmt(f),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How sockets are bound: the settings of `backlog`, `reuse_port` and `unix_socket_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindSettings {
    pub backlog: u32,
    /// SO_REUSEPORT, on TCP listeners.
    pub reuse_port: bool,
    /// The permission bits of a UNIX-domain socket's file.
    pub unix_mode: u32,
    /// Who owns a UNIX-domain socket's file; `None`: this process's user and group.
    pub unix_owner: Option<u32>,
    pub unix_group: Option<u32>,
}

/// A listening socket of either kind, non-blocking, as the loop polls it.
pub enum ListenSocket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl AsRawFd for ListenSocket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            ListenSocket::Tcp(l) => l.as_raw_fd(),
            ListenSocket::Unix(l) => l.as_raw_fd(),
        }
    }
}

impl std::os::fd::AsFd for ListenSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            ListenSocket::Tcp(l) => l.as_fd(),
            ListenSocket::Unix(l) => l.as_fd(),
        }
    }
}

impl mio::event::Source for ListenSocket {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        match self {
            ListenSocket::Tcp(l) => l.register(registry, token, interests),
            ListenSocket::Unix(l) => l.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        match self {
            ListenSocket::Tcp(l) => l.reregister(registry, token, interests),
            ListenSocket::Unix(l) => l.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        match self {
            ListenSocket::Tcp(l) => l.deregister(registry),
            ListenSocket::Unix(l) => l.deregister(registry),
        }
    }
}

/// A bound, listening, non-blocking socket and the address it actually got (real port for 0).
pub struct Listener {
    /// The socket file this listener created, removed with it (or before, see
    /// [`Listener::remove_socket_file`]). First, so that it is dropped first: while the
    /// socket is open, the file's inode cannot be freed and given to another file.
    file: Option<SocketFile>,
    pub socket: ListenSocket,
    /// The address as configured (port 0 stays 0): what a reload compares against.
    pub configured: ListenAddr,
    /// The address actually bound.
    pub local: ListenAddr,
    /// Passed in by systemd (socket activation): its address belongs to the .socket unit.
    pub from_systemd: bool,
    /// The `listen(2)` backlog it was bound with (a reload changes it for new addresses only);
    /// for a socket systemd passed, the most the kernel allows.
    pub backlog: u32,
    /// The PROXY protocol policy of this listener, if it expects headers: decided per
    /// listener (`Config::assign_proxy_policies`), not looked up by address, which two
    /// port-0 listeners share.
    pub proxy: Option<crate::proxy::Policy>,
}

impl Listener {
    /// The listener as each of its connections carries it.
    pub fn as_local(&self) -> Local {
        match &self.local {
            ListenAddr::Ip(addr) => Local::Ip(*addr),
            ListenAddr::Unix(_) => Local::Unix,
        }
    }

    /// This listener as an upgrade passes it on: its descriptor is kept across `execve` by
    /// the caller.
    pub fn passed(&self) -> crate::upgrade::PassedListener {
        crate::upgrade::PassedListener {
            fd: self.socket.as_raw_fd(),
            configured: self.configured.to_string(),
            local: self.local.to_string(),
            from_systemd: self.from_systemd,
            backlog: self.backlog,
            socket_file: self.file.as_ref().map(|f| (f.dev, f.ino)),
        }
    }

    /// The listener the previous image passed on (see [`Listener::passed`]).
    pub fn adopt(passed: &crate::upgrade::PassedListener) -> io::Result<Listener> {
        let local: ListenAddr = passed.local.parse().map_err(io::Error::other)?;
        let configured: ListenAddr = passed.configured.parse().map_err(io::Error::other)?;
        let fd = crate::upgrade::adopt(passed.fd)?;
        let socket = match &local {
            ListenAddr::Ip(_) => {
                ListenSocket::Tcp(TcpListener::from_std(std::net::TcpListener::from(fd)))
            }
            ListenAddr::Unix(_) => ListenSocket::Unix(UnixListener::from_std(
                std::os::unix::net::UnixListener::from(fd),
            )),
        };
        let file = match (&local, passed.socket_file) {
            (ListenAddr::Unix(path), Some((dev, ino))) => Some(SocketFile {
                path: path.clone(),
                dev,
                ino,
                creator: std::process::id(),
            }),
            _ => None,
        };
        Ok(Listener {
            file,
            socket,
            configured,
            local,
            from_systemd: passed.from_systemd,
            backlog: passed.backlog,
            proxy: None,
        })
    }

    /// Whether this listener is the one `address` names: as configured, as bound (the port 0
    /// gave it), or for a UNIX-domain socket by the file at that path, whatever path leads
    /// there.
    pub fn serves(&self, address: &ListenAddr) -> bool {
        if *address == self.configured || *address == self.local {
            return true;
        }
        match (address, &self.file) {
            (ListenAddr::Unix(path), Some(file)) => file.is_at(path),
            _ => false,
        }
    }

    /// Removes the socket file this listener made, now, if the path still holds it: no new
    /// client can reach the listener by its path after this (a connect fails: no such file),
    /// while those already queued can still be accepted. Call it before draining a listener
    /// that closes.
    pub fn remove_socket_file(&mut self) {
        self.file = None;
    }

    /// Accepts one connection as a *blocking*, close-on-exec socket, and says who the peer is.
    ///
    /// Why blocking: the child runs a blocking session, and a socket accepted non-blocking (as
    /// mio's `accept` does) would cost every child two `fcntl` calls to undo it. On Linux an
    /// accepted socket takes its O_NONBLOCK flag from `accept4`'s flags, not from the listener.
    pub fn accept_blocking(&self) -> io::Result<(Socket, Peer)> {
        match &self.socket {
            ListenSocket::Tcp(l) => {
                let (socket, peer) = socket2::SockRef::from(l).accept()?;
                let peer = peer.as_socket().ok_or_else(|| {
                    io::Error::new(ErrorKind::InvalidData, "accepted a non-IP connection")
                })?;
                Ok((socket, Peer::Ip(peer)))
            }
            ListenSocket::Unix(l) => {
                let (socket, _) = socket2::SockRef::from(l).accept()?;
                let credentials = peer_credentials(&socket)?;
                Ok((socket, Peer::Local(credentials)))
            }
        }
    }
}

/// The credentials the kernel recorded for the process at the other end of a UNIX-domain
/// connection when it connected (SO_PEERCRED).
fn peer_credentials(socket: &Socket) -> io::Result<Credentials> {
    let credentials =
        nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(Credentials {
        pid: credentials.pid(),
        uid: credentials.uid(),
        gid: credentials.gid(),
    })
}

/// A socket file a listener created: removed when dropped, by the process that created it and
/// only while the path still holds that file (same device and inode). Another server may have
/// replaced it since, or the operator may have put something else there: that is left alone.
/// A child never removes it: it has another pid (and never runs destructors: it `_exit`s).
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    creator: u32,
}

impl SocketFile {
    /// The socket file just bound at `path`.
    fn created_at(path: &Path) -> io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            creator: std::process::id(),
        })
    }

    fn still_ours(&self) -> bool {
        self.is_at(&self.path)
    }

    /// Whether `path` (followed through symbolic links on the way, but not at its end) is
    /// this socket file.
    fn is_at(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|meta| {
            meta.file_type().is_socket() && meta.dev() == self.dev && meta.ino() == self.ino
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::process::id() != self.creator || !self.still_ours() {
            return;
        }
        // A path in a directory the dropped user may not write to stays: the next start
        // finds nothing answering on it and replaces it.
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!(
                "cannot remove socket file {}: {}; the next start replaces it",
                self.path.display(),
                crate::os_error_text(&e)
            );
        }
    }
}

/// Why a listener could not be set up; displays as `cannot listen on ADDR: reason`.
#[derive(Debug)]
pub struct ListenError {
    pub addr: ListenAddr,
    pub error: io::Error,
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot listen on {}: {}",
            self.addr,
            crate::os_error_text(&self.error)
        )
    }
}

impl std::error::Error for ListenError {}

/// Binds every address, or none: the first failure is returned and the sockets already bound are
/// closed when dropped (and their socket files removed).
pub fn bind_all(
    addrs: &[ListenAddr],
    settings: &BindSettings,
) -> Result<Vec<Listener>, ListenError> {
    addrs
        .iter()
        .map(|addr| {
            let bound = match addr {
                ListenAddr::Ip(ip) => bind(*ip, settings.backlog, settings.reuse_port),
                ListenAddr::Unix(path) => bind_unix(path, settings),
            };
            bound.map_err(|error| ListenError {
                addr: addr.clone(),
                error,
            })
        })
        .collect()
}

/// The listening sockets systemd passed us (socket activation: `LISTEN_FDS`, for this pid),
/// or `None` when started without them. They replace the `listen` addresses: systemd bound
/// them (privileged ports included, before we ever ran) and keeps them across our restarts.
/// TCP and UNIX-domain stream sockets are taken; a UNIX socket's file is systemd's, and stays.
pub fn from_systemd() -> io::Result<Option<Vec<Listener>>> {
    // The protocol names the receiving process in LISTEN_PID; listenfd would also take
    // LISTEN_FDS without it, so a variable leaked from elsewhere could hand us random fds.
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    if !for_us {
        return Ok(None);
    }
    let mut passed = listenfd::ListenFd::from_env();
    if passed.len() == 0 {
        return Ok(None);
    }
    let mut listeners = Vec::new();
    for i in 0..passed.len() {
        let Some(listener) = take_passed_socket(&mut passed, i)? else {
            continue;
        };
        listeners.push(listener);
    }
    if listeners.is_empty() {
        return Err(io::Error::other(
            "systemd passed no listening TCP or UNIX-domain stream socket",
        ));
    }
    Ok(Some(listeners))
}

/// Passed socket `i` as a listener, if it is a listening stream socket (TCP or UNIX); any
/// other is logged and left.
fn take_passed_socket(passed: &mut listenfd::ListenFd, i: usize) -> io::Result<Option<Listener>> {
    let (socket, local) = match passed.take_tcp_listener(i) {
        Ok(Some(socket)) => {
            let local = ListenAddr::Ip(socket.local_addr()?);
            (ListenSocket::Tcp(TcpListener::from_std(socket)), local)
        }
        Ok(None) => return Ok(None),
        Err(tcp_error) => {
            match passed.take_unix_listener(i) {
                Ok(Some(socket)) => {
                    let path = socket.local_addr()?.as_pathname().map(Path::to_path_buf);
                    // An abstract or unnamed socket has no path: named by its descriptor.
                    let local = ListenAddr::Unix(
                        path.unwrap_or_else(|| PathBuf::from(format!("(systemd socket {i})"))),
                    );
                    (ListenSocket::Unix(UnixListener::from_std(socket)), local)
                }
                Ok(None) => return Ok(None),
                Err(_) => {
                    log::warn!("socket {i} passed by systemd is not a stream socket ({tcp_error}); ignored");
                    return Ok(None);
                }
            }
        }
    };
    let socket_ref = socket2::SockRef::from(&socket);
    // An Accept=yes unit passes connected sockets; accept on one fails forever.
    if !socket_ref.is_listener()? {
        log::warn!("socket {i} passed by systemd is not listening (Accept=yes?); ignored");
        return Ok(None);
    }
    // The loop needs non-blocking accepts; systemd hands sockets over blocking.
    socket_ref.set_nonblocking(true)?;
    Ok(Some(Listener {
        socket,
        configured: local.clone(),
        local,
        from_systemd: true,
        backlog: u16::MAX as u32,
        proxy: None,
        file: None,
    }))
}

/// True when `a` and `b` cannot both be bound as listeners: the same port (not 0) in the same
/// family, and the same address or one of them the wildcard (`0.0.0.0`, `[::]`). IPv6
/// listeners are IPv6-only, so `[::]:P` and `0.0.0.0:P` do not overlap.
pub fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The first port anyone may bind (`net.ipv4.ip_unprivileged_port_start`, 1024 unless
/// changed). A procfs file: reading it never waits.
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1024)
}

/// True if this process holds CAP_NET_BIND_SERVICE (root usually does, a dropped user not).
pub fn can_bind_privileged_ports() -> bool {
    const CAP_NET_BIND_SERVICE: u32 = 10;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    match effective {
        Some(caps) => caps & (1 << CAP_NET_BIND_SERVICE) != 0,
        None => nix::unistd::geteuid().is_root(),
    }
}

fn bind(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<Listener> {
    // socket2 creates the socket with SOCK_CLOEXEC; every child closes it anyway.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Why: a restarted server must bind while sessions of the old one still hold the port.
    socket.set_reuse_address(true)?;
    if reuse_port {
        // Several instances bind the same port and the kernel spreads new connections over
        // them by a hash of the peer: scale-out on one host without a proxy in front.
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // Why: `[::]:P` and `0.0.0.0:P` are then two separate listeners, as written in the config,
        // instead of the IPv6 one silently taking IPv4 too and the IPv4 one failing to bind.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog as i32)?;
    let std_listener: std::net::TcpListener = socket.into();
    let local = std_listener.local_addr()?;
    Ok(Listener {
        socket: ListenSocket::Tcp(TcpListener::from_std(std_listener)),
        configured: ListenAddr::Ip(addr),
        local: ListenAddr::Ip(local),
        from_systemd: false,
        backlog,
        proxy: None,
        file: None,
    })
}

/// Binds a UNIX-domain socket at `path`, replacing a stale socket file (see
/// [`clear_stale_socket`]), with the file's mode and owner as `settings` say. The file has its
/// mode from the moment it exists, and its owner before anyone can connect (`listen` comes
/// last).
fn bind_unix(path: &Path, settings: &BindSettings) -> io::Result<Listener> {
    clear_stale_socket(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    let address = SockAddr::unix(path)?;
    // bind creates the file with 0777 & ~umask: this umask makes that the mode asked for.
    // The parent is single-threaded (no other thread creates files meanwhile).
    let mask = nix::sys::stat::Mode::from_bits_truncate(0o777 & !settings.unix_mode);
    let previous = nix::sys::stat::umask(mask);
    let bound = socket.bind(&address);
    nix::sys::stat::umask(previous);
    bound?;
    let file = SocketFile::created_at(path)?;
    if settings.unix_owner.is_some() || settings.unix_group.is_some() {
        std::os::unix::fs::lchown(path, settings.unix_owner, settings.unix_group).map_err(|e| {
            io::Error::new(e.kind(), format!("chown: {}", crate::os_error_text(&e)))
        })?;
    }
    socket.listen(settings.backlog as i32)?;
    let std_listener: std::os::unix::net::UnixListener = socket.into();
    let local = ListenAddr::Unix(path.to_path_buf());
    Ok(Listener {
        socket: ListenSocket::Unix(UnixListener::from_std(std_listener)),
        configured: local.clone(),
        local,
        from_systemd: false,
        backlog: settings.backlog,
        proxy: None,
        file: Some(file),
    })
}

/// Makes `path` free for a new socket, or says why it cannot be: nothing there is fine; a
/// socket nothing answers on (its server died without removing it) is removed; a socket a
/// live server answers on, or anything that is not a socket, is an error and left as it is.
/// A listener the kernel knows of (see `unix_diag`) is live without being connected to; any
/// other socket is probed by a connect, for a server the kernel's answer cannot show (another
/// network namespace). Never waits: the probe's connect is non-blocking, and a server whose
/// backlog is full (EAGAIN) is as alive as one that accepts.
fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "it is {}, not a socket; left as it is",
                what_is_there(&meta)
            ),
        ));
    }
    // A listener the kernel shows is live, and is not connected to: a server that forks per
    // connection would start a session for the probe.
    if crate::unix_diag::has_listener(meta.dev(), meta.ino()) == Some(true) {
        return Err(server_listening());
    }
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path)?;
            log::info!(
                "replaced the stale socket file {} (nothing answered on it)",
                path.display()
            );
            Ok(())
        }
        Ok(()) => Err(server_listening()),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(server_listening()),
        Err(e) => Err(e),
    }
}

fn server_listening() -> io::Error {
    io::Error::new(
        ErrorKind::AddrInUse,
        "a server is listening on it; left as it is",
    )
}

/// What a file that is not a socket is, for the refusal: "a regular file", "a FIFO", ...
pub fn what_is_there(meta: &std::fs::Metadata) -> &'static str {
    match meta.file_type().is_file() {
        true => "a regular file",
        false => crate::file_kind(meta.file_type()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_overlap_their_family_on_the_same_port() {
        let o = |a: &str, b: &str| overlap(a.parse().unwrap(), b.parse().unwrap());
        assert!(o("0.0.0.0:80", "127.0.0.1:80"));
        assert!(o("127.0.0.1:80", "127.0.0.1:80"));
        assert!(o("[::1]:80", "[::]:80"));
        assert!(!o("0.0.0.0:80", "[::]:80"));
        assert!(!o("0.0.0.0:80", "127.0.0.1:81"));
        assert!(!o("127.0.0.2:80", "127.0.0.1:80"));
        assert!(!o("0.0.0.0:0", "127.0.0.1:0"));
    }
}

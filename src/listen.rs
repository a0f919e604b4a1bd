//! Binding the listening sockets, with the options a restartable forking server needs.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

/// A bound, listening, non-blocking socket and the address it actually got (real port for 0).
pub struct Listener {
    pub socket: TcpListener,
    /// The address as configured (port 0 stays 0): what a reload compares against.
    pub configured: SocketAddr,
    /// The address actually bound.
    pub local: SocketAddr,
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

/// Why a listener could not be set up; displays as `cannot listen on ADDR: reason`.
#[derive(Debug)]
pub struct ListenError {
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
/// closed when dropped.
pub fn bind_all(
    addrs: &[SocketAddr],
    backlog: u32,
    reuse_port: bool,
) -> Result<Vec<Listener>, ListenError> {
    addrs
        .iter()
        .map(|&addr| bind(addr, backlog, reuse_port).map_err(|error| ListenError { addr, error }))
        .collect()
}

/// The listening sockets systemd passed us (socket activation: `LISTEN_FDS`, for this pid),
/// or `None` when started without them. They replace the `listen` addresses: systemd bound
/// them (privileged ports included, before we ever ran) and keeps them across our restarts.
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
        let socket = match passed.take_tcp_listener(i) {
            Ok(Some(socket)) => socket,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("socket {i} passed by systemd is not a TCP socket ({e}); ignored");
                continue;
            }
        };
        // An Accept=yes unit passes connected sockets; accept on one fails forever.
        if !socket2::SockRef::from(&socket).is_listener()? {
            log::warn!("socket {i} passed by systemd is not listening (Accept=yes?); ignored");
            continue;
        }
        // The loop needs non-blocking accepts; systemd hands sockets over blocking.
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        listeners.push(Listener {
            socket: TcpListener::from_std(socket),
            configured: local,
            local,
            from_systemd: true,
            backlog: u16::MAX as u32,
            proxy: None,
        });
    }
    if listeners.is_empty() {
        return Err(io::Error::other("systemd passed no TCP listening socket"));
    }
    Ok(Some(listeners))
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
        socket: TcpListener::from_std(std_listener),
        configured: addr,
        local,
        from_systemd: false,
        backlog,
        proxy: None,
    })
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

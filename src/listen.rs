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

fn bind(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<Listener> {
    // socket2 creates the socket with SOCK_CLOEXEC; children never exec, and they close it anyway.
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
    })
}

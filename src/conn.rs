//! The connection that crosses `fork`: everything the parent knows about a client when it
//! decides to serve it, handed whole to the child's [`Handler`](crate::handler::Handler).
//! Nothing else about a connection goes from the parent to the child.

use std::io;
use std::net::{SocketAddr, TcpStream};

use ipnet::IpNet;

/// A connection just accepted, before admission decides on it.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    /// The client: the connection's peer, or the one a PROXY header named.
    pub peer: SocketAddr,
    /// The address of the listener it came in on, as bound.
    pub listener: SocketAddr,
    /// The load balancer it came through (the connection's peer), if a PROXY header named
    /// the client.
    pub via: Option<SocketAddr>,
    /// The address the client connected to, as the PROXY header names it.
    pub destination: Option<SocketAddr>,
}

impl Accepted {
    /// A connection straight from its client (no PROXY header).
    pub fn direct(stream: TcpStream, peer: SocketAddr, listener: SocketAddr) -> Accepted {
        Accepted {
            stream,
            peer,
            listener,
            via: None,
            destination: None,
        }
    }
}

/// ` via ADDR` for a connection that came through a load balancer, else nothing: for log
/// lines.
#[derive(Debug, Clone, Copy)]
pub struct Via(pub Option<SocketAddr>);

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(proxy) => write!(f, " via {proxy}"),
            None => Ok(()),
        }
    }
}

/// An admitted connection.
#[derive(Debug)]
pub struct Conn {
    /// The connection itself (blocking, close-on-exec).
    pub stream: TcpStream,
    /// The client's address (the one a PROXY header named, if there was one).
    pub peer: SocketAddr,
    /// The load balancer it came through, if a PROXY header named the client.
    pub via: Option<SocketAddr>,
    /// The address the client connected to, as a PROXY header names it.
    destination: Option<SocketAddr>,
    /// The address of the listener it came in on, as bound: for a wildcard listener
    /// (`0.0.0.0:P`) [`Conn::local_addr`] gives the address the client reached.
    pub listener: SocketAddr,
    /// The source it counts under for `max_per_source` (the peer cut to its prefix).
    pub source: IpNet,
    /// Live sessions from that source, this one included.
    pub from_source: usize,
    /// Connections admitted since start, this one included (1 for the first).
    pub number: u64,
}

impl Conn {
    /// The admitted connection `accepted`, counted under `source` (with `from_source` live
    /// sessions, this one included) as the `number`-th since start.
    pub fn admitted(accepted: Accepted, source: IpNet, from_source: usize, number: u64) -> Conn {
        let Accepted {
            stream,
            peer,
            listener,
            via,
            destination,
        } = accepted;
        Conn {
            stream,
            peer,
            via,
            destination,
            listener,
            source,
            from_source,
            number,
        }
    }

    /// The address the client connected to: the one a PROXY header names, else the socket's.
    /// Asks the socket (`getsockname`) only for a wildcard listener, so a handler that never
    /// needs it costs no system call.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        if let Some(destination) = self.destination {
            Ok(destination)
        } else if self.listener.ip().is_unspecified() {
            self.stream.local_addr()
        } else {
            Ok(self.listener)
        }
    }
}

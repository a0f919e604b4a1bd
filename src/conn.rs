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
    pub peer: SocketAddr,
    /// The address of the listener it came in on, as bound.
    pub listener: SocketAddr,
}

/// An admitted connection.
#[derive(Debug)]
pub struct Conn {
    /// The connection itself (blocking, close-on-exec).
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
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
        } = accepted;
        Conn {
            stream,
            peer,
            listener,
            source,
            from_source,
            number,
        }
    }

    /// The address the client connected to. Asks the socket (`getsockname`) only for a
    /// wildcard listener, so a handler that never needs it costs no system call.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        if self.listener.ip().is_unspecified() {
            self.stream.local_addr()
        } else {
            Ok(self.listener)
        }
    }
}

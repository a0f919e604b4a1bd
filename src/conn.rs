//! The connection that crosses `fork`: everything the parent knows about a client when it
//! decides to serve it, handed whole to the child's [`Handler`](crate::handler::Handler).
//! Nothing else about a connection goes from the parent to the child.
//!
//! A connection comes over TCP or over a UNIX-domain socket; the stream is a plain
//! [`Socket`] either way, and [`Peer`] says who is at the other end: an address and port, or
//! the credentials the kernel recorded for the connecting process (SO_PEERCRED).

use std::fmt;
use std::io;
use std::net::SocketAddr;

use socket2::Socket;

use crate::limits::Source;

/// Who is at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client (the one a PROXY header named, if there was one).
    Ip(SocketAddr),
    /// A process connected to a UNIX-domain listener, as the kernel saw it at `connect`.
    Local(Credentials),
}

/// The credentials of a process that connected to a UNIX-domain socket (SO_PEERCRED): taken
/// by the kernel at `connect`, so the client cannot choose them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Peer {
    /// The IP address of a TCP peer; `None` for a local one.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Peer::Ip(addr) => Some(addr.ip()),
            Peer::Local(_) => None,
        }
    }
}

/// `203.0.113.7:5555`, or `uid:1000,gid:1000,pid:4242`: one word in a log line, beginning
/// with the form its source takes in rules (`uid:1000`).
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Ip(addr) => addr.fmt(f),
            Peer::Local(c) => write!(f, "uid:{},gid:{},pid:{}", c.uid, c.gid, c.pid),
        }
    }
}

/// The peer a log line (and an upgrade's state) writes: an address, or
/// `uid:U,gid:G,pid:P`.
impl std::str::FromStr for Peer {
    type Err = String;

    fn from_str(s: &str) -> Result<Peer, String> {
        if let Ok(addr) = s.parse() {
            return Ok(Peer::Ip(addr));
        }
        let field = |name: &str| {
            s.split(',')
                .find_map(|part| part.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|n| n.parse::<i64>().ok())
        };
        match (field("uid"), field("gid"), field("pid")) {
            (Some(uid), Some(gid), Some(pid)) => Ok(Peer::Local(Credentials {
                pid: pid as i32,
                uid: uid as u32,
                gid: gid as u32,
            })),
            _ => Err(format!("`{s}` is not a peer")),
        }
    }
}

/// The listener a connection came in on, as a connection carries it: an IP listener's
/// address, or the mark of a UNIX-domain one (whose path a child asks its socket for, so
/// that no path is copied for each connection in the parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Ip(SocketAddr),
    Unix,
}

/// A connection just accepted, before admission decides on it.
#[derive(Debug)]
pub struct Accepted {
    /// The connection, blocking and close-on-exec.
    pub stream: Socket,
    /// The client: the connection's peer, or the one a PROXY header named.
    pub peer: Peer,
    /// The listener it came in on.
    pub listener: Local,
    /// The load balancer it came through (the connection's peer), if a PROXY header named
    /// the client.
    pub via: Option<SocketAddr>,
    /// The address the client connected to, as the PROXY header names it.
    pub destination: Option<SocketAddr>,
}

impl Accepted {
    /// A connection straight from its client (no PROXY header).
    pub fn direct(stream: Socket, peer: Peer, listener: Local) -> Accepted {
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

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
    pub stream: Socket,
    /// The client (the one a PROXY header named, if there was one).
    pub peer: Peer,
    /// The load balancer it came through, if a PROXY header named the client.
    pub via: Option<SocketAddr>,
    /// The address the client connected to, as a PROXY header names it.
    destination: Option<SocketAddr>,
    /// The listener it came in on: for a wildcard listener (`0.0.0.0:P`) [`Conn::local_addr`]
    /// gives the address the client reached.
    pub listener: Local,
    /// The source it counts under for `max_per_source` (the peer cut to its prefix, or its
    /// uid).
    pub source: Source,
    /// Live sessions from that source, this one included.
    pub from_source: usize,
    /// Connections admitted since start, this one included (1 for the first).
    pub number: u64,
}

impl Conn {
    /// The admitted connection `accepted`, counted under `source` (with `from_source` live
    /// sessions, this one included) as the `number`-th since start.
    pub fn admitted(accepted: Accepted, source: Source, from_source: usize, number: u64) -> Conn {
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
    /// needs it costs no system call. `None` on a UNIX-domain connection.
    pub fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        match (self.destination, self.listener) {
            (Some(destination), _) => Ok(Some(destination)),
            (None, Local::Unix) => Ok(None),
            (None, Local::Ip(listener)) if listener.ip().is_unspecified() => {
                let local = self.stream.local_addr()?;
                Ok(local.as_socket())
            }
            (None, Local::Ip(listener)) => Ok(Some(listener)),
        }
    }

    /// The path of the UNIX-domain listener the connection came in on (`getsockname`), if it
    /// came in on one that has a path.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        let local = self.stream.local_addr().ok()?;
        local.as_pathname().map(std::path::Path::to_path_buf)
    }
}

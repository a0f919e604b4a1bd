//! The echo handler: one client's session, run in its own child process, a plain blocking echo.
//! Blocking I/O is the point of forking per connection: the child has one socket and nothing
//! else to do, so the kernel does the waiting and each session's code stays a straight line.
//!
//! Its signal policy, beyond the defaults `spawn` restores: SIGPIPE ignored (a vanished client
//! is EPIPE, exit code 6, not death), and SIGTTOU and SIGXFSZ left ignored as the parent set
//! them (a log line to a `tostop` terminal or a file at its size limit must not end a session).
//!
//! The outcome becomes the child's exit code, which the parent logs when it reaps the child:
//!
//! | code | outcome |
//! |------|---------|
//! | 0  | the client closed its side; everything it sent was echoed, then our side was shut down |
//! | 3  | idle timeout: no input for `idle_timeout` |
//! | 4  | write timeout: the client stopped reading and no byte could be sent for `idle_timeout` |
//! | 5  | connection reset by the peer |
//! | 6  | broken pipe: the peer went away while we were writing |
//! | 7  | any other I/O error, e.g. the connection timed out (logged by the child) |
//! | 8  | `max_session_time` reached |
//! | 70 | internal error: the session panicked (caught; never a core dump): `spawn::EXIT_PANIC` |

use std::io::{self, ErrorKind};
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use log::{debug, warn};
use socket2::Socket;

use crate::conn::{Conn, Peer};

pub const EXIT_CLIENT_CLOSED: i32 = 0;
pub const EXIT_IDLE_TIMEOUT: i32 = 3;
pub const EXIT_WRITE_TIMEOUT: i32 = 4;
pub const EXIT_PEER_RESET: i32 = 5;
pub const EXIT_BROKEN_PIPE: i32 = 6;
pub const EXIT_IO_ERROR: i32 = 7;
pub const EXIT_SESSION_TIME: i32 = 8;

/// What an exit code of the echo means, for the parent's line when it reaps the child (the
/// table above, in a few words).
pub fn meaning(code: i32) -> Option<&'static str> {
    Some(match code {
        EXIT_CLIENT_CLOSED => "client closed",
        EXIT_IDLE_TIMEOUT => "idle timeout",
        EXIT_WRITE_TIMEOUT => "write timeout",
        EXIT_PEER_RESET => "reset by the client",
        EXIT_BROKEN_PIPE => "client gone while writing",
        EXIT_IO_ERROR => "I/O error",
        EXIT_SESSION_TIME => "max_session_time",
        _ => return None,
    })
}

/// What a session needs to know; copied into the child by `fork`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub banner: Vec<u8>,
    pub idle_timeout: Option<Duration>,
    pub max_session_time: Option<Duration>,
}

impl From<&crate::config::Config> for Settings {
    fn from(config: &crate::config::Config) -> Self {
        Settings {
            banner: config.banner.clone(),
            idle_timeout: config.idle_timeout,
            max_session_time: config.max_session_time,
        }
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum Outcome {
    ClientClosed,
    IdleTimeout,
    WriteTimeout,
    PeerReset,
    BrokenPipe,
    SessionTimeLimit,
    IoError(io::Error),
}

impl Outcome {
    #[link_section = ".text.hot.forkecho_child"]
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::ClientClosed => EXIT_CLIENT_CLOSED,
            Outcome::IdleTimeout => EXIT_IDLE_TIMEOUT,
            Outcome::WriteTimeout => EXIT_WRITE_TIMEOUT,
            Outcome::PeerReset => EXIT_PEER_RESET,
            Outcome::BrokenPipe => EXIT_BROKEN_PIPE,
            Outcome::SessionTimeLimit => EXIT_SESSION_TIME,
            Outcome::IoError(_) => EXIT_IO_ERROR,
        }
    }

    /// Classifies an error from a read (`writing == false`) or a write.
    #[link_section = ".text.hot.forkecho_child"]
    fn from_error(e: io::Error, writing: bool) -> Outcome {
        match e.kind() {
            // SO_RCVTIMEO / SO_SNDTIMEO expiring surface as EAGAIN. (ETIMEDOUT is different: the
            // connection itself died of retransmission or keepalive timeouts; that is code 7.)
            ErrorKind::WouldBlock if writing => Outcome::WriteTimeout,
            ErrorKind::WouldBlock => Outcome::IdleTimeout,
            ErrorKind::ConnectionReset => Outcome::PeerReset,
            ErrorKind::BrokenPipe => Outcome::BrokenPipe,
            _ => Outcome::IoError(e),
        }
    }
}

/// Runs the whole session on `stream` and says how it ended.
///
/// A write to a client that is gone fails with EPIPE (exit code 6) instead of killing the
/// child: sends say MSG_NOSIGNAL, and SIGPIPE is ignored anyway, inherited from the parent
/// (`signals::hook` makes sure).
///
/// `buffer` is the echo's buffer, [`BUFFER_SIZE`] bytes or any other size; its contents do not
/// matter (see [`heap_buffer`] and `lean_fork`'s child memory).
#[link_section = ".text.hot.forkecho_child"]
pub fn run(conn: Conn, settings: &Settings, buffer: &mut [MaybeUninit<u8>]) -> Outcome {
    let tcp = matches!(conn.peer, Peer::Ip(_));
    let outcome = match serve(&conn.stream, settings, tcp, buffer) {
        Ok(()) => Outcome::ClientClosed,
        Err(outcome) => outcome,
    };
    let peer = conn.peer;
    match &outcome {
        Outcome::IoError(e) => warn!(
            event = "session", peer:% = peer, reason:% = e;
            "session {peer} failed: {e} ({})", Described(&conn)
        ),
        other => debug!(
            event = "session", peer:% = peer, reason:? = other;
            "session {peer} ended: {other:?} ({})", Described(&conn)
        ),
    }
    outcome
}

/// The rest of a session's end line: `connection #12 to 127.0.0.1:2333, 1 live from
/// 127.0.0.1/32`. Formatted only when the line is written (the local address of a wildcard
/// listener costs a system call).
struct Described<'a>(&'a Conn);

impl std::fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conn = self.0;
        write!(f, "connection #{} to ", conn.number)?;
        match (conn.local_addr(), conn.listener) {
            (Ok(Some(local)), _) => write!(f, "{local}")?,
            (_, crate::conn::Local::Ip(listener)) => write!(f, "{listener}")?,
            (_, crate::conn::Local::Unix) => match conn.local_path() {
                Some(path) => write!(f, "unix:{}", path.display())?,
                None => f.write_str("a UNIX-domain socket")?,
            },
        }
        write!(f, ", {} live from {}", conn.from_source, conn.source)
    }
}

#[link_section = ".text.hot.forkecho_child"]
fn serve(
    stream: &Socket,
    settings: &Settings,
    tcp: bool,
    buffer: &mut [MaybeUninit<u8>],
) -> Result<(), Outcome> {
    prepare(stream, settings, tcp).map_err(Outcome::IoError)?;
    let mut clock = SessionClock::new(settings);
    write_all(stream, &settings.banner, &mut clock)?;
    echo(stream, &mut clock, buffer)?;
    // The client half-closed and everything it sent is echoed: pass the EOF on.
    match socket::shutdown_write(stream) {
        Ok(()) => Ok(()),
        // The connection was reset after the client's EOF: whatever was still in our send
        // buffer is lost, so this is not a clean end.
        Err(e) if e.kind() == ErrorKind::NotConnected => Err(Outcome::PeerReset),
        Err(e) => Err(Outcome::from_error(e, true)),
    }
}

/// Sends everything the client sends back to it, until the client's EOF: read into a buffer,
/// write it back.
///
/// Why not splice(2) through a pipe, which this echo used before: measured in one interleaved
/// run, the copy moved a 1 GiB stream at 1,672 MiB/s against splice's 1,247, and a stream of
/// 4 KiB writes at 1,020 against 680 (`tcpserver … cat`: 1,034), with request/response and
/// connection rates unchanged. A splice moves at most one pipe's 16 slots, one socket buffer
/// fragment each (about 64 KiB a call for 4 KiB writes), where one read takes 128 KiB.
///
/// The buffer is never zeroed: a page of it is touched only when a read reaches it (a 64-byte
/// session touches one).
#[link_section = ".text.hot.forkecho_child"]
fn echo(
    stream: &Socket,
    clock: &mut SessionClock,
    buffer: &mut [MaybeUninit<u8>],
) -> Result<(), Outcome> {
    loop {
        clock.before_io(stream)?;
        let n = match socket::recv(stream, buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(clock.explain(Outcome::from_error(e, false))),
        };
        // Safe: recv initialised the first `n` bytes.
        let received = unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), n) };
        write_all(stream, received, clock)?;
    }
}

/// The echo's buffer: as large as `cat`'s.
pub const BUFFER_SIZE: usize = 128 * 1024;

/// A buffer for [`run`] from the heap, for a child started with a plain `fork`. Not zeroed: at
/// 128 KiB, malloc maps it fresh, so untouched pages cost nothing. (A lean child's buffer is
/// in memory it inherits untouched, which saves it malloc's writes to the parent's pages.)
pub fn heap_buffer() -> Box<[MaybeUninit<u8>]> {
    Box::new_uninit_slice(BUFFER_SIZE)
}

/// Enforces `max_session_time` with the socket timeouts the idle limit already uses: while the
/// session's end is further away than `idle_timeout`, nothing changes (no extra system call);
/// once it is nearer, each read and write may block only until the end.
struct SessionClock {
    idle: Option<Duration>,
    deadline: Option<Instant>,
}

impl SessionClock {
    #[link_section = ".text.hot.forkecho_child"]
    fn new(settings: &Settings) -> Self {
        SessionClock {
            idle: settings.idle_timeout,
            deadline: settings.max_session_time.map(|d| Instant::now() + d),
        }
    }

    /// Called before each blocking call: fails once the session's time is up, else shortens
    /// the socket timeouts to the time left if that is less than the idle limit.
    #[link_section = ".text.hot.forkecho_child"]
    fn before_io(&mut self, stream: &Socket) -> Result<(), Outcome> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // Under a microsecond is the end: a socket timeout keeps whole microseconds, and 0
        // would mean no timeout at all.
        if left < Duration::from_micros(1) {
            return Err(Outcome::SessionTimeLimit);
        }
        if self.idle.is_none_or(|idle| left < idle) {
            self.idle = Some(left);
            socket::set_timeouts(stream, Some(left)).map_err(Outcome::IoError)?;
        }
        Ok(())
    }

    /// A timeout that fired at or after the session's end is the session limit, not idleness.
    #[link_section = ".text.hot.forkecho_child"]
    fn explain(&self, outcome: Outcome) -> Outcome {
        let timed_out = matches!(outcome, Outcome::IdleTimeout | Outcome::WriteTimeout);
        match self.deadline {
            Some(deadline) if timed_out && Instant::now() >= deadline => Outcome::SessionTimeLimit,
            _ => outcome,
        }
    }
}

/// Per-session socket setup, done in the child so the parent's accept loop stays short.
#[link_section = ".text.hot.forkecho_child"]
fn prepare(stream: &Socket, settings: &Settings, tcp: bool) -> io::Result<()> {
    // (Already blocking: the parent accepts it so; see `Listener::accept_blocking`.)
    // An echo is interactive: send each reply at once instead of waiting to coalesce (Nagle;
    // a UNIX-domain socket has none).
    if tcp {
        socket::set_nodelay(stream)?;
    }
    // The same limit bounds silence from the client and a client that stopped reading, so no
    // peer can pin a child forever. `None` (timeout 0) means wait indefinitely.
    socket::set_timeouts(stream, settings.idle_timeout)?;
    Ok(())
}

/// Writes all of `bytes`, retrying partial writes and EINTR, and consulting the session clock
/// before every `write`: a client that reads a little now and then must not stretch one
/// echo past `max_session_time` (each partial write would restart the socket timeout).
#[link_section = ".text.hot.forkecho_child"]
fn write_all(stream: &Socket, mut bytes: &[u8], clock: &mut SessionClock) -> Result<(), Outcome> {
    while !bytes.is_empty() {
        clock.before_io(stream)?;
        match socket::send(stream, bytes) {
            Ok(0) => return Err(Outcome::IoError(ErrorKind::WriteZero.into())),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(clock.explain(Outcome::from_error(e, true))),
        }
    }
    Ok(())
}

/// The session's socket calls, made to libc directly: socket2's wrappers are code outside the
/// child's section, a page fault per session (see `lean_fork`). Same calls, same flags.
mod socket {
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use socket2::Socket;

    /// `ret`, or the error it reports.
    #[link_section = ".text.hot.forkecho_child"]
    fn checked(ret: isize) -> io::Result<usize> {
        match ret {
            -1 => Err(io::Error::last_os_error()),
            n => Ok(n as usize),
        }
    }

    #[link_section = ".text.hot.forkecho_child"]
    fn set_option<T>(socket: &Socket, level: i32, name: i32, value: &T) -> io::Result<()> {
        // Safe: `value` is a valid T for the option, of the length given.
        let ret = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        checked(ret as isize).map(drop)
    }

    /// TCP_NODELAY on.
    #[link_section = ".text.hot.forkecho_child"]
    pub fn set_nodelay(socket: &Socket) -> io::Result<()> {
        set_option(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &1 as &libc::c_int,
        )
    }

    /// SO_RCVTIMEO and SO_SNDTIMEO to `timeout`; `None` (as a zero timeval) means none. A
    /// timeout under a microsecond would be none too: callers never pass one.
    #[link_section = ".text.hot.forkecho_child"]
    pub fn set_timeouts(socket: &Socket, timeout: Option<Duration>) -> io::Result<()> {
        let timeout = timeout.unwrap_or(Duration::ZERO);
        let value = libc::timeval {
            tv_sec: timeout.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        set_option(socket, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &value)?;
        set_option(socket, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &value)
    }

    #[link_section = ".text.hot.forkecho_child"]
    pub fn recv(socket: &Socket, buffer: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        // Safe: the kernel writes at most `buffer.len()` bytes into it.
        let ret = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        checked(ret)
    }

    /// With MSG_NOSIGNAL, as socket2's `write`: a client gone is EPIPE, whatever SIGPIPE's
    /// disposition.
    #[link_section = ".text.hot.forkecho_child"]
    pub fn send(socket: &Socket, bytes: &[u8]) -> io::Result<usize> {
        // Safe: the kernel reads at most `bytes.len()` bytes of it.
        let ret = unsafe {
            libc::send(
                socket.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        checked(ret)
    }

    #[link_section = ".text.hot.forkecho_child"]
    pub fn shutdown_write(socket: &Socket) -> io::Result<()> {
        // Safe: shuts down a descriptor this process owns.
        let ret = unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
        checked(ret as isize).map(drop)
    }
}

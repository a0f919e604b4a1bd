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

use std::io::{self, ErrorKind, Read, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use socket2::{SockRef, Socket};

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

/// Buffer size of the fallback echo (when splice is refused): the kernel's default socket
/// buffer scale, so a bulk transfer moves in few system calls.
const BUFFER_SIZE: usize = 64 * 1024;

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
/// SIGPIPE is ignored, inherited from the parent (`signals::hook` makes sure): a write to a
/// client that is gone fails with EPIPE (exit code 6) instead of killing the child, and
/// splicing into a socket cannot say MSG_NOSIGNAL.
pub fn run(conn: Conn, settings: &Settings) -> Outcome {
    let tcp = matches!(conn.peer, Peer::Ip(_));
    let outcome = match serve(&conn.stream, settings, tcp) {
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

fn serve(stream: &Socket, settings: &Settings, tcp: bool) -> Result<(), Outcome> {
    prepare(stream, settings, tcp).map_err(Outcome::IoError)?;
    let mut clock = SessionClock::new(settings);
    write_all(stream, &settings.banner, &mut clock)?;
    echo(stream, &mut clock)?;
    // The client half-closed and everything it sent is echoed: pass the EOF on.
    match stream.shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        // The connection was reset after the client's EOF: whatever was still in our send
        // buffer is lost, so this is not a clean end.
        Err(e) if e.kind() == ErrorKind::NotConnected => Err(Outcome::PeerReset),
        Err(e) => Err(Outcome::from_error(e, true)),
    }
}

/// Sends everything the client sends back to it, until the client's EOF.
///
/// Through a pipe with splice(2) when the kernel allows it: the kernel moves page references
/// from the socket's receive queue to its send queue, so no byte is copied through this process
/// and the child touches no buffer (a 64 KiB buffer would be 16 fresh pages in every child).
/// Where splice is refused, or no pipe can be made, through a buffer with read/write.
fn echo(stream: &Socket, clock: &mut SessionClock) -> Result<(), Outcome> {
    // The pipe is the child's own, made after the inherited descriptors were closed.
    let Ok((pipe_out, pipe_in)) = nix::unistd::pipe2(OFlag::O_CLOEXEC) else {
        return copy_echo(stream, clock);
    };
    match splice_echo(stream, &pipe_in, &pipe_out, clock) {
        Spliced::Ended(result) => result,
        Spliced::Refused | Spliced::CopyFromHere => copy_echo(stream, clock),
    }
}

/// How a splice echo stopped.
enum Spliced {
    /// The session is over, one way or another.
    Ended(Result<(), Outcome>),
    /// The kernel refused to splice from this socket before a byte moved: use the copy.
    Refused,
    /// Splice cannot go on, but the session can, with the copy (the pipe is empty):
    /// - urgent (out-of-band) data: TCP splice stops at the urgent mark and returns 0 there
    ///   forever, where `read` steps over the mark;
    /// - the session's end is near: inside one splice the kernel may wait out the send timeout
    ///   more than once, which would overshoot `max_session_time`; a write waits once.
    CopyFromHere,
}

/// The most one splice moves; the pipe's capacity (64 KiB by default) caps it in practice.
const SPLICE_CHUNK: usize = 1 << 20;

/// socket → pipe → socket until EOF. The pipe is always drained before the next read, so the
/// first splice never waits for pipe space, only for the client, as a read would.
///
/// Note: splice into a socket sends without MSG_NOSIGNAL; a vanished client yields EPIPE rather
/// than a fatal SIGPIPE because the child ignores SIGPIPE (inherited: `signals::hook`).
fn splice_echo(
    stream: &Socket,
    pipe_in: &OwnedFd,
    pipe_out: &OwnedFd,
    clock: &mut SessionClock,
) -> Spliced {
    let mut moved_any = false;
    loop {
        if let Err(outcome) = clock.before_io(stream) {
            return Spliced::Ended(Err(outcome));
        }
        if clock.deadline_near() {
            return Spliced::CopyFromHere;
        }
        let n = match splice(
            stream,
            None,
            pipe_in,
            None,
            SPLICE_CHUNK,
            SpliceFFlags::empty(),
        ) {
            Ok(0) if at_end_of_input(stream) => return Spliced::Ended(Ok(())),
            Ok(0) => return Spliced::CopyFromHere,
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EINVAL | Errno::ENOSYS) if !moved_any => return Spliced::Refused,
            Err(e) => {
                let outcome = Outcome::from_error(e.into(), false);
                return Spliced::Ended(Err(clock.explain(outcome)));
            }
        };
        moved_any = true;
        if let Err(outcome) = drain_pipe_to(stream, pipe_out, n, clock) {
            return Spliced::Ended(Err(outcome));
        }
    }
}

/// Moves the `n` bytes in the pipe to the socket, consulting the session clock before every
/// splice, as `write_all` does for writes.
///
/// The send timeout (`idle_timeout`) applies per call, and inside one splice the kernel may send
/// a few bytes, wait out the timeout, then wait it out again for the rest before returning a
/// partial count; the next call then times out with nothing sent. A client that stops reading
/// is therefore cut off after one to three `idle_timeout`s (a plain write loop: one to two).
fn drain_pipe_to(
    stream: &Socket,
    pipe_out: &OwnedFd,
    mut n: usize,
    clock: &mut SessionClock,
) -> Result<(), Outcome> {
    while n > 0 {
        clock.before_io(stream)?;
        if clock.deadline_near() {
            return copy_pipe_to(stream, pipe_out, n, clock);
        }
        match splice(pipe_out, None, stream, None, n, SpliceFFlags::empty()) {
            Ok(0) => return Err(Outcome::IoError(ErrorKind::WriteZero.into())),
            Ok(m) => n -= m,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(clock.explain(Outcome::from_error(e.into(), true))),
        }
    }
    Ok(())
}

/// Moves the `n` bytes left in the pipe to the socket with read and `write_all`, which waits
/// out the (shortened) send timeout once per call rather than splice's up to twice.
fn copy_pipe_to(
    stream: &Socket,
    pipe_out: &OwnedFd,
    mut n: usize,
    clock: &mut SessionClock,
) -> Result<(), Outcome> {
    let mut buffer = vec![0u8; n.min(BUFFER_SIZE)];
    while n > 0 {
        let want = n.min(buffer.len());
        // The bytes are already in the pipe: this read never waits.
        let got = match nix::unistd::read(pipe_out, &mut buffer[..want]) {
            Ok(0) => return Err(Outcome::IoError(ErrorKind::UnexpectedEof.into())),
            Ok(got) => got,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Outcome::IoError(e.into())),
        };
        write_all(stream, &buffer[..got], clock)?;
        n -= got;
    }
    Ok(())
}

/// True if the client really closed its side: a splice that returns 0 may also mean it stopped
/// at an urgent mark. One non-blocking peek tells them apart (0 only at the end of input).
fn at_end_of_input(stream: &Socket) -> bool {
    let mut byte = [MaybeUninit::uninit()];
    let peek =
        SockRef::from(stream).recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
    matches!(peek, Ok(0))
}

/// The fallback echo: read into a buffer, write it back.
fn copy_echo(mut stream: &Socket, clock: &mut SessionClock) -> Result<(), Outcome> {
    let mut buffer = vec![0u8; BUFFER_SIZE];
    loop {
        clock.before_io(stream)?;
        let n = match stream.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(clock.explain(Outcome::from_error(e, false))),
        };
        write_all(stream, &buffer[..n], clock)?;
    }
}

/// Enforces `max_session_time` with the socket timeouts the idle limit already uses: while the
/// session's end is further away than `idle_timeout`, nothing changes (no extra system call);
/// once it is nearer, each read and write may block only until the end.
struct SessionClock {
    idle: Option<Duration>,
    deadline: Option<Instant>,
    /// The socket timeouts have been shortened to the time left.
    shortened: bool,
}

impl SessionClock {
    fn new(settings: &Settings) -> Self {
        SessionClock {
            idle: settings.idle_timeout,
            deadline: settings.max_session_time.map(|d| Instant::now() + d),
            shortened: false,
        }
    }

    /// Called before each blocking call: fails once the session's time is up, else shortens
    /// the socket timeouts to the time left if that is less than the idle limit.
    fn before_io(&mut self, stream: &Socket) -> Result<(), Outcome> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Outcome::SessionTimeLimit);
        }
        if self.idle.is_none_or(|idle| left < idle) {
            self.idle = Some(left);
            self.shortened = true;
            stream
                .set_read_timeout(Some(left))
                .and_then(|()| stream.set_write_timeout(Some(left)))
                .map_err(Outcome::IoError)?;
        }
        Ok(())
    }

    /// True once the session's end is nearer than the idle limit (the timeouts then count
    /// down to it).
    fn deadline_near(&self) -> bool {
        self.shortened
    }

    /// A timeout that fired at or after the session's end is the session limit, not idleness.
    fn explain(&self, outcome: Outcome) -> Outcome {
        let timed_out = matches!(outcome, Outcome::IdleTimeout | Outcome::WriteTimeout);
        match self.deadline {
            Some(deadline) if timed_out && Instant::now() >= deadline => Outcome::SessionTimeLimit,
            _ => outcome,
        }
    }
}

/// Per-session socket setup, done in the child so the parent's accept loop stays short.
fn prepare(stream: &Socket, settings: &Settings, tcp: bool) -> io::Result<()> {
    // (Already blocking: the parent accepts it so; see `Listener::accept_blocking`.)
    // An echo is interactive: send each reply at once instead of waiting to coalesce (Nagle;
    // a UNIX-domain socket has none).
    if tcp {
        stream.set_tcp_nodelay(true)?;
    }
    // The same limit bounds silence from the client and a client that stopped reading, so no
    // peer can pin a child forever. `None` (timeout 0) means wait indefinitely.
    stream.set_read_timeout(settings.idle_timeout)?;
    stream.set_write_timeout(settings.idle_timeout)?;
    Ok(())
}

/// Writes all of `bytes`, retrying partial writes and EINTR, and consulting the session clock
/// before every `write`: a client that reads a little now and then must not stretch one
/// echo past `max_session_time` (each partial write would restart the socket timeout).
fn write_all(
    mut stream: &Socket,
    mut bytes: &[u8],
    clock: &mut SessionClock,
) -> Result<(), Outcome> {
    while !bytes.is_empty() {
        clock.before_io(stream)?;
        match stream.write(bytes) {
            Ok(0) => return Err(Outcome::IoError(ErrorKind::WriteZero.into())),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(clock.explain(Outcome::from_error(e, true))),
        }
    }
    Ok(())
}

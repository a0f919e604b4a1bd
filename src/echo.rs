//! The echo handler: one client's session, run in its own child process, a plain blocking echo.
//! Blocking I/O is the point of forking per connection: the child has one socket and nothing
//! else to do, so the kernel does the waiting and each session's code stays a straight line.
//!
//! Its signal policy, beyond the defaults `spawn` restores: SIGPIPE ignored (a vanished client
//! is EPIPE, exit code 6, not death), and SIGTTOU and SIGXFSZ left ignored as the parent set
//! them (a log line to a `tostop` terminal or a file at its size limit must not end a session).
//! With `idle_timeout` or `max_session_time` set, SIGALRM is caught: it is the session clock's
//! timer (see `SessionClock`).
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
            // A socket timeout expiring surfaces as EAGAIN. The session sets none (its clock
            // ends it instead), but a listener's are inherited by its connections. (ETIMEDOUT
            // is different: the connection itself died of retransmission or keepalive
            // timeouts; that is code 7.)
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
    prepare(stream, tcp).map_err(Outcome::IoError)?;
    let mut clock = SessionClock::start(settings).map_err(Outcome::IoError)?;
    write_all(stream, &settings.banner, &mut clock)?;
    echo(stream, &mut clock, buffer, tcp)?;
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
    tcp: bool,
) -> Result<(), Outcome> {
    let mut nagle = Coalescing::new(tcp);
    loop {
        clock.before_io()?;
        let n = match nagle.receive(stream, buffer) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => match clock.interrupted(false) {
                Ok(()) => continue,
                Err(limit) => {
                    last_look(limit, || socket::recv(stream, buffer, libc::MSG_DONTWAIT))?
                }
            },
            Err(e) => return Err(Outcome::from_error(e, false)),
        };
        // The client's EOF, from the read or from its last look.
        if n == 0 {
            return Ok(());
        }
        clock.progressed();
        nagle.after_read(stream, n);
        // Safe: recv initialised the first `n` bytes.
        let received = unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), n) };
        write_all(stream, received, clock)?;
    }
}

/// A read at least this large means the client is streaming: see [`Coalescing`]. Far above
/// a request a client waits on in the usual interactive protocol, and below what one read
/// takes from a client streaming on loopback (about 57 KiB for 4 KiB writes).
const STREAM_READ: usize = 32 * 1024;

/// Nagle's algorithm (TCP_NODELAY off) for the stretches where the client streams, and never
/// while the session waits for the client.
///
/// An echo answers at once: `prepare` sets TCP_NODELAY. With Nagle's algorithm a small send
/// waits for the client to acknowledge the previous small one, and a client that is waiting
/// for its answer delays that acknowledgement up to 40 ms (`tcpserver … cat`, which leaves
/// Nagle on, stalled 43 ms in 1 of 40 requests sent in two parts). On a stream, though,
/// sending every read at once makes more and smaller segments, and more wakeups for the
/// client: a stream of 4 KiB writes moved 1,101 MiB/s against `cat`'s 1,165 (median of 20
/// alternating rounds), and 1,195 with TCP_NODELAY never set.
///
/// So a read of [`STREAM_READ`] bytes or more turns Nagle on, and the session turns it off
/// again before it would wait for input: while it is on, a read that does not wait comes
/// first, and only when that finds nothing is TCP_NODELAY set (which sends at once whatever
/// Nagle held back) and the waiting read made. Invariant: the child never waits for the client
/// with a byte held back; a held byte waits at most for an acknowledgement of data the client
/// is still sending, which carries it. A blocked send holds nothing back that Nagle decides:
/// it waits for the client to read. Sessions of smaller reads (requests, keystrokes) never
/// switch and pay nothing; a UNIX-domain socket has no Nagle.
struct Coalescing {
    /// A TCP session: the switch applies.
    tcp: bool,
    /// Nagle's algorithm is on now.
    on: bool,
}

impl Coalescing {
    #[link_section = ".text.hot.forkecho_child"]
    fn new(tcp: bool) -> Self {
        Coalescing { tcp, on: false }
    }

    /// Reads what the client sent, waiting for it if there is none, as `recv` does. With Nagle
    /// on, first reads without waiting; if that finds nothing, turns Nagle off (sending what
    /// it held back) before waiting.
    #[link_section = ".text.hot.forkecho_child"]
    fn receive(&mut self, stream: &Socket, buffer: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        if self.on {
            match socket::recv(stream, buffer, libc::MSG_DONTWAIT) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    socket::set_nodelay(stream, true)?;
                    self.on = false;
                }
                done => return done,
            }
        }
        socket::recv(stream, buffer, 0)
    }

    /// After a read of `n` bytes: turns Nagle on if the read says the client streams. If the
    /// kernel refuses, the session stays as it was, answering at once: slower, never stalled.
    #[link_section = ".text.hot.forkecho_child"]
    fn after_read(&mut self, stream: &Socket, n: usize) {
        if self.tcp && !self.on && n >= STREAM_READ {
            self.on = socket::set_nodelay(stream, false).is_ok();
        }
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

/// Enforces `idle_timeout` and `max_session_time` with the process's one interval timer
/// (`ITIMER_REAL`, SIGALRM). The handler does nothing and has no SA_RESTART, so the signal
/// ends the blocking call in progress with EINTR; the session then checks its limits and
/// arms the timer again for the nearer of the two.
///
/// Why not the socket timeouts (SO_RCVTIMEO, SO_SNDTIMEO), which this echo used before: with
/// one set, each wait of a blocking call arms and cancels a kernel timer, and a session of
/// small requests waits once per request. Measured against the build before (C client, six
/// alternating rounds): 512-byte requests answered 8 % faster on 50 sessions and 34 % on 500,
/// with the connection rate and a stream of 4 KiB writes unchanged. Here a transfer costs a
/// read of the clock (vDSO, no system call), and the timer fires about once per limit.
///
/// A signal that comes while no call blocks interrupts nothing. The timer's interval, an
/// eighth of the nearer limit, then brings the next one: a limit is enforced on time, or up to
/// an eighth late when the signal falls between two calls.
///
/// The logger's own use of SIGALRM (`logging::write_in_child`) comes only after the session.
struct SessionClock {
    idle: Option<Duration>,
    deadline: Option<Instant>,
    /// When the last transfer ended (or the session started).
    last_progress: Instant,
}

impl SessionClock {
    /// The clock of a session starting now; the timer is armed if there is a limit.
    #[link_section = ".text.hot.forkecho_child"]
    fn start(settings: &Settings) -> io::Result<Self> {
        let now = Instant::now();
        let clock = SessionClock {
            idle: settings.idle_timeout,
            deadline: settings.max_session_time.map(|d| now + d),
            last_progress: now,
        };
        if clock.limited() {
            timer::catch_alarm()?;
            clock.arm(now)?;
        }
        Ok(clock)
    }

    #[link_section = ".text.hot.forkecho_child"]
    fn limited(&self) -> bool {
        self.idle.is_some() || self.deadline.is_some()
    }

    /// Arms the timer for the moment the nearer limit is reached, if nothing moves until then.
    #[link_section = ".text.hot.forkecho_child"]
    fn arm(&self, now: Instant) -> io::Result<()> {
        let idle_end = self.idle.map(|idle| self.last_progress + idle);
        let end = idle_end
            .into_iter()
            .chain(self.deadline)
            .min()
            .unwrap_or(now);
        let session_left = self.deadline.map(|d| d.saturating_duration_since(now));
        let nearest = self.idle.into_iter().chain(session_left).min();
        timer::set(
            end.saturating_duration_since(now),
            nearest.unwrap_or_default() / 8,
        )
    }

    /// Before each blocking call: fails once the session's time is up.
    #[link_section = ".text.hot.forkecho_child"]
    fn before_io(&self) -> Result<(), Outcome> {
        match self.deadline {
            Some(deadline) if Instant::now() >= deadline => Err(Outcome::SessionTimeLimit),
            _ => Ok(()),
        }
    }

    /// After each transfer of at least a byte.
    #[link_section = ".text.hot.forkecho_child"]
    fn progressed(&mut self) {
        if self.limited() {
            self.last_progress = Instant::now();
        }
    }

    /// After a call ended with EINTR (the timer, the only signal a session catches): the limit
    /// reached, if one is, or the timer armed again and the call to be retried.
    #[link_section = ".text.hot.forkecho_child"]
    fn interrupted(&mut self, writing: bool) -> Result<(), Outcome> {
        let now = Instant::now();
        if self.deadline.is_some_and(|deadline| now >= deadline) {
            return Err(Outcome::SessionTimeLimit);
        }
        if self
            .idle
            .is_some_and(|idle| now >= self.last_progress + idle)
        {
            return Err(match writing {
                true => Outcome::WriteTimeout,
                false => Outcome::IdleTimeout,
            });
        }
        if self.limited() {
            self.arm(now).map_err(Outcome::IoError)?;
        }
        Ok(())
    }
}

/// The session's timer: `ITIMER_REAL` and SIGALRM.
mod timer {
    use std::io;
    use std::time::Duration;

    #[link_section = ".text.hot.forkecho_child"]
    extern "C" fn interrupt(_: libc::c_int) {}

    /// Catches SIGALRM with a handler that does nothing, without SA_RESTART: the blocking call
    /// the signal lands in ends with EINTR.
    #[link_section = ".text.hot.forkecho_child"]
    pub fn catch_alarm() -> io::Result<()> {
        // Safe: zeroed is a valid sigaction (empty mask, no flags); the handler does nothing,
        // so it is async-signal-safe.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        if unsafe { libc::sigaction(libc::SIGALRM, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The timer fires in `first`, then every `then`. Neither is ever zero: a zero first
    /// expiry would disarm it, and a zero interval would leave a missed signal without a
    /// successor.
    #[link_section = ".text.hot.forkecho_child"]
    pub fn set(first: Duration, then: Duration) -> io::Result<()> {
        let timeval = |d: Duration| libc::timeval {
            tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        };
        let least = Duration::from_micros(1);
        let value = libc::itimerval {
            it_interval: timeval(then.max(Duration::from_millis(1))),
            it_value: timeval(first.max(least)),
        };
        // Safe: sets this process's own timer from a valid itimerval.
        if unsafe { libc::setitimer(libc::ITIMER_REAL, &value, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Per-session socket setup, done in the child so the parent's accept loop stays short.
#[link_section = ".text.hot.forkecho_child"]
fn prepare(stream: &Socket, tcp: bool) -> io::Result<()> {
    // (Already blocking: the parent accepts it so; see `Listener::accept_blocking`. No socket
    // timeouts: `SessionClock` bounds silence from the client and a client that stopped
    // reading, so no peer can pin a child forever.)
    // An echo is interactive: send each reply at once instead of waiting to coalesce (Nagle;
    // a UNIX-domain socket has none). `Coalescing` lets Nagle back in while a client streams.
    if tcp {
        socket::set_nodelay(stream, true)?;
    }
    Ok(())
}

/// Writes all of `bytes`, retrying partial writes, and consulting the session clock before
/// every `send` and at every EINTR: a client that reads a little now and then must not stretch
/// one echo past `max_session_time`.
#[link_section = ".text.hot.forkecho_child"]
fn write_all(stream: &Socket, mut bytes: &[u8], clock: &mut SessionClock) -> Result<(), Outcome> {
    while !bytes.is_empty() {
        clock.before_io()?;
        match socket::send(stream, bytes, 0) {
            Ok(0) => return Err(Outcome::IoError(ErrorKind::WriteZero.into())),
            Ok(n) => {
                clock.progressed();
                bytes = &bytes[n..];
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                if let Err(limit) = clock.interrupted(true) {
                    let n = last_look(limit, || socket::send(stream, bytes, libc::MSG_DONTWAIT))?;
                    clock.progressed();
                    bytes = &bytes[n..];
                }
            }
            Err(e) => return Err(Outcome::from_error(e, true)),
        }
    }
    Ok(())
}

/// The clock says an idle or write timeout is reached; `attempt` (the same call, without
/// waiting) decides. Why: a child stopped for a while (SIGSTOP, a frozen cgroup, a debugger)
/// sees its timer's signal before the input that came in time or the room the client made,
/// and the call it was blocked in ends with EINTR without looking. The session limit ends the
/// session whatever moved.
#[link_section = ".text.hot.forkecho_child"]
fn last_look(
    limit: Outcome,
    attempt: impl FnOnce() -> io::Result<usize>,
) -> Result<usize, Outcome> {
    if matches!(limit, Outcome::SessionTimeLimit) {
        return Err(limit);
    }
    match attempt() {
        // Read: `0` is the client's EOF, which the caller sees as such.
        Ok(n) => Ok(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Err(limit),
        Err(e) => Err(Outcome::from_error(
            e,
            matches!(limit, Outcome::WriteTimeout),
        )),
    }
}

/// The session's socket calls, made to libc directly: socket2's wrappers are code outside the
/// child's section, a page fault per session (see `lean_fork`). Same calls, same flags.
mod socket {
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::AsRawFd;

    use socket2::Socket;

    /// `ret`, or the error it reports.
    #[link_section = ".text.hot.forkecho_child"]
    fn checked(ret: isize) -> io::Result<usize> {
        match ret {
            -1 => Err(io::Error::last_os_error()),
            n => Ok(n as usize),
        }
    }

    /// TCP_NODELAY on (Nagle's algorithm off, and whatever it held back sent now) or off.
    #[link_section = ".text.hot.forkecho_child"]
    pub fn set_nodelay(socket: &Socket, on: bool) -> io::Result<()> {
        let on: libc::c_int = on.into();
        // Safe: an int option, of its size.
        let ret = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        checked(ret as isize).map(drop)
    }

    #[link_section = ".text.hot.forkecho_child"]
    pub fn recv(
        socket: &Socket,
        buffer: &mut [MaybeUninit<u8>],
        flags: libc::c_int,
    ) -> io::Result<usize> {
        // Safe: the kernel writes at most `buffer.len()` bytes into it.
        let ret = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                flags,
            )
        };
        checked(ret)
    }

    /// With MSG_NOSIGNAL, as socket2's `write`: a client gone is EPIPE, whatever SIGPIPE's
    /// disposition.
    #[link_section = ".text.hot.forkecho_child"]
    pub fn send(socket: &Socket, bytes: &[u8], flags: libc::c_int) -> io::Result<usize> {
        // Safe: the kernel reads at most `bytes.len()` bytes of it.
        let ret = unsafe {
            libc::send(
                socket.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL | flags,
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

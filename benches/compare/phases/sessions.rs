//! Sessions that phases 3 and 4 open and hold, and waiting on the server's children.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use crate::contenders::Contender;
use crate::procfs;

/// Bound on every connect, read and write in phases 3 and 4, so that nothing hangs.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one session of phases 3 and 4 may keep failing (connect refused or timed out,
/// banner or echo late) and be retried before it counts as failed. The same rule for everyone:
/// the seed listens with a backlog of 36 and may need a retry that the others do not.
const RETRY_BUDGET: Duration = Duration::from_secs(5);

/// Threads opening sessions in phases 3 and 4, each with one session in flight at a time: a
/// few connects at once keep the pace up but never overflow even the seed's backlog of 36.
pub const OPENERS: usize = 4;

/// Bound on waiting for a server's children to appear (forks lag connects) or to be gone.
pub const CHILDREN_WAIT: Duration = Duration::from_secs(120);

/// What phases 3 and 4 echo on each session.
pub const SESSION_PAYLOAD: &[u8] = b"still there?\n";

/// Prints "LABEL: WHAT 2500/10000" each time `done` crosses another quarter of `total`.
struct Progress<'a> {
    label: &'a str,
    what: &'static str,
    total: usize,
    printed: usize,
}

impl<'a> Progress<'a> {
    fn new(label: &'a str, what: &'static str, total: usize) -> Self {
        Progress {
            label,
            what,
            total,
            printed: 0,
        }
    }

    fn update(&mut self, done: usize) {
        let quarter = (self.total / 4).max(1);
        if done >= self.printed + quarter || (done == self.total && done > self.printed) {
            self.printed = done;
            eprintln!("{}: {} {done}/{}", self.label, self.what, self.total);
        }
    }
}

/// connect → banner → echo of `payload`, every step bounded by IO_TIMEOUT; the stream is kept.
pub fn open_session(c: &Contender, payload: &[u8]) -> io::Result<TcpStream> {
    open_session_at(c.addr, c.banner, None, payload)
}

/// [`open_session`] to `addr`, whose banner is `banner` bytes, from `source` if given (one
/// source address has about 28,000 ephemeral ports toward one server address).
pub fn open_session_at(
    addr: std::net::SocketAddr,
    banner: usize,
    source: Option<std::net::IpAddr>,
    payload: &[u8],
) -> io::Result<TcpStream> {
    let mut s = match source {
        None => TcpStream::connect_timeout(&addr, IO_TIMEOUT)?,
        Some(ip) => {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            // The port is chosen at connect, per destination, not at bind.
            let one: libc::c_int = 1;
            // Safe: an int option on a socket we own.
            let set = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if set != 0 {
                return Err(io::Error::last_os_error());
            }
            socket.bind(&std::net::SocketAddr::new(ip, 0).into())?;
            socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
            socket.into()
        }
    };
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    let mut greeting = vec![0; banner];
    s.read_exact(&mut greeting)?;
    echo(&mut s, payload)?;
    Ok(s)
}

/// Writes `payload` and checks that exactly it comes back.
pub fn echo(s: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    s.write_all(payload)?;
    let mut back = vec![0; payload.len()];
    s.read_exact(&mut back)?;
    if back != payload {
        return Err(io::Error::new(ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}

/// `open_session`, retried for up to RETRY_BUDGET; None when the budget ran out.
fn open_with_retries(c: &Contender) -> Option<TcpStream> {
    open_with_retries_at(c.addr, c.banner, None)
}

/// [`open_session_at`] with SESSION_PAYLOAD, retried for up to RETRY_BUDGET; None when the
/// budget ran out.
pub fn open_with_retries_at(
    addr: std::net::SocketAddr,
    banner: usize,
    source: Option<std::net::IpAddr>,
) -> Option<TcpStream> {
    let deadline = Instant::now() + RETRY_BUDGET;
    loop {
        match open_session_at(addr, banner, source, SESSION_PAYLOAD) {
            Ok(s) => return Some(s),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
}

/// Sessions opened and held, and how many could not be opened.
#[derive(Default)]
pub struct Opened {
    pub streams: Vec<TcpStream>,
    pub failed: usize,
}

impl Opened {
    fn merge(&mut self, other: Opened) {
        self.streams.extend(other.streams);
        self.failed += other.failed;
    }
}

/// Opens `n` sessions from OPENERS threads and keeps them.
///
/// Each session is served (its echo came back) before its thread connects again, which paces
/// the connects to the server's accept rate, and means every forking server has its child by
/// the time this returns.
pub fn open_sessions(c: &Contender, n: usize, label: &str) -> Opened {
    let attempted = AtomicUsize::new(0);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..OPENERS)
            .map(|w| {
                let attempted = &attempted;
                scope.spawn(move || {
                    let mut opened = Opened::default();
                    for _ in (w..n).step_by(OPENERS) {
                        match open_with_retries(c) {
                            Some(s) => opened.streams.push(s),
                            None => opened.failed += 1,
                        }
                        attempted.fetch_add(1, Relaxed);
                    }
                    opened
                })
            })
            .collect();
        let mut progress = Progress::new(label, "opened", n);
        while !workers.iter().all(|w| w.is_finished()) {
            progress.update(attempted.load(Relaxed));
            thread::sleep(Duration::from_millis(50));
        }
        progress.update(attempted.load(Relaxed));
        let mut all = Opened {
            streams: Vec::with_capacity(n),
            failed: 0,
        };
        for w in workers {
            all.merge(w.join().expect("opener thread"));
        }
        all
    })
}

/// Polls the server's children (every 50 ms, up to CHILDREN_WAIT) until `enough` says their
/// number is right; returns the last number seen.
pub fn wait_children(c: &Contender, enough: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + CHILDREN_WAIT;
    loop {
        let count = procfs::children_of(c.pid()).len();
        if enough(count) || Instant::now() >= deadline {
            return count;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Closes `streams` (the client closes first, with a FIN: the seed's child spins on a read
/// error, so no reset) and waits until the server has reaped every child, so that contenders
/// never overlap.
pub fn close_and_drain(c: &Contender, streams: Vec<TcpStream>, label: &str) {
    let closed = Instant::now();
    drop(streams);
    let left = wait_children(c, |count| count == 0);
    if left > 0 {
        eprintln!("{label}: warning: {left} children still there after {CHILDREN_WAIT:?}");
    } else {
        eprintln!(
            "{label}: closed; children gone after {:.1} s",
            closed.elapsed().as_secs_f64()
        );
    }
}

//! Phase 8: long-lived sessions with small messages, where a process per connection pays
//! per message rather than per connection:
//! - request/response: each of `sessions` clients sends 512 bytes and waits for their echo,
//!   again and again; requests per second over all of them;
//! - a stream of 4 KiB writes on one connection, writer and reader concurrent, every byte
//!   checked: MiB/s.
//!
//! The clients are two threads, each driving half of the sessions on a mio loop of its own:
//! a thread per session would measure the scheduler with 500 of them on 2 cores.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream as StdStream;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::contenders::Contender;

/// Bytes of one request (and of its echo).
pub const MESSAGE: usize = 512;
/// Bytes of each write of the 4 KiB stream.
pub const STREAM_WRITE: usize = 4096;
const CLIENT_THREADS: usize = 2;

/// One request/response trial.
pub struct Exchanges {
    pub elapsed: Duration,
    pub completed: u64,
    pub failed: usize,
}

/// `sessions` clients exchange 512-byte messages with `c` for `length`.
pub fn request_response(c: &Contender, sessions: usize, length: Duration) -> Exchanges {
    let started = Instant::now();
    let results: Vec<(u64, usize)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..CLIENT_THREADS)
            .map(|t| {
                let share = (t..sessions).step_by(CLIENT_THREADS).count();
                scope.spawn(move || client_loop(c, share, length))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("client"))
            .collect()
    });
    Exchanges {
        elapsed: started.elapsed(),
        completed: results.iter().map(|r| r.0).sum(),
        failed: results.iter().map(|r| r.1).sum(),
    }
}

/// One session of a client thread: how far it is in its current exchange.
struct Session {
    stream: TcpStream,
    sent: usize,
    received: usize,
}

/// Opens `share` sessions (banner read), then runs exchanges on all of them for `length`.
/// Returns (exchanges completed, sessions that failed).
fn client_loop(c: &Contender, share: usize, length: Duration) -> (u64, usize) {
    let mut poll = Poll::new().expect("poll");
    let mut sessions = Vec::with_capacity(share);
    let mut failed = 0;
    for i in 0..share {
        match open(c) {
            Some(std) => {
                let mut stream = TcpStream::from_std(std);
                poll.registry()
                    .register(
                        &mut stream,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .expect("register");
                sessions.push(Some(Session {
                    stream,
                    sent: 0,
                    received: 0,
                }));
            }
            None => {
                failed += 1;
                sessions.push(None);
            }
        }
    }
    let message = [b'r'; MESSAGE];
    let mut buf = [0u8; MESSAGE];
    let mut completed = 0u64;
    let mut events = Events::with_capacity(1024);
    let end = Instant::now() + length;
    while Instant::now() < end {
        if poll
            .poll(&mut events, Some(Duration::from_millis(50)))
            .is_err()
        {
            continue;
        }
        for event in events.iter() {
            let Some(Some(s)) = sessions.get_mut(event.token().0) else {
                continue;
            };
            match advance(s, &message, &mut buf) {
                Ok(done) => completed += done,
                Err(_) => {
                    failed += 1;
                    sessions[event.token().0] = None;
                }
            }
        }
    }
    (completed, failed)
}

/// Moves one session on as far as it goes without waiting: writes what is left of the
/// request, reads what has come of the echo, starts the next exchange when one completes.
/// Returns the exchanges completed.
fn advance(s: &mut Session, message: &[u8], buf: &mut [u8]) -> std::io::Result<u64> {
    let mut done = 0;
    loop {
        if s.sent < message.len() {
            match s.stream.write(&message[s.sent..]) {
                Ok(n) => s.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(done),
                Err(e) => return Err(e),
            }
            continue;
        }
        match s.stream.read(&mut buf[..message.len() - s.received]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => s.received += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(done),
            Err(e) => return Err(e),
        }
        if s.received == message.len() {
            done += 1;
            s.sent = 0;
            s.received = 0;
        }
    }
}

/// connect → banner, blocking, then non-blocking for the loop; None if that fails.
fn open(c: &Contender) -> Option<StdStream> {
    let mut s = StdStream::connect_timeout(&c.addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_nodelay(true).ok()?;
    if !c.header.is_empty() {
        s.write_all(&c.header).ok()?;
    }
    let mut banner = vec![0; c.banner];
    s.read_exact(&mut banner).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// One stream of `bytes` through `c` in writes of STREAM_WRITE bytes, read concurrently and
/// checked (as phase 2's); the time it took.
pub fn small_write_stream(c: &Contender, bytes: usize) -> Option<Duration> {
    super::stream::stream_in_writes(c, bytes, STREAM_WRITE)
}

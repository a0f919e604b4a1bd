//! Phase 2: one-stream echo throughput, writer and reader concurrent, every byte checked.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::contenders::Contender;

/// The stream is this many bytes of a fixed pattern, over and over.
const PATTERN: usize = 256 * 1024;

/// A contender that moves no byte for this long has stalled: the round is left out.
const STALL: Duration = Duration::from_secs(60);

/// One stream of `bytes` through the contender, written and read concurrently, checked. `None`
/// if the contender stalled (said on stderr): a peer that deadlocks once (socat's PIPE, after
/// phase 4's storm, once in a full run) must not cost the whole run its record.
pub fn stream(c: &Contender, bytes: usize) -> Option<Duration> {
    stream_in_writes(c, bytes, PATTERN)
}

/// [`stream`] written `write` bytes at a time (at most PATTERN).
pub fn stream_in_writes(c: &Contender, bytes: usize, write: usize) -> Option<Duration> {
    let mut s = TcpStream::connect(c.addr).expect("connect");
    // The writer's clone shares both timeouts: neither side can wait on a stalled peer forever.
    s.set_read_timeout(Some(STALL)).unwrap();
    s.set_write_timeout(Some(STALL)).unwrap();
    let mut banner = vec![0; c.banner];
    s.read_exact(&mut banner).expect("banner");
    let mut writer = s.try_clone().unwrap();
    let started = Instant::now();
    let pattern: Vec<u8> = (0..PATTERN).map(|i| (i % 251) as u8).collect();
    let chunk = pattern.clone();
    let sender = thread::spawn(move || -> std::io::Result<()> {
        let mut sent = 0;
        while sent < bytes {
            let k = sent % PATTERN;
            let n = write.min(PATTERN - k).min(bytes - sent);
            writer.write_all(&chunk[k..k + n])?;
            sent += n;
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                eprintln!(
                    "{}: stalled: no byte echoed for {} s after {got} of {bytes}; round left out",
                    c.name,
                    STALL.as_secs()
                );
                // Unblocks the writer too, if it waits on the full socket.
                let _ = s.shutdown(std::net::Shutdown::Both);
                let _ = sender.join();
                return None;
            }
            Err(e) => panic!("{}: read: {e}", c.name),
        };
        check_pattern(c, &buf[..n], got, &pattern);
        got += n;
    }
    let written = sender.join().expect("writer");
    written.unwrap_or_else(|e| panic!("{}: write: {e}", c.name));
    assert_eq!(got, bytes, "{}: stream length", c.name);
    Some(started.elapsed())
}

/// Checks `read`, which starts at byte `offset` of the stream, a slice at a time: the stream
/// repeats `pattern` end to end.
fn check_pattern(c: &Contender, read: &[u8], offset: usize, pattern: &[u8]) {
    let mut i = 0;
    while i < read.len() {
        let k = (offset + i) % PATTERN;
        let m = (read.len() - i).min(PATTERN - k);
        assert!(
            read[i..i + m] == pattern[k..k + m],
            "{}: echo differs near byte {}",
            c.name,
            offset + i
        );
        i += m;
    }
}

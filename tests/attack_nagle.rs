//! Adversarial probes of the echo's Nagle switch (`echo::Coalescing`): TCP_NODELAY goes off
//! after a read of 32 KiB or more, and before the child would wait for input it reads without
//! waiting and, finding nothing, sets TCP_NODELAY again (which sends what Nagle held) and only
//! then waits. The claims probed: the child never sleeps in a waiting read with Nagle on;
//! sessions of smaller reads never switch; UNIX-domain sessions never switch; and nothing of
//! the session's other promises moves: half-close, the exit codes of the README's table
//! (idle 3, write timeout 4, reset 5, `max_session_time` 8), byte-exact echo, IPv6 and PROXY
//! listeners, the session clock's SIGALRM.
//!
//! "Sleeps in a waiting read" is read from /proc: the child is asleep in `recvfrom` without
//! MSG_DONTWAIT, and its voluntary context switches did not move while TCP_NODELAY was read
//! from a duplicate of its socket (`socket_of`): it slept in that one call all along.

use crate::util::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The echo's threshold (`echo::STREAM_READ`): a read this large turns Nagle on.
const STREAM_READ: usize = 32 * 1024;

/// A delayed acknowledgement is 40 ms at least (Linux's TCP_DELACK_MIN); an exchange this
/// slow waited for one, or for a badly loaded machine.
const DELAYED_ACK: Duration = Duration::from_millis(35);

// ---- The child, seen from /proc ----

/// The system call `pid` sleeps in, with its six arguments, from /proc/<pid>/syscall; None
/// while it runs, or once it is gone.
fn blocked_call(pid: Pid) -> Option<(u64, [u64; 6])> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    let mut words = text.split_whitespace();
    let nr = words.next()?.parse().ok()?;
    let mut args = [0; 6];
    for arg in &mut args {
        *arg = u64::from_str_radix(words.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some((nr, args))
}

fn voluntary_switches(pid: Pid) -> Option<u64> {
    status_field(pid, "voluntary_ctxt_switches")?
        .trim()
        .parse()
        .ok()
}

/// A session's child and a duplicate of its socket.
struct Child {
    pid: Pid,
    socket: OwnedFd,
}

impl Child {
    fn new(pid: Pid) -> Child {
        let socket = socket_of(pid).unwrap_or_else(|| panic!("the socket of child {pid}"));
        Child { pid, socket }
    }

    fn of(server: &Server, client: SocketAddr) -> Child {
        Child::new(server.child_pid_for(client))
    }

    fn duplicate(&self) -> Child {
        Child {
            pid: self.pid,
            socket: self.socket.try_clone().unwrap(),
        }
    }

    fn nodelay(&self) -> bool {
        int_option(&self.socket, libc::IPPROTO_TCP, libc::TCP_NODELAY) != 0
    }

    /// One look: `Some(TCP_NODELAY)` if the child slept in a waiting `recvfrom` (no
    /// MSG_DONTWAIT) all through the reading of the option, None if it did anything else.
    fn nodelay_while_waiting(&self) -> Option<bool> {
        let before = (blocked_call(self.pid)?, voluntary_switches(self.pid)?);
        let ((nr, args), _) = before;
        if nr != libc::SYS_recvfrom as u64 || args[3] & libc::MSG_DONTWAIT as u64 != 0 {
            return None;
        }
        let nodelay = self.nodelay();
        let after = (blocked_call(self.pid)?, voluntary_switches(self.pid)?);
        (before == after).then_some(nodelay)
    }

    /// Waits until the child sleeps waiting for input and asserts TCP_NODELAY is on then:
    /// nothing of the echo is held back for an acknowledgement while it waits.
    fn assert_waits_with_nodelay(&self, what: &str) {
        let mut seen = None;
        let waited = wait_until(WAIT, || {
            seen = self.nodelay_while_waiting();
            seen.is_some()
        });
        assert!(
            waited,
            "{what}: child {} never seen waiting for input",
            self.pid
        );
        assert_eq!(
            seen,
            Some(true),
            "{what}: child {} waits for its client with TCP_NODELAY off (Nagle may hold \
             back part of the echo the client waits for)",
            self.pid
        );
    }
}

/// What a [`Watcher`] saw.
#[derive(Debug, Default, Clone, Copy)]
struct Watched {
    /// Looks that found the child asleep in a waiting read.
    waits: u64,
    /// Of those, the ones with TCP_NODELAY off: each a wait with part of the echo possibly
    /// held back.
    waits_with_nagle: u64,
    /// Looks at any moment that found TCP_NODELAY off.
    nagle_seen: u64,
    looks: u64,
}

/// Looks at a child over and over from a thread of its own until dropped or [`Self::stop`]ped.
struct Watcher {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Watched>>,
}

impl Watcher {
    fn start(child: &Child) -> Watcher {
        let child = child.duplicate();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut seen = Watched::default();
            let until = Instant::now() + Duration::from_secs(30);
            while !flag.load(Ordering::Relaxed) && Instant::now() < until {
                if !process_exists(child.pid) {
                    break;
                }
                seen.looks += 1;
                if !child.nodelay() {
                    seen.nagle_seen += 1;
                }
                if let Some(nodelay) = child.nodelay_while_waiting() {
                    seen.waits += 1;
                    if !nodelay {
                        seen.waits_with_nagle += 1;
                    }
                }
                thread::sleep(Duration::from_micros(300));
            }
            seen
        });
        Watcher {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

// ---- Clients ----

/// A client stream of either kind, which a writer thread can share.
trait Duplex: Read + Write + Send + 'static {
    fn duplicate(&self) -> Self;
}

impl Duplex for TcpStream {
    fn duplicate(&self) -> Self {
        self.try_clone().unwrap()
    }
}

impl Duplex for UnixStream {
    fn duplicate(&self) -> Self {
        self.try_clone().unwrap()
    }
}

/// Streams `total` bytes of `Noise::new(seed)` in writes of `write` bytes from a writer
/// thread while this thread reads the echo and checks every byte. With `child`, TCP_NODELAY
/// is looked at after each read; returns whether it was ever seen off (Nagle on).
fn stream<S: Duplex>(
    s: &mut S,
    total: usize,
    write: usize,
    seed: u64,
    child: Option<&Child>,
) -> bool {
    // Made beforehand, so that the writer outpaces the child.
    let data = Arc::new(Noise::new(seed).bytes(total));
    let mut w = s.duplicate();
    let sent = Arc::clone(&data);
    let writer = thread::spawn(move || {
        for chunk in sent.chunks(write) {
            w.write_all(chunk).expect("write to server");
        }
    });
    let mut buf = vec![0; 1 << 16];
    let (mut received, mut coalesced) = (0, false);
    while received < total {
        let n = s.read(&mut buf).expect("read echo");
        assert!(n > 0, "EOF after {received} of {total} bytes");
        assert!(received + n <= total, "more bytes than were sent");
        assert!(
            buf[..n] == data[received..received + n],
            "echo differs near byte {received}"
        );
        received += n;
        if let Some(child) = child {
            coalesced |= !child.nodelay();
        }
    }
    writer.join().expect("writer thread");
    coalesced
}

/// Streams 1 MiB at a time in 64 KiB writes (reads far over the threshold) until TCP_NODELAY
/// is seen off, 16 MiB at most: Nagle was on while the child streamed.
fn stream_until_coalesced<S: Duplex>(s: &mut S, child: &Child, seed: u64) {
    for round in 0..16 {
        if stream(s, 1 << 20, 64 << 10, seed + round, Some(child)) {
            return;
        }
    }
    panic!("TCP_NODELAY never went off during 16 MiB streamed in 64 KiB writes");
}

/// Sends `data` from a writer thread and reads its echo whole; returns how long it took.
fn burst<S: Duplex>(s: &mut S, data: Vec<u8>) -> Duration {
    let start = Instant::now();
    let data = Arc::new(data);
    let mut w = s.duplicate();
    let sent = Arc::clone(&data);
    let writer = thread::spawn(move || w.write_all(&sent).expect("write to server"));
    let mut got = vec![0; data.len()];
    s.read_exact(&mut got).expect("read echo");
    let took = start.elapsed();
    writer.join().expect("writer thread");
    assert!(got == *data, "echo of a {}-byte burst differs", data.len());
    took
}

/// A request sent in two writes (two segments, the client's Nagle being off) and its echo
/// read whole: the exchange where an echo under Nagle waits for the client's delayed
/// acknowledgement of the first part. Returns how long it took.
fn split_request<S: Duplex>(s: &mut S, request: &[u8], cut: usize) -> Duration {
    let start = Instant::now();
    s.write_all(&request[..cut]).unwrap();
    s.write_all(&request[cut..]).unwrap();
    let mut got = vec![0; request.len()];
    s.read_exact(&mut got).expect("read echo");
    let took = start.elapsed();
    assert_eq!(got, request, "echo of a split request");
    took
}

/// Split requests of 100 bytes, `n` times; returns the slowest and how many took
/// [`DELAYED_ACK`] or more.
fn split_requests<S: Duplex>(s: &mut S, n: usize, seed: u64) -> (Duration, usize) {
    let mut noise = Noise::new(seed);
    let mut slowest = Duration::ZERO;
    let mut slow = 0;
    for _ in 0..n {
        let request = noise.bytes(100);
        let took = split_request(s, &request, 1 + noise.below(99) as usize);
        slowest = slowest.max(took);
        slow += usize::from(took >= DELAYED_ACK);
    }
    (slowest, slow)
}

/// A TCP client with Nagle off on its own side, greeted.
fn client(server: &Server) -> TcpStream {
    let s = server.connect_greeted();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads until EOF (or a reset) within `limit`; returns what came and how long it took.
fn read_until_eof(s: &mut impl Read, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0; 1 << 16];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (got, start.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (got, start.elapsed()),
            Err(e) => panic!("no EOF within {limit:?} ({} bytes came): {e}", got.len()),
        }
    }
    panic!("no EOF within {limit:?} ({} bytes came)", got.len());
}

fn server(args: &[&str]) -> Server {
    Server::builder()
        .args(args.iter().map(|s| s.to_string()))
        .start()
}

// ---- The invariant ----

/// PROBE. The invariant itself, watched from outside through a session that mixes every kind
/// of traffic on one connection: streams in 4 KiB and 64 KiB writes, bursts of 33 KB to
/// 300 KB each echoed whole before the next, split requests, single small requests, and a
/// split request right behind a stream. Every look that finds the child asleep in a waiting
/// read finds TCP_NODELAY on; the stream did turn Nagle on; every byte comes back; the
/// half-close ends with code 0.
#[test]
fn the_child_never_sleeps_in_a_waiting_read_with_nagle_on() {
    let server = server(&[]);
    let mut s = client(&server);
    let addr = s.local_addr().unwrap();
    let child = Child::of(&server, addr);
    let watcher = Watcher::start(&child);
    let mut noise = Noise::new(0x4a61);
    let mut coalesced = false;
    for round in 0..3 {
        stream_until_coalesced(&mut s, &child, 100 * round);
        coalesced |= stream(&mut s, 1 << 20, 4096, round, Some(&child));
        split_requests(&mut s, 20, round);
        for _ in 0..10 {
            let n = 33_000 + noise.below(267_000) as usize;
            burst(&mut s, noise.bytes(n));
        }
        for _ in 0..20 {
            let n = 1 + noise.below(200) as usize;
            let request = noise.bytes(n);
            assert_eq!(echo_roundtrip(&mut s, &request), request);
        }
        // A stream and a split request behind it, written back to back: the request's two
        // parts may be read with Nagle still on.
        let tail = noise.bytes(100);
        let mut sent = noise.bytes(512 << 10);
        sent.extend_from_slice(&tail);
        s.write_all(&sent[..512 << 10]).unwrap();
        s.write_all(&tail[..37]).unwrap();
        s.write_all(&tail[37..]).unwrap();
        assert!(read_exactly(&mut s, sent.len()) == sent, "round {round}");
        child.assert_waits_with_nodelay(&format!("after round {round}"));
    }
    let watched = watcher.stop();
    report(&format!(
        "{watched:?}; Nagle seen on in a stream of 4 KiB writes: {coalesced}"
    ));
    assert!(
        watched.waits > 0,
        "the child was never seen waiting: {watched:?}"
    );
    assert_eq!(
        watched.waits_with_nagle, 0,
        "the child slept waiting for its client with TCP_NODELAY off: {watched:?}"
    );
    assert_eq!(send_and_drain(&mut s, b"bye"), b"bye");
    server.wait_child_exited_with(addr, 0, "client closed");
}

/// PROBE. A stream, then on the same connection exchanges a client waits on: bursts of 33 KB
/// to 633 KB (their reads of 32 KiB or more switch Nagle on), each echoed whole before the
/// next, and small
/// requests sent in two parts. No answer waits for a delayed acknowledgement: after each
/// exchange the child waits for input with TCP_NODELAY on, and no exchange takes 35 ms or
/// more (two outliers of 300 allowed for a loaded machine). With TCP_NODELAY left off after
/// the first stream (a build that never turns it back on), 2 to 7 of 100 such bursts took
/// 43 to 50 ms here; split requests, which the child mostly reads in one piece, did not
/// show it.
#[test]
fn exchanges_after_a_stream_never_wait_for_a_delayed_ack() {
    let server = server(&[]);
    let mut s = client(&server);
    let child = Child::of(&server, s.local_addr().unwrap());
    stream_until_coalesced(&mut s, &child, 7);
    let mut noise = Noise::new(8);
    let mut times = Vec::new();
    for i in 0..150 {
        let n = 33_000 + noise.below(600_000) as usize;
        times.push(burst(&mut s, noise.bytes(n)));
        child.assert_waits_with_nodelay(&format!("after burst {i} ({n} bytes)"));
        let request = noise.bytes(100);
        let cut = 1 + noise.below(99) as usize;
        times.push(split_request(&mut s, &request, cut));
        child.assert_waits_with_nodelay(&format!("after split request {i}"));
    }
    times.sort();
    let slow = times.iter().filter(|t| **t >= DELAYED_ACK).count();
    report(&format!(
        "{} exchanges: median {:?}, slowest {:?}, {slow} of {DELAYED_ACK:?} or more",
        times.len(),
        times[times.len() / 2],
        times[times.len() - 1]
    ));
    assert!(
        slow <= 2,
        "{slow} of {} exchanges after a stream took {DELAYED_ACK:?} or more (slowest {:?}): \
         answers held back for a delayed acknowledgement",
        times.len(),
        times[times.len() - 1]
    );
}

/// PROBE. Requests just under the threshold (32,767 bytes, one write each) and small ones
/// never switch: TCP_NODELAY is on at every look, whatever the child is doing.
#[test]
fn requests_under_the_threshold_never_turn_nodelay_off() {
    let server = server(&[]);
    let mut s = client(&server);
    let child = Child::of(&server, s.local_addr().unwrap());
    let watcher = Watcher::start(&child);
    let mut noise = Noise::new(32767);
    for i in 0..60 {
        let request = noise.bytes(STREAM_READ - 1);
        assert!(echo_roundtrip(&mut s, &request) == request, "request {i}");
        assert!(child.nodelay(), "TCP_NODELAY off after request {i}");
    }
    split_requests(&mut s, 50, 1);
    let watched = watcher.stop();
    report(&format!("{watched:?}"));
    assert_eq!(
        watched.nagle_seen, 0,
        "TCP_NODELAY seen off in a session of reads under {STREAM_READ} bytes: {watched:?}"
    );
}

// ---- Half-close ----

/// PROBE. Clients that stream in 64 KiB writes (reads over the threshold: Nagle on) and
/// half-close right behind their last write, so the EOF meets a child that is likely still
/// coalescing: each gets every byte and then EOF at once (the session's idle timeout
/// of 5 s is never what ends it), and the child exits 0. The sizes leave a tail of a partial
/// segment, the part Nagle would hold.
#[test]
fn a_half_close_while_nagle_is_on_gets_the_tail_and_eof_at_once() {
    let server = server(&["--idle-timeout", "5"]);
    let mut noise = Noise::new(0xe0f);
    for i in 0..12 {
        let mut s = client(&server);
        let addr = s.local_addr().unwrap();
        let n = 40_000 + noise.below(400_000) as usize;
        let data = Arc::new(noise.bytes(n));
        let mut w = s.try_clone().unwrap();
        let sent = Arc::clone(&data);
        let writer = thread::spawn(move || {
            for chunk in sent.chunks(64 << 10) {
                w.write_all(chunk).expect("write to server");
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let (got, took) = read_until_eof(&mut s, WAIT);
        writer.join().unwrap();
        assert!(
            got == *data,
            "client {i}: {} of {n} bytes before EOF, or different bytes",
            got.len()
        );
        assert!(
            took < Duration::from_secs(2),
            "client {i}: everything and EOF took {took:?} (idle timeout 5 s)"
        );
        let e = server.wait_child_exited_with(addr, 0, "client closed");
        assert!(e.seconds < 2.5, "client {i}: {e:?}");
    }
}

// ---- The session clock ----

/// PROBE. A client streams (Nagle on), then stops reading and keeps writing: the child's
/// echo blocks, and the session ends with code 4 within two idle timeouts of the client's
/// last accepted write (README: "cut off after one to two times idle_timeout"), not as
/// idle, not later.
#[test]
fn a_client_that_stops_reading_after_a_stream_gets_code_4_within_two_idle_timeouts() {
    const IDLE: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_millis(900);
    let server = server(&["--idle-timeout", "1"]);
    let mut s = connect_with_recv_buffer(server.addr(), 64 * 1024);
    expect_banner(&mut s);
    let addr = s.local_addr().unwrap();
    let child = Child::of(&server, addr);
    stream_until_coalesced(&mut s, &child, 4);
    // Our duplicate of the child's socket would keep the connection open past its exit.
    drop(child);
    let writer = write_until_refused(&s, 4);
    let e = server.wait_child_exited_with(addr, 4, "write timeout");
    let ended = Instant::now();
    let last_accepted = writer.join().unwrap();
    let after = ended.duration_since(last_accepted);
    report(&format!(
        "code 4 {after:?} after the last accepted write ({e:?})"
    ));
    assert!(
        after < 2 * IDLE + SLACK,
        "cut off {after:?} after the client's last accepted write, idle_timeout {IDLE:?}"
    );
}

/// PROBE. An idle timeout right after a stream: once the client has everything back, the
/// child waits with TCP_NODELAY on, and the session ends with code 3 one idle timeout after
/// the last byte, nothing more sent.
#[test]
fn an_idle_timeout_right_after_a_stream_is_code_3_on_time() {
    const IDLE: f64 = 0.5;
    let server = server(&["--idle-timeout", "0.5"]);
    let mut s = client(&server);
    let addr = s.local_addr().unwrap();
    let child = Child::of(&server, addr);
    stream_until_coalesced(&mut s, &child, 3);
    let last_byte = Instant::now();
    child.assert_waits_with_nodelay("after the stream");
    // Our duplicate of the child's socket would keep the connection open past its exit.
    drop(child);
    let (got, _) = read_until_eof(&mut s, Duration::from_secs(10));
    let took = last_byte.elapsed().as_secs_f64();
    assert!(got.is_empty(), "{} bytes after the stream", got.len());
    server.wait_child_exited_with(addr, 3, "idle timeout");
    assert!(
        (IDLE - 0.1..IDLE * 1.25 + 0.4).contains(&took),
        "EOF {took:.3}s after the last byte, idle_timeout {IDLE}s"
    );
}

/// PROBE. `max_session_time` in the middle of a stream (Nagle on, the child never waiting):
/// the session ends with code 8 at the deadline (an eighth late at most, plus a loaded
/// machine's slack), and what came back is exactly a prefix of what was sent.
#[test]
fn max_session_time_in_the_middle_of_a_stream_is_code_8() {
    let server = server(&["--idle-timeout", "0", "--max-session-time", "1"]);
    let mut s = client(&server);
    let addr = s.local_addr().unwrap();
    let child = Child::of(&server, addr);
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut noise = Noise::new(88);
        let mut buf = vec![0; 64 << 10];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            noise.fill(&mut buf);
            if w.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut expected = Noise::new(88);
    let mut buf = vec![0; 1 << 16];
    let mut want = vec![0; 1 << 16];
    let (mut received, mut coalesced) = (0usize, false);
    // Looked at until Nagle is seen on, then dropped: our duplicate of the child's socket
    // would keep the connection open past the child's exit.
    let mut child = Some(child);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < WAIT {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                expected.fill(&mut want[..n]);
                assert!(buf[..n] == want[..n], "echo differs near byte {received}");
                received += n;
                if child.as_ref().is_some_and(|c| !c.nodelay()) {
                    coalesced = true;
                    child = None;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                child = None;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read after {received} bytes: {e}"),
        }
    }
    writer.join().unwrap();
    let e = server.wait_child_exited_with(addr, 8, "max_session_time");
    report(&format!("{received} bytes echoed, {e:?}"));
    assert!(coalesced, "TCP_NODELAY never went off during the stream");
    assert!((0.99..2.0).contains(&e.seconds), "{e:?}");
}

/// PROBE. A client that resets the connection (SO_LINGER 0) in the middle of a stream, at
/// varied moments: it writes 40 KB to 1.5 MB at once (reads over the threshold: Nagle on)
/// and resets right behind its last write, so the reset meets a child that is still
/// echoing: sending, reading without waiting (the reset is often seen first there), switching
/// the option, or waiting. Each session ends with code 5 ("reset by the client"), never 6 or 7.
#[test]
fn a_reset_in_the_middle_of_a_stream_is_code_5() {
    let server = server(&[]);
    let mut noise = Noise::new(5);
    for _ in 0..60 {
        let mut s = client(&server);
        let addr = s.local_addr().unwrap();
        let n = 40_000 + noise.below(1_500_000) as usize;
        // Fits in the buffers on both sides without our reading (the child's echo waits in
        // ours), so the write returns while the child still works on it.
        s.write_all(&noise.bytes(n)).unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        server.wait_child_exited_with(addr, 5, "reset by the client");
    }
}

/// PROBE. A SIGALRM storm from outside (every 0.5 ms) on a child with a session clock while
/// it streams, bursts and answers split requests: the EINTRs land in every call, the new
/// ones included, and still every byte comes back, the child waits with TCP_NODELAY on,
/// and the half-close ends with code 0.
#[test]
fn a_sigalrm_storm_through_streams_and_requests_changes_nothing() {
    let server = server(&["--idle-timeout", "2", "--max-session-time", "60"]);
    let mut s = client(&server);
    let addr = s.local_addr().unwrap();
    let child = Child::of(&server, addr);
    let storm = SignalStorm::start(child.pid, Signal::SIGALRM, Duration::from_micros(500));
    let mut noise = Noise::new(14);
    let start = Instant::now();
    let mut round = 0;
    while round < 3 || start.elapsed() < Duration::from_secs(1) {
        round += 1;
        stream(&mut s, 2 << 20, 4096, 100 + round, Some(&child));
        stream(&mut s, 1 << 20, 64 << 10, 200 + round, Some(&child));
        for _ in 0..5 {
            let n = 33_000 + noise.below(200_000) as usize;
            burst(&mut s, noise.bytes(n));
        }
        split_requests(&mut s, 20, round);
        child.assert_waits_with_nodelay(&format!("round {round}, under the storm"));
    }
    let signals = storm.sent();
    drop(storm);
    assert!(signals > 100, "only {signals} signals sent");
    assert_eq!(send_and_drain(&mut s, b"bye"), b"bye");
    server.wait_child_exited_with(addr, 0, "client closed");
}

// ---- Other listeners ----

/// PROBE. The same over IPv6 (`[::1]`): the stream switches, the child waits with
/// TCP_NODELAY on, split requests are not stalled, code 0 at the half-close.
#[test]
fn over_ipv6_the_child_waits_with_nodelay_on() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("skipping: cannot bind [::1]:0: {e}");
        return;
    }
    let server = server(&["-l", "[::1]:0"]);
    let mut s = client(&server);
    let addr = s.local_addr().unwrap();
    assert!(addr.is_ipv6(), "{addr}");
    let child = Child::of(&server, addr);
    stream_until_coalesced(&mut s, &child, 6);
    stream(&mut s, 2 << 20, 4096, 60, Some(&child));
    child.assert_waits_with_nodelay("IPv6, after the stream");
    let (slowest, slow) = split_requests(&mut s, 50, 6);
    assert!(
        slow <= 1,
        "{slow} of 50 split requests slow, slowest {slowest:?}"
    );
    child.assert_waits_with_nodelay("IPv6, after the requests");
    assert_eq!(send_and_drain(&mut s, b"bye"), b"bye");
    server.wait_child_exited_with(addr, 0, "client closed");
}

/// A PROXY v2 header (TCP over IPv4 or IPv6 by the client's family, or LOCAL for `None`).
fn proxy_v2_header(client: Option<SocketAddr>) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let Some(client) = client else {
        header.extend([0x20, 0x00, 0, 0]);
        return header;
    };
    let (family, mut body) = match client {
        SocketAddr::V4(a) => (0x11, [a.ip().octets(), [198, 51, 100, 1]].concat()),
        SocketAddr::V6(a) => {
            let destination: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
            (0x21, [a.ip().octets(), destination.octets()].concat())
        }
    };
    body.extend(client.port().to_be_bytes());
    body.extend(2334u16.to_be_bytes());
    header.extend([0x21, family]);
    header.extend((body.len() as u16).to_be_bytes());
    header.extend(body);
    header
}

/// PROBE. Behind a PROXY v2 listener (a real client over IPv4, one over IPv6, and a LOCAL
/// health check): the session is TCP whatever the header names, so the stream switches,
/// the child waits with TCP_NODELAY on, every byte comes back, code 0 at the half-close.
#[test]
fn behind_a_proxy_v2_listener_the_child_waits_with_nodelay_on() {
    let server = server(&["--proxy-protocol", "v2", "--trusted-proxy", "127.0.0.1"]);
    let mut noise = Noise::new(2);
    let port = 20_000 + noise.below(40_000) as u16;
    let cases: [Option<SocketAddr>; 3] = [
        Some(SocketAddr::from(([203, 0, 113, 7], port))),
        Some(SocketAddr::new("2001:db8::7".parse().unwrap(), port + 1)),
        None,
    ];
    for (i, named) in cases.into_iter().enumerate() {
        let mut s = connect_from(server.addr(), "127.0.0.1");
        s.set_nodelay(true).unwrap();
        s.write_all(&proxy_v2_header(named)).unwrap();
        expect_banner(&mut s);
        let pid = server
            .accepted_via(named.unwrap_or(s.local_addr().unwrap()))
            .1;
        let child = Child::new(pid);
        stream_until_coalesced(&mut s, &child, 20 + 16 * i as u64);
        stream(&mut s, 1 << 20, 4096, 10 + i as u64, Some(&child));
        child.assert_waits_with_nodelay(&format!("header {named:?}, after the stream"));
        split_requests(&mut s, 20, i as u64);
        child.assert_waits_with_nodelay(&format!("header {named:?}, after the requests"));
        assert_eq!(send_and_drain(&mut s, b"bye"), b"bye");
        let e = server.wait_reaped(pid);
        assert_eq!(
            (e.how.as_str(), e.meaning.as_deref()),
            ("exited with code 0", Some("client closed")),
            "header {named:?}: {e:?}"
        );
    }
}

/// PROBE. A UNIX-domain session streams in 4 KiB writes (reads far over the threshold), then
/// answers split requests and half-closes: every byte back, code 0 (an option call refused on
/// a UNIX socket would be code 7), and the child logs no failure.
#[test]
fn a_unix_domain_stream_never_switches_and_ends_with_code_0() {
    let dir = TempDir::new();
    let path = dir.path().join("echo.sock");
    let address = format!("unix:{}", path.display());
    let mut server = Server::builder().args(["-l", address.as_str()]).spawn();
    let line = format!("listening on {address}");
    assert!(
        wait_until(WAIT, || server.count_lines(&line) > 0
            || !server.is_running()),
        "no `{line}`"
    );
    assert!(
        server.count_lines(&line) > 0,
        "no `{line}`\n{}",
        server.log_text()
    );
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    let mut banner = vec![0; BANNER.len()];
    s.read_exact(&mut banner).unwrap();
    assert_eq!(banner, BANNER);
    stream(&mut s, 4 << 20, 4096, 9, None);
    for i in 0..20 {
        let n = 33_000 + 7919 * i;
        burst(&mut s, Noise::new(i as u64).bytes(n));
    }
    split_requests(&mut s, 20, 9);
    s.write_all(b"bye").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, _) = read_until_eof(&mut s, WAIT);
    assert_eq!(got, b"bye");
    let needle = format!("accepted uid:{}", nix::unistd::geteuid());
    let accepted = server.wait_for_line(&needle);
    let pid: i32 = accepted
        .split(" -> child ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no child pid in {accepted:?}"));
    let ending = server.wait_for_line(&format!("child {pid} (uid:"));
    assert!(
        ending.contains("exited with code 0 (client closed)"),
        "{ending}\n--- log ---\n{}",
        server.log_text()
    );
    let failed = server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(&format!("forkecho[{pid}]")) && l.contains("failed"))
        .collect::<Vec<_>>();
    assert!(failed.is_empty(), "the child logged {failed:?}");
}

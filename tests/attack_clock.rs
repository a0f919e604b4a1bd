//! Adversarial tests of the echo's session clock (`echo::SessionClock`: ITIMER_REAL, SIGALRM
//! without SA_RESTART, EINTR, re-armed for the nearer of `idle_timeout` and
//! `max_session_time`), against the documented limits and exit codes (README: "Exit codes of
//! a session's child", the limits table).

use crate::util::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const SIGALRM_BIT: u64 = 1 << (libc::SIGALRM - 1);

fn server(args: &[&str]) -> Server {
    Server::builder()
        .args(args.iter().map(|s| s.to_string()))
        .start()
}

/// Reads until EOF (or reset) within `limit`; returns what came and how long it took.
fn wait_eof(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no EOF within {limit:?} (got {} bytes): {e}", got.len()),
        }
    }
    (got, start.elapsed())
}

// ---- idle_timeout ----

/// PROBE. `idle_timeout = 0.001` (the smallest allowed): a silent client gets the banner,
/// then EOF within milliseconds; code 3 with its words.
#[test]
fn idle_timeout_of_one_millisecond_ends_a_silent_session_with_code_3() {
    let server = server(&["--idle-timeout", "0.001"]);
    let mut s = server.connect();
    let (got, took) = wait_eof(&mut s, Duration::from_secs(5));
    assert_eq!(got, BANNER, "bytes before EOF");
    assert!(took < Duration::from_millis(500), "EOF after {took:?}");
    let e = server.wait_child_exited_with(s.local_addr().unwrap(), 3, "idle timeout");
    assert!(e.seconds < 0.5, "{e:?}");
}

/// PROBE. Fractional idle timeouts end a silent session on time, not early, with code 3 and the
/// parent's line `exited with code 3 (idle timeout) after 0.2Xs`.
#[test]
fn fractional_idle_timeouts_end_silent_sessions_on_time() {
    for (idle, text) in [(0.05, "0.05"), (0.25, "0.25"), (1.0, "1")] {
        let server = server(&["--idle-timeout", text]);
        let mut s = server.connect_greeted();
        let (got, took) = wait_eof(&mut s, Duration::from_secs(10));
        assert_eq!(got, b"", "idle {text}: bytes before EOF");
        let e = server.wait_child_exited_with(s.local_addr().unwrap(), 3, "idle timeout");
        assert!(
            e.seconds >= idle - 0.01 && e.seconds < idle * 1.2 + 0.25,
            "idle {text}: session lasted {}s (client saw EOF after {took:?})",
            e.seconds
        );
        let line = server.wait_for_line("exited with code 3 (idle timeout) after ");
        assert!(
            line.contains(&format!("({})", s.local_addr().unwrap())),
            "{line}"
        );
    }
}

/// PROBE. A client that trickles one byte every 0.6 × idle_timeout is never idle: each byte
/// is echoed, the session outlives ten idle timeouts, and ends with code 0 at its EOF.
#[test]
fn a_trickle_every_six_tenths_of_idle_is_never_cut_off() {
    const IDLE: f64 = 0.2;
    let server = server(&["--idle-timeout", "0.2"]);
    let mut s = server.connect_greeted();
    let start = Instant::now();
    for i in 0..17u8 {
        thread::sleep(Duration::from_secs_f64(IDLE * 0.6));
        assert_eq!(
            echo_roundtrip(&mut s, &[b'a' + i]),
            [b'a' + i],
            "byte {i} after {:?}",
            start.elapsed()
        );
    }
    assert!(start.elapsed() > Duration::from_secs(2));
    assert_eq!(send_and_drain(&mut s, b"end"), b"end");
    server.wait_child_exited_with(s.local_addr().unwrap(), 0, "client closed");
}

/// PROBE. Same, with the client never reading the echoes (they fit in the socket buffers): a
/// trickle keeps a session alive whatever the client does with the echo.
#[test]
fn a_trickle_that_never_reads_its_echo_is_not_cut_off_either() {
    let server = server(&["--idle-timeout", "0.2"]);
    let mut s = server.connect_greeted();
    for _ in 0..12 {
        thread::sleep(Duration::from_millis(120));
        s.write_all(b"x").unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let (got, _) = wait_eof(&mut s, Duration::from_secs(5));
    assert_eq!(got, b"xxxxxxxxxxxx");
    server.wait_child_exited_with(s.local_addr().unwrap(), 0, "client closed");
}

/// PROBE. A client that sends a lot and stops reading: the child's write blocks, and it ends
/// with code 4 within two idle timeouts (README: "cut off after one to two times
/// idle_timeout") of its last progress, not hanging. The child's last progress is before the
/// client's last accepted write (the child stops reading once its write blocks), so that write
/// bounds it from the client's side; the filling before it can take long on a loaded machine
/// and is not counted.
#[test]
fn a_client_that_stops_reading_ends_with_code_4_within_two_idle_timeouts() {
    const IDLE: Duration = Duration::from_secs(1);
    // Less than the one more idle_timeout that would tell "one to three" from "one to two".
    const SLACK: Duration = Duration::from_millis(900);
    let server = server(&["--idle-timeout", "1"]);
    let mut s = connect_with_recv_buffer(server.addr(), 4096);
    expect_banner(&mut s);
    let client = s.local_addr().unwrap();
    let writer = write_until_refused(&s, 7);
    let e = server.wait_child_exited_with(client, 4, "write timeout");
    let ended = Instant::now();
    let last_accepted = writer.join().unwrap();
    let after_last_write = ended.duration_since(last_accepted);
    assert!(
        after_last_write < 2 * IDLE + SLACK,
        "a client that stopped reading was cut off {after_last_write:?} after its last \
         accepted write, with idle_timeout {IDLE:?} (session {}s)",
        e.seconds
    );
    report(&format!(
        "code 4 {after_last_write:?} after the last accepted write (session {}s)",
        e.seconds
    ));
}

/// PROBE. A half-close: the client sends, shuts its side, and reads: everything is echoed,
/// then EOF, code 0, even with an idle timeout shorter than the time the client takes to
/// start reading as long as the echo fits in the buffers.
#[test]
fn a_half_closed_client_gets_everything_then_code_0() {
    let server = server(&["--idle-timeout", "0.3"]);
    let mut s = server.connect_greeted();
    let data = Noise::new(5).bytes(100_000);
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, _) = wait_eof(&mut s, Duration::from_secs(10));
    assert!(
        got == data,
        "echo differs ({} of {} bytes)",
        got.len(),
        data.len()
    );
    server.wait_child_exited_with(s.local_addr().unwrap(), 0, "client closed");
}

/// PROBE. A half-closed client that never reads a large echo: code 4, not a hang.
#[test]
fn a_half_closed_client_that_never_reads_ends_with_code_4() {
    let server = server(&["--idle-timeout", "0.3"]);
    let mut s = connect_with_recv_buffer(server.addr(), 4096);
    expect_banner(&mut s);
    let client = s.local_addr().unwrap();
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let chunk = vec![1u8; 64 * 1024];
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        if w.write(&chunk).is_err() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let e = server.wait_child_exited_with(client, 4, "write timeout");
    assert!(e.seconds < 2.0, "{e:?}");
}

// ---- max_session_time ----

/// PROBE. `max_session_time` alone (`idle_timeout = 0`): a silent client is ended at the
/// deadline with code 8, not before.
#[test]
fn max_session_time_alone_ends_a_silent_session_with_code_8() {
    let server = server(&["--idle-timeout", "0", "--max-session-time", "0.4"]);
    let mut s = server.connect_greeted();
    let (got, _) = wait_eof(&mut s, Duration::from_secs(5));
    assert_eq!(got, b"");
    let e = server.wait_child_exited_with(s.local_addr().unwrap(), 8, "max_session_time");
    assert!(e.seconds >= 0.39 && e.seconds < 0.8, "{e:?}");
}

/// PROBE. A busy session (a ping every 20 ms) with `max_session_time` alone is ended at the
/// deadline with code 8; every echo before it whole.
#[test]
fn max_session_time_alone_ends_a_busy_session_on_time() {
    let server = server(&["--idle-timeout", "0", "--max-session-time", "0.5"]);
    let mut s = server.connect_greeted();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut rounds = 0;
    loop {
        if s.write_all(b"ping").is_err() {
            break;
        }
        let mut buf = [0u8; 4];
        match s.read_exact(&mut buf) {
            Ok(()) => assert_eq!(&buf, b"ping"),
            Err(_) => break,
        }
        rounds += 1;
        assert!(start.elapsed() < Duration::from_secs(5), "never ended");
        thread::sleep(Duration::from_millis(20));
    }
    let e = server.wait_child_exited_with(s.local_addr().unwrap(), 8, "max_session_time");
    assert!(
        e.seconds >= 0.49 && e.seconds < 0.9,
        "{e:?} after {rounds} rounds"
    );
}

/// PROBE. A `max_session_time` shorter than `idle_timeout` wins (code 8); a shorter
/// `idle_timeout` wins over a longer `max_session_time` (code 3).
#[test]
fn the_nearer_limit_decides_the_code() {
    let a = server(&["--idle-timeout", "5", "--max-session-time", "0.3"]);
    let mut s = a.connect_greeted();
    wait_eof(&mut s, Duration::from_secs(5));
    let e = a.wait_child_exited_with(s.local_addr().unwrap(), 8, "max_session_time");
    assert!(e.seconds < 0.7, "{e:?}");

    let b = server(&["--idle-timeout", "0.3", "--max-session-time", "5"]);
    let mut s = b.connect_greeted();
    wait_eof(&mut s, Duration::from_secs(5));
    let e = b.wait_child_exited_with(s.local_addr().unwrap(), 3, "idle timeout");
    assert!(e.seconds < 0.7, "{e:?}");
}

/// PROBE. The deadline in the middle of a large echo to a slow reader: the session ends with
/// code 8 near the deadline, and what the client received is an exact prefix of what it sent.
#[test]
fn the_deadline_in_the_middle_of_a_large_echo_to_a_slow_reader() {
    let server = server(&["--idle-timeout", "10", "--max-session-time", "0.6"]);
    let mut s = connect_with_recv_buffer(server.addr(), 8192);
    expect_banner(&mut s);
    let client = s.local_addr().unwrap();
    let data = Noise::new(11).bytes(4 << 20);
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&sent);
    });
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("after {:?}: {e}", start.elapsed()),
        }
        thread::sleep(Duration::from_millis(5));
    }
    drop(s);
    let _ = writer.join();
    assert!(
        !got.is_empty() && got.len() < data.len(),
        "{} bytes",
        got.len()
    );
    assert!(
        got[..] == data[..got.len()],
        "the echo is not a prefix of what was sent"
    );
    let e = server.wait_child_exited_with(client, 8, "max_session_time");
    assert!(e.seconds >= 0.59 && e.seconds < 1.1, "{e:?}");
}

/// PROBE. `max_session_time` with `idle_timeout = 0` against a client that floods and never
/// reads: the blocked write is ended at the deadline with code 8.
#[test]
fn max_session_time_alone_ends_a_blocked_write() {
    let server = server(&["--idle-timeout", "0", "--max-session-time", "0.5"]);
    let s = connect_with_recv_buffer(server.addr(), 4096);
    let client = s.local_addr().unwrap();
    let writer = write_until_refused(&s, 3);
    let e = server.wait_child_exited_with(client, 8, "max_session_time");
    writer.join().unwrap();
    assert!(e.seconds < 1.0, "{e:?}");
}

// ---- signals ----

/// PROBE. A session without limits (`idle_timeout = 0`, no `max_session_time`) catches no
/// signal; one with a limit catches SIGALRM and nothing else.
#[test]
fn sigalrm_is_caught_only_by_a_session_with_a_limit() {
    let none = server(&["--idle-timeout", "0"]);
    let mut s = none.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"x"), b"x");
    let pid = none.child_pid_for(s.local_addr().unwrap());
    assert_eq!(signal_mask(pid, "SigCgt"), 0, "no limits: SigCgt");

    for args in [
        &["--idle-timeout", "5"][..],
        &["--idle-timeout", "0", "--max-session-time", "5"][..],
    ] {
        let limited = server(args);
        let mut s = limited.connect_greeted();
        assert_eq!(echo_roundtrip(&mut s, b"x"), b"x");
        let pid = limited.child_pid_for(s.local_addr().unwrap());
        assert_eq!(signal_mask(pid, "SigCgt"), SIGALRM_BIT, "{args:?}: SigCgt");
    }
}

/// PROBE. SIGALRM sent from outside to a child within its limits, many times, while it
/// echoes and while it waits (for less than its idle timeout): every byte echoed in order,
/// and the session ends with code 0 at the client's EOF.
#[test]
fn sigalrm_from_outside_neither_ends_nor_corrupts_a_session_within_its_limits() {
    let server = server(&["--idle-timeout", "0.5", "--max-session-time", "30"]);
    let mut s = server.connect_greeted();
    let client = s.local_addr().unwrap();
    let pid = server.child_pid_for(client);
    let storm = SignalStorm::start(pid, Signal::SIGALRM, Duration::from_micros(200));
    let mut noise = Noise::new(3);
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let data = noise.bytes(1 + (round * 7919) % 300_000);
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = thread::spawn(move || w.write_all(&sent).unwrap());
        let got = read_exactly(&mut s, data.len());
        writer.join().unwrap();
        assert!(got == data, "round {round}: echo differs");
        // Quiet for a while, under the idle timeout.
        thread::sleep(Duration::from_millis(150));
        round += 1;
    }
    let sent = storm.sent();
    drop(storm);
    assert!(sent > 100, "only {sent} signals sent");
    assert_eq!(send_and_drain(&mut s, b"bye"), b"bye");
    server.wait_child_exited_with(client, 0, "client closed");
}

/// PROBE. An idle session still ends at its idle timeout under a SIGALRM storm from outside
/// (each EINTR re-arms the clock from the last transfer, not from the signal).
#[test]
fn an_outside_sigalrm_storm_does_not_postpone_the_idle_timeout() {
    let server = server(&["--idle-timeout", "0.4"]);
    let mut s = server.connect_greeted();
    let client = s.local_addr().unwrap();
    let pid = server.child_pid_for(client);
    let _storm = SignalStorm::start(pid, Signal::SIGALRM, Duration::from_millis(2));
    let (got, _) = wait_eof(&mut s, Duration::from_secs(5));
    assert_eq!(got, b"");
    let e = server.wait_child_exited_with(client, 3, "idle timeout");
    assert!(e.seconds >= 0.39 && e.seconds < 0.8, "{e:?}");
}

// ---- reload ----

/// PROBE. A reload that changes `idle_timeout` applies to new sessions only: a session
/// started under 0.3 s still ends at 0.3 s after a reload to 30 s, and one started under 30 s
/// is not cut off at 0.3 s after a reload back.
#[test]
fn a_reload_changes_idle_timeout_for_new_sessions_only() {
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\nidle_timeout = 0.6\n")
        .start();
    let addr = server.addr();
    let mut short = server.connect_greeted();
    server.rewrite_config(&format!("listen = [\"{addr}\"]\nidle_timeout = 30\n"));
    server.signal(Signal::SIGHUP);
    server.wait_for_line("reloaded configuration");
    let mut long = server.connect_greeted();
    let (_, took) = wait_eof(&mut short, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(2),
        "old session ended after {took:?}"
    );
    server.wait_child_exited_with(short.local_addr().unwrap(), 3, "idle timeout");

    server.rewrite_config(&format!("listen = [\"{addr}\"]\nidle_timeout = 0.2\n"));
    server.signal(Signal::SIGHUP);
    server.wait_for_lines("reloaded configuration", 2);
    thread::sleep(Duration::from_millis(700));
    assert_eq!(echo_roundtrip(&mut long, b"still here"), b"still here");
    assert_eq!(send_and_drain(&mut long, b""), b"");
    server.wait_child_exited_with(long.local_addr().unwrap(), 0, "client closed");
}

// ---- many sessions ----

/// PROBE. 200 concurrent silent sessions with a 0.2 s idle timeout: every one ends with code
/// 3, none early, none hanging; no child is left.
#[test]
fn two_hundred_sessions_with_a_short_idle_timeout_all_end_on_time() {
    const N: usize = 200;
    raise_own_nofile(4096);
    let server = Server::builder()
        .env("RUST_LOG", "info")
        .args([
            "--idle-timeout",
            "0.2",
            "--max-per-source",
            "0",
            "--max-children",
            "5000",
        ])
        .start();
    let clients: Vec<TcpStream> = (0..N).map(|_| server.connect()).collect();
    server.wait_for_lines("exited with code", N);
    let endings: Vec<ChildEnding> = server
        .log_lines()
        .iter()
        .filter_map(|l| LogLine::parse(l)?.child_ending())
        .collect();
    let bad: Vec<_> = endings
        .iter()
        .filter(|e| e.how != "exited with code 3" || e.seconds < 0.19 || e.seconds > 1.5)
        .collect();
    assert!(bad.is_empty(), "{} of {N}: {bad:?}", bad.len());
    for c in clients {
        assert!(endings.iter().any(|e| e.peer == c.local_addr().unwrap()));
    }
    assert_no_children(&server, "after 200 idle timeouts");
}

// ---- the child's own log line and the clock ----

/// PROBE. With the child writing its own `session ... ended` line (debug level: the logger's
/// `write_in_child`, which uses SIGALRM and alarm() itself), back-to-back sessions with a
/// 1 ms idle timeout all end with code 3 and every line in the log is whole.
#[test]
fn the_childs_own_log_line_after_a_timed_session_is_written_whole() {
    let server = server(&["--idle-timeout", "0.001", "--max-session-time", "10"]);
    let mut clients = Vec::new();
    for _ in 0..30 {
        let mut s = server.connect();
        wait_eof(&mut s, Duration::from_secs(5));
        clients.push(s.local_addr().unwrap());
    }
    for c in &clients {
        server.wait_child_exited_with(*c, 3, "idle timeout");
    }
    server.wait_for_lines("ended: IdleTimeout", clients.len());
    server.assert_whole_lines();
}

// ---- a child that was stopped (SIGSTOP, a cgroup freeze, a debugger) ----

/// Stops `pid` (one process, by pid) and waits until /proc shows it stopped.
fn stop(pid: Pid) {
    kill(pid, Signal::SIGSTOP).unwrap();
    assert!(
        wait_until(WAIT, || process_state(pid) == Some('T')),
        "child {pid} not stopped"
    );
}

/// Waits until `pid` sits in system call `nr` (x86_64: 45 recvfrom, 44 sendto), twice in a
/// row 20 ms apart: blocked there, not passing through.
fn wait_in_syscall(pid: Pid, nr: u32) {
    let now_in = || {
        std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .is_ok_and(|t| t.split_whitespace().next() == Some(nr.to_string().as_str()))
    };
    assert!(
        wait_until(WAIT, || now_in() && {
            thread::sleep(Duration::from_millis(20));
            now_in()
        }),
        "child {pid} never blocked in system call {nr}"
    );
}

/// Continues a stopped child on drop, so that a failing test leaves nothing stopped.
struct ContOnDrop(Pid);
impl Drop for ContOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// DEFECT. Input that arrived well within `idle_timeout` but while the child was stopped
/// (SIGSTOP, `systemctl freeze`, `docker pause`, a debugger) for longer than the idle time
/// left: on SIGCONT the session is ended as idle (code 3) and the waiting bytes are never
/// echoed. The stop aborts the blocked recv with ERESTARTSYS; the session's SIGALRM, which
/// came due meanwhile, is then delivered with its handler, so recv returns EINTR without
/// looking at the queued data, and `SessionClock::interrupted` decides from the clock alone.
/// (With the socket timeouts before, recv returned EINTR, was retried and found the bytes.)
#[test]
fn input_that_arrived_while_the_child_was_stopped_is_echoed_not_called_idle() {
    let server = server(&["--idle-timeout", "0.5"]);
    let mut s = server.connect_greeted();
    let client = s.local_addr().unwrap();
    assert_eq!(echo_roundtrip(&mut s, b"first"), b"first");
    let pid = server.child_pid_for(client);
    wait_in_syscall(pid, 45);
    let cont = ContOnDrop(pid);
    stop(pid);
    // Well within the idle timeout of the last transfer.
    s.write_all(b"hello").unwrap();
    // The client just waits for its echo; the child is stopped past its idle timeout.
    thread::sleep(Duration::from_millis(900));
    drop(cont);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while got.len() < 5 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // The child closed with our bytes unread: the kernel resets the connection.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    let ending = server.wait_child_ending(client);
    assert_eq!(
        got, b"hello",
        "bytes sent 0 s into a 0.5 s idle timeout were not echoed: EOF or reset instead; the \
         child {} ({:?}) after {}s",
        ending.how, ending.meaning, ending.seconds
    );
}

/// DEFECT. Same for the write side: the child's echo is blocked on a client that reads
/// slowly; while the child is stopped the client reads everything (our send buffer empties,
/// the client is reading, not stalled). On SIGCONT the aborted send returns EINTR and the
/// session ends with code 4 ("write timeout: the client stopped reading") and the rest of
/// the echo is lost. (Only a send that had moved no byte yet returns EINTR; one that had
/// returns its count. The brief stop first makes the blocked send one of the former.)
#[test]
fn a_send_buffer_drained_while_the_child_was_stopped_is_not_a_write_timeout() {
    let server = server(&["--idle-timeout", "0.5"]);
    // A window small enough that the child's send buffer (at most tcp_wmem's 4 MiB) fills.
    let mut s = connect_with_recv_buffer(server.addr(), 64 * 1024);
    expect_banner(&mut s);
    let client = s.local_addr().unwrap();
    let pid = server.child_pid_for(client);
    let data = Noise::new(21).bytes(12 << 20);
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&sent);
        let _ = w.shutdown(Shutdown::Write);
    });
    // The child's echo is blocked in sendto once the client's window is full.
    wait_in_syscall(pid, 44);
    // A brief stop first: a send that had moved bytes returns them, and the next one blocks
    // having moved none (the state the long stop below must meet; a send that moved bytes
    // would return their count instead of EINTR).
    stop(pid);
    kill(pid, Signal::SIGCONT).unwrap();
    wait_in_syscall(pid, 44);
    let cont = ContOnDrop(pid);
    stop(pid);
    // Read what the kernel holds for us while the child is stopped (the client keeps up).
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stopped = Instant::now();
    while stopped.elapsed() < Duration::from_millis(900) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{e}"),
        }
    }
    drop(cont);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    writer.join().unwrap();
    let ending = server.wait_child_ending(client);
    assert!(
        got.len() == data.len() && ending.how == "exited with code 0",
        "a client that read everything it was sent got {} of {} bytes; the child {} ({:?}) \
         after {}s",
        got.len(),
        data.len(),
        ending.how,
        ending.meaning,
        ending.seconds
    );
    assert!(got == data, "the echo differs");
}

/// PROBE. The same stop, shorter than the idle time left: nothing is pending when the child
/// continues, the aborted recv is restarted, and the bytes are echoed.
#[test]
fn a_stop_shorter_than_the_idle_time_left_is_harmless() {
    let server = server(&["--idle-timeout", "2"]);
    let mut s = server.connect_greeted();
    let client = s.local_addr().unwrap();
    let pid = server.child_pid_for(client);
    let cont = ContOnDrop(pid);
    stop(pid);
    s.write_all(b"hello").unwrap();
    thread::sleep(Duration::from_millis(300));
    drop(cont);
    assert_eq!(read_exactly(&mut s, 5), b"hello");
    assert_eq!(send_and_drain(&mut s, b""), b"");
    server.wait_child_exited_with(client, 0, "client closed");
}

/// PROBE. An outside SIGALRM storm against a client that stopped reading does not postpone
/// the write timeout: code 4 within two idle timeouts.
#[test]
fn an_outside_sigalrm_storm_does_not_postpone_the_write_timeout() {
    let server = server(&["--idle-timeout", "0.4"]);
    let mut s = connect_with_recv_buffer(server.addr(), 4096);
    // The banner comes after the child catches SIGALRM; before, the signal would kill it.
    expect_banner(&mut s);
    let client = s.local_addr().unwrap();
    let pid = server.child_pid_for(client);
    let _storm = SignalStorm::start(pid, Signal::SIGALRM, Duration::from_millis(1));
    let writer = write_until_refused(&s, 9);
    let e = server.wait_child_exited_with(client, 4, "write timeout");
    writer.join().unwrap();
    assert!(e.seconds < 1.1, "{e:?}");
}

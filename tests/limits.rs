//! Limits and protection as a client sees them: `max_children` makes new clients wait in the
//! backlog (nothing lost), `max_per_source`, access rules and the per-source rate refuse without
//! forking (with the refusal message, if any), `max_session_time` ends a session with its exit
//! code (the idle timeout is in `echo`), refusals leave no child behind and are counted in the
//! SIGUSR1 status, and the same limits work from a config file.
//!
//! Clients pick their loopback source address (127.0.0.2, ...) by binding before connecting.

use crate::util::*;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// How long a client waits to be sure nothing arrives (a correctness check, not readiness).
const QUIET: Duration = Duration::from_millis(300);

/// Reads until the whole default banner arrived (`Ok`: served, the stream stays open) or the
/// server closed the connection first (`Err` with whatever came before the EOF: refused).
fn banner_or_eof(s: &mut TcpStream) -> Result<(), Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0; 64];
    while got.len() < BANNER.len() {
        let want = BANNER.len() - got.len();
        match s.read(&mut buf[..want]) {
            Ok(0) => return Err(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading banner or EOF (got {got:?} so far): {e}"),
        }
    }
    assert_eq!(got, BANNER, "banner");
    Ok(())
}

/// Asserts the server refused this connection: it sends exactly `message`, then EOF, no banner.
fn assert_refused(s: &mut TcpStream, message: &[u8], what: &str) {
    match banner_or_eof(s) {
        Ok(()) => panic!("{what}: was served (got the banner), expected a refusal"),
        Err(got) => assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(message),
            "{what}: bytes before EOF"
        ),
    }
}

/// Asserts nothing arrives on `s` for `QUIET`, then restores the read timeout to `WAIT`.
fn assert_quiet(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = [0; 64];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Ok(0) => panic!("{what}: connection closed, expected it to wait unserved"),
        Ok(n) => panic!("{what}: got {:?}, expected nothing yet", &buf[..n]),
        Err(e) => panic!("{what}: expected a read timeout, got {e}"),
    }
    s.set_read_timeout(Some(WAIT)).unwrap();
}

/// Half-closes a served session and checks the server echoes nothing more and ends it.
fn close_session(s: &mut TcpStream) {
    assert_eq!(send_and_drain(s, b""), b"", "bytes after half-close");
}

/// Asserts the parent forked exactly `n` children (its `accepted <peer> -> child <pid>` lines).
fn assert_forked(server: &Server, n: usize, what: &str) {
    server.assert_line_count(" -> child ", n, what);
}

/// At `max_children = 3` a 4th client's connect succeeds but it is not served while three
/// sessions run; once one ends it gets its banner and everything it sent meanwhile, echoed.
#[test]
fn max_children_makes_clients_wait_then_serves_them_whole() {
    let server = Server::builder().args(["--max-children", "3"]).start();
    let mut open: Vec<TcpStream> = (0..3).map(|_| server.connect_greeted()).collect();
    server.wait_for_line("max_children reached (3 active)");

    let mut waiting = server.connect();
    waiting.write_all(b"early\n").unwrap();
    assert_quiet(&mut waiting, "4th client at max_children");
    assert_eq!(server.children().len(), 3, "children at the limit");
    assert_forked(&server, 3, "forks at the limit");
    server.assert_line_count("max_children reached", 1, "logged once at the limit");

    let mut first = open.remove(0);
    close_session(&mut first);
    expect_banner(&mut waiting);
    let mut early = [0; 6];
    waiting
        .read_exact(&mut early)
        .expect("echo of data sent while waiting");
    assert_eq!(&early, b"early\n", "data sent before being served");
    assert_eq!(echo_roundtrip(&mut waiting, b"later\n"), b"later\n");
    server.wait_for_line("below max_children again (2 active)");
    assert_forked(&server, 4, "the waiting client got a child");
    server.assert_line_count("below max_children again", 1, "logged once");
    // Serving the 4th filled the 3 slots again, within seconds of the first time: that is
    // counted for the next report, not logged again.
    server.assert_line_count(
        "max_children reached",
        1,
        "reached again within the report interval",
    );

    close_session(&mut waiting);
    for s in &mut open {
        close_session(s);
    }
    assert_no_children(&server, "after every session closed");
}

/// `max_per_source = 2`: the 3rd client from 127.0.0.1 reads exactly the refusal message, then
/// EOF, and gets no child; a client from 127.0.0.2 is still served.
#[test]
fn max_per_source_refuses_with_message_without_forking() {
    let server = Server::builder()
        .args(["--max-per-source", "2", "--refusal-message", "busy\\n"])
        .start();
    let mut a = connect_greeted_from(server.addr(), "127.0.0.1");
    let mut b = connect_greeted_from(server.addr(), "127.0.0.1");

    let mut third = connect_from(server.addr(), "127.0.0.1");
    assert_refused(&mut third, b"busy\n", "3rd client from 127.0.0.1");
    let peer = third.local_addr().unwrap();
    server.wait_for_line(&format!(
        "refused {peer}: 2 sessions from 127.0.0.1/32 already (max_per_source)"
    ));

    let mut other = connect_greeted_from(server.addr(), "127.0.0.2");
    assert_eq!(echo_roundtrip(&mut other, b"hello\n"), b"hello\n");
    server.child_pid_for(other.local_addr().unwrap());
    assert_forked(&server, 3, "forks (the refused client must not get one)");
    assert_eq!(server.children().len(), 3, "children");

    for s in [&mut a, &mut b, &mut other] {
        close_session(s);
    }
    assert_no_children(&server, "after the served sessions closed");
}

/// `--deny 127.0.0.2/32` refuses 127.0.0.2 (EOF, no banner, no child) and serves 127.0.0.1;
/// `--allow 127.0.0.1` alone refuses 127.0.0.3 and serves 127.0.0.1.
#[test]
fn deny_and_allow_rules_refuse_without_forking() {
    let server = Server::builder().args(["--deny", "127.0.0.2/32"]).start();
    let mut denied = connect_from(server.addr(), "127.0.0.2");
    assert_refused(&mut denied, b"", "client from denied 127.0.0.2");
    let peer = denied.local_addr().unwrap();
    server.wait_for_line(&format!("refused {peer}: denied by rule 127.0.0.2/32"));
    let mut ok = connect_greeted_from(server.addr(), "127.0.0.1");
    assert_eq!(echo_roundtrip(&mut ok, b"deny\n"), b"deny\n");
    assert_forked(&server, 1, "forks with one denied and one served client");
    close_session(&mut ok);
    assert_no_children(&server, "deny server after the session closed");

    let server = Server::builder().args(["--allow", "127.0.0.1"]).start();
    let mut outsider = connect_from(server.addr(), "127.0.0.3");
    assert_refused(&mut outsider, b"", "client from 127.0.0.3 outside --allow");
    let peer = outsider.local_addr().unwrap();
    server.wait_for_line(&format!("refused {peer}: not in any allow rule"));
    let mut ok = connect_greeted_from(server.addr(), "127.0.0.1");
    assert_eq!(echo_roundtrip(&mut ok, b"allow\n"), b"allow\n");
    assert_forked(&server, 1, "forks with one refused and one served client");
    close_session(&mut ok);
    assert_no_children(&server, "allow server after the session closed");
}

/// `--max-rate-per-source 5 --rate-burst 5`: of 20 quick connections about 5 are served and
/// the rest refused without a child; a new connection is served again soon after (refill).
#[test]
fn rate_limit_serves_burst_refuses_rest_then_refills() {
    let server = Server::builder()
        .args(["--max-rate-per-source", "5", "--rate-burst", "5"])
        .start();
    let start = Instant::now();
    let mut served = 0;
    let mut refused = 0;
    let mut last_refusal = None;
    for i in 0..20 {
        let mut s = connect_from(server.addr(), "127.0.0.1");
        match banner_or_eof(&mut s) {
            Ok(()) => {
                served += 1;
                close_session(&mut s);
            }
            Err(got) => {
                assert_eq!(got, b"", "connection {i}: bytes before EOF of a refusal");
                refused += 1;
                last_refusal = Some(Instant::now());
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let most = 5 + (elapsed * 5.0).ceil() as usize + 1;
    assert!(
        (5..=most).contains(&served),
        "served {served} of 20 in {elapsed:.2}s (expected 5..={most})"
    );
    assert!(refused >= 1, "no connection refused of 20 in {elapsed:.2}s");
    assert_eq!(served + refused, 20);
    server.assert_line_count("(max_rate_per_source)", refused, "rate refusals");
    assert_forked(&server, served, "forks = served connections");

    // Refilling at 5/s, a token is back within 0.2 s of the last refusal.
    let last_refusal = last_refusal.unwrap();
    let mut probes = 0;
    let mut again = None;
    let probing_since = Instant::now();
    while again.is_none() && probes < 200 && probing_since.elapsed() < WAIT {
        probes += 1;
        let mut s = connect_from(server.addr(), "127.0.0.1");
        match banner_or_eof(&mut s) {
            Ok(()) => {
                again = Some(Instant::now());
                assert_eq!(echo_roundtrip(&mut s, b"again\n"), b"again\n");
                close_session(&mut s);
            }
            Err(got) => {
                assert_eq!(got, b"", "probe {probes}: bytes before EOF of a refusal");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let again = again.unwrap_or_else(|| {
        panic!(
            "not served again after {probes} probes\n--- server log ---\n{}",
            server.log_text()
        )
    });
    let gap = again.saturating_duration_since(last_refusal);
    assert!(
        gap <= Duration::from_secs(3),
        "served again {gap:?} after the last refusal"
    );
    assert_no_children(&server, "after every served connection closed");
}

/// `--max-session-time` also bounds a write the client blocks by not reading: with a long idle
/// timeout, the child still ends at the session limit (code 8), not after the write timeout,
/// and not twice the limit either (near the end, each write may block only until the end).
#[test]
fn max_session_time_bounds_a_blocked_write() {
    const LIMIT_SECS: f64 = 2.0;
    let server = Server::builder()
        .args(["--idle-timeout", "60", "--max-session-time", "2"])
        .start();
    let s = connect_with_recv_buffer(server.addr(), 16 * 1024);
    let peer = s.local_addr().unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..128 {
            // Once the child gives up, writes fail (reset): that is expected.
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let ending = server.wait_child_exit(peer, 8);
    let lasted = ending.seconds;
    assert!(
        lasted < LIMIT_SECS * 1.5,
        "the session lasted {lasted}s with a {LIMIT_SECS}s limit: {ending:?}"
    );
    assert_no_children(&server, "after the session limit");
    sender.join().expect("writer thread");
}

/// A refused client that had already sent data still reads the whole refusal message and a
/// clean EOF (not a reset that would destroy the message).
#[test]
fn refused_client_that_sent_data_reads_message_then_eof() {
    let server = Server::builder()
        .args(["--deny", "127.0.0.2", "--refusal-message", "go away\n"])
        .start();
    let mut s = connect_from(server.addr(), "127.0.0.2");
    s.write_all(b"hello before the verdict\n").unwrap();
    server.wait_for_line("refused 127.0.0.2:");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("EOF, not a reset");
    assert_eq!(got, b"go away\n");
}

/// IPv6 clients count per /64: two addresses of one /64 share the `max_per_source` budget.
#[test]
fn ipv6_sources_are_counted_per_64() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipping ipv6_sources_are_counted_per_64: no IPv6 loopback here");
        return;
    }
    let server = Server::builder()
        .args(["-l", "[::1]:0", "--max-per-source", "1"])
        .start();
    let mut first = connect(server.addr());
    expect_banner(&mut first);
    // A second connection from ::1 is the same /64 (the only IPv6 loopback address).
    let mut second = connect(server.addr());
    assert_eq!(read_to_eof(&mut second), b"", "second session from one /64");
    let refusal = server.wait_for_line("refused [::1]:");
    assert!(refusal.contains("from ::/64"), "{refusal}");
}

/// `--max-session-time 1` ends a session that keeps echoing every 100 ms: the client sees the
/// connection end after about a second, and the child exits with code 8.
#[test]
fn max_session_time_ends_busy_session_with_code_8() {
    let server = Server::builder().args(["--max-session-time", "1"]).start();
    let start = Instant::now();
    let mut s = server.connect_greeted();
    let mut rounds = 0;
    let end = loop {
        assert!(
            start.elapsed() < WAIT,
            "session still running after {WAIT:?} ({rounds} echoes)"
        );
        let msg = format!("tick {rounds}\n");
        if let Err(e) = s.write_all(msg.as_bytes()) {
            break e;
        }
        let mut back = vec![0; msg.len()];
        match s.read_exact(&mut back) {
            Ok(()) => assert_eq!(back, msg.as_bytes(), "echo {rounds}"),
            Err(e) => break e,
        }
        rounds += 1;
        thread::sleep(Duration::from_millis(100));
    };
    let lasted = start.elapsed();
    assert!(
        matches!(
            end.kind(),
            ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
        ),
        "session ended with {end} ({:?}), expected EOF or reset",
        end.kind()
    );
    assert!(
        lasted >= Duration::from_millis(950),
        "session ended after {lasted:?}, before max_session_time 1 s"
    );
    assert!(rounds >= 3, "only {rounds} echoes before the end");
    server.wait_child_exit(s.local_addr().unwrap(), 8);
    assert_no_children(&server, "after max_session_time");
}

/// Refusals of every kind (denied, not allowed, per source, rate) leave no child or zombie,
/// and the SIGUSR1 status counts each exactly once and names the busiest source.
#[test]
fn refusals_leave_no_child_and_are_counted_in_status() {
    let server = Server::builder()
        .args([
            "--allow",
            "127.0.0.0/30",
            "--deny",
            "127.0.0.2",
            "--max-per-source",
            "1",
            "--max-rate-per-source",
            "0.1",
            "--rate-burst",
            "1",
        ])
        .start();
    let mut kept = connect_greeted_from(server.addr(), "127.0.0.1");
    let kept_pid = server.child_pid_for(kept.local_addr().unwrap());

    let mut per_source = connect_from(server.addr(), "127.0.0.1");
    assert_refused(&mut per_source, b"", "2nd client from 127.0.0.1");
    let mut denied = connect_from(server.addr(), "127.0.0.2");
    assert_refused(&mut denied, b"", "client from denied 127.0.0.2");
    let mut outsider = connect_from(server.addr(), "127.0.0.5");
    assert_refused(&mut outsider, b"", "client from 127.0.0.5 outside --allow");

    // 127.0.0.3's one token goes to its first session; the next one within 10 s is refused.
    let mut short = connect_greeted_from(server.addr(), "127.0.0.3");
    close_session(&mut short);
    server.wait_child_exit(short.local_addr().unwrap(), 0);
    let mut too_fast = connect_from(server.addr(), "127.0.0.3");
    assert_refused(&mut too_fast, b"", "2nd client from 127.0.0.3 within 10 s");

    let kids = server.children();
    assert!(
        kids.len() == 1 && kids[0].pid == kept_pid,
        "children with one session open after 4 refusals: {kids:?} (expected only {kept_pid})"
    );
    assert_forked(&server, 2, "forks for 2 served and 4 refused clients");
    server.assert_line_count("] refused ", 4, "refusals");

    server.signal(Signal::SIGUSR1);
    let status = server.wait_for_line("status:");
    assert!(
        status
            .contains("4 refused [denied: 1, not allowed: 1, per source: 1, rate: 1, closing: 0, untrusted proxy: 0, PROXY header: 0]"),
        "refusal counts in {status}"
    );
    assert!(
        status.contains("busiest sources [127.0.0.1/32: 1]"),
        "busiest sources in {status}"
    );
    assert!(
        status.contains("status: 1 active"),
        "active sessions in {status}"
    );

    close_session(&mut kept);
    server.wait_child_exit(kept.local_addr().unwrap(), 0);
    assert_no_children(&server, "after the last served session closed");
}

/// The same limits from a TOML file work (`max_per_source = 1`, `deny`, `refusal_message`),
/// and a bad value exits 2 naming the file and the key.
#[test]
fn limits_from_config_file_and_bad_values_rejected() {
    let server = Server::builder()
        .config("max_per_source = 1\ndeny = [\"127.0.0.2\"]\nrefusal_message = \"full\\n\"\n")
        .start();
    let mut one = connect_greeted_from(server.addr(), "127.0.0.1");
    let mut two = connect_from(server.addr(), "127.0.0.1");
    assert_refused(&mut two, b"full\n", "2nd client from 127.0.0.1");
    let peer = two.local_addr().unwrap();
    server.wait_for_line(&format!(
        "refused {peer}: 1 sessions from 127.0.0.1/32 already (max_per_source)"
    ));
    let mut denied = connect_from(server.addr(), "127.0.0.2");
    assert_refused(&mut denied, b"full\n", "client from denied 127.0.0.2");
    let peer = denied.local_addr().unwrap();
    server.wait_for_line(&format!("refused {peer}: denied by rule 127.0.0.2/32"));
    assert_forked(&server, 1, "forks");
    close_session(&mut one);
    assert_no_children(&server, "after the session closed");

    let dir = TempDir::new();
    let path = dir.path().join("forkecho.toml");
    let path_text = path.display().to_string();
    for (text, key, detail) in [
        ("max_children = 0\n", "max_children", "0"),
        ("allow = [\"not-a-prefix\"]\n", "allow", "not-a-prefix"),
        ("deny = \"127.0.0.2\"\n", "deny", "array"),
        ("max_per_source = -1\n", "max_per_source", "-1"),
        ("rate_burst = 0\n", "rate_burst", "0"),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = run(&["-c", &path_text, "--check-config"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: exit status; {err}");
        assert!(
            err.contains(&path_text) && err.contains(&format!("key `{key}`")),
            "{text:?}: stderr should name {path_text} and key `{key}`: {err}"
        );
        assert!(
            err.contains(detail),
            "{text:?}: stderr should say {detail:?}: {err}"
        );
    }
    for args in [
        ["--max-children", "0"],
        ["--allow", "not-a-prefix"],
        ["--deny", "300.0.0.1"],
    ] {
        let out = run(&[args[0], args[1], "--check-config"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: exit status; {err}");
        assert!(
            err.contains(args[0]),
            "{args:?}: stderr should name the flag: {err}"
        );
    }
}

/// `max_per_source` counts live sessions, not finished ones: four clients doing short sessions
/// back to back from one address are never refused by a limit of twelve, even when the loop has
/// not yet handled the SIGCHLD of the sessions that ended. (Twelve, not four: a child whose EOF
/// a client has read may still be on its way to `_exit` when that client connects again.)
#[test]
fn per_source_limit_does_not_count_finished_sessions() {
    const CLIENTS: usize = 4;
    const SESSIONS: usize = 150;
    let server = Server::builder()
        .args(["--max-per-source", &(3 * CLIENTS).to_string()])
        .env("RUST_LOG", "info")
        .start();
    let addr = server.addr();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                for i in 0..SESSIONS {
                    let mut s = connect(addr);
                    let data = format!("client {c} session {i}\n");
                    let mut want = BANNER.to_vec();
                    want.extend(data.as_bytes());
                    assert_eq!(
                        send_and_drain(&mut s, data.as_bytes()),
                        want,
                        "client {c} session {i} was not served"
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client thread");
    }
    assert_eq!(server.count_lines("refused"), 0, "{}", server.log_text());
}

/// A client that reconnects only after its previous session's EOF never has two sessions at
/// once, so `max_per_source = 1` must never refuse it — although the child closes the
/// connection (the client's EOF) a moment before the parent can reap it.
#[test]
fn sequential_client_at_max_per_source_1_is_never_refused() {
    const SESSIONS: usize = 1500;
    let server = Server::builder()
        .args([
            "--max-per-source",
            "1",
            "--banner",
            "",
            "--refusal-message",
            "refused\\n",
        ])
        .env("RUST_LOG", "info")
        .start();
    for i in 0..SESSIONS {
        let mut s = server.connect();
        let got = send_and_drain(&mut s, b"x");
        assert_eq!(got, b"x", "session {i} of a sequential client");
    }
    assert_eq!(server.count_lines("] refused "), 0, "refusals");
}

/// A source really over `max_per_source` is still refused: waiting for one of its sessions
/// to end is bounded.
#[test]
fn source_over_max_per_source_is_refused_after_a_short_wait() {
    let server = Server::builder()
        .args(["--max-per-source", "1", "--refusal-message", "full\n"])
        .start();
    let _held = server.connect_greeted();
    let started = Instant::now();
    let mut extra = server.connect();
    assert_refused(&mut extra, b"full\n", "second session from one source");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "refused after {waited:?}");
}

/// Under load at `max_children`, the limit is crossed many times a second; the log says so
/// at most once per report interval, with a count, instead of a line per crossing.
#[test]
fn max_children_crossings_are_reported_once_per_interval() {
    let server = Server::builder()
        .args(["--max-children", "1", "--banner", ""])
        .env("RUST_LOG", "info")
        .start();
    let addr = server.addr();
    let started = Instant::now();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..150 {
                    let mut s = connect(addr);
                    assert_eq!(send_and_drain(&mut s, b"y"), b"y");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let intervals = started.elapsed().as_secs() / 10 + 1;
    let reached = server.count_lines("max_children reached");
    let below = server.count_lines("below max_children again");
    assert!(
        (1..=intervals as usize).contains(&reached),
        "{reached} `reached` lines in {:?}",
        started.elapsed()
    );
    assert!(
        below <= reached,
        "{below} `below` lines for {reached} `reached`"
    );
    // A fork is logged once it returns, which may be after its child has served.
    server.wait_for_lines(" -> child ", 450);
    assert_eq!(server.count_lines(" -> child "), 450);
}

/// An episode at `max_children` that began too soon after the last report to be logged then
/// is logged once the report interval has passed, if it is still going: the last word in the
/// log is never a stale "below max_children again".
#[test]
fn a_long_episode_at_max_children_is_reported_late_rather_never() {
    let server = Server::builder()
        .args(["--max-children", "1"])
        .env("RUST_LOG", "info")
        .start();
    let mut first = server.connect_greeted();
    server.wait_for_line("max_children reached (1 active)");
    close_session(&mut first);
    server.wait_for_line("below max_children again");
    // Reached again at once: counted, not logged...
    let _held = server.connect_greeted();
    server.assert_line_count("max_children reached", 1, "right after the first report");
    // ...until the report interval (10 s) has passed with the limit still reached.
    server.wait_for_log("the late report", Duration::from_secs(30), |lines| {
        lines
            .iter()
            .filter(|l| l.contains("max_children reached"))
            .count()
            == 2
    });
    let last = server.log_lines().last().cloned().unwrap();
    assert!(last.contains("max_children reached (1 active)"), "{last}");
}

//! Adversarial tests of the parent's loop and the child's setup, with the real binary: each
//! shows one defect a user sees (a client dropped without a word, plain clients starved of
//! descriptors). They fail until it is fixed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::util::*;

/// A v1 header naming `client` (IPv4) as the one who connected to 192.0.2.1:2333.
fn v1_header(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 192.0.2.1 {port} 2333\r\n").into_bytes()
}

/// Waits until the status line says `n` connections wait for a header.
fn wait_awaiting(server: &Server, n: usize) {
    let want = format!(" {n} awaiting a PROXY header");
    assert!(
        wait_until(WAIT, || server.status_line().contains(&want)),
        "never {n} awaiting a header\n{}",
        server.log_text()
    );
}

/// What `s` receives within `limit`, up to EOF; `None` if nothing at all came in that time
/// (neither data nor EOF).
fn answer_within(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (!got.is_empty()).then_some(got);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return (!got.is_empty()).then_some(got),
        }
    }
}

/// During a smart shutdown a connection already waiting for its PROXY header may still get a
/// session (the draining serves what was accepted). If its header names a client whose source
/// is at `max_per_source`, it must be decided like any other: refused with `refusal_message`
/// (or served once room comes), and logged. Today `start_proxied_session` passes
/// `MayWait::Grace`, so it is parked in `pending`, which nothing decides once the phase is not
/// `Serving` (`decide_pending` returns early, `next_wakeup` ignores its deadline): the client
/// hangs without a byte until the drain ends, then gets a bare EOF, and the log never mentions
/// it (neither accepted nor refused, and no refusal counted).
#[test]
fn a_proxied_client_over_max_per_source_during_a_smart_shutdown_is_answered_not_dropped() {
    let server = Server::builder()
        .args([
            "--proxy-protocol",
            "v1",
            "--trusted-proxy",
            "127.0.0.1",
            "--max-per-source",
            "1",
            "--proxy-header-timeout",
            "60",
            "--shutdown-timeout",
            "60",
            "--refusal-message",
            "busy\\n",
        ])
        .start();
    let addr = server.addr();
    let mut session = connect(addr);
    session.write_all(&v1_header("203.0.113.7", 5555)).unwrap();
    expect_banner(&mut session);
    server.wait_for_line("accepted 203.0.113.7:5555 via");
    // Accepted before the shutdown; its header comes during the drain.
    let mut late = connect(addr);
    wait_awaiting(&server, 1);

    server.signal(Signal::SIGTERM);
    server.wait_for_line("shutting down on SIGTERM (smart)");
    late.write_all(&v1_header("203.0.113.7", 5556)).unwrap();

    // `max_per_source` decides within PER_SOURCE_GRACE (0.25 s); 5 s is ample.
    let answer = answer_within(&mut late, Duration::from_secs(5));
    assert_eq!(
        answer.as_deref(),
        Some(&b"busy\n"[..]),
        "the client over max_per_source got no answer in 5 s during a smart shutdown (it \
         waits in `pending`, which nothing decides while draining)\n--- server log ---\n{}",
        server.log_text()
    );
    server.wait_for_line("refused 203.0.113.7:5556");
    drop(session);
}

/// The share of descriptors that connections waiting for a PROXY header may hold (half the
/// soft RLIMIT_NOFILE) is computed at start and on reload only. An operator who lowers the
/// running parent's limit (`prlimit --pid`) gets a table that may hold every descriptor: slow
/// balancers then take them all, and the plain listener cannot accept (EMFILE) until
/// `proxy_header_timeout` frees some. The loop should re-read the limit when accept runs out
/// of descriptors, and refuse the oldest connections still waiting for a header down to the
/// new share, so that plain clients are served.
#[test]
fn a_lowered_descriptor_limit_does_not_let_waiting_headers_starve_the_plain_listener() {
    let (plain, proxied) = (free_port(), free_port());
    let server = Server::builder()
        .config(&format!(
            "listen = [\"127.0.0.1:{plain}\"]\nproxy_header_timeout = 60\n\
             [[listener]]\naddress = \"127.0.0.1:{proxied}\"\nproxy_protocol = \"v1\"\n\
             trusted_proxies = [\"127.0.0.1\"]\n"
        ))
        .listeners(2)
        .start();
    let soft = 40;
    set_soft_nofile_of(server.pid(), soft);
    // More silent balancer connections than the new limit leaves descriptors for.
    let balancers: Vec<TcpStream> = (0..soft)
        .map(|_| connect(format!("127.0.0.1:{proxied}").parse().unwrap()))
        .collect();
    server.wait_for_line("too many open files");

    let mut client = connect(format!("127.0.0.1:{plain}").parse().unwrap());
    let answer = answer_within(&mut client, Duration::from_secs(3));
    assert!(
        answer.is_some_and(|a| !a.is_empty()),
        "a plain client got nothing in 3 s: {} silent balancer connections hold the \
         descriptors of a parent whose soft RLIMIT_NOFILE is now {soft}\n--- server log ---\n{}",
        balancers.len(),
        server.log_text()
    );
}

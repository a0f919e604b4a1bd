//! The echo session a client sees: banner, byte-exact echo of any data (large, binary, many
//! clients at once, IPv4 and IPv6), half-close, and the idle timeout.

use crate::util::*;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// The default session: the greeting `connect successful!\n`, then `Hello!\n` comes back.
#[test]
fn greeting_then_hello_echoed() {
    let server = Server::start();
    let mut s = server.connect();
    let mut greeting = [0; 20];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"connect successful!\n");
    assert_eq!(echo_roundtrip(&mut s, b"Hello!\n"), b"Hello!\n");
}

/// 64 MiB of pseudo-random bytes, written and read concurrently, come back byte for byte,
/// followed by EOF once the client half-closes.
#[test]
fn large_stream_echoed_exactly() {
    const TOTAL: usize = 64 << 20;
    const CHUNK: usize = 64 << 10;
    const SEED: u64 = 0x5eed_0064;

    let server = Server::start();
    let mut s = server.connect_greeted();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut noise = Noise::new(SEED);
        let mut buf = vec![0; CHUNK];
        let mut sent = 0;
        while sent < TOTAL {
            let n = CHUNK.min(TOTAL - sent);
            noise.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).expect("write to server");
            sent += n;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });

    let mut expected = Noise::new(SEED);
    let mut buf = vec![0; CHUNK];
    let mut want = vec![0; CHUNK];
    let mut received = 0;
    while received < TOTAL {
        let n = s.read(&mut buf).expect("read echo");
        assert!(n > 0, "EOF after {received} of {TOTAL} bytes");
        let n = n.min(TOTAL - received);
        expected.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let i = (0..n).find(|&i| buf[i] != want[i]).unwrap();
            panic!(
                "echo differs at byte {}: got {:#04x}, want {:#04x}",
                received + i,
                buf[i],
                want[i]
            );
        }
        received += n;
    }
    // Nothing beyond what was sent, then EOF.
    assert_eq!(read_to_eof(&mut s), b"", "extra bytes after {TOTAL} bytes");
    writer.join().expect("writer thread");
}

/// A client streaming in 4 KiB writes gets every byte back, and the session lets TCP
/// coalesce the echo (TCP_NODELAY off) while the stream lasts: one read-and-send at a time
/// makes more, smaller segments. Once the client has everything back and goes quiet, the child
/// waits for it with TCP_NODELAY on again: nothing of the echo is held back for an
/// acknowledgement that a client waiting for its answer would delay.
#[test]
fn a_stream_is_coalesced_and_the_child_waits_with_nothing_held_back() {
    const TOTAL: usize = 16 << 20;
    const WRITE: usize = 4096;
    const SEED: u64 = 0x5eed_4096;
    let server = Server::start();
    let mut s = server.connect_greeted();
    let child = server.child_pid_for(s.local_addr().unwrap());
    let socket = socket_of(child).expect("the child's socket");
    let nodelay = || int_option(&socket, libc::IPPROTO_TCP, libc::TCP_NODELAY) != 0;
    // Made beforehand, so that the writer outpaces the child (a debug build too).
    let data = std::sync::Arc::new(Noise::new(SEED).bytes(TOTAL));
    let (mut w, sent) = (s.try_clone().unwrap(), data.clone());
    let writer = thread::spawn(move || {
        for chunk in sent.chunks(WRITE) {
            w.write_all(chunk).expect("write to server");
        }
    });
    let mut buf = vec![0; 1 << 16];
    let (mut received, mut coalesced) = (0, false);
    while received < TOTAL {
        let n = s.read(&mut buf).expect("read echo");
        assert!(n > 0, "EOF after {received} of {TOTAL} bytes");
        assert!(
            buf[..n] == data[received..received + n],
            "echo differs near byte {received}"
        );
        received += n;
        coalesced |= !nodelay();
    }
    writer.join().expect("writer thread");
    assert!(
        coalesced,
        "TCP_NODELAY stayed on through a stream of {TOTAL} bytes in {WRITE}-byte writes"
    );
    // Everything came back, so the child's sends are done: asleep, it waits in its read.
    assert!(
        wait_until(WAIT, || process_state(child) == Some('S')),
        "the child never went back to waiting for input"
    );
    assert!(nodelay(), "the child waits for input with TCP_NODELAY off");
}

/// Requests and answers of 512 bytes never turn TCP_NODELAY off: each answer leaves at once.
#[test]
fn request_and_answer_sessions_keep_nodelay_on() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    let child = server.child_pid_for(s.local_addr().unwrap());
    let socket = socket_of(child).expect("the child's socket");
    let request = Noise::new(512).bytes(512);
    for i in 0..200 {
        assert_eq!(echo_roundtrip(&mut s, &request), request);
        assert_ne!(
            int_option(&socket, libc::IPPROTO_TCP, libc::TCP_NODELAY),
            0,
            "TCP_NODELAY off after request {i}"
        );
    }
}

/// Binary data with every byte value, NUL included, is echoed unchanged.
#[test]
fn binary_bytes_including_nul_echoed() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    let data: Vec<u8> = (0..=255u8).cycle().take(256 * 16).collect();
    assert_eq!(echo_roundtrip(&mut s, &data), data);
    let nuls = vec![0u8; 1000];
    assert_eq!(echo_roundtrip(&mut s, &nuls), nuls);
    assert_eq!(send_and_drain(&mut s, b"\0\0tail\0"), b"\0\0tail\0");
}

/// After the client half-closes, it gets all its data back then EOF, and the child exits 0.
#[test]
fn half_close_echoes_all_then_eof_and_child_exits_0() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    let client = s.local_addr().unwrap();
    let mut data = b"first line\nsecond line\n".to_vec();
    data.extend(Noise::new(4).bytes(16 << 10));
    assert_eq!(send_and_drain(&mut s, &data), data);
    server.wait_child_exit(client, 0);
}

/// Urgent (out-of-band) data does not end the session: the urgent byte is not part of the
/// stream (as with `read`), everything around it is echoed, and only the real EOF ends it.
#[test]
fn urgent_data_mid_session_is_not_taken_for_eof() {
    use std::os::fd::AsRawFd;
    let server = Server::start();
    let mut s = server.connect_greeted();
    let client = s.local_addr().unwrap();
    assert_eq!(echo_roundtrip(&mut s, b"before\n"), b"before\n");
    // Safe: sends one byte from a valid buffer on our own socket.
    let sent = unsafe { libc::send(s.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(sent, 1, "send MSG_OOB");
    assert_eq!(echo_roundtrip(&mut s, b"after\n"), b"after\n");
    assert_eq!(send_and_drain(&mut s, b"last\n"), b"last\n");
    server.wait_child_exit(client, 0);
}

/// 100 clients at once each get their own data back, each from its own child process.
#[test]
fn hundred_concurrent_clients_each_own_child() {
    const CLIENTS: u64 = 100;
    // All clients come from 127.0.0.1: lift the per-source limit (default 32) for this test.
    let server = Server::builder().args(["--max-per-source", "0"]).start();
    let addr = server.addr();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let mut s = connect(addr);
                expect_banner(&mut s);
                let mut data = format!("client {i}\n").into_bytes();
                data.extend(Noise::new(1000 + i).bytes(2000 + i as usize));
                assert_eq!(echo_roundtrip(&mut s, &data), data, "client {i}");
                s
            })
        })
        .collect();
    // Keep every connection open until each one is mapped to its child.
    let streams: Vec<TcpStream> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    let pids: HashSet<_> = streams
        .iter()
        .map(|s| server.child_pid_for(s.local_addr().unwrap()))
        .collect();
    assert_eq!(pids.len(), CLIENTS as usize, "distinct child pids");
    assert!(
        !pids.contains(&server.pid()),
        "a client served by the parent"
    );
    // 100 children end at once and each logs its outcome under its own pid, while the parent
    // logs every reap: no line may be cut or mixed with another.
    drop(streams);
    server.assert_line_count(
        ") exited with code 0",
        CLIENTS as usize,
        "100 children reaped",
    );
    for pid in &pids {
        server.wait_for_line(&format!("forkecho[{pid}] session "));
    }
    server.assert_whole_lines();
}

/// `--banner ''` sends no greeting (plain RFC 862 echo); `--banner 'hi\n'` sends `hi` + newline.
#[test]
fn banner_empty_and_custom() {
    let plain = Server::builder().args(["--banner", ""]).start();
    let mut s = plain.connect();
    assert_eq!(echo_roundtrip(&mut s, b"ping\n"), b"ping\n");
    assert_eq!(send_and_drain(&mut s, b"pong"), b"pong");

    let custom = Server::builder().args(["--banner", "hi\\n"]).start();
    let mut s = custom.connect();
    assert_eq!(send_and_drain(&mut s, b"x"), b"hi\nx");
}

/// `--idle-timeout 0.5`: a client that sends nothing gets EOF; the child exits with code 3 and
/// is reaped.
#[test]
fn idle_client_is_closed_with_code_3() {
    let server = Server::builder().args(["--idle-timeout", "0.5"]).start();
    let start = Instant::now();
    let mut s = server.connect_greeted();
    assert_eq!(read_to_eof(&mut s), b"", "bytes before the idle close");
    let idle = start.elapsed();
    assert!(
        idle >= Duration::from_millis(450),
        "closed after {idle:?}, before the 0.5 s idle timeout"
    );
    let ending = server.wait_child_exit(s.local_addr().unwrap(), 3);
    // The parent's line says what code 3 means.
    assert_eq!(
        ending.meaning.as_deref(),
        Some("idle timeout"),
        "{ending:?}"
    );
    assert_no_children(&server, "after the idle timeout");
}

/// A server listening on 127.0.0.1 and [::1] echoes on both.
#[test]
fn ipv4_and_ipv6_listeners_both_serve() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("skipping ipv4_and_ipv6_listeners_both_serve: cannot bind [::1]:0: {e}");
        return;
    }
    let server = Server::builder()
        .args(["-l", "127.0.0.1:0", "-l", "[::1]:0"])
        .listeners(2)
        .start();
    assert_eq!(server.addrs.len(), 2, "{:?}", server.addrs);
    assert!(
        server.addrs.iter().any(|a| a.is_ipv4()),
        "{:?}",
        server.addrs
    );
    assert!(
        server.addrs.iter().any(|a| a.is_ipv6()),
        "{:?}",
        server.addrs
    );
    for &addr in &server.addrs {
        let mut s = connect(addr);
        expect_banner(&mut s);
        let data = format!("hello over {addr}\n").into_bytes();
        assert_eq!(echo_roundtrip(&mut s, &data), data, "via {addr}");
    }
}

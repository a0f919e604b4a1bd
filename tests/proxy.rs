//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`) as a balancer and its clients see
//! it: on a listener with `proxy_protocol` on, a trusted proxy's header names the real client,
//! which is then the peer everywhere (limits, rules, log lines, a program's environment); the
//! header itself is consumed exactly, however it is cut into writes, and never a byte of the
//! client's data; a connection from an untrusted address, or with a header that is malformed,
//! too long or late, is refused, logged by reason, and never gets a child.
//!
//! The tests build the headers by hand, byte by byte (v1: one text line; v2: a 16-byte preamble
//! then addresses and TLVs), and play the proxy from 127.0.0.1 (or 127.0.0.2) over loopback.

use crate::util::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use proptest::prelude::*;

// ---- Headers, by hand ----

/// The 12 bytes every v2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// v2 version-and-command bytes: version 2, and PROXY (a relayed connection) or LOCAL (the
/// balancer's own connection, a health check).
const V2_PROXY: u8 = 0x21;
const V2_LOCAL: u8 = 0x20;
/// v2 family-and-protocol bytes.
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;
const UNSPECIFIED: u8 = 0x00;
/// v2 TLV types (section 2.2 of the spec) used here.
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_NOOP: u8 = 0x04;
/// In the range the spec leaves to applications (0xE0-0xEF).
const PP2_TYPE_CUSTOM: u8 = 0xE5;

/// The v1 health-check header: "use the socket's own addresses".
const V1_UNKNOWN: &[u8] = b"PROXY UNKNOWN\r\n";

/// How forkecho words the refusal of a header that did not arrive within
/// `proxy_header_timeout`.
const TIMEOUT_REASON: &str = "PROXY header not received in time (proxy_header_timeout)";

/// The most header bytes forkecho reads without a complete header, per the spec.
const HEADER_CAP: usize = 2048;

/// A v1 header (`PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n`); both addresses must be of
/// one family.
fn v1(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        destination.ip(),
        client.port(),
        destination.port()
    )
    .into_bytes()
}

/// A v2 header: signature, `version_command`, `family_protocol`, the length of `body` (big
/// endian), `body`.
fn v2_raw(version_command: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
    let length = u16::try_from(body.len()).expect("a v2 body fits in 16 bits");
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([version_command, family_protocol]);
    header.extend(length.to_be_bytes());
    header.extend(body);
    header
}

/// The address block of a v2 header for TCP: source and destination addresses, then source
/// and destination ports, all in network order.
fn v2_addresses(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let octets = |addr: SocketAddr| match addr {
        SocketAddr::V4(a) => a.ip().octets().to_vec(),
        SocketAddr::V6(a) => a.ip().octets().to_vec(),
    };
    let mut body = octets(client);
    body.extend(octets(destination));
    body.extend(client.port().to_be_bytes());
    body.extend(destination.port().to_be_bytes());
    body
}

/// One TLV: type, 16-bit big-endian length, value.
fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend(u16::try_from(value.len()).unwrap().to_be_bytes());
    out.extend(value);
    out
}

/// A v2 PROXY header for TCP over IPv4 or IPv6 (by the addresses' family), with `tlvs` after
/// the addresses.
fn v2(client: SocketAddr, destination: SocketAddr, tlvs: &[Vec<u8>]) -> Vec<u8> {
    let family = if client.is_ipv4() {
        TCP_OVER_IPV4
    } else {
        TCP_OVER_IPV6
    };
    let mut body = v2_addresses(client, destination);
    body.extend(tlvs.concat());
    v2_raw(V2_PROXY, family, &body)
}

/// A v2 LOCAL header, no addresses: what a balancer's health check sends.
fn v2_local() -> Vec<u8> {
    v2_raw(V2_LOCAL, UNSPECIFIED, &[])
}

/// A few TLVs of the kinds a balancer sends (authority, padding, its own).
fn some_tlvs() -> Vec<Vec<u8>> {
    vec![
        tlv(PP2_TYPE_AUTHORITY, b"echo.example.com"),
        tlv(PP2_TYPE_NOOP, &[0; 5]),
        tlv(PP2_TYPE_CUSTOM, b"\x00\xffbalancer-7"),
    ]
}

fn v4(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(a), port))
}

fn v6(text: &str, port: u16) -> SocketAddr {
    SocketAddr::from((text.parse::<Ipv6Addr>().unwrap(), port))
}

/// Where the balancer says the client connected (the documentation ranges of RFC 5737/3849).
fn destination_v4() -> SocketAddr {
    v4([198, 51, 100, 1], 2334)
}

fn destination_v6() -> SocketAddr {
    v6("2001:db8::1", 2334)
}

// ---- Servers, clients, log ----

/// The proxy's address in every test but the untrusted-proxy one.
const PROXY_IP: &str = "127.0.0.1";

/// A server on 127.0.0.1 port 0 with `--proxy-protocol MODE`, trusting 127.0.0.1.
fn proxy_server(mode: &str) -> ServerBuilder {
    Server::builder().args(["--proxy-protocol", mode, "--trusted-proxy", PROXY_IP])
}

/// Data a client sends after the header that itself looks like headers of both versions: an
/// echo of it whole shows exactly one header was consumed, not a byte more.
fn header_lookalike_data() -> Vec<u8> {
    let mut data = b"PROXY TCP4 192.0.2.9 192.0.2.10 9 10\r\n".to_vec();
    data.extend(v2(v4([192, 0, 2, 9], 9), v4([192, 0, 2, 10], 10), &[]));
    data.extend(b"and the client's own words\n");
    data
}

/// Connects from 127.0.0.1 (the proxy) with Nagle off, so that each write is its own segment.
fn connect_as_proxy(addr: SocketAddr) -> TcpStream {
    let s = connect_from(addr, PROXY_IP);
    s.set_nodelay(true).unwrap();
    s
}

/// Connects as the proxy and sends `header` and `data` in one write.
fn send_through_proxy(addr: SocketAddr, header: &[u8], data: &[u8]) -> TcpStream {
    let mut s = connect_as_proxy(addr);
    s.write_all(&[header, data].concat()).unwrap();
    s
}

/// Asserts the session is served: the banner, then `data` (already sent) echoed exactly, then
/// nothing more once the client half-closes.
fn assert_echoes(s: &mut TcpStream, data: &[u8], what: &str) {
    let mut banner = vec![0; BANNER.len()];
    if let Err(e) = s.read_exact(&mut banner) {
        panic!("{what}: no banner: {e}");
    }
    assert_eq!(banner, BANNER, "{what}: banner");
    let echoed = read_exactly(s, data.len());
    assert_eq!(
        String::from_utf8_lossy(&echoed),
        String::from_utf8_lossy(data),
        "{what}: echo"
    );
    assert_eq!(send_and_drain(s, b""), b"", "{what}: bytes after the echo");
}

/// Asserts the parent logged `accepted <client> via <proxy> -> child <pid>` and returns the pid.
fn assert_accepted_via(server: &Server, client: SocketAddr, proxy: SocketAddr) -> Pid {
    let (named_proxy, pid) = server.accepted_via(client);
    assert_eq!(
        named_proxy,
        Some(proxy),
        "the accepted line for {client} names its proxy\n--- server log ---\n{}",
        server.log_text()
    );
    pid
}

/// Asserts the session of `client` (through `proxy`) was logged by its real client at accept
/// and at reap (the client has already closed).
fn assert_logged_as(server: &Server, client: SocketAddr, proxy: SocketAddr) {
    let pid = assert_accepted_via(server, client, proxy);
    let ending = server.wait_reaped(pid);
    assert_eq!(ending.peer, client, "the reap line of child {pid}");
}

/// Waits for a line starting `refused <peer>` (after the timestamp) that contains `reason`.
fn wait_refused(server: &Server, peer: SocketAddr, reason: &str) -> String {
    let who = format!("refused {peer}");
    let mut found = None;
    server.wait_for_log(&format!("`{who} ... {reason}`"), WAIT, |lines| {
        found = lines
            .iter()
            .find(|l| {
                LogLine::parse(l).is_some_and(|l| {
                    (l.message.starts_with(&format!("{who}:"))
                        || l.message.starts_with(&format!("{who} ")))
                        && l.message.contains(reason)
                })
            })
            .cloned();
        found.is_some()
    });
    found.unwrap()
}

/// Reads until the server closes the connection (EOF or reset) and returns what came first.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => panic!(
                "the server kept the connection open for {:?} (got {got:?})",
                s.read_timeout().ok().flatten()
            ),
            Err(e) => panic!("reading until the server closes (got {got:?} so far): {e}"),
        }
    }
}

/// Asserts the server closed `s` without writing a byte: no banner, no echo.
fn assert_refused_silently(s: &mut TcpStream, what: &str) {
    let got = read_until_closed(s);
    assert!(
        got.is_empty(),
        "{what}: expected the connection closed with nothing written, got {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Asserts the parent forked no child at all: no `-> child` line so far (call it once the
/// refusals the test caused are logged) and no child process.
fn assert_no_child_forked(server: &Server, what: &str) {
    assert_eq!(
        server.count_lines(" -> child "),
        0,
        "{what}: a child was forked\n--- server log ---\n{}",
        server.log_text()
    );
    assert!(server.children().is_empty(), "{what}: children exist");
}

// ---- Headers consumed exactly ----

/// One header a client sends, and who the server must then name as the peer.
struct Sent {
    what: &'static str,
    header: Vec<u8>,
    /// The real client the header names; None for UNKNOWN/LOCAL (the socket's own peer).
    client: Option<SocketAddr>,
}

/// The well-formed headers of each version, `n` making each client port unique in a log.
fn headers_of_version(version: u8, n: u16) -> Vec<Sent> {
    let (c4, c6) = (
        v4([203, 0, 113, 7], 40_000 + n),
        v6("2001:db8::7", 41_000 + n),
    );
    if version == 1 {
        vec![
            Sent {
                what: "v1 TCP4",
                header: v1(c4, destination_v4()),
                client: Some(c4),
            },
            Sent {
                what: "v1 TCP6",
                header: v1(c6, destination_v6()),
                client: Some(c6),
            },
            Sent {
                what: "v1 UNKNOWN",
                header: V1_UNKNOWN.to_vec(),
                client: None,
            },
        ]
    } else {
        let (t4, t6) = (
            v4([203, 0, 113, 8], 40_000 + n),
            v6("2001:db8::8", 41_000 + n),
        );
        vec![
            Sent {
                what: "v2 PROXY TCP4",
                header: v2(c4, destination_v4(), &[]),
                client: Some(c4),
            },
            Sent {
                what: "v2 PROXY TCP6",
                header: v2(c6, destination_v6(), &[]),
                client: Some(c6),
            },
            Sent {
                what: "v2 PROXY TCP4 with TLVs",
                header: v2(t4, destination_v4(), &some_tlvs()),
                client: Some(t4),
            },
            Sent {
                what: "v2 PROXY TCP6 with TLVs",
                header: v2(t6, destination_v6(), &some_tlvs()),
                client: Some(t6),
            },
            Sent {
                what: "v2 LOCAL",
                header: v2_local(),
                client: None,
            },
        ]
    }
}

/// Sends `sent`'s header and data that looks like more headers in one write, and asserts the
/// session: banner, echo of the data alone, and the log naming the real client (through the
/// proxy) at accept and reap, or the socket's peer for UNKNOWN/LOCAL.
fn assert_header_consumed(server: &Server, sent: &Sent, mode: &str) {
    let what = format!("{} on a `{mode}` listener", sent.what);
    let data = header_lookalike_data();
    let mut s = send_through_proxy(server.addr(), &sent.header, &data);
    let proxy = s.local_addr().unwrap();
    assert_echoes(&mut s, &data, &what);
    drop(s);
    match sent.client {
        Some(client) => assert_logged_as(server, client, proxy),
        None => {
            // A health check: the socket's own peer, the proxy, is the client.
            let (_, pid) = server.accepted_via(proxy);
            assert_eq!(server.wait_reaped(pid).peer, proxy, "{what}: reap line");
        }
    }
}

/// v1 headers (TCP4, TCP6, UNKNOWN) on a `v1` listener and v2 headers (PROXY over TCP4 and
/// TCP6, with and without TLVs, and LOCAL) on a `v2` listener, each followed in the same write
/// by data that looks like more headers: the client gets the banner and exactly its data back
/// (no header byte, no byte swallowed), and the log names the real client at accept (`accepted
/// <client> via <proxy> -> child`) and at reap; for UNKNOWN and LOCAL the socket's own peer.
/// Both versions again on an `any` listener.
#[test]
fn headers_of_each_version_are_consumed_exactly_and_name_the_real_client() {
    for (mode, versions) in [("v1", vec![1]), ("v2", vec![2]), ("any", vec![1, 2])] {
        let server = proxy_server(mode).start();
        for (n, version) in versions.into_iter().enumerate() {
            for sent in headers_of_version(version, n as u16) {
                assert_header_consumed(&server, &sent, mode);
            }
        }
    }
}

/// Writes the header `make` builds cut at every byte position (the first `k` bytes, a short
/// pause, then the rest with the client's data), and once a byte per write: every session is
/// served with exactly the data echoed and its real client (at `client_ip`, a port per
/// session) named.
fn assert_split_everywhere(
    server: &Server,
    client_ip: [u8; 4],
    make: impl Fn(SocketAddr) -> Vec<u8>,
    what: &str,
) {
    const PAUSE: Duration = Duration::from_millis(2);
    let data = header_lookalike_data();
    let length = make(v4(client_ip, 10_000)).len();
    // Cut positions 1..length, then `length` for the byte-by-byte case.
    for cut in 1..=length {
        // Five-digit ports: the header's length is the same for each.
        let client = v4(client_ip, 10_000 + cut as u16);
        let header = make(client);
        assert_eq!(header.len(), length);
        let mut s = connect_as_proxy(server.addr());
        let proxy = s.local_addr().unwrap();
        if cut < length {
            s.write_all(&header[..cut]).unwrap();
            thread::sleep(PAUSE);
            s.write_all(&[&header[cut..], &data[..]].concat()).unwrap();
        } else {
            for byte in &header {
                s.write_all(std::slice::from_ref(byte)).unwrap();
                thread::sleep(PAUSE);
            }
            s.write_all(&data).unwrap();
        }
        let how = if cut < length {
            format!("{what} cut after byte {cut} of {length}")
        } else {
            format!("{what} one byte per write")
        };
        assert_echoes(&mut s, &data, &how);
        assert_accepted_via(server, client, proxy);
    }
}

/// A v2 header with TLVs and a v1 header, each cut into two writes at every byte position
/// (with a pause between), and each written a byte at a time: the parent reassembles the
/// header however it arrives, and the client's data, sent right behind it, comes back whole.
#[test]
fn a_header_split_at_every_byte_is_read_whole() {
    let server = proxy_server("any").start();
    assert_split_everywhere(
        &server,
        [203, 0, 113, 20],
        |client| v2(client, destination_v4(), &some_tlvs()),
        "v2 with TLVs",
    );
    assert_split_everywhere(
        &server,
        [203, 0, 113, 21],
        |client| v1(client, destination_v4()),
        "v1 TCP4",
    );
}

// ---- The real client, downstream ----

/// Connects through the proxy as `client` (a v2 header) and returns the stream, its data sent.
fn session_of(server: &Server, client: SocketAddr) -> TcpStream {
    send_through_proxy(server.addr(), &v2(client, destination_v4(), &[]), b"")
}

/// `max_per_source = 1`, three connections from the one proxy address: the real client's
/// second session is refused (logged by its address, `max_per_source`) while its first is
/// served, and another real client behind the same proxy is served.
#[test]
fn max_per_source_counts_the_real_client_not_the_proxy() {
    let server = proxy_server("v2").args(["--max-per-source", "1"]).start();
    let (alice, alice_again) = (v4([203, 0, 113, 7], 1001), v4([203, 0, 113, 7], 1002));
    let bob = v4([203, 0, 113, 8], 1003);

    let mut first = session_of(&server, alice);
    assert_echoes_open(&mut first, b"first\n", "alice's first session");
    let mut second = session_of(&server, alice_again);
    assert_refused_silently(&mut second, "alice's second session");
    wait_refused(&server, alice_again, "max_per_source");
    let mut other = session_of(&server, bob);
    assert_echoes_open(&mut other, b"bob\n", "bob, behind the same proxy");
    // Alice's first session is still served.
    assert_eq!(echo_roundtrip(&mut first, b"still\n"), b"still\n");
    // The parent logs a fork once it returns, which may be after its child has echoed.
    server.wait_for_lines(" -> child ", 2);
    assert_eq!(server.count_lines(" -> child "), 2, "{}", server.log_text());
}

/// Reads the banner and echoes `data` on a session kept open.
fn assert_echoes_open(s: &mut TcpStream, data: &[u8], what: &str) {
    let mut banner = vec![0; BANNER.len()];
    if let Err(e) = s.read_exact(&mut banner) {
        panic!("{what}: no banner: {e}");
    }
    assert_eq!(banner, BANNER, "{what}: banner");
    assert_eq!(echo_roundtrip(s, data), data, "{what}: echo");
}

/// `allow = 203.0.113.0/24`, `deny = 203.0.113.66`: the proxy (127.0.0.1) is in neither, and
/// its clients are judged by their own addresses: 203.0.113.7 is served, 203.0.113.66 is
/// refused by the deny rule and 198.51.100.7 for being outside every allow rule, each logged by
/// the real client.
#[test]
fn allow_and_deny_judge_the_real_client() {
    let server = proxy_server("v2")
        .args(["--allow", "203.0.113.0/24", "--deny", "203.0.113.66"])
        .start();
    let (served, denied, outside) = (
        v4([203, 0, 113, 7], 2001),
        v4([203, 0, 113, 66], 2002),
        v4([198, 51, 100, 7], 2003),
    );
    let mut s = session_of(&server, served);
    assert_echoes_open(&mut s, b"allowed\n", "a client in the allow rule");
    let proxy = s.local_addr().unwrap();
    drop(s);
    assert_logged_as(&server, served, proxy);

    let mut s = session_of(&server, denied);
    assert_refused_silently(&mut s, "a client in the deny rule");
    wait_refused(&server, denied, "denied by rule 203.0.113.66/32");

    let mut s = session_of(&server, outside);
    assert_refused_silently(&mut s, "a client outside the allow rule");
    wait_refused(&server, outside, "not in any allow rule");
    assert_eq!(server.count_lines(" -> child "), 1, "{}", server.log_text());
}

/// With `trusted_proxies = ["127.0.0.2"]`, a valid header from 127.0.0.1 is refused before it
/// is read: closed with nothing written (not even the refusal message), logged as `refused
/// <addr>: not a trusted proxy (PROXY listener <addr>)`, no child. The same header from 127.0.0.2 is
/// served, and the log names 127.0.0.2 as the proxy.
#[test]
fn an_untrusted_proxy_is_refused_and_logged() {
    let server = Server::builder()
        .args(["--proxy-protocol", "v2", "--trusted-proxy", "127.0.0.2"])
        .args(["--refusal-message", "go away\\n"])
        .start();
    let client = v4([203, 0, 113, 7], 3001);
    let header = v2(client, destination_v4(), &[]);

    let mut s = connect_from(server.addr(), "127.0.0.1");
    let untrusted = s.local_addr().unwrap();
    s.write_all(&[&header[..], b"hello\n"].concat()).unwrap();
    assert_refused_silently(&mut s, "a header from an untrusted address");
    let line = wait_refused(&server, untrusted, "not a trusted proxy");
    assert!(
        line.contains(&format!("listener {})", server.addr())),
        "the refusal names the listener: {line}"
    );
    assert_no_child_forked(&server, "untrusted proxy");

    let mut s = connect_from(server.addr(), "127.0.0.2");
    let trusted = s.local_addr().unwrap();
    s.write_all(&[&header[..], b"hello\n"].concat()).unwrap();
    assert_echoes(&mut s, b"hello\n", "the same header from a trusted proxy");
    assert_logged_as(&server, client, trusted);
}

// ---- Refused headers ----

/// Sends `bytes` as the proxy (nothing after), asserts the connection is closed with nothing
/// written and the log says `refused <proxy>: PROXY header <one of reasons>`.
fn assert_header_refused(server: &Server, bytes: &[u8], reasons: &[&str], what: &str) {
    let mut s = connect_as_proxy(server.addr());
    let proxy = s.local_addr().unwrap();
    // A server that refuses while this is still being written may reset the connection.
    let _ = s.write_all(bytes);
    assert_refused_silently(&mut s, what);
    let who = format!("refused {proxy}");
    let mut found = None;
    server.wait_for_log(
        &format!("`{who}: PROXY header {reasons:?}` ({what})"),
        WAIT,
        |lines| {
            found = lines
                .iter()
                .filter_map(|l| LogLine::parse(l))
                .find(|l| l.message.starts_with(&who) && l.message.contains("PROXY header"))
                .map(|l| l.message.to_string());
            found.is_some()
        },
    );
    let line = found.unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| line.ends_with(&format!("PROXY header {r}"))),
        "{what}: refused for another reason than {reasons:?}: {line}"
    );
}

/// Garbage, a header of the other version, and v2 headers with a bad version, command, family
/// or length are refused at once (`proxy_header_timeout` is 30 s: not by the timeout), each
/// logged as `PROXY header malformed`, with nothing written and no child forked.
#[test]
fn malformed_headers_are_refused_by_reason_without_a_child() {
    let client = v4([203, 0, 113, 7], 4001);
    let addresses = v2_addresses(client, destination_v4());
    let v2_cases: Vec<(&str, Vec<u8>)> = vec![
        ("HTTP, no header", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ("a v1 header on a v2 listener", v1(client, destination_v4())),
        ("v2 with version 1", v2_raw(0x11, TCP_OVER_IPV4, &addresses)),
        (
            "v2 with command 0xF",
            v2_raw(0x2F, TCP_OVER_IPV4, &addresses),
        ),
        ("v2 with family 0x4", v2_raw(V2_PROXY, 0x41, &addresses)),
        (
            "v2 TCP4 with a length shorter than its addresses",
            v2_raw(V2_PROXY, TCP_OVER_IPV4, &addresses[..4]),
        ),
        (
            "the v2 signature, wrong from its 8th byte",
            b"\r\n\r\n\0\r\nQUIZ\n\x21\x11\x00\x0c".to_vec(),
        ),
    ];
    let v1_cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a v2 header on a v1 listener",
            v2(client, destination_v4(), &[]),
        ),
        (
            "v1 with an invalid address",
            b"PROXY TCP4 203.0.113.300 198.51.100.1 4001 2334\r\n".to_vec(),
        ),
        (
            "v1 with an unknown protocol",
            b"PROXY TCP5 203.0.113.7 198.51.100.1 4001 2334\r\n".to_vec(),
        ),
        (
            "v1 with a port out of range",
            b"PROXY TCP4 203.0.113.7 198.51.100.1 70000 2334\r\n".to_vec(),
        ),
    ];
    for (mode, cases) in [("v2", v2_cases), ("v1", v1_cases)] {
        let server = proxy_server(mode)
            .args(["--proxy-header-timeout", "30"])
            .start();
        for (what, bytes) in &cases {
            assert_header_refused(&server, bytes, &["malformed"], what);
        }
        assert_no_child_forked(&server, mode);
        assert_serves_through_proxy(&server, mode, "after the malformed headers");
    }
}

/// A line that starts as a v1 header does but has already shown it cannot be one (ended by a
/// bare LF, a CR followed by something else, a NUL) is refused as malformed at once, not held
/// until `proxy_header_timeout` (30 s here) and refused as late.
#[test]
fn a_v1_line_that_cannot_be_a_header_is_refused_at_once() {
    let server = proxy_server("v1")
        .args(["--proxy-header-timeout", "30"])
        .start();
    let cases: [(&str, &[u8]); 3] = [
        (
            "v1 ended by a bare LF",
            b"PROXY TCP4 203.0.113.7 198.51.100.1 4001 2334\n",
        ),
        (
            "v1 with a CR then a space",
            b"PROXY TCP4 203.0.113.7 198.51.100.1 4001 2334\r ",
        ),
        ("`PROXY ` then a NUL", b"PROXY \0TCP4"),
    ];
    for (what, bytes) in cases {
        assert_header_refused(&server, bytes, &["malformed"], what);
    }
}

/// Asserts a fresh client with a good header (v1 on a `v1` listener, else v2) is served.
fn assert_serves_through_proxy(server: &Server, mode: &str, what: &str) {
    let (client, destination) = (v4([192, 0, 2, 77], 7777), destination_v4());
    let header = match mode {
        "v1" => v1(client, destination),
        _ => v2(client, destination, &[]),
    };
    let mut s = send_through_proxy(server.addr(), &header, b"still here\n");
    assert_echoes(&mut s, b"still here\n", what);
}

/// More than 2048 bytes without a complete header is refused as `PROXY header too long`, not
/// left to the (30 s) timeout: a v2 header announcing 4,000 bytes of TLVs of which 2,100 came,
/// and a complete one of 2,116 bytes. A v1 line over 2,048 bytes without a CRLF is refused as
/// malformed or too long (v1 lines are at most 107 bytes).
#[test]
fn headers_over_the_cap_are_refused_as_too_long() {
    let server = proxy_server("any")
        .args(["--proxy-header-timeout", "30"])
        .start();
    let client = v4([203, 0, 113, 7], 5001);
    let started = Instant::now();

    let mut announced = v2(client, destination_v4(), &[tlv(PP2_TYPE_NOOP, &[0; 4000])]);
    announced.truncate(2100);
    assert_header_refused(
        &server,
        &announced,
        &["too long"],
        "v2: 2,100 of 4,016 bytes",
    );

    let complete = v2(client, destination_v4(), &[tlv(PP2_TYPE_NOOP, &[0; 2085])]);
    assert_eq!(complete.len(), 2116);
    assert_header_refused(
        &server,
        &complete,
        &["too long"],
        "v2: 2,116 bytes, complete",
    );

    let mut line = b"PROXY TCP4 ".to_vec();
    line.resize(HEADER_CAP + 100, b'1');
    assert_header_refused(
        &server,
        &line,
        &["malformed", "too long"],
        "v1 without CRLF",
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused by the timeout, not the cap"
    );
    assert_no_child_forked(&server, "oversized headers");
    assert_serves_through_proxy(&server, "any", "after the oversized headers");
}

/// `proxy_header_timeout = 0.5`: a proxy that sends nothing, part of a v2 header, or part of a
/// v1 line is refused once the half second has passed (not before), logged as `PROXY header
/// timeout`, with nothing written and no child.
#[test]
fn a_header_that_never_completes_is_refused_at_the_timeout() {
    let server = proxy_server("any")
        .args(["--proxy-header-timeout", "0.5"])
        .start();
    let full = v2(v4([203, 0, 113, 7], 6001), destination_v4(), &[]);
    let partial: [(&str, &[u8]); 3] = [
        ("nothing", b""),
        ("20 of 28 bytes of a v2 header", &full[..20]),
        ("part of a v1 line", b"PROXY TCP4 203.0."),
    ];
    let clients: Vec<(&str, Instant, TcpStream)> = partial
        .iter()
        .map(|(what, bytes)| {
            let started = Instant::now();
            let mut s = connect_as_proxy(server.addr());
            s.write_all(bytes).unwrap();
            (*what, started, s)
        })
        .collect();
    for (what, started, mut s) in clients {
        let proxy = s.local_addr().unwrap();
        assert_refused_silently(&mut s, what);
        let waited = started.elapsed();
        report(&format!("{what}: refused after {waited:?}"));
        assert!(
            waited >= Duration::from_millis(450),
            "{what}: refused after {waited:?}, before the 0.5 s timeout"
        );
        wait_refused(&server, proxy, TIMEOUT_REASON);
    }
    assert_no_child_forked(&server, "late headers");
}

/// A balancer that closes its side in the middle of a header is refused as soon as its close
/// arrives (`cut short`), not after `proxy_header_timeout`: its place in the table is free at
/// once.
#[test]
fn a_header_cut_short_by_a_close_is_refused_at_once() {
    let server = proxy_server("any")
        .args(["--proxy-header-timeout", "30"])
        .start();
    let full = v2(v4([203, 0, 113, 7], 6001), destination_v4(), &[]);
    for (what, bytes) in [
        ("20 of 28 bytes of a v2 header", &full[..20]),
        ("part of a v1 line", &b"PROXY TCP4 203.0."[..]),
    ] {
        let mut s = connect_as_proxy(server.addr());
        let proxy = s.local_addr().unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let started = Instant::now();
        assert_refused_silently(&mut s, what);
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(10),
            "{what}: refused after {waited:?}"
        );
        wait_refused(&server, proxy, "PROXY header cut short");
    }
    assert_no_child_forked(&server, "headers cut short");
}

// ---- Exec mode ----

/// `--proxy-protocol v2 -- sh -c env`: the program sees the real client in TCPREMOTEIP/PORT and
/// REMOTE_ADDR/PORT, the destination the header names in TCPLOCALIP/PORT, and the proxy in
/// TCPPROXYIP/PORT. Through a LOCAL header the socket's own addresses (TCPPROXY*, if set, name
/// the balancer as well).
#[test]
fn exec_mode_sees_the_real_client_and_the_proxy() {
    let server = exec_server(
        &["--proxy-protocol", "v2", "--trusted-proxy", PROXY_IP],
        &["sh", "-c", "env"],
    )
    .start();
    let (client, destination) = (v4([203, 0, 113, 7], 5555), destination_v4());
    let mut s = send_through_proxy(server.addr(), &v2(client, destination, &[]), b"");
    let proxy = s.local_addr().unwrap();
    let env = printed_environment(&mut s);
    let expected = [
        ("TCPREMOTEIP", "203.0.113.7".to_string()),
        ("TCPREMOTEPORT", "5555".to_string()),
        ("REMOTE_ADDR", "203.0.113.7".to_string()),
        ("REMOTE_PORT", "5555".to_string()),
        ("TCPLOCALIP", "198.51.100.1".to_string()),
        ("TCPLOCALPORT", "2334".to_string()),
        ("TCPPROXYIP", "127.0.0.1".to_string()),
        ("TCPPROXYPORT", proxy.port().to_string()),
    ];
    for (key, value) in &expected {
        assert_eq!(
            env.get(*key),
            Some(value),
            "{key} through a PROXY header; environment: {env:#?}"
        );
    }
    assert_accepted_via(&server, client, proxy);

    let mut s = send_through_proxy(server.addr(), &v2_local(), b"");
    let (local_peer, listener) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
    let env = printed_environment(&mut s);
    let expected = [
        ("TCPREMOTEIP", local_peer.ip().to_string()),
        ("TCPREMOTEPORT", local_peer.port().to_string()),
        ("TCPLOCALIP", listener.ip().to_string()),
        ("TCPLOCALPORT", listener.port().to_string()),
    ];
    for (key, value) in &expected {
        assert_eq!(env.get(*key), Some(value), "{key} through LOCAL: {env:#?}");
    }
    // The balancer speaks for itself: if named as the proxy too, it is the same address.
    for (key, value) in [
        ("TCPPROXYIP", local_peer.ip().to_string()),
        ("TCPPROXYPORT", local_peer.port().to_string()),
    ] {
        if let Some(set) = env.get(key) {
            assert_eq!(set, &value, "{key} through LOCAL: {env:#?}");
        }
    }
}

/// What `env` printed on the connection, as a map (read to EOF).
fn printed_environment(s: &mut TcpStream) -> std::collections::BTreeMap<String, String> {
    let printed = read_until_closed(s);
    String::from_utf8_lossy(&printed)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---- Listeners ----

/// Two ports nobody listens on now, distinct (both bound at once, then released).
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// A config with a plain listener and a PROXY v2 one, each at a known port.
fn plain_and_proxy_config(plain: u16, proxied: u16, extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:{plain}\"]\n{extra}\n\
         [[listener]]\naddress = \"127.0.0.1:{proxied}\"\nproxy_protocol = \"v2\"\n\
         trusted_proxies = [\"127.0.0.1\"]\n"
    )
}

/// `listen` plus a `[[listener]]` table with `proxy_protocol = "v2"`: the plain listener
/// serves without a header and echoes a header sent to it as data (a header is configuration,
/// never guessed); the PROXY one serves a client with a header, naming it, and refuses one
/// without as malformed.
#[test]
fn a_plain_and_a_proxy_listener_side_by_side() {
    let (plain, proxied) = two_free_ports();
    let server = Server::builder()
        .config(&plain_and_proxy_config(plain, proxied, ""))
        .listeners(2)
        .start();
    let (plain, proxied) = (v4([127, 0, 0, 1], plain), v4([127, 0, 0, 1], proxied));

    let mut s = connect(plain);
    expect_banner(&mut s);
    let header = v2(v4([203, 0, 113, 7], 7001), destination_v4(), &[]);
    assert_eq!(
        echo_roundtrip(&mut s, &header),
        header,
        "a header sent to the plain listener is data"
    );
    drop(s);

    let client = v4([203, 0, 113, 7], 7002);
    let mut s = send_through_proxy(proxied, &v2(client, destination_v4(), &[]), b"hi\n");
    let proxy = s.local_addr().unwrap();
    assert_echoes(&mut s, b"hi\n", "the PROXY listener");
    assert_accepted_via(&server, client, proxy);

    let mut s = connect_as_proxy(proxied);
    let proxy = s.local_addr().unwrap();
    s.write_all(b"no header here, just data\n").unwrap();
    assert_refused_silently(&mut s, "no header on the PROXY listener");
    wait_refused(&server, proxy, "PROXY header malformed");
}

/// 1,100 connections to a PROXY listener that send nothing, more than the 1,024 that may wait
/// for a header at once, with `proxy_header_timeout = 1`: meanwhile the plain listener serves
/// promptly; every one of the 1,100 is refused at its timeout (none before it, all within a few
/// timeouts: the ones beyond the table wait in the backlog for a place), each logged as refused
/// by `proxy_header_timeout`, none forks a child; then the PROXY listener serves again.
#[test]
fn more_silent_connections_than_the_table_holds_time_out_while_the_plain_listener_serves() {
    const SILENT: usize = 1100;
    raise_own_nofile(SILENT as u64 + 200);
    let (plain, proxied) = two_free_ports();
    let server = Server::builder()
        .config(&plain_and_proxy_config(
            plain,
            proxied,
            "proxy_header_timeout = 1\nbacklog = 4096\nlog_level = \"info\"",
        ))
        .listeners(2)
        .start();
    let (plain, proxied) = (v4([127, 0, 0, 1], plain), v4([127, 0, 0, 1], proxied));

    let started = Instant::now();
    let mut silent: Vec<TcpStream> = (0..SILENT).map(|_| connect_as_proxy(proxied)).collect();
    let connected = started.elapsed();
    // The plain listener serves while the table is full.
    let mut plain_sessions = 0;
    while started.elapsed() < Duration::from_millis(800) {
        let t = Instant::now();
        let mut s = connect(plain);
        expect_banner(&mut s);
        assert_eq!(echo_roundtrip(&mut s, b"plain\n"), b"plain\n");
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "a plain session took {took:?} while PROXY connections waited"
        );
        plain_sessions += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let mut first_refusal = None;
    for (i, s) in silent.iter_mut().enumerate() {
        assert_refused_silently(s, &format!("silent connection {i}"));
        first_refusal.get_or_insert_with(|| started.elapsed());
    }
    let all_refused = started.elapsed();
    report(&format!(
        "{SILENT} silent connections: connected in {connected:?}, the first refused at \
         {first_refusal:?}, all by {all_refused:?}; {plain_sessions} plain sessions meanwhile"
    ));
    assert!(
        first_refusal.unwrap() >= Duration::from_millis(950),
        "refused before the 1 s timeout: {first_refusal:?}"
    );
    // Every one refused, and by its timeout: none for another reason (a full table pauses
    // accepting rather than refusing what it cannot hold).
    server.wait_for_lines("refused ", SILENT);
    assert_eq!(
        server.count_lines(TIMEOUT_REASON),
        SILENT,
        "refusals other than by the timeout: {:?}",
        server
            .log_lines()
            .iter()
            .filter(|l| l.contains("refused ") && !l.contains(TIMEOUT_REASON))
            .take(3)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        server.count_lines(" -> child "),
        plain_sessions,
        "only the plain sessions forked"
    );
    let client = v4([203, 0, 113, 9], 8001);
    let mut s = send_through_proxy(proxied, &v2(client, destination_v4(), &[]), b"after\n");
    assert_echoes(&mut s, b"after\n", "the PROXY listener after the timeouts");
}

// ---- Fuzz ----

/// What forkecho must do with a generated header.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A whole, valid header of `len` bytes, then data: served, the data echoed.
    Served(usize),
    /// A valid header cut short, then nothing but the client's half-close: refused, no child.
    /// (Data after it could complete a v2 header, whose length is known from its 16th byte.)
    Refused,
    /// Either is right (a mutated header may still be valid), but nothing else.
    Either,
}

/// A valid header of either version, for any family (v2 families other than TCP are served
/// with the socket's addresses), with random addresses, ports and TLVs.
fn valid_header() -> impl Strategy<Value = Vec<u8>> {
    let v4_pair = (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(a, b, p, q)| (v4(a, p), v4(b, q)));
    let v6_pair = (
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(a, b, p, q)| {
            (
                SocketAddr::from((Ipv6Addr::from(a), p)),
                SocketAddr::from((Ipv6Addr::from(b), q)),
            )
        });
    let pair = prop_oneof![v4_pair, v6_pair];
    let tlvs = prop::collection::vec(
        // Any type but CRC32C (0x03), whose value a receiver may check.
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(k, v)| tlv(if k == 0x03 { PP2_TYPE_CUSTOM } else { k }, &v)),
        0..4,
    );
    // Any family and protocol ppp-style parsers accept, with the address block its size says.
    let other_family = prop::sample::select(vec![
        (0x00u8, 0usize),
        (0x12, 12),
        (0x22, 36),
        (0x31, 216),
        (0x32, 216),
        (0x10, 12),
        (0x20, 36),
    ]);
    prop_oneof![
        pair.clone().prop_map(|(c, d)| v1(c, d)),
        Just(V1_UNKNOWN.to_vec()),
        (pair, tlvs.clone()).prop_map(|((c, d), t)| v2(c, d, &t)),
        Just(v2_local()),
        (other_family, tlvs, any::<u8>()).prop_map(|((family, size), t, fill)| {
            let mut body = vec![fill; size];
            body.extend(t.concat());
            v2_raw(V2_PROXY, family, &body)
        }),
    ]
}

/// Generated inputs with what each must do: valid headers, the same cut short, the same with
/// one byte changed, garbage (arbitrary bytes, or the v2 signature or `PROXY ` then garbage).
/// The client sends data after each but the cut-short ones.
fn header_case() -> impl Strategy<Value = (Vec<u8>, Expect)> {
    let garbage = prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        valid_header().prop_map(|h| {
            let len = h.len();
            (h, Expect::Served(len))
        }),
        (valid_header(), any::<prop::sample::Index>())
            .prop_map(|(h, cut)| (h[..cut.index(h.len())].to_vec(), Expect::Refused)),
        (valid_header(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut h, at, b)| {
            let at = at.index(h.len());
            h[at] ^= b | 1;
            (h, Expect::Either)
        }),
        garbage.clone().prop_map(|g| (g, Expect::Either)),
        garbage
            .clone()
            .prop_map(|g| ([&V2_SIGNATURE[..], &g].concat(), Expect::Either)),
        garbage.prop_map(|g| ([&b"PROXY "[..], &g].concat(), Expect::Either)),
    ]
}

/// 64 generated headers, each followed by some data and a half-close, on an `any` listener:
/// a valid header is served with exactly the data after it echoed; a cut-short one is refused;
/// whatever else is either served (and then what comes back is the end of what was sent) or
/// refused with nothing written, and only served ones fork (one `-> child` line each). The
/// server never panics and still serves a good client at the end.
#[test]
fn fuzz_generated_headers_are_served_or_refused_never_a_panic() {
    let mut server = proxy_server("any")
        .args(["--proxy-header-timeout", "1", "--max-per-source", "0"])
        .start();
    let served = Mutex::new(0usize);
    let tally = Mutex::new([0usize; 2]);
    fuzz(64, header_case(), |(header, expect)| {
        // No CRLF: it never completes a v1 line.
        let data: &[u8] = match expect {
            Expect::Refused => b"",
            _ => b"data after the header\n",
        };
        let sent = [&header[..], data].concat();
        let mut s = connect_as_proxy(server.addr());
        // A refusal while this is written may reset the connection.
        let _ = s.write_all(&sent);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let got = read_until_closed(&mut s);
        let was_served = got.starts_with(BANNER);
        match expect {
            Expect::Served(len) => assert_eq!(
                got,
                [BANNER, &sent[len..]].concat(),
                "valid header {header:?}"
            ),
            Expect::Refused => assert!(got.is_empty(), "incomplete {header:?}: got {got:?}"),
            Expect::Either if was_served => assert!(
                sent.ends_with(&got[BANNER.len()..]),
                "served {header:?}: got back {got:?}, not the end of what was sent"
            ),
            Expect::Either => assert!(got.is_empty(), "refused {header:?}: got {got:?}"),
        }
        if was_served {
            *served.lock().unwrap() += 1;
        }
        tally.lock().unwrap()[usize::from(was_served)] += 1;
    });
    let served = *served.lock().unwrap();
    server.assert_line_count(" -> child ", served, "one child per served case");
    assert!(
        !server.log_text().contains("panicked"),
        "{}",
        server.log_text()
    );
    assert!(server.is_running(), "the server exited");
    assert_serves_through_proxy(&server, "any", "after the fuzz");
    let [refused, served] = *tally.lock().unwrap();
    report(&format!(
        "PROXY header fuzz: {served} cases served, {refused} refused"
    ));
}

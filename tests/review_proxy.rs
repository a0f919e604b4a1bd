//! Adversarial review of the PROXY protocol change: each test shows one defect a user sees
//! (a spinning or hanging parent, a listener with the wrong policy, a balancer trusted where
//! it should not be, plain clients starved of descriptors). They fail until it is fixed.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::*;

/// A v1 header naming `client` (IPv4) as the one who connected to 192.0.2.1:2333.
fn v1_header(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 192.0.2.1 {port} 2333\r\n").into_bytes()
}

/// Bytes received but not yet read on the server's end of the connection `client` opened to
/// `server` (the `rx_queue` of /proc/net/tcp), or None while there is no such socket.
fn server_rx_queue(server: SocketAddr, client: &TcpStream) -> Option<u64> {
    let local = proc_address(server);
    let remote = proc_address(client.local_addr().unwrap());
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let ours = fields.get(1)?.eq_ignore_ascii_case(&local)
            && fields.get(2)?.eq_ignore_ascii_case(&remote);
        let (_, rx) = fields.get(4)?.split_once(':')?;
        ours.then(|| u64::from_str_radix(rx, 16).ok()).flatten()
    })
}

fn proc_address(addr: SocketAddr) -> String {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let o = v4.ip().octets();
    format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        v4.port()
    )
}

/// Waits until the server has read exactly what `client` sent so far (the header).
fn wait_until_read(server: SocketAddr, client: &TcpStream, what: &str) {
    assert!(
        wait_until(WAIT, || server_rx_queue(server, client) == Some(0)),
        "{what}: the server never read it"
    );
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

/// A server with one PROXY v1 listener trusting loopback and room for one session, with one
/// session running (client 203.0.113.7) and one connection whose whole header (client
/// 203.0.113.8) has been consumed, waiting for room. Returns (server, session, waiting).
fn one_session_and_one_header_waiting(extra: &[&str]) -> (Server, TcpStream, TcpStream) {
    let server = Server::builder()
        .args([
            "--proxy-protocol",
            "v1",
            "--trusted-proxy",
            "127.0.0.1",
            "--max-children",
            "1",
            "--proxy-header-timeout",
            "60",
        ])
        .args(extra.iter().copied())
        .start();
    let addr = server.addr();
    // Accepted while there is room (at max_children the listener leaves the poll set).
    let mut waiting = connect(addr);
    wait_awaiting(&server, 1);
    let mut session = connect(addr);
    session.write_all(&v1_header("203.0.113.7", 5555)).unwrap();
    expect_banner(&mut session);
    server.wait_for_line("accepted 203.0.113.7:5555 via");
    waiting.write_all(&v1_header("203.0.113.8", 5556)).unwrap();
    wait_until_read(addr, &waiting, "the second header");
    (server, session, waiting)
}

/// At max_children, a connection whose header is taken waits for room. Its client may send
/// (or close) meanwhile: the parent must not wake up for nothing in a loop. Today the entry's
/// `readable` flag is set by the new edge and never cleared once the header is taken
/// (`serve_headers` only reads entries without a header), so `next_wakeup` returns zero
/// until a session ends: 100% CPU.
#[test]
fn a_header_waiting_for_room_does_not_spin_the_parent_when_its_client_sends() {
    let (server, session, mut waiting) = one_session_and_one_header_waiting(&[]);
    let addr = server.addr();
    waiting.write_all(b"x").unwrap();
    assert!(wait_until(WAIT, || server_rx_queue(addr, &waiting) == Some(1)));

    let before = cpu_ticks_of(server.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks_of(server.pid()) - before;
    assert!(
        used * 5 < ticks_per_second(),
        "the parent used {used} ticks of CPU in one second, idle, waiting for room \
         ({} per second)",
        ticks_per_second()
    );

    // And the client's byte is still there for its session.
    drop(session);
    expect_banner(&mut waiting);
    assert_eq!(read_exactly(&mut waiting, 1), b"x");
}

/// Smart shutdown whose `shutdown_timeout` passes while a connection with a whole header waits
/// for room: the sessions are ended, and the server must then exit. Today the waiting entry
/// is never decided once the phase is Terminating/Killing (`room_for_a_session` is false,
/// nothing closes it, it has no deadline), and `finished()` waits for the table to be empty:
/// the server runs forever with no child.
#[test]
fn smart_shutdown_past_its_timeout_exits_with_a_header_waiting_for_room() {
    let (mut server, _session, _waiting) =
        one_session_and_one_header_waiting(&["--shutdown-timeout", "1", "--kill-timeout", "1"]);
    server.signal(Signal::SIGTERM);
    // 1 s to drain, then SIGTERM to the session (which the echo obeys at once), 1 s more at
    // most before SIGKILL: well within 10 s.
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

/// `listen` on port 0 beside a `[[listener]]` on port 0 with PROXY on: two listeners, and
/// only the table's expects a header. Today `proxy_policy` matches a listener by its
/// configured address, `127.0.0.1:0` for both, so the plain one refuses every client as
/// "not a trusted proxy".
#[test]
fn a_plain_listener_on_port_0_beside_a_proxy_listener_on_port_0_stays_plain() {
    let server = Server::builder()
        .config(
            "listen = [\"127.0.0.1:0\"]\n\
             [[listener]]\n\
             address = \"127.0.0.1:0\"\n\
             proxy_protocol = \"v1\"\n\
             trusted_proxies = [\"10.9.9.9\"]\n",
        )
        .listeners(2)
        .start();
    assert_eq!(server.addrs.len(), 2, "{:?}", server.addrs);
    let greeted: Vec<bool> = server
        .addrs
        .iter()
        .map(|&addr| {
            let mut s = connect(addr);
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut banner = [0u8; 1];
            matches!(std::io::Read::read(&mut s, &mut banner), Ok(1))
        })
        .collect();
    assert_eq!(
        greeted.iter().filter(|&&g| g).count(),
        1,
        "exactly one listener (the plain one) greets a plain client: {greeted:?}\n{}",
        server.log_text()
    );
}

/// Sockets passed by systemd follow the top-level `proxy_protocol` and `trusted_proxies`
/// (the spec, and `Config::proxy_policy`'s own doc). Today they take the policy of the first
/// PROXY address in the merged list, which, when `listen` is not given, is the first
/// `[[listener]]` table's: a peer the top level does not trust may send a header and be
/// believed, so it can name any client (past `deny`, `max_per_source`, the logs).
#[test]
fn a_systemd_socket_trusts_only_the_top_level_trusted_proxies() {
    let dir = TempDir::new();
    let config = dir.path().join("forkecho.toml");
    std::fs::write(
        &config,
        "proxy_protocol = \"v1\"\n\
         trusted_proxies = [\"10.9.9.9\"]\n\
         [[listener]]\n\
         address = \"127.0.0.1:1\"\n\
         trusted_proxies = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let passed = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = passed.local_addr().unwrap();
    let fd = passed.as_raw_fd();
    let server = Server::builder()
        .program("sh")
        .args([
            "-c",
            "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"",
            BIN,
            "-c",
            config.to_str().unwrap(),
        ])
        .tweak(move |cmd| {
            // Safe: dup2 and fcntl are async-signal-safe; the descriptor is open in the
            // parent. As fd 3 already (dup2 would leave it close-on-exec), only clear the flag.
            unsafe {
                cmd.pre_exec(move || {
                    let done = match fd {
                        3 => libc::fcntl(3, libc::F_SETFD, 0) == 0,
                        _ => libc::dup2(fd, 3) == 3,
                    };
                    match done {
                        true => Ok(()),
                        false => Err(std::io::Error::last_os_error()),
                    }
                });
            }
        })
        .start();
    drop(passed);
    server.wait_for_line("passed by systemd");

    // From 127.0.0.1, which only the table trusts, naming a client it is not.
    let mut spoofer = connect(addr);
    spoofer.write_all(&v1_header("203.0.113.7", 5555)).unwrap();
    server.wait_for_log("the spoofer refused or accepted", WAIT, |lines| {
        lines
            .iter()
            .any(|l| l.contains("refused 127.0.0.1:") || l.contains("accepted 203.0.113.7"))
    });
    assert_eq!(
        server.count_lines("accepted 203.0.113.7"),
        0,
        "a peer outside the top-level trusted_proxies named the client\n{}",
        server.log_text()
    );
}

/// The number of connections the status line says wait for a header.
fn awaiting(server: &Server) -> u64 {
    let line = server.status_line();
    let (before, _) = line
        .split_once(" awaiting a PROXY header")
        .expect("status line names the connections awaiting a header");
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The table of connections awaiting a header holds up to 1024 descriptors, whatever the
/// parent's RLIMIT_NOFILE (1024 by default under systemd): a balancer whose connections are
/// slow to send their header uses up the parent's descriptors, and accepting stops on every
/// listener, the plain ones too, until their headers time out. The table should stay well
/// under the descriptor limit, so that other listeners keep being served.
#[test]
fn slow_headers_do_not_take_the_descriptors_plain_clients_need() {
    let (plain, proxied) = (free_port(), free_port());
    let server = Server::builder()
        .config(&format!(
            "listen = [\"127.0.0.1:{plain}\"]\n\
             proxy_header_timeout = 60\n\
             [[listener]]\n\
             address = \"127.0.0.1:{proxied}\"\n\
             proxy_protocol = \"v2\"\n\
             trusted_proxies = [\"127.0.0.1\"]\n"
        ))
        .listeners(2)
        .tweak(|cmd| {
            // Safe: setrlimit is async-signal-safe. As under systemd, where the soft limit is
            // 1024: the table's 1024 would be all of it.
            unsafe {
                cmd.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: 128,
                        rlim_max: 128,
                    };
                    match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error()),
                    }
                });
            }
        })
        .start();
    let proxied: SocketAddr = format!("127.0.0.1:{proxied}").parse().unwrap();
    let slow: Vec<TcpStream> = (0..150).map(|_| connect(proxied)).collect();
    assert!(
        wait_until(WAIT, || awaiting(&server) >= 30),
        "{}",
        server.log_text()
    );
    let plain: SocketAddr = format!("127.0.0.1:{plain}").parse().unwrap();
    let mut client = connect(plain);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut banner = vec![0u8; BANNER.len()];
    let got = std::io::Read::read_exact(&mut client, &mut banner);
    assert!(
        got.is_ok() && banner == BANNER,
        "a plain client was not served while {} connections waited for a header: {got:?}\n{}",
        slow.len(),
        server.log_text()
    );
}

/// At max_children a proxied connection whose header is whole waits for room, like a plain
/// client in the backlog; when a session ends, the one that has waited longest should get
/// the slot. Today `accept_ready` runs before `serve_headers` each turn, so a plain client
/// that arrived later takes every freed slot: under steady load on a server with both kinds
/// of listener, proxied clients are never served (and nothing times them out).
#[test]
fn a_header_waiting_for_room_is_not_overtaken_by_later_plain_clients() {
    let (plain, proxied) = (free_port(), free_port());
    let server = Server::builder()
        .config(&format!(
            "listen = [\"127.0.0.1:{plain}\"]\n\
             max_children = 1\n\
             proxy_header_timeout = 60\n\
             [[listener]]\n\
             address = \"127.0.0.1:{proxied}\"\n\
             proxy_protocol = \"v1\"\n\
             trusted_proxies = [\"127.0.0.1\"]\n"
        ))
        .listeners(2)
        .start();
    let plain: SocketAddr = format!("127.0.0.1:{plain}").parse().unwrap();
    let proxied: SocketAddr = format!("127.0.0.1:{proxied}").parse().unwrap();
    let mut waiting = connect(proxied);
    wait_awaiting(&server, 1);
    let session = connect(plain);
    server.wait_for_line("max_children reached");
    waiting.write_all(&v1_header("203.0.113.9", 5555)).unwrap();
    wait_until_read(proxied, &waiting, "the header");
    // Arrives after the header was whole: queued in the backlog.
    let _later = connect(plain);

    drop(session);
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut banner = vec![0u8; BANNER.len()];
    let got = std::io::Read::read_exact(&mut waiting, &mut banner);
    assert!(
        got.is_ok(),
        "the proxied client, waiting longest, did not get the freed slot: {got:?}\n{}",
        server.log_text()
    );
}

/// A v1 line that has ended (CRLF) but is not a header is malformed at once. Today `ppp`
/// calls `PROXY TCP4 1.2.3.4\r\n` incomplete (a missing port), and the connection waits the
/// whole `proxy_header_timeout`, then is counted as late rather than malformed.
#[test]
fn an_ended_v1_line_missing_its_ports_is_refused_as_malformed_at_once() {
    let server = Server::builder()
        .args([
            "--proxy-protocol",
            "any",
            "--trusted-proxy",
            "127.0.0.1",
            "--proxy-header-timeout",
            "30",
        ])
        .start();
    let mut balancer = connect(server.addr());
    balancer.write_all(b"PROXY TCP4 1.2.3.4\r\n").unwrap();
    let refused = wait_until(Duration::from_secs(5), || {
        server.count_lines("PROXY header malformed") == 1
    });
    assert!(refused, "not refused as malformed\n{}", server.log_text());
}

/// A balancer that closes its side half-way through a header will send no more: the
/// connection is refused as cut short at once. Today only a close before any byte is seen as
/// one (`got == 0`); with a partial header the connection waits out `proxy_header_timeout`.
#[test]
fn a_header_cut_short_by_the_balancer_closing_is_refused_at_once() {
    let server = Server::builder()
        .args([
            "--proxy-protocol",
            "v1",
            "--trusted-proxy",
            "127.0.0.1",
            "--proxy-header-timeout",
            "30",
        ])
        .start();
    let mut balancer = connect(server.addr());
    balancer.write_all(b"PROXY TCP4 203.0.113.7 ").unwrap();
    balancer.shutdown(std::net::Shutdown::Write).unwrap();
    let refused = wait_until(Duration::from_secs(5), || {
        server.count_lines("refused 127.0.0.1:") == 1
    });
    assert!(
        refused && server.count_lines("not received in time") == 0,
        "a header the balancer cut short waited for the timeout\n{}",
        server.log_text()
    );
}

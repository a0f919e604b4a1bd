//! Adversarial review of 2b1a86d ("an echo child took 20 page faults"): the echo buffer in
//! `lean_fork::ChildMemory` (a private mapping made once in the parent, never written by it),
//! `echo::heap_buffer()` for a plain-fork child, no stdout flush in `spawn::exit_child`, the
//! child's path in `.text.hot.forkecho_child`, and the echo's socket calls made to libc
//! directly. Each test says PROBE (a behaviour that must hold) or DEFECT.

use crate::util::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

fn quiet(args: &[&str]) -> Server {
    Server::builder()
        .env("RUST_LOG", "info")
        .args(args.iter().map(|s| s.to_string()))
        .start()
}

/// Writes `data` from a second handle while this one reads everything back until EOF
/// (after the writer half-closes): the client never blocks the echo.
fn stream_through(s: &TcpStream, data: &[u8]) -> Vec<u8> {
    let mut writer = s.try_clone().unwrap();
    let sent = data.to_vec();
    let w = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = s.try_clone().unwrap();
    let mut got = Vec::with_capacity(data.len());
    reader.read_to_end(&mut got).expect("read to EOF");
    w.join().unwrap();
    got
}

/// Waits for EOF or a reset within `limit`; panics if data or nothing comes.
fn closed_within(s: &mut impl Read, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(n) => panic!("unexpected {n} bytes: {:?}", &buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("no EOF after {:?} (limit {limit:?}): {e}", start.elapsed()),
        }
        assert!(start.elapsed() < limit, "no EOF within {limit:?}");
    }
}

// ---- The buffer: never shared, never aliased ----

/// PROBE. 32 concurrent sessions each echo their own pseudo-random bytes (request/response
/// rounds of about a buffer and a half, then a 600 KiB stream, half-closed): every byte
/// comes back to its own client in order, and each child exits 0 (client closed).
#[test]
fn concurrent_sessions_echo_only_their_own_bytes() {
    const CLIENTS: usize = 32;
    let server = quiet(&["--max-per-source", "0"]);
    let addr = server.addr();
    let go = Arc::new(std::sync::Barrier::new(CLIENTS));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let go = Arc::clone(&go);
            thread::spawn(move || -> Result<SocketAddr, String> {
                let mut s = connect(addr);
                expect_banner(&mut s);
                go.wait();
                let mut noise = Noise::new(1000 + i as u64);
                for round in 0..4 {
                    let data = noise.bytes(190 * 1024 + 37 * i + round);
                    s.write_all(&data).map_err(|e| format!("{i}: write: {e}"))?;
                    let mut back = vec![0u8; data.len()];
                    s.read_exact(&mut back)
                        .map_err(|e| format!("{i}: read: {e}"))?;
                    if back != data {
                        let at = back.iter().zip(&data).position(|(a, b)| a != b);
                        return Err(format!("client {i} round {round}: differs at {at:?}"));
                    }
                }
                let data = noise.bytes(600 * 1024 + i);
                let got = stream_through(&s, &data);
                if got != data {
                    return Err(format!(
                        "client {i} stream: {} of {} bytes, first difference at {:?}",
                        got.len(),
                        data.len(),
                        got.iter().zip(&data).position(|(a, b)| a != b)
                    ));
                }
                Ok(s.local_addr().unwrap())
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{failures:#?}");
    for client in results.into_iter().flatten() {
        server.wait_child_exited_with(client, 0, "client closed");
    }
}

/// The echo buffer's mapping (buffer, guard page, stack: `lean_fork::ChildMemory`) in the
/// maps of `pid`: (buffer start, buffer end, stack start, stack end).
fn child_memory_of(pid: Pid) -> Option<(u64, u64, u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let vmas: Vec<(u64, u64, String)> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let perms = f.next()?.to_string();
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                perms,
            ))
        })
        .collect();
    vmas.windows(3).find_map(|w| {
        let [(a0, a1, ap), (g0, g1, gp), (s0, s1, sp)] = w else {
            return None;
        };
        (a1 - a0 == 128 * 1024
            && ap == "rw-p"
            && a1 == g0
            && g1 - g0 == 4096
            && gp == "---p"
            && g1 == s0
            && s1 - s0 == 256 * 1024
            && sp == "rw-p")
            .then_some((*a0, *a1, *s0, *s1))
    })
}

/// `Rss` of the mapping starting at `start` in `pid`, kB.
fn rss_of_mapping(pid: Pid, start: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let head = format!("{start:x}-");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
    lines.next().expect("the mapping in smaps");
    lines
        .take_while(|l| !l.contains('-') || l.contains(':'))
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("Rss")
}

fn read_mem(pid: Pid, at: u64, len: usize) -> Vec<u8> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, at).unwrap();
    buf
}

/// PROBE. Where the buffer lives: the parent has the mapping (buffer, guard, stack) and no
/// page of it resident, ever, while children echo through it; a child that echoed 0xA5
/// bytes has them in its buffer, and a second child, alive at the same time, sees only its
/// own byte and zeros there.
#[test]
fn each_lean_child_has_its_own_buffer_and_the_parent_never_touches_it() {
    let server = quiet(&[]);
    let parent = server.pid();
    let (b0, b1, s0, _) = child_memory_of(parent).expect("ChildMemory in the parent's maps");
    let mut a = server.connect_greeted();
    let fill = vec![0xA5u8; 512 * 1024];
    let back = stream_in_rounds(&mut a, &fill);
    assert!(back == fill);
    let mut b = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut b, b"B"), b"B");
    let pa = server.child_pid_for(a.local_addr().unwrap());
    let pb = server.child_pid_for(b.local_addr().unwrap());
    assert_eq!(
        child_memory_of(pa).map(|m| m.0),
        Some(b0),
        "same address in child A"
    );
    assert_eq!(
        child_memory_of(pb).map(|m| m.0),
        Some(b0),
        "same address in child B"
    );
    let in_a = read_mem(pa, b0, (b1 - b0) as usize);
    assert!(
        in_a[..4096].iter().all(|&x| x == 0xA5),
        "child A's buffer does not hold what it echoed: the probe looks in the wrong place"
    );
    let in_b = read_mem(pb, b0, (b1 - b0) as usize);
    assert_eq!(in_b[0], b'B', "child B's buffer starts with its own byte");
    let foreign = in_b[1..].iter().filter(|&&x| x != 0).count();
    assert_eq!(
        foreign, 0,
        "child B sees {foreign} non-zero bytes it never received"
    );
    assert_eq!(rss_of_mapping(parent, b0), 0, "parent pages of the buffer");
    assert_eq!(
        rss_of_mapping(parent, s0),
        0,
        "parent pages of the child stack"
    );
    drop(a);
    drop(b);
}

/// Writes `data` in request/response rounds of 64 KiB.
fn stream_in_rounds(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    for chunk in data.chunks(64 * 1024) {
        got.extend(echo_roundtrip(s, chunk));
    }
    got
}

// ---- Plain-fork fallback: every slot in flight ----

/// PROBE. With 1024 lean children held by ptrace before they take their slots, the next
/// sessions start with the plain fork (`echo::heap_buffer()`); once everything runs, the
/// plain-fork sessions and lean ones echo distinct streams larger than the buffer, all at
/// once, byte-exact, and exit 0.
#[test]
fn plain_fork_sessions_after_slot_exhaustion_echo_distinct_streams_exactly() {
    const CLIENTS: usize = 1030;
    raise_own_nofile(4096);
    let server = Server::builder()
        .env("RUST_LOG", "info")
        .config("listen = [\"127.0.0.1:0\"]\nmax_children = 4000\nmax_per_source = 0\n")
        .start();
    let hold = ForkHold::start(server.pid(), CLIENTS);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let s = server.connect();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        clients.push(s);
    }
    let held = hold.join().unwrap_or_else(|e| panic!("tracer: {e}"));
    assert_eq!(
        (held.lean, held.plain),
        (1024, CLIENTS - 1024),
        "lean and plain forks"
    );
    // The last 12 clients (6 plain-fork children among them) stream at once; the rest
    // echo a line each.
    let streamers: Vec<TcpStream> = clients.split_off(CLIENTS - 12);
    let workers: Vec<_> = streamers
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            thread::spawn(move || -> Result<SocketAddr, String> {
                let mut banner = vec![0u8; BANNER.len()];
                s.read_exact(&mut banner).map_err(|e| format!("{i}: {e}"))?;
                if banner != BANNER {
                    return Err(format!("{i}: banner {banner:?}"));
                }
                let data = Noise::new(77 + i as u64).bytes(700 * 1024 + 3 * i);
                let got = stream_through(&s, &data);
                if got != data {
                    return Err(format!(
                        "stream {i}: {} of {} bytes, first difference at {:?}",
                        got.len(),
                        data.len(),
                        got.iter().zip(&data).position(|(a, b)| a != b)
                    ));
                }
                Ok(s.local_addr().unwrap())
            })
        })
        .collect();
    let mut failures = Vec::new();
    for (i, s) in clients.iter_mut().enumerate() {
        let line = format!("client {i}\n");
        let ok = (|| -> std::io::Result<bool> {
            let mut banner = vec![0u8; BANNER.len()];
            s.read_exact(&mut banner)?;
            s.write_all(line.as_bytes())?;
            let mut back = vec![0u8; line.len()];
            s.read_exact(&mut back)?;
            Ok(banner == BANNER && back == line.as_bytes())
        })();
        if !matches!(ok, Ok(true)) {
            failures.push(format!("client {i}: {ok:?}"));
        }
    }
    for w in workers {
        match w.join().unwrap() {
            Ok(client) => {
                server.wait_child_exited_with(client, 0, "client closed");
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    drop(clients);
    assert!(!server.log_text().contains("killed by signal"));
}

// ---- Outcomes and their exit codes ----

/// PROBE. A client that resets the connection while the child waits for input: code 5,
/// "reset by the client".
#[test]
fn a_reset_while_waiting_for_input_is_code_5() {
    let server = quiet(&[]);
    let mut c = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut c, b"hi\n"), b"hi\n");
    let client = c.local_addr().unwrap();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    server.wait_child_exited_with(client, 5, "reset by the client");
}

/// PROBE. A client that sends data and resets before reading its echo: 5 (or 6), never
/// a signal, never 7.
#[test]
fn a_reset_right_after_sending_is_code_5_or_6() {
    let server = quiet(&[]);
    let mut endings = Vec::new();
    for _ in 0..10 {
        let mut c = server.connect();
        c.write_all(&[9u8; 300 * 1024]).unwrap();
        let client = c.local_addr().unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        endings.push(server.wait_child_ending(client));
    }
    for e in endings {
        assert!(
            e.how == "exited with code 5" || e.how == "exited with code 6",
            "{e:?}"
        );
    }
}

/// PROBE. A client that sends nothing and half-closes at once: the banner, then EOF, code 0.
/// Also one that half-closes before reading the banner.
#[test]
fn a_client_that_sends_nothing_and_half_closes_gets_the_banner_and_code_0() {
    let server = quiet(&[]);
    let mut c = server.connect_greeted();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c), b"");
    server.wait_child_exited_with(c.local_addr().unwrap(), 0, "client closed");

    let mut c = server.connect();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c), BANNER);
    server.wait_child_exited_with(c.local_addr().unwrap(), 0, "client closed");
}

/// PROBE. A silent client with a sub-second idle_timeout: banner, then closed on time, code 3.
#[test]
fn a_silent_client_is_closed_after_a_sub_second_idle_timeout_with_code_3() {
    let server = quiet(&["--idle-timeout", "0.3"]);
    let mut c = server.connect_greeted();
    let took = closed_within(&mut c, Duration::from_secs(5));
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    let e = server.wait_child_exited_with(c.local_addr().unwrap(), 3, "idle timeout");
    assert!(e.seconds < 1.5, "{e:?}");
}

/// PROBE. `idle_timeout = 0` is no limit: a silent session is still served after 1.5 s
/// (several times any timer period) and its child catches no SIGALRM.
#[test]
fn idle_timeout_zero_never_ends_a_silent_session() {
    let server = quiet(&["--idle-timeout", "0"]);
    let mut c = server.connect_greeted();
    let client = c.local_addr().unwrap();
    c.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the silent session ended: {other:?}"),
    }
    let child = server.child_pid_for(client);
    assert_eq!(
        signal_mask(child, "SigCgt") & (1 << (libc::SIGALRM - 1)),
        0,
        "SIGALRM caught without a limit"
    );
    c.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(echo_roundtrip(&mut c, b"still here\n"), b"still here\n");
    assert_eq!(send_and_drain(&mut c, b"bye"), b"bye");
    server.wait_child_exited_with(client, 0, "client closed");
}

/// PROBE. A client that sends but never reads, with idle_timeout 0.5: code 4 (write timeout),
/// within two idle periods and change.
#[test]
fn a_client_that_never_reads_is_cut_off_with_code_4() {
    let server = quiet(&["--idle-timeout", "0.5"]);
    let mut c = connect_with_recv_buffer(server.addr(), 4096);
    expect_banner(&mut c);
    let client = c.local_addr().unwrap();
    c.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let chunk = vec![3u8; 64 * 1024];
    while c.write_all(&chunk).is_ok() && started.elapsed() < Duration::from_secs(5) {}
    let e = server.wait_child_exited_with(client, 4, "write timeout");
    assert!(e.seconds < 2.5, "{e:?}");
}

/// PROBE. max_session_time 0.6 against a client that keeps the echo busy: code 8 on time.
#[test]
fn max_session_time_ends_a_busy_session_with_code_8() {
    let server = quiet(&["--max-session-time", "0.6"]);
    let mut c = server.connect_greeted();
    let client = c.local_addr().unwrap();
    let started = Instant::now();
    let chunk = Noise::new(5).bytes(16 * 1024);
    loop {
        if c.write_all(&chunk).is_err() {
            break;
        }
        let mut back = vec![0u8; chunk.len()];
        match c.read_exact(&mut back) {
            Ok(()) => assert!(back == chunk),
            Err(_) => break,
        }
        assert!(started.elapsed() < Duration::from_secs(5), "still echoing");
    }
    let e = server.wait_child_exited_with(client, 8, "max_session_time");
    assert!(e.seconds >= 0.55 && e.seconds < 1.5, "{e:?}");
}

// ---- UNIX-domain listeners (no TCP_NODELAY) ----

fn unix_server(path: &Path, extra: &[&str]) -> Server {
    let address = format!("unix:{}", path.display());
    let mut args = vec!["-l", address.as_str()];
    args.extend_from_slice(extra);
    let mut server = Server::builder()
        .env("RUST_LOG", "info")
        .args(args.iter().copied())
        .spawn();
    let line = format!("listening on {address}");
    assert!(
        wait_until(WAIT, || server.count_lines(&line) > 0
            || !server.is_running())
            && server.count_lines(&line) > 0,
        "no `{line}`:\n{}",
        server.log_text()
    );
    server
}

fn unix_client(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    let mut banner = vec![0u8; BANNER.len()];
    s.read_exact(&mut banner).unwrap();
    assert_eq!(banner, BANNER);
    s
}

/// The parent's end lines with `what` in them, for a UNIX-domain server (peers are
/// credentials, not addresses).
fn unix_endings(server: &Server, what: &str, n: usize) -> Vec<String> {
    server.wait_for_lines(what, n);
    server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(what))
        .collect()
}

/// PROBE. Over a UNIX-domain socket (where TCP_NODELAY does not apply) the echo is
/// byte-exact for several concurrent streams larger than the buffer, each half-closed
/// session ends with code 0, and a silent one with code 3 after a sub-second idle_timeout.
#[test]
fn unix_domain_sessions_echo_exactly_and_end_with_the_right_codes() {
    let dir = TempDir::new();
    let path = dir.path().join("echo.sock");
    let server = unix_server(&path, &["--idle-timeout", "0.4"]);
    let workers: Vec<_> = (0..6)
        .map(|i| {
            let path = path.clone();
            thread::spawn(move || {
                let s = unix_client(&path);
                let data = Noise::new(300 + i).bytes(400 * 1024 + i as usize);
                let mut writer = s.try_clone().unwrap();
                let sent = data.clone();
                let w = thread::spawn(move || {
                    writer.write_all(&sent).unwrap();
                    writer.shutdown(Shutdown::Write).unwrap();
                });
                let mut got = Vec::new();
                (&s).read_to_end(&mut got).unwrap();
                w.join().unwrap();
                assert!(
                    got == data,
                    "UNIX stream {i}: {} of {} bytes",
                    got.len(),
                    data.len()
                );
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let ok = unix_endings(&server, "exited with code 0 (client closed)", 6);
    assert_eq!(ok.len(), 6, "{ok:#?}");
    let mut silent = unix_client(&path);
    let took = closed_within(&mut silent, Duration::from_secs(5));
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");
    unix_endings(&server, "exited with code 3 (idle timeout)", 1);
    assert!(
        !server.log_text().contains("I/O error"),
        "{}",
        server.log_text()
    );
}

// ---- Reloads while sessions run ----

/// PROBE. A session keeps the banner and idle_timeout it started with across reloads; new
/// sessions get the new ones. Both directions: no limit → 0.3 s, and 0.3 s → no limit.
#[test]
fn running_sessions_keep_their_settings_across_reloads() {
    let server = Server::builder()
        .env("RUST_LOG", "info")
        .config("listen = [\"127.0.0.1:0\"]\nbanner = \"one\\n\"\nidle_timeout = 0\n")
        .start();
    let mut old = server.connect();
    assert_eq!(read_exactly(&mut old, 4), b"one\n");
    assert_eq!(echo_roundtrip(&mut old, b"a\n"), b"a\n");

    server.rewrite_config("listen = [\"127.0.0.1:0\"]\nbanner = \"two\\n\"\nidle_timeout = 0.3\n");
    server.signal(Signal::SIGHUP);
    server.wait_for_lines("reloaded configuration", 1);
    let mut new = server.connect();
    assert_eq!(read_exactly(&mut new, 4), b"two\n");
    closed_within(&mut new, Duration::from_secs(5));
    server.wait_child_exited_with(new.local_addr().unwrap(), 3, "idle timeout");
    // The old session has been silent for longer than 0.3 s: still served.
    assert_eq!(echo_roundtrip(&mut old, b"b\n"), b"b\n");

    // A session under 0.3 s, then a reload to no limit: it still ends after 0.3 s of silence.
    let mut limited = server.connect();
    assert_eq!(read_exactly(&mut limited, 4), b"two\n");
    server.rewrite_config("listen = [\"127.0.0.1:0\"]\nbanner = \"three\\n\"\nidle_timeout = 0\n");
    server.signal(Signal::SIGHUP);
    server.wait_for_lines("reloaded configuration", 2);
    closed_within(&mut limited, Duration::from_secs(5));
    server.wait_child_exited_with(limited.local_addr().unwrap(), 3, "idle timeout");
    let mut third = server.connect();
    assert_eq!(read_exactly(&mut third, 6), b"three\n");
    assert_eq!(send_and_drain(&mut third, b"c"), b"c");
    assert_eq!(send_and_drain(&mut old, b"d"), b"d");
    server.wait_child_exited_with(old.local_addr().unwrap(), 0, "client closed");
}

// ---- stdout and the child's exit ----

/// PROBE. Nothing reaches stdout: not from the parent, not from a child's exit (the flush is
/// gone), not at shutdown, also with sessions that end in each way.
#[test]
fn nothing_is_ever_written_to_stdout() {
    let dir = TempDir::new();
    let out_path = dir.path().join("stdout");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut server = Server::builder()
        .env("RUST_LOG", "debug")
        .args(["--idle-timeout", "0.2"])
        .tweak(move |c| {
            c.stdout(out);
        })
        .start();
    let mut a = server.connect_greeted();
    assert_eq!(send_and_drain(&mut a, b"x"), b"x");
    let mut b = server.connect_greeted();
    closed_within(&mut b, Duration::from_secs(5));
    let c = server.connect_greeted();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let cl = c.local_addr().unwrap();
    drop(c);
    server.wait_child_ending(cl);
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    assert_eq!(std::fs::read(&out_path).unwrap(), b"", "stdout");
}

// ---- The section layout ----

/// The `.text.hot` range of a binary, and its function symbols (name, address).
type HotLayout = (Option<(u64, u64)>, Vec<(String, u64)>);

/// Function symbols (name, address) and the `.text.hot` range of `binary`.
fn hot_layout(binary: &Path) -> HotLayout {
    let sections = std::process::Command::new("readelf")
        .args(["-SW"])
        .arg(binary)
        .output()
        .expect("readelf");
    let text = String::from_utf8_lossy(&sections.stdout);
    let hot = text.lines().find_map(|l| {
        let l = l.split_once(']').map(|(_, r)| r)?;
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&".text.hot")).then(|| {
            let addr = u64::from_str_radix(f[2], 16).unwrap();
            let size = u64::from_str_radix(f[4], 16).unwrap();
            (addr, addr + size)
        })
    });
    let nm = std::process::Command::new("nm")
        .args(["-C", "--defined-only"])
        .arg(binary)
        .output()
        .expect("nm");
    let symbols = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ' ');
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let kind = f.next()?;
            let name = f.next()?;
            matches!(kind, "t" | "T").then(|| (name.to_string(), addr))
        })
        .collect();
    (hot, symbols)
}

fn assert_child_path_is_hot(binary: &Path) {
    let (hot, symbols) = hot_layout(binary);
    let (lo, hi) = hot.unwrap_or_else(|| panic!("{binary:?}: no .text.hot section"));
    for name in [
        "forkecho::lean_fork::child_entry",
        "forkecho::spawn::exit_child",
        "forkecho::spawn::close_inherited_fds",
        "forkecho::signals::reset_in_child",
    ] {
        // Exact names: a closure is a function of its own, which `#[link_section]` does not
        // reach (a debug build keeps `child_entry::{{closure}}` in `.text`).
        let found: Vec<u64> = symbols
            .iter()
            .filter(|(n, _)| n == name)
            .map(|&(_, a)| a)
            .collect();
        assert!(!found.is_empty(), "{binary:?}: no symbol {name}");
        assert!(
            found.iter().all(|a| (lo..hi).contains(a)),
            "{binary:?}: {name} at {found:x?}, outside .text.hot {lo:#x}..{hi:#x}"
        );
    }
}

/// PROBE. The debug binary the tests run, and the release binary if one is built, have one
/// `.text.hot` section holding the child's entry, cleanup and exit.
#[test]
fn the_childs_path_is_in_the_text_hot_section() {
    assert_child_path_is_hot(Path::new(BIN));
    let release = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/forkecho");
    if release.exists() {
        assert_child_path_is_hot(&release);
    } else {
        report("no release build: only the debug binary's layout was checked");
    }
}

// ---- The socket calls made to libc directly ----

/// PROBE. The child's TCP connection has TCP_NODELAY on (IPv4 and IPv6), set by the child's
/// own setsockopt; replies to small requests come at once.
#[test]
fn the_childs_tcp_socket_has_nodelay_on_ipv4_and_ipv6() {
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let server = quiet(&["-l", listen]);
        let mut c = server.connect_greeted();
        assert_eq!(echo_roundtrip(&mut c, b"n"), b"n");
        let child = server.child_pid_for(c.local_addr().unwrap());
        let fd = socket_of(child).expect("the child's socket");
        assert_ne!(
            int_option(&fd, libc::IPPROTO_TCP, libc::TCP_NODELAY),
            0,
            "TCP_NODELAY on {listen}"
        );
        // Many small round trips: with Nagle on, one would wait for a delayed ACK.
        let started = Instant::now();
        for i in 0..200u32 {
            let msg = i.to_le_bytes();
            c.write_all(&msg[..2]).unwrap();
            c.write_all(&msg[2..]).unwrap();
            assert_eq!(read_exactly(&mut c, 4), msg);
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "200 split requests took {:?}",
            started.elapsed()
        );
        assert_eq!(send_and_drain(&mut c, b"z"), b"z");
        server.wait_child_exited_with(c.local_addr().unwrap(), 0, "client closed");
    }
}

// ---- The release build (inlining, the section as shipped) ----

/// The release binary, if one is built (its layout and inlining are what ships).
fn release_binary() -> Option<std::path::PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/forkecho");
    path.exists().then_some(path)
}

/// PROBE. The release build: 16 concurrent sessions of distinct data larger than the buffer,
/// a silent one cut by a sub-second idle_timeout, a reset one: byte-exact, codes 0, 3, 5,
/// and the parent never touches the children's buffer.
#[test]
fn the_release_build_echoes_distinct_sessions_exactly_and_ends_them_with_the_right_codes() {
    let Some(release) = release_binary() else {
        report("no release build; nothing to check here");
        return;
    };
    let server = Server::builder()
        .program(release)
        .env("RUST_LOG", "info")
        .args(["--idle-timeout", "0.5", "--max-per-source", "0"])
        .start();
    let addr = server.addr();
    let workers: Vec<_> = (0..16)
        .map(|i| {
            thread::spawn(move || -> Result<SocketAddr, String> {
                let mut s = connect(addr);
                expect_banner(&mut s);
                let data = Noise::new(9000 + i as u64).bytes(300 * 1024 + 11 * i);
                let got = stream_through(&s, &data);
                if got != data {
                    return Err(format!("{i}: {} of {} bytes", got.len(), data.len()));
                }
                Ok(s.local_addr().unwrap())
            })
        })
        .collect();
    let mut silent = server.connect_greeted();
    let reset = server.connect_greeted();
    let reset_addr = reset.local_addr().unwrap();
    socket2::SockRef::from(&reset)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(reset);
    for w in workers {
        let client = w.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        server.wait_child_exited_with(client, 0, "client closed");
    }
    closed_within(&mut silent, Duration::from_secs(5));
    server.wait_child_exited_with(silent.local_addr().unwrap(), 3, "idle timeout");
    server.wait_child_exited_with(reset_addr, 5, "reset by the client");
    let (b0, _, s0, _) = child_memory_of(server.pid()).expect("ChildMemory in the parent");
    assert_eq!(rss_of_mapping(server.pid(), b0), 0);
    assert_eq!(rss_of_mapping(server.pid(), s0), 0);
}

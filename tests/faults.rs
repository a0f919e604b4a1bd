//! Fault injection and soak: real faults against the real binary, no mocks (after PostgreSQL's
//! TAP tests for connection limits and crash restart, OpenSSH's regress tests and xinetd's
//! fork-failure injection). A kill storm, a chaos soak, a parent crash, a full descriptor
//! table, a real fork failure, a signal barrage and misbehaving clients: nothing is lost and no
//! child escapes. (Fuzzed configurations are `config_fuzz`.)
//!
//! Each test asserts a bound in its name and prints what it measured with `report`
//! (`cargo test faults -- --nocapture` shows them). Loopback only, every wait bounded, every
//! process started here killed by pid when its test ends (`Server`'s drop, `KillOnDrop`).

use std::collections::{HashMap, HashSet};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::*;

/// Taken by the tests that measure time or CPU, or load the machine on purpose (kill storm,
/// soak, signal barrage, fd exhaustion): cargo runs tests in parallel threads, and two of
/// these at once would turn each other's timing figures into noise.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    // A heavy test that failed poisons the lock; that is no reason to fail the next one too.
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sets a flag when dropped, so that threads looping on it stop even if the test panics
/// (otherwise `thread::scope` would wait for them forever).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// ---- The parent's log, parsed ----

/// One session as the parent logged it: accepted, and (once reaped) how it ended.
#[derive(Debug, Clone)]
struct LoggedSession {
    peer: SocketAddr,
    pid: Pid,
    ending: Option<String>,
}

/// Every session in the log, in the order the parent accepted them. An ending is matched by
/// pid and peer: a pid is not reused before its child is reaped, and a peer (the client's
/// address and port) not before its connection is closed.
fn logged_sessions(lines: &[String]) -> Vec<LoggedSession> {
    let mut sessions = Vec::new();
    let mut open: HashMap<(Pid, SocketAddr), usize> = HashMap::new();
    for line in lines.iter().filter_map(|l| LogLine::parse(l)) {
        if let Some((peer, pid)) = line.accepted() {
            open.insert((pid, peer), sessions.len());
            sessions.push(LoggedSession {
                peer,
                pid,
                ending: None,
            });
        } else if let Some(ending) = line.child_ending() {
            if let Some(i) = open.remove(&(ending.pid, ending.peer)) {
                sessions[i].ending = Some(ending.how);
            }
        }
    }
    sessions
}

/// Waits until the parent has logged `n` `accepted` lines, then returns each session's child
/// pid: one parse of the log, where `child_pid_for` per session would rescan it a thousand
/// times.
fn children_serving(server: &Server, sessions: &[TcpStream]) -> Vec<(Pid, SocketAddr)> {
    let n = sessions.len();
    server.wait_for_lines("accepted ", n);
    let by_peer: HashMap<SocketAddr, Pid> = server
        .log_lines()
        .iter()
        .filter_map(|l| LogLine::parse(l)?.accepted())
        .collect();
    sessions
        .iter()
        .map(|s| {
            let peer = s.local_addr().unwrap();
            (by_peer[&peer], peer)
        })
        .collect()
}

// ---- What a client sees ----

/// The number before `word` in a `status:` line (`status: 0 active, 12 accepted, ...`).
fn number_in_status(status: &str, word: &str) -> Option<u64> {
    LogLine::parse(status)?.number_before(word)
}

/// Asserts the `status:` line (SIGUSR1) reports an empty children table, and returns it.
fn assert_status_zero_active(server: &Server) -> String {
    let status = server.status_line();
    assert_eq!(
        number_in_status(&status, "active"),
        Some(0),
        "children table not empty: {status}"
    );
    status
}

// ---- 1. Kill storm ----

/// 1,000 live sessions, every child SIGKILLed at once: within 1 s of the kill no killed child is
/// left (zero zombies) and a new client has been greeted and echoed. Every death is logged
/// with its pid and peer, every client sees its session end, and the status line counts them.
#[test]
fn kill_storm_1000_children_reaped_and_new_client_served_within_1s() {
    const N: usize = 1000;
    const BOUND: Duration = Duration::from_secs(1);
    let _heavy = heavy();
    raise_own_nofile(N as u64 + 256);
    // All sessions come from 127.0.0.1: lift the per-source limit (default 32).
    let server = Server::builder().args(["--max-per-source", "0"]).start();
    let opened = Instant::now();
    let mut sessions: Vec<TcpStream> = (0..N).map(|_| server.connect_greeted()).collect();
    let opened_in = opened.elapsed();
    let targets = children_serving(&server, &sessions);
    let live = server.children();
    assert_eq!(live.len(), N, "children before the storm");
    assert!(
        live.iter().all(|c| c.state != 'Z'),
        "zombies before the storm"
    );

    let addr = server.addr();
    let killed_at = Instant::now();
    for &(pid, _) in &targets {
        kill(pid, Signal::SIGKILL).expect("SIGKILL a child");
    }
    // The newcomer connects while the parent reaps: serving must not wait for the storm.
    let newcomer = thread::spawn(move || {
        let mut s = connect(addr);
        expect_banner(&mut s);
        assert_eq!(echo_roundtrip(&mut s, b"newcomer\n"), b"newcomer\n");
        (killed_at.elapsed(), s)
    });
    let killed: HashSet<Pid> = targets.iter().map(|&(pid, _)| pid).collect();
    let left = || {
        server
            .children()
            .into_iter()
            .filter(|c| killed.contains(&c.pid) || c.state == 'Z')
            .count()
    };
    let reaped = wait_until(BOUND.saturating_sub(killed_at.elapsed()), || left() == 0);
    let reaped_in = killed_at.elapsed();
    let (served_in, newcomer) = newcomer.join().expect("newcomer served");
    report(&format!(
        "kill storm: {N} sessions opened in {opened_in:?}; all {N} children reaped {reaped_in:?} \
         after the SIGKILLs; new client served {served_in:?} after them"
    ));
    assert!(
        reaped,
        "{} killed children (or zombies) still there {BOUND:?} after the kill",
        left()
    );
    assert!(
        served_in <= BOUND,
        "new client served {served_in:?} after the kill"
    );

    assert_every_death_logged(&server, &targets);
    for (i, s) in sessions.iter_mut().enumerate() {
        assert_closed_by_server(s, &format!("killed session {i}"));
    }
    let peer = newcomer.local_addr().unwrap();
    drop(newcomer);
    server.wait_child_exit(peer, 0);
    let status = assert_status_zero_active(&server);
    assert!(status.contains(&format!("SIGKILL: {N}")), "{status}");
}

/// Asserts the parent logged `child <pid> (<peer>) killed by signal SIGKILL` for each target.
fn assert_every_death_logged(server: &Server, targets: &[(Pid, SocketAddr)]) {
    let n = targets.len();
    server.wait_for_lines("killed by signal SIGKILL", n);
    let logged: HashSet<(Pid, SocketAddr)> = server
        .log_lines()
        .iter()
        .filter_map(|l| LogLine::parse(l)?.child_ending())
        .filter(|ending| ending.how == "killed by signal SIGKILL")
        .map(|ending| (ending.pid, ending.peer))
        .collect();
    for target in targets {
        assert!(logged.contains(target), "death of {target:?} not logged");
    }
    assert_eq!(server.count_lines("killed by signal SIGKILL"), n);
}

// ---- 2. Chaos soak ----

/// How long the soak runs: 60 s, or `FORKECHO_SOAK_SECS` (for a quick local run).
fn soak_duration() -> Duration {
    let secs = std::env::var("FORKECHO_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

const SOAK_CLIENTS: usize = 32;
/// The parent's RSS is taken as the baseline once this much of the soak has run: by then its
/// children table and allocator have reached their working size.
const SOAK_WARM_UP: Duration = Duration::from_secs(5);
/// Most RSS the parent may gain between the warm-up and the end.
const SOAK_RSS_GROWTH_KIB: u64 = 1024;

/// How a client's session went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SessionOutcome {
    /// Every byte came back, in order, then EOF after our half-close.
    Complete,
    /// The connection ended early (EOF or reset) and every byte read until then was right:
    /// what a killed child looks like.
    Cut(String),
    /// Anything else (wrong bytes, a stall, connect failed): never explained by a kill.
    Failed(String),
}

/// One session as its client saw it.
#[derive(Debug, Clone)]
struct ClientSession {
    /// Our local address, which the parent logs as the peer.
    peer: Option<SocketAddr>,
    /// Right after connect returned: orders sessions that reused one local port.
    connected: Instant,
    echoed: u64,
    outcome: SessionOutcome,
}

/// A read or write error: a connection cut short, or a failure.
fn classify(e: &io::Error) -> SessionOutcome {
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => SessionOutcome::Cut(e.to_string()),
        _ => SessionOutcome::Failed(e.to_string()),
    }
}

/// Reads exactly `want.len()` bytes and checks each against `want` as it arrives, so that a
/// session cut short still proves that what it did get was right.
fn read_and_check(s: &mut TcpStream, want: &[u8]) -> Result<(), SessionOutcome> {
    let mut got = vec![0; want.len()];
    let mut filled = 0;
    while filled < want.len() {
        let n = match s.read(&mut got[filled..]) {
            Ok(0) => return Err(SessionOutcome::Cut(format!("EOF after {filled} bytes"))),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(classify(&e)),
        };
        if got[filled..filled + n] != want[filled..filled + n] {
            return Err(SessionOutcome::Failed(format!(
                "wrong bytes at offset {filled}..{} of {}",
                filled + n,
                want.len()
            )));
        }
        filled += n;
    }
    Ok(())
}

/// One soak session: banner, 1 to 32 messages of 1 byte to 64 KiB of random data (each echoed
/// and checked before the next is sent, so neither side can block the other), half-close,
/// EOF.
fn soak_exchange(s: &mut TcpStream, seed: u64, echoed: &mut u64) -> Result<(), SessionOutcome> {
    let mut rng = Noise::new(seed);
    read_and_check(s, BANNER)?;
    for _ in 0..1 + rng.below(32) {
        // Lengths spread over every scale, from 1 byte to 64 KiB.
        let scale = rng.below(17);
        let len = 1 + rng.below(1 << scale) as usize;
        let data = rng.bytes(len);
        s.write_all(&data).map_err(|e| classify(&e))?;
        read_and_check(s, &data)?;
        *echoed += len as u64;
    }
    s.shutdown(Shutdown::Write).map_err(|e| classify(&e))?;
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Ok(()),
        Ok(_) => Err(SessionOutcome::Failed(format!(
            "{} bytes after the echo",
            rest.len()
        ))),
        Err(e) => Err(classify(&e)),
    }
}

fn soak_session(addr: SocketAddr, seed: u64) -> ClientSession {
    let mut s = match TcpStream::connect_timeout(&addr, WAIT) {
        Ok(s) => s,
        Err(e) => {
            return ClientSession {
                peer: None,
                connected: Instant::now(),
                echoed: 0,
                outcome: SessionOutcome::Failed(format!("connect: {e}")),
            }
        }
    };
    let connected = Instant::now();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    let mut echoed = 0;
    let outcome = match soak_exchange(&mut s, seed, &mut echoed) {
        Ok(()) => SessionOutcome::Complete,
        Err(outcome) => outcome,
    };
    ClientSession {
        peer: s.local_addr().ok(),
        connected,
        echoed,
        outcome,
    }
}

/// One soak client: sessions back to back until `stop`.
fn soak_client(addr: SocketAddr, id: u64, stop: &AtomicBool) -> Vec<ClientSession> {
    let mut seeds = Noise::new(1000 + id);
    let mut sessions = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        sessions.push(soak_session(addr, seeds.next_u64()));
    }
    sessions
}

/// SIGKILLs a random live child of `server` every 5 to 45 ms until `stop`; returns the pids
/// it killed.
fn chaos(server: Pid, stop: &AtomicBool) -> Vec<Pid> {
    let mut rng = Noise::new(4242);
    let mut killed = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        // The chaos loop's pace, not a wait for readiness.
        thread::sleep(Duration::from_millis(5 + rng.below(40)));
        let live: Vec<Pid> = children_of(server)
            .into_iter()
            .filter(|c| c.state != 'Z')
            .map(|c| c.pid)
            .collect();
        if live.is_empty() {
            continue;
        }
        let victim = live[rng.below(live.len() as u64) as usize];
        if kill(victim, Signal::SIGKILL).is_ok() {
            killed.push(victim);
        }
    }
    killed
}

/// 32 clients echo random data for 60 s while a chaos loop SIGKILLs random children. Every
/// session whose child was not killed gets every byte back; every session that broke was
/// one whose child the chaos loop killed (as the parent's log says); at the end no child is
/// left, the status line reports 0 active, and the parent's RSS grew by at most 1 MiB.
#[test]
fn chaos_soak_loses_no_byte_of_unkilled_sessions_leaks_no_child_and_no_memory() {
    let _heavy = heavy();
    let duration = soak_duration();
    // INFO, not the suite's DEBUG: the checks need only the parent's `accepted` and `child`
    // lines, and tens of thousands of sessions' debug lines would load the machine for nothing.
    let server = Server::builder()
        .args(["--max-per-source", "0"])
        .env("RUST_LOG", "info")
        .start();
    let (addr, pid) = (server.addr(), server.pid());
    let stop = &AtomicBool::new(false);
    let (sessions, kills, rss_warm) = thread::scope(|scope| {
        let _stop = SetOnDrop(stop);
        let clients: Vec<_> = (0..SOAK_CLIENTS as u64)
            .map(|id| scope.spawn(move || soak_client(addr, id, stop)))
            .collect();
        let chaos = scope.spawn(move || chaos(pid, stop));
        // The soak's clock: these sleeps are its length, not waits for readiness.
        thread::sleep(SOAK_WARM_UP.min(duration));
        let rss_warm = rss_kib(pid);
        thread::sleep(duration.saturating_sub(SOAK_WARM_UP));
        stop.store(true, Ordering::SeqCst);
        let kills = chaos.join().expect("chaos thread");
        let sessions: Vec<ClientSession> = clients
            .into_iter()
            .flat_map(|c| c.join().expect("soak client"))
            .collect();
        (sessions, kills, rss_warm)
    });
    let reaped_in = assert_no_children(&server, "after the soak");
    // Logged after the line of every child reaped so far, so the log is complete once we
    // have it: `check_soak_sessions` reads it.
    let status = assert_status_zero_active(&server);
    let rss_end = rss_kib(pid);

    let cut = check_soak_sessions(&server, &sessions, &kills);
    let bytes: u64 = sessions.iter().map(|s| s.echoed).sum();
    report(&format!(
        "soak {duration:?}: {} sessions ({} complete, {cut} cut by the chaos), {bytes} bytes \
         echoed and checked, {} SIGKILLs sent, {} children logged as killed; last child reaped \
         {reaped_in:?} after the clients stopped; parent RSS {rss_warm} KiB after warm-up -> \
         {rss_end} KiB at the end",
        sessions.len(),
        sessions.len() - cut,
        kills.len(),
        server.count_lines("killed by signal SIGKILL"),
    ));
    assert!(cut > 0, "the chaos loop cut no session: it tested nothing");
    assert_eq!(
        number_in_status(&status, "accepted"),
        Some(sessions.len() as u64),
        "{status}"
    );
    assert_eq!(
        number_in_status(&status, "ended"),
        Some(sessions.len() as u64),
        "{status}"
    );
    assert!(
        rss_end <= rss_warm + SOAK_RSS_GROWTH_KIB,
        "parent RSS grew from {rss_warm} KiB to {rss_end} KiB"
    );
}

/// Pairs each client session with the parent's record of it (per peer, in order) and checks
/// the pair; returns how many sessions the chaos cut. Panics listing the first mismatches.
fn check_soak_sessions(server: &Server, sessions: &[ClientSession], kills: &[Pid]) -> usize {
    let killed: HashSet<Pid> = kills.iter().copied().collect();
    let logged = logged_sessions(&server.log_lines());
    let mut logged_by_peer: HashMap<SocketAddr, Vec<&LoggedSession>> = HashMap::new();
    for s in &logged {
        logged_by_peer.entry(s.peer).or_default().push(s);
    }
    let mut ours_by_peer: HashMap<SocketAddr, Vec<&ClientSession>> = HashMap::new();
    let mut problems = Vec::new();
    for s in sessions {
        match s.peer {
            Some(peer) => ours_by_peer.entry(peer).or_default().push(s),
            None => problems.push(format!("a session never connected: {:?}", s.outcome)),
        }
    }
    let mut cut = 0;
    for (peer, ours) in &mut ours_by_peer {
        ours.sort_by_key(|s| s.connected);
        let theirs = logged_by_peer.remove(peer).unwrap_or_default();
        if ours.len() != theirs.len() {
            problems.push(format!(
                "{peer}: {} sessions by the client, {} accepted by the parent",
                ours.len(),
                theirs.len()
            ));
            continue;
        }
        for (client, parent) in ours.iter().zip(theirs) {
            let ending = parent.ending.as_deref().unwrap_or("(no ending logged)");
            let killed_by_chaos =
                ending == "killed by signal SIGKILL" && killed.contains(&parent.pid);
            match &client.outcome {
                SessionOutcome::Complete if ending == "exited with code 0" || killed_by_chaos => {}
                SessionOutcome::Cut(_) if killed_by_chaos => cut += 1,
                outcome => problems.push(format!(
                    "{peer} (child {}): client saw {outcome:?}, parent logged `{ending}`",
                    parent.pid
                )),
            }
        }
    }
    for (peer, theirs) in logged_by_peer {
        problems.push(format!(
            "{peer}: {} sessions accepted that no client opened",
            theirs.len()
        ));
    }
    assert!(
        problems.is_empty(),
        "{} sessions went wrong; the first ones:\n{}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n")
    );
    cut
}

// ---- 3. Parent crash ----

/// SIGKILL the parent while sessions are open: every session goes on echoing, and a new
/// forkecho binds the same port at its first attempt (no retry, no wait for the old sockets)
/// and serves new clients while the orphaned sessions still run.
#[test]
fn parent_crash_sessions_keep_echoing_and_restart_binds_same_port_at_once() {
    const SESSIONS: usize = 8;
    let mut first = Server::start();
    let addr = first.addr();
    let mut sessions: Vec<TcpStream> = (0..SESSIONS).map(|_| first.connect_greeted()).collect();
    // Declared after the sessions, so dropped before them: each orphan is killed while its
    // client is still connected, so the pid cannot have been reused by then.
    let _orphans: Vec<KillOnDrop> = children_serving(&first, &sessions)
        .into_iter()
        .map(|(pid, _)| KillOnDrop(pid))
        .collect();

    first.signal(Signal::SIGKILL);
    let crashed = Instant::now();
    let status = first.wait_exit(WAIT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    for (i, s) in sessions.iter_mut().enumerate() {
        let data = format!("orphan {i}\n").into_bytes();
        assert_eq!(
            echo_roundtrip(s, &data),
            data,
            "session {i} after the crash"
        );
    }

    // `start` spawns once and waits for `listening on`; a bind failure would exit 1 instead.
    let second = Server::builder().arg("-l").arg(addr.to_string()).start();
    let restarted_in = crashed.elapsed();
    assert_eq!(second.addr(), addr);
    let mut new = second.connect_greeted();
    assert_eq!(echo_roundtrip(&mut new, b"new\n"), b"new\n");
    let served_in = crashed.elapsed();
    for (i, s) in sessions.iter_mut().enumerate() {
        let data = format!("still {i}\n").into_bytes();
        assert_eq!(
            echo_roundtrip(s, &data),
            data,
            "session {i} after the restart"
        );
    }
    report(&format!(
        "parent crash: {SESSIONS} orphaned sessions kept echoing; restart listening on the same \
         port {restarted_in:?} after the crash (first attempt), new client served after \
         {served_in:?}"
    ));
}

// ---- 4. Descriptor exhaustion ----

/// The parent's soft RLIMIT_NOFILE lowered (as `prlimit --pid` does) to exactly the number of
/// descriptors it holds, so every accept fails with EMFILE: over 2 s it uses under 5% CPU (no
/// busy loop), logs one warning, serves nobody and does not exit; with the limit raised again
/// the waiting clients are greeted within 2 s.
#[test]
fn fd_exhaustion_under_5_percent_cpu_then_waiting_clients_served_within_2s() {
    const CLIENTS: usize = 4;
    const WINDOW: Duration = Duration::from_secs(2);
    const SERVE_BOUND: Duration = Duration::from_secs(2);
    let _heavy = heavy();
    let server = Server::start();
    let pid = server.pid();
    let held = fds_of(pid);
    // The lowest free number: every number below it is taken, so accept has none left. With
    // the usual gapless table that is exactly the number of descriptors held; a descriptor a
    // launcher leaked in higher up (a test harness may) is above it and does not count.
    let n = (0..).find(|fd| !held.contains(fd)).unwrap();
    let (soft, _) = set_soft_nofile_of(pid, n);

    // The handshakes complete in the kernel's backlog; accept then fails with EMFILE.
    let mut waiting: Vec<TcpStream> = (0..CLIENTS).map(|_| server.connect()).collect();
    server.wait_for_line("failed: too many open files");
    let before = cpu_ticks_of(pid);
    // Measuring CPU use over a window is the point here, not waiting for readiness.
    thread::sleep(WINDOW);
    let used = cpu_ticks_of(pid) - before;
    let percent = used as f64 * 100.0 / (ticks_per_second() as f64 * WINDOW.as_secs_f64());
    assert!(
        process_state(pid).is_some_and(|s| s != 'Z'),
        "the parent exited on EMFILE"
    );
    assert!(
        percent < 5.0,
        "the parent used {percent:.1}% CPU ({used} ticks) in {WINDOW:?} while accept failed"
    );
    assert_eq!(server.count_lines("accepted "), 0, "served without an fd?");
    assert_eq!(
        server.count_lines("failed: too many open files"),
        1,
        "one warning per run of failures"
    );

    let raised = Instant::now();
    set_soft_nofile_of(pid, soft);
    for client in &mut waiting {
        expect_banner(client);
    }
    let served_in = raised.elapsed();
    report(&format!(
        "fd exhaustion: limit {n} (descriptors held: {held:?}); parent CPU {percent:.1}% ({used} ticks) \
         over {WINDOW:?} of EMFILE; {CLIENTS} waiting clients greeted {served_in:?} after the \
         limit was raised"
    ));
    assert!(
        served_in <= SERVE_BOUND,
        "waiting clients greeted {served_in:?} after the limit was raised"
    );
    for (i, client) in waiting.iter_mut().enumerate() {
        let data = format!("waited {i}\n").into_bytes();
        assert_eq!(echo_roundtrip(client, &data), data);
    }
    server.wait_for_line("accepting again after");
    assert_serves(&server, b"still here\n");
}

// ---- 5. Fork failure ----

/// A real fork failure: the server runs as an otherwise unused uid with RLIMIT_NPROC 3 (the
/// parent and two children; root would bypass the limit, and `nobody` may own other
/// processes). A connection beyond the limit reads `refusal_message` instead of a banner;
/// the run of failures gets one WARN naming the peer, and accepting pauses between attempts
/// (clients wait in the backlog instead of each being accepted and closed); the parent
/// survives, its sessions are unharmed, and once a child exits a new client is served.
/// A server that can fork only two children: it runs as an otherwise unused uid with
/// RLIMIT_NPROC 3 (the parent and two children; root would bypass the limit, and `nobody`
/// may own other processes), with `busy\n` as its refusal message. None without root.
/// Holds the lock of the suite's one-at-a-time tests: every such server runs as the same
/// unused uid, and RLIMIT_NPROC counts that uid's processes in all of them.
fn server_with_two_process_slots() -> Option<(Server, MutexGuard<'static, ()>)> {
    use std::os::unix::process::CommandExt;

    if !is_root_or_skip("the fork failure test: only root can start the server as another user") {
        return None;
    }
    let heavy = heavy();
    let uid = unused_uid();
    // A copy in a world-readable directory, so that user may execute it wherever the tree is.
    let dir = TempDir::new();
    let program = dir.path().join("forkecho");
    copy_binary_to(&program);
    const NPROC: u64 = 3;
    let server = Server::builder()
        .program(program)
        .args(["--refusal-message", "busy\\n"])
        .tweak(move |cmd| {
            cmd.uid(uid).gid(uid);
            // Safe: setrlimit is async-signal-safe; this runs after setuid, just before exec.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NPROC,
                        NPROC,
                        NPROC,
                    )?;
                    Ok(())
                });
            }
        })
        .start();
    // The copy may go: the running process keeps its image.
    drop(dir);
    Some((server, heavy))
}

#[test]
fn fork_failure_refuses_with_message_pauses_and_serves_again_when_children_exit() {
    let Some((server, _heavy)) = server_with_two_process_slots() else {
        return;
    };
    let first = server.connect_greeted();
    let mut second = server.connect_greeted();
    for attempt in 0..2 {
        let mut refused = server.connect();
        let peer = refused.local_addr().unwrap();
        assert_eq!(
            read_to_eof(&mut refused),
            b"busy\n",
            "refusal_message, no banner"
        );
        let line = server.wait_for_line(&format!("cannot fork for {peer}"));
        // One warning per run of failures; the rest of the run is debug detail.
        let level = if attempt == 0 { " WARN " } else { " DEBUG " };
        assert!(line.contains(level), "attempt {attempt}: {line}");
    }
    assert!(process_state(server.pid()).is_some_and(|s| s != 'Z'));
    assert_eq!(echo_roundtrip(&mut second, b"two\n"), b"two\n");

    let first_peer = first.local_addr().unwrap();
    drop(first);
    server.wait_child_exit(first_peer, 0);
    let freed = Instant::now();
    assert_serves(&server, b"again\n");
    let served_in = freed.elapsed();
    server.wait_for_line("forking again after 2 failed attempts");
    let status = server.status_line();
    assert!(status.contains("2 fork failures"), "{status}");
    report(&format!(
        "fork failure: RLIMIT_NPROC 3: 2 connections refused, one warning; \
         served again {served_in:?} after a child exited"
    ));
}

// ---- 6. Signal barrage ----

const BARRAGE_SIGNALS: usize = 20_000;
const BARRAGE_CLIENTS: usize = 4;

/// Sends `n` signals to `pid`, cycling through SIGCHLD, SIGUSR1 and SIGHUP, in bursts of 100
/// with 10 ms between bursts so that the barrage lasts a couple of seconds of client traffic.
fn barrage(pid: Pid, n: usize) -> usize {
    const CYCLE: [Signal; 3] = [Signal::SIGCHLD, Signal::SIGUSR1, Signal::SIGHUP];
    for i in 0..n {
        kill(pid, CYCLE[i % CYCLE.len()]).expect("signal the server");
        if i % 100 == 99 {
            // The barrage's pace, not a wait for readiness.
            thread::sleep(Duration::from_millis(10));
        }
    }
    n
}

/// Back-to-back short sessions (connect, banner, echo, half-close, EOF) until `done`, at least
/// one. Returns (sessions completed, failures).
fn rate_client(addr: SocketAddr, id: u64, done: &AtomicBool) -> (usize, Vec<String>) {
    let mut noise = Noise::new(7000 + id);
    let (mut completed, mut failures) = (0, Vec::new());
    loop {
        let len = 1 + noise.below(2000) as usize;
        let data = noise.bytes(len);
        match short_session(addr, &data) {
            Ok(()) => completed += 1,
            Err(e) => failures.push(format!("client {id}, session {completed}: {e}")),
        }
        if done.load(Ordering::SeqCst) {
            return (completed, failures);
        }
    }
}

fn short_session(addr: SocketAddr, data: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut want = BANNER.to_vec();
    want.extend_from_slice(data);
    s.write_all(data).map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != want {
        return Err(format!("got {} bytes, want {}", got.len(), want.len()));
    }
    Ok(())
}

/// 20,000 signals (SIGCHLD, SIGUSR1, SIGHUP with a valid config file) at the parent while 4
/// clients open sessions back to back: zero failed connections, a long session undisturbed,
/// every SIGHUP a successful reload, no child killed, none left, and the parent still answers.
#[test]
fn signal_barrage_of_20000_during_4_client_connection_run_fails_no_connection() {
    let _heavy = heavy();
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\nidle_timeout = 60\n")
        .start();
    let (addr, pid) = (server.addr(), server.pid());
    let mut long = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut long, b"before\n"), b"before\n");

    let done = &AtomicBool::new(false);
    let started = Instant::now();
    let (sent, results) = thread::scope(|scope| {
        let _done = SetOnDrop(done);
        let clients: Vec<_> = (0..BARRAGE_CLIENTS as u64)
            .map(|id| scope.spawn(move || rate_client(addr, id, done)))
            .collect();
        let sent = barrage(pid, BARRAGE_SIGNALS);
        done.store(true, Ordering::SeqCst);
        let results: Vec<(usize, Vec<String>)> = clients
            .into_iter()
            .map(|c| c.join().expect("client thread"))
            .collect();
        (sent, results)
    });
    let took = started.elapsed();
    let completed: usize = results.iter().map(|(n, _)| n).sum();
    let failures: Vec<&String> = results.iter().flat_map(|(_, f)| f).collect();
    report(&format!(
        "signal barrage: {sent} signals in {took:?}; {completed} sessions by {BARRAGE_CLIENTS} \
         clients, {} failed; {} reloads and {} status lines logged",
        failures.len(),
        server.count_lines("reloaded configuration"),
        server.count_lines("status:"),
    ));
    assert!(failures.is_empty(), "failed connections: {failures:#?}");
    assert!(
        results.iter().all(|(n, _)| *n > 0),
        "a client completed no session"
    );

    assert_eq!(echo_roundtrip(&mut long, b"after\n"), b"after\n");
    assert_eq!(server.count_lines("reload refused"), 0);
    assert!(server.count_lines("reloaded configuration") > 0);
    assert_eq!(server.count_lines("shutting down"), 0);
    assert_eq!(server.count_lines("killed by signal"), 0);
    server.wait_for_lines("accepted ", completed + 1);
    assert_eq!(server.count_lines("accepted "), completed + 1);
    drop(long);
    assert_no_children(&server, "after the barrage");
    // Logged after the line of every child reaped so far: the count below is final.
    assert_status_zero_active(&server);
    assert_eq!(
        server.count_lines("exited with code 0 "),
        completed + 1,
        "every session ended cleanly"
    );
}

// ---- 7. Misbehaving clients ----

/// No child crashed (no core dump, no signal, no panic) and none is left, live or zombie.
fn assert_no_crash_no_zombie(server: &Server) {
    assert_no_children(server, "after the misbehaving client");
    // Logged after the line of every child reaped so far: once we have it, we have them all.
    assert_status_zero_active(server);
    for needle in ["core dumped", "killed by signal", "panicked"] {
        assert_eq!(server.count_lines(needle), 0, "a line with {needle:?}");
    }
}

/// A client that resets its connection (SO_LINGER 0) in mid-session, with echo data in flight
/// both ways: the child ends with code 5 (reset) or 6 (broken pipe), no crash, no zombie.
#[test]
fn client_reset_mid_session_ends_child_with_code_5_or_6_no_core_no_zombie() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"before\n"), b"before\n");
    let peer = s.local_addr().unwrap();
    // Mid-session: send until the buffers are full (the echo piles up unread on our side).
    s.set_nonblocking(true).unwrap();
    let chunk = Noise::new(61).bytes(16 * 1024);
    let mut sent = 0;
    while sent < (4 << 20) {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write before the reset: {e}"),
        }
    }
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);

    let ending = server.wait_child_ending(peer).how;
    assert!(
        ending == "exited with code 5" || ending == "exited with code 6",
        "child after a reset: {ending}"
    );
    assert_no_crash_no_zombie(&server);
    assert_serves(&server, b"after a reset\n");
    report(&format!(
        "reset mid-session after {sent} bytes in flight: child {ending}"
    ));
}

/// A client that sends and never reads (not even the banner): the child's echo blocks, and it
/// ends with code 4 (write timeout) after `idle_timeout`; no crash, no zombie.
#[test]
fn client_that_never_reads_ends_child_with_code_4_no_core_no_zombie() {
    let server = Server::builder().args(["--idle-timeout", "2"]).start();
    // A small receive buffer keeps the kernel from absorbing the whole echo.
    let s = connect_with_recv_buffer(server.addr(), 16 * 1024);
    let peer = s.local_addr().unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let chunk = Noise::new(62).bytes(64 * 1024);
        // Bounded; once the child gives up, writes fail (reset), which is expected.
        for _ in 0..256 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    server.child_pid_for(peer);
    let started = Instant::now();
    let ending = server.wait_child_ending(peer).how;
    let took = started.elapsed();
    assert_eq!(
        ending, "exited with code 4",
        "child of a client that never reads"
    );
    sender.join().expect("writer thread");
    drop(s);
    assert_no_crash_no_zombie(&server);
    report(&format!(
        "client that never reads: child {ending} {took:?} after it was forked"
    ));
}

/// A slowloris holds all `max_children` (4) sessions idle: the next client waits in the
/// backlog, and is served once the idle timeouts (1 s) fire, not before; the idle sessions
/// end with code 3; no crash, no zombie.
#[test]
fn slowloris_holding_max_children_next_client_served_once_idle_timeouts_fire() {
    const MAX: usize = 4;
    const IDLE: Duration = Duration::from_secs(1);
    let server = Server::builder()
        .args(["--max-children", "4", "--idle-timeout", "1"])
        .start();
    let mut idle: Vec<TcpStream> = (0..MAX).map(|_| server.connect_greeted()).collect();
    server.wait_for_line("max_children reached");
    let mut next = server.connect();
    let queued = Instant::now();
    expect_banner(&mut next);
    let waited = queued.elapsed();
    let next_peer = next.local_addr().unwrap();

    // The child may greet us before the parent's `accepted` line reaches our log reader.
    let accepted_line = server.wait_for_line(&format!("accepted {next_peer} "));
    let lines = server.log_lines();
    let first_timeout = lines.iter().position(|l| l.contains("exited with code 3 "));
    let accepted = lines.iter().position(|l| *l == accepted_line);
    assert!(
        matches!((first_timeout, accepted), (Some(t), Some(a)) if t < a),
        "the next client was accepted before any idle timeout fired (lines {first_timeout:?}, \
         {accepted:?})"
    );
    assert!(
        waited <= IDLE + Duration::from_secs(1),
        "the next client waited {waited:?} with an idle timeout of {IDLE:?}"
    );
    for (i, s) in idle.iter_mut().enumerate() {
        assert_closed_by_server(s, &format!("idle session {i}"));
    }
    server.wait_for_lines("exited with code 3 ", MAX);
    assert_eq!(echo_roundtrip(&mut next, b"served\n"), b"served\n");
    drop(next);
    server.wait_child_exit(next_peer, 0);
    assert_no_crash_no_zombie(&server);
    report(&format!(
        "slowloris: {MAX} idle sessions at max_children; the next client was served {waited:?} \
         after it queued (idle timeout {IDLE:?})"
    ));
}

/// One fork failure pauses accepting at once: the clients queued behind the one it refused
/// stay in the backlog, and the next attempts come after growing pauses, not in the same
/// millisecond (the log's timestamps tell).
#[test]
fn fork_failure_leaves_the_queued_clients_in_the_backlog() {
    let Some((server, _heavy)) = server_with_two_process_slots() else {
        return;
    };
    let _held = [server.connect_greeted(), server.connect_greeted()];
    server.freeze();
    let _queued: Vec<TcpStream> = (0..10).map(|_| server.connect()).collect();
    server.signal(Signal::SIGCONT);
    server.wait_for_lines("cannot fork for", 3);
    let times: Vec<f64> = server
        .log_lines()
        .iter()
        .filter(|l| l.contains("cannot fork for"))
        .map(|l| LogLine::parse(l).expect("a whole line").seconds_of_day())
        .collect();
    for pair in times.windows(2).take(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= 0.09, "fork attempts {gap:.3} s apart: {times:?}");
    }
}

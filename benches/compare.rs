//! `cargo bench`: forkecho against the servers a user would pick instead, measured in the same
//! run and interleaved (A B C … A B C …) so that machine drift cancels out. Prints a table with
//! every figure and its ratio to forkecho, and writes it to BENCHMARKS.md.
//!
//! Contenders, each a separate process on its own loopback port, killed by pid at the end:
//! - forkecho (the release binary), with limits lifted so the load itself is not refused;
//! - the seed's C++ server (`../shared/peers/seed-server PORT`), when that script exists;
//! - `tcpserver … cat` (ucspi-tcp) and `socat …,fork PIPE`, when installed;
//! - two floors built into this bench: an in-process mio echo (no fork at all) and a bare
//!   fork-per-connection loop with SIGCHLD ignored (no logging, no reaping, no limits). Both
//!   run as re-executions of this binary (`--serve-floor`), so the bench never forks while it
//!   has threads.
//!
//! Phases:
//! 1. connection rate at 1, 4 and 16 clients (connect → banner → 64-byte echo → close):
//!    connections/s, p50 and p99 latency;
//! 2. one-stream echo throughput, writer and reader concurrent, every byte checked;
//! 3. 10,000 sessions held at once (each opened with connect → banner → echo), an echo on every
//!    one again, then all closed: failed sessions, the server's (parent's) RSS and the median
//!    USS of its children (Private_Clean + Private_Dirty of `/proc/PID/smaps_rollup`), all
//!    taken while the sessions are held;
//! 4. reap storm: 1,000 sessions, every child SIGKILLed at once, time until the last one is
//!    reaped, while one more client keeps connecting (sessions served during the storm and
//!    their worst latency show that the parent still accepts).
//!
//! Phases 3 and 4 run one round (they are heavy) and one contender at a time: each waits until
//! the previous contender's children are gone. The bench lifts its soft RLIMIT_NOFILE to the
//! hard limit first, before any contender starts, so the floors inherit it too.
//! `--quick` shrinks every count for a smoke run; `--only NAME` and `--phase N` (both
//! repeatable) select contenders and phases, and such a partial run does not write BENCHMARKS.md.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BANNER: &[u8] = b"connect successful!\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-floor") {
        let port: u16 = args[i + 2].parse().expect("floor port");
        match args[i + 1].as_str() {
            "mio" => floors::mio_echo(port),
            "fork" => floors::fork_loop(port),
            other => panic!("unknown floor {other}"),
        }
    }
    let quick = args.iter().any(|a| a == "--quick");
    let plan = if quick { Plan::quick() } else { Plan::full() };
    // Before any contender starts: the re-executed floors inherit the raised limit.
    let nofile = raise_nofile_limit();
    if nofile < plan.sessions as u64 + 100 {
        eprintln!(
            "note: RLIMIT_NOFILE is {nofile}: phase 3 cannot hold {} sessions",
            plan.sessions
        );
    }
    // `--only NAME` (repeatable): keep the contenders whose name contains NAME, for profiling
    // one server at a time. The first kept one is the base of the ratios.
    let only: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--only")
        .map(|w| w[1].as_str())
        .collect();
    let contenders = start_contenders(&only);
    println!(
        "forkecho bench ({}): {} contenders, {} round(s)",
        if quick { "quick" } else { "full" },
        contenders.len(),
        plan.rounds
    );
    // `--phase N` (repeatable): run only these phases.
    let phases: Vec<u32> = args
        .windows(2)
        .filter(|w| w[0] == "--phase")
        .map(|w| w[1].parse().expect("--phase takes a number"))
        .collect();
    let runs = |phase: u32| phases.is_empty() || phases.contains(&phase);
    let partial = !only.is_empty() || !phases.is_empty();
    let mut table = Vec::new();
    for clients in [1, 4, 16].into_iter().filter(|_| runs(1)) {
        eprintln!("phase 1: connection rate, {clients} client(s)");
        let results = interleave(&contenders, plan.rounds, |c| {
            connection_rate(c, clients, plan.rate_trial)
        });
        table.extend(rate_rows(&contenders, clients, &results));
    }
    if runs(2) {
        eprintln!("phase 2: one-stream echo, {} MiB", plan.stream_bytes >> 20);
        let results = interleave(&contenders, plan.rounds, |c| stream(c, plan.stream_bytes));
        table.extend(stream_rows(&contenders, plan.stream_bytes, &results));
    }
    if runs(3) {
        eprintln!("phase 3: {} sessions held at once", plan.sessions);
        let results = interleave(&contenders, 1, |c| hold_sessions(c, plan.sessions));
        table.extend(hold_rows(&contenders, plan.sessions, &results));
    }
    if runs(4) {
        eprintln!("phase 4: reap storm, {} children", plan.storm);
        // A server without children has nothing to reap.
        let results = interleave(&contenders, 1, |c| {
            c.forks().then(|| reap_storm(c, plan.storm))
        });
        table.extend(storm_rows(&contenders, plan.storm, &results));
    }
    let report = render(&table, quick);
    println!("{report}");
    // Only a full run of everything is the record.
    if !quick && !partial {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
        std::fs::write(path, &report).expect("write BENCHMARKS.md");
        println!("written to {path}");
    }
}

/// How much to measure.
struct Plan {
    rounds: usize,
    rate_trial: Duration,
    stream_bytes: usize,
    /// Phase 3: sessions held at once.
    sessions: usize,
    /// Phase 4: children killed at once.
    storm: usize,
}

impl Plan {
    fn full() -> Self {
        Plan {
            rounds: 3,
            rate_trial: Duration::from_secs(2),
            stream_bytes: 1 << 30,
            sessions: 10_000,
            storm: 1_000,
        }
    }

    fn quick() -> Self {
        Plan {
            rounds: 1,
            rate_trial: Duration::from_millis(300),
            stream_bytes: 16 << 20,
            sessions: 200,
            storm: 100,
        }
    }
}

/// One server under test.
struct Contender {
    name: &'static str,
    addr: SocketAddr,
    /// Bytes it sends before echoing (the seed's greeting carries a stray NUL: 21).
    banner: usize,
    process: Child,
}

/// The one contender that serves every client in its own process, without children.
const MIO_FLOOR: &str = "mio echo, no fork (floor)";

impl Contender {
    /// The process we started: the server itself (every script here execs its server).
    fn pid(&self) -> Pid {
        Pid::from_raw(self.process.id() as i32)
    }

    fn forks(&self) -> bool {
        self.name != MIO_FLOOR
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        // By pid: the process we started (every script here execs its server).
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A contender before it runs: name, banner length, and its command line for a port.
type Spec = (&'static str, usize, Box<dyn Fn(u16) -> Command>);

/// forkecho on `port`, without the limits that would refuse a load generator on one address.
fn forkecho_command(program: &str, port: u16) -> Command {
    let mut c = Command::new(program);
    c.args(["-l", &format!("127.0.0.1:{port}")]).args([
        "--max-per-source",
        "0",
        "--max-children",
        "20000",
    ]);
    c
}

/// Starts every contender that can run here and waits until each accepts connections.
fn start_contenders(only: &[&str]) -> Vec<Contender> {
    let me = std::env::current_exe().expect("bench binary");
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/peers/seed-server");
    let mut specs: Vec<Spec> = vec![
        (
            "forkecho",
            BANNER.len(),
            Box::new(|port| forkecho_command(env!("CARGO_BIN_EXE_forkecho"), port)),
        ),
        (
            MIO_FLOOR,
            BANNER.len(),
            Box::new(move |port| {
                let mut c = Command::new(&me);
                c.args(["--serve-floor", "mio", &port.to_string()]);
                c
            }),
        ),
    ];
    // For A/B profiling: another build of forkecho (say, other link flags) measured beside
    // this one in the same interleaved run.
    if let Ok(alt) = std::env::var("FORKECHO_BENCH_ALT") {
        specs.push((
            "forkecho (FORKECHO_BENCH_ALT)",
            BANNER.len(),
            Box::new(move |port| forkecho_command(&alt, port)),
        ));
    }
    let me = std::env::current_exe().expect("bench binary");
    specs.push((
        "bare fork loop (floor)",
        BANNER.len(),
        Box::new(move |port| {
            let mut c = Command::new(&me);
            c.args(["--serve-floor", "fork", &port.to_string()]);
            c
        }),
    ));
    if std::path::Path::new(seed).exists() {
        specs.push((
            "seed C++ server",
            BANNER.len() + 1,
            Box::new(move |port| {
                let mut c = Command::new(seed);
                c.arg(port.to_string());
                c
            }),
        ));
    } else {
        eprintln!("note: {seed} not found; the seed's server is left out");
    }
    if installed("tcpserver") {
        specs.push((
            "tcpserver + cat",
            0,
            Box::new(|port| {
                let mut c = Command::new("tcpserver");
                c.args(["-q", "-R", "-H", "-l", "0", "-c", "20000", "-b", "1024"])
                    .args(["127.0.0.1", &port.to_string(), "cat"]);
                c
            }),
        ));
    } else {
        eprintln!("note: tcpserver (ucspi-tcp) not installed; left out");
    }
    if installed("socat") {
        specs.push((
            "socat fork PIPE",
            0,
            Box::new(|port| {
                let mut c = Command::new("socat");
                c.arg(format!(
                    "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
                ))
                .arg("PIPE");
                c
            }),
        ));
    } else {
        eprintln!("note: socat not installed; left out");
    }
    specs
        .into_iter()
        .filter(|(name, ..)| only.is_empty() || only.iter().any(|o| name.contains(o)))
        .map(|(name, banner, command)| {
            let port = free_port();
            let process = command(port)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {name}: {e}"));
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let contender = Contender {
                name,
                addr,
                banner,
                process,
            };
            wait_accepting(&contender);
            contender
        })
        .collect()
}

/// Readiness by connecting (the seed's build may take a few seconds the first time).
fn wait_accepting(c: &Contender) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(c.addr) {
            let mut banner = vec![0; c.banner];
            if s.read_exact(&mut banner).is_ok() {
                return;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("{} did not start accepting on {}", c.name, c.addr);
}

/// Runs `trial` for every contender, `rounds` times, alternating contenders each round.
fn interleave<T>(
    contenders: &[Contender],
    rounds: usize,
    mut trial: impl FnMut(&Contender) -> T,
) -> Vec<Vec<T>> {
    let mut results: Vec<Vec<T>> = contenders.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, c) in contenders.iter().enumerate() {
            results[i].push(trial(c));
        }
    }
    results
}

/// Connections completed and their latencies in one trial.
struct RateTrial {
    elapsed: Duration,
    latencies: Vec<Duration>,
    failures: usize,
}

/// `clients` threads each loop connect → banner → 64-byte echo → close for `length`.
fn connection_rate(c: &Contender, clients: usize, length: Duration) -> RateTrial {
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, banner) = (c.addr, c.banner);
            thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut failures = 0;
                let end = Instant::now() + length;
                let payload = [b'x'; 64];
                while Instant::now() < end {
                    let t = Instant::now();
                    match one_session(addr, banner, &payload) {
                        Ok(()) => latencies.push(t.elapsed()),
                        Err(_) => failures += 1,
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut trial = RateTrial {
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        failures: 0,
    };
    for w in workers {
        let (latencies, failures) = w.join().expect("client thread");
        trial.latencies.extend(latencies);
        trial.failures += failures;
    }
    trial.elapsed = started.elapsed();
    trial
}

fn one_session(addr: SocketAddr, banner: usize, payload: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; 128];
    s.read_exact(&mut buf[..banner])?;
    s.write_all(payload)?;
    s.read_exact(&mut buf[..payload.len()])?;
    Ok(())
}

/// The stream is this many bytes of a fixed pattern, over and over.
const PATTERN: usize = 256 * 1024;

/// One stream of `bytes` through the contender, written and read concurrently, checked.
fn stream(c: &Contender, bytes: usize) -> Duration {
    let mut s = TcpStream::connect(c.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut banner = vec![0; c.banner];
    s.read_exact(&mut banner).expect("banner");
    let mut writer = s.try_clone().unwrap();
    let started = Instant::now();
    let pattern: Vec<u8> = (0..PATTERN).map(|i| (i % 251) as u8).collect();
    let chunk = pattern.clone();
    let sender = thread::spawn(move || {
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            writer.write_all(&chunk[..n]).expect("write");
            sent += n;
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("{}: read: {e}", c.name),
        };
        // Every byte checked, a slice at a time: the stream repeats `pattern` end to end.
        let mut i = 0;
        while i < n {
            let k = (got + i) % PATTERN;
            let m = (n - i).min(PATTERN - k);
            assert!(
                buf[i..i + m] == pattern[k..k + m],
                "{}: echo differs near byte {}",
                c.name,
                got + i
            );
            i += m;
        }
        got += n;
    }
    sender.join().expect("writer");
    assert_eq!(got, bytes, "{}: stream length", c.name);
    started.elapsed()
}

/// Lifts this process's soft RLIMIT_NOFILE to its hard limit and returns the soft limit now in
/// force. Phase 3 holds one client socket per session here, and the mio floor (which inherits
/// the limit) one per session there.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Bound on every connect, read and write in phases 3 and 4, so that nothing hangs.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one session of phases 3 and 4 may keep failing (connect refused or timed out,
/// banner or echo late) and be retried before it counts as failed. The same rule for everyone:
/// the seed listens with a backlog of 36 and may need a retry that the others do not.
const RETRY_BUDGET: Duration = Duration::from_secs(5);

/// Threads opening sessions in phases 3 and 4, each with one session in flight at a time: a
/// few connects at once keep the pace up but never overflow even the seed's backlog of 36.
const OPENERS: usize = 4;

/// Bound on waiting for a server's children to appear (forks lag connects) or to be gone.
const CHILDREN_WAIT: Duration = Duration::from_secs(120);

/// What phases 3 and 4 echo on each session.
const SESSION_PAYLOAD: &[u8] = b"still there?\n";

/// Prints "LABEL: WHAT 2500/10000" each time `done` crosses another quarter of `total`.
struct Progress<'a> {
    label: &'a str,
    what: &'static str,
    total: usize,
    printed: usize,
}

impl<'a> Progress<'a> {
    fn new(label: &'a str, what: &'static str, total: usize) -> Self {
        Progress {
            label,
            what,
            total,
            printed: 0,
        }
    }

    fn update(&mut self, done: usize) {
        let quarter = (self.total / 4).max(1);
        if done >= self.printed + quarter || (done == self.total && done > self.printed) {
            self.printed = done;
            eprintln!("{}: {} {done}/{}", self.label, self.what, self.total);
        }
    }
}

/// connect → banner → echo of `payload`, every step bounded by IO_TIMEOUT; the stream is kept.
fn open_session(c: &Contender, payload: &[u8]) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&c.addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    let mut banner = vec![0; c.banner];
    s.read_exact(&mut banner)?;
    echo(&mut s, payload)?;
    Ok(s)
}

/// Writes `payload` and checks that exactly it comes back.
fn echo(s: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    s.write_all(payload)?;
    let mut back = vec![0; payload.len()];
    s.read_exact(&mut back)?;
    if back != payload {
        return Err(io::Error::new(ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}

/// `open_session`, retried for up to RETRY_BUDGET; None when the budget ran out.
fn open_with_retries(c: &Contender) -> Option<TcpStream> {
    let deadline = Instant::now() + RETRY_BUDGET;
    loop {
        match open_session(c, SESSION_PAYLOAD) {
            Ok(s) => return Some(s),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
}

/// Opens `n` sessions from OPENERS threads and keeps them: the open streams, and how many
/// sessions failed.
///
/// Each session is served (its echo came back) before its thread connects again, which paces
/// the connects to the server's accept rate, and means every forking server has its child by
/// the time this returns.
fn open_sessions(c: &Contender, n: usize, label: &str) -> (Vec<TcpStream>, usize) {
    let attempted = AtomicUsize::new(0);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..OPENERS)
            .map(|w| {
                let attempted = &attempted;
                scope.spawn(move || {
                    let mut streams = Vec::new();
                    let mut failed = 0;
                    for _ in (w..n).step_by(OPENERS) {
                        match open_with_retries(c) {
                            Some(s) => streams.push(s),
                            None => failed += 1,
                        }
                        attempted.fetch_add(1, Relaxed);
                    }
                    (streams, failed)
                })
            })
            .collect();
        let mut progress = Progress::new(label, "opened", n);
        while !workers.iter().all(|w| w.is_finished()) {
            progress.update(attempted.load(Relaxed));
            thread::sleep(Duration::from_millis(50));
        }
        progress.update(attempted.load(Relaxed));
        let mut all = Vec::with_capacity(n);
        let mut failed = 0;
        for w in workers {
            let (streams, f) = w.join().expect("opener thread");
            all.extend(streams);
            failed += f;
        }
        (all, failed)
    })
}

/// Polls the server's children (every 50 ms, up to CHILDREN_WAIT) until `enough` says their
/// number is right; returns the last number seen.
fn wait_children(c: &Contender, enough: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + CHILDREN_WAIT;
    loop {
        let count = procfs::children_of(c.pid()).len();
        if enough(count) || Instant::now() >= deadline {
            return count;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Closes `streams` (the client closes first, with a FIN: the seed's child spins on a read
/// error, so no reset) and waits until the server has reaped every child, so that contenders
/// never overlap.
fn close_and_drain(c: &Contender, streams: Vec<TcpStream>, label: &str) {
    let closed = Instant::now();
    drop(streams);
    let left = wait_children(c, |count| count == 0);
    if left > 0 {
        eprintln!("{label}: warning: {left} children still there after {CHILDREN_WAIT:?}");
    } else {
        eprintln!(
            "{label}: closed; children gone after {:.1} s",
            closed.elapsed().as_secs_f64()
        );
    }
}

/// Phase 3 for one contender.
struct Held {
    failures: usize,
    parent_rss_kib: Option<u64>,
    /// None for a server without children.
    median_child_uss_kib: Option<u64>,
}

/// Opens `n` sessions, echoes on each again, measures the server's memory while they are all
/// held, and closes them.
fn hold_sessions(c: &Contender, n: usize) -> Held {
    let started = Instant::now();
    let label = format!("phase 3: {n} sessions, {}", c.name);
    let (mut streams, open_failures) = open_sessions(c, n, &label);
    let echo_failures = streams
        .iter_mut()
        .map(|s| echo(s, SESSION_PAYLOAD))
        .filter(Result::is_err)
        .count();
    eprintln!(
        "{label}: {} held, {open_failures} failed to open, {echo_failures} failed to echo again",
        streams.len()
    );
    // Each session's echo came from its child, so they should all be there already; the
    // bounded wait is a safeguard, and the count is printed.
    let children = if c.forks() {
        wait_children(c, |count| count >= streams.len())
    } else {
        0
    };
    let held = Held {
        failures: open_failures + echo_failures,
        parent_rss_kib: procfs::vm_rss_kib(c.pid()),
        median_child_uss_kib: median_child_uss_kib(c.pid()),
    };
    eprintln!(
        "{label}: {children} children, parent RSS {}, median child USS {}",
        kib_text(held.parent_rss_kib),
        kib_text(held.median_child_uss_kib)
    );
    close_and_drain(c, streams, &label);
    eprintln!("{label}: done in {:.1} s", started.elapsed().as_secs_f64());
    held
}

fn kib_text(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{k} KiB"))
}

/// Largest number of children whose smaps_rollup phase 3 reads (each read walks the whole
/// address space of the child).
const USS_SAMPLE: usize = 200;

/// Median USS of up to USS_SAMPLE of `server`'s children, chosen evenly among them.
fn median_child_uss_kib(server: Pid) -> Option<u64> {
    let children = procfs::children_of(server);
    let step = children.len().div_ceil(USS_SAMPLE).max(1);
    let mut uss: Vec<u64> = children
        .iter()
        .step_by(step)
        .filter_map(|child| procfs::uss_kib(child.pid))
        .collect();
    uss.sort_unstable();
    uss.get(uss.len() / 2).copied()
}

/// Phase 4 for one contender.
struct Storm {
    killed: usize,
    /// From the first kill until no killed child is left; None if that took over CHILDREN_WAIT.
    reap_time: Option<Duration>,
    /// Sessions of the probing client that overlapped the storm, their failures and the
    /// slowest one.
    served: usize,
    failed: usize,
    max_latency: Duration,
}

/// Opens `n` sessions, SIGKILLs every child of the server at once, and times until the last one
/// is reaped, while another client keeps connecting.
fn reap_storm(c: &Contender, n: usize) -> Storm {
    let label = format!("phase 4: {n} children, {}", c.name);
    let (streams, open_failures) = open_sessions(c, n, &label);
    if open_failures > 0 {
        eprintln!("{label}: {open_failures} sessions failed to open");
    }
    wait_children(c, |count| count >= streams.len());
    // Listed before the prober starts, so its own children are not among the victims.
    let victims = procfs::children_of(c.pid());
    let (stop, started) = (AtomicBool::new(false), AtomicBool::new(false));
    let (storm, probes) = thread::scope(|scope| {
        let prober = scope.spawn(|| probe_until(c, &stop, &started));
        // The prober is connecting (one session done) before the first kill.
        while !started.load(Relaxed) && !prober.is_finished() {
            thread::sleep(Duration::from_millis(1));
        }
        let first_kill = Instant::now();
        for v in &victims {
            let _ = kill(v.pid, Signal::SIGKILL);
        }
        let reap_time = wait_reaped(c.pid(), &victims, first_kill);
        let last_reaped = Instant::now();
        stop.store(true, Relaxed);
        let probes = prober.join().expect("prober thread");
        ((first_kill, last_reaped, reap_time), probes)
    });
    let (first_kill, last_reaped, reap_time) = storm;
    // The sessions that were in progress at some moment of the storm.
    let during: Vec<&Probe> = probes
        .iter()
        .filter(|p| p.end >= first_kill && p.start <= last_reaped)
        .collect();
    let result = Storm {
        killed: victims.len(),
        reap_time,
        served: during.iter().filter(|p| p.ok).count(),
        failed: during.iter().filter(|p| !p.ok).count(),
        max_latency: during
            .iter()
            .map(|p| p.end - p.start)
            .max()
            .unwrap_or_default(),
    };
    eprintln!(
        "{label}: {} killed, reaped in {}, {} sessions served during the storm ({} failed), \
         max latency {:.1} ms",
        result.killed,
        reap_time.map_or("(timeout)".into(), |t| format!(
            "{:.1} ms",
            t.as_secs_f64() * 1e3
        )),
        result.served,
        result.failed,
        result.max_latency.as_secs_f64() * 1e3
    );
    close_and_drain(c, streams, &label);
    result
}

/// One session of the probing client.
struct Probe {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// connect → banner → echo → close, over and over until `stop`; sets `started` after the first.
fn probe_until(c: &Contender, stop: &AtomicBool, started: &AtomicBool) -> Vec<Probe> {
    let mut probes = Vec::new();
    while !stop.load(Relaxed) {
        let start = Instant::now();
        // No retries here: a session refused or late during the storm is what we look for.
        let ok = open_session(c, SESSION_PAYLOAD).is_ok();
        probes.push(Probe {
            start,
            end: Instant::now(),
            ok,
        });
        started.store(true, Relaxed);
    }
    probes
}

/// Time from `since` until none of `victims` is `server`'s child any more (a zombie still is:
/// it keeps its parent until reaped), polled about every millisecond; None after CHILDREN_WAIT.
///
/// The victims are checked in order and the poll stays on the first one still there, so each
/// poll costs one /proc read while waiting and the whole wait reads each victim's entry about
/// once more than needed.
fn wait_reaped(server: Pid, victims: &[procfs::Proc], since: Instant) -> Option<Duration> {
    let mut next = 0;
    loop {
        while next < victims.len() && !victims[next].is_child_of(server) {
            next += 1;
        }
        if next == victims.len() {
            return Some(since.elapsed());
        }
        if since.elapsed() > CHILDREN_WAIT {
            return None;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// A table row: metric, contender, value, and the value's ratio to forkecho's.
struct Row {
    metric: String,
    contender: &'static str,
    value: f64,
    unit: &'static str,
    ratio: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rate_rows(contenders: &[Contender], clients: usize, results: &[Vec<RateTrial>]) -> Vec<Row> {
    let mut per = Vec::new();
    for (c, trials) in contenders.iter().zip(results) {
        let mut lat: Vec<Duration> = trials.iter().flat_map(|t| t.latencies.clone()).collect();
        lat.sort_unstable();
        let secs: f64 = trials.iter().map(|t| t.elapsed.as_secs_f64()).sum();
        let failures: usize = trials.iter().map(|t| t.failures).sum();
        per.push((
            c.name,
            lat.len() as f64 / secs,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            failures,
        ));
    }
    let base = per[0];
    let mut rows = Vec::new();
    for (name, rate, p50, p99, failures) in per {
        rows.push(Row {
            metric: format!("conn/s, {clients} client(s)"),
            contender: name,
            value: rate,
            unit: "/s",
            ratio: rate / base.1,
        });
        rows.push(Row {
            metric: format!("p50 latency, {clients} client(s)"),
            contender: name,
            value: p50.as_secs_f64() * 1e6,
            unit: "µs",
            ratio: p50.as_secs_f64() / base.2.as_secs_f64().max(1e-9),
        });
        rows.push(Row {
            metric: format!("p99 latency, {clients} client(s)"),
            contender: name,
            value: p99.as_secs_f64() * 1e6,
            unit: "µs",
            ratio: p99.as_secs_f64() / base.3.as_secs_f64().max(1e-9),
        });
        if failures > 0 {
            rows.push(Row {
                metric: format!("failed sessions, {clients} client(s)"),
                contender: name,
                value: failures as f64,
                unit: "",
                ratio: f64::NAN,
            });
        }
    }
    rows
}

fn stream_rows(contenders: &[Contender], bytes: usize, results: &[Vec<Duration>]) -> Vec<Row> {
    let mut per = Vec::new();
    for (c, trials) in contenders.iter().zip(results) {
        let secs: f64 = trials.iter().map(Duration::as_secs_f64).sum();
        let mib = (bytes * trials.len()) as f64 / f64::from(1 << 20);
        per.push((c.name, mib / secs));
    }
    let base = per[0].1;
    per.into_iter()
        .map(|(name, mib_per_sec)| Row {
            metric: format!("one-stream echo, {} MiB", bytes >> 20),
            contender: name,
            value: mib_per_sec,
            unit: "MiB/s",
            ratio: mib_per_sec / base,
        })
        .collect()
}

/// `value / base`, or NaN (shown as "-") where there is nothing to divide by.
fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 && value.is_finite() {
        value / base
    } else {
        f64::NAN
    }
}

fn hold_rows(contenders: &[Contender], n: usize, results: &[Vec<Held>]) -> Vec<Row> {
    // KiB as a figure; NaN (shown as "-") when unknown or when there are no children.
    let kib = |k: Option<u64>| k.map_or(f64::NAN, |k| k as f64);
    let base = &results[0][0];
    let mut rows = Vec::new();
    for (c, trials) in contenders.iter().zip(results) {
        let held = &trials[0];
        rows.push(Row {
            metric: format!("failed sessions, {n} held"),
            contender: c.name,
            value: held.failures as f64,
            unit: "sessions",
            ratio: f64::NAN,
        });
        let rss = kib(held.parent_rss_kib) / 1024.0;
        rows.push(Row {
            metric: format!("parent RSS at {n} sessions"),
            contender: c.name,
            value: rss,
            unit: "MiB",
            ratio: ratio(rss, kib(base.parent_rss_kib) / 1024.0),
        });
        let uss = kib(held.median_child_uss_kib);
        rows.push(Row {
            metric: format!("median child USS at {n} sessions"),
            contender: c.name,
            value: uss,
            unit: "KiB",
            ratio: ratio(uss, kib(base.median_child_uss_kib)),
        });
    }
    rows
}

fn storm_rows(contenders: &[Contender], n: usize, results: &[Vec<Option<Storm>>]) -> Vec<Row> {
    let storms: Vec<(&'static str, &Storm)> = contenders
        .iter()
        .zip(results)
        .filter_map(|(c, trials)| Some((c.name, trials[0].as_ref()?)))
        .collect();
    let Some(&(_, base)) = storms.first() else {
        return Vec::new();
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // A storm not over within CHILDREN_WAIT is shown as that long, marked.
    let reap_ms = |s: &Storm| ms(s.reap_time.unwrap_or(CHILDREN_WAIT));
    let mut rows = Vec::new();
    for (name, storm) in storms {
        rows.push(Row {
            metric: format!("reap storm, {n} children SIGKILLed"),
            contender: name,
            value: reap_ms(storm),
            unit: if storm.reap_time.is_some() {
                "ms"
            } else {
                "ms (timed out)"
            },
            ratio: ratio(reap_ms(storm), reap_ms(base)),
        });
        rows.push(Row {
            metric: format!("served during the reap storm, {n} children"),
            contender: name,
            value: storm.served as f64,
            unit: "sessions",
            ratio: ratio(storm.served as f64, base.served as f64),
        });
        rows.push(Row {
            metric: format!("max latency during the reap storm, {n} children"),
            contender: name,
            value: ms(storm.max_latency),
            unit: "ms",
            ratio: ratio(ms(storm.max_latency), ms(base.max_latency)),
        });
        if storm.failed > 0 {
            rows.push(Row {
                metric: format!("failed during the reap storm, {n} children"),
                contender: name,
                value: storm.failed as f64,
                unit: "",
                ratio: f64::NAN,
            });
        }
    }
    rows
}

/// The table, as Markdown, with the machine it was measured on.
fn render(rows: &[Row], quick: bool) -> String {
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = format!(
        "# forkecho benchmarks\n\nMeasured by `cargo bench`{} on {cores} cores, Linux {}; \
         contenders interleaved in the same run. Ratio = value / forkecho's value \
         (for latencies, memory and reap time, lower is better; - = not applicable).\n\n| metric | contender | value | ratio to forkecho |\n|---|---|---:|---:|\n",
        if quick { " -- --quick (smoke run, not for comparison)" } else { "" },
        kernel.trim()
    );
    for r in rows {
        // NaN: not applicable (no children) or nothing to compare with.
        let value = if r.value.is_nan() {
            "-".to_string()
        } else if r.unit.is_empty() || r.unit == "sessions" {
            // A count.
            format!("{:.0} {}", r.value, r.unit).trim_end().to_string()
        } else {
            format!("{:.1} {}", r.value, r.unit)
        };
        let ratio = if r.ratio.is_nan() {
            "-".to_string()
        } else {
            format!("{:.2}×", r.ratio)
        };
        out.push_str(&format!(
            "| {} | {} | {value} | {ratio} |\n",
            r.metric, r.contender
        ));
    }
    out
}

mod procfs {
    //! What phases 3 and 4 read from /proc about a server and its children.

    use nix::unistd::Pid;

    /// A process, with its start time so that a recycled pid is not taken for it.
    pub struct Proc {
        pub pid: Pid,
        start: u64,
    }

    impl Proc {
        /// False once the process is gone or reaped: a zombie still has its parent.
        pub fn is_child_of(&self, parent: Pid) -> bool {
            stat(self.pid).is_some_and(|(ppid, start)| ppid == parent && start == self.start)
        }
    }

    /// Parent pid and start time (clock ticks since boot) from /proc/PID/stat.
    fn stat(pid: Pid) -> Option<(Pid, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name, in parentheses, may hold spaces and parentheses itself: the fields
        // that follow start after the last ')'. There, field 3 (state) is the first.
        let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let start = fields.get(19)?.parse().ok()?;
        Some((Pid::from_raw(ppid), start))
    }

    /// Every process whose parent is `parent`, zombies included, by scanning /proc (the
    /// kernel's `task/PID/children` list is not built on every kernel).
    pub fn children_of(parent: Pid) -> Vec<Proc> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut children: Vec<Proc> = dir
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .map(Pid::from_raw)
            .filter_map(|pid| match stat(pid)? {
                (ppid, start) if ppid == parent => Some(Proc { pid, start }),
                _ => None,
            })
            .collect();
        children.sort_unstable_by_key(|p| p.pid.as_raw());
        children
    }

    /// One "Name:   123 kB" figure of a /proc file, in KiB.
    fn kib_field(text: &str, name: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    }

    /// Resident set of the process (VmRSS).
    pub fn vm_rss_kib(pid: Pid) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        kib_field(&status, "VmRSS:")
    }

    /// Unique set of the process: the pages only it maps (Private_Clean + Private_Dirty).
    pub fn uss_kib(pid: Pid) -> Option<u64> {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        Some(kib_field(&rollup, "Private_Clean:")? + kib_field(&rollup, "Private_Dirty:")?)
    }
}

mod floors {
    //! The two floors: what the machine does with no supervision at all.

    use std::collections::HashMap;
    use std::io::{ErrorKind, Read, Write};

    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Poll, Token};

    use super::BANNER;

    /// In-process echo on one mio loop: no fork, no process per client.
    pub fn mio_echo(port: u16) -> ! {
        let mut poll = Poll::new().unwrap();
        let mut listener = TcpListener::bind(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
        const LISTENER: Token = Token(usize::MAX);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .unwrap();
        let mut conns: HashMap<usize, (TcpStream, Vec<u8>)> = HashMap::new();
        let mut next = 0usize;
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            poll.poll(&mut events, None).ok();
            for event in events.iter() {
                if event.token() == LISTENER {
                    while let Ok((mut s, _)) = listener.accept() {
                        let token = Token(next);
                        next += 1;
                        poll.registry()
                            .register(&mut s, token, Interest::READABLE | Interest::WRITABLE)
                            .unwrap();
                        conns.insert(token.0, (s, BANNER.to_vec()));
                    }
                    continue;
                }
                let id = event.token().0;
                let Some((s, pending)) = conns.get_mut(&id) else {
                    continue;
                };
                let mut done = false;
                loop {
                    // Flush what is owed before reading more.
                    while !pending.is_empty() {
                        match s.write(pending) {
                            Ok(n) => {
                                pending.drain(..n);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(_) => {
                                done = true;
                                break;
                            }
                        }
                    }
                    if done || !pending.is_empty() {
                        break;
                    }
                    match s.read(&mut buf) {
                        Ok(0) => {
                            done = true;
                            break;
                        }
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => {
                            done = true;
                            break;
                        }
                    }
                }
                if done {
                    if let Some((mut s, _)) = conns.remove(&id) {
                        let _ = poll.registry().deregister(&mut s);
                    }
                }
            }
        }
    }

    /// The bare fork-per-connection loop: SIGCHLD ignored (the kernel reaps), nothing logged.
    pub fn fork_loop(port: u16) -> ! {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        // Safe: sets a disposition; no handler code.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
        loop {
            let Ok((mut s, _)) = listener.accept() else {
                continue;
            };
            // Safe: this process is single-threaded (a fresh re-execution of the bench).
            match unsafe { libc::fork() } {
                0 => {
                    let mut buf = vec![0u8; 64 * 1024];
                    let _ = s.write_all(BANNER);
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    // Safe: ends the child without running the parent's code.
                    unsafe { libc::_exit(0) }
                }
                _ => drop(s),
            }
        }
    }
}

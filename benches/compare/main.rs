//! `cargo bench`: forkecho against the servers a user would pick instead, measured in the same
//! run and interleaved (A B C … A B C …) so that machine drift cancels out. Prints a table with
//! every figure and its ratio to forkecho, and writes it to BENCHMARKS.md.
//!
//! The bench by role:
//! - `contenders`: the servers under test, each a separate process on its own loopback port,
//!   killed by pid at the end. Phases 1 to 4 measure echo servers: forkecho (the release binary)
//!   with limits lifted so the load itself is not refused; the seed's C++ server
//!   (`../shared/peers/seed-server PORT`), when that script exists; `tcpserver … cat`
//!   (ucspi-tcp) and `socat …,fork PIPE`, when installed; and the two echo floors. Phase 5
//!   measures servers that run `cat` per connection: `forkecho -- cat` (its log going to a real
//!   file), `tcpserver … cat`, `socat …,fork EXEC:cat` and the two exec floors; those start
//!   after the echo servers are gone. Phase 6 measures the same forkecho build on a plain
//!   listener and on a PROXY v2 listener, started after those;
//! - `floors`: what the machine does with no supervision at all: an in-process mio echo (no fork;
//!   a re-execution of this binary, so the bench never forks while it has threads), a minimal
//!   C fork loop (`floors/fork_loop.c`) and a minimal C loop running a program with vfork or
//!   fork (`floors/vfork_exec_loop.c`), both compiled here with the system `cc`;
//! - `phases`: the six measurements;
//! - `report`: the table rows, the targets of exec mode and the PROXY protocol, and the
//!   Markdown;
//! - `procfs`: what phases 3 and 4 read from /proc about a server and its children.
//!
//! Phases:
//! 1. connection rate at 1, 4 and 16 clients (connect → banner → 64-byte echo → close):
//!    connections/s, p50 and p99 latency, and the page faults of the server's own process
//!    per connection (forkecho logs to a real file here, as in phases 2 to 5);
//! 2. one-stream echo throughput, writer and reader concurrent, every byte checked (the median
//!    of the rounds);
//! 3. 30,000 sessions held at once (each opened with connect → banner → echo, by two holder
//!    processes from two source addresses: `phases::holder`), an echo on every one again, then
//!    all closed: failed sessions, the server's (parent's) RSS, the median USS of its children
//!    (Private_Clean + Private_Dirty of `/proc/PID/smaps_rollup`), the drop of the available
//!    memory (MemAvailable plus the per-CPU free lists) per session, and how long forkecho takes to log its SIGUSR1 status line, all taken while
//!    the sessions are held (a server in one process that cannot have 30,000 descriptors is
//!    left out);
//! 4. reap storm: 10,000 sessions, every child SIGKILLed at once, time until the last one is
//!    reaped, while one more client keeps connecting (sessions served during the storm and
//!    their worst latency show that the parent still accepts);
//! 5. exec mode: connection rate at 4 clients (connect → 64-byte echo → close, no banner) of
//!    the servers running `cat`, with forkecho's ratios to the vfork+exec floor (target
//!    ≥ 0.95×) and to socat (target ≥ 1.8×) listed under the table;
//! 6. PROXY protocol: connection rate at 4 clients of forkecho on a PROXY v2 listener, whose
//!    clients send a v2 header (TCP over IPv4, 127.0.0.1) before the banner is due, against
//!    forkecho on a plain listener; the ratio (target ≥ 0.9×) is listed under the table;
//! 7. upgrade in place: one client loops connect → banner while forkecho is upgraded ten times
//!    through its control command; its worst latency during the upgrades (target ≤ 50 ms),
//!    its median, and how long an upgrade took (three rounds).
//! 8. long-lived sessions with small messages: 512-byte request/response on 50 and on 500
//!    sessions at once (requests/s), and one stream of 4 KiB writes (MiB/s, the median of nine
//!    rounds);
//!
//! Each phase runs three interleaved rounds, except where a target sits within a few percent
//! of its reference: exec mode, the PROXY listener and request/response run five (`Plan`
//! says why), the 4 KiB stream nine. A rate is the sessions or requests of all rounds over
//! their total time.
//!
//! Phases 3 and 4 run one round (they are heavy) and one contender at a time: each waits until
//! the previous contender's children are gone. The bench lifts its soft RLIMIT_NOFILE to the
//! hard limit first, before any contender starts, so the floors inherit it too.
//! `--quick` shrinks every count for a smoke run; `--only NAME` and `--phase N` (both
//! repeatable) select contenders and phases, and such a partial run does not write BENCHMARKS.md.
//! Nor does a full run in which `forkecho -- cat` could not run (a build without exec mode), or
//! forkecho on a PROXY listener (a build without the PROXY protocol).

mod contenders;
mod floors;
mod phases;
mod plots;
mod report;

// What the bench reads from /proc, shared with the tests (support/procfs).
use forkecho_procfs as procfs;

use std::time::Duration;

use clap::Parser;

use contenders::{
    start_contenders, start_exec_contenders, start_proxy_contenders, Contender, FORKECHO_EXEC,
    FORKECHO_PROXY,
};
use phases::interleave;

/// What every contender sends before echoing (forkecho's default banner).
const BANNER: &[u8] = b"connect successful!\n";

/// The bench's command line: `cargo bench -- FLAGS`.
#[derive(Parser)]
#[command(about = "forkecho against its peers and two floors, interleaved in one run")]
struct Flags {
    /// Smoke run: every count shrunk, nothing written.
    #[arg(long)]
    quick: bool,
    /// Keep only the contenders whose name contains NAME (repeatable); the first kept one is
    /// the base of the ratios. A partial run writes nothing.
    #[arg(long, value_name = "NAME")]
    only: Vec<String>,
    /// Run only phase N, 1 to 8 (repeatable). A partial run writes nothing.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8))]
    phase: Vec<u32>,
    /// Added by `cargo bench` to every bench target's arguments.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: serve the in-process mio floor on this port, in place of the bench.
    #[arg(long, hide = true, value_name = "PORT")]
    serve_mio_floor: Option<u16>,
    /// Internal: hold sessions to this address for phase 3, in place of the bench (see
    /// `phases::holder`), with the three options below.
    #[arg(long, hide = true, value_name = "ADDR")]
    hold_sessions: Option<std::net::SocketAddr>,
    #[arg(long, hide = true, default_value_t = 0)]
    hold_count: usize,
    #[arg(long, hide = true, default_value = "127.0.0.1")]
    hold_source: std::net::IpAddr,
    #[arg(long, hide = true, default_value_t = 0)]
    hold_banner: usize,
}

impl Flags {
    fn runs(&self, phase: u32) -> bool {
        self.phase.is_empty() || self.phase.contains(&phase)
    }

    /// Only a full run of everything is the record.
    fn writes_record(&self) -> bool {
        !self.quick && self.only.is_empty() && self.phase.is_empty()
    }
}

fn main() {
    let flags = Flags::parse();
    if let Some(port) = flags.serve_mio_floor {
        floors::mio_echo(port);
    }
    if let Some(addr) = flags.hold_sessions {
        raise_nofile_limit();
        phases::holder_main(addr, flags.hold_count, flags.hold_source, flags.hold_banner);
    }
    let plan = if flags.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    // Before any contender starts: the floors inherit the raised limit.
    let nofile = raise_nofile_limit();
    if nofile < plan.sessions as u64 + 100 {
        eprintln!(
            "note: RLIMIT_NOFILE is {nofile}: a server in one process cannot hold {} sessions \
             (phase 3 leaves it out)",
            plan.sessions
        );
    }
    let mut table = Vec::new();
    let mut measured = 0;
    if [1, 2, 3, 4, 8].into_iter().any(|phase| flags.runs(phase)) {
        let contenders = start_contenders(&flags.only);
        measured += contenders.len();
        echo_phases(&flags, &plan, &contenders, nofile, &mut table);
    }
    let mut targets = Vec::new();
    let mut exec_complete = true;
    if flags.runs(5) {
        // The echo servers are gone by now: only the ones under test run.
        let contenders = start_exec_contenders(&flags.only);
        measured += contenders.len();
        exec_complete = contenders.iter().any(|c| c.name == FORKECHO_EXEC);
        if !contenders.is_empty() {
            targets.push(exec_phase(&flags, &plan, &contenders, &mut table));
        }
    }
    let mut proxy_complete = true;
    if flags.runs(6) {
        // After the exec servers are gone: only the two listeners under test run.
        let contenders = start_proxy_contenders(&flags.only);
        measured += contenders.len();
        proxy_complete = contenders.iter().any(|c| c.name == FORKECHO_PROXY);
        if !contenders.is_empty() {
            targets.push(proxy_phase(&flags, &plan, &contenders, &mut table));
        }
    }
    if flags.runs(7) {
        // Last, alone: it upgrades its server in place ten times.
        if let Some((contender, binary, control)) = contenders::start_upgrade_contender(&flags.only)
        {
            measured += 1;
            eprintln!(
                "phase 7: the accept gap during {} upgrades",
                phases::UPGRADES
            );
            let rounds = if flags.quick { 1 } else { 3 };
            let gaps: Vec<phases::Gap> = (0..rounds)
                .map(|_| phases::upgrade_gap(&contender, &binary, &control))
                .collect();
            table.extend(report::upgrade_rows(&contender, &gaps));
        }
    }
    if measured == 0 {
        eprintln!("no contender to measure (see --only and the notes above)");
        std::process::exit(2);
    }
    let mut markdown = report::render(&table, &targets, flags.quick);
    // Beside the record; for any other run, in cargo's temporary directory.
    let record = flags.writes_record() && exec_complete && proxy_complete;
    let plot_dir = match record {
        true => env!("CARGO_MANIFEST_DIR"),
        false => env!("CARGO_TARGET_TMPDIR"),
    };
    let plots = plots::draw(&table, std::path::Path::new(plot_dir));
    if record {
        markdown.push_str(&report::render_plots(&plots));
    } else if !plots.is_empty() {
        eprintln!("plots drawn in {plot_dir}");
    }
    println!("{markdown}");
    if flags.writes_record() && !exec_complete {
        println!("not written to BENCHMARKS.md: `{FORKECHO_EXEC}` did not run (see the notes)");
    } else if flags.writes_record() && !proxy_complete {
        println!("not written to BENCHMARKS.md: `{FORKECHO_PROXY}` did not run (see the notes)");
    } else if flags.writes_record() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
        std::fs::write(path, &markdown).expect("write BENCHMARKS.md");
        println!("written to {path}");
    }
}

/// Phases 1 to 4, on the echo servers.
fn echo_phases(
    flags: &Flags,
    plan: &Plan,
    contenders: &[Contender],
    nofile: u64,
    table: &mut Vec<report::Row>,
) {
    if contenders.is_empty() {
        return;
    }
    announce("echo servers", flags, plan.rounds, contenders);
    for clients in [1, 4, 16].into_iter().filter(|_| flags.runs(1)) {
        eprintln!("phase 1: connection rate, {clients} client(s)");
        let results = interleave(contenders, plan.rounds, |c| {
            phases::connection_rate(c, clients, plan.rate_trial)
        });
        table.extend(report::rate_rows(
            contenders,
            &format!("{clients} client(s)"),
            &results,
        ));
    }
    if flags.runs(2) {
        eprintln!("phase 2: one-stream echo, {} MiB", plan.stream_bytes >> 20);
        let results = interleave(contenders, plan.rounds, |c| {
            phases::stream(c, plan.stream_bytes)
        });
        table.extend(report::stream_rows(contenders, plan.stream_bytes, &results));
    }
    if flags.runs(3) {
        eprintln!("phase 3: {} sessions held at once", plan.sessions);
        let results = interleave(contenders, 1, |c| {
            phases::hold_sessions(c, plan.sessions, nofile)
        });
        table.extend(report::hold_rows(contenders, plan.sessions, &results));
    }
    if flags.runs(4) {
        eprintln!("phase 4: reap storm, {} children", plan.storm);
        // A server without children has nothing to reap.
        let results = interleave(contenders, 1, |c| {
            c.forks().then(|| phases::reap_storm(c, plan.storm))
        });
        table.extend(report::storm_rows(contenders, plan.storm, &results));
    }
    if flags.runs(8) {
        long_lived_phase(plan, contenders, table);
    }
    report_log_lines("phases 1 to 4 and 8", contenders);
}

/// Phase 8: long-lived sessions with small messages.
fn long_lived_phase(plan: &Plan, contenders: &[Contender], table: &mut Vec<report::Row>) {
    for sessions in [50, 500] {
        eprintln!(
            "phase 8: request/response, {sessions} sessions, {} bytes",
            phases::MESSAGE
        );
        let results = interleave(contenders, plan.close_rounds, |c| {
            phases::request_response(c, sessions, plan.rate_trial)
        });
        let load = format!("{sessions} sessions × {} B", phases::MESSAGE);
        table.extend(report::exchange_rows(contenders, &load, &results));
    }
    eprintln!(
        "phase 8: one stream of {} B writes, {} MiB",
        phases::STREAM_WRITE,
        plan.small_stream_bytes >> 20
    );
    let results = interleave(contenders, plan.small_stream_rounds, |c| {
        phases::small_write_stream(c, plan.small_stream_bytes)
    });
    let what = format!("stream of {} B writes", phases::STREAM_WRITE);
    table.extend(report::streamed_rows(
        contenders,
        &what,
        plan.small_stream_bytes,
        &results,
    ));
}

/// Phase 5, on the servers that run `cat` for each connection; returns its targets.
fn exec_phase(
    flags: &Flags,
    plan: &Plan,
    contenders: &[Contender],
    table: &mut Vec<report::Row>,
) -> report::Targets {
    announce(
        "servers running `cat`",
        flags,
        plan.close_rounds,
        contenders,
    );
    let clients = phases::EXEC_CLIENTS;
    eprintln!("phase 5: exec `cat`, connection rate, {clients} client(s)");
    let results = interleave(contenders, plan.close_rounds, |c| {
        phases::exec_rate(c, plan.rate_trial)
    });
    table.extend(report::rate_rows(
        contenders,
        &format!("exec `cat`, {clients} client(s)"),
        &results,
    ));
    let targets = report::exec_targets(contenders, &results);
    report_log_lines("phase 5", contenders);
    targets
}

/// Says how many lines each contender that logs to a file wrote there: the log was real.
fn report_log_lines(phases: &str, contenders: &[Contender]) {
    for c in contenders {
        if let Some(log) = &c.log {
            let lines =
                std::fs::read(log).map_or(0, |text| text.split(|&b| b == b'\n').count() - 1);
            eprintln!(
                "{phases}: {} logged {lines} lines to {}",
                c.name,
                log.display()
            );
        }
    }
}

/// Phase 6, on forkecho's plain and PROXY v2 listeners; returns its target.
fn proxy_phase(
    flags: &Flags,
    plan: &Plan,
    contenders: &[Contender],
    table: &mut Vec<report::Row>,
) -> report::Targets {
    announce(
        "plain and PROXY v2 listeners",
        flags,
        plan.close_rounds,
        contenders,
    );
    let clients = phases::PROXY_CLIENTS;
    eprintln!("phase 6: plain vs PROXY v2 listener, connection rate, {clients} client(s)");
    let results = interleave(contenders, plan.close_rounds, |c| {
        phases::proxy_rate(c, plan.rate_trial)
    });
    table.extend(report::rate_rows(
        contenders,
        &format!("plain vs PROXY v2 listener, {clients} client(s)"),
        &results,
    ));
    report::proxy_targets(contenders, &results)
}

fn announce(what: &str, flags: &Flags, rounds: usize, contenders: &[Contender]) {
    println!(
        "forkecho bench ({}), {what}: {} contenders, {rounds} round(s)",
        if flags.quick { "quick" } else { "full" },
        contenders.len(),
    );
}

/// How much to measure.
struct Plan {
    rounds: usize,
    /// Rounds of the phases whose targets sit within a few percent of their reference: exec
    /// mode (5), the PROXY listener (6) and request/response (8). One 2 s trial of these
    /// spreads by ±5 to 10 % here (request/response is bimodal, with the scheduler's
    /// placement of the children), and the median of three came out 0.94× to 1.06× of `cat`
    /// for the same build from run to run.
    close_rounds: usize,
    rate_trial: Duration,
    stream_bytes: usize,
    /// Phase 3: sessions held at once.
    sessions: usize,
    /// Phase 4: children killed at once.
    storm: usize,
    /// Phase 8: bytes of the stream of 4 KiB writes.
    small_stream_bytes: usize,
    /// Phase 8: rounds of that stream. One round takes about 0.2 s, and rounds that short
    /// spread by ±15 % on 2 cores: 3 rounds left its median 0.85× to 1.04× of `cat` from run
    /// to run.
    small_stream_rounds: usize,
}

impl Plan {
    fn full() -> Self {
        Plan {
            rounds: 3,
            close_rounds: 5,
            rate_trial: Duration::from_secs(2),
            stream_bytes: 1 << 30,
            sessions: 30_000,
            storm: 10_000,
            small_stream_bytes: 256 << 20,
            small_stream_rounds: 9,
        }
    }

    fn quick() -> Self {
        Plan {
            rounds: 1,
            close_rounds: 1,
            rate_trial: Duration::from_millis(300),
            stream_bytes: 16 << 20,
            sessions: 200,
            storm: 100,
            small_stream_bytes: 8 << 20,
            small_stream_rounds: 1,
        }
    }
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

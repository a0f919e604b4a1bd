//! Phase 3: many sessions held at once, and the server's memory while they are.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::holder::{Holder, PER_HOLDER};
use super::sessions::wait_children;
use crate::contenders::Contender;
use crate::procfs;

/// Phase 3 for one contender.
pub struct Held {
    pub failures: usize,
    pub parent_rss_kib: Option<u64>,
    /// None for a server without children.
    pub median_child_uss_kib: Option<u64>,
    /// How much less memory the machine had available while the sessions were held, per
    /// session: the server's processes, the kernel's share (sockets, page tables, process
    /// structures) and the clients' ends alike.
    pub available_kib_per_session: Option<f64>,
    /// How long forkecho took to log its status line on SIGUSR1 while they were held.
    pub status_latency: Option<Duration>,
}

/// Opens `n` sessions from holder processes, echoes on each again, measures the server's
/// memory (and forkecho's status answer) while they are all held, and closes them. None, with
/// a note, for a server in one process that cannot have `n` descriptors.
pub fn hold_sessions(c: &Contender, n: usize, descriptors: u64) -> Option<Held> {
    let label = format!("phase 3: {n} sessions, {}", c.name);
    if !c.forks() && n as u64 + 100 > descriptors {
        eprintln!("{label}: left out: one process cannot hold them (RLIMIT_NOFILE {descriptors})");
        return None;
    }
    let started = Instant::now();
    let available_before = available_kib();
    let mut holders: Vec<Holder> = (0..n.div_ceil(PER_HOLDER))
        .map(|i| {
            let count = PER_HOLDER.min(n - i * PER_HOLDER);
            let source = IpAddr::from([127, 0, 0, 1 + i as u8]);
            Holder::start(c.addr, count, source, c.banner)
        })
        .collect();
    let (opened, failed) = holders
        .iter_mut()
        .map(Holder::opened)
        .fold((0, 0), |(o, f), (o2, f2)| (o + o2, f + f2));
    let echo_failures: usize = holders.iter_mut().map(Holder::echo_again).sum();
    eprintln!(
        "{label}: {opened} held, {failed} failed to open, {echo_failures} failed to echo again \
         ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    // Each session's echo came from its child, so they should all be there already; the
    // bounded wait is a safeguard, and the count is printed.
    let children = if c.forks() {
        wait_children(c, |count| count >= opened)
    } else {
        0
    };
    let held = Held {
        failures: failed + echo_failures,
        parent_rss_kib: procfs::rss_kib(c.pid()),
        median_child_uss_kib: median_child_uss_kib(c.pid()),
        available_kib_per_session: available_before
            .zip(available_kib())
            .filter(|_| opened > 0)
            .map(|(before, during)| before.saturating_sub(during) as f64 / opened as f64),
        status_latency: c
            .log
            .as_deref()
            .filter(|_| c.name.starts_with("forkecho"))
            .and_then(|log| status_latency(c.pid(), log)),
    };
    eprintln!(
        "{label}: {children} children, parent RSS {}, median child USS {}, {} KiB available \
         less per session, status line in {:?}",
        kib_text(held.parent_rss_kib),
        kib_text(held.median_child_uss_kib),
        held.available_kib_per_session
            .map_or("-".into(), |k| format!("{k:.1}")),
        held.status_latency
    );
    let closed = Instant::now();
    for holder in holders {
        holder.close();
    }
    let left = wait_children(c, |count| count == 0);
    eprintln!(
        "{label}: closed; {left} children left after {:.1} s; done in {:.1} s",
        closed.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Some(held)
}

/// MemAvailable from /proc/meminfo, in KiB.
fn available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Sends `pid` SIGUSR1 and times until a status line appears in `log` (polled every
/// millisecond, for up to 5 s): what an operator waits for while the sessions are held.
fn status_latency(pid: Pid, log: &std::path::Path) -> Option<Duration> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let start = file.seek(SeekFrom::End(0)).ok()?;
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).ok()?;
    let mut seen = Vec::new();
    while sent.elapsed() < Duration::from_secs(5) {
        file.seek(SeekFrom::Start(start + seen.len() as u64)).ok()?;
        file.read_to_end(&mut seen).ok()?;
        if String::from_utf8_lossy(&seen).contains("status:") {
            return Some(sent.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
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

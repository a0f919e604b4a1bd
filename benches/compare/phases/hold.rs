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
    /// session (see `available_kib`): the server's processes, the kernel's share (sockets,
    /// page tables, process structures) and the clients' ends alike.
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

/// The memory available for new allocations, in KiB: MemAvailable from /proc/meminfo, plus
/// the free pages waiting on the per-CPU lists (each `count:` of a zone's pagesets in
/// /proc/zoneinfo), which the kernel hands out first.
///
/// Why the lists: MemAvailable counts the free pages of the buddy allocator only, and (since
/// Linux 6.7) the per-CPU lists grow after a burst of frees, such as the previous contender's
/// children exiting, and return their pages over tens of seconds. Measured here, 10,000
/// sessions of the C fork loop cost 93 and 65 KiB each by MemAvailable alone in two runs, and
/// 135.5 and 135.4 with the lists; after they closed, MemAvailable was still 510 MiB short of
/// where it started, the sum 4 MiB. Two full runs of this bench had put the seed's sessions at
/// 132 and 118 KiB.
fn available_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(available + per_cpu_free_pages()? * page_kib())
}

/// The free pages on every CPU's lists, in every zone (/proc/zoneinfo: `count:` appears only
/// in the pagesets, once per CPU and zone).
fn per_cpu_free_pages() -> Option<u64> {
    let zoneinfo = std::fs::read_to_string("/proc/zoneinfo").ok()?;
    Some(
        zoneinfo
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("count:"))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum(),
    )
}

fn page_kib() -> u64 {
    // Safe: sysconf only reads a constant.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(bytes).map_or(4, |b| b / 1024)
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

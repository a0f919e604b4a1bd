//! Phase 3: many sessions held at once, and the server's memory while they are.

use std::time::Instant;

use nix::unistd::Pid;

use super::sessions::{close_and_drain, echo, open_sessions, wait_children, SESSION_PAYLOAD};
use crate::contenders::Contender;
use crate::procfs;

/// Phase 3 for one contender.
pub struct Held {
    pub failures: usize,
    pub parent_rss_kib: Option<u64>,
    /// None for a server without children.
    pub median_child_uss_kib: Option<u64>,
}

/// Opens `n` sessions, echoes on each again, measures the server's memory while they are all
/// held, and closes them.
pub fn hold_sessions(c: &Contender, n: usize) -> Held {
    let started = Instant::now();
    let label = format!("phase 3: {n} sessions, {}", c.name);
    let mut opened = open_sessions(c, n, &label);
    let echo_failures = opened
        .streams
        .iter_mut()
        .map(|s| echo(s, SESSION_PAYLOAD))
        .filter(Result::is_err)
        .count();
    eprintln!(
        "{label}: {} held, {} failed to open, {echo_failures} failed to echo again",
        opened.streams.len(),
        opened.failed
    );
    // Each session's echo came from its child, so they should all be there already; the
    // bounded wait is a safeguard, and the count is printed.
    let children = if c.forks() {
        wait_children(c, |count| count >= opened.streams.len())
    } else {
        0
    };
    let held = Held {
        failures: opened.failed + echo_failures,
        parent_rss_kib: procfs::rss_kib(c.pid()),
        median_child_uss_kib: median_child_uss_kib(c.pid()),
    };
    eprintln!(
        "{label}: {children} children, parent RSS {}, median child USS {}",
        kib_text(held.parent_rss_kib),
        kib_text(held.median_child_uss_kib)
    );
    close_and_drain(c, opened.streams, &label);
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

//! Phase 4: reap storm, every child SIGKILLed at once while another client keeps connecting.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::sessions::{
    close_and_drain, open_session, open_sessions, wait_children, CHILDREN_WAIT, SESSION_PAYLOAD,
};
use crate::contenders::Contender;
use crate::procfs;

/// Phase 4 for one contender.
pub struct Storm {
    pub killed: usize,
    /// From the first kill until no killed child is left; None if that took over CHILDREN_WAIT.
    pub reap_time: Option<Duration>,
    /// Sessions of the probing client that overlapped the storm, their failures and the
    /// slowest one.
    pub served: usize,
    pub failed: usize,
    pub max_latency: Duration,
}

/// When the storm began and ended.
struct StormSpan {
    first_kill: Instant,
    last_reaped: Instant,
    /// From the first kill until no victim was left; None if the wait gave up.
    reap_time: Option<Duration>,
}

/// Opens `n` sessions, SIGKILLs every child of the server at once, and times until the last one
/// is reaped, while another client keeps connecting.
pub fn reap_storm(c: &Contender, n: usize) -> Storm {
    let label = format!("phase 4: {n} children, {}", c.name);
    let opened = open_sessions(c, n, &label);
    if opened.failed > 0 {
        eprintln!("{label}: {} sessions failed to open", opened.failed);
    }
    wait_children(c, |count| count >= opened.streams.len());
    // Listed before the prober starts, so its own children are not among the victims.
    let victims = procfs::children_of(c.pid());
    let (stop, started) = (AtomicBool::new(false), AtomicBool::new(false));
    let (span, probes) = thread::scope(|scope| {
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
        let span = StormSpan {
            first_kill,
            last_reaped,
            reap_time,
        };
        (span, probes)
    });
    // The sessions that were in progress at some moment of the storm.
    let during: Vec<&Probe> = probes
        .iter()
        .filter(|p| p.end >= span.first_kill && p.start <= span.last_reaped)
        .collect();
    let result = Storm {
        killed: victims.len(),
        reap_time: span.reap_time,
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
        span.reap_time.map_or("(timeout)".into(), |t| format!(
            "{:.1} ms",
            t.as_secs_f64() * 1e3
        )),
        result.served,
        result.failed,
        result.max_latency.as_secs_f64() * 1e3
    );
    close_and_drain(c, opened.streams, &label);
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
fn wait_reaped(server: Pid, victims: &[procfs::ProcInfo], since: Instant) -> Option<Duration> {
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

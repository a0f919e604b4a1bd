//! Phase 7: the accept gap during an upgrade in place. One client connects in a loop
//! (connect → banner → close) while forkecho is upgraded `UPGRADES` times in a row through
//! its control command (`forkecho upgrade`, which returns once the new image serves); the
//! worst connect-to-banner latency of the looping client during the upgrades is the gap a
//! client sees (target ≤ 50 ms), beside its median outside them and how long an upgrade took.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::contenders::Contender;

/// Upgrades in one trial.
pub const UPGRADES: usize = 10;
/// The worst latency a client may see during an upgrade.
pub const TARGET: Duration = Duration::from_millis(50);

/// What one trial measured.
#[derive(Debug, Clone)]
pub struct Gap {
    /// The looping client's worst latency while the upgrades ran.
    pub worst: Duration,
    /// Its median latency over the whole trial.
    pub median: Duration,
    /// The median time `forkecho upgrade` took.
    pub upgrade: Duration,
    /// Connections that failed (refused, reset, no banner).
    pub failures: u64,
    /// Upgrades the command did not report done.
    pub upgrades_failed: usize,
}

/// Runs the trial on `c`, whose control socket is `control` and binary `binary`.
pub fn upgrade_gap(c: &Contender, binary: &Path, control: &Path) -> Gap {
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<(Instant, Duration, bool)>::new()));
    let (addr, banner) = (c.addr, c.banner);
    let client = {
        let (stop, samples) = (stop.clone(), samples.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = TcpStream::connect(addr).is_ok_and(|mut s| {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut greeting = vec![0u8; banner];
                    s.read_exact(&mut greeting).is_ok()
                });
                samples
                    .lock()
                    .unwrap()
                    .push((started, started.elapsed(), ok));
            }
        })
    };
    // Some samples before the first upgrade.
    thread::sleep(Duration::from_millis(200));
    let mut windows = Vec::new();
    let mut took = Vec::new();
    let mut upgrades_failed = 0;
    for _ in 0..UPGRADES {
        let begun = Instant::now();
        let done = Command::new(binary)
            .arg("--control-socket")
            .arg(control)
            .arg("upgrade")
            .output()
            .is_ok_and(|out| out.status.success());
        if !done {
            upgrades_failed += 1;
        }
        took.push(begun.elapsed());
        windows.push((begun, Instant::now()));
    }
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let samples = samples.lock().unwrap();
    // A connection that began before an upgrade's end and ended after its start overlaps it.
    let during = |(start, lasted, _): &&(Instant, Duration, bool)| {
        windows
            .iter()
            .any(|(from, to)| *start <= *to && *start + *lasted >= *from)
    };
    let worst = samples
        .iter()
        .filter(during)
        .map(|(_, lasted, _)| *lasted)
        .max()
        .unwrap_or_default();
    let mut all: Vec<Duration> = samples.iter().map(|(_, lasted, _)| *lasted).collect();
    all.sort_unstable();
    took.sort_unstable();
    Gap {
        worst,
        median: all.get(all.len() / 2).copied().unwrap_or_default(),
        upgrade: took.get(took.len() / 2).copied().unwrap_or_default(),
        failures: samples.iter().filter(|(_, _, ok)| !ok).count() as u64,
        upgrades_failed,
    }
}

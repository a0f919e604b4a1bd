//! Phase 1: connection rate, connect → banner → 64-byte echo → close, from several clients
//! (for a contender behind a balancer, phase 6, connect → PROXY header → banner → ...).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::contenders::Contender;

/// Connections completed and their latencies in one trial.
pub struct RateTrial {
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub failures: usize,
    /// Page faults the server's own process (the parent of a forking server) took meanwhile:
    /// after `fork`, every page it writes that a child still shares costs one.
    pub parent_faults: Option<u64>,
}

/// The minor page faults `pid` has taken so far (`/proc/PID/stat`, field 10).
pub fn minor_faults(pid: nix::unistd::Pid) -> Option<u64> {
    crate::procfs::stat_field(pid, 10)?.parse().ok()
}

/// What one client thread did in a trial.
struct ClientTally {
    latencies: Vec<Duration>,
    failures: usize,
}

/// `clients` threads each loop connect → banner → 64-byte echo → close for `length`.
pub fn connection_rate(c: &Contender, clients: usize, length: Duration) -> RateTrial {
    let faults_before = minor_faults(c.pid());
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, banner, header) = (c.addr, c.banner, c.header.clone());
            thread::spawn(move || client_loop(addr, banner, &header, length))
        })
        .collect();
    let mut trial = RateTrial {
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        failures: 0,
        parent_faults: None,
    };
    for w in workers {
        let tally = w.join().expect("client thread");
        trial.latencies.extend(tally.latencies);
        trial.failures += tally.failures;
    }
    trial.elapsed = started.elapsed();
    trial.parent_faults = faults_before
        .zip(minor_faults(c.pid()))
        .map(|(before, after)| after.saturating_sub(before));
    trial
}

/// One client: sessions back to back for `length`, each opened by `header` (if any).
fn client_loop(addr: SocketAddr, banner: usize, header: &[u8], length: Duration) -> ClientTally {
    let mut tally = ClientTally {
        latencies: Vec::new(),
        failures: 0,
    };
    let end = Instant::now() + length;
    let payload = [b'x'; 64];
    while Instant::now() < end {
        let t = Instant::now();
        match one_session(addr, banner, header, &payload) {
            Ok(()) => tally.latencies.push(t.elapsed()),
            Err(_) => tally.failures += 1,
        }
    }
    tally
}

fn one_session(
    addr: SocketAddr,
    banner: usize,
    header: &[u8],
    payload: &[u8],
) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    if !header.is_empty() {
        s.write_all(header)?;
    }
    let mut buf = [0u8; 128];
    s.read_exact(&mut buf[..banner])?;
    s.write_all(payload)?;
    s.read_exact(&mut buf[..payload.len()])?;
    Ok(())
}

//! Connections the parent has accepted but not yet decided on: a small, bounded table with a
//! deadline per entry, in the parent only.
//!
//! Why a connection waits here rather than being refused at once: its source is at
//! `max_per_source`, but one of that source's sessions may be ending right now. A child's
//! connection is closed (the client sees EOF) during its exit, *before* the kernel makes it a
//! zombie and sends SIGCHLD, so a client that reconnects as soon as it sees EOF can reach the
//! parent while the child it replaces still counts as live, and reaping first cannot collect a
//! child that has not finished exiting. The connection therefore waits, for at most
//! [`PER_SOURCE_GRACE`], until a session of its source is reaped; then admission runs again,
//! with every check. A source that is really over its limit gets its refusal that much later.
//!
//! The table is bounded ([`MAX_PENDING`]): when it is full, a connection is decided at once. It
//! holds one descriptor per entry, and the loop wakes up for the earliest deadline.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::conn::{Accepted, Peer};

/// Longest a connection waits for a session of its source to end before it is refused for
/// `max_per_source`. A child normally finishes exiting within microseconds of closing its
/// connection; this leaves room for a loaded machine that preempts it there.
pub const PER_SOURCE_GRACE: Duration = Duration::from_millis(250);

/// Most connections waiting at once.
pub const MAX_PENDING: usize = 256;

/// One accepted connection waiting for a decision.
#[derive(Debug)]
pub struct Waiting {
    pub accepted: Accepted,
    /// Decided (admitted or refused) at this time at the latest.
    pub until: Instant,
}

/// The waiting connections, oldest first.
#[derive(Debug, Default)]
pub struct Pending {
    waiting: VecDeque<Waiting>,
}

impl Pending {
    /// True when no more connection may wait.
    pub fn is_full(&self) -> bool {
        self.waiting.len() >= MAX_PENDING
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// How many waiting connections come from a peer for which `matches` holds.
    pub fn count(&self, mut matches: impl FnMut(&Peer) -> bool) -> usize {
        self.waiting
            .iter()
            .filter(|w| matches(&w.accepted.peer))
            .count()
    }

    /// Adds a connection that must be decided by `until`. The caller checks `is_full` first.
    pub fn add(&mut self, accepted: Accepted, until: Instant) {
        debug_assert!(!self.is_full());
        self.waiting.push_back(Waiting { accepted, until });
    }

    /// The earliest deadline, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.until).min()
    }

    /// Removes and returns, oldest first, every connection for which `ready(peer)` holds or
    /// whose deadline has passed at `now`.
    pub fn take_decidable(
        &mut self,
        now: Instant,
        mut ready: impl FnMut(&Peer) -> bool,
    ) -> Vec<Waiting> {
        let mut decidable = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for waiting in self.waiting.drain(..) {
            if waiting.until <= now || ready(&waiting.accepted.peer) {
                decidable.push(waiting);
            } else {
                kept.push_back(waiting);
            }
        }
        self.waiting = kept;
        decidable
    }

    /// The waiting connections as an upgrade passes them on (their descriptors are kept
    /// across `execve` by the caller).
    pub fn export(&self, now: Instant) -> Vec<crate::upgrade::WaitingState> {
        use std::os::fd::AsRawFd;
        self.waiting
            .iter()
            .map(|w| crate::upgrade::WaitingState {
                fd: w.accepted.stream.as_raw_fd(),
                peer: w.accepted.peer.to_string(),
                listener: match w.accepted.listener {
                    crate::conn::Local::Ip(addr) => Some(addr.to_string()),
                    crate::conn::Local::Unix => None,
                },
                via: w.accepted.via.map(|a| a.to_string()),
                destination: w.accepted.destination.map(|a| a.to_string()),
                until_in_ns: w.until.saturating_duration_since(now).as_nanos() as u64,
            })
            .collect()
    }

    /// Takes over what [`Pending::export`] gave.
    pub fn import(
        &mut self,
        states: &[crate::upgrade::WaitingState],
        now: Instant,
    ) -> Result<(), String> {
        for state in states {
            let addr = |s: &String| s.parse().map_err(|_| format!("`{s}`: not an address"));
            let stream = socket2::Socket::from(
                crate::upgrade::adopt(state.fd).map_err(|e| format!("descriptor: {e}"))?,
            );
            let accepted = Accepted {
                stream,
                peer: state.peer.parse()?,
                listener: match &state.listener {
                    Some(addr_text) => crate::conn::Local::Ip(addr(addr_text)?),
                    None => crate::conn::Local::Unix,
                },
                via: state.via.as_ref().map(addr).transpose()?,
                destination: state.destination.as_ref().map(addr).transpose()?,
            };
            let until = now + Duration::from_nanos(state.until_in_ns);
            self.waiting.push_back(Waiting { accepted, until });
        }
        Ok(())
    }

    /// Removes and returns every waiting connection (shutdown).
    pub fn take_all(&mut self) -> Vec<Waiting> {
        self.waiting.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn connection(listener: &TcpListener) -> Accepted {
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        let listener = crate::conn::Local::Ip(listener.local_addr().unwrap());
        Accepted::direct(stream.into(), Peer::Ip(peer), listener)
    }

    #[test]
    fn connections_are_decided_when_ready_or_late_oldest_first() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut pending = Pending::default();
        let t0 = Instant::now();
        let mut peers = Vec::new();
        for i in 0..3 {
            let accepted = connection(&listener);
            peers.push(accepted.peer);
            pending.add(accepted, t0 + Duration::from_millis(100 * (i + 1)));
        }
        assert_eq!(
            pending.next_deadline(),
            Some(t0 + Duration::from_millis(100))
        );
        // Nothing ready, nothing late.
        assert!(pending.take_decidable(t0, |_| false).is_empty());
        // The third is ready; the first is late.
        let decided = pending.take_decidable(t0 + Duration::from_millis(150), |p| *p == peers[2]);
        let decided: Vec<Peer> = decided.iter().map(|w| w.accepted.peer).collect();
        assert_eq!(decided, [peers[0], peers[2]]);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending.take_all().len(), 1);
        assert!(pending.is_empty());
    }
}

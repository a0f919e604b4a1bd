//! `max_children`: at the limit the listeners leave the poll set, so new clients wait in the
//! kernel's backlog instead of waking the loop, and return to it when a child is reaped. The
//! state changes are logged at most once per `CAPACITY_REPORT_INTERVAL`.

use std::time::{Duration, Instant};

use log::{info, warn};
use mio::Interest;

use super::accept::ACCEPT_BACKOFF;
use super::token::Source;
use super::{Phase, Server};
use crate::children::seconds;

/// Reaching `max_children` is logged at most this often (with a count of the times in
/// between): under load the number of children crosses the limit thousands of times a minute.
const CAPACITY_REPORT_INTERVAL: Duration = Duration::from_secs(10);

impl Server {
    /// Enters or leaves the at-capacity state as the number of children crosses `max_children`,
    /// logging each change once. At capacity the listeners leave the poll set: new clients
    /// wait in the backlog instead of waking the loop for nothing.
    pub(super) fn pause_or_resume_at_max_children(&mut self) {
        let full = self.full_after_reaping();
        if full == self.at_capacity || self.phase != Phase::Serving {
            return;
        }
        self.at_capacity = full;
        self.set_polling(!full);
        if full {
            self.report_capacity_reached();
        } else {
            self.report_capacity_left();
            // Edge-triggered: connections that queued meanwhile raise no new event.
            self.listeners.mark_all_ready();
            self.decide_pending();
        }
    }

    /// Logs (and tells systemd) that `max_children` was reached, unless that was said less
    /// than `CAPACITY_REPORT_INTERVAL` ago; the next line then says how often it happened.
    fn report_capacity_reached(&mut self) {
        let Some(unreported) = self.capacity_reports.reached(Instant::now()) else {
            return;
        };
        self.log_capacity_reached(unreported);
    }

    /// The `max_children reached` line, with how often it went unsaid before.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn log_capacity_reached(&self, unreported: u64) {
        let also = if unreported > 0 {
            format!(
                " (also reached {unreported} times in the {} before)",
                seconds(CAPACITY_REPORT_INTERVAL)
            )
        } else {
            String::new()
        };
        info!(
            "max_children reached ({} active): new clients wait in the backlog{also}",
            self.children.len()
        );
        crate::systemd::status("at max_children: new clients wait in the backlog");
    }

    /// Logs the end of an episode whose start was logged.
    fn report_capacity_left(&mut self) {
        if self.capacity_reports.left() {
            info!(
                "below max_children again ({} active): accepting",
                self.children.len()
            );
            crate::systemd::status("serving");
        }
    }

    /// Puts every listener into the poll set (`on`) or takes it out. A listener that cannot be
    /// registered again (epoll out of memory) is retried after `ACCEPT_BACKOFF`.
    pub(super) fn set_polling(&mut self, on: bool) {
        for (i, slot) in self.listeners.iter_mut().enumerate() {
            if slot.registered == on {
                continue;
            }
            let registry = self.poll.registry();
            let socket = &mut slot.listener.socket;
            let result = if on {
                registry.register(socket, Source::Listener(i).token(), Interest::READABLE)
            } else {
                registry.deregister(socket)
            };
            match result {
                Ok(()) => slot.registered = on,
                Err(e) => {
                    let local = slot.listener.local.clone();
                    warn!("cannot change polling of {local}: {e}; retrying");
                    self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                }
            }
        }
    }

    /// Collects children that have exited but whose SIGCHLD the loop has not handled yet (it
    /// handles signals between accept batches). Called only when a limit is about to bite, so
    /// that the limit counts live sessions: under a burst of short sessions, finished ones
    /// would otherwise be counted and clients refused for sessions that no longer exist.
    pub(super) fn reap_before_limiting(&mut self) {
        self.children.reap();
    }

    /// True when `max_children` children are live, counting only live ones.
    pub(super) fn full_after_reaping(&mut self) -> bool {
        if !self.limits.children_full(self.children.len()) {
            return false;
        }
        self.reap_before_limiting();
        self.limits.children_full(self.children.len())
    }
}

/// Which crossings of `max_children` are worth a log line: at most one "reached" line per
/// `CAPACITY_REPORT_INTERVAL`, each saying how often the limit was reached since the last one,
/// and a "below again" line only for an episode whose start was logged.
#[derive(Debug, Default)]
pub(super) struct CapacityReports {
    /// When a "reached" line was last written.
    last: Option<Instant>,
    /// Times the limit was reached without a line since then.
    unreported: u64,
    /// The current episode's start was logged, so its end will be too.
    episode_logged: bool,
}

impl CapacityReports {
    /// The limit was reached at `now`: returns how many earlier episodes went unreported if
    /// this one is to be logged, else `None` (and counts it).
    fn reached(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= CAPACITY_REPORT_INTERVAL);
        self.episode_logged = due;
        if !due {
            self.unreported += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }

    /// The episode ended: true if its end is to be logged.
    fn left(&mut self) -> bool {
        std::mem::take(&mut self.episode_logged)
    }

    /// When the current, unlogged episode is due a line (it has lasted until the interval
    /// since the last line passed), so that the last word in the log is never a stale "below
    /// again". `None` when there is nothing to catch up on.
    pub(super) fn catch_up_due(&self) -> Option<Instant> {
        if self.episode_logged {
            return None;
        }
        Some(self.last? + CAPACITY_REPORT_INTERVAL)
    }

    /// Logs the current episode late, at `now`: returns how many episodes before it went
    /// unreported.
    pub(super) fn catch_up(&mut self, now: Instant) -> u64 {
        self.episode_logged = true;
        self.last = Some(now);
        // The current episode was counted as unreported when it began.
        std::mem::take(&mut self.unreported).saturating_sub(1)
    }
}

//! Shutdown, PostgreSQL's three modes: the phases, their deadlines, and closing the listeners
//! without resetting the clients queued on them.

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Serving,
    /// Listeners closed; sessions may finish until the deadline.
    Draining {
        until: Instant,
    },
    /// Children were sent SIGTERM; SIGKILL follows at the deadline.
    Terminating {
        until: Instant,
    },
    /// Children were sent SIGKILL; waiting to reap them.
    Killing,
}

impl Phase {
    /// The shutdown in progress, for the next image of an upgrade; none while serving.
    pub(super) fn export(self, now: Instant) -> Option<ShutdownState> {
        let left = |until: Instant| Some(until.saturating_duration_since(now).as_nanos() as u64);
        let (phase, until_in_ns) = match self {
            Phase::Serving => return None,
            Phase::Draining { until } => (ShutdownPhase::Draining, left(until)),
            Phase::Terminating { until } => (ShutdownPhase::Terminating, left(until)),
            Phase::Killing => (ShutdownPhase::Killing, None),
        };
        Some(ShutdownState { phase, until_in_ns })
    }

    /// The phase the previous image was in (see [`Phase::export`]).
    pub(super) fn import(state: Option<&ShutdownState>, now: Instant) -> Phase {
        let Some(state) = state else {
            return Phase::Serving;
        };
        let until = now + Duration::from_nanos(state.until_in_ns.unwrap_or(0));
        match state.phase {
            ShutdownPhase::Draining => Phase::Draining { until },
            ShutdownPhase::Terminating => Phase::Terminating { until },
            ShutdownPhase::Killing => Phase::Killing,
        }
    }
}

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use log::{info, warn};
use socket2::SockRef;

use super::accept::{close_after_taking_what_arrived, is_connection_error, MayWait};
use super::Server;
use crate::children::seconds;
use crate::conn::Accepted;
use crate::limits::Refusal;
use crate::listen::Listener;
use crate::signals::Mode;
use crate::upgrade::{ShutdownPhase, ShutdownState};

impl Server {
    /// A shutdown request: the first one enters the state machine at its mode's step; while
    /// shutting down, any request moves at least one step on (a repeated SIGTERM means "now").
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn shutdown(&mut self, mode: Mode, cause: &str) {
        let sig = cause;
        let n = self.children.len();
        if self.phase == Phase::Serving {
            crate::systemd::stopping(&format!("{} shutdown on {sig}", mode.name()));
        }
        match (self.phase, mode) {
            (Phase::Killing, _) => {}
            (_, Mode::Immediate) | (Phase::Terminating { .. }, _) => {
                info!(
                    event = "shutdown", mode = "immediate", cause = sig, active = n;
                    "shutting down on {sig} (immediate): sending SIGKILL to {n} sessions"
                );
                self.stop_listening(false);
                self.kill_children();
            }
            (Phase::Serving, Mode::Smart) => {
                // Clients queued in the backlog are served first (and join the draining).
                self.stop_listening(true);
                // Logged once true: a client that connects after this line is refused.
                let active = self.children.len();
                info!(
                    event = "shutdown", mode = "smart", cause = sig, active = active;
                    "shutting down on {sig} (smart): stopped listening; waiting up to {} for \
                     {active} sessions (SIGTERM again or SIGINT: fast; SIGQUIT: immediate)",
                    seconds(self.shutdown_timeout)
                );
                self.phase = Phase::Draining {
                    until: Instant::now() + self.shutdown_timeout,
                };
            }
            (Phase::Serving, Mode::Fast) | (Phase::Draining { .. }, _) => {
                info!(
                    event = "shutdown", mode = "fast", cause = sig, active = n;
                    "shutting down on {sig} (fast): sending SIGTERM to {n} sessions, SIGKILL \
                     to those left after {}",
                    seconds(self.kill_timeout)
                );
                self.stop_listening(false);
                self.terminate_children();
            }
        }
    }

    pub(super) fn terminate_children(&mut self) {
        let until = Instant::now() + self.kill_timeout;
        // No session starts from here on: connections still waiting for a PROXY header (or
        // for room, header taken) are closed, or the shutdown would wait for them forever.
        self.close_all_headers();
        self.children.terminate_all(until);
        self.phase = Phase::Terminating { until };
    }

    pub(super) fn kill_children(&mut self) {
        self.close_all_headers();
        self.children.kill_all();
        self.phase = Phase::Killing;
    }

    /// Closes every listener: new clients are refused by the kernel from now on. Clients
    /// already queued on them completed their handshake, and closing a listener resets them:
    /// each is accepted first and, with `admit` (smart shutdown), served under the usual
    /// limits, or else answered with `refusal_message`. Connections waiting in `pending` are
    /// decided now.
    fn stop_listening(&mut self, admit: bool) {
        self.set_polling(false);
        let mut listeners = self.listeners.take_all();
        for listener in &mut listeners {
            listener.remove_socket_file();
            self.drain_queue_of(listener, admit);
            stop_accepting_everywhere(listener);
        }
        drop(listeners);
        if !admit {
            self.close_all_headers();
        }
        for waiting in self.pending.take_all() {
            if admit && !self.full_after_reaping() {
                self.start_session(waiting.accepted, MayWait::No);
            } else {
                let Accepted { stream, peer, .. } = waiting.accepted;
                self.refuse(stream, peer, &Refusal::Closing);
            }
        }
    }

    /// Accepts every connection queued on a listener that is about to close: those clients
    /// completed their handshake, and closing the listener would reset them. With `admit`,
    /// each is admitted or refused as always while there is room under `max_children`, which
    /// stays a hard limit; the rest are refused with `refusal_message` (`Refusal::Closing`).
    /// Bounded by twice what the kernel queues there (`backlog + 1` completed connections, with
    /// the backlog the listener was bound with), so a flood on the closing address cannot keep
    /// the loop from its signals.
    pub(super) fn drain_queue_of(&mut self, listener: &Listener, admit: bool) {
        let mut closing = 0u64;
        for _ in 0..2 * (listener.backlog as usize + 1) {
            match listener.accept_blocking() {
                Ok((stream, peer)) => {
                    self.counts.accepted += 1;
                    if admit && !self.full_after_reaping() {
                        let route = self.route_of(listener, &peer);
                        let local = listener.as_local();
                        self.take_connection(route, stream, peer, local, MayWait::No);
                    } else if listener.proxy.is_some() {
                        // The peer is a balancer: no message, as for every PROXY refusal.
                        self.refuse_quietly(peer, &Refusal::Closing);
                        close_after_taking_what_arrived(stream);
                    } else {
                        closing += 1;
                        self.refuse(stream, peer, &Refusal::Closing);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted || is_connection_error(&e) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("accept on {} while closing it: {e}", listener.local);
                    break;
                }
            }
        }
        if closing > 0 {
            info!(
                "closing {}: answered {closing} queued clients with refusal_message",
                listener.local
            );
        }
    }
}

/// Stops `listener` listening in every process that holds a copy of it, which closing ours
/// alone does not: a child forked a moment ago holds one until it has closed what it
/// inherited, and meanwhile the address could not be bound again (a reload's swap) and new
/// clients would queue where nobody accepts. Call after draining the queue: connections still
/// queued are reset. Not for a socket systemd passed: systemd keeps listening on its copy, to
/// start the service again on the next connection.
pub(super) fn stop_accepting_everywhere(listener: &Listener) {
    if !listener.from_systemd {
        let _ = SockRef::from(&listener.socket).shutdown(std::net::Shutdown::Read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shutdown_passes_to_the_next_image_with_its_time_left() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3);
        for phase in [
            Phase::Draining { until: later },
            Phase::Terminating { until: later },
            Phase::Killing,
        ] {
            let passed = phase.export(now).unwrap();
            // What passes is the time left (an exec takes milliseconds): imported 1 s later,
            // the deadline is 1 s later.
            let next = now + Duration::from_secs(1);
            let shifted = |until: Instant| until + Duration::from_secs(1);
            let expected = match phase {
                Phase::Draining { until } => Phase::Draining {
                    until: shifted(until),
                },
                Phase::Terminating { until } => Phase::Terminating {
                    until: shifted(until),
                },
                other => other,
            };
            assert_eq!(Phase::import(Some(&passed), next), expected);
        }
        assert_eq!(Phase::Serving.export(now), None);
        assert_eq!(Phase::import(None, now), Phase::Serving);
        // A deadline already past passes as "now".
        let past = Phase::Draining { until: now };
        let passed = past.export(now + Duration::from_secs(5)).unwrap();
        assert_eq!(passed.until_in_ns, Some(0));
    }
}

//! The parent: one `mio::Poll` loop over the listeners and the signal pipe, and nothing else.
//!
//! Each turn of the loop: wait; handle signals first (reap, shutdown, status), because a SIGTERM
//! must close the listeners before more is accepted; then accept a bounded batch from each
//! listener that has connections queued, and for each connection either refuse it (see
//! `limits`: no fork, no blocking call), let it wait briefly in `pending` (its source is at
//! `max_per_source` but one of its sessions may be ending), or fork its child. At
//! `max_children` the listeners are taken out of the poll set, so clients wait in the kernel's
//! backlog until a child is reaped. The parent never reads or writes a client's bytes (but a
//! refusal message) and waits nowhere but in `poll`: its log, its notifications to systemd and
//! the files it opens on reload (configuration, log) are written and opened without waiting.
//!
//! Shutdown is a small state machine driven by signals and the poll timeout, with PostgreSQL's
//! three modes as entry points: `Serving` → (SIGTERM, smart) `Draining` until
//! `shutdown_timeout` → (SIGINT, fast, enters here) SIGTERM to the children, `Terminating` for
//! `kill_timeout` → (SIGQUIT, immediate, enters here) SIGKILL, `Killing` until all are reaped.
//! A repeated SIGTERM/SIGINT moves one step on; signals that arrive together count as the
//! hardest of them, once. The loop ends when
//! it is no longer serving and no child is left, so no child outlives the parent's exit; if
//! `poll` itself fails, the children are killed and reaped before the error is returned.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, ErrorKind};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use signal_hook_mio::v1_0::Signals;
use socket2::SockRef;

use crate::children::{seconds, Children};
use crate::config::{Config, ConfigError};
use crate::limits::{self, Admission, Limits, Refusal};
use crate::listen::Listener;
use crate::parent_memory;
use crate::pending::{self, Pending};
use crate::session::Settings;
use crate::signals::{self, Mode};
use crate::spawn;

/// The signal pipe's token; listener `i` is `Token(i)`.
const SIGNALS: Token = Token(usize::MAX);
/// Connections taken from one listener per turn before signals are looked at again, so a flood
/// of clients cannot starve the reaper or delay a shutdown.
const ACCEPT_BATCH: usize = 64;
/// How long accepting pauses when the parent runs out of descriptors, memory or processes.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Reaching `max_children` is logged at most this often (with a count of the times in
/// between): under load the number of children crosses the limit thousands of times a minute.
const CAPACITY_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
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

/// Produces the configuration anew (same file, same flags) for a SIGHUP reload, given the one
/// running. It must not wait for anything slow (it runs inside the loop): see
/// [`Config::reload`], which looks up no user or group.
pub type Reloader = Box<dyn Fn(&Config) -> Result<Config, ConfigError>>;

/// One flag per listener, kept in memory the children do not inherit.
type ListenerFlags = allocator_api2::vec::Vec<bool, parent_memory::ParentOnly>;

fn listener_flags(listeners: usize, value: bool) -> ListenerFlags {
    let mut flags = ListenerFlags::with_capacity_in(listeners, parent_memory::ParentOnly);
    flags.resize(listeners, value);
    flags
}

pub struct Server {
    /// Poll results: one event per registered source at most (listeners + the signal pipe).
    /// Allocated once, at startup: the kernel writes it between every two forks, and each
    /// distinct heap page the parent writes costs it a copy-on-write fault and stays private in
    /// the newest child, so it must not move or grow. (mio allocates it on the heap; it cannot
    /// live in parent-only memory like the children table.)
    events: Events,
    poll: Poll,
    /// The configuration in force: what a reload compares against.
    config: Config,
    reload: Reloader,
    /// Read end of the self-pipe the signal handlers write to.
    signals: Signals,
    /// Listener `i` is registered as `Token(i)`; emptied on shutdown.
    listeners: Vec<Listener>,
    /// `ready[i]`: listener `i` may have connections queued (edge-triggered readiness is only
    /// reported once, so we remember it until `accept` says WouldBlock). Written on every
    /// event, so it lives in parent-only memory, like the children table: a heap page written
    /// between two forks is a copy-on-write fault.
    ready: ListenerFlags,
    children: Children,
    /// What each new child needs for its session.
    settings: Settings,
    /// The limits in force: one value, so a reload can replace it whole.
    limits: Limits,
    /// Token buckets and refusal counts.
    admission: Admission,
    /// True while `max_children` children run and the listeners are out of the poll set.
    at_capacity: bool,
    /// `registered[i]`: listener `i` is in the poll set. Tracked per listener so that one
    /// whose re-registration failed is retried instead of staying deaf for good.
    registered: Vec<bool>,
    shutdown_timeout: Duration,
    /// Time between the SIGTERM and the SIGKILL sent to children on shutdown.
    kill_timeout: Duration,
    phase: Phase,
    /// Accepting is paused until then, after running out of descriptors or memory.
    paused_until: Option<Instant>,
    /// Accept failures since the last successful accept; a warning is logged only for the first.
    accept_failures: u64,
    fork_failures: u64,
    /// Fork failures since the last successful fork; a warning is logged only for the first.
    fork_failure_run: u64,
    /// Connections waiting for a session of their source to end (see `pending`).
    pending: Pending,
    /// Which `max_children` state changes get a log line.
    capacity_reports: CapacityReports,
    started: Instant,
}

impl Server {
    /// Sets up the loop: the poll instance, the signal handlers (from here on a signal is a
    /// request, never a default action), and the listeners. Nothing is accepted before
    /// [`Server::run`]. `reload` re-reads the configuration (file and command line) on SIGHUP.
    pub fn new(
        config: &Config,
        mut listeners: Vec<Listener>,
        reload: Reloader,
    ) -> io::Result<Server> {
        spawn::install_panic_hook();
        // Before the children table exists: its memory comes from here.
        if !parent_memory::reserve() {
            debug!("no MADV_WIPEONFORK: the children table is on the ordinary heap");
        }
        let limits = config.limits.clone();
        limits.index_rules();
        let poll = Poll::new()?;
        let mut signals = signals::hook()?;
        let events = Events::with_capacity(64);
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        for (i, listener) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(&mut listener.socket, Token(i), Interest::READABLE)?;
        }
        Ok(Server {
            poll,
            signals,
            // Connections may already be queued before the first edge is seen.
            ready: listener_flags(listeners.len(), true),
            registered: vec![true; listeners.len()],
            listeners,
            children: Children::with_capacity(16),
            events,
            settings: Settings::from(config),
            config: config.clone(),
            reload,
            limits,
            admission: Admission::default(),
            at_capacity: false,
            shutdown_timeout: config.shutdown_timeout,
            kill_timeout: config.kill_timeout,
            phase: Phase::Serving,
            paused_until: None,
            accept_failures: 0,
            fork_failures: 0,
            fork_failure_run: 0,
            pending: Pending::default(),
            capacity_reports: CapacityReports::default(),
            started: Instant::now(),
        })
    }

    /// Serves until a shutdown completes. `ready` runs once the daemon can be signalled and
    /// serves (the pid file is written by then; `--daemonize` reports back; sd_notify READY).
    pub fn run(mut self, ready: Box<dyn FnOnce()>) -> io::Result<()> {
        // Announced only now that the signal handlers are installed: whoever waits for this
        // line (a test, a supervisor) may send SIGTERM at once and must not kill us.
        for listener in &self.listeners {
            info!("listening on {}", listener.local);
        }
        ready();
        release_startup_memory();
        self.serve()
    }

    fn serve(&mut self) -> io::Result<()> {
        while !self.finished() {
            let timeout = self.next_wakeup();
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                // Without the loop nobody would reap or stop the children: take them along.
                self.children.kill_and_reap_all();
                return Err(e);
            }
            let mut signalled = false;
            for event in self.events.iter() {
                match event.token() {
                    SIGNALS => signalled = true,
                    Token(i) => {
                        if let Some(ready) = self.ready.get_mut(i) {
                            *ready = true;
                        }
                    }
                }
            }
            if signalled {
                self.handle_signals();
            }
            self.handle_deadlines();
            self.accept_ready();
        }
        info!("shutdown complete");
        Ok(())
    }

    /// True once shutting down and every child has been reaped.
    fn finished(&self) -> bool {
        self.phase != Phase::Serving && self.children.is_empty()
    }

    fn accepting(&self) -> bool {
        self.phase == Phase::Serving && self.paused_until.is_none() && !self.at_capacity
    }

    /// The poll timeout: the nearest deadline, zero if a listener still has work, else none.
    fn next_wakeup(&self) -> Option<Duration> {
        if self.accepting() && self.ready.iter().any(|&r| r) {
            return Some(Duration::ZERO);
        }
        let deadline = match self.phase {
            Phase::Draining { until } | Phase::Terminating { until } => Some(until),
            // Waiting connections are decided only with room for children (`decide_pending`):
            // at capacity their deadlines would only spin the loop.
            Phase::Serving => earliest(
                earliest(
                    self.paused_until,
                    self.pending.next_deadline().filter(|_| !self.at_capacity),
                ),
                self.capacity_reports
                    .catch_up_due()
                    .filter(|_| self.at_capacity),
            ),
            Phase::Killing => None,
        }?;
        Some(deadline.saturating_duration_since(Instant::now()))
    }

    fn handle_signals(&mut self) {
        let requests = signals::pending(&mut self.signals);
        // Reap first, so status lines and shutdown decisions see the current table.
        if requests.reap {
            let before = self.children.len();
            self.children.reap();
            if self.fork_failure_run > 0 && self.children.len() < before {
                // A child's exit is what frees a process slot: try forking again now.
                self.paused_until = None;
            }
            self.check_capacity();
            self.decide_pending();
        }
        // One shutdown step per batch: a SIGTERM and a SIGINT that arrive together are one
        // request (the harder: fast), not a request and its escalation.
        if let Some((mode, signal)) = requests.shutdown {
            self.shutdown(mode, signal);
        }
        if requests.reload {
            // First, and whether or not the configuration reloads: logrotate's SIGHUP must
            // not depend on the config file being valid.
            let reopened = self.reopen_log_file();
            self.reload(reopened);
        }
        if requests.status {
            self.log_status();
        }
    }

    fn handle_deadlines(&mut self) {
        let now = Instant::now();
        if self.paused_until.is_some_and(|t| t <= now) {
            self.paused_until = None;
            if self.phase == Phase::Serving && !self.at_capacity {
                self.set_polling(true);
            }
        }
        if self.pending.next_deadline().is_some_and(|t| t <= now) {
            self.decide_pending();
        }
        if self.at_capacity
            && self
                .capacity_reports
                .catch_up_due()
                .is_some_and(|t| t <= now)
        {
            let unreported = self.capacity_reports.catch_up(now);
            self.log_capacity_reached(unreported);
        }
        match self.phase {
            Phase::Draining { until } if until <= now && !self.children.is_empty() => {
                info!(
                    "shutdown timeout: {} sessions still running; sending them SIGTERM",
                    self.children.len()
                );
                self.terminate_children();
            }
            Phase::Terminating { until } if until <= now => {
                info!(
                    "{} children still running {} after SIGTERM; sending them SIGKILL",
                    self.children.len(),
                    seconds(self.kill_timeout)
                );
                self.kill_children();
            }
            _ => {}
        }
    }

    /// A shutdown request: the first one enters the state machine at its mode's step; while
    /// shutting down, any request moves at least one step on (a repeated SIGTERM means "now").
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn shutdown(&mut self, mode: Mode, signal: Signal) {
        let sig = signal.as_str();
        let n = self.children.len();
        if self.phase == Phase::Serving {
            crate::systemd::stopping(&format!("{} shutdown on {sig}", mode.name()));
        }
        match (self.phase, mode) {
            (Phase::Killing, _) => {}
            (_, Mode::Immediate) | (Phase::Terminating { .. }, _) => {
                info!("shutting down on {sig} (immediate): sending SIGKILL to {n} sessions");
                self.stop_listening(false);
                self.kill_children();
            }
            (Phase::Serving, Mode::Smart) => {
                info!(
                    "shutting down on {sig} (smart): stopped listening; waiting up to {} for \
                     {n} sessions (SIGTERM again or SIGINT: fast; SIGQUIT: immediate)",
                    seconds(self.shutdown_timeout)
                );
                // Clients queued in the backlog are served first (and join the draining).
                self.stop_listening(true);
                self.phase = Phase::Draining {
                    until: Instant::now() + self.shutdown_timeout,
                };
            }
            (Phase::Serving, Mode::Fast) | (Phase::Draining { .. }, _) => {
                info!(
                    "shutting down on {sig} (fast): sending SIGTERM to {n} sessions, SIGKILL \
                     to those left after {}",
                    seconds(self.kill_timeout)
                );
                self.stop_listening(false);
                self.terminate_children();
            }
        }
    }

    fn terminate_children(&mut self) {
        self.children.signal_all(Signal::SIGTERM);
        self.phase = Phase::Terminating {
            until: Instant::now() + self.kill_timeout,
        };
    }

    fn kill_children(&mut self) {
        self.children.signal_all(Signal::SIGKILL);
        self.phase = Phase::Killing;
    }

    /// Enters or leaves the at-capacity state as the number of children crosses `max_children`,
    /// logging each change once. At capacity the listeners leave the poll set: new clients
    /// wait in the backlog instead of waking the loop for nothing.
    fn check_capacity(&mut self) {
        let full = self.at_max_children();
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
            self.ready.iter_mut().for_each(|r| *r = true);
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
    fn log_capacity_reached(&self, unreported: u64) {
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
    fn set_polling(&mut self, on: bool) {
        for (i, listener) in self.listeners.iter_mut().enumerate() {
            if self.registered[i] == on {
                continue;
            }
            let registry = self.poll.registry();
            let result = if on {
                registry.register(&mut listener.socket, Token(i), Interest::READABLE)
            } else {
                registry.deregister(&mut listener.socket)
            };
            match result {
                Ok(()) => self.registered[i] = on,
                Err(e) => {
                    warn!("cannot change polling of {}: {e}; retrying", listener.local);
                    self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                }
            }
        }
    }

    /// Collects children that have exited but whose SIGCHLD the loop has not handled yet (it
    /// handles signals between accept batches). Called only when a limit is about to bite, so
    /// that the limit counts live sessions: under a burst of short sessions, finished ones
    /// would otherwise be counted and clients refused for sessions that no longer exist.
    fn reap_before_limiting(&mut self) {
        self.children.reap();
    }

    /// True when `max_children` children are live, counting only live ones.
    fn at_max_children(&mut self) -> bool {
        if !self.limits.children_full(self.children.len()) {
            return false;
        }
        self.reap_before_limiting();
        self.limits.children_full(self.children.len())
    }

    /// Closes every listener: new clients are refused by the kernel from now on. Clients
    /// already queued on them completed their handshake, and closing a listener resets them:
    /// each is accepted first and, with `admit` (smart shutdown), served under the usual
    /// limits, or else answered with `refusal_message`. Connections waiting in `pending` are
    /// decided now.
    fn stop_listening(&mut self, admit: bool) {
        self.set_polling(false);
        let listeners = std::mem::take(&mut self.listeners);
        for listener in &listeners {
            self.drain_queue_of(listener, admit);
            stop_accepting_everywhere(listener);
        }
        drop(listeners);
        self.ready.clear();
        self.registered.clear();
        for waiting in self.pending.take_all() {
            if admit && !self.at_max_children() {
                self.start_session(waiting.stream, waiting.peer, MayWait::No);
            } else {
                self.refuse(waiting.stream, waiting.peer, &Refusal::Closing);
            }
        }
    }

    /// Accepts a batch from every listener that may have connections queued.
    fn accept_ready(&mut self) {
        for i in 0..self.listeners.len() {
            if self.ready[i] && self.accepting() {
                self.accept_batch(i);
            }
        }
    }

    /// Accepts up to `ACCEPT_BATCH` connections from listener `i`, forking a child for each.
    /// Leaves `ready[i]` set if the queue may not be empty yet.
    fn accept_batch(&mut self, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            // At `max_children`, or paused after a fork failure: the rest wait in the backlog.
            if !self.accepting() {
                return;
            }
            match accept_blocking(&self.listeners[i].socket) {
                Ok((stream, peer)) => {
                    self.accept_recovered();
                    self.start_session(stream, peer, MayWait::Grace);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // The queue is empty, so accept works again: the next failure is a new run.
                    self.accept_recovered();
                    self.ready[i] = false;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_connection_error(&e) => {
                    // The client is gone or was refused before we got to it; the next may be fine.
                    debug!("accept on {}: {e} (skipped)", self.listeners[i].local);
                }
                Err(e) => {
                    self.pause_accepting(i, &e);
                    return;
                }
            }
        }
    }

    /// Out of descriptors or memory (or something unforeseen): the queued connection stays in
    /// the kernel's backlog and we try again after a short pause, instead of spinning on the
    /// same error or giving up on the listener. One warning per run of failures.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn pause_accepting(&mut self, i: usize, e: &io::Error) {
        if self.accept_failures == 0 {
            warn!(
                "accept on {} failed: {}; retrying every {} until it succeeds",
                self.listeners[i].local,
                crate::os_error_text(e),
                seconds(ACCEPT_BACKOFF)
            );
        }
        self.accept_failures += 1;
        self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
    }

    fn accept_recovered(&mut self) {
        if self.accept_failures > 0 {
            info!(
                "accepting again after {} failed attempts",
                self.accept_failures
            );
            self.accept_failures = 0;
        }
    }

    /// Admits or refuses one accepted connection, and forks its child if admitted. Kept short on
    /// purpose: all per-session setup (socket options, banner) happens in the child.
    ///
    /// A connection whose source is at `max_per_source` may wait in `pending`, as `may_wait`
    /// says, for one of that source's sessions to be reaped, instead of being refused at once
    /// (see `pending` for why).
    fn start_session(&mut self, stream: TcpStream, peer: SocketAddr, may_wait: MayWait) {
        let source = limits::source_of(peer.ip(), &self.limits);
        let mut live = self.children.from_source(&source);
        if self.limits.per_source_full(live) {
            self.reap_before_limiting();
            live = self.children.from_source(&source);
            if let Some(until) = may_wait
                .until()
                .filter(|_| self.limits.per_source_full(live))
            {
                if self.may_wait(&source) {
                    self.wait_for_source(stream, peer, until);
                    return;
                }
            }
        }
        let admitted = self
            .admission
            .admit(peer.ip(), source, live, &self.limits, Instant::now());
        if let Err(refusal) = admitted {
            self.refuse(stream, peer, &refusal);
            return;
        }
        match spawn::spawn_session(stream, peer, &self.settings) {
            Ok(pid) => {
                self.children.add(pid, peer, source);
                info!(
                    "accepted {peer} -> child {pid} ({} active)",
                    self.children.len()
                );
                self.fork_recovered();
                self.check_capacity();
            }
            Err((stream, e)) => self.fork_failed(stream, peer, &e),
        }
    }

    /// True if one more connection from `source` may wait in `pending`: the table has room,
    /// and fewer of the source's connections wait than it has sessions that could be ending
    /// (`max_per_source`), so that one source cannot take every place.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn may_wait(&self, source: &ipnet::IpNet) -> bool {
        let limits = &self.limits;
        !self.pending.is_full()
            && self
                .pending
                .count(|peer| limits::source_of(peer.ip(), limits) == *source)
                < limits.max_per_source
    }

    /// Parks a connection whose source is at `max_per_source` until `until` (see `pending`).
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn wait_for_source(&mut self, stream: TcpStream, peer: SocketAddr, until: Instant) {
        debug!(
            "{peer}: its source is at max_per_source; waiting up to {} for one of its \
             sessions to end",
            seconds(until.saturating_duration_since(Instant::now()))
        );
        self.pending.add(stream, peer, until);
    }

    /// Decides the waiting connections whose source has room again or whose time is up,
    /// as long as there is room for children.
    fn decide_pending(&mut self) {
        if self.pending.is_empty() || self.phase != Phase::Serving || self.at_capacity {
            return;
        }
        let (limits, children) = (&self.limits, &self.children);
        let decidable = self.pending.take_decidable(Instant::now(), |peer| {
            let source = limits::source_of(peer.ip(), limits);
            !limits.per_source_full(children.from_source(&source))
        });
        let now = Instant::now();
        for waiting in decidable {
            if self.at_capacity {
                // Out of room for children: it waits again, as clients do in the backlog.
                let until = waiting.until.max(now + pending::PER_SOURCE_GRACE);
                self.pending.add(waiting.stream, waiting.peer, until);
                continue;
            }
            // One that is not late yet may wait again if its source filled up meanwhile
            // (two connections waiting for one session to end).
            let may_wait = if waiting.until > now {
                MayWait::Until(waiting.until)
            } else {
                MayWait::No
            };
            self.start_session(waiting.stream, waiting.peer, may_wait);
        }
    }

    /// A fork that failed (out of processes or memory, usually for a while): the client
    /// already accepted gets `refusal_message`, and accepting pauses as it does when accept
    /// fails, so that the clients still queued wait in the backlog instead of each being
    /// accepted and closed. One warning per run of failures.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn fork_failed(&mut self, stream: TcpStream, peer: SocketAddr, e: &io::Error) {
        self.fork_failures += 1;
        self.fork_failure_run += 1;
        if self.fork_failure_run == 1 {
            warn!(
                "cannot fork for {peer}: {}; refused it; accepting pauses until a session \
                 ends, or for {} growing to 5s, until a fork succeeds",
                crate::os_error_text(e),
                seconds(ACCEPT_BACKOFF)
            );
        } else {
            debug!(
                "cannot fork for {peer}: {}; refused",
                crate::os_error_text(e)
            );
        }
        self.send_refusal(stream);
        if self.phase == Phase::Serving {
            self.paused_until = Some(Instant::now() + fork_backoff(self.fork_failure_run));
        }
    }

    fn fork_recovered(&mut self) {
        if self.fork_failure_run > 0 {
            info!(
                "forking again after {} failed attempts",
                self.fork_failure_run
            );
            self.fork_failure_run = 0;
        }
    }

    /// Closes a refused connection, after one non-blocking attempt at the refusal message: the
    /// socket's send buffer is empty, so a short message goes out whole or not at all, and the
    /// loop never waits for a client it is turning away.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn refuse(&mut self, stream: TcpStream, peer: SocketAddr, refusal: &Refusal) {
        info!("refused {peer}: {refusal}");
        if *refusal == Refusal::Closing {
            // Admission counts its own refusals; this one is the loop's.
            self.admission.refused.count(refusal);
        }
        self.send_refusal(stream);
    }

    /// Writes `refusal_message` without waiting and closes the connection.
    fn send_refusal(&self, stream: TcpStream) {
        // The socket is blocking (see `accept_blocking`): each call here says MSG_DONTWAIT.
        // MSG_NOSIGNAL: a client already gone is EPIPE here, never a SIGPIPE.
        let socket = SockRef::from(&stream);
        if !self.limits.refusal_message.is_empty() {
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            let _ = socket.send_with_flags(&self.limits.refusal_message, flags);
        }
        // Why: closing a socket with unread input sends RST, which would also destroy the
        // message; clients usually send at once. Take what has arrived (one non-blocking read)
        // so the close is a FIN after the message. A client that sent more still gets a reset.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut unread = [MaybeUninit::uninit(); 4096];
        let _ = socket.recv_with_flags(&mut unread, libc::MSG_DONTWAIT);
    }

    /// SIGHUP: re-read the configuration and apply it to everything that starts from now on
    /// (sessions already running keep what they were forked with). All or nothing: a config
    /// that does not parse or validate, or a new address that cannot be bound, is refused and
    /// the running configuration stays, listeners included.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn reload(&mut self, log_reopened: Option<&'static str>) {
        let new = match (self.reload)(&self.config) {
            Ok(new) => new,
            Err(e) => {
                let also = log_reopened.map_or(String::new(), |r| format!(" ({r})"));
                error!("reload refused: {e}; the running configuration stays{also}");
                return;
            }
        };
        // Sockets passed by systemd belong to its .socket unit: `listen` does not apply.
        let serving =
            self.phase == Phase::Serving && !self.listeners.iter().any(|l| l.from_systemd);
        // Bind what is new before anything changes: a failure here leaves all as it was.
        // An address that overlaps one being removed (0.0.0.0:P replacing 127.0.0.1:P) can
        // only be bound once that one is closed: it is swapped in `install_listeners`.
        let (fresh, swapped) = if serving {
            let (swapped, added) = self.addresses_to_add(&new.listen);
            if let Err(reason) = check_swaps_possible(&swapped) {
                error!("reload refused: {reason}; the running configuration stays");
                return;
            }
            match crate::listen::bind_all(&added, new.backlog, new.reuse_port) {
                Ok(fresh) => (fresh, swapped),
                Err(e) => {
                    error!("reload refused: {e}; the running configuration stays");
                    return;
                }
            }
        } else {
            (Vec::new(), Vec::new())
        };
        let mut changes = describe_changes(&self.config, &new);
        changes.extend(log_reopened.map(str::to_string));
        if new.pid_file != self.config.pid_file {
            warn!("pid_file changes take effect at the next start");
        }
        if new.log_file != self.config.log_file {
            warn!("log_file changes take effect at the next start; SIGHUP reopens the one in use");
        }
        if new.daemonize != self.config.daemonize {
            warn!("daemonize changes take effect at the next start");
        }
        if new.identity_changed(&self.config) {
            warn!("user and group changes take effect at the next start (root is gone)");
        }
        self.settings = Settings::from(&new);
        self.limits = new.limits.clone();
        // Built here, in the copy the loop reads, not in the configuration's copy.
        self.limits.index_rules();
        self.shutdown_timeout = new.shutdown_timeout;
        self.kill_timeout = new.kill_timeout;
        crate::logging::set_level(new.log_level);
        if serving {
            changes.extend(self.install_listeners(&new, fresh, &swapped));
        }
        // The pid file, log file and daemon mode in force are those of the start; keep
        // describing those.
        let (pid_file, log_file) = (self.config.pid_file.take(), self.config.log_file.take());
        let daemonize = self.config.daemonize;
        self.config = new;
        (self.config.pid_file, self.config.log_file) = (pid_file, log_file);
        self.config.daemonize = daemonize;
        if changes.is_empty() {
            info!("reloaded configuration: nothing changed");
        } else {
            info!("reloaded configuration: {}", changes.join(", "));
        }
        crate::systemd::status("serving (configuration reloaded)");
        self.check_capacity();
        // A large configuration (a long deny list) was parsed, copied and perhaps replaced:
        // give the freed heap back, or every later fork would copy its page tables.
        release_startup_memory();
    }

    /// The addresses of `listen` not listened on yet, split in two: those that overlap a
    /// listener this reload removes (same port, one of them a wildcard), which can be bound
    /// only after it closes, and the rest.
    fn addresses_to_add(&self, listen: &[SocketAddr]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let current: HashSet<SocketAddr> = self.listeners.iter().map(|l| l.configured).collect();
        let wanted: HashSet<SocketAddr> = listen.iter().copied().collect();
        let removed: Vec<SocketAddr> = current.difference(&wanted).copied().collect();
        listen
            .iter()
            .filter(|a| !current.contains(a))
            .partition(|a| removed.iter().any(|r| crate::listen::overlap(*r, **a)))
    }

    /// Reopens `log_file` under its name (after logrotate renamed it), without waiting: a path
    /// that is no longer a regular file is refused and the log stays where it was. Returns
    /// what to add to the reload line, `None` without a log file. Sessions already running
    /// keep writing to the file they inherited until they end.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn reopen_log_file(&mut self) -> Option<&'static str> {
        let path = self.config.log_file.as_deref()?;
        match crate::daemon::reopen_log(path) {
            Ok(()) => {
                crate::logging::stderr_replaced();
                Some("log_file reopened")
            }
            Err(reason) => {
                error!("cannot reopen log_file: {reason}; logging on to the file open before");
                Some("log_file NOT reopened")
            }
        }
    }

    /// Replaces the listeners by those configured in `new.listen`: keeps the ones still
    /// wanted, adds `fresh` (already bound), and closes the rest, after serving every
    /// connection already queued on them (those clients completed their handshake: closing
    /// the listener would reset them). Then binds `swapped`, the addresses that overlap a
    /// closed one; should that fail, the closed addresses are bound again. Returns what
    /// changed, for the reload's log line.
    fn install_listeners(
        &mut self,
        new: &Config,
        fresh: Vec<Listener>,
        swapped: &[SocketAddr],
    ) -> Vec<String> {
        // Tokens are indexes into `listeners`: take every listener out of the poll set and
        // put the survivors and the new ones back under their new tokens.
        self.set_polling(false);
        let (kept, dropped): (Vec<Listener>, Vec<Listener>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| new.listen.contains(&l.configured));
        let mut changes = Vec::new();
        let mut closed = Vec::new();
        for listener in dropped {
            self.drain_queue_of(&listener, true);
            stop_accepting_everywhere(&listener);
            info!("stopped listening on {}", listener.local);
            changes.push(format!("listen -{}", listener.local));
            closed.push(listener.configured);
        }
        let mut added = fresh;
        if !swapped.is_empty() {
            added.extend(self.bind_swapped(new, swapped, &closed, &mut changes));
        }
        for listener in &added {
            info!("listening on {}", listener.local);
            changes.push(format!("listen +{}", listener.local));
        }
        self.listeners = kept.into_iter().chain(added).collect();
        self.registered = vec![false; self.listeners.len()];
        // Queued connections raise no new edge: look at every listener on the next turn.
        self.ready = listener_flags(self.listeners.len(), true);
        if !self.at_capacity {
            self.set_polling(true);
        }
        changes
    }

    /// Binds the addresses that could not be bound while `closed` were open. If that fails,
    /// binds the closed ones that overlap them again, so the port keeps a listener; the
    /// failure is logged and said in the reload line.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn bind_swapped(
        &mut self,
        new: &Config,
        swapped: &[SocketAddr],
        closed: &[SocketAddr],
        changes: &mut Vec<String>,
    ) -> Vec<Listener> {
        let error = match crate::listen::bind_all(swapped, new.backlog, new.reuse_port) {
            Ok(bound) => return bound,
            Err(e) => e,
        };
        let back: Vec<SocketAddr> = closed
            .iter()
            .filter(|c| swapped.iter().any(|s| crate::listen::overlap(**c, *s)))
            .copied()
            .collect();
        let restored = crate::listen::bind_all(&back, self.config.backlog, self.config.reuse_port);
        match &restored {
            Ok(_) => error!("reload: {error}; listening on the addresses it replaced again"),
            Err(again) => error!("reload: {error}; and {again}: the port has no listener now"),
        }
        changes.push(format!("FAILED: {error}"));
        restored.unwrap_or_default()
    }

    /// Accepts every connection queued on a listener that is about to close: those clients
    /// completed their handshake, and closing the listener would reset them. With `admit`,
    /// each is admitted or refused as always while there is room under `max_children`, which
    /// stays a hard limit; the rest are refused with `refusal_message` (`Refusal::Closing`).
    /// Bounded by twice what the kernel queues there (`backlog + 1` completed connections, with
    /// the backlog the listener was bound with), so a flood on the closing address cannot keep
    /// the loop from its signals.
    fn drain_queue_of(&mut self, listener: &Listener, admit: bool) {
        let mut closing = 0u64;
        for _ in 0..2 * (listener.backlog as usize + 1) {
            match accept_blocking(&listener.socket) {
                Ok((stream, peer)) => {
                    if admit && !self.at_max_children() {
                        self.start_session(stream, peer, MayWait::No);
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

    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn log_status(&self) {
        let totals = &self.children.totals;
        let mut endings: Vec<String> = totals
            .exited()
            .map(|(code, n)| format!("code {code}: {n}"))
            .collect();
        endings.extend(totals.killed().map(|(sig, n)| format!("{sig}: {n}")));
        let busiest: Vec<String> = self
            .children
            .busiest_sources(3)
            .iter()
            .map(|(source, n)| format!("{source}: {n}"))
            .collect();
        let refused = &self.admission.refused;
        info!(
            "status: {} active (max {}), {} accepted, {} ended [{}], {} refused [{}], \
             {} fork failures, {} waiting, busiest sources [{}], {} log lines dropped, \
             {} sd_notify messages dropped, uptime {}",
            self.children.len(),
            self.limits.max_children,
            totals.forked + self.fork_failures,
            totals.ended(),
            endings.join(", "),
            refused.total(),
            refused,
            self.fork_failures,
            self.pending.len(),
            busiest.join(", "),
            crate::logging::dropped_lines(),
            crate::systemd::dropped(),
            seconds(self.started.elapsed())
        );
    }
}

/// What a reload changes, as `key old -> new` items for one log line (listen addresses are
/// reported by `install_listeners`).
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    let mut compare = |key: &str, a: &dyn fmt::Display, b: &dyn fmt::Display| {
        let (a, b) = (a.to_string(), b.to_string());
        if a != b {
            changes.push(format!("{key} {a} -> {b}"));
        }
    };
    let secs = |d: Option<Duration>| d.map_or("never".to_string(), |d| seconds(d).to_string());
    let (o, n) = (&old.limits, &new.limits);
    // Both are socket options set at bind: kept listeners keep theirs, new addresses get these.
    compare("backlog (new addresses only)", &old.backlog, &new.backlog);
    compare(
        "idle_timeout",
        &secs(old.idle_timeout),
        &secs(new.idle_timeout),
    );
    compare(
        "max_session_time",
        &secs(old.max_session_time),
        &secs(new.max_session_time),
    );
    compare(
        "shutdown_timeout",
        &seconds(old.shutdown_timeout),
        &seconds(new.shutdown_timeout),
    );
    compare(
        "kill_timeout",
        &seconds(old.kill_timeout),
        &seconds(new.kill_timeout),
    );
    compare("log_level", &old.log_level, &new.log_level);
    compare("max_children", &o.max_children, &n.max_children);
    compare("max_per_source", &o.max_per_source, &n.max_per_source);
    compare("source_prefix_v4", &o.source_prefix_v4, &n.source_prefix_v4);
    compare("source_prefix_v6", &o.source_prefix_v6, &n.source_prefix_v6);
    compare("rate", &format!("{:?}", o.rate), &format!("{:?}", n.rate));
    compare(
        "reuse_port (new addresses only)",
        &old.reuse_port,
        &new.reuse_port,
    );
    // Values that may be long: compared whole, shown summarised.
    let mut compare_long = |key: &str, changed: bool, a: String, b: String| {
        if changed {
            changes.push(format!("{key} {a} -> {b}"));
        }
    };
    let text = |bytes: &[u8]| summarise_text(bytes);
    let (banner, message) = (&new.banner, &n.refusal_message);
    compare_long(
        "banner",
        old.banner != *banner,
        text(&old.banner),
        text(banner),
    );
    compare_long(
        "refusal_message",
        o.refusal_message != *message,
        text(&o.refusal_message),
        text(message),
    );
    let list = |l: &[ipnet::IpNet]| summarise_list(l);
    compare_long("allow", o.allow != n.allow, list(&o.allow), list(&n.allow));
    compare_long("deny", o.deny != n.deny, list(&o.deny), list(&n.deny));
    changes
}

/// Whether a connection whose source is at `max_per_source` may wait in `pending`.
#[derive(Debug, Clone, Copy)]
enum MayWait {
    /// For `PER_SOURCE_GRACE` from now (a fresh connection).
    Grace,
    /// Until its deadline (one that has waited already).
    Until(Instant),
    /// Decide now.
    No,
}

impl MayWait {
    /// The deadline, read from the clock only when it is needed (rarely).
    fn until(self) -> Option<Instant> {
        match self {
            MayWait::Grace => Some(Instant::now() + pending::PER_SOURCE_GRACE),
            MayWait::Until(until) => Some(until),
            MayWait::No => None,
        }
    }
}

/// Which crossings of `max_children` are worth a log line: at most one "reached" line per
/// `CAPACITY_REPORT_INTERVAL`, each saying how often the limit was reached since the last one,
/// and a "below again" line only for an episode whose start was logged.
#[derive(Debug, Default)]
struct CapacityReports {
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
    fn catch_up_due(&self) -> Option<Instant> {
        if self.episode_logged {
            return None;
        }
        Some(self.last? + CAPACITY_REPORT_INTERVAL)
    }

    /// Logs the current episode late, at `now`: returns how many episodes before it went
    /// unreported.
    fn catch_up(&mut self, now: Instant) -> u64 {
        self.episode_logged = true;
        self.last = Some(now);
        // The current episode was counted as unreported when it began.
        std::mem::take(&mut self.unreported).saturating_sub(1)
    }
}

/// A swap closes a listener before binding its replacement; refused where the replacement
/// cannot be bound: a privileged port once the privilege is gone (the old address could not
/// be bound again either).
fn check_swaps_possible(swapped: &[SocketAddr]) -> Result<(), String> {
    let start = unprivileged_port_start();
    let privileged = swapped.iter().find(|a| a.port() < start);
    match privileged {
        Some(addr) if !can_bind_privileged_ports() => Err(format!(
            "{addr} replaces an overlapping address on a port below {start}, which this \
             process may no longer bind (no CAP_NET_BIND_SERVICE)"
        )),
        _ => Ok(()),
    }
}

/// The first port anyone may bind (`net.ipv4.ip_unprivileged_port_start`, 1024 unless
/// changed). A procfs file: reading it never waits.
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1024)
}

/// True if this process holds CAP_NET_BIND_SERVICE (root usually does, a dropped user not).
fn can_bind_privileged_ports() -> bool {
    const CAP_NET_BIND_SERVICE: u32 = 10;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    match effective {
        Some(caps) => caps & (1 << CAP_NET_BIND_SERVICE) != 0,
        None => nix::unistd::geteuid().is_root(),
    }
}

/// Stops `listener` listening in every process that holds a copy of it, which closing ours
/// alone does not: a child forked a moment ago holds one until it has closed what it
/// inherited, and meanwhile the address could not be bound again (a reload's swap) and new
/// clients would queue where nobody accepts. Call after draining the queue: connections still
/// queued are reset. Not for a socket systemd passed: systemd keeps listening on its copy, to
/// start the service again on the next connection.
fn stop_accepting_everywhere(listener: &Listener) {
    if !listener.from_systemd {
        let _ = SockRef::from(&listener.socket).shutdown(std::net::Shutdown::Read);
    }
}

/// How long accepting pauses after the `run`-th fork failure in a row: `ACCEPT_BACKOFF`,
/// doubling up to 5 s, since each retry refuses the client it accepted. A reaped child ends
/// the pause at once.
fn fork_backoff(run: u64) -> Duration {
    let doublings = run.saturating_sub(1).min(6) as u32;
    (ACCEPT_BACKOFF * 2u32.pow(doublings)).min(Duration::from_secs(5))
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Longest value a reload line shows whole; a longer one is summarised, so that a 1 MiB
/// banner or a 200,000-entry deny list cannot make a multi-megabyte log line.
const MAX_SHOWN_VALUE: usize = 120;

/// A text value for the reload line: quoted and escaped, or, when long, its start and its
/// size.
fn summarise_text(bytes: &[u8]) -> String {
    let quoted = format!("{:?}", String::from_utf8_lossy(bytes));
    if quoted.len() <= MAX_SHOWN_VALUE {
        return quoted;
    }
    let head: String = String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
        .chars()
        .take(24)
        .collect();
    format!("{head:?}... ({} bytes)", bytes.len())
}

/// A list of prefixes for the reload line: whole when short, else its first entries and its
/// length.
fn summarise_list(list: &[ipnet::IpNet]) -> String {
    let whole = format!("{list:?}");
    if whole.len() <= MAX_SHOWN_VALUE {
        return whole;
    }
    let first: Vec<String> = list.iter().take(3).map(|p| p.to_string()).collect();
    format!("[{}, ... ({} prefixes)]", first.join(", "), list.len())
}

// HOT_PATH_NOTE: the rarely taken branches of the loop (refusing, reloading, status, shutdown)
// are kept out of line. Inlined, their locals (a 4 KiB drain buffer, a whole configuration)
// would enlarge the frames of the accept path, and every stack page that path writes costs the
// parent a copy-on-write fault after each fork.

/// Gives the heap pages that startup used and freed (argument and config parsing) back to the
/// kernel. Why: `fork` copies the page table entry of every resident private page, so each
/// page left over from startup would be copied again for every connection.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // Safe: malloc_trim only returns free memory to the kernel; no pointer is invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Accepts one connection from the non-blocking listener as a *blocking*, close-on-exec socket.
///
/// Why blocking: the child runs a blocking session, and a socket accepted non-blocking (as
/// mio's `accept` does) would cost every child two `fcntl` calls to undo it. On Linux an
/// accepted socket takes its O_NONBLOCK flag from `accept4`'s flags, not from the listener.
fn accept_blocking(listener: &mio::net::TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (socket, peer) = SockRef::from(listener).accept()?;
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, "accepted a non-IP connection"))?;
    Ok((socket.into(), peer))
}

/// Errors `accept` reports for one connection that went bad before it was taken (Linux passes
/// pending network errors through accept; see accept(2)), after which accepting may continue.
fn is_connection_error(e: &io::Error) -> bool {
    let Some(errno) = e.raw_os_error().map(Errno::from_raw) else {
        return false;
    };
    matches!(
        errno,
        Errno::ECONNABORTED
            | Errno::EPROTO
            | Errno::EPERM
            | Errno::ENETDOWN
            | Errno::ENOPROTOOPT
            | Errno::EHOSTDOWN
            | Errno::ENONET
            | Errno::EHOSTUNREACH
            | Errno::EOPNOTSUPP
            | Errno::ENETUNREACH
            | Errno::ETIMEDOUT
    )
}

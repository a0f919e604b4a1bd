//! The parent: one `mio::Poll` loop over the listeners and the signal pipe, and nothing else.
//!
//! Each turn of the loop: wait; handle signals first (reap, shutdown, status), because a SIGTERM
//! must close the listeners before more is accepted; then accept a bounded batch from each
//! listener that has connections queued, and for each connection either refuse it (see
//! `limits`: no fork, no blocking call), let it wait briefly in `pending` (its source is at
//! `max_per_source` but one of its sessions may be ending), or fork its child. At
//! `max_children` the listeners are taken out of the poll set, so clients wait in the kernel's
//! backlog until a child is reaped. The parent never reads or writes a client's bytes (but a
//! refusal message, and a program's banner: both small enough for an empty send buffer, written
//! with MSG_DONTWAIT) and waits nowhere but in `poll`: its log, its notifications to systemd and
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

use std::io::{self, ErrorKind};
use std::time::{Duration, Instant};

use log::{debug, info};
use mio::{Events, Interest, Poll};
use signal_hook_mio::v1_0::Signals;

use crate::children::{seconds, Children};
use crate::config::{Config, ConfigError};
use crate::handler::Handler;
use crate::limits::{Admission, Limits};
use crate::listen::Listener;
use crate::parent_memory;
use crate::pending::Pending;
use crate::signals;
use crate::spawn;

mod accept;
mod capacity;
mod control;
mod exchange;
mod headers;
mod listeners;
mod metrics;
mod reload;
mod shutdown;
mod status;
mod token;
mod upgrade;

pub use upgrade::Context as UpgradeContext;

use accept::FailureRun;
use capacity::CapacityReports;
use listeners::Listeners;
use shutdown::Phase;
use token::Source;

/// Produces the configuration anew (same file, same flags) for a SIGHUP reload, given the one
/// running. It must not wait for anything slow (it runs inside the loop): see
/// [`Config::reload`], which looks up no user or group.
pub type Reloader = Box<dyn Fn(&Config) -> Result<Config, ConfigError>>;

pub struct Server {
    /// Poll results: one event per registered source at most (listeners + the signal pipe).
    /// Allocated once, at startup, so that it never moves or grows: the kernel writes it
    /// between every two forks, and mio puts it on the ordinary heap, where each page written
    /// is a copy-on-write fault (see `parent_memory`).
    events: Events,
    poll: Poll,
    /// The configuration in force: what a reload compares against.
    config: Config,
    /// The config file it was read from, if any: for the `status` command.
    config_file: Option<std::path::PathBuf>,
    reload: Reloader,
    /// Read end of the self-pipe the signal handlers write to.
    signals: Signals,
    /// Listener `i` is registered as `Source::Listener(i)`; emptied on shutdown.
    listeners: Listeners,
    children: Children,
    /// What each new child does with its connection (as configured now).
    /// On the heap: a lean child reads its settings, and the parent's stack is not its own.
    handler: Box<Handler>,
    /// Connections admitted since start: the next one's `Conn::number` is this plus one.
    admitted: u64,
    /// The limits in force: one value, so a reload can replace it whole.
    limits: Limits,
    /// Token buckets and refusal counts.
    admission: Admission,
    /// True while `max_children` children run and the listeners are out of the poll set.
    at_capacity: bool,
    shutdown_timeout: Duration,
    /// Time between the SIGTERM and the SIGKILL sent to children on shutdown.
    kill_timeout: Duration,
    phase: Phase,
    /// Accepting is paused until then, after running out of descriptors or memory.
    paused_until: Option<Instant>,
    /// Accept failures since the last successful accept; a warning is logged only for the first.
    accept_failures: FailureRun,
    fork_failures: u64,
    /// Fork failures since the last successful fork; a warning is logged only for the first.
    fork_failure_run: FailureRun,
    /// Connections waiting for a session of their source to end (see `pending`).
    pending: Pending,
    /// Connections on PROXY listeners waiting for their header.
    headers: headers::Headers,
    /// Reused by `serve_headers`, so that the loop does not allocate.
    header_scratch: Vec<usize>,
    /// Which `max_children` state changes get a log line.
    capacity_reports: CapacityReports,
    /// The control socket and its connections, if there is one.
    control: Option<control::Control>,
    /// The metrics endpoint and its connections, if there is one.
    metrics: Option<metrics::Metrics>,
    /// Counts only the metrics show.
    counts: status::Counts,
    /// When the server started, as wall-clock time: for the metrics.
    started_at: std::time::SystemTime,
    /// How to start a successor (see `upgrade`); none: upgrades are refused.
    upgrade_context: Option<upgrade::Context>,
    /// An upgrade whose check is running.
    checking: Option<upgrade::Checking>,
    /// This image took over from a previous one (an upgrade).
    taken_over: bool,
    /// The last turn reaped its most (`REAP_BATCH`): more children may be waiting.
    reap_more: bool,
    started: Instant,
}

/// The most children one turn of the loop reaps (see `handle_signals`).
const REAP_BATCH: usize = 128;

impl Server {
    /// Sets up the loop: the poll instance, the signal handlers (from here on a signal is a
    /// request, never a default action), and the listeners. Nothing is accepted before
    /// [`Server::run`]. `reload` re-reads the configuration (file and command line) on SIGHUP.
    /// `control` is the control socket, bound (see [`crate::control`]).
    pub fn new(
        config: &Config,
        mut listeners: Vec<Listener>,
        control: Option<Listener>,
        metrics: Option<Listener>,
        reload: Reloader,
    ) -> io::Result<Server> {
        spawn::install_panic_hook();
        // Before the children table exists: its memory comes from here.
        if !parent_memory::reserve() {
            debug!("no MADV_WIPEONFORK: the children table is on the ordinary heap");
        }
        let limits = config.limits.clone();
        limits.index_rules();
        config.assign_proxy_policies(&mut listeners);
        let mut headers = headers::Headers::default();
        headers.fit_to_descriptors();
        let poll = Poll::new()?;
        if let Err(e) = Children::become_subreaper() {
            debug!("cannot become the subreaper of the sessions' orphans: {e}");
        }
        // Its handler writes to what it allocates at every signal: parent-only memory.
        let mut signals = parent_memory::with_allocations_parent_only(signals::hook)?;
        let events = Events::with_capacity(64);
        poll.registry()
            .register(&mut signals, Source::Signals.token(), Interest::READABLE)?;
        for (i, listener) in listeners.iter_mut().enumerate() {
            poll.registry().register(
                &mut listener.socket,
                Source::Listener(i).token(),
                Interest::READABLE,
            )?;
        }
        let control = control
            .map(|listener| control::Control::new(listener, poll.registry()))
            .transpose()?;
        let metrics = metrics
            .map(|listener| metrics::Metrics::new(listener, poll.registry()))
            .transpose()?;
        Ok(Server {
            config_file: config.file.clone(),
            control,
            metrics,
            counts: status::Counts::default(),
            started_at: std::time::SystemTime::now(),
            upgrade_context: None,
            checking: None,
            taken_over: false,
            reap_more: false,
            poll,
            signals,
            // Connections may already be queued before the first edge is seen.
            listeners: Listeners::new(listeners, true),
            children: Children::with_capacity(16),
            events,
            handler: Box::new(Handler::from_config(config)?),
            admitted: 0,
            config: config.clone(),
            reload,
            limits,
            admission: Admission::default(),
            at_capacity: false,
            shutdown_timeout: config.shutdown_timeout,
            kill_timeout: config.kill_timeout,
            phase: Phase::Serving,
            paused_until: None,
            accept_failures: FailureRun::default(),
            fork_failures: 0,
            fork_failure_run: FailureRun::default(),
            pending: Pending::default(),
            headers,
            header_scratch: Vec::new(),
            capacity_reports: CapacityReports::default(),
            started: Instant::now(),
        })
    }

    /// Makes upgrades in place possible (SIGUSR2, `forkecho upgrade`).
    pub fn prepare_upgrades(&mut self, context: UpgradeContext) {
        self.upgrade_context = Some(context);
    }

    /// Serves until a shutdown completes. `ready` runs once the daemon can be signalled and
    /// serves (the pid file is written by then; `--daemonize` reports back; sd_notify READY).
    pub fn run(self, ready: Box<dyn FnOnce()>) -> io::Result<()> {
        // The loop writes its state between every two forks: in memory children do not
        // inherit, not in the caller's frame, where it was passed (see `lean_fork`).
        let mut server = allocator_api2::boxed::Box::new_in(self, parent_memory::ParentOnly);
        server.announce_and_serve(ready)
    }

    fn announce_and_serve(&mut self, ready: Box<dyn FnOnce()>) -> io::Result<()> {
        // Announced only now that the signal handlers are installed: whoever waits for this
        // line (a test, a supervisor) may send SIGTERM at once and must not kill us.
        // After an upgrade the sockets are the previous image's, listening all along: said so,
        // for whoever counts these lines.
        let kept = match self.taken_over {
            true => " (taken over from the previous image)",
            false => "",
        };
        for slot in self.listeners.iter() {
            let address = &slot.listener.local;
            info!(event = "listening", address:% = address; "listening on {address}{kept}");
        }
        if let Handler::Exec { program, .. } = &*self.handler {
            info!("each connection runs {program}");
        }
        if let Some(control) = &self.control {
            info!("control commands on {}{kept}", control.address());
        }
        if let Some(metrics) = &self.metrics {
            info!("metrics on http://{}/metrics{kept}", metrics.address());
        }
        ready();
        release_startup_memory();
        // The loop's frames are all below this point (`serve` is never inlined here): the
        // stack from here down is not the children's (see `lean_fork`).
        crate::lean_fork::prepare(crate::lean_fork::stack_pointer());
        self.serve()
    }

    #[inline(never)] // its frames must be below `run`'s: see `lean_fork::prepare`
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
            let mut control_events = ServiceEvents::default();
            let mut metrics_events = ServiceEvents::default();
            for event in self.events.iter() {
                match Source::of(event.token()) {
                    Some(Source::Signals) => signalled = true,
                    Some(Source::ControlListener) => control_events.listener = true,
                    Some(Source::Control(i)) => control_events.add(i),
                    Some(Source::MetricsListener) => metrics_events.listener = true,
                    Some(Source::Metrics(i)) => metrics_events.add(i),
                    Some(Source::Listener(i)) => self.listeners.mark_ready(i),
                    Some(Source::Header(i)) => {
                        self.headers.mark_readable(i, event.is_read_closed())
                    }
                    None => debug!("event for an unknown token {:?}", event.token()),
                }
            }
            if signalled || self.reap_more {
                self.handle_signals();
            }
            self.handle_control(control_events);
            self.handle_metrics(metrics_events);
            self.handle_deadlines();
            // Headers first: a connection whose header has come has waited longer than the
            // backlog's next client, and must not be overtaken by it at max_children.
            self.serve_headers();
            self.accept_ready();
        }
        self.cancel_upgrade();
        info!(event = "stopped"; "shutdown complete");
        Ok(())
    }

    /// True once shutting down, every child has been reaped, and what programs left behind in
    /// their process groups has been killed.
    fn finished(&self) -> bool {
        self.phase != Phase::Serving
            && self.children.is_empty()
            && !self.children.has_lingering_groups()
            && self.headers.is_empty()
    }

    fn accepting(&self) -> bool {
        self.phase == Phase::Serving && self.paused_until.is_none() && !self.at_capacity
    }

    /// The poll timeout: the nearest deadline, zero if a listener still has work, else none.
    fn next_wakeup(&self) -> Option<Duration> {
        let headers_to_serve = self.headers.has_readable()
            || (self.headers.has_complete() && self.room_for_a_session_now());
        if self.acceptable_work() || headers_to_serve || self.reap_more {
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
        };
        let deadline = earliest(
            earliest(deadline, self.children.next_deadline()),
            earliest(
                self.headers.next_deadline(),
                earliest(
                    earliest(
                        self.control.as_ref().and_then(|c| c.next_deadline()),
                        self.metrics.as_ref().and_then(|m| m.next_deadline()),
                    ),
                    self.upgrade_check_deadline(),
                ),
            ),
        )?;
        Some(deadline.saturating_duration_since(Instant::now()))
    }

    fn handle_signals(&mut self) {
        let requests = signals::pending(&mut self.signals);
        let reap = requests.reap || self.reap_more;
        // Reap first, so status lines and shutdown decisions see the current table. At most
        // REAP_BATCH a turn: when ten thousand children end at once, accepting gets its turn
        // between batches, and the next turn goes on without waiting for a signal (rule 4
        // holds across turns).
        if reap {
            let before = self.children.len();
            self.reap_more = self.children.reap_some(REAP_BATCH);
            if self.fork_failure_run.len() > 0 && self.children.len() < before {
                // A child's exit is what frees a process slot: try forking again now.
                self.paused_until = None;
            }
            self.pause_or_resume_at_max_children();
            self.decide_pending();
        }
        // One shutdown step per batch: a SIGTERM and a SIGINT that arrive together are one
        // request (the harder: fast), not a request and its escalation.
        if let Some((mode, signal)) = requests.shutdown {
            self.shutdown(mode, signal.as_str());
        }
        if requests.reload {
            // First, and whether or not the configuration reloads: logrotate's SIGHUP must
            // not depend on the config file being valid.
            let reopened = self.reopen_log_file();
            // Logged by `reload`; a control command would also hear the outcome.
            let _ = self.reload(reopened);
        }
        if requests.status {
            self.log_status();
        }
        if requests.upgrade {
            self.start_upgrade(None);
        }
        // Last: an upgrade whose check has ended hands over by `execve`, and every request of
        // this batch (a SIGTERM that came with the check's SIGCHLD) must be acted on first.
        if reap {
            self.continue_upgrade();
        }
    }

    /// Serves the control connections that had events, then accepts new ones.
    fn handle_control(&mut self, events: ServiceEvents) {
        for i in events.connections() {
            self.serve_control(i);
        }
        if events.listener {
            self.accept_control();
        }
    }

    /// Serves the metrics connections that had events, then accepts new ones.
    fn handle_metrics(&mut self, events: ServiceEvents) {
        for i in events.connections() {
            self.serve_metrics(i);
        }
        if events.listener {
            self.accept_metrics();
        }
    }

    fn handle_deadlines(&mut self) {
        let now = Instant::now();
        if self.upgrade_check_deadline().is_some_and(|t| t <= now) {
            self.end_late_upgrade_check(now);
        }
        if self
            .control
            .as_ref()
            .and_then(|c| c.next_deadline())
            .is_some_and(|t| t <= now)
        {
            self.end_late_control_connections(now);
        }
        if self
            .metrics
            .as_ref()
            .and_then(|m| m.next_deadline())
            .is_some_and(|t| t <= now)
        {
            self.end_late_metrics_connections(now);
        }
        if self.children.next_deadline().is_some_and(|t| t <= now) {
            self.children
                .end_sessions_past_deadline(now, self.kill_timeout);
        }
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
            Phase::Draining { until }
                if until <= now && !(self.children.is_empty() && self.headers.is_empty()) =>
            {
                info!(
                    "shutdown timeout: {} sessions still running, {} connections awaiting a \
                     PROXY header; sending the sessions SIGTERM, closing the others",
                    self.children.len(),
                    self.headers.len()
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
}

/// Which sources of one of the loop's own services (control, metrics) had events in one turn:
/// its listener, and its connections (at most 64 each).
#[derive(Debug, Default, Clone, Copy)]
struct ServiceEvents {
    listener: bool,
    connections: u64,
}

impl ServiceEvents {
    fn add(&mut self, i: usize) {
        if i < 64 {
            self.connections |= 1 << i;
        }
    }

    fn connections(self) -> impl Iterator<Item = usize> {
        (0..64).filter(move |i| self.connections & (1 << i) != 0)
    }
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

// HOT_PATH_NOTE: the rarely taken branches of the loop (refusing, reloading, status, shutdown)
// are kept out of line. Inlined, their locals (a 4 KiB drain buffer, a whole configuration)
// would enlarge the frames of the accept path, and every stack page that path writes is a
// copy-on-write fault after each fork (see `parent_memory`).

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

//! The parent: one `mio::Poll` loop over the listeners and the signal pipe, and nothing else.
//!
//! Each turn of the loop: wait; handle signals first (reap, shutdown, status), because a SIGTERM
//! must close the listeners before more is accepted; then accept a bounded batch from each
//! listener that has connections queued, and for each connection either refuse it (see
//! `limits`: no fork, no blocking call) or fork its child. At `max_children` the listeners are
//! taken out of the poll set, so clients wait in the kernel's backlog until a child is reaped.
//! The parent never reads or writes a client's bytes (but a refusal message) and waits nowhere
//! but in `poll` (and in writing a log line to stderr, which a stalled reader can hold up).
//!
//! Shutdown is a small state machine driven by signals and the poll timeout, with PostgreSQL's
//! three modes as entry points: `Serving` → (SIGTERM, smart) `Draining` until
//! `shutdown_timeout` → (SIGINT, fast, enters here) SIGTERM to the children, `Terminating` for
//! `kill_timeout` → (SIGQUIT, immediate, enters here) SIGKILL, `Killing` until all are reaped.
//! A repeated SIGTERM/SIGINT moves one step on; signals that arrive together count as the
//! hardest of them, once. The loop ends when
//! it is no longer serving and no child is left, so no child outlives the parent's exit; if
//! `poll` itself fails, the children are killed and reaped before the error is returned.

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
use crate::session::Settings;
use crate::signals::{self, Mode};
use crate::spawn;

/// The signal pipe's token; listener `i` is `Token(i)`.
const SIGNALS: Token = Token(usize::MAX);
/// Connections taken from one listener per turn before signals are looked at again, so a flood
/// of clients cannot starve the reaper or delay a shutdown.
const ACCEPT_BATCH: usize = 64;
/// How long accepting pauses when the parent runs out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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

/// Produces the configuration anew (same file, same flags) for a SIGHUP reload.
pub type Reloader = Box<dyn Fn() -> Result<Config, ConfigError>>;

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
            limits: config.limits.clone(),
            admission: Admission::default(),
            at_capacity: false,
            shutdown_timeout: config.shutdown_timeout,
            kill_timeout: config.kill_timeout,
            phase: Phase::Serving,
            paused_until: None,
            accept_failures: 0,
            fork_failures: 0,
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
            Phase::Serving => self.paused_until,
            Phase::Killing => None,
        }?;
        Some(deadline.saturating_duration_since(Instant::now()))
    }

    fn handle_signals(&mut self) {
        let requests = signals::pending(&mut self.signals);
        // Reap first, so status lines and shutdown decisions see the current table.
        if requests.reap {
            self.children.reap();
            self.check_capacity();
        }
        // One shutdown step per batch: a SIGTERM and a SIGINT that arrive together are one
        // request (the harder: fast), not a request and its escalation.
        if let Some((mode, signal)) = requests.shutdown {
            self.shutdown(mode, signal);
        }
        if requests.reload {
            self.reload();
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
                self.stop_listening();
                info!("shutting down on {sig} (immediate): sending SIGKILL to {n} sessions");
                self.kill_children();
            }
            (Phase::Serving, Mode::Smart) => {
                self.stop_listening();
                info!(
                    "shutting down on {sig} (smart): stopped listening; waiting up to {} for \
                     {n} sessions (SIGTERM again or SIGINT: fast; SIGQUIT: immediate)",
                    seconds(self.shutdown_timeout)
                );
                self.phase = Phase::Draining {
                    until: Instant::now() + self.shutdown_timeout,
                };
            }
            (Phase::Serving, Mode::Fast) | (Phase::Draining { .. }, _) => {
                self.stop_listening();
                info!(
                    "shutting down on {sig} (fast): sending SIGTERM to {n} sessions, SIGKILL \
                     to those left after {}",
                    seconds(self.kill_timeout)
                );
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
            info!(
                "max_children reached ({} active): new clients wait in the backlog",
                self.children.len()
            );
            crate::systemd::status("at max_children: new clients wait in the backlog");
        } else {
            info!(
                "below max_children again ({} active): accepting",
                self.children.len()
            );
            crate::systemd::status("serving");
            // Edge-triggered: connections that queued meanwhile raise no new event.
            self.ready.iter_mut().for_each(|r| *r = true);
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

    /// Closes every listener: new clients are refused by the kernel from now on.
    fn stop_listening(&mut self) {
        self.set_polling(false);
        self.listeners.clear();
        self.ready.clear();
        self.registered.clear();
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
            if self.at_capacity {
                return;
            }
            match accept_blocking(&self.listeners[i].socket) {
                Ok((stream, peer)) => {
                    self.accept_recovered();
                    self.start_session(stream, peer);
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
    fn start_session(&mut self, stream: TcpStream, peer: SocketAddr) {
        let source = limits::source_of(peer.ip(), &self.limits);
        let mut live = self.children.from_source(&source);
        if self.limits.per_source_full(live) {
            self.reap_before_limiting();
            live = self.children.from_source(&source);
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
                self.check_capacity();
            }
            Err(e) => {
                self.fork_failures += 1;
                warn!(
                    "cannot fork for {peer}: {}; connection closed",
                    crate::os_error_text(&e)
                );
            }
        }
    }

    /// Closes a refused connection, after one non-blocking attempt at the refusal message: the
    /// socket's send buffer is empty, so a short message goes out whole or not at all, and the
    /// loop never waits for a client it is turning away.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn refuse(&self, stream: TcpStream, peer: SocketAddr, refusal: &Refusal) {
        info!("refused {peer}: {refusal}");
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
    fn reload(&mut self) {
        let new = match (self.reload)() {
            Ok(new) => new,
            Err(e) => {
                error!("reload refused: {e}; the running configuration stays");
                return;
            }
        };
        // Sockets passed by systemd belong to its .socket unit: `listen` does not apply.
        let serving =
            self.phase == Phase::Serving && !self.listeners.iter().any(|l| l.from_systemd);
        // Bind what is new before anything changes: a failure here leaves all as it was.
        let fresh = if serving {
            let added: Vec<SocketAddr> = new
                .listen
                .iter()
                .filter(|a| !self.listeners.iter().any(|l| l.configured == **a))
                .copied()
                .collect();
            match crate::listen::bind_all(&added, new.backlog, new.reuse_port) {
                Ok(fresh) => fresh,
                Err(e) => {
                    error!("reload refused: {e}; the running configuration stays");
                    return;
                }
            }
        } else {
            Vec::new()
        };
        let mut changes = describe_changes(&self.config, &new);
        if new.pid_file != self.config.pid_file {
            warn!("pid_file changes take effect at the next start");
        }
        if new.run_as != self.config.run_as {
            warn!("user and group changes take effect at the next start (root is gone)");
        }
        self.settings = Settings::from(&new);
        self.limits = new.limits.clone();
        self.shutdown_timeout = new.shutdown_timeout;
        self.kill_timeout = new.kill_timeout;
        crate::logging::set_level(new.log_level);
        if serving {
            changes.extend(self.install_listeners(&new.listen, fresh));
        }
        // The pid file in force is the one we hold; keep describing that one.
        let pid_file = self.config.pid_file.take();
        self.config = new;
        self.config.pid_file = pid_file;
        if changes.is_empty() {
            info!("reloaded configuration: nothing changed");
        } else {
            info!("reloaded configuration: {}", changes.join(", "));
        }
        crate::systemd::status("serving (configuration reloaded)");
        self.check_capacity();
    }

    /// Replaces the listeners by those configured in `listen`: keeps the ones still wanted,
    /// adds `fresh` (already bound), and closes the rest, after serving every connection
    /// already queued on them (those clients completed their handshake: closing the listener
    /// would reset them). Returns what changed, for the reload's log line.
    fn install_listeners(&mut self, listen: &[SocketAddr], fresh: Vec<Listener>) -> Vec<String> {
        // Tokens are indexes into `listeners`: take every listener out of the poll set and
        // put the survivors and the new ones back under their new tokens.
        self.set_polling(false);
        let (kept, dropped): (Vec<Listener>, Vec<Listener>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| listen.contains(&l.configured));
        let mut changes: Vec<String> = fresh
            .iter()
            .map(|l| format!("listen +{}", l.local))
            .collect();
        for listener in &fresh {
            info!("listening on {}", listener.local);
        }
        self.listeners = kept.into_iter().chain(fresh).collect();
        self.registered = vec![false; self.listeners.len()];
        // Queued connections raise no new edge: look at every listener on the next turn.
        self.ready = listener_flags(self.listeners.len(), true);
        for listener in dropped {
            self.serve_queue_of(&listener);
            info!("stopped listening on {}", listener.local);
            changes.push(format!("listen -{}", listener.local));
        }
        if !self.at_capacity {
            self.set_polling(true);
        }
        changes
    }

    /// Accepts (and admits or refuses, as always) the connections queued on a listener that
    /// is about to close. Bounded twice: by `max_children`, which stays a hard limit (clients
    /// still queued at the limit are reset when the listener closes), and by the backlog, so
    /// a flood on the old address cannot keep the loop from its signals.
    fn serve_queue_of(&mut self, listener: &Listener) {
        for _ in 0..self.config.backlog {
            if self.at_max_children() {
                warn!(
                    "closing {} at max_children: clients still queued there are reset",
                    listener.local
                );
                return;
            }
            match accept_blocking(&listener.socket) {
                Ok((stream, peer)) => self.start_session(stream, peer),
                Err(e) if e.kind() == ErrorKind::Interrupted || is_connection_error(&e) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("accept on {} while closing it: {e}", listener.local);
                    return;
                }
            }
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
             {} fork failures, busiest sources [{}], uptime {}",
            self.children.len(),
            self.limits.max_children,
            totals.forked + self.fork_failures,
            totals.ended(),
            endings.join(", "),
            refused.total(),
            refused,
            self.fork_failures,
            busiest.join(", "),
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
    let quoted = |bytes: &[u8]| format!("{:?}", String::from_utf8_lossy(bytes));
    let (o, n) = (&old.limits, &new.limits);
    compare("banner", &quoted(&old.banner), &quoted(&new.banner));
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
    compare(
        "allow",
        &format!("{:?}", o.allow),
        &format!("{:?}", n.allow),
    );
    compare("deny", &format!("{:?}", o.deny), &format!("{:?}", n.deny));
    compare("rate", &format!("{:?}", o.rate), &format!("{:?}", n.rate));
    compare(
        "refusal_message",
        &quoted(&o.refusal_message),
        &quoted(&n.refusal_message),
    );
    compare(
        "reuse_port (new addresses only)",
        &old.reuse_port,
        &new.reuse_port,
    );
    changes
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

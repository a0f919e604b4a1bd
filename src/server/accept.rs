//! Accepting: take a bounded batch from each listener with connections queued, and for each
//! connection decide: refuse it (see `limits`), let it wait in `pending` (its source is at
//! `max_per_source` while one of its sessions may be ending), or fork its child. A fork that
//! fails refuses the client it was for and pauses accepting, as running out of descriptors does.

use std::io::{self, ErrorKind};
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::errno::Errno;
use socket2::Socket;

use super::{Phase, Server};
use crate::children::seconds;
use crate::conn::{Accepted, Conn, Local, Peer, Via};
use crate::handler::Kind;
use crate::limits::{self, Refusal};
use crate::pending;
use crate::spawn;

/// Connections taken from one listener per turn before signals are looked at again, so a flood
/// of clients cannot starve the reaper or delay a shutdown.
const ACCEPT_BATCH: usize = 64;
/// How long accepting pauses when the parent runs out of descriptors, memory or processes.
pub(super) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
impl Server {
    /// Accepts a batch from every listener that may have connections queued.
    pub(super) fn accept_ready(&mut self) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].ready && self.accepting() && self.may_accept_from(i) {
                self.accept_batch(i);
            }
        }
    }

    /// Whether listener `i` may be accepted from: a PROXY listener only while connections can
    /// wait for their header.
    pub(super) fn may_accept_from(&self, i: usize) -> bool {
        !self.headers.is_full() || self.listeners[i].listener.proxy.is_none()
    }

    /// Whether a listener has connections queued that may be accepted now.
    pub(super) fn acceptable_work(&self) -> bool {
        self.accepting()
            && (0..self.listeners.len()).any(|i| self.listeners[i].ready && self.may_accept_from(i))
    }

    /// Where a connection from `peer` accepted on `listener` goes: straight to admission, or
    /// on a PROXY listener to wait for its header, if its peer is a trusted proxy. (A PROXY
    /// listener is always a TCP one: see `Config::assign_proxy_policies`.)
    pub(super) fn route_of(&self, listener: &crate::listen::Listener, peer: &Peer) -> Route {
        match (&listener.proxy, peer) {
            (None, _) | (_, Peer::Local(_)) => Route::Direct,
            (Some(policy), Peer::Ip(addr)) if !policy.trusts(addr.ip()) => Route::Untrusted,
            (Some(policy), Peer::Ip(_)) => Route::AwaitHeader(policy.mode),
        }
    }

    /// Sends a connection just accepted from the listener `local` where `route` says.
    pub(super) fn take_connection(
        &mut self,
        route: Route,
        stream: Socket,
        peer: Peer,
        local: Local,
        may_wait: MayWait,
    ) {
        let (Peer::Ip(proxy), Local::Ip(listener)) = (peer, local) else {
            return self.start_session(Accepted::direct(stream, peer, local), may_wait);
        };
        match route {
            Route::Direct => self.start_session(Accepted::direct(stream, peer, local), may_wait),
            Route::AwaitHeader(mode) if !self.headers.is_full() => {
                self.await_header(stream, proxy, listener, mode)
            }
            Route::AwaitHeader(_) => self.refuse_quietly(peer, &Refusal::Closing),
            Route::Untrusted => self.refuse_quietly(peer, &Refusal::UntrustedProxy { listener }),
        }
    }

    /// Counts and logs a refusal of a connection that gets no message (its peer is a
    /// balancer); dropping the stream closed it.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn refuse_quietly(&mut self, peer: Peer, refusal: &Refusal) {
        info!(event = "refused", peer:% = peer, reason = refusal.name(); "refused {peer}: {refusal}");
        self.admission.refused.count(refusal);
    }

    /// Accepts up to `ACCEPT_BATCH` connections from listener `i`, forking a child for each.
    /// Leaves `ready[i]` set if the queue may not be empty yet.
    fn accept_batch(&mut self, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            // At `max_children`, or paused after a fork failure, or (a PROXY listener) with no
            // room left to wait for headers: the rest wait in the backlog.
            if !self.accepting() || !self.may_accept_from(i) {
                return;
            }
            match self.listeners[i].listener.accept_blocking() {
                Ok((stream, peer)) => {
                    self.counts.accepted += 1;
                    self.accept_recovered();
                    let route = self.route_of(&self.listeners[i].listener, &peer);
                    let local = self.listeners[i].listener.as_local();
                    self.take_connection(route, stream, peer, local, MayWait::Grace);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // The queue is empty, so accept works again: the next failure is a new run.
                    self.accept_recovered();
                    self.listeners[i].ready = false;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_connection_error(&e) => {
                    // The client is gone or was refused before we got to it; the next may be fine.
                    debug!(
                        "accept on {}: {e} (skipped)",
                        self.listeners[i].listener.local
                    );
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
        self.counts.accept_failures += 1;
        if self.accept_failures.record() {
            warn!(
                "accept on {} failed: {}; retrying every {} until it succeeds",
                self.listeners[i].listener.local,
                crate::os_error_text(e),
                seconds(ACCEPT_BACKOFF)
            );
        }
        self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
            // The descriptor limit may have been lowered on the running parent: connections
            // waiting for a PROXY header must not keep every other listener out.
            self.headers.fit_to_descriptors();
            self.shed_headers_over_capacity();
        }
    }

    fn accept_recovered(&mut self) {
        if let Some(failed) = self.accept_failures.end() {
            info!("accepting again after {failed} failed attempts");
        }
    }

    /// Admits or refuses one accepted connection, and forks its child if admitted. Kept short on
    /// purpose: all per-session setup (socket options, banner) happens in the child.
    ///
    /// A connection whose source is at `max_per_source` may wait in `pending`, as `may_wait`
    /// says, for one of that source's sessions to be reaped, instead of being refused at once
    /// (see `pending` for why).
    pub(super) fn start_session(&mut self, accepted: Accepted, may_wait: MayWait) {
        let peer = accepted.peer;
        let source = limits::source_of(&peer, &self.limits);
        let mut live = self.children.live_from(&source);
        if self.limits.per_source_full(live) {
            self.reap_before_limiting();
            live = self.children.live_from(&source);
            if let Some(until) = may_wait
                .until()
                .filter(|_| self.limits.per_source_full(live))
            {
                if self.may_wait(&source) {
                    self.wait_for_source(accepted, until);
                    return;
                }
            }
        }
        let admitted = self
            .admission
            .admit(&peer, source, live, &self.limits, Instant::now());
        if let Err(refusal) = admitted {
            self.refuse(accepted.stream, peer, &refusal);
            return;
        }
        self.admitted += 1;
        let conn = Conn::admitted(accepted, source, live + 1, self.admitted);
        let via = Via(conn.via);
        match spawn::spawn_session(conn, &self.handler) {
            Ok(pid) => {
                let kind = self.handler.kind();
                // The echo ends its own session on time; a program is ended by the parent.
                let end_by = match kind {
                    Kind::Program => self.config.max_session_time,
                    Kind::Echo => None,
                };
                self.children.add(pid, peer, source, kind, end_by);
                log_accepted(peer, via, &source, pid, self.children.len());
                self.fork_recovered();
                self.pause_or_resume_at_max_children();
            }
            Err(failed) => {
                let (conn, e) = *failed;
                self.fork_failed(conn.stream, peer, &e)
            }
        }
    }

    /// True if one more connection from `source` may wait in `pending`: the table has room,
    /// and fewer of the source's connections wait than it has sessions that could be ending
    /// (`max_per_source`), so that one source cannot take every place.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn may_wait(&self, source: &limits::Source) -> bool {
        let limits = &self.limits;
        // `pending` is decided only while serving (`decide_pending`): in a shutdown the
        // connection is answered at once instead.
        self.phase == Phase::Serving
            && !self.pending.is_full()
            && self
                .pending
                .count(|peer| limits::source_of(peer, limits) == *source)
                < limits.max_per_source
    }

    /// Parks a connection whose source is at `max_per_source` until `until` (see `pending`).
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn wait_for_source(&mut self, accepted: Accepted, until: Instant) {
        debug!(
            "{}: its source is at max_per_source; waiting up to {} for one of its \
             sessions to end",
            accepted.peer,
            seconds(until.saturating_duration_since(Instant::now()))
        );
        self.pending.add(accepted, until);
    }

    /// Decides the waiting connections whose source has room again or whose time is up,
    /// as long as there is room for children.
    pub(super) fn decide_pending(&mut self) {
        if self.pending.is_empty() || self.phase != Phase::Serving || self.at_capacity {
            return;
        }
        let (limits, children) = (&self.limits, &self.children);
        let decidable = self.pending.take_decidable(Instant::now(), |peer| {
            let source = limits::source_of(peer, limits);
            !limits.per_source_full(children.live_from(&source))
        });
        let now = Instant::now();
        for waiting in decidable {
            if self.at_capacity {
                // Out of room for children: it waits again, as clients do in the backlog.
                let until = waiting.until.max(now + pending::PER_SOURCE_GRACE);
                self.pending.add(waiting.accepted, until);
                continue;
            }
            // One that is not late yet may wait again if its source filled up meanwhile
            // (two connections waiting for one session to end).
            let may_wait = if waiting.until > now {
                MayWait::Until(waiting.until)
            } else {
                MayWait::No
            };
            self.start_session(waiting.accepted, may_wait);
        }
    }

    /// A fork that failed (out of processes or memory, usually for a while): the client
    /// already accepted gets `refusal_message`, and accepting pauses as it does when accept
    /// fails, so that the clients still queued wait in the backlog instead of each being
    /// accepted and closed. One warning per run of failures.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn fork_failed(&mut self, stream: Socket, peer: Peer, e: &io::Error) {
        self.fork_failures += 1;
        if self.fork_failure_run.record() {
            let reason = crate::os_error_text(e);
            warn!(
                event = "fork_failed", peer:% = peer, reason:% = reason;
                "cannot fork for {peer}: {reason}; refused it; accepting pauses until a \
                 session ends, or for {} growing to 5s, until a fork succeeds",
                seconds(ACCEPT_BACKOFF)
            );
        } else {
            let reason = crate::os_error_text(e);
            debug!(
                event = "fork_failed", peer:% = peer, reason:% = reason;
                "cannot fork for {peer}: {reason}; refused"
            );
        }
        self.send_refusal(stream);
        if self.phase == Phase::Serving {
            let pause = fork_backoff(self.fork_failure_run.len());
            self.paused_until = Some(Instant::now() + pause);
        }
    }

    fn fork_recovered(&mut self) {
        if let Some(failed) = self.fork_failure_run.end() {
            info!("forking again after {failed} failed attempts");
        }
    }

    /// Closes a refused connection, after one non-blocking attempt at the refusal message: the
    /// socket's send buffer is empty, so a short message goes out whole or not at all, and the
    /// loop never waits for a client it is turning away.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn refuse(&mut self, stream: Socket, peer: Peer, refusal: &Refusal) {
        info!(event = "refused", peer:% = peer, reason = refusal.name(); "refused {peer}: {refusal}");
        if *refusal == Refusal::Closing {
            // Admission counts its own refusals; this one is the loop's.
            self.admission.refused.count(refusal);
        }
        self.send_refusal(stream);
    }

    /// Writes `refusal_message` without waiting and closes the connection.
    fn send_refusal(&self, stream: Socket) {
        // The socket is blocking (see `accept_blocking`): each call here says MSG_DONTWAIT.
        // MSG_NOSIGNAL: a client already gone is EPIPE here, never a SIGPIPE.
        if !self.limits.refusal_message.is_empty() {
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            let _ = stream.send_with_flags(&self.limits.refusal_message, flags);
        }
        close_after_taking_what_arrived(stream);
    }
}

/// The line of an admitted connection: `accepted CLIENT [via BALANCER] -> child PID (N
/// active)`, with its fields.
fn log_accepted(
    peer: Peer,
    via: Via,
    source: &limits::Source,
    pid: nix::unistd::Pid,
    active: usize,
) {
    let child = pid.as_raw();
    match via.0 {
        None => info!(
            event = "accepted", peer:% = peer, source:% = source, child = child, active = active;
            "accepted {peer} -> child {pid} ({active} active)"
        ),
        Some(proxy) => info!(
            event = "accepted", peer:% = peer, via:% = proxy, source:% = source, child = child,
            active = active;
            "accepted {peer}{via} -> child {pid} ({active} active)"
        ),
    }
}

/// Closes a connection with a FIN rather than a reset. Why: closing a socket with unread
/// input sends RST, which would also destroy what was just written to it (a refusal message);
/// peers usually send at once. What has arrived is taken first (one non-blocking read); a peer
/// that sent more still gets a reset.
pub(super) fn close_after_taking_what_arrived(stream: Socket) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut unread = [MaybeUninit::uninit(); 4096];
    let _ = stream.recv_with_flags(&mut unread, libc::MSG_DONTWAIT);
}

/// Where a connection just accepted goes (see `Server::route_of`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Route {
    Direct,
    AwaitHeader(crate::proxy::Mode),
    Untrusted,
}

/// Whether a connection whose source is at `max_per_source` may wait in `pending`.
#[derive(Debug, Clone, Copy)]
pub(super) enum MayWait {
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

/// Failures of one kind in a row (accept, fork): the first of a run gets the warning, the
/// end of a run one line saying how long it was.
#[derive(Debug, Default)]
pub(super) struct FailureRun(u64);

impl FailureRun {
    /// Counts a failure; true if it starts a run (the one to warn about).
    fn record(&mut self) -> bool {
        self.0 += 1;
        self.0 == 1
    }

    /// Failures in the current run; 0 when there is none.
    pub(super) fn len(&self) -> u64 {
        self.0
    }

    /// Ends the run: how many failed, if any did.
    fn end(&mut self) -> Option<u64> {
        (self.0 > 0).then(|| std::mem::take(&mut self.0))
    }
}

/// How long accepting pauses after the `run`-th fork failure in a row: `ACCEPT_BACKOFF`,
/// doubling up to 5 s, since each retry refuses the client it accepted. A reaped child ends
/// the pause at once.
fn fork_backoff(run: u64) -> Duration {
    let doublings = run.saturating_sub(1).min(6) as u32;
    (ACCEPT_BACKOFF * 2u32.pow(doublings)).min(Duration::from_secs(5))
}

/// Errors `accept` reports for one connection that went bad before it was taken (Linux passes
/// pending network errors through accept; see accept(2)), after which accepting may continue.
pub(super) fn is_connection_error(e: &io::Error) -> bool {
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

//! Connections on PROXY listeners, waiting for their header: a bounded table in parent-only
//! memory, each connection in the poll set under `Source::Header(i)`, with a deadline.
//!
//! The loop never blocks on a balancer: on each readiness edge it peeks at what has arrived
//! (MSG_PEEK | MSG_DONTWAIT, at most `proxy::MAX_HEADER` bytes) and decides with
//! `proxy::examine`. A whole header is consumed, exactly its length and never a byte of the
//! client's own data; the connection then leaves the poll set and goes to admission under its
//! real client's address. A header that is malformed, too long, cut short or late refuses the
//! connection (nothing is written: the peer is the balancer). With no room for a session (at
//! `max_children`), a connection whose header has arrived waits here, as a client waits in the
//! backlog; and while the table is full, PROXY listeners are not accepted from.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

use allocator_api2::vec::Vec as ParentVec;
use log::{debug, warn};
use mio::unix::SourceFd;
use mio::Interest;
use socket2::Socket;

use super::accept::{close_after_taking_what_arrived, MayWait};
use super::token::Source;
use super::{Phase, Server};
use crate::conn::{Accepted, Local, Peer};
use crate::limits::Refusal;
use crate::parent_memory::ParentOnly;
use crate::proxy::{self, Examined, Mode};

/// Most connections waiting for a header at once, when descriptors allow (see
/// [`Headers::fit_to_descriptors`]).
pub(super) const MAX_AWAITING: usize = 1024;

/// One connection waiting for its header.
#[derive(Debug)]
pub(super) struct Awaiting {
    stream: Socket,
    /// The connection's peer: the balancer.
    proxy: SocketAddr,
    listener: SocketAddr,
    mode: Mode,
    /// Refused at this time if the header is not whole by then.
    until: Instant,
    /// Order of arrival: a whole header waiting for room is served first come, first served.
    arrival: u64,
    /// In the poll set: until its header is taken (then nothing it sends may wake the loop).
    registered: bool,
    /// Data arrived since it was last looked at (edge-triggered, like the listeners).
    readable: bool,
    /// The balancer closed its side: no more bytes will come.
    closed: bool,
    /// The client and the address it reached, once the header has been consumed (`None`
    /// inside: the header said to use the connection's own addresses). Waits for room.
    header: Option<Option<(SocketAddr, SocketAddr)>>,
}

/// The waiting connections; an entry's index is its poll token's.
pub(super) struct Headers {
    slots: ParentVec<Option<Awaiting>, ParentOnly>,
    free: ParentVec<usize, ParentOnly>,
    len: usize,
    /// How many may wait at once: [`MAX_AWAITING`], or less when descriptors are scarce.
    capacity: usize,
    arrivals: u64,
}

impl Default for Headers {
    fn default() -> Self {
        Headers {
            slots: ParentVec::new_in(ParentOnly),
            free: ParentVec::new_in(ParentOnly),
            len: 0,
            capacity: MAX_AWAITING,
            arrivals: 0,
        }
    }
}

impl Headers {
    pub(super) fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Lets at most half the descriptors the parent may open wait for headers: slow headers
    /// from a balancer must not use up what plain listeners and sessions need (a running out
    /// of descriptors pauses every listener). Read at start and on every reload.
    pub(super) fn fit_to_descriptors(&mut self) {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(MAX_AWAITING as u64 * 2);
        self.capacity = MAX_AWAITING.min((soft / 2) as usize).max(1);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn insert(&mut self, mut entry: Awaiting) -> usize {
        self.len += 1;
        self.arrivals += 1;
        entry.arrival = self.arrivals;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<Awaiting> {
        let entry = self.slots.get_mut(i)?.take()?;
        self.len -= 1;
        self.free.push(i);
        Some(entry)
    }

    /// Connection `i` had an event (`closed`: its peer shut down its side); an index no entry
    /// has (decided in this turn) is ignored.
    pub(super) fn mark_readable(&mut self, i: usize, closed: bool) {
        if let Some(Some(entry)) = self.slots.get_mut(i) {
            // Once its header is taken, its bytes are the session's (and it has left the poll
            // set; an event queued before that is ignored).
            if entry.header.is_none() {
                entry.readable = true;
                entry.closed |= closed;
            }
        }
    }

    /// The earliest deadline of a connection still waiting for bytes.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        self.entries()
            .filter(|(_, e)| e.header.is_none())
            .map(|(_, e)| e.until)
            .min()
    }

    /// Whether data arrived on an entry not looked at since.
    pub(super) fn has_readable(&self) -> bool {
        self.len > 0 && self.entries().any(|(_, e)| e.readable)
    }

    /// Whether a whole header waits for room for its session.
    pub(super) fn has_complete(&self) -> bool {
        self.len > 0 && self.entries().any(|(_, e)| e.header.is_some())
    }

    fn entries(&self) -> impl Iterator<Item = (usize, &Awaiting)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| Some((i, slot.as_ref()?)))
    }

    /// Indexes of the entries for which `pick` holds, into `out` (reused, so the loop does not
    /// allocate).
    fn select(&self, out: &mut Vec<usize>, mut pick: impl FnMut(&Awaiting) -> bool) {
        out.clear();
        out.extend(self.entries().filter(|(_, e)| pick(e)).map(|(i, _)| i));
    }
}

/// What `peek_header` found.
enum Peeked {
    Wait,
    Header {
        len: usize,
        addresses: Option<(SocketAddr, SocketAddr)>,
    },
    Refused(&'static str),
}

impl Server {
    /// The waiting connections as an upgrade passes them on (their descriptors are kept
    /// across `execve` by the caller).
    pub(super) fn export_headers(&self, now: Instant) -> Vec<crate::upgrade::HeaderState> {
        self.headers
            .entries()
            .map(|(_, e)| {
                let taken = e.header.flatten();
                crate::upgrade::HeaderState {
                    fd: e.stream.as_raw_fd(),
                    proxy: e.proxy.to_string(),
                    listener: e.listener.to_string(),
                    mode: e.mode.to_string(),
                    until_in_ns: e.until.saturating_duration_since(now).as_nanos() as u64,
                    header_taken: e.header.is_some(),
                    client: taken.map(|(client, _)| client.to_string()),
                    destination: taken.map(|(_, destination)| destination.to_string()),
                }
            })
            .collect()
    }

    /// Takes over what [`Server::export_headers`] gave: a connection whose header is still
    /// to come is looked at again at once.
    pub(super) fn import_headers(
        &mut self,
        states: &[crate::upgrade::HeaderState],
        now: Instant,
    ) -> Result<(), String> {
        let addr = |s: &str| -> Result<SocketAddr, String> {
            s.parse().map_err(|_| format!("`{s}`: not an address"))
        };
        for state in states {
            let stream = Socket::from(crate::upgrade::adopt(state.fd).map_err(|e| format!("{e}"))?);
            let header = match (state.header_taken, &state.client, &state.destination) {
                (false, _, _) => None,
                (true, Some(client), Some(destination)) => {
                    Some(Some((addr(client)?, addr(destination)?)))
                }
                (true, _, _) => Some(None),
            };
            let waiting_for_header = header.is_none();
            let fd = stream.as_raw_fd();
            let i = self.headers.insert(Awaiting {
                stream,
                proxy: addr(&state.proxy)?,
                listener: addr(&state.listener)?,
                mode: Mode::parse(&state.mode)?,
                until: now + std::time::Duration::from_nanos(state.until_in_ns),
                arrival: 0,
                registered: waiting_for_header,
                readable: waiting_for_header,
                closed: false,
                header,
            });
            if waiting_for_header {
                self.poll
                    .registry()
                    .register(
                        &mut SourceFd(&fd),
                        Source::Header(i).token(),
                        Interest::READABLE,
                    )
                    .map_err(|e| format!("polling a PROXY connection: {e}"))?;
            }
        }
        Ok(())
    }

    /// Puts a connection from a trusted balancer in the table, to wait for its header. The
    /// caller has checked that the table has room.
    pub(super) fn await_header(
        &mut self,
        stream: Socket,
        proxy: SocketAddr,
        listener: SocketAddr,
        mode: Mode,
    ) {
        let fd = stream.as_raw_fd();
        let i = self.headers.insert(Awaiting {
            stream,
            proxy,
            listener,
            mode,
            until: Instant::now() + self.config.proxy_header_timeout,
            arrival: 0,
            registered: true,
            // The header may have come with the handshake: look at once.
            readable: true,
            closed: false,
            header: None,
        });
        let registered = self.poll.registry().register(
            &mut SourceFd(&fd),
            Source::Header(i).token(),
            Interest::READABLE,
        );
        if let Err(e) = registered {
            warn!("cannot wait for the PROXY header of {proxy}: {e}; closing it");
            self.headers.remove(i);
        }
    }

    /// Reads the headers that have arrived and starts the sessions of the connections whose
    /// header is whole, as long as there is room for them; refuses those whose time is up.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn serve_headers(&mut self) {
        if self.headers.is_empty() {
            return;
        }
        let mut due = std::mem::take(&mut self.header_scratch);
        self.headers
            .select(&mut due, |e| e.readable && e.header.is_none());
        for &i in &due {
            self.read_header(i);
        }
        let now = Instant::now();
        self.headers
            .select(&mut due, |e| e.header.is_none() && e.until <= now);
        for &i in &due {
            self.refuse_header(i, "not received in time (proxy_header_timeout)");
        }
        self.headers.select(&mut due, |e| e.header.is_some());
        // First come, first served (slots are reused in any order).
        let headers = &self.headers;
        due.sort_unstable_by_key(|&i| headers.slots[i].as_ref().map_or(0, |e| e.arrival));
        for &i in &due {
            if !self.room_for_a_session() {
                break;
            }
            self.start_proxied_session(i);
        }
        self.header_scratch = due;
    }

    /// Whether there is room for a session as far as is known without reaping: what the poll
    /// timeout asks, so that a header waiting for room never spins the loop.
    pub(super) fn room_for_a_session_now(&self) -> bool {
        match self.phase {
            Phase::Serving => !self.at_capacity && self.paused_until.is_none(),
            Phase::Draining { .. } => !self.limits.children_full(self.children.len()),
            _ => false,
        }
    }

    /// Whether a session may start now: serving and under `max_children`, or smart shutdown
    /// with room (as for the connections a closing listener still had queued).
    fn room_for_a_session(&mut self) -> bool {
        match self.phase {
            // Not while paused after a fork failure: that would only refuse them.
            Phase::Serving => {
                !self.at_capacity && self.paused_until.is_none() && !self.full_after_reaping()
            }
            Phase::Draining { .. } => !self.full_after_reaping(),
            _ => false,
        }
    }

    /// Looks at what connection `i` has sent and acts on it: waits, takes the header, or
    /// refuses the connection.
    fn read_header(&mut self, i: usize) {
        let Some(Some(entry)) = self.headers.slots.get_mut(i) else {
            return;
        };
        entry.readable = false;
        let problem = match peek_header(&entry.stream, entry.mode) {
            // What arrived is all there will be.
            Peeked::Wait if entry.closed => "cut short",
            Peeked::Wait => return,
            Peeked::Refused(problem) => problem,
            Peeked::Header { len, addresses } => {
                if consume(&entry.stream, len) {
                    entry.header = Some(addresses);
                    // What the client sends while its session waits for room is the
                    // session's: it must not wake the loop.
                    entry.registered = false;
                    let fd = entry.stream.as_raw_fd();
                    if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&fd)) {
                        debug!("deregistering a PROXY connection: {e}");
                    }
                    return;
                }
                "cut short"
            }
        };
        self.refuse_header(i, problem);
    }

    /// Starts the session of connection `i`, whose header has been taken: admission sees the
    /// client the header named.
    fn start_proxied_session(&mut self, i: usize) {
        let Some(entry) = self.take_header_entry(i) else {
            return;
        };
        let Some(header) = entry.header else {
            return;
        };
        let accepted = match header {
            Some((client, destination)) => Accepted {
                stream: entry.stream,
                peer: Peer::Ip(client),
                listener: Local::Ip(entry.listener),
                via: Some(entry.proxy),
                destination: Some(destination),
            },
            // LOCAL / UNKNOWN: the balancer speaks for itself (a health check), as a direct
            // client would.
            None => Accepted::direct(
                entry.stream,
                Peer::Ip(entry.proxy),
                Local::Ip(entry.listener),
            ),
        };
        self.start_session(accepted, MayWait::Grace);
    }

    /// Removes entry `i` and takes it out of the poll set: before its descriptor is handed to
    /// a child, which would keep the registration alive under this token.
    fn take_header_entry(&mut self, i: usize) -> Option<Awaiting> {
        let entry = self.headers.remove(i)?;
        let fd = entry.stream.as_raw_fd();
        if entry.registered {
            if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&fd)) {
                debug!("deregistering a PROXY connection: {e}");
            }
        }
        Some(entry)
    }

    /// Refuses connection `i` for its header: counted, logged, closed without a word (its
    /// peer is the balancer, not a client).
    fn refuse_header(&mut self, i: usize, problem: &'static str) {
        if let Some(entry) = self.take_header_entry(i) {
            let refusal = Refusal::ProxyHeader(problem);
            let peer = entry.proxy;
            log::info!(
                event = "refused", peer:% = peer, reason = refusal.name();
                "refused {peer}: {refusal}"
            );
            self.admission.refused.count(&refusal);
            close_after_taking_what_arrived(entry.stream);
        }
    }

    /// Refuses the oldest connections still waiting for their header until the table is within
    /// its capacity again (after `Headers::fit_to_descriptors` lowered it).
    pub(super) fn shed_headers_over_capacity(&mut self) {
        let mut waiting = std::mem::take(&mut self.header_scratch);
        self.headers.select(&mut waiting, |e| e.header.is_none());
        let headers = &self.headers;
        waiting.sort_unstable_by_key(|&i| headers.slots[i].as_ref().map_or(0, |e| e.arrival));
        let excess = self.headers.len.saturating_sub(self.headers.capacity);
        for &i in waiting.iter().take(excess) {
            self.refuse_header(i, "dropped: the parent is short of descriptors");
        }
        self.header_scratch = waiting;
    }

    /// Shutdown without sessions for them (fast, immediate): every waiting connection is
    /// closed. One whose header was taken is a client's: it gets `refusal_message`.
    pub(super) fn close_all_headers(&mut self) {
        let mut all = std::mem::take(&mut self.header_scratch);
        self.headers.select(&mut all, |_| true);
        for &i in &all {
            let Some(entry) = self.take_header_entry(i) else {
                continue;
            };
            match entry.header {
                Some(Some((client, _))) => {
                    self.refuse(entry.stream, Peer::Ip(client), &Refusal::Closing)
                }
                _ => close_after_taking_what_arrived(entry.stream),
            }
        }
        self.header_scratch = all;
    }
}

/// Peeks at the connection's first bytes and examines them.
fn peek_header(stream: &Socket, mode: Mode) -> Peeked {
    let mut buffer = [0u8; proxy::MAX_HEADER];
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // Safe: receives into a live buffer of the given length, on a socket we own.
    let got = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            flags,
        )
    };
    if got < 0 {
        let error = std::io::Error::last_os_error();
        return match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Peeked::Wait,
            _ => Peeked::Refused("not received: the connection failed"),
        };
    }
    let received = &buffer[..got as usize];
    match proxy::examine(received, mode) {
        // The balancer closed its side before the header ended: no more will come.
        Examined::Incomplete if got == 0 => Peeked::Refused("cut short"),
        Examined::Incomplete => Peeked::Wait,
        Examined::Header { len, addresses } => Peeked::Header { len, addresses },
        Examined::Refused(proxy::Problem::Malformed) => Peeked::Refused("malformed"),
        Examined::Refused(proxy::Problem::TooLong) => Peeked::Refused("too long"),
    }
}

/// Reads exactly the header's `len` bytes, which have arrived (they were just peeked at).
fn consume(stream: &Socket, len: usize) -> bool {
    let mut header = [0u8; proxy::MAX_HEADER];
    // Safe: receives at most `len` (≤ the buffer's size) bytes into a live buffer.
    let got = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            header.as_mut_ptr().cast(),
            len,
            libc::MSG_DONTWAIT,
        )
    };
    got == len as isize
}

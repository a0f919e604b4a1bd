//! Short exchanges with the clients of the loop's own services (the control socket, the
//! metrics endpoint): read one bounded request, answer it, close. The loop never waits on such
//! a client: each connection is in the poll set, is read without blocking until its request
//! is whole, and is answered without blocking; an answer the socket does not take at once is
//! sent as the socket drains. Once it is all sent, the connection is shut down for writing
//! and what the client still sends is read and dropped until it closes (a lingering close, as
//! web servers do): closing with unread input would send a reset, which can destroy the answer
//! before the client reads it. A bounded table and a deadline per connection (request, answer
//! and lingering included) keep a slow or silent client from costing more than a slot for a
//! while.

use std::io::{self, ErrorKind};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use socket2::Socket;

use crate::conn::Peer;
use crate::upgrade::ExchangeState;

/// One client of a service.
pub(super) struct Exchange {
    pub(super) stream: Socket,
    pub(super) peer: Peer,
    request: Vec<u8>,
    /// The answer, once there is one, and how much of it has been sent.
    answer: Option<(Vec<u8>, usize)>,
    /// All of the answer is sent and the connection shut down for writing: what comes now is
    /// read and dropped until the client closes.
    lingering: bool,
    until: Instant,
}

/// What reading a connection's request came to.
pub(super) enum Read {
    /// Not whole yet: wait for more.
    Waiting,
    /// The request, whole.
    Whole(Vec<u8>),
    /// Longer than allowed.
    TooLong,
    /// The client closed or failed before its request was whole.
    Gone,
}

/// The connections of one service; slot `i` is polled under the token `token_of(i)`.
pub(super) struct Exchanges {
    slots: Vec<Option<Exchange>>,
    token_of: fn(usize) -> Token,
    /// The most a request may hold.
    max_request: usize,
    /// From accept to the last byte of the answer.
    time: Duration,
}

impl Exchanges {
    pub(super) fn new(
        slots: usize,
        token_of: fn(usize) -> Token,
        max_request: usize,
        time: Duration,
    ) -> Exchanges {
        Exchanges {
            slots: (0..slots).map(|_| None).collect(),
            token_of,
            max_request,
            time,
        }
    }

    /// Takes a new connection (made non-blocking here) into a free slot and the poll set;
    /// gives it back if there is no room or it cannot be polled.
    pub(super) fn admit(
        &mut self,
        stream: Socket,
        peer: Peer,
        registry: &Registry,
    ) -> Result<usize, Socket> {
        let Some(i) = self.slots.iter().position(Option::is_none) else {
            return Err(stream);
        };
        let fd = stream.as_raw_fd();
        let polled = stream.set_nonblocking(true).and_then(|()| {
            registry.register(&mut SourceFd(&fd), (self.token_of)(i), Interest::READABLE)
        });
        if polled.is_err() {
            return Err(stream);
        }
        self.slots[i] = Some(Exchange {
            stream,
            peer,
            request: Vec::new(),
            answer: None,
            lingering: false,
            until: Instant::now() + self.time,
        });
        Ok(i)
    }

    /// Reads what connection `i` has sent; `whole` says how long the request is once it is
    /// complete (the rest, if any, is ignored).
    pub(super) fn read(&mut self, i: usize, whole: impl Fn(&[u8]) -> Option<usize>) -> Read {
        let max = self.max_request;
        let Some(exchange) = self.slots.get_mut(i).and_then(Option::as_mut) else {
            return Read::Waiting;
        };
        if exchange.answer.is_some() {
            return Read::Waiting;
        }
        let mut buffer = [MaybeUninit::<u8>::uninit(); 1024];
        loop {
            if let Some(len) = whole(&exchange.request) {
                exchange.request.truncate(len);
                return Read::Whole(std::mem::take(&mut exchange.request));
            }
            if exchange.request.len() > max {
                return Read::TooLong;
            }
            match exchange.stream.recv(&mut buffer) {
                Ok(0) => return Read::Gone,
                Ok(n) => {
                    // Safe: `recv` initialised the first `n` bytes.
                    let got = unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast(), n) };
                    exchange.request.extend_from_slice(got);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Read::Waiting,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Read::Gone,
            }
        }
    }

    /// Answers connection `i` with `answer`: sends what the socket takes now, the rest as it
    /// drains (see [`Exchanges::send_more`]); closes the connection once all is sent.
    pub(super) fn answer(&mut self, i: usize, answer: Vec<u8>, registry: &Registry) {
        let Some(exchange) = self.slots.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        exchange.answer = Some((answer, 0));
        let fd = exchange.stream.as_raw_fd();
        // From now on only room to write matters.
        let _ = registry.reregister(&mut SourceFd(&fd), (self.token_of)(i), Interest::WRITABLE);
        self.send_more(i, registry);
    }

    /// Sends more of connection `i`'s answer, if it has one; once all is sent, lingers (see
    /// the module's doc); closes it when the client has closed or is gone.
    pub(super) fn send_more(&mut self, i: usize, registry: &Registry) {
        let Some(exchange) = self.slots.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let Some((answer, sent)) = &mut exchange.answer else {
            return;
        };
        if exchange.lingering {
            if drain(&exchange.stream) {
                drop(self.take(i, registry));
            }
            return;
        }
        loop {
            if *sent == answer.len() {
                break;
            }
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            match exchange.stream.send_with_flags(&answer[*sent..], flags) {
                Ok(n) => *sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    drop(self.take(i, registry));
                    return;
                }
            }
        }
        exchange.lingering = true;
        let _ = exchange.stream.shutdown(std::net::Shutdown::Write);
        let fd = exchange.stream.as_raw_fd();
        let _ = registry.reregister(&mut SourceFd(&fd), (self.token_of)(i), Interest::READABLE);
        if drain(&exchange.stream) {
            drop(self.take(i, registry));
        }
    }

    /// Removes connection `i` from its slot and from the poll set.
    pub(super) fn take(&mut self, i: usize, registry: &Registry) -> Option<Exchange> {
        let exchange = self.slots.get_mut(i)?.take()?;
        let fd = exchange.stream.as_raw_fd();
        let _ = registry.deregister(&mut SourceFd(&fd));
        Some(exchange)
    }

    /// True when every slot is taken.
    pub(super) fn is_full(&self) -> bool {
        self.slots.iter().all(Option::is_some)
    }

    /// The client of connection `i`.
    pub(super) fn peer(&self, i: usize) -> Option<Peer> {
        Some(self.slots.get(i)?.as_ref()?.peer)
    }

    /// The earliest time a connection must be given up.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.slots.iter().flatten().map(|e| e.until).min()
    }

    /// Closes every connection past its time; returns their peers, for the log.
    pub(super) fn end_late(&mut self, now: Instant, registry: &Registry) -> Vec<Peer> {
        let late: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].as_ref().is_some_and(|e| e.until <= now))
            .collect();
        late.into_iter()
            .filter_map(|i| self.take(i, registry))
            .map(|e| e.peer)
            .collect()
    }

    /// Every connection as the next image takes it over (see `crate::upgrade`): its request
    /// so far, or what is left of its answer.
    pub(super) fn export(&self, now: Instant) -> Vec<ExchangeState> {
        self.slots
            .iter()
            .flatten()
            .map(|e| ExchangeState {
                fd: e.stream.as_raw_fd(),
                peer: e.peer.to_string(),
                request: e.request.clone(),
                answer_left: e
                    .answer
                    .as_ref()
                    .map(|(answer, sent)| answer[*sent..].to_vec()),
                lingering: e.lingering,
                until_in_ns: e.until.saturating_duration_since(now).as_nanos() as u64,
            })
            .collect()
    }

    /// Takes over what [`Exchanges::export`] gave, each connection where it was: reading its
    /// request, sending its answer, or lingering. Registering a socket that is ready already
    /// reports it at once (epoll looks at it on `EPOLL_CTL_ADD`), so what arrived during the
    /// exec is served in the first turn. On an error no descriptor not yet taken over is
    /// closed: the state rolls back, and the previous image adopts them again.
    pub(super) fn import(
        &mut self,
        states: &[ExchangeState],
        registry: &Registry,
        now: Instant,
    ) -> Result<(), String> {
        let free = self.slots.iter().filter(|slot| slot.is_none()).count();
        if states.len() > free {
            return Err(format!(
                "{} connections passed, room for {free}",
                states.len()
            ));
        }
        for state in states {
            let peer: Peer = state.peer.parse()?;
            let Some(i) = self.slots.iter().position(Option::is_none) else {
                break;
            };
            let interest = match (&state.answer_left, state.lingering) {
                (Some(_), false) => Interest::WRITABLE,
                _ => Interest::READABLE,
            };
            registry
                .register(&mut SourceFd(&state.fd), (self.token_of)(i), interest)
                .map_err(|e| format!("polling connection {}: {e}", state.fd))?;
            // Non-blocking already (the flag is the open socket's, and survives the exec).
            let stream = Socket::from(crate::upgrade::adopt(state.fd).map_err(|e| e.to_string())?);
            self.slots[i] = Some(Exchange {
                stream,
                peer,
                request: state.request.clone(),
                answer: state.answer_left.clone().map(|answer| (answer, 0)),
                lingering: state.lingering,
                until: now + Duration::from_nanos(state.until_in_ns),
            });
        }
        Ok(())
    }
}

/// Reads and drops what has arrived, without waiting; true once the client has closed (or
/// failed).
fn drain(stream: &Socket) -> bool {
    let mut scratch = [MaybeUninit::<u8>::uninit(); 4096];
    loop {
        match stream.recv(&mut scratch) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return e.kind() != ErrorKind::WouldBlock,
        }
    }
}

/// Sends `answer` without waiting, once, and closes: for a client turned away at accept (not
/// allowed, busy), whose few bytes fit the empty send buffer of a fresh connection. What it
/// sent already is taken first, so that the close is a clean end of file after the answer.
pub(super) fn answer_and_close(stream: Socket, answer: &[u8]) -> io::Result<()> {
    let sent = send_once(&stream, answer);
    super::accept::close_after_taking_what_arrived(stream);
    sent
}

/// Sends `answer` without waiting, once (into a fresh connection's empty send buffer), on a
/// connection the caller keeps.
pub(super) fn send_once(stream: &Socket, answer: &[u8]) -> io::Result<()> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    stream.send_with_flags(answer, flags).map(drop)
}

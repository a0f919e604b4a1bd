//! The control socket, served by the loop (see `crate::control` for the commands and their
//! protocol). It never waits: the listener and each connection are in the poll set, a
//! connection is read without blocking until its request line is whole, and the answer, a few
//! lines, goes out with MSG_DONTWAIT into the connection's empty send buffer.
//!
//! Who may ask: root, or the user the server runs as. The socket file is that user's with mode
//! 0600, and each connection's credentials (SO_PEERCRED) are checked again, so that a file
//! whose mode was loosened does not open the server to everyone. At most
//! [`MAX_CONNECTIONS`] talk at once, each for at most [`REQUEST_TIMEOUT`]: a client that
//! connects and says nothing costs a slot for that long, never the loop's time.

use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::UnixStream;
use mio::Interest;

use super::token::Source;
use super::Server;
use crate::conn::Credentials;
use crate::control::{self, Command, Outcome};
use crate::listen::{ListenSocket, Listener};

/// Most control connections at once; more are answered `error` (busy) and closed.
const MAX_CONNECTIONS: usize = 8;
/// How long a control connection may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket and the connections talking to it.
pub(super) struct Control {
    listener: Listener,
    /// Slot `i` is registered as `Source::Control(i)`.
    slots: Vec<Option<Talking>>,
    /// Connections whose `stop` was accepted: closed when the parent exits (their EOF tells the
    /// command the server is gone).
    stopping: Vec<UnixStream>,
}

/// A control connection waiting for its request line.
struct Talking {
    stream: UnixStream,
    peer: Credentials,
    request: Vec<u8>,
    until: Instant,
}

impl Control {
    /// Serves commands on `listener` (a UNIX-domain socket), registered as
    /// `Source::ControlListener`.
    pub(super) fn new(mut listener: Listener, registry: &mio::Registry) -> std::io::Result<Self> {
        registry.register(
            &mut listener.socket,
            Source::ControlListener.token(),
            Interest::READABLE,
        )?;
        Ok(Control {
            listener,
            slots: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            stopping: Vec::new(),
        })
    }

    /// Where the control socket is.
    pub(super) fn address(&self) -> &crate::listen::ListenAddr {
        &self.listener.local
    }

    /// The earliest time a talking connection must be given up.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.slots.iter().flatten().map(|t| t.until).min()
    }
}

/// Who may use the control socket: root, or the user the server runs as.
fn may_control(peer: &Credentials) -> bool {
    peer.uid == 0 || peer.uid == nix::unistd::geteuid().as_raw()
}

impl Server {
    /// The control socket has connections queued: accept them all, refusing the ones not
    /// allowed and those beyond `MAX_CONNECTIONS`.
    pub(super) fn accept_control(&mut self) {
        while let Some(stream) = self.accept_one_control() {
            self.admit_control(stream);
        }
    }

    fn accept_one_control(&self) -> Option<UnixStream> {
        let ListenSocket::Unix(listener) = &self.control.as_ref()?.listener.socket else {
            return None;
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => return Some(stream),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) => {
                    debug!("accept on the control socket: {e}");
                    return None;
                }
            }
        }
    }

    /// Takes a control connection into a free slot, if its client may control the server.
    fn admit_control(&mut self, mut stream: UnixStream) {
        let peer = match credentials(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                debug!("control connection without credentials: {e}");
                return;
            }
        };
        if !may_control(&peer) {
            let who = crate::conn::Peer::Local(peer);
            warn!("control connection from {who} refused: neither root nor the server's user");
            write_answer(
                &stream,
                Outcome::Error,
                "permission denied: only root or the server's user may control it",
            );
            return;
        }
        let Some(control) = &mut self.control else {
            return;
        };
        let Some(i) = control.slots.iter().position(Option::is_none) else {
            write_answer(
                &stream,
                Outcome::Error,
                "busy: too many control connections",
            );
            return;
        };
        let token = Source::Control(i).token();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE)
        {
            debug!("cannot poll a control connection: {e}");
            return;
        }
        control.slots[i] = Some(Talking {
            stream,
            peer,
            request: Vec::new(),
            until: Instant::now() + REQUEST_TIMEOUT,
        });
        // The request may have arrived already, its edge with it.
        self.read_control_request(i);
    }

    /// Control connection `i` has something to read: once its request line is whole, run the
    /// command and answer.
    pub(super) fn read_control_request(&mut self, i: usize) {
        let Some(control) = &mut self.control else {
            return;
        };
        let Some(talking) = control.slots.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let mut buffer = [0u8; control::MAX_REQUEST + 1];
        let line = loop {
            match talking.stream.read(&mut buffer) {
                Ok(0) => {
                    self.close_control(i);
                    return;
                }
                Ok(n) => talking.request.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_control(i);
                    return;
                }
            }
            if let Some(end) = talking.request.iter().position(|&b| b == b'\n') {
                break Some(String::from_utf8_lossy(&talking.request[..end]).into_owned());
            }
            if talking.request.len() > control::MAX_REQUEST {
                break None;
            }
        };
        let Some(talking) = self.take_control(i) else {
            return;
        };
        let Some(command) = line.as_deref().and_then(Command::parse) else {
            let what = line.unwrap_or_else(|| "a line too long".into());
            write_answer(
                &talking.stream,
                Outcome::Error,
                &format!(
                    "unknown command {:?}: expected status, reload, stop [smart|fast|immediate] \
                     or reopen-logs",
                    what.chars().take(control::MAX_REQUEST).collect::<String>()
                ),
            );
            return;
        };
        let who = crate::conn::Peer::Local(talking.peer);
        info!("control command `{}` from {who}", command.request());
        self.run_control_command(command, talking.stream);
    }

    /// Runs `command` and answers on `stream`.
    fn run_control_command(&mut self, command: Command, stream: UnixStream) {
        let (outcome, text) = match command {
            Command::Status => (Outcome::Ok, self.status_report()),
            Command::Reload => {
                // As SIGHUP does: the log first, whatever becomes of the configuration.
                let reopened = self.reopen_log_file();
                match self.reload(reopened) {
                    Ok(line) => (Outcome::Ok, line),
                    Err(reason) => (Outcome::Refused, format!("reload refused: {reason}")),
                }
            }
            Command::ReopenLogs => match self.reopen_log_file() {
                Some("log_file reopened") => (Outcome::Ok, "log_file reopened".to_string()),
                Some(_) => (
                    Outcome::Error,
                    "log_file NOT reopened (the log says why); logging on to the file open \
                     before"
                        .to_string(),
                ),
                None => (
                    Outcome::Ok,
                    "no log_file: the log goes to stderr".to_string(),
                ),
            },
            Command::Stop(mode) => {
                write_answer(
                    &stream,
                    Outcome::Ok,
                    &format!("shutting down ({} shutdown)", mode.name()),
                );
                if let Some(control) = &mut self.control {
                    control.stopping.push(stream);
                }
                self.shutdown(mode, "the stop command");
                return;
            }
        };
        write_answer(&stream, outcome, &text);
    }

    /// Gives up control connections past their time.
    pub(super) fn end_late_control_connections(&mut self, now: Instant) {
        let Some(control) = &self.control else {
            return;
        };
        let late: Vec<usize> = (0..control.slots.len())
            .filter(|&i| control.slots[i].as_ref().is_some_and(|t| t.until <= now))
            .collect();
        for i in late {
            if let Some(talking) = self.take_control(i) {
                debug!(
                    "control connection from {} sent no command in time",
                    crate::conn::Peer::Local(talking.peer)
                );
            }
        }
    }

    fn close_control(&mut self, i: usize) {
        drop(self.take_control(i));
    }

    /// Removes control connection `i` from its slot and from the poll set.
    fn take_control(&mut self, i: usize) -> Option<Talking> {
        let control = self.control.as_mut()?;
        let mut talking = control.slots.get_mut(i)?.take()?;
        let _ = self.poll.registry().deregister(&mut talking.stream);
        Some(talking)
    }
}

/// The credentials of a control connection's client.
fn credentials(stream: &UnixStream) -> nix::Result<Credentials> {
    let c = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(Credentials {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// Writes an answer without waiting: a few lines fit the empty send buffer of a fresh
/// connection; a client that is gone or does not read gets what fitted.
fn write_answer(stream: &UnixStream, outcome: Outcome, text: &str) {
    let bytes = control::answer(outcome, text);
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    if let Err(e) = socket2::SockRef::from(stream).send_with_flags(&bytes, flags) {
        debug!("control answer not sent: {e}");
    }
}

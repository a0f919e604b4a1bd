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

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::Interest;

use super::exchange::{self, Exchanges, Read};
use super::token::Source;
use super::Server;
use crate::conn::Peer;
use crate::control::{self, Command, Outcome};
use crate::listen::Listener;

/// Most control connections at once; more are answered `error` (busy) and closed.
const MAX_CONNECTIONS: usize = 8;
/// How long a control connection may take to send its request line and take its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket and the connections talking to it.
pub(super) struct Control {
    listener: Listener,
    /// Slot `i` is polled as `Source::Control(i)`.
    pub(super) talking: Exchanges,
    /// `stop` commands waiting for the server to exit: their descriptors are never closed by
    /// us (the kernel closes them at exit, after the pid file is removed, and the command's
    /// end of file says the server is gone); an upgrade passes them on.
    pub(super) waiting_for_exit: Vec<RawFd>,
}

impl Control {
    /// Serves commands on `listener` (a UNIX-domain socket), polled as
    /// `Source::ControlListener`.
    pub(super) fn new(mut listener: Listener, registry: &mio::Registry) -> std::io::Result<Self> {
        registry.register(
            &mut listener.socket,
            Source::ControlListener.token(),
            Interest::READABLE,
        )?;
        Ok(Control {
            listener,
            talking: Exchanges::new(
                MAX_CONNECTIONS,
                |i| Source::Control(i).token(),
                control::MAX_REQUEST,
                REQUEST_TIMEOUT,
            ),
            waiting_for_exit: Vec::new(),
        })
    }

    /// The control socket itself (an upgrade passes it on).
    pub(super) fn listener(&self) -> &Listener {
        &self.listener
    }

    /// Where the control socket is.
    pub(super) fn address(&self) -> &crate::listen::ListenAddr {
        &self.listener.local
    }

    /// The earliest time a connection must be given up.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.talking.next_deadline()
    }
}

/// Who may use the control socket: root, or the user the server runs as.
fn may_control(peer: &Peer) -> bool {
    let Peer::Local(credentials) = peer else {
        return false;
    };
    credentials.uid == 0 || credentials.uid == nix::unistd::geteuid().as_raw()
}

/// The length of a request line, once it is whole (its newline excluded).
fn request_line(received: &[u8]) -> Option<usize> {
    received.iter().position(|&b| b == b'\n')
}

impl Server {
    /// The control socket has connections queued: accept them all, turning away the ones not
    /// allowed and those beyond `MAX_CONNECTIONS`.
    pub(super) fn accept_control(&mut self) {
        loop {
            let Some(control) = &mut self.control else {
                return;
            };
            let (stream, peer) = match control.listener.accept_blocking() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("accept on the control socket: {e}");
                    return;
                }
            };
            if !may_control(&peer) {
                warn!("control connection from {peer} refused: neither root nor the server's user");
                let text = "permission denied: only root or the server's user may control it";
                let _ = exchange::answer_and_close(stream, &control::answer(Outcome::Error, text));
                continue;
            }
            match control.talking.admit(stream, peer, self.poll.registry()) {
                // The request may have arrived already, its edge with it.
                Ok(i) => self.serve_control(i),
                Err(stream) => {
                    let answer =
                        control::answer(Outcome::Error, "busy: too many control connections");
                    let _ = exchange::answer_and_close(stream, &answer);
                }
            }
        }
    }

    /// Control connection `i` had an event: read its request, or send more of its answer.
    pub(super) fn serve_control(&mut self, i: usize) {
        let Some(control) = &mut self.control else {
            return;
        };
        let registry = self.poll.registry();
        control.talking.send_more(i, registry);
        let line = match control.talking.read(i, request_line) {
            Read::Waiting => return,
            Read::Gone => {
                drop(control.talking.take(i, registry));
                return;
            }
            Read::TooLong => None,
            Read::Whole(line) => Some(String::from_utf8_lossy(&line).into_owned()),
        };
        let Some(command) = line.as_deref().and_then(Command::parse) else {
            let what = line.unwrap_or_else(|| "a line too long".into());
            let text = format!(
                "unknown command {what:?}: expected status, reload, stop [smart|fast|immediate] \
                 or reopen-logs"
            );
            control
                .talking
                .answer(i, control::answer(Outcome::Error, &text), registry);
            return;
        };
        let Some(peer) = control.talking.peer(i) else {
            return;
        };
        let request = command.request();
        info!(event = "control", command:% = request, peer:% = peer; "control command `{request}` from {peer}");
        self.run_control_command(i, command);
    }

    /// Runs `command` for control connection `i` and answers it.
    fn run_control_command(&mut self, i: usize, command: Command) {
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
                Some("log_file reopened") => {
                    // In the new file: where whoever rotated it will look.
                    info!("log_file reopened");
                    (Outcome::Ok, "log_file reopened".to_string())
                }
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
                self.stop_on_command(i, mode);
                return;
            }
            Command::Upgrade => {
                // Answered when the upgrade ends: by this image if it fails, else by the next.
                let requester = self
                    .control
                    .as_mut()
                    .and_then(|c| c.talking.take(i, self.poll.registry()))
                    .map(|exchange| exchange.stream);
                self.start_upgrade(requester);
                return;
            }
        };
        if let Some(control) = &mut self.control {
            let answer = control::answer(outcome, &text);
            control.talking.answer(i, answer, self.poll.registry());
        }
    }

    /// `stop`: says so, and shuts down. The connection waits for the exit (see
    /// `Control::waiting_for_exit`). (Children close it with every other inherited
    /// descriptor.)
    fn stop_on_command(&mut self, i: usize, mode: control::Mode) {
        if let Some(control) = &mut self.control {
            if let Some(exchange) = control.talking.take(i, self.poll.registry()) {
                let text = format!("shutting down ({} shutdown)", mode.name());
                let _ = exchange::send_once(&exchange.stream, &control::answer(Outcome::Ok, &text));
                let fd = std::os::fd::IntoRawFd::into_raw_fd(exchange.stream);
                control.waiting_for_exit.push(fd);
            }
        }
        self.shutdown(mode, "the stop command");
    }

    /// Gives up control connections past their time.
    pub(super) fn end_late_control_connections(&mut self, now: Instant) {
        let Some(control) = &mut self.control else {
            return;
        };
        for peer in control.talking.end_late(now, self.poll.registry()) {
            debug!("control connection from {peer}: no command, or its answer not taken, in time");
        }
    }
}

//! The control commands: `forkecho status | reload | stop [--mode MODE] | reopen-logs`, as
//! `pg_ctl` and `nginx -s` have them. A command reaches the running server over its control
//! socket (a UNIX-domain socket the loop serves without ever waiting, see
//! `server::control`), never through a pid: a pid in a file may belong to another process
//! by now, and a signal says nothing back. Each command gets an answer, and the command's exit
//! code says it: 0 done, 1 refused or failed, 3 no server runs (pg_ctl's code for `status`).
//!
//! The protocol is one line each way, then text: the client sends the command (`status\n`,
//! `reload\n`, `stop smart\n`, `reopen-logs\n`); the server answers with a first line `ok`,
//! `refused` or `error`, then what it has to say, and closes. For `stop` it closes only when
//! the shutdown is complete (the connection is closed by the parent's exit), so the command
//! returns once the server is gone, as `pg_ctl stop` waits.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub use crate::signals::Mode;

/// Longest request line the server reads.
pub const MAX_REQUEST: usize = 64;

/// How long a command waits for room in the control socket's queue (a server that does not
/// accept is stopped or hung).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a command waits for its answer; `stop` waits for the whole shutdown.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// A control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// What the server is doing: sessions, totals, refusals, uptime, version, config.
    Status,
    /// Re-read the configuration, as SIGHUP does, and say whether it was applied.
    Reload,
    /// Shut down in this mode, as SIGTERM (smart), SIGINT (fast) or SIGQUIT (immediate) do.
    Stop(Mode),
    /// Reopen `log_file` (after logrotate renamed it).
    ReopenLogs,
    /// Replace the running binary by the one now on disk, in place (see `crate::upgrade`).
    Upgrade,
}

impl Command {
    /// The request line for this command, without its newline.
    pub fn request(self) -> String {
        match self {
            Command::Status => "status".into(),
            Command::Reload => "reload".into(),
            Command::Stop(mode) => format!("stop {}", mode.name()),
            Command::ReopenLogs => "reopen-logs".into(),
            Command::Upgrade => "upgrade".into(),
        }
    }

    /// The command a request line asks for.
    pub fn parse(line: &str) -> Option<Command> {
        let mut words = line.split_ascii_whitespace();
        let command = match (words.next()?, words.next()) {
            ("status", None) => Command::Status,
            ("reload", None) => Command::Reload,
            ("reopen-logs", None) => Command::ReopenLogs,
            ("upgrade", None) => Command::Upgrade,
            ("stop", None) => Command::Stop(Mode::Smart),
            ("stop", Some(mode)) => Command::Stop(parse_mode(mode)?),
            _ => return None,
        };
        words.next().is_none().then_some(command)
    }
}

/// `smart`, `fast` or `immediate`.
pub fn parse_mode(word: &str) -> Option<Mode> {
    match word {
        "smart" => Some(Mode::Smart),
        "fast" => Some(Mode::Fast),
        "immediate" => Some(Mode::Immediate),
        _ => None,
    }
}

/// The first line of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or, for `stop`, started: the connection closes when the server is gone).
    Ok,
    /// Not done, for a reason the server gives (a reload whose configuration is invalid).
    Refused,
    /// The request could not be served (not allowed, not understood, busy).
    Error,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
        }
    }

    fn of(word: &str) -> Option<Outcome> {
        [Outcome::Ok, Outcome::Refused, Outcome::Error]
            .into_iter()
            .find(|o| o.word() == word)
    }
}

/// An answer as the server writes it: the outcome's word, a newline, the text.
pub fn answer(outcome: Outcome, text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(text.len() + 10);
    bytes.extend_from_slice(outcome.word().as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(text.as_bytes());
    if !text.is_empty() && !text.ends_with('\n') {
        bytes.push(b'\n');
    }
    bytes
}

/// What a command came to, for its exit code and output.
#[derive(Debug)]
pub enum Sent {
    /// The server answered.
    Answered(Outcome, String),
    /// No server listens on the control socket (no such file, or nothing answers): exit 3.
    NoServer(String),
    /// Something else went wrong (permission, timeout, a garbled answer): exit 1.
    Failed(String),
}

impl Sent {
    /// The command's exit code: 0 done, 1 refused or failed, 3 no server runs.
    pub fn exit_code(&self) -> u8 {
        match self {
            Sent::Answered(Outcome::Ok, _) => 0,
            Sent::Answered(..) | Sent::Failed(_) => 1,
            Sent::NoServer(_) => 3,
        }
    }
}

/// Sends `command` to the server whose control socket is `path` and waits for its answer (for
/// `stop`, until the server is gone).
pub fn send(path: &Path, command: Command) -> Sent {
    let mut stream = match connect(path, CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) if is_no_server(&e) => {
            return Sent::NoServer(format!(
                "no server is running (control socket {}: {}; a server started with another \
                 control_socket or pid_file is reached with those)",
                path.display(),
                crate::os_error_text(&e)
            ))
        }
        Err(e) => {
            return Sent::Failed(format!(
                "cannot reach the server at {}: {}",
                path.display(),
                crate::os_error_text(&e)
            ))
        }
    };
    let stopping = matches!(command, Command::Stop(_));
    let timeout = match command {
        Command::Stop(_) => STOP_TIMEOUT,
        _ => ANSWER_TIMEOUT,
    };
    match exchange(&mut stream, command, timeout) {
        Ok(answer) => parse_answer(&answer),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && stopping => Sent::Failed(format!(
            "the server is still shutting down after {}s (its shutdown_timeout and \
             kill_timeout may be longer); `status` shows how it goes",
            timeout.as_secs()
        )),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Failed(format!(
            "no complete answer from the server within {}s",
            timeout.as_secs()
        )),
        Err(e) => Sent::Failed(format!(
            "talking to the server at {}: {}",
            path.display(),
            crate::os_error_text(&e)
        )),
    }
}

/// Connects to the control socket at `path`, waiting at most `timeout` for room in its queue:
/// a server that is stopped or hung does not accept, and a full queue would otherwise make
/// `connect` wait for ever (logrotate's postrotate, and every rotation after it, with it).
fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    let address = SockAddr::unix(path)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match socket.connect(&address) {
            Ok(()) => break,
            // A UNIX-domain connect does not complete later: EAGAIN is a full queue.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the server has not accepted for {}s (stopped or hung?)",
                            timeout.as_secs()
                        ),
                    ));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}

/// A socket path with nothing behind it: no file, or a stale socket.
fn is_no_server(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ECONNREFUSED | libc::ENOTDIR)
    )
}

/// Sends the request and reads the answer to its end. A server that turns the client away
/// (not allowed, busy) answers at once and closes, perhaps before the request arrives: the
/// request's write may then fail and the read end in a reset, after the answer. What was
/// read counts.
fn exchange(stream: &mut UnixStream, command: Command, timeout: Duration) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    match stream.write_all(format!("{}\n", command.request()).as_bytes()) {
        Err(e) if !is_turned_away(&e) => return Err(e),
        _ => {}
    }
    let mut answer = Vec::new();
    // An answer is a few lines: a bound keeps a confused peer from filling our memory.
    match stream.take(1 << 20).read_to_end(&mut answer) {
        Err(e) if !is_turned_away(&e) || answer.is_empty() => Err(e),
        _ => Ok(answer),
    }
}

/// The errors of a connection the server closed without reading all of it.
fn is_turned_away(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

fn parse_answer(bytes: &[u8]) -> Sent {
    let text = String::from_utf8_lossy(bytes);
    let (word, rest) = text.split_once('\n').unwrap_or((&text, ""));
    match Outcome::of(word) {
        Some(outcome) => Sent::Answered(outcome, rest.trim_end().to_string()),
        None if text.is_empty() => {
            Sent::Failed("the server closed the connection without an answer".into())
        }
        None => Sent::Failed(format!(
            "an answer this version does not understand: {text:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_back_into_their_command() {
        for command in [
            Command::Status,
            Command::Reload,
            Command::ReopenLogs,
            Command::Stop(Mode::Smart),
            Command::Stop(Mode::Fast),
            Command::Stop(Mode::Immediate),
        ] {
            assert_eq!(Command::parse(&command.request()), Some(command));
        }
        assert_eq!(Command::parse("stop"), Some(Command::Stop(Mode::Smart)));
        for bad in ["", "stop now", "status please", "STATUS", "reload x"] {
            assert_eq!(Command::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn answers_carry_their_outcome_and_text() {
        let sent = parse_answer(&answer(Outcome::Refused, "bad key"));
        assert!(matches!(sent, Sent::Answered(Outcome::Refused, ref t) if t == "bad key"));
        assert_eq!(sent.exit_code(), 1);
        assert_eq!(parse_answer(&answer(Outcome::Ok, "")).exit_code(), 0);
        assert!(matches!(parse_answer(b"garbage"), Sent::Failed(_)));
        assert!(matches!(parse_answer(b""), Sent::Failed(_)));
    }
}

//! The integration tests' small library:
//!
//! - [`Server`] and [`ServerBuilder`]: start the real `forkecho` binary, wait until it listens
//!   (read from its log, never a fixed sleep), and kill it and every child it forked, by pid,
//!   when the test ends, even by a panic;
//! - [`LogLine`]: the one parser of forkecho's log lines, and [`ChildEnding`], the parent's
//!   record of how a child ended;
//! - client helpers: connect over loopback (from a chosen source address, with a small receive
//!   buffer), read the banner, echo, drain;
//! - /proc helpers: a process's children, state, status fields, descriptors, CPU time;
//! - [`run`]: the binary run to completion, for command-line and startup errors;
//! - [`Noise`], [`TempDir`], [`wait_until`] and [`report`] for the rest.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const BIN: &str = env!("CARGO_BIN_EXE_forkecho");
pub const BANNER: &[u8] = b"connect successful!\n";
/// Upper bound for any single wait in a test; generous for a loaded 2-core CI machine.
pub const WAIT: Duration = Duration::from_secs(20);

// ---- The log ----

/// One record of forkecho's log, `<time> <LEVEL> forkecho[<pid>] <message>`: every line a
/// process of forkecho writes once logging is set up, whatever the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLine<'a> {
    /// RFC 3339 in UTC, e.g. `2026-11-26T09:40:01.123Z`.
    pub time: &'a str,
    pub level: &'a str,
    /// The process that wrote the line: the parent, or a child about its own session.
    pub pid: Pid,
    pub message: &'a str,
}

impl<'a> LogLine<'a> {
    /// The record `line` holds, or None if it is not one whole record (cut, mixed with another
    /// process's line, or not from the logger at all, like a startup error on stderr).
    pub fn parse(line: &'a str) -> Option<Self> {
        const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];
        let (time, rest) = line.split_once(' ')?;
        let (level, rest) = rest.trim_start().split_once(' ')?;
        let (tag, message) = rest.trim_start().split_once(' ')?;
        let pid: u32 = tag
            .strip_prefix("forkecho[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        let whole = time.ends_with('Z') && LEVELS.contains(&level) && !message.trim().is_empty();
        whole.then_some(LogLine {
            time,
            level,
            pid: Pid::from_raw(pid as i32),
            message,
        })
    }

    /// Seconds since midnight of the timestamp.
    pub fn seconds_of_day(&self) -> f64 {
        let time = self.time.split('T').nth(1).unwrap().trim_end_matches('Z');
        let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
        parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
    }

    /// `listening on <addr>` → addr.
    pub fn listening_on(&self) -> Option<SocketAddr> {
        let (_, addr) = self.message.split_once("listening on ")?;
        addr.trim().parse().ok()
    }

    /// `accepted <peer> -> child <pid> (...)` → (peer, pid).
    pub fn accepted(&self) -> Option<(SocketAddr, Pid)> {
        let rest = self.message.strip_prefix("accepted ")?;
        let (peer, rest) = rest.split_once(" -> child ")?;
        let pid = rest.split_whitespace().next()?.parse().ok()?;
        Some((peer.parse().ok()?, Pid::from_raw(pid)))
    }

    /// `child <pid> (<peer>) <how> after <seconds>s`: how a child ended, once reaped.
    pub fn child_ending(&self) -> Option<ChildEnding> {
        let rest = self.message.strip_prefix("child ")?;
        let (pid, rest) = rest.split_once(" (")?;
        let (peer, rest) = rest.split_once(") ")?;
        let (ending, after) = rest.rsplit_once(" after ")?;
        let (how, meaning) = match ending.strip_suffix(')').and_then(|e| e.split_once(" (")) {
            Some((how, meaning)) => (how, Some(meaning.to_string())),
            None => (ending, None),
        };
        Some(ChildEnding {
            pid: Pid::from_raw(pid.parse().ok()?),
            peer: peer.parse().ok()?,
            how: how.to_string(),
            meaning,
            seconds: after.trim().strip_suffix('s')?.parse().ok()?,
        })
    }

    /// The whole number right before ` <word>` in the message (`status: 0 active` → `active`
    /// → 0), not the tail of a longer number.
    pub fn number_before(&self, word: &str) -> Option<u64> {
        let at = self.message.find(&format!(" {word}"))?;
        let digits: String = self.message[..at]
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.chars().rev().collect::<String>().parse().ok()
    }
}

/// The first `listening on` address in a log file, read once: for a daemon, whose start
/// returns only once it listens.
pub fn listening_address_in(log: &Path) -> SocketAddr {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .find_map(|l| LogLine::parse(l)?.listening_on())
        .unwrap_or_else(|| panic!("no `listening on` in the log: {text}"))
}

/// How the parent logged the end of one child.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildEnding {
    pub pid: Pid,
    /// The client's address, as the parent saw it (the client's `local_addr`).
    pub peer: SocketAddr,
    /// `exited with code 0`, `killed by signal SIGKILL`, ...
    pub how: String,
    /// What the handler says the exit code means (`client closed`, `idle timeout`), if any.
    pub meaning: Option<String>,
    /// How long the session lasted.
    pub seconds: f64,
}

/// Asserts every line is one whole record (see [`LogLine::parse`]): lines written by
/// different processes at once were not cut into or mixed.
pub fn assert_whole_lines<'a>(lines: impl IntoIterator<Item = &'a str>) {
    for line in lines {
        assert!(
            LogLine::parse(line).is_some(),
            "log line is not one whole record: {line:?}"
        );
    }
}

/// Lines a reader thread collects from a pipe (the server's stderr), until EOF.
#[derive(Default)]
struct LineBuffer {
    state: Mutex<Lines>,
    grew: Condvar,
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

impl LineBuffer {
    /// Starts a thread that reads `pipe` line by line (invalid UTF-8 replaced) into the buffer.
    fn collect(pipe: impl Read + Send + 'static) -> Arc<Self> {
        let buffer = Arc::new(LineBuffer::default());
        let sink = Arc::clone(&buffer);
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.strip_suffix('\n').unwrap_or(&text).to_string();
                        sink.state.lock().unwrap().lines.push(text);
                        sink.grew.notify_all();
                    }
                }
            }
            sink.state.lock().unwrap().closed = true;
            sink.grew.notify_all();
        });
        buffer
    }

    fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    /// Waits until `done(lines, closed)` holds; false if `timeout` passed first.
    fn wait(&self, timeout: Duration, mut done: impl FnMut(&[String], bool) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        loop {
            if done(&state.lines, state.closed) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self.grew.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// Where a test reads the server's log.
enum Log {
    /// Its stderr, collected line by line.
    Stderr(Arc<LineBuffer>),
    /// A log file, read whole each time it is looked at: a rotation (rename, then a new file
    /// at the path) is followed as the operator would follow it.
    File(PathBuf),
    /// Nowhere: the test holds the server's stderr itself.
    Unread,
}

impl Log {
    fn lines(&self) -> Vec<String> {
        match self {
            Log::Stderr(buffer) => buffer.lines(),
            Log::File(path) => std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect(),
            Log::Unread => Vec::new(),
        }
    }

    /// Waits until `done(lines)` holds; false if `timeout` passed first.
    fn wait(&self, timeout: Duration, mut done: impl FnMut(&[String]) -> bool) -> bool {
        match self {
            Log::Stderr(buffer) => buffer.wait(timeout, |lines, _| done(lines)),
            Log::File(_) => wait_until(timeout, || done(&self.lines())),
            Log::Unread => panic!("this server's log is read by the test, not by `Server`"),
        }
    }
}

// ---- The server ----

/// A change to the server's `Command` before it is spawned (user, limits, signal mask, ...).
type CommandTweak = Box<dyn FnOnce(&mut Command)>;

/// Builds the command line and surroundings of a server under test; [`ServerBuilder::start`]
/// runs it.
pub struct ServerBuilder {
    program: Option<PathBuf>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    env_removes: Vec<String>,
    config: Option<String>,
    listeners: usize,
    stderr: Option<Stdio>,
    log_file: Option<PathBuf>,
    tweaks: Vec<CommandTweak>,
}

impl ServerBuilder {
    /// Runs this program instead of `BIN` (a copy another user may execute, or a launcher that
    /// execs forkecho in place).
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable; `RUST_LOG` is `debug` unless set here or removed.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Removes an inherited environment variable (`RUST_LOG`: the server's own default level).
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env_removes.push(key.into());
        self
    }

    /// Writes `text` to a fresh config file and passes it with `-c`.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.into());
        self
    }

    /// How many `listening on` lines to wait for (one per listen address); default 1.
    pub fn listeners(mut self, n: usize) -> Self {
        self.listeners = n;
        self
    }

    /// Gives the server this stderr instead of a pipe the harness reads (a pipe or socket the
    /// test holds, `/dev/null`); its log is then read from [`Self::log_file`], or by the test.
    pub fn stderr(mut self, stderr: impl Into<Stdio>) -> Self {
        self.stderr = Some(stderr.into());
        self
    }

    /// Passes `--log-file <path>` and reads the log from that file.
    pub fn log_file(self, path: &Path) -> Self {
        self.args(["--log-file", path.to_str().unwrap()])
            .read_log_from(path)
    }

    /// Reads the log from `path`, a log file the server was told about some other way (its
    /// config, or a flag given with [`Self::args`]).
    pub fn read_log_from(mut self, path: &Path) -> Self {
        self.log_file = Some(path.to_path_buf());
        self
    }

    /// Adjusts the command before it is spawned (user, limits, `pre_exec`, working directory).
    pub fn tweak(mut self, f: impl FnOnce(&mut Command) + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }

    /// Starts the server and waits until every listener is bound; panics with the server's
    /// output if it exits instead.
    pub fn start(self) -> Server {
        self.try_start().unwrap_or_else(|(status, stderr)| {
            panic!("forkecho exited at start: {status}\n{stderr}")
        })
    }

    /// Starts the server and waits until every listener is bound (`Ok`) or it exits (`Err`
    /// with its status and everything it wrote to stderr). The `listening on` lines are read
    /// from the log: a server whose stderr the test holds, without a log file, is only
    /// [`Self::spawn`]ed.
    pub fn try_start(self) -> Result<Server, (ExitStatus, String)> {
        let want = self.listeners;
        let mut server = self.spawn();
        let mut exited = None;
        let settled = wait_until(WAIT, || {
            exited = server.child.as_mut().unwrap().try_wait().unwrap();
            exited.is_some() || server.listening_addresses().len() >= want
        });
        if let Some(status) = exited {
            server.child = None;
            return Err((status, server.stderr_after_exit()));
        }
        assert!(
            settled,
            "timed out after {WAIT:?} waiting for {want} `listening on` lines\n\
             --- server log ---\n{}",
            server.log_text()
        );
        server.addrs = server.listening_addresses();
        Ok(server)
    }

    /// Spawns the server and returns at once, without waiting for it to listen (for a test
    /// that waits for something else first, or reads the log itself). When no `-l`/`--listen`
    /// and no config file is given, it listens on 127.0.0.1 port 0, so tests never collide.
    pub fn spawn(self) -> Server {
        let mut args = self.args.clone();
        let mut dir = None;
        if let Some(text) = &self.config {
            let d = TempDir::new();
            let path = d.path().join("forkecho.toml");
            std::fs::write(&path, text).unwrap();
            args.splice(0..0, ["-c".to_string(), path.display().to_string()]);
            dir = Some(d);
        }
        let decides_listen = |a: &String| {
            a == "-l" || a == "-c" || a.starts_with("--listen") || a.starts_with("--config")
        };
        if !args.iter().any(decides_listen) {
            args.extend(["-l".to_string(), "127.0.0.1:0".to_string()]);
        }
        let mut cmd = Command::new(self.program.as_deref().unwrap_or(BIN.as_ref()));
        cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null());
        let own_stderr = self.stderr.is_some();
        cmd.stderr(self.stderr.unwrap_or_else(Stdio::piped));
        if !self.envs.iter().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "debug");
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        for k in &self.env_removes {
            cmd.env_remove(k);
        }
        for tweak in self.tweaks {
            tweak(&mut cmd);
        }
        let mut child = cmd.spawn().expect("spawn forkecho");
        // The server's end of a stderr the test holds must not stay open here too, or the
        // test's reader would never see EOF.
        drop(cmd);
        let stderr = child.stderr.take().map(LineBuffer::collect);
        let log = match (&self.log_file, &stderr) {
            (Some(path), _) => Log::File(path.clone()),
            (None, Some(buffer)) if !own_stderr => Log::Stderr(Arc::clone(buffer)),
            _ => Log::Unread,
        };
        Server {
            pid: Pid::from_raw(child.id() as i32),
            child: Some(child),
            log,
            stderr,
            addrs: Vec::new(),
            config_dir: dir,
        }
    }
}

/// A running `forkecho`. Dropping it kills the server and every child it forked, by pid.
pub struct Server {
    child: Option<Child>,
    pid: Pid,
    log: Log,
    /// Its stderr, when the harness reads it.
    stderr: Option<Arc<LineBuffer>>,
    /// Every address it listens on, from its `listening on` lines.
    pub addrs: Vec<SocketAddr>,
    config_dir: Option<TempDir>,
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            program: None,
            args: Vec::new(),
            envs: Vec::new(),
            env_removes: Vec::new(),
            config: None,
            listeners: 1,
            stderr: None,
            log_file: None,
            tweaks: Vec::new(),
        }
    }

    /// A server with default settings on 127.0.0.1, port 0.
    pub fn start() -> Server {
        Self::builder().start()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Replaces the text of the config file the server was started with (see
    /// [`ServerBuilder::config`]), for a reload test.
    pub fn rewrite_config(&self, text: &str) {
        let dir = self
            .config_dir
            .as_ref()
            .expect("server started without .config(...)");
        std::fs::write(dir.path().join("forkecho.toml"), text).unwrap();
    }

    // -- Clients --

    /// Connects to the first listener (see [`connect`]).
    pub fn connect(&self) -> TcpStream {
        connect(self.addr())
    }

    /// Connects and reads the default banner.
    pub fn connect_greeted(&self) -> TcpStream {
        let mut s = self.connect();
        expect_banner(&mut s);
        s
    }

    // -- The log --

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines()
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Waits until `done(lines)` holds, or panics (printing the log) after `timeout`.
    pub fn wait_for_log(&self, what: &str, timeout: Duration, done: impl FnMut(&[String]) -> bool) {
        if !self.log.wait(timeout, done) {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n--- server log ---\n{}",
                self.log_text()
            );
        }
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_line(&self, needle: &str) -> String {
        let mut found = None;
        self.wait_for_log(&format!("a line with {needle:?}"), WAIT, |lines| {
            found = lines.iter().find(|l| l.contains(needle)).cloned();
            found.is_some()
        });
        found.unwrap()
    }

    /// Waits until at least `n` log lines contain `needle`.
    pub fn wait_for_lines(&self, needle: &str, n: usize) {
        self.wait_for_log(&format!("{n} lines with {needle:?}"), WAIT, |lines| {
            lines.iter().filter(|l| l.contains(needle)).count() >= n
        });
    }

    /// Asserts the log has exactly `n` lines containing `needle`, waiting up to `WAIT` for them
    /// (a line the server wrote before the test saw its effect may still be on its way).
    pub fn assert_line_count(&self, needle: &str, n: usize, what: &str) {
        self.wait_for_lines(needle, n);
        assert_eq!(
            self.count_lines(needle),
            n,
            "{what}: lines with {needle:?}\n--- server log ---\n{}",
            self.log_text()
        );
    }

    /// Number of log lines containing `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Asserts every log line so far is one whole record (see [`assert_whole_lines`]).
    pub fn assert_whole_lines(&self) {
        assert_whole_lines(self.log_lines().iter().map(String::as_str));
    }

    /// The addresses of the `listening on` lines so far.
    fn listening_addresses(&self) -> Vec<SocketAddr> {
        self.log_lines()
            .iter()
            .filter_map(|l| LogLine::parse(l)?.listening_on())
            .collect()
    }

    /// The pid of the child serving the client whose local address is `client`, read from the
    /// parent's `accepted <peer> -> child <pid>` line.
    pub fn child_pid_for(&self, client: SocketAddr) -> Pid {
        let mut pid = None;
        self.wait_for_log(&format!("`accepted {client}`"), WAIT, |lines| {
            pid = lines
                .iter()
                .filter_map(|l| LogLine::parse(l)?.accepted())
                .find_map(|(peer, pid)| (peer == client).then_some(pid));
            pid.is_some()
        });
        pid.unwrap()
    }

    /// Waits for the parent's `accepted <client> [via <proxy>] -> child <pid>` line for
    /// `client` (the address a PROXY header named, if any) and returns the proxy it names and
    /// the child.
    pub fn accepted_via(&self, client: SocketAddr) -> (Option<SocketAddr>, Pid) {
        let mut found = None;
        self.wait_for_log(&format!("`accepted {client}`"), WAIT, |lines| {
            found = lines
                .iter()
                .filter_map(|l| LogLine::parse(l)?.accepted_via())
                .find_map(|(peer, proxy, pid)| (peer == client).then_some((proxy, pid)));
            found.is_some()
        });
        found.unwrap()
    }

    /// Waits for the parent's line about the end of child `pid` and returns it.
    pub fn wait_reaped(&self, pid: Pid) -> ChildEnding {
        let mut ending = None;
        self.wait_for_log(&format!("the end of child {pid}"), WAIT, |lines| {
            ending = lines
                .iter()
                .filter_map(|l| LogLine::parse(l)?.child_ending())
                .find(|e| e.pid == pid);
            ending.is_some()
        });
        ending.unwrap()
    }

    /// [`Server::wait_child_ending`], asserting that the child exited with `code`, described
    /// by the parent's log as `words`.
    pub fn wait_child_exited_with(
        &self,
        client: SocketAddr,
        code: i32,
        words: &str,
    ) -> ChildEnding {
        let e = self.wait_child_ending(client);
        assert_eq!(
            (e.how.as_str(), e.meaning.as_deref()),
            (format!("exited with code {code}").as_str(), Some(words)),
            "{e:?}\n--- log ---\n{}",
            self.log_text()
        );
        e
    }

    /// How the child serving `client` ended, from the line the parent logs once it reaped it.
    pub fn wait_child_ending(&self, client: SocketAddr) -> ChildEnding {
        let pid = self.child_pid_for(client);
        let mut ending = None;
        self.wait_for_log(
            &format!("the end of child {pid} ({client})"),
            WAIT,
            |lines| {
                ending = lines
                    .iter()
                    .filter_map(|l| LogLine::parse(l)?.child_ending())
                    .find(|e| e.pid == pid && e.peer == client);
                ending.is_some()
            },
        );
        ending.unwrap()
    }

    /// Waits for the child serving `client` to end and asserts it exited with `code`.
    pub fn wait_child_exit(&self, client: SocketAddr, code: i32) -> ChildEnding {
        let ending = self.wait_child_ending(client);
        assert_eq!(
            ending.how,
            format!("exited with code {code}"),
            "child {} ({client})",
            ending.pid
        );
        ending
    }

    /// Sends SIGUSR1 and returns the `status:` line it produced (the first one logged after
    /// the signal).
    pub fn status_line(&self) -> String {
        let before = self.count_lines("status:");
        self.signal(Signal::SIGUSR1);
        let mut found = None;
        self.wait_for_log("a `status:` line after SIGUSR1", WAIT, |lines| {
            found = lines
                .iter()
                .filter(|l| l.contains("status:"))
                .nth(before)
                .cloned();
            found.is_some()
        });
        found.unwrap()
    }

    // -- The process --

    /// Live (and zombie) children of the server, from /proc.
    pub fn children(&self) -> Vec<ProcInfo> {
        children_of(self.pid)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid, sig).expect("signal server");
    }

    /// SIGSTOPs the server and waits until it is stopped: what arrives now (clients, signals)
    /// waits until SIGCONT.
    pub fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
        assert!(
            wait_until(WAIT, || process_state(self.pid) == Some('T')),
            "server not stopped after SIGSTOP"
        );
    }

    /// True until the server has exited.
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("server already reaped");
        child.try_wait().unwrap().is_none()
    }

    /// Waits for the server to exit by itself and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server already reaped");
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap_or_else(|| {
            panic!(
                "server did not exit within {timeout:?} (state {:?})\n--- server log ---\n{}",
                process_state(self.pid),
                self.log_text()
            )
        })
    }

    /// Everything the server wrote to its stderr, once it has exited (and closed it).
    fn stderr_after_exit(&self) -> String {
        let Some(buffer) = &self.stderr else {
            return String::new();
        };
        // Bounded: a child the server left running would hold the pipe open.
        buffer.wait(WAIT, |_, closed| closed);
        buffer.lines().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            // Freeze the parent first so it cannot fork while we collect its children (SIGSTOP
            // takes effect asynchronously: wait until /proc shows it stopped, briefly).
            let _ = kill(self.pid, Signal::SIGSTOP);
            wait_until(Duration::from_secs(1), || {
                process_state(self.pid).is_none_or(|s| s == 'T')
            });
            for c in children_of(self.pid) {
                let _ = kill(c.pid, Signal::SIGKILL);
            }
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("--- server log (pid {}) ---\n{}", self.pid, self.log_text());
        }
    }
}

/// Copies the binary to `path`, for a test that runs it as another user (the build tree may be
/// private). The copy is written by `cp`, in a process of its own: written here, its descriptor
/// could be inherited by a child another test thread forks at that moment, and running the
/// copy would then fail with ETXTBSY ("text file busy") until that child execs.
pub fn copy_binary_to(path: &Path) {
    let status = Command::new("cp")
        .arg(BIN)
        .arg(path)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp {BIN} {}: {status}", path.display());
}

/// A copy of the binary in a directory of the test's own, and a pid file beside it: a server
/// to upgrade in place (an upgrade executes the file at the path the server was started
/// from, which a test may replace), and its control commands.
pub struct Deployment {
    pub dir: TempDir,
    pub binary: PathBuf,
    pub pid_file: PathBuf,
}

impl Deployment {
    pub fn new() -> Deployment {
        let dir = TempDir::new();
        let binary = dir.path().join("forkecho");
        copy_binary_to(&binary);
        let pid_file = dir.path().join("forkecho.pid");
        Deployment {
            dir,
            binary,
            pid_file,
        }
    }

    /// A server of this binary with this pid file, logging at info.
    pub fn builder(&self) -> ServerBuilder {
        Server::builder()
            .program(&self.binary)
            .args(["--pid-file", self.pid_file.to_str().unwrap()])
            .env("RUST_LOG", "info")
    }

    pub fn start(&self, extra: &[&str]) -> Server {
        self.builder().args(extra.iter().copied()).start()
    }

    /// Runs a control command with this binary, for the server of this pid file.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .args(["--pid-file", self.pid_file.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn upgrade(&self) -> Output {
        self.command(&["upgrade"])
    }

    /// The control socket a server of this pid file makes: `forkecho.ctl` beside it.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("forkecho.ctl")
    }

    /// Puts a wrapper at the binary's path that runs `takeover` (a shell fragment; `{good}`
    /// names the real binary, moved aside) when an upgrade executes it, and the real binary
    /// otherwise (the check before it). Returns the real binary's new path.
    pub fn wrap_for_takeover(&self, takeover: &str) -> PathBuf {
        self.wrap(
            "if [ -n \"$FORKECHO_UPGRADE_STATE\" ]; then {takeover}; fi",
            takeover,
        )
    }

    /// A wrapper at the binary's path whose check before an upgrade hangs (sleeps 300 s); the
    /// real binary otherwise. Returns the real binary's new path.
    pub fn wrap_with_a_hanging_check(&self) -> PathBuf {
        self.wrap("case \"$*\" in *--check-config*) exec sleep 300;; esac", "")
    }

    /// Moves the real binary aside and puts a shell script at its path: `first` (where
    /// `{takeover}` stands for `takeover`, and `{good}` in either for the real binary), then
    /// the real binary with the same arguments.
    fn wrap(&self, first: &str, takeover: &str) -> PathBuf {
        let good = self.dir.path().join("forkecho.good");
        std::fs::rename(&self.binary, &good).unwrap();
        let first = first
            .replace("{takeover}", takeover)
            .replace("{good}", &good.display().to_string());
        let wrapper = format!("#!/bin/sh\n{first}\nexec {} \"$@\"\n", good.display());
        std::fs::write(&self.binary, wrapper).unwrap();
        std::fs::set_permissions(
            &self.binary,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        good
    }

    /// What the pid file holds, trimmed.
    pub fn pid_in_file(&self) -> String {
        std::fs::read_to_string(&self.pid_file)
            .unwrap()
            .trim()
            .to_string()
    }
}

/// A directory holding a config file whose pid file (and so the control socket, `.ctl`
/// beside it) is relative to the file's directory, as a packaged deployment has it.
pub struct ConfigDeployment {
    pub dir: TempDir,
    pub config: PathBuf,
}

impl ConfigDeployment {
    /// A config with `listen` on a free loopback port, `pid_file = "forkecho.pid"`, and
    /// `extra` keys.
    pub fn new(extra: &str) -> Self {
        let dir = TempDir::new();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let config = dir.path().join("forkecho.toml");
        let deployment = ConfigDeployment { dir, config };
        deployment.write_config(extra);
        deployment
    }

    /// Rewrites the config file: the same `listen` and `pid_file`, and `extra` keys.
    pub fn write_config(&self, extra: &str) {
        let text = format!("listen = [\"127.0.0.1:0\"]\npid_file = \"forkecho.pid\"\n{extra}\n");
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("forkecho.pid")
    }

    /// Where the server binds its control socket: beside the pid file, `.ctl`.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("forkecho.ctl")
    }

    pub fn config_arg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    /// Starts a server with `-c` this config and waits until it listens.
    pub fn start(&self) -> Server {
        self.builder().start()
    }

    pub fn builder(&self) -> ServerBuilder {
        Server::builder().args(["-c", self.config_arg()])
    }

    /// Runs `forkecho -c <config> <command...>` to completion.
    pub fn ctl(&self, command: &[&str]) -> Output {
        let mut args = vec!["-c", self.config_arg()];
        args.extend_from_slice(command);
        run(&args)
    }

    /// Runs `forkecho -c <config> <command...>` in a thread, for a command that waits (stop).
    pub fn ctl_in_background(&self, command: &[&str]) -> thread::JoinHandle<Output> {
        let mut args = vec!["-c".to_string(), self.config_arg().to_string()];
        args.extend(command.iter().map(|s| s.to_string()));
        thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args)
        })
    }
}

/// Asserts that an `upgrade` command succeeded and said so.
pub fn assert_upgraded(out: &Output) {
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("upgraded from"),
        "upgrade: {out:?}"
    );
}

/// SIGKILLs one process by pid when dropped: for a process no `Server` guards (an orphaned
/// child, a daemon that detached, a helper).
pub struct KillOnDrop(pub Pid);

impl KillOnDrop {
    /// Guards the daemon whose pid is in the pid file at `path`, which `--daemonize` writes
    /// before the starting command returns.
    pub fn daemon_in(path: &Path) -> Self {
        let pid: i32 = std::fs::read_to_string(path)
            .expect("pid file written before the command returned")
            .trim()
            .parse()
            .unwrap();
        KillOnDrop(Pid::from_raw(pid))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
    }
}

/// Asserts no child of the server is left (live or zombie), waiting up to `WAIT` for the
/// reaper, and returns how long that took.
pub fn assert_no_children(server: &Server, what: &str) -> Duration {
    let start = Instant::now();
    let empty = wait_until(WAIT, || server.children().is_empty());
    assert!(
        empty,
        "{what}: children left: {:?}\n--- server log ---\n{}",
        server.children(),
        server.log_text()
    );
    start.elapsed()
}

// ---- Clients ----

/// Connects to `addr` with read/write timeouts of `WAIT`, so a broken server fails the test
/// instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    open_client(addr, None, None)
}

/// Connects from the loopback address `source` (e.g. "127.0.0.2"), bound before connecting.
pub fn connect_from(addr: SocketAddr, source: &str) -> TcpStream {
    open_client(addr, Some(source), None)
}

/// Connects from `source` and reads the default banner.
pub fn connect_greeted_from(addr: SocketAddr, source: &str) -> TcpStream {
    let mut s = connect_from(addr, source);
    expect_banner(&mut s);
    s
}

/// Connects with a receive buffer of `recv_buffer` bytes, set before the handshake so the
/// window is small from the start: the kernel cannot absorb a large echo for a client that
/// does not read.
pub fn connect_with_recv_buffer(addr: SocketAddr, recv_buffer: usize) -> TcpStream {
    open_client(addr, None, Some(recv_buffer))
}

fn open_client(addr: SocketAddr, source: Option<&str>, recv_buffer: Option<usize>) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    if let Some(source) = source {
        let local: SocketAddr = format!("{source}:0").parse().expect("source address");
        socket
            .bind(&local.into())
            .unwrap_or_else(|e| panic!("bind {local}: {e}"));
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    socket
        .connect_timeout(&addr.into(), WAIT)
        .unwrap_or_else(|e| panic!("connect {addr} from {source:?}: {e}"));
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

pub fn expect_banner(s: &mut TcpStream) {
    assert_eq!(read_exactly(s, BANNER.len()), BANNER, "banner");
}

/// Sends `data` and reads back exactly as many bytes.
pub fn echo_roundtrip(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    read_exactly(s, data.len())
}

/// Asserts that a new client is greeted and gets `data` echoed.
pub fn assert_serves(server: &Server, data: &[u8]) {
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, data), data, "echo from a new client");
}

/// Reads exactly `n` bytes.
pub fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// Sends `data`, half-closes, and returns everything the server sends until EOF.
pub fn send_and_drain(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    read_to_eof(s)
}

/// Reads until EOF.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read to EOF");
    out
}

/// Writes 64 KiB chunks of `byte` to `s` from a thread, as a client that never reads would,
/// until no write has been accepted for 5 s or one fails (the connection ended); the thread
/// returns when its last write was accepted. `s` gets a 100 ms write timeout.
pub fn write_until_refused(s: &TcpStream, byte: u8) -> thread::JoinHandle<Instant> {
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    thread::spawn(move || {
        let chunk = vec![byte; 64 * 1024];
        let mut last_accepted = Instant::now();
        while Instant::now() < last_accepted + Duration::from_secs(5) {
            match w.write(&chunk) {
                Ok(_) => last_accepted = Instant::now(),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        last_accepted
    })
}

/// Asserts the server closed this connection: the next read gives EOF or a reset, no data.
/// A read interrupted (EINTR: with a receive timeout set, a stop and continue of this
/// process is enough) is made again.
pub fn assert_closed_by_server(s: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => panic!("{what}: got {n} unexpected bytes {:?}", &buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("{what}: expected EOF or reset, got {e}"),
        }
    }
}

/// A port nobody listens on right now (bound then released; fine for a test on loopback).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Raises this test process's soft RLIMIT_NOFILE to at least `n` (up to the hard limit), for
/// tests that hold many client sockets at once.
pub fn raise_own_nofile(n: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= n,
        "RLIMIT_NOFILE hard limit {hard} is below the {n} descriptors this test needs"
    );
    if soft < n {
        setrlimit(Resource::RLIMIT_NOFILE, n, hard).expect("raise RLIMIT_NOFILE");
    }
}

// ---- /proc ----
//
// What the bench reads too lives in `support/procfs` (the `forkecho-procfs` dev-dependency):
// processes, their states and parents, status fields, memory.

pub use forkecho_procfs::{
    all_pids, children_of, process_exists, process_state, stat_field, status_field, ProcInfo,
};

/// The whole numbers of a status field (`Uid` → real, effective, saved, filesystem uid).
pub fn status_numbers(pid: Pid, field: &str) -> Vec<u64> {
    let value = status_field(pid, field).unwrap_or_else(|| panic!("no {field} for {pid}"));
    value
        .split_whitespace()
        .map(|n| {
            n.parse()
                .unwrap_or_else(|e| panic!("{field} {value:?}: {e}"))
        })
        .collect()
}

/// A signal mask (`SigBlk`, `SigCgt`, `SigIgn`) from /proc/<pid>/status: bit n-1 is signal n.
pub fn signal_mask(pid: Pid, field: &str) -> u64 {
    let hex = status_field(pid, field).unwrap_or_else(|| panic!("no {field} for {pid}"));
    u64::from_str_radix(&hex, 16).unwrap_or_else(|e| panic!("{field} {hex:?}: {e}"))
}

/// Resident set size of a process in KiB (`VmRSS`); the process must exist.
pub fn rss_kib(pid: Pid) -> u64 {
    forkecho_procfs::rss_kib(pid).unwrap_or_else(|| panic!("no VmRSS for {pid}"))
}

/// True when running as root; otherwise says that the test is skipped and why (`what`).
pub fn is_root_or_skip(what: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping: {what} (needs root)");
    }
    root
}

/// The TCP ports `pid` listens on (IPv4 and IPv6): its sockets (from /proc/<pid>/fd) that
/// /proc/net/tcp{,6} shows in state LISTEN.
pub fn listening_ports_of(pid: Pid) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            // sl local_address rem_address st ... inode: state 0A is LISTEN.
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state == "0A" && inodes.iter().any(|i| i == inode) {
                let port = local.rsplit(':').next().unwrap_or("");
                ports.extend(u16::from_str_radix(port, 16));
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// The descriptor numbers a process holds, sorted, from /proc/<pid>/fd.
pub fn fds_of(pid: Pid) -> Vec<u64> {
    let mut fds: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// User + system CPU time of a process, in clock ticks (fields 14 and 15 of its stat).
pub fn cpu_ticks_of(pid: Pid) -> u64 {
    let field = |n| {
        stat_field(pid, n)
            .unwrap_or_else(|| panic!("process {pid} is gone"))
            .parse::<u64>()
            .unwrap()
    };
    field(14) + field(15)
}

/// Clock ticks per second, the unit of `cpu_ticks_of`.
pub fn ticks_per_second() -> u64 {
    // Safe: sysconf only reads a constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

/// Sets the soft RLIMIT_NOFILE of another process (what `prlimit --pid PID --nofile=N:` does;
/// lowering or restoring the soft limit needs no privilege), returning the previous
/// (soft, hard) pair.
pub fn set_soft_nofile_of(pid: Pid, soft: u64) -> (u64, u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safe: prlimit writes the old limit into `old` and reads nothing else.
    let rc = unsafe {
        libc::prlimit(
            pid.as_raw(),
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit read: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // Safe: prlimit reads `new` and writes nothing.
    let rc = unsafe {
        libc::prlimit(
            pid.as_raw(),
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit set: {}", std::io::Error::last_os_error());
    (old.rlim_cur, old.rlim_max)
}

/// A uid that no process uses now, so RLIMIT_NPROC counts only the server under test (a shared
/// user such as `nobody` may have other processes, which come and go: another test drops
/// root to `nobody`). Varies with our pid so that two suites running at once pick different
/// ones.
pub fn unused_uid() -> u32 {
    let start = 40_000 + std::process::id() % 20_000;
    (start..start + 1000)
        .find(|&uid| tasks_of_uid(uid) == 0)
        .expect("a free uid")
}

/// Tasks (threads count too, as RLIMIT_NPROC counts them) whose real uid is `uid`.
fn tasks_of_uid(uid: u32) -> u64 {
    let first_number = |pid, field| {
        status_field(pid, field)?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    };
    all_pids()
        .filter(|&pid| first_number(pid, "Uid") == Some(uid as u64))
        .map(|pid| first_number(pid, "Threads").unwrap_or(1))
        .sum()
}

// ---- The binary run to completion ----

/// Runs the binary to completion with stdin on /dev/null (for config and startup-error tests).
pub fn run(args: &[&str]) -> Output {
    run_with_stdin(args, None)
}

/// Runs the binary to completion, with `input` on a pipe as its stdin if given. A binary that
/// does not exit (one that unexpectedly starts serving) is killed after `WAIT`.
pub fn run_with_stdin(args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(input.map_or_else(Stdio::null, |_| Stdio::piped()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn forkecho");
    if let Some(input) = input {
        // Small enough for the pipe's buffer: written at once. A forkecho that refuses the
        // pipe may have exited already (EPIPE): that is no error here.
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    }
    let finished = wait_until(WAIT, || child.try_wait().unwrap().is_some());
    if !finished {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    assert!(finished, "forkecho {args:?} did not exit: {out:?}");
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the process exited with `code` and returns its stderr.
pub fn expect_exit(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status\n--- stdout ---\n{}\n--- stderr ---\n{}",
        stdout(out),
        stderr(out)
    );
    stderr(out)
}

// ---- The rest ----

/// Polls `cond` every few milliseconds until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Prints a figure a test measured, tagged with the test's name; shown with `--nocapture`
/// (and with the output of a failed test).
pub fn report(what: &str) {
    let current = thread::current();
    eprintln!("[{}] {what}", current.name().unwrap_or("test"));
}

/// A deterministic stream of pseudo-random bytes (xorshift64*), so a reader can check what a
/// writer sent without keeping a copy. The stream does not depend on how it is cut into buffers.
pub struct Noise {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Noise {
    pub fn new(seed: u64) -> Self {
        Noise {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }

    /// The next 8 bytes of the stream as a number.
    pub fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b)
    }

    /// A number in `0..n` (n > 0); the tiny modulo bias does not matter for tests.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "forkecho-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- A session's program (exec mode) ----

/// A server that runs `program` per connection: `options` go before the `--`, and it listens
/// on 127.0.0.1 port 0 unless `options` says where (the harness's own default would land
/// after the program, as its arguments).
pub fn exec_server(options: &[&str], program: &[&str]) -> ServerBuilder {
    let decides_listen = |a: &&str| matches!(*a, "-l" | "--listen" | "-c" | "--config");
    let mut args: Vec<&str> = options.to_vec();
    if !options.iter().any(decides_listen) {
        args.extend(["-l", "127.0.0.1:0"]);
    }
    args.push("--");
    args.extend(program);
    Server::builder().args(args)
}

/// The live processes of process group `pgid`: a session's program and whatever it started
/// (zombies left out: they hold no descriptor and run nothing, and an orphan's zombie waits
/// for whatever reaps orphans here).
pub fn processes_in_group(pgid: Pid) -> Vec<Pid> {
    let pgid = pgid.to_string();
    all_pids()
        .filter(|&pid| stat_field(pid, 5).as_deref() == Some(pgid.as_str()))
        .filter(|&pid| process_state(pid).is_some_and(|s| s != 'Z'))
        .collect()
}

/// Where each descriptor of `pid` points, by number; a descriptor closed between the listing
/// and its readlink is left out (the process runs on while it is read).
pub fn fd_targets(pid: Pid) -> Vec<(u64, String)> {
    fds_of(pid)
        .into_iter()
        .filter_map(|fd| {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect()
}

/// Where descriptor `fd` of process `pid` points (`socket:[123]`, `pipe:[45]`, `/dev/null`).
pub fn fd_target(pid: Pid, fd: u64) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("readlink fd {fd} of {pid}: {e}"))
        .display()
        .to_string()
}

/// The forks a [`ForkHold`] held: how many were lean starts (clone3, or clone with SIGCHLD
/// alone) and how many plain forks (glibc's fork: clone with CLONE_CHILD_SETTID |
/// CLONE_CHILD_CLEARTID too), and the children, in order.
pub struct HeldForks {
    pub lean: usize,
    pub plain: usize,
    pub children: Vec<i32>,
}

/// A tracer (ptrace) that holds each child the server forks in its first stop, before it has
/// run one instruction (so before a lean child takes its slot), until `n` exist; then lets the
/// server and every child go. One thread makes every ptrace call and wait: the tracer is a
/// thread, not the process. Ending that thread early lets every tracee go.
pub struct ForkHold {
    tracer: thread::JoinHandle<Result<HeldForks, String>>,
}

impl ForkHold {
    /// Attaches to `server` and returns once it is traced (or the attach failed: `join`
    /// says so).
    pub fn start(server: Pid, n: usize) -> ForkHold {
        let pid = server.as_raw();
        let attached = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tracer_attached = attached.clone();
        let tracer = thread::spawn(move || {
            let result = Self::hold(pid, n, &tracer_attached);
            tracer_attached.store(true, std::sync::atomic::Ordering::SeqCst);
            result
        });
        assert!(wait_until(WAIT, || attached.load(std::sync::atomic::Ordering::SeqCst)));
        ForkHold { tracer }
    }

    /// Waits until `n` children are held and let go, and says what they were.
    pub fn join(self) -> Result<HeldForks, String> {
        self.tracer.join().unwrap()
    }

    fn hold(
        pid: i32,
        n: usize,
        attached: &std::sync::atomic::AtomicBool,
    ) -> Result<HeldForks, String> {
        // Safe throughout: ptrace and waitpid on the server and the children it forks.
        unsafe {
            let options = libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_TRACEVFORK;
            if libc::ptrace(libc::PTRACE_SEIZE, pid, 0, options as libc::c_long) != 0 {
                return Err(format!("PTRACE_SEIZE: {}", std::io::Error::last_os_error()));
            }
            attached.store(true, std::sync::atomic::Ordering::SeqCst);
            let mut held = HeldForks {
                lean: 0,
                plain: 0,
                children: Vec::new(),
            };
            let until = Instant::now() + Duration::from_secs(120);
            while held.children.len() < n {
                if Instant::now() > until {
                    return Err(format!("only {} forks in time", held.children.len()));
                }
                let mut status = 0;
                let got = libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG);
                if got == 0 {
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                if got != pid || !libc::WIFSTOPPED(status) {
                    return Err(format!("server: waitpid {got}, status {status:#x}"));
                }
                let event = status >> 16;
                if event == libc::PTRACE_EVENT_FORK || event == libc::PTRACE_EVENT_VFORK {
                    let mut regs: libc::user_regs_struct = std::mem::zeroed();
                    libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs);
                    let clone3 = regs.orig_rax == libc::SYS_clone3 as u64;
                    if clone3 || regs.rdi == libc::SIGCHLD as u64 {
                        held.lean += 1;
                    } else {
                        held.plain += 1;
                    }
                    let mut child: libc::c_ulong = 0;
                    libc::ptrace(libc::PTRACE_GETEVENTMSG, pid, 0, &mut child);
                    let child = child as i32;
                    let mut child_status = 0;
                    libc::waitpid(child, &mut child_status, libc::__WALL);
                    held.children.push(child);
                    if held.children.len() < n {
                        libc::ptrace(libc::PTRACE_CONT, pid, 0, 0);
                    }
                } else if event != 0 {
                    libc::ptrace(libc::PTRACE_CONT, pid, 0, 0);
                } else {
                    // A signal on its way to the server: deliver it.
                    let signal = libc::WSTOPSIG(status);
                    libc::ptrace(libc::PTRACE_CONT, pid, 0, signal as libc::c_long);
                }
            }
            // The server is in its last fork's stop: let go of it, then of the children.
            libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
            for &child in &held.children {
                libc::ptrace(libc::PTRACE_DETACH, child, 0, 0);
            }
            Ok(held)
        }
    }
}

/// A pidfd for process `pid` (pidfd_open(2)): it names that process and no other, even once
/// its pid is reused.
pub fn pidfd_open(pid: Pid) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // Safe: a plain system call; the descriptor returned is owned by exactly one OwnedFd.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::os::fd::OwnedFd::from_raw_fd(pidfd as i32))
    }
}

/// A duplicate of descriptor `fd` of process `pid` (pidfd_getfd(2): the test is an ancestor
/// of the server and its children, which ptrace rules allow), or the kernel's refusal.
pub fn descriptor_of(pid: Pid, fd: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let pidfd = pidfd_open(pid)?;
    // Safe: a plain system call; the descriptor returned is owned by exactly one OwnedFd.
    unsafe {
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(copy as i32))
    }
}

/// Sends `signal` to one process every `every`, from a thread, until dropped (for at most
/// 30 s). Through a pidfd opened at the start: once that process is gone the storm ends, and
/// a process that later gets its pid (another test's, or a thread of this one) is never hit.
pub struct SignalStorm {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl SignalStorm {
    pub fn start(pid: Pid, signal: Signal, every: Duration) -> SignalStorm {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering;
        let pidfd = pidfd_open(pid).unwrap_or_else(|e| panic!("pidfd_open {pid}: {e}"));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handle = {
            let (stop, sent) = (stop.clone(), sent.clone());
            thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    // Safe: a signal through a pidfd this thread owns.
                    let r = unsafe {
                        libc::syscall(
                            libc::SYS_pidfd_send_signal,
                            pidfd.as_raw_fd(),
                            signal as libc::c_int,
                            std::ptr::null::<libc::siginfo_t>(),
                            0,
                        )
                    };
                    if r != 0 {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(every);
                }
            })
        };
        SignalStorm {
            stop,
            sent,
            handle: Some(handle),
        }
    }

    /// The signals sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SignalStorm {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A duplicate of the first socket process `pid` holds (a session's child holds one), or
/// None if it holds none or the kernel refuses. The duplicate keeps the connection open after
/// the child exits: drop it before waiting for the client's EOF.
pub fn socket_of(pid: Pid) -> Option<std::os::fd::OwnedFd> {
    let fd = fd_targets(pid)
        .into_iter()
        .find(|(_, target)| target.starts_with("socket:"))?
        .0;
    descriptor_of(pid, fd as i32).ok()
}

/// An integer socket option of `fd` (getsockopt), e.g. TCP_NODELAY.
pub fn int_option(fd: &std::os::fd::OwnedFd, level: i32, name: i32) -> i32 {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // Safe: an int option into an int.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt: {}", std::io::Error::last_os_error());
    value
}

/// The descriptor target (`socket:[<inode>]`) of the TCP socket whose own end is `local` and
/// whose peer is `remote`, from /proc/net/tcp (or tcp6): which process holds which end of a
/// connection.
pub fn tcp_socket_target(local: SocketAddr, remote: SocketAddr) -> Option<String> {
    let (table, local, remote) = (
        if local.is_ipv4() {
            "/proc/net/tcp"
        } else {
            "/proc/net/tcp6"
        },
        proc_net_address(local),
        proc_net_address(remote),
    );
    let text = std::fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let matches = fields.get(1)?.eq_ignore_ascii_case(&local)
            && fields.get(2)?.eq_ignore_ascii_case(&remote);
        matches.then(|| format!("socket:[{}]", fields.get(9).unwrap_or(&"?")))
    })
}

/// An address as /proc/net/tcp{,6} prints it: each 32-bit word of the address in host byte
/// order as 8 hex digits, then `:` and the port as 4.
fn proc_net_address(addr: SocketAddr) -> String {
    let octets = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let words: String = octets
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    format!("{words}:{:04X}", addr.port())
}

// ---- PROXY protocol ----

impl LogLine<'_> {
    /// `accepted <peer> [via <proxy>] -> child <pid> (...)` → (peer, proxy, pid): on a PROXY
    /// listener the peer is the real client the header named, and the proxy the socket's peer.
    pub fn accepted_via(&self) -> Option<(SocketAddr, Option<SocketAddr>, Pid)> {
        let rest = self.message.strip_prefix("accepted ")?;
        let (who, rest) = rest.split_once(" -> child ")?;
        let pid = rest.split_whitespace().next()?.parse().ok()?;
        let (peer, proxy) = match who.split_once(" via ") {
            Some((peer, proxy)) => (peer, Some(proxy.parse().ok()?)),
            None => (who, None),
        };
        Some((peer.parse().ok()?, proxy, Pid::from_raw(pid)))
    }
}

/// Runs `test` on `cases` values of `strategy`; a failure panics with proptest's minimal
/// failing input. No regression files are written into the tree (each case usually starts or
/// talks to a process: few cases, short shrinking).
pub fn fuzz<S: proptest::strategy::Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value)) {
    let config = proptest::test_runner::Config {
        cases,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, |value| {
        test(value);
        Ok(())
    }) {
        panic!("{e}");
    }
}

/// Sets `signals` to SIG_IGN in this process with the raw system call, as a launcher may leave
/// them: glibc reserves 32 and 33 and its `sigaction` refuses them. Async-signal-safe, for
/// `pre_exec`. Where the kernel's `struct sigaction` is laid out otherwise, it does nothing.
pub fn ignore_signals_raw(signals: &[i32]) -> std::io::Result<()> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        /// The kernel's `struct sigaction` on these architectures.
        #[repr(C)]
        struct KernelSigaction {
            handler: usize,
            flags: u64,
            restorer: usize,
            mask: u64,
        }
        let ignore = KernelSigaction {
            handler: libc::SIG_IGN,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for &sig in signals {
            // Safe: the kernel reads `ignore` and writes nothing (no old action asked for).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &ignore,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = signals;
    Ok(())
}

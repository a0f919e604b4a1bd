//! Shared helpers for the integration tests: start the real `forkecho` binary, wait for it by
//! reading its log (never a fixed sleep), talk to it over loopback, and clean up every process
//! it started by pid, even when a test fails.

#![allow(dead_code)] // each test module uses a different subset

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
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

/// The server's stderr, collected line by line by a reader thread in the test process.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A running `forkecho`. Dropping it kills the server and every child it forked, by pid.
pub struct Server {
    child: Option<Child>,
    pid: Pid,
    log: Arc<Log>,
    pub addrs: Vec<SocketAddr>,
    _dir: Option<TempDir>,
}

/// A change to the server's `Command` before it is spawned (user, limits, ...).
type CommandTweak = Box<dyn FnOnce(&mut Command)>;

/// Builds the command line of a server under test.
pub struct ServerBuilder {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    config: Option<String>,
    listeners: usize,
    program: Option<PathBuf>,
    tweak: Option<CommandTweak>,
}

impl ServerBuilder {
    /// Runs this binary instead of `BIN` (e.g. a copy another user may execute).
    pub fn program(mut self, path: PathBuf) -> Self {
        self.program = Some(path);
        self
    }

    /// Adjusts the command before it is spawned (user, limits, ...).
    pub fn tweak(mut self, f: impl FnOnce(&mut Command) + 'static) -> Self {
        self.tweak = Some(Box::new(f));
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

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
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

    /// Starts the server and waits until every listener is bound. When no `-l`/`--listen`
    /// and no config is given, listens on 127.0.0.1 port 0 so tests never collide.
    pub fn start(self) -> Server {
        let mut args = self.args.clone();
        let mut dir = None;
        if let Some(text) = &self.config {
            let d = TempDir::new();
            let path = d.path().join("forkecho.toml");
            std::fs::write(&path, text).unwrap();
            args.insert(0, path.display().to_string());
            args.insert(0, "-c".into());
            dir = Some(d);
        }
        let has_listen = args.iter().any(|a| a == "-l" || a.starts_with("--listen"))
            || self.config.as_deref().is_some_and(|c| c.contains("listen"));
        if !has_listen {
            args.push("-l".into());
            args.push("127.0.0.1:0".into());
        }
        let mut cmd = Command::new(self.program.as_deref().unwrap_or(BIN.as_ref()));
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !self.envs.iter().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "debug");
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(tweak) = self.tweak {
            tweak(&mut cmd);
        }
        let mut child = cmd.spawn().expect("spawn forkecho");
        let pid = Pid::from_raw(child.id() as i32);
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
            }
        });
        let mut server = Server {
            child: Some(child),
            pid,
            log,
            addrs: Vec::new(),
            _dir: dir,
        };
        let want = self.listeners;
        server.wait_for_log(&format!("{want} `listening on` lines"), WAIT, |lines| {
            lines.iter().filter(|l| l.contains("listening on ")).count() >= want
        });
        server.addrs = server
            .log_lines()
            .iter()
            .filter_map(|l| l.split("listening on ").nth(1))
            .map(|a| a.trim().parse().expect("address after `listening on`"))
            .collect();
        server
    }
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            args: Vec::new(),
            envs: Vec::new(),
            config: None,
            listeners: 1,
            program: None,
            tweak: None,
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

    /// Replaces the text of the config file the server was started with (see `config`), for
    /// a reload test.
    pub fn rewrite_config(&self, text: &str) {
        let dir = self
            ._dir
            .as_ref()
            .expect("server started without .config(...)");
        std::fs::write(dir.path().join("forkecho.toml"), text).unwrap();
    }

    /// Connects to the first listener, with read/write timeouts so a broken server fails the
    /// test instead of hanging it.
    pub fn connect(&self) -> TcpStream {
        connect(self.addr())
    }

    /// Connects and reads the default banner.
    pub fn connect_greeted(&self) -> TcpStream {
        let mut s = self.connect();
        expect_banner(&mut s);
        s
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Waits until `done(lines)` holds, or panics (printing the log) after `timeout`.
    pub fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[String]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if done(&lines) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n--- server log ---\n{}",
                    self.log_text()
                );
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
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

    /// Asserts every log line is one whole record, `<time> <LEVEL> forkecho[<pid>] <message>`:
    /// lines written by different processes at once were not cut into or mixed.
    pub fn assert_whole_lines(&self) {
        for line in self.log_lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let whole = fields.len() >= 4
                && fields[0].ends_with('Z')
                && ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&fields[1])
                && fields[2]
                    .strip_prefix("forkecho[")
                    .and_then(|r| r.strip_suffix(']'))
                    .is_some_and(|pid| pid.parse::<u32>().is_ok());
            assert!(whole, "log line is not one whole record: {line:?}");
        }
    }

    /// Number of log lines containing `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The pid of the child serving the client whose local address is `client`, read from the
    /// parent's `accepted <peer> -> child <pid>` line.
    pub fn child_pid_for(&self, client: SocketAddr) -> Pid {
        let needle = format!("accepted {client} -> child ");
        let line = self.wait_for_line(&needle);
        let rest = line.split(&needle).nth(1).unwrap();
        let pid = rest.split_whitespace().next().unwrap();
        Pid::from_raw(pid.parse().expect("child pid"))
    }

    /// Live (and zombie) children of the server, from /proc.
    pub fn children(&self) -> Vec<ProcInfo> {
        children_of(self.pid)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid, sig).expect("signal server");
    }

    /// Waits for the server to exit by itself and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("server already reaped");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "server did not exit within {timeout:?}\n--- server log ---\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
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

/// SIGKILLs one process by pid when dropped: for a process no `Server` guards (an orphaned
/// child, a daemon that detached).
pub struct KillOnDrop(pub Pid);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
    }
}

/// One process as seen in /proc/<pid>/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: Pid,
    pub state: char,
}

/// Every process whose parent is `parent`, with its state (`Z` = zombie).
pub fn children_of(parent: Pid) -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parent = parent.to_string();
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|&pid| stat_field(pid, 4).as_deref() == Some(parent.as_str()))
        .filter_map(|pid| {
            Some(ProcInfo {
                pid,
                state: process_state(pid)?,
            })
        })
        .collect()
}

/// Field `n` (1-based, as numbered in proc(5)) of /proc/<pid>/stat, or None if the process is
/// gone. Fields 1 and 2 are the pid and "(comm)"; the command name may contain spaces and
/// parentheses, so the rest is read after the last ')'.
pub fn stat_field(pid: Pid, n: usize) -> Option<String> {
    assert!(n >= 3, "fields 1 and 2 are not split out");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(n - 3).map(str::to_string)
}

/// The state letter of a process (`R`, `S`, `T`, `Z`, ...), or None if it does not exist.
pub fn process_state(pid: Pid) -> Option<char> {
    stat_field(pid, 3)?.chars().next()
}

/// True if a process with this pid exists (zombies included).
pub fn process_exists(pid: Pid) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

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

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

pub fn expect_banner(s: &mut TcpStream) {
    let mut got = vec![0; BANNER.len()];
    s.read_exact(&mut got).expect("read banner");
    assert_eq!(got, BANNER, "banner");
}

/// Sends `data` and reads back exactly as many bytes.
pub fn echo_roundtrip(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back).expect("read echo");
    back
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
    s.shutdown(std::net::Shutdown::Write).unwrap();
    read_to_eof(s)
}

/// Reads until EOF.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read to EOF");
    out
}

/// Runs the binary to completion (for config and startup-error tests).
pub fn run(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn forkecho");
    let pid = Pid::from_raw(child.id() as i32);
    // Guard: a server that unexpectedly starts serving is killed after WAIT.
    let finished = wait_until(WAIT, || child.try_wait().unwrap().is_some());
    if !finished {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    assert!(finished, "forkecho {args:?} did not exit: {out:?}");
    out
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

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- Helpers for the fault-injection suite (tests/faults.rs); usable by any module. ----

impl Server {
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
}

/// The number in `line` right before ` <word>` (e.g. `status: 0 active` → `active` → 0), as a
/// whole number, not the tail of a longer one.
pub fn count_before(line: &str, word: &str) -> Option<u64> {
    let at = line.find(&format!(" {word}"))?;
    let digits: String = line[..at]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.chars().rev().collect::<String>().parse().ok()
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

/// A field of /proc/<pid>/status (e.g. `VmRSS`), without the name, trimmed; None if the
/// process or the field does not exist.
pub fn status_field(pid: Pid, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// Resident set size of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: Pid) -> u64 {
    let value = status_field(pid, "VmRSS").unwrap_or_else(|| panic!("no VmRSS for {pid}"));
    value
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("VmRSS {value:?}: {e}"))
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
pub fn tasks_of_uid(uid: u32) -> u64 {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        };
        if field("Uid:") == Some(uid as u64) {
            n += field("Threads:").unwrap_or(1);
        }
    }
    n
}

/// Connects to `addr` with a receive buffer of `recv_buffer` bytes, set before the handshake
/// so the window is small from the start: the kernel cannot absorb a large echo for a client
/// that does not read.
pub fn connect_with_recv_buffer(addr: SocketAddr, recv_buffer: usize) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
    socket.connect_timeout(&addr.into(), WAIT).expect("connect");
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

impl Noise {
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

/// Asserts the server closed this connection: the next read gives EOF or a reset, no data.
pub fn assert_closed_by_server(s: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: got {n} unexpected bytes {:?}", &buf[..n]),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected EOF or reset, got {e}"),
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

//! The log when its reader stops reading: the server's stderr is a pipe (or the journal's kind
//! of stream socket) that this test holds and, for a while, does not read. The parent must
//! keep serving, reaping and obeying signals, drop what it cannot write, and say how much it
//! dropped once the reader is back.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;

use crate::util::*;

/// Short clients that fill the socket log while nobody reads it: two parent lines each
/// (accepted, exited), about 220 bytes, against 8 KiB of socket buffer.
const FILL: usize = 60;
/// Most clients a pipe log may take to fill: the server grows its pipe to at most 1 MiB
/// (`fs.pipe-max-size` permitting), about 4,800 clients' lines.
const MAX_FILL: usize = 12_000;

/// How long a stalled server may take to exit after SIGTERM.
const EXIT_BOUND: Duration = Duration::from_secs(5);

/// What the server's stderr is.
#[derive(Clone, Copy, PartialEq)]
enum LogKind {
    Pipe,
    Socket,
}

/// A `forkecho` whose stderr is `log`, a pipe or socket end only this test reads.
struct StalledLog {
    server: Server,
    log: File,
    addr: SocketAddr,
    /// Everything read from the log so far.
    text: String,
    /// Short clients served so far (two parent lines each).
    clients: usize,
}

impl StalledLog {
    /// Starts the server at `log_level` info (children log nothing on a clean end) and reads
    /// its log up to the `listening on` line; from then on the log is not read.
    fn start(kind: LogKind) -> Self {
        Self::start_with(kind, Server::builder())
    }

    /// [`StalledLog::start`] of what `builder` says (another program, another uid).
    fn start_with(kind: LogKind, builder: ServerBuilder) -> Self {
        Self::start_at(kind, builder, "info")
    }

    /// [`StalledLog::start_with`] at `level`.
    fn start_at(kind: LogKind, builder: ServerBuilder, level: &str) -> Self {
        let (ours, theirs) = log_channel(kind);
        let server = builder
            .args(["-l", "127.0.0.1:0", "--log-level", level])
            .env_remove("RUST_LOG")
            .stderr(theirs)
            .spawn();
        let mut stalled = StalledLog {
            server,
            log: File::from(ours),
            addr: "127.0.0.1:0".parse().unwrap(),
            text: String::new(),
            clients: 0,
        };
        let addr = loop {
            // Only lines whose newline is in: a line still on its way may hold half an address.
            let whole = stalled.text.rfind('\n').map_or(0, |end| end + 1);
            let listening = stalled.text[..whole]
                .lines()
                .find_map(|l| LogLine::parse(l)?.listening_on());
            if let Some(addr) = listening {
                break addr;
            }
            let mut buf = [0u8; 512];
            let n = stalled.log.read(&mut buf).expect("read the log");
            assert!(n > 0, "forkecho exited: {}", stalled.text);
            stalled.text.push_str(&String::from_utf8_lossy(&buf[..n]));
        };
        stalled.addr = addr;
        stalled
    }

    /// Connects, is greeted, closes: the parent logs two lines.
    fn short_client(&mut self) {
        let mut s = connect(self.addr);
        expect_banner(&mut s);
        self.clients += 1;
    }

    /// The log pipe's capacity now (the server may have grown it).
    fn pipe_capacity(&self) -> usize {
        // Safe: F_GETPIPE_SZ only reads the size of a pipe we hold.
        let size = unsafe { libc::fcntl(self.log.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert!(size > 0);
        size as usize
    }

    /// Bytes waiting in the log for a reader.
    fn queued(&self) -> usize {
        let mut n: libc::c_int = 0;
        // Safe: FIONREAD writes one int.
        let rc = unsafe { libc::ioctl(self.log.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0);
        n as usize
    }

    /// Reads what the log holds now, without waiting for more.
    fn read_available(&mut self) {
        set_nonblocking(self.log.as_raw_fd(), true);
        let mut buf = [0u8; 8192];
        loop {
            match self.log.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("read the log: {e}"),
            }
        }
        set_nonblocking(self.log.as_raw_fd(), false);
    }

    /// SIGTERM, then the exit must follow within `EXIT_BOUND`; returns the rest of the log.
    fn terminate_and_read_to_end(&mut self) -> String {
        self.server.signal(Signal::SIGTERM);
        let status = self.server.wait_exit(EXIT_BOUND);
        assert!(status.success(), "{status:?}");
        let mut rest = Vec::new();
        self.log.read_to_end(&mut rest).unwrap();
        self.text.push_str(&String::from_utf8_lossy(&rest));
        self.text.clone()
    }
}

/// The test's end and the server's end of a small log channel.
fn log_channel(kind: LogKind) -> (OwnedFd, OwnedFd) {
    match kind {
        LogKind::Pipe => {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
            // One page: a few dozen lines fill it.
            // Safe: sets the size of a pipe we own.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
            assert_eq!(size, 4096);
            (read, write)
        }
        LogKind::Socket => {
            let (ours, theirs) = UnixStream::pair().unwrap();
            socket2::SockRef::from(&theirs)
                .set_send_buffer_size(4096)
                .unwrap();
            (ours.into(), theirs.into())
        }
    }
}

fn set_nonblocking(fd: RawFd, on: bool) {
    // Safe: reads and sets the status flags of a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        libc::fcntl(fd, libc::F_SETFL, flags);
    }
}

/// Fills the log while nobody reads it, then: a new client is greeted and echoed, every child
/// is reaped (none left, no zombie), and SIGTERM ends the server within `EXIT_BOUND`.
fn assert_serves_with_a_stalled_log(kind: LogKind) -> StalledLog {
    let mut server = StalledLog::start(kind);
    match kind {
        LogKind::Pipe => {
            let queued = fill_log_pipe(&mut server);
            assert!(queued > server.pipe_capacity() / 2, "{queued} bytes queued");
        }
        LogKind::Socket => (0..FILL).for_each(|_| server.short_client()),
    }
    assert_still_serves(&mut server);
    server
}

/// The server grows its log pipe for bursts (to 1 MiB): fills whatever it holds, until the
/// lines of ten clients in a row no longer fit. Returns the bytes queued.
fn fill_log_pipe(server: &mut StalledLog) -> usize {
    let (mut unchanged, mut queued) = (0, server.queued());
    while unchanged < 10 {
        assert!(
            server.clients < MAX_FILL,
            "the pipe never filled: {queued} bytes"
        );
        server.short_client();
        let now = server.queued();
        unchanged = if now == queued { unchanged + 1 } else { 0 };
        queued = now;
    }
    queued
}

/// With the log full: a new client is greeted and echoed, and every child is reaped.
fn assert_still_serves(server: &mut StalledLog) {
    let mut s = connect(server.addr);
    expect_banner(&mut s);
    assert_eq!(echo_roundtrip(&mut s, b"still here\n"), b"still here\n");
    drop(s);
    server.clients += 1;
    assert_no_children(&server.server, "with the log stalled");
}

/// Every line of `text` is one whole record, through its newline.
fn assert_whole_log(text: &str) {
    assert!(text.ends_with('\n'), "{text}");
    assert_whole_lines(text.lines());
}

#[test]
fn a_stalled_log_pipe_does_not_stop_serving_reaping_or_shutdown() {
    let mut server = assert_serves_with_a_stalled_log(LogKind::Pipe);
    let log = server.terminate_and_read_to_end();
    assert_whole_log(&log);
    // No line got through after the stall began, so there was no chance to report it.
    assert!(!log.contains("lines dropped"), "{log}");
}

#[test]
fn a_stalled_journal_socket_does_not_stop_serving_reaping_or_shutdown() {
    let mut server = assert_serves_with_a_stalled_log(LogKind::Socket);
    let log = server.terminate_and_read_to_end();
    assert_whole_log(&log);
}

/// When the reader resumes, the next line through is preceded by one report of how many lines
/// were dropped, and that count is exactly the lines missing.
#[test]
fn lines_dropped_while_the_log_stalled_are_reported_once_when_it_resumes() {
    let mut server = assert_serves_with_a_stalled_log(LogKind::Pipe);
    server.read_available();
    server.short_client();
    assert_no_children(&server.server, "after the log resumed");
    let log = server.terminate_and_read_to_end();
    assert_whole_log(&log);

    let reports: Vec<&str> = log.lines().filter(|l| l.contains("dropped")).collect();
    assert_eq!(reports.len(), 1, "{log}");
    let dropped: usize = reports[0]
        .split("log: ")
        .nth(1)
        .and_then(|rest| {
            rest.strip_suffix(
            " lines dropped while the log could not be written (resource temporarily unavailable)",
        )
        })
        .unwrap_or_else(|| panic!("report: {:?}", reports[0]))
        .parse()
        .unwrap();
    assert!(reports[0].contains(" WARN  forkecho["), "{}", reports[0]);
    // Two lines per client (the fillers, the one served while stalled, the one after): each
    // either reached the pipe or was counted.
    let seen = log.matches(" accepted ").count() + log.matches(" exited with code 0 ").count();
    assert_eq!(
        seen + dropped,
        2 * server.clients,
        "{} clients",
        server.clients
    );
    // The report comes first, then the lines that got through.
    let after_report = log.split(reports[0]).nth(1).unwrap();
    assert!(after_report.contains("accepted"), "{log}");
    assert!(after_report.contains("shutdown complete"), "{log}");
}

/// A log pipe created by another user (a supervisor running as root that starts forkecho as a
/// service user: runit's `chpst -u`, `setpriv`, a container's non-root `USER`) is mode 0600,
/// so the server cannot open a description of its own through `/proc/self/fd/2`: it must
/// still write without blocking, and say nothing about blocking.
#[test]
fn a_stalled_log_pipe_created_by_another_user_does_not_stop_serving() {
    use std::os::unix::process::CommandExt;
    if !is_root_or_skip("only root can start the server as another user") {
        return;
    }
    let uid = unused_uid();
    // A copy the other user can run (the build directory may be private).
    let dir = TempDir::new();
    let program = dir.path().join("forkecho");
    copy_binary_to(&program);
    let builder = Server::builder().program(program).tweak(move |cmd| {
        cmd.uid(uid).gid(uid);
    });
    let mut server = StalledLog::start_with(LogKind::Pipe, builder);
    assert!(!server.text.contains("without blocking"), "{}", server.text);
    let queued = fill_log_pipe(&mut server);
    // Each line the server moves into the pipe takes a slot of its own (one page).
    let slots = server.pipe_capacity() / 4096;
    assert!(
        queued >= slots * 80,
        "{queued} bytes queued in {slots} slots"
    );
    assert_still_serves(&mut server);
    server.read_available();
    server.short_client();
    assert_no_children(&server.server, "after the log resumed");
    let log = server.terminate_and_read_to_end();
    assert_whole_log(&log);
    assert_eq!(
        log.lines()
            .filter(|l| l.contains(" lines dropped "))
            .count(),
        1,
        "{log}"
    );
}

/// At `debug` every child logs how its session ended. With the log stalled, a child whose
/// session is over must not keep a place under `max_children` (or `max_per_source`) for as
/// long as nobody reads the log: new clients must still be served, and SIGTERM must not wait
/// out `shutdown_timeout` for sessions that already ended.
#[test]
fn children_stuck_writing_a_stalled_log_do_not_lock_out_new_clients() {
    let builder = Server::builder().args(["--max-children", "8"]);
    let mut server = StalledLog::start_at(LogKind::Pipe, builder, "debug");
    // Until the log has been full for 20 clients in a row.
    let (mut full_for, mut queued) = (0, server.queued());
    for i in 0..MAX_FILL {
        if full_for == 20 {
            break;
        }
        let mut s = connect(server.addr);
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut greeting = [0u8; 1];
        let greeted = s.read(&mut greeting).is_ok_and(|n| n == 1);
        let pid = server.server.pid();
        let live = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
        assert!(
            greeted,
            "client {i} not served once the log filled ({queued} bytes queued); live \
             children: {}",
            live.unwrap_or_default()
        );
        let now = server.queued();
        full_for = if now == queued { full_for + 1 } else { 0 };
        queued = now;
    }
    let log = server.terminate_and_read_to_end();
    assert_whole_log(&log);
}

/// One event per line: a value quoted in a reload error (here a newline inside a TOML string)
/// must not start a line of its own.
#[test]
fn a_reload_error_quoting_a_newline_is_one_line() {
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\n")
        .start();
    server.rewrite_config("log_level = \"info\\nforged line\"\nlisten = [\"127.0.0.1:0\"]\n");
    server.signal(Signal::SIGHUP);
    server.wait_for_line("reload refused");
    assert!(
        wait_until(WAIT, || server.log_text().contains("forged")),
        "{}",
        server.log_text()
    );
    let lines = server.log_lines();
    let forged = lines.iter().find(|l| l.starts_with("forged"));
    assert!(forged.is_none(), "a line of its own: {forged:?}");
    let refused = lines.iter().find(|l| l.contains("reload refused")).unwrap();
    assert!(refused.contains(r"info\nforged line"), "{refused}");
}

/// With `--log-file`, stderr (here a pipe) is replaced by the file once the server has
/// started: the parent's lines must follow it there, not stay on the pipe it started with.
#[test]
fn with_a_log_file_the_parents_lines_follow_stderr_to_the_file() {
    let dir = TempDir::new();
    let path = dir.path().join("forkecho.log");
    let (_ours, theirs) = log_channel(LogKind::Pipe);
    let server = Server::builder()
        .log_file(&path)
        .env_remove("RUST_LOG")
        .stderr(theirs)
        .start();
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"to the file\n"), b"to the file\n");
    server.wait_for_line(&format!("accepted {}", s.local_addr().unwrap()));
}

/// A log file that reaches the file-size limit (RLIMIT_FSIZE) would kill the parent with
/// SIGXFSZ and orphan its sessions; the parent ignores it, counts the lines it could not
/// write, and goes on serving and stopping as asked.
#[test]
fn a_log_file_at_the_file_size_limit_does_not_kill_the_server() {
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new();
    let path = dir.path().join("forkecho.log");
    let mut server = Server::builder()
        .log_file(&path)
        .env_remove("RUST_LOG")
        .stderr(Stdio::null())
        .tweak(|cmd| {
            // Safe: setrlimit is async-signal-safe; this runs just before exec.
            unsafe {
                cmd.pre_exec(|| {
                    let fsize = nix::sys::resource::Resource::RLIMIT_FSIZE;
                    nix::sys::resource::setrlimit(fsize, 600, 600)?;
                    Ok(())
                });
            }
        })
        .start();
    // Each session logs two lines of about 100 bytes: the file is full after a few.
    for i in 0..20 {
        let mut s = server.connect_greeted();
        let line = format!("session {i}\n");
        assert_eq!(echo_roundtrip(&mut s, line.as_bytes()), line.as_bytes());
    }
    assert!(std::fs::metadata(&path).unwrap().len() <= 600);
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// A burst of lines bigger than a default pipe (64 KiB) while the reader is busy elsewhere,
/// as a thousand sessions ending at once make: the server grows its log pipe, so the whole
/// burst waits there and nothing is dropped.
#[test]
fn a_burst_larger_than_a_default_pipe_is_held_not_dropped() {
    let mut server = StalledLog::start(LogKind::Pipe);
    // Back to the kernel's default size, as a log shipper's pipe would be; the server only
    // grows the pipe at start, so grow it the way the server does and check it took.
    // Safe: F_GETPIPE_SZ only reads the size of a pipe we hold.
    let size = unsafe { libc::fcntl(server.log.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(
        size >= 256 << 10,
        "the server did not grow its log pipe: {size} bytes"
    );
    const CLIENTS: usize = 600; // ~130 KiB of lines: twice a default pipe
    for _ in 0..CLIENTS {
        server.short_client();
    }
    assert_no_children(&server.server, "after the burst");
    let log = server.terminate_and_read_to_end();
    assert!(!log.contains("lines dropped"), "{log}");
    assert_eq!(log.matches(" accepted ").count(), CLIENTS);
}

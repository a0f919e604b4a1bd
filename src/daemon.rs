//! `--daemonize`: detach from the terminal the classic way (fork, setsid, fork, chdir /, stdio
//! to /dev/null), but report back like a good daemon: the command that started forkecho returns
//! only once the daemon is listening (exit 0), or prints the daemon's startup error and exits 1.
//! So `forkecho --daemonize && nc 127.0.0.1 2333` works from a shell script.
//!
//! The report travels through a pipe. The daemon writes `ok` (or its error message) and closes
//! its end; the waiting process reads to EOF. A daemon that dies before writing anything closes
//! the pipe too, so the wait can never hang.
//!
//! # Hazards
//! All of this runs in `main` before the poll loop exists: one thread, nothing buffered but
//! stdout (flushed), no signal handlers yet. Both forks are therefore as safe as they get.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::wait::waitpid;
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, setsid, ForkResult};

/// The daemon's end of the report pipe; `None` when not daemonized.
pub struct Readiness(Option<File>);

impl Readiness {
    /// Not daemonized: nobody is waiting for a report.
    pub fn none() -> Self {
        Readiness(None)
    }

    /// The daemon is listening: let the starting command exit 0.
    pub fn ready(&mut self) {
        self.report(b"ok");
    }

    /// The daemon could not start: the starting command prints `message` and exits 1.
    pub fn failed(&mut self, message: &str) {
        self.report(message.as_bytes());
    }

    fn report(&mut self, word: &[u8]) {
        if let Some(mut pipe) = self.0.take() {
            // If the starter is gone there is no one to tell; nothing else to do.
            let _ = pipe.write_all(word);
        }
    }
}

/// Detaches. Returns in the daemon only; the starting process waits for the daemon's report
/// and exits with it. `stderr` is where the daemon's stderr (its log) goes: an open log file
/// (opened by the caller before detaching, so a bad path is reported directly) or /dev/null.
pub fn daemonize(stderr: Option<File>) -> io::Result<Readiness> {
    let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
    let _ = io::stdout().flush();
    // Safe: single-threaded, before any handler or loop exists (see the module's Hazards).
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            // Why: with our own copy of the write end open, the read below would never see
            // EOF and a daemon that died without a word would hang the starter forever.
            drop(write);
            let code = wait_for_report(read);
            // The intermediate child exits at once; collect it so it leaves no zombie.
            let _ = waitpid(child, None);
            std::process::exit(code);
        }
        ForkResult::Child => {}
    }
    // The report only flows up; the daemon keeps no descriptor it does not use.
    drop(read);
    // A new session: no controlling terminal, so a hangup of the shell does not reach us.
    setsid()?;
    // Safe: as above. The second fork makes the daemon a non-leader of its session, so
    // opening a terminal later can never make it the controlling terminal.
    if let ForkResult::Parent { .. } = unsafe { fork() }? {
        // Safe: `_exit` only ends this intermediate process, running no parent destructors.
        unsafe { libc::_exit(0) };
    }
    // Why: the daemon must not keep the directory it was started from busy (unmounts).
    std::env::set_current_dir("/")?;
    let null = File::options().read(true).write(true).open("/dev/null")?;
    dup2_stdin(&null)?;
    dup2_stdout(&null)?;
    match &stderr {
        Some(log) => dup2_stderr(log)?,
        None => dup2_stderr(&null)?,
    }
    Ok(Readiness(Some(File::from(write))))
}

/// In the starting process: reads the daemon's report to EOF and turns it into an exit code.
fn wait_for_report(read: OwnedFd) -> i32 {
    let mut report = Vec::new();
    let mut pipe = File::from(read);
    let _ = pipe.read_to_end(&mut report);
    match report.as_slice() {
        b"ok" => 0,
        [] => {
            eprintln!("forkecho: the daemon exited before it was ready (see its log)");
            1
        }
        message => {
            eprintln!("forkecho: {}", String::from_utf8_lossy(message));
            1
        }
    }
}

/// Sends this process's stderr to `log` (for `log_file` without `--daemonize`): children
/// inherit fd 2, so their lines land in the same file.
pub fn redirect_stderr(log: &File) -> io::Result<()> {
    dup2_stderr(log)?;
    debug_assert!(log.as_raw_fd() != 2);
    Ok(())
}

/// True when systemd started us with sockets or a notification socket: then we must stay
/// the process it started.
pub fn started_by_systemd() -> bool {
    ["LISTEN_FDS", "NOTIFY_SOCKET"]
        .iter()
        .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

/// Opens the log file for appending (created 0640 if missing).
pub fn open_log(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

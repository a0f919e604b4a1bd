//! `--daemonize`: detach from the terminal the classic way (fork, setsid, fork, chdir /, stdio
//! to /dev/null), but report back like a good daemon: the command that started forkecho returns
//! only once the daemon is listening (exit 0), or prints the daemon's startup error and exits 1.
//! So `forkecho --daemonize && nc 127.0.0.1 2333` works from a shell script.
//!
//! The report travels through a pipe. The daemon writes `ok` (or its error message) and closes
//! its end; the waiting process reads to EOF. A daemon that dies before writing anything closes
//! the pipe too, so the wait can never hang. Nor can anyone else's: the daemon closes every
//! descriptor it inherited but stdio, the pid file's lock and that pipe, so a caller reading
//! its output (`out=$(forkecho --daemonize)`) gets EOF when the starting command exits.
//!
//! The log file (`log_file`, with or without `--daemonize`) is fd 2, shared by every child.
//! It must be a regular file: a FIFO without a reader would block the open and then every
//! line. [`open_log`] opens it without blocking and refuses anything else; [`reopen_log`] does
//! the same for a reopen after log rotation.
//!
//! # Hazards
//! All of this runs in `main` before the poll loop exists: one thread, nothing buffered but
//! stdout (flushed), no signal handlers yet. Both forks are therefore as safe as they get.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::resource::{getrlimit, Resource};
use nix::sys::wait::waitpid;
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, setsid, ForkResult};

/// The daemon's end of the report pipe; `None` when not daemonized.
#[derive(Default)]
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
///
/// The daemon then closes every descriptor but stdio, the report pipe and `keep` (the pid
/// file's lock), as sshd's `closefrom` does: a pipe it inherited (the starter's
/// `out=$(forkecho --daemonize)`, any descriptor a script left open) would otherwise keep its
/// reader waiting until the daemon dies. The caller must hold no other descriptor it means to
/// use afterwards.
pub fn daemonize(stderr: Option<File>, keep: &[BorrowedFd<'_>]) -> io::Result<Readiness> {
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
    // Closed by their owners first: the close-all below must not leave a `File` behind
    // whose drop would close a reused descriptor number.
    drop((null, stderr));
    let mut kept: Vec<RawFd> = keep.iter().map(AsRawFd::as_raw_fd).collect();
    kept.push(write.as_raw_fd());
    close_all_but(&kept)?;
    Ok(Readiness(Some(File::from(write))))
}

/// Closes every descriptor except 0, 1, 2 and `keep`.
fn close_all_but(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .chain([0, 1, 2])
        .collect();
    keep.sort_unstable();
    keep.dedup();
    // The gaps between kept descriptors, the last one open-ended.
    let mut first = 0;
    for &fd in &keep {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd + 1;
    }
    close_range(first, u32::MAX)
}

/// close_range(2) (Linux 5.9); on an older kernel, or where a seccomp filter forbids it, one
/// close(2) per descriptor up to the descriptor limit.
fn close_range(first: u32, last: u32) -> io::Result<()> {
    // Safe: only closes descriptors, none of which a live Rust object owns (see `daemonize`).
    if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if !matches!(error.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
        return Err(error);
    }
    let (limit, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let end = last.min(u32::try_from(limit).unwrap_or(u32::MAX).saturating_sub(1));
    for fd in first..=end {
        // Safe: as above. EBADF (not open) is the common case and means nothing.
        unsafe { libc::close(fd as RawFd) };
    }
    Ok(())
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

/// Opens the log file for appending (created 0640 if missing). Only a regular file is
/// accepted: a FIFO without a reader would block the open (and every later write), a device
/// or socket is no log. The open never blocks (`O_NONBLOCK`, which a regular file ignores);
/// the descriptor's `fstat` decides. The error is a whole sentence naming the file.
pub fn open_log(path: &Path) -> Result<File, String> {
    // Checked before opening too: opening some devices has effects. A symlink to a regular
    // file is a fine log (this follows it, as the open does).
    if let Ok(found) = std::fs::metadata(path) {
        refuse_unless_regular(path, &found)?;
    }
    let log = File::options()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            let why = crate::os_error_text(&e);
            format!("cannot open log file {}: {why}", path.display())
        })?;
    let opened = log.metadata().map_err(|e| {
        let why = crate::os_error_text(&e);
        format!("cannot open log file {}: {why}", path.display())
    })?;
    refuse_unless_regular(path, &opened)?;
    Ok(log)
}

fn refuse_unless_regular(path: &Path, found: &std::fs::Metadata) -> Result<(), String> {
    if found.is_file() {
        return Ok(());
    }
    let kind = crate::file_kind(found.file_type());
    Err(format!(
        "log file {} is {kind}, not a regular file",
        path.display()
    ))
}

/// Sends fd 2 (this process's log, and that of every child forked from now on) to a fresh
/// open of `path`: after logrotate renamed the file, the log goes on in a new one. Opened
/// like [`open_log`] (never blocks, regular files only); on error fd 2 stays as it was and
/// the message says why.
pub fn reopen_log(path: &Path) -> Result<(), String> {
    reopen_log_onto(path, |log| dup2_stderr(log))
}

/// [`reopen_log`] with the final `dup2` given, so that a test can aim it at another
/// descriptor than the test runner's stderr.
fn reopen_log_onto(
    path: &Path,
    install: impl FnOnce(&File) -> nix::Result<()>,
) -> Result<(), String> {
    let log = open_log(path)?;
    install(&log).map_err(|e| {
        let why = crate::os_error_text(&e.into());
        format!("cannot send the log to {}: {why}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("forkecho-daemon-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn make_fifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[test]
    fn a_fifo_is_no_log_file_and_the_open_does_not_block() {
        let dir = Scratch::new("fifo");
        let fifo = dir.0.join("log");
        make_fifo(&fifo);
        let err = open_log(&fifo).unwrap_err();
        assert_eq!(
            err,
            format!("log file {} is a FIFO, not a regular file", fifo.display())
        );
    }

    #[test]
    fn reopen_sends_the_log_to_a_new_file_at_the_path() {
        let dir = Scratch::new("reopen");
        let path = dir.0.join("forkecho.log");
        let mut target = File::create(dir.0.join("old.log")).unwrap();
        // As logrotate does: the old file is renamed away, the path is free.
        std::fs::rename(dir.0.join("old.log"), dir.0.join("old.log.1")).unwrap();
        let mut fd = target.try_clone().unwrap().into();
        reopen_log_onto(&path, |log| nix::unistd::dup2(log, &mut fd)).unwrap();
        target = File::from(fd);
        target.write_all(b"after rotation\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after rotation\n");
        assert_eq!(
            std::fs::read_to_string(dir.0.join("old.log.1")).unwrap(),
            ""
        );
    }

    #[test]
    fn a_refused_reopen_leaves_the_descriptor_as_it_was() {
        let dir = Scratch::new("refused");
        let fifo = dir.0.join("forkecho.log");
        make_fifo(&fifo);
        let mut installed = false;
        let err = reopen_log_onto(&fifo, |_| {
            installed = true;
            Ok(())
        })
        .unwrap_err();
        assert!(err.contains("is a FIFO, not a regular file"), "{err}");
        assert!(!installed, "the descriptor was replaced by a refused file");
    }
}

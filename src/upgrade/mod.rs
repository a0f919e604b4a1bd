//! Upgrading the binary in place (`forkecho upgrade`, SIGUSR2): what passes from the running
//! image to the next through `execve`, which keeps the pid (so every session stays this
//! process's child), the descriptors not marked close-on-exec, the signal mask and the pending
//! signals.
//!
//! The state is a TOML document with a format version, in a memfd whose descriptor the new
//! image finds in [`STATE_ENV`]: the descriptors it must adopt (listeners, the pid file and its
//! lock, the control and metrics sockets, the control connection that asked, control and
//! metrics clients in mid-exchange, connections waiting for a decision or a PROXY header), and
//! what the loop knows (the children table with each session's peer, source and age, deadlines, totals,
//! refusal counts, token buckets, the connection counter). Times pass as ages and time left:
//! `Instant`s mean nothing to another image, and the exec takes milliseconds.
//!
//! The steps, and who takes them, are in `server::upgrade` (the running image) and `main`
//! (the new one).

use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

pub mod crash;

/// Names the memfd that holds the state, in the new image's environment.
pub const STATE_ENV: &str = "FORKECHO_UPGRADE_STATE";
/// Set, with the reason, in the previous image started again after the new one failed.
pub const ROLLBACK_ENV: &str = "FORKECHO_UPGRADE_ROLLBACK";
/// Set for the `--check-config` run that precedes an upgrade: checks of what the running
/// instance already holds (its pid file, log file, sockets) do not apply.
pub const CHECK_ENV: &str = "FORKECHO_UPGRADE_CHECK";
/// The state's format; an image refuses a state of another version (and the check before an
/// upgrade, a binary of another). Raised whenever the state changes: an image reading a
/// state it half knows would leave descriptors it does not know of open and unserved.
pub const FORMAT: u32 = 4;

/// Everything that passes to the next image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub format: u32,
    /// The version of the image that wrote it, for the log line.
    pub from_version: String,
    pub pid_file: Option<PassedFile>,
    pub listeners: Vec<PassedListener>,
    pub control: Option<PassedListener>,
    pub metrics: Option<PassedListener>,
    /// The control connection that asked for the upgrade: the new image answers it.
    pub requester: Option<RawFd>,
    /// The previous image's executable, open (`/proc/self/exe` outlives a file replaced on
    /// disk): a new image that cannot start executes it again with this state.
    pub previous_exe: Option<RawFd>,
    /// The arguments the server was started with (bytes), for that.
    pub args: Vec<Vec<u8>>,
    /// The path the server was started from (bytes): the one the next upgrade executes, also
    /// after a rollback started the previous image from its descriptor.
    pub exe: Vec<u8>,
    /// The directory it was started in (bytes): relative paths in its arguments are from
    /// there.
    pub start_dir: Vec<u8>,
    /// The config file's text as the running image read it: the next image runs with it
    /// (an upgrade changes the binary, not the configuration), and so does a rollback.
    pub config_text: Option<String>,
    pub server: ServerState,
}

/// An open file that passes as a descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PassedFile {
    pub fd: RawFd,
    pub path: String,
    /// The pid has been written into it.
    pub written: bool,
}

/// A listening socket that passes as a descriptor, with what the loop knows of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PassedListener {
    pub fd: RawFd,
    /// As `ListenAddr` displays: `127.0.0.1:2333` or `unix:/path`.
    pub configured: String,
    pub local: String,
    pub from_systemd: bool,
    pub backlog: u32,
    /// The socket file this listener made (UNIX-domain), by device and inode: still removed
    /// only while it is that file.
    pub socket_file: Option<(u64, u64)>,
}

/// What the loop knows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ServerState {
    pub admitted: u64,
    pub uptime_ns: u64,
    pub started_at_unix_ns: u64,
    pub fork_failures: u64,
    pub accepted: u64,
    pub accept_failures: u64,
    pub reloads_applied: u64,
    pub reloads_refused: u64,
    /// Refusals by reason, in `RefusalCounts::by_reason`'s order.
    pub refused: Vec<u64>,
    pub children: Vec<ChildState>,
    pub lingering: Vec<LingeringState>,
    pub totals: TotalsState,
    pub buckets: Vec<BucketState>,
    /// Connections waiting for a session of their source to end (`max_per_source`).
    pub waiting: Vec<WaitingState>,
    /// Connections on PROXY listeners waiting for their header, or for room after it.
    pub awaiting_header: Vec<HeaderState>,
    /// Control connections in the middle of their exchange.
    pub control_exchanges: Vec<ExchangeState>,
    /// Metrics scrapes in the middle of theirs.
    pub metrics_exchanges: Vec<ExchangeState>,
    /// `stop` commands waiting for the server to exit (kept open until then).
    pub stop_waiters: Vec<RawFd>,
    /// A shutdown in progress: the next image carries it on from the same step, with the
    /// same deadline.
    pub shutdown: Option<ShutdownState>,
}

/// Where a shutdown is (see `server::shutdown`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ShutdownState {
    pub phase: ShutdownPhase,
    /// Time left before its next step (none for `Killing`, which waits for the reaps).
    pub until_in_ns: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownPhase {
    /// Listeners closed; sessions may finish until the deadline.
    Draining,
    /// Sessions were sent SIGTERM; SIGKILL follows at the deadline.
    Terminating,
    /// Sessions were sent SIGKILL.
    Killing,
}

/// A connection to the control socket or the metrics endpoint, in the middle of its
/// exchange; its descriptor passes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExchangeState {
    pub fd: RawFd,
    /// `Peer` as displayed.
    pub peer: String,
    /// What has come of its request, while it is not whole.
    pub request: Vec<u8>,
    /// What is still to send of its answer, once it has one.
    pub answer_left: Option<Vec<u8>>,
    /// All of the answer is sent: what the client still sends is read and dropped.
    pub lingering: bool,
    pub until_in_ns: u64,
}

/// A connection waiting for a decision; its descriptor passes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WaitingState {
    pub fd: RawFd,
    pub peer: String,
    /// The IP listener it came in on; none for a UNIX-domain one.
    pub listener: Option<String>,
    pub via: Option<String>,
    pub destination: Option<String>,
    pub until_in_ns: u64,
}

/// A connection waiting for its PROXY header; its descriptor passes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeaderState {
    pub fd: RawFd,
    pub proxy: String,
    pub listener: String,
    pub mode: String,
    pub until_in_ns: u64,
    /// The header's client and destination, once it has been taken (then the connection waits
    /// for room); `header_taken` with no addresses: LOCAL or UNKNOWN.
    pub header_taken: bool,
    pub client: Option<String>,
    pub destination: Option<String>,
}

/// One live child.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChildState {
    pub pid: i32,
    /// `Peer` as displayed.
    pub peer: String,
    /// `Source` as displayed.
    pub source: String,
    pub program: bool,
    pub age_ns: u64,
    /// Time left to the parent's next action on it (SIGTERM at `max_session_time`, or its
    /// SIGKILL), and whether that is the SIGKILL.
    pub deadline_in_ns: Option<u64>,
    pub deadline_kills: bool,
    pub kill_in_ns: Option<u64>,
}

/// A process group of an ended program, still with members, due a SIGKILL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LingeringState {
    pub pgid: i32,
    pub peer: String,
    pub kill_in_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TotalsState {
    pub forked: u64,
    /// `(exit code, count)`, codes with a count only.
    pub exited: Vec<(i32, u64)>,
    /// `(signal number, count)`.
    pub killed: Vec<(i32, u64)>,
    pub duration_buckets: Vec<u64>,
    pub duration_sum_seconds: f64,
}

/// One source's token bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BucketState {
    pub source: String,
    pub tokens: f64,
    pub age_ns: u64,
}

impl State {
    /// Every descriptor the state names, the previous executable included.
    pub fn descriptors(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|l| l.fd).collect();
        fds.extend(self.control.iter().map(|c| c.fd));
        fds.extend(self.metrics.iter().map(|m| m.fd));
        fds.extend(self.pid_file.iter().map(|p| p.fd));
        fds.extend(self.requester);
        fds.extend(self.previous_exe);
        fds.extend(self.server.waiting.iter().map(|w| w.fd));
        fds.extend(self.server.awaiting_header.iter().map(|h| h.fd));
        fds.extend(self.server.control_exchanges.iter().map(|e| e.fd));
        fds.extend(self.server.metrics_exchanges.iter().map(|e| e.fd));
        fds.extend(self.server.stop_waiters.iter().copied());
        fds
    }

    /// Writes the state into a new memfd, left open across `execve`; returns it.
    pub fn write_to_memfd(&self) -> io::Result<OwnedFd> {
        let text = toml::to_string(self).map_err(io::Error::other)?;
        let mut file = memfd(c"forkecho-upgrade-state", false)?;
        file.write_all(text.as_bytes())?;
        Ok(OwnedFd::from(file))
    }

    /// Reads the state from the memfd `fd` (from its start: a rollback reads it again).
    pub fn read_from(fd: RawFd) -> Result<State, String> {
        // Safe: the descriptor was passed for this; it is borrowed, not closed, here.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let owned = borrowed
            .try_clone_to_owned()
            .map_err(|e| format!("the state's descriptor {fd}: {e}"))?;
        let mut file = std::fs::File::from(owned);
        file.rewind()
            .map_err(|e| format!("reading the state: {e}"))?;
        let mut text = String::new();
        file.take(64 << 20)
            .read_to_string(&mut text)
            .map_err(|e| format!("reading the state: {e}"))?;
        let state: State =
            toml::from_str(&text).map_err(|e| format!("the state does not parse: {e}"))?;
        if state.format != FORMAT {
            return Err(format!(
                "the state's format is {}, this binary reads format {FORMAT}",
                state.format
            ));
        }
        Ok(state)
    }
}

/// An anonymous file (memfd), close-on-exec if `cloexec`.
pub fn memfd(name: &std::ffi::CStr, cloexec: bool) -> io::Result<std::fs::File> {
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // Safe: a NUL-terminated name; the descriptor is owned at once.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // Safe: just created, owned by nobody else.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The next image's command line and environment, laid out for `execve`: the arguments
/// given, and this environment without the upgrade's variables, plus `extra`.
pub struct ExecImage {
    _strings: Vec<std::ffi::CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl ExecImage {
    pub fn new<'a>(args: impl Iterator<Item = &'a [u8]>, extra: &[(&str, &str)]) -> ExecImage {
        use std::os::unix::ffi::OsStrExt;
        let c = |bytes: Vec<u8>| std::ffi::CString::new(bytes).ok();
        let argv: Vec<std::ffi::CString> = args.filter_map(|a| c(a.to_vec())).collect();
        let inherited = std::env::vars_os()
            .filter(|(name, _)| name != STATE_ENV && name != ROLLBACK_ENV)
            .map(|(name, value)| [name.as_bytes(), b"=", value.as_bytes()].concat());
        let added = extra
            .iter()
            .map(|(name, value)| format!("{name}={value}").into_bytes());
        let envp: Vec<std::ffi::CString> = inherited.chain(added).filter_map(c).collect();
        let pointers = |strings: &[std::ffi::CString]| {
            let mut pointers: Vec<*const libc::c_char> =
                strings.iter().map(|s| s.as_ptr()).collect();
            pointers.push(std::ptr::null());
            pointers
        };
        let (argv_ptrs, envp_ptrs) = (pointers(&argv), pointers(&envp));
        ExecImage {
            _strings: argv.into_iter().chain(envp).collect(),
            argv: argv_ptrs,
            envp: envp_ptrs,
        }
    }

    /// `argv` for `execve`: NULL-terminated, valid while `self` lives.
    pub fn argv(&self) -> *const *const libc::c_char {
        self.argv.as_ptr()
    }

    /// `envp` for `execve`.
    pub fn envp(&self) -> *const *const libc::c_char {
        self.envp.as_ptr()
    }

    /// Replaces the environment's last entry (the last of `extra`) with `entry`, a
    /// NUL-terminated `NAME=value` that must outlive the `execve`. Allocation-free: a signal
    /// handler calls it (see `crash`).
    pub fn set_last_env(&mut self, entry: *const libc::c_char) {
        if let Some(last) = self.envp.len().checked_sub(2) {
            self.envp[last] = entry;
        }
    }
}

/// Lets `fd` survive `execve` (clears FD_CLOEXEC), or makes it close there again.
pub fn keep_across_exec(fd: RawFd, keep: bool) -> io::Result<()> {
    // Safe: fcntl on a descriptor we own, flags only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = match keep {
        true => flags & !libc::FD_CLOEXEC,
        false => flags | libc::FD_CLOEXEC,
    };
    // Safe: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives up on this image, which an upgrade started but which cannot serve (`reason`): the
/// previous image's executable is started again in this process, with the same state and
/// arguments, and [`ROLLBACK_ENV`] saying why; it takes over as this one would have. Returns
/// only if that cannot be done (no previous executable, a state that does not read, or a
/// failed `execveat`), with why.
pub fn roll_back(state_fd: RawFd, reason: &str) -> String {
    let state = match State::read_from(state_fd) {
        Ok(state) => state,
        Err(e) => return format!("cannot roll back: {e}"),
    };
    let Some(previous) = state.previous_exe else {
        return "cannot roll back: no previous executable".into();
    };
    if rolled_back().is_some() {
        return "cannot roll back: this is the previous image already".into();
    }
    for fd in state.descriptors().into_iter().chain([state_fd]) {
        let _ = keep_across_exec(fd, true);
    }
    let _ = crate::signals::block_hooked();
    // The arguments' relative paths are from where the server was started.
    if let Ok(dir) = std::ffi::CString::new(state.start_dir.clone()) {
        // Safe: a NUL-terminated path.
        unsafe { libc::chdir(dir.as_ptr()) };
    }
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect();
    let image = ExecImage::new(
        state.args.iter().map(Vec::as_slice),
        &[(STATE_ENV, &state_fd.to_string()), (ROLLBACK_ENV, &reason)],
    );
    // Safe: `image` holds NUL-terminated strings and NULL-terminated arrays, alive for the
    // call; an empty path with AT_EMPTY_PATH executes the file `previous` is open on.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            previous,
            c"".as_ptr(),
            image.argv(),
            image.envp(),
            libc::AT_EMPTY_PATH,
        )
    };
    format!(
        "cannot roll back: execveat: {}",
        crate::os_error_text(&io::Error::last_os_error())
    )
}

/// Opens this process's executable for a later rollback (not close-on-exec: it must survive
/// the upgrade's `execve`).
pub fn open_own_executable() -> io::Result<OwnedFd> {
    // Safe: a NUL-terminated path; the descriptor is owned at once.
    let fd = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // Safe: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The process still taking over from the previous image (0 once it serves): a panic there
/// rolls back (see `main`); one in a child, or later, does not.
static ADOPTING: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The pid of the process taking over, 0 if none is.
pub fn adopting_pid() -> u32 {
    ADOPTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Marks this process as taking over from the previous image.
pub fn start_adopting() {
    ADOPTING.store(std::process::id(), std::sync::atomic::Ordering::Relaxed);
}

/// This process serves: a failure is no longer handed back.
pub fn stop_adopting() {
    ADOPTING.store(0, std::sync::atomic::Ordering::Relaxed);
}

/// What this image's environment said of the upgrade that started it, taken out of it.
struct Started {
    state_fd: Option<RawFd>,
    rolled_back: Option<String>,
    /// [`crash::TEST_CRASH_ENV`]'s value (debug builds only).
    test_crash: Option<String>,
}

static STARTED: std::sync::OnceLock<Started> = std::sync::OnceLock::new();

/// Reads [`STATE_ENV`] and [`ROLLBACK_ENV`] once and removes them from the environment: the
/// programs sessions run (whose environment is forkecho's) and later checks must not see them.
fn started() -> &'static Started {
    STARTED.get_or_init(|| {
        let state_fd = std::env::var(STATE_ENV).ok().and_then(|v| v.parse().ok());
        let rolled_back = std::env::var(ROLLBACK_ENV).ok();
        let test_crash = cfg!(debug_assertions)
            .then(|| std::env::var(crash::TEST_CRASH_ENV).ok())
            .flatten();
        // Before any thread exists: main calls this first.
        std::env::remove_var(STATE_ENV);
        std::env::remove_var(ROLLBACK_ENV);
        std::env::remove_var(crash::TEST_CRASH_ENV);
        Started {
            state_fd,
            rolled_back,
            test_crash,
        }
    })
}

/// The descriptor of the state, if an upgrade started this image.
pub fn state_fd_from_env() -> Option<RawFd> {
    started().state_fd
}

/// Why the new image could not start, if this is the previous one started again.
pub fn rolled_back() -> Option<&'static str> {
    started().rolled_back.as_deref()
}

/// Whether this process runs the check that precedes an upgrade.
pub fn is_upgrade_check() -> bool {
    std::env::var_os(CHECK_ENV).is_some()
}

/// Marks a descriptor adopted from the previous image close-on-exec again: it must not leak
/// into a program a session runs (children close it anyway) or into a later upgrade's exec
/// unless passed on purpose.
pub fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
    keep_across_exec(fd, false)?;
    // Safe: the previous image passed this descriptor for us to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The raw descriptor of anything that has one.
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_survives_its_memfd() {
        let state = State {
            format: FORMAT,
            from_version: "0.1.0".into(),
            pid_file: Some(PassedFile {
                fd: 5,
                path: "/run/f.pid".into(),
                written: true,
            }),
            listeners: vec![PassedListener {
                fd: 7,
                configured: "127.0.0.1:0".into(),
                local: "127.0.0.1:40000".into(),
                from_systemd: false,
                backlog: 1024,
                socket_file: None,
            }],
            control: None,
            metrics: None,
            requester: Some(9),
            previous_exe: Some(11),
            args: vec![b"forkecho".to_vec(), vec![0xff, b'-']],
            exe: b"/usr/bin/forkecho".to_vec(),
            start_dir: b"/".to_vec(),
            config_text: Some("listen = [\"127.0.0.1:0\"]\n".into()),
            server: ServerState {
                admitted: 12,
                children: vec![ChildState {
                    pid: 4242,
                    peer: "uid:0,gid:0,pid:1".into(),
                    source: "uid:0".into(),
                    program: true,
                    age_ns: 5,
                    deadline_in_ns: Some(7),
                    deadline_kills: false,
                    kill_in_ns: None,
                }],
                totals: TotalsState {
                    exited: vec![(0, 3)],
                    duration_buckets: vec![1, 2],
                    ..TotalsState::default()
                },
                control_exchanges: vec![
                    ExchangeState {
                        fd: 13,
                        peer: "uid:0,gid:0,pid:1".into(),
                        request: b"sta".to_vec(),
                        answer_left: None,
                        lingering: false,
                        until_in_ns: 3,
                    },
                    ExchangeState {
                        fd: 14,
                        peer: "uid:0,gid:0,pid:2".into(),
                        request: Vec::new(),
                        answer_left: Some(Vec::new()),
                        lingering: true,
                        until_in_ns: 4,
                    },
                ],
                metrics_exchanges: vec![ExchangeState {
                    fd: 15,
                    peer: "127.0.0.1:5000".into(),
                    request: Vec::new(),
                    answer_left: Some(vec![0xff, b'\n']),
                    lingering: false,
                    until_in_ns: 5,
                }],
                stop_waiters: vec![16],
                shutdown: Some(ShutdownState {
                    phase: ShutdownPhase::Draining,
                    until_in_ns: Some(6),
                }),
                ..ServerState::default()
            },
        };
        let fd = state.write_to_memfd().unwrap();
        assert_eq!(State::read_from(fd.as_raw_fd()).unwrap(), state);
        // Again, as a rollback reads it.
        assert_eq!(State::read_from(fd.as_raw_fd()).unwrap(), state);
    }
}

//! Exec mode: a program per connection, UCSPI-style (tcpserver, s6-tcpserver). The program gets
//! the connection on fds 0 and 1, forkecho's log (or /dev/null) on fd 2, nothing else; default
//! signal dispositions, an empty mask, its own process group; forkecho's environment without
//! what belongs to forkecho, plus tcp-environ(5)'s variables and systemd's `REMOTE_ADDR`/
//! `REMOTE_PORT` (on a UNIX-domain listener, ucspi-unix's `UNIX*` variables); the session's
//! resource limits, nice value and working directory.
//!
//! # Spawning without copying the parent
//! A program replaces the child's memory at once, so copying the parent's page tables (`fork`)
//! is wasted work: the child is started with `clone(CLONE_VM | CLONE_VFORK)`, as glibc's
//! `posix_spawn` does, which can do every step below (`posix_spawn` cannot set resource limits
//! or a nice value). The child runs on a stack of its own in the parent's memory while the
//! parent is suspended, until the `execve` succeeds or the child exits. The fork-safety rules
//! hold in this stricter form:
//!
//! 1. No threads in the parent (as for `fork`).
//! 2. Between `clone` and `execve` the child shares the parent's memory: it runs only
//!    async-signal-safe system calls on data the parent prepared ([`Prepared`]), allocates
//!    nothing and writes nothing of the parent's but its error report. It ends by `execve` or
//!    `_exit(111)`; nothing unwinds.
//! 3. Descriptors 0, 1, 2 only (`dup2`, then `close_range`); every signal the parent handles or
//!    ignores back to the default, then an empty mask; its own process group.
//! 4. Reaping is unchanged (`children`).
//! 5. The parent closes its copy of the connection right after `clone` returns.
//!
//! A `banner` is written by the parent before the `clone`, with MSG_DONTWAIT: at most
//! [`MAX_BANNER`] bytes, it fits whole in a fresh connection's empty send buffer (the kernel's
//! smallest is 4,608 bytes), so the parent never waits on a client that does not read.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::unistd::Pid;

use crate::conn::{Conn, Credentials, Peer};

/// Largest banner in exec mode: see the module doc.
pub const MAX_BANNER: usize = 1024;

/// Exit code of a child whose program could not be started (DJB's "temporary failure", as
/// tcpserver and s6 use it).
pub const EXIT_CANNOT_RUN: i32 = 111;

/// Where a program's fd 2 goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stderr {
    /// forkecho's own stderr: its log file or stream, bytes unchanged.
    #[default]
    Log,
    /// /dev/null.
    Null,
}

impl Stderr {
    pub fn parse(s: &str) -> Result<Stderr, String> {
        match s.to_ascii_lowercase().as_str() {
            "log" => Ok(Stderr::Log),
            "null" => Ok(Stderr::Null),
            other => Err(format!("`{other}` is not one of: log, null")),
        }
    }
}

impl fmt::Display for Stderr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stderr::Log => "log",
            Stderr::Null => "null",
        })
    }
}

/// One resource limit of `session_limits`: its name there, and the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    pub name: &'static str,
    resource: libc::__rlimit_resource_t,
}

/// The limits `session_limits` may set, as xinetd's `rlimit_*` and systemd's `Limit*=`.
pub const RESOURCES: [Resource; 6] = [
    Resource {
        name: "cpu",
        resource: libc::RLIMIT_CPU,
    },
    Resource {
        name: "address_space",
        resource: libc::RLIMIT_AS,
    },
    Resource {
        name: "open_files",
        resource: libc::RLIMIT_NOFILE,
    },
    Resource {
        name: "processes",
        resource: libc::RLIMIT_NPROC,
    },
    Resource {
        name: "core",
        resource: libc::RLIMIT_CORE,
    },
    Resource {
        name: "file_size",
        resource: libc::RLIMIT_FSIZE,
    },
];

/// A limit's value: a number, or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub resource: Resource,
    /// `None`: unlimited.
    pub value: Option<u64>,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(n) => write!(f, "{}={n}", self.resource.name),
            None => write!(f, "{}=unlimited", self.resource.name),
        }
    }
}

/// The resource named `name` in `session_limits`.
pub fn resource(name: &str) -> Result<Resource, String> {
    RESOURCES
        .iter()
        .copied()
        .find(|r| r.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = RESOURCES.iter().map(|r| r.name).collect();
            format!("`{name}` is not a limit (known: {})", names.join(", "))
        })
}

/// The file `name` runs: itself if it holds a `/`, else the first match in `PATH` (forkecho's;
/// `/usr/local/bin:/usr/bin:/bin` if unset), as `execvp` would search it. It must be a regular
/// file that someone may execute.
pub fn find_program(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("the program name is empty".into());
    }
    if name.contains('/') {
        return check_executable(Path::new(name)).map(|()| PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    // Absolute: a relative PATH entry (or an empty one, the current directory) means the
    // directory forkecho started in, not the one a program starts in or a daemon works from.
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| check_executable(candidate).is_ok())
        .and_then(|found| std::path::absolute(found).ok())
        .ok_or_else(|| {
            format!(
                "no program `{name}` in PATH ({})",
                Path::new(&path).display()
            )
        })
}

/// `Ok` for a regular file with an execute bit; else why it cannot be run.
fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("`{}`: {}", path.display(), crate::os_error_text(&e)))?;
    if !meta.is_file() {
        return Err(format!(
            "`{}` is {}, not a program",
            path.display(),
            crate::file_kind(meta.file_type())
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("`{}` is not executable", path.display()));
    }
    Ok(())
}

/// Variables of forkecho's own environment that a program must not inherit: systemd's
/// messages to forkecho, and what a UCSPI server sets per connection (had forkecho itself been
/// started by one, they would describe the wrong connection): these, every `TCP*`
/// (tcp-environ(5)'s, ucspi-tcp6's `TCP6*`, rules' `TCPSTALE`...) and ucspi-unix's
/// `UNIXLOCAL*` and `UNIXREMOTE*`.
const NOT_INHERITED: [&str; 9] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "PROTO",
    "REMOTE_ADDR",
    "REMOTE_PORT",
];

fn inherited(name: &OsStr) -> bool {
    let name = name.as_bytes();
    !(NOT_INHERITED.iter().any(|n| n.as_bytes() == name)
        || name.starts_with(b"TCP")
        || name.starts_with(b"UNIXLOCAL")
        || name.starts_with(b"UNIXREMOTE"))
}

/// What every session of one configuration runs, prepared once (at start and on reload) so
/// that each connection only adds its own variables.
#[derive(Debug)]
pub struct Program {
    /// The file executed, as found at load.
    path: CString,
    /// `argv`, `argv[0]` as written.
    argv: Vec<CString>,
    /// The environment every session shares: inherited (unless `clear_env`) and `env`.
    env: Vec<CString>,
    stderr: Stderr,
    /// /dev/null, opened once, for `session_stderr = "null"`.
    null: Option<OwnedFd>,
    limits: Vec<Limit>,
    nice: Option<i32>,
    working_directory: Option<CString>,
    /// The signals to set back to the default in the child: those the parent handles or
    /// ignores (an ignored disposition survives `execve`).
    signals: Vec<libc::c_int>,
    /// The stack the `clone`d child runs on (see the module doc).
    stack: ChildStack,
}

/// What `Program::new` needs from the configuration.
pub struct Settings<'a> {
    pub path: &'a Path,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub clear_env: bool,
    pub stderr: Stderr,
    pub limits: &'a [Limit],
    pub nice: Option<i32>,
    pub working_directory: Option<&'a Path>,
}

impl Program {
    pub fn new(s: Settings) -> io::Result<Program> {
        let c = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| io::Error::other("a NUL byte in a program setting"))
        };
        let mut env = Vec::new();
        if !s.clear_env {
            for (name, value) in std::env::vars_os() {
                let overridden = s.env.iter().any(|(k, _)| k.as_bytes() == name.as_bytes());
                if inherited(&name) && !overridden {
                    env.push(c(&[name.as_bytes(), b"=", value.as_bytes()].concat())?);
                }
            }
        }
        for (name, value) in s.env {
            env.push(c(format!("{name}={value}").as_bytes())?);
        }
        let null = match s.stderr {
            // Writable: it stands for the program's stderr.
            Stderr::Null => Some(OwnedFd::from(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")?,
            )),
            Stderr::Log => None,
        };
        Ok(Program {
            path: c(s.path.as_os_str().as_bytes())?,
            argv: s
                .argv
                .iter()
                .map(|a| c(a.as_bytes()))
                .collect::<io::Result<_>>()?,
            env,
            stderr: s.stderr,
            null,
            limits: s.limits.to_vec(),
            nice: s.nice,
            working_directory: s
                .working_directory
                .map(|d| c(d.as_os_str().as_bytes()))
                .transpose()?,
            signals: signals_to_reset(),
            stack: ChildStack::new()?,
        })
    }

    /// The program as the log names it.
    pub fn name(&self) -> String {
        String::from_utf8_lossy(self.path.as_bytes()).into_owned()
    }

    /// Starts the program for `conn` with `clone(CLONE_VM | CLONE_VFORK)` and returns its pid,
    /// once it runs the program or has failed to (then it exits 111, and the error comes
    /// back beside the pid for the parent to log). The parent's copy of the connection is
    /// closed before this returns (rule 5); if the clone fails, the connection comes back.
    pub fn spawn(&self, conn: Conn) -> Result<(Pid, Option<Failure>), crate::spawn::NotStarted> {
        let prepared = match Prepared::new(self, &conn) {
            Ok(p) => p,
            Err(e) => return Err(Box::new((conn, e))),
        };
        // Keep every signal pending until the child has reset the dispositions: a handler of
        // the parent's must never run in the child (it shares the parent's memory).
        let parent_mask = match crate::signals::block_all() {
            Ok(mask) => mask,
            Err(e) => return Err(Box::new((conn, e))),
        };
        let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
        // Safe: `child_entry` runs only async-signal-safe calls on `prepared`, which outlives
        // the child's use of it (the parent is suspended until the child execs or exits), on
        // a stack of its own with a guard page (rules 1 and 2).
        let pid = unsafe {
            libc::clone(
                child_entry,
                self.stack.top(),
                flags,
                &prepared as *const Prepared as *mut libc::c_void,
            )
        };
        let clone_error = io::Error::last_os_error();
        if let Err(e) = crate::signals::restore_mask(&parent_mask) {
            log::error!("cannot restore the signal mask after clone: {e}");
        }
        if pid < 0 {
            return Err(Box::new((conn, clone_error)));
        }
        // Rule 5: the parent's copy goes now.
        drop(conn);
        Ok((Pid::from_raw(pid), prepared.failure()))
    }
}

/// The signals whose disposition is not the default in the parent: those it handles and those
/// it ignores (SIGPIPE by the Rust runtime, SIGTTOU and SIGXFSZ by `signals::hook`, and
/// whatever forkecho's own launcher left ignored, such as `nohup`'s SIGHUP). Read once per
/// configuration, after the handlers are installed.
fn signals_to_reset() -> Vec<libc::c_int> {
    (1..=libc::SIGRTMAX())
        .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
        .filter(|&sig| {
            let mut current = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
            // Safe: reads the disposition into `current`; changes nothing.
            let read = unsafe { libc::sigaction(sig, std::ptr::null(), current.as_mut_ptr()) };
            // Safe: zero-initialised, and filled by a successful call.
            read == 0 && unsafe { current.assume_init() }.sa_sigaction != libc::SIG_DFL
        })
        .collect()
}

/// Which step before the program failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Descriptors,
    Signals,
    Limits,
    Nice,
    WorkingDirectory,
    Exec,
}

/// A child's failure to become the program: the step and its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub step: Step,
    pub errno: i32,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.step {
            Step::Descriptors => "setting up its descriptors",
            Step::Signals => "resetting its signals",
            Step::Limits => "setting session_limits",
            Step::Nice => "setting nice",
            Step::WorkingDirectory => "changing to working_directory",
            Step::Exec => "execve",
        };
        let error = io::Error::from_raw_os_error(self.errno);
        write!(f, "{what}: {}", crate::os_error_text(&error))
    }
}

/// Everything the child needs, laid out by the parent before `clone`: C strings and the
/// pointer arrays that `execve` takes, and a place for the child's error report.
struct Prepared<'a> {
    program: &'a Program,
    socket: RawFd,
    /// The session's own variables; `envp` points into these and `program.env`.
    _own_env: Vec<CString>,
    /// `UNIXLOCALPID=` and room for the program's pid, which only the child knows: it writes
    /// it there before `execve` (see [`OwnPid`]). `envp` points into this too.
    own_pid: Option<OwnPid>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `Step as i32 + 1` of a failure, 0 if none; and its errno. Written by the child,
    /// read by the parent once the child has exec'd or exited.
    failed_step: AtomicI32,
    errno: AtomicI32,
}

impl<'a> Prepared<'a> {
    fn new(program: &'a Program, conn: &Conn) -> io::Result<Prepared<'a>> {
        let mut own_env = connection_env(conn, program)?;
        let own_pid = own_env
            .iter()
            .position(|v| v.as_bytes().starts_with(OwnPid::NAME))
            .map(|i| OwnPid::new(own_env.remove(i)));
        let argv = program
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp = program
            .env
            .iter()
            .chain(own_env.iter())
            .map(|v| v.as_ptr())
            .chain(own_pid.as_ref().map(OwnPid::as_ptr))
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(Prepared {
            program,
            socket: conn.stream.as_raw_fd(),
            own_pid,
            _own_env: own_env,
            argv,
            envp,
            failed_step: AtomicI32::new(0),
            errno: AtomicI32::new(0),
        })
    }

    /// What the child reported, if it failed.
    fn failure(&self) -> Option<Failure> {
        let step = match self.failed_step.load(Ordering::SeqCst) {
            0 => return None,
            1 => Step::Descriptors,
            2 => Step::Signals,
            3 => Step::Limits,
            4 => Step::Nice,
            5 => Step::WorkingDirectory,
            _ => Step::Exec,
        };
        Some(Failure {
            step,
            errno: self.errno.load(Ordering::SeqCst),
        })
    }

    /// Called in the child: records the failed step and errno for the parent.
    fn report(&self, step: Step) {
        let code = match step {
            Step::Descriptors => 1,
            Step::Signals => 2,
            Step::Limits => 3,
            Step::Nice => 4,
            Step::WorkingDirectory => 5,
            Step::Exec => 6,
        };
        self.errno.store(
            io::Error::last_os_error().raw_os_error().unwrap_or(0),
            Ordering::SeqCst,
        );
        self.failed_step.store(code, Ordering::SeqCst);
    }
}

/// The variables of one connection, by how it came (see [`tcp_env`] and [`unix_env`]). `env`
/// wins over these: an operator who sets one means it.
fn connection_env(conn: &Conn, program: &Program) -> io::Result<Vec<CString>> {
    let vars = match conn.peer {
        Peer::Ip(peer) => tcp_env(conn, peer)?,
        Peer::Local(credentials) => unix_env(conn, credentials),
    };
    vars.into_iter()
        .filter(|(name, _)| !program.env_sets(name))
        .map(|(name, value)| {
            CString::new(format!("{name}={value}")).map_err(|_| io::Error::other("NUL in env"))
        })
        .collect()
}

/// tcp-environ(5)'s variables, as s6-networking writes them for IPv6 too (`PROTO=TCP`, an
/// address without brackets), and systemd's `Accept=yes` names. `TCPCONNNUM` counts the other
/// live sessions from the connection's source (0 for the first), as s6-tcpserver counts those
/// from the address: `s6-connlimit` compares it with its maximum.
fn tcp_env(conn: &Conn, peer: SocketAddr) -> io::Result<Vec<(&'static str, String)>> {
    let local = conn
        .local_addr()?
        .ok_or_else(|| io::Error::other("a TCP connection without a local address"))?;
    // An IPv4 client of a dual-stack socket (one systemd passed) as IPv4, as systemd and s6
    // name it, not as `::ffff:127.0.0.1`.
    let (local_ip, peer_ip) = (local.ip().to_canonical(), peer.ip().to_canonical());
    let mut vars = vec![
        ("PROTO", "TCP".to_string()),
        ("TCPLOCALIP", local_ip.to_string()),
        ("TCPLOCALPORT", local.port().to_string()),
        ("TCPREMOTEIP", peer_ip.to_string()),
        ("TCPREMOTEPORT", peer.port().to_string()),
        ("TCPCONNNUM", (conn.from_source - 1).to_string()),
        ("REMOTE_ADDR", peer_ip.to_string()),
        ("REMOTE_PORT", peer.port().to_string()),
    ];
    // The balancer a PROXY header came through, beside the client it named.
    if let Some(via) = conn.via {
        vars.push(("TCPPROXYIP", via.ip().to_canonical().to_string()));
        vars.push(("TCPPROXYPORT", via.port().to_string()));
    }
    Ok(vars)
}

/// ucspi-unix's variables (its `unixserver`): `PROTO=UNIX`, the socket's path, the server's
/// own pid, uid and gid, and the client's credentials as the kernel recorded them at connect.
fn unix_env(conn: &Conn, client: Credentials) -> Vec<(&'static str, String)> {
    let mut vars = vec![("PROTO", "UNIX".to_string())];
    if let Some(path) = conn.local_path() {
        vars.push(("UNIXLOCALPATH", path.display().to_string()));
    }
    vars.extend([
        // Written by the child: see `OwnPid`.
        ("UNIXLOCALPID", OwnPid::PLACEHOLDER.to_string()),
        ("UNIXLOCALUID", nix::unistd::geteuid().to_string()),
        ("UNIXLOCALGID", nix::unistd::getegid().to_string()),
        ("UNIXREMOTEPID", client.pid.to_string()),
        ("UNIXREMOTEEUID", client.uid.to_string()),
        ("UNIXREMOTEEGID", client.gid.to_string()),
    ]);
    vars
}

impl Program {
    /// Whether the shared environment already sets `name` through `env`.
    fn env_sets(&self, name: &str) -> bool {
        self.env.iter().any(|v| {
            let v = v.as_bytes();
            v.len() > name.len() && v.starts_with(name.as_bytes()) && v[name.len()] == b'='
        })
    }
}

/// The `clone`d child's first and only function: becomes the program or exits 111.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // Safe: `arg` is the `Prepared` the parent passed, alive while the parent is suspended.
    let prepared = unsafe { &*(arg as *const Prepared) };
    // Safe: we are the clone'd child (see `Program::spawn`).
    unsafe { become_program(prepared) };
    // Safe: ends this process only; no at-exit hook runs (rule 2).
    unsafe { libc::_exit(EXIT_CANNOT_RUN) }
}

/// The steps between `clone` (or `fork`) and `execve`, in order; returns only if one fails,
/// after recording which in `prepared`.
///
/// # Safety
/// Only in a child. Every call here is async-signal-safe and allocates nothing (rule 2).
unsafe fn become_program(prepared: &Prepared) {
    let program = prepared.program;
    // Its own process group, so that the shutdown's signals to the group reach whatever the
    // program starts, and Ctrl-C on forkecho's terminal does not.
    libc::setpgid(0, 0);
    // Rule 3: the connection on 0 and 1, the log or /dev/null on 2, nothing else.
    let stderr = match (&program.stderr, &program.null) {
        (Stderr::Null, Some(null)) => null.as_raw_fd(),
        _ => 2,
    };
    if libc::dup2(prepared.socket, 0) < 0
        || libc::dup2(prepared.socket, 1) < 0
        || (stderr != 2 && libc::dup2(stderr, 2) < 0)
    {
        return prepared.report(Step::Descriptors);
    }
    close_from_3();
    // A Ctrl-C that reached the child between `clone` and `setpgid` was the parent's: it is
    // discarded (by setting SIG_IGN) before the reset below sets every disposition back.
    if crate::signals::discard_pending_meant_for_parent().is_err() {
        return prepared.report(Step::Signals);
    }
    // Rule 3: default dispositions (caught handlers would be reset by execve, but not before
    // the mask opens; ignored ones would survive it), then an empty mask.
    let mut default: libc::sigaction = std::mem::zeroed();
    default.sa_sigaction = libc::SIG_DFL;
    for &sig in &program.signals {
        if libc::sigaction(sig, &default, std::ptr::null_mut()) != 0 {
            return prepared.report(Step::Signals);
        }
    }
    if !reset_glibc_reserved_signals() {
        return prepared.report(Step::Signals);
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
        return prepared.report(Step::Signals);
    }
    for limit in &program.limits {
        let value = limit.value.unwrap_or(libc::RLIM_INFINITY);
        let rlimit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        if libc::setrlimit(limit.resource.resource, &rlimit) != 0 {
            return prepared.report(Step::Limits);
        }
    }
    if let Some(nice) = program.nice {
        if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
            return prepared.report(Step::Nice);
        }
    }
    if let Some(dir) = &program.working_directory {
        if libc::chdir(dir.as_ptr()) != 0 {
            return prepared.report(Step::WorkingDirectory);
        }
    }
    if let Some(own_pid) = &prepared.own_pid {
        own_pid.write(libc::getpid());
    }
    libc::execve(
        program.path.as_ptr(),
        prepared.argv.as_ptr(),
        prepared.envp.as_ptr(),
    );
    prepared.report(Step::Exec)
}

/// ucspi-unix's `UNIXLOCALPID`: the pid of the process that runs the program (unixserver forks
/// and then execs), which only the child knows. The parent lays out `UNIXLOCALPID=` followed
/// by room for any pid; the child writes its pid's digits and a NUL there before `execve`,
/// without allocating (an async-signal-safe step: the parent is suspended meanwhile, and no
/// reference to the buffer exists but this pointer).
struct OwnPid {
    entry: Box<[u8]>,
    value: *mut u8,
}

impl OwnPid {
    const NAME: &'static [u8] = b"UNIXLOCALPID=";
    /// Room for the digits of any pid (pid_max is at most 2^22) and the NUL.
    const ROOM: usize = 12;
    /// What `unix_env` writes as the value; replaced in the child.
    const PLACEHOLDER: &'static str = "00000000000";

    fn new(entry: CString) -> OwnPid {
        let mut entry = entry.into_bytes_with_nul().into_boxed_slice();
        debug_assert!(entry.len() >= Self::NAME.len() + Self::ROOM);
        // Safe: NAME.len() is within the entry (it starts with NAME).
        let value = unsafe { entry.as_mut_ptr().add(Self::NAME.len()) };
        OwnPid { entry, value }
    }

    fn as_ptr(&self) -> *const libc::c_char {
        self.entry.as_ptr().cast()
    }

    /// Writes `pid` in decimal, NUL-terminated, into the room after the name.
    ///
    /// # Safety
    /// In the child only, before `execve`: nothing else reads or writes the entry then.
    unsafe fn write(&self, pid: libc::pid_t) {
        let mut digits = [0u8; Self::ROOM];
        let mut n = pid.max(0) as u32;
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 || len == Self::ROOM - 1 {
                break;
            }
        }
        for i in 0..len {
            *self.value.add(i) = digits[len - 1 - i];
        }
        *self.value.add(len) = 0;
    }
}

/// Sets signals 32 and 33 to the default with the raw system call: glibc reserves them for its
/// threads and refuses them in `sigaction`, so `signals_to_reset` cannot see them, but an
/// ignored disposition inherited from forkecho's launcher survives `execve` like any other.
/// An all-zero kernel `sigaction` is SIG_DFL with no flags and an empty mask on every
/// architecture; 32 bytes cover the largest of them.
///
/// # Safety
/// Only in a child, with every signal blocked.
unsafe fn reset_glibc_reserved_signals() -> bool {
    let default = [0u64; 4];
    // The kernel's signal set: 64 signals, 8 bytes.
    let set_size = 8usize;
    [32, 33].into_iter().all(|sig| {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            default.as_ptr(),
            std::ptr::null_mut::<u64>(),
            set_size,
        ) == 0
    })
}

/// Closes every descriptor from 3 up: `close_range`, or, on kernels without it (before 5.9),
/// each number up to the descriptor limit.
///
/// # Safety
/// Only in a child that owns nothing from 3 up.
unsafe fn close_from_3() {
    if libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0) == 0 {
        return;
    }
    let mut limit: libc::rlimit = std::mem::zeroed();
    let max = match libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) {
        0 => limit.rlim_cur.min(1 << 20) as libc::c_int,
        _ => 1024,
    };
    for fd in 3..max {
        libc::close(fd);
    }
}

/// The stack a `clone`d child runs on: mapped once per configuration, never copied into
/// forked children (MADV_DONTFORK), with a guard page below it so an overflow faults instead
/// of writing over the parent's memory.
#[derive(Debug)]
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

/// The child runs a handful of system calls: 64 KiB is ample.
const STACK_SIZE: usize = 64 * 1024;
const GUARD_SIZE: usize = 4096;

impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        let len = STACK_SIZE + GUARD_SIZE;
        // Safe: a fresh anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base, len };
        // Safe: both act on the mapping just made.
        unsafe {
            if libc::mprotect(base, GUARD_SIZE, libc::PROT_NONE) != 0
                || libc::madvise(base, len, libc::MADV_DONTFORK) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(stack)
    }

    /// The highest address, 16-byte aligned: stacks grow down.
    fn top(&self) -> *mut libc::c_void {
        let top = self.base as usize + self.len;
        (top & !15) as *mut libc::c_void
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // Safe: unmaps only this mapping, which nothing uses once the owner is dropped.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Only the parent's single thread uses a `Program`.
unsafe impl Send for ChildStack {}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let args: Vec<String> = self
            .argv
            .iter()
            .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())
            .collect();
        write!(f, "{}", args.join(" "))
    }
}

/// What a session's program needs from the identity it runs as, checked with that identity
/// (see [`check_runnable_as`]): the program executable and the working directory enterable
/// (`access(2)`, so ACLs and mounts count), a `nice` below forkecho's own allowed by
/// RLIMIT_NICE or CAP_SYS_NICE, and no `session_limits` value above the hard limit in force
/// without CAP_SYS_RESOURCE. Without these every session would exit 111; with them the configuration is refused
/// (exit 2, or a refused reload) naming the key. Returns the key at fault and why.
pub fn check_runnable(s: &Settings) -> Result<(), (&'static str, String)> {
    let who = format!("the sessions' user (uid {})", nix::unistd::geteuid());
    let may = |path: &Path, what: &str| -> Result<(), String> {
        match nix::unistd::access(path, nix::unistd::AccessFlags::X_OK) {
            Ok(()) => Ok(()),
            Err(e) => Err(format!(
                "`{}` cannot be {what} by {who}: {}",
                path.display(),
                crate::os_error_text(&io::Error::from(e))
            )),
        }
    };
    may(s.path, "executed").map_err(|e| ("exec", e))?;
    if let Some(dir) = s.working_directory {
        may(dir, "entered").map_err(|e| ("working_directory", e))?;
    }
    if let Some(nice) = s.nice.filter(|_| !has_capability(CAP_SYS_NICE)) {
        check_nice_allowed(nice).map_err(|e| ("nice", format!("{e}, which {who} lacks")))?;
    }
    for limit in s
        .limits
        .iter()
        .filter(|_| !has_capability(CAP_SYS_RESOURCE))
    {
        let hard = nix::sys::resource::getrlimit(resource_of(limit.resource.resource))
            .map(|(_, hard)| hard)
            .unwrap_or(libc::RLIM_INFINITY);
        let wanted = limit.value.unwrap_or(libc::RLIM_INFINITY);
        if wanted > hard {
            return Err((
                "session_limits",
                format!(
                    "`{limit}` is above the hard limit in force ({hard}), which only \
                     CAP_SYS_RESOURCE may raise; {who} lacks it"
                ),
            ));
        }
    }
    Ok(())
}

const CAP_SYS_NICE: u32 = 23;
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether capability `cap` is in this process's effective set (capget(2), version 3).
pub(crate) fn has_capability(cap: u32) -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // Safe: the kernel fills two `Data` for version 3, as declared.
    let read = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    read == 0 && data[(cap / 32) as usize].effective & (1 << (cap % 32)) != 0
}

/// `Ok` if this process may set its nice value to `nice`: raising it always, lowering it below
/// the current one only down to what RLIMIT_NICE allows (20 - limit).
fn check_nice_allowed(nice: i32) -> Result<(), String> {
    // Safe: reads this process's priority; errno is cleared first, as -1 is a valid result.
    let current = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    let floor = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE)
        .map(|(soft, _)| 20 - soft.min(40) as i32)
        .unwrap_or(20);
    if nice >= current || nice >= floor {
        Ok(())
    } else {
        Err(format!(
            "{nice} is below forkecho's own nice value ({current}); that needs CAP_SYS_NICE or \
             an RLIMIT_NICE of at least {}",
            20 - nice
        ))
    }
}

fn resource_of(resource: libc::__rlimit_resource_t) -> nix::sys::resource::Resource {
    use nix::sys::resource::Resource as R;
    match resource {
        libc::RLIMIT_CPU => R::RLIMIT_CPU,
        libc::RLIMIT_AS => R::RLIMIT_AS,
        libc::RLIMIT_NOFILE => R::RLIMIT_NOFILE,
        libc::RLIMIT_NPROC => R::RLIMIT_NPROC,
        libc::RLIMIT_CORE => R::RLIMIT_CORE,
        _ => R::RLIMIT_FSIZE,
    }
}

/// [`check_runnable`] as `who` would see it: in a child that drops to `who` first, so that the
/// parent keeps its privileges (at start, and for `--check-config`, both before any loop or
/// thread exists). The child reports `key\treason` through a pipe, or nothing if all is well.
pub fn check_runnable_as(
    who: &crate::privileges::Identity,
    s: &Settings,
) -> Result<(), (&'static str, String)> {
    use std::io::{Read, Write};
    let failed = |e: io::Error| ("user", format!("cannot check as {}: {e}", who.user));
    let (read, write) = nix::unistd::pipe().map_err(|e| failed(e.into()))?;
    let _ = io::stdout().flush();
    // Safe: single-threaded (startup or --check-config); the child only checks, writes its
    // verdict and `_exit`s.
    match unsafe { nix::unistd::fork() }.map_err(|e| failed(e.into()))? {
        nix::unistd::ForkResult::Child => {
            drop(read);
            let verdict = crate::privileges::drop_to(who)
                .map_err(|e| ("user", e))
                .and_then(|()| check_runnable(s));
            if let Err((key, reason)) = verdict {
                let _ = std::fs::File::from(write).write_all(format!("{key}\t{reason}").as_bytes());
            }
            // Safe: ends the checking child only.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write);
            let mut verdict = String::new();
            let read_result = std::fs::File::from(read).read_to_string(&mut verdict);
            let _ = nix::sys::wait::waitpid(child, None);
            read_result.map_err(failed)?;
            match verdict.split_once('\t') {
                None => Ok(()),
                Some((key, reason)) => {
                    let key = [
                        "exec",
                        "working_directory",
                        "nice",
                        "session_limits",
                        "user",
                    ]
                    .into_iter()
                    .find(|k| *k == key)
                    .unwrap_or("exec");
                    Err((key, reason.to_string()))
                }
            }
        }
    }
}

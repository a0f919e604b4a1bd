//! `fork` and the child's hygiene: the one place a process is created, and everything the new
//! child must undo before it may talk to its client.
//!
//! # Hazards
//! A forked child is a copy of the parent at the instant of `fork`: its threads (only the calling
//! one survives), its locks, its buffered output, its file descriptors and its signal handlers.
//! Each rule below removes one way that copy can hurt:
//!
//! 1. No threads in the parent, ever: a lock held by another thread at `fork` (the allocator's,
//!    the logger's) would stay locked forever in the child. Nothing in this crate spawns one.
//! 2. Flush stdout/stderr before `fork`, or buffered bytes are written twice, once by each
//!    process. (A lean start flushes once, when serving begins: from then on the parent writes
//!    nothing to stdout, and its log goes to fd 2 unbuffered.) The child ends with `_exit`,
//!    never returning into the parent's code (a lean child has none of the loop's frames to
//!    return into: see `lean_fork`): returning
//!    would run the parent's accept loop (and its shutdown path) in a second process, and
//!    `exit` would run at-exit hooks that belong to the parent. Panics are caught; a panicking
//!    child exits 70.
//! 3. The child closes every descriptor but stdio and its connection: a child holding a listener
//!    would keep the port in LISTEN after the parent dies (a restart could not bind, and clients
//!    would queue where nobody accepts), and one holding the signal pipe could wake the parent.
//!    It restores the default action of every hooked signal, clears its signal mask, and starts
//!    its own process group, so that Ctrl-C on the terminal or a signal to the parent's process
//!    group reaches the parent, which decides what the sessions get.
//! 4. (In `children`:) reaping loops, because SIGCHLD coalesces: until nothing is left to
//!    collect, over as many turns of the loop as it takes (at most 128 a turn, so that
//!    accepting goes on while ten thousand children end at once; the next turn does not wait
//!    for another signal).
//! 5. The parent closes its copy of the connection right after `fork`, or the client would never
//!    see EOF when the child ends, and the parent's fd table would fill up.
//!
//! An echo session starts lean (`lean_fork`): `clone` onto a stack of the child's own, so
//! that the parent takes no copy-on-write fault afterwards. The rules are the same; only how
//! the child gets its connection and its first frame differs. A program starts without a copy
//! at all (`exec`).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::unistd::{fork, setpgid, ForkResult, Pid};

use crate::conn::Conn;
use crate::echo;
use crate::exec::Program;
use crate::handler::Handler;
use crate::lean_fork::Started;
use crate::signals;

/// Exit code of a child whose handler panicked (caught; never a core dump), or that could not
/// be made ready to serve: EX_SOFTWARE from sysexits.h. Every handler's codes leave it free.
pub const EXIT_PANIC: i32 = 70;

/// A session that could not be started: its connection, so that the client can still be
/// answered, and why. Boxed: the error path is rare, and the success path stays small.
pub type NotStarted = Box<(Conn, io::Error)>;

/// Starts the child that serves `conn` as `handler` says, and returns its pid: the echo in a
/// forked child, a program with `clone` (see `exec`). In the parent the connection is closed
/// before this returns (rule 5). If the child cannot be created, the connection comes back
/// with the error, so the caller can still answer the client. The child never returns.
pub fn spawn_session(conn: Conn, handler: &Handler) -> Result<Pid, crate::spawn::NotStarted> {
    match handler {
        Handler::Echo(settings) => {
            let start = crate::lean_fork::ChildStart {
                conn,
                settings,
                handlers_default: false,
            };
            match crate::lean_fork::spawn(start) {
                Started::Child(pid) => Ok(Pid::from_raw(pid)),
                Started::Failed(conn, e) => Err(Box::new((conn, e))),
                // Its child returns into these frames: they must be inherited.
                Started::Unavailable(start) => match crate::lean_fork::inherit_stack() {
                    Ok(_inherited) => fork_session(start.conn, |conn| {
                        echo::run(conn, settings, &mut echo::heap_buffer()).exit_code()
                    }),
                    Err(e) => Err(Box::new((start.conn, e))),
                },
            }
        }
        Handler::Exec { program, banner } => spawn_program(conn, program, banner),
    }
}

/// A program: the banner first, written by the parent without waiting (`exec` keeps it small
/// enough for an empty send buffer), then the program, started without a copy of the parent.
fn spawn_program(
    conn: Conn,
    program: &Program,
    banner: &[u8],
) -> Result<Pid, crate::spawn::NotStarted> {
    if !banner.is_empty() {
        write_banner_without_waiting(&conn, banner);
    }
    let peer = conn.peer;
    let (pid, failure) = program.spawn(conn)?;
    if let Some(failure) = failure {
        log::error!(
            "session {peer}: cannot run {}: {failure}; child {pid} exits {}",
            program.name(),
            crate::exec::EXIT_CANNOT_RUN
        );
    }
    Ok(pid)
}

/// Writes `banner` to a fresh connection with MSG_DONTWAIT: it fits in the empty send buffer,
/// so it goes whole or (the client is gone already) not at all, and the program then finds
/// the connection closed, as it would have a moment later.
fn write_banner_without_waiting(conn: &Conn, banner: &[u8]) {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    match socket2::SockRef::from(&conn.stream).send_with_flags(banner, flags) {
        Ok(sent) if sent == banner.len() => {}
        Ok(sent) => log::debug!(
            "session {}: banner not sent whole ({sent} of {} bytes)",
            conn.peer,
            banner.len()
        ),
        Err(e) => log::debug!("session {}: banner not sent: {e}", conn.peer),
    }
}

/// Forks a child in which `serve` serves `conn`; its result is the child's exit code.
fn fork_session(
    conn: Conn,
    serve: impl FnOnce(Conn) -> i32,
) -> Result<Pid, crate::spawn::NotStarted> {
    // Rule 2: nothing buffered may be inherited and written twice. (stderr is unbuffered, and
    // the logger writes whole lines, but stdout is line-buffered.)
    let _ = io::stdout().flush();
    // Keep every signal pending across fork; see `signals::block_all`.
    let parent_mask = match signals::block_all() {
        Ok(mask) => mask,
        Err(e) => return Err(Box::new((conn, e))),
    };
    // Safe: this process has exactly one thread (rule 1), so no lock is held by a thread that
    // would not exist in the child; the child only runs `child_main`, which never returns.
    let forked = unsafe { fork() };
    if let Ok(ForkResult::Child) = forked {
        child_main(conn, false, serve);
    }
    if let Err(e) = signals::restore_mask(&parent_mask) {
        // Not a reason to lose track of a child that now exists: report it and carry on.
        log::error!("cannot restore the signal mask after fork: {e}");
    }
    match forked {
        Ok(ForkResult::Parent { child }) => {
            // Rule 5: the parent's copy goes now, or the client would not see EOF when the
            // child ends, and the parent's fd table would fill up with finished connections.
            drop(conn);
            Ok(child)
        }
        Ok(ForkResult::Child) => unreachable!("the child never returns from child_main"),
        Err(errno) => Err(Box::new((conn, errno.into()))),
    }
}

/// Everything the child does: clean up what it inherited, hand the connection to `serve`,
/// exit with its code. Never returns.
/// `handlers_default`: the kernel already reset every handled signal (`clone3`'s
/// `CLONE_CLEAR_SIGHAND`).
#[link_section = ".text.hot.forkecho_child"]
pub(crate) fn child_main(conn: Conn, handlers_default: bool, serve: impl FnOnce(Conn) -> i32) -> ! {
    // Rule 2: no panic may unwind out of here into the parent's accept loop, from the cleanup
    // or from the session.
    let code = panic::catch_unwind(AssertUnwindSafe(|| {
        // Rule 3: stdio and this connection only (why: see the module doc).
        close_inherited_fds(conn.stream.as_raw_fd());
        // Out of the parent's process group while every signal is still blocked, so that none
        // aimed at that group (Ctrl-C) can act on this child once it unblocks.
        leave_parents_process_group();
        // Rule 3: default actions and an empty mask; if that fails the child could ignore the
        // shutdown's SIGTERM, so it refuses to serve rather than serve half-isolated.
        if let Err(e) = signals::reset_in_child(handlers_default) {
            log::error!("session {}: cannot reset signal handling: {e}", conn.peer);
            return EXIT_PANIC;
        }
        serve(conn)
    }))
    .unwrap_or(EXIT_PANIC);
    exit_child(code)
}

/// The pid of the process that installed the panic hook: the parent.
static PARENT_PID: AtomicU32 = AtomicU32::new(0);

/// True in the parent (once the server is set up), false in a child. For debug assertions on
/// state only the parent may touch.
pub fn in_parent() -> bool {
    std::process::id() == PARENT_PID.load(Ordering::Relaxed)
}

/// Installs, once and in the parent, the panic hook every child inherits: in a child a panic
/// becomes one log line (with the child's pid, like every line; the parent's line for exit
/// code 70 names the peer) instead of the default multi-line message. In the parent the default
/// hook still runs.
///
/// Why once, here: a hook set in each child would allocate and take the hook's lock in every
/// child, and every page a child writes is a page `fork` made it copy.
pub fn install_panic_hook() {
    PARENT_PID.store(std::process::id(), Ordering::Relaxed);
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if in_parent() {
            return default_hook(info);
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log::error!("session panicked{place}: {}", message.replace('\n', " "));
    }));
}

/// Own process group, and a name of its own in `ps`/`pkill`.
///
/// Why a group: Ctrl-C, Ctrl-\ and `kill -TERM -<pgid>` reach the whole process group, and
/// `pkill -USR1 forkecho` every process named forkecho. Sessions in the parent's group would die
/// at once on a SIGINT meant to start an orderly shutdown, and of a SIGUSR1 meant to ask for
/// status.
///
/// Why not a session of its own (`setsid`, as PostgreSQL's backends): with the kernel's
/// scheduler autogroups (on by default on desktop kernels), every new session is its own
/// scheduling group with the weight of a whole login session, so a thousand busy sessions would
/// outweigh the parent a thousand to one, and the accept loop would starve exactly when it is
/// busiest; creating the group also made every fork measurably slower. A process group keeps the
/// children in the parent's scheduling group.
///
/// In a terminal, the child is then a background job of it; SIGTTOU stays ignored, as the
/// parent set it (`signals::hook`), so that, under `stty tostop`, a child writing its log line
/// to that terminal is not stopped. (One difference
/// from a session of its own: if the parent dies while a child is stopped by hand with
/// SIGSTOP, the child's orphaned group gets SIGHUP and SIGCONT, and that session ends.)
#[link_section = ".text.hot.forkecho_child"]
fn leave_parents_process_group() {
    // Cannot fail here: a freshly forked child is not a group leader and is in our session.
    let _ = setpgid(Pid::from_raw(0), Pid::from_raw(0));
    // Safe: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"forkecho-child".as_ptr()) };
}

/// `_exit`, not `exit`: the at-exit hooks and stdio buffers are the parent's, not ours. Our own
/// cleanup is done (the stream is closed by the kernel on exit; logs are written unbuffered).
/// Nothing is flushed: a child writes nothing to stdout (the parent flushed its own before
/// the child existed), and taking stdout's lock would write a page shared with the parent,
/// which the kernel then copies, in every session.
#[link_section = ".text.hot.forkecho_child"]
fn exit_child(code: i32) -> ! {
    // Safe: `_exit` only ends this process.
    unsafe { libc::_exit(code) }
}

/// Closes every descriptor except 0, 1, 2 and `keep`: the listeners, the epoll fd and both ends
/// of signal-hook's pipe, whose numbers signal-hook does not expose, plus anything else the
/// parent may hold. The Rust objects that owned them in the parent are never dropped here
/// (the child `_exit`s), so nothing closes a number twice.
#[link_section = ".text.hot.forkecho_child"]
fn close_inherited_fds(keep: RawFd) {
    let keep = keep as libc::c_uint;
    // The raw system call, not glibc's wrapper (glibc 2.34+ only): where the kernel lacks it,
    // ENOSYS sends us to the fallback instead of failing to link or start.
    let close_range = |first: libc::c_uint, last: libc::c_uint| {
        // Safe: close_range only closes descriptors; no memory is touched.
        unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) == 0 }
    };
    let mut ok = true;
    if keep > 3 {
        ok &= close_range(3, keep - 1);
    }
    ok &= close_range(keep + 1, libc::c_uint::MAX);
    if !ok {
        close_listed_fds(keep as RawFd);
    }
}

/// Fallback for kernels without close_range(2) (before 5.9): close what /proc/self/fd lists.
fn close_listed_fds(keep: RawFd) {
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in fds.into_iter().filter(|&fd| fd > 2 && fd != keep) {
        // Safe: closing a number; EBADF (the directory's own fd, already closed) is harmless.
        unsafe { libc::close(fd) };
    }
}

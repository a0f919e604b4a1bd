//! A native crash of an image an upgrade started, before it serves, rolls back too.
//!
//! A refusal, an adoption failure or a panic hands back through `upgrade::roll_back`, which
//! reads the state and lays out the previous image's command line as it goes. A crash
//! (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP) leaves no room for that: its
//! handler may only take async-signal-safe, allocation-free steps. So [`arm`] prepares
//! everything the same `execveat` needs while the image can still allocate (the argument and
//! environment arrays, one reason per signal, the descriptors to keep, the directory, the
//! signal mask), and installs the handlers; [`disarm`] restores the previous dispositions
//! once the image serves (from then on a crash is a crash: the state has moved on and the
//! previous image could not take it over).
//!
//! Not covered: a crash before `main` has read the state (in the dynamic loader, say). The
//! process dies then, and with it the listeners.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicPtr, Ordering};

use super::{ExecImage, State, ROLLBACK_ENV, STATE_ENV};

/// Debug builds only, for the tests: `segv` or `abort` makes an image an upgrade started
/// crash that way while it takes over (see [`crash_if_a_test_asks`]). Taken out of the
/// environment at start, like the upgrade's own variables, so that the previous image a
/// rollback starts does not crash too.
pub const TEST_CRASH_ENV: &str = "FORKECHO_TEST_CRASH_WHILE_ADOPTING";

/// The signals a native crash raises.
const FATAL: [libc::c_int; 7] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGSYS,
    libc::SIGTRAP,
];

/// Everything the handler needs, made before it can run.
struct Prepared {
    /// The process that armed it: a child forked meanwhile must not execute anything.
    pid: libc::pid_t,
    /// The previous image's executable.
    previous: RawFd,
    /// The previous image's command line; its environment's last entry is the reason.
    image: ExecImage,
    /// `FORKECHO_UPGRADE_ROLLBACK=...` for each of [`FATAL`], in its order.
    reasons: Vec<CString>,
    /// The state and every descriptor it names: kept across `execveat`.
    keep: Vec<RawFd>,
    start_dir: CString,
    /// The mask to execute with: the hooked signals blocked (see `roll_back`), nothing else.
    mask: libc::sigset_t,
    /// The dispositions [`arm`] replaced, restored by [`disarm`] (Rust's stack-overflow report
    /// for SIGSEGV and SIGBUS, for one).
    replaced: Vec<(libc::c_int, libc::sigaction)>,
}

/// Set while armed; read by the handler, which owns it from then on (it never returns into
/// code that could read it again).
static PREPARED: AtomicPtr<Prepared> = AtomicPtr::new(std::ptr::null_mut());

/// Prepares the rollback to the previous image for a crash and installs the handlers for
/// [`FATAL`]. Nothing is armed when there is nothing to roll back to (no previous executable,
/// or this is the previous image started again). `state_fd` holds `state`.
pub fn arm(state_fd: RawFd, state: &State) -> std::io::Result<()> {
    let Some(previous) = state.previous_exe else {
        return Ok(());
    };
    if super::rolled_back().is_some() || !PREPARED.load(Ordering::Relaxed).is_null() {
        return Ok(());
    }
    let state_fd_text = state_fd.to_string();
    let image = ExecImage::new(
        state.args.iter().map(Vec::as_slice),
        &[(STATE_ENV, &state_fd_text), (ROLLBACK_ENV, "crashed")],
    );
    let reasons = FATAL
        .iter()
        .map(|&signal| {
            CString::new(format!(
                "{ROLLBACK_ENV}=it crashed ({}) before serving",
                signal_name(signal)
            ))
            .map_err(std::io::Error::other)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let start_dir = CString::new(state.start_dir.clone()).map_err(std::io::Error::other)?;
    let mask = *crate::signals::hooked_set()?.as_ref();
    let prepared = Box::new(Prepared {
        pid: std::process::id() as libc::pid_t,
        previous,
        image,
        reasons,
        keep: state.descriptors().into_iter().chain([state_fd]).collect(),
        start_dir,
        mask,
        replaced: Vec::with_capacity(FATAL.len()),
    });
    // Installed after `PREPARED` is set (so the handler finds it), on the alternate stack Rust
    // gives the main thread (a stack overflow is a SIGSEGV too).
    let action = handler_action();
    // Owned through `PREPARED` from here; `disarm` takes it back.
    let raw = Box::into_raw(prepared);
    PREPARED.store(raw, Ordering::SeqCst);
    let mut replaced = Vec::with_capacity(FATAL.len());
    for signal in FATAL {
        let mut old = std::mem::MaybeUninit::<libc::sigaction>::uninit();
        // Safe: `action` is a valid sigaction; `old` is filled by the call.
        if unsafe { libc::sigaction(signal, &action, old.as_mut_ptr()) } == 0 {
            // Safe: filled by the successful call.
            replaced.push((signal, unsafe { old.assume_init() }));
        }
    }
    // Safe: `raw` is the box stored above; the handler never reads `replaced`.
    unsafe { (*raw).replaced = replaced };
    Ok(())
}

/// The image serves: a crash is no longer handed back. Restores the dispositions [`arm`]
/// replaced and frees what it prepared.
pub fn disarm() {
    let raw = PREPARED.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if raw.is_null() {
        return;
    }
    // Safe: `arm` leaked this box into `PREPARED`, and the swap took it back out; the
    // handler, were it to run now, finds null.
    let prepared = unsafe { Box::from_raw(raw) };
    for (signal, old) in &prepared.replaced {
        // Safe: a disposition `sigaction` returned.
        unsafe { libc::sigaction(*signal, old, std::ptr::null_mut()) };
    }
}

fn handler_action() -> libc::sigaction {
    // Safe: all-zero is a valid sigaction (no flags, empty mask) before it is filled in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_crash as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // Safe: a sigset_t owned here.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    action
}

/// The handler: only async-signal-safe calls (getpid, fcntl, sigprocmask, chdir, execveat,
/// sigaction, raise), no allocation, no lock. If it cannot execute the previous image, the
/// signal's default action follows (the crash it would have been).
extern "C" fn on_crash(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let raw = PREPARED.load(Ordering::SeqCst);
    // Safe: getpid is async-signal-safe.
    if !raw.is_null() && unsafe { libc::getpid() } == unsafe { (*raw).pid } {
        // Safe: armed and not disarmed (disarm nulls the pointer before freeing), and this
        // single-threaded process is not running `arm` or `disarm` (they are not interrupted
        // by a signal of theirs).
        let prepared = unsafe { &mut *raw };
        execute_previous(prepared, signal);
    }
    die_of(signal);
}

/// The steps of `upgrade::roll_back`, prepared. Returns only if `execveat` failed.
fn execute_previous(prepared: &mut Prepared, signal: libc::c_int) {
    if let Some(reason) = FATAL
        .iter()
        .position(|&s| s == signal)
        .and_then(|i| prepared.reasons.get(i))
    {
        prepared.image.set_last_env(reason.as_ptr());
    }
    for &fd in &prepared.keep {
        // Safe: fcntl on a descriptor number; FD_CLOEXEC is the only descriptor flag.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    }
    // Safe: a valid set; replaces the mask the handler runs with (which blocks `signal`).
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &prepared.mask, std::ptr::null_mut()) };
    // Safe: a NUL-terminated path.
    unsafe { libc::chdir(prepared.start_dir.as_ptr()) };
    // Safe: the arrays are NULL-terminated and alive (never freed while armed).
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            prepared.previous,
            c"".as_ptr(),
            prepared.image.argv(),
            prepared.image.envp(),
            libc::AT_EMPTY_PATH,
        )
    };
}

/// The default action of `signal`, as if no handler had been installed: a fault returns to
/// the faulting instruction, and a signal sent by `kill` would otherwise be swallowed.
fn die_of(signal: libc::c_int) {
    // Safe: SIG_DFL, then a signal to ourselves; both async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::sigprocmask(libc::SIG_SETMASK, &empty_set(), std::ptr::null_mut());
        libc::raise(signal);
    }
}

fn empty_set() -> libc::sigset_t {
    // Safe: all-zero is the empty set on Linux; sigemptyset makes sure.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // Safe: a sigset_t owned here.
    unsafe { libc::sigemptyset(&mut set) };
    set
}

fn signal_name(signal: libc::c_int) -> &'static str {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str())
        .unwrap_or("a fatal signal")
}

/// In a debug build, crashes as [`TEST_CRASH_ENV`] asked, if it did: a real SIGSEGV (a write
/// through a null pointer) or SIGABRT. The tests' only way to make the real binary crash at a
/// known point; release builds have no such variable.
pub fn crash_if_a_test_asks() {
    if !cfg!(debug_assertions) {
        return;
    }
    match super::started().test_crash.as_deref() {
        // Safe: it is not; this is the crash asked for.
        Some("segv") => unsafe { std::ptr::null_mut::<u8>().write_volatile(1) },
        Some("abort") => std::process::abort(),
        _ => {}
    }
}

//! Signals reach the parent's poll loop through signal-hook's self-pipe: the handler only sets a
//! flag and writes a byte to a pipe that `mio::Poll` watches. Everything a signal means (reaping,
//! shutdown, status) then runs in normal context from the loop.
//!
//! # Hazards
//! - Logic in a handler (the seed's `printf` in its SIGCHLD handler) can deadlock on a lock the
//!   interrupted code holds. Here no handler does more than signal-hook's flag-and-write.
//! - A blocking `accept` interrupted by a signal fails with EINTR (the seed's retry loop). Here the
//!   loop only accepts after `poll` said a connection is ready, on a non-blocking socket.
//! - Signals coalesce: ten children exiting may deliver one SIGCHLD. The reaper therefore loops
//!   until nothing is left (`children::Children::reap`), never "one signal, one child".
//! - A child inherits the handlers and the pipe. A signal delivered to the child between `fork` and
//!   its cleanup would run signal-hook's handler there and wake the parent's loop for nothing.
//!   `block_all` closes that window: signals stay blocked across `fork`, the child resets every
//!   hooked signal to its default, and only then unblocks (`reset_in_child`).

use std::io;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

/// Every signal the parent hooks; the child restores each of these to `SIG_DFL`.
pub const HOOKED: [i32; 7] = [SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2];

/// What the loop is asked to do, one variant per meaning (several signals may share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGCHLD: one or more children changed state.
    Reap,
    /// SIGTERM (smart), SIGINT (fast), SIGQUIT (immediate): see [`Mode`].
    Shutdown(Mode, Signal),
    /// SIGHUP: re-read the configuration.
    Reload,
    /// SIGUSR1: log one status line.
    Status,
    /// SIGUSR2: upgrade in place to the binary now on disk.
    Upgrade,
}

/// How hard a shutdown is, as in PostgreSQL. Ordered: a later request can only make the
/// shutdown harder, never softer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// SIGTERM: stop accepting, let sessions finish for up to `shutdown_timeout`, then fast.
    Smart,
    /// SIGINT: stop accepting, SIGTERM the children, SIGKILL those left after `kill_timeout`.
    Fast,
    /// SIGQUIT: SIGKILL the children, reap them, exit.
    Immediate,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Smart => "smart",
            Mode::Fast => "fast",
            Mode::Immediate => "immediate",
        }
    }
}

/// [`HOOKED`] as a signal set.
pub(crate) fn hooked_set() -> io::Result<SigSet> {
    let mut hooked = SigSet::empty();
    for signal in HOOKED {
        hooked.add(Signal::try_from(signal)?);
    }
    Ok(hooked)
}

/// Installs the handlers and returns the pipe's read end, ready to register with `mio`.
pub fn hook() -> io::Result<Signals> {
    let signals = Signals::new(HOOKED)?;
    // Why: a launcher may have left some of them blocked (the mask survives exec). A blocked
    // SIGCHLD would leave every child a zombie and a blocked SIGTERM would make us unstoppable.
    // Not while taking over from the previous image: what is pending waits until no rollback
    // can follow (`unblock_hooked`), or a rollback would take it away with this image.
    if crate::upgrade::adopting_pid() == 0 {
        unblock_hooked()?;
    }
    // Why: a log file that reaches RLIMIT_FSIZE would otherwise kill the parent (and orphan
    // every session) with SIGXFSZ; ignored, the write fails with EFBIG and the logger counts
    // the line as dropped, as on a full disk.
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // Safe: installs SIG_IGN, no handler code.
    unsafe { sigaction(Signal::SIGXFSZ, &ignore) }?;
    // Why: started in the background of a terminal with `stty tostop`, the parent would be
    // stopped by SIGTTOU at its first log line to that terminal, and with it every accept and
    // reap. Ignored, the line is written.
    //
    // Both dispositions are inherited by the echo's children, and are its policy too: a
    // session writing its log line to a file at RLIMIT_FSIZE, or to the terminal, goes on.
    // A child that runs another program must restore both (and SIGPIPE) to the default.
    // Safe: installs SIG_IGN, no handler code.
    unsafe { sigaction(Signal::SIGTTOU, &ignore) }?;
    // Why: the echo's policy (a vanished client is EPIPE, not death), inherited by every
    // child. The Rust runtime ignores SIGPIPE already; said here, where the children's
    // dispositions are decided, rather than by a system call in each child.
    // Safe: installs SIG_IGN, no handler code.
    unsafe { sigaction(Signal::SIGPIPE, &ignore) }?;
    Ok(signals)
}

/// Everything asked of the loop by one batch of signals. A plain value, not a list: the loop
/// runs between every accept and fork, and a heap allocation there would cost the parent a
/// copy-on-write fault after each fork (see `parent_memory`). Signals coalesce anyway, so "asked at
/// least once since the last batch" is all a batch can say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Requests {
    pub reap: bool,
    /// The hardest shutdown asked for, and the signal that asked.
    pub shutdown: Option<(Mode, Signal)>,
    pub reload: bool,
    pub status: bool,
    pub upgrade: bool,
}

impl Requests {
    fn add(&mut self, request: Request) {
        match request {
            Request::Reap => self.reap = true,
            Request::Shutdown(mode, signal) => {
                if self.shutdown.is_none_or(|(hardest, _)| mode > hardest) {
                    self.shutdown = Some((mode, signal));
                }
            }
            Request::Reload => self.reload = true,
            Request::Status => self.status = true,
            Request::Upgrade => self.upgrade = true,
        }
    }
}

/// The requests behind the signals received since the last call. Drains the pipe first, then
/// reads the flags (signal-hook's order), so a signal arriving while we act is not lost: it
/// makes the pipe readable again and the loop comes back.
pub fn pending(signals: &mut Signals) -> Requests {
    let mut requests = Requests::default();
    for request in signals.pending().filter_map(request_for) {
        requests.add(request);
    }
    requests
}

fn request_for(signal: i32) -> Option<Request> {
    let sig = Signal::try_from(signal).ok()?;
    Some(match sig {
        Signal::SIGCHLD => Request::Reap,
        Signal::SIGTERM => Request::Shutdown(Mode::Smart, sig),
        Signal::SIGINT => Request::Shutdown(Mode::Fast, sig),
        Signal::SIGQUIT => Request::Shutdown(Mode::Immediate, sig),
        Signal::SIGHUP => Request::Reload,
        Signal::SIGUSR1 => Request::Status,
        Signal::SIGUSR2 => Request::Upgrade,
        _ => return None,
    })
}

/// Blocks every signal in the calling (only) thread and returns the previous mask. Used around
/// `fork` so that no handler can run in the child before it has reset them.
pub fn block_all() -> io::Result<SigSet> {
    let mut old = SigSet::empty();
    nix::sys::signal::sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    Ok(old)
}

/// Blocks the hooked signals until the next image has its handlers (an upgrade's `execve`
/// keeps the mask and the pending signals, but resets caught signals to their default, which
/// for SIGTERM is death). The new image unblocks them once hooked (see [`hook`]).
pub fn block_hooked() -> io::Result<SigSet> {
    let mut old = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&hooked_set()?), Some(&mut old))?;
    Ok(old)
}

/// Lets the hooked signals through: those pending are handled now.
pub fn unblock_hooked() -> io::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&hooked_set()?), None)?;
    Ok(())
}

/// Raises again, for the next image, what a batch asked: with the hooked signals blocked
/// (see [`block_hooked`]) they stay pending through `execve`. An upgrade asked again is left
/// out: the one in progress is it.
pub fn raise_again(requests: &Requests) {
    let mut signals = Vec::new();
    if requests.reap {
        signals.push(Signal::SIGCHLD);
    }
    if let Some((_, signal)) = requests.shutdown {
        signals.push(signal);
    }
    if requests.reload {
        signals.push(Signal::SIGHUP);
    }
    if requests.status {
        signals.push(Signal::SIGUSR1);
    }
    for signal in signals {
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), signal);
    }
}

/// Restores the mask `block_all` returned (the parent's side of the fork).
pub fn restore_mask(mask: &SigSet) -> io::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None)?;
    Ok(())
}

/// In a freshly forked child: every hooked signal back to `SIG_DFL`, then an empty signal mask.
///
/// Why both: signal-hook's `unregister` would leave its handler installed, and a child that
/// still had it would answer SIGTERM by writing into the parent's pipe instead of dying. The
/// mask is inherited from `block_all`: a child that kept SIGTERM blocked would sit out the
/// shutdown's SIGTERM step and die only to SIGKILL.
///
/// Before unblocking, signals that reached the child while it was still in the parent's process
/// group and name (between `fork` and `leave_parents_process_group`) are discarded: SIGINT,
/// SIGQUIT, SIGHUP and SIGUSR1 can only have been meant for the parent, which sends its
/// children nothing but SIGTERM and SIGKILL. Dispositions beyond these (SIGPIPE, for one) are
/// the handler's policy (see `handler`).
///
/// `handlers_default`: the kernel did the first part already (`CLONE_CLEAR_SIGHAND`).
#[link_section = ".text.hot.forkecho_child"]
pub fn reset_in_child(handlers_default: bool) -> io::Result<()> {
    discard_pending_meant_for_parent()?;
    if !handlers_default {
        let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        for signal in HOOKED {
            let sig = Signal::try_from(signal)?;
            // Safe: installs SIG_DFL, no Rust code runs as a handler.
            unsafe { sigaction(sig, &default) }?;
        }
    }
    // libc's own call, not nix's: the usual path of a lean child runs no code outside its
    // section but libc's (see `lean_fork`: each other page of code is a fault per session).
    // Safe: an all-zero sigset_t is the empty set; sigprocmask only reads it.
    let empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Setting a signal to SIG_IGN discards its pending instances, blocked or not. One `sigpending`
/// call in the usual case, where nothing is pending. Async-signal-safe and allocation-free
/// (thin wrappers over sigpending and sigaction), so a `clone(CLONE_VM)`d child may call it
/// too (see `exec`).
#[link_section = ".text.hot.forkecho_child"]
pub(crate) fn discard_pending_meant_for_parent() -> io::Result<()> {
    let mut pending = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // Safe: sigpending fills the set it is given.
    if unsafe { libc::sigpending(pending.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Safe: initialized by the successful call above.
    let pending = unsafe { pending.assume_init() };
    for sig in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // Safe: reads a set filled by sigpending.
        if unsafe { libc::sigismember(&pending, sig as libc::c_int) } == 1 {
            let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            // Safe: installs SIG_IGN, then SIG_DFL, no handler code. Back to the default at
            // once: a child born with default handlers (clone3) resets nothing after this.
            unsafe { sigaction(sig, &ignore) }?;
            unsafe { sigaction(sig, &default) }?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hooked_signal_has_a_meaning() {
        for signal in HOOKED {
            assert!(request_for(signal).is_some(), "signal {signal}");
        }
        assert_eq!(
            request_for(SIGINT),
            Some(Request::Shutdown(Mode::Fast, Signal::SIGINT))
        );
        assert!(Mode::Smart < Mode::Fast && Mode::Fast < Mode::Immediate);
        assert_eq!(request_for(libc::SIGUSR2), Some(Request::Upgrade));
        assert_eq!(request_for(libc::SIGWINCH), None);
    }

    #[test]
    fn pending_signals_meant_for_the_parent_are_discarded() {
        // Blocked in this thread only, then raised: pending here, as in a child before it has
        // left the parent's process group. Were it not discarded, unblocking would deliver it.
        let mut usr1 = SigSet::empty();
        usr1.add(Signal::SIGUSR1);
        usr1.thread_block().unwrap();
        nix::sys::signal::raise(Signal::SIGUSR1).unwrap();
        discard_pending_meant_for_parent().unwrap();
        let mut pending = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // Safe: sigpending fills the set; read only after it succeeded.
        assert_eq!(unsafe { libc::sigpending(pending.as_mut_ptr()) }, 0);
        let pending = unsafe { pending.assume_init() };
        assert_eq!(unsafe { libc::sigismember(&pending, libc::SIGUSR1) }, 0);
        usr1.thread_unblock().unwrap();
    }

    #[test]
    fn a_batch_keeps_the_hardest_shutdown() {
        let mut requests = Requests::default();
        for signal in [SIGINT, SIGTERM, SIGCHLD, SIGUSR1] {
            requests.add(request_for(signal).unwrap());
        }
        assert_eq!(
            requests,
            Requests {
                reap: true,
                shutdown: Some((Mode::Fast, Signal::SIGINT)),
                reload: false,
                status: true,
                upgrade: false,
            }
        );
    }
}

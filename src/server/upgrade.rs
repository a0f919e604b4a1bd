//! The running image's side of an upgrade in place (see `crate::upgrade`), asked by SIGUSR2 or
//! the `upgrade` control command:
//!
//! 1. **Check first.** The binary now at the running one's path runs `--check-config` with the
//!    same arguments, as a child the loop reaps like any other (it never waits for it); its
//!    output goes to a memfd, read once it has exited. If it fails, one error line says why,
//!    the control command hears it, and nothing changes.
//! 2. **Hand over.** The state goes into a memfd; the descriptors the next image adopts are
//!    kept across `execve`; the hooked signals are blocked, so that none is lost or acted on
//!    by default while no handler is installed (the mask and pending signals survive the
//!    exec); then `execve` of the same path, same arguments. The pid stays, and with it every
//!    session. If the `execve` itself fails, all is undone and the loop goes on.
//!
//! While the check runs, the loop serves as always. A shutdown is no reason to refuse or
//! cancel one: the state carries the shutdown's step and deadline, and the next image goes on
//! with it. Only a shutdown that completes while the check still runs cancels the upgrade
//! (the check is killed; there is nothing left to upgrade).

use std::ffi::{CString, OsString};
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Instant, UNIX_EPOCH};

use log::{error, info};
use nix::unistd::Pid;
use socket2::Socket;

use super::{Phase, Server};
use crate::children::Ending;
use crate::control::{self, Outcome};
use crate::upgrade::{self, PassedFile, ServerState, State};

/// What the running image needs to start its successor: set by `main` at start.
#[derive(Debug, Clone)]
pub struct Context {
    /// The path the running binary was started from: the one an upgrade executes (a package
    /// upgrade replaces the file there).
    pub exe: PathBuf,
    /// The arguments it was started with, `argv[0]` included.
    pub args: Vec<OsString>,
    /// The directory it was started in: relative paths in `args` are from there.
    pub start_dir: PathBuf,
    /// The pid file, locked and written, which the successor keeps.
    pub pid_file: Option<(RawFd, PathBuf)>,
}

/// Longest the new binary's check may take: a binary that hangs must not hold upgrades off
/// for good. Killed then, it counts as a failed check; shorter than the control command's
/// wait for an answer, so that the command hears why.
const CHECK_TIME: std::time::Duration = std::time::Duration::from_secs(20);

/// An upgrade whose check is running.
pub(super) struct Checking {
    pid: Pid,
    /// When it is killed if it has not ended.
    until: Instant,
    /// Where the check writes what it says.
    output: std::fs::File,
    /// The control connection that asked, answered when the upgrade ends either way.
    requester: Option<Socket>,
}

impl Server {
    /// Starts an upgrade (SIGUSR2, or the `upgrade` command from `requester`).
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn start_upgrade(&mut self, requester: Option<Socket>) {
        let refuse = |requester: Option<Socket>, reason: &str| {
            error!(event = "upgrade", result = "refused", reason:% = reason; "upgrade refused: {reason}");
            answer(
                requester,
                Outcome::Refused,
                &format!("upgrade refused: {reason}"),
            );
        };
        let Some(context) = &self.upgrade_context else {
            return refuse(
                requester,
                "this server was not started in a way it can upgrade",
            );
        };
        if self.checking.is_some() {
            return refuse(requester, "an upgrade is already in progress");
        }
        let output = match upgrade::memfd(c"forkecho-upgrade-check", true) {
            Ok(file) => file,
            Err(e) => return refuse(requester, &format!("cannot start the check: {e}")),
        };
        // The configuration in force, not the file as it is now: the next image runs with it.
        let config_text = match self.config.source.0.as_deref().map(config_for_check) {
            Some(Ok(file)) => Stdio::from(file),
            Some(Err(e)) => return refuse(requester, &format!("cannot start the check: {e}")),
            None => Stdio::null(),
        };
        let mut check = Command::new(&context.exe);
        check
            .arg("--check-config")
            .args(context.args.iter().skip(1))
            .env(upgrade::CHECK_ENV, upgrade::FORMAT.to_string())
            .stdin(config_text);
        // `spawn` waits for the check's exec, as `fork` waits for the copy: bounded, never for
        // the check itself (its end comes as a SIGCHLD).
        let spawned = output
            .try_clone()
            .and_then(|out| Ok((out.try_clone()?, out)))
            .and_then(|(out, err)| spawn_check(check.stdout(out).stderr(err), &context.start_dir));
        match spawned {
            Ok(child) => {
                info!(
                    event = "upgrade", result = "checking";
                    "upgrade: checking {} with the running configuration",
                    context.exe.display()
                );
                self.checking = Some(Checking {
                    pid: Pid::from_raw(child.id() as i32),
                    until: Instant::now() + CHECK_TIME,
                    output,
                    requester,
                });
            }
            Err(e) => refuse(
                requester,
                &format!("cannot run {}: {e}", context.exe.display()),
            ),
        }
    }

    /// When the running check must be given up, if one runs.
    pub(super) fn upgrade_check_deadline(&self) -> Option<Instant> {
        self.checking.as_ref().map(|c| c.until)
    }

    /// Kills a check past its time: its reap then refuses the upgrade.
    pub(super) fn end_late_upgrade_check(&mut self, now: Instant) {
        if let Some(checking) = self.checking.as_mut().filter(|c| c.until <= now) {
            error!(
                "upgrade: the new binary's check did not finish in {}s; killing it",
                CHECK_TIME.as_secs()
            );
            let _ = nix::sys::signal::kill(checking.pid, nix::sys::signal::Signal::SIGKILL);
            // Not again: the reap ends it.
            checking.until = now + CHECK_TIME;
        }
    }

    /// The shutdown completed while an upgrade's check runs: the upgrade is cancelled and the
    /// check killed (a zombie the process that adopts it reaps, once this one has exited).
    pub(super) fn cancel_upgrade(&mut self) {
        if let Some(checking) = self.checking.take() {
            let _ = nix::sys::signal::kill(checking.pid, nix::sys::signal::Signal::SIGKILL);
            let reason = "the shutdown completed during the new binary's check";
            error!(event = "upgrade", result = "cancelled", reason:% = reason; "upgrade cancelled: {reason}");
            answer(
                checking.requester,
                Outcome::Refused,
                &format!("upgrade cancelled: {reason}"),
            );
        }
    }

    /// After a reap: if the upgrade's check has ended, hand over or give up.
    pub(super) fn continue_upgrade(&mut self) {
        let Some(checking) = &self.checking else {
            return;
        };
        let Some(ending) = self.children.take_other_ending(checking.pid) else {
            return;
        };
        let Some(mut checking) = self.checking.take() else {
            return;
        };
        if ending != Ending::Exited(0) {
            let said = read_bounded(&mut checking.output);
            let reason = format!("the new binary's check {ending}: {}", said.trim());
            error!(event = "upgrade", result = "refused", reason:% = reason; "upgrade refused: {reason}");
            answer(
                checking.requester,
                Outcome::Refused,
                &format!("upgrade refused: {reason}"),
            );
            return;
        }
        if let Err(reason) = self.hand_over(checking.requester.as_ref()) {
            error!(event = "upgrade", result = "failed", reason:% = reason; "upgrade failed: {reason}; the running binary goes on");
            answer(
                checking.requester,
                Outcome::Error,
                &format!("upgrade failed: {reason}"),
            );
        }
    }

    /// Executes the new image with the state; returns only if that could not be done (with
    /// everything as it was).
    fn hand_over(&mut self, requester: Option<&Socket>) -> Result<(), String> {
        let context = self.upgrade_context.clone().ok_or("no upgrade context")?;
        let previous_exe = upgrade::open_own_executable()
            .map_err(|e| format!("cannot open this executable for a rollback: {e}"))?;
        let mut state = self.state(&context, requester);
        state.previous_exe = Some(previous_exe.as_raw_fd());
        let memfd = state
            .write_to_memfd()
            .map_err(|e| format!("cannot write the state: {e}"))?;
        // Open across exec from here: nothing forks before the `execve` (and a child would
        // close them anyway, as it closes every inherited descriptor).
        let passed = state.descriptors();
        if let Some((fd, e)) = passed
            .iter()
            .find_map(|&fd| upgrade::keep_across_exec(fd, true).err().map(|e| (fd, e)))
        {
            // Else they would leak into the next check (a plain `spawn`); sessions close what
            // they inherit anyway.
            for &fd in &passed {
                let _ = upgrade::keep_across_exec(fd, false);
            }
            return Err(format!("descriptor {fd}: {e}"));
        }
        let exe = CString::new(context.exe.as_os_str().as_bytes())
            .map_err(|_| "a NUL in the binary's path")?;
        let state_fd = memfd.as_raw_fd().to_string();
        let image = upgrade::ExecImage::new(
            context.args.iter().map(|a| a.as_bytes()),
            &[(upgrade::STATE_ENV, &state_fd)],
        );
        info!(
            event = "upgrade", result = "executing", sessions = self.children.len();
            "upgrade: executing {} ({} sessions pass on)",
            context.exe.display(),
            self.children.len()
        );
        // systemd knows no reload while stopping: a shutdown's "stopping" stands.
        let serving = self.phase == Phase::Serving;
        if serving {
            crate::systemd::reloading();
        }
        // The arguments' relative paths are from where the server was started (a daemon
        // works from /).
        let cwd = std::env::current_dir().ok();
        let _ = std::env::set_current_dir(&context.start_dir);
        let mask = crate::signals::block_hooked().map_err(|e| format!("blocking signals: {e}"))?;
        // A signal handled after this turn's batch was read (a SIGTERM a moment ago) would be
        // lost with this image: raised again, it waits, blocked, for the next one.
        crate::signals::raise_again(&crate::signals::pending(&mut self.signals));
        // Safe: NUL-terminated strings and NULL-terminated arrays, alive for the call. On
        // success this does not return.
        unsafe { libc::execve(exe.as_ptr(), image.argv(), image.envp()) };
        let e = std::io::Error::last_os_error();
        // Undo: the mask as it was, the descriptors close-on-exec again.
        let _ = crate::signals::restore_mask(&mask);
        if let Some(cwd) = cwd {
            let _ = std::env::set_current_dir(cwd);
        }
        for &fd in &passed {
            let _ = upgrade::keep_across_exec(fd, false);
        }
        if serving {
            crate::systemd::ready("serving (upgrade failed)");
        }
        drop((memfd, previous_exe));
        Err(format!(
            "execve {}: {}",
            context.exe.display(),
            crate::os_error_text(&e)
        ))
    }

    /// Everything the next image takes over.
    fn state(&self, context: &Context, requester: Option<&Socket>) -> State {
        let now = Instant::now();
        let (children, lingering, totals) = self.children.export(now);
        let (buckets, refused) = self.admission.export(now);
        let started_at = self
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        State {
            format: upgrade::FORMAT,
            from_version: crate::VERSION.to_string(),
            pid_file: context.pid_file.as_ref().map(|(fd, path)| PassedFile {
                fd: *fd,
                path: path.display().to_string(),
                written: true,
            }),
            listeners: self
                .listeners
                .iter()
                .map(|slot| slot.listener.passed())
                .collect(),
            control: self.control.as_ref().map(|c| c.listener().passed()),
            metrics: self.metrics.as_ref().map(|m| m.listener().passed()),
            requester: requester.map(|s| s.as_raw_fd()),
            previous_exe: None,
            exe: context.exe.as_os_str().as_bytes().to_vec(),
            start_dir: context.start_dir.as_os_str().as_bytes().to_vec(),
            config_text: self.config.source.0.as_deref().map(str::to_string),
            args: context.args.iter().map(|a| a.as_bytes().to_vec()).collect(),
            server: ServerState {
                admitted: self.admitted,
                uptime_ns: self.started.elapsed().as_nanos() as u64,
                started_at_unix_ns: started_at,
                fork_failures: self.fork_failures,
                accepted: self.counts.accepted,
                accept_failures: self.counts.accept_failures,
                reloads_applied: self.counts.reloads_applied,
                reloads_refused: self.counts.reloads_refused,
                refused,
                children,
                lingering,
                totals,
                buckets,
                waiting: self.pending.export(now),
                awaiting_header: self.export_headers(now),
                control_exchanges: self
                    .control
                    .as_ref()
                    .map_or_else(Vec::new, |c| c.talking.export(now)),
                metrics_exchanges: self
                    .metrics
                    .as_ref()
                    .map_or_else(Vec::new, |m| m.scrapes.export(now)),
                stop_waiters: self
                    .control
                    .as_ref()
                    .map_or_else(Vec::new, |c| c.waiting_for_exit.clone()),
                shutdown: self.phase.export(now),
            },
        }
    }

    /// Takes over what the previous image passed on (see `crate::upgrade`).
    pub fn restore(&mut self, state: &ServerState) -> Result<(), String> {
        let now = Instant::now();
        self.taken_over = true;
        self.phase = Phase::import(state.shutdown.as_ref(), now);
        self.admitted = state.admitted;
        self.fork_failures = state.fork_failures;
        self.counts.accepted = state.accepted;
        self.counts.accept_failures = state.accept_failures;
        self.counts.reloads_applied = state.reloads_applied;
        self.counts.reloads_refused = state.reloads_refused;
        self.started = now
            .checked_sub(std::time::Duration::from_nanos(state.uptime_ns))
            .unwrap_or(now);
        self.started_at = UNIX_EPOCH + std::time::Duration::from_nanos(state.started_at_unix_ns);
        self.admission.import(&state.buckets, &state.refused, now)?;
        self.children
            .import(&state.children, &state.lingering, &state.totals, now)?;
        self.pending.import(&state.waiting, now)?;
        self.import_headers(&state.awaiting_header, now)?;
        let registry = self.poll.registry();
        match &mut self.control {
            Some(control) => control
                .talking
                .import(&state.control_exchanges, registry, now)?,
            None => close_passed(&state.control_exchanges),
        }
        // Kept open, close-on-exec again, until this process exits.
        for &fd in &state.stop_waiters {
            let _ = upgrade::keep_across_exec(fd, false);
        }
        if let Some(control) = &mut self.control {
            control.waiting_for_exit.extend(&state.stop_waiters);
        }
        match &mut self.metrics {
            Some(metrics) => metrics
                .scrapes
                .import(&state.metrics_exchanges, registry, now)?,
            None => close_passed(&state.metrics_exchanges),
        }
        Ok(())
    }

    /// The takeover is over (no rollback can follow): reaps the children that ended during
    /// the exec (their SIGCHLD is pending too), pauses at `max_children` if full, and lets
    /// through the signals that waited, blocked, since the previous image's exec. Not part of
    /// [`Server::restore`]: a reap or a signal handled there, followed by a failure, would be
    /// lost to the previous image, started again with the state.
    pub fn took_over(&mut self) -> std::io::Result<()> {
        self.children.reap();
        self.pause_or_resume_at_max_children();
        crate::signals::unblock_hooked()
    }

    /// The control connection that asked for the upgrade the previous image made: told that
    /// it is done.
    /// `rolled_back`: the new image could not start, for that reason, and this is the
    /// previous one again.
    pub fn answer_upgrade_requester(
        &self,
        fd: RawFd,
        from_version: &str,
        rolled_back: Option<&str>,
    ) {
        match upgrade::adopt(fd) {
            Ok(fd) => {
                let socket = Socket::from(fd);
                match rolled_back {
                    Some(reason) => answer(
                        Some(socket),
                        Outcome::Error,
                        &format!(
                            "upgrade failed: the new binary could not start ({reason}); the \
                             previous binary serves again"
                        ),
                    ),
                    None => answer(
                        Some(socket),
                        Outcome::Ok,
                        &format!(
                            "upgraded from {from_version} to {} ({} sessions kept)",
                            crate::VERSION,
                            self.children.len()
                        ),
                    ),
                }
            }
            Err(e) => log::debug!("the upgrade's control connection: {e}"),
        }
    }
}

/// Closes connections passed for a service this image does not run (the same configuration
/// runs the same services; this is for a state that says otherwise): left open, they would
/// pass on to every later image unserved.
fn close_passed(exchanges: &[upgrade::ExchangeState]) {
    for exchange in exchanges {
        drop(upgrade::adopt(exchange.fd));
    }
}

/// Writes an answer to the control connection that asked, if one did, and closes it.
fn answer(requester: Option<Socket>, outcome: Outcome, text: &str) {
    if let Some(socket) = requester {
        let _ = super::exchange::answer_and_close(socket, &control::answer(outcome, text));
    }
}

/// The running configuration's text in an anonymous file, read from its start: the check's
/// stdin.
fn config_for_check(text: &str) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let mut file = upgrade::memfd(c"forkecho-upgrade-config", true)?;
    file.write_all(text.as_bytes())?;
    file.rewind()?;
    Ok(file)
}

/// What the check wrote, at most 2 KiB of it, on one line.
fn read_bounded(file: &mut std::fs::File) -> String {
    let mut text = String::new();
    let _ = file.rewind();
    let _ = file.take(2048).read_to_string(&mut text);
    text.lines().collect::<Vec<_>>().join(" / ")
}

/// Starts the check from `start_dir` (relative paths in the arguments are from there).
///
/// Why the parent moves there for the moment, rather than `Command::current_dir`: with a
/// directory to change to, std forks (this static build cannot find glibc's
/// `posix_spawn_file_actions_addchdir_np`), and until its `execve` the forked child keeps the
/// parent's signal handlers with the signal mask emptied. A hooked signal in that window (one
/// sent to the process group) runs signal-hook's handler on its registry, which children see
/// zeroed (`parent_memory`): the check crashed, and the upgrade was refused (a test). Without
/// one, std uses `posix_spawn`, whose child resets every handler before it unblocks a signal.
fn spawn_check(
    check: &mut Command,
    start_dir: &std::path::Path,
) -> std::io::Result<std::process::Child> {
    let here = std::env::current_dir();
    std::env::set_current_dir(start_dir)?;
    // Should std fork after all, its child returns into these frames before its exec.
    let spawned = crate::lean_fork::inherit_stack().and_then(|_inherited| check.spawn());
    if let Ok(here) = here {
        let _ = std::env::set_current_dir(here);
    }
    spawned
}

//! The pid file: where supervisors and scripts find the parent's pid, and the lock that keeps
//! two instances from claiming the same one.
//!
//! The file is locked with `flock` for the daemon's whole life, so "is another instance
//! running?" is answered by the kernel, not by guessing whether the pid written inside is
//! still alive (pids are reused). It is opened without `O_TRUNC` and truncated only once the
//! lock is ours: a second instance that fails to get the lock leaves the live instance's file
//! exactly as it was. The lock dies with the process, so a crash leaves a stale file that the
//! next start simply takes over. On a clean exit the file is removed while still locked.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// A pid file we hold the lock on. Dropping it removes the file (in the parent only: children
/// never run destructors, they `_exit`).
pub struct PidFile {
    path: PathBuf,
    /// Open for the whole life of the daemon: closing it would release the lock.
    _lock: Flock<File>,
}

/// Why the pid file could not be taken.
#[derive(Debug)]
pub enum PidFileError {
    /// Another process holds the lock; `pid` is what its file says, if readable.
    Locked {
        path: PathBuf,
        pid: Option<u32>,
    },
    Io {
        path: PathBuf,
        error: io::Error,
    },
}

impl std::fmt::Display for PidFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PidFileError::Locked {
                path,
                pid: Some(pid),
            } => write!(
                f,
                "pid file {} is locked by another running forkecho (pid {pid}); not starting",
                path.display()
            ),
            PidFileError::Locked { path, pid: None } => write!(
                f,
                "pid file {} is locked by another running process; not starting",
                path.display()
            ),
            PidFileError::Io { path, error } => write!(
                f,
                "cannot write pid file {}: {}",
                path.display(),
                crate::os_error_text(error)
            ),
        }
    }
}

impl std::error::Error for PidFileError {}

impl PidFile {
    /// Locks `path` (creating it if needed) and writes this process's pid into it.
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        let io_error = |error| PidFileError::Io {
            path: path.to_path_buf(),
            error,
        };
        // No O_TRUNC: the file may belong to a live instance until the lock says otherwise.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(io_error)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(PidFileError::Locked {
                    path: path.to_path_buf(),
                    pid: read_pid(&mut file),
                })
            }
            Err((_, errno)) => return Err(io_error(errno.into())),
        };
        // The lock is ours: whatever is inside is stale.
        lock.set_len(0).map_err(io_error)?;
        lock.rewind().map_err(io_error)?;
        writeln!(lock, "{}", std::process::id()).map_err(io_error)?;
        lock.sync_data().map_err(io_error)?;
        Ok(PidFile {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Removed while the lock is still held, so no other instance's fresh file is deleted.
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove pid file {}: {e}", self.path.display());
        }
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

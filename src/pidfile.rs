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
    lock: Flock<File>,
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
    /// Locks `path` (creating it if needed), before anything is bound: a second instance must
    /// be told about the pid file, not about a port conflict, and with `reuse_port` it must
    /// never join the live instance's listeners. The pid is written later ([`write_pid`]).
    ///
    /// [`write_pid`]: PidFile::write_pid
    pub fn lock(path: &Path) -> Result<PidFile, PidFileError> {
        // A live instance may unlink the file between our open and our flock; then our lock
        // would guard a deleted file. Check it is still the file at `path`, else try again.
        for _ in 0..3 {
            let lock = Self::open_and_lock(path)?;
            if still_at_path(&lock, path) {
                return Ok(PidFile {
                    path: path.to_path_buf(),
                    lock,
                });
            }
        }
        Err(PidFileError::Io {
            path: path.to_path_buf(),
            error: io::Error::other("it keeps being replaced while we lock it"),
        })
    }

    fn open_and_lock(path: &Path) -> Result<Flock<File>, PidFileError> {
        let io_error = |error| PidFileError::Io {
            path: path.to_path_buf(),
            error,
        };
        // No O_TRUNC: the file may belong to a live instance until the lock says otherwise.
        // O_NOFOLLOW: as root, a symlink planted there must not make us truncate its target.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_error)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(lock),
            Err((mut file, Errno::EWOULDBLOCK)) => Err(PidFileError::Locked {
                path: path.to_path_buf(),
                pid: read_pid(&mut file),
            }),
            Err((_, errno)) => Err(io_error(errno.into())),
        }
    }

    /// Writes this process's pid (call once listening, with signal handlers installed, so a
    /// script that signals the pid as soon as it appears does not kill us).
    pub fn write_pid(&mut self) -> Result<(), PidFileError> {
        let io_error = |error| PidFileError::Io {
            path: self.path.clone(),
            error,
        };
        // The lock is ours: whatever is inside is stale.
        self.lock.set_len(0).map_err(io_error)?;
        self.lock.rewind().map_err(io_error)?;
        writeln!(self.lock, "{}", std::process::id()).map_err(io_error)?;
        self.lock.sync_data().map_err(io_error)
    }
}

/// True if `file` is the file `path` names now (same device and inode).
fn still_at_path(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
        _ => false,
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

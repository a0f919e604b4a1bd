//! The pid file: where supervisors and scripts find the parent's pid, and the lock that keeps
//! two instances from claiming the same one.
//!
//! The file is locked with `flock` for the daemon's whole life, so "is another instance
//! running?" is answered by the kernel, not by guessing whether the pid written inside is
//! still alive (pids are reused). It is opened without `O_TRUNC` and truncated only once the
//! lock is ours: a second instance that fails to get the lock leaves the live instance's file
//! exactly as it was. The lock dies with the process, so a crash leaves a stale file that the
//! next start simply takes over.
//!
//! # What is never touched
//! The path comes from an operator, and forkecho often runs as root, so a wrong path must not
//! cost anything. Only a regular file is ever opened for writing: a symlink, FIFO, device,
//! socket or directory there is refused (`pid file /x is a FIFO, not a regular file`), found
//! by `lstat` before opening (opening some devices has effects) and confirmed by `fstat` on
//! the opened descriptor (`O_NONBLOCK`, so a FIFO cannot block the open). A regular file is
//! taken over only if it is empty or holds a pid; anything else is someone's data and is
//! refused untouched. Two kinds of "regular file" that hold a number are refused as well: a
//! file of a kernel pseudo-filesystem (`/proc/sys/kernel/pid_max` is a setting, not a pid
//! file; found by `fstatfs`, and by a size that does not match what it reads), and a file
//! whose pid is a running process that is not forkecho (`/run/sshd.pid` given by mistake;
//! as PostgreSQL refuses a lock file naming a live process). Afterwards only what this process still holds is changed: at exit the
//! pid is emptied through the held descriptor, and the path is removed only if it still names
//! that same file (device and inode), and, after a failed start, only if this process created it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Longest content still read as a pid file: a pid with some whitespace around it.
const MAX_PID_TEXT: usize = 64;
/// How much of a refused file's content the refusal quotes.
const QUOTED_PREFIX: usize = 32;

/// A pid file we hold the lock on. Dropping it (a failed start) empties it if it holds our pid
/// and removes it only if we created it; [`remove`](PidFile::remove) ends a run that started.
/// Only in the parent: children never run destructors, they `_exit`.
pub struct PidFile {
    path: PathBuf,
    /// Open for the whole life of the daemon: closing it would release the lock.
    lock: Flock<File>,
    /// True if the path is removed when this is dropped: we created the file, or the daemon
    /// ran and is stopping.
    remove_on_drop: bool,
    /// Our pid may be in the file: it must not outlive us.
    written: bool,
}

/// Why the pid file could not be taken.
#[derive(Debug)]
pub enum PidFileError {
    /// Another process holds the lock; `pid` is what its file says, if readable.
    Locked {
        path: PathBuf,
        pid: Option<u32>,
    },
    /// Something other than a regular file is there; `kind` says what ("a FIFO").
    NotRegular {
        path: PathBuf,
        kind: &'static str,
    },
    /// A regular file holding something other than a pid; `start` is its first bytes,
    /// escaped to printable ASCII.
    NotAPid {
        path: PathBuf,
        start: String,
    },
    /// The pid inside is a running process, and not a forkecho (`name` is its command name).
    OtherProcess {
        path: PathBuf,
        pid: u32,
        name: String,
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
            PidFileError::NotRegular { path, kind } => write!(
                f,
                "pid file {} is {kind}, not a regular file; not starting",
                path.display()
            ),
            PidFileError::NotAPid { path, start } => write!(
                f,
                "pid file {} holds \"{start}\", not a pid; not starting (remove it if it is \
                 stale)",
                path.display()
            ),
            PidFileError::OtherProcess { path, pid, name } => write!(
                f,
                "pid file {} holds pid {pid}, a running `{name}`, not forkecho; not starting \
                 (no forkecho holds its lock: if it is a stale file whose pid was reused, \
                 remove it)",
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

/// What [`PidFile::lock`] would refuse in the file now at `path`, found without creating,
/// locking or changing anything (for `--check-config`): a file that is not regular, holds
/// something other than a pid, or names a running program other than forkecho. A missing
/// file is fine. (A lock held by a running forkecho is not a problem here: the check runs
/// beside the instance it is about to reload.)
pub fn inspect(path: &Path) -> Result<(), PidFileError> {
    refuse_unless_regular(path, std::fs::symlink_metadata(path))?;
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path, e)),
    };
    let metadata = file.metadata().map_err(|e| io_error(path, e))?;
    if !metadata.is_file() {
        return Err(PidFileError::NotRegular {
            path: path.to_path_buf(),
            kind: crate::file_kind(metadata.file_type()),
        });
    }
    refuse_unless_pid(&file, path)
}

impl PidFile {
    /// Locks `path` (creating it if needed), before anything is bound: a second instance must
    /// be told about the pid file, not about a port conflict, and with `reuse_port` it must
    /// never join the live instance's listeners. The pid is written later ([`write_pid`]).
    /// Refuses anything but a regular file that is empty or holds a pid (module docs).
    ///
    /// [`write_pid`]: PidFile::write_pid
    pub fn lock(path: &Path) -> Result<PidFile, PidFileError> {
        // A live instance may unlink the file between our open and our flock; then our lock
        // would guard a deleted file. Check it is still the file at `path`, else try again.
        for _ in 0..3 {
            let (lock, created) = Self::open_and_lock(path)?;
            if still_at_path(&lock, path) {
                if !created {
                    refuse_unless_pid(&lock, path)?;
                }
                return Ok(PidFile {
                    path: path.to_path_buf(),
                    lock,
                    remove_on_drop: created,
                    written: false,
                });
            }
        }
        Err(io_error(
            path,
            io::Error::other("it keeps being replaced while we lock it"),
        ))
    }

    /// Opens (or creates) the regular file at `path` and locks it; `true` if we created it.
    fn open_and_lock(path: &Path) -> Result<(Flock<File>, bool), PidFileError> {
        refuse_unless_regular(path, std::fs::symlink_metadata(path))?;
        let (file, created) = open_or_create(path).map_err(|error| {
            // O_NOFOLLOW reports a symlink as ELOOP ("too many levels of symbolic links").
            match refuse_unless_regular(path, std::fs::symlink_metadata(path)) {
                Err(refusal) => refusal,
                Ok(()) => io_error(path, error),
            }
        })?;
        let opened = file.metadata().map_err(|e| io_error(path, e))?;
        if !opened.is_file() {
            return Err(PidFileError::NotRegular {
                path: path.to_path_buf(),
                kind: crate::file_kind(opened.file_type()),
            });
        }
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok((lock, created)),
            Err((file, Errno::EWOULDBLOCK)) => Err(PidFileError::Locked {
                path: path.to_path_buf(),
                pid: read_pid(&file),
            }),
            Err((_, errno)) => Err(io_error(path, errno.into())),
        }
    }

    /// The pid file the previous image passed on in an upgrade: its descriptor still holds
    /// the lock (a lock belongs to the open file description, which `execve` keeps).
    pub fn adopt(passed: &crate::upgrade::PassedFile) -> Result<PidFile, PidFileError> {
        let path = PathBuf::from(&passed.path);
        let fd = crate::upgrade::adopt(passed.fd).map_err(|e| io_error(&path, e))?;
        let lock = match Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, errno)) => return Err(io_error(&path, errno.into())),
        };
        Ok(PidFile {
            path,
            lock,
            remove_on_drop: true,
            written: passed.written,
        })
    }

    /// Writes this process's pid (call once listening, with signal handlers installed, so a
    /// script that signals the pid as soon as it appears does not kill us).
    pub fn write_pid(&mut self) -> Result<(), PidFileError> {
        let path = self.path.clone();
        // The lock is ours: whatever is inside is stale (a pid, checked by `lock`).
        self.written = true;
        self.lock.set_len(0).map_err(|e| io_error(&path, e))?;
        self.lock.rewind().map_err(|e| io_error(&path, e))?;
        writeln!(self.lock, "{}", std::process::id()).map_err(|e| io_error(&path, e))?;
        self.lock.sync_data().map_err(|e| io_error(&path, e))
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The daemon ran and stops: empty the file and remove it, if the path still names it.
    pub fn remove(mut self) {
        self.remove_on_drop = true;
        // `Drop` does the work, still holding the lock while it unlinks.
    }
}

impl AsFd for PidFile {
    /// The locked descriptor, which must stay open (e.g. through `--daemonize`'s close-all).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let path = self.path.display();
        // Emptied first, through the descriptor: if the unlink fails (after dropping root the
        // directory may not be ours), `kill $(cat …)` finds no pid rather than a stale one.
        if self.written {
            if let Err(e) = self.lock.set_len(0) {
                log::warn!("cannot empty pid file {path}: {}", crate::os_error_text(&e));
            }
        }
        if !self.remove_on_drop {
            return;
        }
        // The path may now name another instance's file (ours was removed and a new one made
        // by someone else): that one is not ours to delete. Checked while we hold our lock.
        if !still_at_path(&self.lock, &self.path) {
            log::warn!("pid file {path} is no longer the file this process locked; left it");
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            let why = crate::os_error_text(&e);
            log::warn!("cannot remove pid file {path}: {why} (it is left empty)");
        }
    }
}

/// Opens `path` read-write without following a symlink and without blocking on a FIFO,
/// creating it (0644) if it does not exist; `true` if this call created it.
fn open_or_create(path: &Path) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    // No O_TRUNC: the file may belong to a live instance until the lock says otherwise.
    options
        .read(true)
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    // Two steps so we know whether the file is ours; retried if it vanishes in between.
    let mut last_error = None;
    for _ in 0..3 {
        match options.clone().create_new(true).open(path) {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        match options.open(path) {
            Ok(file) => return Ok((file, false)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.expect("the loop ran"))
}

/// Refuses an existing non-regular file (from its `lstat`); a missing one is fine.
fn refuse_unless_regular(
    path: &Path,
    metadata: io::Result<std::fs::Metadata>,
) -> Result<(), PidFileError> {
    match metadata {
        Ok(m) if !m.is_file() => Err(PidFileError::NotRegular {
            path: path.to_path_buf(),
            kind: crate::file_kind(m.file_type()),
        }),
        _ => Ok(()),
    }
}

/// Refuses a file that is neither empty nor a pid (someone's data), a kernel file, and one
/// whose pid is a running process other than a forkecho.
fn refuse_unless_pid(file: &File, path: &Path) -> Result<(), PidFileError> {
    if let Some(kind) = pseudo_filesystem(file) {
        return Err(PidFileError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    let mut text = Vec::new();
    file.take(MAX_PID_TEXT as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| io_error(path, e))?;
    let size = file.metadata().map_err(|e| io_error(path, e))?.len();
    if size != text.len() as u64 && text.len() <= MAX_PID_TEXT {
        // What a kernel file looks like: procfs says 0 bytes, sysfs 4096.
        return Err(PidFileError::NotRegular {
            path: path.to_path_buf(),
            kind: "a kernel file (its size does not match what it reads)",
        });
    }
    if text.len() > MAX_PID_TEXT || !holds_pid_or_nothing(&text) {
        return Err(PidFileError::NotAPid {
            path: path.to_path_buf(),
            start: quoted_start(&text),
        });
    }
    match parse_pid(text.trim_ascii()).and_then(running_other_program) {
        Some((pid, name)) => Err(PidFileError::OtherProcess {
            path: path.to_path_buf(),
            pid,
            name,
        }),
        None => Ok(()),
    }
}

/// The kind of kernel pseudo-filesystem `file` lives on, if it does (`fstatfs`).
fn pseudo_filesystem(file: &File) -> Option<&'static str> {
    let stat = nix::sys::statfs::fstatfs(file).ok()?;
    let kind = stat.filesystem_type().0 as i64;
    const KINDS: [(i64, &str); 8] = [
        (0x9fa0, "a procfs file"),
        (0x6265_6572, "a sysfs file"),
        (0x6462_6720, "a debugfs file"),
        (0x7472_6163, "a tracefs file"),
        (0x0027_e0eb, "a cgroup file"),
        (0x6367_7270, "a cgroup2 file"),
        (0x7363_6673, "a securityfs file"),
        (0x6265_6570, "a configfs file"),
    ];
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, name)| *name)
}

/// `Some((pid, command name))` if `pid` is a running process that is not a forkecho, nor this
/// process, nor its parent (a supervisor restarting us after a crash may now have the pid
/// the dead forkecho had; PostgreSQL excepts its parent likewise). A forkecho that holds no
/// lock on the file is not running with it, so its pid may be taken over.
fn running_other_program(pid: u32) -> Option<(u32, String)> {
    if pid == std::process::id() || pid == std::os::unix::process::parent_id() {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let name = comm.trim_end();
    (!name.starts_with("forkecho")).then(|| (pid, name.escape_debug().to_string()))
}

/// True for an empty file or a decimal pid, with whitespace around it.
fn holds_pid_or_nothing(text: &[u8]) -> bool {
    let text = text.trim_ascii();
    text.is_empty() || parse_pid(text).is_some()
}

fn parse_pid(text: &[u8]) -> Option<u32> {
    let pid: u32 = std::str::from_utf8(text).ok()?.parse().ok()?;
    (text.iter().all(u8::is_ascii_digit) && pid > 0).then_some(pid)
}

/// The first bytes of `text`, escaped to printable ASCII (no terminal escapes reach the
/// operator's screen), with `...` if there is more.
fn quoted_start(text: &[u8]) -> String {
    let start = &text[..text.len().min(QUOTED_PREFIX)];
    let more = if text.len() > QUOTED_PREFIX {
        "..."
    } else {
        ""
    };
    format!("{}{more}", start.escape_ascii())
}

/// True if `file` is the file `path` names now (same device and inode).
fn still_at_path(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
        _ => false,
    }
}

/// The pid in a live instance's file, if it holds one (read from the start, bounded).
fn read_pid(file: &File) -> Option<u32> {
    use std::os::unix::fs::FileExt;
    let mut text = [0; MAX_PID_TEXT];
    let n = file.read_at(&mut text, 0).ok()?;
    parse_pid(text[..n].trim_ascii())
}

fn io_error(path: &Path, error: io::Error) -> PidFileError {
    PidFileError::Io {
        path: path.to_path_buf(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nothing_or_a_decimal_pid_is_a_pid_file() {
        for ok in ["", "\n", "  \n", "1234\n", " 42 ", "4194304"] {
            assert!(holds_pid_or_nothing(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "0\n",
            "-1",
            "+5",
            "12 34",
            "1234\nold junk\n",
            "abc",
            "99999999999",
        ] {
            assert!(!holds_pid_or_nothing(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn a_refusal_quotes_a_short_printable_start() {
        assert_eq!(quoted_start(b"root:x:0"), "root:x:0");
        assert_eq!(quoted_start(b"a\x1b[31m\"\n\xff"), "a\\x1b[31m\\\"\\n\\xff");
        let long = quoted_start(&[b'x'; 100]);
        assert_eq!(long, format!("{}...", "x".repeat(QUOTED_PREFIX)));
    }
}

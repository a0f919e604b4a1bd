//! The files an operator points forkecho at (`pid_file`, `log_file`) and the descriptors
//! `--daemonize` keeps: what is not a plain file of ours is refused and left as it was, what
//! is ours is cleaned up, and nothing inherited keeps a caller waiting.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use nix::sys::signal::Signal;
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::mkfifo;

use crate::util::*;

fn text(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

fn make_fifo(path: &Path) {
    mkfifo(path, Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// Runs forkecho with `args` on a free port and returns its stderr, asserting exit 1.
fn refused_start(args: &[&str]) -> String {
    let mut all = vec!["-l", "127.0.0.1:0"];
    all.extend_from_slice(args);
    expect_exit(&run(&all), 1)
}

/// A FIFO at the pid-file path is refused before anything is opened for writing, and is
/// still there afterwards: never opened, truncated or unlinked.
#[test]
fn pid_file_that_is_a_fifo_is_refused_and_kept() {
    let dir = TempDir::new();
    let fifo = dir.path().join("forkecho.pid");
    make_fifo(&fifo);
    let err = refused_start(&["--pid-file", &text(&fifo)]);
    assert!(
        err.contains(&format!(
            "pid file {} is a FIFO, not a regular file; not starting",
            fifo.display()
        )),
        "{err}"
    );
    let still = std::fs::symlink_metadata(&fifo).expect("the FIFO was removed");
    assert!(still.file_type().is_fifo());
}

/// A character device at the pid-file path (our own copy of /dev/null's device number, never
/// the real one) is refused and survives: as root, `--pid-file /dev/null` must not delete it.
#[test]
fn pid_file_that_is_a_character_device_is_refused_and_kept() {
    let dir = TempDir::new();
    let device = dir.path().join("null");
    let null = std::fs::metadata("/dev/null").unwrap();
    let mode = Mode::from_bits_truncate(0o666);
    if let Err(e) = mknod(&device, SFlag::S_IFCHR, mode, null.rdev()) {
        eprintln!("skipping the character device test: mknod: {e} (needs root)");
        return;
    }
    let err = refused_start(&["--pid-file", &text(&device)]);
    assert!(
        err.contains("is a character device, not a regular file; not starting"),
        "{err}"
    );
    let still = std::fs::symlink_metadata(&device).expect("the device node was removed");
    assert!(still.file_type().is_char_device());
    assert_eq!(still.rdev(), null.rdev());
}

/// A regular file holding something other than a pid (a mistyped path naming someone's data)
/// is refused with a short, escaped quote of its start, and left byte for byte as it was.
#[test]
fn pid_file_holding_other_data_is_refused_untouched() {
    let dir = TempDir::new();
    let path = dir.path().join("precious.conf");
    let content = b"\x1b[2J# settings\nkey = value\nmore = lines that go on and on\n";
    std::fs::write(&path, content).unwrap();
    let err = refused_start(&["--pid-file", &text(&path)]);
    assert!(
        err.contains(&format!(
            "pid file {} holds \"\\x1b[2J# settings\\nkey = value\\nmore ...\", not a pid",
            path.display()
        )),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "a terminal escape reached stderr");
    assert_eq!(std::fs::read(&path).unwrap(), content);
}

/// An empty file, or one holding only a pid and whitespace, is a pid file and is taken over.
#[test]
fn empty_or_pid_only_files_are_taken_over() {
    for stale in ["", "999999999 \n\n"] {
        let dir = TempDir::new();
        let path = dir.path().join("forkecho.pid");
        std::fs::write(&path, stale).unwrap();
        let server = Server::builder().args(["--pid-file", &text(&path)]).start();
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written, format!("{}\n", server.pid()), "after {stale:?}");
    }
}

/// A symlink at the pid-file path is refused as one (not "too many levels of symbolic
/// links"), and neither it nor its target is touched.
#[test]
fn pid_file_that_is_a_symlink_is_refused_as_one() {
    let dir = TempDir::new();
    let target = dir.path().join("target");
    std::fs::write(&target, "keep me").unwrap();
    let link = dir.path().join("forkecho.pid");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = refused_start(&["--pid-file", &text(&link)]);
    assert!(
        err.contains(&format!(
            "pid file {} is a symbolic link, not a regular file",
            link.display()
        )),
        "{err}"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
}

/// An instance whose pid file was deleted and re-made by a second instance leaves the
/// second one's file alone when it stops: a third instance is still refused.
#[test]
fn exit_leaves_a_pid_file_that_is_no_longer_ours() {
    let dir = TempDir::new();
    let path = dir.path().join("forkecho.pid");
    let mut first = Server::builder().args(["--pid-file", &text(&path)]).start();
    std::fs::remove_file(&path).unwrap();
    // A control socket of its own: the one beside the pid file is the first's, which answers.
    let second_control = dir.path().join("second.ctl");
    let second = Server::builder()
        .args(["--pid-file", &text(&path)])
        .args(["--control-socket", &text(&second_control)])
        .start();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", second.pid())
    );

    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit(WAIT).success());
    assert_eq!(
        std::fs::read_to_string(&path).expect("the second instance's pid file was removed"),
        format!("{}\n", second.pid())
    );
    let err = refused_start(&["--pid-file", &text(&path)]);
    assert!(
        err.contains(&format!(
            "locked by another running forkecho (pid {})",
            second.pid()
        )),
        "{err}"
    );
}

/// After dropping root the pid file's directory may not be writable, so the file cannot be
/// removed at exit: it is emptied instead, and `kill $(cat …)` finds no stale pid.
#[test]
fn pid_file_that_cannot_be_removed_is_emptied() {
    if !is_root_or_skip("pid_file_that_cannot_be_removed: only root can switch users") {
        return;
    }
    let dir = TempDir::new();
    // Root's directory, which nobody may not write to.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("forkecho.pid");
    let mut server = Server::builder()
        .args(["--user", "nobody", "--pid-file", &text(&path)])
        .start();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", server.pid())
    );
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "",
        "a stale pid is left in the pid file"
    );
    let warning = server.wait_for_line("cannot remove pid file");
    assert!(warning.contains("permission denied"), "{warning}");
}

/// The reader of a pipe: everything until EOF, sent once EOF comes.
fn read_to_eof_in_background(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = pipe.read_to_end(&mut all);
        let _ = tx.send(all);
    });
    rx
}

/// `--daemonize` closes what it inherited: a caller capturing its output
/// (`out=$(forkecho --daemonize …)`), or holding any other pipe the daemon inherited, sees EOF
/// once the command returns, not once the daemon dies, and the daemon goes on serving.
#[test]
fn daemonize_does_not_keep_inherited_descriptors() {
    const EXTRA_FD: i32 = 9;
    let dir = TempDir::new();
    let pid_path = dir.path().join("d.pid");
    let log_path = dir.path().join("d.log");
    let (extra_read, extra_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let inherited = extra_write.as_raw_fd();
    let mut command = Command::new(BIN);
    command
        .args(["--daemonize", "-l", "127.0.0.1:0"])
        .args([
            "--pid-file",
            &text(&pid_path),
            "--log-file",
            &text(&log_path),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Safe: dup2 and fcntl are async-signal-safe. The pipe is made close-on-exec so that no
    // other test's child inherits it; only this one gets it, as fd 9, without the flag.
    unsafe {
        command.pre_exec(move || {
            let ok = if inherited == EXTRA_FD {
                libc::fcntl(EXTRA_FD, libc::F_SETFD, 0) != -1
            } else {
                libc::dup2(inherited, EXTRA_FD) != -1
            };
            ok.then_some(()).ok_or_else(std::io::Error::last_os_error)
        })
    };
    let mut starter = command.spawn().expect("spawn forkecho --daemonize");
    drop(extra_write);
    let stdout = read_to_eof_in_background(starter.stdout.take().unwrap());
    let stderr = read_to_eof_in_background(starter.stderr.take().unwrap());
    let extra = read_to_eof_in_background(std::fs::File::from(extra_read));

    let finished = wait_until(WAIT, || starter.try_wait().unwrap().is_some());
    let status = starter.try_wait().unwrap();
    assert!(finished && status.unwrap().success(), "{status:?}");
    let _daemon = KillOnDrop::daemon_in(&pid_path);
    for (name, pipe) in [("stdout", stdout), ("stderr", stderr), ("fd 9", extra)] {
        assert!(
            pipe.recv_timeout(WAIT).is_ok(),
            "no EOF on the starter's {name}: the daemon still holds it"
        );
    }
    let mut client = connect(listening_address_in(&log_path));
    expect_banner(&mut client);
    assert_eq!(echo_roundtrip(&mut client, b"detached\n"), b"detached\n");
}

/// Without `--daemonize`, every line after the start goes to `log_file`, `running as …`
/// (logged once root is dropped) included; the terminal gets nothing.
#[test]
fn running_as_line_goes_to_the_log_file() {
    if !is_root_or_skip("running_as_line_goes_to_the_log_file: only root can switch users") {
        return;
    }
    let dir = TempDir::new();
    let log = dir.path().join("forkecho.log");
    let (terminal, theirs) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut server = Server::builder()
        .args(["--user", "nobody"])
        .log_file(&log)
        .env("RUST_LOG", "info")
        .stderr(theirs)
        .start();
    let terminal = read_to_eof_in_background(std::fs::File::from(terminal));
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
    let terminal = String::from_utf8(terminal.recv_timeout(WAIT).unwrap()).unwrap();
    assert_eq!(
        terminal, "",
        "lines on the terminal once the log file was set"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("running as nobody"), "{logged}");
}

/// A `log_file` that is a FIFO (with no reader, an open for writing would wait forever) is
/// refused at once with exit 1; a directory is refused the same way.
#[test]
fn log_file_that_is_not_a_regular_file_is_refused() {
    let dir = TempDir::new();
    let fifo = dir.path().join("forkecho.log");
    make_fifo(&fifo);
    let err = refused_start(&["--log-file", &text(&fifo)]);
    assert!(
        err.contains(&format!(
            "log file {} is a FIFO, not a regular file",
            fifo.display()
        )),
        "{err}"
    );
    let sub: PathBuf = dir.path().join("logs");
    std::fs::create_dir(&sub).unwrap();
    let err = refused_start(&["--log-file", &text(&sub)]);
    assert!(err.contains("is a directory, not a regular file"), "{err}");
}

/// procfs (and sysfs) files are "regular files" to stat and often hold a number: a pid file
/// path naming one (a kernel setting, by mistake) is refused and never written. The victim
/// here is harmless: a helper process's coredump_filter.
#[test]
fn pid_file_on_procfs_is_refused_untouched() {
    let mut helper = std::process::Command::new("sleep")
        .arg("30")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(nix::unistd::Pid::from_raw(helper.id() as i32));
    let path = format!("/proc/{}/coredump_filter", helper.id());
    let before = std::fs::read_to_string(&path).unwrap();
    let out = run(&["-l", "127.0.0.1:0", "--pid-file", &path]);
    let after = std::fs::read_to_string(&path).unwrap();
    let _ = helper.kill();
    let _ = helper.wait();
    assert_eq!(before, after, "the procfs file at pid_file was written");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is a procfs file, not a regular file"),
        "{stderr}"
    );
}

/// A pid file naming a running process that is not forkecho (another daemon's pid file,
/// given by mistake) is refused and left as it is.
#[test]
fn pid_file_of_another_running_program_is_refused_untouched() {
    let mut helper = std::process::Command::new("sleep")
        .arg("30")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(nix::unistd::Pid::from_raw(helper.id() as i32));
    // The pid names `sleep` once it has exec'd (before, it is this test binary's copy).
    let comm = format!("/proc/{}/comm", helper.id());
    assert!(wait_until(WAIT, || std::fs::read_to_string(&comm)
        .is_ok_and(|c| c.trim_end() == "sleep")));
    let dir = TempDir::new();
    let path = dir.path().join("sleep.pid");
    let content = format!("{}\n", helper.id());
    std::fs::write(&path, &content).unwrap();
    let out = run(&["-l", "127.0.0.1:0", "--pid-file", path.to_str().unwrap()]);
    let _ = helper.kill();
    let _ = helper.wait();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "holds pid {}, a running `sleep`, not forkecho",
            helper.id()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
}

//! Adversarial review of UNIX-domain listeners (`listen = ["unix:/path"]`): each test shows one
//! defect a user would see, and fails until it is fixed. Each says what it expects and why.
//!
//! A server given only a UNIX-domain address also listens on 127.0.0.1 port 0: the harness
//! knows a server is up from its `listening on IP:PORT` lines.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::util::*;

/// `unix:<path>`, as `-l` and `listen` take it.
fn unix_addr(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// Connects to the UNIX-domain socket at `path` and reads until the server closes.
fn read_all_from(path: &Path) -> String {
    let mut stream =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// Connects to the UNIX-domain socket at `path` and reads the default banner's length.
fn banner_from(path: &Path) -> Vec<u8> {
    let mut stream =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut banner = vec![0; BANNER.len()];
    stream.read_exact(&mut banner).unwrap();
    banner
}

/// A copy of the binary that user 65534 may execute, in a directory of its own.
fn binary_nobody_may_run() -> (TempDir, PathBuf) {
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = dir.path().join("forkecho");
    copy_binary_to(&program);
    (dir, program)
}

/// Runs `program` with `args` as uid/gid 65534 to completion (killed after `WAIT` if it
/// serves instead of exiting).
fn run_as_nobody(program: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(Pid::from_raw(child.id() as i32));
    let exited = wait_until(WAIT, || child.try_wait().unwrap().is_some());
    if !exited {
        drop(guard);
    } else {
        std::mem::forget(guard);
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited, "forkecho {args:?} as nobody did not exit: {out:?}");
    out
}

/// `unix_socket_mode = 440` (a TOML integer written in decimal, as a user who means 0440
/// writes it) was taken as decimal 440 = 0o670: the socket file got mode 0670, letting the
/// file's group connect, where 0440 lets nobody but root. `--check-config` said OK. The key
/// is documented as octal; an integer not written `0o...` must be refused (exit 2, naming
/// the key) or read as the octal digits it shows, never silently widened.
#[test]
fn a_mode_written_as_a_decimal_integer_does_not_silently_grant_other_permissions() {
    let dir = TempDir::new();
    let socket = dir.path().join("mode.sock");
    let config = format!(
        "listen = [\"{}\", \"127.0.0.1:0\"]\nunix_socket_mode = 440\n",
        unix_addr(&socket)
    );
    match Server::builder().config(&config).try_start() {
        Err((status, stderr)) => {
            assert_eq!(status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("unix_socket_mode"), "{stderr}");
        }
        Ok(_server) => {
            let mode = std::fs::symlink_metadata(&socket)
                .unwrap()
                .permissions()
                .mode()
                & 0o7777;
            assert_eq!(format!("{mode:04o}"), "0440", "unix_socket_mode = 440");
        }
    }
}

/// `--check-config` is "what the host would refuse at start" (and it checks that a pid or
/// log file's directory is writable), but for a UNIX-domain socket in a directory the
/// server's user cannot write it said "configuration OK"; the start then failed (exit 1,
/// "cannot listen on unix:...: permission denied").
#[test]
fn check_config_refuses_a_socket_in_a_directory_the_server_cannot_write() {
    if !is_root_or_skip("only root can run the check as another user") {
        return;
    }
    let (bin_dir, program) = binary_nobody_may_run();
    // Root's, 0755: user 65534 may enter it, not create a file in it.
    let socket = bin_dir.path().join("forkecho.sock");
    let addr = unix_addr(&socket);
    let start = run_as_nobody(&program, &["-l", &addr]);
    let why = expect_exit(&start, 1);
    assert!(why.contains("permission denied"), "the start: {why}");
    let check = run_as_nobody(&program, &["-l", &addr, "--check-config"]);
    let err = expect_exit(&check, 2);
    assert!(err.contains("key `listen`"), "{err}");
    assert!(err.contains(&addr), "{err}");
}

/// The same for `unix_socket_owner`: a user that may not give the file away (not root) is
/// told "configuration OK" by `--check-config`, and the start fails (exit 1, "chown:
/// operation not permitted").
#[test]
fn check_config_refuses_a_socket_owner_the_server_cannot_set() {
    if !is_root_or_skip("only root can run the check as another user") {
        return;
    }
    let (bin_dir, program) = binary_nobody_may_run();
    let writable = bin_dir.path().join("open");
    std::fs::create_dir(&writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
    let addr = unix_addr(&writable.join("owned.sock"));
    let args = ["-l", addr.as_str(), "--unix-socket-owner", "0"];
    let start = run_as_nobody(&program, &args);
    let why = expect_exit(&start, 1);
    assert!(why.contains("chown"), "the start: {why}");
    let check = run_as_nobody(&program, &[&args[..], &["--check-config"]].concat());
    let err = expect_exit(&check, 2);
    assert!(err.contains("unix_socket_owner"), "{err}");
}

/// A reload that names the socket the server listens on by another path to the same file
/// (`/var/run` → `/run`, a symlinked directory) was refused: "cannot listen on unix:...: a
/// server is listening on it", the server being forkecho itself, whose stale-socket probe had
/// connected to its own listener, so that the parent also accepted and forked a session for
/// its own probe (`accepted uid:0,gid:0,pid:<its own pid>`). The file is the one it made:
/// the reload should keep (or swap) that listener, and never connect to itself.
#[test]
fn a_reload_naming_the_same_socket_by_another_path_keeps_serving_it() {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
    let by_link = dir.path().join("link/s.sock");
    let by_real = dir.path().join("real/s.sock");
    let config = |path: &Path| format!("listen = [\"{}\", \"127.0.0.1:0\"]\n", unix_addr(path));
    let server = Server::builder().config(&config(&by_link)).start();
    server.rewrite_config(&config(&by_real));
    server.signal(Signal::SIGHUP);
    server.wait_for_log("the reload's outcome", WAIT, |lines| {
        lines
            .iter()
            .any(|l| l.contains("reloaded configuration") || l.contains("reload refused"))
    });
    assert_eq!(
        server.count_lines("reload refused"),
        0,
        "{}",
        server.log_text()
    );
    assert_eq!(banner_from(&by_real), BANNER, "no session at the new path");
    let own = format!(",pid:{} ", server.pid());
    assert!(
        !server.log_lines().iter().any(|l| l.contains(&own)),
        "the server connected to itself:\n{}",
        server.log_text()
    );
}

/// ucspi-unix's `unixserver` (and `unixexec`) set UNIXLOCALPID with getpid() in the process
/// that execs the program: it is the program's own pid. forkecho gave its parent's pid, so a
/// program written for ucspi-unix that signals or watches "its server process" by that
/// variable reaches the forkecho parent instead.
#[test]
fn unixlocalpid_is_the_programs_own_pid_as_ucspi_unix_sets_it() {
    let dir = TempDir::new();
    let socket = dir.path().join("exec.sock");
    let addr = unix_addr(&socket);
    let server = exec_server(
        &["-l", &addr, "-l", "127.0.0.1:0", "--banner", ""],
        &["/bin/sh", "-c", "echo \"$UNIXLOCALPID $$\""],
    )
    .start();
    let line = read_all_from(&socket);
    let pids: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(pids.len(), 2, "{line:?}");
    assert_ne!(
        pids[0],
        server.pid().to_string(),
        "UNIXLOCALPID is the parent's"
    );
    assert_eq!(pids[0], pids[1], "UNIXLOCALPID is not the program's pid");
}

/// A second forkecho started on the path of a live one is refused, as documented, but its
/// stale-socket probe is a real connection: the live server accepted it, forked a session
/// (and in exec mode ran its program) for a client that had already gone. "A live server's
/// socket is left as it is" should hold for the server too: telling a live socket from a
/// stale one must not start a session on it.
#[test]
fn a_refused_second_start_does_not_start_a_session_on_the_live_server() {
    let dir = TempDir::new();
    let socket = dir.path().join("live.sock");
    let addr = unix_addr(&socket);
    // The UNIX-domain listener first: the loop accepts from its listeners in this order.
    let server = Server::builder()
        .args(["-l", &addr, "-l", "127.0.0.1:0"])
        .start();
    let second = run(&["-l", &addr]);
    let why = expect_exit(&second, 1);
    assert!(why.contains("a server is listening on it"), "{why}");
    // A TCP client after the second start: once it is accepted, so is anything queued on
    // the UNIX-domain listener before it.
    let marker = server.connect_greeted();
    let marker_addr = marker.local_addr().unwrap();
    server.wait_for_line(&format!("accepted {marker_addr}"));
    assert_eq!(
        server.count_lines("accepted uid:"),
        0,
        "the probe became a session:\n{}",
        server.log_text()
    );
}

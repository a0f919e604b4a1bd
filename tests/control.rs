//! The control commands as an operator uses them: `forkecho -c FILE status | reload |
//! stop [--mode M] | reopen-logs` (or `--pid-file P` / `--control-socket S` instead of `-c`),
//! run as the real binary against a real server. What is asserted is what the operator sees:
//! the exit code (0 done, 1 refused or failed, 2 no way to find the server, 3 no server
//! running), the text on stdout or stderr, and what the server then does (serves the new or
//! the old configuration, has exited, has removed its pid file and control socket, logs to the
//! new file).
//!
//! Who may ask: root and the server's user. A second uid is `nobody` (65534), running a copy
//! of the binary from a 0755 directory; the deployments' directories are 0755 so that it can
//! reach them.

use crate::util::*;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The second user, who may not control a server run by root.
const NOBODY: u32 = 65534;

/// The `name: value` lines of a `status` answer.
fn status_fields(out: &Output) -> BTreeMap<String, String> {
    stdout(out)
        .lines()
        .filter_map(|line| line.split_once(": ").or_else(|| line.split_once(':')))
        .map(|(name, value)| (name.to_string(), value.trim().to_string()))
        .collect()
}

/// `status` through `deployment`, which must succeed; its fields.
fn status_of(deployment: &ConfigDeployment) -> BTreeMap<String, String> {
    let out = deployment.ctl(&["status"]);
    expect_exit(&out, 0);
    status_fields(&out)
}

/// The field `name` of a status, which must be there.
fn field<'a>(fields: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    fields
        .get(name)
        .unwrap_or_else(|| panic!("no `{name}` in the status: {fields:?}"))
}

/// The pid in the pid file.
fn pid_in(path: &Path) -> Pid {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    Pid::from_raw(
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("pid file {text:?}: {e}")),
    )
}

/// Connects to the server, reads the banner `banner` and checks an echo: a new client is
/// served with this banner.
fn assert_served_with_banner(server: &Server, banner: &[u8]) {
    let mut s = server.connect();
    assert_eq!(read_exactly(&mut s, banner.len()), banner, "banner");
    assert_eq!(echo_roundtrip(&mut s, b"ping\n"), b"ping\n");
}

/// The peer the server logs for a command this test process runs as `uid`/`gid`: everything
/// before the command's own pid.
fn peer_prefix(uid: u32, gid: u32) -> String {
    format!("from uid:{uid},gid:{gid},pid:")
}

// ---- Another user ----

/// A copy of the binary that `nobody` may execute, in a 0755 directory (the build tree may
/// not be reachable for it).
fn binary_for_nobody() -> (TempDir, PathBuf) {
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = dir.path().join("forkecho");
    copy_binary_to(&program);
    (dir, program)
}

/// Runs `program args` as `uid`/`gid` to completion (killed by pid after `WAIT` if it does
/// not end).
fn run_as(program: &Path, uid: u32, gid: u32, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn forkecho as another user");
    let finished = wait_until(WAIT, || child.try_wait().unwrap().is_some());
    if !finished {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        finished,
        "forkecho {args:?} as uid {uid} did not exit: {out:?}"
    );
    out
}

// ---- status ----

/// `status` of a running server: exit 0, and each field says what the server is doing: its
/// pid (the one in the pid file), the config file it runs with, where it listens, one active
/// session, two accepted, one ended, the configured max_children. The command is logged with
/// who asked.
#[test]
fn status_reports_what_the_running_server_does() {
    let deployment = ConfigDeployment::new("max_children = 7");
    let server = deployment.start();
    // One session that ended, one that is open.
    let mut done = server.connect_greeted();
    assert_eq!(send_and_drain(&mut done, b"bye\n"), b"bye\n");
    server.wait_child_exit(done.local_addr().unwrap(), 0);
    let mut open = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut open, b"hi\n"), b"hi\n");

    let out = deployment.ctl(&["status"]);
    expect_exit(&out, 0);
    assert!(stderr(&out).is_empty(), "stderr: {}", stderr(&out));
    let fields = status_fields(&out);
    assert_eq!(field(&fields, "state"), "serving");
    assert_eq!(field(&fields, "pid"), server.pid().to_string());
    assert_eq!(pid_in(&deployment.pid_file()), server.pid());
    assert!(
        field(&fields, "version").starts_with(&format!("{} (commit ", env!("CARGO_PKG_VERSION"))),
        "{fields:?}"
    );
    assert_eq!(field(&fields, "config"), deployment.config_arg());
    assert_eq!(field(&fields, "listening"), server.addr().to_string());
    assert_eq!(field(&fields, "active"), "1");
    assert_eq!(field(&fields, "accepted"), "2");
    assert!(field(&fields, "ended").starts_with("1 "), "{fields:?}");
    assert!(field(&fields, "refused").starts_with("0 "), "{fields:?}");
    assert_eq!(field(&fields, "max_children"), "7");
    let uptime = field(&fields, "uptime");
    assert!(
        uptime.ends_with('s') && uptime.trim_end_matches('s').parse::<f64>().is_ok(),
        "uptime {uptime:?}"
    );
    server.wait_for_line(&format!(
        "control command `status` {}",
        peer_prefix(
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw()
        )
    ));

    // The session is still served after the command.
    assert_eq!(echo_roundtrip(&mut open, b"again\n"), b"again\n");
}

/// The server is found from the config file's pid_file, relative to the file's directory,
/// whatever directory the server and the command run in; the socket is `.ctl` beside the pid
/// file, a socket of mode 0600 owned by the server's user. `--pid-file` and
/// `--control-socket` find the same server; without any of them the command cannot locate it
/// (exit 2, naming control_socket).
#[test]
fn the_server_is_found_through_its_config_pid_file_or_socket() {
    let deployment = ConfigDeployment::new("");
    let elsewhere = TempDir::new();
    let cwd = elsewhere.path().to_path_buf();
    let server = deployment
        .builder()
        .tweak(move |cmd| {
            cmd.current_dir(cwd);
        })
        .start();

    let meta = std::fs::symlink_metadata(deployment.socket())
        .unwrap_or_else(|e| panic!("control socket beside the pid file: {e}"));
    use std::os::unix::fs::FileTypeExt;
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.mode() & 0o777, 0o600, "control socket mode");
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw(), "owner");
    assert!(
        !elsewhere.path().join("forkecho.ctl").exists(),
        "relative to the working directory"
    );

    let pid = server.pid().to_string();
    // The command run from yet another directory, with a relative -c.
    let relative = Command::new(BIN)
        .current_dir(deployment.dir.path())
        .args(["-c", "forkecho.toml", "status"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    expect_exit(&relative, 0);
    assert_eq!(field(&status_fields(&relative), "pid"), pid);
    for locator in [
        ["-c", deployment.config_arg()],
        ["--pid-file", deployment.pid_file().to_str().unwrap()],
        ["--control-socket", deployment.socket().to_str().unwrap()],
    ] {
        let out = run(&[locator[0], locator[1], "status"]);
        expect_exit(&out, 0);
        assert_eq!(field(&status_fields(&out), "pid"), pid, "{locator:?}");
    }

    // Nothing says where the server is.
    let out = run(&["status"]);
    let err = expect_exit(&out, 2);
    assert!(err.contains("control_socket"), "{err}");
    let bare = TempDir::new();
    let config = bare.path().join("bare.toml");
    std::fs::write(&config, "listen = [\"127.0.0.1:0\"]\n").unwrap();
    let out = run(&["-c", config.to_str().unwrap(), "status"]);
    let err = expect_exit(&out, 2);
    assert!(
        err.contains(config.to_str().unwrap()) && err.contains("control_socket"),
        "{err}"
    );
}

/// With nothing running, `status` exits 3 and says so on stdout (as `pg_ctl status` does),
/// whether the control socket does not exist (the pid file's server never started) or is a
/// stale file nothing listens on (its server was killed). `stop` and `reload` say the same.
#[test]
fn status_with_no_server_running_exits_3() {
    let dir = TempDir::new();
    let pid_file = dir.path().join("gone.pid");
    let out = run(&["--pid-file", pid_file.to_str().unwrap(), "status"]);
    expect_exit(&out, 3);
    assert!(stdout(&out).contains("no server"), "{}", stdout(&out));
    assert!(stderr(&out).is_empty(), "stderr: {}", stderr(&out));

    // A socket file left behind: nothing accepts on it any more.
    let stale = dir.path().join("stale.ctl");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    for command in [&["status"][..], &["stop"], &["reload"], &["reopen-logs"]] {
        let mut args = vec!["--control-socket", stale.to_str().unwrap()];
        args.extend_from_slice(command);
        let out = run(&args);
        expect_exit(&out, 3);
        assert!(
            stdout(&out).contains("no server"),
            "{command:?}: {}",
            stdout(&out)
        );
    }
    assert!(stale.exists(), "the command left the stale socket alone");

    // A server that was killed leaves its socket and pid file: still "no server".
    let deployment = ConfigDeployment::new("");
    let mut server = deployment.start();
    server.signal(Signal::SIGKILL);
    server.wait_exit(WAIT);
    assert!(
        deployment.socket().exists(),
        "a killed server cannot remove its socket"
    );
    let out = deployment.ctl(&["status"]);
    expect_exit(&out, 3);
    assert!(stdout(&out).contains("no server"), "{}", stdout(&out));
}

// ---- reload ----

/// `reload` of a valid, changed config: exit 0, stdout says `reloaded configuration` and what
/// changed, and new clients get the new banner from the same process.
#[test]
fn reload_applies_a_valid_changed_config() {
    let deployment = ConfigDeployment::new("banner = \"one\\n\"");
    let server = deployment.start();
    assert_served_with_banner(&server, b"one\n");

    deployment.write_config("banner = \"two\\n\"");
    let out = deployment.ctl(&["reload"]);
    expect_exit(&out, 0);
    let said = stdout(&out);
    assert!(said.contains("reloaded configuration"), "{said}");
    assert!(said.contains("banner"), "{said}");
    assert_served_with_banner(&server, b"two\n");
    assert_eq!(pid_in(&deployment.pid_file()), server.pid());
    server.wait_for_line("control command `reload`");

    // Nothing changed: still done.
    let out = deployment.ctl(&["reload"]);
    expect_exit(&out, 0);
    assert!(stdout(&out).contains("nothing changed"), "{}", stdout(&out));
}

/// `reload` of an invalid config: exit 1, stderr names the file, the key and the reason, stdout
/// says nothing; the server keeps serving with the old configuration (banner, max_children),
/// same process, same pid file.
#[test]
fn reload_of_an_invalid_config_is_refused_and_the_old_one_keeps_serving() {
    let deployment = ConfigDeployment::new("banner = \"old\\n\"\nmax_children = 9");
    let server = deployment.start();
    assert_served_with_banner(&server, b"old\n");

    deployment.write_config("banner = \"new\\n\"\nmax_children = \"many\"");
    let out = deployment.ctl(&["reload"]);
    let err = expect_exit(&out, 1);
    assert!(err.contains("reload refused"), "{err}");
    assert!(
        err.contains(deployment.config_arg()),
        "names the file: {err}"
    );
    assert!(err.contains("key `max_children`"), "names the key: {err}");
    assert!(err.contains("expected an integer"), "says why: {err}");
    assert!(stdout(&out).is_empty(), "stdout: {}", stdout(&out));

    assert_served_with_banner(&server, b"old\n");
    assert_eq!(pid_in(&deployment.pid_file()), server.pid());
    let fields = status_of(&deployment);
    assert_eq!(field(&fields, "max_children"), "9");
    assert_eq!(field(&fields, "state"), "serving");
    server.wait_for_line("reload refused");

    // Fixed: the next reload applies.
    deployment.write_config("banner = \"new\\n\"\nmax_children = 9");
    expect_exit(&deployment.ctl(&["reload"]), 0);
    assert_served_with_banner(&server, b"new\n");
}

/// A config broken in a key other than pid_file and control_socket (a wrong type, an unknown
/// key) still lets the operator ask and stop the server: the command reads only those two.
/// `reload` is what reports the breakage (exit 1).
#[test]
fn a_config_broken_elsewhere_still_allows_status_and_stop() {
    let deployment = ConfigDeployment::new("");
    let mut server = deployment.start();
    deployment.write_config("max_children = \"lots\"\nno_such_key = 1");

    let fields = status_of(&deployment);
    assert_eq!(field(&fields, "pid"), server.pid().to_string());
    let err = expect_exit(&deployment.ctl(&["reload"]), 1);
    assert!(
        err.contains("max_children") || err.contains("no_such_key"),
        "{err}"
    );

    let out = deployment.ctl(&["stop"]);
    expect_exit(&out, 0);
    assert!(server.wait_exit(WAIT).success());
}

/// A config file whose TOML no longer parses (an unclosed string in `banner`, far from
/// pid_file) still lets the operator ask and stop the server it names, as a value error
/// elsewhere does: the pid_file line is intact. `reload` is what reports the breakage.
#[test]
fn a_config_with_a_syntax_error_elsewhere_still_allows_status_and_stop() {
    let deployment = ConfigDeployment::new("");
    let mut server = deployment.start();
    deployment.write_config("banner = \"unclosed");

    let out = deployment.ctl(&["status"]);
    expect_exit(&out, 0);
    assert_eq!(field(&status_fields(&out), "pid"), server.pid().to_string());
    let out = deployment.ctl(&["stop"]);
    expect_exit(&out, 0);
    assert!(server.wait_exit(WAIT).success());
}

// ---- stop ----

/// `stop` (smart) lets an open session finish: the command waits while the session runs (the
/// session is still echoed), returns 0 once it closed, and by then the server has exited and
/// its pid file and control socket are gone.
#[test]
fn stop_smart_waits_for_an_open_session_to_finish() {
    let deployment = ConfigDeployment::new("shutdown_timeout = 60");
    let mut server = deployment.start();
    let mut session = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut session, b"1\n"), b"1\n");

    let stop = deployment.ctl_in_background(&["stop"]);
    server.wait_for_line("control command `stop smart`");
    server.wait_for_line("shutting down on the stop command");
    // The session goes on, and the command waits for it.
    assert_eq!(echo_roundtrip(&mut session, b"2\n"), b"2\n");
    assert!(
        !stop.is_finished(),
        "stop returned while a session was open"
    );
    assert!(server.is_running());
    assert!(deployment.pid_file().exists() && deployment.socket().exists());

    // Closed from this thread while the command waits in its own.
    assert_eq!(send_and_drain(&mut session, b"3\n"), b"3\n");
    drop(session);
    let out = stop.join().unwrap();
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains("shutting down (smart shutdown)"),
        "{}",
        stdout(&out)
    );
    // At once: `stop` returns when the server is gone.
    assert!(
        !deployment.pid_file().exists(),
        "pid file left after stop returned"
    );
    assert!(
        !deployment.socket().exists(),
        "control socket left after stop returned"
    );
    assert!(server.wait_exit(WAIT).success());
    server.wait_for_line("shutdown complete");
    // Now nothing runs.
    expect_exit(&deployment.ctl(&["status"]), 3);
}

/// While a smart stop waits for a session, the server still answers: `status` says it is
/// shutting down with the session active, and `stop --mode fast` escalates (SIGTERM to the
/// session), after which both stop commands return 0.
#[test]
fn a_fast_stop_escalates_a_waiting_smart_stop() {
    let deployment = ConfigDeployment::new("shutdown_timeout = 60\nkill_timeout = 60");
    let mut server = deployment.start();
    let mut session = server.connect_greeted();
    let client = session.local_addr().unwrap();

    let smart = deployment.ctl_in_background(&["stop"]);
    server.wait_for_line("shutting down on the stop command (smart)");
    let fields = status_of(&deployment);
    assert_eq!(field(&fields, "state"), "shutting down");
    assert_eq!(field(&fields, "active"), "1");
    assert!(
        !smart.is_finished(),
        "smart stop returned with a session open"
    );

    let fast = deployment.ctl(&["stop", "--mode", "fast"]);
    expect_exit(&fast, 0);
    assert_closed_by_server(&mut session, "session after the fast stop");
    assert_eq!(
        server.wait_child_ending(client).how,
        "killed by signal SIGTERM"
    );
    let smart = smart.join().unwrap();
    expect_exit(&smart, 0);
    assert!(server.wait_exit(WAIT).success());
}

/// The `stop` connection is closed only once the server is gone, which is what lets the
/// command wait as `pg_ctl stop` does: when its client reads EOF, the server has exited and
/// its pid file (and the lock on it: a restart right after `stop` must be able to take it) and
/// control socket are gone. Read here with a raw client, which sees the EOF at once.
#[test]
fn the_stop_connection_ends_only_once_the_server_is_gone() {
    let deployment = ConfigDeployment::new("");
    let mut server = deployment.start();
    let mut s = UnixStream::connect(deployment.socket()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"stop smart\n").unwrap();
    let answer = read_answer(&mut s);
    // Looked at before anything else: the command returns at this moment. (The process
    // itself may still be inside exit(), which closes its descriptors before it is gone.)
    let pid_file_left = deployment.pid_file().exists();
    let socket_left = deployment.socket().exists();
    let still_accepting = std::net::TcpStream::connect(server.addr()).is_ok();
    assert_eq!(answer, "ok\nshutting down (smart shutdown)\n");
    assert!(
        !pid_file_left && !socket_left && !still_accepting,
        "EOF on the stop connection while the server was not gone: pid file left: \
         {pid_file_left}, control socket left: {socket_left}, port accepting: \
         {still_accepting}"
    );
    assert!(server.wait_exit(WAIT).success());
}

/// `stop --mode fast` ends a session that would never close (SIGTERM), returns 0, and the
/// server has exited; `--mode immediate` SIGKILLs one. A mode that does not exist is a usage
/// error (exit 2) and stops nothing.
#[test]
fn stop_fast_and_immediate_end_sessions_that_do_not_close() {
    for (mode, signal) in [("fast", "SIGTERM"), ("immediate", "SIGKILL")] {
        let deployment = ConfigDeployment::new("shutdown_timeout = 60\nkill_timeout = 60");
        let mut server = deployment.start();
        let mut session = server.connect_greeted();
        let client = session.local_addr().unwrap();

        let out = deployment.ctl(&["stop", "--mode", "sideways"]);
        let err = expect_exit(&out, 2);
        assert!(err.contains("sideways"), "{err}");
        assert!(server.is_running(), "a bad mode stopped the server");

        let out = deployment.ctl(&["stop", "--mode", mode]);
        expect_exit(&out, 0);
        assert!(
            stdout(&out).contains(&format!("shutting down ({mode} shutdown)")),
            "{}",
            stdout(&out)
        );
        assert_closed_by_server(&mut session, "session after stop");
        let ending = server.wait_child_ending(client);
        assert_eq!(ending.how, format!("killed by signal {signal}"), "{mode}");
        assert!(server.wait_exit(WAIT).success(), "{mode}");
        assert!(!deployment.pid_file().exists() && !deployment.socket().exists());
    }
}

// ---- reopen-logs ----

/// `reopen-logs` after the log file was renamed (as logrotate does): exit 0, says so, and the
/// lines after it go to a new file at the path; the renamed file has those before it. Without
/// a log_file the command says the log goes to stderr, and succeeds.
#[test]
fn reopen_logs_follows_a_renamed_log_file() {
    let deployment = ConfigDeployment::new("log_file = \"forkecho.log\"");
    let log = deployment.dir.path().join("forkecho.log");
    let rotated = deployment.dir.path().join("forkecho.log.1");
    let server = deployment.builder().read_log_from(&log).start();
    assert_serves(&server, b"before\n");

    std::fs::rename(&log, &rotated).unwrap();
    let out = deployment.ctl(&["reopen-logs"]);
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains("log_file reopened"),
        "{}",
        stdout(&out)
    );
    assert!(log.exists(), "a new log file at the path");

    // Read from the new file (the harness reads the path).
    expect_exit(&deployment.ctl(&["status"]), 0);
    server.wait_for_line("control command `status`");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("control command `reopen-logs`"), "{old}");
    assert!(!old.contains("control command `status`"), "{old}");

    // Without a log file.
    let plain = ConfigDeployment::new("");
    let _plain_server = plain.start();
    let out = plain.ctl(&["reopen-logs"]);
    expect_exit(&out, 0);
    assert!(stdout(&out).contains("no log_file"), "{}", stdout(&out));
}

// ---- Who may control ----

/// Another user than root and the server's may not control it. Through the 0600 socket it
/// cannot even connect (exit 1, permission denied); with the socket file's mode loosened to
/// 0666 the server itself refuses it (SO_PEERCRED): exit 1 with "permission denied", a
/// warning in the log naming the uid, no command run; its `stop` stops nothing.
#[test]
fn only_root_or_the_servers_user_may_control_it() {
    if !is_root_or_skip("running a command as another user") {
        return;
    }
    let (_bin_dir, program) = binary_for_nobody();
    let deployment = ConfigDeployment::new("");
    let mut server = deployment.start();
    let socket = deployment.socket();
    let locator = ["--control-socket", socket.to_str().unwrap()];

    let out = run_as(
        &program,
        NOBODY,
        NOBODY,
        &[locator[0], locator[1], "status"],
    );
    let err = expect_exit(&out, 1);
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
    assert!(
        stdout(&out).is_empty(),
        "nothing of the status: {}",
        stdout(&out)
    );

    // The file opened to everyone: the server's own check refuses.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for command in ["status", "stop", "reload"] {
        let out = run_as(&program, NOBODY, NOBODY, &[locator[0], locator[1], command]);
        let err = expect_exit(&out, 1);
        assert!(err.contains("permission denied"), "{command}: {err}");
        assert!(stdout(&out).is_empty(), "{command}: {}", stdout(&out));
    }
    server.wait_for_lines(
        &format!("control connection from uid:{NOBODY},gid:{NOBODY}"),
        3,
    );
    assert_eq!(
        server.count_lines(&format!(
            "control command `stop smart` {}",
            peer_prefix(NOBODY, NOBODY)
        )),
        0
    );
    assert!(server.is_running(), "nobody's stop stopped the server");
    assert_serves(&server, b"still here\n");
    assert_eq!(field(&status_of(&deployment), "state"), "serving");
}

/// The control socket belongs to the user the server drops to (`user = "nobody"`), mode
/// 0600: that user may control it (status, and a stop that removes the socket); root too.
#[test]
fn the_servers_own_user_may_control_it() {
    if !is_root_or_skip("dropping to another user") {
        return;
    }
    let (_bin_dir, program) = binary_for_nobody();
    let deployment = ConfigDeployment::new("user = \"nobody\"");
    // The server's user removes its pid file and socket at exit: the directory is its.
    nix::unistd::chown(
        deployment.dir.path(),
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        None,
    )
    .unwrap();
    let mut server = deployment.start();
    server.wait_for_line("running as nobody");
    let meta = std::fs::metadata(deployment.socket()).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o600));

    let config = deployment.config_arg().to_string();
    let out = run_as(&program, NOBODY, NOBODY, &["-c", &config, "status"]);
    expect_exit(&out, 0);
    assert_eq!(field(&status_fields(&out), "pid"), server.pid().to_string());
    assert_eq!(
        field(&status_of(&deployment), "pid"),
        server.pid().to_string()
    );
    server.wait_for_line(&format!(
        "control command `status` {}",
        peer_prefix(NOBODY, NOBODY)
    ));

    let out = run_as(&program, NOBODY, NOBODY, &["-c", &config, "stop"]);
    expect_exit(&out, 0);
    assert!(server.wait_exit(WAIT).success());
    assert!(!deployment.socket().exists(), "control socket left");
    assert!(!deployment.pid_file().exists(), "pid file left");
}

// ---- Clients that misbehave ----

/// A control connection that says nothing does not hold the server: TCP clients are still
/// served and `status` still answers while it is open; a garbage request and a line too long
/// get an `error` answer naming the commands; the silent connection is closed in the end.
#[test]
fn a_silent_or_garbage_control_connection_does_not_block_the_server() {
    let deployment = ConfigDeployment::new("");
    let server = deployment.start();
    let mut silent = UnixStream::connect(deployment.socket()).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();

    assert_serves(&server, b"served\n");
    assert_eq!(field(&status_of(&deployment), "state"), "serving");

    for request in [&b"hello\n"[..], &[b'x'; 200][..], b"stop never\n", b"\n"] {
        let mut s = UnixStream::connect(deployment.socket()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(request).unwrap();
        let answer = read_answer(&mut s);
        assert!(
            answer.starts_with("error\n") && answer.contains("unknown command"),
            "{:?}: {answer:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert_serves(&server, b"still served\n");

    // The silent one is given up (EOF, nothing said), and the server still runs.
    let mut rest = Vec::new();
    silent.read_to_end(&mut rest).expect("closed by the server");
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(field(&status_of(&deployment), "state"), "serving");
}

/// Everything a raw control connection receives until the server closes it. A reset after
/// the answer (the server closed with part of an over-long request unread, which a UNIX
/// socket reports as ECONNRESET) ends it too: what came before is the answer.
fn read_answer(s: &mut UnixStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty() => {
                break
            }
            Err(e) => panic!("reading the answer: {e} (after {answer:?})"),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// At most 8 control connections talk at once: a command beyond them hears `busy` (exit 1,
/// the reason on stderr) and the server goes on; once the silent ones were given up, commands
/// are answered again.
#[test]
fn a_command_beyond_the_control_connection_limit_hears_busy() {
    let deployment = ConfigDeployment::new("");
    let mut server = deployment.start();
    let silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(deployment.socket()).unwrap())
        .collect();
    // All eight taken: a TCP client is still served, and `status` is turned away.
    assert_serves(&server, b"served\n");
    let out = deployment.ctl(&["status"]);
    let err = expect_exit(&out, 1);
    assert!(err.contains("busy"), "the server's reason: {err}");
    assert!(
        server.is_running(),
        "a busy control socket stopped the server"
    );
    drop(silent);
    assert!(
        wait_until(WAIT, || deployment.ctl(&["status"]).status.code()
            == Some(0)),
        "status not answered again after the silent connections closed"
    );
}

// ---- Start ----

/// A second server with the same pid file fails to start and leaves the first one's control
/// socket as it was: commands still reach the first. One with another pid file but the same
/// control_socket is refused too (a live socket is never replaced).
#[test]
fn a_second_server_does_not_take_the_first_ones_control_socket() {
    let deployment = ConfigDeployment::new("");
    let first = deployment.start();
    let inode = std::fs::metadata(deployment.socket()).unwrap().ino();

    let (status, err) = match deployment.builder().try_start() {
        Ok(_) => panic!("a second server started with the same pid file"),
        Err(failure) => failure,
    };
    assert!(!status.success(), "{status}");
    assert!(err.contains("forkecho.pid"), "{err}");
    assert_eq!(std::fs::metadata(deployment.socket()).unwrap().ino(), inode);
    assert_eq!(
        field(&status_of(&deployment), "pid"),
        first.pid().to_string()
    );
    assert_eq!(pid_in(&deployment.pid_file()), first.pid());

    let other = TempDir::new();
    let other_pid = other.path().join("other.pid");
    let socket = deployment.socket();
    let result = Server::builder()
        .args([
            "--pid-file",
            other_pid.to_str().unwrap(),
            "--control-socket",
            socket.to_str().unwrap(),
        ])
        .try_start();
    let (status, err) = match result {
        Ok(_) => panic!("a second server started on a live control socket"),
        Err(failure) => failure,
    };
    assert!(!status.success(), "{status}");
    assert!(err.contains("control_socket"), "{err}");
    assert_eq!(std::fs::metadata(deployment.socket()).unwrap().ino(), inode);
    assert_eq!(
        field(&status_of(&deployment), "pid"),
        first.pid().to_string()
    );
    assert!(!other_pid.exists() || std::fs::read_to_string(&other_pid).unwrap().is_empty());
}

/// `--check-config` and the start both report a control socket that cannot be made: a missing
/// directory is named with the key `control_socket`.
#[test]
fn a_control_socket_in_a_missing_directory_is_reported() {
    let dir = TempDir::new();
    let socket = dir.path().join("missing").join("forkecho.ctl");
    let socket = socket.to_str().unwrap();
    let out = run(&[
        "-l",
        "127.0.0.1:0",
        "--control-socket",
        socket,
        "--check-config",
    ]);
    let err = expect_exit(&out, 2);
    assert!(err.contains("control_socket"), "{err}");

    // A pid file in a missing directory is where the socket would be, too.
    let pid_file = dir.path().join("missing").join("forkecho.pid");
    let out = run(&[
        "-l",
        "127.0.0.1:0",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--check-config",
    ]);
    let err = expect_exit(&out, 2);
    assert!(
        err.contains("pid_file") || err.contains("control_socket"),
        "{err}"
    );

    // Started anyway: refused at start, naming the key, leaving no pid file.
    let pid_file = dir.path().join("forkecho.pid");
    let result = Server::builder()
        .args([
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--control-socket",
            socket,
        ])
        .try_start();
    let (status, err) = match result {
        Ok(_) => panic!("started without its control socket"),
        Err(failure) => failure,
    };
    assert!(!status.success(), "{status}");
    assert!(err.contains("control_socket"), "{err}");
    assert!(!pid_file.exists(), "pid file left by a failed start");
}

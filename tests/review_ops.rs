//! Review of the operator features (control commands, metrics, log formats, packaging): each
//! test shows one defect a user would see. They fail until the defect is fixed.
//!
//! Servers run from a deployment directory (a config file with `pid_file` beside it, so the
//! control socket is `forkecho.ctl` there), and are driven with the real control commands.

use crate::util::*;

use std::path::PathBuf;

impl ConfigDeployment {
    /// Starts a server on this config, its log read from `log`, and waits until its control
    /// socket answers `status` (whatever the log's format).
    fn start_logging_to(&self, log: &std::path::Path) -> Server {
        let server = Server::builder()
            .args(["-c", self.config_arg(), "--log-file", log.to_str().unwrap()])
            .read_log_from(log)
            .spawn();
        assert!(
            wait_until(WAIT, || self.ctl(&["status"]).status.code() == Some(0)),
            "the server never answered `status`\n--- log ---\n{}",
            server.log_text()
        );
        server
    }
}

/// The JSON records of a log, each line parsed; panics naming the first line that is not one.
fn assert_json_records(lines: &[String]) {
    for line in lines {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(line) {
            let tail: String = line
                .chars()
                .rev()
                .take(120)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "a log line ({} bytes) is not JSON ({e}): ...{tail}",
                line.len()
            );
        }
    }
}

/// A reload refused for a reason longer than a log line (an unknown key of 2100 `"` — each
/// one escaped as `\"` in JSON), once with each alignment of the escapes against the cut:
/// the server must stay up, answer the refusal, and every line of its JSON log must still be
/// one valid record. Today the cut falls inside the `reason` field, not inside `msg` as the
/// line's ending assumes: in a debug build the parent panics (an overflow in
/// `LineBuffer::push` once `quote_until_end` has lowered the limit below the text already
/// written) and the server is gone; in a release build the line ends in `\… [n bytes cut]"}`,
/// an invalid escape.
#[test]
fn a_reload_refused_for_a_long_reason_keeps_the_server_and_json_lines_whole() {
    let deployment = ConfigDeployment::new("log_format = \"json\"");
    let log = deployment.dir.path().join("forkecho.log");
    let mut server = deployment.start_logging_to(&log);
    for shift in ["", "a"] {
        let key = format!("\"{shift}{}\" = 1", "\\\"".repeat(2100));
        deployment.write_config(&format!("log_format = \"json\"\n{key}"));
        let out = deployment.ctl(&["reload"]);
        let said = expect_exit(&out, 1);
        assert!(said.contains("unknown key"), "the refusal's reason: {said}");
        assert!(
            server.is_running(),
            "the server died logging the refusal\n--- log ---\n{}",
            server.log_text()
        );
    }
    expect_exit(&deployment.ctl(&["stop"]), 0);
    assert!(server.wait_exit(WAIT).success());
    assert_json_records(&server.log_lines());
}

/// A copy of the binary in a 0755 directory, for a server started as another user (the build
/// tree may not be reachable for it).
fn binary_for_others() -> (TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = dir.path().join("forkecho");
    std::fs::copy(BIN, &program).unwrap();
    (dir, program)
}

/// The packaged service runs forkecho as its own unprivileged user (`User=forkecho`), and the
/// packaged logrotate snippet, run as root as logrotate is, recreates the log as `create 0640
/// root adm` before its postrotate asks the server to reopen it: the server cannot open a
/// root-owned 0640 file, the reopen fails (exit 1), logrotate reports an error after every
/// rotation, and the server goes on writing into the rotated file. Here the server runs as
/// `nobody` (as the service's user would) with its log in a directory of its own; the snippet
/// is the shipped one with only the paths pointed at this test's files.
#[test]
fn the_shipped_logrotate_snippet_works_for_a_server_run_as_its_own_user() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let Some(logrotate) = ["/usr/sbin/logrotate", "/sbin/logrotate"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!("skipping: logrotate is not installed");
        return;
    };
    if !is_root_or_skip("starting a server as nobody") {
        return;
    }
    let (_bin_dir, program) = binary_for_others();
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(
        dir.path(),
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        Some(nix::unistd::Gid::from_raw(NOBODY)),
    )
    .unwrap();
    let log = dir.path().join("forkecho.log");
    let socket = dir.path().join("forkecho.ctl");
    let server = Server::builder()
        .program(&program)
        .args(["--control-socket", socket.to_str().unwrap()])
        .log_file(&log)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::null())
        .tweak(|c| {
            c.uid(NOBODY).gid(NOBODY);
        })
        .start();

    let snippet = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/forkecho.logrotate"
    ))
    .unwrap()
    .replace("/var/log/forkecho/forkecho.log", log.to_str().unwrap())
    // The service's user, as the snippet names it: here that user is nobody.
    .replace("create 0640 forkecho adm", "create 0640 nobody nogroup")
    .replace("/run/forkecho/control.sock", socket.to_str().unwrap())
    .replace(
        "forkecho --control-socket",
        &format!("{} --control-socket", program.display()),
    );
    let conf = dir.path().join("logrotate.conf");
    std::fs::write(&conf, snippet).unwrap();
    let state = dir.path().join("logrotate.state");
    let out = std::process::Command::new(logrotate)
        .args([
            "--force",
            "--state",
            state.to_str().unwrap(),
            conf.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "logrotate failed: {}\n--- log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.path().join("forkecho.log.1")).unwrap_or_default()
    );
    server.wait_for_line("log_file reopened");
}

/// A command to a server that does not accept (stopped, hung) must still end: `status` says
/// it waits at most 30 s for an answer, and logrotate's postrotate or systemd's ExecReload
/// run it unattended. But the command connects without a timeout, and a UNIX-domain
/// `connect` to a socket whose queue is full waits until the server accepts: here the server
/// is stopped (SIGSTOP) and its control socket's queue (16) is filled, and `status` never
/// returns. Allowed: 30 s for the answer and 15 s of slack.
#[test]
fn a_command_to_a_server_that_does_not_accept_ends_in_bounded_time() {
    use std::os::unix::process::ExitStatusExt;
    let deployment = ConfigDeployment::new("");
    let server = Server::builder()
        .args(["-c", deployment.config_arg()])
        .start();
    server.freeze();
    // Queued connections, up to what the listener's backlog takes.
    let mut queued = Vec::new();
    loop {
        let socket =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        socket.set_nonblocking(true).unwrap();
        match socket.connect(&socket2::SockAddr::unix(deployment.socket()).unwrap()) {
            Ok(()) => queued.push(socket),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("connect to the control socket: {e}"),
        }
        assert!(
            queued.len() < 1000,
            "the control socket's queue never fills"
        );
    }
    let mut status = std::process::Command::new(BIN)
        .args(["-c", deployment.config_arg(), "status"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(nix::unistd::Pid::from_raw(status.id() as i32));
    let allowed = std::time::Duration::from_secs(45);
    let ended = wait_until(allowed, || status.try_wait().unwrap().is_some());
    assert!(
        ended,
        "`forkecho status` still waiting after {allowed:?} for a server that does not accept \
         (waiting in {})",
        std::fs::read_to_string(format!("/proc/{}/wchan", status.id())).unwrap_or_default()
    );
    let code = status.wait().unwrap();
    assert_eq!(
        code.code(),
        Some(1),
        "{code:?} (signal {:?})",
        code.signal()
    );
}

/// A reload while a smart shutdown drains is refused (nothing new will start), through the
/// control command and its exit code.
#[test]
fn a_reload_during_a_smart_shutdown_is_refused() {
    let dir = TempDir::new();
    let pid_file = dir.path().join("forkecho.pid");
    let pid_arg = pid_file.to_str().unwrap().to_string();
    let mut server = Server::builder().args(["--pid-file", &pid_arg]).start();
    let mut held = server.connect_greeted();
    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.wait_for_line("shutting down on SIGTERM (smart)");
    let out = run(&["--pid-file", &pid_arg, "reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert_eq!(echo_roundtrip(&mut held, b"still\n"), b"still\n");
    drop(held);
    assert!(server.wait_exit(WAIT).success());
}

//! Review of the crash rollback (`upgrade::crash`), the shutdown that passes to the next image
//! (state format 3) and the reap after the takeover: the defects found, each as a failing
//! test, and probes of claims that hold.

use std::io::Write;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::*;

/// Runs a control command of this deployment in a thread (`stop` waits for the server).
fn command_in_background(
    deployment: &Deployment,
    args: &[&str],
) -> std::thread::JoinHandle<std::process::Output> {
    let binary = deployment.binary.clone();
    let pid_file = deployment.pid_file.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        std::process::Command::new(binary)
            .arg("--pid-file")
            .arg(pid_file)
            .args(args)
            .output()
            .unwrap()
    })
}

// ---- Defects ----

/// `stop` waits until the server is gone (its connection is closed only by the process's
/// exit). An upgrade is now allowed during the shutdown `stop` started; the `execve` closes
/// the stop connection (close-on-exec, and not in the state), so the command returns 0 as if
/// the server were gone while it still drains, holding the pid file and its lock.
#[test]
fn a_waiting_stop_command_outlasts_an_upgrade_during_its_shutdown() {
    let deployment = Deployment::new();
    let mut server = deployment.start(&["--shutdown-timeout", "60"]);
    let mut session = server.connect_greeted();
    let stop = command_in_background(&deployment, &["stop"]);
    server.wait_for_line("shutting down on the stop command (smart)");
    assert_upgraded(&deployment.upgrade());
    server.wait_for_line("the shutdown in progress goes on");
    // Bounded: a correct server keeps the stop command waiting as long as the session runs.
    let returned = wait_until(Duration::from_secs(3), || stop.is_finished());
    let running = server.is_running();
    let pid_file_there = deployment.pid_file.exists();
    assert_eq!(echo_roundtrip(&mut session, b"still\n"), b"still\n");
    drop(session);
    assert!(server.wait_exit(WAIT).success());
    let out = stop.join().unwrap();
    assert!(
        !(returned && running),
        "`stop` returned ({:?}, stdout {:?}) while the server still ran (pid file there: \
         {pid_file_there})",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A SIGTERM that arrives while a new image takes over is kept pending for it (README, step
/// 2). If that image then crashes, the previous one serves on: the SIGTERM, consumed by the
/// crashed image's handler (hooked and unblocked in `Server::new`, long before `disarm`),
/// is lost, and the server never stops. Here the wrapper, which runs as the server's process
/// during the exec, sends it: deterministic.
#[cfg(debug_assertions)]
#[test]
fn a_sigterm_during_a_takeover_that_crashes_is_not_lost() {
    let deployment = Deployment::new();
    let mut server = deployment.start(&[]);
    deployment.wrap_for_takeover(
        "kill -TERM $$; FORKECHO_TEST_CRASH_WHILE_ADOPTING=segv exec {good} \"$@\"",
    );
    let out = deployment.upgrade();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    server.wait_for_line("it crashed (SIGSEGV) before serving");
    let stopped = wait_until(Duration::from_secs(5), || !server.is_running());
    assert!(
        stopped,
        "the SIGTERM sent during the takeover was lost: the previous image serves on\n{}",
        server.log_text()
    );
}

// ---- Probes ----

/// Probe (the claim behind the defect above): without a crash, a SIGTERM sent during the
/// exec is honoured by the new image.
#[test]
fn a_sigterm_during_a_takeover_is_honoured_by_the_new_image() {
    let deployment = Deployment::new();
    let mut server = deployment.start(&[]);
    deployment.wrap_for_takeover("kill -TERM $$; exec {good} \"$@\"");
    assert_upgraded(&deployment.upgrade());
    server.wait_for_line("shutting down on SIGTERM (smart)");
    assert!(server.wait_exit(WAIT).success());
}

/// Probe: a new image that crashes while taking over during a smart drain hands back to the
/// previous one, which goes on with the drain (no listener again, the session kept), blocks
/// no signal and keeps no extra descriptor; a second SIGTERM escalates to fast as before.
#[cfg(debug_assertions)]
#[test]
fn a_crash_during_a_drain_rolls_back_into_the_same_drain() {
    let deployment = Deployment::new();
    let mut server = deployment.start(&["--shutdown-timeout", "60"]);
    let mut session = server.connect_greeted();
    let client = session.local_addr().unwrap();
    server.signal(Signal::SIGTERM);
    server.wait_for_line("shutting down on SIGTERM (smart)");
    let fds_before = fds_of(server.pid()).len();
    deployment.wrap_for_takeover("FORKECHO_TEST_CRASH_WHILE_ADOPTING=abort exec {good} \"$@\"");
    let out = deployment.upgrade();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    server.wait_for_line("it crashed (SIGABRT) before serving");
    assert_eq!(signal_mask(server.pid(), "SigBlk"), 0);
    assert!(
        wait_until(WAIT, || fds_of(server.pid()).len() == fds_before),
        "descriptors {fds_before} before, {:?} after",
        fds_of(server.pid())
    );
    assert_eq!(echo_roundtrip(&mut session, b"kept\n"), b"kept\n");
    server.assert_line_count("listening on", 1, "no listener again");
    server.signal(Signal::SIGTERM);
    assert_closed_by_server(&mut session, "the session after a second SIGTERM");
    assert_eq!(
        server.wait_child_ending(client).how,
        "killed by signal SIGTERM"
    );
    assert!(server.wait_exit(WAIT).success());
}

/// Probe: a balancer's connection still waiting for its PROXY header in a smart drain passes
/// through an upgrade, and the new image, still draining, serves it once the header comes.
#[test]
fn a_proxy_connection_waiting_in_a_drain_is_served_after_an_upgrade() {
    let deployment = Deployment::new();
    let mut server = deployment.start(&[
        "--proxy-protocol",
        "v1",
        "--trusted-proxy",
        "127.0.0.1",
        "--shutdown-timeout",
        "60",
    ]);
    let before = fds_of(server.pid()).len();
    let mut balancer = server.connect();
    balancer
        .write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 ")
        .unwrap();
    assert!(wait_until(WAIT, || fds_of(server.pid()).len() > before));
    server.signal(Signal::SIGTERM);
    server.wait_for_line("shutting down on SIGTERM (smart)");
    assert_upgraded(&deployment.upgrade());
    server.wait_for_line("the shutdown in progress goes on");
    balancer.write_all(b"2333\r\n").unwrap();
    expect_banner(&mut balancer);
    assert_eq!(echo_roundtrip(&mut balancer, b"through\n"), b"through\n");
    server.wait_for_line("accepted 203.0.113.7:5555 via 127.0.0.1:");
    drop(balancer);
    assert!(server.wait_exit(WAIT).success());
}

/// Probe: under systemd, an upgrade during a smart drain sends neither RELOADING=1 nor
/// READY=1 after STOPPING=1 (README: "during a shutdown, neither: STOPPING=1 stands").
#[test]
fn an_upgrade_during_a_drain_tells_systemd_nothing_but_a_status() {
    let deployment = Deployment::new();
    let notify = deployment.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mut server = deployment
        .builder()
        .args(["--shutdown-timeout", "60"])
        .env("NOTIFY_SOCKET", notify.to_str().unwrap())
        .start();
    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(next().contains("READY=1"));
    let session = server.connect_greeted();
    server.signal(Signal::SIGTERM);
    assert!(next().contains("STOPPING=1"));
    assert_upgraded(&deployment.upgrade());
    server.wait_for_line("the shutdown in progress goes on");
    drop(session);
    assert!(server.wait_exit(WAIT).success());
    socket.set_nonblocking(true).unwrap();
    let mut after = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        after.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(
        after
            .iter()
            .all(|m| !m.contains("READY=1") && !m.contains("RELOADING=1")),
        "{after:?}"
    );
    assert!(
        after
            .iter()
            .any(|m| m.contains("STATUS=shutting down (upgraded)")),
        "{after:?}"
    );
}

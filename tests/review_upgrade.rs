//! Review of upgrading in place (issue 17): what an operator sees around `forkecho upgrade`
//! and SIGUSR2 in the less travelled cases.

use crate::util::*;

use std::time::Duration;

use nix::sys::signal::Signal;

#[test]
fn upgrades_leave_the_parent_no_more_descriptors_than_before() {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let before = fd_targets(server.pid());
    for _ in 0..3 {
        assert_upgraded(&deployment.upgrade());
    }
    let after = settled_fd_targets(server.pid(), before.len());
    assert_eq!(
        before.len(),
        after.len(),
        "before {before:?}, after {after:?}"
    );
    assert!(
        !after.iter().any(|(_, t)| t.contains("memfd:")
            || t.ends_with("/forkecho")
            || t.ends_with("(deleted)")),
        "the state's memfd or an executable stays open: {after:?}"
    );
}

/// An install where the path started from is a symlink to a versioned file (alternatives,
/// stow, /usr/local/bin → /opt/forkecho-1.2/forkecho): the package moves the link to the new
/// version, and the upgrade must run what the link names now.
#[test]
fn an_upgrade_runs_the_binary_the_started_symlink_names_now() {
    let dir = TempDir::new();
    let (one, two) = (dir.path().join("forkecho-1"), dir.path().join("forkecho-2"));
    copy_binary_to(&one);
    copy_binary_to(&two);
    let link = dir.path().join("forkecho");
    std::os::unix::fs::symlink(&one, &link).unwrap();
    let pid_file = dir.path().join("forkecho.pid");
    let server = Server::builder()
        .program(&link)
        .args(["--pid-file", pid_file.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .start();
    // The package manager's step: a new link renamed over the old one.
    let new_link = dir.path().join("forkecho.new");
    std::os::unix::fs::symlink(&two, &new_link).unwrap();
    std::fs::rename(&new_link, &link).unwrap();
    let out = std::process::Command::new(&link)
        .args(["--pid-file", pid_file.to_str().unwrap(), "upgrade"])
        .output()
        .unwrap();
    assert_upgraded(&out);
    let running = std::fs::read_link(format!("/proc/{}/exe", server.pid())).unwrap();
    assert_eq!(running, two, "the upgrade ran {}", running.display());
}

/// A new binary whose check never ends (it waits on something that never comes): the upgrade
/// must end, refused, and a later upgrade with a good binary must go through.
#[test]
fn a_check_that_hangs_does_not_block_upgrades_forever() {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let good = deployment.wrap_with_a_hanging_check();
    let out = deployment.upgrade();
    assert!(!out.status.success(), "{out:?}");
    std::fs::rename(&good, &deployment.binary).unwrap();
    let out = deployment.upgrade();
    assert_upgraded(&out);
    drop(server);
}

/// A server that dropped root (`--user nobody`) upgrades: the check and the new image run as
/// nobody, with the pid file and its lock kept.
#[test]
fn a_server_that_dropped_root_upgrades() {
    if !is_root_or_skip("switching to nobody") {
        return;
    }
    let deployment = Deployment::new();
    std::fs::set_permissions(
        deployment.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let server = deployment.start(&["--user", "nobody"]);
    let mut session = server.connect_greeted();
    assert_upgraded(&deployment.upgrade());
    assert_eq!(echo_roundtrip(&mut session, b"kept\n"), b"kept\n");
    assert_serves(&server, b"new\n");
    assert_upgraded(&deployment.upgrade());
}

/// A program session (`-- cat`) with `max_session_time` across an upgrade: its SIGTERM comes
/// on time, from the new image.
#[test]
fn a_programs_max_session_time_survives_an_upgrade() {
    let deployment = Deployment::new();
    let pid_file = deployment.pid_file.to_str().unwrap();
    let server = exec_server(
        &["--max-session-time", "3", "--pid-file", pid_file],
        &["cat"],
    )
    .program(&deployment.binary)
    .env("RUST_LOG", "info")
    .start();
    let mut s = server.connect();
    let opened = std::time::Instant::now();
    assert_eq!(echo_roundtrip(&mut s, b"hi\n"), b"hi\n");
    assert_upgraded(&deployment.upgrade());
    assert_eq!(echo_roundtrip(&mut s, b"after\n"), b"after\n");
    assert_closed_by_server(&mut s, "the session at max_session_time");
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "ended after {took:?}"
    );
    server.wait_for_line("reached max_session_time");
}

/// A UNIX-domain listener's socket file is still removed when the server stops after an
/// upgrade.
#[test]
fn a_unix_listeners_socket_file_is_removed_at_exit_after_an_upgrade() {
    let deployment = Deployment::new();
    let socket = deployment.dir.path().join("echo.sock");
    let listen = format!("unix:{}", socket.display());
    let mut server = deployment
        .builder()
        .args(["-l", "127.0.0.1:0", "-l", &listen])
        .start();
    assert_upgraded(&deployment.upgrade());
    let mut c = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut banner = [0u8; BANNER.len()];
    std::io::Read::read_exact(&mut c, &mut banner).unwrap();
    drop(c);
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    assert!(!socket.exists(), "the socket file stays after exit");
}

/// On a PROXY listener, a client that is slow to send its header (up to
/// proxy_header_timeout) must not make an upgrade fail.
#[test]
fn a_slow_proxy_header_does_not_fail_an_upgrade() {
    let deployment = Deployment::new();
    let server = deployment.start(&["--proxy-protocol", "v1", "--trusted-proxy", "127.0.0.1"]);
    let before = fds_of(server.pid()).len();
    let _slow = server.connect();
    // Once the parent holds it, waiting for the header (one more descriptor).
    assert!(wait_until(WAIT, || fds_of(server.pid()).len() > before));
    let out = deployment.upgrade();
    assert_upgraded(&out);
}

/// At max_children, the listeners are paused; after an upgrade they still are, and resume
/// when the session ends.
#[test]
fn an_upgrade_at_max_children_keeps_the_pause_and_resumes() {
    let deployment = Deployment::new();
    let server = deployment.start(&["--max-children", "1"]);
    let mut first = server.connect_greeted();
    assert_upgraded(&deployment.upgrade());
    let mut second = server.connect();
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        std::io::Read::read(&mut second, &mut byte).is_err(),
        "the second client was served beyond max_children"
    );
    assert_eq!(echo_roundtrip(&mut first, b"x\n"), b"x\n");
    drop(first);
    second.set_read_timeout(Some(WAIT)).unwrap();
    expect_banner(&mut second);
}

/// One HTTP GET of /metrics: the body.
fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: forkecho\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The samples that count events (no gauges of time or memory).
fn counters(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| !l.contains("seconds") && !l.contains("bytes") && !l.contains("process_"))
        .filter(|l| !l.contains("metrics_scrapes") && !l.contains("control"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_metrics_counters_are_the_same_after_an_upgrade() {
    let deployment = Deployment::new();
    let server = deployment.start(&["--metrics-listen", "127.0.0.1:0", "--deny", "127.0.0.2"]);
    let line = server.wait_for_line("metrics on http://");
    let metrics: std::net::SocketAddr = line
        .split_once("metrics on http://")
        .unwrap()
        .1
        .trim()
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();
    for _ in 0..3 {
        let mut s = server.connect_greeted();
        assert_eq!(echo_roundtrip(&mut s, b"x\n"), b"x\n");
        let peer = s.local_addr().unwrap();
        drop(s);
        server.wait_child_ending(peer);
    }
    let mut refused = connect_from(server.addr(), "127.0.0.2");
    assert_closed_by_server(&mut refused, "denied");
    let before = counters(&scrape(metrics));
    assert_upgraded(&deployment.upgrade());
    let after = counters(&scrape(metrics));
    assert_eq!(before, after);
}

/// A shutdown while a check hangs: the server still stops, and leaves no checker behind.
#[test]
fn a_shutdown_during_a_hanging_check_stops_and_leaves_no_checker() {
    let deployment = Deployment::new();
    let mut server = deployment.start(&[]);
    deployment.wrap_with_a_hanging_check();
    server.signal(Signal::SIGUSR2);
    server.wait_for_line("upgrade: checking");
    let checker = server.children();
    assert_eq!(checker.len(), 1, "{checker:?}");
    let _guard = KillOnDrop(checker[0].pid);
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{}", checker[0].pid)).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", checker[0].pid))
                .is_ok_and(|s| s.contains(") Z ")),
        "the checker runs on after the server stopped"
    );
}

/// The config file was edited (a port added, a new banner) but not reloaded, then an upgrade:
/// the new image must not apply half of it silently (the banner but not the port).
#[test]
fn an_upgrade_with_an_edited_config_applies_it_whole_or_not_at_all() {
    let deployment = Deployment::new();
    let port = free_port();
    let config = |banner: &str, listen: &str| {
        format!(
            "listen = [{listen}]\nbanner = \"{banner}\\n\"\npid_file = \"{}\"\n",
            deployment.pid_file.display()
        )
    };
    let server = Server::builder()
        .program(&deployment.binary)
        .config(&config("one", "\"127.0.0.1:0\""))
        .env("RUST_LOG", "info")
        .start();
    server.rewrite_config(&config(
        "two",
        &format!("\"127.0.0.1:0\", \"127.0.0.1:{port}\""),
    ));
    assert_upgraded(&deployment.upgrade());
    let mut s = server.connect();
    let banner = read_exactly(&mut s, 4);
    let added = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    assert!(
        (banner == b"one\n" && !added) || (banner == b"two\n" && added),
        "banner {:?}, the added port listened on: {added}\n{}",
        String::from_utf8_lossy(&banner),
        server.log_text()
    );
}

/// A rollback leaves the parent with no more descriptors than before.
#[test]
fn a_rollback_leaves_no_descriptor_behind() {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let before = fd_targets(server.pid());
    deployment.wrap_for_takeover("exec {good} --max-children 0 \"$@\"");
    for _ in 0..2 {
        let out = deployment.upgrade();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
    }
    let after = settled_fd_targets(server.pid(), before.len());
    assert_eq!(
        before.len(),
        after.len(),
        "before {before:?}, after {after:?}"
    );
}

/// A daemon started from its directory with a relative `-c` (the config's own paths relative
/// to it): it works from / once detached, and an upgrade must still find the configuration.
#[test]
fn a_daemon_started_with_a_relative_config_path_upgrades() {
    let deployment = Deployment::new();
    let dir = deployment.dir.path();
    std::fs::write(
        dir.join("forkecho.toml"),
        "listen = [\"127.0.0.1:0\"]\npid_file = \"forkecho.pid\"\nlog_file = \"forkecho.log\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(&deployment.binary)
        .current_dir(dir)
        .args(["--daemonize", "-c", "forkecho.toml"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let daemon = KillOnDrop::daemon_in(&deployment.pid_file);
    let addr = listening_address_in(&dir.join("forkecho.log"));
    let mut s = connect(addr);
    expect_banner(&mut s);
    let out = std::process::Command::new(&deployment.binary)
        .args(["-c", dir.join("forkecho.toml").to_str().unwrap(), "upgrade"])
        .output()
        .unwrap();
    assert_upgraded(&out);
    assert_eq!(echo_roundtrip(&mut s, b"kept\n"), b"kept\n");
    drop(daemon);
}

/// The package brought a new binary and a configuration using a key only it knows; the new
/// image passes its check but cannot start (here: a wrapper gives it a bad flag). The previous
/// image rolled back to must serve on with the configuration it was running, not die on a
/// file it cannot read, taking every session's parent with it.
#[test]
fn a_rollback_does_not_depend_on_the_config_file_the_new_binary_was_given() {
    let deployment = Deployment::new();
    let config = deployment.dir.path().join("forkecho.toml");
    std::fs::write(&config, "listen = [\"127.0.0.1:0\"]\n").unwrap();
    let mut server = deployment
        .builder()
        .args(["-c", config.to_str().unwrap()])
        .start();
    let mut session = server.connect_greeted();
    // At the takeover, the file gains what the old binary does not know (the check saw it
    // without: the key stands for one only the new version has).
    let takeover = format!(
        "echo 'new_key = 1' >> {}; exec {{good}} --max-children 0 \"$@\"",
        config.display()
    );
    deployment.wrap_for_takeover(&takeover);
    let out = deployment.upgrade();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        server.is_running(),
        "the server died:\n{}",
        server.log_text()
    );
    assert_eq!(echo_roundtrip(&mut session, b"kept\n"), b"kept\n");
}

/// After an upgrade (and after a rollback) the parent blocks no signal, and a session's
/// program starts with none blocked and none ignored: the mask the exec carried is undone.
#[test]
fn no_signal_stays_blocked_after_an_upgrade() {
    let deployment = Deployment::new();
    let pid_file = deployment.pid_file.to_str().unwrap();
    let server = exec_server(&["--pid-file", pid_file], &["cat"])
        .program(&deployment.binary)
        .env("RUST_LOG", "info")
        .start();
    assert_eq!(signal_mask(server.pid(), "SigBlk"), 0);
    assert_upgraded(&deployment.upgrade());
    assert_eq!(signal_mask(server.pid(), "SigBlk"), 0, "the parent");
    let mut s = server.connect();
    assert_eq!(echo_roundtrip(&mut s, b"x\n"), b"x\n");
    let child = server.child_pid_for(s.local_addr().unwrap());
    assert_eq!(signal_mask(child, "SigBlk"), 0, "the program");
    assert_eq!(signal_mask(child, "SigIgn"), 0, "the program");
}

/// The descriptors of `pid` once no more than `expected` are open, or as they are at the
/// deadline. The requester sees its answer end (the socket shut down for writing) a moment
/// before the server closes that socket, so the count can be high for a moment.
fn settled_fd_targets(pid: nix::unistd::Pid, expected: usize) -> Vec<(u64, String)> {
    let mut table = Vec::new();
    wait_until(WAIT, || {
        table = fd_targets(pid);
        table.len() <= expected
    });
    table
}

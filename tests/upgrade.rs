//! Upgrading the binary in place (`forkecho upgrade`, SIGUSR2) as an operator sees it: under a
//! steady load through ten upgrades no connection fails, a session opened before the first
//! echoes after the last and its end is logged with its original peer and whole duration, the
//! totals go on, and the pid (and the pid file's) stays; a new binary whose check fails is
//! refused while the old one serves; a shutdown or a reload racing an upgrade.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::util::*;

/// `name: value` from `forkecho status`.
fn status_field(out: &std::process::Output, name: &str) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .to_string()
}

#[test]
fn ten_upgrades_under_load_lose_no_connection_and_no_session() {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let addr = server.addr();
    let pid = server.pid().to_string();
    let mut long = server.connect_greeted();
    let long_peer = long.local_addr().unwrap();
    let opened = Instant::now();

    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = std::net::TcpStream::connect(addr).is_ok_and(|mut s| {
                        let _ = s.set_read_timeout(Some(WAIT));
                        let mut banner = [0u8; BANNER.len()];
                        std::io::Read::read_exact(&mut s, &mut banner).is_ok()
                            && banner == *BANNER
                            && std::io::Write::write_all(&mut s, b"load\n").is_ok()
                            && {
                                let mut back = [0u8; 5];
                                std::io::Read::read_exact(&mut s, &mut back).is_ok()
                                    && &back == b"load\n"
                            }
                    });
                    let counter = if ok { &served } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut accepted = 0u64;
    for round in 1..=10 {
        let out = deployment.command(&["upgrade"]);
        assert!(out.status.success(), "upgrade {round}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("upgraded from"), "{said}");
        // The session from before the first upgrade still echoes.
        assert_eq!(echo_roundtrip(&mut long, b"still\n"), b"still\n");
        let status = deployment.command(&["status"]);
        assert_eq!(status_field(&status, "pid"), pid);
        let now: u64 = status_field(&status, "accepted").parse().unwrap();
        assert!(now >= accepted, "totals went back: {now} after {accepted}");
        accepted = now;
        assert_eq!(
            deployment.pid_in_file(),
            pid,
            "the pid file after upgrade {round}"
        );
    }
    // Some load after the last upgrade too.
    let after = served.load(Ordering::Relaxed) + 20;
    assert!(wait_until(WAIT, || served.load(Ordering::Relaxed) >= after));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed connections");
    assert!(served.load(Ordering::Relaxed) > 20);
    server.assert_line_count("upgraded in place from", 10, "upgrades");
    // Each new image says its listener is the one it took over, not a new one.
    let kept = server
        .log_lines()
        .iter()
        .filter(|l| {
            l.contains("listening on") && l.ends_with("(taken over from the previous image)")
        })
        .count();
    assert_eq!(kept, 10, "{}", server.log_text());

    drop(long);
    let ending = server.wait_child_ending(long_peer);
    let line = server
        .log_lines()
        .into_iter()
        .find(|l| l.contains(&format!("({long_peer}) exited")))
        .unwrap();
    let lasted: f64 = line
        .rsplit("after ")
        .next()
        .and_then(|t| t.trim_end_matches('s').parse().ok())
        .unwrap();
    assert!(
        lasted + 0.05 >= opened.elapsed().as_secs_f64() - 1.0 && lasted > 0.0,
        "the session's duration spans the upgrades: {line} ({ending:?})"
    );
}

#[test]
fn a_new_binary_whose_check_fails_is_refused_and_the_old_one_serves() {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let mut session = server.connect_greeted();
    // What a broken package would put there: a binary that cannot even check the config.
    let broken = deployment.dir.path().join("broken");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'forkecho: cannot load: a broken build' >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let saved = deployment.dir.path().join("forkecho.good");
    std::fs::rename(&deployment.binary, &saved).unwrap();
    std::fs::rename(&broken, &deployment.binary).unwrap();

    let out = std::process::Command::new(&saved)
        .args([
            "--pid-file",
            deployment.pid_file.to_str().unwrap(),
            "upgrade",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upgrade refused") && stderr.contains("a broken build"),
        "{stderr}"
    );
    server.assert_line_count("upgrade refused", 1, "the refusal");
    assert_eq!(echo_roundtrip(&mut session, b"on\n"), b"on\n");
    assert_serves(&server, b"new\n");
    // SIGUSR2 alike: refused, logged, nothing else changes.
    server.signal(Signal::SIGUSR2);
    server.wait_for_lines("upgrade refused", 2);
    assert_eq!(echo_roundtrip(&mut session, b"still\n"), b"still\n");
}

/// SIGUSR2 and SIGTERM together: whichever comes first, the smart shutdown completes (the
/// session may finish), and the process exits 0 with no child left.
#[test]
fn a_shutdown_racing_an_upgrade_completes() {
    for round in 0..3 {
        let deployment = Deployment::new();
        let mut server = deployment.start(&[]);
        let mut session = server.connect_greeted();
        server.signal(Signal::SIGUSR2);
        if round > 0 {
            // Let the check start, or the exec happen, before the SIGTERM.
            server.wait_for_line("upgrade: checking");
        }
        server.signal(Signal::SIGTERM);
        server.wait_for_line("shutting down on SIGTERM (smart)");
        assert_eq!(echo_roundtrip(&mut session, b"last\n"), b"last\n");
        drop(session);
        let status = server.wait_exit(WAIT);
        assert!(
            status.success(),
            "round {round}: {status:?}\n{}",
            server.log_text()
        );
        assert!(!Path::new(&deployment.pid_file).exists());
    }
}

/// A reload and an upgrade asked together: both happen, and the server serves with the new
/// configuration in the new image.
#[test]
fn a_reload_racing_an_upgrade_both_apply() {
    let deployment = Deployment::new();
    let config = |banner: &str| format!("listen = [\"127.0.0.1:0\"]\nbanner = \"{banner}\\n\"\n");
    let server = Server::builder()
        .program(&deployment.binary)
        .args(["--pid-file", deployment.pid_file.to_str().unwrap()])
        .config(&config("one"))
        .env("RUST_LOG", "info")
        .start();
    server.rewrite_config(&config("two"));
    server.signal(Signal::SIGHUP);
    server.signal(Signal::SIGUSR2);
    server.wait_for_line("upgraded in place from");
    server.wait_for_line("reloaded configuration");
    let mut s = server.connect();
    assert_eq!(read_exactly(&mut s, 4), b"two\n");
    assert_eq!(echo_roundtrip(&mut s, b"x\n"), b"x\n");
}

/// Each upgrade pauses accepting only for the exec: the worst connect latency of a client
/// looping meanwhile stays far from a refused connection (the bench measures it).
#[test]
fn an_upgrade_refuses_no_connection_to_a_looping_client() {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let looping = {
        let (stop, refused) = (stop.clone(), refused.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => drop(s),
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    for _ in 0..3 {
        let out = deployment.command(&["upgrade"]);
        assert!(out.status.success(), "{out:?}");
    }
    stop.store(true, Ordering::Relaxed);
    looping.join().unwrap();
    assert_eq!(refused.load(Ordering::Relaxed), 0);
}

/// After a rollback for `why`: the command said it failed, one error line says why, the
/// session opened before is kept (and counted), new clients are served by the same pid; and
/// with the good binary back, the next upgrade succeeds.
fn assert_rolled_back(
    deployment: &Deployment,
    server: &Server,
    session: &mut std::net::TcpStream,
    out: &std::process::Output,
    why: &str,
    good: &Path,
) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not start") && stderr.contains("serves again"),
        "{stderr}"
    );
    server.assert_line_count(
        "upgrade failed: the new binary could not start",
        1,
        "rollback",
    );
    server.assert_line_count(why, 1, "the rollback's reason");
    assert_eq!(echo_roundtrip(session, b"kept\n"), b"kept\n");
    assert_serves(server, b"new client\n");
    let status = deployment.command(&["status"]);
    assert_eq!(status_field(&status, "pid"), server.pid().to_string());
    let active: usize = status_field(&status, "active").parse().unwrap();
    assert!(
        active >= 1,
        "the session kept through the rollback is counted"
    );

    std::fs::rename(good, &deployment.binary).unwrap();
    let out = deployment.command(&["upgrade"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(echo_roundtrip(session, b"again\n"), b"again\n");
}

/// A new binary that passes the check but cannot start with the state (here: a wrapper that
/// starts it with a bad flag only when it takes over) hands back to the previous one, which
/// serves on with every session; one error line, and the command says it failed.
#[test]
fn a_new_image_that_cannot_start_rolls_back_to_the_previous_one() {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let mut session = server.connect_greeted();
    let good = deployment.wrap_for_takeover("exec {good} --max-children 0 \"$@\"");
    let out = deployment.command(&["upgrade"]);
    let why = "--max-children";
    assert_rolled_back(&deployment, &server, &mut session, &out, why, &good);
}

/// A new image that crashes natively while it takes over (a debug build's test hook makes
/// the real binary write through a null pointer, or abort) rolls back as a refusal does.
#[cfg(debug_assertions)]
fn a_crash_while_taking_over_rolls_back(how: &str, signal: &str) {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let mut session = server.connect_greeted();
    let takeover = format!("FORKECHO_TEST_CRASH_WHILE_ADOPTING={how} exec {{good}} \"$@\"");
    let good = deployment.wrap_for_takeover(&takeover);
    let out = deployment.command(&["upgrade"]);
    let why = format!("it crashed ({signal}) before serving");
    assert_rolled_back(&deployment, &server, &mut session, &out, &why, &good);
}

#[cfg(debug_assertions)]
#[test]
fn a_new_image_that_segfaults_while_taking_over_rolls_back() {
    a_crash_while_taking_over_rolls_back("segv", "SIGSEGV");
}

#[cfg(debug_assertions)]
#[test]
fn a_new_image_that_aborts_while_taking_over_rolls_back() {
    a_crash_while_taking_over_rolls_back("abort", "SIGABRT");
}

/// A balancer's connection whose PROXY header is half there when the upgrade comes: it passes
/// to the new image, which takes the rest of the header and serves the real client.
#[test]
fn a_connection_waiting_for_its_proxy_header_passes_to_the_new_image() {
    use std::io::Write;
    let deployment = Deployment::new();
    let server = deployment.start(&["--proxy-protocol", "v1", "--trusted-proxy", "127.0.0.1"]);
    let mut balancer = server.connect();
    balancer
        .write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 ")
        .unwrap();
    server.wait_for_line("listening on");
    let out = deployment.command(&["upgrade"]);
    assert!(out.status.success(), "{out:?}");
    balancer.write_all(b"2333\r\n").unwrap();
    expect_banner(&mut balancer);
    assert_eq!(echo_roundtrip(&mut balancer, b"through\n"), b"through\n");
    server.wait_for_line("accepted 203.0.113.7:5555 via 127.0.0.1:");
}

/// In exec mode, a program started after an upgrade sees none of the upgrade's variables, and
/// no descriptor but its own three.
#[test]
fn a_program_started_after_an_upgrade_sees_nothing_of_it() {
    let deployment = Deployment::new();
    let server = deployment.start(&["--", "sh", "-c", "env; ls /proc/self/fd"]);
    let out = deployment.command(&["upgrade"]);
    assert!(out.status.success(), "{out:?}");
    let mut s = server.connect();
    let said = String::from_utf8_lossy(&read_to_eof(&mut s)).to_string();
    assert!(!said.contains("FORKECHO_UPGRADE"), "{said}");
    assert!(said.contains("PROTO=TCP"), "{said}");
}

/// An upgrade during a smart shutdown's drain is carried out, and the new image goes on with
/// the shutdown where it was: it does not listen again, says it is shutting down, the session
/// kept echoes, and when that ends the server exits 0 and removes its pid file.
#[test]
fn an_upgrade_during_a_smart_shutdown_carries_the_shutdown_on() {
    let deployment = Deployment::new();
    let mut server = deployment.start(&["--shutdown-timeout", "120"]);
    let mut session = server.connect_greeted();
    server.signal(Signal::SIGTERM);
    server.wait_for_line("shutting down on SIGTERM (smart)");
    assert_upgraded(&deployment.upgrade());
    server.wait_for_line("the shutdown in progress goes on");
    let status = deployment.command(&["status"]);
    assert_eq!(status_field(&status, "state"), "shutting down");
    assert_eq!(status_field(&status, "pid"), server.pid().to_string());
    assert_eq!(echo_roundtrip(&mut session, b"still\n"), b"still\n");
    drop(session);
    let exit = server.wait_exit(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", server.log_text());
    assert!(!deployment.pid_file.exists());
    server.assert_line_count("listening on", 1, "the new image listens on nothing");
    server.assert_line_count("shutdown complete", 1, "one end");
}

/// An upgrade while a fast shutdown waits for a session that ignores SIGTERM: the new image
/// keeps the SIGKILL deadline (the session is killed and the server exits; a new image that
/// forgot the shutdown would serve on with no listener).
#[test]
fn an_upgrade_during_a_fast_shutdown_keeps_its_kill_deadline() {
    let deployment = Deployment::new();
    let program = [
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo up; while :; do sleep 1; done",
    ];
    let mut server = deployment.start(&[&["--kill-timeout", "3"][..], &program].concat());
    let mut session = server.connect();
    assert_eq!(read_exactly(&mut session, 3), b"up\n");
    server.signal(Signal::SIGINT);
    server.wait_for_line("shutting down on SIGINT (fast)");
    assert_upgraded(&deployment.upgrade());
    server.wait_for_line("the shutdown in progress goes on");
    server.wait_for_line("sending them SIGKILL");
    let exit = server.wait_exit(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", server.log_text());
    assert_closed_by_server(&mut session, "the session killed at the deadline");
}

/// A session that ends during the exec of a new image that then crashes: the previous image,
/// started again, reaps it and logs its end (the failed image must not have taken that exit
/// with it, which would leave a session counted for good and a shutdown waiting forever).
#[cfg(debug_assertions)]
#[test]
fn a_session_ending_during_a_failed_takeover_is_reaped_by_the_previous_image() {
    let deployment = Deployment::new();
    let server = deployment.start(&[]);
    let session = server.connect_greeted();
    let client = session.local_addr().unwrap();
    let victim = deployment.dir.path().join("victim");
    std::fs::write(&victim, server.child_pid_for(client).to_string()).unwrap();
    // The wrapper runs as the server's own process, between the exec and the new image:
    // the session's child dies there.
    let takeover = format!(
        "kill -KILL $(cat {}); FORKECHO_TEST_CRASH_WHILE_ADOPTING=segv exec {{good}} \"$@\"",
        victim.display()
    );
    deployment.wrap_for_takeover(&takeover);
    let out = deployment.upgrade();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let ending = server.wait_child_ending(client);
    assert!(ending.how.contains("SIGKILL"), "{ending:?}");
    let status = deployment.command(&["status"]);
    assert_eq!(status_field(&status, "active"), "0");
}

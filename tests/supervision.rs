//! How the parent supervises its children, as a user sees it: killed children are reaped and
//! logged (never left as zombies, even 200 at once or under a signal barrage), children hold
//! only their own socket and none of the parent's signal hooks, and SIGTERM, SIGQUIT and
//! SIGUSR1 do what the contract says.

use crate::util::*;

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Waits for the child serving `client` to end and asserts it was killed by `signal`.
fn assert_killed_by(server: &Server, client: SocketAddr, signal: &str) {
    let ending = server.wait_child_ending(client);
    assert_eq!(
        ending.how,
        format!("killed by signal {signal}"),
        "{ending:?}"
    );
}

/// True if a TCP connect to `addr` is refused (nothing listening).
fn connect_refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
    }
}

/// Polls until a connect to `addr` is refused, with at most 100 probe connections in all.
fn wait_connect_refused(addr: SocketAddr) -> bool {
    let mut probes = 0;
    let mut refused = false;
    wait_until(WAIT, || {
        probes += 1;
        refused = connect_refused(addr);
        refused || probes >= 100
    });
    refused
}

/// The number of active sessions a `status:` line reports.
fn active_in(status: &str) -> Option<u64> {
    LogLine::parse(status)?.number_before("active")
}

/// SIGKILL of a child mid-session: the parent logs it with pid and peer and reaps it, the
/// client sees the connection end, and the next client is served.
#[test]
fn sigkilled_child_is_logged_and_reaped() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"before\n"), b"before\n");
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);

    kill(pid, Signal::SIGKILL).unwrap();
    assert_killed_by(&server, peer, "SIGKILL");
    // The line is written after the child was reaped, so it is gone, not a zombie.
    let kids = server.children();
    assert!(
        !kids.iter().any(|c| c.pid == pid),
        "killed child {pid} still a child of the server: {kids:?}"
    );
    assert!(!process_exists(pid), "killed child {pid} still exists");
    assert_closed_by_server(&mut s, "session of the killed child");

    assert_serves(&server, b"after\n");
}

/// A child killed by a real-time signal (which has no name in nix) is reaped and counted like
/// any other: its slot is freed, the status line says so, and a shutdown does not wait for it.
#[test]
fn child_killed_by_realtime_signal_is_reaped_and_counted() {
    let mut server = Server::start();
    let mut s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);
    // Safe: sends a signal to the child this test just made.
    assert_eq!(unsafe { libc::kill(pid.as_raw(), libc::SIGRTMIN() + 2) }, 0);
    assert_killed_by(&server, peer, "SIGRTMIN+2");
    assert_closed_by_server(&mut s, "session of the killed child");
    let status = server.status_line();
    assert_eq!(active_in(&status), Some(0), "{status}");
    assert!(status.contains("SIGRTMIN+2: 1"), "{status}");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
}

/// A barrage of SIGUSR1 and SIGHUP does not stop the server or disturb an open session, and
/// SIGUSR1 still produces a `status:` line.
#[test]
fn sigusr1_sighup_barrage_server_keeps_running() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"before\n"), b"before\n");
    for i in 0..500 {
        let sig = if i % 2 == 0 {
            Signal::SIGUSR1
        } else {
            Signal::SIGHUP
        };
        server.signal(sig);
    }
    server.wait_for_line("status:");
    assert_eq!(echo_roundtrip(&mut s, b"during\n"), b"during\n");
    assert_serves(&server, b"new client\n");
    // Still running and still answering signals after the barrage.
    let before = server.count_lines("status:");
    server.signal(Signal::SIGUSR1);
    server.wait_for_lines("status:", before + 1);
    assert_eq!(server.count_lines("shutting down"), 0);
}

/// A child holds exactly fds 0, 1, 2 and its socket, blocks no signal and catches none of the
/// parent's hooked signals; the parent is single-threaded.
#[test]
fn child_fds_and_signal_state_are_clean() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"ready\n"), b"ready\n");
    let pid = server.child_pid_for(s.local_addr().unwrap());

    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .map(|e| {
            let e = e.unwrap();
            let fd: i32 = e.file_name().to_str().unwrap().parse().unwrap();
            let target = std::fs::read_link(e.path())
                .unwrap_or_else(|err| panic!("readlink fd {fd} of {pid}: {err}"));
            (fd, target.display().to_string())
        })
        .collect();
    fds.sort();
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(numbers.len(), 4, "child {pid} fds: {fds:?}");
    assert_eq!(numbers[..3], [0, 1, 2], "child {pid} fds: {fds:?}");
    // Of everything it inherited, only its connection.
    assert!(fds[3].1.starts_with("socket:["), "child {pid} fds: {fds:?}");
}

/// SIGTERM during a session: listeners close, the session still finishes whole (all data back,
/// then EOF), and the server exits 0 with no child left.
#[test]
fn sigterm_lets_active_session_finish_then_exits_0() {
    const FIRST: usize = 100 << 10;
    const TOTAL: usize = 300 << 10;
    // A grace period no loaded CI machine can run out of: this test is about data, not time.
    let mut server = Server::builder()
        .args(["--shutdown-timeout", "120"])
        .start();
    let addr = server.addr();
    let mut s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);
    // Its start time (field 22), so that a process that later reuses the pid is not taken for
    // it: the suite forks thousands of processes, and pids wrap at 32,768.
    let started = stat_field(pid, 22);
    let data = Noise::new(0x7e57).bytes(TOTAL);

    let mut r = s.try_clone().unwrap();
    let reader = thread::spawn(move || read_to_eof(&mut r));
    s.write_all(&data[..FIRST]).unwrap();

    server.signal(Signal::SIGTERM);
    server.wait_for_line("shutting down on SIGTERM");
    assert!(
        wait_connect_refused(addr),
        "connects to {addr} not refused during the graceful shutdown"
    );
    assert!(
        process_exists(pid),
        "child {pid} gone before its client was done"
    );

    s.write_all(&data[FIRST..]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let back = reader.join().expect("reader thread");
    assert_eq!(back.len(), TOTAL, "bytes echoed before EOF");
    assert!(back == data, "echoed data differs from what was sent");

    let status = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "server exit status {status:?}");
    server.wait_child_exit(peer, 0);
    server.wait_for_line("shutdown complete");
    // With the parent gone and its only child gone, no process holds the listener. (A connect
    // to the address now proves nothing: in a parallel suite another test's server may
    // already have been given the freed port.)
    assert!(
        wait_until(WAIT, || stat_field(pid, 22) != started),
        "child {pid} still exists after the server exited"
    );
    assert_eq!(
        server.count_lines("accepted "),
        1,
        "accepted during shutdown"
    );
}

/// With `--shutdown-timeout 0.5`, an idle session that does not finish gets its child
/// terminated with SIGTERM, and the server exits 0 with no child left.
#[test]
fn shutdown_timeout_terminates_idle_session() {
    let mut server = Server::builder()
        .args(["--shutdown-timeout", "0.5"])
        .start();
    let mut s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);

    server.signal(Signal::SIGTERM);
    server.wait_for_line("shutting down on SIGTERM");
    assert_killed_by(&server, peer, "SIGTERM");
    let status = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "server exit status {status:?}");
    server.wait_for_line("shutdown complete");
    assert!(
        wait_until(WAIT, || !process_exists(pid)),
        "child {pid} still exists after the server exited"
    );
    assert_closed_by_server(&mut s, "idle session after the shutdown timeout");
}

/// SIGQUIT shuts down at once: every child is SIGKILLed and reaped, the server exits 0.
#[test]
fn sigquit_kills_children_and_exits_0() {
    let mut server = Server::start();
    let mut sessions = [server.connect_greeted(), server.connect_greeted()];
    let targets: Vec<(Pid, SocketAddr)> = sessions
        .iter_mut()
        .map(|s| {
            assert_eq!(echo_roundtrip(s, b"open\n"), b"open\n");
            let peer = s.local_addr().unwrap();
            (server.child_pid_for(peer), peer)
        })
        .collect();

    server.signal(Signal::SIGQUIT);
    let status = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "server exit status {status:?}");
    for &(pid, peer) in &targets {
        assert_killed_by(&server, peer, "SIGKILL");
        assert!(
            wait_until(WAIT, || !process_exists(pid)),
            "child {pid} still exists after the server exited"
        );
    }
    server.wait_for_line("shutdown complete");
    for (i, s) in sessions.iter_mut().enumerate() {
        assert_closed_by_server(s, &format!("session {i} after SIGQUIT"));
    }
}

/// SIGUSR1 logs a `status:` line with the number of active sessions: 1 with one open session,
/// 0 once it has ended.
#[test]
fn sigusr1_status_counts_active_sessions() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    server.child_pid_for(peer);

    server.signal(Signal::SIGUSR1);
    let line = server.wait_for_line("status:");
    assert_eq!(
        active_in(&line),
        Some(1),
        "status with one open session: {line}"
    );

    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s), b"");
    server.wait_child_exit(peer, 0);
    server.signal(Signal::SIGUSR1);
    server.wait_for_lines("status:", 2);
    let line = server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("status:"))
        .nth(1)
        .unwrap();
    assert_eq!(
        active_in(&line),
        Some(0),
        "status after the session ended: {line}"
    );
}

/// A second SIGTERM during a graceful shutdown (timeout 60 s) ends the idle session at once
/// and the server exits 0 long before the timeout.
#[test]
fn second_sigterm_escalates_shutdown() {
    let mut server = Server::builder().args(["--shutdown-timeout", "60"]).start();
    let mut s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);

    server.signal(Signal::SIGTERM);
    server.wait_for_line("shutting down on SIGTERM");
    assert!(
        process_exists(pid),
        "child {pid} ended by the first SIGTERM"
    );
    server.signal(Signal::SIGTERM);

    let status = server.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "server exit status {status:?}");
    let ending = server.wait_child_ending(peer);
    assert!(ending.how.starts_with("killed by signal SIG"), "{ending:?}");
    server.wait_for_line("shutdown complete");
    assert!(
        wait_until(WAIT, || !process_exists(pid)),
        "child {pid} still exists after the server exited"
    );
    assert_closed_by_server(&mut s, "idle session after the second SIGTERM");
}

/// A child leads its own process group (in the parent's session) and is named
/// `forkecho-child`, so signals for the parent's group (Ctrl-C) or its name (`pkill forkecho`)
/// do not hit the sessions.
#[test]
fn child_runs_in_its_own_process_group_under_its_own_name() {
    let server = Server::start();
    let s = server.connect_greeted();
    let child = server.child_pid_for(s.local_addr().unwrap());
    // Fields 5 and 6: process group and session id.
    assert_eq!(
        stat_field(child, 5),
        Some(child.to_string()),
        "process group"
    );
    // The parent's session, not one of its own: a new session would also be a new scheduler
    // autogroup (see spawn.rs).
    assert_eq!(stat_field(child, 6), stat_field(server.pid(), 6), "session");
    // A background job of the terminal must not be stopped by SIGTTOU for logging to it.
    let sigttou = 1u64 << (libc::SIGTTOU - 1);
    assert_ne!(signal_mask(child, "SigIgn") & sigttou, 0, "SIGTTOU ignored");
    let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap();
    assert_eq!(comm.trim(), "forkecho-child");
    let parent_comm = std::fs::read_to_string(format!("/proc/{}/comm", server.pid())).unwrap();
    assert_eq!(parent_comm.trim(), "forkecho");
    // `ps` and `pgrep -f` see the parent's command line in the child: the top of the stack,
    // where the kernel put it, stays the children's (only the loop's frames do not).
    let cmdline = |pid: nix::unistd::Pid| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!cmdline(child).is_empty());
    assert_eq!(cmdline(child), cmdline(server.pid()));
}

/// Signals to the parent's process group reach only the parent: `kill -USR1 -<pgid>` asks for
/// status and the session lives on (its child is in its own group); Ctrl-C (SIGINT to the
/// group) is a fast shutdown, so the parent sends the session SIGTERM and exits 0.
#[test]
fn process_group_signals_reach_only_the_parent() {
    use std::os::unix::process::CommandExt;
    let mut server = Server::builder()
        .args(["--kill-timeout", "60"])
        .tweak(|cmd| {
            cmd.process_group(0);
        })
        .start();
    let mut s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    server.child_pid_for(peer);
    nix::sys::signal::killpg(server.pid(), Signal::SIGUSR1).unwrap();
    server.wait_for_line("status: 1 active");
    assert_eq!(echo_roundtrip(&mut s, b"after USR1\n"), b"after USR1\n");

    nix::sys::signal::killpg(server.pid(), Signal::SIGINT).unwrap();
    server.wait_for_line("shutting down on SIGINT (fast)");
    assert_killed_by(&server, peer, "SIGTERM");
    assert!(server.wait_exit(WAIT).success());
    assert_closed_by_server(&mut s, "session after a fast shutdown");
}

/// SIGTERM and SIGINT that arrive together are one request, the harder one (fast): the
/// children get SIGTERM, not the SIGKILL a repeated request would bring.
#[test]
fn signals_arriving_together_count_once() {
    let mut server = Server::builder()
        .args(["--shutdown-timeout", "120", "--kill-timeout", "120"])
        .start();
    let s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    server.child_pid_for(peer);
    // Both signals pend while the server is stopped, so it sees them in one batch.
    server.signal(Signal::SIGSTOP);
    server.signal(Signal::SIGTERM);
    server.signal(Signal::SIGINT);
    server.signal(Signal::SIGCONT);
    assert_killed_by(&server, peer, "SIGTERM");
    assert!(server.wait_exit(WAIT).success());
    assert_eq!(server.count_lines("(fast)"), 1, "{}", server.log_text());
    assert_eq!(
        server.count_lines("(immediate)"),
        0,
        "{}",
        server.log_text()
    );
    assert_eq!(server.count_lines("(smart)"), 0, "{}", server.log_text());
}

/// Fast shutdown (SIGINT): a child that does not die of SIGTERM (here: stopped, so SIGTERM
/// stays pending) is SIGKILLed after `kill_timeout`; the server reaps it and exits 0.
#[test]
fn fast_shutdown_kills_what_sigterm_left_after_kill_timeout() {
    let mut server = Server::builder().args(["--kill-timeout", "0.5"]).start();
    let s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    let child = server.child_pid_for(peer);
    // Kills the stopped child if the server does not.
    let guard = KillOnDrop(child);
    kill(child, Signal::SIGSTOP).unwrap();
    assert!(wait_until(WAIT, || process_state(child) == Some('T')));
    server.signal(Signal::SIGINT);
    server.wait_for_line("shutting down on SIGINT (fast)");
    assert_killed_by(&server, peer, "SIGKILL");
    assert!(server.wait_exit(WAIT).success());
    assert!(!process_exists(child), "child left behind");
    // Reaped: its pid may be reused by another test's process, and must not be killed.
    std::mem::forget(guard);
}

/// A launcher that leaves SIGCHLD and SIGTERM blocked (the mask survives exec) does not stop
/// the server from reaping its children or from shutting down on SIGTERM.
#[test]
fn signals_blocked_by_the_launcher_are_unblocked() {
    use std::os::unix::process::CommandExt;
    let mut server = Server::builder()
        .tweak(|cmd| {
            // Safe: sigprocmask is async-signal-safe; runs in the forked child before exec.
            unsafe {
                cmd.pre_exec(|| {
                    let mut set = nix::sys::signal::SigSet::empty();
                    set.add(Signal::SIGCHLD);
                    set.add(Signal::SIGTERM);
                    set.thread_block()?;
                    Ok(())
                });
            }
        })
        .start();
    let mut s = server.connect_greeted();
    let peer = s.local_addr().unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s), b"");
    server.wait_child_exit(peer, 0);
    assert!(server.children().is_empty(), "{:?}", server.children());
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
}

/// Clients queued in the backlog when a smart shutdown starts completed their handshake:
/// closing the listeners must not reset them. With room under `max_children` they are served
/// as sessions of the draining server; beyond it they read `refusal_message`, then EOF.
#[test]
fn smart_shutdown_serves_or_answers_every_queued_client_never_resets_one() {
    const QUEUED: usize = 6;
    let mut server = Server::builder()
        .args(["--max-children", "3", "--refusal-message", "closing\\n"])
        .args(["--shutdown-timeout", "120"])
        .start();
    let addr = server.addr();
    let mut held = server.connect_greeted();
    // Frozen, the parent accepts nothing: these clients wait in the kernel's backlog, and the
    // SIGTERM is seen before any of them.
    server.freeze();
    let mut queued: Vec<TcpStream> = (0..QUEUED).map(|_| connect(addr)).collect();
    for (i, s) in queued.iter_mut().enumerate() {
        s.write_all(format!("client {i}\n").as_bytes()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    }
    server.signal(Signal::SIGTERM);
    server.signal(Signal::SIGCONT);
    server.wait_for_line("shutting down on SIGTERM (smart)");

    // Two slots were free (more, if a served session ended and was reaped meanwhile): those
    // clients are served whole, the others answered.
    let mut served = 0;
    for (i, s) in queued.iter_mut().enumerate() {
        let got = read_to_eof(s);
        let echoed = [BANNER, format!("client {i}\n").as_bytes()].concat();
        if got == echoed {
            served += 1;
        } else {
            assert_eq!(got, b"closing\n", "queued client {i}: {got:?}");
        }
    }
    assert!(
        served >= 2,
        "{served} queued clients served under max_children 3"
    );
    if served < QUEUED {
        let answered = QUEUED - served;
        server.wait_for_line(&format!(
            "answered {answered} queued clients with refusal_message"
        ));
    }

    assert_eq!(echo_roundtrip(&mut held, b"still\n"), b"still\n");
    held.shutdown(Shutdown::Write).unwrap();
    read_to_eof(&mut held);
    let status = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "server exit status {status:?}");
}

/// A fast shutdown starts no session: every queued client is answered with `refusal_message`.
#[test]
fn fast_shutdown_answers_queued_clients_instead_of_resetting_them() {
    let mut server = Server::builder()
        .args(["--refusal-message", "bye\\n"])
        .start();
    let addr = server.addr();
    server.freeze();
    let mut queued: Vec<TcpStream> = (0..5).map(|_| connect(addr)).collect();
    server.signal(Signal::SIGINT);
    server.signal(Signal::SIGCONT);
    for (i, s) in queued.iter_mut().enumerate() {
        assert_eq!(read_to_eof(s), b"bye\n", "queued client {i}");
    }
    let status = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "server exit status {status:?}");
    assert_eq!(server.count_lines("accepted "), 0, "sessions started");
}

/// The kernel queues `backlog + 1` completed connections: a fast shutdown answers every one
/// of them, the last included, instead of resetting it.
#[test]
fn a_full_backlog_is_answered_whole_at_shutdown() {
    const BACKLOG: usize = 4;
    let mut server = Server::builder()
        .args(["--backlog", "4", "--refusal-message", "bye\\n"])
        .start();
    let addr = server.addr();
    server.freeze();
    let mut queued: Vec<TcpStream> = (0..BACKLOG + 1).map(|_| connect(addr)).collect();
    server.signal(Signal::SIGINT);
    server.signal(Signal::SIGCONT);
    for (i, s) in queued.iter_mut().enumerate() {
        assert_eq!(
            read_to_eof(s),
            b"bye\n",
            "queued client {i} of {}",
            BACKLOG + 1
        );
    }
    assert!(server.wait_exit(WAIT).success());
}

/// A smart shutdown that runs out of time closes the connections still waiting for their
/// PROXY header, instead of waiting for them (here a header that would time out only after a
/// minute): the server exits 0 soon after `shutdown_timeout`, and the balancer sees EOF.
#[test]
fn a_shutdown_does_not_wait_for_proxy_headers() {
    let mut server = Server::builder()
        .args(["--proxy-protocol", "v1", "--trusted-proxy", "127.0.0.1"])
        .args(["--proxy-header-timeout", "60", "--shutdown-timeout", "0.5"])
        .start();
    let mut balancer = server.connect();
    balancer.write_all(b"PROXY TCP4 ").unwrap();
    // Each try reads the line its own SIGUSR1 produced, not the first one logged.
    let waiting = |server: &Server| server.status_line().contains("1 awaiting a PROXY header");
    assert!(
        wait_until(WAIT, || waiting(&server)),
        "{}",
        server.log_text()
    );
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
    assert_eq!(read_to_eof(&mut balancer), b"", "bytes to the balancer");
}

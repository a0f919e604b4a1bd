//! Review of "Sessions start lean" (f1e00d2): the echo child cloned onto a stack of its own,
//! the loop's frames MADV_DONTFORK, the slot ring, and parent-only (MADV_WIPEONFORK) memory
//! for the loop's state and signal-hook's registry.

use crate::util::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// The outcome lines of upgrades, in order.
fn upgrade_outcomes(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| {
            l.contains("upgraded in place")
                || l.contains("upgrade refused")
                || l.contains("upgrade failed")
        })
        .cloned()
        .collect()
}

/// DEFECT. The upgrade's check is started with `Command::spawn`, which forks here (a static
/// build with `current_dir`): until its `execve` the check child has signal-hook's handlers
/// installed and every signal unblocked. A hooked signal that reaches it then (one sent to
/// the server's process group: `kill -HUP -<pgid>`, Ctrl-C, here SIGCHLD, which the check
/// ignores once it has exec'd) runs signal-hook's handler in the child. Before this commit
/// the handler found its registry (the child's copy) and wrote a byte to the parent's pipe;
/// now the registry lives in MADV_WIPEONFORK memory, zero in every child, and the handler
/// dereferences it: the check dies of SIGSEGV and the upgrade is refused.
#[test]
fn an_upgrade_check_survives_a_hooked_signal_before_its_exec() {
    const ROUNDS: usize = 30;
    let server = Server::builder()
        .env("RUST_LOG", "info")
        .tweak(|c| {
            // A process group of its own, as under a shell's job control or systemd.
            c.process_group(0);
        })
        .start();
    let group = server.pid().as_raw();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                // Safe: sends a signal to the server's process group only.
                unsafe { libc::kill(-group, libc::SIGCHLD) };
            }
        })
    };
    let mut outcomes = Vec::new();
    for round in 1..=ROUNDS {
        server.signal(Signal::SIGUSR2);
        server.wait_for_log(
            &format!("the end of upgrade {round}"),
            Duration::from_secs(30),
            |lines| upgrade_outcomes(lines).len() >= round,
        );
        outcomes = upgrade_outcomes(&server.log_lines());
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let failed: Vec<&String> = outcomes
        .iter()
        .filter(|l| !l.contains("upgraded in place"))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {ROUNDS} upgrades did not go through while SIGCHLD reached the process group:\n{}",
        failed.len(),
        failed
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Reads `want.len()` bytes, within the socket's timeout.
fn read_n(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// PROBE. Every slot in flight: each new child is held in its first ptrace stop (before it
/// has run one instruction, so before it takes its slot) until 1024 lean children exist;
/// the next sessions must start with the plain fork under `with_stack_inherited`, and every
/// session must serve once the children run.
#[test]
fn with_every_slot_in_flight_sessions_fall_back_to_a_plain_fork_and_all_serve() {
    const CLIENTS: usize = 1030;
    raise_own_nofile(4096);
    let server = Server::builder()
        .env("RUST_LOG", "info")
        .config("listen = [\"127.0.0.1:0\"]\nmax_children = 4000\nmax_per_source = 0\n")
        .start();
    let hold = ForkHold::start(server.pid(), CLIENTS);
    // Every client connects once the tracer holds the server.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let s = server.connect();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        clients.push(s);
    }
    let held = hold.join().unwrap_or_else(|e| panic!("tracer: {e}"));
    assert_eq!(held.children.len(), CLIENTS);
    assert_eq!(
        (held.lean, held.plain),
        (1024, CLIENTS - 1024),
        "lean and plain forks while no child ran"
    );
    let mut failures = Vec::new();
    for (i, s) in clients.iter_mut().enumerate() {
        let banner = read_n(s, b"connect successful!\n".len());
        let echoed = s
            .write_all(format!("client {i}\n").as_bytes())
            .and_then(|()| read_n(s, format!("client {i}\n").len()));
        match (banner, echoed) {
            (Ok(b), Ok(e))
                if b == b"connect successful!\n" && e == format!("client {i}\n").as_bytes() => {}
            other => failures.push(format!("client {i}: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} sessions failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    drop(clients);
    // And the slots came back: a new session starts lean again and serves.
    assert_serves(&server, b"after the storm\n");
    assert!(
        !server.log_text().contains("killed by signal"),
        "a child died:\n{}",
        server.log_text()
    );
}

/// PROBE. What a lean child reads after reloads: the banner, idle_timeout and
/// max_session_time of the configuration in force, through a handler change (echo → program
/// → echo); its own end line still names its peer.
#[test]
fn lean_children_follow_reloads_of_settings_and_handler() {
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\nbanner = \"one\\n\"\n")
        .start();
    let mut s = server.connect();
    assert_eq!(read_exactly(&mut s, 4), b"one\n");
    assert_eq!(echo_roundtrip(&mut s, b"a\n"), b"a\n");
    drop(s);

    server
        .rewrite_config("listen = [\"127.0.0.1:0\"]\nexec = [\"/bin/cat\"]\nbanner = \"two\\n\"\n");
    server.signal(Signal::SIGHUP);
    server.wait_for_lines("reloaded configuration", 1);
    let mut s = server.connect();
    assert_eq!(read_exactly(&mut s, 4), b"two\n");
    assert_eq!(echo_roundtrip(&mut s, b"b\n"), b"b\n");
    drop(s);

    server.rewrite_config(
        "listen = [\"127.0.0.1:0\"]\nbanner = \"three\\n\"\nidle_timeout = 0.5\n\
         max_session_time = 30\n",
    );
    server.signal(Signal::SIGHUP);
    server.wait_for_lines("reloaded configuration", 2);
    let mut s = server.connect();
    let client = s.local_addr().unwrap();
    assert_eq!(read_exactly(&mut s, 6), b"three\n");
    assert_eq!(echo_roundtrip(&mut s, b"c\n"), b"c\n");
    let started = Instant::now();
    assert_closed_by_server(&mut s, "idle_timeout 0.5 s");
    assert!(started.elapsed() < Duration::from_secs(5));
    let ending = server.wait_child_ending(client);
    assert_eq!(ending.how, "exited with code 3", "{ending:?}");
    server.wait_for_line(&format!("session {client} ended: IdleTimeout"));
}

/// Private (unshared) memory of `pid`, kB, from smaps_rollup.
fn private_kib(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("Private_"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// PROBE. A lean child's own memory is a few pages (its stack, its slot's page is shared),
/// and its command line is the parent's.
#[test]
fn a_lean_child_owns_a_few_pages_and_shows_the_parents_command_line() {
    let server = Server::start();
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"x\n"), b"x\n");
    let child = server.child_pid_for(s.local_addr().unwrap());
    let private = private_kib(child.as_raw());
    assert!(private <= 64, "child {child} owns {private} kB");
    let cmdline = |pid: i32| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert_eq!(cmdline(child.as_raw()), cmdline(server.pid().as_raw()));
}

//! Exec mode as a user sees it: `forkecho [OPTIONS] -- PROGRAM [ARGS...]` runs a real program
//! per connection with the connection on fd 0 and fd 1. The program's bytes, environment
//! (tcp-environ(5) and systemd's `REMOTE_*`), descriptors, signal state, limits, process group
//! and nice; its end at `max_session_time` and at shutdown, whole process group included; a
//! thousand programs killed at once; a missing or vanished program; and programs nobody here
//! wrote (`git daemon --inetd`, ucspi-tcp's `recordio`) run the way their users run them.

use crate::util::*;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Prints the environment NUL-separated, then `END` and a NUL, then keeps the session open
/// until the client closes: a client can read the whole environment while the session lives.
const PRINT_ENV: &[&str] = &["sh", "-c", "env -0; printf 'END\\000'; exec cat >/dev/null"];

/// Ignores SIGTERM (its `sleep`s inherit that), says `ready` once it does, then runs forever.
const IGNORE_TERM: &[&str] = &[
    "sh",
    "-c",
    "trap '' TERM; echo ready; while :; do sleep 0.2; done",
];

/// Variables that belong to the service manager that started forkecho, never to a session.
const MANAGER_VARIABLES: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
];

/// Never set: forkecho does no DNS and no ident lookups.
const LOOKUP_VARIABLES: [&str; 3] = ["TCPREMOTEHOST", "TCPLOCALHOST", "TCPREMOTEINFO"];

/// Reads what [`PRINT_ENV`] prints, through its `END` marker (or everything to EOF, for a
/// program that prints and exits).
fn read_printed_environment(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    while !out.ends_with(b"\0END\0") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the environment: {e} after {out:?}"),
        }
        assert!(out.len() < 1 << 20, "an environment over 1 MiB: {out:?}");
    }
    out
}

/// `KEY=VALUE` entries separated by NULs (as `env -0` prints them, `END` marker optional).
fn parse_environment(printed: &[u8]) -> BTreeMap<String, String> {
    let printed = printed.strip_suffix(b"END\0").unwrap_or(printed);
    String::from_utf8_lossy(printed)
        .split('\0')
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (key, value) = entry
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {entry:?} in {printed:?}"));
            (key.to_string(), value.to_string())
        })
        .collect()
}

/// Asserts the tcp-environ(5) and systemd variables describe `client`'s connection as the
/// client sees it, with `connnum` other live sessions from its source (s6-tcpserver's
/// TCPCONNNUM, 0 for the first), and no lookup results.
fn assert_connection_environment(env: &BTreeMap<String, String>, client: &TcpStream, connnum: u32) {
    let (remote, local) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
    let expected = [
        ("PROTO", "TCP".to_string()),
        ("TCPLOCALIP", local.ip().to_string()),
        ("TCPLOCALPORT", local.port().to_string()),
        ("TCPREMOTEIP", remote.ip().to_string()),
        ("TCPREMOTEPORT", remote.port().to_string()),
        ("TCPCONNNUM", connnum.to_string()),
        ("REMOTE_ADDR", remote.ip().to_string()),
        ("REMOTE_PORT", remote.port().to_string()),
    ];
    for (key, value) in expected {
        assert_eq!(
            env.get(key).map(String::as_str),
            Some(value.as_str()),
            "{key} for the client at {remote} -> {local}; environment: {env:#?}"
        );
    }
    for key in LOOKUP_VARIABLES {
        assert!(!env.contains_key(key), "{key} is set: {env:#?}");
    }
}

/// Waits until the session program of `pid` has replaced forkecho's image with `name`.
fn wait_exec(pid: Pid, name: &str) {
    assert!(
        wait_until(WAIT, || status_field(pid, "Name").as_deref() == Some(name)),
        "child {pid} never became `{name}` (it is {:?})",
        status_field(pid, "Name")
    );
}

/// Asserts that no live process of the session whose program was `pgid` is left, waiting up
/// to `WAIT` for the kernel to finish the kills.
fn assert_group_gone(pgid: Pid, what: &str) {
    let gone = wait_until(WAIT, || processes_in_group(pgid).is_empty());
    assert!(
        gone,
        "{what}: processes of group {pgid} left: {:?}",
        processes_in_group(pgid)
    );
}

/// SIGKILLs a session's whole process group when dropped: what the test's server guard (which
/// kills the server's children only) cannot reach if shutdown leaves a grandchild behind.
fn group_guard(pgid: Pid) -> KillOnDrop {
    KillOnDrop(Pid::from_raw(-pgid.as_raw()))
}

/// Runs `cmd` to completion, killing it after `WAIT`; panics with its output on failure.
fn run_bounded(cmd: &mut Command, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: spawn: {e}"));
    let finished = wait_until(WAIT, || child.try_wait().unwrap().is_some());
    if !finished {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        finished && out.status.success(),
        "{what}: {} (finished: {finished})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// True if `program` is in PATH; otherwise says the test `what` is skipped.
fn have_or_skip(program: &str, what: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if !found {
        eprintln!("skipping {what}: `{program}` is not installed (.ci/run installs it)");
    }
    found
}

/// The signal numbers in a /proc signal mask (bit n-1 is signal n).
fn signals_in(mask: u64) -> Vec<u32> {
    (1..=64).filter(|n| mask & (1 << (n - 1)) != 0).collect()
}

/// The soft and hard value of each limit in /proc/<pid>/limits, by its name there
/// (`Max open files` → (`64`, `64`)).
fn limits_of(pid: Pid) -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/limits: {e}"));
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // `Max cpu time              10                   10                   seconds`:
            // the name is the words before the first number or `unlimited`.
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words
                .iter()
                .position(|w| *w == "unlimited" || w.parse::<u64>().is_ok())?;
            Some((
                words[..at].join(" "),
                (words[at].to_string(), words.get(at + 1)?.to_string()),
            ))
        })
        .collect()
}

// ---- Bytes and environment ----

/// `forkecho -- cat` carries 64 MiB each way byte for byte, with no banner before them, and
/// the session ends with cat's exit code 0 once the client half-closes.
#[test]
fn cat_round_trips_64_mib_byte_exact() {
    const TOTAL: usize = 64 << 20;
    const SEED: u64 = 14;
    let server = exec_server(&[], &["cat"]).start();
    let mut s = server.connect();
    let peer = s.local_addr().unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut noise = Noise::new(SEED);
        let mut buf = vec![0; 256 << 10];
        for _ in 0..TOTAL / buf.len() {
            noise.fill(&mut buf);
            writer.write_all(&buf).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut expected = Noise::new(SEED);
    let (mut got, mut want) = (vec![0; 256 << 10], vec![0; 256 << 10]);
    let mut received = 0;
    loop {
        let n = s.read(&mut got).expect("read the echo");
        if n == 0 {
            break;
        }
        expected.fill(&mut want[..n]);
        assert!(
            got[..n] == want[..n],
            "bytes {received}..{} differ from what was sent",
            received + n
        );
        received += n;
        assert!(received <= TOTAL, "more bytes back than were sent");
    }
    sender.join().unwrap();
    assert_eq!(received, TOTAL, "bytes back before EOF");
    let ending = server.wait_child_exit(peer, 0);
    assert_eq!(
        ending.meaning, None,
        "a program's exit code has no meaning attached"
    );
}

/// On an IPv4 wildcard listener the program's environment names both ends as each client
/// sees them (TCPLOCALIP is the address the client reached), counts the source's other live
/// sessions in TCPCONNNUM, adds `--env` over what forkecho inherited, and drops what belongs to the
/// service manager and any stale PROTO/TCP*/REMOTE_* forkecho inherited; no banner precedes it.
#[test]
fn environment_describes_each_connection_on_ipv4() {
    let dir = TempDir::new();
    // A real notify socket (the test never reads it), as under systemd `Type=notify`.
    let notify = dir.path().join("notify");
    let _notify_socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let server = exec_server(
        &[
            "-l",
            "0.0.0.0:0",
            "--env",
            "FOO=bar",
            "--env",
            "FORKECHO_OVERRIDDEN=new",
        ],
        PRINT_ENV,
    )
    .env("NOTIFY_SOCKET", notify.to_str().unwrap())
    .env("LISTEN_PID", "1")
    .env("LISTEN_FDS", "1")
    .env("LISTEN_FDNAMES", "x")
    .env("WATCHDOG_PID", "1")
    .env("WATCHDOG_USEC", "1")
    .env("PROTO", "UDP")
    .env("TCPLOCALIP", "192.0.2.1")
    .env("TCPREMOTEHOST", "stale.example")
    .env("TCPREMOTEINFO", "stale")
    .env("REMOTE_ADDR", "192.0.2.2")
    .env("FORKECHO_INHERITED", "kept")
    .env("FORKECHO_OVERRIDDEN", "old")
    .start();
    let port = server.addr().port();

    let mut first = connect_from(SocketAddr::from(([127, 0, 0, 1], port)), "127.0.0.1");
    let printed = read_printed_environment(&mut first);
    assert!(
        !printed.starts_with(BANNER),
        "exec mode sent the echo's banner"
    );
    let env = parse_environment(&printed);
    assert_connection_environment(&env, &first, 0);
    assert_eq!(env.get("TCPLOCALIP").map(String::as_str), Some("127.0.0.1"));
    assert_eq!(env.get("FOO").map(String::as_str), Some("bar"), "{env:#?}");
    assert_eq!(
        env.get("FORKECHO_OVERRIDDEN").map(String::as_str),
        Some("new"),
        "--env wins over the inherited value"
    );
    assert_eq!(
        env.get("FORKECHO_INHERITED").map(String::as_str),
        Some("kept"),
        "forkecho's own environment is passed on"
    );
    for key in MANAGER_VARIABLES {
        assert!(!env.contains_key(key), "{key} passed on: {env:#?}");
    }

    // A second live session from the same source, to another local address of the wildcard.
    let mut second = connect_from(SocketAddr::from(([127, 0, 0, 2], port)), "127.0.0.1");
    let env = parse_environment(&read_printed_environment(&mut second));
    assert_connection_environment(&env, &second, 1);
    assert_eq!(env.get("TCPLOCALIP").map(String::as_str), Some("127.0.0.2"));

    for mut s in [first, second] {
        let peer = s.local_addr().unwrap();
        assert_eq!(send_and_drain(&mut s, b"bye\n"), b"", "the program's cat");
        server.wait_child_exit(peer, 0);
    }
}

/// On an IPv6 listener the program gets PROTO=TCP and both addresses without brackets
/// (`::1`), as s6-tcpserver names them.
#[test]
fn environment_describes_the_connection_on_ipv6() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("skipping environment_describes_the_connection_on_ipv6: no [::1]: {e}");
        return;
    }
    let server = exec_server(&["-l", "[::1]:0"], PRINT_ENV).start();
    let mut s = server.connect();
    let env = parse_environment(&read_printed_environment(&mut s));
    assert_connection_environment(&env, &s, 0);
    assert_eq!(env.get("TCPLOCALIP").map(String::as_str), Some("::1"));
    assert_eq!(env.get("TCPREMOTEIP").map(String::as_str), Some("::1"));
    let peer = s.local_addr().unwrap();
    assert_eq!(send_and_drain(&mut s, b""), b"");
    server.wait_child_exit(peer, 0);
}

/// From a config file, `clear_env = true` gives the program only the connection's variables
/// and `env` (no PATH, HOME or anything forkecho inherited), and a configured `banner` comes
/// before the program's first byte.
#[test]
fn config_file_clear_env_env_and_banner() {
    let server = Server::builder()
        .config(
            "listen = [\"127.0.0.1:0\"]\n\
             exec = [\"env\", \"-0\"]\n\
             clear_env = true\n\
             env = { FOO = \"bar\" }\n\
             banner = \"hello\\n\"\n",
        )
        .env("FORKECHO_INHERITED", "dropped")
        .env("HOME", "/root")
        .env("PATH", std::env::var("PATH").unwrap_or_default().as_str())
        .start();
    let mut s = server.connect();
    let printed = read_to_eof(&mut s);
    let env = parse_environment(
        printed
            .strip_prefix(b"hello\n")
            .unwrap_or_else(|| panic!("the banner does not come first: {printed:?}")),
    );
    assert_connection_environment(&env, &s, 0);
    let keys: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "FOO",
            "PROTO",
            "REMOTE_ADDR",
            "REMOTE_PORT",
            "TCPCONNNUM",
            "TCPLOCALIP",
            "TCPLOCALPORT",
            "TCPREMOTEIP",
            "TCPREMOTEPORT"
        ],
        "with clear_env, only the connection and `env`: {env:#?}"
    );
    assert_eq!(env["FOO"], "bar");
    server.wait_child_exit(s.local_addr().unwrap(), 0);
}

/// `working_directory` is the program's current directory.
#[test]
fn working_directory_is_the_programs_current_directory() {
    let dir = TempDir::new();
    let path = dir.path().canonicalize().unwrap();
    let server = exec_server(
        &["--working-directory", path.to_str().unwrap()],
        &["sh", "-c", "pwd -P"],
    )
    .start();
    let mut s = server.connect();
    let printed = read_to_eof(&mut s);
    assert_eq!(
        String::from_utf8_lossy(&printed).trim_end(),
        path.to_str().unwrap()
    );
}

/// What a program writes to fd 2 reaches forkecho's log as it wrote it by default
/// (`session_stderr = "log"`), and nowhere with `--session-stderr null`.
#[test]
fn program_stderr_goes_to_the_log_or_nowhere() {
    const SAYS: &[&str] = &["sh", "-c", "echo said-on-stderr >&2; echo done"];
    for (options, logged) in [(&[][..], true), (&["--session-stderr", "null"][..], false)] {
        let server = exec_server(options, SAYS).start();
        let mut s = server.connect();
        let peer = s.local_addr().unwrap();
        assert_eq!(read_to_eof(&mut s), b"done\n");
        // The program wrote to fd 2 before it exited, so before the parent's reap line.
        server.wait_child_exit(peer, 0);
        assert_eq!(
            server.log_lines().iter().any(|l| l == "said-on-stderr"),
            logged,
            "{options:?}: the program's stderr line in the log\n{}",
            server.log_text()
        );
    }
}

// ---- The process the program starts as ----

/// The program starts with exactly fds 0, 1, 2 (0 and 1 the connection's own socket, blocking,
/// without receive or send timeouts; 2 forkecho's log), every signal disposition default and
/// none blocked even when forkecho's launcher ignored or blocked some, `session_limits` as
/// its soft and hard limits, its own process group, and `nice`; its death by a signal is
/// logged with the signal's name.
#[test]
fn program_starts_clean_with_its_limits_group_and_nice() {
    use nix::sys::resource::{getrlimit, Resource};
    use std::os::unix::process::CommandExt;
    // "unlimited" where the hard limit is already that (raising a hard limit needs root).
    let fsize_unlimited = getrlimit(Resource::RLIMIT_FSIZE).unwrap().1 == libc::RLIM_INFINITY;
    let file_size = if fsize_unlimited {
        "\"unlimited\""
    } else {
        "1048576"
    };
    let server = Server::builder()
        .config(&format!(
            "listen = [\"127.0.0.1:0\"]\n\
             exec = [\"sleep\", \"60\"]\n\
             nice = 5\n\
             session_limits = {{ cpu = 10, address_space = 1073741824, open_files = 64, \
             processes = 100, core = 0, file_size = {file_size} }}\n"
        ))
        .tweak(|cmd| {
            // Safe: signal(2) and sigprocmask(2) are async-signal-safe; this runs in the
            // forked child before it execs forkecho.
            unsafe {
                cmd.pre_exec(|| {
                    use nix::sys::signal::{signal, SigHandler, SigSet};
                    for sig in [Signal::SIGPIPE, Signal::SIGTTOU, Signal::SIGUSR2] {
                        signal(sig, SigHandler::SigIgn)?;
                    }
                    ignore_signals_raw(&[32, 33])?;
                    let mut set = SigSet::empty();
                    set.add(Signal::SIGUSR2);
                    set.add(Signal::SIGWINCH);
                    set.thread_block()?;
                    Ok(())
                });
            }
        })
        .start();
    let s = server.connect();
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);
    wait_exec(pid, "sleep");

    // The dynamic loader and libc open and close files while `sleep` starts: wait until only
    // what it keeps is left (a descriptor it was handed would stay, and fail this).
    let settled = wait_until(WAIT, || fds_of(pid) == [0, 1, 2]);
    let table: Vec<(u64, String)> = fds_of(pid)
        .into_iter()
        .map(|fd| (fd, fd_target(pid, fd)))
        .collect();
    assert!(settled, "the program's descriptors: {table:?}");
    let socket = fd_target(pid, 0);
    assert_eq!(fd_target(pid, 1), socket, "fd 0 and fd 1 are one socket");
    assert_eq!(
        tcp_socket_target(server.addr(), peer),
        Some(socket.clone()),
        "fd 0 is the server's end of this client's connection"
    );
    assert_eq!(
        fd_target(pid, 2),
        fd_target(server.pid(), 2),
        "fd 2 is forkecho's log"
    );
    let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/0")).unwrap();
    let flags = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
        .unwrap();
    assert_eq!(flags & libc::O_NONBLOCK as u32, 0, "fd 0 is non-blocking");
    match descriptor_of(pid, 0) {
        Ok(copy) => {
            let socket = socket2::SockRef::from(&copy);
            assert_eq!(socket.read_timeout().unwrap(), None, "SO_RCVTIMEO");
            assert_eq!(socket.write_timeout().unwrap(), None, "SO_SNDTIMEO");
        }
        Err(e) => eprintln!("not checking the socket's timeouts: pidfd_getfd: {e}"),
    }

    for field in ["SigIgn", "SigBlk"] {
        let mask = signal_mask(pid, field);
        assert_eq!(mask, 0, "{field}: signals {:?}", signals_in(mask));
    }
    assert_eq!(stat_field(pid, 5), Some(pid.to_string()), "process group");
    assert_eq!(stat_field(pid, 19).as_deref(), Some("5"), "nice");
    let limits = limits_of(pid);
    let file_size = if fsize_unlimited {
        "unlimited"
    } else {
        "1048576"
    };
    for (name, value) in [
        ("Max cpu time", "10"),
        ("Max address space", "1073741824"),
        ("Max open files", "64"),
        ("Max processes", "100"),
        ("Max core file size", "0"),
        ("Max file size", file_size),
    ] {
        assert_eq!(
            limits.get(name),
            Some(&(value.to_string(), value.to_string())),
            "{name} (soft, hard); all: {limits:#?}"
        );
    }

    kill(pid, Signal::SIGTERM).unwrap();
    let ending = server.wait_child_ending(peer);
    assert_eq!(ending.how, "killed by signal SIGTERM");
}

/// The flags `--session-limits NAME=VALUE` and `--nice N` set the program's limits and nice;
/// a limit not named stays what forkecho has.
#[test]
fn session_limit_and_nice_flags_apply() {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft_cpu, _) = getrlimit(Resource::RLIMIT_CPU).unwrap();
    let server = exec_server(
        &[
            "--session-limits",
            "open_files=32",
            "--session-limits",
            "processes=50",
            "--nice",
            "3",
        ],
        &["sleep", "60"],
    )
    .start();
    let s = server.connect();
    let pid = server.child_pid_for(s.local_addr().unwrap());
    wait_exec(pid, "sleep");
    let limits = limits_of(pid);
    let pair = |v: &str| Some((v.to_string(), v.to_string()));
    assert_eq!(limits.get("Max open files").cloned(), pair("32"));
    assert_eq!(limits.get("Max processes").cloned(), pair("50"));
    let inherited = if soft_cpu == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        soft_cpu.to_string()
    };
    assert_eq!(
        limits.get("Max cpu time").map(|(soft, _)| soft.as_str()),
        Some(inherited.as_str()),
        "an unset limit is inherited"
    );
    assert_eq!(stat_field(pid, 19).as_deref(), Some("3"), "nice");
}

// ---- Ends ----

/// A program that ignores SIGTERM ends at `max_session_time`: SIGKILLed `kill_timeout`
/// after the deadline, with every process of its group, and the client sees the end.
#[test]
fn program_ignoring_sigterm_ends_at_max_session_time() {
    let server = exec_server(
        &["--max-session-time", "0.5", "--kill-timeout", "0.5"],
        IGNORE_TERM,
    )
    .start();
    let mut s = server.connect();
    assert_eq!(read_exactly(&mut s, 6), b"ready\n");
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);
    let guard = group_guard(pid);
    assert_closed_by_server(&mut s, "the session at max_session_time");
    let ending = server.wait_child_ending(peer);
    assert_eq!(ending.how, "killed by signal SIGKILL", "{ending:?}");
    assert!(
        (0.95..5.0).contains(&ending.seconds),
        "ended after {}s, not at max_session_time + kill_timeout (1 s)",
        ending.seconds
    );
    assert_group_gone(pid, "after max_session_time");
    // The group is gone: its number may be reused by another test's process.
    std::mem::forget(guard);
}

/// A fast shutdown (SIGINT) ends a program that ignores SIGTERM: SIGKILL to its group after
/// `kill_timeout`, the client sees the end, and forkecho exits 0.
#[test]
fn fast_shutdown_kills_a_program_ignoring_sigterm() {
    let mut server = exec_server(&["--kill-timeout", "0.5"], IGNORE_TERM).start();
    let mut s = server.connect();
    assert_eq!(read_exactly(&mut s, 6), b"ready\n");
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);
    let guard = group_guard(pid);
    server.signal(Signal::SIGINT);
    server.wait_for_line("shutting down on SIGINT (fast)");
    assert_closed_by_server(&mut s, "the session at a fast shutdown");
    let ending = server.wait_child_ending(peer);
    assert_eq!(ending.how, "killed by signal SIGKILL", "{ending:?}");
    assert!(server.wait_exit(WAIT).success());
    assert_group_gone(pid, "after a fast shutdown");
    std::mem::forget(guard);
}

/// A program's own child holding the socket is reached by shutdown too (signals go to the
/// session's process group): the client sees EOF, and no process of the group is left.
#[test]
fn shutdown_reaches_a_grandchild_holding_the_socket() {
    let mut server = exec_server(&[], &["sh", "-c", "sleep 60 & echo ready; wait"]).start();
    let mut s = server.connect();
    assert_eq!(read_exactly(&mut s, 6), b"ready\n");
    let peer = s.local_addr().unwrap();
    let pid = server.child_pid_for(peer);
    let guard = group_guard(pid);
    assert!(
        wait_until(WAIT, || processes_in_group(pid).len() == 2),
        "sh and its sleep in group {pid}: {:?}",
        processes_in_group(pid)
    );
    server.signal(Signal::SIGINT);
    assert_closed_by_server(&mut s, "the session whose grandchild held the socket");
    assert!(server.wait_exit(WAIT).success());
    assert_group_gone(pid, "after a fast shutdown");
    std::mem::forget(guard);
}

/// 1,000 `sleep` sessions SIGKILLed at once, each by its pid from the log, are all reaped and
/// logged, each client sees its end, and the status line counts 0 active.
#[test]
fn a_thousand_programs_killed_at_once_are_all_reaped() {
    const SESSIONS: usize = 1000;
    raise_own_nofile(SESSIONS as u64 + 200);
    let server = exec_server(
        &["--max-children", "2000", "--max-per-source", "0"],
        &["sleep", "60"],
    )
    .env("RUST_LOG", "info")
    .start();
    let started = Instant::now();
    let clients: Vec<TcpStream> = (0..SESSIONS).map(|_| server.connect()).collect();
    let mut pids = Vec::new();
    server.wait_for_log(&format!("{SESSIONS} `accepted` lines"), WAIT, |lines| {
        pids = lines
            .iter()
            .filter_map(|l| LogLine::parse(l)?.accepted())
            .map(|(_, pid)| pid)
            .collect();
        pids.len() >= SESSIONS
    });
    report(&format!(
        "{SESSIONS} programs started in {:.2?}",
        started.elapsed()
    ));
    for &pid in &pids {
        wait_exec(pid, "sleep");
    }
    for &pid in &pids {
        kill(pid, Signal::SIGKILL).unwrap();
    }
    let killed = Instant::now();
    server.wait_for_log(&format!("{SESSIONS} reap lines"), WAIT, |lines| {
        lines
            .iter()
            .filter_map(|l| LogLine::parse(l)?.child_ending())
            .filter(|e| e.how == "killed by signal SIGKILL")
            .count()
            >= SESSIONS
    });
    assert_no_children(&server, "after SIGKILL to every program");
    report(&format!(
        "{SESSIONS} programs reaped in {:.2?}",
        killed.elapsed()
    ));
    for mut s in clients {
        assert_closed_by_server(&mut s, "a killed program's session");
    }
    let status = server.status_line();
    assert_eq!(
        LogLine::parse(&status).and_then(|l| l.number_before("active")),
        Some(0),
        "{status}"
    );
}

// ---- A program that is not there ----

/// A program that is missing from PATH, or a file that is not executable, is a config error
/// naming key `exec`: exit 2 at start, and from `--check-config`, from a flag or a file.
#[test]
fn missing_or_unexecutable_program_is_a_config_error() {
    const MISSING: &str = "forkecho-no-such-program";
    let dir = TempDir::new();
    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\necho hi\n").unwrap();
    let plain = plain.to_str().unwrap();
    for (args, names) in [
        (vec!["-l", "127.0.0.1:0", "--", MISSING], MISSING),
        (
            vec!["--check-config", "-l", "127.0.0.1:0", "--", MISSING],
            MISSING,
        ),
        (vec!["-l", "127.0.0.1:0", "--", plain], plain),
        (
            vec!["--check-config", "-l", "127.0.0.1:0", "--", plain],
            plain,
        ),
    ] {
        let err = expect_exit(&run(&args), 2);
        assert!(
            err.contains("key `exec`") && err.contains(names),
            "{args:?}: {err}"
        );
    }
    let config = dir.path().join("forkecho.toml");
    std::fs::write(
        &config,
        format!("listen = [\"127.0.0.1:0\"]\nexec = [\"{MISSING}\"]\n"),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for args in [vec!["-c", config], vec!["--check-config", "-c", config]] {
        let err = expect_exit(&run(&args), 2);
        assert!(
            err.contains("forkecho.toml") && err.contains("key `exec`") && err.contains(MISSING),
            "{args:?}: {err}"
        );
    }
}

/// Keys that cannot apply are config errors naming them: a non-zero `idle_timeout` in exec
/// mode (a program owns its socket), a `working_directory` that does not exist.
#[test]
fn idle_timeout_and_missing_working_directory_are_config_errors() {
    let err = expect_exit(
        &run(&["-l", "127.0.0.1:0", "--idle-timeout", "5", "--", "cat"]),
        2,
    );
    assert!(err.contains("key `idle_timeout`"), "{err}");
    let out = run(&[
        "--check-config",
        "-l",
        "127.0.0.1:0",
        "--idle-timeout",
        "0",
        "--",
        "cat",
    ]);
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains("configuration OK"),
        "{}",
        stdout(&out)
    );
    let err = expect_exit(
        &run(&[
            "-l",
            "127.0.0.1:0",
            "--working-directory",
            "/nonexistent/forkecho",
            "--",
            "cat",
        ]),
        2,
    );
    assert!(err.contains("key `working_directory`"), "{err}");
}

/// In exec mode a banner over 1 KiB is a config error naming `banner` (the parent writes it
/// whole without waiting); keys only a program uses, set without one, are config errors naming
/// the key.
#[test]
fn long_banner_and_program_keys_without_a_program_are_config_errors() {
    let long = "b".repeat(1025);
    let err = expect_exit(
        &run(&["-l", "127.0.0.1:0", "--banner", &long, "--", "cat"]),
        2,
    );
    assert!(err.contains("key `banner`"), "{err}");
    let ok = "b".repeat(1024);
    let out = run(&[
        "--check-config",
        "-l",
        "127.0.0.1:0",
        "--banner",
        &ok,
        "--",
        "cat",
    ]);
    expect_exit(&out, 0);
    for (flag, key) in [
        (&["--session-stderr", "null"][..], "session_stderr"),
        (&["--env", "FOO=bar"][..], "env"),
        (&["--clear-env"][..], "clear_env"),
        (&["--session-limits", "cpu=10"][..], "session_limits"),
        (&["--nice", "5"][..], "nice"),
        (&["--working-directory", "/"][..], "working_directory"),
    ] {
        let mut args = vec!["--check-config", "-l", "127.0.0.1:0"];
        args.extend(flag);
        let err = expect_exit(&run(&args), 2);
        assert!(err.contains(&format!("key `{key}`")), "{args:?}: {err}");
    }
}

/// A reload naming a missing program is refused (the log says why, naming `exec`) and the old
/// program keeps serving; a reload naming another program makes new sessions run it.
#[test]
fn reload_to_a_missing_program_is_refused_and_the_old_one_keeps_serving() {
    const MISSING: &str = "forkecho-no-such-program";
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\nexec = [\"cat\"]\n")
        .start();
    let addr = server.addr();
    server.rewrite_config(&format!("listen = [\"{addr}\"]\nexec = [\"{MISSING}\"]\n"));
    server.signal(Signal::SIGHUP);
    let line = server.wait_for_line("reload refused:");
    assert!(
        line.contains("key `exec`") && line.contains(MISSING),
        "{line}"
    );
    let mut s = server.connect();
    assert_eq!(echo_roundtrip(&mut s, b"still cat\n"), b"still cat\n");
    assert_eq!(server.count_lines("reloaded configuration"), 0);

    server.rewrite_config(&format!(
        "listen = [\"{addr}\"]\nexec = [\"sh\", \"-c\", \"echo new program\"]\n"
    ));
    server.signal(Signal::SIGHUP);
    server.wait_for_line("reloaded configuration");
    let mut s = server.connect();
    assert_eq!(read_to_eof(&mut s), b"new program\n");
}

/// A program that vanished after it was checked: the child exits 111, the log says `cannot
/// run` naming the session and the program, and the client's connection is closed.
#[test]
fn program_removed_after_start_fails_with_code_111() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let script = dir.path().join("vanishing");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = exec_server(&[], &[script.to_str().unwrap()]).start();
    std::fs::remove_file(&script).unwrap();
    let mut s = server.connect();
    let peer = s.local_addr().unwrap();
    assert_closed_by_server(&mut s, "a session whose program is gone");
    let line = server.wait_for_line("cannot run");
    assert!(
        line.contains(&format!("session {peer}: cannot run"))
            && line.contains(script.to_str().unwrap()),
        "{line}"
    );
    let ending = server.wait_child_exit(peer, 111);
    assert_eq!(ending.meaning, None);
}

// ---- Programs nobody here wrote ----

/// `git daemon --inetd` run by forkecho serves a bare repository that a real `git clone
/// git://127.0.0.1:PORT/repo.git` fetches whole.
#[test]
fn git_clone_through_git_daemon_inetd() {
    if !have_or_skip("git", "git_clone_through_git_daemon_inetd") {
        return;
    }
    let dir = TempDir::new();
    let root = dir.path();
    let git = |args: &[&str], what: &str| {
        run_bounded(
            Command::new("git")
                .args([
                    "-c",
                    "user.name=forkecho",
                    "-c",
                    "user.email=t@example.invalid",
                ])
                .args(["-c", "init.defaultBranch=main"])
                .args(args)
                .current_dir(root)
                .env("HOME", root)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_TERMINAL_PROMPT", "0"),
            what,
        )
    };
    git(&["init", "-q", "work"], "git init");
    std::fs::write(root.join("work/hello.txt"), "served through forkecho\n").unwrap();
    git(&["-C", "work", "add", "hello.txt"], "git add");
    git(&["-C", "work", "commit", "-q", "-m", "first"], "git commit");
    std::fs::create_dir(root.join("base")).unwrap();
    git(
        &["clone", "-q", "--bare", "work", "base/repo.git"],
        "git clone --bare",
    );
    let base = format!("--base-path={}", root.join("base").display());

    let server = exec_server(
        &[],
        &["git", "daemon", "--inetd", "--export-all", base.as_str()],
    )
    .start();
    let url = format!("git://{}/repo.git", server.addr());
    git(&["clone", "-q", url.as_str(), "cloned"], "git clone git://");
    assert_eq!(
        std::fs::read_to_string(root.join("cloned/hello.txt")).unwrap(),
        "served through forkecho\n"
    );
    server.wait_for_line("exited with code 0");
    let endings: Vec<ChildEnding> = server
        .log_lines()
        .iter()
        .filter_map(|l| LogLine::parse(l)?.child_ending())
        .collect();
    assert!(
        endings.iter().all(|e| e.how == "exited with code 0"),
        "{endings:?}"
    );
}

/// ucspi-tcp's `recordio cat` run by forkecho echoes the client's bytes, and recordio's
/// record of them (`<pid> < data` in, `<pid> > data` out) reaches forkecho's log.
#[test]
fn recordio_in_the_chain_records_into_the_log() {
    if !have_or_skip("recordio", "recordio_in_the_chain_records_into_the_log") {
        return;
    }
    let server = exec_server(&[], &["recordio", "cat"]).start();
    let mut s = server.connect();
    assert_eq!(
        echo_roundtrip(&mut s, b"hello recordio\n"),
        b"hello recordio\n"
    );
    let peer = s.local_addr().unwrap();
    assert_eq!(send_and_drain(&mut s, b""), b"");
    server.wait_child_exit(peer, 0);
    let recorded = |lines: &[String], arrow: &str| {
        lines.iter().any(|l| {
            l.split_once(&format!(" {arrow} "))
                .is_some_and(|(pid, data)| {
                    pid.parse::<u32>().is_ok() && data.trim_end() == "hello recordio"
                })
        })
    };
    server.wait_for_log("recordio's `<` and `>` lines", WAIT, |lines| {
        recorded(lines, "<") && recorded(lines, ">")
    });
}

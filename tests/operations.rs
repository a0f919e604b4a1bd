//! Operating forkecho: the locked pid file, and several instances on one port (SO_REUSEPORT)
//! so a host can scale out without a proxy in front.

use crate::util::*;

/// With `--reuse-port`, a second instance binds the port the first one listens on, the kernel
/// spreads new clients over both, and each serves them correctly.
#[test]
fn two_instances_share_a_port_with_reuse_port() {
    let first = Server::builder().arg("--reuse-port").start();
    let addr = first.addr();
    let second = Server::builder()
        .args(["--reuse-port", "-l", &addr.to_string()])
        .start();
    assert_eq!(second.addr(), addr);
    let mut want = BANNER.to_vec();
    want.extend(b"shared\n");
    // The kernel picks an instance by a hash of the client's address and port, so enough
    // connections reach both; the bound keeps a broken spread from looping forever.
    let mut connections = 0;
    while (first.count_lines("accepted ") == 0 || second.count_lines("accepted ") == 0)
        && connections < 300
    {
        connections += 1;
        let mut s = connect(addr);
        assert_eq!(send_and_drain(&mut s, b"shared\n"), want);
    }
    first.wait_for_line("accepted ");
    second.wait_for_line("accepted ");
}

/// Without `--reuse-port` the same port is refused to a second instance, with the usual message.
#[test]
fn second_instance_without_reuse_port_is_refused() {
    let first = Server::builder().arg("--reuse-port").start();
    let addr = first.addr().to_string();
    let out = run(&["-l", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr}: address already in use")),
        "{err}"
    );
}

/// The HAProxy configuration the README points to is valid, as haproxy itself checks it
/// (`haproxy -c` parses it and starts nothing). `.ci/run` installs haproxy.
#[test]
fn shipped_haproxy_config_is_valid() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/haproxy.cfg");
    let out = match std::process::Command::new("haproxy")
        .args(["-c", "-f", config])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipping shipped_haproxy_config_is_valid: haproxy is not installed");
            return;
        }
        Err(e) => panic!("cannot run haproxy: {e}"),
    };
    assert!(
        out.status.success(),
        "haproxy -c rejects config/haproxy.cfg: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--pid-file`: written with the parent's pid once listening, and removed on a clean exit.
#[test]
fn pid_file_names_the_parent_and_is_removed_on_exit() {
    let dir = TempDir::new();
    let path = dir.path().join("forkecho.pid");
    let mut server = Server::builder()
        .args(["--pid-file", path.to_str().unwrap()])
        .start();
    let written = std::fs::read_to_string(&path).expect("pid file after listening");
    assert_eq!(written, format!("{}\n", server.pid()));
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    assert!(!path.exists(), "pid file left after a clean exit");
}

/// A second instance with the same pid file refuses to start (exit 1, naming the file and the
/// running pid) and leaves the running instance's file untouched.
#[test]
fn second_instance_with_the_same_pid_file_refuses_to_start() {
    let dir = TempDir::new();
    let path = dir.path().join("forkecho.pid");
    let pid_arg = path.to_str().unwrap().to_string();
    let first = Server::builder().args(["--pid-file", &pid_arg]).start();
    let before = std::fs::read_to_string(&path).unwrap();

    // The same port too: the pid file is checked before binding, so the message is about it.
    let out = run(&["-l", &first.addr().to_string(), "--pid-file", &pid_arg]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid file {pid_arg} is locked"))
            && err.contains(&format!("(pid {})", first.pid())),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    assert_serves(&first, b"ok\n");
}

/// A stale pid file (left by a crash: no lock held) is taken over by the next start.
#[test]
fn stale_pid_file_is_taken_over() {
    let dir = TempDir::new();
    let path = dir.path().join("forkecho.pid");
    std::fs::write(&path, "999999999\n").unwrap();
    let server = Server::builder()
        .args(["--pid-file", path.to_str().unwrap()])
        .start();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", server.pid())
    );
}

/// A pid file that cannot be written stops the start with a clear message and exit 1.
#[test]
fn unwritable_pid_file_is_a_startup_error() {
    let dir = TempDir::new();
    let path = dir.path().join("no-such-dir").join("forkecho.pid");
    let out = run(&["-l", "127.0.0.1:0", "--pid-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot write pid file") && err.contains("no such file or directory"),
        "{err}"
    );
}

/// SIGHUP applies a changed banner, max_children and listen address to what comes next,
/// without dropping the session in flight: the new address listens before the old one closes,
/// and one log line says what changed.
#[test]
fn reload_applies_banner_limits_and_listen_addresses_without_dropping_sessions() {
    let (old_port, new_port) = (free_port(), free_port());
    let server = Server::builder()
        .config(&format!(
            "listen = [\"127.0.0.1:{old_port}\"]\nbanner = \"old\\n\"\nmax_children = 1\n"
        ))
        .start();
    let old_addr = server.addr();
    let mut session = connect(old_addr);
    assert_eq!(read_exactly(&mut session, 4), b"old\n");
    // At max_children = 1 a second client waits in the backlog.
    let mut waiting = connect(old_addr);
    server.wait_for_line("max_children reached");

    server.rewrite_config(&format!(
        "listen = [\"127.0.0.1:{new_port}\"]\nbanner = \"new\\n\"\nmax_children = 3\n"
    ));
    server.signal(nix::sys::signal::Signal::SIGHUP);
    let line = server.wait_for_line("reloaded configuration:");
    for change in [
        "banner \"old\\n\" -> \"new\\n\"",
        "max_children 1 -> 3",
        &format!("listen -127.0.0.1:{old_port}"),
        &format!("listen +127.0.0.1:{new_port}"),
    ] {
        assert!(line.contains(change), "{change:?} missing in {line}");
    }

    // The session from before the reload goes on, with what it was forked with.
    assert_eq!(echo_roundtrip(&mut session, b"still up\n"), b"still up\n");
    // The client queued on the removed address is served before that listener closes (not
    // reset), under the new configuration.
    assert_eq!(read_exactly(&mut waiting, 4), b"new\n");
    // The new address serves with the new banner; the old one is closed.
    let mut fresh = connect(format!("127.0.0.1:{new_port}").parse().unwrap());
    assert_eq!(read_exactly(&mut fresh, 4), b"new\n");
    // Asked of the server itself, not by connecting: a parallel test's server may already
    // have been given the freed port.
    let ports = listening_ports_of(server.pid());
    assert!(
        !ports.contains(&old_addr.port()),
        "old address still listening: {ports:?}"
    );
    assert!(
        ports.contains(&new_port),
        "new address not listening: {ports:?}"
    );
}

/// A config that does not parse on SIGHUP is refused with the file and line, and the running
/// configuration keeps serving.
#[test]
fn broken_config_on_reload_is_refused_and_the_old_one_keeps_serving() {
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\nbanner = \"kept\\n\"\n")
        .start();
    server.rewrite_config("banner = \"half\nmax_children = 3\n");
    server.signal(nix::sys::signal::Signal::SIGHUP);
    let line = server.wait_for_line("reload refused:");
    assert!(
        line.contains("forkecho.toml") && line.contains("line 1"),
        "{line}"
    );
    server.rewrite_config("listen = [\"127.0.0.1:0\"]\nbogus = 1\n");
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.assert_line_count("reload refused:", 2, "a second refusal");
    assert!(server.log_text().contains("key `bogus`: unknown key"));
    let mut s = connect(server.addr());
    assert_eq!(read_exactly(&mut s, 5), b"kept\n");
    assert_eq!(server.count_lines("reloaded configuration"), 0);
}

/// `--daemonize` returns (exit 0) only once the daemon listens, so a client can connect the
/// moment the command is done; the daemon is detached (parent gone, cwd /, own session), logs
/// to `--log-file`, and removes its pid file when it stops.
#[test]
fn daemonize_returns_once_listening() {
    let dir = TempDir::new();
    let pid_path = dir.path().join("d.pid");
    let log_path = dir.path().join("d.log");
    let out = run(&[
        "--daemonize",
        "-l",
        "127.0.0.1:0",
        "--pid-file",
        pid_path.to_str().unwrap(),
        "--log-file",
        log_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let daemon = KillOnDrop::daemon_in(&pid_path);
    let pid = daemon.0;
    let addr = listening_address_in(&log_path);
    // No waiting: the command's exit is the readiness signal.
    let mut s = connect(addr);
    expect_banner(&mut s);
    assert_eq!(echo_roundtrip(&mut s, b"detached\n"), b"detached\n");
    drop(s);

    assert_ne!(stat_field(pid, 4), Some(std::process::id().to_string()));
    assert_ne!(
        stat_field(pid, 6),
        Some(pid.to_string()),
        "not a session leader"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        std::path::Path::new("/")
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(
        wait_until(WAIT, || !pid_path.exists()),
        "pid file still there after SIGTERM"
    );
    assert!(std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("shutdown complete"));
    // Once it is gone its pid may be reused by another test's process: no SIGKILL then.
    assert!(
        wait_until(WAIT, || process_state(pid).is_none_or(|s| s == 'Z')),
        "the daemon did not exit on SIGTERM"
    );
    std::mem::forget(daemon);
}

/// `--daemonize` with a startup error (port in use) exits 1 with the daemon's message, so a
/// script's `forkecho --daemonize && ...` stops there.
#[test]
fn daemonize_reports_startup_errors() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["--daemonize", "-l", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr}: address already in use")),
        "{err}"
    );
}

/// `--user nobody` (as root): after binding, the parent and every child it forks run as
/// nobody, with nobody's group and no supplementary root groups, and cannot become root again.
#[test]
fn user_drops_privileges_for_parent_and_children() {
    if !is_root_or_skip("user_drops_privileges: only root can switch users") {
        return;
    }
    let (_, uid, gid) = account("nobody");
    let server = Server::builder().args(["--user", "nobody"]).start();
    server.wait_for_line(&format!("running as nobody (uid {uid}, gid {gid})"));
    let s = server.connect_greeted();
    let child = server.child_pid_for(s.local_addr().unwrap());
    for pid in [server.pid(), child] {
        assert_eq!(status_numbers(pid, "Uid"), vec![uid; 4], "uids of {pid}");
        assert_eq!(status_numbers(pid, "Gid"), vec![gid; 4], "gids of {pid}");
        assert_eq!(status_numbers(pid, "Groups"), vec![gid], "groups of {pid}");
    }
}

/// A reload looks up no user or group (that could take seconds inside the loop, and cannot
/// change anything once root is gone): a `user` changed to an account that does not exist is
/// reloaded with a warning that it takes effect at the next start, not refused.
#[test]
fn reload_runs_no_user_lookup_and_says_when_a_user_change_applies() {
    if !is_root_or_skip("reload_runs_no_user_lookup: only root can switch users") {
        return;
    }
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\nuser = \"nobody\"\n")
        .start();
    server.wait_for_line("running as nobody");
    server.rewrite_config(
        "listen = [\"127.0.0.1:0\"]\nuser = \"no-such-user-here\"\nbanner = \"new\\n\"\n",
    );
    server.signal(nix::sys::signal::Signal::SIGHUP);
    let line = server.wait_for_line("reloaded configuration");
    assert!(line.contains("banner"), "{line}");
    server.wait_for_line("user and group changes take effect at the next start");
    assert_eq!(
        server.count_lines("reload refused"),
        0,
        "{}",
        server.log_text()
    );
    // Back to the user in force: nothing waits for a restart any more, so no warning.
    server.rewrite_config("listen = [\"127.0.0.1:0\"]\nuser = \"nobody\"\nbanner = \"again\\n\"\n");
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_lines("reloaded configuration", 2);
    server.assert_line_count(
        "user and group changes take effect at the next start",
        1,
        "a reload back to the user in force",
    );
}

/// A numeric `user` is looked up like a name (through NSS, by `getent`): the log names the
/// account it resolved to.
#[test]
fn numeric_user_resolves_to_its_account() {
    if !is_root_or_skip("numeric_user_resolves: only root can switch users") {
        return;
    }
    let server = Server::builder().args(["--user", "65534"]).start();
    let line = server.wait_for_line("running as");
    let (name, ..) = account("65534");
    assert!(
        line.contains(&format!("running as {name} (uid 65534,")),
        "{line}"
    );
    assert_serves(&server, b"numeric user");
}

/// On x86_64 glibc the binary is linked statically (`.cargo/config.toml`): each fork then
/// copies 14 mappings instead of 31, about 10 % of the connection rate. A build that lost
/// the setting would still pass every other test, so this one looks at what the parent maps.
#[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
#[test]
fn parent_maps_no_shared_library() {
    let server = Server::start();
    assert_serves(&server, b"static");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", server.pid())).unwrap();
    // A shared object's file name has `.so` in it (`libc.so.6`); the directory may not.
    let libraries: Vec<&str> = maps
        .lines()
        .filter(|l| {
            l.rsplit('/')
                .next()
                .is_some_and(|file| file.contains(".so"))
        })
        .collect();
    assert!(
        libraries.is_empty(),
        "shared libraries mapped: {libraries:#?}"
    );
}

/// `(name, uid, gid)` of an account, asked of `getent` as forkecho does (the test binary is
/// static too, and getpwnam in a static binary may crash on NSS modules).
fn account(key: &str) -> (String, u64, u64) {
    let out = std::process::Command::new("getent")
        .args(["passwd", key])
        .output()
        .expect("run getent");
    let line = String::from_utf8(out.stdout).expect("utf-8 passwd entry");
    let fields: Vec<&str> = line.trim_end().split(':').collect();
    assert!(fields.len() == 7, "no passwd entry for {key}: {line:?}");
    let number = |i: usize| fields[i].parse::<u64>().expect("numeric id");
    (fields[0].to_owned(), number(2), number(3))
}

/// An unknown user or group, or a group without a user, is a configuration error naming the
/// key at fault.
#[test]
fn bad_user_settings_are_config_errors() {
    let err = expect_exit(&run(&["--user", "no-such-user-here", "--check-config"]), 2);
    assert!(
        err.contains("key `user`") && err.contains("no user `no-such-user-here`"),
        "{err}"
    );
    let err = expect_exit(&run(&["--group", "nogroup", "--check-config"]), 2);
    assert!(err.contains("key `group`: needs `user` too"), "{err}");
    // A known user with an unknown group: the group is at fault, not the user.
    let args = [
        "--user",
        "nobody",
        "--group",
        "no-such-group",
        "--check-config",
    ];
    let err = expect_exit(&run(&args), 2);
    assert!(
        err.contains("key `group`: no group `no-such-group`"),
        "{err}"
    );
}

/// Socket activation for real, with systemd's `systemd-socket-activate`: the socket it passes
/// (LISTEN_FDS) is used instead of `listen`, the client whose connection triggered the start
/// is served, and so is the next.
#[test]
fn socket_activation_with_systemd_socket_activate() {
    let activate = "systemd-socket-activate";
    if std::process::Command::new(activate)
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipping socket activation test: {activate} is not installed");
        return;
    }
    let dir = TempDir::new();
    let log_path = dir.path().join("activated.log");
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // systemd-socket-activate execs forkecho in place: the server keeps the activator's pid.
    let server = Server::builder()
        .program(activate)
        .args(["-l", &addr.to_string(), "-E", "RUST_LOG=debug", BIN])
        // Had forkecho bound `listen` itself, it would fail: the port is systemd's.
        .args(["-l", &addr.to_string()])
        .log_file(&log_path)
        .stderr(std::process::Stdio::null())
        .spawn();
    let pid = server.pid();

    // The first connection wakes the activator, which starts forkecho on the passed socket.
    let mut first = None;
    assert!(wait_until(WAIT, || {
        first = std::net::TcpStream::connect(addr).ok();
        first.is_some()
    }));
    let mut first = first.unwrap();
    first.set_read_timeout(Some(WAIT)).unwrap();
    expect_banner(&mut first);
    assert_eq!(echo_roundtrip(&mut first, b"activated\n"), b"activated\n");
    let mut second = connect(addr);
    expect_banner(&mut second);

    let log = server.log_text();
    assert!(
        log.contains("using 1 listening socket(s) passed by systemd")
            && log.contains(&format!("listening on {addr}")),
        "{log}"
    );
    // The activator became forkecho (exec, same pid: LISTEN_PID), serving two sessions.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "forkecho");
    assert_eq!(server.children().len(), 2, "{:?}", server.children());
}

/// A UNIX-domain socket passed by `systemd-socket-activate` is served like a TCP one: its
/// peer is named by its credentials, and its file, systemd's, stays when forkecho stops.
#[test]
fn socket_activation_of_a_unix_domain_socket() {
    use nix::sys::signal::Signal;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let activate = "systemd-socket-activate";
    if std::process::Command::new(activate)
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipping socket activation test: {activate} is not installed");
        return;
    }
    let dir = TempDir::new();
    let log_path = dir.path().join("activated.log");
    let path = dir.path().join("activated.sock");
    let mut server = Server::builder()
        .program(activate)
        .args(["-l", path.to_str().unwrap(), "-E", "RUST_LOG=debug", BIN])
        .args(["-l", "127.0.0.1:0"])
        .log_file(&log_path)
        .stderr(std::process::Stdio::null())
        .spawn();

    let mut client = None;
    assert!(wait_until(WAIT, || {
        client = UnixStream::connect(&path).ok();
        client.is_some()
    }));
    let mut client = client.unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut banner = [0u8; BANNER.len()];
    client.read_exact(&mut banner).unwrap();
    assert_eq!(banner, BANNER);
    client.write_all(b"over unix\n").unwrap();
    let mut back = [0u8; 10];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over unix\n");

    let me = format!(
        "accepted uid:{},gid:{},pid:{} -> child",
        nix::unistd::geteuid(),
        nix::unistd::getegid(),
        std::process::id()
    );
    server.wait_for_line(&me);
    let log = server.log_text();
    assert!(
        log.contains("using 1 listening socket(s) passed by systemd")
            && log.contains(&format!("listening on unix:{}", path.display())),
        "{log}"
    );
    drop(client);
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    assert!(path.exists(), "systemd's socket file was removed");
}

/// `Type=notify`: with NOTIFY_SOCKET set, forkecho sends READY=1 once listening and
/// STOPPING=1 when a shutdown starts.
#[test]
fn sd_notify_ready_and_stopping() {
    let dir = TempDir::new();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mut server = Server::builder()
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        .start();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a READY datagram");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.lines().any(|l| l.starts_with("STATUS=")), "{ready:?}");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let n = socket.recv(&mut buf).expect("a STOPPING datagram");
    let stopping = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(server.wait_exit(WAIT).success());
}

/// The pid appears in the pid file only once signals are handled: a script that sends SIGHUP
/// the moment the file has a pid reloads the server instead of killing it.
#[test]
fn pid_file_appears_only_once_signals_are_safe() {
    let dir = TempDir::new();
    let path = dir.path().join("early.pid");
    let log = dir.path().join("early.log");
    // Not `start`: the pid file is what this test waits for, not the `listening on` line.
    let mut server = Server::builder()
        .args(["-l", "127.0.0.1:0", "--pid-file", path.to_str().unwrap()])
        .log_file(&log)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn();
    assert!(wait_until(WAIT, || std::fs::read_to_string(&path)
        .is_ok_and(|t| t.ends_with('\n'))));
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_line("reloaded configuration");
    assert!(server.is_running(), "SIGHUP killed the server");
}

/// With `--log-file` (and no `--daemonize`) a startup error still reaches stderr.
#[test]
fn startup_error_reaches_stderr_with_a_log_file() {
    let dir = TempDir::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let log = dir.path().join("x.log");
    let out = run(&["-l", &addr, "--log-file", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("address already in use"));
}

/// A reload that removes an address serves the clients queued there only up to
/// `max_children`: the limit stays hard, and the rest are answered with `refusal_message`
/// and a clean EOF rather than reset by the closing listener.
#[test]
fn reload_drain_respects_max_children_and_answers_the_rest() {
    let new_port = free_port();
    let config = |port: u16| {
        format!(
            "listen = [\"127.0.0.1:{port}\"]\nmax_children = 1\nrefusal_message = \"moved\\n\"\n"
        )
    };
    let server = Server::builder().config(&config(0)).start();
    let old_addr = server.addr();
    let _session = server.connect_greeted();
    server.wait_for_line("max_children reached");
    let mut queued: Vec<_> = (0..3).map(|_| connect(old_addr)).collect();
    server.rewrite_config(&config(new_port));
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_line("reloaded configuration:");
    server.wait_for_line(&format!(
        "closing {old_addr}: answered 3 queued clients with refusal_message"
    ));
    for (i, client) in queued.iter_mut().enumerate() {
        assert_eq!(read_to_eof(client), b"moved\n", "queued client {i}");
    }
    assert_eq!(
        server.count_lines("-> child "),
        1,
        "forked past max_children"
    );
    assert_eq!(server.children().len(), 1);
}

/// A reload to a 200,000-entry deny list and back: the reload line summarises the list
/// instead of printing megabytes, and the parent gives the memory back (every fork copies the
/// page tables of what stays resident).
#[test]
fn reload_to_a_huge_deny_list_and_back_logs_a_short_line_and_returns_the_memory() {
    const RULES: u32 = 200_000;
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\n")
        .env("RUST_LOG", "info")
        .start();
    // The same `listen` as at start (port 0 stays the listener bound then).
    let addr = "127.0.0.1:0";
    assert_serves(&server, b"before\n");
    let before = rss_kib(server.pid());

    let mut huge = format!("listen = [\"{addr}\"]\ndeny = [\n");
    for i in 0..RULES {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        huge.push_str(&format!("  \"{ip}\",\n"));
    }
    huge.push_str("]\n");
    server.rewrite_config(&huge);
    server.signal(nix::sys::signal::Signal::SIGHUP);
    let line = server.wait_for_line("reloaded configuration:");
    assert!(line.len() < 1000, "{} bytes: {}", line.len(), &line[..200]);
    assert!(line.contains("(200000 prefixes)"), "{line}");
    assert_serves(&server, b"during\n");

    server.rewrite_config(&format!("listen = [\"{addr}\"]\n"));
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.assert_line_count("reloaded configuration:", 2, "the second reload");
    assert_serves(&server, b"after\n");
    let after = rss_kib(server.pid());
    assert!(
        after < before + 2048,
        "parent RSS {before} KiB before, {after} KiB after the reloads"
    );
}

/// A reload may move between a specific address and the wildcard on the same port, which
/// cannot be bound side by side: the old listener closes (its queue served), then the new one
/// binds, and the port keeps serving.
#[test]
fn reload_moves_between_a_specific_address_and_the_wildcard_on_one_port() {
    let port = free_port();
    let config = |ip: &str| format!("listen = [\"{ip}:{port}\"]\n");
    let server = Server::builder().config(&config("127.0.0.1")).start();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut session = connect(addr);
    expect_banner(&mut session);

    for (step, ip) in ["0.0.0.0", "127.0.0.1"].into_iter().enumerate() {
        server.rewrite_config(&config(ip));
        server.signal(nix::sys::signal::Signal::SIGHUP);
        server.assert_line_count("reloaded configuration:", step + 1, "the reload line");
        let line = server.wait_for_line(&format!("listen +{ip}:{port}"));
        assert!(line.contains("reloaded configuration:"), "{line}");
        let mut s = connect(addr);
        expect_banner(&mut s);
        assert_eq!(echo_roundtrip(&mut s, b"moved\n"), b"moved\n");
    }
    assert_eq!(server.count_lines("reload refused"), 0);
    assert_eq!(echo_roundtrip(&mut session, b"kept\n"), b"kept\n");
}

/// A NOTIFY_SOCKET nobody reads (a busy service manager) holds only a few datagrams
/// (`net.unix.max_dgram_qlen`); forkecho must not wait for room: with its queue long full,
/// reloads (each a STATUS= message) and sessions go on, and SIGTERM still stops it.
#[test]
fn unread_notify_socket_never_stops_the_loop() {
    let dir = TempDir::new();
    let socket_path = dir.path().join("notify.sock");
    let _socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\n")
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        .start();
    const RELOADS: usize = 40;
    for i in 1..=RELOADS {
        server.signal(nix::sys::signal::Signal::SIGHUP);
        server.assert_line_count("reloaded configuration", i, &format!("reload {i}"));
    }
    assert_serves(&server, b"still serving\n");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
}

/// The logrotate snippet shipped in `config/`, run by the real `logrotate`: the log is
/// renamed, `forkecho reopen-logs` (the snippet's postrotate) makes the server reopen `log_file`, and new
/// lines land in the new file while the rotated one keeps what was written before.
#[test]
fn shipped_logrotate_snippet_rotates_and_the_control_command_reopens_the_log() {
    let Some(logrotate) = ["/usr/sbin/logrotate", "/sbin/logrotate"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!("skipping: logrotate is not installed (apt-get install logrotate)");
        return;
    };
    let dir = TempDir::new();
    let log = dir.path().join("forkecho.log");
    let pid_file = dir.path().join("forkecho.pid");
    let mut server = Server::builder()
        .args(["--pid-file", pid_file.to_str().unwrap()])
        .log_file(&log)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::null())
        .start();
    let addr = server.addr();
    let mut before = server.connect_greeted();

    // The shipped snippet, pointed at this test's files; `create` without an owner (the
    // test's user may have no `adm` group).
    let snippet = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/forkecho.logrotate"
    ))
    .unwrap()
    .replace("/var/log/forkecho/forkecho.log", log.to_str().unwrap())
    .replace(
        "/run/forkecho/control.sock",
        dir.path().join("forkecho.ctl").to_str().unwrap(),
    )
    .replace(
        "forkecho --control-socket",
        &format!("{BIN} --control-socket"),
    )
    .replace("create 0640 forkecho adm", "create 0640");
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
    assert!(out.status.success(), "logrotate: {out:?}");

    let rotated = dir.path().join("forkecho.log.1");
    server.wait_for_line("log_file reopened");
    let mut after = connect(addr);
    expect_banner(&mut after);
    let after_peer = after.local_addr().unwrap();
    server.wait_for_line(&format!("accepted {after_peer}"));
    let old = std::fs::read_to_string(&rotated).unwrap_or_default();
    assert!(old.contains("listening on "), "rotated file: {old}");
    assert!(!old.contains(&format!("accepted {after_peer}")), "{old}");
    // The session from before the rotation goes on.
    assert_eq!(echo_roundtrip(&mut before, b"on\n"), b"on\n");
    drop((before, after));
    assert!(server.is_running(), "SIGHUP killed the server");
}

/// Swapping 127.0.0.1:P and 0.0.0.0:P back and forth while clients connect: a child forked
/// a moment before holds a copy of the old listener until it closes what it inherited, and
/// the old socket must stop listening anyway, so that every swap binds.
#[test]
fn listener_swaps_under_load_always_bind() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let port = free_port();
    let config = |ip: &str| format!("listen = [\"{ip}:{port}\"]\n");
    let server = Server::builder()
        .config(&config("127.0.0.1"))
        .env("RUST_LOG", "info")
        .start();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let timeout = std::time::Duration::from_secs(1);
                    if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) {
                        let _ = s.set_read_timeout(Some(timeout));
                        let _ = std::io::Read::read(&mut s, &mut [0; 64]);
                    }
                }
            })
        })
        .collect();
    for step in 0..20 {
        let ip = if step % 2 == 0 {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        server.rewrite_config(&config(ip));
        server.signal(nix::sys::signal::Signal::SIGHUP);
        server.assert_line_count("reloaded configuration:", step + 1, "the reload line");
    }
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());
    assert_eq!(server.count_lines("FAILED"), 0, "{}", server.log_text());
    assert_serves(&server, b"after the swaps\n");
}

/// After logrotate's rename and SIGHUP, nothing in the server holds the rotated file any
/// more (only fd 2 ever held the log): once deleted, its space is free.
#[test]
fn a_rotated_log_file_is_not_held_open_after_sighup() {
    let dir = TempDir::new();
    let path = dir.path().join("forkecho.log");
    let rotated = dir.path().join("forkecho.log.1");
    let mut server = Server::builder()
        .log_file(&path)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .start();
    let pid = server.pid();
    std::fs::rename(&path, &rotated).unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_line("log_file reopened");
    let holding: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == rotated))
        .map(|e| e.file_name())
        .collect();
    assert!(
        holding.is_empty(),
        "fds still on the rotated file: {holding:?}"
    );
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
}

/// Port 0 picked a port; a reload that names that port (the operator pinning what it got)
/// keeps the listener and its queued clients, instead of refusing the reload because the
/// address is in use, by this very process.
#[test]
fn reload_naming_the_port_that_port_0_picked_keeps_listening_there() {
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\n")
        .start();
    let addr = server.addr();
    let mut session = connect(addr);
    expect_banner(&mut session);
    server.rewrite_config(&format!("listen = [\"{addr}\"]\n"));
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log("reload", WAIT, |lines| {
        lines.iter().any(|l| l.contains("reload"))
    });
    assert_eq!(
        server.count_lines("reload refused"),
        0,
        "{}",
        server.log_text()
    );
    assert_eq!(echo_roundtrip(&mut session, b"kept\n"), b"kept\n");
    let mut s = connect(addr);
    expect_banner(&mut s);
}

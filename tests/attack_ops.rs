//! Attacks on the parent through upgrades in place, the control socket and the log: signal
//! storms during upgrades under load, a control-socket flood, a stalled stderr during an
//! upgrade, and an upgrade with unrelated descriptors in the server's environment.

use crate::util::*;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};

#[test]
fn a_signal_storm_of_upgrades_reloads_and_reopens_under_load_loses_nothing() {
    let deployment = Deployment::new();
    let server = deployment.builder().start();
    let addr = server.addr();
    let pid = server.pid();
    let mut long = server.connect_greeted();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = std::panic::catch_unwind(|| {
                        let mut s = connect(addr);
                        expect_banner(&mut s);
                        assert_eq!(echo_roundtrip(&mut s, b"storm\n"), b"storm\n");
                    });
                    match ok {
                        Ok(()) => served.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(2);
    let mut sent = 0;
    while Instant::now() < until {
        let sig = [
            Signal::SIGUSR2,
            Signal::SIGHUP,
            Signal::SIGUSR2,
            Signal::SIGUSR1,
        ][sent % 4];
        kill(pid, sig).unwrap();
        sent += 1;
        // Paced by the server: a connect is served between signals.
        let mut s = connect(addr);
        expect_banner(&mut s);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed clients");
    assert!(
        server.count_lines("upgraded in place") > 0,
        "no upgrade went through the storm"
    );
    assert!(served.load(Ordering::Relaxed) > 0);
    assert_eq!(echo_roundtrip(&mut long, b"still\n"), b"still\n");
    let out = deployment.command(&["status"]);
    assert!(out.status.success(), "status: {out:?}");
    assert_eq!(
        std::fs::read_to_string(&deployment.pid_file)
            .unwrap()
            .trim(),
        pid.to_string()
    );
    drop(long);
    let mut server = server;
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(WAIT);
    assert!(status.success(), "exit: {status:?}\n{}", server.log_text());
}

#[test]
fn a_control_socket_flood_does_not_stop_echo_or_status() {
    let deployment = Deployment::new();
    let server = deployment.builder().start();
    let socket = deployment.control_socket();
    let mut silent = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = UnixStream::connect(&socket) {
            silent.push(s);
        }
    }
    assert_serves(&server, b"through the flood\n");
    assert_status_answers(&deployment);
    drop(silent);
}

/// A unix socket end for the server's stderr that nobody reads, its send buffer small.
fn stalled_stderr() -> (UnixStream, OwnedFd) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    socket2::SockRef::from(&theirs)
        .set_send_buffer_size(4096)
        .unwrap();
    (ours, theirs.into())
}

fn wait_connectable(addr: std::net::SocketAddr) {
    assert!(
        wait_until(WAIT, || std::net::TcpStream::connect(addr).is_ok()),
        "never listened on {addr}"
    );
}

#[test]
fn an_upgrade_with_a_stalled_json_log_completes() {
    let deployment = Deployment::new();
    let (_ours, theirs) = stalled_stderr();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = deployment
        .builder()
        .args(["-l", &listen, "--log-format", "json", "--log-level", "info"])
        .env_remove("RUST_LOG")
        .stderr(theirs)
        .spawn();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    wait_connectable(addr);
    // Enough lines to fill the socket many times over (at info, only the parent logs).
    for _ in 0..200 {
        let mut s = connect(addr);
        expect_banner(&mut s);
    }
    let started = Instant::now();
    let out = deployment.command(&["upgrade"]);
    assert_upgraded(&out);
    assert!(started.elapsed() < Duration::from_secs(10));
    let out = deployment.command(&["reload"]);
    assert!(out.status.success(), "reload: {out:?}");
    let out = deployment.command(&["status"]);
    assert!(out.status.success(), "status: {out:?}");
    let mut s = connect(addr);
    expect_banner(&mut s);
    assert_eq!(echo_roundtrip(&mut s, b"x\n"), b"x\n");
    drop(server);
}

#[test]
fn an_upgrade_neither_leaks_nor_adopts_unrelated_inherited_descriptors() {
    let deployment = Deployment::new();
    let junk = deployment.dir.path().join("junk");
    std::fs::write(&junk, "unrelated").unwrap();
    let junk_for_child = junk.clone();
    let server = deployment
        .builder()
        .tweak(move |cmd| {
            let file = std::fs::File::open(&junk_for_child).unwrap();
            let raw = file.as_raw_fd();
            // Safe: only dup2 between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in 3..=10 {
                        if libc::dup2(raw, fd) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            std::mem::forget(file);
        })
        .start();
    let before = fd_targets(server.pid());
    let mut s = server.connect_greeted();
    let out = deployment.command(&["upgrade"]);
    assert_upgraded(&out);
    // The requester's connection closes just after its answer: wait for that.
    wait_until(WAIT, || fds_of(server.pid()).len() <= before.len());
    let after = fd_targets(server.pid());
    assert_eq!(echo_roundtrip(&mut s, b"kept\n"), b"kept\n");
    let junk_text = junk.display().to_string();
    let junk_before = before.iter().filter(|(_, t)| *t == junk_text).count();
    let junk_after = after.iter().filter(|(_, t)| *t == junk_text).count();
    assert!(
        junk_after <= junk_before,
        "before {before:?}\nafter {after:?}"
    );
    assert_eq!(
        before.len(),
        after.len(),
        "before {before:?}\nafter {after:?}"
    );
    // A session after the upgrade holds no unrelated file.
    let fresh = server.connect_greeted();
    let child = server.child_pid_for(fresh.local_addr().unwrap());
    let child_fds = fd_targets(child);
    assert!(
        !child_fds.iter().any(|(_, t)| *t == junk_text),
        "the session holds {child_fds:?}"
    );
}

#[test]
fn an_upgrade_with_stdin_closed_keeps_serving() {
    let deployment = Deployment::new();
    let server = deployment
        .builder()
        .tweak(|cmd| {
            // Safe: only close between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::close(0);
                    Ok(())
                });
            }
        })
        .start();
    let mut s = server.connect_greeted();
    for _ in 0..2 {
        assert_upgraded(&deployment.command(&["upgrade"]));
    }
    assert_eq!(echo_roundtrip(&mut s, b"kept\n"), b"kept\n");
    assert_serves(&server, b"new\n");
    assert!(deployment.command(&["status"]).status.success());
}

/// Each kind of file an operator may have at the control socket's path: refused at start,
/// left as it was.
#[test]
fn odd_files_at_the_control_socket_path_are_refused_and_left_alone() {
    let deployment = Deployment::new();
    let path = deployment.control_socket();
    let target = deployment.dir.path().join("target");
    std::fs::write(&target, "precious").unwrap();
    type Make = fn(&Path, &Path);
    let kinds: [(&str, Make); 5] = [
        ("fifo", |p, _| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
        }),
        ("file", |p, _| std::fs::write(p, "operator data").unwrap()),
        ("dir", |p, _| std::fs::create_dir(p).unwrap()),
        ("symlink", |p, t| std::os::unix::fs::symlink(t, p).unwrap()),
        ("dangling", |p, t| {
            std::os::unix::fs::symlink(t.with_extension("none"), p).unwrap()
        }),
    ];
    for (kind, make) in kinds {
        make(&path, &target);
        let before = std::fs::symlink_metadata(&path).unwrap();
        let result = deployment.builder().try_start();
        let Err((status, text)) = result else {
            panic!("{kind}: started with something else at the control socket's path");
        };
        assert!(!status.success(), "{kind}: {status:?}");
        assert!(text.contains("control_socket"), "{kind}: {text}");
        let after = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(before.ino(), after.ino(), "{kind} replaced");
        assert_eq!(before.file_type(), after.file_type(), "{kind} changed");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        if after.is_dir() {
            std::fs::remove_dir(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        assert!(!deployment.pid_file.exists(), "{kind}: the pid file stays");
    }
}

/// A control client in the middle of its request when an upgrade executes is answered (by
/// either image), not cut off: `forkecho status` from a monitor racing an upgrade must not
/// fail for it.
#[test]
fn a_control_request_in_flight_during_an_upgrade_is_answered() {
    let deployment = Deployment::new();
    let server = deployment.builder().start();
    let mut asking = UnixStream::connect(deployment.control_socket()).unwrap();
    asking.set_read_timeout(Some(WAIT)).unwrap();
    asking.write_all(b"sta").unwrap();
    // The loop has taken the connection in: another command is answered after it.
    assert!(deployment.command(&["status"]).status.success());
    server.signal(Signal::SIGUSR2);
    server.wait_for_line("upgraded in place");
    let _ = asking.write_all(b"tus\n");
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut asking, &mut answer);
    assert!(
        answer.starts_with("ok\n") || answer.starts_with("error\n"),
        "the control client got {answer:?} (cut off by the upgrade)"
    );
}

/// The same for a metrics scrape whose request was half sent when the upgrade executed.
#[test]
fn a_metrics_scrape_in_flight_during_an_upgrade_is_answered() {
    let deployment = Deployment::new();
    let server = deployment
        .builder()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let line = server.wait_for_line("metrics on http://");
    let (_, rest) = line.split_once("metrics on http://").unwrap();
    let metrics: std::net::SocketAddr = rest.trim().trim_end_matches("/metrics").parse().unwrap();
    let mut scrape = std::net::TcpStream::connect(metrics).unwrap();
    scrape.set_read_timeout(Some(WAIT)).unwrap();
    scrape.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    assert!(deployment.command(&["status"]).status.success());
    server.signal(Signal::SIGUSR2);
    server.wait_for_line("upgraded in place");
    let _ = scrape.write_all(b"Host: forkecho\r\n\r\n");
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut scrape, &mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 "),
        "the scrape got {answer:?} (cut off by the upgrade)"
    );
}

/// A reload that adds a UNIX-domain listener whose path holds a FIFO, a file or a directory:
/// refused, the running listeners kept, the file left as it was and never opened.
#[test]
fn a_reload_onto_an_odd_file_at_a_unix_listen_path_is_refused_and_leaves_it() {
    let deployment = Deployment::new();
    let config = deployment.dir.path().join("forkecho.toml");
    std::fs::write(&config, "listen = [\"127.0.0.1:0\"]\n").unwrap();
    let server = deployment
        .builder()
        .args(["-c", config.to_str().unwrap()])
        .start();
    let path = deployment.dir.path().join("odd.sock");
    type Make = fn(&Path);
    let kinds: [(&str, Make); 3] = [
        ("fifo", |p| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
        }),
        ("file", |p| std::fs::write(p, "operator data").unwrap()),
        ("dir", |p| std::fs::create_dir(p).unwrap()),
    ];
    for (kind, make) in kinds {
        make(&path);
        let before = std::fs::symlink_metadata(&path).unwrap();
        std::fs::write(
            &config,
            format!(
                "listen = [\"{}\", \"unix:{}\"]\n",
                server.addr(),
                path.display()
            ),
        )
        .unwrap();
        let out = deployment.command(&["-c", config.to_str().unwrap(), "reload"]);
        assert!(!out.status.success(), "{kind}: reload applied: {out:?}");
        let after = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(before.ino(), after.ino(), "{kind} replaced");
        assert_eq!(before.file_type(), after.file_type(), "{kind} changed");
        if kind == "file" {
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "operator data");
        }
        assert_serves(&server, b"after a refused reload\n");
        if after.is_dir() {
            std::fs::remove_dir(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// Control clients that trickle garbage, one byte at a time, in every slot: echo is served
/// meanwhile, and `status` answers once their time is up.
#[test]
fn control_clients_trickling_garbage_do_not_stop_echo_or_status_for_long() {
    let deployment = Deployment::new();
    let server = deployment.builder().start();
    let socket = deployment.control_socket();
    let mut tricklers: Vec<UnixStream> = (0..16)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    for round in 0..20 {
        for t in &mut tricklers {
            let _ = t.write_all(&[b'a' + (round % 26) as u8]);
        }
        assert_serves(&server, b"trickle\n");
    }
    assert_status_answers(&deployment);
    drop(tricklers);
}

/// Asks `status` until it is answered, for at most WAIT.
fn assert_status_answers(deployment: &Deployment) {
    let started = Instant::now();
    loop {
        let out = deployment.command(&["status"]);
        if out.status.success() {
            return;
        }
        assert!(started.elapsed() < WAIT, "status never answered: {out:?}");
    }
}

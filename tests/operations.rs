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

    let out = run(&["-l", "127.0.0.1:0", "--pid-file", &pid_arg]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid file {pid_arg} is locked"))
            && err.contains(&format!("(pid {})", first.pid())),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    assert_serves(&first);
}

/// A stale pid file (left by a crash: no lock held) is taken over by the next start.
#[test]
fn stale_pid_file_is_taken_over() {
    let dir = TempDir::new();
    let path = dir.path().join("forkecho.pid");
    std::fs::write(&path, "999999999\nold junk\n").unwrap();
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

fn assert_serves(server: &Server) {
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"ok\n"), b"ok\n");
}

//! Operating forkecho: running several instances on one port (SO_REUSEPORT) so a host can
//! scale out without a proxy in front.

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

//! Configuration as a user sees it: `--check-config`, errors in config files and flags (exit 2,
//! naming the culprit), a busy port (exit 1), and flags overriding the file.

use crate::util::*;

use std::net::TcpListener;
use std::path::PathBuf;

/// Writes `text` to `forkecho.toml` in `dir` and returns its path as a string.
fn write_config(dir: &TempDir, text: &str) -> String {
    let path: PathBuf = dir.path().join("forkecho.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `--check-config` on a valid file with every key prints `configuration OK` and exits 0.
#[test]
fn check_config_valid_file_ok() {
    let dir = TempDir::new();
    let path = write_config(
        &dir,
        r#"listen = ["127.0.0.1:0"]
banner = "welcome\n"
backlog = 128
idle_timeout = 2.5
shutdown_timeout = 3
"#,
    );
    let out = run(&["-c", &path, "--check-config"]);
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains("configuration OK"),
        "stdout: {}",
        stdout(&out)
    );
}

/// An unknown key is rejected with exit 2, naming the file and the key, when starting and
/// with `--check-config`.
#[test]
fn unknown_key_rejected() {
    let dir = TempDir::new();
    let path = write_config(&dir, "listen = [\"127.0.0.1:0\"]\nbogus_key = 1\n");
    for extra in [&[][..], &["--check-config"][..]] {
        let mut args = vec!["-c", path.as_str(), "-l", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let out = run(&args);
        let err = expect_exit(&out, 2);
        assert!(err.contains(&path), "{args:?}: no path in stderr: {err}");
        assert!(
            err.contains("bogus_key"),
            "{args:?}: no key in stderr: {err}"
        );
        assert!(err.contains("unknown key"), "{args:?}: stderr: {err}");
        assert!(!stdout(&out).contains("configuration OK"), "{args:?}");
    }
}

/// A value of the wrong type (`backlog = "many"`) exits 2 naming the file and the key.
#[test]
fn wrong_type_rejected() {
    let dir = TempDir::new();
    let path = write_config(&dir, "listen = [\"127.0.0.1:0\"]\nbacklog = \"many\"\n");
    for extra in [&[][..], &["--check-config"][..]] {
        let mut args = vec!["-c", path.as_str(), "-l", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let err = expect_exit(&run(&args), 2);
        assert!(err.contains(&path), "{args:?}: no path in stderr: {err}");
        assert!(err.contains("backlog"), "{args:?}: no key in stderr: {err}");
    }
}

/// A TOML syntax error exits 2 naming the file and the line of the error.
#[test]
fn toml_syntax_error_names_line() {
    let dir = TempDir::new();
    let path = write_config(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nbanner = \"unterminated\n",
    );
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert!(err.contains(&path), "no path in stderr: {err}");
    assert!(err.contains("line 2"), "no line number in stderr: {err}");
}

/// A config file that does not exist exits 2 naming the path.
#[test]
fn missing_config_file_rejected() {
    let dir = TempDir::new();
    let path = dir.path().join("absent.toml").display().to_string();
    let out = run(&["-c", &path, "-l", "127.0.0.1:0"]);
    let err = expect_exit(&out, 2);
    assert!(err.contains(&path), "no path in stderr: {err}");
    assert!(
        err.contains("No such file") || err.contains("cannot read"),
        "no reason in stderr: {err}"
    );
}

/// An unparsable listen address (`-l nonsense`) exits 2 quoting it.
#[test]
fn invalid_listen_address_rejected() {
    let err = expect_exit(&run(&["-l", "nonsense"]), 2);
    assert!(err.contains("nonsense"), "stderr: {err}");
}

/// Listening on a port that is already taken fails at startup with exit 1 and says why.
#[test]
fn port_in_use_exits_1() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = expect_exit(&run(&["-l", &addr]), 1);
    let want = format!("cannot listen on {addr}: address already in use");
    assert!(err.contains(&want), "want {want:?} in stderr: {err}");
}

/// A `--banner` flag overrides the file's banner; without the flag the file's banner is used.
#[test]
fn flag_overrides_config_file() {
    let config = r#"banner = "from file\n"
listen = ["127.0.0.1:0"]
"#;
    let flagged = Server::builder()
        .config(config)
        .args(["--banner", "from flag\\n"])
        .start();
    assert_eq!(
        send_and_drain(&mut flagged.connect(), b"x"),
        b"from flag\nx"
    );

    let plain = Server::builder().config(config).start();
    assert_eq!(send_and_drain(&mut plain.connect(), b"y"), b"from file\ny");
}

/// Two addresses in the file's `listen` array give two listeners, and both serve.
#[test]
fn config_file_two_listeners_both_serve() {
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\n")
        .listeners(2)
        .start();
    assert_eq!(server.addrs.len(), 2, "{:?}", server.addrs);
    assert_ne!(server.addrs[0], server.addrs[1], "same address twice");
    for &addr in &server.addrs {
        let mut s = connect(addr);
        let data = format!("via {addr}\n").into_bytes();
        let mut want = BANNER.to_vec();
        want.extend_from_slice(&data);
        assert_eq!(send_and_drain(&mut s, &data), want, "via {addr}");
    }
}

/// The same address listed twice is a config error naming it, not a confusing bind failure.
#[test]
fn duplicate_listen_address_rejected() {
    let out = run(&[
        "-l",
        "127.0.0.1:2999",
        "-l",
        "127.0.0.1:2999",
        "--check-config",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key `listen`") && err.contains("127.0.0.1:2999 is listed twice"),
        "{err}"
    );
}

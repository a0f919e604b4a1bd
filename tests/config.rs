//! Configuration as a user sees it: `--check-config`, errors in config files and flags (exit 2,
//! naming the culprit), a busy port (exit 1), and flags overriding the file.

use crate::util::*;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;

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

/// A misspelt key is answered with the key it is closest to, at the line it is on.
#[test]
fn a_misspelt_key_is_answered_with_the_nearest_key() {
    let dir = TempDir::new();
    let path = write_config(&dir, "listen = [\"127.0.0.1:0\"]\nmax_childern = 5\n");
    let err = expect_exit(&run(&["-c", path.as_str(), "--check-config"]), 2);
    assert!(
        err.contains(&format!(
            "{path}: key `max_childern`: unknown key; did you mean `max_children`?"
        )),
        "stderr: {err}"
    );
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

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).unwrap();
}

/// A config path that is a FIFO is refused at once (exit 2, naming it and what it is) by
/// `--check-config` and at start: nothing waits for a writer.
#[test]
fn a_fifo_config_is_refused_without_waiting() {
    let dir = TempDir::new();
    let fifo = dir.path().join("forkecho.toml");
    mkfifo(&fifo);
    let fifo = fifo.display().to_string();
    for args in [
        &["-c", &fifo, "--check-config"][..],
        &["-c", &fifo, "-l", "127.0.0.1:0"][..],
    ] {
        let err = expect_exit(&run(args), 2);
        let want = format!("forkecho: {fifo}: is a FIFO, not a regular file");
        assert!(err.starts_with(&want), "{args:?}: {err}");
    }
}

/// `-c /dev/stdin` on a pipe (as `-c <(...)` would be) is refused at start, saying that a
/// reload must read the configuration again; a file given the same way is fine, and so is an
/// empty regular file.
#[test]
fn a_config_on_a_pipe_is_refused_because_a_reload_could_not_read_it() {
    let text = "listen = [\"127.0.0.1:0\"]\n";
    let out = run_with_stdin(&["-c", "/dev/stdin", "--check-config"], Some(text));
    let err = expect_exit(&out, 2);
    assert!(
        err.contains("/dev/stdin: is a FIFO, not a regular file")
            && err.contains("read its configuration again on reload")
            && err.contains("give a file"),
        "{err}"
    );
    let dir = TempDir::new();
    let empty = write_config(&dir, "");
    expect_exit(&run(&["-c", &empty, "--check-config"]), 0);
}

/// A device (/dev/zero would never end) and a file over the 32 MiB cap are refused without
/// being read.
#[test]
fn a_device_or_an_oversized_config_is_refused() {
    let err = expect_exit(&run(&["-c", "/dev/zero", "--check-config"]), 2);
    assert!(
        err.contains("/dev/zero: is a character device, not a regular file"),
        "{err}"
    );
    let dir = TempDir::new();
    let big = dir.path().join("big.toml");
    // Sparse: 33 MiB that take no disk.
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(33 << 20).unwrap();
    let big = big.display().to_string();
    let err = expect_exit(&run(&["-c", &big, "--check-config"]), 2);
    assert!(
        err.contains(&format!("{big}: is larger than 32 MiB")),
        "{err}"
    );
}

/// On SIGHUP a config that became a FIFO, then /dev/zero, is refused at once, the log naming
/// what it is; the loop goes on serving with the configuration it had.
#[test]
fn a_reload_from_a_fifo_or_a_device_is_refused_and_serving_goes_on() {
    let dir = TempDir::new();
    let path = write_config(&dir, "listen = [\"127.0.0.1:0\"]\nbanner = \"kept\\n\"\n");
    let server = Server::builder().args(["-c", &path]).start();
    std::fs::remove_file(&path).unwrap();
    mkfifo(Path::new(&path));
    server.signal(Signal::SIGHUP);
    let line = server.wait_for_line("reload refused:");
    assert!(
        line.contains(&format!("{path}: is a FIFO, not a regular file")),
        "{line}"
    );
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    server.signal(Signal::SIGHUP);
    server.wait_for_log("a second refusal", WAIT, |lines| {
        lines.iter().any(|l| {
            l.contains("reload refused:") && l.contains("is a character device, not a regular file")
        })
    });
    let mut s = connect(server.addr());
    assert_eq!(send_and_drain(&mut s, b"x"), b"kept\nx");
    assert_eq!(server.count_lines("reloaded configuration"), 0);
}

/// An error about `user` or `group` names where the value was set: the file or the command
/// line, like every other key.
#[test]
fn user_and_group_errors_name_the_file_or_the_command_line() {
    let dir = TempDir::new();
    let path = write_config(&dir, "user = \"no-such-user-forkecho\"\n");
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert!(
        err.starts_with(&format!(
            "forkecho: {path}: key `user`: no user `no-such-user-forkecho`"
        )),
        "{err}"
    );
    let path = write_config(&dir, "group = \"nogroup\"\n");
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert_eq!(
        err.trim(),
        format!("forkecho: {path}: key `group`: needs `user` too")
    );
    let err = expect_exit(
        &run(&[
            "-c",
            &path,
            "--user",
            "no-such-user-forkecho",
            "--check-config",
        ]),
        2,
    );
    assert!(
        err.starts_with("forkecho: command line: key `user`: no user"),
        "{err}"
    );
}

/// Addresses that cannot be bound together are refused by `--check-config` (not only at
/// start): a wildcard beside an address of its family and port, and an IPv4-mapped address.
/// [::]:P beside 0.0.0.0:P is fine (IPv6 listeners are IPv6-only).
#[test]
fn listen_addresses_that_cannot_be_bound_together_are_refused() {
    for (pair, want) in [
        (
            ["0.0.0.0:2999", "127.0.0.1:2999"],
            "command line: key `listen`: 0.0.0.0:2999 already covers 127.0.0.1:2999; list one \
             of them",
        ),
        (
            ["[::1]:2999", "[::]:2999"],
            "command line: key `listen`: [::]:2999 already covers [::1]:2999; list one of them",
        ),
    ] {
        let err = expect_exit(&run(&["-l", pair[0], "-l", pair[1], "--check-config"]), 2);
        assert!(err.contains(want), "{pair:?}: {err}");
    }
    let dir = TempDir::new();
    let path = write_config(&dir, "listen = [\"0.0.0.0:2999\", \"127.0.0.1:2999\"]\n");
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert!(
        err.contains(&format!(
            "{path}: key `listen`: 0.0.0.0:2999 already covers"
        )),
        "{err}"
    );
    let path = write_config(&dir, "listen = [\"[::ffff:127.0.0.1]:2999\"]\n");
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert!(
        err.contains(&format!(
            "{path}: key `listen`: `[::ffff:127.0.0.1]:2999` is an IPv4-mapped"
        )) && err.contains("write 127.0.0.1:2999"),
        "{err}"
    );
    let err = expect_exit(
        &run(&["-l", "[::ffff:127.0.0.1]:2999", "--check-config"]),
        2,
    );
    assert!(
        err.contains("'--listen") && err.contains("write 127.0.0.1:2999"),
        "{err}"
    );
    let out = run(&["-l", "0.0.0.0:2999", "-l", "[::]:2999", "--check-config"]);
    expect_exit(&out, 0);
}

/// Values refused with a reason a person can act on, quoting what was written: integers
/// beyond the key or beyond TOML, a number past f64 precision, bytes that are not UTF-8 (by
/// line), a NUL in a path or name, a timeout below a millisecond, a burst without a rate.
#[test]
fn bad_values_are_explained_as_written() {
    let dir = TempDir::new();
    for (text, want) in [
        (
            "max_children = 99999999999999999999\n",
            "key `max_children`: must be from 1 to 1000000, not 99999999999999999999",
        ),
        (
            "idle_timeout = 9007199254740993\n",
            "key `idle_timeout`: must be a number of seconds from 0 to 31536000, not \
             9007199254740993",
        ),
        (
            "idle_timeout = 0.0001\n",
            "key `idle_timeout`: must be 0 (never) or at least 0.001 s, not 0.0001",
        ),
        (
            "log_file = \"a\\u0000b\"\n",
            "key `log_file`: \"a\\0b\" contains a NUL byte",
        ),
        (
            "rate_burst = 5\n",
            "key `rate_burst`: has no effect without max_rate_per_source",
        ),
    ] {
        let path = write_config(&dir, text);
        let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
        assert!(err.contains(&format!("{path}: {want}")), "{text:?}: {err}");
    }
    let path = dir.path().join("forkecho.toml");
    std::fs::write(&path, b"backlog = 5\nbanner = \"caf\xe9\"\n").unwrap();
    let path = path.display().to_string();
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert!(
        err.contains(&format!(
            "{path}: line 2, column 14 (byte 26 of the file): not UTF-8"
        )),
        "{err}"
    );
    let err = expect_exit(&run(&["--rate-burst", "5", "--check-config"]), 2);
    assert!(
        err.contains("command line: key `rate_burst`: has no effect without max_rate_per_source"),
        "{err}"
    );
    let err = expect_exit(&run(&["--idle-timeout", "0.0001", "--check-config"]), 2);
    assert!(
        err.contains("must be 0 (never) or at least 0.001 s"),
        "{err}"
    );
}

/// A file within the byte cap can still hold millions of tiny values, and parsing costs about
/// 150 bytes each: such a file is refused before it is parsed, at start and on reload, and
/// the running configuration keeps serving.
#[test]
fn a_config_with_too_many_values_is_refused_before_parsing() {
    let dir = TempDir::new();
    let many = format!("deny = [{}0]\n", "0,".repeat(600_000));
    let path = write_config(&dir, &many);
    let out = run(&["-c", &path, "--check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{path}: holds 600002 values and keys")),
        "{stderr}"
    );
    assert!(stderr.contains("more than the 500000"), "{stderr}");

    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\n")
        .start();
    server.rewrite_config(&format!("listen = [\"127.0.0.1:0\"]\n{many}"));
    server.signal(nix::sys::signal::Signal::SIGHUP);
    let line = server.wait_for_line("reload refused");
    assert!(line.contains("more than the 500000"), "{line}");
    assert_serves(&server, b"still\n");
}

/// `--check-config` looks at the host too, without disturbing a running instance: an address
/// not on this host, or a log or pid file that cannot be created, is exit 2 naming the key;
/// a port in use (by the running instance, say) is not a problem.
#[test]
fn check_config_finds_what_the_host_would_refuse_but_not_a_port_in_use() {
    let dir = TempDir::new();
    let refused = |args: &[&str], key: &str, reason: &str| {
        let out = run(&[args, &["--check-config"]].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("key `{key}`")), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
    };
    refused(
        &["-l", "192.0.2.1:2333"],
        "listen",
        "not an address of this host",
    );
    let missing = dir.path().join("missing/forkecho.log");
    refused(
        &["--log-file", missing.to_str().unwrap()],
        "log_file",
        "does not exist",
    );
    let pid_dir = dir.path().to_str().unwrap();
    refused(&["--pid-file", pid_dir], "pid_file", "is a directory");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let log = dir.path().join("new.log");
    let out = run(&[
        "-l",
        &addr,
        "--log-file",
        log.to_str().unwrap(),
        "--check-config",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!log.exists(), "--check-config created the log file");
}

/// A link-local IPv6 address is bound with its scope (`%ifindex`); the check's probe must keep
/// the scope too, or it says "invalid argument" for an address the start binds.
#[test]
fn check_config_accepts_a_link_local_address_with_its_scope() {
    let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    let Some((addr, index)) = inet6.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let hex = fields.first()?;
        if !hex.starts_with("fe80") {
            return None;
        }
        let groups: Vec<&str> = (0..8).map(|i| &hex[4 * i..4 * i + 4]).collect();
        let addr: std::net::Ipv6Addr = groups.join(":").parse().ok()?;
        Some((addr, u32::from_str_radix(fields.get(1)?, 16).ok()?))
    }) else {
        eprintln!("no link-local IPv6 address on this host: nothing to check");
        return;
    };
    let listen = format!("[{addr}%{index}]:0");
    let out = run(&["-l", &listen, "--check-config"]);
    assert_eq!(out.status.code(), Some(0), "{listen}: {out:?}");
}

/// A pid file that holds something other than a pid is refused at start ("not a pid; not
/// starting"), and by the check too, which leaves it untouched.
#[test]
fn check_config_refuses_a_pid_file_the_start_refuses() {
    let dir = TempDir::new();
    let pid_file = dir.path().join("forkecho.pid");
    std::fs::write(&pid_file, "not a pid\n").unwrap();
    let out = run(&[
        "-l",
        "127.0.0.1:0",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--check-config",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), "not a pid\n");
}

/// A log file that is a dangling symlink is created where the link points, so the directory
/// that matters is the target's: here it does not exist, and the start fails.
#[test]
fn check_config_follows_a_dangling_log_symlink_to_its_directory() {
    let dir = TempDir::new();
    let log = dir.path().join("forkecho.log");
    std::os::unix::fs::symlink(dir.path().join("missing/forkecho.log"), &log).unwrap();
    let out = run(&[
        "-l",
        "127.0.0.1:0",
        "--log-file",
        log.to_str().unwrap(),
        "--check-config",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Like every configuration error, a host check names the file that set the key.
#[test]
fn check_config_names_the_file_that_set_the_key() {
    let dir = TempDir::new();
    let pid_dir = dir.path().display().to_string();
    let path = write_config(
        &dir,
        &format!("listen = [\"127.0.0.1:0\"]\npid_file = \"{pid_dir}\"\n"),
    );
    let out = run(&["-c", &path, "--check-config"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&path), "{stderr}");
}

/// A port below 1024 needs root (or CAP_NET_BIND_SERVICE): `--check-config` run by another
/// user says so, as the start would fail; run as root it passes. (It binds nothing.)
#[test]
fn check_config_refuses_a_privileged_port_it_could_not_bind() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    if !is_root_or_skip("only root can run the check as another user") {
        return;
    }
    assert_eq!(
        run(&["-l", "127.0.0.1:81", "--check-config"]).status.code(),
        Some(0)
    );
    // A copy another user may execute wherever the tree is.
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = dir.path().join("forkecho");
    copy_binary_to(&program);
    let out = Command::new(&program)
        .args(["-l", "127.0.0.1:81", "--check-config"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("command line: key `listen`"), "{stderr}");
    assert!(stderr.contains("a port below 1024 needs root"), "{stderr}");
}

/// The documented config file (`config/forkecho.toml`) lists every key, and the values it
/// sets are the built-in defaults: loading it changes nothing.
#[test]
fn the_documented_config_lists_every_key_at_its_default() {
    use clap::Parser;
    use forkecho::config::{Cli, Config};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/forkecho.toml");
    let text = std::fs::read_to_string(path).unwrap();
    for key in forkecho::config::KEYS {
        let listed = text.lines().any(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        });
        assert!(listed, "config/forkecho.toml does not list `{key}`");
    }
    let mut with_file = Config::load(&Cli::parse_from(["forkecho", "-c", path])).unwrap();
    let without = Config::load(&Cli::parse_from(["forkecho"])).unwrap();
    // Only where it came from differs.
    assert_eq!(
        with_file.file.take().as_deref(),
        Some(std::path::Path::new(path))
    );
    assert_eq!(with_file, without);
}

/// `--help` has a flag for every key, with the key's built-in default.
#[test]
fn help_has_a_flag_for_every_key() {
    let out = run(&["--help"]);
    let help = stdout(&out);
    for key in forkecho::config::KEYS {
        // `exec` is the words after `--`; `listener` tables are for the file only.
        let flag = match key {
            "exec" => "[-- <PROGRAM>...]".to_string(),
            "listener" => continue,
            _ => format!("--{}", key.replace('_', "-")),
        };
        assert!(help.contains(&flag), "--help lacks {flag}:\n{help}");
    }
    for line in [
        "--listen <ADDR>",
        "[default: 127.0.0.1:2333]",
        "--backlog <N>",
        "[default: 1024]",
        "--log-level <LEVEL>",
        "[default: info]",
    ] {
        assert!(help.contains(line), "--help lacks {line}:\n{help}");
    }
}

/// `--` with no program after it is an error naming `exec`, not a silent start of the echo.
#[test]
fn a_bare_double_dash_is_an_error() {
    let err = expect_exit(&run(&["-l", "127.0.0.1:0", "--check-config", "--"]), 2);
    assert!(err.contains("key `exec`"), "{err}");
    assert!(
        err.contains("`--` must be followed by the program"),
        "{err}"
    );
}

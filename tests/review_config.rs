//! Review of the configuration layer (keys, flags, file, reload line): each test shows one
//! defect a user meets, and fails until it is fixed.

use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;

use crate::util::*;

/// Writes `text` to `forkecho.toml` in `dir` and returns its path as a string.
fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.path().join("forkecho.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// An empty path: `--check-config` said OK for `--pid-file ''` and `--log-file ''`, and the
/// start then failed (exit 1, "cannot write pid file : no such file or directory"), because
/// `std::path::absolute("")` fails and `""` is left as it is, which preflight takes for a file
/// to create in ".". And `working_directory = ""` in a file meant the file's directory, where
/// `--working-directory ''` is an error: one value, two meanings.
#[test]
fn an_empty_path_is_refused_alike_by_check_config_the_start_and_the_file() {
    for flag in ["--pid-file", "--log-file"] {
        let out = run(&[flag, "", "-l", "127.0.0.1:0", "--check-config"]);
        let err = expect_exit(&out, 2);
        // A bad flag is clap's usage error, which names the flag.
        assert!(err.contains(flag), "{flag}: {err}");
        assert!(err.contains("is empty"), "{flag}: {err}");
    }
    let dir = TempDir::new();
    let path = write_config(&dir, "exec = [\"/bin/cat\"]\nworking_directory = \"\"\n");
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert!(err.contains("key `working_directory`"), "{err}");
}

/// An address of a `[[listener]]` table is blamed on `listen` and on a layer that never named
/// it: "built-in default: key `listen`: 127.0.0.1:P is listed twice" for two equal tables,
/// "command line: key `listen`: 192.0.2.1:P: ... not an address of this host" for a table's
/// address when `-l` gave another one. The file and the table are what the operator must fix.
#[test]
fn an_error_about_a_listener_tables_address_names_the_file_and_the_table() {
    let dir = TempDir::new();
    let twice = write_config(
        &dir,
        "[[listener]]\naddress = \"127.0.0.1:47301\"\n\
         [[listener]]\naddress = \"127.0.0.1:47301\"\n",
    );
    let err = expect_exit(&run(&["-c", &twice, "--check-config"]), 2);
    assert!(err.contains(&twice), "{err}");
    assert!(err.contains("key `listener`"), "{err}");
    assert!(!err.contains("built-in default"), "{err}");

    let dir = TempDir::new();
    let foreign = write_config(&dir, "[[listener]]\naddress = \"192.0.2.1:47302\"\n");
    let err = expect_exit(
        &run(&["-c", &foreign, "-l", "127.0.0.1:0", "--check-config"]),
        2,
    );
    assert!(err.contains(&foreign), "{err}");
    assert!(err.contains("key `listener`"), "{err}");
    assert!(!err.contains("command line"), "{err}");
}

/// `proxy_protocol` set without `trusted_proxies` is reported as coming from the "built-in
/// default", whether the file or the command line set it.
#[test]
fn proxy_protocol_without_trusted_proxies_names_where_it_was_set() {
    let err = expect_exit(
        &run(&[
            "--proxy-protocol",
            "v2",
            "-l",
            "127.0.0.1:0",
            "--check-config",
        ]),
        2,
    );
    assert!(err.starts_with("forkecho: command line:"), "{err}");
    let dir = TempDir::new();
    let path = write_config(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nproxy_protocol = \"v2\"\n",
    );
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert!(err.starts_with(&format!("forkecho: {path}:")), "{err}");
}

/// `proxy_header_timeout` below a millisecond is told "must be 0 (never) or at least 0.001 s";
/// the user who then writes 0 is told "must be more than 0".
#[test]
fn proxy_header_timeout_errors_offer_only_values_it_takes() {
    let err = expect_exit(
        &run(&["--proxy-header-timeout", "0.0005", "--check-config"]),
        2,
    );
    assert!(!err.contains("must be 0"), "{err}");
}

/// The reload line compares values as shown, and a timeout is shown to a hundredth of a
/// second: `shutdown_timeout` 0.001 -> 0.004 is applied and logged as "nothing changed".
#[test]
fn a_reload_reports_a_timeout_change_below_a_hundredth_of_a_second() {
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\nshutdown_timeout = 0.001\n")
        .start();
    let addr = server.addr();
    server.rewrite_config(&format!(
        "listen = [\"{addr}\"]\nshutdown_timeout = 0.004\n"
    ));
    server.signal(Signal::SIGHUP);
    let line = server.wait_for_line("reloaded configuration");
    assert!(line.contains("shutdown_timeout"), "{line}");
}

/// `exec` is shown as its words joined with spaces, so `["/bin/echo", "a b"]` and
/// `["/bin/echo", "a", "b"]` look alike: the program's new arguments apply and the reload
/// line says "nothing changed".
#[test]
fn a_reload_reports_a_change_of_program_arguments() {
    let server = Server::builder()
        .config("listen = [\"127.0.0.1:0\"]\nexec = [\"/bin/echo\", \"a b\"]\n")
        .start();
    let addr = server.addr();
    server.rewrite_config(&format!(
        "listen = [\"{addr}\"]\nexec = [\"/bin/echo\", \"a\", \"b\"]\n"
    ));
    server.signal(Signal::SIGHUP);
    let line = server.wait_for_line("reloaded configuration");
    assert!(line.contains("exec"), "{line}");
}

/// `env`, `exec` and `listener` are shown whole on the reload line (only banners and prefix
/// lists are summarised), so one long value fills the line up to the logger's cut and the
/// changes listed after it are lost: here `proxy_header_timeout 5.00s -> 6.00s`.
#[test]
fn a_long_value_does_not_push_other_changes_off_the_reload_line() {
    let config = |value: &str, timeout: u32| {
        format!(
            "listen = [\"{{addr}}\"]\nexec = [\"/bin/cat\"]\nenv = {{ BIG = \"{value}\" }}\n\
             proxy_header_timeout = {timeout}\n"
        )
    };
    let server = Server::builder()
        .config(&config("x", 5).replace("{addr}", "127.0.0.1:0"))
        .start();
    let addr = server.addr().to_string();
    server.rewrite_config(&config(&"y".repeat(5000), 6).replace("{addr}", &addr));
    server.signal(Signal::SIGHUP);
    let line = server.wait_for_line("reloaded configuration");
    let tail = &line[line.len().saturating_sub(120)..];
    assert!(
        line.contains("proxy_header_timeout"),
        "a line of {} bytes ending {tail:?}",
        line.len()
    );
}

/// Paths are UTF-8 on the command line as in the file (TOML is UTF-8), so that a key means
/// the same in both layers: a non-UTF-8 path flag is a usage error (exit 2) saying so,
/// never a path silently changed. (Before the keys became one table a path flag took any
/// bytes; the README documents the limit.)
#[test]
fn a_non_utf8_path_flag_is_refused_clearly() {
    let dir = TempDir::new();
    let mut pid_file = dir.path().as_os_str().as_bytes().to_vec();
    pid_file.extend_from_slice(b"/pid-\xff");
    let out = Command::new(BIN)
        .arg("--pid-file")
        .arg(std::ffi::OsStr::from_bytes(&pid_file))
        .args(["-l", "127.0.0.1:0", "--check-config"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = expect_exit(&out, 2);
    assert!(err.contains("UTF-8"), "{err}");
}

/// TOML puts every key after a `[[listener]]` header into that table, the pitfall the shipped
/// file warns about. A top-level key written there is reported as "listener 1: unknown key
/// `backlog` (expected one of: address, proxy_protocol, trusted_proxies)", which sends the
/// reader looking for a typo in a key that is right; the error should say it is a top-level
/// key that belongs above the first table.
#[test]
fn a_top_level_key_after_a_listener_table_is_explained() {
    let dir = TempDir::new();
    let path = write_config(
        &dir,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\nbacklog = 5\n",
    );
    let err = expect_exit(&run(&["-c", &path, "--check-config"]), 2);
    assert!(err.contains("top-level"), "{err}");
}

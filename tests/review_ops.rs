//! Review of the operator features (control commands, metrics, log formats, packaging): each
//! test shows one defect a user would see. They fail until the defect is fixed.
//!
//! Servers run from a deployment directory (a config file with `pid_file` beside it, so the
//! control socket is `forkecho.ctl` there), and are driven with the real control commands.

use crate::util::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Output;

/// A directory with `forkecho.toml` (loopback listener on a kernel-picked port,
/// `pid_file = "forkecho.pid"`, plus extra keys); the control socket is `forkecho.ctl` beside.
struct Deployment {
    dir: TempDir,
    config: PathBuf,
}

impl Deployment {
    fn new(extra: &str) -> Self {
        let dir = TempDir::new();
        let config = dir.path().join("forkecho.toml");
        let deployment = Deployment { dir, config };
        deployment.write_config(extra);
        deployment
    }

    fn write_config(&self, extra: &str) {
        let text = format!("listen = [\"127.0.0.1:0\"]\npid_file = \"forkecho.pid\"\n{extra}\n");
        std::fs::write(&self.config, text).unwrap();
    }

    fn config_arg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("forkecho.ctl")
    }

    /// Starts a server on this config, its log read from `log`, and waits until its control
    /// socket answers `status` (whatever the log's format).
    fn start_logging_to(&self, log: &std::path::Path) -> Server {
        let server = Server::builder()
            .args(["-c", self.config_arg(), "--log-file", log.to_str().unwrap()])
            .read_log_from(log)
            .spawn();
        assert!(
            wait_until(WAIT, || self.ctl(&["status"]).status.code() == Some(0)),
            "the server never answered `status`\n--- log ---\n{}",
            server.log_text()
        );
        server
    }

    /// `forkecho -c <config> <command...>`, run to completion.
    fn ctl(&self, command: &[&str]) -> Output {
        let mut args = vec!["-c", self.config_arg()];
        args.extend_from_slice(command);
        run(&args)
    }
}

/// The JSON records of a log, each line parsed; panics naming the first line that is not one.
fn assert_json_records(lines: &[String]) {
    for line in lines {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(line) {
            let tail: String = line
                .chars()
                .rev()
                .take(120)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "a log line ({} bytes) is not JSON ({e}): ...{tail}",
                line.len()
            );
        }
    }
}

/// A reload refused for a reason longer than a log line (an unknown key of 2100 `"` — each
/// one escaped as `\"` in JSON), once with each alignment of the escapes against the cut:
/// the server must stay up, answer the refusal, and every line of its JSON log must still be
/// one valid record. Today the cut falls inside the `reason` field, not inside `msg` as the
/// line's ending assumes: in a debug build the parent panics (an overflow in
/// `LineBuffer::push` once `quote_until_end` has lowered the limit below the text already
/// written) and the server is gone; in a release build the line ends in `\… [n bytes cut]"}`,
/// an invalid escape.
#[test]
fn a_reload_refused_for_a_long_reason_keeps_the_server_and_json_lines_whole() {
    let deployment = Deployment::new("log_format = \"json\"");
    let log = deployment.dir.path().join("forkecho.log");
    let mut server = deployment.start_logging_to(&log);
    for shift in ["", "a"] {
        let key = format!("\"{shift}{}\" = 1", "\\\"".repeat(2100));
        deployment.write_config(&format!("log_format = \"json\"\n{key}"));
        let out = deployment.ctl(&["reload"]);
        let said = expect_exit(&out, 1);
        assert!(said.contains("unknown key"), "the refusal's reason: {said}");
        assert!(
            server.is_running(),
            "the server died logging the refusal\n--- log ---\n{}",
            server.log_text()
        );
    }
    expect_exit(&deployment.ctl(&["stop"]), 0);
    assert!(server.wait_exit(WAIT).success());
    assert_json_records(&server.log_lines());
}

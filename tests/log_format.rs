//! The log as shippers and filters read it: `log_format = "json"` and `"logfmt"` give every
//! line as one valid record with the fixed fields (event, peer, child, code or signal,
//! duration, reason, source); under systemd (stderr is the journal's stream) lines carry
//! syslog priorities and no time of their own; and the shipped fail2ban filter, run by the
//! real `fail2ban-regex`, finds the refused clients in real log output.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, Signal};

use crate::util::*;

/// Waits for a line holding `needle` in the log file at `path`; returns every line so far.
fn wait_for_record(server: &Server, needle: &str) -> Vec<String> {
    server.wait_for_log(needle, WAIT, |lines| {
        lines.iter().any(|l| l.contains(needle))
    });
    server.log_lines()
}

/// The address of the `listening` record (json).
fn json_listening_address(server: &Server) -> std::net::SocketAddr {
    let lines = wait_for_record(server, "\"event\":\"listening\"");
    let line = lines
        .iter()
        .find(|l| l.contains("\"event\":\"listening\""))
        .unwrap();
    let record: serde_json::Value = serde_json::from_str(line).unwrap();
    record["address"].as_str().unwrap().parse().unwrap()
}

fn json_records(server: &Server) -> Vec<serde_json::Value> {
    server
        .log_lines()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

#[test]
fn json_lines_are_valid_records_with_the_event_fields() {
    let dir = TempDir::new();
    let log = dir.path().join("forkecho.log");
    let mut server = Server::builder()
        .args(["--log-format", "json", "--deny", "127.0.0.2"])
        // A value with a quote, a backslash and an escape sequence reaches the reload line.
        .config("banner = \"hello\\n\"\nlisten = [\"127.0.0.1:0\"]\n")
        .log_file(&log)
        .spawn();
    let addr = json_listening_address(&server);

    let mut s = connect(addr);
    expect_banner_text(&mut s, b"hello\n");
    assert_eq!(echo_roundtrip(&mut s, b"json\n"), b"json\n");
    let client = s.local_addr().unwrap();
    drop(s);
    wait_for_record(&server, "\"event\":\"ended\"");
    let mut refused = connect_from(addr, "127.0.0.2");
    assert_closed_by_server(&mut refused, "denied");
    // A session killed by a signal: its record names the signal.
    let _held = connect(addr);
    server.wait_for_log("a second session", WAIT, |lines| {
        lines
            .iter()
            .filter(|l| l.contains("\"event\":\"accepted\""))
            .count()
            == 2
    });
    let lines = server.log_lines();
    let accepted: serde_json::Value = serde_json::from_str(
        lines
            .iter()
            .rev()
            .find(|l| l.contains("\"event\":\"accepted\""))
            .unwrap(),
    )
    .unwrap();
    let child = accepted["child"].as_i64().unwrap() as i32;
    kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL).unwrap();
    wait_for_record(&server, "\"signal\":\"SIGKILL\"");
    server.rewrite_config("banner = \"q\\\"uote \\\\ \\u001b[31m\"\nlisten = [\"127.0.0.1:0\"]\n");
    server.signal(Signal::SIGHUP);
    wait_for_record(&server, "\"event\":\"reload\"");
    server.signal(Signal::SIGUSR1);
    wait_for_record(&server, "\"event\":\"status\"");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());

    let records = json_records(&server);
    for record in &records {
        for field in ["time", "level", "pid", "event", "msg"] {
            assert!(!record[field].is_null(), "no {field}: {record}");
        }
    }
    let find = |event: &str| {
        records
            .iter()
            .find(|r| r["event"] == event)
            .unwrap_or_else(|| panic!("no {event} record"))
    };
    let first_accept = records.iter().find(|r| r["event"] == "accepted").unwrap();
    assert_eq!(first_accept["peer"], client.to_string());
    assert_eq!(first_accept["source"], "127.0.0.1/32");
    assert!(first_accept["child"].is_i64());
    let ended = find("ended");
    assert_eq!(ended["code"], 0);
    assert!(ended["duration"].as_f64().is_some_and(|d| d >= 0.0));
    let refusal = find("refused");
    assert_eq!(refusal["reason"], "denied");
    assert!(refusal["peer"].as_str().unwrap().starts_with("127.0.0.2:"));
    let killed = records
        .iter()
        .find(|r| r["event"] == "ended" && r["signal"] == "SIGKILL")
        .unwrap();
    assert_eq!(killed["child"], child);
    let reload = find("reload");
    assert_eq!(reload["result"], "applied");
    assert!(
        reload["msg"].as_str().unwrap().contains("q\\\"uote"),
        "{reload}"
    );
    assert_eq!(find("shutdown")["mode"], "smart");
    assert_eq!(find("stopped")["level"], "info");
    let pid = server.pid().as_raw();
    assert!(records.iter().any(|r| r["pid"] == pid));
}

/// Reads the banner `expected` (the server was given its own).
fn expect_banner_text(s: &mut std::net::TcpStream, expected: &[u8]) {
    assert_eq!(read_exactly(s, expected.len()), expected);
}

/// `key=value` pairs of a logfmt line, values unquoted.
fn logfmt_pairs(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .unwrap_or_else(|| panic!("no `=`: {line}"));
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unclosed quote: {line}"));
            (quoted[..end].to_string(), &quoted[end + 1..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((key.to_string(), value));
        rest = after.trim_start();
    }
    pairs
}

#[test]
fn logfmt_lines_are_key_value_records_with_the_event_fields() {
    let dir = TempDir::new();
    let log = dir.path().join("forkecho.log");
    let mut server = Server::builder()
        .args(["--log-format", "logfmt", "-l", "127.0.0.1:0"])
        .log_file(&log)
        .spawn();
    let lines = wait_for_record(&server, "event=listening");
    let listening = logfmt_pairs(
        lines
            .iter()
            .find(|l| l.contains("event=listening"))
            .unwrap(),
    );
    let address = &listening.iter().find(|(k, _)| k == "address").unwrap().1;
    let addr: std::net::SocketAddr = address.parse().unwrap();
    let mut s = connect(addr);
    expect_banner(&mut s);
    drop(s);
    wait_for_record(&server, "event=ended");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    for line in server.log_lines() {
        let pairs = logfmt_pairs(&line);
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(&keys[..4], ["time", "level", "pid", "event"], "{line}");
        assert_eq!(keys.last(), Some(&"msg"), "{line}");
    }
    let ended = server
        .log_lines()
        .into_iter()
        .find(|l| l.contains("event=ended"))
        .unwrap();
    let pairs = logfmt_pairs(&ended);
    let get = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("code"), Some("0"));
    assert!(get("child").is_some() && get("peer").is_some() && get("duration").is_some());
}

/// stderr is the journal's stream (`JOURNAL_STREAM` names its device and inode): each line
/// starts with its syslog priority and has no time of its own. Named stream, other file: plain.
#[test]
fn under_the_journal_lines_carry_priorities_and_no_time() {
    let dir = TempDir::new();
    let path = dir.path().join("journal-stream");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut server = Server::builder()
        .env("JOURNAL_STREAM", &stream)
        .env("RUST_LOG", "info")
        .args(["-l", "127.0.0.1:0", "--deny", "127.0.0.2"])
        .stderr(file)
        .read_log_from(&path)
        .spawn();
    server.wait_for_log("listening", WAIT, |lines| {
        lines.iter().any(|l| l.contains("listening on"))
    });
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    let lines = server.log_lines();
    for line in &lines {
        assert!(line.starts_with("<6>INFO  forkecho["), "{line}");
    }
    // Another stream named: not the journal; lines as usual.
    let other = dir.path().join("not-the-journal");
    let file = std::fs::File::create(&other).unwrap();
    let mut server = Server::builder()
        .env("JOURNAL_STREAM", &stream)
        .stderr(file)
        .read_log_from(&other)
        .start();
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    assert!(server
        .log_lines()
        .iter()
        .all(|l| LogLine::parse(l).is_some()));
}

/// The shipped fail2ban filter, run by the real `fail2ban-regex` over forkecho's own log in
/// each format, finds exactly the refused clients (IPv4 and IPv6) and nothing else.
#[test]
fn the_fail2ban_filter_finds_the_refused_clients() {
    if Command::new("fail2ban-regex")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("skipping: fail2ban-regex is not installed (Debian: fail2ban)");
        return;
    }
    let filter = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fail2ban/forkecho.conf");
    let dir = TempDir::new();
    let log = dir.path().join("forkecho.log");
    for format in ["text", "json", "logfmt"] {
        let mut server = Server::builder()
            .args(["--log-format", format])
            .args(["-l", "127.0.0.1:0", "-l", "[::1]:0"])
            .args(["--deny", "127.0.0.2", "--deny", "::1"])
            .args(["--max-per-source", "1"])
            .env("RUST_LOG", "info")
            .log_file(&log)
            .spawn();
        let needle = match format {
            "json" => "\"event\":\"listening\"",
            "logfmt" => "event=listening",
            _ => "listening on",
        };
        server.wait_for_log("two listeners", WAIT, |lines| {
            lines.iter().filter(|l| l.contains(needle)).count() >= 2
        });
        let addresses: Vec<std::net::SocketAddr> = server
            .log_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .map(|l| {
                let at = l.rfind("127.0.0.1:").or_else(|| l.rfind("[::1]:")).unwrap();
                let end = l[at..].find(['"', ' ']).map_or(l.len(), |e| at + e);
                l[at..end].parse().unwrap()
            })
            .collect();
        let (v4, v6) = (addresses[0], addresses[1]);
        let mut denied = connect_from(v4, "127.0.0.2");
        assert_closed_by_server(&mut denied, "denied v4");
        let mut denied6 = connect(v6);
        assert_closed_by_server(&mut denied6, "denied v6");
        // A session, and one over max_per_source from the same client: refused too.
        let mut held = connect(v4);
        expect_banner(&mut held);
        let mut second = connect(v4);
        assert_closed_by_server(&mut second, "per source");
        drop(held);
        server.signal(Signal::SIGTERM);
        assert!(server.wait_exit(WAIT).success());
    }
    let out = Command::new("fail2ban-regex")
        .args(["--out", "ip"])
        .arg(&log)
        .arg(&filter)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut found: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    found.sort();
    let mut expected: Vec<String> = ["127.0.0.2", "::1", "127.0.0.1"]
        .iter()
        .flat_map(|ip| std::iter::repeat_n(ip.to_string(), 3))
        .collect();
    expected.sort();
    assert_eq!(
        found,
        expected,
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // A refusal because forkecho closed its listener is not the client's doing.
    let closing = "2026-11-26T09:40:01.123Z INFO  forkecho[42] refused 192.0.2.9:5000: its \
                   listener is closing";
    let out = Command::new("fail2ban-regex")
        .args(["--out", "ip", closing])
        .arg(&filter)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{out:?}"
    );
}

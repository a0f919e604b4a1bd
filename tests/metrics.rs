//! The metrics endpoint as a monitoring system sees it: `metrics_listen` serves the Prometheus
//! text format, which `promtool` accepts and which counts what happened; a real Prometheus
//! server scrapes it and answers a query with forkecho's numbers; and scrapers that stall or
//! send too much cost the server nothing but a slot.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use nix::unistd::Pid;

use crate::util::*;

/// `metrics on http://ADDR/metrics` → ADDR.
fn metrics_address(server: &Server) -> SocketAddr {
    let line = server.wait_for_line("metrics on http://");
    let (_, rest) = line.split_once("metrics on http://").unwrap();
    rest.trim().trim_end_matches("/metrics").parse().unwrap()
}

/// One HTTP exchange: the request as given, the whole answer (the server closes).
fn http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

fn scrape(addr: SocketAddr) -> String {
    let answer = http(addr, "GET /metrics HTTP/1.1\r\nHost: forkecho\r\n\r\n");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// The value of the sample written exactly as `series` (name and labels).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// SIGKILLs a child process by its pid (through `Child::kill`) and reaps it when dropped.
struct KillAndReap(std::process::Child);

impl Drop for KillAndReap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn a_scrape_counts_what_happened_and_passes_promtool() {
    let server = Server::builder()
        .args(["--metrics-listen", "127.0.0.1:0", "--deny", "127.0.0.2"])
        .start();
    let metrics = metrics_address(&server);
    for _ in 0..3 {
        let mut s = server.connect_greeted();
        assert_eq!(echo_roundtrip(&mut s, b"counted\n"), b"counted\n");
    }
    let mut refused = connect_from(server.addr(), "127.0.0.2");
    assert_closed_by_server(&mut refused, "denied client");
    server.wait_for_lines("exited with code 0", 3);

    let body = scrape(metrics);
    assert_eq!(
        sample(&body, "forkecho_connections_accepted_total"),
        Some(4.0)
    );
    assert_eq!(sample(&body, "forkecho_sessions_started_total"), Some(3.0));
    assert_eq!(
        sample(
            &body,
            "forkecho_connections_refused_total{reason=\"denied\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "forkecho_sessions_ended_total{how=\"exited\",code=\"0\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&body, "forkecho_session_duration_seconds_count"),
        Some(3.0)
    );
    assert_eq!(sample(&body, "forkecho_sessions_active"), Some(0.0));
    assert_eq!(sample(&body, "forkecho_sessions_max"), Some(1024.0));
    let build = body
        .lines()
        .find(|l| l.starts_with("forkecho_build_info{"))
        .unwrap_or_else(|| panic!("no build info:\n{body}"));
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(build.contains(&version) && build.contains("commit=\"") && build.ends_with(" 1"));

    if !installed("promtool") {
        eprintln!("skipping the promtool check: promtool is not installed (Debian: prometheus)");
        return;
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(Pid::from_raw(check.id() as i32));
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real Prometheus server scrapes forkecho, and its query API gives back forkecho's count.
#[test]
fn prometheus_scrapes_forkecho_and_answers_a_query() {
    if !installed("prometheus") {
        eprintln!("skipping: prometheus is not installed (Debian: apt-get install prometheus)");
        return;
    }
    let server = Server::builder()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let metrics = metrics_address(&server);
    for _ in 0..2 {
        let mut s = server.connect_greeted();
        assert_eq!(echo_roundtrip(&mut s, b"seen\n"), b"seen\n");
    }
    server.wait_for_lines("exited with code 0", 2);

    let dir = TempDir::new();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: forkecho\n    \
             static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let _prometheus = KillAndReap(prometheus);

    let query = "/api/v1/query?query=forkecho_sessions_started_total";
    let mut last = String::new();
    let answered = wait_until(std::time::Duration::from_secs(60), || {
        let Ok(mut s) = TcpStream::connect(web) else {
            return false;
        };
        s.set_read_timeout(Some(WAIT)).unwrap();
        let request = format!("GET {query} HTTP/1.0\r\nHost: {web}\r\n\r\n");
        if s.write_all(request.as_bytes()).is_err() {
            return false;
        }
        last.clear();
        let _ = s.read_to_string(&mut last);
        // `"value":[<time>,"2"]`: the sample Prometheus scraped from forkecho.
        last.contains("\"job\":\"forkecho\"") && last.contains(",\"2\"]")
    });
    assert!(
        answered,
        "Prometheus never reported forkecho_sessions_started_total = 2; last answer:\n{last}"
    );
}

/// Scrapers that stall, crowd or flood the endpoint: each costs a slot for at most the
/// exchange's time, extras wait in the backlog until a slot frees, a request that never ends
/// is refused, and the echo serves throughout.
#[test]
fn hostile_scrapers_cost_a_slot_not_the_loop() {
    let server = Server::builder()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let metrics = metrics_address(&server);
    // Sixteen connections that say nothing take every slot; a seventeenth scrape waits.
    let silent: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(metrics).unwrap())
        .collect();
    let waiting = std::thread::spawn(move || http(metrics, "GET /metrics HTTP/1.1\r\n\r\n"));
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"still here\n"), b"still here\n");
    // A slot comes back when its client goes, and the waiting scrape is served.
    drop(silent);
    let answer = waiting.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A head that never ends is cut at 8 KiB.
    let mut flood = TcpStream::connect(metrics).unwrap();
    flood.set_read_timeout(Some(WAIT)).unwrap();
    let _ = flood.write_all(&vec![b'x'; 16 * 1024]);
    let mut answer = String::new();
    let _ = flood.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Anything but /metrics.
    assert!(http(metrics, "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(metrics, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert_eq!(echo_roundtrip(&mut s, b"and here\n"), b"and here\n");
}

/// A scraper that connects and never sends is closed at the exchange's deadline.
#[test]
fn a_silent_scraper_is_closed_at_its_deadline() {
    let server = Server::builder()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let metrics = metrics_address(&server);
    let mut silent = TcpStream::connect(metrics).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    // EOF (0) or a reset: either way the server let go, within WAIT.
    let closed = matches!(silent.read(&mut buf), Ok(0) | Err(_));
    assert!(closed);
    let mut s = server.connect_greeted();
    assert_eq!(echo_roundtrip(&mut s, b"fine\n"), b"fine\n");
}

#[test]
fn check_config_looks_at_the_metrics_address() {
    let out = run(&["--metrics-listen", "192.0.2.1:9233", "--check-config"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("key `metrics_listen`"), "{stderr}");
    let out = run(&["--metrics-listen", "localhost:9233"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

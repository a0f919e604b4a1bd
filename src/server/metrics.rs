//! The metrics endpoint (`metrics_listen`): the Prometheus text format at `/metrics`, served by
//! the loop like the control socket, through a bounded table of short exchanges (see
//! `exchange`). A scraper is a stranger: its request may be at most [`MAX_REQUEST`] bytes and
//! the whole exchange must end within [`EXCHANGE_TIME`], or the connection is closed; at most
//! [`MAX_CONNECTIONS`] are served at once, and more wait in the listener's backlog. The answer is made from counters the loop keeps
//! anyway, in one pass, without a lock or a thread.
//!
//! Names follow Prometheus's conventions: a `forkecho_` prefix, `_total` for counters, base
//! units (seconds), labels for the parts of a whole (refusal reasons, how sessions ended).

use std::fmt::Write as _;
use std::time::{Duration, Instant, UNIX_EPOCH};

use log::debug;
use mio::Interest;

use super::exchange::{self, Exchanges, Read};
use super::token::Source;
use super::Server;
use crate::children::DURATION_BOUNDS;
use crate::listen::Listener;

/// Most scrapes served at once; more wait in the listener's backlog.
const MAX_CONNECTIONS: usize = 16;
/// The longest request read (a scraper's request is a few hundred bytes).
const MAX_REQUEST: usize = 8192;
/// From accept to the answer's last byte.
const EXCHANGE_TIME: Duration = Duration::from_secs(5);

/// The endpoint's listener and the scrapes in progress.
pub(super) struct Metrics {
    listener: Listener,
    pub(super) scrapes: Exchanges,
    /// Scrapers wait in the backlog while every slot is taken: accepted when one frees.
    backlogged: bool,
}

impl Metrics {
    /// Serves `listener`, polled as `Source::MetricsListener`.
    pub(super) fn new(mut listener: Listener, registry: &mio::Registry) -> std::io::Result<Self> {
        registry.register(
            &mut listener.socket,
            Source::MetricsListener.token(),
            Interest::READABLE,
        )?;
        Ok(Metrics {
            listener,
            scrapes: Exchanges::new(
                MAX_CONNECTIONS,
                |i| Source::Metrics(i).token(),
                MAX_REQUEST,
                EXCHANGE_TIME,
            ),
            backlogged: false,
        })
    }

    /// The endpoint's socket itself (an upgrade passes it on).
    pub(super) fn listener(&self) -> &Listener {
        &self.listener
    }

    pub(super) fn address(&self) -> &crate::listen::ListenAddr {
        &self.listener.local
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.scrapes.next_deadline()
    }
}

/// The length of an HTTP request's head, once it is whole (its empty line included).
fn request_head(received: &[u8]) -> Option<usize> {
    let end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4);
    end.or_else(|| {
        received
            .windows(2)
            .position(|w| w == b"\n\n")
            .map(|at| at + 2)
    })
}

/// An HTTP/1.1 answer that closes the connection.
fn http_answer(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        answer.extend_from_slice(body.as_bytes());
    }
    answer
}

fn plain_answer(status: &str, text: &str) -> Vec<u8> {
    http_answer(status, "text/plain; charset=utf-8", text, false)
}

impl Server {
    /// The metrics endpoint has connections queued: accept them while there are free slots;
    /// the rest wait in the backlog (see [`Server::accept_waiting_scrapers`]).
    pub(super) fn accept_metrics(&mut self) {
        loop {
            let Some(metrics) = &mut self.metrics else {
                return;
            };
            metrics.backlogged = metrics.scrapes.is_full();
            if metrics.backlogged {
                return;
            }
            let (stream, peer) = match metrics.listener.accept_blocking() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("accept on the metrics endpoint: {e}");
                    return;
                }
            };
            match metrics.scrapes.admit(stream, peer, self.poll.registry()) {
                Ok(i) => self.serve_metrics(i),
                Err(stream) => {
                    let busy = plain_answer("503 Service Unavailable", "busy\n");
                    let _ = exchange::answer_and_close(stream, &busy);
                }
            }
        }
    }

    /// Accepts the scrapers that waited in the backlog, if a slot has freed: no new readiness
    /// edge comes for connections already queued.
    fn accept_waiting_scrapers(&mut self) {
        if self
            .metrics
            .as_ref()
            .is_some_and(|m| m.backlogged && !m.scrapes.is_full())
        {
            self.accept_metrics();
        }
    }

    /// Metrics connection `i` had an event: read its request, or send more of its answer.
    pub(super) fn serve_metrics(&mut self, i: usize) {
        let Some(metrics) = &mut self.metrics else {
            return;
        };
        let registry = self.poll.registry();
        metrics.scrapes.send_more(i, registry);
        let head = match metrics.scrapes.read(i, request_head) {
            Read::Waiting => return self.accept_waiting_scrapers(),
            Read::Gone => {
                drop(metrics.scrapes.take(i, registry));
                return self.accept_waiting_scrapers();
            }
            Read::TooLong => {
                let answer = plain_answer("431 Request Header Fields Too Large", "too long\n");
                metrics.scrapes.answer(i, answer, registry);
                return;
            }
            Read::Whole(head) => head,
        };
        let answer = self.answer_scrape(&head);
        if let Some(metrics) = &mut self.metrics {
            metrics.scrapes.answer(i, answer, self.poll.registry());
        }
        self.accept_waiting_scrapers();
    }

    /// The answer to one HTTP request: the metrics for `GET /metrics` (or `HEAD`), else an
    /// error status.
    fn answer_scrape(&self, head: &[u8]) -> Vec<u8> {
        let head = String::from_utf8_lossy(head);
        let mut words = head.lines().next().unwrap_or("").split_ascii_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        match (method, path) {
            ("GET" | "HEAD", "/metrics") => http_answer(
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &self.exposition(),
                method == "HEAD",
            ),
            (_, "/metrics") => plain_answer("405 Method Not Allowed", "GET /metrics\n"),
            ("GET" | "HEAD", _) => plain_answer("404 Not Found", "see /metrics\n"),
            _ => plain_answer("400 Bad Request", "GET /metrics\n"),
        }
    }

    /// Closes scrapes past their time.
    pub(super) fn end_late_metrics_connections(&mut self, now: Instant) {
        let Some(metrics) = &mut self.metrics else {
            return;
        };
        for peer in metrics.scrapes.end_late(now, self.poll.registry()) {
            debug!("metrics connection from {peer}: not done in time; closed");
        }
        self.accept_waiting_scrapers();
    }

    /// Every metric, in the Prometheus text format (version 0.0.4).
    fn exposition(&self) -> String {
        let mut out = Exposition::default();
        let totals = &self.children.totals;
        let refused = &self.admission.refused;
        let version = env!("CARGO_PKG_VERSION");
        out.family(
            "forkecho_build_info",
            "gauge",
            "Always 1; labels say which build runs.",
        );
        out.sample(
            "forkecho_build_info",
            &[
                ("version", version),
                ("commit", crate::COMMIT),
                ("linkage", crate::LINKAGE),
            ],
            1,
        );
        let started = self
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        out.family(
            "forkecho_start_time_seconds",
            "gauge",
            "When the server started, in seconds since the Unix epoch.",
        );
        out.sample_f64("forkecho_start_time_seconds", &[], started);
        out.counter(
            "forkecho_connections_accepted_total",
            "Connections taken from the listeners.",
            self.counts.accepted,
        );
        out.family(
            "forkecho_connections_refused_total",
            "counter",
            "Connections refused before a session, by reason.",
        );
        for (reason, n) in refused.by_reason() {
            out.sample(
                "forkecho_connections_refused_total",
                &[("reason", reason)],
                n,
            );
        }
        out.counter(
            "forkecho_sessions_started_total",
            "Sessions started: children forked.",
            totals.forked,
        );
        out.gauge(
            "forkecho_sessions_active",
            "Sessions running now.",
            self.children.len() as u64,
        );
        out.gauge(
            "forkecho_sessions_max",
            "Most sessions at once (max_children).",
            self.limits.max_children as u64,
        );
        out.family(
            "forkecho_sessions_ended_total",
            "counter",
            "Sessions ended, by how: exited (with its code) or killed (by its signal).",
        );
        for (code, n) in totals.exited() {
            let code = code.to_string();
            out.sample(
                "forkecho_sessions_ended_total",
                &[("how", "exited"), ("code", &code)],
                n,
            );
        }
        for (signal, n) in totals.killed() {
            let signal = signal.to_string();
            out.sample(
                "forkecho_sessions_ended_total",
                &[("how", "killed"), ("code", &signal)],
                n,
            );
        }
        out.histogram(
            "forkecho_session_duration_seconds",
            "How long ended sessions lasted.",
            &totals.durations,
        );
        out.counter(
            "forkecho_fork_failures_total",
            "Sessions that could not start: fork failed (the client was refused).",
            self.fork_failures,
        );
        out.counter(
            "forkecho_accept_failures_total",
            "Accepts that failed for want of descriptors or memory (accepting paused).",
            self.counts.accept_failures,
        );
        out.family(
            "forkecho_reloads_total",
            "counter",
            "Configuration reloads, by result.",
        );
        out.sample(
            "forkecho_reloads_total",
            &[("result", "applied")],
            self.counts.reloads_applied,
        );
        out.sample(
            "forkecho_reloads_total",
            &[("result", "refused")],
            self.counts.reloads_refused,
        );
        out.gauge(
            "forkecho_connections_waiting",
            "Connections waiting for a session of their source to end (max_per_source).",
            self.pending.len() as u64,
        );
        out.gauge(
            "forkecho_connections_awaiting_proxy_header",
            "Connections on PROXY listeners waiting for their header.",
            self.headers.len() as u64,
        );
        out.counter(
            "forkecho_log_lines_dropped_total",
            "Log lines dropped because the log could not take them at once.",
            crate::logging::dropped_lines(),
        );
        out.text
    }
}

/// The text format, written family by family.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.name_and_labels(name, labels);
        let _ = writeln!(self.text, " {value}");
    }

    fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.name_and_labels(name, labels);
        let _ = writeln!(self.text, " {value}");
    }

    fn name_and_labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.text.push_str(name);
        if labels.is_empty() {
            return;
        }
        self.text.push('{');
        for (i, (label, value)) in labels.iter().enumerate() {
            if i > 0 {
                self.text.push(',');
            }
            // Values here are names and numbers: nothing to escape but what the format says.
            let value = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(self.text, "{label}=\"{value}\"");
        }
        self.text.push('}');
    }

    fn histogram(&mut self, name: &str, help: &str, durations: &crate::children::Durations) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (bound, n) in DURATION_BOUNDS.iter().zip(durations.buckets) {
            cumulative += n;
            let le = bound.to_string();
            self.sample(&bucket, &[("le", &le)], cumulative);
        }
        let count = cumulative + durations.buckets[DURATION_BOUNDS.len()];
        self.sample(&bucket, &[("le", "+Inf")], count);
        self.sample_f64(&format!("{name}_sum"), &[], durations.sum_seconds);
        self.sample(&format!("{name}_count"), &[], count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_ends_at_its_empty_line() {
        assert_eq!(request_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(request_head(b"GET / HTTP/1.1\r\n\r\nextra"), Some(18));
        assert_eq!(request_head(b"GET / HTTP/1.0\n\n"), Some(16));
    }

    #[test]
    fn a_histogram_is_cumulative_and_counts_every_session() {
        let mut durations = crate::children::Durations::default();
        durations.buckets[0] = 2;
        durations.buckets[3] = 1;
        durations.buckets[DURATION_BOUNDS.len()] = 4;
        durations.sum_seconds = 10000.5;
        let mut out = Exposition::default();
        out.histogram("d", "h", &durations);
        assert!(
            out.text.contains("d_bucket{le=\"0.005\"} 2\n"),
            "{}",
            out.text
        );
        assert!(
            out.text.contains("d_bucket{le=\"0.05\"} 3\n"),
            "{}",
            out.text
        );
        assert!(
            out.text.contains("d_bucket{le=\"3600\"} 3\n"),
            "{}",
            out.text
        );
        assert!(
            out.text.contains("d_bucket{le=\"+Inf\"} 7\n"),
            "{}",
            out.text
        );
        assert!(out.text.contains("d_count 7\n"), "{}", out.text);
        assert!(out.text.contains("d_sum 10000.5\n"), "{}", out.text);
    }
}

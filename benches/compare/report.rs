//! The table: one row per figure and contender, with its ratio to the first contender
//! (forkecho), rendered as Markdown; then the speed targets of exec mode (phase 5) and of the
//! PROXY protocol (phase 6).

use std::thread;
use std::time::Duration;

use crate::contenders::{
    Contender, FORKECHO_EXEC, FORKECHO_PLAIN, FORKECHO_PROXY, SOCAT_EXEC, TCPSERVER_EXEC,
};
use crate::floors;
use crate::phases::{Exchanges, Held, RateTrial, Storm, CHILDREN_WAIT, PROXY_TARGET};

/// A table row: metric, contender, value, and the value's ratio to forkecho's.
pub struct Row {
    pub metric: String,
    pub contender: &'static str,
    pub value: f64,
    pub unit: &'static str,
    /// NaN (shown as "-"): not applicable or nothing to compare with.
    pub ratio: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `value / base`, or NaN (shown as "-") where there is nothing to divide by.
fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 && value.is_finite() {
        value / base
    } else {
        f64::NAN
    }
}

/// Phase 1 for one contender, all rounds together.
struct RateSummary {
    name: &'static str,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    failures: usize,
    /// The server process's page faults per connection.
    parent_faults: Option<f64>,
}

impl RateSummary {
    fn of(c: &Contender, trials: &[RateTrial]) -> Self {
        let mut lat: Vec<Duration> = trials.iter().flat_map(|t| t.latencies.clone()).collect();
        lat.sort_unstable();
        let secs: f64 = trials.iter().map(|t| t.elapsed.as_secs_f64()).sum();
        RateSummary {
            name: c.name,
            per_sec: lat.len() as f64 / secs,
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            failures: trials.iter().map(|t| t.failures).sum(),
            parent_faults: trials
                .iter()
                .map(|t| t.parent_faults)
                .sum::<Option<u64>>()
                .map(|faults| faults as f64 / lat.len().max(1) as f64),
        }
    }
}

/// Rows of a connection-rate phase; `load` names the trial in each metric ("4 client(s)").
pub fn rate_rows(contenders: &[Contender], load: &str, results: &[Vec<RateTrial>]) -> Vec<Row> {
    let per: Vec<RateSummary> = contenders
        .iter()
        .zip(results)
        .map(|(c, trials)| RateSummary::of(c, trials))
        .collect();
    let base = &per[0];
    let latency_ratio =
        |d: Duration, base: Duration| d.as_secs_f64() / base.as_secs_f64().max(1e-9);
    let mut rows = Vec::new();
    for s in &per {
        rows.push(Row {
            metric: format!("conn/s, {load}"),
            contender: s.name,
            value: s.per_sec,
            unit: "/s",
            ratio: s.per_sec / base.per_sec,
        });
        rows.push(Row {
            metric: format!("p50 latency, {load}"),
            contender: s.name,
            value: s.p50.as_secs_f64() * 1e6,
            unit: "µs",
            ratio: latency_ratio(s.p50, base.p50),
        });
        rows.push(Row {
            metric: format!("p99 latency, {load}"),
            contender: s.name,
            value: s.p99.as_secs_f64() * 1e6,
            unit: "µs",
            ratio: latency_ratio(s.p99, base.p99),
        });
        if let Some(faults) = s.parent_faults {
            rows.push(Row {
                metric: format!("server process page faults per connection, {load}"),
                contender: s.name,
                value: faults,
                unit: "faults",
                ratio: base
                    .parent_faults
                    .filter(|&b| b > 0.001)
                    .map_or(f64::NAN, |b| faults / b),
            });
        }
        if s.failures > 0 {
            rows.push(Row {
                metric: format!("failed sessions, {load}"),
                contender: s.name,
                value: s.failures as f64,
                unit: "",
                ratio: f64::NAN,
            });
        }
    }
    rows
}

/// Rows of the upgrade phase: the worst latency during the upgrades against its target, the
/// median, how long an upgrade took, and failures if any.
pub fn upgrade_rows(c: &Contender, gaps: &[crate::phases::Gap]) -> Vec<Row> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let worst = gaps.iter().map(|g| g.worst).max().unwrap_or_default();
    let target = crate::phases::UPGRADE_TARGET;
    let mut rows = vec![
        Row {
            metric: format!(
                "worst connect→banner latency during {} upgrades (target ≤ {} ms: {})",
                crate::phases::UPGRADES,
                target.as_millis(),
                if worst <= target { "met" } else { "NOT met" }
            ),
            contender: c.name,
            value: ms(worst),
            unit: "ms",
            ratio: f64::NAN,
        },
        Row {
            metric: "median connect→banner latency, upgrade trial".into(),
            contender: c.name,
            value: gaps.iter().map(|g| ms(g.median)).sum::<f64>() / gaps.len().max(1) as f64,
            unit: "ms",
            ratio: f64::NAN,
        },
        Row {
            metric: "median `forkecho upgrade` (check + handover)".into(),
            contender: c.name,
            value: gaps.iter().map(|g| ms(g.upgrade)).sum::<f64>() / gaps.len().max(1) as f64,
            unit: "ms",
            ratio: f64::NAN,
        },
    ];
    let failures: u64 = gaps.iter().map(|g| g.failures).sum();
    let upgrades_failed: usize = gaps.iter().map(|g| g.upgrades_failed).sum();
    if failures > 0 || upgrades_failed > 0 {
        rows.push(Row {
            metric: format!("failed connections ({upgrades_failed} upgrades failed)"),
            contender: c.name,
            value: failures as f64,
            unit: "",
            ratio: f64::NAN,
        });
    }
    rows
}

pub fn stream_rows(
    contenders: &[Contender],
    bytes: usize,
    results: &[Vec<Option<Duration>>],
) -> Vec<Row> {
    streamed_rows(contenders, "one-stream echo", bytes, results)
}

/// Rows of a stream of `bytes` called `what`: MiB/s, the median of the rounds that did not
/// stall (`None`; "-" if all did).
pub fn streamed_rows(
    contenders: &[Contender],
    what: &str,
    bytes: usize,
    results: &[Vec<Option<Duration>>],
) -> Vec<Row> {
    // The median round: one slow round (a page-cache flush, a neighbour) does not decide.
    let mib_per_sec = |trials: &[Option<Duration>]| {
        let mut rates: Vec<f64> = trials
            .iter()
            .flatten()
            .map(|t| bytes as f64 / f64::from(1 << 20) / t.as_secs_f64())
            .collect();
        rates.sort_by(f64::total_cmp);
        rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let base = mib_per_sec(&results[0]);
    contenders
        .iter()
        .zip(results)
        .map(|(c, trials)| {
            let value = mib_per_sec(trials);
            Row {
                metric: format!(
                    "{what}, {} MiB, median of {} rounds",
                    bytes >> 20,
                    trials.iter().flatten().count()
                ),
                contender: c.name,
                value,
                unit: "MiB/s",
                ratio: value / base,
            }
        })
        .collect()
}

pub fn hold_rows(contenders: &[Contender], n: usize, results: &[Vec<Option<Held>>]) -> Vec<Row> {
    // KiB as a figure; NaN (shown as "-") when unknown or when there are no children.
    let kib = |k: Option<u64>| k.map_or(f64::NAN, |k| k as f64);
    let Some(base) = &results[0][0] else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for (c, trials) in contenders.iter().zip(results) {
        let Some(held) = &trials[0] else {
            continue;
        };
        rows.push(Row {
            metric: format!("failed sessions, {n} held"),
            contender: c.name,
            value: held.failures as f64,
            unit: "sessions",
            ratio: f64::NAN,
        });
        let rss = kib(held.parent_rss_kib) / 1024.0;
        rows.push(Row {
            metric: format!("parent RSS at {n} sessions"),
            contender: c.name,
            value: rss,
            unit: "MiB",
            ratio: ratio(rss, kib(base.parent_rss_kib) / 1024.0),
        });
        let uss = kib(held.median_child_uss_kib);
        rows.push(Row {
            metric: format!("median child USS at {n} sessions"),
            contender: c.name,
            value: uss,
            unit: "KiB",
            ratio: ratio(uss, kib(base.median_child_uss_kib)),
        });
        let per_session = held.available_kib_per_session.unwrap_or(f64::NAN);
        rows.push(Row {
            metric: format!("memory per session (available memory's drop), {n} sessions"),
            contender: c.name,
            value: per_session,
            unit: "KiB",
            ratio: ratio(
                per_session,
                base.available_kib_per_session.unwrap_or(f64::NAN),
            ),
        });
        if let Some(latency) = held.status_latency {
            rows.push(Row {
                metric: format!("SIGUSR1 status line while {n} held"),
                contender: c.name,
                value: latency.as_secs_f64() * 1e3,
                unit: "ms",
                ratio: f64::NAN,
            });
        }
    }
    rows
}

pub fn storm_rows(contenders: &[Contender], n: usize, results: &[Vec<Option<Storm>>]) -> Vec<Row> {
    // The contenders that had a storm (those with children), each with its one round.
    let storms: Vec<(&Contender, &Storm)> = contenders
        .iter()
        .zip(results)
        .filter_map(|(c, trials)| Some((c, trials[0].as_ref()?)))
        .collect();
    let Some(&(_, base)) = storms.first() else {
        return Vec::new();
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // A storm not over within CHILDREN_WAIT is shown as that long, marked.
    let reap_ms = |s: &Storm| ms(s.reap_time.unwrap_or(CHILDREN_WAIT));
    let mut rows = Vec::new();
    for (c, storm) in storms {
        rows.push(Row {
            metric: format!("reap storm, {n} children SIGKILLed"),
            contender: c.name,
            value: reap_ms(storm),
            unit: if storm.reap_time.is_some() {
                "ms"
            } else {
                "ms (timed out)"
            },
            ratio: ratio(reap_ms(storm), reap_ms(base)),
        });
        rows.push(Row {
            metric: format!("served during the reap storm, {n} children"),
            contender: c.name,
            value: storm.served as f64,
            unit: "sessions",
            ratio: ratio(storm.served as f64, base.served as f64),
        });
        rows.push(Row {
            metric: format!("max latency during the reap storm, {n} children"),
            contender: c.name,
            value: ms(storm.max_latency),
            unit: "ms",
            ratio: ratio(ms(storm.max_latency), ms(base.max_latency)),
        });
        if storm.failed > 0 {
            rows.push(Row {
                metric: format!("failed during the reap storm, {n} children"),
                contender: c.name,
                value: storm.failed as f64,
                unit: "",
                ratio: f64::NAN,
            });
        }
    }
    rows
}

/// One speed target: a contender's connection rate against another contender's.
pub struct Target {
    /// The contender the subject is compared with.
    other: &'static str,
    /// The least the subject's rate / the other's should be; None for a figure given for
    /// reference.
    at_least: Option<f64>,
    /// The subject's rate / the other's, NaN when either was not measured.
    ratio: f64,
}

/// The targets of one phase: `subject`'s rate against each other contender listed.
pub struct Targets {
    /// What the phase measures, as its heading says (`Exec mode (phase 5)`).
    phase: &'static str,
    subject: &'static str,
    list: Vec<Target>,
}

/// The connection rate `name` reached in a rate phase, NaN when it did not run.
fn rate_of(name: &str, contenders: &[Contender], results: &[Vec<RateTrial>]) -> f64 {
    contenders
        .iter()
        .zip(results)
        .find(|(c, _)| c.name == name)
        .map_or(f64::NAN, |(c, trials)| RateSummary::of(c, trials).per_sec)
}

/// `subject`'s targets in a rate phase: its ratio to each other contender, at least as given.
fn targets(
    phase: &'static str,
    subject: &'static str,
    others: &[(&'static str, Option<f64>)],
    contenders: &[Contender],
    results: &[Vec<RateTrial>],
) -> Targets {
    let rate = rate_of(subject, contenders, results);
    let list = others
        .iter()
        .map(|&(other, at_least)| Target {
            other,
            at_least,
            ratio: ratio(rate, rate_of(other, contenders, results)),
        })
        .collect();
    Targets {
        phase,
        subject,
        list,
    }
}

/// Exec mode's targets in phase 5: forkecho's connection rate running `cat` at least 0.95× the
/// minimal vfork+exec loop's and 1.8× socat's; its ratios to the fork+exec loop and tcpserver
/// for reference.
pub fn exec_targets(contenders: &[Contender], results: &[Vec<RateTrial>]) -> Targets {
    let others = [
        (floors::VFORK_EXEC_FLOOR, Some(0.95)),
        (SOCAT_EXEC, Some(1.8)),
        (TCPSERVER_EXEC, None),
        (floors::FORK_EXEC_FLOOR, None),
    ];
    targets(
        "Exec mode (phase 5)",
        FORKECHO_EXEC,
        &others,
        contenders,
        results,
    )
}

/// The PROXY protocol's target in phase 6: forkecho's connection rate on a PROXY v2 listener
/// (its clients sending a header) at least 0.9× its rate on a plain listener.
pub fn proxy_targets(contenders: &[Contender], results: &[Vec<RateTrial>]) -> Targets {
    targets(
        "PROXY protocol (phase 6)",
        FORKECHO_PROXY,
        &[(FORKECHO_PLAIN, Some(PROXY_TARGET))],
        contenders,
        results,
    )
}

/// One phase's targets as a Markdown list.
fn render_targets(targets: &Targets) -> String {
    let mut out = format!("\n{}, `{}` against:\n\n", targets.phase, targets.subject);
    for t in &targets.list {
        let line = match t.at_least {
            _ if t.ratio.is_nan() => "not measured".to_string(),
            Some(min) if t.ratio >= min => format!("{:.2}× (target ≥ {min:.2}×: met)", t.ratio),
            Some(min) => format!("{:.2}× (target ≥ {min:.2}×: NOT met)", t.ratio),
            None => format!("{:.2}× (for reference)", t.ratio),
        };
        out.push_str(&format!("- {}: {line}\n", t.other));
    }
    out
}

/// The table, as Markdown, with the machine it was measured on, then the targets of the
/// phases that ran (5 and 6).
pub fn render(rows: &[Row], targets: &[Targets], quick: bool) -> String {
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = format!(
        "# forkecho benchmarks\n\nMeasured by `cargo bench`{} on {cores} cores, Linux {}; \
         contenders interleaved in the same run. Ratio = value / forkecho's value \
         (in exec mode, phase 5: `forkecho -- cat`'s; in phase 6: `forkecho, plain listener`'s; for latencies, memory and reap time, lower is better; - = not applicable).\n\n| metric | contender | value | ratio to forkecho |\n|---|---|---:|---:|\n",
        if quick { " -- --quick (smoke run, not for comparison)" } else { "" },
        kernel.trim()
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.metric,
            r.contender,
            value_text(r),
            ratio_text(r.ratio)
        ));
    }
    for t in targets {
        out.push_str(&render_targets(t));
    }
    out
}

/// The value with its unit; "-" for NaN (not applicable, such as no children).
fn value_text(r: &Row) -> String {
    if r.value.is_nan() {
        "-".to_string()
    } else if r.unit.is_empty() || r.unit == "sessions" {
        // A count.
        format!("{:.0} {}", r.value, r.unit).trim_end().to_string()
    } else {
        format!("{:.1} {}", r.value, r.unit)
    }
}

fn ratio_text(ratio: f64) -> String {
    if ratio.is_nan() {
        "-".to_string()
    } else {
        format!("{ratio:.2}×")
    }
}

/// Rows of a request/response trial: exchanges per second over all sessions, and failed
/// sessions if any.
pub fn exchange_rows(contenders: &[Contender], load: &str, results: &[Vec<Exchanges>]) -> Vec<Row> {
    let per_sec = |trials: &[Exchanges]| {
        let secs: f64 = trials.iter().map(|t| t.elapsed.as_secs_f64()).sum();
        trials.iter().map(|t| t.completed).sum::<u64>() as f64 / secs
    };
    let base = per_sec(&results[0]);
    let mut rows = Vec::new();
    for (c, trials) in contenders.iter().zip(results) {
        let value = per_sec(trials);
        rows.push(Row {
            metric: format!("requests/s, {load}"),
            contender: c.name,
            value,
            unit: "/s",
            ratio: value / base,
        });
        let failed: usize = trials.iter().map(|t| t.failed).sum();
        if failed > 0 {
            rows.push(Row {
                metric: format!("failed sessions, {load}"),
                contender: c.name,
                value: failed as f64,
                unit: "sessions",
                ratio: f64::NAN,
            });
        }
    }
    rows
}

/// The plots' section of BENCHMARKS.md: each plot, and how to read them.
pub fn render_plots(plots: &[crate::plots::Plot]) -> String {
    if plots.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n## Plots\n\n");
    for plot in plots {
        out.push_str(&format!(
            "{}:\n\n![{}]({})\n\n",
            plot.title, plot.title, plot.file
        ));
    }
    out.push_str(
        "How to read them: the first plot shows each server's connection rate as more clients \
         connect at once (higher is better). The two floors bound what is possible: the mio \
         echo serves without forking at all, and the minimal C fork loop forks with nothing \
         else to do. A forking server's line stays between the seed's and the C loop's. Past 4 \
         clients, 2 cores are busy, so the lines flatten. The second plot shows how much memory \
         the machine gave up for each session held while 30,000 were open (lower is better). \
         That is the drop of the memory available, divided by the sessions: MemAvailable \
         plus the free pages waiting on the per-CPU lists (/proc/zoneinfo), which \
         MemAvailable leaves out and which, after the previous server's children exit, \
         return over tens of seconds; MemAvailable alone put one server's sessions at 65 to \
         93 KiB in runs where this figure said 135. It counts both ends of each \
         connection, and the kernel's share: socket buffers, page tables and process \
         structures. A server with a process per session pays for a process each; a server \
         in one process cannot hold that many descriptors here and has no bar.\n",
    );
    out
}

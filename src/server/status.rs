//! What the server says about itself: one log line on SIGUSR1, and the `status` control
//! command's answer, both from the same facts gathered at one moment.

use std::fmt::Write as _;

use log::info;

use super::shutdown::Phase;
use super::Server;
use crate::children::seconds;

/// The busiest sources a status names.
const BUSIEST: usize = 3;

impl Server {
    /// SIGUSR1: the status as one log line.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn log_status(&self) {
        let f = self.facts();
        info!(
            event = "status";
            "status: {} active (max {}), {} accepted, {} ended [{}], {} refused [{}], \
             {} fork failures, {} waiting, {} awaiting a PROXY header, busiest sources [{}], \
             {} log lines dropped, \
             {} sd_notify messages dropped, uptime {}",
            f.active,
            f.max_children,
            f.accepted,
            f.ended,
            f.endings.join(", "),
            f.refused_total,
            f.refused,
            f.fork_failures,
            f.waiting,
            f.awaiting_header,
            f.busiest.join(", "),
            f.log_lines_dropped,
            f.notifications_dropped,
            f.uptime
        );
    }

    /// The `status` command's answer: one `name: value` line per fact, for people and for
    /// `grep`.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn status_report(&self) -> String {
        let f = self.facts();
        let config = self
            .config_file
            .as_deref()
            .map_or("none (flags and defaults)".to_string(), |p| {
                p.display().to_string()
            });
        let listening: Vec<String> = self
            .listeners
            .iter()
            .map(|slot| slot.listener.local.to_string())
            .collect();
        let mut report = String::new();
        let mut line = |name: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(report, "{name}: {value}");
        };
        line("state", &f.state);
        line("pid", &std::process::id());
        line("version", &crate::VERSION);
        line("config", &config);
        line("uptime", &f.uptime);
        line("listening", &listening.join(" "));
        line("active", &f.active);
        line("max_children", &f.max_children);
        line("accepted", &f.accepted);
        line(
            "ended",
            &format_args!("{} [{}]", f.ended, f.endings.join(", ")),
        );
        line(
            "refused",
            &format_args!("{} [{}]", f.refused_total, f.refused),
        );
        line("fork_failures", &f.fork_failures);
        line("waiting", &f.waiting);
        line("awaiting_proxy_header", &f.awaiting_header);
        line("busiest_sources", &f.busiest.join(", "));
        line("log_lines_dropped", &f.log_lines_dropped);
        report
    }

    fn facts(&self) -> Facts {
        let totals = &self.children.totals;
        let mut endings: Vec<String> = totals
            .exited()
            .map(|(code, n)| format!("code {code}: {n}"))
            .collect();
        endings.extend(totals.killed().map(|(sig, n)| format!("{sig}: {n}")));
        let busiest = self
            .children
            .busiest_sources(BUSIEST)
            .iter()
            .map(|(source, n)| format!("{source}: {n}"))
            .collect();
        let refused = &self.admission.refused;
        Facts {
            state: match self.phase {
                Phase::Serving if self.at_capacity => "serving (at max_children)",
                Phase::Serving => "serving",
                _ => "shutting down",
            },
            active: self.children.len(),
            max_children: self.limits.max_children,
            accepted: totals.forked + self.fork_failures,
            ended: totals.ended(),
            endings,
            refused_total: refused.total(),
            refused: refused.to_string(),
            fork_failures: self.fork_failures,
            waiting: self.pending.len(),
            awaiting_header: self.headers.len(),
            busiest,
            log_lines_dropped: crate::logging::dropped_lines(),
            notifications_dropped: crate::systemd::dropped(),
            uptime: seconds(self.started.elapsed()).to_string(),
        }
    }
}

/// Counts since start that only the metrics show.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    /// Connections taken from a listener.
    pub(super) accepted: u64,
    /// `accept` calls that failed for want of descriptors or memory.
    pub(super) accept_failures: u64,
    pub(super) reloads_applied: u64,
    pub(super) reloads_refused: u64,
}

/// The status at one moment.
struct Facts {
    state: &'static str,
    active: usize,
    max_children: usize,
    accepted: u64,
    ended: u64,
    endings: Vec<String>,
    refused_total: u64,
    refused: String,
    fork_failures: u64,
    waiting: usize,
    awaiting_header: usize,
    busiest: Vec<String>,
    log_lines_dropped: u64,
    notifications_dropped: u64,
    uptime: String,
}

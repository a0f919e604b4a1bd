//! What a reload changes, for its one log line: `key old -> new`, long values summarised.

use std::fmt;
use std::time::Duration;

use super::Config;
use crate::children::seconds;

/// What a reload changes, as `key old -> new` items for one log line (listen addresses are
/// reported by `install_listeners`).
pub fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    let mut compare = |key: &str, a: &dyn fmt::Display, b: &dyn fmt::Display| {
        let (a, b) = (a.to_string(), b.to_string());
        if a != b {
            changes.push(format!("{key} {a} -> {b}"));
        }
    };
    let secs = |d: Option<Duration>| d.map_or("never".to_string(), |d| seconds(d).to_string());
    let (o, n) = (&old.limits, &new.limits);
    // Both are socket options set at bind: kept listeners keep theirs, new addresses get these.
    compare("backlog (new addresses only)", &old.backlog, &new.backlog);
    compare(
        "idle_timeout",
        &secs(old.idle_timeout),
        &secs(new.idle_timeout),
    );
    compare(
        "max_session_time",
        &secs(old.max_session_time),
        &secs(new.max_session_time),
    );
    compare(
        "shutdown_timeout",
        &seconds(old.shutdown_timeout),
        &seconds(new.shutdown_timeout),
    );
    compare(
        "kill_timeout",
        &seconds(old.kill_timeout),
        &seconds(new.kill_timeout),
    );
    compare("log_level", &old.log_level, &new.log_level);
    compare("max_children", &o.max_children, &n.max_children);
    compare("max_per_source", &o.max_per_source, &n.max_per_source);
    compare("source_prefix_v4", &o.source_prefix_v4, &n.source_prefix_v4);
    compare("source_prefix_v6", &o.source_prefix_v6, &n.source_prefix_v6);
    compare("rate", &format!("{:?}", o.rate), &format!("{:?}", n.rate));
    compare(
        "reuse_port (new addresses only)",
        &old.reuse_port,
        &new.reuse_port,
    );
    // Values that may be long: compared whole, shown summarised.
    let mut compare_long = |key: &str, changed: bool, a: String, b: String| {
        if changed {
            changes.push(format!("{key} {a} -> {b}"));
        }
    };
    let text = |bytes: &[u8]| summarise_text(bytes);
    let (banner, message) = (&new.banner, &n.refusal_message);
    compare_long(
        "banner",
        old.banner != *banner,
        text(&old.banner),
        text(banner),
    );
    compare_long(
        "refusal_message",
        o.refusal_message != *message,
        text(&o.refusal_message),
        text(message),
    );
    let list = |l: &[ipnet::IpNet]| summarise_list(l);
    compare_long("allow", o.allow != n.allow, list(&o.allow), list(&n.allow));
    compare_long("deny", o.deny != n.deny, list(&o.deny), list(&n.deny));
    changes
}

/// Longest value a reload line shows whole; a longer one is summarised, so that a 1 MiB
/// banner or a 200,000-entry deny list cannot make a multi-megabyte log line.
const MAX_SHOWN_VALUE: usize = 120;

/// A text value for the reload line: quoted and escaped, or, when long, its start and its
/// size.
fn summarise_text(bytes: &[u8]) -> String {
    let quoted = format!("{:?}", String::from_utf8_lossy(bytes));
    if quoted.len() <= MAX_SHOWN_VALUE {
        return quoted;
    }
    let head: String = String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
        .chars()
        .take(24)
        .collect();
    format!("{head:?}... ({} bytes)", bytes.len())
}

/// A list of prefixes for the reload line: whole when short, else its first entries and its
/// length.
fn summarise_list(list: &[ipnet::IpNet]) -> String {
    let whole = format!("{list:?}");
    if whole.len() <= MAX_SHOWN_VALUE {
        return whole;
    }
    let first: Vec<String> = list.iter().take(3).map(|p| p.to_string()).collect();
    format!("[{}, ... ({} prefixes)]", first.join(", "), list.len())
}

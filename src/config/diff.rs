//! What a reload changes, from each key's `on_reload` in `keys::TABLE`: `key old -> new` items
//! for the reload line, long values summarised, and warnings for changes that wait for the
//! next start.

use std::fmt;

use super::keys::{OnReload, Shown, TABLE};
use super::Config;

/// What a reload changes.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// `key old -> new` for each key that applies now.
    pub applied: Vec<String>,
    /// One warning per kind of change that takes effect only at the next start.
    pub at_next_start: Vec<&'static str>,
}

/// What changes from `old` to `new` (listen addresses are reported by the code that installs
/// the listeners).
pub fn describe_changes(old: &Config, new: &Config) -> Changes {
    let mut changes = Changes::default();
    for key in &TABLE {
        match key.on_reload {
            OnReload::Applies(show) => {
                if let Some(change) = change(key.name, show(old), show(new)) {
                    changes.applied.push(change);
                }
            }
            OnReload::NewAddressesOnly(show) => {
                let label = format!("{} (new addresses only)", key.name);
                if let Some(change) = change(&label, show(old), show(new)) {
                    changes.applied.push(change);
                }
            }
            OnReload::NextStart(show, warning) => {
                if show(old) != show(new) && !changes.at_next_start.contains(&warning) {
                    changes.at_next_start.push(warning);
                }
            }
            OnReload::Reported => {}
        }
    }
    changes
}

/// `label old -> new`, if the values differ.
fn change(label: &str, old: Shown, new: Shown) -> Option<String> {
    (old != new).then(|| format!("{label} {old} -> {new}"))
}

/// Longest value a reload line shows whole; a longer one is summarised, so that a 1 MiB
/// banner or a 200,000-entry deny list cannot make a multi-megabyte log line.
const MAX_SHOWN_VALUE: usize = 120;

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shown::Plain(text) => f.write_str(&summarise_plain(text)),
            Shown::Bytes(bytes) => f.write_str(&summarise_text(bytes)),
            Shown::Prefixes(list) => f.write_str(&summarise_list(list)),
            Shown::Rules(prefixes, []) => f.write_str(&summarise_list(prefixes)),
            Shown::Rules(prefixes, uids) => {
                let uids: Vec<String> = uids.iter().map(|uid| format!("uid:{uid}")).collect();
                let uids = uids.join(", ");
                let uids = summarise_plain(&uids);
                write!(f, "{} + [{uids}]", summarise_list(prefixes))
            }
        }
    }
}

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

/// Any other value for the reload line: whole when short, else its start and its size, so
/// that one long value (an `env` entry, a long `exec`) cannot push the other changes off the
/// line (the logger caps it).
fn summarise_plain(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_SHOWN_VALUE {
        return text.into();
    }
    let head: String = text.chars().take(60).collect();
    format!("{head}... ({} bytes)", text.len()).into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_line_names_each_changed_key_and_summarises_long_values() {
        let old = Config::built_in();
        let mut new = old.clone();
        new.backlog = 5;
        new.banner = vec![b'x'; 1 << 20];
        new.idle_timeout = None;
        new.limits.max_children = 7;
        new.daemonize = true;
        let changes = describe_changes(&old, &new);
        assert_eq!(
            changes.applied,
            [
                "banner \"connect successful!\\n\" -> \"xxxxxxxxxxxxxxxxxxxxxxxx\"... \
                 (1048576 bytes)",
                "backlog (new addresses only) 1024 -> 5",
                "idle_timeout 300s -> never",
                "max_children 1024 -> 7",
            ]
        );
        assert_eq!(
            changes.at_next_start,
            ["daemonize changes take effect at the next start"]
        );
        assert_eq!(describe_changes(&old, &old), Changes::default());
    }
}

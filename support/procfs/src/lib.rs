//! What forkecho's integration tests and its benchmark read from `/proc` about a server and
//! its children: one implementation for both (a small crate, because a bench and the tests
//! are separate targets that cannot share a module otherwise).

use nix::unistd::Pid;

/// One process as seen in /proc/<pid>/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: Pid,
    /// `R`, `S`, `T`, `Z` (zombie), ...
    pub state: char,
    /// Clock ticks since boot when it started: with the pid, what tells it from a later
    /// process that reused the pid.
    pub start: u64,
}

impl ProcInfo {
    /// True while this very process (not a later one with its pid) is `parent`'s child; a
    /// zombie still is, a reaped child no longer.
    pub fn is_child_of(&self, parent: Pid) -> bool {
        let parent = parent.to_string();
        stat_field(self.pid, 4).as_deref() == Some(parent.as_str())
            && start_of(self.pid) == Some(self.start)
    }
}

/// Every process whose parent is `parent`, zombies included, in pid order (scanned from
/// /proc: the kernel's `task/PID/children` list is not built on every kernel).
pub fn children_of(parent: Pid) -> Vec<ProcInfo> {
    let parent = parent.to_string();
    let mut children: Vec<ProcInfo> = all_pids()
        .filter(|&pid| stat_field(pid, 4).as_deref() == Some(parent.as_str()))
        .filter_map(|pid| {
            Some(ProcInfo {
                pid,
                state: process_state(pid)?,
                start: start_of(pid)?,
            })
        })
        .collect();
    children.sort_unstable_by_key(|p| p.pid.as_raw());
    children
}

/// Every pid in /proc now.
pub fn all_pids() -> impl Iterator<Item = Pid> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
}

/// Field `n` (1-based, as numbered in proc(5)) of /proc/<pid>/stat, or None if the process is
/// gone. Fields 1 and 2 are the pid and "(comm)"; the command name may contain spaces and
/// parentheses, so the rest is read after the last ')'.
pub fn stat_field(pid: Pid, n: usize) -> Option<String> {
    assert!(n >= 3, "fields 1 and 2 are not split out");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(n - 3).map(str::to_string)
}

/// The state letter of a process (`R`, `S`, `T`, `Z`, ...), or None if it does not exist.
pub fn process_state(pid: Pid) -> Option<char> {
    stat_field(pid, 3)?.chars().next()
}

/// When a process started, in clock ticks since boot (field 22 of its stat).
fn start_of(pid: Pid) -> Option<u64> {
    stat_field(pid, 22)?.parse().ok()
}

/// True if a process with this pid exists (zombies included).
pub fn process_exists(pid: Pid) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A field of /proc/<pid>/status (e.g. `VmRSS`, `Threads`), without the name, trimmed; None
/// if the process or the field does not exist.
pub fn status_field(pid: Pid, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field_of(&text, field)
}

fn field_of(text: &str, field: &str) -> Option<String> {
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// A `Name:   123 kB` figure in KiB.
fn kib(value: &str) -> Option<u64> {
    value.trim_end_matches("kB").trim().parse().ok()
}

/// Resident set size of a process in KiB (`VmRSS`), or None if it is gone.
pub fn rss_kib(pid: Pid) -> Option<u64> {
    kib(&status_field(pid, "VmRSS")?)
}

/// Unique set size of a process in KiB: the pages only it maps (Private_Clean +
/// Private_Dirty of /proc/<pid>/smaps_rollup), or None if it is gone.
pub fn uss_kib(pid: Pid) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(kib(&field_of(&rollup, "Private_Clean")?)? + kib(&field_of(&rollup, "Private_Dirty")?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reads_as_itself() {
        let me = Pid::this();
        // The test runs on a thread; the process's main thread may be asleep meanwhile.
        assert!(process_state(me).is_some_and(|s| "RS".contains(s)));
        assert!(rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(uss_kib(me).is_some_and(|kib| kib > 0));
        let parent = nix::unistd::getppid();
        let me_seen = children_of(parent)
            .into_iter()
            .find(|p| p.pid == me)
            .unwrap();
        assert!(me_seen.is_child_of(parent));
        assert!(!me_seen.is_child_of(me));
    }
}

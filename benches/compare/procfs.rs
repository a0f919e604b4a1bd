//! What phases 3 and 4 read from /proc about a server and its children.

use nix::unistd::Pid;

/// A process, with its start time so that a recycled pid is not taken for it.
pub struct Proc {
    pub pid: Pid,
    start: u64,
}

impl Proc {
    /// False once the process is gone or reaped: a zombie still has its parent.
    pub fn is_child_of(&self, parent: Pid) -> bool {
        stat(self.pid).is_some_and(|s| s.ppid == parent && s.start == self.start)
    }
}

/// The fields of /proc/PID/stat that tell a process's parent and identity.
struct Stat {
    ppid: Pid,
    /// Clock ticks since boot.
    start: u64,
}

fn stat(pid: Pid) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces and parentheses itself: the fields
    // that follow start after the last ')'. There, field 3 (state) is the first.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some(Stat {
        ppid: Pid::from_raw(fields.get(1)?.parse().ok()?),
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Every process whose parent is `parent`, zombies included, by scanning /proc (the kernel's
/// `task/PID/children` list is not built on every kernel).
pub fn children_of(parent: Pid) -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<Proc> = dir
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter_map(|pid| {
            let stat = stat(pid)?;
            (stat.ppid == parent).then_some(Proc {
                pid,
                start: stat.start,
            })
        })
        .collect();
    children.sort_unstable_by_key(|p| p.pid.as_raw());
    children
}

/// One "Name:   123 kB" figure of a /proc file, in KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// Resident set of the process (VmRSS).
pub fn vm_rss_kib(pid: Pid) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, "VmRSS:")
}

/// Unique set of the process: the pages only it maps (Private_Clean + Private_Dirty).
pub fn uss_kib(pid: Pid) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(kib_field(&rollup, "Private_Clean:")? + kib_field(&rollup, "Private_Dirty:")?)
}

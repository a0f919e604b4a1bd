//! The children table and the reaper: which pid serves which peer, since when, and what became
//! of every child that ended (its handler's kind says what an exit code means), and the
//! deadlines the parent enforces (`max_session_time` of a program). Every count changes in
//! exactly two places: `add` when a child is
//! forked and `end_child` when one is reaped.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::hash::RandomState;
use std::time::{Duration, Instant};

use log::{debug, info, log, warn, Level};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitPidFlag;
use nix::unistd::Pid;

use crate::conn::Peer;
use crate::handler::Kind;
use crate::limits::Source;
use crate::parent_memory::ParentOnly;
use crate::spawn::EXIT_PANIC;
use crate::upgrade::{ChildState, LingeringState, TotalsState};

/// One live child.
#[derive(Debug, Clone, Copy)]
struct Child {
    /// The client it serves, for the log line when it ends.
    peer: Peer,
    /// When it was forked, to log how long the session lasted.
    started: Instant,
    /// The source it counts under for `max_per_source` (kept, so a reload that changes the
    /// prefix lengths still releases the count it took).
    source: Source,
    /// What it runs: what its exit code means.
    kind: Kind,
    /// When its process group gets SIGKILL, once the parent has sent it SIGTERM (at
    /// `max_session_time` or on shutdown): kept so that what the program started and left
    /// behind in the group still gets it after the program itself is reaped.
    kill_at: Option<Instant>,
}

/// The process group of a program the parent had told to end (SIGTERM), reaped while members
/// of its group (what the program started) still ran: they get SIGKILL at `kill_at`. The group
/// id cannot be reused while the group has members, and forkecho is their subreaper (see
/// `Children::become_subreaper`), so it reaps the last of them and forgets the group then.
#[derive(Debug, Clone, Copy)]
struct Lingering {
    pgid: Pid,
    peer: Peer,
    kill_at: Instant,
}

/// A moment the parent must act on a child: end a program at `max_session_time` (SIGTERM to
/// its process group), then, `kill_timeout` later, SIGKILL. Ordered by time; `started`
/// identifies the child, so an entry left for a reaped child whose pid was reused is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Instant,
    pid: libc::pid_t,
    started: Instant,
    /// SIGKILL (the second step) rather than SIGTERM.
    kill: bool,
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    /// Killed by signal number `signal`: a raw number, because a real-time signal (32–64) has
    /// no `nix::Signal` and must still be accounted for.
    Killed {
        signal: i32,
        core_dumped: bool,
    },
}

/// Totals since start, for the status line. Fixed arrays rather than maps: counting a reaped
/// child then writes one word and allocates nothing.
#[derive(Debug, Clone)]
pub struct Totals {
    /// Children forked.
    pub forked: u64,
    /// Children reaped, by exit code (an exit status is 0..=255).
    exited: [u64; 256],
    /// Children reaped, by the number of the signal that killed them.
    killed: [u64; 65],
    /// How long the sessions of reaped children lasted.
    pub durations: Durations,
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            forked: 0,
            exited: [0; 256],
            killed: [0; 65],
            durations: Durations::default(),
        }
    }
}

impl Totals {
    fn record(&mut self, ending: Ending, lasted: Duration) {
        match ending {
            Ending::Exited(code) => self.exited[(code & 0xff) as usize] += 1,
            Ending::Killed { signal, .. } => self.killed[signal.clamp(0, 64) as usize] += 1,
        }
        self.durations.record(lasted);
    }

    /// Exit codes seen, in order, with their counts.
    pub fn exited(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        (0..).zip(self.exited).filter(|(_, n)| *n > 0)
    }

    /// Signals that killed children, by signal number, with their counts.
    pub fn killed(&self) -> impl Iterator<Item = (SignalName, u64)> + '_ {
        (0..)
            .zip(self.killed)
            .filter(|(_, n)| *n > 0)
            .map(|(sig, n)| (SignalName(sig), n))
    }

    pub fn ended(&self) -> u64 {
        self.exited.iter().sum::<u64>() + self.killed.iter().sum::<u64>()
    }
}

/// Upper bounds, in seconds, of the session-duration buckets: from an echo's milliseconds to
/// an interactive session's hour.
pub const DURATION_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 1800.0, 3600.0,
];

/// A histogram of session durations, as Prometheus counts them: per bucket, the sessions that
/// lasted at most its bound (non-cumulative here; the exposition adds them up), the rest above
/// the last bound, and the sum.
#[derive(Debug, Clone, Default)]
pub struct Durations {
    pub buckets: [u64; DURATION_BOUNDS.len() + 1],
    pub sum_seconds: f64,
}

impl Durations {
    fn record(&mut self, lasted: Duration) {
        let seconds = lasted.as_secs_f64();
        let bucket = DURATION_BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BOUNDS.len());
        self.buckets[bucket] += 1;
        self.sum_seconds += seconds;
    }
}

/// The line of a reaped child: `child 5037 (127.0.0.1:50000) exited with code 0 (client
/// closed) after 0.01s`, with its fields (`code` or `signal`).
fn log_ending(
    level: Level,
    pid: Pid,
    peer: &Peer,
    ending: Ending,
    meaning: Option<&'static str>,
    lasted: Duration,
) {
    let (child, duration, meaning) = (pid.as_raw(), lasted.as_secs_f64(), Parenthesised(meaning));
    let lasted = seconds(lasted);
    match ending {
        Ending::Exited(code) => log!(
            level,
            event = "ended", child = child, peer:% = peer, code = code, duration = duration;
            "child {pid} ({peer}) {ending}{meaning} after {lasted}"
        ),
        Ending::Killed { signal, .. } => log!(
            level,
            event = "ended", child = child, peer:% = peer, signal:% = SignalName(signal),
            duration = duration;
            "child {pid} ({peer}) {ending}{meaning} after {lasted}"
        ),
    }
}

/// `d` as whole nanoseconds, for an upgrade's state.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A table that only the parent uses, kept in memory the children do not inherit.
type ParentTable<K, V> = hashbrown::HashMap<K, V, RandomState, ParentOnly>;

fn parent_table<K, V>(capacity: usize) -> ParentTable<K, V> {
    hashbrown::HashMap::with_capacity_and_hasher_in(capacity, RandomState::new(), ParentOnly)
}

/// Live children by pid, live sessions by source, plus the totals. All of it is written between
/// every two forks, so all of it lives in [`parent_memory`](crate::parent_memory): the tables
/// directly, the totals in a box of their own.
#[derive(Debug)]
pub struct Children {
    live: ParentTable<Pid, Child>,
    /// Live sessions per source; a source with none has no entry, so this stays as small as
    /// the set of sources that have sessions now.
    per_source: ParentTable<Source, usize>,
    pub totals: allocator_api2::boxed::Box<Totals, ParentOnly>,
    /// Deadlines of live children, nearest first: O(log n) to add or take one. Entries of
    /// children reaped before their deadline stay until their time comes and are skipped
    /// then. Only programs have deadlines, and they are started without `fork` (see `exec`),
    /// so this heap on the ordinary heap costs no copy-on-write fault.
    deadlines: BinaryHeap<Reverse<Deadline>>,
    /// Groups of programs reaped after a SIGTERM from the parent, with members left.
    lingering: Vec<Lingering>,
    /// The latest processes reaped that were not sessions, and how they ended (at most 16).
    others: Vec<(Pid, Ending)>,
}

impl Default for Children {
    fn default() -> Self {
        Children::with_capacity(0)
    }
}

impl Children {
    /// An empty table with room for `n` live children before it first grows.
    pub fn with_capacity(n: usize) -> Self {
        Children {
            live: parent_table(n),
            per_source: parent_table(n),
            totals: allocator_api2::boxed::Box::new_in(Totals::default(), ParentOnly),
            deadlines: BinaryHeap::new(),
            lingering: Vec::new(),
            others: Vec::new(),
        }
    }

    /// Makes this process the reaper of its children's orphans (PR_SET_CHILD_SUBREAPER):
    /// what a program starts and leaves behind becomes forkecho's child when the program
    /// ends, so its exit is seen and reaped here (and a group it belongs to is known to be
    /// gone), rather than by init.
    pub fn become_subreaper() -> std::io::Result<()> {
        // Safe: sets a flag of this process; no memory is passed.
        match unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// Whether groups of ended programs still wait for their SIGKILL (a shutdown waits too).
    pub fn has_lingering_groups(&self) -> bool {
        !self.lingering.is_empty()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Live sessions from `source`.
    pub fn live_from(&self, source: &Source) -> usize {
        self.per_source.get(source).copied().unwrap_or(0)
    }

    /// The `n` sources with the most live sessions, busiest first.
    pub fn busiest_sources(&self, n: usize) -> Vec<(Source, usize)> {
        let mut all: Vec<(Source, usize)> = self.per_source.iter().map(|(s, c)| (*s, *c)).collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// Records a child the parent has just forked; `end_by` is the time the parent must end
    /// its session, if the parent enforces one.
    pub fn add(
        &mut self,
        pid: Pid,
        peer: Peer,
        source: Source,
        kind: Kind,
        end_by: Option<Duration>,
    ) {
        // A child sees this table zero-filled (see `parent_memory`): it must never touch it.
        debug_assert!(crate::spawn::in_parent(), "children table used in a child");
        let started = Instant::now();
        let deadline = end_by.map(|limit| Deadline {
            at: started + limit,
            pid: pid.as_raw(),
            started,
            kill: false,
        });
        let child = Child {
            peer,
            started,
            source,
            kind,
            kill_at: None,
        };
        self.track(pid, child, deadline);
        self.totals.forked += 1;
    }

    /// Enters a live child in the table, its source's count and, if the parent must act on
    /// it at some time, the deadlines: for a child just forked and one an upgrade passed on.
    #[inline]
    fn track(&mut self, pid: Pid, child: Child, deadline: Option<Deadline>) {
        *self.per_source.entry(child.source).or_default() += 1;
        self.live.insert(pid, child);
        if let Some(deadline) = deadline {
            self.deadlines.push(Reverse(deadline));
        }
    }

    /// The table as an upgrade passes it on: each live child with its age and the time left to
    /// the parent's next action on it, the lingering groups, and the totals.
    pub fn export(&self, now: Instant) -> (Vec<ChildState>, Vec<LingeringState>, TotalsState) {
        let children = self
            .live
            .iter()
            .map(|(pid, child)| {
                let next = self
                    .deadlines
                    .iter()
                    .map(|Reverse(d)| *d)
                    .filter(|d| d.pid == pid.as_raw() && d.started == child.started)
                    .min();
                ChildState {
                    pid: pid.as_raw(),
                    peer: child.peer.to_string(),
                    source: child.source.to_string(),
                    program: child.kind == Kind::Program,
                    age_ns: nanos(now.saturating_duration_since(child.started)),
                    deadline_in_ns: next.map(|d| nanos(d.at.saturating_duration_since(now))),
                    deadline_kills: next.is_some_and(|d| d.kill),
                    kill_in_ns: child
                        .kill_at
                        .map(|t| nanos(t.saturating_duration_since(now))),
                }
            })
            .collect();
        let lingering = self
            .lingering
            .iter()
            .map(|group| LingeringState {
                pgid: group.pgid.as_raw(),
                peer: group.peer.to_string(),
                kill_in_ns: nanos(group.kill_at.saturating_duration_since(now)),
            })
            .collect();
        let totals = &self.totals;
        let totals = TotalsState {
            forked: totals.forked,
            exited: totals.exited().collect(),
            killed: (0..).zip(totals.killed).filter(|(_, n)| *n > 0).collect(),
            duration_buckets: totals.durations.buckets.to_vec(),
            duration_sum_seconds: totals.durations.sum_seconds,
        };
        (children, lingering, totals)
    }

    /// Takes over the table an upgrade passed on (see [`Children::export`]). A child that
    /// ended meanwhile is reaped by the next [`Children::reap`], as usual.
    pub fn import(
        &mut self,
        children: &[ChildState],
        lingering: &[LingeringState],
        totals: &TotalsState,
        now: Instant,
    ) -> Result<(), String> {
        let since = |ns: u64| now.checked_sub(Duration::from_nanos(ns)).unwrap_or(now);
        let after = |ns: u64| now + Duration::from_nanos(ns);
        for state in children {
            let pid = Pid::from_raw(state.pid);
            let peer: Peer = state.peer.parse()?;
            let source: Source = state.source.parse()?;
            let started = since(state.age_ns);
            let kind = match state.program {
                true => Kind::Program,
                false => Kind::Echo,
            };
            let deadline = state.deadline_in_ns.map(|ns| Deadline {
                at: after(ns),
                pid: state.pid,
                started,
                kill: state.deadline_kills,
            });
            let child = Child {
                peer,
                started,
                source,
                kind,
                kill_at: state.kill_in_ns.map(after),
            };
            self.track(pid, child, deadline);
        }
        for group in lingering {
            self.lingering.push(Lingering {
                pgid: Pid::from_raw(group.pgid),
                peer: group.peer.parse()?,
                kill_at: after(group.kill_in_ns),
            });
        }
        self.totals.forked = totals.forked;
        for &(code, n) in &totals.exited {
            self.totals.exited[(code & 0xff) as usize] = n;
        }
        for &(signal, n) in &totals.killed {
            self.totals.killed[signal.clamp(0, 64) as usize] = n;
        }
        for (bucket, &n) in self
            .totals
            .durations
            .buckets
            .iter_mut()
            .zip(&totals.duration_buckets)
        {
            *bucket = n;
        }
        self.totals.durations.sum_seconds = totals.duration_sum_seconds;
        Ok(())
    }

    /// How process `pid`, not a session (see `end_child`), ended, if it has been reaped.
    pub fn take_other_ending(&mut self, pid: Pid) -> Option<Ending> {
        let i = self.others.iter().position(|(p, _)| *p == pid)?;
        Some(self.others.remove(i).1)
    }

    /// Reaps every child that has ended, then returns. SIGCHLD coalesces, so one signal may
    /// stand for many children: loop until the kernel says none is left to collect
    /// (`StillAlive`) or there are no children at all (ECHILD).
    pub fn reap(&mut self) {
        while self.reap_some(usize::MAX) {}
    }

    /// [`Children::reap`], stopping after `most` children: true if it stopped there, and more
    /// may be waiting (the caller goes on in its next turn, without waiting for a signal).
    pub fn reap_some(&mut self, most: usize) -> bool {
        let mut reaped = 0;
        while reaped < most {
            if !self.collect_one(Some(WaitPidFlag::WNOHANG)) {
                break;
            }
            reaped += 1;
        }
        if !self.lingering.is_empty() {
            self.lingering.retain(|group| group_has_members(group.pgid));
        }
        reaped == most
    }

    /// The nearest deadline the parent must act on, if any (perhaps one of a child already
    /// reaped: acting on it then does nothing).
    pub fn next_deadline(&self) -> Option<Instant> {
        let lingering = self.lingering.iter().map(|g| g.kill_at).min();
        let deadline = self.deadlines.peek().map(|Reverse(d)| d.at);
        match (deadline, lingering) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Acts on every deadline that has come by `now`: a program at `max_session_time` gets
    /// SIGTERM to its process group, and SIGKILL `kill_timeout` later if it is still there.
    pub fn end_sessions_past_deadline(&mut self, now: Instant, kill_timeout: Duration) {
        self.kill_lingering_groups_due(now);
        while let Some(&Reverse(due)) = self.deadlines.peek().filter(|Reverse(d)| d.at <= now) {
            self.deadlines.pop();
            let pid = Pid::from_raw(due.pid);
            let Some(child) = self.live.get_mut(&pid).filter(|c| c.started == due.started) else {
                continue; // reaped already (its group, if it lingers, is in `lingering`)
            };
            if due.kill {
                warn!(
                    "child {pid} ({}) still running {} after SIGTERM; sending SIGKILL to its \
                     process group",
                    child.peer,
                    seconds(kill_timeout)
                );
                signal_group(pid, Signal::SIGKILL);
            } else {
                info!(
                    "child {pid} ({}) reached max_session_time after {}; sending SIGTERM to its \
                     process group",
                    child.peer,
                    seconds(now - child.started)
                );
                signal_group(pid, Signal::SIGTERM);
                child.kill_at = Some(now + kill_timeout);
                self.deadlines.push(Reverse(Deadline {
                    at: now + kill_timeout,
                    kill: true,
                    ..due
                }));
            }
        }
    }

    /// Last resort when the loop cannot go on: SIGKILL every child and wait for each one, so
    /// that none outlives the parent.
    pub fn kill_and_reap_all(&mut self) {
        self.kill_all();
        while !self.live.is_empty() && self.collect_one(None) {}
    }

    /// One `waitpid(-1, flags)`, accounted for. False when there is nothing (more) to collect.
    ///
    /// libc's `waitpid`, not nix's: nix cannot represent a child killed by a real-time signal
    /// and reports EINVAL *after* the kernel has reaped it, which would leave a ghost in the
    /// table holding its slot forever (and a shutdown waiting for it).
    fn collect_one(&mut self, flags: Option<WaitPidFlag>) -> bool {
        let mut status = 0;
        let flags = flags.map_or(0, |f| f.bits());
        // Safe: `status` is a valid place for the kernel to write the status.
        let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
        match pid {
            0 => return false, // WNOHANG: children exist, none has ended
            -1 => match Errno::last() {
                Errno::ECHILD => return false,
                Errno::EINTR => {}
                e => {
                    warn!("waitpid failed: {e}");
                    return false;
                }
            },
            pid => {
                if let Some(ending) = Ending::from_status(status) {
                    self.end_child(Pid::from_raw(pid), ending);
                }
                // Else a stop or continue report; not asked for (no WUNTRACED), so ignored.
            }
        }
        true
    }

    /// The one place a reaped child is accounted for: table, totals, log line.
    fn end_child(&mut self, pid: Pid, ending: Ending) {
        let Some(child) = self.live.remove(&pid) else {
            // Not a session: an orphan a program left (we are its subreaper), a process this
            // one inherited, or a helper the parent started (an upgrade's check); reaping it
            // is still right, and the parent may ask how it ended.
            debug!("reaped unknown process {pid}: {ending}");
            if self.others.len() >= 16 {
                self.others.remove(0);
            }
            self.others.push((pid, ending));
            return;
        };
        if let Some(kill_at) = child.kill_at.filter(|_| group_has_members(pid)) {
            self.lingering.push(Lingering {
                pgid: pid,
                peer: child.peer,
                kill_at,
            });
        }
        self.forget_deadlines_of_ended_children();
        if let Some(count) = self.per_source.get_mut(&child.source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&child.source);
            }
        }
        let lasted = child.started.elapsed();
        self.totals.record(ending, lasted);
        let level = match ending {
            Ending::Exited(EXIT_PANIC) if child.kind == Kind::Echo => Level::Warn,
            Ending::Killed {
                core_dumped: true, ..
            } => Level::Warn,
            _ => Level::Info,
        };
        let meaning = match ending {
            Ending::Exited(code) => child.kind.meaning(code),
            Ending::Killed { .. } => None,
        };
        log_ending(level, pid, &child.peer, ending, meaning, lasted);
    }

    /// Shutdown: SIGTERM to every live child's process group, so that whatever a program
    /// started is reached too, with SIGKILL due at `kill_at` for what is left of each group
    /// (see [`Children::kill_all`] and `Lingering`). A child that has already exited but is
    /// not yet reaped is a zombie, and signalling it is harmless.
    pub fn terminate_all(&mut self, kill_at: Instant) {
        for (pid, child) in self.live.iter_mut() {
            signal_group(*pid, Signal::SIGTERM);
            child.kill_at = Some(child.kill_at.map_or(kill_at, |t| t.min(kill_at)));
        }
        for group in &self.lingering {
            signal_group(group.pgid, Signal::SIGTERM);
        }
    }

    /// Shutdown: SIGKILL to every live child's process group and to the groups of ended
    /// programs that still had members.
    pub fn kill_all(&mut self) {
        for pid in self.live.keys() {
            signal_group(*pid, Signal::SIGKILL);
        }
        for group in self.lingering.drain(..) {
            signal_group(group.pgid, Signal::SIGKILL);
        }
    }

    /// SIGKILL to each group of an ended program whose time has come.
    fn kill_lingering_groups_due(&mut self, now: Instant) {
        self.lingering.retain(|group| {
            if group.kill_at > now {
                return true;
            }
            warn!(
                "process group {} of an ended session ({}) still running after SIGTERM; \
                 sending it SIGKILL",
                group.pgid, group.peer
            );
            signal_group(group.pgid, Signal::SIGKILL);
            false
        });
    }

    /// Drops the deadlines of children already reaped once they outnumber the live ones: each
    /// would otherwise stay until its time came (a day's `max_session_time` at a thousand
    /// sessions a second is 86 million entries). Amortised O(1) per reaped child.
    fn forget_deadlines_of_ended_children(&mut self) {
        if self.deadlines.len() <= 2 * self.live.len() + 1024 {
            return;
        }
        let live = &self.live;
        self.deadlines.retain(|Reverse(d)| {
            live.get(&Pid::from_raw(d.pid))
                .is_some_and(|c| c.started == d.started)
        });
    }
}

/// Whether the process group `pgid` still has a member (signal 0 checks without sending).
fn group_has_members(pgid: Pid) -> bool {
    nix::sys::signal::killpg(pgid, None).is_ok()
}

/// Sends `signal` to the process group a child leads; to the child alone if it has no group
/// yet (a forked child that has not reached its `setpgid`).
fn signal_group(pid: Pid, signal: Signal) {
    let sent = match nix::sys::signal::killpg(pid, signal) {
        Err(Errno::ESRCH) => kill(pid, signal),
        other => other,
    };
    if let Err(e) = sent {
        debug!("cannot send {signal} to child {pid}: {e}");
    }
}

impl Ending {
    /// Decodes a raw `waitpid` status; None for stop/continue reports.
    fn from_status(status: i32) -> Option<Ending> {
        if libc::WIFEXITED(status) {
            Some(Ending::Exited(libc::WEXITSTATUS(status)))
        } else if libc::WIFSIGNALED(status) {
            Some(Ending::Killed {
                signal: libc::WTERMSIG(status),
                core_dumped: libc::WCOREDUMP(status),
            })
        } else {
            None
        }
    }
}

/// ` (text)`, or nothing: formatted in place, so the reap line allocates nothing.
struct Parenthesised(Option<&'static str>);

impl fmt::Display for Parenthesised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(text) => write!(f, " ({text})"),
            None => Ok(()),
        }
    }
}

/// A signal's name for the log: `SIGKILL`, or `SIGRTMIN+2` for a real-time one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalName(pub i32);

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Signal::try_from(self.0) {
            Ok(signal) => f.write_str(signal.as_str()),
            Err(_) if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&self.0) => {
                write!(f, "SIGRTMIN+{}", self.0 - libc::SIGRTMIN())
            }
            Err(_) => write!(f, "signal {}", self.0),
        }
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Exited(code) => write!(f, "exited with code {code}"),
            Ending::Killed {
                signal,
                core_dumped,
            } => {
                write!(f, "killed by signal {}", SignalName(*signal))?;
                if *core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// `1.23s`: enough precision for an operator, one format everywhere. A `Display` value rather
/// than a `String`, so that logging a reaped child allocates nothing (every heap page the parent
/// writes between forks is a copy-on-write fault: see `parent_memory`).
pub fn seconds(d: Duration) -> Seconds {
    Seconds(d)
}

pub struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}s", self.0.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_statuses_decode_and_name_every_signal() {
        // Exit code 3; killed by SIGKILL; by SIGSEGV with a core; by SIGRTMIN+2; stopped.
        assert_eq!(Ending::from_status(3 << 8), Some(Ending::Exited(3)));
        let killed = Ending::from_status(libc::SIGKILL).unwrap();
        assert_eq!(killed.to_string(), "killed by signal SIGKILL");
        let core = Ending::from_status(libc::SIGSEGV | 0x80).unwrap();
        assert_eq!(core.to_string(), "killed by signal SIGSEGV (core dumped)");
        let rt = Ending::from_status(libc::SIGRTMIN() + 2).unwrap();
        assert_eq!(rt.to_string(), "killed by signal SIGRTMIN+2");
        assert_eq!(Ending::from_status((libc::SIGSTOP << 8) | 0x7f), None);

        let mut totals = Totals::default();
        for ending in [killed, rt, rt, Ending::Exited(0)] {
            totals.record(ending, Duration::from_millis(1));
        }
        let killed: Vec<String> = totals.killed().map(|(s, n)| format!("{s}: {n}")).collect();
        assert_eq!(killed, ["SIGKILL: 1", "SIGRTMIN+2: 2"]);
        assert_eq!(totals.ended(), 4);
    }
}

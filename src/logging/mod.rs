//! Operator logs: `log` to stderr, filtered by `env_logger`; the level is the `log_level` key
//! (default `info`), or `RUST_LOG` when that is set.
//!
//! # Lines
//! Parent and children share one stderr, so every line names the process that wrote it
//! (`forkecho[<pid>]`). A line is at most [`MAX_LINE`] bytes, prefix and newline included: a
//! longer message (a reload listing a huge deny list) is cut, and ends in `… [<n> bytes cut]`.
//! That bound is below `PIPE_BUF` (4096), so on a pipe every line is one atomic write: whole or
//! not at all, never interleaved with another process's line.
//!
//! A line is one record whatever its arguments carry: control characters in the message (a
//! newline inside a quoted config value, an escape sequence in a peer's input) are written
//! escaped, as Rust writes them (`\n`, `\r`, `\t`, `\u{1b}`, `\u{7f}`, and `\u{9b}` for the C1
//! controls that terminals act on). The escaped form is what counts against [`MAX_LINE`].
//!
//! # The parent never waits for its log
//! Whoever reads our stderr (a terminal, a pipe to a log shipper, the journal's socket) can stop
//! reading, and a full pipe makes `write(2)` wait. The parent must not wait: it would stop
//! accepting, reaping and handling signals. So the parent writes every line without blocking,
//! counts the lines it had to drop ([`dropped_lines`]), and before the next line that gets
//! through writes one `log: <n> lines dropped while the log could not be written (<reason>)`.
//! How it avoids blocking depends on what fd 2 is (decided by `fstat` at [`init`] and at
//! [`stderr_replaced`], never per line):
//!
//! - a pipe, a FIFO or a terminal: the parent opens its own open file description of the same
//!   object (`/proc/self/fd/2`, `O_NONBLOCK`) and writes there. `O_NONBLOCK` is never set on
//!   fd 2's description itself: the children share it, and so, often, does the shell or the
//!   terminal that started us. A full pipe then drops whole lines (`EAGAIN`); a terminal may
//!   take part of a line (it counts as dropped, and the next line starts on a fresh line).
//! - a pipe or FIFO that cannot be reopened: a pipe is mode 0600 and owned by whoever created
//!   it, so when a supervisor running as root starts us as another user (`chpst -u`,
//!   `setpriv`, a container's `USER`), opening `/proc/self/fd/2` fails (`EACCES`). The parent
//!   then keeps a relay pipe of its own (non-blocking, close-on-exec): each line is written
//!   into it, then moved to fd 2 with `splice(2)` and `SPLICE_F_NONBLOCK`, which never waits
//!   for room in fd 2's pipe. The relay is empty before each line and a line fits in one of
//!   its buffers, so the move is whole or nothing (`EAGAIN`: the line is read back out of the
//!   relay and dropped). It costs a second system call per line (a third for a dropped one),
//!   so it is used only where the reopen fails. And each spliced line takes one slot of fd 2's
//!   pipe (a page) where written lines share pages: the 1 MiB pipe holds a burst of 256 lines
//!   instead of about 10,000.
//! - a terminal that cannot be reopened (another user's): if it is our controlling terminal,
//!   `/dev/tty` opens it whoever owns it, and that is the parent's description. Otherwise
//!   nothing can write a terminal without waiting and without touching the shared description
//!   (`splice` cannot target one; `poll` saying "writable" does not mean a whole line fits), so
//!   the parent writes fd 2 itself, blocking, and says so at start with a warning.
//! - a socket (the journal's stream): `send(2)` on fd 2 with `MSG_DONTWAIT`. A Unix stream
//!   socket with its usual buffers takes a line in one piece, so it too is sent whole or not at
//!   all (were one cut, it would count as dropped and the next line would start afresh).
//! - a regular file (`log_file`, `2>>file`) or a device that never waits (`/dev/null`): plain
//!   `write(2)` on fd 2. Nothing waits for a reader there (only for the disk). A full disk or a
//!   file-size limit can end a line halfway: that line counts as dropped and the next line
//!   starts on a fresh line.
//!
//! Children write to fd 2 itself, blocking, as every process inherits it: the parent's own
//! description is close-on-exec and closed in every child anyway (see `spawn`). A stalled log
//! thus holds up only the child that is writing (at `debug`, or on an error), and for at most
//! a second per line (`write_in_child`): a child that waited for ever would keep its place
//! under `max_children` and `max_per_source` after its session ended, and enough of them would
//! shut new clients out. It never holds up the parent.
//!
//! # Why our own writer
//! Filtering is env_logger's (the `RUST_LOG` grammar, per-module directives); formatting and
//! writing are ours (`Logger`): a line of up to `STACK_LINE` bytes (nearly all of them) is
//! built in a buffer on the stack and goes straight to the kernel in one system call. After each
//! `fork` every page the parent writes is a copy-on-write fault, and env_logger formats into a
//! heap buffer (two or three pages) behind a thread-local and a mutex, then copies it; the
//! parent logs twice per connection (the accept line and the reap line), so that was three
//! faults and about a tenth of the parent's time per connection. Nor `std::io::stderr()`: its
//! lock lives in a static, one more page. For the same reason the line-per-line path only
//! reads this module's state; it writes it only while lines are being lost.

mod format;

pub use format::{set_format, Format};

use std::fmt::{self, Write as _};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// The longest line written, prefix and newline included: below `PIPE_BUF` (4096), so a line
/// written to a pipe is never split, even without blocking.
pub const MAX_LINE: usize = 4000;

/// Lines up to this long (nearly all) are formatted on the stack in a buffer this size; a
/// longer one starts over in a [`MAX_LINE`] buffer off the hot path. Small on purpose: every
/// stack page the parent touches between forks is a copy-on-write fault.
const STACK_LINE: usize = 512;

/// Room kept at the end of a cut line for `… [<n> bytes cut]` (at most 36 bytes) and the newline.
const CUT_MARKER_ROOM: usize = 40;

/// Installs the logger. Call once, in the parent, before anything forks; children inherit it.
///
/// `RUST_LOG`, when set, decides (with per-module directives) and the `log_level` key is
/// ignored. Otherwise forkecho's own lines are filtered only by `level`, which a reload can
/// change ([`set_level`]); other crates log warnings and errors only.
pub fn init(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    if env_overrides() {
        builder.parse_env(env_logger::Env::default());
    } else {
        builder
            .filter_level(log::LevelFilter::Warn)
            .filter_module("forkecho", log::LevelFilter::Trace);
    }
    let filter = builder.build();
    LOG.parent_pid.store(std::process::id(), Ordering::Relaxed);
    let attached = LOG.attach();
    format::detect_journal(LOG.stderr);
    log::set_max_level(filter.filter());
    log::set_boxed_logger(Box::new(Logger { filter })).expect("the logger is installed once");
    set_level(level);
    warn_if_blocking(attached);
}

/// Call in the parent after a new file was `dup2`-ed onto fd 2 (`log_file` at start, reopening
/// the log): the parent's non-blocking way to write follows fd 2 only through this. Lines
/// dropped before and not yet reported are reported in the new log.
pub fn stderr_replaced() {
    debug_assert!(
        LOG.in_parent(std::process::id()),
        "stderr_replaced in a child"
    );
    warn_if_blocking(LOG.attach());
    format::detect_journal(LOG.stderr);
}

/// Lines the parent could not write since it started (its log reader stalled, the disk was
/// full, ...). Children's lost lines are not counted.
pub fn dropped_lines() -> u64 {
    LOG.dropped.load(Ordering::Relaxed)
}

/// Applies the configured level (at start and on reload), unless `RUST_LOG` decides.
pub fn set_level(level: log::LevelFilter) {
    if !env_overrides() {
        log::set_max_level(level);
    }
}

/// True when `RUST_LOG` is set: the operator's environment wins over the config file.
pub fn env_overrides() -> bool {
    std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty())
}

fn warn_if_blocking(attached: Result<(), io::Error>) {
    if let Err(e) = attached {
        log::warn!(
            "log: cannot write stderr without blocking ({}); a log reader that stops reading \
             will stop the server",
            crate::os_error_text(&e)
        );
    }
}

/// env_logger's filter, our line: `<RFC 3339 UTC, ms> <LEVEL> forkecho[<pid>] <message>`.
struct Logger {
    filter: env_logger::Logger,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.filter.matches(record) {
            write_line(record);
        }
    }

    fn flush(&self) {}
}

/// Formats `record` in a stack buffer and writes it; a line that does not fit starts over the
/// long way.
fn write_line(record: &log::Record<'_>) {
    // Looked up per line: after fork the same code runs in the child, with its own pid.
    let pid = std::process::id();
    let mut line = LineBuffer::<STACK_LINE>::stopping_when_full();
    let fields = Some(record.key_values());
    if format_line(&mut line, record.level(), pid, record.args(), fields).is_ok() {
        LOG.write(pid, line.finish());
    } else {
        write_long_line(record, pid);
    }
}

#[inline(never)]
#[cold]
fn write_long_line(record: &log::Record<'_>, pid: u32) {
    let mut line = LineBuffer::<MAX_LINE>::cutting();
    let fields = Some(record.key_values());
    let _ = format_line(&mut line, record.level(), pid, record.args(), fields);
    LOG.write(pid, line.finish());
}

/// One record, laid out as `log_format` says (see `format`), into `out`.
fn format_line<const N: usize>(
    out: &mut LineBuffer<N>,
    level: log::Level,
    pid: u32,
    message: &fmt::Arguments<'_>,
    fields: Option<&dyn log::kv::Source>,
) -> fmt::Result {
    format_line_as(format::current(), out, level, pid, message, fields)
}

fn format_line_as<const N: usize>(
    layout: Format,
    out: &mut LineBuffer<N>,
    level: log::Level,
    pid: u32,
    message: &fmt::Arguments<'_>,
    fields: Option<&dyn log::kv::Source>,
) -> fmt::Result {
    format::write_record(
        out,
        layout,
        |line, suffix| line.quote_until_end(suffix),
        level,
        pid,
        message,
        fields,
    )
}

/// One line being formatted into a fixed array: the text that fits, and how many bytes of it
/// did not. Text stops at a UTF-8 character boundary (never inside an escape), and nothing is
/// appended after a cut. Control characters are escaped ([`escape`]); only the ending is a raw
/// newline.
struct LineBuffer<const N: usize> {
    bytes: [u8; N],
    len: usize,
    /// Where text must stop, leaving room for the ending (newline, or cut marker and newline).
    limit: usize,
    cut: usize,
    /// Fail at the first byte that does not fit (the stack buffer, whose caller starts over in
    /// a larger one) instead of counting on.
    stop_when_full: bool,
    /// Text is inside a quoted value (JSON, logfmt): `"` and `\` are escaped too, and control
    /// characters as JSON writes them (`\n`, `\u001b`).
    quoting: bool,
    /// What closes the line before its newline (`"}` for JSON): room is kept for it, and it
    /// follows the cut marker, so that a cut line is still a valid record.
    suffix: &'static str,
}

impl<const N: usize> LineBuffer<N> {
    fn stopping_when_full() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
            limit: N - 1,
            cut: 0,
            stop_when_full: true,
            quoting: false,
            suffix: "",
        }
    }

    fn cutting() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
            limit: N - CUT_MARKER_ROOM,
            cut: 0,
            stop_when_full: false,
            quoting: false,
            suffix: "",
        }
    }

    /// From now on text goes inside a quoted value, and `suffix` will close the line.
    fn quote_until_end(&mut self, suffix: &'static str) {
        self.quoting = true;
        self.suffix = suffix;
        // The fields before fit (see `format`): a line already past this point was cut, and
        // its ending goes where the room was kept for the cut marker.
        self.limit = self.limit.saturating_sub(suffix.len());
    }

    /// The line with its ending: the cut marker if text was cut, and the newline.
    fn finish(&mut self) -> &[u8] {
        let cut = std::mem::take(&mut self.cut);
        self.limit = N;
        // The room was kept, so none of these can fail.
        if cut > 0 {
            let _ = write!(self, "… [{cut} bytes cut]");
        }
        let _ = self.push(self.suffix, false);
        let _ = self.push("\n", true);
        &self.bytes[..self.len]
    }

    /// Appends `s` as it is (no escaping), or what fits of it: cut at a character boundary if
    /// `splittable`, else all or nothing.
    fn push(&mut self, s: &str, splittable: bool) -> fmt::Result {
        let room = self.limit.saturating_sub(self.len);
        if self.cut == 0 && s.len() <= room {
            self.bytes[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
            self.len += s.len();
            return Ok(());
        }
        if self.cut == 0 {
            let mut keep = if splittable { room } else { 0 };
            while !s.is_char_boundary(keep) {
                keep -= 1;
            }
            self.bytes[self.len..self.len + keep].copy_from_slice(&s.as_bytes()[..keep]);
            self.len += keep;
            self.cut = s.len() - keep;
        } else {
            self.cut += s.len();
        }
        if self.stop_when_full {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

impl<const N: usize> fmt::Write for LineBuffer<N> {
    /// Appends `s` with its control characters escaped: runs of plain text are copied, each
    /// control character becomes its escape, kept whole or cut whole.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some((at, special)) = find_special(rest, self.quoting) {
            self.push(&rest[..at], true)?;
            let mut escaped = [0u8; 10];
            let escaped = match self.quoting {
                true => json_escape(special, &mut escaped),
                false => escape(special, &mut escaped),
            };
            self.push(escaped, false)?;
            rest = &rest[at + special.len_utf8()..];
        }
        self.push(rest, true)
    }
}

/// The first control character in `s` and where it starts: C0 (below U+0020), DEL, or C1
/// (U+0080 to U+009F, which some terminals act on as escape sequences); with `quoting`, also
/// `"` and `\`. A byte scan: C1 are the two-byte characters `C2 80` to `C2 9F`.
fn find_special(s: &str, quoting: bool) -> Option<(usize, char)> {
    let bytes = s.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b @ (0x00..=0x1f | 0x7f) => return Some((at, char::from(b))),
            b @ (b'"' | b'\\') if quoting => return Some((at, char::from(b))),
            0xc2 if matches!(bytes.get(at + 1), Some(0x80..=0x9f)) => {
                return Some((at, char::from(bytes[at + 1])));
            }
            _ => at += 1,
        }
    }
    None
}

/// `special` written as JSON escapes it inside a string (`\"`, `\\`, `\n`, `\u001b`), in `out`;
/// logfmt's quoted values read the same escapes.
fn json_escape(special: char, out: &mut [u8; 10]) -> &str {
    let text: &str = match special {
        '"' => "\\\"",
        '\\' => "\\\\",
        '\n' => "\\n",
        '\r' => "\\r",
        '\t' => "\\t",
        other => {
            let mut cursor = std::io::Cursor::new(&mut out[..]);
            let _ = std::io::Write::write_fmt(&mut cursor, format_args!("\\u{:04x}", other as u32));
            let len = cursor.position() as usize;
            return std::str::from_utf8(&out[..len]).expect("escapes are ASCII");
        }
    };
    out[..text.len()].copy_from_slice(text.as_bytes());
    std::str::from_utf8(&out[..text.len()]).expect("escapes are ASCII")
}

/// `control` written as Rust escapes it (`\n`, `\t`, `\u{1b}`), in `out`.
fn escape(control: char, out: &mut [u8; 10]) -> &str {
    let mut len = 0;
    for c in control.escape_default() {
        // Escapes are ASCII, at most 10 bytes (`\u{10ffff}`).
        out[len] = c as u8;
        len += 1;
    }
    std::str::from_utf8(&out[..len]).expect("escapes are ASCII")
}

/// The process-wide log: [`LOG`]. Its own type so that tests can point one at a pipe.
static LOG: Log = Log::new(2);

/// How the parent writes its lines: chosen from what stderr is (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Sink {
    /// `write(2)` on stderr itself: a regular file or a device that never waits (or the
    /// fallback when no non-blocking way could be set up).
    Stderr = 0,
    /// `write(2)` on the parent's own non-blocking description of stderr's pipe or terminal.
    Private = 1,
    /// `send(2)` with `MSG_DONTWAIT` on stderr, a socket.
    Socket = 2,
    /// `write(2)` into the parent's relay pipe, then `splice(2)` to stderr, a pipe it cannot
    /// reopen.
    Relayed = 3,
}

impl Sink {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Sink::Private,
            2 => Sink::Socket,
            3 => Sink::Relayed,
            _ => Sink::Stderr,
        }
    }
}

/// No relay pipe (any sink but [`Sink::Relayed`]).
const NO_RELAY: RawFd = -1;

/// Why a line did not get through whole.
#[derive(Clone, Copy, Debug)]
struct Failure {
    errno: i32,
    /// Part of the line was written: the log now ends in the middle of a line.
    partial: bool,
}

/// Where the lines go and what was lost. Written at attach time and while lines are lost; a
/// line that gets through only reads it.
struct Log {
    /// The descriptor every process inherits (2).
    stderr: RawFd,
    /// The process that installed the logger: only it writes without blocking.
    parent_pid: AtomicU32,
    sink: AtomicU8,
    /// The descriptor the parent writes: `stderr`, its private description, or the write end of
    /// its relay pipe.
    fd: AtomicI32,
    /// The relay pipe's read end, or [`NO_RELAY`].
    relay: AtomicI32,
    dropped: AtomicU64,
    /// Dropped since the last `log: ... lines dropped` line.
    unreported: AtomicU64,
    last_errno: AtomicI32,
    /// A short write left the log in the middle of a line.
    mid_line: AtomicBool,
}

impl Log {
    const fn new(stderr: RawFd) -> Self {
        Self {
            stderr,
            parent_pid: AtomicU32::new(0),
            sink: AtomicU8::new(Sink::Stderr as u8),
            fd: AtomicI32::new(stderr),
            relay: AtomicI32::new(NO_RELAY),
            dropped: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
            last_errno: AtomicI32::new(0),
            mid_line: AtomicBool::new(false),
        }
    }

    fn in_parent(&self, pid: u32) -> bool {
        pid == self.parent_pid.load(Ordering::Relaxed)
    }

    /// Chooses the sink for what `stderr` is now, closing the previous private description or
    /// relay pipe. On error the sink is plain (blocking) writes to stderr.
    fn attach(&self) -> io::Result<()> {
        let (sink, fd, relay, result) = match open_sink(self.stderr) {
            Ok((sink, fd, relay)) => (sink, fd, relay, Ok(())),
            Err(e) => (Sink::Stderr, self.stderr, NO_RELAY, Err(e)),
        };
        let old = self.fd.swap(fd, Ordering::Relaxed);
        let old_relay = self.relay.swap(relay, Ordering::Relaxed);
        self.sink.store(sink as u8, Ordering::Relaxed);
        self.mid_line.store(false, Ordering::Relaxed);
        // Safe: these are descriptors this `Log` opened and nothing else uses.
        if old != self.stderr && old != fd {
            unsafe { libc::close(old) };
        }
        if old_relay != NO_RELAY && old_relay != relay {
            unsafe { libc::close(old_relay) };
        }
        result
    }

    /// Writes all of `bytes` to `fd` the way `sink` says, without blocking in the parent.
    fn put(&self, sink: Sink, fd: RawFd, bytes: &[u8]) -> Result<(), Failure> {
        match sink {
            Sink::Relayed => {
                relay_whole(fd, self.relay.load(Ordering::Relaxed), self.stderr, bytes)
            }
            _ => write_whole(sink, fd, bytes),
        }
    }

    /// Writes one finished line: in a child to stderr, blocking; in the parent without
    /// blocking, after the report of lines dropped before it, if any.
    fn write(&self, pid: u32, line: &[u8]) {
        if !self.in_parent(pid) {
            // Nowhere to report a failure: the line is lost.
            write_in_child(self.stderr, line);
            return;
        }
        let sink = Sink::from_u8(self.sink.load(Ordering::Relaxed));
        let fd = self.fd.load(Ordering::Relaxed);
        let written = if self.unreported.load(Ordering::Relaxed) == 0 {
            self.put(sink, fd, line)
        } else {
            // Lines keep their order: if the report cannot go out, neither can this line.
            self.report_dropped(sink, fd, pid)
                .and_then(|()| self.put(sink, fd, line))
        };
        if let Err(failure) = written {
            self.count_dropped(failure);
        }
    }

    #[cold]
    #[inline(never)]
    fn count_dropped(&self, failure: Failure) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.unreported.fetch_add(1, Ordering::Relaxed);
        self.last_errno.store(failure.errno, Ordering::Relaxed);
        if failure.partial {
            self.mid_line.store(true, Ordering::Relaxed);
        }
    }

    /// Writes `log: <n> lines dropped ...`, on a line of its own.
    #[cold]
    #[inline(never)]
    fn report_dropped(&self, sink: Sink, fd: RawFd, pid: u32) -> Result<(), Failure> {
        let lost = self.unreported.load(Ordering::Relaxed);
        let reason = errno_text(self.last_errno.load(Ordering::Relaxed));
        let mut line = LineBuffer::<STACK_LINE>::cutting();
        if self.mid_line.load(Ordering::Relaxed) {
            let _ = line.push("\n", true);
        }
        let _ = format_line(
            &mut line,
            log::Level::Warn,
            pid,
            &format_args!(
                "log: {lost} line{} dropped while the log could not be written ({reason})",
                if lost == 1 { "" } else { "s" },
            ),
            None,
        );
        self.put(sink, fd, line.finish())?;
        self.unreported.store(0, Ordering::Relaxed);
        self.mid_line.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// The C library's text for `errno`, as an operator reads it: `resource temporarily
/// unavailable` (the `EAGAIN` of a full pipe), `no space left on device`.
fn errno_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_lowercase().chain(chars).collect())
        .unwrap_or_default()
}

/// What the parent writes to for `stderr`, by what it is: the sink, its descriptor, and the
/// relay pipe's read end (or [`NO_RELAY`]).
fn open_sink(stderr: RawFd) -> io::Result<(Sink, RawFd, RawFd)> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // Safe: fstat fills `stat` when it returns 0.
    if unsafe { libc::fstat(stderr, stat.as_mut_ptr()) } != 0 {
        // Not open: writes fail at once (and are counted), nothing can block.
        return Ok((Sink::Stderr, stderr, NO_RELAY));
    }
    // Safe: initialised by the successful fstat.
    let mode = unsafe { stat.assume_init() }.st_mode & libc::S_IFMT;
    // Safe: isatty only queries the descriptor.
    let is_terminal = unsafe { libc::isatty(stderr) } == 1;
    if mode == libc::S_IFIFO {
        grow_pipe(stderr);
    }
    let private = |fd| (Sink::Private, fd, NO_RELAY);
    match mode {
        libc::S_IFREG => Ok((Sink::Stderr, stderr, NO_RELAY)),
        libc::S_IFSOCK => Ok((Sink::Socket, stderr, NO_RELAY)),
        libc::S_IFCHR if !is_terminal => Ok((Sink::Stderr, stderr, NO_RELAY)),
        libc::S_IFIFO => match open_private_description(stderr) {
            Ok(fd) => Ok(private(fd)),
            // Another user's pipe (see the module doc).
            Err(_) => open_relay().map(|(read, write)| (Sink::Relayed, write, read)),
        },
        // Terminals (and anything else that might wait for a reader).
        _ => open_private_description(stderr)
            .or_else(|e| open_controlling_terminal(stderr).map_err(|_| e))
            .map(private),
    }
}

/// How much of a burst of lines the log's pipe should hold before lines are dropped.
const BURST_BUFFER: libc::c_int = 1 << 20;

/// Grows the pipe behind `fd` towards [`BURST_BUFFER`] (1 MiB, about 10,000 lines), as far as
/// `fs.pipe-max-size` allows.
///
/// Why: the parent drops a line rather than wait for a slow reader, and bursts are normal: a
/// thousand sessions killed at once are a thousand lines within milliseconds, more than a
/// default 64 KiB pipe holds before a busy log shipper reads. Memory is used only while lines
/// wait. (The journal's socket needs nothing: systemd gives it an 8 MiB send buffer.) A
/// failure is ignored: the default buffer still works, with drops counted.
fn grow_pipe(fd: RawFd) {
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|t| t.trim().parse::<libc::c_int>().ok())
        .unwrap_or(BURST_BUFFER);
    // Safe: F_GETPIPE_SZ only reads the pipe's size.
    let now = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    // Only ever grown: a supervisor may have made it larger still.
    if now < BURST_BUFFER.min(max) {
        // Safe: F_SETPIPE_SZ only resizes the pipe's buffer; it never drops what it holds.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, BURST_BUFFER.min(max)) };
    }
}

/// Longest a child waits for room in the log for one line before dropping it.
const CHILD_LOG_DEADLINE_SECS: libc::c_uint = 1;

/// A child's line: written to fd 2 itself, blocking, but for at most
/// [`CHILD_LOG_DEADLINE_SECS`]. Why a deadline: a child whose session is over but that waits
/// forever on a stalled log keeps its place under `max_children` and `max_per_source`, and
/// enough of them shut new clients out. SIGALRM, caught by a handler that does nothing and
/// installed without SA_RESTART, ends the wait with EINTR; a write of at most `PIPE_BUF` to a
/// pipe is all or nothing, so the line is then dropped whole. Only the child's own state
/// changes (its handler, its timer): it `_exit`s soon after.
fn write_in_child(stderr: RawFd, line: &[u8]) {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    extern "C" fn interrupt(_: libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(interrupt),
        SaFlags::empty(), // no SA_RESTART: the write must end with EINTR
        SigSet::empty(),
    );
    // Safe: the handler does nothing, so it is async-signal-safe.
    let _ = unsafe { sigaction(Signal::SIGALRM, &action) };
    // Safe: alarm only arms this process's timer.
    unsafe { libc::alarm(CHILD_LOG_DEADLINE_SECS) };
    let mut rest = line;
    while !rest.is_empty() {
        // Safe: writes bytes from a valid slice.
        let n = unsafe { libc::write(stderr, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            break; // EINTR (the deadline) or an error: the line is lost
        }
        rest = &rest[n as usize..];
    }
    // Safe: disarms the timer.
    unsafe { libc::alarm(0) };
}

/// A new open file description of the object behind `fd` (the same pipe or terminal), with
/// `O_NONBLOCK` on it alone. Fails (`EACCES`) when the object's mode does not let us open it
/// for writing, as a pipe created by another user.
fn open_private_description(fd: RawFd) -> io::Result<RawFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    open_for_writing_without_blocking(&path)
}

/// A new non-blocking description of our controlling terminal, if `fd` is it (`tcgetsid`
/// fails on any other): `/dev/tty` opens the controlling terminal whoever owns it.
fn open_controlling_terminal(fd: RawFd) -> io::Result<RawFd> {
    // Safe: only queries the descriptor.
    if unsafe { libc::tcgetsid(fd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    open_for_writing_without_blocking(c"/dev/tty")
}

/// `O_NOCTTY`: a terminal must not become our controlling one.
fn open_for_writing_without_blocking(path: &std::ffi::CStr) -> io::Result<RawFd> {
    let flags = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    // Safe: opens a path from a valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The relay pipe: (read end, write end), both non-blocking and close-on-exec.
fn open_relay() -> io::Result<(RawFd, RawFd)> {
    let mut ends = [0; 2];
    // Safe: pipe2 fills two descriptors on success.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((ends[0], ends[1]))
}

/// Moves all of `bytes` to the pipe `stderr` through the relay pipe (`relay_in` its write end,
/// `relay_out` its read end), never waiting for room in `stderr`.
///
/// `SPLICE_F_NONBLOCK` makes a pipe-to-pipe splice fail with `EAGAIN` when `stderr` is full,
/// whatever its description's flags. A splice moves whole relay buffers while `stderr` has a
/// free slot; the relay is empty before each line and a line ([`MAX_LINE`]) fits in one page,
/// so it moves the whole line or nothing. Whatever did not move is read back and dropped, so
/// the relay is empty again for the next line.
fn relay_whole(
    relay_in: RawFd,
    relay_out: RawFd,
    stderr: RawFd,
    bytes: &[u8],
) -> Result<(), Failure> {
    if let Err(failure) = write_whole(Sink::Relayed, relay_in, bytes) {
        empty_relay(relay_out);
        // Nothing reached the log.
        return Err(Failure {
            partial: false,
            ..failure
        });
    }
    let mut moved = 0;
    while moved < bytes.len() {
        // Safe: splice between two descriptors, no offsets (both are pipes).
        let n = unsafe {
            libc::splice(
                relay_out,
                std::ptr::null_mut(),
                stderr,
                std::ptr::null_mut(),
                bytes.len() - moved,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n > 0 {
            moved += n as usize;
            continue;
        }
        let errno = match n {
            0 => libc::EIO, // the relay is empty: do not spin
            _ => io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        };
        if errno != libc::EINTR {
            empty_relay(relay_out);
            return Err(Failure {
                errno,
                partial: moved > 0,
            });
        }
    }
    Ok(())
}

/// Reads and drops what the relay pipe holds (a line that could not be moved).
#[cold]
#[inline(never)]
fn empty_relay(relay_out: RawFd) {
    let mut scrap = [0u8; 4096];
    // Safe: reads into a local buffer; the relay is non-blocking, so this ends at EAGAIN.
    while unsafe { libc::read(relay_out, scrap.as_mut_ptr().cast(), scrap.len()) } > 0 {}
}

/// Writes all of `bytes` with one system call (more only after a short write or EINTR).
fn write_whole(sink: Sink, fd: RawFd, bytes: &[u8]) -> Result<(), Failure> {
    let mut rest = bytes;
    while !rest.is_empty() {
        // Safe: reads `rest.len()` bytes of a valid slice.
        let n = unsafe {
            match sink {
                Sink::Socket => libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                ),
                // For `Relayed`, `fd` is the relay's write end: the first step of `relay_whole`.
                Sink::Stderr | Sink::Private | Sink::Relayed => {
                    libc::write(fd, rest.as_ptr().cast(), rest.len())
                }
            }
        };
        if n > 0 {
            rest = &rest[n as usize..];
            continue;
        }
        let errno = match n {
            0 => libc::EIO, // nothing written and no error: do not spin
            _ => io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        };
        if errno != libc::EINTR {
            return Err(Failure {
                errno,
                partial: rest.len() < bytes.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    fn formatted(message: std::fmt::Arguments<'_>) -> String {
        let mut line = LineBuffer::<MAX_LINE>::cutting();
        let _ = format_line(
            &mut line,
            log::Level::Info,
            std::process::id(),
            &message,
            None,
        );
        String::from_utf8(line.finish().to_vec()).unwrap()
    }

    /// A record in `layout`, cut to `MAX_LINE` if need be, without its newline.
    fn laid_out(layout: Format, message: std::fmt::Arguments<'_>) -> String {
        let mut line = LineBuffer::<MAX_LINE>::cutting();
        let _ = format_line_as(layout, &mut line, log::Level::Warn, 7, &message, None);
        let text = String::from_utf8(line.finish().to_vec()).unwrap();
        text.strip_suffix('\n').unwrap().to_string()
    }

    #[test]
    fn json_lines_stay_valid_with_quotes_controls_and_a_cut() {
        let tricky = format!("say \"hi\" \\ then\n\u{1b}[31m{}", "é".repeat(3000));
        let line = laid_out(Format::Json, format_args!("{tricky}"));
        assert!(line.len() <= MAX_LINE, "{}", line.len());
        let record: serde_json::Value = serde_json::from_str(&line).expect(&line);
        let msg = record["msg"].as_str().unwrap();
        assert!(msg.starts_with("say \"hi\" \\ then\n\u{1b}[31m"), "{msg}");
        assert!(msg.ends_with(" bytes cut]"), "{msg}");
        assert_eq!(record["level"], "warn");
        assert_eq!(record["pid"], 7);
        assert_eq!(record["event"], "log");
        let short = laid_out(Format::Json, format_args!("plain"));
        let record: serde_json::Value = serde_json::from_str(&short).unwrap();
        assert_eq!(record["msg"], "plain");
    }

    #[test]
    fn logfmt_lines_quote_the_message_and_keep_it_one_line() {
        let line = laid_out(Format::Logfmt, format_args!("a \"b\"\nc"));
        assert!(
            line.contains(" level=warn pid=7 event=log msg=\"a \\\"b\\\"\\nc\""),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let long = laid_out(Format::Logfmt, format_args!("{}", "x".repeat(5000)));
        assert!(
            long.len() <= MAX_LINE && long.ends_with(" bytes cut]\""),
            "{long}"
        );
    }

    #[test]
    fn lines_carry_utc_millisecond_time_level_pid_and_message() {
        let line = formatted(format_args!("child 42 for 127.0.0.1:5000"));
        let (time, rest) = line.split_once(' ').unwrap();
        assert_eq!(time.len(), "2026-11-24T22:57:40.180Z".len(), "{line}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{line}");
        let pid = std::process::id();
        assert_eq!(
            rest,
            format!("INFO  forkecho[{pid}] child 42 for 127.0.0.1:5000\n")
        );
    }

    #[test]
    fn a_line_longer_than_the_stack_buffer_is_written_whole() {
        let long = "x".repeat(3 * STACK_LINE);
        let line = formatted(format_args!("{long}"));
        assert!(line.ends_with(&format!("{long}\n")), "{line}");
        // The stack path reports overflow instead of cutting, which sends such a line the
        // long way.
        let mut short = LineBuffer::<STACK_LINE>::stopping_when_full();
        assert!(format_line(
            &mut short,
            log::Level::Info,
            1,
            &format_args!("{long}"),
            None
        )
        .is_err());
    }

    #[test]
    fn a_line_longer_than_the_cap_is_cut_with_a_marker_counting_the_bytes_cut() {
        // Two-byte characters, so the cut has to find a character boundary.
        let huge = "é".repeat(512 * 1024);
        let line = formatted(format_args!("deny [{huge}]"));
        assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        assert!(
            line.len() > MAX_LINE - CUT_MARKER_ROOM,
            "{} bytes",
            line.len()
        );
        let (text, marker) = line.rsplit_once("… [").expect("a cut marker");
        let cut: usize = marker
            .strip_suffix(" bytes cut]\n")
            .expect("marker ends the line")
            .parse()
            .unwrap();
        let kept = text.split_once("deny [").unwrap().1;
        assert_eq!(kept.len() + cut, huge.len() + "]".len());
        assert!(kept.chars().all(|c| c == 'é'));
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn a_line_of_exactly_the_cap_is_not_cut() {
        let prefix = formatted(format_args!("")).len() - 1;
        let fits = "y".repeat(MAX_LINE - CUT_MARKER_ROOM - prefix);
        let line = formatted(format_args!("{fits}"));
        assert!(line.ends_with(&format!("{fits}\n")), "{line}");
        let line = formatted(format_args!("{fits}z"));
        assert!(line.ends_with("… [1 bytes cut]\n"), "{line}");
    }

    #[test]
    fn control_characters_in_a_message_are_escaped_so_the_record_stays_one_line() {
        let line = formatted(format_args!(
            "value `{}`",
            "info\nforged\r\tx\u{1b}[2J\u{7f}\u{9b}1m\u{0}é\u{a0}°\\n"
        ));
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(
            line.ends_with(
                "value `info\\nforged\\r\\tx\\u{1b}[2J\\u{7f}\\u{9b}1m\\u{0}é\u{a0}°\\n`\n"
            ),
            "{line:?}"
        );
        // The stack path escapes the same way.
        let mut short = LineBuffer::<STACK_LINE>::stopping_when_full();
        format_line(&mut short, log::Level::Info, 1, &format_args!("a\nb"), None).unwrap();
        assert!(short.finish().ends_with(b"a\\nb\n"));
    }

    #[test]
    fn escapes_count_against_the_cap_and_are_cut_whole() {
        let prefix = formatted(format_args!("")).len() - 1;
        let room = MAX_LINE - CUT_MARKER_ROOM - prefix;
        // `\u{1b}` is 6 bytes: the last one would need one byte more than is left.
        let text = format!("{}{}", "y".repeat(room - 5), "\u{1b}".repeat(3));
        let line = formatted(format_args!("{text}"));
        assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        assert!(
            line.ends_with(&format!("{}… [18 bytes cut]\n", "y".repeat(room - 5))),
            "{line:?}"
        );
        // Exactly at the cap: kept, not cut.
        let text = format!("{}{}", "y".repeat(room - 6), "\u{1b}");
        let line = formatted(format_args!("{text}"));
        assert!(line.ends_with("y\\u{1b}\n"), "{line:?}");
    }

    /// A pipe whose buffer holds one page, and a `Log` of this process writing into it.
    fn small_pipe_log() -> (Log, OwnedFd, OwnedFd) {
        let (read, write) = nix::unistd::pipe().unwrap();
        // Safe: sets the size of a pipe we own.
        assert!(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } >= 4096);
        let log = Log::new(write.as_raw_fd());
        log.parent_pid.store(std::process::id(), Ordering::Relaxed);
        log.attach().unwrap();
        // `attach` grew it for bursts (`grow_pipe`): back to one page, to fill it quickly.
        // Safe: sets the size of a pipe we own.
        assert!(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } >= 4096);
        (log, read, write)
    }

    fn is_nonblocking(fd: RawFd) -> bool {
        // Safe: reads the status flags of an open descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        flags & libc::O_NONBLOCK != 0
    }

    /// Reads what is available without waiting.
    fn drain(fd: &OwnedFd) -> String {
        let mut file = std::fs::File::from(fd.try_clone().unwrap());
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = file.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).unwrap()
    }

    fn line_of(n: usize) -> Vec<u8> {
        format!("line {n:04} {}\n", "-".repeat(90)).into_bytes()
    }

    #[test]
    fn a_full_pipe_drops_whole_lines_and_the_next_line_through_reports_them_once() {
        let (log, read, write) = small_pipe_log();
        let pid = std::process::id();
        assert_eq!(
            Sink::from_u8(log.sink.load(Ordering::Relaxed)),
            Sink::Private
        );
        for n in 0..100 {
            // With a blocking write this would wait here forever.
            log.write(pid, &line_of(n));
        }
        // Only the parent's own description is non-blocking: the shared one is untouched.
        assert!(!is_nonblocking(write.as_raw_fd()));
        assert!(is_nonblocking(log.fd.load(Ordering::Relaxed)));
        let first = drain(&read);
        let fitted = first.lines().count() as u64;
        assert!(first.ends_with('\n') && fitted < 100, "{first}");
        for (n, text) in first.lines().enumerate() {
            assert_eq!(
                format!("{text}\n").as_bytes(),
                line_of(n),
                "whole lines, in order"
            );
        }
        let dropped = log.dropped.load(Ordering::Relaxed);
        assert_eq!(dropped, 100 - fitted);

        log.write(pid, &line_of(100));
        log.write(pid, &line_of(101));
        let after = drain(&read);
        let lines: Vec<&str> = after.lines().collect();
        assert_eq!(lines.len(), 3, "{after}");
        assert!(
            lines[0].contains(&format!(
                "WARN  forkecho[{pid}] log: {dropped} lines dropped while the log could not \
                 be written (resource temporarily unavailable)"
            )),
            "{after}"
        );
        assert!(lines[1].starts_with("line 0100") && lines[2].starts_with("line 0101"));
        assert_eq!(log.dropped.load(Ordering::Relaxed), dropped);
    }

    /// Makes `log` write through a relay pipe, as it does for a pipe it cannot reopen.
    fn use_relay(log: &Log) {
        let (read, write) = open_relay().unwrap();
        log.fd.store(write, Ordering::Relaxed);
        log.relay.store(read, Ordering::Relaxed);
        log.sink.store(Sink::Relayed as u8, Ordering::Relaxed);
    }

    #[test]
    fn through_the_relay_a_full_pipe_drops_whole_lines_without_blocking() {
        let (log, read, write) = small_pipe_log();
        use_relay(&log);
        let pid = std::process::id();
        for n in 0..100 {
            // fd 2's description is blocking: a write would wait here forever.
            log.write(pid, &line_of(n));
        }
        assert!(!is_nonblocking(write.as_raw_fd()));
        // A one-page pipe has one slot, and a spliced line takes a slot.
        assert_eq!(drain(&read), String::from_utf8(line_of(0)).unwrap());
        assert_eq!(log.dropped.load(Ordering::Relaxed), 99);
        // Dropped lines were emptied out of the relay.
        let mut scrap = [0u8; 1];
        let relay = log.relay.load(Ordering::Relaxed);
        assert_eq!(
            unsafe { libc::read(relay, scrap.as_mut_ptr().cast(), 1) },
            -1
        );

        // Two slots: room for the report and the line after it, in that order.
        // Safe: sets the size of a pipe we own.
        assert!(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 8192) } >= 8192);
        log.write(pid, &line_of(100));
        let after = drain(&read);
        let lines: Vec<&str> = after.lines().collect();
        assert_eq!(lines.len(), 2, "{after}");
        assert!(
            lines[0].contains("log: 99 lines dropped while the log could not be written"),
            "{after}"
        );
        assert_eq!(format!("{}\n", lines[1]).as_bytes(), line_of(100));
        assert_eq!(log.dropped.load(Ordering::Relaxed), 99);
    }

    #[test]
    fn a_line_of_the_cap_moves_through_the_relay_in_one_piece() {
        let (log, read, _write) = small_pipe_log();
        use_relay(&log);
        let line = formatted(format_args!("{}", "r".repeat(2 * MAX_LINE)));
        assert!(
            line.len() > MAX_LINE - CUT_MARKER_ROOM,
            "{} bytes",
            line.len()
        );
        log.write(std::process::id(), line.as_bytes());
        assert_eq!(drain(&read), line);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_stream_socket_drops_whole_lines_without_blocking() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let log = Log::new(ours.as_raw_fd());
        log.parent_pid.store(std::process::id(), Ordering::Relaxed);
        log.attach().unwrap();
        assert_eq!(
            Sink::from_u8(log.sink.load(Ordering::Relaxed)),
            Sink::Socket
        );
        let pid = std::process::id();
        let line = formatted(format_args!("{}", "s".repeat(3000)));
        let mut n = 0;
        while log.dropped.load(Ordering::Relaxed) == 0 {
            log.write(pid, line.as_bytes());
            n += 1;
            assert!(n < 100_000, "the socket never filled");
        }
        assert!(!is_nonblocking(ours.as_raw_fd()));
        theirs.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let _ = (&theirs).read_to_end(&mut got);
        assert_eq!(got.len() % line.len(), 0, "only whole lines");
        log.write(pid, b"after\n");
        let mut got = Vec::new();
        let _ = (&theirs).read_to_end(&mut got);
        let got = String::from_utf8(got).unwrap();
        assert!(
            got.contains("log: 1 line dropped") && got.ends_with("\nafter\n"),
            "{got}"
        );
    }

    /// A new pseudo-terminal: (master, slave).
    fn pty() -> (OwnedFd, OwnedFd) {
        let (mut master, mut slave) = (0, 0);
        // Safe: openpty fills two descriptors we then own.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0);
        // Safe: both were just opened by openpty and belong to nobody else.
        unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
    }

    #[test]
    fn after_a_short_write_to_a_terminal_the_report_starts_on_a_fresh_line() {
        let (master, slave) = pty();
        // Raw: no "\n" -> "\r\n", so what is read is what was written.
        let mut termios = std::mem::MaybeUninit::uninit();
        unsafe {
            libc::tcgetattr(slave.as_raw_fd(), termios.as_mut_ptr());
            libc::cfmakeraw(termios.as_mut_ptr());
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, termios.as_ptr());
        }
        let log = Log::new(slave.as_raw_fd());
        log.parent_pid.store(std::process::id(), Ordering::Relaxed);
        log.attach().unwrap();
        assert_eq!(
            Sink::from_u8(log.sink.load(Ordering::Relaxed)),
            Sink::Private
        );
        assert!(!is_nonblocking(slave.as_raw_fd()));
        let pid = std::process::id();
        let line = line_of(0).repeat(30); // 3000 bytes
        let mut n = 0;
        while log.dropped.load(Ordering::Relaxed) == 0 {
            log.write(pid, &line);
            n += 1;
            assert!(n < 1000, "the terminal never filled");
        }
        // A terminal takes what fits of a line (unlike a pipe): this one ended mid-line.
        assert!(log.mid_line.load(Ordering::Relaxed));
        let _ = drain(&master);
        log.write(pid, b"after\n");
        let got = drain(&master);
        assert!(
            got.starts_with("\n2"),
            "the report starts on a fresh line: {got:?}"
        );
        assert!(
            got.contains("log: 1 line dropped") && got.ends_with("\nafter\n"),
            "{got}"
        );
    }

    /// Another user's terminal (mode 0600, not ours to reopen) that is our controlling one is
    /// written through `/dev/tty`, without blocking. Needs root to become another user; runs
    /// in a child, which takes the terminal as its controlling one in a session of its own.
    #[test]
    fn another_users_controlling_terminal_is_reopened_through_dev_tty() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: only root can become another user");
            return;
        }
        let (_master, slave) = pty();
        // Safe: the child makes system calls only and ends with _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let code = unsafe {
                let fd = slave.as_raw_fd();
                if libc::fchmod(fd, 0o600) != 0
                    || libc::setsid() < 0
                    || libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0
                    || libc::setgid(59_999) != 0
                    || libc::setuid(59_999) != 0
                {
                    10
                } else if open_private_description(fd).is_ok() {
                    11 // the reopen should have been refused
                } else {
                    match open_sink(fd) {
                        Ok((Sink::Private, private, NO_RELAY))
                            if is_nonblocking(private) && !is_nonblocking(fd) =>
                        {
                            0
                        }
                        _ => 12,
                    }
                }
            };
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // Safe: waits for the child we forked.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status), "{status}");
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }

    #[test]
    fn a_full_disk_is_counted_with_its_reason() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let log = Log::new(full.as_raw_fd());
        log.parent_pid.store(std::process::id(), Ordering::Relaxed);
        log.attach().unwrap();
        assert_eq!(
            Sink::from_u8(log.sink.load(Ordering::Relaxed)),
            Sink::Stderr
        );
        log.write(std::process::id(), b"lost\n");
        log.write(std::process::id(), b"lost too\n");
        assert_eq!(log.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(log.last_errno.load(Ordering::Relaxed), libc::ENOSPC);
    }

    #[test]
    fn a_child_writes_to_stderr_itself_and_counts_nothing() {
        let (log, read, _write) = small_pipe_log();
        // Any pid but the one that attached is a child.
        log.write(std::process::id() + 1, b"from a child\n");
        assert_eq!(drain(&read), "from a child\n");
        assert_eq!(log.dropped.load(Ordering::Relaxed), 0);
    }
}

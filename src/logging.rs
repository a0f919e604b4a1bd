//! Operator logs: `log` to stderr, filtered by `env_logger`; the level is the `log_level` key
//! (default `info`), or `RUST_LOG` when that is set.
//!
//! Parent and children share one stderr, so every line names the process that wrote it
//! (`forkecho[<pid>]`), and every line reaches the kernel in one `write(2)`. Writes of up to
//! `PIPE_BUF` (4 KiB) to a pipe are atomic, so lines from different processes never
//! interleave. Per-connection lines are far shorter; only a reload line listing very long
//! `allow`/`deny` lists could pass 4 KiB, and that one may then be split by the kernel.
//!
//! Filtering is env_logger's (the `RUST_LOG` grammar, per-module directives); formatting and
//! writing are ours ([`Logger`]): the line is built in a buffer on the stack and goes straight
//! to file descriptor 2 in one `write(2)`. Why not env_logger's own writer: after each `fork`
//! every page the parent writes is a copy-on-write fault, and env_logger formats into a heap
//! buffer (two or three pages) behind a thread-local and a mutex, then copies it; the parent
//! logs twice per connection (the accept line and the reap line), so that was three faults
//! and about a tenth of the parent's time per connection. Nor `std::io::stderr()`: its lock
//! lives in a static, one more page. fd 2 follows `--log-file` too, which is dup2'ed onto it.

use std::io::Write;

/// Longest line formatted on the stack; a longer one (a status report with many sources) is
/// formatted on the heap instead, still whole and still handed to one `write(2)`.
const STACK_LINE: usize = 512;

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
    log::set_max_level(filter.filter());
    log::set_boxed_logger(Box::new(Logger { filter })).expect("the logger is installed once");
    set_level(level);
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

/// Formats `record` into a stack buffer and writes it whole; a line that does not fit goes
/// the heap way. Write errors are dropped: there is nowhere left to report them.
fn write_line(record: &log::Record<'_>) {
    let mut buffer = [0u8; STACK_LINE];
    let mut line = std::io::Cursor::new(&mut buffer[..]);
    if format_line(&mut line, record).is_ok() {
        let len = line.position() as usize;
        let _ = RawStderr.write_all(&buffer[..len]);
    } else {
        write_long_line(record);
    }
}

#[inline(never)]
#[cold]
fn write_long_line(record: &log::Record<'_>) {
    let mut line = Vec::with_capacity(4 * STACK_LINE);
    if format_line(&mut line, record).is_ok() {
        let _ = RawStderr.write_all(&line);
    }
}

fn format_line(out: &mut impl Write, record: &log::Record<'_>) -> std::io::Result<()> {
    let now = jiff::Timestamp::try_from(std::time::SystemTime::now())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    writeln!(
        out,
        "{now:.3} {:<5} forkecho[{}] {}",
        record.level(),
        // Looked up per line: after fork the same code runs in the child, with its own pid.
        std::process::id(),
        record.args()
    )
}

/// File descriptor 2, written directly: one `write(2)` per line (`write_all` retries partial
/// writes and EINTR).
struct RawStderr;

impl std::io::Write for RawStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Safe: writes bytes from a valid slice to fd 2.
        let n = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Called after a new file was put on fd 2 (log reopen): nothing to refresh yet.
pub fn stderr_replaced() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn formatted(args: std::fmt::Arguments<'_>) -> String {
        let record = log::Record::builder()
            .level(log::Level::Info)
            .args(args)
            .build();
        let mut out = Vec::new();
        format_line(&mut out, &record).unwrap();
        String::from_utf8(out).unwrap()
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
        // The stack path reports overflow instead of truncating, which is what sends such a
        // line the heap way.
        let mut buffer = [0u8; STACK_LINE];
        let mut cursor = std::io::Cursor::new(&mut buffer[..]);
        let overflow = format_line(
            &mut cursor,
            &log::Record::builder().args(format_args!("{long}")).build(),
        );
        assert!(overflow.is_err());
    }
}

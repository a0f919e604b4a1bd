//! Operator logs: `log` + `env_logger` to stderr, level from `RUST_LOG` (default `info`).
//!
//! Parent and children share one stderr, so every line names the process that wrote it
//! (`forkecho[<pid>]`), and every line reaches the kernel in one `write(2)`: env_logger formats
//! the record into a buffer and writes it with a single `write_all`, and with colours compiled
//! out (no `color` feature) nothing splits it. Writes of up to `PIPE_BUF` (4 KiB) to a pipe are
//! atomic, so lines from different processes never interleave.
//!
//! The lines go straight to file descriptor 2 ([`RawStderr`]), not through `std::io::stderr()`:
//! std's handle takes a lock that lives in a static, and after each `fork` the parent's first
//! write to that page is a copy-on-write fault, twice per connection (the accept line and the
//! reap line). fd 2 follows `--log-file` too, which is dup2'ed onto it.

use std::io::Write;

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
    builder
        .target(env_logger::Target::Pipe(Box::new(RawStderr)))
        .format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} forkecho[{}] {}",
                buf.timestamp_millis(),
                record.level(),
                // Looked up per line: after fork the same code runs in the child, with its own pid.
                std::process::id(),
                record.args()
            )
        })
        .init();
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

/// File descriptor 2, written directly: one `write(2)` per line (env_logger calls `write_all`,
/// which retries partial writes and EINTR).
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

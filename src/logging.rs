//! Operator logs: `log` + `env_logger` to stderr, level from `RUST_LOG` (default `info`).
//!
//! Parent and children share one stderr, so every line names the process that wrote it
//! (`forkecho[<pid>]`), and every line reaches the kernel in one `write(2)`: env_logger formats
//! the record into a buffer and writes it with a single `write_all`, and with colours compiled
//! out (no `color` feature) nothing splits it. Writes of up to `PIPE_BUF` (4 KiB) to a pipe are
//! atomic, so lines from different processes never interleave.

use std::io::Write;

/// Installs the logger. Call once, in the parent, before anything forks; children inherit it.
pub fn init() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
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
}

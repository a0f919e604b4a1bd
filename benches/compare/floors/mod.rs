//! The two floors: what the machine does with no supervision at all. Neither logs, limits or
//! reaps by itself, so forkecho's ratio to them is the price of what it does besides echoing.
//!
//! - The mio floor serves every client in one process, without `fork`: the bench binary
//!   re-executed (`--serve-mio-floor PORT`), so the bench itself never forks while it has
//!   threads.
//! - The fork floor is `fork_loop.c`: accept → fork → banner → echo, SIGCHLD ignored, in a
//!   minimal static process. Its size matters: `fork` copies every mapping and page table entry
//!   of the parent, so a floor that forks a large process (such as this bench) is slower than
//!   the limit it stands for.

mod mio_echo;

use std::path::PathBuf;
use std::process::{Command, Stdio};

pub use mio_echo::mio_echo;

/// Table name of the in-process mio echo, the one contender that never forks.
pub const MIO_FLOOR: &str = "mio echo, no fork (floor)";

/// Table name of the C fork loop.
pub const FORK_FLOOR: &str = "minimal C fork loop (floor)";

/// The mio floor on `port`.
pub fn mio_echo_command(port: u16) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("bench binary"));
    c.args(["--serve-mio-floor", &port.to_string()]);
    c
}

/// Compiles `fork_loop.c` with the system C compiler into the target directory: static, else
/// dynamic (slower to fork: more mappings), with a note. None, with a note, without a compiler.
pub fn build_fork_loop() -> Option<PathBuf> {
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/compare/floors/fork_loop.c"
    );
    let program = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fork_loop");
    let compile = |extra: &[&str], stderr: Stdio| {
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&program)
            .args(extra)
            .arg(source)
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
    };
    // Quiet: a system without a static libc is expected, and handled below.
    match compile(&["-static"], Stdio::null()) {
        Ok(status) if status.success() => return Some(program),
        Err(e) => {
            eprintln!("note: no C compiler (cc: {e}); the fork floor is left out");
            return None;
        }
        Ok(_) => {}
    }
    match compile(&[], Stdio::inherit()) {
        Ok(status) if status.success() => {
            eprintln!(
                "note: `cc -static` failed (no static libc?); the fork floor is linked \
                 dynamically, which makes its fork slower"
            );
            Some(program)
        }
        _ => {
            eprintln!("note: `cc -O2 {source}` failed; the fork floor is left out");
            None
        }
    }
}

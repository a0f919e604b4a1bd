//! The floors: what the machine does with no supervision at all. None logs, limits or
//! reaps by itself, so forkecho's ratio to them is the price of what it does besides echoing.
//!
//! - The mio floor serves every client in one process, without `fork`: the bench binary
//!   re-executed (`--serve-mio-floor PORT`), so the bench itself never forks while it has
//!   threads.
//! - The fork floor is `fork_loop.c`: accept → fork → banner → echo, SIGCHLD ignored, in a
//!   minimal static process. Its size matters: `fork` copies every mapping and page table entry
//!   of the parent, so a floor that forks a large process (such as this bench) is slower than
//!   the limit it stands for.
//! - The exec floors are `vfork_exec_loop.c`: accept → vfork → dup2 → execve of the phase's
//!   program, SIGCHLD ignored; and the same loop with `fork`, for reference. For a short session
//!   the program's exec dominates, so this loop is the limit of a server that runs a program.

mod mio_echo;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use mio_echo::mio_echo;

/// Table name of the in-process mio echo, the one contender that never forks.
pub const MIO_FLOOR: &str = "mio echo, no fork (floor)";

/// Table name of the C fork loop.
pub const FORK_FLOOR: &str = "minimal C fork loop (floor)";

/// Table names of the C exec loop, with `vfork` and with `fork`.
pub const VFORK_EXEC_FLOOR: &str = "minimal C vfork+exec loop (floor)";
pub const FORK_EXEC_FLOOR: &str = "minimal C fork+exec loop (floor)";

/// The mio floor on `port`.
pub fn mio_echo_command(port: u16) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("bench binary"));
    c.args(["--serve-mio-floor", &port.to_string()]);
    c
}

/// Compiles `fork_loop.c` (see `build_c_floor`).
pub fn build_fork_loop() -> Option<PathBuf> {
    build_c_floor("fork_loop", "the fork floor")
}

/// Compiles `vfork_exec_loop.c` (see `build_c_floor`): both exec floors run it, one with
/// `vfork`, one with `fork`.
pub fn build_exec_loop() -> Option<PathBuf> {
    build_c_floor("vfork_exec_loop", "the exec floors")
}

/// The exec floor on `port`, running `program` (an absolute path) for each connection, with
/// `vfork` when `vfork` is true, else with `fork`.
pub fn exec_loop_command(floor: &Path, vfork: bool, program: &Path, port: u16) -> Command {
    let mut c = Command::new(floor);
    c.arg(port.to_string())
        .arg(if vfork { "vfork" } else { "fork" })
        .arg(program);
    c
}

/// Compiles `floors/NAME.c` with the system C compiler into the target directory: static, else
/// dynamic (slower to fork: more mappings), with a note. None, with a note naming `what`,
/// without a compiler.
fn build_c_floor(name: &str, what: &str) -> Option<PathBuf> {
    let source = format!(
        "{}/benches/compare/floors/{name}.c",
        env!("CARGO_MANIFEST_DIR")
    );
    let program = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let compile = |extra: &[&str], stderr: Stdio| {
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&program)
            .args(extra)
            .arg(&source)
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
    };
    // Quiet: a system without a static libc is expected, and handled below.
    match compile(&["-static"], Stdio::null()) {
        Ok(status) if status.success() => return Some(program),
        Err(e) => {
            eprintln!("note: no C compiler (cc: {e}); {what} left out");
            return None;
        }
        Ok(_) => {}
    }
    match compile(&[], Stdio::inherit()) {
        Ok(status) if status.success() => {
            eprintln!(
                "note: `cc -static` failed (no static libc?); {what} linked dynamically, \
                 which makes its fork slower"
            );
            Some(program)
        }
        _ => {
            eprintln!("note: `cc -O2 {source}` failed; {what} left out");
            None
        }
    }
}

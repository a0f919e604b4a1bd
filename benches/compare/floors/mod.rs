//! The two floors: what the machine does with no supervision at all (no logging, no reaping,
//! no limits). Both run as re-executions of this binary (`--serve-floor KIND PORT`), so the
//! bench never forks while it has threads.

mod mio_echo;

use std::io::{Read, Write};
use std::process::Command;

pub use mio_echo::mio_echo;

use crate::BANNER;

/// Table name of the in-process mio echo, the one contender that never forks.
pub const MIO_FLOOR: &str = "mio echo, no fork (floor)";

/// Table name of the fork-per-connection loop.
pub const FORK_FLOOR: &str = "bare fork loop (floor)";

/// The floor `kind` ("mio" or "fork") on `port`.
pub fn floor_command(kind: &str, port: u16) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("bench binary"));
    c.args(["--serve-floor", kind, &port.to_string()]);
    c
}

/// The bare fork-per-connection loop: SIGCHLD ignored (the kernel reaps), nothing logged.
pub fn fork_loop(port: u16) -> ! {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    // Safe: sets a disposition; no handler code.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    loop {
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        // Safe: this process is single-threaded (a fresh re-execution of the bench).
        match unsafe { libc::fork() } {
            0 => {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = s.write_all(BANNER);
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                // Safe: ends the child without running the parent's code.
                unsafe { libc::_exit(0) }
            }
            _ => drop(s),
        }
    }
}

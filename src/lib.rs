//! forkecho: a TCP echo server that forks one process per connection and supervises those
//! processes without losing one.
//!
//! # Layout
//! The modules follow the data, from the command line to a client's bytes:
//!
//! - [`config`]: defaults, the TOML file and the flags, merged and validated once. `keys.rs`
//!   defines every key in one row (name, help, default, flag, check, what a reload does with
//!   it); `flags.rs` makes the command line's flags from those rows; `diff.rs` says what a
//!   reload changes, for its log line.
//! - [`logging`]: one whole line per event, tagged with the writing process's pid;
//!   `format.rs` lays it out (`log_format`: text, json, logfmt; the journal's priorities).
//! - [`listen`]: binding the listening sockets (SO_REUSEADDR, backlog, IPv6-only; a UNIX-domain
//!   socket's file: a stale one replaced, ours removed), and accepting from them.
//! - [`server`]: the parent's `mio::Poll` loop: signals first, then accept → admit → fork
//!   (`mod.rs`), one file per concern: `accept.rs` (accepting, admission, waiting, fork
//!   failures), `capacity.rs` (`max_children`), `shutdown.rs` (the three modes, closing
//!   listeners without resets), `reload.rs` (SIGHUP), `headers.rs` (connections waiting for
//!   their PROXY header), `token.rs` (what a poll event is about), `control.rs` (the control
//!   socket), `metrics.rs` (the Prometheus endpoint), `exchange.rs` (the bounded request and
//!   answer table both use), `status.rs` (the status line and the `status` answer),
//!   `upgrade.rs` (the running image's side of an upgrade in place).
//! - [`control`]: the control commands (`status`, `reload`, `stop`, `reopen-logs`, `upgrade`):
//!   their protocol and the client the command line runs.
//! - [`upgrade`]: what passes from one image to the next in an upgrade in place, and the
//!   rollback to the previous one; `crash.rs` rolls back on a native crash too, from a signal
//!   handler prepared in advance.
//! - `proxy`: the PROXY protocol (v1, v2): a listener's policy, and what received bytes say.
//! - `limits`: admission before fork: access rules, per-source and rate limits, refusal
//!   counts; `max_children` pauses accepting instead.
//! - `spawn`: `fork` and the child's hygiene (descriptors, signals, `_exit`): the fork-safety
//!   rules live here.
//! - `conn`: the value that crosses `fork`: the connection and what the parent knows of it,
//!   its peer included (an address, or a local process's credentials).
//! - `handler`: what a child does with its connection; owns its settings, exit codes and
//!   signal policy.
//! - `echo`: the built-in handler, a blocking echo, and the exit code that says how it ended.
//! - `exec`: the other handler, a program per connection (UCSPI-style), started with
//!   `clone(CLONE_VM | CLONE_VFORK)`: its environment, limits, and the steps before `execve`.
//! - `children`: the table of live children, the reaper, the totals, and the deadlines the
//!   parent enforces (a program's `max_session_time`).
//! - `lean_fork`: how an echo session's child starts without costing the parent a
//!   copy-on-write fault afterwards: `clone` onto a stack of its own, the loop's stack frames
//!   not inherited, the connection handed over in a shared slot.
//! - `parent_memory`: where that table lives: memory the children do not inherit (and the
//!   global allocator that puts signal-hook's registry there).
//! - `pending`: accepted connections waiting for a decision (a source at `max_per_source`
//!   whose session may be ending), with a deadline each.
//! - [`preflight`]: `--check-config`'s look at the host (addresses, log and pid file paths).
//! - [`pidfile`]: the locked pid file that keeps a second instance from starting.
//! - [`systemd`]: readiness and status for `Type=notify` (sockets come through [`listen`]).
//! - [`privileges`]: dropping root after binding (setgroups, setgid, setuid).
//! - [`daemon`]: `--daemonize` (detach, then report readiness to the starting command) and
//!   `log_file`.
//! - `unix_diag`: whether a UNIX-domain socket file has a listener, asked of the kernel
//!   (sock_diag) rather than by connecting.
//! - `signals`: signal-hook's self-pipe, what each signal means, and resetting them in a child.
//!
//! `main.rs` only parses the command line, binds (or, started by an upgrade, takes over what
//! the previous image passed on), and hands over to [`server::Server::run`].
//! The modules it uses are public; the rest are private to the crate (`cargo doc
//! --document-private-items` shows them).

mod children;
mod lean_fork;

/// See `parent_memory::ForkAware`.
#[global_allocator]
static ALLOCATOR: parent_memory::ForkAware = parent_memory::ForkAware;
pub mod config;
mod conn;
pub mod control;
pub mod daemon;
mod echo;
mod exec;
mod handler;
mod limits;
pub mod listen;
pub mod logging;
mod parent_memory;
mod pending;
pub mod pidfile;
pub mod preflight;
pub mod privileges;
mod proxy;
pub mod server;
mod signals;
mod spawn;
pub mod systemd;
mod unix_diag;
pub mod upgrade;

/// The version `--version`, `status` and the metrics give: the package's, the commit it was
/// built from, and whether the binary is linked statically.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FORKECHO_COMMIT"),
    ", ",
    env!("FORKECHO_LINKAGE"),
    " build)"
);

/// The commit the binary was built from ("unknown" outside a git checkout).
pub const COMMIT: &str = env!("FORKECHO_COMMIT");

/// "static" or "dynamic".
pub const LINKAGE: &str = env!("FORKECHO_LINKAGE");

/// An OS error as an operator reads it: `address already in use`, without Rust's
/// `(os error 98)` suffix. Errors without an errno are shown as they are.
pub fn os_error_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let text = nix::errno::Errno::from_raw(code).desc();
            let mut chars = text.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => e.to_string(),
            }
        }
        None => e.to_string(),
    }
}

/// What a file that is not a regular file is, as every refusal of one says it ("is a FIFO").
pub fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "something other than a file"
    }
}

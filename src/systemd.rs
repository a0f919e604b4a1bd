//! Telling systemd (`Type=notify`, `Type=notify-reload`) how we are: `READY=1` once listening,
//! `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1` around a reload, `STATUS=` lines an
//! operator sees in `systemctl status`, `STOPPING=1` when a shutdown starts. Without
//! `NOTIFY_SOCKET` in the environment (not started by systemd) every call does nothing.
//!
//! Each call sends one datagram on a socket it opens and closes at once, so no descriptor
//! outlives it (children inherit nothing from here).
//!
//! The send never waits. A datagram socket's receiver holds at most
//! `net.unix.max_dgram_qlen` unread messages (10 by default), and a sender beyond that blocks
//! until the receiver reads: a service manager that is busy, or a `NOTIFY_SOCKET` nobody
//! reads, would otherwise stop the loop at the eleventh status change. sd-notify's `notify`
//! sends blocking, so it only formats the states here; a message that cannot be queued is
//! dropped and counted ([`dropped`]): the next one supersedes it anyway.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};

use sd_notify::NotifyState;

/// Notifications dropped because the service manager's queue was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Listening and serving.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new one-line status for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload has started (`Type=notify-reload` waits for the `READY=1` that ends it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A shutdown has started.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Notifications dropped so far because the service manager did not read them in time.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

fn send(states: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
        return;
    };
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    match send_without_waiting(path.as_bytes(), message.as_bytes()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            log::debug!("sd_notify: the service manager's queue is full; dropped {message:?}");
        }
        Err(e) => log::debug!("sd_notify failed: {e}"),
    }
}

/// Sends `message` to the notification socket at `path` (`@name` is an abstract socket) from
/// a fresh, non-blocking socket.
fn send_without_waiting(path: &[u8], message: &[u8]) -> io::Result<()> {
    let address = match path.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    socket.send_to_addr(message, &address)?;
    Ok(())
}

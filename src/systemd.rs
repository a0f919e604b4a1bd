//! Telling systemd (`Type=notify`) how we are: `READY=1` once listening, `STATUS=` lines an
//! operator sees in `systemctl status`, `STOPPING=1` when a shutdown starts. Without
//! `NOTIFY_SOCKET` in the environment (not started by systemd) every call does nothing.
//!
//! Each call sends one datagram on a socket it opens and closes at once, so no descriptor
//! outlives it (children inherit nothing from here).

use sd_notify::NotifyState;

/// Listening and serving.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new one-line status for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A shutdown has started.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::debug!("sd_notify failed: {e}");
    }
}

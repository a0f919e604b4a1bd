//! SIGHUP: reopen the log, then re-read the configuration and apply it to everything that
//! starts from now on, all or nothing; listeners are added, swapped and removed without
//! resetting a queued client.

use std::collections::HashSet;

use log::{error, info, warn};

use super::shutdown::stop_accepting_everywhere;
use super::{release_startup_memory, Phase, Server};
use crate::config::{describe_changes, Config};
use crate::handler::Handler;
use crate::listen::{ListenAddr, Listener};

impl Server {
    /// SIGHUP or the `reload` command: re-read the configuration and apply it to everything
    /// that starts from now on (sessions already running keep what they were forked with).
    /// All or nothing: a config that does not parse or validate, or a new address that cannot
    /// be bound, is refused and the running configuration stays, listeners included. Returns
    /// the reload's log line, or why it was refused; systemd hears `RELOADING=1` before and
    /// `READY=1` after, either way.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn reload(&mut self, log_reopened: Option<&'static str>) -> Result<String, String> {
        crate::systemd::reloading();
        let outcome = self.reload_configuration(log_reopened);
        match &outcome {
            Ok(_) => self.counts.reloads_applied += 1,
            Err(_) => self.counts.reloads_refused += 1,
        }
        match &outcome {
            Ok(_) => crate::systemd::ready("serving (configuration reloaded)"),
            Err(_) => crate::systemd::ready("serving (reload refused; see the log)"),
        }
        outcome
    }

    fn reload_configuration(
        &mut self,
        log_reopened: Option<&'static str>,
    ) -> Result<String, String> {
        let also = log_reopened.map_or(String::new(), |r| format!(" ({r})"));
        if self.phase != Phase::Serving {
            // Nothing new will start: there is nothing for a configuration to apply to.
            let reason = "the server is shutting down".to_string();
            error!(
                event = "reload", result = "refused", reason:% = reason;
                "reload refused: {reason}{also}"
            );
            return Err(reason);
        }
        let refused = |reason: String| {
            error!(
                event = "reload", result = "refused", reason:% = reason;
                "reload refused: {reason}; the running configuration stays{also}"
            );
            Err(reason)
        };
        let new = match (self.reload)(&self.config) {
            Ok(new) => new,
            Err(e) => return refused(e.to_string()),
        };
        let handler = match Handler::from_config(&new) {
            Ok(handler) => handler,
            Err(e) => return refused(format!("cannot set up the program to run: {e}")),
        };
        // Sockets passed by systemd belong to its .socket unit: `listen` does not apply.
        let serving =
            self.phase == Phase::Serving && !self.listeners.iter().any(|s| s.listener.from_systemd);
        // Bind what is new before anything changes: a failure here leaves all as it was.
        // An address that overlaps one being removed (0.0.0.0:P replacing 127.0.0.1:P) can
        // only be bound once that one is closed: it is swapped in `install_listeners`.
        let (fresh, swapped) = if serving {
            let (swapped, added) = self.addresses_to_add(&new.listen);
            if let Err(reason) = check_swaps_possible(&swapped) {
                return refused(reason);
            }
            match crate::listen::bind_all(&added, &new.bind_settings()) {
                Ok(fresh) => (fresh, swapped),
                Err(e) => return refused(e.to_string()),
            }
        } else {
            (Vec::new(), Vec::new())
        };
        let described = describe_changes(&self.config, &new);
        for warning in described.at_next_start {
            warn!("{warning}");
        }
        let mut changes = described.applied;
        changes.extend(log_reopened.map(str::to_string));
        *self.handler = handler;
        self.headers.fit_to_descriptors();
        self.limits = new.limits.clone();
        // Built here, in the copy the loop reads, not in the configuration's copy.
        self.limits.index_rules();
        self.shutdown_timeout = new.shutdown_timeout;
        self.kill_timeout = new.kill_timeout;
        crate::logging::set_level(new.log_level.filter());
        crate::logging::set_format(new.log_format);
        if serving {
            changes.extend(self.install_listeners(&new, fresh, &swapped));
        }
        // What takes effect only at the next start (pid file, log file, daemon mode, user and
        // group) is still the start's: keep describing that, so a later reload compares with
        // what is in force.
        let mut new = new;
        new.keep_what_waits_for_a_restart(&mut self.config);
        self.config = new;
        let line = match changes.is_empty() {
            true => "reloaded configuration: nothing changed".to_string(),
            false => format!("reloaded configuration: {}", changes.join(", ")),
        };
        info!(event = "reload", result = "applied"; "{line}");
        self.pause_or_resume_at_max_children();
        // A large configuration (a long deny list) was parsed, copied and perhaps replaced:
        // give the freed heap back, or every later fork would copy its page tables.
        release_startup_memory();
        Ok(line)
    }

    /// The addresses of `listen` not listened on yet, split in two: those that overlap a
    /// listener this reload removes (same port, one of them a wildcard), which can be bound
    /// only after it closes, and the rest.
    fn addresses_to_add(&self, listen: &[ListenAddr]) -> (Vec<ListenAddr>, Vec<ListenAddr>) {
        // A listener counts under its configured address and the one it got (port 0 picks a
        // port, which a later configuration may name).
        let current: HashSet<&ListenAddr> = self
            .listeners
            .iter()
            .flat_map(|s| [&s.listener.configured, &s.listener.local])
            .collect();
        let wanted: HashSet<&ListenAddr> = listen.iter().collect();
        let removed: Vec<&ListenAddr> = current.difference(&wanted).copied().collect();
        // A socket file named by another path (a symlink on the way) is the same listener.
        let served = |a: &ListenAddr| self.listeners.iter().any(|s| s.listener.serves(a));
        listen
            .iter()
            .filter(|a| !current.contains(a) && !served(a))
            .cloned()
            .partition(|a| removed.iter().any(|r| r.overlaps(a)))
    }

    /// Reopens `log_file` under its name (after logrotate renamed it), without waiting: a path
    /// that is no longer a regular file is refused and the log stays where it was. Returns
    /// what to add to the reload line, `None` without a log file. Sessions already running
    /// keep writing to the file they inherited until they end.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    pub(super) fn reopen_log_file(&mut self) -> Option<&'static str> {
        let path = self.config.log_file.as_deref()?;
        match crate::daemon::reopen_log(path) {
            Ok(()) => {
                crate::logging::stderr_replaced();
                Some("log_file reopened")
            }
            Err(reason) => {
                error!("cannot reopen log_file: {reason}; logging on to the file open before");
                Some("log_file NOT reopened")
            }
        }
    }

    /// Replaces the listeners by those configured in `new.listen`: keeps the ones still
    /// wanted, adds `fresh` (already bound), and closes the rest, after serving every
    /// connection already queued on them (those clients completed their handshake: closing
    /// the listener would reset them). Then binds `swapped`, the addresses that overlap a
    /// closed one; should that fail, the closed addresses are bound again. Returns what
    /// changed, for the reload's log line.
    fn install_listeners(
        &mut self,
        new: &Config,
        fresh: Vec<Listener>,
        swapped: &[ListenAddr],
    ) -> Vec<String> {
        // Tokens are indexes into `listeners`: take every listener out of the poll set and
        // put the survivors and the new ones back under their new tokens.
        self.set_polling(false);
        let wanted = |l: &Listener| new.listen.iter().any(|a| l.serves(a));
        let (mut kept, dropped): (Vec<Listener>, Vec<Listener>) =
            self.listeners.take_all().into_iter().partition(wanted);
        for listener in &mut kept {
            // Kept under another spelling (the address port 0 gave it, a path through a
            // symlink): that is its configured address from now on.
            if !new.listen.contains(&listener.configured) {
                if let Some(address) = new.listen.iter().find(|a| listener.serves(a)) {
                    listener.configured = address.clone();
                }
            }
        }
        let mut changes = Vec::new();
        let mut closed = Vec::new();
        for mut listener in dropped {
            listener.remove_socket_file();
            self.drain_queue_of(&listener, true);
            stop_accepting_everywhere(&listener);
            info!("stopped listening on {}", listener.local);
            changes.push(format!("listen -{}", listener.local));
            closed.push(listener.configured.clone());
        }
        let mut added = fresh;
        if !swapped.is_empty() {
            added.extend(self.bind_swapped(new, swapped, &closed, &mut changes));
        }
        for listener in &added {
            let address = &listener.local;
            info!(event = "listening", address:% = address; "listening on {address}");
            changes.push(format!("listen +{}", listener.local));
        }
        let mut all: Vec<Listener> = kept.into_iter().chain(added).collect();
        new.assign_proxy_policies(&mut all);
        // All out of the poll set, and all ready: queued connections raise no new edge.
        self.listeners.replace(all);
        if !self.at_capacity {
            self.set_polling(true);
        }
        changes
    }

    /// Binds the addresses that could not be bound while `closed` were open. If that fails,
    /// binds the closed ones that overlap them again, so the port keeps a listener; the
    /// failure is logged and said in the reload line.
    #[inline(never)] // off the accept path: see `HOT_PATH_NOTE`
    fn bind_swapped(
        &mut self,
        new: &Config,
        swapped: &[ListenAddr],
        closed: &[ListenAddr],
        changes: &mut Vec<String>,
    ) -> Vec<Listener> {
        let error = match crate::listen::bind_all(swapped, &new.bind_settings()) {
            Ok(bound) => return bound,
            Err(e) => e,
        };
        let back: Vec<ListenAddr> = closed
            .iter()
            .filter(|c| swapped.iter().any(|s| c.overlaps(s)))
            .cloned()
            .collect();
        let restored = crate::listen::bind_all(&back, &self.config.bind_settings());
        match &restored {
            Ok(_) => error!("reload: {error}; listening on the addresses it replaced again"),
            Err(again) => error!("reload: {error}; and {again}: the port has no listener now"),
        }
        changes.push(format!("FAILED: {error}"));
        restored.unwrap_or_default()
    }
}

/// A swap closes a listener before binding its replacement; refused where the replacement
/// cannot be bound: a privileged port once the privilege is gone (the old address could not
/// be bound again either).
fn check_swaps_possible(swapped: &[ListenAddr]) -> Result<(), String> {
    let start = crate::listen::unprivileged_port_start();
    let privileged = swapped
        .iter()
        .filter_map(ListenAddr::ip)
        .find(|a| a.port() < start);
    match privileged {
        Some(addr) if !crate::listen::can_bind_privileged_ports() => Err(format!(
            "{addr} replaces an overlapping address on a port below {start}, which this \
             process may no longer bind (no CAP_NET_BIND_SERVICE)"
        )),
        _ => Ok(()),
    }
}

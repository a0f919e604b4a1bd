//! Settings: built-in defaults, then the TOML file (`-c`), then command-line flags, each layer
//! overriding the one before. Every key is one row of `keys::TABLE`, which all three layers,
//! the flags' help and the reload line read. Everything is validated here, once, so the rest
//! of the daemon works with values that are known to be sane; an error names where it came
//! from (file or flag), the key, and the reason, quoting a value as it was written.
//!
//! [`Config::load`] is for the start; [`Config::reload`] for SIGHUP, in the parent's loop, so
//! nothing it does may wait: the file is read only if it is a regular file (never a FIFO, a
//! device or a pipe) of at most [`MAX_CONFIG_MIB`] MiB, and no user or group is looked up.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::limits::{Limits, Rate};
use crate::listen::ListenAddr;

mod diff;
mod flags;
mod keys;
pub use diff::{describe_changes, Changes};
pub use flags::{unescape, KeyFlags};

/// Largest config file read, in MiB. A 200,000-entry `deny` list of full IPv6 prefixes is
/// about 10 MiB; the cap keeps a file that is endless or grows while read from eating memory.
pub const MAX_CONFIG_MIB: u64 = 32;
const MAX_CONFIG_BYTES: u64 = MAX_CONFIG_MIB * 1024 * 1024;

/// What errors about a value given by a flag name as its origin.
const COMMAND_LINE: &str = "command line";

/// What errors about a built-in default (a bug: a unit test reads them all) name as origin.
const BUILT_IN: &str = "built-in default";

/// The keys a config file may hold, in the order the documentation lists them.
pub const KEYS: [&str; keys::TABLE.len()] = {
    let mut names = [""; keys::TABLE.len()];
    let mut i = 0;
    while i < keys::TABLE.len() {
        names[i] = keys::TABLE[i].name;
        i += 1;
    }
    names
};

/// One key as its documentation (forkecho.toml(5)) describes it, from its row in
/// `keys::TABLE`.
#[derive(Debug, Clone)]
pub struct KeyReference {
    pub name: &'static str,
    /// `--idle-timeout SECS`, or none for a key of the file only.
    pub flag: Option<String>,
    pub help: &'static str,
    /// As the file would write it; none: unset.
    pub default: Option<&'static str>,
    /// What a reload does when it changes.
    pub on_reload: String,
}

/// Every key, in the order of `--help` and the documentation.
pub fn reference() -> Vec<KeyReference> {
    keys::TABLE.iter().map(keys::Key::reference).collect()
}

/// The command line: the config file, a flag per key (see `keys::TABLE`; a flag given here
/// wins over the file), and what to do.
#[derive(Debug, Parser)]
// A flag given twice takes its last value (a wrapper script may append an override);
// repeatable flags (`--listen`, `--env`, ...) still gather every value.
#[command(name = "forkecho", version = crate::VERSION, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// TOML config file (keys as the long options, in snake_case); a regular file, read again
    /// on each reload (SIGHUP)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub keys: KeyFlags,

    /// Validate the configuration, print `configuration OK` and exit 0 (exit 2 on an error)
    #[arg(long)]
    pub check_config: bool,

    /// Instead of serving: a command to the server running with this configuration, through
    /// its control socket
    #[command(subcommand)]
    pub command: Option<ControlCommand>,
}

/// The control commands (see [`crate::control`]). The server is found through its control
/// socket: `control_socket`, or beside `pid_file`, from `-c FILE` and the flags.
#[derive(Debug, Clone, Copy, clap::Subcommand)]
pub enum ControlCommand {
    /// Show what the running server is doing; exit 3 if none runs
    Status,
    /// Re-read the configuration; exit 1 with the reason if the server refused it
    Reload,
    /// Shut the running server down and wait until it is gone
    Stop {
        /// smart: sessions may finish (up to shutdown_timeout); fast: SIGTERM them;
        /// immediate: SIGKILL them
        #[arg(short, long, value_name = "MODE", default_value = "smart", value_parser = parse_stop_mode)]
        mode: crate::control::Mode,
    },
    /// Reopen log_file (after logrotate renamed it)
    ReopenLogs,
    /// Replace the running binary by the one now on disk, in place, keeping every session;
    /// exit 1 with the reason if the new one was refused (the old one keeps serving)
    Upgrade,
}

impl ControlCommand {
    pub fn command(self) -> crate::control::Command {
        use crate::control::Command;
        match self {
            ControlCommand::Status => Command::Status,
            ControlCommand::Reload => Command::Reload,
            ControlCommand::Stop { mode } => Command::Stop(mode),
            ControlCommand::ReopenLogs => Command::ReopenLogs,
            ControlCommand::Upgrade => Command::Upgrade,
        }
    }
}

fn parse_stop_mode(word: &str) -> Result<crate::control::Mode, String> {
    crate::control::parse_mode(word)
        .ok_or_else(|| format!("`{word}` is not a mode: smart, fast or immediate"))
}

/// The validated settings the daemon runs with.
///
/// `Config::default()` sets nothing (no address, every number 0): it is where the layers
/// start. What forkecho runs with when nothing is configured is [`Config::built_in`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// The file this was read from (`-c`), if any.
    pub file: Option<PathBuf>,
    /// That file's text as it was read: an upgrade runs the next image with it (not with the
    /// file as it is then), and a rollback the previous one.
    pub source: SourceText,
    /// Where to listen; never empty.
    pub listen: Vec<ListenAddr>,
    /// Bytes sent to each client before echoing; empty = none (plain RFC 862 echo).
    pub banner: Vec<u8>,
    /// `listen(2)` backlog.
    pub backlog: u32,
    /// SO_REUSEPORT on the listeners: instances sharing a port, the kernel spreading clients.
    pub reuse_port: bool,
    /// Permission bits of a UNIX-domain socket's file.
    pub unix_socket_mode: u32,
    /// `unix_socket_owner` and `unix_socket_group` as given, looked up at start only.
    unix_socket_owner: Option<String>,
    unix_socket_group: Option<String>,
    /// Their uid and gid, once looked up.
    unix_socket_ids: (Option<u32>, Option<u32>),
    /// Where to write (and lock) the parent's pid; none = no pid file.
    pub pid_file: Option<PathBuf>,
    /// The control commands' socket as given; see [`Config::control_socket_path`].
    control_socket: Option<PathBuf>,
    /// Where the Prometheus metrics are served; none = nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How much to log (unless `RUST_LOG` is set).
    pub log_level: LogLevel,
    /// How log lines are laid out.
    pub log_format: crate::logging::Format,
    /// Where the log goes instead of stderr; none = stderr.
    pub log_file: Option<PathBuf>,
    /// Detach into the background at start.
    pub daemonize: bool,
    /// Who to become after binding; none = stay who we are.
    pub run_as: Option<crate::privileges::Identity>,
    /// `user` and `group` as given, resolved into `run_as` once all layers are applied (at
    /// start only).
    user: Option<String>,
    group: Option<String>,
    /// Idle (and blocked-write) limit of a session; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Grace period for sessions on a smart shutdown.
    pub shutdown_timeout: Duration,
    /// Time sessions get between SIGTERM and SIGKILL on a fast shutdown.
    pub kill_timeout: Duration,
    /// Hard limit on a session's length; `None` = none.
    pub max_session_time: Option<Duration>,
    /// Admission limits, one value the loop reads (and a reload may replace).
    pub limits: Limits,
    /// `max_rate_per_source` as given (0 = off); becomes `limits.rate` with the burst.
    rate_per_second: f64,
    /// `rate_burst` as given, if it was.
    rate_burst: Option<u32>,
    /// `exec`: the program and its arguments as written; none = the built-in echo.
    pub exec: Option<Vec<String>>,
    /// The file `exec` names, found at load (in PATH for a bare name).
    pub program: Option<PathBuf>,
    /// Where a program's fd 2 goes.
    pub session_stderr: crate::exec::Stderr,
    /// Variables added to a program's environment.
    pub env: Vec<(String, String)>,
    /// A program's environment starts empty instead of from forkecho's.
    pub clear_env: bool,
    /// Resource limits a program starts with.
    pub session_limits: Vec<crate::exec::Limit>,
    /// A program's nice value; none = forkecho's.
    pub nice: Option<i32>,
    /// Where a program starts; none = forkecho's working directory.
    pub working_directory: Option<PathBuf>,
    /// PROXY headers on the `listen` addresses (and on sockets systemd passes).
    pub proxy_protocol: crate::proxy::Mode,
    /// Who may send them, unless a `[[listener]]` says otherwise.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// How long a PROXY listener waits for a whole header.
    pub proxy_header_timeout: Duration,
    /// `[[listener]]` tables as given; their addresses join `listen` once merged.
    listener_tables: Vec<ListenerTable>,
    /// The PROXY policy of each address of `listen`, in the same order (see
    /// [`Config::assign_proxy_policies`]).
    listen_policies: Vec<Option<crate::proxy::Policy>>,
    /// The top-level policy, for sockets systemd passes.
    top_policy: Option<crate::proxy::Policy>,
    /// For each address of `listen`, the `[[listener]]` table it came from (1-based), if any.
    listen_tables: Vec<Option<usize>>,
}

/// A config file's text, kept with the configuration read from it. Compared as equal always:
/// it is where the values came from, not a value.
#[derive(Debug, Clone, Default)]
pub struct SourceText(pub Option<std::sync::Arc<str>>);

impl PartialEq for SourceText {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// One `[[listener]]` table: an address, and the PROXY settings that differ from the
/// top-level ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTable {
    pub address: ListenAddr,
    pub proxy_protocol: Option<crate::proxy::Mode>,
    pub trusted_proxies: Option<Vec<ipnet::IpNet>>,
}

impl fmt::Display for ListenerTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.address)?;
        if let Some(mode) = self.proxy_protocol {
            write!(f, " proxy_protocol {mode}")?;
        }
        if let Some(trusted) = &self.trusted_proxies {
            write!(f, " trusted_proxies {trusted:?}")?;
        }
        Ok(())
    }
}

/// `log_level`'s value: a level filter that can start unset (off), so [`Config`] has a
/// `Default`; `keys::TABLE` gives its built-in default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogLevel(Option<log::LevelFilter>);

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        self.0.unwrap_or(log::LevelFilter::Off)
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.filter().fmt(f)
    }
}

/// A configuration problem: where it is, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file's path, or "command line".
    pub origin: String,
    pub key: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: key `{}`: {}", self.origin, key, self.reason),
            None => write!(f, "{}: {}", self.origin, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Every key at its built-in default (`keys::TABLE`), as if no file and no flag set it.
    pub fn built_in() -> Config {
        let mut config = Config::default();
        let defaults: String = keys::TABLE
            .iter()
            .filter_map(|k| Some(format!("{} = {}\n", k.name, k.default?)))
            .collect();
        config
            .apply_toml(BUILT_IN, &defaults)
            .expect("the built-in defaults are valid (a unit test reads them all)");
        config
    }

    /// For the start: defaults, overridden by the config file named on the command line (if
    /// any), overridden by the flags; then `user` and `group` are looked up into `run_as`.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let (mut config, origins) = Config::merge(cli)?;
        config.run_as = config.resolve_identity(&origins)?;
        config.unix_socket_ids = config.resolve_unix_socket_owner(&origins)?;
        config.check_sessions_can_run(&origins, config.run_as.as_ref())?;
        Ok(config)
    }

    /// For an image an upgrade started: [`Config::load`], with the config file's content as
    /// the running image had it (`text`), whatever the file holds now.
    pub fn load_as_running(cli: &Cli, text: Option<&str>) -> Result<Config, ConfigError> {
        let (mut config, origins) = Config::merge_with(cli, text)?;
        config.run_as = config.resolve_identity(&origins)?;
        config.unix_socket_ids = config.resolve_unix_socket_owner(&origins)?;
        config.check_sessions_can_run(&origins, config.run_as.as_ref())?;
        Ok(config)
    }

    /// For `--check-config`: [`Config::load`], then what this host would refuse at start (see
    /// `preflight`), named with the file or flag that set the key, like every other error.
    /// `text`, if given, is the config file's content (an upgrade's check of the running
    /// configuration).
    pub fn check_text(cli: &Cli, text: Option<&str>) -> Result<Config, ConfigError> {
        let (mut config, origins) = Config::merge_with(cli, text)?;
        config.run_as = config.resolve_identity(&origins)?;
        config.unix_socket_ids = config.resolve_unix_socket_owner(&origins)?;
        config.check_sessions_can_run(&origins, config.run_as.as_ref())?;
        // Before an upgrade, the running instance holds its ports, files and sockets, perhaps
        // after dropping root: what the host would refuse a fresh start does not apply.
        if !crate::upgrade::is_upgrade_check() {
            crate::preflight::check(&config).map_err(|p| origins.error(p.key, p.reason))?;
        }
        Ok(config)
    }

    /// [`Config::check_text`] of the file itself.
    pub fn check(cli: &Cli) -> Result<Config, ConfigError> {
        Config::check_text(cli, None)
    }

    /// For a reload: the same layers and checks as [`Config::load`], but `run_as` is kept from
    /// `running` and no name is looked up. Root is gone once serving, so user and group cannot
    /// change anyway, and a lookup (getent, up to 10 s per name) would stall the loop, which
    /// neither accepts nor reaps meanwhile. A change of `user` or `group` is reported by
    /// [`describe_changes`] as one for the next start.
    pub fn reload(cli: &Cli, running: &Config) -> Result<Config, ConfigError> {
        let (mut config, origins) = Config::merge(cli)?;
        config.run_as = running.run_as.clone();
        // Socket files a reload creates are owned as those of the start (no lookup).
        config.unix_socket_ids = running.unix_socket_ids;
        // Already who the sessions run as (root is gone): checked as we are.
        config.check_sessions_can_run(&origins, None)?;
        Ok(config)
    }

    /// Takes from `running` the values of the keys that take effect only at the next start
    /// (pid file, log file, daemon mode, user, group): after a reload they still describe what
    /// is in force.
    pub fn keep_what_waits_for_a_restart(&mut self, running: &mut Config) {
        self.pid_file = running.pid_file.take();
        self.control_socket = running.control_socket.take();
        self.metrics_listen = running.metrics_listen;
        self.log_file = running.log_file.take();
        self.daemonize = running.daemonize;
        self.user = running.user.take();
        self.group = running.group.take();
        self.unix_socket_owner = running.unix_socket_owner.take();
        self.unix_socket_group = running.unix_socket_group.take();
        self.unix_socket_ids = running.unix_socket_ids;
    }

    /// Where the control commands reach the server: `control_socket`, or the pid file's path
    /// ending in `.ctl` (`/run/forkecho.pid` → `/run/forkecho.ctl`); none without either.
    pub fn control_socket_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.control_socket {
            return Some(path.clone());
        }
        let pid_file = self.pid_file.as_ref()?;
        let derived = pid_file.with_extension("ctl");
        if derived == *pid_file {
            let mut name = pid_file.clone().into_os_string();
            name.push(".ctl");
            return Some(PathBuf::from(name));
        }
        Some(derived)
    }

    /// For a control command: the running server's control socket, from the file and flags
    /// it was started with. Only `control_socket` and `pid_file` are read: a file edited into
    /// an invalid state elsewhere must not keep an operator from asking or stopping the
    /// server (`reload` then reports the server's refusal).
    pub fn control_socket_of(cli: &Cli) -> Result<PathBuf, ConfigError> {
        const KEYS: [&str; 2] = ["control_socket", "pid_file"];
        let mut config = Config::default();
        if let Some(path) = &cli.config {
            let origin = path.display().to_string();
            let fail = |key: Option<String>, reason| ConfigError {
                origin: origin.clone(),
                key,
                reason,
            };
            let text = read_config_file(path)
                .and_then(utf8_text)
                .map_err(|reason| fail(None, reason))?;
            match parse_toml(&text) {
                Ok(table) => {
                    let wanted = table
                        .iter()
                        .filter(|(k, _)| KEYS.contains(&k.get_ref().as_str()));
                    for (key, value) in wanted {
                        config
                            .apply_key(key.get_ref(), value.get_ref(), &text[value.span()])
                            .map_err(|reason| fail(Some(key.get_ref().clone()), reason))?;
                    }
                }
                // A file broken by an edit since the start: its two lines may still say where
                // the server is.
                Err((key, reason)) => {
                    let found = plain_string_settings(&text, &KEYS);
                    if found.is_empty() {
                        return Err(fail(key, reason));
                    }
                    for (key, value) in found {
                        let written = format!("{value:?}");
                        config
                            .apply_key(key, &toml::Value::String(value), &written)
                            .map_err(|reason| fail(Some(key.to_string()), reason))?;
                    }
                }
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            for file in [&mut config.pid_file, &mut config.control_socket]
                .into_iter()
                .flatten()
            {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            }
        }
        cli.keys
            .apply_only(&mut config, &KEYS)
            .map_err(|(key, reason)| ConfigError {
                origin: COMMAND_LINE.into(),
                key: Some(key.into()),
                reason,
            })?;
        config.control_socket_path().ok_or_else(|| ConfigError {
            origin: match &cli.config {
                Some(path) => path.display().to_string(),
                None => COMMAND_LINE.into(),
            },
            key: Some("control_socket".into()),
            reason: "not set, and no pid_file to find it beside: give -c FILE (the one the \
                     server runs with), --pid-file or --control-socket"
                .into(),
        })
    }

    /// How sockets are bound now (at start, or a reload's new addresses).
    pub fn bind_settings(&self) -> crate::listen::BindSettings {
        crate::listen::BindSettings {
            backlog: self.backlog,
            reuse_port: self.reuse_port,
            unix_mode: self.unix_socket_mode,
            // The user forkecho drops to owns its socket files, unless told otherwise.
            unix_owner: self
                .unix_socket_ids
                .0
                .or(self.run_as.as_ref().map(|who| who.uid.as_raw())),
            unix_group: self
                .unix_socket_ids
                .1
                .or(self.run_as.as_ref().map(|who| who.gid.as_raw())),
        }
    }

    /// What each session's program is started with, in exec mode.
    pub fn program_settings(&self) -> Option<crate::exec::Settings<'_>> {
        Some(crate::exec::Settings {
            path: self.program.as_deref()?,
            argv: self.exec.as_deref()?,
            env: &self.env,
            clear_env: self.clear_env,
            stderr: self.session_stderr,
            limits: &self.session_limits,
            nice: self.nice,
            working_directory: self.working_directory.as_deref(),
        })
    }

    /// In exec mode: refuses a program the sessions could not start (see
    /// `exec::check_runnable`), checked as `switch_to` if given and we are root (a child
    /// that drops privileges checks), else as we are.
    fn check_sessions_can_run(
        &self,
        origins: &Origins,
        switch_to: Option<&crate::privileges::Identity>,
    ) -> Result<(), ConfigError> {
        let Some(settings) = self.program_settings() else {
            return Ok(());
        };
        let verdict = match switch_to.filter(|_| nix::unistd::geteuid().is_root()) {
            Some(who) => crate::exec::check_runnable_as(who, &settings),
            None => crate::exec::check_runnable(&settings),
        };
        verdict.map_err(|(key, reason)| origins.error(key, reason))
    }

    /// Defaults, file and flags merged, with every rule checked but one: that the user and
    /// group exist. Also returns where each value came from, for the errors of that check.
    fn merge(cli: &Cli) -> Result<(Config, Origins<'_>), ConfigError> {
        Config::merge_with(cli, None)
    }

    /// [`Config::merge`], with `text` as the config file's content instead of reading it.
    fn merge_with<'a>(
        cli: &'a Cli,
        text: Option<&str>,
    ) -> Result<(Config, Origins<'a>), ConfigError> {
        let mut config = Config::built_in();
        config.file = cli.config.clone();
        let mut origins = Origins { cli, file: None };
        if let Some(path) = &cli.config {
            let keys = config.apply_file(path, text)?;
            origins.file = Some((path.display().to_string(), keys));
        }
        // Each flag was checked as clap parsed it; an error here is one more safety net.
        cli.keys
            .apply(&mut config)
            .map_err(|(key, reason)| origins.error(key, reason))?;
        config.settle_listeners(&origins)?;
        config.check_across_keys(&origins)?;
        config.limits.rate = rate(config.rate_per_second, config.rate_burst);
        config.settle_exec_mode(&origins)?;
        Ok((config, origins))
    }

    /// Rules that involve more than one value, checked on the merged result; an error names
    /// where the value at fault was set.
    fn check_across_keys(&self, origins: &Origins) -> Result<(), ConfigError> {
        keys::check_listen_together(&self.listen)
            .map_err(|(i, reason)| self.listen_error(origins, i, reason))?;
        if self.rate_burst.is_some() && self.rate_per_second == 0.0 {
            let reason = "has no effect without max_rate_per_source (a rate above 0)";
            return Err(origins.error("rate_burst", reason.into()));
        }
        if self.group.is_some() && self.user.is_none() {
            return Err(origins.error("group", "needs `user` too".into()));
        }
        Ok(())
    }

    /// Adds the `[[listener]]` addresses to `listen` (which, when only tables are given, holds
    /// just theirs: the default address is not listened on beside them) and works out which
    /// addresses expect a PROXY header, and from whom. A PROXY listener that trusts nobody
    /// would refuse every connection: that is an error.
    fn settle_listeners(&mut self, origins: &Origins) -> Result<(), ConfigError> {
        use crate::proxy::{Mode, Policy};
        if !self.listener_tables.is_empty() && !origins.sets("listen") {
            self.listen.clear();
        }
        let top = Policy {
            mode: self.proxy_protocol,
            trusted: self.trusted_proxies.clone(),
        };
        if top.mode != Mode::Off && top.trusted.is_empty() {
            // Blamed on the key that was set: a missing `trusted_proxies` has no origin.
            let key = match origins.sets("trusted_proxies") {
                true => "trusted_proxies",
                false => "proxy_protocol",
            };
            let reason = format!(
                "proxy_protocol is {}: give at least one trusted proxy in trusted_proxies (the \
                 load balancers' addresses)",
                top.mode
            );
            return Err(origins.error(key, reason));
        }
        let top = (top.mode != Mode::Off).then_some(top);
        self.listen_policies = vec![top.clone(); self.listen.len()];
        self.listen_tables = vec![None; self.listen.len()];
        for (n, table) in self.listener_tables.iter().enumerate() {
            let mode = table.proxy_protocol.unwrap_or(self.proxy_protocol);
            let trusted = table
                .trusted_proxies
                .clone()
                .unwrap_or_else(|| self.trusted_proxies.clone());
            if mode != Mode::Off && trusted.is_empty() {
                let reason = format!(
                    "listener {}: proxy_protocol {mode} needs trusted_proxies",
                    table.address
                );
                return Err(origins.error("listener", reason));
            }
            self.listen.push(table.address.clone());
            self.listen_tables.push(Some(n + 1));
            self.listen_policies
                .push((mode != Mode::Off).then_some(Policy { mode, trusted }));
        }
        self.top_policy = top;
        self.check_no_proxy_on_unix_listeners(origins)
    }

    /// The PROXY protocol is read on TCP listeners only: its trusted proxies are IP
    /// addresses, and a local peer is known by its credentials.
    fn check_no_proxy_on_unix_listeners(&self, origins: &Origins) -> Result<(), ConfigError> {
        let proxied_path = self
            .listen
            .iter()
            .zip(&self.listen_policies)
            .position(|(addr, policy)| matches!(addr, ListenAddr::Unix(_)) && policy.is_some());
        let Some(i) = proxied_path else {
            return Ok(());
        };
        let reason = format!(
            "{}: the PROXY protocol is read on TCP listeners only; give this address its own \
             [[listener]] table with proxy_protocol = \"off\"",
            self.listen[i]
        );
        match self.listen_tables.get(i).copied().flatten() {
            Some(n) => Err(origins.error("listener", format!("listener {n}: {reason}"))),
            None => Err(origins.error("proxy_protocol", reason)),
        }
    }

    /// An error about address `i` of `listen`: named as a `[[listener]]` table's when it came
    /// from one (whose origin is the file), else as `listen`'s.
    fn listen_error(&self, origins: &Origins, i: usize, reason: String) -> ConfigError {
        match self.listen_tables.get(i).copied().flatten() {
            Some(n) => origins.error("listener", format!("listener {n}: {reason}")),
            None => origins.error("listen", reason),
        }
    }

    /// The key an error about address `i` of `listen` names, and a prefix for its reason:
    /// (`listener`, "listener N: ") for a table's address.
    pub fn listen_key_of(&self, i: usize) -> (&'static str, String) {
        match self.listen_tables.get(i).copied().flatten() {
            Some(n) => ("listener", format!("listener {n}: ")),
            None => ("listen", String::new()),
        }
    }

    /// Gives each listener the PROXY policy of its address: a socket systemd passed follows
    /// the top-level keys; a bound one, the entry of `listen` it was bound for, matched by its
    /// configured address or the one port 0 gave it, each entry used once (two port-0
    /// listeners on one address are told apart by their order).
    pub fn assign_proxy_policies(&self, listeners: &mut [crate::listen::Listener]) {
        let mut used = vec![false; self.listen.len()];
        for listener in listeners {
            let unix = matches!(listener.local, ListenAddr::Unix(_));
            listener.proxy = if listener.from_systemd && unix {
                if self.top_policy.is_some() {
                    log::warn!(
                        "{}: the PROXY protocol is read on TCP listeners only; this socket \
                         systemd passed is served without",
                        listener.local
                    );
                }
                None
            } else if listener.from_systemd {
                self.top_policy.clone()
            } else {
                let entry = (0..self.listen.len()).find(|&j| {
                    !used[j]
                        && (self.listen[j] == listener.configured
                            || self.listen[j] == listener.local)
                });
                entry.and_then(|j| {
                    used[j] = true;
                    self.listen_policies[j].clone()
                })
            };
        }
    }

    /// In exec mode: finds the program (in PATH for a bare name), and applies what a program
    /// changes in the other keys: the banner is empty unless set, and `idle_timeout` cannot
    /// apply (a program owns its socket; forkecho never sees whether it is idle), so setting
    /// it is an error rather than a limit silently not enforced. Outside exec mode, the keys
    /// only a program uses are refused when set, for the same reason.
    fn settle_exec_mode(&mut self, origins: &Origins) -> Result<(), ConfigError> {
        let Some(argv) = &self.exec else {
            return self.refuse_program_keys_without_exec(origins);
        };
        let program =
            crate::exec::find_program(&argv[0]).map_err(|reason| origins.error("exec", reason))?;
        self.program = Some(program);
        if let Some(dir) = &self.working_directory {
            match std::fs::metadata(dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) => {
                    let reason = format!(
                        "`{}` is {}, not a directory",
                        dir.display(),
                        crate::file_kind(meta.file_type())
                    );
                    return Err(origins.error("working_directory", reason));
                }
                Err(e) => {
                    let reason = format!("`{}`: {}", dir.display(), crate::os_error_text(&e));
                    return Err(origins.error("working_directory", reason));
                }
            }
        }
        if origins.sets("idle_timeout") && self.idle_timeout.is_some() {
            let reason = "cannot apply to a program, which owns its socket (forkecho never \
                          sees whether it is idle); remove it, or use max_session_time";
            return Err(origins.error("idle_timeout", reason.into()));
        }
        self.idle_timeout = None;
        if !origins.sets("banner") {
            self.banner.clear();
        }
        if self.banner.len() > crate::exec::MAX_BANNER {
            let reason = format!(
                "must be at most {} bytes with a program, not {}: forkecho writes it before \
                 the program starts, without waiting, so it must fit a fresh connection's \
                 send buffer",
                crate::exec::MAX_BANNER,
                self.banner.len()
            );
            return Err(origins.error("banner", reason));
        }
        Ok(())
    }

    /// Outside exec mode, a key only a program uses would be silently ignored: refuse it.
    fn refuse_program_keys_without_exec(&self, origins: &Origins) -> Result<(), ConfigError> {
        let program_keys = [
            "session_stderr",
            "env",
            "clear_env",
            "session_limits",
            "nice",
            "working_directory",
        ];
        match program_keys.into_iter().find(|key| origins.sets(key)) {
            Some(key) => Err(origins.error(
                key,
                "applies only to a program run per connection (`exec`, or `-- PROGRAM`)".into(),
            )),
            None => Ok(()),
        }
    }

    /// Looks `unix_socket_owner` and `unix_socket_group` up (getent; numbers are taken as
    /// they are): only at start, as `user` is.
    fn resolve_unix_socket_owner(
        &self,
        origins: &Origins,
    ) -> Result<(Option<u32>, Option<u32>), ConfigError> {
        let owner = self
            .unix_socket_owner
            .as_deref()
            .map(crate::privileges::uid_of);
        let owner = owner
            .transpose()
            .map_err(|reason| origins.error("unix_socket_owner", reason))?;
        let group = self
            .unix_socket_group
            .as_deref()
            .map(crate::privileges::gid_of);
        let group = group
            .transpose()
            .map_err(|reason| origins.error("unix_socket_group", reason))?;
        Ok((owner, group))
    }

    /// Looks `user` and `group` up (getent): only at start, see [`Config::reload`].
    fn resolve_identity(
        &self,
        origins: &Origins,
    ) -> Result<Option<crate::privileges::Identity>, ConfigError> {
        let Some(user) = &self.user else {
            return Ok(None);
        };
        crate::privileges::resolve(user, self.group.as_deref())
            .map(Some)
            .map_err(|e| origins.error(e.key, e.reason))
    }

    /// Applies the file's keys; returns which keys it set.
    /// Applies the file's keys (its content `text`, if given, instead of reading it); returns
    /// which keys it set.
    fn apply_file(
        &mut self,
        path: &Path,
        text: Option<&str>,
    ) -> Result<HashSet<String>, ConfigError> {
        let origin = path.display().to_string();
        let fail = |reason| ConfigError {
            origin: origin.clone(),
            key: None,
            reason,
        };
        let text = match text {
            Some(text) => text.to_string(),
            None => utf8_text(read_config_file(path).map_err(fail)?).map_err(fail)?,
        };
        let keys = self.apply_toml(&origin, &text)?;
        self.source = SourceText(Some(text.into()));
        // Relative paths in a file mean relative to that file, whatever the working directory
        // is (a daemon's is /), so a reload finds the same files as the start did.
        let dir = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut self.pid_file,
            &mut self.log_file,
            &mut self.working_directory,
            &mut self.control_socket,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        // So is a program named with a slash: `./bin/serve` beside the file.
        if let Some(name) = self.exec.as_mut().and_then(|argv| argv.first_mut()) {
            if name.contains('/') && !name.starts_with('/') && keys.contains("exec") {
                *name = dir.join(&*name).to_string_lossy().into_owned();
            }
        }
        Ok(keys)
    }

    /// Applies the keys of one TOML document; `origin` names it in errors. Returns the keys.
    fn apply_toml(&mut self, origin: &str, text: &str) -> Result<HashSet<String>, ConfigError> {
        let fail = |key: Option<String>, reason| ConfigError {
            origin: origin.to_string(),
            key,
            reason,
        };
        let table = parse_toml(text).map_err(|(key, reason)| fail(key, reason))?;
        let mut keys = HashSet::with_capacity(table.len());
        for (key, value) in table {
            let written = &text[value.span()];
            self.apply_key(key.get_ref(), value.get_ref(), written)
                .map_err(|reason| fail(Some(key.get_ref().clone()), reason))?;
            keys.insert(key.into_inner());
        }
        Ok(keys)
    }

    /// Applies one key of the file; `written` is its value as the file spells it, quoted in
    /// errors.
    fn apply_key(&mut self, name: &str, value: &toml::Value, written: &str) -> Result<(), String> {
        match keys::key(name) {
            Some(key) => (key.set)(self, value, written),
            None => Err(keys::unknown_key(name)),
        }
    }
}

/// Where each value in force came from, for errors about rules across keys: the flag wins
/// over the file, as when the layers were merged.
struct Origins<'a> {
    cli: &'a Cli,
    /// The config file's name and the keys it set.
    file: Option<(String, HashSet<String>)>,
}

impl Origins<'_> {
    /// Whether the file or the command line sets `key` (rather than its default).
    fn sets(&self, key: &str) -> bool {
        self.of(key) != BUILT_IN
    }

    fn of(&self, key: &str) -> String {
        if self.cli.keys.gives(key) {
            return COMMAND_LINE.into();
        }
        match &self.file {
            Some((path, keys)) if keys.contains(key) => path.clone(),
            _ => BUILT_IN.into(),
        }
    }

    fn error(&self, key: &str, reason: String) -> ConfigError {
        ConfigError {
            origin: self.of(key),
            key: Some(key.into()),
            reason,
        }
    }
}

/// The top-level settings of `keys` written as `key = "text"` (a plain string, on one line,
/// before any table), found line by line in a file that does not parse as a whole.
fn plain_string_settings<'k>(text: &str, keys: &[&'k str]) -> Vec<(&'k str, String)> {
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            break;
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let Some(&key) = keys.iter().find(|k| **k == name.trim()) else {
            continue;
        };
        let value = value.trim();
        let quoted = value
            .strip_prefix('"')
            .and_then(|v| v.split_once('"'))
            .filter(|(v, _)| !v.contains('\\'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.split_once('\'')));
        if let Some((value, rest)) = quoted {
            if rest.trim().is_empty() || rest.trim().starts_with('#') {
                found.push((key, value.to_string()));
            }
        }
    }
    found
}

/// The token bucket, or none when the rate is 0. Without an explicit burst a source may open
/// one second's worth of connections at once (at least one).
fn rate(per_second: f64, burst: Option<u32>) -> Option<Rate> {
    (per_second > 0.0).then(|| Rate {
        per_second,
        burst: burst.map_or(per_second.ceil().max(1.0), f64::from),
    })
}

/// Reads a config file without ever waiting on it or holding more than `MAX_CONFIG_BYTES`:
/// this runs in the parent's loop on every reload. Only a regular file is read. A FIFO or
/// a device could block the open or the read, or never end (/dev/zero); and a pipe (`-c
/// <(...)`) is drained by the first read, so a reload would find it empty and fall back to
/// every default, the port included.
fn read_config_file(path: &Path) -> Result<Vec<u8>, String> {
    let cannot_read = |e: std::io::Error| format!("cannot read: {}", crate::os_error_text(&e));
    // Checked before opening, so that a FIFO's writer is not woken by our open; and again
    // on the descriptor, which is what is read, in case the name changed in between.
    require_regular(&std::fs::metadata(path).map_err(cannot_read)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(cannot_read)?;
    let meta = file.metadata().map_err(cannot_read)?;
    require_regular(&meta)?;
    let too_large =
        || format!("is larger than {MAX_CONFIG_MIB} MiB, the most a configuration may be");
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the cap tells a file that grew while being read.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    check_item_count(&bytes)?;
    Ok(bytes)
}

/// Most values and keys a configuration may hold (counted as the `,` `[` `{` `=` bytes that
/// separate them): a 200,000-entry `deny` list has about 200,000.
pub const MAX_CONFIG_ITEMS: usize = 500_000;

/// Refuses a file with more than [`MAX_CONFIG_ITEMS`] items before it is parsed.
///
/// Why: the byte cap does not bound the parse. Parsed TOML costs about 150 bytes per item, so
/// 32 MiB of `deny = [0,0,0,...]` took 2.5 GB and 8 s, inside the parent's loop on a reload.
/// Counting separators is a linear scan with no allocation; one inside a string or comment
/// counts too, which only makes the bound stricter. At the cap the parse takes about 75 MB.
fn check_item_count(bytes: &[u8]) -> Result<(), String> {
    let items = bytes
        .iter()
        .filter(|b| matches!(b, b',' | b'[' | b'{' | b'='))
        .count();
    if items > MAX_CONFIG_ITEMS {
        return Err(format!(
            "holds {items} values and keys (counting each `,` `[` `{{` `=`), more than the \
             {MAX_CONFIG_ITEMS} a configuration may hold"
        ));
    }
    Ok(())
}

/// `Ok` for a regular file, else what it is instead.
fn require_regular(meta: &std::fs::Metadata) -> Result<(), String> {
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(())
    } else if kind.is_fifo() {
        Err(
            "is a FIFO, not a regular file: forkecho must be able to read its configuration \
             again on reload (a pipe reads as empty the second time); give a file"
                .into(),
        )
    } else {
        Err(format!("is {}, not a regular file", crate::file_kind(kind)))
    }
}

/// The file's bytes as text; the first byte that is not UTF-8 is reported where it is.
fn utf8_text(bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let valid = std::str::from_utf8(&e.as_bytes()[..at]).expect("valid up to there");
        format!(
            "{} (byte {} of the file): not UTF-8, which a TOML file must be",
            line_and_column(valid, at),
            at + 1
        )
    })
}

/// "line 3, column 7" of byte `offset` in `text` (columns count characters).
fn line_and_column(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    format!("line {line}, column {column}")
}

/// The top-level keys of a TOML document, each value with its place in `text`. An error is
/// the key (when known) and the reason.
type Document = BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>>;

fn parse_toml(text: &str) -> Result<Document, (Option<String>, String)> {
    toml::from_str(text).map_err(|e| {
        out_of_range_integer(text, &e).unwrap_or_else(|| (None, describe_toml_error(text, &e)))
    })
}

/// "line 3, column 7: <what toml says>", short and on one line.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    match e.span() {
        Some(span) => format!("{}: {message}", line_and_column(text, span.start)),
        None => message.to_string(),
    }
}

/// toml refuses an integer beyond i64 with a message about i128 or u64 types. Say instead
/// that it is out of range, quoting it as written, with the key's own range when the integer
/// is a key's whole value.
fn out_of_range_integer(text: &str, e: &toml::de::Error) -> Option<(Option<String>, String)> {
    let span = e.span()?;
    let literal = text.get(span.clone())?;
    let too_large = integer_beyond_i64(literal)?;
    let Some((key, whole_value)) = key_holding(text, span.clone()) else {
        return Some((None, beyond_i64(text, span.start, literal, too_large)));
    };
    let reason = whole_value
        .then(|| {
            // No key takes an integer this far out: its own check says what it does take.
            let nearest = toml::Value::Integer(if too_large { i64::MAX } else { i64::MIN });
            Config::default().apply_key(&key, &nearest, literal).err()
        })
        .flatten()
        .unwrap_or_else(|| beyond_i64(text, span.start, literal, too_large));
    Some((Some(key), reason))
}

fn beyond_i64(text: &str, offset: usize, literal: &str, too_large: bool) -> String {
    let bound = if too_large {
        format!("too large (integers go up to {})", i64::MAX)
    } else {
        format!("too small (integers go down to {})", i64::MIN)
    };
    format!("{}: {literal} is {bound}", line_and_column(text, offset))
}

/// For a TOML integer literal outside i64: whether it is too large (else too small). `None`
/// for anything else.
fn integer_beyond_i64(literal: &str) -> Option<bool> {
    let negative = literal.starts_with('-');
    let unsigned = literal.trim_start_matches(['+', '-']);
    let (digits, radix) = match unsigned.get(..2) {
        Some("0x") => (&unsigned[2..], 16),
        Some("0o") => (&unsigned[2..], 8),
        Some("0b") => (&unsigned[2..], 2),
        _ => (unsigned, 10),
    };
    let digits: String = digits.chars().filter(|&c| c != '_').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let sign = if negative { "-" } else { "" };
    let fits = i64::from_str_radix(&format!("{sign}{digits}"), radix).is_ok();
    (!fits).then_some(!negative)
}

/// The top-level key whose value holds `span`, and whether the value is exactly `span`:
/// found by parsing again with `0` in its place, and in the place of every other integer
/// beyond i64 the parser meets (`None` if the rest does not parse for another reason). Each
/// `0` is padded with spaces to the literal's length, so that every offset stays where it was.
fn key_holding(text: &str, span: std::ops::Range<usize>) -> Option<(String, bool)> {
    let zero = |text: &mut String, span: std::ops::Range<usize>| {
        let padded = format!("0{}", " ".repeat(span.len() - 1));
        text.replace_range(span, &padded);
    };
    let mut patched = text.to_string();
    zero(&mut patched, span.clone());
    // Each round removes one literal; the text cannot hold more than its length of them.
    let document: Document = loop {
        match toml::from_str(&patched) {
            Ok(document) => break document,
            Err(e) => {
                let other = e.span()?;
                integer_beyond_i64(patched.get(other.clone())?)?;
                zero(&mut patched, other);
            }
        }
    };
    document
        .into_iter()
        .find(|(_, value)| value.span().contains(&span.start))
        .map(|(key, value)| {
            (
                key.into_inner(),
                value.span() == (span.start..span.start + 1),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut c = Config::built_in();
        c.apply_toml("test.toml", text)?;
        Ok(c)
    }

    fn reason(text: &str) -> String {
        from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn every_key_is_read() {
        let c = from_toml(
            r#"
            listen = ["127.0.0.1:1", "[::1]:2"]
            banner = ""
            backlog = 7
            idle_timeout = 0
            shutdown_timeout = 1.5
            max_session_time = 60
            max_children = 3
            max_per_source = 0
            source_prefix_v4 = 24
            source_prefix_v6 = 48
            allow = ["127.0.0.0/8", "::1"]
            deny = ["127.0.0.2"]
            max_rate_per_source = 2.5
            rate_burst = 4
            refusal_message = "busy\n"
            reuse_port = true
            "#,
        )
        .unwrap();
        assert_eq!(c.max_session_time, Some(Duration::from_secs(60)));
        assert_eq!(c.limits.max_children, 3);
        assert!(c.reuse_port);
        assert_eq!(c.limits.max_per_source, 0);
        assert_eq!(c.limits.source_prefix_v6, 48);
        assert_eq!(c.limits.allow.len(), 2);
        assert_eq!(c.limits.deny[0].to_string(), "127.0.0.2/32");
        assert_eq!(c.limits.refusal_message, b"busy\n");
        assert_eq!(
            rate(c.rate_per_second, c.rate_burst),
            Some(Rate {
                per_second: 2.5,
                burst: 4.0
            })
        );
        assert_eq!(rate(2.5, None).unwrap().burst, 3.0);
        assert_eq!(rate(0.0, Some(5)), None);
        assert_eq!(c.listen.len(), 2);
        assert!(c.banner.is_empty());
        assert_eq!(c.backlog, 7);
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.shutdown_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn errors_name_origin_key_and_reason() {
        let e = from_toml("bogus = 1").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("bogus"));
        assert!(e
            .to_string()
            .starts_with("test.toml: key `bogus`: unknown key"));
        let e = from_toml("backlog = \"many\"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "test.toml: key `backlog`: expected an integer, found string \"many\""
        );
        let e = from_toml("backlog = 0").unwrap_err();
        assert!(e.reason.contains("from 1 to 65535"), "{e}");
        let e = from_toml("listen = [\"localhost\"]").unwrap_err();
        assert!(e.reason.contains("`localhost`"), "{e}");
        let e = from_toml("idle_timeout = -1").unwrap_err();
        assert!(e.reason.contains("seconds"), "{e}");
    }

    #[test]
    fn syntax_errors_give_a_line() {
        let e = from_toml("backlog = 5\nlisten = [\n").unwrap_err();
        assert_eq!(e.key, None);
        assert!(
            e.reason.starts_with("line 2") || e.reason.starts_with("line 3"),
            "{e}"
        );
    }

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("forkecho").chain(args.iter().copied())).unwrap()
    }

    /// The reason clap reports for a bad flag: the key's own check, as for a file.
    fn flag_error(args: &[&str]) -> String {
        let e = Cli::try_parse_from(std::iter::once("forkecho").chain(args.iter().copied()))
            .unwrap_err();
        let text = e.to_string();
        let line = text.lines().next().unwrap();
        line.split_once("': ")
            .map_or(line, |(_, reason)| reason)
            .to_string()
    }

    #[test]
    fn a_reload_looks_up_no_user_and_keeps_who_we_run_as() {
        // A user that does not exist: a lookup would fail, so success proves there was none.
        let args = cli(&[
            "--user",
            "no-such-user-forkecho",
            "--group",
            "no-such-group",
        ]);
        let e = Config::load(&args).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("command line: key `user`: no user"),
            "{e}"
        );
        let running = Config {
            run_as: Some(crate::privileges::Identity {
                user: "nobody".into(),
                uid: nix::unistd::Uid::from_raw(65534),
                gid: nix::unistd::Gid::from_raw(65534),
            }),
            user: Some("nobody".into()),
            ..Config::default()
        };
        let reloaded = Config::reload(&args, &running).unwrap();
        assert_eq!(reloaded.run_as, running.run_as);
        // Everything else is still checked.
        let e = Config::reload(&cli(&["--group", "nogroup"]), &running).unwrap_err();
        assert_eq!(e.to_string(), "command line: key `group`: needs `user` too");
    }

    #[test]
    fn a_flag_given_twice_takes_its_last_value_and_lists_gather() {
        let args = cli(&[
            "--backlog",
            "5",
            "--backlog",
            "7",
            "-l",
            "127.0.0.1:1",
            "-l",
            "127.0.0.1:2",
            "--reuse-port",
            "--reuse-port",
        ]);
        let c = Config::load(&args).unwrap();
        assert_eq!(c.backlog, 7);
        assert_eq!(c.listen.len(), 2);
        assert!(c.reuse_port);
        // A switch takes `=false`, to override a file's `true`.
        let off = Config::load(&cli(&["--reuse-port", "--reuse-port=false"])).unwrap();
        assert!(!off.reuse_port);
        assert!(Cli::try_parse_from(["forkecho", "--reuse-port=maybe"]).is_err());
    }

    #[test]
    fn integers_beyond_a_key_or_beyond_toml_are_quoted_as_written() {
        assert_eq!(
            reason("max_children = 99999999999999999999"),
            "test.toml: key `max_children`: must be from 1 to 1000000, not 99999999999999999999"
        );
        assert_eq!(
            reason("backlog = -9_223_372_036_854_775_809"),
            "test.toml: key `backlog`: must be from 1 to 65535, not -9_223_372_036_854_775_809"
        );
        assert_eq!(
            reason("x = 1\ndeny = [\n  0x7fffffffffffffffff,\n]"),
            "test.toml: key `deny`: line 3, column 3: 0x7fffffffffffffffff is too large \
             (integers go up to 9223372036854775807)"
        );
        assert!(reason("max_children = 99999999999").ends_with("not 99999999999"));
        // Two of them: the one the parser reports is named with its key.
        assert_eq!(
            reason("source_prefix_v4 = 99999999999999999999\nbacklog = 99999999999999999999"),
            "test.toml: key `backlog`: must be from 1 to 65535, not 99999999999999999999"
        );
        // Exact as written, not as the f64 it becomes (which is 9007199254740992).
        assert!(reason("idle_timeout = 9007199254740993").ends_with("not 9007199254740993"));
        assert!(reason("kill_timeout = 1e300").ends_with("not 1e300"));
        assert!(reason("max_rate_per_source = 2e6").ends_with("not 2e6"));
        assert!(reason("banner = 99999999999999999999")
            .ends_with("expected a string, found integer 99999999999999999999"));
        assert_eq!(
            flag_error(&["--max-children", "99999999999999999999"]),
            "must be from 1 to 1000000, not 99999999999999999999"
        );
        assert_eq!(
            flag_error(&["--idle-timeout", "9007199254740993"]),
            "must be a number of seconds from 0 to 31536000, not 9007199254740993"
        );
    }

    #[test]
    fn timeouts_between_0_and_a_millisecond_are_refused() {
        assert_eq!(
            reason("idle_timeout = 0.0005"),
            "test.toml: key `idle_timeout`: must be 0 (never) or at least 0.001 s, not 0.0005"
        );
        assert!(reason("shutdown_timeout = 1e-9").contains("must be 0 (at once) or at least"));
        assert!(flag_error(&["--idle-timeout", "0.0009"]).contains("at least 0.001 s"));
        assert!(flag_error(&["--kill-timeout", "5e-324"]).contains("0 (at once) or at least"));
        let c = from_toml("idle_timeout = 0.001\nmax_session_time = 0").unwrap();
        assert_eq!(c.idle_timeout, Some(Duration::from_millis(1)));
        assert_eq!(c.max_session_time, None);
    }

    #[test]
    fn a_nul_in_a_path_or_a_name_is_refused() {
        for key in ["pid_file", "log_file", "user", "group"] {
            let e = reason(&format!("{key} = \"a\\u0000b\""));
            assert_eq!(
                e,
                format!("test.toml: key `{key}`: \"a\\0b\" contains a NUL byte")
            );
        }
    }

    #[test]
    fn rate_burst_without_a_rate_is_refused_wherever_it_is_set() {
        let e = Config::load(&cli(&["--rate-burst", "5"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "command line: key `rate_burst`: has no effect without max_rate_per_source \
             (a rate above 0)"
        );
        let e = Config::load(&cli(&["--rate-burst", "5", "--max-rate-per-source", "0"]));
        assert!(e.is_err());
        let ok = Config::load(&cli(&["--rate-burst", "5", "--max-rate-per-source", "0.5"]));
        assert_eq!(ok.unwrap().limits.rate.unwrap().burst, 5.0);
    }

    #[test]
    fn the_first_byte_that_is_not_utf8_is_located() {
        let e = utf8_text(b"a = 1\nbanner = \"\xc3\xa9\xff\"\n".to_vec()).unwrap_err();
        assert_eq!(
            e,
            "line 2, column 12 (byte 19 of the file): not UTF-8, which a TOML file must be"
        );
    }

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("forkecho-config-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn only_a_regular_file_of_at_most_the_cap_is_read() {
        let dir = Scratch::new("read");
        let fifo = dir.0.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let many = format!("deny = [{}0]\n", "0,".repeat(MAX_CONFIG_ITEMS));
        let e = check_item_count(many.as_bytes()).unwrap_err();
        assert!(e.contains("more than the 500000"), "{e}");
        assert!(check_item_count(b"deny = [\"10.0.0.1\", \"10.0.0.2\"]\n").is_ok());
        let e = read_config_file(&fifo).unwrap_err();
        assert!(e.starts_with("is a FIFO, not a regular file"), "{e}");
        let e = read_config_file(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e, "is a character device, not a regular file");
        let e = read_config_file(&dir.0).unwrap_err();
        assert_eq!(e, "is a directory, not a regular file");
        let big = dir.0.join("big.toml");
        let file = std::fs::File::create(&big).unwrap();
        file.set_len(MAX_CONFIG_BYTES + 1).unwrap(); // sparse: nothing is written
        let e = read_config_file(&big).unwrap_err();
        assert_eq!(e, "is larger than 32 MiB, the most a configuration may be");
        file.set_len(MAX_CONFIG_BYTES).unwrap();
        assert_eq!(
            read_config_file(&big).unwrap().len() as u64,
            MAX_CONFIG_BYTES
        );
        let empty = dir.0.join("empty.toml");
        std::fs::write(&empty, "").unwrap();
        assert_eq!(read_config_file(&empty), Ok(Vec::new()));
    }
}

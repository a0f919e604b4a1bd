//! Settings: built-in defaults, then the TOML file (`-c`), then command-line flags, each layer
//! overriding the one before. Everything is validated here, once, so the rest of the daemon
//! works with values that are known to be sane; an error names where it came from (file or
//! flag), the key, and the reason, quoting a value as it was written.
//!
//! [`Config::load`] is for the start; [`Config::reload`] for SIGHUP, in the parent's loop, so
//! nothing it does may wait: the file is read only if it is a regular file (never a FIFO, a
//! device or a pipe) of at most [`MAX_CONFIG_MIB`] MiB, and no user or group is looked up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

use crate::limits::{self, Limits, Rate};

mod diff;
pub use diff::describe_changes;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2333";
pub const DEFAULT_BANNER: &str = "connect successful!\n";
pub const DEFAULT_BACKLOG: u32 = 1024;
pub const DEFAULT_IDLE_TIMEOUT_SECS: f64 = 300.0;
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: f64 = 10.0;
pub const DEFAULT_KILL_TIMEOUT_SECS: f64 = 2.0;

/// Longest timeout accepted anywhere (one year): keeps `Duration` arithmetic far from overflow.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Shortest timeout other than 0. A socket timeout below the kernel's tick rounds to 0, which
/// means "wait forever": the opposite of what a tiny timeout asks for.
const MIN_SECONDS: f64 = 0.001;

/// Largest config file read, in MiB. A 200,000-entry `deny` list of full IPv6 prefixes is
/// about 10 MiB; the cap keeps a file that is endless or grows while read from eating memory.
pub const MAX_CONFIG_MIB: u64 = 32;
const MAX_CONFIG_BYTES: u64 = MAX_CONFIG_MIB * 1024 * 1024;

/// What errors about a value given by a flag name as its origin.
const COMMAND_LINE: &str = "command line";

/// The keys a config file may hold, in the order the documentation lists them (the names of
/// [`TABLE`]'s rows).
pub const KEYS: [&str; TABLE.len()] = {
    let mut keys = [""; TABLE.len()];
    let mut i = 0;
    while i < TABLE.len() {
        keys[i] = TABLE[i].name;
        i += 1;
    }
    keys
};

/// One configuration key: how a file's value sets it and how its flag does. Every key is one
/// row of [`TABLE`], which the file's parser, the flags' merge and the errors' origins all
/// read; adding a key is a row here, a field in [`Cli`] and [`Config`], and the docs.
struct Key {
    /// The file's key; the flag is the same in kebab-case.
    name: &'static str,
    /// Sets the key from a file's `value`; `written` is the value as the file spells it,
    /// quoted in errors (a number read as f64 could otherwise come back rounded).
    from_file: fn(&mut Config, &toml::Value, &str) -> Result<(), String>,
    /// Sets the key from its flag if the command line gives it (clap's value parsers ran the
    /// same checks as the file's); true if it did.
    from_flag: fn(&mut Config, &Cli) -> bool,
}

impl Key {
    /// Whether the command line gives this key (and so overrides the file's).
    fn flag_given(&self, cli: &Cli) -> bool {
        (self.from_flag)(&mut Config::default(), cli)
    }
}

/// `Some(x)` from a flag: applies it and says so.
fn set<T>(from: Option<T>, to: impl FnOnce(T)) -> bool {
    from.map(to).is_some()
}

/// Every key, in the order the documentation lists them.
const TABLE: [Key; 23] = [
    Key {
        name: "listen",
        from_file: |c, v, w| {
            c.listen = listen_from_toml(v, w)?;
            Ok(())
        },
        from_flag: |c, cli| {
            set((!cli.listen.is_empty()).then(|| cli.listen.clone()), |x| {
                c.listen = x
            })
        },
    },
    Key {
        name: "banner",
        from_file: |c, v, w| {
            c.banner = expect_str(v, w)?.as_bytes().to_vec();
            Ok(())
        },
        from_flag: |c, cli| set(cli.banner.as_ref(), |x| c.banner = x.as_bytes().to_vec()),
    },
    Key {
        name: "backlog",
        from_file: |c, v, w| {
            c.backlog = check_backlog(expect_int(v, w)?, w)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.backlog, |x| c.backlog = x),
    },
    Key {
        name: "idle_timeout",
        from_file: |c, v, w| {
            c.idle_timeout = never_if_zero(check_seconds(number(v, w)?, w, NEVER)?);
            Ok(())
        },
        from_flag: |c, cli| set(cli.idle_timeout, |x| c.idle_timeout = never_if_zero(x)),
    },
    Key {
        name: "shutdown_timeout",
        from_file: |c, v, w| {
            c.shutdown_timeout = check_seconds(number(v, w)?, w, AT_ONCE)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.shutdown_timeout, |x| c.shutdown_timeout = x),
    },
    Key {
        name: "kill_timeout",
        from_file: |c, v, w| {
            c.kill_timeout = check_seconds(number(v, w)?, w, AT_ONCE)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.kill_timeout, |x| c.kill_timeout = x),
    },
    Key {
        name: "max_session_time",
        from_file: |c, v, w| {
            c.max_session_time = never_if_zero(check_seconds(number(v, w)?, w, NEVER)?);
            Ok(())
        },
        from_flag: |c, cli| {
            set(cli.max_session_time, |x| {
                c.max_session_time = never_if_zero(x)
            })
        },
    },
    Key {
        name: "max_children",
        from_file: |c, v, w| {
            c.limits.max_children = check_max_children(expect_int(v, w)?, w)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.max_children, |x| c.limits.max_children = x),
    },
    Key {
        name: "max_per_source",
        from_file: |c, v, w| {
            c.limits.max_per_source = check_count(expect_int(v, w)?, w)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.max_per_source, |x| c.limits.max_per_source = x),
    },
    Key {
        name: "source_prefix_v4",
        from_file: |c, v, w| {
            c.limits.source_prefix_v4 = check_prefix_len(expect_int(v, w)?, w, 32)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.source_prefix_v4, |x| c.limits.source_prefix_v4 = x),
    },
    Key {
        name: "source_prefix_v6",
        from_file: |c, v, w| {
            c.limits.source_prefix_v6 = check_prefix_len(expect_int(v, w)?, w, 128)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.source_prefix_v6, |x| c.limits.source_prefix_v6 = x),
    },
    Key {
        name: "allow",
        from_file: |c, v, w| {
            c.limits.allow = prefixes_from_toml(v, w)?;
            Ok(())
        },
        from_flag: |c, cli| {
            set((!cli.allow.is_empty()).then(|| cli.allow.clone()), |x| {
                c.limits.allow = x
            })
        },
    },
    Key {
        name: "deny",
        from_file: |c, v, w| {
            c.limits.deny = prefixes_from_toml(v, w)?;
            Ok(())
        },
        from_flag: |c, cli| {
            set((!cli.deny.is_empty()).then(|| cli.deny.clone()), |x| {
                c.limits.deny = x
            })
        },
    },
    Key {
        name: "max_rate_per_source",
        from_file: |c, v, w| {
            c.rate_per_second = check_rate(number(v, w)?, w)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.max_rate_per_source, |x| c.rate_per_second = x),
    },
    Key {
        name: "rate_burst",
        from_file: |c, v, w| {
            c.rate_burst = Some(check_burst(expect_int(v, w)?, w)?);
            Ok(())
        },
        from_flag: |c, cli| set(cli.rate_burst, |x| c.rate_burst = Some(x)),
    },
    Key {
        name: "refusal_message",
        from_file: |c, v, w| {
            c.limits.refusal_message = check_refusal_message(expect_str(v, w)?)?.into();
            Ok(())
        },
        from_flag: |c, cli| {
            set(cli.refusal_message.as_ref(), |x| {
                c.limits.refusal_message = x.as_bytes().to_vec()
            })
        },
    },
    Key {
        name: "reuse_port",
        from_file: |c, v, w| {
            c.reuse_port = expect_bool(v, w)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.reuse_port.then_some(true), |x| c.reuse_port = x),
    },
    Key {
        name: "pid_file",
        from_file: |c, v, w| {
            c.pid_file = Some(PathBuf::from(expect_name(v, w)?));
            Ok(())
        },
        from_flag: |c, cli| set(cli.pid_file.as_ref(), |x| c.pid_file = Some(x.clone())),
    },
    Key {
        name: "log_level",
        from_file: |c, v, w| {
            c.log_level = parse_log_level(expect_str(v, w)?)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.log_level, |x| c.log_level = x),
    },
    Key {
        name: "log_file",
        from_file: |c, v, w| {
            c.log_file = Some(PathBuf::from(expect_name(v, w)?));
            Ok(())
        },
        from_flag: |c, cli| set(cli.log_file.as_ref(), |x| c.log_file = Some(x.clone())),
    },
    Key {
        name: "daemonize",
        from_file: |c, v, w| {
            c.daemonize = expect_bool(v, w)?;
            Ok(())
        },
        from_flag: |c, cli| set(cli.daemonize.then_some(true), |x| c.daemonize = x),
    },
    Key {
        name: "user",
        from_file: |c, v, w| {
            c.user = Some(expect_name(v, w)?.to_string());
            Ok(())
        },
        from_flag: |c, cli| set(cli.user.as_ref(), |x| c.user = Some(x.clone())),
    },
    Key {
        name: "group",
        from_file: |c, v, w| {
            c.group = Some(expect_name(v, w)?.to_string());
            Ok(())
        },
        from_flag: |c, cli| set(cli.group.as_ref(), |x| c.group = Some(x.clone())),
    },
];

/// The row of `name`, if it is a key.
fn key(name: &str) -> Option<&'static Key> {
    TABLE.iter().find(|k| k.name == name)
}

/// Longest refusal message: it is written once to a non-blocking socket, so it must fit
/// in an empty send buffer with room to spare.
const MAX_REFUSAL_MESSAGE: usize = 1024;

/// The command line. Every option is also a config-file key; a flag given here wins.
#[derive(Debug, Parser)]
#[command(name = "forkecho", version, about, long_about = None)]
pub struct Cli {
    /// TOML config file (keys as the long options, in snake_case); a regular file, read again
    /// on each reload (SIGHUP)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on, IP:PORT (`[::1]:PORT` for IPv6); repeatable; port 0 picks a free port
    /// [default: 127.0.0.1:2333]
    #[arg(short = 'l', long = "listen", value_name = "ADDR", value_parser = parse_addr)]
    pub listen: Vec<SocketAddr>,

    /// Greeting sent to each client; \n \r \t \\ are interpreted; "" sends nothing
    /// [default: "connect successful!\n"]
    #[arg(long, value_name = "TEXT", value_parser = unescape)]
    pub banner: Option<String>,

    /// Listen backlog: connections the kernel queues before forkecho accepts them [default: 1024]
    #[arg(long, value_name = "N", value_parser = parse_backlog)]
    pub backlog: Option<u32>,

    /// Close a session after this many seconds without input, or with a write blocked this long;
    /// 0 = never [default: 300]
    #[arg(long, value_name = "SECS", value_parser = parse_limit_seconds)]
    pub idle_timeout: Option<Duration>,

    /// On SIGTERM (smart shutdown), seconds sessions get to finish before a fast shutdown
    /// [default: 10]
    #[arg(long, value_name = "SECS", value_parser = parse_grace_seconds)]
    pub shutdown_timeout: Option<Duration>,

    /// On shutdown, seconds between the SIGTERM and the SIGKILL sent to sessions [default: 2]
    #[arg(long, value_name = "SECS", value_parser = parse_grace_seconds)]
    pub kill_timeout: Option<Duration>,

    /// End a session after this many seconds whatever it is doing; 0 = no limit [default: 0]
    #[arg(long, value_name = "SECS", value_parser = parse_limit_seconds)]
    pub max_session_time: Option<Duration>,

    /// Most sessions at once; at the limit new clients wait in the backlog [default: 1024]
    #[arg(long, value_name = "N", value_parser = parse_max_children)]
    pub max_children: Option<usize>,

    /// Most sessions at once from one source; more are refused; 0 = no limit [default: 32]
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub max_per_source: Option<usize>,

    /// IPv4 addresses sharing this prefix length count as one source [default: 32]
    #[arg(long, value_name = "LEN", value_parser = parse_prefix_v4)]
    pub source_prefix_v4: Option<u8>,

    /// IPv6 addresses sharing this prefix length count as one source [default: 64]
    #[arg(long, value_name = "LEN", value_parser = parse_prefix_v6)]
    pub source_prefix_v6: Option<u8>,

    /// Serve only clients in this prefix (ADDR/LEN or ADDR); repeatable; none = everyone
    #[arg(long, value_name = "PREFIX", value_parser = limits::parse_prefix)]
    pub allow: Vec<IpNet>,

    /// Refuse clients in this prefix (ADDR/LEN or ADDR); repeatable; wins over --allow
    #[arg(long, value_name = "PREFIX", value_parser = limits::parse_prefix)]
    pub deny: Vec<IpNet>,

    /// New connections per second allowed from one source; 0 = no limit [default: 0]
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_rate_per_source: Option<f64>,

    /// Connections one source may open at once before the rate applies; needs
    /// --max-rate-per-source [default: the rate, at least 1]
    #[arg(long, value_name = "N", value_parser = parse_burst)]
    pub rate_burst: Option<u32>,

    /// Line sent to a refused client before closing (\n etc. interpreted) [default: ""]
    #[arg(long, value_name = "TEXT", value_parser = parse_refusal_message)]
    pub refusal_message: Option<String>,

    /// Set SO_REUSEPORT, so several forkecho instances can listen on one port
    #[arg(long)]
    pub reuse_port: bool,

    /// Write the parent's pid here once listening, locked against a second instance
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// Append the log (everyone's stderr) to this file instead of stderr
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Detach and run in the background; return once listening (exit 0) or with the error
    #[arg(long)]
    pub daemonize: bool,

    /// After binding, drop privileges to this user (name or uid); needs root
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// With --user: the group (name or gid) [default: the user's primary group]
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// error, warn, info, debug, trace or off; RUST_LOG, when set, wins [default: info]
    #[arg(long, value_name = "LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<log::LevelFilter>,

    /// Validate the configuration, print `configuration OK` and exit 0 (exit 2 on an error)
    #[arg(long)]
    pub check_config: bool,
}

/// The validated settings the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where to listen; never empty.
    pub listen: Vec<SocketAddr>,
    /// Bytes sent to each client before echoing; empty = none (plain RFC 862 echo).
    pub banner: Vec<u8>,
    /// `listen(2)` backlog.
    pub backlog: u32,
    /// SO_REUSEPORT on the listeners: instances sharing a port, the kernel spreading clients.
    pub reuse_port: bool,
    /// Where to write (and lock) the parent's pid; none = no pid file.
    pub pid_file: Option<PathBuf>,
    /// How much to log (unless `RUST_LOG` is set).
    pub log_level: log::LevelFilter,
    /// Where the log goes instead of stderr; none = stderr.
    pub log_file: Option<PathBuf>,
    /// Detach into the background at start.
    pub daemonize: bool,
    /// Who to become after binding; none = stay who we are.
    pub run_as: Option<crate::privileges::Identity>,
    /// `user` and `group` as given, resolved into `run_as` once all layers are applied (at
    /// start only); compared by [`Config::identity_changed`].
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![DEFAULT_LISTEN.parse().expect("default address parses")],
            banner: DEFAULT_BANNER.as_bytes().to_vec(),
            backlog: DEFAULT_BACKLOG,
            reuse_port: false,
            pid_file: None,
            log_level: log::LevelFilter::Info,
            log_file: None,
            daemonize: false,
            run_as: None,
            user: None,
            group: None,
            idle_timeout: Some(Duration::from_secs_f64(DEFAULT_IDLE_TIMEOUT_SECS)),
            shutdown_timeout: Duration::from_secs_f64(DEFAULT_SHUTDOWN_TIMEOUT_SECS),
            kill_timeout: Duration::from_secs_f64(DEFAULT_KILL_TIMEOUT_SECS),
            max_session_time: None,
            limits: Limits::default(),
            rate_per_second: 0.0,
            rate_burst: None,
        }
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
    /// For the start: defaults, overridden by the config file named on the command line (if
    /// any), overridden by the flags; then `user` and `group` are looked up into `run_as`.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let (mut config, origins) = Config::merge(cli)?;
        config.run_as = config.resolve_identity(&origins)?;
        Ok(config)
    }

    /// For `--check-config`: [`Config::load`], then what this host would refuse at start (see
    /// `preflight`), named with the file or flag that set the key, like every other error.
    pub fn check(cli: &Cli) -> Result<Config, ConfigError> {
        let (mut config, origins) = Config::merge(cli)?;
        config.run_as = config.resolve_identity(&origins)?;
        crate::preflight::check(&config).map_err(|p| origins.error(p.key, p.reason))?;
        Ok(config)
    }

    /// For a reload: the same layers and checks as [`Config::load`], but `run_as` is kept from
    /// `running` and no name is looked up. Root is gone once serving, so user and group cannot
    /// change anyway, and a lookup (getent, up to 10 s per name) would stall the loop, which
    /// neither accepts nor reaps meanwhile. [`Config::identity_changed`] tells whether the
    /// operator changed them (the change waits for a restart).
    pub fn reload(cli: &Cli, running: &Config) -> Result<Config, ConfigError> {
        let (mut config, _) = Config::merge(cli)?;
        config.run_as = running.run_as.clone();
        Ok(config)
    }

    /// Whether `user` or `group` differ between two configurations, as written (a name and
    /// the uid it stands for count as different: nothing is looked up).
    pub fn identity_changed(&self, other: &Config) -> bool {
        (&self.user, &self.group) != (&other.user, &other.group)
    }

    /// Defaults, file and flags merged, with every rule checked but one: that the user and
    /// group exist. Also returns where each value came from, for the errors of that check.
    fn merge(cli: &Cli) -> Result<(Config, Origins<'_>), ConfigError> {
        let mut config = Config::default();
        let mut origins = Origins { cli, file: None };
        if let Some(path) = &cli.config {
            let keys = config.apply_file(path)?;
            origins.file = Some((path.display().to_string(), keys));
        }
        config.apply_flags(cli);
        config.check_across_keys(&origins)?;
        config.limits.rate = rate(config.rate_per_second, config.rate_burst);
        Ok((config, origins))
    }

    /// Rules that involve more than one value, checked on the merged result; an error names
    /// where the value at fault was set.
    fn check_across_keys(&self, origins: &Origins) -> Result<(), ConfigError> {
        check_listen_together(&self.listen).map_err(|reason| origins.error("listen", reason))?;
        if self.rate_burst.is_some() && self.rate_per_second == 0.0 {
            let reason = "has no effect without max_rate_per_source (a rate above 0)";
            return Err(origins.error("rate_burst", reason.into()));
        }
        if self.group.is_some() && self.user.is_none() {
            return Err(origins.error("group", "needs `user` too".into()));
        }
        Ok(())
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
    fn apply_file(&mut self, path: &Path) -> Result<HashSet<String>, ConfigError> {
        let origin = path.display().to_string();
        let fail = |reason| ConfigError {
            origin: origin.clone(),
            key: None,
            reason,
        };
        let text = utf8_text(read_config_file(path).map_err(fail)?).map_err(fail)?;
        let keys = self.apply_toml(&origin, &text)?;
        // Relative paths in a file mean relative to that file, whatever the working directory
        // is (a daemon's is /), so a reload finds the same files as the start did.
        let dir = path.parent().unwrap_or(Path::new("."));
        for file in [&mut self.pid_file, &mut self.log_file]
            .into_iter()
            .flatten()
        {
            if file.is_relative() {
                *file = dir.join(&*file);
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
    fn apply_key(
        &mut self,
        key_name: &str,
        value: &toml::Value,
        written: &str,
    ) -> Result<(), String> {
        match key(key_name) {
            Some(key) => (key.from_file)(self, value, written),
            None => Err(format!(
                "unknown key (expected one of: {})",
                KEYS.join(", ")
            )),
        }
    }

    /// Applies every flag the command line gives, over the file's values.
    fn apply_flags(&mut self, cli: &Cli) {
        for key in &TABLE {
            (key.from_flag)(self, cli);
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
    fn of(&self, key: &str) -> String {
        if flag_given(self.cli, key) {
            return COMMAND_LINE.into();
        }
        match &self.file {
            Some((path, keys)) if keys.contains(key) => path.clone(),
            _ => "built-in default".into(),
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

/// Whether the command line sets `key` (and so overrides the file's).
fn flag_given(cli: &Cli, name: &str) -> bool {
    key(name).is_some_and(|key| key.flag_given(cli))
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
/// found by parsing again with `0` in its place (`None` if the rest does not parse either).
fn key_holding(text: &str, span: std::ops::Range<usize>) -> Option<(String, bool)> {
    let patched = format!("{}0{}", &text[..span.start], &text[span.end..]);
    let document: Document = toml::from_str(&patched).ok()?;
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

/// What `0` means for a timeout.
const NEVER: &str = "never";
const AT_ONCE: &str = "at once";

fn never_if_zero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn expect_str<'a>(value: &'a toml::Value, written: &str) -> Result<&'a str, String> {
    value.as_str().ok_or_else(|| {
        format!(
            "expected a string, found {}",
            describe_value(value, written)
        )
    })
}

/// A string that will be a file name or an account name, which no NUL can be part of.
fn expect_name<'a>(value: &'a toml::Value, written: &str) -> Result<&'a str, String> {
    without_nul(expect_str(value, written)?)
}

fn without_nul(s: &str) -> Result<&str, String> {
    match s.contains('\0') {
        true => Err(format!("{s:?} contains a NUL byte")),
        false => Ok(s),
    }
}

fn expect_bool(value: &toml::Value, written: &str) -> Result<bool, String> {
    value.as_bool().ok_or_else(|| {
        format!(
            "expected true or false, found {}",
            describe_value(value, written)
        )
    })
}

fn expect_int(value: &toml::Value, written: &str) -> Result<i64, String> {
    value.as_integer().ok_or_else(|| {
        format!(
            "expected an integer, found {}",
            describe_value(value, written)
        )
    })
}

/// An item of an array: a string, or an error naming what it is instead.
fn expect_item_str(item: &toml::Value) -> Result<&str, String> {
    expect_str(item, &item.to_string())
}

/// The value's type and, for numbers, the value as written.
fn describe_value(value: &toml::Value, written: &str) -> String {
    match value {
        toml::Value::String(s) => format!("string {s:?}"),
        toml::Value::Integer(_) => format!("integer {written}"),
        toml::Value::Float(_) => format!("float {written}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        other => other.type_str().to_string(),
    }
}

fn listen_from_toml(value: &toml::Value, written: &str) -> Result<Vec<SocketAddr>, String> {
    let items = value.as_array().ok_or_else(|| {
        format!(
            "expected an array of addresses such as [\"127.0.0.1:2333\"], found {}",
            describe_value(value, written)
        )
    })?;
    if items.is_empty() {
        return Err("expected at least one address".into());
    }
    items
        .iter()
        .map(|item| parse_addr(expect_item_str(item)?))
        .collect()
}

/// Addresses that cannot all be bound at once are an error that names them, not a bind
/// failure at start: the same address twice, or an address beside the wildcard of its family
/// on the same port (0.0.0.0:P already takes 127.0.0.1:P; with `reuse_port` the kernel would
/// bind both, to no purpose). IPv6 listeners are IPv6-only, so [::]:P and 0.0.0.0:P do not
/// meet. Port 0 may repeat: each gets its own free port. Linear in the number of addresses.
fn check_listen_together(addrs: &[SocketAddr]) -> Result<(), String> {
    let mut seen = HashSet::with_capacity(addrs.len());
    let mut wildcards = HashMap::new();
    for &addr in addrs.iter().filter(|a| a.port() != 0) {
        if !seen.insert(addr) {
            return Err(format!("{addr} is listed twice"));
        }
        if addr.ip().is_unspecified() {
            wildcards.insert((addr.is_ipv6(), addr.port()), addr);
        }
    }
    let covered = addrs
        .iter()
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
        .find_map(|a| Some((wildcards.get(&(a.is_ipv6(), a.port()))?, a)));
    match covered {
        Some((wildcard, addr)) => Err(format!(
            "{wildcard} already covers {addr}; list one of them"
        )),
        None => Ok(()),
    }
}

/// An integer or a float, as f64.
fn number(value: &toml::Value, written: &str) -> Result<f64, String> {
    match value {
        toml::Value::Integer(i) => Ok(*i as f64),
        toml::Value::Float(x) => Ok(*x),
        other => Err(format!(
            "expected a number, found {}",
            describe_value(other, written)
        )),
    }
}

fn prefixes_from_toml(value: &toml::Value, written: &str) -> Result<Vec<IpNet>, String> {
    let items = value.as_array().ok_or_else(|| {
        format!(
            "expected an array of prefixes such as [\"10.0.0.0/8\"], found {}",
            describe_value(value, written)
        )
    })?;
    items
        .iter()
        .map(|item| limits::parse_prefix(expect_item_str(item)?))
        .collect()
}

/// The token bucket, or none when the rate is 0. Without an explicit burst a source may open
/// one second's worth of connections at once (at least one).
fn rate(per_second: f64, burst: Option<u32>) -> Option<Rate> {
    (per_second > 0.0).then(|| Rate {
        per_second,
        burst: burst.map_or(per_second.ceil().max(1.0), f64::from),
    })
}

fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a log level (error, warn, info, debug, trace or off)"))
}

/// An integer flag; one beyond i64 becomes the nearest i64, which every key's range check
/// refuses, quoting it as written.
fn parse_int(s: &str) -> Result<i64, String> {
    use std::num::IntErrorKind;
    match s.trim().parse::<i64>() {
        Ok(n) => Ok(n),
        Err(e) if *e.kind() == IntErrorKind::PosOverflow => Ok(i64::MAX),
        Err(e) if *e.kind() == IntErrorKind::NegOverflow => Ok(i64::MIN),
        Err(_) => Err(format!("`{s}` is not an integer")),
    }
}

/// `n` if it is in `range`, else "must be from <min><min_means> to <max>, not <written>".
fn in_range(
    n: i64,
    written: &str,
    range: std::ops::RangeInclusive<i64>,
    min_means: &str,
) -> Result<i64, String> {
    if range.contains(&n) {
        Ok(n)
    } else {
        let (min, max) = range.into_inner();
        Err(format!(
            "must be from {min}{min_means} to {max}, not {}",
            written.trim()
        ))
    }
}

fn parse_max_children(s: &str) -> Result<usize, String> {
    check_max_children(parse_int(s)?, s)
}

fn check_max_children(n: i64, written: &str) -> Result<usize, String> {
    in_range(n, written, 1..=1_000_000, "").map(|n| n as usize)
}

fn parse_count(s: &str) -> Result<usize, String> {
    check_count(parse_int(s)?, s)
}

fn check_count(n: i64, written: &str) -> Result<usize, String> {
    in_range(n, written, 0..=1_000_000, " (no limit)").map(|n| n as usize)
}

fn parse_prefix_v4(s: &str) -> Result<u8, String> {
    check_prefix_len(parse_int(s)?, s, 32)
}

fn parse_prefix_v6(s: &str) -> Result<u8, String> {
    check_prefix_len(parse_int(s)?, s, 128)
}

fn check_prefix_len(n: i64, written: &str, max: i64) -> Result<u8, String> {
    if (0..=max).contains(&n) {
        Ok(n as u8)
    } else {
        Err(format!(
            "must be a prefix length from 0 to {max}, not {}",
            written.trim()
        ))
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    check_rate(rate, s)
}

fn check_rate(rate: f64, written: &str) -> Result<f64, String> {
    if rate.is_finite() && (0.0..=1_000_000.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!(
            "must be connections per second from 0 (no limit) to 1000000, not {}",
            written.trim()
        ))
    }
}

fn parse_burst(s: &str) -> Result<u32, String> {
    check_burst(parse_int(s)?, s)
}

fn check_burst(n: i64, written: &str) -> Result<u32, String> {
    in_range(n, written, 1..=1_000_000, "").map(|n| n as u32)
}

fn parse_refusal_message(s: &str) -> Result<String, String> {
    check_refusal_message(&unescape(s)?).map(str::to_string)
}

fn check_refusal_message(s: &str) -> Result<&str, String> {
    if s.len() <= MAX_REFUSAL_MESSAGE {
        Ok(s)
    } else {
        Err(format!(
            "must be at most {MAX_REFUSAL_MESSAGE} bytes, not {}",
            s.len()
        ))
    }
}

/// `IP:PORT`, with IPv6 in brackets. Host names are not resolved: what is bound is what is
/// written. An IPv4-mapped IPv6 address is refused: IPv6 listeners are IPv6-only, and such a
/// socket cannot bind one.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.trim().parse().map_err(|_| {
        format!("`{s}` is not an address of the form IP:PORT, such as 127.0.0.1:2333 or [::1]:2333")
    })?;
    if let SocketAddr::V6(v6) = addr {
        if let Some(v4) = v6.ip().to_ipv4_mapped() {
            return Err(format!(
                "`{s}` is an IPv4-mapped address, which an IPv6 listener (IPv6-only) cannot \
                 bind; write {v4}:{}",
                v6.port()
            ));
        }
    }
    Ok(addr)
}

fn parse_backlog(s: &str) -> Result<u32, String> {
    check_backlog(parse_int(s)?, s)
}

fn check_backlog(n: i64, written: &str) -> Result<u32, String> {
    in_range(n, written, 1..=65535, "").map(|n| n as u32)
}

/// A timeout flag where 0 means the limit never applies.
fn parse_limit_seconds(s: &str) -> Result<Duration, String> {
    check_seconds(parse_f64_seconds(s)?, s, NEVER)
}

/// A grace period flag, where 0 means at once.
fn parse_grace_seconds(s: &str) -> Result<Duration, String> {
    check_seconds(parse_f64_seconds(s)?, s, AT_ONCE)
}

fn parse_f64_seconds(s: &str) -> Result<f64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))
}

/// A number of seconds from 0 to one year; other than 0 (which means `zero_means`), at
/// least `MIN_SECONDS`.
fn check_seconds(secs: f64, written: &str, zero_means: &str) -> Result<Duration, String> {
    let written = written.trim();
    if !(secs.is_finite() && (0.0..=MAX_SECONDS).contains(&secs)) {
        Err(format!(
            "must be a number of seconds from 0 to {MAX_SECONDS}, not {written}"
        ))
    } else if secs > 0.0 && secs < MIN_SECONDS {
        Err(format!(
            "must be 0 ({zero_means}) or at least {MIN_SECONDS} s, not {written}"
        ))
    } else {
        Ok(Duration::from_secs_f64(secs))
    }
}

/// Interprets `\n`, `\r`, `\t` and `\\` so a banner with a line end can be given in a shell.
pub fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                return Err(format!(
                    "unknown escape `\\{other}` (known: \\n \\r \\t \\\\)"
                ))
            }
            None => return Err("ends with a lone `\\`".into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut c = Config::default();
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

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn listen_addresses_must_be_distinct() {
        let twice = addrs(&["127.0.0.1:7", "127.0.0.1:7"]);
        assert!(check_listen_together(&twice)
            .unwrap_err()
            .contains("listed twice"));
        let zeros = addrs(&["127.0.0.1:0", "127.0.0.1:0"]);
        assert!(check_listen_together(&zeros).is_ok());
    }

    #[test]
    fn a_wildcard_beside_an_address_of_its_family_and_port_is_refused() {
        for (list, want) in [
            (
                &["0.0.0.0:2333", "127.0.0.1:2333"][..],
                "0.0.0.0:2333 already covers 127.0.0.1:2333; list one of them",
            ),
            (
                &["127.0.0.1:2333", "0.0.0.0:2333"][..],
                "0.0.0.0:2333 already covers 127.0.0.1:2333; list one of them",
            ),
            (
                &["[::1]:2333", "[::]:2333"][..],
                "[::]:2333 already covers [::1]:2333; list one of them",
            ),
        ] {
            assert_eq!(check_listen_together(&addrs(list)).unwrap_err(), want);
        }
        // IPv6 listeners are IPv6-only; port 0 is a fresh port each time; ports differ.
        for list in [
            &["0.0.0.0:2333", "[::]:2333"][..],
            &["0.0.0.0:2333", "[::1]:2333", "127.0.0.1:2334"][..],
            &["0.0.0.0:0", "127.0.0.1:0"][..],
        ] {
            assert_eq!(check_listen_together(&addrs(list)), Ok(()), "{list:?}");
        }
    }

    #[test]
    fn an_ipv4_mapped_address_is_refused_with_the_ipv4_form() {
        let e = parse_addr("[::ffff:127.0.0.1]:2333").unwrap_err();
        assert!(e.ends_with("write 127.0.0.1:2333"), "{e}");
        assert!(reason("listen = [\"[::ffff:10.0.0.1]:0\"]").contains("IPv4-mapped"));
    }

    #[test]
    fn checking_many_listen_addresses_takes_linear_time() {
        // 100,000 distinct addresses: a pairwise comparison (5e9 steps) takes seconds.
        let many: Vec<SocketAddr> = (0..100_000u32)
            .map(|i| SocketAddr::from(([127, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7)))
            .collect();
        let started = std::time::Instant::now();
        assert_eq!(check_listen_together(&many), Ok(()));
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    }

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("forkecho").chain(args.iter().copied())).unwrap()
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
        assert!(reloaded.identity_changed(&running));
        let same = Config::reload(&cli(&["--user", "nobody"]), &running).unwrap();
        assert!(!same.identity_changed(&running));
        // Everything else is still checked.
        let e = Config::reload(&cli(&["--group", "nogroup"]), &running).unwrap_err();
        assert_eq!(e.to_string(), "command line: key `group`: needs `user` too");
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
        // Exact as written, not as the f64 it becomes (which is 9007199254740992).
        assert!(reason("idle_timeout = 9007199254740993").ends_with("not 9007199254740993"));
        assert!(reason("kill_timeout = 1e300").ends_with("not 1e300"));
        assert!(reason("max_rate_per_source = 2e6").ends_with("not 2e6"));
        assert!(reason("banner = 99999999999999999999")
            .ends_with("expected a string, found integer 99999999999999999999"));
        assert_eq!(
            parse_max_children("99999999999999999999").unwrap_err(),
            "must be from 1 to 1000000, not 99999999999999999999"
        );
        assert_eq!(
            parse_limit_seconds("9007199254740993").unwrap_err(),
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
        assert!(parse_limit_seconds("0.0009").is_err());
        assert!(parse_grace_seconds("5e-324").is_err());
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

    #[test]
    fn banner_escapes() {
        assert_eq!(unescape(r"hi\n").unwrap(), "hi\n");
        assert_eq!(unescape(r"a\\b\t").unwrap(), "a\\b\t");
        assert!(unescape(r"\q").is_err());
        assert!(unescape("\\").is_err());
    }
}

//! Settings: built-in defaults, then the TOML file (`-c`), then command-line flags, each layer
//! overriding the one before. Everything is validated here, once, so the rest of the daemon
//! works with values that are known to be sane; an error names where it came from (file or
//! flag), the key, and the reason.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

use crate::limits::{self, Limits, Rate};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2333";
pub const DEFAULT_BANNER: &str = "connect successful!\n";
pub const DEFAULT_BACKLOG: u32 = 1024;
pub const DEFAULT_IDLE_TIMEOUT_SECS: f64 = 300.0;
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: f64 = 10.0;
pub const DEFAULT_KILL_TIMEOUT_SECS: f64 = 2.0;

/// Longest timeout accepted anywhere (one year): keeps `Duration` arithmetic far from overflow.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// The keys a config file may hold, in the order the documentation lists them.
pub const KEYS: [&str; 23] = [
    "listen",
    "banner",
    "backlog",
    "idle_timeout",
    "shutdown_timeout",
    "kill_timeout",
    "max_session_time",
    "max_children",
    "max_per_source",
    "source_prefix_v4",
    "source_prefix_v6",
    "allow",
    "deny",
    "max_rate_per_source",
    "rate_burst",
    "refusal_message",
    "reuse_port",
    "pid_file",
    "log_level",
    "log_file",
    "daemonize",
    "user",
    "group",
];

/// Longest refusal message: it is written once to a non-blocking socket, so it must fit
/// in an empty send buffer with room to spare.
const MAX_REFUSAL_MESSAGE: usize = 1024;

/// The command line. Every option is also a config-file key; a flag given here wins.
#[derive(Debug, Parser)]
#[command(name = "forkecho", version, about, long_about = None)]
pub struct Cli {
    /// TOML config file (keys as the long options, in snake_case)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on, IP:PORT ([::1]:PORT for IPv6); repeatable; port 0 picks a free port
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
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub idle_timeout: Option<Duration>,

    /// On SIGTERM (smart shutdown), seconds sessions get to finish before a fast shutdown
    /// [default: 10]
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub shutdown_timeout: Option<Duration>,

    /// On shutdown, seconds between the SIGTERM and the SIGKILL sent to sessions [default: 2]
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub kill_timeout: Option<Duration>,

    /// End a session after this many seconds whatever it is doing; 0 = no limit [default: 0]
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
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

    /// Connections one source may open at once before the rate applies
    /// [default: the rate, at least 1]
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
    /// `user` and `group` as given, resolved into `run_as` once all layers are applied.
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
    /// Defaults, overridden by the config file named on the command line (if any), overridden
    /// by the flags.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let mut origin = "command line".to_string();
        if let Some(path) = &cli.config {
            config.apply_file(path)?;
            if cli.listen.is_empty() {
                origin = path.display().to_string();
            }
        }
        config.apply_flags(cli);
        check_listen_unique(&config.listen).map_err(|reason| ConfigError {
            origin,
            key: Some("listen".into()),
            reason,
        })?;
        config.limits.rate = rate(config.rate_per_second, config.rate_burst);
        config.run_as = match (&config.user, &config.group) {
            (Some(user), group) => {
                Some(crate::privileges::resolve(user, group.as_deref()).map_err(
                    |(key, reason)| ConfigError {
                        origin: "configuration".into(),
                        key: Some(key.into()),
                        reason,
                    },
                )?)
            }
            (None, Some(_)) => {
                return Err(ConfigError {
                    origin: "configuration".into(),
                    key: Some("group".into()),
                    reason: "needs `user` too".into(),
                })
            }
            (None, None) => None,
        };
        Ok(config)
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            key: None,
            reason: format!("cannot read: {}", crate::os_error_text(&e)),
        })?;
        self.apply_toml(&origin, &text)?;
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
        Ok(())
    }

    /// Applies the keys of one TOML document; `origin` names it in errors.
    pub fn apply_toml(&mut self, origin: &str, text: &str) -> Result<(), ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            origin: origin.to_string(),
            key: None,
            reason: describe_toml_error(text, &e),
        })?;
        for (key, value) in &table {
            self.apply_key(key, value).map_err(|reason| ConfigError {
                origin: origin.to_string(),
                key: Some(key.clone()),
                reason,
            })?;
        }
        Ok(())
    }

    fn apply_key(&mut self, key: &str, value: &toml::Value) -> Result<(), String> {
        match key {
            "listen" => self.listen = listen_from_toml(value)?,
            "banner" => self.banner = expect_str(value)?.as_bytes().to_vec(),
            "backlog" => self.backlog = check_backlog(expect_int(value)?)?,
            "reuse_port" => self.reuse_port = expect_bool(value)?,
            "pid_file" => self.pid_file = Some(PathBuf::from(expect_str(value)?)),
            "log_level" => self.log_level = parse_log_level(expect_str(value)?)?,
            "log_file" => self.log_file = Some(PathBuf::from(expect_str(value)?)),
            "daemonize" => self.daemonize = expect_bool(value)?,
            "user" => self.user = Some(expect_str(value)?.to_string()),
            "group" => self.group = Some(expect_str(value)?.to_string()),
            "idle_timeout" => self.idle_timeout = never_if_zero(seconds_from_toml(value)?),
            "shutdown_timeout" => self.shutdown_timeout = seconds_from_toml(value)?,
            "kill_timeout" => self.kill_timeout = seconds_from_toml(value)?,
            "max_session_time" => self.max_session_time = never_if_zero(seconds_from_toml(value)?),
            "max_children" => self.limits.max_children = check_max_children(expect_int(value)?)?,
            "max_per_source" => self.limits.max_per_source = check_count(expect_int(value)?)?,
            "source_prefix_v4" => {
                self.limits.source_prefix_v4 = check_prefix_len(expect_int(value)?, 32)?
            }
            "source_prefix_v6" => {
                self.limits.source_prefix_v6 = check_prefix_len(expect_int(value)?, 128)?
            }
            "allow" => self.limits.allow = prefixes_from_toml(value)?,
            "deny" => self.limits.deny = prefixes_from_toml(value)?,
            "max_rate_per_source" => self.rate_per_second = check_rate(number(value)?)?,
            "rate_burst" => self.rate_burst = Some(check_burst(expect_int(value)?)?),
            "refusal_message" => {
                self.limits.refusal_message = check_refusal_message(expect_str(value)?)?.into()
            }
            _ => {
                return Err(format!(
                    "unknown key (expected one of: {})",
                    KEYS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// Flags were validated by clap's value parsers (the same checks as the file's).
    fn apply_flags(&mut self, cli: &Cli) {
        if !cli.listen.is_empty() {
            self.listen = cli.listen.clone();
        }
        if let Some(banner) = &cli.banner {
            self.banner = banner.as_bytes().to_vec();
        }
        if let Some(backlog) = cli.backlog {
            self.backlog = backlog;
        }
        if cli.reuse_port {
            self.reuse_port = true;
        }
        if let Some(path) = &cli.pid_file {
            self.pid_file = Some(path.clone());
        }
        if let Some(level) = cli.log_level {
            self.log_level = level;
        }
        if let Some(path) = &cli.log_file {
            self.log_file = Some(path.clone());
        }
        if cli.daemonize {
            self.daemonize = true;
        }
        if let Some(user) = &cli.user {
            self.user = Some(user.clone());
        }
        if let Some(group) = &cli.group {
            self.group = Some(group.clone());
        }
        if let Some(idle) = cli.idle_timeout {
            self.idle_timeout = never_if_zero(idle);
        }
        if let Some(grace) = cli.shutdown_timeout {
            self.shutdown_timeout = grace;
        }
        if let Some(grace) = cli.kill_timeout {
            self.kill_timeout = grace;
        }
        if let Some(limit) = cli.max_session_time {
            self.max_session_time = never_if_zero(limit);
        }
        let limits = &mut self.limits;
        if let Some(n) = cli.max_children {
            limits.max_children = n;
        }
        if let Some(n) = cli.max_per_source {
            limits.max_per_source = n;
        }
        if let Some(len) = cli.source_prefix_v4 {
            limits.source_prefix_v4 = len;
        }
        if let Some(len) = cli.source_prefix_v6 {
            limits.source_prefix_v6 = len;
        }
        if !cli.allow.is_empty() {
            limits.allow = cli.allow.clone();
        }
        if !cli.deny.is_empty() {
            limits.deny = cli.deny.clone();
        }
        if let Some(message) = &cli.refusal_message {
            limits.refusal_message = message.as_bytes().to_vec();
        }
        if let Some(per_second) = cli.max_rate_per_source {
            self.rate_per_second = per_second;
        }
        if let Some(burst) = cli.rate_burst {
            self.rate_burst = Some(burst);
        }
    }
}

/// "line 3, column 7: <what toml says>", short and on one line.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before[line_start..].chars().count() + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_string(),
    }
}

fn never_if_zero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn expect_str(value: &toml::Value) -> Result<&str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("expected a string, found {}", describe_value(value)))
}

fn expect_bool(value: &toml::Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("expected true or false, found {}", describe_value(value)))
}

fn expect_int(value: &toml::Value) -> Result<i64, String> {
    value
        .as_integer()
        .ok_or_else(|| format!("expected an integer, found {}", describe_value(value)))
}

fn describe_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("string {s:?}"),
        toml::Value::Integer(i) => format!("integer {i}"),
        toml::Value::Float(x) => format!("float {x}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        other => other.type_str().to_string(),
    }
}

fn listen_from_toml(value: &toml::Value) -> Result<Vec<SocketAddr>, String> {
    let items = value.as_array().ok_or_else(|| {
        format!(
            "expected an array of addresses such as [\"127.0.0.1:2333\"], found {}",
            describe_value(value)
        )
    })?;
    if items.is_empty() {
        return Err("expected at least one address".into());
    }
    items
        .iter()
        .map(|item| parse_addr(expect_str(item)?))
        .collect()
}

/// The same address twice would fail later as "address already in use"; say what is wrong.
/// Port 0 may repeat: each gets its own free port.
fn check_listen_unique(addrs: &[SocketAddr]) -> Result<(), String> {
    for (i, addr) in addrs.iter().enumerate() {
        if addr.port() != 0 && addrs[..i].contains(addr) {
            return Err(format!("{addr} is listed twice"));
        }
    }
    Ok(())
}

fn seconds_from_toml(value: &toml::Value) -> Result<Duration, String> {
    check_seconds(number(value)?)
}

/// An integer or a float, as f64.
fn number(value: &toml::Value) -> Result<f64, String> {
    match value {
        toml::Value::Integer(i) => Ok(*i as f64),
        toml::Value::Float(x) => Ok(*x),
        other => Err(format!(
            "expected a number, found {}",
            describe_value(other)
        )),
    }
}

fn prefixes_from_toml(value: &toml::Value) -> Result<Vec<IpNet>, String> {
    let items = value.as_array().ok_or_else(|| {
        format!(
            "expected an array of prefixes such as [\"10.0.0.0/8\"], found {}",
            describe_value(value)
        )
    })?;
    items
        .iter()
        .map(|item| limits::parse_prefix(expect_str(item)?))
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

fn parse_int(s: &str) -> Result<i64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an integer"))
}

fn parse_max_children(s: &str) -> Result<usize, String> {
    check_max_children(parse_int(s)?)
}

fn check_max_children(n: i64) -> Result<usize, String> {
    if (1..=1_000_000).contains(&n) {
        Ok(n as usize)
    } else {
        Err(format!("must be from 1 to 1000000, not {n}"))
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    check_count(parse_int(s)?)
}

fn check_count(n: i64) -> Result<usize, String> {
    if (0..=1_000_000).contains(&n) {
        Ok(n as usize)
    } else {
        Err(format!("must be from 0 (no limit) to 1000000, not {n}"))
    }
}

fn parse_prefix_v4(s: &str) -> Result<u8, String> {
    check_prefix_len(parse_int(s)?, 32)
}

fn parse_prefix_v6(s: &str) -> Result<u8, String> {
    check_prefix_len(parse_int(s)?, 128)
}

fn check_prefix_len(n: i64, max: i64) -> Result<u8, String> {
    if (0..=max).contains(&n) {
        Ok(n as u8)
    } else {
        Err(format!("must be a prefix length from 0 to {max}, not {n}"))
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    check_rate(rate)
}

fn check_rate(rate: f64) -> Result<f64, String> {
    if rate.is_finite() && (0.0..=1_000_000.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!(
            "must be connections per second from 0 (no limit) to 1000000, not {rate}"
        ))
    }
}

fn parse_burst(s: &str) -> Result<u32, String> {
    check_burst(parse_int(s)?)
}

fn check_burst(n: i64) -> Result<u32, String> {
    if (1..=1_000_000).contains(&n) {
        Ok(n as u32)
    } else {
        Err(format!("must be from 1 to 1000000, not {n}"))
    }
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

/// `IP:PORT`, with IPv6 in brackets. Host names are not resolved: what is bound is what is written.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("`{s}` is not an address of the form IP:PORT, such as 127.0.0.1:2333 or [::1]:2333")
    })
}

fn parse_backlog(s: &str) -> Result<u32, String> {
    let n: i64 = s.parse().map_err(|_| format!("`{s}` is not an integer"))?;
    check_backlog(n)
}

fn check_backlog(n: i64) -> Result<u32, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u32)
    } else {
        Err(format!("must be from 1 to 65535, not {n}"))
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    check_seconds(secs)
}

fn check_seconds(secs: f64) -> Result<Duration, String> {
    if secs.is_finite() && (0.0..=MAX_SECONDS).contains(&secs) {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!(
            "must be a number of seconds from 0 to {MAX_SECONDS}, not {secs}"
        ))
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

    #[test]
    fn listen_addresses_must_be_distinct() {
        let twice: Vec<SocketAddr> = vec!["127.0.0.1:7".parse().unwrap(); 2];
        assert!(check_listen_unique(&twice)
            .unwrap_err()
            .contains("listed twice"));
        let zeros: Vec<SocketAddr> = vec!["127.0.0.1:0".parse().unwrap(); 2];
        assert!(check_listen_unique(&zeros).is_ok());
    }

    #[test]
    fn banner_escapes() {
        assert_eq!(unescape(r"hi\n").unwrap(), "hi\n");
        assert_eq!(unescape(r"a\\b\t").unwrap(), "a\\b\t");
        assert!(unescape(r"\q").is_err());
        assert!(unescape("\\").is_err());
    }
}

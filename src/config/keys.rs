//! Every configuration key, defined once: one row of [`TABLE`] gives its name (the file's key;
//! the flag is the same in kebab-case), its help text, its built-in default, the shape of its
//! flag, how a value sets it (with every check), and what a reload says when it changes. The
//! file's parser, the command line (`flags`), the defaults, the errors' origins and the reload
//! line (`diff`) all read these rows: adding a key is a row here, the field it sets in
//! [`Config`], and the docs.
//!
//! A flag's text becomes the same `toml::Value` the file would hold and goes through the same
//! `set`, so a rule and its message exist once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::Config;
use crate::limits;
use crate::listen::ListenAddr;

/// One configuration key.
pub(super) struct Key {
    /// The file's key; the flag is `--` and the same in kebab-case.
    pub name: &'static str,
    /// What `--help` says; `[default: …]` is added from `default`.
    pub help: &'static str,
    /// The value in force when neither the file nor a flag sets it, written as in the file;
    /// `None`: unset.
    pub default: Option<&'static str>,
    /// What the flag takes.
    pub flag: Flag,
    /// Checks a value and sets the key from it; `written` is the value as the file or the
    /// command line spells it, quoted in errors (a number read as f64 could otherwise come
    /// back rounded).
    pub set: fn(&mut Config, &toml::Value, &str) -> Result<(), String>,
    /// What a reload does with a change.
    pub on_reload: OnReload,
}

impl Key {
    /// This key as its documentation describes it.
    pub(super) fn reference(&self) -> super::KeyReference {
        let flag = format!("--{}", self.name.replace('_', "-"));
        let flag = match self.flag {
            Flag::Integer(value) | Flag::Text(value) | Flag::Escaped(value) | Flag::Path(value) => {
                Some(format!("{flag} {value}"))
            }
            Flag::Number { value_name, .. } => Some(format!("{flag} {value_name}")),
            Flag::List {
                value_name, short, ..
            } => Some(match short {
                Some(c) => format!("-{c}, {flag} {value_name} (repeatable)"),
                None => format!("{flag} {value_name} (repeatable)"),
            }),
            Flag::Pairs { value_name, .. } => Some(format!("{flag} {value_name} (repeatable)")),
            Flag::Switch => Some(flag),
            Flag::Trailing(value) => Some(format!("-- {value}")),
            Flag::FileOnly => None,
        };
        let on_reload = match &self.on_reload {
            OnReload::Applies(_) => "A reload applies it to what starts from then on.".into(),
            OnReload::NewAddressesOnly(_) => {
                "A reload applies it to addresses listened on from then on.".into()
            }
            OnReload::NextStart(_, warning) => {
                let mut text = warning.to_string();
                if let Some(first) = text.get_mut(0..1) {
                    first.make_ascii_uppercase();
                }
                format!("{text}.")
            }
            OnReload::Reported => {
                "A reload listens on addresses added and stops on those removed.".into()
            }
        };
        super::KeyReference {
            name: self.name,
            flag,
            help: self.help,
            default: self.default,
            on_reload,
        }
    }
}

/// What a key's flag takes, and so which `toml::Value` its text becomes.
#[derive(Clone, Copy)]
pub(super) enum Flag {
    /// `--key N`: an integer. One beyond i64 becomes the nearest i64, which every key's range
    /// refuses, quoting it as written.
    Integer(&'static str),
    /// `--key X`: a number; `what` is what the text must be ("a number of seconds").
    Number {
        value_name: &'static str,
        what: &'static str,
    },
    /// `--key TEXT`, taken as it is.
    Text(&'static str),
    /// `--key TEXT` with `\n` `\r` `\t` `\\` interpreted, so a line end can be given in a
    /// shell.
    Escaped(&'static str),
    /// `--key PATH`, relative to the directory forkecho was started in (a daemon works from /,
    /// and a reload must find the same file).
    Path(&'static str),
    /// `--key ITEM`, repeatable: the file's array; `short` is the one-letter form, if any, and
    /// `alias` another long one (`--trusted-proxy` for `--trusted-proxies`).
    List {
        value_name: &'static str,
        short: Option<char>,
        alias: Option<&'static str>,
    },
    /// `--key` alone: `true`.
    Switch,
    /// The words after `--`, last on the command line: the file's array.
    Trailing(&'static str),
    /// No flag: the key exists in the file only (tables of several values).
    FileOnly,
    /// `--key NAME=VALUE`, repeatable: the file's table. With `numbers`, a value that is an
    /// integer is one (else it stays a string, such as `unlimited`).
    Pairs {
        value_name: &'static str,
        numbers: bool,
    },
}

/// What a reload does when a key's value changes.
pub(super) enum OnReload {
    /// Applies to what starts from now on; the reload line shows `key old -> new`.
    Applies(fn(&Config) -> Shown<'_>),
    /// Applies to listeners bound from now on (it is set when a socket is bound); the line
    /// shows `key (new addresses only) old -> new`.
    NewAddressesOnly(fn(&Config) -> Shown<'_>),
    /// Takes effect at the next start; a change is logged as this warning.
    NextStart(fn(&Config) -> Shown<'_>, &'static str),
    /// Reported by the code that applies it (`listen`: the listeners added and removed).
    Reported,
}

/// A value as a reload line shows it. Compared whole; a long one is shown summarised (see
/// `diff`), so a 1 MiB banner or a 200,000-entry deny list cannot make a huge log line.
#[derive(PartialEq)]
pub(super) enum Shown<'a> {
    Plain(String),
    Bytes(&'a [u8]),
    Prefixes(&'a [IpNet]),
    /// `allow` or `deny`: prefixes and uids.
    Rules(&'a [IpNet], &'a [u32]),
}

fn plain(value: impl ToString) -> Shown<'static> {
    Shown::Plain(value.to_string())
}

/// A timeout for the reload line: seconds as given (a change of a millisecond shows), or
/// "never".
fn plain_secs(d: Option<Duration>) -> Shown<'static> {
    Shown::Plain(d.map_or("never".to_string(), |d| format!("{}s", d.as_secs_f64())))
}

/// An optional value for the reload line: itself, or "none".
fn plain_or_none<T: ToString>(value: Option<T>) -> Shown<'static> {
    Shown::Plain(value.map_or("none".to_string(), |v| v.to_string()))
}

/// Every key, in the order `--help` and the documentation list them.
pub(super) const TABLE: [Key; 40] = [
    Key {
        name: "listen",
        help: "Address to listen on, IP:PORT (`[::1]:PORT` for IPv6) or unix:/PATH (a \
               UNIX-domain socket); repeatable; port 0 picks a free port",
        default: Some(r#"["127.0.0.1:2333"]"#),
        flag: Flag::List {
            value_name: "ADDR",
            short: Some('l'),
            alias: None,
        },
        set: |c, v, w| {
            c.listen = listen_from_toml(v, w)?;
            Ok(())
        },
        on_reload: OnReload::Reported,
    },
    Key {
        name: "banner",
        help: "Greeting sent to each client; \\n \\r \\t \\\\ are interpreted; \"\" sends nothing",
        default: Some(r#""connect successful!\n""#),
        flag: Flag::Escaped("TEXT"),
        set: |c, v, w| {
            c.banner = expect_str(v, w)?.as_bytes().to_vec();
            Ok(())
        },
        on_reload: OnReload::Applies(|c| Shown::Bytes(&c.banner)),
    },
    Key {
        name: "backlog",
        help: "Listen backlog: connections the kernel queues before forkecho accepts them",
        default: Some("1024"),
        flag: Flag::Integer("N"),
        set: |c, v, w| {
            c.backlog = in_range(expect_int(v, w)?, w, 1..=65535, "")? as u32;
            Ok(())
        },
        on_reload: OnReload::NewAddressesOnly(|c| plain(c.backlog)),
    },
    Key {
        name: "idle_timeout",
        help: "Close a session after this many seconds without input, or with a write blocked \
               this long; 0 = never",
        default: Some("300"),
        flag: SECONDS,
        set: |c, v, w| {
            c.idle_timeout = never_if_zero(check_seconds(number(v, w)?, w, NEVER)?);
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain_secs(c.idle_timeout)),
    },
    Key {
        name: "shutdown_timeout",
        help: "On SIGTERM (smart shutdown), seconds sessions get to finish before a fast \
               shutdown",
        default: Some("10"),
        flag: SECONDS,
        set: |c, v, w| {
            c.shutdown_timeout = check_seconds(number(v, w)?, w, AT_ONCE)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain_secs(Some(c.shutdown_timeout))),
    },
    Key {
        name: "kill_timeout",
        help: "On shutdown, seconds between the SIGTERM and the SIGKILL sent to sessions",
        default: Some("2"),
        flag: SECONDS,
        set: |c, v, w| {
            c.kill_timeout = check_seconds(number(v, w)?, w, AT_ONCE)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain_secs(Some(c.kill_timeout))),
    },
    Key {
        name: "max_session_time",
        help: "End a session after this many seconds whatever it is doing; 0 = no limit",
        default: Some("0"),
        flag: SECONDS,
        set: |c, v, w| {
            c.max_session_time = never_if_zero(check_seconds(number(v, w)?, w, NEVER)?);
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain_secs(c.max_session_time)),
    },
    Key {
        name: "max_children",
        help: "Most sessions at once; at the limit new clients wait in the backlog",
        default: Some("1024"),
        flag: Flag::Integer("N"),
        set: |c, v, w| {
            c.limits.max_children = in_range(expect_int(v, w)?, w, 1..=1_000_000, "")? as usize;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.limits.max_children)),
    },
    Key {
        name: "max_per_source",
        help: "Most sessions at once from one source; more are refused; 0 = no limit",
        default: Some("32"),
        flag: Flag::Integer("N"),
        set: |c, v, w| {
            let n = in_range(expect_int(v, w)?, w, 0..=1_000_000, " (no limit)")?;
            c.limits.max_per_source = n as usize;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.limits.max_per_source)),
    },
    Key {
        name: "source_prefix_v4",
        help: "IPv4 addresses sharing this prefix length count as one source",
        default: Some("32"),
        flag: Flag::Integer("LEN"),
        set: |c, v, w| {
            c.limits.source_prefix_v4 = check_prefix_len(expect_int(v, w)?, w, 32)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.limits.source_prefix_v4)),
    },
    Key {
        name: "source_prefix_v6",
        help: "IPv6 addresses sharing this prefix length count as one source",
        default: Some("64"),
        flag: Flag::Integer("LEN"),
        set: |c, v, w| {
            c.limits.source_prefix_v6 = check_prefix_len(expect_int(v, w)?, w, 128)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.limits.source_prefix_v6)),
    },
    Key {
        name: "allow",
        help: "Serve only clients in this prefix (ADDR/LEN or ADDR), or local processes of this \
               uid (uid:N); repeatable; none of a kind = everyone of that kind",
        default: None,
        flag: RULES,
        set: |c, v, w| {
            (c.limits.allow, c.limits.allow_uids) = rules_from_toml(v, w)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| Shown::Rules(&c.limits.allow, &c.limits.allow_uids)),
    },
    Key {
        name: "deny",
        help: "Refuse clients in this prefix (ADDR/LEN or ADDR), or local processes of this uid \
               (uid:N); repeatable; wins over --allow",
        default: None,
        flag: RULES,
        set: |c, v, w| {
            (c.limits.deny, c.limits.deny_uids) = rules_from_toml(v, w)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| Shown::Rules(&c.limits.deny, &c.limits.deny_uids)),
    },
    Key {
        name: "max_rate_per_source",
        help: "New connections per second allowed from one source; 0 = no limit",
        default: Some("0"),
        flag: Flag::Number {
            value_name: "RATE",
            what: "a number",
        },
        set: |c, v, w| {
            c.rate_per_second = check_rate(number(v, w)?, w)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.rate_per_second)),
    },
    Key {
        name: "rate_burst",
        help: "Connections one source may open at once before the rate applies; needs \
               --max-rate-per-source [default: the rate, at least 1]",
        default: None,
        flag: Flag::Integer("N"),
        set: |c, v, w| {
            c.rate_burst = Some(in_range(expect_int(v, w)?, w, 1..=1_000_000, "")? as u32);
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain_or_none(c.rate_burst)),
    },
    Key {
        name: "refusal_message",
        help: "Line sent to a refused client before closing (\\n etc. interpreted)",
        default: Some(r#""""#),
        flag: Flag::Escaped("TEXT"),
        set: |c, v, w| {
            c.limits.refusal_message = check_refusal_message(expect_str(v, w)?)?.into();
            Ok(())
        },
        on_reload: OnReload::Applies(|c| Shown::Bytes(&c.limits.refusal_message)),
    },
    Key {
        name: "reuse_port",
        help: "Set SO_REUSEPORT, so several forkecho instances can listen on one port",
        default: None,
        flag: Flag::Switch,
        set: |c, v, w| {
            c.reuse_port = expect_bool(v, w)?;
            Ok(())
        },
        on_reload: OnReload::NewAddressesOnly(|c| plain(c.reuse_port)),
    },
    Key {
        name: "unix_socket_mode",
        help: "Permissions of a UNIX-domain socket's file (octal): who may connect",
        default: Some(r#""0666""#),
        flag: Flag::Text("MODE"),
        set: |c, v, w| {
            c.unix_socket_mode = parse_mode(v, w)?;
            Ok(())
        },
        on_reload: OnReload::NewAddressesOnly(|c| plain(format!("{:04o}", c.unix_socket_mode))),
    },
    Key {
        name: "unix_socket_owner",
        help: "Owner (user name or uid) of a UNIX-domain socket's file [default: `user` if set, \
               else forkecho's]",
        default: None,
        flag: Flag::Text("USER"),
        set: |c, v, w| {
            c.unix_socket_owner = Some(expect_name(v, w)?.to_string());
            Ok(())
        },
        on_reload: OnReload::NextStart(
            |c| plain_or_none(c.unix_socket_owner.as_ref()),
            UNIX_OWNER_CHANGE,
        ),
    },
    Key {
        name: "unix_socket_group",
        help: "Group (name or gid) of a UNIX-domain socket's file [default: `group` (or \
               `user`'s) if set, else forkecho's]",
        default: None,
        flag: Flag::Text("GROUP"),
        set: |c, v, w| {
            c.unix_socket_group = Some(expect_name(v, w)?.to_string());
            Ok(())
        },
        on_reload: OnReload::NextStart(
            |c| plain_or_none(c.unix_socket_group.as_ref()),
            UNIX_OWNER_CHANGE,
        ),
    },
    Key {
        name: "pid_file",
        help: "Write the parent's pid here once listening, locked against a second instance",
        default: None,
        flag: Flag::Path("PATH"),
        set: |c, v, w| {
            c.pid_file = Some(expect_path(v, w)?);
            Ok(())
        },
        on_reload: OnReload::NextStart(
            |c| plain_or_none(c.pid_file.as_ref().map(|p| p.display())),
            "pid_file changes take effect at the next start",
        ),
    },
    Key {
        name: "control_socket",
        help: "UNIX-domain socket for the control commands (status, reload, stop, reopen-logs) \
               [default: the pid file's path ending in .ctl; none without a pid file]",
        default: None,
        flag: Flag::Path("PATH"),
        set: |c, v, w| {
            c.control_socket = Some(expect_path(v, w)?);
            Ok(())
        },
        on_reload: OnReload::NextStart(
            |c| plain_or_none(c.control_socket.as_ref().map(|p| p.display())),
            "control_socket changes take effect at the next start",
        ),
    },
    Key {
        name: "metrics_listen",
        help: "Serve Prometheus metrics at http://IP:PORT/metrics [default: none]",
        default: None,
        flag: Flag::Text("ADDR"),
        set: |c, v, w| {
            c.metrics_listen = Some(parse_ip_addr(expect_str(v, w)?)?);
            Ok(())
        },
        on_reload: OnReload::NextStart(
            |c| plain_or_none(c.metrics_listen),
            "metrics_listen changes take effect at the next start",
        ),
    },
    Key {
        name: "log_file",
        help: "Append the log (everyone's stderr) to this file instead of stderr",
        default: None,
        flag: Flag::Path("PATH"),
        set: |c, v, w| {
            c.log_file = Some(expect_path(v, w)?);
            Ok(())
        },
        on_reload: OnReload::NextStart(
            |c| plain_or_none(c.log_file.as_ref().map(|p| p.display())),
            "log_file changes take effect at the next start; SIGHUP reopens the one in use",
        ),
    },
    Key {
        name: "daemonize",
        help: "Detach and run in the background; return once listening (exit 0) or with the \
               error",
        default: None,
        flag: Flag::Switch,
        set: |c, v, w| {
            c.daemonize = expect_bool(v, w)?;
            Ok(())
        },
        on_reload: OnReload::NextStart(
            |c| plain(c.daemonize),
            "daemonize changes take effect at the next start",
        ),
    },
    Key {
        name: "user",
        help: "After binding, drop privileges to this user (name or uid); needs root",
        default: None,
        flag: Flag::Text("USER"),
        set: |c, v, w| {
            c.user = Some(expect_name(v, w)?.to_string());
            Ok(())
        },
        on_reload: OnReload::NextStart(|c| plain_or_none(c.user.as_ref()), IDENTITY_CHANGE),
    },
    Key {
        name: "group",
        help: "With --user: the group (name or gid) [default: the user's primary group]",
        default: None,
        flag: Flag::Text("GROUP"),
        set: |c, v, w| {
            c.group = Some(expect_name(v, w)?.to_string());
            Ok(())
        },
        on_reload: OnReload::NextStart(|c| plain_or_none(c.group.as_ref()), IDENTITY_CHANGE),
    },
    Key {
        name: "log_level",
        help: "error, warn, info, debug, trace or off; RUST_LOG, when set, wins",
        default: Some(r#""info""#),
        flag: Flag::Text("LEVEL"),
        set: |c, v, w| {
            c.log_level = super::LogLevel(Some(parse_log_level(expect_str(v, w)?)?));
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.log_level)),
    },
    Key {
        name: "log_format",
        help: "Layout of log lines: text, json or logfmt (the same fields in each)",
        default: Some(r#""text""#),
        flag: Flag::Text("FORMAT"),
        set: |c, v, w| {
            let word = expect_str(v, w)?;
            c.log_format = crate::logging::Format::parse(word)
                .ok_or_else(|| format!("`{word}` is not a log format (text, json or logfmt)"))?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.log_format)),
    },
    Key {
        name: "exec",
        help: "Run this program per connection instead of the echo, UCSPI-style: the \
               connection on fds 0 and 1 (on the command line: `-- PROGRAM [ARGS...]`, last)",
        default: None,
        flag: Flag::Trailing("PROGRAM"),
        set: |c, v, w| {
            c.exec = Some(argv_from_toml(v, w)?);
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain_or_none(c.exec.as_ref().map(|a| format!("{a:?}")))),
    },
    Key {
        name: "session_stderr",
        help: "Where a program's stderr goes: log (forkecho's log, bytes unchanged) or null",
        default: Some(r#""log""#),
        flag: Flag::Text("WHERE"),
        set: |c, v, w| {
            c.session_stderr = crate::exec::Stderr::parse(expect_str(v, w)?)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.session_stderr)),
    },
    Key {
        name: "env",
        help: "Add this variable to a program's environment; repeatable",
        default: None,
        flag: Flag::Pairs {
            value_name: "NAME=VALUE",
            numbers: false,
        },
        set: |c, v, w| {
            c.env = env_from_toml(v, w)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| {
            let vars: Vec<String> = c.env.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            Shown::Plain(format!("{{{}}}", vars.join(", ")))
        }),
    },
    Key {
        name: "clear_env",
        help: "Start a program's environment empty instead of from forkecho's (the \
               connection's variables and --env are still set)",
        default: None,
        flag: Flag::Switch,
        set: |c, v, w| {
            c.clear_env = expect_bool(v, w)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.clear_env)),
    },
    Key {
        name: "session_limits",
        help: "A resource limit a program starts with, NAME=VALUE (cpu seconds, address_space, \
               open_files, processes, core, file_size; bytes or a count; or unlimited); \
               repeatable",
        default: None,
        flag: Flag::Pairs {
            value_name: "NAME=VALUE",
            numbers: true,
        },
        set: |c, v, w| {
            c.session_limits = limits_from_toml(v, w)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| {
            let limits: Vec<String> = c.session_limits.iter().map(|l| l.to_string()).collect();
            Shown::Plain(format!("{{{}}}", limits.join(", ")))
        }),
    },
    Key {
        name: "nice",
        help: "A program's nice value, -20 (first) to 19 (last); below forkecho's own needs \
               CAP_SYS_NICE [default: forkecho's]",
        default: None,
        flag: Flag::Integer("N"),
        set: |c, v, w| {
            c.nice = Some(in_range(expect_int(v, w)?, w, -20..=19, "")? as i32);
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain_or_none(c.nice)),
    },
    Key {
        name: "working_directory",
        help: "Directory a program starts in [default: forkecho's]",
        default: None,
        flag: Flag::Path("DIR"),
        set: |c, v, w| {
            c.working_directory = Some(expect_path(v, w)?);
            Ok(())
        },
        on_reload: OnReload::Applies(|c| {
            plain_or_none(c.working_directory.as_ref().map(|p| p.display()))
        }),
    },
    Key {
        name: "proxy_protocol",
        help: "Expect a PROXY protocol header (HAProxy's; v1, v2 or any) before the client's \
               data on every --listen address, naming the real client; off = none",
        default: Some(r#""off""#),
        flag: Flag::Text("MODE"),
        set: |c, v, w| {
            c.proxy_protocol = crate::proxy::Mode::parse(expect_str(v, w)?)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain(c.proxy_protocol)),
    },
    Key {
        name: "trusted_proxies",
        help: "A load balancer (ADDR/LEN or ADDR) allowed to send PROXY headers; repeatable; \
               others are refused on a PROXY listener",
        default: None,
        flag: Flag::List {
            value_name: "PREFIX",
            short: None,
            alias: Some("trusted-proxy"),
        },
        set: |c, v, w| {
            c.trusted_proxies = prefixes_from_toml(v, w)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| Shown::Prefixes(&c.trusted_proxies)),
    },
    Key {
        name: "proxy_header_timeout",
        help: "Seconds a PROXY listener waits for the whole header before refusing the \
               connection",
        default: Some("5"),
        flag: SECONDS,
        set: |c, v, w| {
            let secs = number(v, w)?;
            if !(secs.is_finite() && (MIN_SECONDS..=MAX_SECONDS).contains(&secs)) {
                return Err(format!(
                    "must be a number of seconds from {MIN_SECONDS} to {MAX_SECONDS}, not {}",
                    w.trim()
                ));
            }
            c.proxy_header_timeout = Duration::from_secs_f64(secs);
            Ok(())
        },
        on_reload: OnReload::Applies(|c| plain_secs(Some(c.proxy_header_timeout))),
    },
    Key {
        name: "listener",
        help: "Listeners with settings of their own: [[listener]] tables with `address` and \
               optionally `proxy_protocol` and `trusted_proxies` (file only)",
        default: None,
        flag: Flag::FileOnly,
        set: |c, v, w| {
            c.listener_tables = listener_tables_from_toml(v, w)?;
            Ok(())
        },
        on_reload: OnReload::Applies(|c| {
            let tables: Vec<String> = c.listener_tables.iter().map(|t| t.to_string()).collect();
            Shown::Plain(format!("[{}]", tables.join(", ")))
        }),
    },
];

/// The flag of every timeout.
const SECONDS: Flag = Flag::Number {
    value_name: "SECS",
    what: "a number of seconds",
};

/// The flag of `allow` and `deny`.
const RULES: Flag = Flag::List {
    value_name: "RULE",
    short: None,
    alias: None,
};

/// Names are looked up at start only: a lookup (getent) could stall the loop.
const UNIX_OWNER_CHANGE: &str =
    "unix_socket_owner and unix_socket_group changes take effect at the next start";

/// Root is gone once serving, and a lookup (getent) could stall the loop: see `Config::reload`.
const IDENTITY_CHANGE: &str = "user and group changes take effect at the next start (root is gone)";

/// The row of `name`, if it is a key.
pub(super) fn key(name: &str) -> Option<&'static Key> {
    TABLE.iter().find(|k| k.name == name)
}

/// "unknown key", with the nearest key if one is close (a typo), and the list of keys.
pub(super) fn unknown_key(name: &str) -> String {
    let nearest = TABLE
        .iter()
        .map(|k| (strsim::jaro_winkler(name, k.name), k.name))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .filter(|(similarity, _)| *similarity > 0.8);
    let keys: Vec<&str> = TABLE.iter().map(|k| k.name).collect();
    match nearest {
        Some((_, near)) => format!(
            "unknown key; did you mean `{near}`? (expected one of: {})",
            keys.join(", ")
        ),
        None => format!("unknown key (expected one of: {})", keys.join(", ")),
    }
}

/// Longest timeout accepted anywhere (one year): keeps `Duration` arithmetic far from overflow.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Shortest timeout other than 0. A socket timeout below the kernel's tick rounds to 0, which
/// means "wait forever": the opposite of what a tiny timeout asks for.
const MIN_SECONDS: f64 = 0.001;

/// Longest refusal message: it is written once to a non-blocking socket, so it must fit
/// in an empty send buffer with room to spare.
const MAX_REFUSAL_MESSAGE: usize = 1024;

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

/// A path: a name that is not empty (an empty path would mean the current directory, or the
/// config file's, depending on where it was written).
fn expect_path(value: &toml::Value, written: &str) -> Result<PathBuf, String> {
    match expect_name(value, written)? {
        "" => Err("is empty: give a path, or leave the key out".into()),
        path => Ok(PathBuf::from(path)),
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

fn listen_from_toml(value: &toml::Value, written: &str) -> Result<Vec<ListenAddr>, String> {
    let items = value.as_array().ok_or_else(|| {
        format!(
            "expected an array of addresses such as [\"127.0.0.1:2333\", \"unix:/run/f.sock\"], \
             found {}",
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

/// `exec`: a program and its arguments.
fn argv_from_toml(value: &toml::Value, written: &str) -> Result<Vec<String>, String> {
    let items = value.as_array().ok_or_else(|| {
        format!(
            "expected an array such as [\"/usr/bin/cat\"] (a program and its arguments), \
             found {}",
            describe_value(value, written)
        )
    })?;
    let argv: Vec<String> = items
        .iter()
        .map(|item| Ok(without_nul(expect_item_str(item)?)?.to_string()))
        .collect::<Result<_, String>>()?;
    match argv.first() {
        None => Err("expected a program (and its arguments), found an empty array".into()),
        Some(program) if program.is_empty() => Err("the program name is empty".into()),
        Some(_) => Ok(argv),
    }
}

/// `env`: variable names and their values, as strings.
fn env_from_toml(value: &toml::Value, written: &str) -> Result<Vec<(String, String)>, String> {
    let table = value.as_table().ok_or_else(|| {
        format!(
            "expected a table such as {{ LANG = \"C.UTF-8\" }}, found {}",
            describe_value(value, written)
        )
    })?;
    table
        .iter()
        .map(|(name, value)| {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(format!(
                    "{name:?} cannot be a variable name (empty, or with `=` or NUL)"
                ));
            }
            let value = expect_str(value, &value.to_string())
                .map_err(|e| format!("variable `{name}`: {e}"))?;
            Ok((name.clone(), without_nul(value)?.to_string()))
        })
        .collect()
}

/// `session_limits`: resource names and their limits.
fn limits_from_toml(value: &toml::Value, written: &str) -> Result<Vec<crate::exec::Limit>, String> {
    let table = value.as_table().ok_or_else(|| {
        format!(
            "expected a table such as {{ open_files = 64, cpu = 10 }}, found {}",
            describe_value(value, written)
        )
    })?;
    table
        .iter()
        .map(|(name, value)| {
            let resource = crate::exec::resource(name)?;
            let value = match value {
                toml::Value::Integer(n) if *n >= 0 => Some(*n as u64),
                toml::Value::String(s) if s == "unlimited" => None,
                other => {
                    return Err(format!(
                        "`{name}`: expected a number from 0 or \"unlimited\", found {}",
                        describe_value(other, &other.to_string())
                    ))
                }
            };
            Ok(crate::exec::Limit { resource, value })
        })
        .collect()
}

/// `[[listener]]`: an address each, and the PROXY settings that differ from the top-level
/// ones.
fn listener_tables_from_toml(
    value: &toml::Value,
    written: &str,
) -> Result<Vec<super::ListenerTable>, String> {
    let tables = value
        .as_array()
        .filter(|items| items.iter().all(toml::Value::is_table))
        .ok_or_else(|| {
            format!(
                "expected [[listener]] tables, each with an `address`, found {}",
                describe_value(value, written)
            )
        })?;
    tables
        .iter()
        .enumerate()
        .map(|(i, table)| {
            listener_table(table.as_table().expect("checked above"))
                .map_err(|e| format!("listener {}: {e}", i + 1))
        })
        .collect()
}

fn listener_table(table: &toml::Table) -> Result<super::ListenerTable, String> {
    const KEYS: &str = "address, proxy_protocol, trusted_proxies";
    let mut address = None;
    let (mut proxy_protocol, mut trusted_proxies) = (None, None);
    for (key, value) in table {
        let written = value.to_string();
        match key.as_str() {
            "address" => address = Some(parse_addr(expect_str(value, &written)?)?),
            "proxy_protocol" => {
                proxy_protocol = Some(crate::proxy::Mode::parse(expect_str(value, &written)?)?)
            }
            "trusted_proxies" => trusted_proxies = Some(prefixes_from_toml(value, &written)?),
            other if self::key(other).is_some() => {
                return Err(format!(
                    "`{other}` is a top-level key, but TOML puts every key after a \
                     [[listener]] header into that table: move it above the first [[listener]]"
                ))
            }
            other => return Err(format!("unknown key `{other}` (expected one of: {KEYS})")),
        }
    }
    Ok(super::ListenerTable {
        address: address.ok_or("has no `address`")?,
        proxy_protocol,
        trusted_proxies,
    })
}

fn without_nul(s: &str) -> Result<&str, String> {
    match s.contains('\0') {
        true => Err(format!("{s:?} contains a NUL byte")),
        false => Ok(s),
    }
}

/// `allow`, `deny`: prefixes and `uid:N` rules, in two lists.
fn rules_from_toml(value: &toml::Value, written: &str) -> Result<(Vec<IpNet>, Vec<u32>), String> {
    let items = value.as_array().ok_or_else(|| {
        format!(
            "expected an array of rules such as [\"10.0.0.0/8\", \"uid:1000\"], found {}",
            describe_value(value, written)
        )
    })?;
    let (mut prefixes, mut uids) = (Vec::new(), Vec::new());
    for item in items {
        match limits::parse_rule(expect_item_str(item)?)? {
            limits::Rule::Prefix(net) => prefixes.push(net),
            limits::Rule::Uid(uid) => uids.push(uid),
        }
    }
    Ok((prefixes, uids))
}

/// A file mode in octal, as text (`"0660"`) or a TOML octal integer (`0o660`); permission bits
/// only. A decimal integer (`440`) is refused: read as octal it is not what was meant, and read
/// as decimal (0670) it would silently grant more than was written.
fn parse_mode(value: &toml::Value, written: &str) -> Result<u32, String> {
    let mode = match value {
        toml::Value::Integer(_) if !written.trim().starts_with("0o") => {
            return Err(format!(
            "integer {written} is decimal; write the mode in octal: \"0{written}\" or 0o{written}"
        ))
        }
        toml::Value::Integer(n) => u32::try_from(*n).ok(),
        toml::Value::String(s) => u32::from_str_radix(s.trim(), 8).ok(),
        _ => None,
    };
    match mode {
        Some(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{} is not a mode such as \"0660\" (octal permission bits, at most 0777)",
            describe_value(value, written)
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

/// Longest path a UNIX-domain socket address holds (`sun_path` less its final NUL).
const MAX_UNIX_PATH: usize = 107;

/// `unix:/PATH`, or an IP address as [`parse_ip_addr`] takes it.
pub(super) fn parse_addr(s: &str) -> Result<ListenAddr, String> {
    let Some(path) = s.trim().strip_prefix("unix:") else {
        return parse_ip_addr(s).map(ListenAddr::Ip);
    };
    let path = without_nul(path)?;
    if !path.starts_with('/') {
        return Err(format!(
            "`{s}`: a UNIX-domain socket's path must be absolute, such as unix:/run/forkecho.sock"
        ));
    }
    if path.len() > MAX_UNIX_PATH {
        return Err(format!(
            "`{s}`: the path is {} bytes; a UNIX-domain socket's path holds at most {MAX_UNIX_PATH}",
            path.len()
        ));
    }
    if path.ends_with('/') {
        return Err(format!(
            "`{s}`: the path names a directory, not a socket file"
        ));
    }
    Ok(ListenAddr::Unix(PathBuf::from(path)))
}

/// `IP:PORT`, with IPv6 in brackets. Host names are not resolved: what is bound is what is
/// written. An IPv4-mapped IPv6 address is refused: IPv6 listeners are IPv6-only, and such a
/// socket cannot bind one.
fn parse_ip_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.trim().parse().map_err(|_| {
        format!(
            "`{s}` is not an address of the form IP:PORT, such as 127.0.0.1:2333 or [::1]:2333, \
             or unix:/PATH"
        )
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

/// Addresses that cannot all be bound at once are an error that names them, not a bind
/// failure at start: the same address twice, or an address beside the wildcard of its family
/// on the same port (0.0.0.0:P already takes 127.0.0.1:P; with `reuse_port` the kernel would
/// bind both, to no purpose). IPv6 listeners are IPv6-only, so [::]:P and 0.0.0.0:P do not
/// meet. Port 0 may repeat: each gets its own free port. Linear in the number of addresses.
/// An error is the reason and the index of the address at fault.
pub(super) fn check_listen_together(addrs: &[ListenAddr]) -> Result<(), (usize, String)> {
    let mut paths = HashSet::new();
    for (i, addr) in addrs.iter().enumerate() {
        if let ListenAddr::Unix(path) = addr {
            if !paths.insert(path) {
                return Err((i, format!("{addr} is listed twice")));
            }
        }
    }
    let ip: Vec<(usize, SocketAddr)> = addrs
        .iter()
        .enumerate()
        .filter_map(|(i, a)| Some((i, a.ip()?)))
        .collect();
    let mut seen = HashSet::with_capacity(ip.len());
    let mut wildcards = HashMap::new();
    for &(i, addr) in ip.iter().filter(|(_, a)| a.port() != 0) {
        if !seen.insert(addr) {
            return Err((i, format!("{addr} is listed twice")));
        }
        if addr.ip().is_unspecified() {
            wildcards.insert((addr.is_ipv6(), addr.port()), (i, addr));
        }
    }
    let covered = ip
        .iter()
        .filter(|(_, a)| a.port() != 0 && !a.ip().is_unspecified())
        .find_map(|&(i, a)| Some((wildcards.get(&(a.is_ipv6(), a.port()))?, i, a)));
    match covered {
        Some((&(j, wildcard), i, addr)) => Err((
            i.max(j),
            format!("{wildcard} already covers {addr}; list one of them"),
        )),
        None => Ok(()),
    }
}

fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a log level (error, warn, info, debug, trace or off)"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_of_a_key_is_answered_with_the_key() {
        let e = unknown_key("idle_timout");
        assert!(
            e.starts_with("unknown key; did you mean `idle_timeout`? (expected one of: listen,"),
            "{e}"
        );
        assert!(unknown_key("zzz").starts_with("unknown key (expected one of: listen, banner,"));
    }

    #[test]
    fn every_row_has_a_distinct_name_in_snake_case() {
        let names: HashSet<&str> = TABLE.iter().map(|k| k.name).collect();
        assert_eq!(names.len(), TABLE.len());
        for k in &TABLE {
            assert!(k
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
        }
    }

    fn addrs(list: &[&str]) -> Vec<ListenAddr> {
        list.iter().map(|a| parse_addr(a).unwrap()).collect()
    }

    #[test]
    fn listen_addresses_must_be_distinct() {
        let twice = addrs(&["127.0.0.1:7", "127.0.0.1:7"]);
        assert!(check_listen_together(&twice)
            .unwrap_err()
            .1
            .contains("listed twice"));
        let zeros = addrs(&["127.0.0.1:0", "127.0.0.1:0"]);
        assert!(check_listen_together(&zeros).is_ok());
        let paths = addrs(&["unix:/run/a.sock", "127.0.0.1:7", "unix:/run/a.sock"]);
        assert_eq!(
            check_listen_together(&paths).unwrap_err(),
            (2, "unix:/run/a.sock is listed twice".to_string())
        );
    }

    #[test]
    fn a_unix_address_needs_an_absolute_path_that_fits() {
        assert_eq!(
            parse_addr("unix:/run/forkecho.sock"),
            Ok(ListenAddr::Unix("/run/forkecho.sock".into()))
        );
        assert!(parse_addr("unix:run/f.sock")
            .unwrap_err()
            .contains("must be absolute"));
        let long = format!("unix:/{}", "a".repeat(107));
        assert!(parse_addr(&long).unwrap_err().contains("at most 107"));
        assert!(parse_addr(&format!("unix:/{}", "a".repeat(106))).is_ok());
        assert!(parse_addr("unix:/run/").unwrap_err().contains("directory"));
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        let mode = |text: &str| parse_mode(&toml::Value::String(text.into()), text);
        assert_eq!(mode("0660"), Ok(0o660));
        assert_eq!(mode("600"), Ok(0o600));
        assert!(mode("0999").is_err());
        assert!(mode("4777").is_err());
        assert_eq!(parse_mode(&toml::Value::Integer(0o640), "0o640"), Ok(0o640));
        let decimal = parse_mode(&toml::Value::Integer(440), "440").unwrap_err();
        assert!(
            decimal.contains("decimal") && decimal.contains("\"0440\""),
            "{decimal}"
        );
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
            assert_eq!(check_listen_together(&addrs(list)).unwrap_err().1, want);
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
    fn checking_many_listen_addresses_takes_linear_time() {
        // 100,000 distinct addresses: a pairwise comparison (5e9 steps) takes seconds.
        let many: Vec<ListenAddr> = (0..100_000u32)
            .map(|i| SocketAddr::from(([127, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7)))
            .map(ListenAddr::Ip)
            .collect();
        let started = std::time::Instant::now();
        assert_eq!(check_listen_together(&many), Ok(()));
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    }

    #[test]
    fn an_ipv4_mapped_address_is_refused_with_the_ipv4_form() {
        let e = parse_addr("[::ffff:127.0.0.1]:2333").unwrap_err();
        assert!(e.ends_with("write 127.0.0.1:2333"), "{e}");
    }
}

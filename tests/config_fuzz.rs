//! Config fuzz: `proptest`-generated config files and command lines against the real binary.
//! forkecho never panics; it either starts (and is stopped by pid) or exits 2 with a message
//! naming the problem.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use nix::sys::signal::Signal;
use proptest::prelude::*;
use proptest::strategy::Union;

use crate::util::*;

// Generated config files and command lines, each value drawn from valid ones, invalid ones
// and ones of the wrong type, with its expected validity known by construction. forkecho must
// never panic; with `--check-config` it prints `configuration OK` (exit 0) exactly when the
// case is valid, else exits 2 naming a culprit (`` key `backlog` `` for the file or a rule
// across keys, `'--backlog` for a flag, the file's path for a syntax error). Started for
// real, a valid case listens (and stops with exit 0 on SIGTERM) or, if it asks for an
// address not on this host or a file in a missing directory, exits 1.

/// A value in a config file (as TOML) or on the command line (as text).
#[derive(Debug, Clone)]
enum Val {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    List(Vec<String>),
    /// Written as is, in the file and on the command line: integers beyond i64.
    Raw(&'static str),
    /// A table: each name with its value as TOML and as a flag's `NAME=VALUE` writes it.
    Pairs(Vec<(&'static str, &'static str, &'static str)>),
}

impl Val {
    fn toml(&self) -> String {
        match self {
            Val::Int(i) => i.to_string(),
            Val::Float(x) if x.is_nan() => "nan".into(),
            Val::Float(x) if x.is_infinite() => (if *x > 0.0 { "inf" } else { "-inf" }).into(),
            // Debug always writes a `.` or an exponent, so TOML reads a float, not an integer.
            Val::Float(x) => format!("{x:?}"),
            Val::Str(s) => toml::Value::String(s.clone()).to_string(),
            Val::Bool(b) => b.to_string(),
            Val::List(items) => {
                toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect())
                    .to_string()
            }
            Val::Raw(text) => text.to_string(),
            Val::Pairs(pairs) => {
                let items: Vec<String> = pairs
                    .iter()
                    .map(|(name, toml, _)| format!("{name} = {toml}"))
                    .collect();
                format!("{{ {} }}", items.join(", "))
            }
        }
    }

    fn text(&self) -> String {
        match self {
            Val::Int(i) => i.to_string(),
            Val::Float(x) => x.to_string(),
            Val::Str(s) => s.clone(),
            Val::Bool(b) => b.to_string(),
            Val::List(items) => items.join(","),
            Val::Raw(text) => text.to_string(),
            Val::Pairs(pairs) => {
                let items: Vec<String> = pairs
                    .iter()
                    .map(|(name, _, flag)| format!("{name}={flag}"))
                    .collect();
                items.join(",")
            }
        }
    }
}

/// One key with one value, and whether forkecho must accept it.
#[derive(Debug, Clone)]
struct Setting {
    key: &'static str,
    val: Val,
    /// Valid in a config file (type and range), whatever the other keys say.
    file_ok: bool,
    /// Valid as a flag (`--key=value`).
    cli_ok: bool,
    /// Valid, but the server cannot start with it (exit 1): an address not on this host, a
    /// file in a directory that does not exist.
    os_fail: bool,
}

impl Setting {
    fn new(key: &'static str, val: Val, file_ok: bool, cli_ok: bool) -> Self {
        Setting {
            key,
            val,
            file_ok,
            cli_ok,
            os_fail: false,
        }
    }

    fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }

    /// The command-line form: a boolean flag alone or not at all, one flag per list item or
    /// pair; `exec` as the words after `--` (see `Case::args`, which puts them last).
    fn cli_args(&self) -> Vec<String> {
        let flag = self.flag();
        match &self.val {
            Val::List(items) if self.key == "exec" && items.is_empty() => vec![],
            Val::List(items) if self.key == "exec" => std::iter::once("--".to_string())
                .chain(items.iter().cloned())
                .collect(),
            other if self.key == "exec" => vec!["--".into(), other.text()],
            Val::Bool(true) => vec![flag],
            Val::Bool(false) if matches!(self.key, "reuse_port" | "daemonize" | "clear_env") => {
                vec![]
            }
            Val::List(items) => items.iter().map(|i| format!("{flag}={i}")).collect(),
            Val::Pairs(pairs) => pairs
                .iter()
                .map(|(name, _, value)| format!("{flag}={name}={value}"))
                .collect(),
            other => vec![format!("{flag}={}", other.text())],
        }
    }

    /// The addresses of a `listen` value (a string given as a flag is one address).
    fn addresses(&self) -> Vec<String> {
        match &self.val {
            Val::List(items) => items.clone(),
            other => vec![other.text()],
        }
    }

    /// A value no command line can carry (a NUL byte), or a key without a flag: it goes in
    /// the file only.
    fn file_only(&self) -> bool {
        self.key == "listener" || matches!(&self.val, Val::Str(s) if s.contains('\0'))
    }
}

/// Users and groups that exist on every Debian system; others in the generators do not.
const KNOWN_USERS: [&str; 4] = ["nobody", "65534", "root", "0"];
const KNOWN_GROUPS: [&str; 3] = ["nogroup", "65534", "root"];

/// A directory that does not exist: a pid or log file there cannot be created (exit 1).
const MISSING_DIR: &str = "/nonexistent-forkecho-test-dir";

/// Lines that make any file invalid, appended to some generated files.
const JUNK: [&str; 6] = [
    "listen = [",
    "= 3",
    "banner = \"unterminated",
    "backlog = 1\nbacklog = 2",
    "[section]\nkey = 1",
    "bell = \u{7}",
];

/// One of `choices` (each with its file and command-line validity).
fn pick(key: &'static str, choices: Vec<(Val, bool, bool)>) -> BoxedStrategy<Setting> {
    prop::sample::select(choices)
        .prop_map(move |(val, file_ok, cli_ok)| Setting::new(key, val, file_ok, cli_ok))
        .boxed()
}

fn valid_ints(key: &'static str, range: std::ops::RangeInclusive<i64>) -> BoxedStrategy<Setting> {
    range
        .prop_map(move |i| Setting::new(key, Val::Int(i), true, true))
        .boxed()
}

/// An integer key: valid values from `range`, plus `bad` integers and wrong types.
fn int_key(
    key: &'static str,
    range: std::ops::RangeInclusive<i64>,
    bad: &[i64],
) -> BoxedStrategy<Setting> {
    let mut wrong: Vec<(Val, bool, bool)> =
        bad.iter().map(|&i| (Val::Int(i), false, false)).collect();
    // Beyond i64: refused with the key's range, not a parse error about i128.
    wrong.push((Val::Raw("99999999999999999999"), false, false));
    wrong.push((Val::Raw("-9223372036854775809"), false, false));
    wrong.push((Val::Float(2.5), false, false));
    wrong.push((Val::Str("lots".into()), false, false));
    prop_oneof![3 => valid_ints(key, range), 1 => pick(key, wrong)].boxed()
}

/// A number of seconds: 0, or 0.001 to one year, integer or fraction.
fn seconds_key(key: &'static str) -> BoxedStrategy<Setting> {
    let fractions = (0.0..10_000.0f64)
        .prop_map(move |x| {
            let ok = x == 0.0 || x >= 0.001;
            Setting::new(key, Val::Float(x), ok, ok)
        })
        .boxed();
    let wrong = vec![
        (Val::Float(0.0005), false, false),
        (Val::Float(1e-9), false, false),
        (Val::Float(0.001), true, true),
        (Val::Raw("9007199254740993"), false, false),
        (Val::Int(-1), false, false),
        (Val::Int(31_536_001), false, false),
        (Val::Float(1e12), false, false),
        (Val::Float(-0.5), false, false),
        (Val::Float(f64::NAN), false, false),
        (Val::Float(f64::INFINITY), false, false),
        (Val::Str("soon".into()), false, false),
        (Val::Bool(true), false, false),
    ];
    prop_oneof![
        2 => valid_ints(key, 0..=31_536_000),
        2 => fractions,
        1 => pick(key, wrong)
    ]
    .boxed()
}

/// Text without a backslash: the same on the command line (where `\` starts an escape) and in
/// a file.
fn plain_text(max: usize) -> impl Strategy<Value = String> {
    prop::string::string_regex(&format!("[^\\\\\\p{{C}}]{{0,{max}}}")).unwrap()
}

fn listen_key(start_safe: bool) -> BoxedStrategy<Setting> {
    let list = |items: &[&str]| Val::List(items.iter().map(|s| s.to_string()).collect());
    let mut choices = vec![
        (list(&["127.0.0.1:0"]), true, true),
        (list(&["[::1]:0"]), true, true),
        (list(&["127.0.0.1:0", "127.0.0.1:0"]), true, true),
        (list(&["127.0.0.1:0", "[::1]:0"]), true, true),
        (list(&["nonsense"]), false, false),
        (list(&["unix:relative.sock"]), false, false),
        (list(&[&format!("unix:/{}", "a".repeat(107))]), false, false),
        (list(&["127.0.0.1"]), false, false),
        (list(&["127.0.0.1:65536"]), false, false),
        (list(&["localhost:0"]), false, false),
        (list(&["[::ffff:127.0.0.1]:0"]), false, false),
        (list(&[]), false, true),
        (Val::Str("127.0.0.1:0".into()), false, true),
        (Val::Int(2333), false, false),
    ];
    if !start_safe {
        // Valid alone, an error twice (a rule across values): never bound, even by mistake,
        // because only `--check-config` cases get it.
        choices.push((list(&["127.0.0.1:2999", "127.0.0.1:2999"]), true, true));
        choices.push((list(&["0.0.0.0:2999", "127.0.0.1:2999"]), true, true));
        choices.push((list(&["[::1]:2999", "[::]:2999"]), true, true));
        choices.push((list(&["0.0.0.0:2999", "[::]:2999"]), true, true));
    }
    let unreachable = prop_oneof![
        Just(Setting {
            os_fail: true,
            ..Setting::new("listen", list(&["192.0.2.1:0"]), true, true)
        }),
        // A socket in a directory that does not exist.
        Just(Setting {
            os_fail: true,
            ..Setting::new(
                "listen",
                list(&["unix:/nonexistent-forkecho-test-dir/s"]),
                true,
                true
            )
        }),
    ];
    let garbage = plain_text(12)
        .prop_filter("not an address", |s| {
            s.trim().parse::<SocketAddr>().is_err() && !s.trim().starts_with("unix:")
        })
        .prop_map(|s| Setting::new("listen", Val::List(vec![s]), false, false));
    prop_oneof![4 => pick("listen", choices), 1 => unreachable, 1 => garbage].boxed()
}

fn text_key(key: &'static str) -> BoxedStrategy<Setting> {
    let plain = plain_text(30).prop_map(move |s| Setting::new(key, Val::Str(s), true, true));
    let special = pick(
        key,
        vec![
            (Val::Str("line\\n".into()), true, true),
            (Val::Str("bad\\q".into()), true, false),
            (Val::Str("end\\".into()), true, false),
            (Val::Int(3), false, true),
            (Val::Bool(true), false, false),
        ],
    );
    prop_oneof![3 => plain, 1 => special].boxed()
}

fn refusal_message_key() -> BoxedStrategy<Setting> {
    let key = "refusal_message";
    let long = pick(
        key,
        vec![
            (Val::Str("x".repeat(1024)), true, true),
            (Val::Str("x".repeat(1025)), false, false),
            // 1026 bytes in 513 characters: the limit is in bytes.
            (Val::Str("é".repeat(513)), false, false),
        ],
    );
    prop_oneof![3 => text_key(key), 1 => long].boxed()
}

/// `allow` or `deny`: prefixes as for [`prefixes_key`], and `uid:N` rules.
fn rules_key(key: &'static str) -> BoxedStrategy<Setting> {
    let uids = pick(
        key,
        vec![
            (
                Val::List(vec!["uid:1000".into(), "10.0.0.0/8".into()]),
                true,
                true,
            ),
            (Val::List(vec!["uid:0".into()]), true, true),
            (Val::List(vec!["uid:root".into()]), false, false),
            (Val::List(vec!["uid:".into()]), false, false),
        ],
    );
    prop_oneof![3 => prefixes_key(key), 1 => uids].boxed()
}

/// `unix_socket_mode`: octal permission bits, as text or a TOML integer.
fn mode_key() -> BoxedStrategy<Setting> {
    pick(
        "unix_socket_mode",
        vec![
            (Val::Str("0660".into()), true, true),
            (Val::Str("600".into()), true, true),
            // Written in decimal in a file (416): refused there; a flag's text is octal.
            (Val::Int(0o640), false, true),
            (Val::Str("0999".into()), false, false),
            (Val::Str("4777".into()), false, false),
            (Val::Str("rw-rw----".into()), false, false),
            (Val::Bool(true), false, false),
        ],
    )
}

fn prefixes_key(key: &'static str) -> BoxedStrategy<Setting> {
    const GOOD: [&str; 6] = [
        "10.0.0.0/8",
        "::1",
        "127.0.0.2",
        "::/0",
        "192.168.0.0/16",
        "fe80::/10",
    ];
    let good = prop::sample::subsequence(GOOD.to_vec(), 0..=3).prop_map(move |items| {
        let items = items.into_iter().map(str::to_string).collect();
        Setting::new(key, Val::List(items), true, true)
    });
    let bad = pick(
        key,
        vec![
            (Val::List(vec!["10.0.0.1/8".into()]), false, false),
            (Val::List(vec!["10.0.0.0/33".into()]), false, false),
            (Val::List(vec!["nonsense".into()]), false, false),
            (Val::List(vec![String::new()]), false, false),
            (Val::Str("10.0.0.0/8".into()), false, true),
        ],
    );
    prop_oneof![3 => good, 1 => bad].boxed()
}

fn rate_key() -> BoxedStrategy<Setting> {
    let key = "max_rate_per_source";
    let floats =
        (0.0..1_000_000.0f64).prop_map(move |x| Setting::new(key, Val::Float(x), true, true));
    let bad = pick(
        key,
        vec![
            (Val::Float(-1.0), false, false),
            (Val::Float(2e6), false, false),
            (Val::Float(f64::NAN), false, false),
            (Val::Str("fast".into()), false, false),
        ],
    );
    prop_oneof![2 => floats, 1 => valid_ints(key, 0..=1_000_000), 1 => bad].boxed()
}

fn bool_key(key: &'static str) -> BoxedStrategy<Setting> {
    let good = any::<bool>().prop_map(move |b| Setting::new(key, Val::Bool(b), true, true));
    let bad = pick(
        key,
        vec![
            (Val::Str("yes".into()), false, false),
            (Val::Int(1), false, false),
        ],
    );
    prop_oneof![3 => good, 1 => bad].boxed()
}

/// `pid_file` or `log_file`: a file in the case's directory, one in a missing directory, or
/// a wrong type.
fn path_key(key: &'static str, name: &'static str) -> BoxedStrategy<Setting> {
    let missing = Setting {
        os_fail: true,
        ..Setting::new(key, Val::Str(format!("{MISSING_DIR}/{name}")), true, true)
    };
    let choices = vec![
        Setting::new(key, Val::Str(name.into()), true, true),
        missing,
        // As a flag the number is a file name, and a fine one.
        Setting::new(key, Val::Int(7), false, true),
        Setting::new(key, Val::Str("a\0b".into()), false, false),
    ];
    prop::sample::select(choices).boxed()
}

fn log_level_key() -> BoxedStrategy<Setting> {
    let mut choices: Vec<(Val, bool, bool)> =
        ["error", "warn", "info", "debug", "trace", "off", "INFO"]
            .iter()
            .map(|l| (Val::Str(l.to_string()), true, true))
            .collect();
    choices.push((Val::Str("loud".into()), false, false));
    choices.push((Val::Int(3), false, false));
    pick("log_level", choices)
}

/// `user` or `group`: whether the name exists is a rule across keys (see `Case::culprits`).
fn identity_key(key: &'static str, known: &[&str], missing: &str) -> BoxedStrategy<Setting> {
    let mut choices: Vec<(Val, bool, bool)> = known
        .iter()
        .map(|n| (Val::Str(n.to_string()), true, true))
        .collect();
    choices.push((Val::Str(missing.into()), true, true));
    // A number is no string in a file; as a flag it is an id, and these ids exist.
    choices.push((Val::Int(65534), false, true));
    choices.push((Val::Str("no\0body".into()), false, false));
    pick(key, choices)
}

/// `exec`: programs that exist (in PATH or by path), one that does not, and wrong shapes.
fn exec_key() -> BoxedStrategy<Setting> {
    let list = |items: &[&str]| Val::List(items.iter().map(|s| s.to_string()).collect());
    pick(
        "exec",
        vec![
            (list(&["cat"]), true, true),
            (list(&["/bin/sh", "-c", "exec cat"]), true, true),
            // Well formed, but no program to run: an error where it is the one in force (a
            // flag's `-- PROGRAM` overrides the file's, and only the program that will run
            // is looked up; see `Case::culprits`).
            (list(&["no-such-program-forkecho"]), true, true),
            (list(&["/nonexistent-forkecho-test-dir/prog"]), true, true),
            (list(&["/tmp"]), true, true),
            (list(&[]), false, true),
            (Val::Str("cat".into()), false, true),
            (Val::Int(3), false, false),
        ],
    )
}

/// `log_format`: a server started for real keeps `text`, whose `listening on` lines the
/// harness reads (the json and logfmt layouts have tests of their own).
fn log_format_key(start_safe: bool) -> BoxedStrategy<Setting> {
    let mut choices = vec![
        (Val::Str("text".into()), true, true),
        (Val::Str("TEXT".into()), true, true),
        (Val::Str("xml".into()), false, false),
        (Val::Int(1), false, false),
    ];
    if !start_safe {
        choices.push((Val::Str("json".into()), true, true));
        choices.push((Val::Str("logfmt".into()), true, true));
    }
    pick("log_format", choices)
}

/// `env` and `session_limits`: tables (a flag per pair).
fn env_key() -> BoxedStrategy<Setting> {
    pick(
        "env",
        vec![
            (Val::Pairs(vec![("FOO", "\"bar\"", "bar")]), true, true),
            (
                Val::Pairs(vec![("A", "\"1\"", "1"), ("B_2", "\"x y\"", "x y")]),
                true,
                true,
            ),
            (Val::Pairs(vec![("N", "3", "3")]), false, true),
            (Val::Str("FOO=bar".into()), false, true),
            (Val::Int(3), false, false),
        ],
    )
}

fn session_limits_key() -> BoxedStrategy<Setting> {
    pick(
        "session_limits",
        vec![
            (Val::Pairs(vec![("open_files", "64", "64")]), true, true),
            (
                Val::Pairs(vec![("cpu", "10", "10"), ("core", "0", "0")]),
                true,
                true,
            ),
            (
                Val::Pairs(vec![("file_size", "\"unlimited\"", "unlimited")]),
                true,
                true,
            ),
            (Val::Pairs(vec![("bogus", "1", "1")]), false, false),
            (Val::Pairs(vec![("cpu", "-1", "-1")]), false, false),
            (Val::Pairs(vec![("cpu", "\"lots\"", "lots")]), false, false),
            (Val::Int(3), false, false),
        ],
    )
}

fn session_stderr_key() -> BoxedStrategy<Setting> {
    pick(
        "session_stderr",
        vec![
            (Val::Str("log".into()), true, true),
            (Val::Str("null".into()), true, true),
            (Val::Str("file".into()), false, false),
            (Val::Int(1), false, false),
        ],
    )
}

/// `working_directory`: one that exists, one that does not, a file, wrong types.
fn working_directory_key() -> BoxedStrategy<Setting> {
    pick(
        "working_directory",
        vec![
            (Val::Str("/tmp".into()), true, true),
            (Val::Str(MISSING_DIR.into()), false, false),
            (Val::Str("/etc/passwd".into()), false, false),
            (Val::Str("a\0b".into()), false, false),
            (Val::Int(7), false, false),
        ],
    )
}

fn proxy_protocol_key() -> BoxedStrategy<Setting> {
    let mut choices: Vec<(Val, bool, bool)> = ["off", "v1", "v2", "any"]
        .iter()
        .map(|m| (Val::Str(m.to_string()), true, true))
        .collect();
    choices.push((Val::Str("v3".into()), false, false));
    choices.push((Val::Int(2), false, false));
    pick("proxy_protocol", choices)
}

/// A timeout that must be above 0.
fn proxy_header_timeout_key() -> BoxedStrategy<Setting> {
    pick(
        "proxy_header_timeout",
        vec![
            (Val::Int(5), true, true),
            (Val::Float(0.5), true, true),
            (Val::Float(0.001), true, true),
            (Val::Int(0), false, false),
            (Val::Float(0.0005), false, false),
            (Val::Int(-1), false, false),
            (Val::Str("soon".into()), false, false),
        ],
    )
}

/// `[[listener]]` tables (written inline: `listener = [{ ... }]`), file only; on port 0, so
/// they never clash with another address.
fn listener_key() -> BoxedStrategy<Setting> {
    pick(
        "listener",
        vec![
            (Val::Raw(r#"[{ address = "127.0.0.1:0" }]"#), true, false),
            (
                Val::Raw(
                    r#"[{ address = "127.0.0.1:0", proxy_protocol = "v2", trusted_proxies = ["127.0.0.1"] }]"#,
                ),
                true,
                false,
            ),
            (
                Val::Raw(r#"[{ address = "127.0.0.1:0", proxy_protocol = "off" }]"#),
                true,
                false,
            ),
            (Val::Raw(r#"[{ port = 3 }]"#), false, false),
            (Val::Raw(r#"[{ address = "nowhere" }]"#), false, false),
            (Val::Raw(r#""127.0.0.1:0""#), false, false),
        ],
    )
}

/// The generator of each config key (plus an unknown one), by name. `start_safe` leaves out
/// what must not run for real: `daemonize` (a detached daemon is out of our hands) and a
/// fixed port.
fn generators(start_safe: bool) -> Vec<(&'static str, BoxedStrategy<Setting>)> {
    let mut keys = vec![
        ("listen", listen_key(start_safe)),
        ("banner", text_key("banner")),
        (
            "backlog",
            int_key("backlog", 1..=65535, &[0, -1, 65536, 1_000_000]),
        ),
        ("idle_timeout", seconds_key("idle_timeout")),
        ("shutdown_timeout", seconds_key("shutdown_timeout")),
        ("kill_timeout", seconds_key("kill_timeout")),
        ("max_session_time", seconds_key("max_session_time")),
        (
            "max_children",
            int_key("max_children", 1..=1_000_000, &[0, -1, 1_000_001]),
        ),
        (
            "max_per_source",
            int_key("max_per_source", 0..=1_000_000, &[-1, 1_000_001]),
        ),
        (
            "source_prefix_v4",
            int_key("source_prefix_v4", 0..=32, &[33, 255, -1]),
        ),
        (
            "source_prefix_v6",
            int_key("source_prefix_v6", 0..=128, &[129, -1]),
        ),
        ("allow", rules_key("allow")),
        ("deny", rules_key("deny")),
        ("max_rate_per_source", rate_key()),
        (
            "rate_burst",
            int_key("rate_burst", 1..=1_000_000, &[0, -3, 1_000_001]),
        ),
        ("refusal_message", refusal_message_key()),
        ("reuse_port", bool_key("reuse_port")),
        ("unix_socket_mode", mode_key()),
        (
            "unix_socket_owner",
            identity_key("unix_socket_owner", &KNOWN_USERS, "no-such-user-forkecho"),
        ),
        (
            "unix_socket_group",
            identity_key("unix_socket_group", &KNOWN_GROUPS, "no-such-group-forkecho"),
        ),
        ("pid_file", path_key("pid_file", "forkecho.pid")),
        ("control_socket", path_key("control_socket", "forkecho.ctl")),
        (
            "metrics_listen",
            pick(
                "metrics_listen",
                vec![
                    (Val::Str("127.0.0.1:0".into()), true, true),
                    (Val::Str("[::1]:0".into()), true, true),
                    (Val::Str("localhost:9233".into()), false, false),
                    (Val::Str("unix:/run/m.sock".into()), false, false),
                    (Val::Int(9233), false, false),
                ],
            ),
        ),
        ("log_level", log_level_key()),
        ("log_file", path_key("log_file", "forkecho.log")),
        ("log_format", log_format_key(start_safe)),
        (
            "user",
            identity_key("user", &KNOWN_USERS, "no-such-user-forkecho"),
        ),
        (
            "group",
            identity_key("group", &KNOWN_GROUPS, "no-such-group-forkecho"),
        ),
        ("exec", exec_key()),
        ("session_stderr", session_stderr_key()),
        ("env", env_key()),
        ("clear_env", bool_key("clear_env")),
        ("session_limits", session_limits_key()),
        ("nice", int_key("nice", -20..=19, &[20, -21, 100])),
        ("working_directory", working_directory_key()),
        ("proxy_protocol", proxy_protocol_key()),
        ("trusted_proxies", prefixes_key("trusted_proxies")),
        ("proxy_header_timeout", proxy_header_timeout_key()),
        ("listener", listener_key()),
        (
            "bogus_key",
            pick(
                "bogus_key",
                vec![
                    (Val::Int(1), false, false),
                    (Val::Str("x".into()), false, false),
                ],
            ),
        ),
    ];
    if !start_safe {
        keys.push(("daemonize", bool_key("daemonize")));
    }
    keys
}

/// One setting of any key.
fn setting(start_safe: bool) -> BoxedStrategy<Setting> {
    Union::new(generators(start_safe).into_iter().map(|(_, g)| g)).boxed()
}

/// One generated configuration: settings in the file and on the command line (each key at
/// most once in each), maybe a junk line in the file.
#[derive(Debug, Clone)]
struct Case {
    file: Vec<Setting>,
    cli: Vec<Setting>,
    junk: Option<&'static str>,
    /// Pass `-c FILE` even when the file is empty.
    with_file: bool,
}

fn case(start_safe: bool) -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((setting(start_safe), any::<bool>()), 0..8),
        prop::option::weighted(0.1, prop::sample::select(JUNK.to_vec())),
        any::<bool>(),
    )
        .prop_map(|(settings, junk, with_file)| {
            let mut case = Case {
                file: Vec::new(),
                cli: Vec::new(),
                junk,
                with_file,
            };
            for (setting, on_cli) in settings {
                let place = if on_cli && !setting.file_only() {
                    &mut case.cli
                } else {
                    &mut case.file
                };
                if !place.iter().any(|s| s.key == setting.key) {
                    place.push(setting);
                }
            }
            case
        })
}

impl Case {
    fn file_text(&self) -> String {
        let mut text: String = self
            .file
            .iter()
            .map(|s| format!("{} = {}\n", s.key, s.val.toml()))
            .collect();
        if let Some(junk) = self.junk {
            text.push_str(junk);
            text.push('\n');
        }
        text
    }

    fn uses_file(&self) -> bool {
        self.with_file || !self.file.is_empty() || self.junk.is_some()
    }

    /// The command line (without `--check-config`); writes the file into `dir` if one is used.
    fn args(&self, dir: &TempDir) -> Vec<String> {
        let mut args = Vec::new();
        if self.uses_file() {
            let path = dir.path().join("forkecho.toml");
            std::fs::write(&path, self.file_text()).unwrap();
            args.push("-c".to_string());
            args.push(path.display().to_string());
        }
        // `exec`'s words come last, after `--`.
        let (exec, flags): (Vec<&Setting>, Vec<&Setting>) =
            self.cli.iter().partition(|s| s.key == "exec");
        args.extend(flags.into_iter().chain(exec).flat_map(Setting::cli_args));
        args
    }

    /// The setting in force for `key`: a flag wins over the file (a list flag given zero
    /// times, or a boolean flag that is off, is not given).
    fn effective(&self, key: &str) -> Option<&Setting> {
        self.cli
            .iter()
            .find(|s| s.key == key && !s.cli_args().is_empty())
            .or_else(|| self.file.iter().find(|s| s.key == key))
    }

    /// What stderr may name when the case is invalid (any one of them, since forkecho stops
    /// at the first problem it meets); empty when the case is valid.
    fn culprits(&self, file: &str) -> Vec<String> {
        let mut culprits: Vec<String> = Vec::new();
        culprits.extend(
            self.file
                .iter()
                .filter(|s| !s.file_ok)
                .map(|s| format!("key `{}`", s.key)),
        );
        // A flag is checked as clap parses it ('--flag) or, for what needs the merged
        // command line (the program, a directory), as its key.
        culprits.extend(
            self.cli
                .iter()
                .filter(|s| !s.cli_ok)
                .flat_map(|s| [format!("'{}", s.flag()), format!("key `{}`", s.key)]),
        );
        if self.junk.is_some() {
            culprits.push(file.to_string());
        }
        // Rules across keys, on the values in force.
        let listen = self
            .effective("listen")
            .map(Setting::addresses)
            .unwrap_or_else(|| vec!["127.0.0.1:2333".into()]);
        if !can_bind_together(&listen) {
            culprits.push("key `listen`".into());
        }
        let rate_is_off = self
            .effective("max_rate_per_source")
            .is_none_or(|s| s.val.text().parse::<f64>() == Ok(0.0));
        if self.effective("rate_burst").is_some() && rate_is_off {
            culprits.push("key `rate_burst`".into());
        }
        // A PROXY listener needs someone to trust: the top-level mode applies to `listen`.
        let proxied = self
            .effective("proxy_protocol")
            .is_some_and(|s| s.file_ok && s.val.text() != "off");
        let trusted = self.effective("trusted_proxies").is_some_and(|s| {
            matches!(&s.val, Val::List(l) if !l.is_empty()) || matches!(&s.val, Val::Str(_))
        });
        if proxied && !trusted {
            // Blamed on `trusted_proxies` where it was set (to nothing), else on the mode.
            culprits.push("key `trusted_proxies`".into());
            culprits.push("key `proxy_protocol`".into());
        }
        // The PROXY protocol is read on TCP listeners only.
        if proxied && trusted && listen.iter().any(|a| a.starts_with("unix:")) {
            culprits.push("key `proxy_protocol`".into());
        }
        // The program that will run must exist and be executable.
        let runnable = |s: &Setting| match &s.val {
            Val::List(argv) => !argv.first().is_some_and(|program| {
                [
                    "no-such-program-forkecho",
                    "/nonexistent-forkecho-test-dir/prog",
                    "/tmp",
                ]
                .contains(&program.as_str())
            }),
            _ => true,
        };
        if self.effective("exec").is_some_and(|s| !runnable(s)) {
            culprits.push("key `exec`".into());
        }
        // A program per connection: `idle_timeout` cannot apply (0 may be said); without
        // one, the keys only a program uses cannot.
        if self.effective("exec").is_some() {
            let idle = self.effective("idle_timeout");
            if idle.is_some_and(|s| s.val.text().parse::<f64>() != Ok(0.0)) {
                culprits.push("key `idle_timeout`".into());
            }
        } else {
            for key in [
                "session_stderr",
                "env",
                "clear_env",
                "session_limits",
                "nice",
                "working_directory",
            ] {
                if self.effective(key).is_some() {
                    culprits.push(format!("key `{key}`"));
                }
            }
        }
        let name = |key| self.effective(key).map(|s| s.val.text());
        // Names are looked up; numbers are taken as they are.
        let unknown =
            |name: &str, known: &[&str]| !known.contains(&name) && name.parse::<u32>().is_err();
        if name("unix_socket_owner").is_some_and(|n| unknown(&n, &KNOWN_USERS)) {
            culprits.push("key `unix_socket_owner`".into());
        }
        if name("unix_socket_group").is_some_and(|n| unknown(&n, &KNOWN_GROUPS)) {
            culprits.push("key `unix_socket_group`".into());
        }
        match (name("user"), name("group")) {
            (None, Some(_)) => culprits.push("key `group`".into()),
            (Some(user), group) => {
                if !KNOWN_USERS.contains(&user.as_str()) {
                    culprits.push("key `user`".into());
                }
                if group.is_some_and(|g| !KNOWN_GROUPS.contains(&g.as_str())) {
                    culprits.push("key `group`".into());
                }
            }
            (None, None) => {}
        }
        culprits
    }

    /// True if a setting in force cannot work on this host (exit 1 at start).
    /// The keys in force that this host cannot give (`--check-config` names them).
    fn host_culprits(&self) -> Vec<String> {
        ["listen", "pid_file", "log_file", "control_socket"]
            .iter()
            .filter(|key| self.effective(key).is_some_and(|s| s.os_fail))
            .map(|key| format!("key `{key}`"))
            .collect()
    }

    fn fails_to_start(&self) -> bool {
        ["listen", "pid_file", "log_file", "control_socket"]
            .iter()
            .any(|key| self.effective(key).is_some_and(|s| s.os_fail))
    }
}

/// False if two of `listen` (addresses that parse) cannot be bound at once: the same address
/// twice, or a wildcard beside an address of its family on the same port (never port 0).
fn can_bind_together(listen: &[String]) -> bool {
    let addrs: Vec<SocketAddr> = listen.iter().filter_map(|a| a.parse().ok()).collect();
    let clash = |a: &SocketAddr, b: &SocketAddr| {
        a.port() == b.port()
            && a.is_ipv6() == b.is_ipv6()
            && (a == b || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    addrs
        .iter()
        .enumerate()
        .all(|(i, a)| a.port() == 0 || !addrs[..i].iter().any(|b| clash(a, b)))
}

/// Checks what every run must satisfy: no panic, and an error names one of `culprits`.
fn assert_exit_2_naming(code: Option<i32>, stdout: &str, stderr: &str, culprits: &[String]) {
    assert_eq!(code, Some(2), "exit status; stderr: {stderr}");
    assert!(
        culprits.iter().any(|c| stderr.contains(c.as_str())),
        "stderr names none of {culprits:?}: {stderr}"
    );
    assert!(!stdout.contains("configuration OK"), "{stdout}");
}

fn assert_no_panic(stdout: &str, stderr: &str) {
    assert!(
        !stdout.contains("panicked") && !stderr.contains("panicked"),
        "panic:\n{stdout}\n{stderr}"
    );
}

/// Runs forkecho to completion and asserts it did not panic: its exit code, stdout, stderr.
fn run_without_panic<S: AsRef<str>>(args: &[S]) -> (Option<i32>, String, String) {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = run(&args);
    let (out_text, err_text) = (stdout(&out), stderr(&out));
    assert_no_panic(&out_text, &err_text);
    (out.status.code(), out_text, err_text)
}

/// Runs `--check-config` on the case and checks the verdict; returns the configuration's
/// culprits (those a real start also reports with exit 2).
///
/// `--check-config` also looks at the host: a setting this host cannot give (an address not
/// on it, a file in a missing directory) is exit 2 naming its key there, where a real start
/// reports it with exit 1 when it tries.
fn check_config_verdict(case: &Case, dir: &TempDir) -> Vec<String> {
    let mut args = case.args(dir);
    // First: after `--`, it would be an argument of the program.
    args.insert(0, "--check-config".into());
    let (code, stdout, stderr) = run_without_panic(&args);
    let file = dir.path().join("forkecho.toml").display().to_string();
    let culprits = case.culprits(&file);
    let mut checked = culprits.clone();
    checked.extend(case.host_culprits());
    if checked.is_empty() {
        assert_eq!(code, Some(0), "valid case rejected: {stderr}");
        assert!(stdout.contains("configuration OK"), "{stdout}");
    } else {
        assert_exit_2_naming(code, &stdout, &stderr, &checked);
    }
    culprits
}

/// What a case started for real did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Verdict {
    /// Listened, then stopped with exit 0 on SIGTERM.
    Served,
    /// Exit 2: a configuration error.
    Rejected,
    /// Exit 1: valid, but this host cannot give what it asks for.
    CannotStart,
}

/// Starts a case for real and checks it agrees with `--check-config`: an invalid case exits 2
/// naming a culprit; a valid one listens and stops with exit 0, or exits 1 saying why when
/// it asks for what this host cannot give.
fn start_verdict(case: &Case, dir: &TempDir, culprits: &[String]) -> Verdict {
    let workdir = dir.path().to_path_buf();
    // `RUST_LOG=info`, so that `listening on` is logged whatever `log_level` the case sets;
    // in `dir`, so that relative paths on the command line land there.
    let mut server = Server::builder()
        .args(case.args(dir))
        .env("RUST_LOG", "info")
        .tweak(move |cmd| {
            cmd.current_dir(workdir);
        });
    // With a log file the `listening on` line goes there.
    if let Some(log_file) = case.effective("log_file") {
        server = server.read_log_from(&dir.path().join(log_file.val.text()));
    }
    match server.try_start() {
        Ok(mut server) => {
            assert!(culprits.is_empty(), "started despite {culprits:?}");
            assert!(!case.fails_to_start(), "started, but should have failed");
            // A smart shutdown, immediate without sessions.
            server.signal(Signal::SIGTERM);
            let code = server.wait_exit(WAIT).code();
            assert_eq!(code, Some(0), "exit code after SIGTERM");
            Verdict::Served
        }
        Err((status, stderr)) => {
            let code = status.code();
            assert_no_panic("", &stderr);
            if !culprits.is_empty() {
                assert_exit_2_naming(code, "", &stderr, culprits);
                Verdict::Rejected
            } else {
                assert!(
                    case.fails_to_start(),
                    "valid case did not start: {code:?} {stderr}"
                );
                assert_eq!(code, Some(1), "{stderr}");
                assert!(stderr.starts_with("forkecho: "), "{stderr}");
                Verdict::CannotStart
            }
        }
    }
}

/// Checks a case with `--check-config`, then starts it for real.
fn check_and_start(case: &Case) -> Verdict {
    let dir = TempDir::new();
    let culprits = check_config_verdict(case, &dir);
    start_verdict(case, &dir, &culprits)
}

/// Adds `listen = ["127.0.0.1:0"]` to the file unless the case sets an address: a case run
/// for real must never bind the default port.
fn with_free_port(mut case: Case) -> Case {
    if case.effective("listen").is_none() {
        case.file.push(Setting::new(
            "listen",
            Val::List(vec!["127.0.0.1:0".into()]),
            true,
            true,
        ));
    }
    case
}

/// Text that looks like a config file: known and unknown keys with numbers, strings, booleans
/// and arrays, some of them malformed.
fn config_like_text() -> impl Strategy<Value = String> {
    let mut names: Vec<&'static str> = forkecho::config::KEYS.to_vec();
    names.push("bogus");
    let value = prop_oneof![
        prop::string::string_regex("-?[0-9]{1,12}").unwrap(),
        prop::string::string_regex("-?[0-9]{1,6}\\.[0-9]{1,4}").unwrap(),
        prop::string::string_regex("\"[^\\p{C}]{0,12}\"").unwrap(),
        prop::string::string_regex("(true|false|nan|inf)").unwrap(),
        prop::string::string_regex("\\[(\"[0-9a-f:./\\[\\]]{0,14}\", ?){0,3}\\]").unwrap(),
    ];
    prop::collection::vec((prop::sample::select(names), value), 0..6).prop_map(|lines| {
        lines
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect::<String>()
    })
}

/// One command-line word: a known flag (alone or with a value), or anything.
fn command_line_word() -> impl Strategy<Value = String> {
    let flag = prop::sample::select(forkecho::config::KEYS.to_vec())
        .prop_map(|k| format!("--{}", k.replace('_', "-")));
    prop_oneof![
        flag.clone(),
        (flag, plain_text(10)).prop_map(|(f, v)| format!("{f}={v}")),
        plain_text(12),
        Just("-c".to_string()),
        Just("--help".to_string()),
    ]
}

/// 128 generated cases, `--check-config`: `configuration OK` and exit 0 exactly for the valid
/// ones, else exit 2 naming a culprit; never a panic.
#[test]
fn fuzz_check_config_accepts_exactly_the_valid_cases_and_names_the_problem() {
    // A key added to forkecho needs a generator here.
    let mut fuzzed: Vec<&str> = generators(false).iter().map(|(k, _)| *k).collect();
    fuzzed.retain(|k| *k != "bogus_key");
    fuzzed.sort_unstable();
    let mut keys = forkecho::config::KEYS.to_vec();
    keys.sort_unstable();
    assert_eq!(fuzzed, keys, "config keys without a generator");
    let (valid, invalid) = (Cell::new(0), Cell::new(0));
    fuzz(128, case(false), |case| {
        let dir = TempDir::new();
        let tally = if check_config_verdict(&case, &dir).is_empty() {
            &valid
        } else {
            &invalid
        };
        tally.set(tally.get() + 1);
    });
    report(&format!(
        "config fuzz, --check-config: {} valid cases accepted, {} invalid ones rejected with \
         exit 2 naming the problem",
        valid.get(),
        invalid.get()
    ));
}

/// Generated cases started for real on 127.0.0.1/::1 port 0: each either listens (then stops
/// with exit 0 on SIGTERM), exits 2 naming the problem, or exits 1 for an address or file this
/// host cannot give, in agreement with `--check-config`; never a panic. Four fixed cases
/// first, so that every outcome is seen on every run.
#[test]
fn fuzz_started_configs_listen_and_stop_or_exit_2_or_1() {
    let listen = |addr: &str| Setting::new("listen", Val::List(vec![addr.into()]), true, true);
    let fixed = [
        (vec![listen("127.0.0.1:0")], vec![], Verdict::Served),
        (
            vec![Setting {
                os_fail: true,
                ..listen("192.0.2.1:0")
            }],
            vec![],
            Verdict::CannotStart,
        ),
        (
            vec![listen("127.0.0.1:0")],
            vec![Setting {
                os_fail: true,
                ..Setting::new(
                    "pid_file",
                    Val::Str(format!("{MISSING_DIR}/x.pid")),
                    true,
                    true,
                )
            }],
            Verdict::CannotStart,
        ),
        (
            vec![listen("127.0.0.1:0")],
            vec![Setting::new("backlog", Val::Int(0), false, false)],
            Verdict::Rejected,
        ),
    ];
    for (file, cli, want) in fixed {
        let case = Case {
            file,
            cli,
            junk: None,
            with_file: true,
        };
        assert_eq!(check_and_start(&case), want, "{case:?}");
    }
    let tally: Mutex<HashMap<Verdict, usize>> = Mutex::default();
    fuzz(64, case(true).prop_map(with_free_port), |case| {
        *tally
            .lock()
            .unwrap()
            .entry(check_and_start(&case))
            .or_default() += 1;
    });
    report(&format!(
        "config fuzz, started: {:?} of 64 generated cases",
        tally.lock().unwrap()
    ));
}

/// 96 files of arbitrary bytes or config-like text: exit 0 or 2 with a message naming the
/// file or a key; never a panic.
#[test]
fn fuzz_arbitrary_config_file_never_panics() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        config_like_text().prop_map(String::into_bytes),
    ];
    fuzz(96, bytes, |bytes| {
        let dir = TempDir::new();
        let path = dir.path().join("forkecho.toml");
        std::fs::write(&path, &bytes).unwrap();
        let path = path.display().to_string();
        let (code, stdout, stderr) = run_without_panic(&["-c", &path, "--check-config"]);
        match code {
            Some(0) => assert!(stdout.contains("configuration OK"), "{stdout}"),
            Some(2) => assert!(
                stderr.contains(&path) || stderr.contains("key `"),
                "names neither the file nor a key: {stderr}"
            ),
            other => panic!("exit {other:?}: {stderr}"),
        }
    });
}

/// 96 arbitrary command lines, after `--check-config` (so nothing is ever served): exit 0 (a
/// valid line, or `--help`) or 2 with a message; never a panic.
#[test]
fn fuzz_arbitrary_command_line_never_panics() {
    fuzz(
        96,
        prop::collection::vec(command_line_word(), 0..6),
        |words| {
            let mut args = vec!["--check-config".to_string()];
            args.extend(words);
            let (code, stdout, stderr) = run_without_panic(&args);
            match code {
                Some(0) => assert!(!stdout.is_empty(), "exit 0 and nothing said"),
                Some(2) => assert!(
                    stderr.starts_with("error: ") || stderr.starts_with("forkecho: "),
                    "{stderr}"
                ),
                other => panic!("exit {other:?}: {stderr}"),
            }
        },
    );
}

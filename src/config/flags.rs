//! The flags of the configuration keys, made from [`TABLE`]: one `--kebab-case` flag per key,
//! with the key's help and default. A flag's text becomes the `toml::Value` the file would
//! hold and is checked by the key's own `set` while clap parses, so a bad flag is clap's usage
//! error (exit 2) with the same reason a file gets.

use clap::{Arg, ArgAction, ArgMatches, Command};

use super::keys::{Flag, Key, TABLE};
use super::Config;

/// The keys the command line gives, each with the value it gives, in `keys::TABLE`'s order.
#[derive(Debug, Clone, Default)]
pub struct KeyFlags {
    given: Vec<Given>,
}

#[derive(Debug, Clone)]
struct Given {
    key: &'static str,
    value: toml::Value,
    /// As typed, for errors.
    written: String,
}

/// One flag's value as clap stores it.
#[derive(Debug, Clone)]
struct Parsed {
    value: toml::Value,
    written: String,
}

impl KeyFlags {
    /// Whether the command line sets `key` (and so overrides the file's).
    pub fn gives(&self, key: &str) -> bool {
        self.given.iter().any(|g| g.key == key)
    }

    /// Applies the keys among `only` that the command line gives, over what `config` holds.
    pub(super) fn apply_only(
        &self,
        config: &mut Config,
        only: &[&str],
    ) -> Result<(), (&'static str, String)> {
        for given in self.given.iter().filter(|g| only.contains(&g.key)) {
            let key = super::keys::key(given.key).expect("a flag is a key");
            (key.set)(config, &given.value, &given.written).map_err(|e| (key.name, e))?;
        }
        Ok(())
    }

    /// Applies every key the command line gives, over what `config` holds.
    pub(super) fn apply(&self, config: &mut Config) -> Result<(), (&'static str, String)> {
        for given in &self.given {
            let key = super::keys::key(given.key).expect("a flag is a key");
            (key.set)(config, &given.value, &given.written).map_err(|e| (key.name, e))?;
        }
        Ok(())
    }
}

/// `idle_timeout` → `idle-timeout`.
fn flag_name(key: &Key) -> String {
    key.name.replace('_', "-")
}

/// The flag of one key, as clap shows and parses it.
fn arg(key: &'static Key) -> Arg {
    let help = match key.default {
        Some(default) => format!("{} [default: {}]", key.help, shown_default(default)),
        None => key.help.to_string(),
    };
    let arg = match key.flag {
        // Positional: the words after `--`.
        Flag::Trailing(_) => Arg::new(key.name).help(help),
        _ => Arg::new(key.name).long(flag_name(key)).help(help),
    };
    let parse = move |s: &str| parse_flag(key, s);
    match key.flag {
        // `--daemonize` alone is true; `--daemonize=false` overrides a file's `true`.
        Flag::Switch => arg
            .value_name("BOOL")
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .action(ArgAction::Set)
            .value_parser(parse),
        Flag::List {
            value_name,
            short,
            alias,
        } => {
            let mut arg = arg
                .value_name(value_name)
                .action(ArgAction::Append)
                .value_parser(parse);
            if let Some(c) = short {
                arg = arg.short(c);
            }
            if let Some(alias) = alias {
                arg = arg.visible_alias(alias);
            }
            arg
        }
        Flag::FileOnly => unreachable!("a file-only key has no flag"),
        Flag::Trailing(value_name) => arg
            .value_name(value_name)
            .num_args(1..)
            .last(true)
            .action(ArgAction::Append)
            .value_parser(move |s: &str| -> Result<Parsed, String> {
                // Checked whole once the command line is merged: the first word is the
                // program (looked up in PATH), the others are its arguments.
                Ok(Parsed {
                    value: toml::Value::String(s.to_string()),
                    written: s.to_string(),
                })
            }),
        Flag::Pairs { value_name, .. } => arg
            .value_name(value_name)
            .action(ArgAction::Append)
            .value_parser(parse),
        // `--nice -5`: a negative number is a value, not a flag.
        Flag::Integer(value_name) | Flag::Number { value_name, .. } => arg
            .value_name(value_name)
            .action(ArgAction::Set)
            .allow_negative_numbers(true)
            .value_parser(parse),
        Flag::Text(value_name) | Flag::Escaped(value_name) | Flag::Path(value_name) => arg
            .value_name(value_name)
            .action(ArgAction::Set)
            .value_parser(parse),
    }
}

/// A default for `--help`, as a flag would give it: `["127.0.0.1:2333"]` is shown as
/// 127.0.0.1:2333 and `"info"` as info; other text stays as the file writes it.
fn shown_default(toml: &str) -> &str {
    let one_item = toml
        .strip_prefix("[\"")
        .and_then(|rest| rest.strip_suffix("\"]"));
    let word = toml
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'));
    match (one_item, word) {
        (Some(item), _) if !item.contains('"') => item,
        (_, Some(word)) if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric()) => {
            word
        }
        _ => toml,
    }
}

/// A flag's text as the value the file would hold, checked by the key's `set`.
fn parse_flag(key: &'static Key, s: &str) -> Result<Parsed, String> {
    let value = match key.flag {
        Flag::Integer(_) => toml::Value::Integer(parse_int(s)?),
        Flag::Number { what, .. } => toml::Value::Float(
            s.trim()
                .parse()
                .map_err(|_| format!("`{s}` is not {what}"))?,
        ),
        Flag::Escaped(_) => toml::Value::String(unescape(s)?),
        Flag::Path(_) => toml::Value::String(absolute(s)),
        Flag::Text(_) | Flag::List { .. } => toml::Value::String(s.to_string()),
        Flag::Switch => match s.trim() {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            _ => return Err(format!("`{s}` is not true or false")),
        },
        Flag::Pairs { numbers, .. } => pair(s, numbers)?,
        Flag::Trailing(_) | Flag::FileOnly => unreachable!("parsed whole, or not a flag"),
    };
    // A list item is checked as a list of one: `set` takes the whole list.
    let checked = match key.flag {
        Flag::List { .. } => toml::Value::Array(vec![value.clone()]),
        _ => value.clone(),
    };
    (key.set)(&mut Config::default(), &checked, s)?;
    Ok(Parsed {
        value,
        written: s.to_string(),
    })
}

/// `NAME=VALUE` as a table of one; with `numbers`, an integer value is an integer.
fn pair(s: &str, numbers: bool) -> Result<toml::Value, String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not of the form NAME=VALUE"))?;
    let value = match value.trim().parse::<i64>() {
        Ok(n) if numbers => toml::Value::Integer(n),
        _ => toml::Value::String(value.to_string()),
    };
    Ok(toml::Value::Table(toml::map::Map::from_iter([(
        name.to_string(),
        value,
    )])))
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

/// A path flag relative to where forkecho was started, made absolute now: a daemon works
/// from /, and a reload must find the same file. Left as it is if that fails.
fn absolute(s: &str) -> String {
    match std::path::absolute(s) {
        Ok(path) => path.to_string_lossy().into_owned(),
        Err(_) => s.to_string(),
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

impl clap::Args for KeyFlags {
    fn augment_args(cmd: Command) -> Command {
        cmd.args(
            TABLE
                .iter()
                .filter(|k| !matches!(k.flag, Flag::FileOnly))
                .map(arg),
        )
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for KeyFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = KeyFlags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.given.clear();
        for key in &TABLE {
            if let Some(given) = given(key, matches) {
                self.given.push(given);
            }
        }
        Ok(())
    }
}

/// What the command line gives for `key`, if anything: a list's items gathered into one
/// array, as the file writes it.
fn given(key: &'static Key, matches: &ArgMatches) -> Option<Given> {
    if let Flag::FileOnly = key.flag {
        return None;
    }
    let parsed: Vec<&Parsed> = matches.get_many::<Parsed>(key.name)?.collect();
    let last = parsed.last()?;
    let all_written = || {
        parsed
            .iter()
            .map(|p| p.written.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (value, written) = match key.flag {
        Flag::List { .. } => (
            toml::Value::Array(parsed.iter().map(|p| p.value.clone()).collect()),
            all_written(),
        ),
        Flag::Trailing(_) => (trailing_words(&parsed), all_written()),
        // Later pairs win over earlier ones with the same name, as later flags do.
        Flag::Pairs { .. } => (
            toml::Value::Table(
                parsed
                    .iter()
                    .filter_map(|p| p.value.as_table())
                    .flat_map(|t| t.clone())
                    .collect(),
            ),
            all_written(),
        ),
        _ => (last.value.clone(), last.written.clone()),
    };
    Some(Given {
        key: key.name,
        value,
        written,
    })
}

/// The words after `--` as an array; a program named by a relative path with a slash is
/// made absolute now, like every path given on the command line (a daemon works from /).
fn trailing_words(parsed: &[&Parsed]) -> toml::Value {
    let mut words: Vec<toml::Value> = parsed.iter().map(|p| p.value.clone()).collect();
    if let Some(toml::Value::String(program)) = words.first_mut() {
        if program.contains('/') && !program.starts_with('/') {
            *program = absolute(program);
        }
    }
    toml::Value::Array(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_escapes() {
        assert_eq!(unescape(r"hi\n").unwrap(), "hi\n");
        assert_eq!(unescape(r"a\\b\t").unwrap(), "a\\b\t");
        assert!(unescape(r"\q").is_err());
        assert!(unescape("\\").is_err());
    }
}

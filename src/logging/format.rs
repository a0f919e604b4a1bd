//! How one record is laid out (`log_format`): `text` for people, `json` or `logfmt` for log
//! shippers, each with the same fields: `time`, `level`, `pid`, `event` (one of a fixed
//! vocabulary: `listening`, `accepted`, `refused`, `ended`, `reload`, `shutdown`, `status`,
//! `control`, `fork_failed`, ...; `log` for any other line), the event's own fields (`peer`,
//! `child`, `code` or `signal`, `duration`, `reason`, `source`, ...) and `msg`, the text line's
//! message. A text line carries its fields in its message already.
//!
//! Under systemd, when stderr is the journal's stream (`JOURNAL_STREAM` names its device and
//! inode), each line starts with its syslog priority (`<3>` error … `<7>` debug), which the
//! journal takes as the line's priority, and carries no time of its own: the journal's is
//! exact.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The layout of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Format {
    /// `<time> <LEVEL> forkecho[<pid>] <message>`.
    #[default]
    Text = 0,
    /// One JSON object per line.
    Json = 1,
    /// `key=value` pairs, values quoted where needed.
    Logfmt = 2,
}

impl Format {
    pub fn parse(word: &str) -> Option<Format> {
        match word.to_ascii_lowercase().as_str() {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            "logfmt" => Some(Format::Logfmt),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Logfmt => "logfmt",
        }
    }

    fn from_u8(value: u8) -> Format {
        match value {
            1 => Format::Json,
            2 => Format::Logfmt,
            _ => Format::Text,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

static FORMAT: AtomicU8 = AtomicU8::new(Format::Text as u8);
static JOURNAL: AtomicBool = AtomicBool::new(false);

/// Lays out every line from now on as `format` (at start and on reload; children forked later
/// inherit it).
pub fn set_format(format: Format) {
    FORMAT.store(format as u8, Ordering::Relaxed);
}

/// Whether stderr (`fd`) is the journal's stream: `JOURNAL_STREAM=<device>:<inode>` names it,
/// and only counts when it is still what stderr is (a redirection would make it stale).
pub(super) fn detect_journal(fd: libc::c_int) {
    let named = std::env::var("JOURNAL_STREAM").ok().and_then(|value| {
        let (dev, ino) = value.split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    let is_journal = named.is_some_and(|(dev, ino)| {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // Safe: fstat fills `stat` when it returns 0.
        if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
            return false;
        }
        // Safe: initialised by the successful fstat.
        let stat = unsafe { stat.assume_init() };
        stat.st_dev == dev && stat.st_ino == ino
    });
    JOURNAL.store(is_journal, Ordering::Relaxed);
}

/// The syslog priority of a level, as the journal reads a `<N>` prefix.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// The layout lines have now.
pub(super) fn current() -> Format {
    Format::from_u8(FORMAT.load(Ordering::Relaxed))
}

/// Writes one record in `format`. `quote_rest` is called where the message, the last field,
/// starts inside quotes (JSON, logfmt), with what must close the line.
pub(super) fn write_record<W: fmt::Write>(
    out: &mut W,
    format: Format,
    quote_rest: impl FnOnce(&mut W, &'static str),
    level: log::Level,
    pid: u32,
    message: &fmt::Arguments<'_>,
    fields: Option<&dyn log::kv::Source>,
) -> fmt::Result {
    let journal = JOURNAL.load(Ordering::Relaxed);
    if journal {
        write!(out, "<{}>", priority(level))?;
    }
    let now = (!journal).then(|| {
        jiff::Timestamp::try_from(std::time::SystemTime::now())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    });
    match format {
        Format::Text => {
            if let Some(now) = now {
                write!(out, "{now:.3} ")?;
            }
            write!(out, "{level:<5} forkecho[{pid}] {message}")
        }
        Format::Json => {
            out.write_char('{')?;
            if let Some(now) = now {
                write!(out, "\"time\":\"{now:.3}\",")?;
            }
            let level = level.as_str().to_ascii_lowercase();
            write!(
                out,
                "\"level\":\"{level}\",\"pid\":{pid},\"event\":\"{}\"",
                event_of(fields)
            )?;
            if let Some(fields) = fields {
                let _ = fields.visit(&mut Fields { out, json: true });
            }
            out.write_str(",\"msg\":\"")?;
            quote_rest(out, "\"}");
            write!(out, "{message}")
        }
        Format::Logfmt => {
            if let Some(now) = now {
                write!(out, "time={now:.3} ")?;
            }
            let level = level.as_str().to_ascii_lowercase();
            write!(out, "level={level} pid={pid} event={}", event_of(fields))?;
            if let Some(fields) = fields {
                let _ = fields.visit(&mut Fields { out, json: false });
            }
            out.write_str(" msg=\"")?;
            quote_rest(out, "\"");
            write!(out, "{message}")
        }
    }
}

/// The record's `event` field, or `log` for a line that has none.
fn event_of(fields: Option<&dyn log::kv::Source>) -> EventName<'_> {
    EventName(fields.and_then(|f| f.get(log::kv::Key::from_str("event"))))
}

struct EventName<'a>(Option<log::kv::Value<'a>>);

impl fmt::Display for EventName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(event) => event.fmt(f),
            None => f.write_str("log"),
        }
    }
}

/// A field's value: a number as it is, anything else as text.
fn is_number(value: &log::kv::Value<'_>) -> bool {
    value.to_u64().is_some() || value.to_i64().is_some() || value.to_f64().is_some()
}

/// Writes a record's fields (all but `event`, written first), as JSON members (`json`) or
/// logfmt pairs; each value through [`write_escaped`].
struct Fields<'w, W> {
    out: &'w mut W,
    json: bool,
}

impl<'kvs, W: fmt::Write> log::kv::VisitSource<'kvs> for Fields<'_, W> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        if key.as_str() == "event" {
            return Ok(());
        }
        let written = match self.json {
            true if is_number(&value) => write!(self.out, ",\"{key}\":{value}"),
            true => write!(self.out, ",\"{key}\":\"")
                .and_then(|()| write_escaped(self.out, &value, true))
                .and_then(|()| self.out.write_char('"')),
            false => {
                write!(self.out, " {key}=").and_then(|()| write_escaped(self.out, &value, false))
            }
        };
        written.map_err(|_| log::kv::Error::msg("line full"))
    }
}

/// Longest field value written, in bytes before escaping: with at most a handful of fields a
/// record, the fields always fit a line, and only `msg`, last and inside its quotes, is ever
/// cut, so a cut line is still a valid record. (A long reason stays whole in `msg`.)
const MAX_FIELD: usize = 256;

/// Cuts `text` to `MAX_FIELD` bytes at a character boundary, marking the cut with `…`.
fn shorten(text: &mut String) {
    if text.len() <= MAX_FIELD {
        return;
    }
    let mut end = MAX_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
}

/// Writes `value` escaped for a JSON string (`json`), or as a logfmt value: bare when it is
/// one plain word, else quoted and escaped.
fn write_escaped<W: fmt::Write>(out: &mut W, value: &dyn fmt::Display, json: bool) -> fmt::Result {
    let mut text = String::new();
    let _ = write!(text, "{value}");
    shorten(&mut text);
    let plain = !text.is_empty()
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | '='));
    let quote = !json && !plain;
    if quote {
        out.write_char('"')?;
    }
    for c in text.chars() {
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_control() => write!(out, "\\u{:04x}", c as u32)?,
            c => out.write_char(c)?,
        }
    }
    if quote {
        out.write_char('"')?;
    }
    Ok(())
}

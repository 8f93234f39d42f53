//! Tables, JSON, times, durations and progress reporting, and terminal-safe text.
//!
//! Task names, headers, payloads and errors come from producers and handlers, and may hold
//! terminal control sequences (ESC, BEL, C1 controls). Everything printed for a person goes
//! through [`safe`] (by [`say!`], [`table`] and [`block`]); JSON goes through [`json_text`].

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::{Error, Result};

/// Whether a character must not reach a terminal as it is: control characters (C0 such as
/// ESC and BEL, DEL, C1 such as CSI) and the bidirectional overrides that make text read
/// other than it is stored.
fn hidden(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` for a terminal: every control or bidirectional-override character shown as an
/// escape (`\n`, `\t`, `\x1b`, `\u{9b}`), the rest (any script, emoji) unchanged. Not
/// reversible (a backslash stays as it is): `--json` gives the exact text.
pub fn safe(text: &str) -> Cow<'_, str> {
    escape(text, |_| false)
}

/// Like [`safe`] for text of several lines: newlines and tabs are kept.
pub fn block(text: &str) -> Cow<'_, str> {
    escape(text, |c| c == '\n' || c == '\t')
}

fn escape(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| hidden(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !hidden(c) || keep(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

/// Prints one line on stdout with [`safe`]: `say!("task {name}")`.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", $crate::output::safe(&format!($($arg)*)))
    };
}
pub(crate) use say;

/// Prints `rows` under `header` with columns padded to their widest cell, each cell
/// [`safe`].
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|row| row.iter().map(|cell| safe(cell).into_owned()).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints a JSON value on stdout, pretty, as [`json_text`].
pub fn json(value: &serde_json::Value) {
    println!("{}", json_text(value, true));
}

/// A JSON value as text that is safe on a terminal and still the same JSON: JSON escapes
/// C0 controls (ESC, BEL) in strings itself; DEL, C1 controls and bidirectional overrides
/// are written as `\u` escapes too (they can only stand in strings).
pub fn json_text(value: &serde_json::Value, pretty: bool) -> String {
    let text =
        if pretty { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) }
            .expect("JSON values always serialize");
    // C0 controls stand only escaped in strings, or as the newlines of pretty output.
    let unsafe_in_json = |c: char| hidden(c) && u32::from(c) >= 0x7f;
    if !text.chars().any(unsafe_in_json) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_in_json(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// RFC 3339 UTC time, to the second.
pub fn time(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).unwrap_or(at);
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// A short human duration: `45s`, `3m12s`, `2h5m`, `4d3h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Seconds from `at` to now (zero when `at` is in the future).
pub fn since(at: OffsetDateTime) -> Duration {
    (OffsetDateTime::now_utc() - at).try_into().unwrap_or_default()
}

/// Parses durations like `90s`, `5m`, `2h`, `1h30m`, `1d`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let bad = || {
        Error::msg(format!(
            "invalid duration {text:?}: use a number with a unit, e.g. 90s, 5m, 2h, 1h30m"
        ))
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let part = u32::try_from(n).ok().and_then(|n| unit.checked_mul(n)).ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

/// Shortens `text` to `max` characters with an ellipsis.
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Progress of a bulk operation on stderr: a bar on a terminal, otherwise a line every few
/// seconds and one at the end.
pub struct Progress {
    what: &'static str,
    total: u64,
    done: u64,
    tty: bool,
    last: Instant,
}

impl Progress {
    const LINE_EVERY: Duration = Duration::from_secs(2);
    const BAR_EVERY: Duration = Duration::from_millis(100);

    /// Progress over `total` items.
    pub fn new(what: &'static str, total: u64) -> Self {
        let tty = std::io::stderr().is_terminal();
        Self { what, total, done: 0, tty, last: Instant::now() }
    }

    /// One more item done.
    pub fn inc(&mut self) {
        self.done += 1;
        let every = if self.tty { Self::BAR_EVERY } else { Self::LINE_EVERY };
        if self.last.elapsed() >= every || (self.tty && self.done == self.total) {
            self.last = Instant::now();
            self.draw();
        }
    }

    fn draw(&self) {
        let total = self.total.max(self.done);
        let mut err = std::io::stderr().lock();
        if self.tty {
            const WIDTH: u64 = 30;
            let filled = (self.done * WIDTH).checked_div(total).unwrap_or(WIDTH) as usize;
            let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH as usize - filled));
            let _ = write!(err, "\r[{bar}] {}/{total} {}", self.done, self.what);
        } else {
            let _ = writeln!(err, "{} {}/{total}", self.what, self.done);
        }
        let _ = err.flush();
    }

    /// Ends the bar's line on a terminal; elsewhere prints the final count of a bulk run.
    pub fn finish(&self) {
        if self.tty {
            if self.done > 0 {
                eprintln!();
            }
        } else if self.total > 1 {
            self.draw();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
        for bad in ["", "5", "m", "5x", "1h30", "-5m", "5 m", "99999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ages() {
        assert_eq!(age(Duration::from_secs(45)), "45s");
        assert_eq!(age(Duration::from_secs(192)), "3m12s");
        assert_eq!(age(Duration::from_secs(7500)), "2h5m");
        assert_eq!(age(Duration::from_secs(97200)), "1d3h");
    }

    #[test]
    fn escapes() {
        assert!(matches!(safe("plain, grün, 東京 ✓"), Cow::Borrowed(_)));
        assert_eq!(safe("a\u{1b}[2J\u{7}b"), "a\\x1b[2J\\x07b");
        assert_eq!(safe("x\ny\tz\r\u{7f}\u{9b}\u{202e}"), "x\\ny\\tz\\r\\x7f\\u{9b}\\u{202e}");
        assert_eq!(block("one\n\ttwo\u{1b}"), "one\n\ttwo\\x1b");
    }

    #[test]
    fn json_stays_json() {
        let value = serde_json::json!({ "s": "a\u{1b}\u{7f}\u{9b}\u{202e}b\n", "n": 1 });
        for pretty in [true, false] {
            let text = json_text(&value, pretty);
            assert!(!text.chars().any(|c| hidden(c) && c != '\n'), "{text}");
            assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), value);
        }
    }

    #[test]
    fn clipping() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("a longer text", 5), "a lo…");
    }
}

//! Tables, JSON, times, durations and progress reporting.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::{Error, Result};

/// Prints `rows` under `header` with columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
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
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints a JSON value on stdout.
pub fn json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values always serialize"));
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
    fn clipping() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("a longer text", 5), "a lo…");
    }
}

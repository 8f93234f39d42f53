//! Cron expressions as nats-server runs them, checked before they are published, and the
//! times they name.
//!
//! The server's cron (robfig/cron's parser) takes six fields, `second minute hour
//! day-of-month month day-of-week`; each a comma-separated list of `*`, `?`, `N`, `N-M`,
//! with an optional `/step`; months and weekdays also by their first three letters
//! (`jan`, `mon`). Day of month and day of week combine with OR when both are restricted,
//! AND when either is `*`. A pattern that matches no time within five years is refused.

use time::{Date, OffsetDateTime, Time};

/// The shortcuts the server knows, and the cron they stand for.
pub(crate) const SHORTCUTS: [(&str, &str); 7] = [
    ("@yearly", "0 0 0 1 1 *"),
    ("@annually", "0 0 0 1 1 *"),
    ("@monthly", "0 0 0 1 * *"),
    ("@weekly", "0 0 0 * * 0"),
    ("@daily", "0 0 0 * * *"),
    ("@midnight", "0 0 0 * * *"),
    ("@hourly", "0 0 * * * *"),
];

/// The server looks this many years ahead for a matching time, and refuses a pattern
/// without one.
const YEARS_AHEAD: u32 = 5;

/// A parsed cron pattern: one bit per allowed value of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cron {
    second: u64,
    minute: u64,
    hour: u64,
    day_of_month: u64,
    month: u64,
    day_of_week: u64,
    /// Day of month or day of week was given as `*` or `?`: both must then match.
    day_star: bool,
}

/// One field's name, range and value names.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MONTHS: &[&str] =
    &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

const FIELDS: [Field; 6] = [
    Field { name: "second", min: 0, max: 59, names: &[] },
    Field { name: "minute", min: 0, max: 59, names: &[] },
    Field { name: "hour", min: 0, max: 23, names: &[] },
    Field { name: "day-of-month", min: 1, max: 31, names: &[] },
    Field { name: "month", min: 1, max: 12, names: MONTHS },
    Field { name: "day-of-week", min: 0, max: 6, names: WEEKDAYS },
];

impl Cron {
    /// Parses a cron expression: six fields, five (seconds are then 0), or a shortcut such
    /// as `@daily`. Returns the expression to give the server (five fields get a leading
    /// `0`) and the pattern; the error says what is wrong, naming the field.
    pub(crate) fn parse(expr: &str) -> Result<(String, Cron), String> {
        let expr = expr.trim();
        if expr.starts_with('@') {
            let Some((name, pattern)) = SHORTCUTS.iter().find(|(name, _)| *name == expr) else {
                return Err(format!(
                    "unknown shortcut `{expr}`: use one of {} (and `Every::interval` for `@every`)",
                    SHORTCUTS.map(|(name, _)| name).join(", ")
                ));
            };
            return Ok(((*name).to_owned(), Self::parse_fields(pattern)?));
        }
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let normalized = match fields.len() {
            6 => fields.join(" "),
            5 => format!("0 {}", fields.join(" ")),
            n => {
                return Err(format!(
                    "has {n} field{}; use 6 (second minute hour day-of-month month day-of-week) \
                     or 5 (minute hour day-of-month month day-of-week, at second 0)",
                    if n == 1 { "" } else { "s" }
                ))
            }
        };
        let cron = Self::parse_fields(&normalized)?;
        Ok((normalized, cron))
    }

    fn parse_fields(pattern: &str) -> Result<Cron, String> {
        let mut bits = [0u64; 6];
        let mut stars = [false; 6];
        for (i, text) in pattern.split_whitespace().enumerate() {
            let field = &FIELDS[i];
            let (value, star) = parse_field(text, field)
                .map_err(|problem| format!("{} field `{text}`: {problem}", field.name))?;
            bits[i] = value;
            stars[i] = star;
        }
        let [second, minute, hour, day_of_month, month, day_of_week] = bits;
        let cron = Cron {
            second,
            minute,
            hour,
            day_of_month,
            month,
            day_of_week,
            day_star: stars[3] || stars[5],
        };
        if cron.next_after(OffsetDateTime::now_utc()).is_none() {
            return Err(format!(
                "matches no time in the next {YEARS_AHEAD} years (a day that no month has?)"
            ));
        }
        Ok(cron)
    }

    fn day_matches(&self, date: Date) -> bool {
        let in_month = has(self.day_of_month, u32::from(date.day()));
        let in_week = has(self.day_of_week, u32::from(date.weekday().number_days_from_sunday()));
        let month = has(self.month, u32::from(u8::from(date.month())));
        month && if self.day_star { in_month && in_week } else { in_month || in_week }
    }

    /// The first matching second of a day at or after `from` (seconds since midnight).
    fn first_second_from(&self, from: u32) -> Option<u32> {
        let (fh, fm, fs) = (from / 3600, from / 60 % 60, from % 60);
        for h in (fh..24).filter(|h| has(self.hour, *h)) {
            let m0 = if h == fh { fm } else { 0 };
            for m in (m0..60).filter(|m| has(self.minute, *m)) {
                let s0 = if h == fh && m == fm { fs } else { 0 };
                if let Some(s) = (s0..60).find(|s| has(self.second, *s)) {
                    return Some(h * 3600 + m * 60 + s);
                }
            }
        }
        None
    }

    /// The last matching second of a day at or before `to` (seconds since midnight).
    fn last_second_to(&self, to: u32) -> Option<u32> {
        let (th, tm, ts) = (to / 3600, to / 60 % 60, to % 60);
        for h in (0..=th).rev().filter(|h| has(self.hour, *h)) {
            let m1 = if h == th { tm } else { 59 };
            for m in (0..=m1).rev().filter(|m| has(self.minute, *m)) {
                let s1 = if h == th && m == tm { ts } else { 59 };
                if let Some(s) = (0..=s1).rev().find(|s| has(self.second, *s)) {
                    return Some(h * 3600 + m * 60 + s);
                }
            }
        }
        None
    }

    /// The first matching time strictly after `after`, in `after`'s UTC offset (a fixed
    /// offset: the clock changes of a time zone are not known here).
    pub(crate) fn next_after(&self, after: OffsetDateTime) -> Option<OffsetDateTime> {
        let start = after.replace_nanosecond(0).ok()?.checked_add(time::Duration::SECOND)?;
        let mut date = start.date();
        let mut from = seconds_of_day(start.time());
        for _ in 0..=(YEARS_AHEAD * 366) {
            if self.day_matches(date) {
                if let Some(second) = self.first_second_from(from) {
                    return Some(at(date, second, after));
                }
            }
            date = date.next_day()?;
            from = 0;
        }
        None
    }

    /// The last matching time strictly before `before`, in `before`'s UTC offset.
    pub(crate) fn last_before(&self, before: OffsetDateTime) -> Option<OffsetDateTime> {
        let whole = before.replace_nanosecond(0).ok()?;
        let end = if whole == before { whole.checked_sub(time::Duration::SECOND)? } else { whole };
        let mut date = end.date();
        let mut to = seconds_of_day(end.time());
        for _ in 0..=(YEARS_AHEAD * 366) {
            if self.day_matches(date) {
                if let Some(second) = self.last_second_to(to) {
                    return Some(at(date, second, before));
                }
            }
            date = date.previous_day()?;
            to = 86_399;
        }
        None
    }
}

fn has(bits: u64, value: u32) -> bool {
    bits & (1 << value) != 0
}

fn seconds_of_day(t: Time) -> u32 {
    u32::from(t.hour()) * 3600 + u32::from(t.minute()) * 60 + u32::from(t.second())
}

/// `second` (since midnight) of `date`, in the offset of `like`.
fn at(date: Date, second: u32, like: OffsetDateTime) -> OffsetDateTime {
    let time = Time::from_hms((second / 3600) as u8, (second / 60 % 60) as u8, (second % 60) as u8)
        .expect("seconds of a day form a valid time");
    date.with_time(time).assume_offset(like.offset())
}

/// One field: the allowed values as bits, and whether it was given as `*` or `?`.
fn parse_field(text: &str, field: &Field) -> Result<(u64, bool), String> {
    let mut bits = 0;
    let mut star = false;
    for item in text.split(',') {
        if item.is_empty() {
            return Err("has an empty list item".to_owned());
        }
        let (range, step) = match item.split_once('/') {
            None => (item, None),
            Some((_, step)) if step.contains('/') => return Err(format!("`{item}` has two `/`")),
            Some((range, step)) => (range, Some(step)),
        };
        let (start, mut end, mut any) = if range == "*" || range == "?" {
            (field.min, field.max, true)
        } else {
            match range.split_once('-') {
                None => {
                    let value = value(range, field)?;
                    (value, value, false)
                }
                Some((low, high)) if !high.contains('-') => {
                    (value(low, field)?, value(high, field)?, false)
                }
                Some(_) => return Err(format!("`{item}` has two `-`")),
            }
        };
        let step = match step {
            None => 1,
            Some(step) => {
                if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("step `{step}` is not a number"));
                }
                // The server reads a step as a Go int: up to `i64::MAX`.
                let step: u64 =
                    step.parse().ok().filter(|s| *s <= i64::MAX as u64).ok_or_else(|| {
                        format!("step `{step}` is too large (the largest is {})", i64::MAX)
                    })?;
                // `N/step` means `N-max/step`.
                if !range.contains('-') && !any {
                    end = field.max;
                }
                if step > 1 {
                    any = false;
                }
                step
            }
        };
        if step == 0 {
            return Err("a step must be at least 1".to_owned());
        }
        if start < field.min {
            return Err(format!("{start} is below the minimum {}", field.min));
        }
        if end > field.max {
            return Err(format!("{end} is above the maximum {}{}", field.max, hint(field)));
        }
        if start > end {
            return Err(format!("range `{range}` runs backwards"));
        }
        // A step past the end leaves the start value only.
        let mut value = u64::from(start);
        while value <= u64::from(end) {
            bits |= 1 << value;
            match value.checked_add(step) {
                Some(next) => value = next,
                None => break,
            }
        }
        star |= any;
    }
    Ok((bits, star))
}

/// A value: a number, or for months and weekdays a three-letter name.
fn value(text: &str, field: &Field) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(i) = field.names.iter().position(|name| *name == lower) {
        return Ok(i as u32 + field.min);
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| format!("{text} is too large"));
    }
    Err(match field.names {
        [] => format!("`{text}` is not a number"),
        names => {
            format!("`{text}` is not a number nor a name ({}-{})", names[0], names[names.len() - 1])
        }
    })
}

fn hint(field: &Field) -> &'static str {
    if field.name == "day-of-week" {
        " (0 is Sunday)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;

    fn t(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap()
    }

    fn next(expr: &str, after: &str) -> String {
        let (_, cron) = Cron::parse(expr).unwrap();
        cron.next_after(t(after)).unwrap().format(&Rfc3339).unwrap()
    }

    fn last(expr: &str, before: &str) -> String {
        let (_, cron) = Cron::parse(expr).unwrap();
        cron.last_before(t(before)).unwrap().format(&Rfc3339).unwrap()
    }

    #[test]
    fn five_fields_get_second_zero_and_shortcuts_stay() {
        assert_eq!(Cron::parse("30 2 * * *").unwrap().0, "0 30 2 * * *");
        assert_eq!(Cron::parse(" 0  30 2 * * * ").unwrap().0, "0 30 2 * * *");
        assert_eq!(Cron::parse("@daily").unwrap().0, "@daily");
        assert_eq!(Cron::parse("@daily").unwrap().1, Cron::parse("0 0 0 * * *").unwrap().1);
    }

    #[test]
    fn bad_expressions_name_the_field() {
        for (expr, expected) in [
            ("* * * *", "has 4 fields"),
            ("", "has 0 fields"),
            ("0 61 * * * *", "minute field `61`: 61 is above the maximum 59"),
            ("0 0 24 * * *", "hour field `24`: 24 is above the maximum 23"),
            ("0 0 0 0 * *", "day-of-month field `0`: 0 is below the minimum 1"),
            ("0 0 0 * 13 *", "month field `13`"),
            ("0 0 0 * foo *", "month field `foo`: `foo` is not a number nor a name (jan-dec)"),
            ("0 0 0 * * 7", "day-of-week field `7`: 7 is above the maximum 6 (0 is Sunday)"),
            ("0 0 0 * * funday", "day-of-week field `funday`"),
            ("x * * * * *", "second field `x`: `x` is not a number"),
            ("0 5-1 * * * *", "runs backwards"),
            ("0 */0 * * * *", "a step must be at least 1"),
            ("0 1,,2 * * * *", "empty list item"),
            ("0 0 0 31 2 *", "matches no time"),
            ("@fortnightly", "unknown shortcut `@fortnightly`"),
            ("@every 1s", "unknown shortcut"),
        ] {
            let err = Cron::parse(expr).unwrap_err();
            assert!(err.contains(expected), "{expr:?}: {err}");
        }
    }

    #[test]
    fn names_ranges_and_steps() {
        let (_, cron) = Cron::parse("0 0 9 * JAN-mar Mon-FRI").unwrap();
        assert_eq!(cron.month, 0b1110);
        assert_eq!(cron.day_of_week, 0b111110);
        let (_, cron) = Cron::parse("*/15 5/20 1-10/3 * * ?").unwrap();
        assert_eq!(cron.second, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(cron.minute, 1 << 5 | 1 << 25 | 1 << 45);
        assert_eq!(cron.hour, 1 << 1 | 1 << 4 | 1 << 7 | 1 << 10);
    }

    #[test]
    fn huge_steps_mean_the_start_only() {
        // The server reads a step as a Go int: any step up to `i64::MAX` is taken, and one
        // past the field's range leaves the start value only.
        let (_, cron) = Cron::parse("1/4294967295 * * * * *").unwrap();
        assert_eq!(cron.second, 1 << 1);
        let (_, cron) = Cron::parse("0 5/9223372036854775807 * * * *").unwrap();
        assert_eq!(cron.minute, 1 << 5);
        let (_, cron) = Cron::parse("0 0 3-20/4294967296 * * *").unwrap();
        assert_eq!(cron.hour, 1 << 3);
        let err = Cron::parse("0 5/9223372036854775808 * * * *").unwrap_err();
        assert!(err.starts_with("minute field `5/9223372036854775808`: step"), "{err}");
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn next_and_last_times() {
        assert_eq!(next("0 30 2 * * *", "2026-11-29T02:30:00Z"), "2026-11-30T02:30:00Z");
        assert_eq!(next("0 30 2 * * *", "2026-11-29T02:29:59.5Z"), "2026-11-29T02:30:00Z");
        assert_eq!(next("* * * * * *", "2026-11-29T10:00:00.2Z"), "2026-11-29T10:00:01Z");
        assert_eq!(next("@yearly", "2026-11-29T10:00:00Z"), "2027-01-01T00:00:00Z");
        assert_eq!(next("0 0 0 29 2 *", "2026-03-01T00:00:00Z"), "2028-02-29T00:00:00Z");
        // Both days restricted: either matches (the 13th, or a Friday).
        assert_eq!(next("0 0 0 13 * 5", "2026-11-01T00:00:00Z"), "2026-11-06T00:00:00Z");
        // Day of week `*`: both must match.
        assert_eq!(next("0 0 0 13 * *", "2026-11-01T00:00:00Z"), "2026-11-13T00:00:00Z");
        // The offset of the given time is kept.
        assert_eq!(next("0 30 2 * * *", "2026-11-29T03:00:00+01:00"), "2026-11-30T02:30:00+01:00");
        assert_eq!(last("0 30 2 * * *", "2026-11-30T02:30:00+01:00"), "2026-11-29T02:30:00+01:00");
        assert_eq!(last("* * * * * *", "2026-11-29T10:00:01Z"), "2026-11-29T10:00:00Z");
        assert_eq!(last("* * * * * *", "2026-11-29T10:00:01.5Z"), "2026-11-29T10:00:01Z");
        assert_eq!(last("@monthly", "2027-01-01T00:00:00Z"), "2026-12-01T00:00:00Z");
    }
}

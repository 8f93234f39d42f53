//! [`Every`]: when a periodic schedule fires.

use std::fmt;
use std::time::Duration;

use time::OffsetDateTime;

use super::cron::Cron;
use crate::error::{ScheduleError, ScheduleErrorKind};

/// When a periodic schedule fires: a cron expression (optionally in a time zone), a fixed
/// interval, or a shortcut such as [`Every::daily`]. The server keeps the time; natasks
/// only checks the definition before it is published.
///
/// ```
/// use std::time::Duration;
/// use natasks::Every;
///
/// // 02:30:00 every day, Berlin time (six fields: second minute hour day month weekday).
/// let nightly = Every::cron("0 30 2 * * *")?.time_zone("Europe/Berlin");
/// // Five fields work too: at second 0 of every 15th minute, UTC.
/// let quarterly = Every::cron("*/15 * * * *")?;
/// assert_eq!(quarterly.expression(), "0 */15 * * * *");
/// let pulse = Every::interval(Duration::from_secs(30));
/// assert_eq!(pulse.expression(), "@every 30s");
/// let bad = Every::cron("0 61 * * * *").unwrap_err();
/// assert_eq!(bad.kind(), natasks::ScheduleErrorKind::InvalidSchedule);
/// # Ok::<(), natasks::ScheduleError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Every {
    rule: Rule,
    time_zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// `@every <interval>`; the expression is kept as written.
    Interval {
        interval: Duration,
        expression: String,
    },
    Cron {
        expression: String,
        cron: Cron,
    },
    /// A schedule natasks did not write and cannot read, kept as the server has it.
    Other(String),
}

/// The shortest interval the server runs.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The longest interval: 100 years of 365 days. The server holds the next fire time in
/// nanoseconds since 1970, which end in April 2262: a fire time after that wraps, and the
/// schedule fires continuously.
pub const MAX_INTERVAL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The longest time zone name accepted.
const MAX_ZONE: usize = 255;

impl Every {
    /// A cron expression: six fields (`second minute hour day-of-month month
    /// day-of-week`), five (seconds are then 0), or a shortcut (`@yearly`, `@annually`,
    /// `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`). Fields take `*`, `?`,
    /// numbers, ranges `N-M`, steps `/N`, lists `a,b`, and for months and weekdays their
    /// three-letter names (`jan`, `mon`). Day of month and day of week match either when
    /// both are restricted. Runs in UTC unless a [`time_zone`](Self::time_zone) is given.
    ///
    /// Fails with [`ScheduleErrorKind::InvalidSchedule`], naming the field, for an
    /// expression the server would refuse: a wrong number of fields, a value out of range,
    /// an unknown name, a date that never comes (`0 0 0 31 2 *`).
    pub fn cron(expression: &str) -> Result<Self, ScheduleError> {
        let (expression, cron) = Cron::parse(expression).map_err(|problem| {
            ScheduleError::new(
                ScheduleErrorKind::InvalidSchedule,
                format!("invalid cron expression {:?}: {problem}", expression.trim()),
            )
        })?;
        Ok(Self { rule: Rule::Cron { expression, cron }, time_zone: None })
    }

    /// Every `interval` (`@every`), the first tick one interval after the schedule is
    /// declared. A whole number of seconds from 1 s ([`MIN_INTERVAL`]) to 100 years
    /// ([`MAX_INTERVAL`]); checked when the schedule is declared. (The server rounds each
    /// tick to the second before adding the interval, so 1.4 s would fire every second.)
    /// Intervals take no time zone.
    pub fn interval(interval: Duration) -> Self {
        let expression = format!("@every {}", go_duration(interval));
        Self { rule: Rule::Interval { interval, expression }, time_zone: None }
    }

    /// At minute 0 of every hour (`@hourly`).
    pub fn hourly() -> Self {
        Self::shortcut("@hourly")
    }

    /// At midnight every day (`@daily`).
    pub fn daily() -> Self {
        Self::shortcut("@daily")
    }

    /// At midnight between Saturday and Sunday (`@weekly`).
    pub fn weekly() -> Self {
        Self::shortcut("@weekly")
    }

    /// At midnight on the first day of every month (`@monthly`).
    pub fn monthly() -> Self {
        Self::shortcut("@monthly")
    }

    /// At midnight on the first of January (`@yearly`).
    pub fn yearly() -> Self {
        Self::shortcut("@yearly")
    }

    fn shortcut(name: &str) -> Self {
        Self::cron(name).expect("the server's shortcuts are valid cron")
    }

    /// Runs a cron schedule in this IANA time zone (e.g. `Europe/Berlin`), following its
    /// clock changes: when the clock goes back, a time in the repeated hour fires twice;
    /// when it goes forward, a time in the skipped hour does not fire that day (prefer UTC,
    /// or local times outside 01:00 to 03:00). Default: UTC. Intervals take no time zone:
    /// declaring one with a time zone fails. The server checks the name against its time zone database (Go's,
    /// usually the system's) when the schedule is declared; `Local` is refused, since it
    /// would mean the server's own zone.
    #[must_use]
    pub fn time_zone(mut self, zone: impl Into<String>) -> Self {
        self.time_zone = Some(zone.into());
        self
    }

    /// The schedule as the server runs it (its `Nats-Schedule` header): `@every 30s`,
    /// `0 30 2 * * *`, `@daily`.
    pub fn expression(&self) -> &str {
        match &self.rule {
            Rule::Interval { expression, .. }
            | Rule::Cron { expression, .. }
            | Rule::Other(expression) => expression,
        }
    }

    /// The time zone of a cron schedule, if one was given.
    pub fn zone(&self) -> Option<&str> {
        self.time_zone.as_deref()
    }

    /// The interval of an interval schedule.
    pub fn as_interval(&self) -> Option<Duration> {
        match self.rule {
            Rule::Interval { interval, .. } => Some(interval),
            _ => None,
        }
    }

    /// Whether this is a cron schedule (shortcuts included).
    pub fn is_cron(&self) -> bool {
        matches!(self.rule, Rule::Cron { .. })
    }

    /// Everything the server would refuse, checked before anything is published.
    pub(crate) fn check(&self) -> Result<(), ScheduleError> {
        let invalid = |kind, message: String| Err(ScheduleError::new(kind, message));
        match (&self.rule, &self.time_zone) {
            (Rule::Interval { interval, .. }, _) if *interval < MIN_INTERVAL => invalid(
                ScheduleErrorKind::InvalidSchedule,
                format!("invalid interval {interval:?}: the server's minimum is {MIN_INTERVAL:?}"),
            ),
            (Rule::Interval { interval, .. }, _) if *interval > MAX_INTERVAL => invalid(
                ScheduleErrorKind::InvalidSchedule,
                format!(
                    "invalid interval {interval:?}: the longest is 100 years ({}); the server \
                     cannot hold fire times after April 2262",
                    go_duration(MAX_INTERVAL)
                ),
            ),
            (Rule::Interval { interval, .. }, _) if interval.subsec_nanos() != 0 => invalid(
                ScheduleErrorKind::InvalidSchedule,
                format!(
                    "invalid interval {interval:?}: must be a whole number of seconds (the \
                     server rounds each tick to the second, so it would fire every {}s)",
                    interval.as_secs_f64().round()
                ),
            ),
            (Rule::Interval { .. }, Some(zone)) => invalid(
                ScheduleErrorKind::InvalidSchedule,
                format!(
                    "invalid time zone {zone:?} for {}: a time zone applies to cron schedules only",
                    self.expression()
                ),
            ),
            (Rule::Other(expression), _) => invalid(
                ScheduleErrorKind::InvalidSchedule,
                format!("invalid schedule {expression:?}: not a cron expression or interval"),
            ),
            (_, Some(zone)) => check_zone(zone),
            (_, None) => Ok(()),
        }
    }

    /// The schedule a stored schedule message names (its `Nats-Schedule` and
    /// `Nats-Schedule-Time-Zone` headers).
    pub(crate) fn from_headers(expression: &str, zone: Option<&str>) -> Self {
        let rule = if let Some(text) = expression.strip_prefix("@every ") {
            match parse_go_duration(text.trim()) {
                Some(interval) => Rule::Interval { interval, expression: expression.to_owned() },
                None => Rule::Other(expression.to_owned()),
            }
        } else {
            match Cron::parse(expression) {
                Ok((normalized, cron)) if normalized == expression => {
                    Rule::Cron { expression: normalized, cron }
                }
                _ => Rule::Other(expression.to_owned()),
            }
        };
        Self { rule, time_zone: zone.map(str::to_owned) }
    }

    /// When a schedule declared (stored) at `declared` fires next after `now`, where that
    /// can be told without the server: an interval counts from the declaration (assuming
    /// the server ran throughout: a restart moves the phase), a cron schedule in UTC. A
    /// cron schedule in another time zone needs the zone's rules, which natasks does not
    /// ship: `None`.
    pub(crate) fn next_after(
        &self,
        declared: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        match (&self.rule, self.time_zone.as_deref()) {
            (Rule::Interval { interval, .. }, None) => {
                let interval = time::Duration::try_from(*interval).ok()?;
                let first = round_to_second(declared)? + interval;
                if first > now {
                    return Some(first);
                }
                let periods =
                    ((now - first).whole_nanoseconds() / interval.whole_nanoseconds()) + 1;
                first.checked_add(interval.checked_mul(i32::try_from(periods).ok()?)?)
            }
            (Rule::Cron { cron, .. }, None | Some("UTC" | "Etc/UTC")) => cron.next_after(now),
            _ => None,
        }
    }

    /// The tick before `next` (the time the server gives a produced task as the next
    /// tick): an interval before it, or the cron's last time before it in `next`'s UTC
    /// offset.
    pub(crate) fn tick_before(&self, next: OffsetDateTime) -> Option<OffsetDateTime> {
        match &self.rule {
            Rule::Interval { interval, .. } => {
                next.checked_sub(time::Duration::try_from(*interval).ok()?)
            }
            Rule::Cron { cron, .. } => cron.last_before(next),
            Rule::Other(_) => None,
        }
    }
}

impl fmt::Display for Every {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expression())?;
        match &self.time_zone {
            Some(zone) => write!(f, " ({zone})"),
            None => Ok(()),
        }
    }
}

/// A time zone name the server could load: anything else it refuses with error 10223, and
/// `Local` it would take as its own zone.
fn check_zone(zone: &str) -> Result<(), ScheduleError> {
    let problem = if zone.is_empty() {
        Some("is empty")
    } else if zone.len() > MAX_ZONE {
        Some("is too long")
    } else if !zone.bytes().all(|b| b.is_ascii_graphic()) {
        Some("must be an IANA name such as `Europe/Berlin` (ASCII, no spaces)")
    } else if zone == "Local" {
        Some("names the server's own zone: give the IANA name")
    } else if zone.starts_with('/') || zone.contains("..") {
        Some("must be an IANA name such as `Europe/Berlin`, not a path")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ScheduleError::new(
            ScheduleErrorKind::InvalidTimeZone,
            format!("invalid time zone {zone:?}: {problem}"),
        )),
        None => Ok(()),
    }
}

fn round_to_second(at: OffsetDateTime) -> Option<OffsetDateTime> {
    let whole = at.replace_nanosecond(0).ok()?;
    if at.nanosecond() >= 500_000_000 {
        whole.checked_add(time::Duration::SECOND)
    } else {
        Some(whole)
    }
}

/// A duration as Go's `time.ParseDuration` reads it: `1h30m`, `90s` as `1m30s`, `1500ms`,
/// `7ns`.
fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        let (h, m, s) = (d.as_secs() / 3600, d.as_secs() / 60 % 60, d.as_secs() % 60);
        let mut out = String::new();
        for (value, unit) in [(h, "h"), (m, "m"), (s, "s")] {
            if value > 0 {
                out.push_str(&format!("{value}{unit}"));
            }
        }
        if out.is_empty() {
            out.push_str("0s");
        }
        out
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

/// Parses a Go duration (`1h30m`, `1.5s`, `250ms`); `None` for anything else, or a
/// negative one.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len =
            rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let nanos_per = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * nanos_per;
    }
    (total.is_finite() && total <= i64::MAX as f64)
        .then(|| Duration::from_nanos(total.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;

    fn t(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap()
    }

    #[test]
    fn expressions() {
        assert_eq!(Every::interval(Duration::from_secs(90)).expression(), "@every 1m30s");
        assert_eq!(Every::interval(Duration::from_secs(3600)).expression(), "@every 1h");
        assert_eq!(Every::interval(Duration::from_secs(86_401)).expression(), "@every 24h1s");
        assert_eq!(Every::interval(Duration::ZERO).expression(), "@every 0s");
        assert_eq!(Every::interval(Duration::from_millis(1500)).expression(), "@every 1500ms");
        assert_eq!(
            Every::interval(Duration::from_nanos(1_000_000_001)).expression(),
            "@every 1000000001ns"
        );
        assert_eq!(Every::daily().expression(), "@daily");
        assert_eq!(Every::cron("30 2 * * *").unwrap().expression(), "0 30 2 * * *");
        let berlin = Every::cron("0 30 2 * * *").unwrap().time_zone("Europe/Berlin");
        assert_eq!(berlin.to_string(), "0 30 2 * * * (Europe/Berlin)");
        assert_eq!(berlin.zone(), Some("Europe/Berlin"));
    }

    #[test]
    fn checks() {
        let kind = |every: Every| every.check().map_err(|e| (e.kind(), e.to_string()));
        assert!(kind(Every::interval(Duration::from_secs(1))).is_ok());
        let (k, m) = kind(Every::interval(Duration::from_millis(999))).unwrap_err();
        assert_eq!(k, ScheduleErrorKind::InvalidSchedule);
        assert!(m.contains("invalid interval 999ms"), "{m}");
        let (k, m) = kind(Every::interval(Duration::from_secs(5)).time_zone("UTC")).unwrap_err();
        assert_eq!(k, ScheduleErrorKind::InvalidSchedule);
        assert!(m.contains("time zone \"UTC\""), "{m}");
        for zone in ["", "Local", "Europe/ Berlin", "../etc/passwd", "/etc/localtime"] {
            let (k, m) = kind(Every::daily().time_zone(zone)).unwrap_err();
            assert_eq!(k, ScheduleErrorKind::InvalidTimeZone, "{zone:?}");
            assert!(m.starts_with("invalid time zone"), "{m}");
        }
        assert!(kind(Every::daily().time_zone("America/Argentina/Buenos_Aires")).is_ok());
    }

    #[test]
    fn intervals_are_whole_seconds_of_at_most_a_century() {
        let check = |every: Every| every.check().map_err(|e| (e.kind(), e.to_string()));
        // The server rounds each tick to the second before adding the interval: 1.4 s would
        // fire every second.
        for millis in [1_400, 1_500, 2_001, 3_600_000 + 1] {
            let (k, m) = check(Every::interval(Duration::from_millis(millis))).unwrap_err();
            assert_eq!(k, ScheduleErrorKind::InvalidSchedule, "{millis} ms");
            assert!(m.starts_with("invalid interval "), "{m}");
            assert!(m.contains("whole number of seconds"), "{m}");
        }
        assert!(check(Every::interval(Duration::from_nanos(2_000_000_001))).is_err());
        assert!(check(Every::interval(Duration::from_secs(2))).is_ok());
        // The server holds the next fire time in nanoseconds since 1970, which end in 2262.
        let century = Duration::from_secs(100 * 365 * 86_400);
        assert!(check(Every::interval(century)).is_ok());
        for too_long in [
            century + Duration::from_secs(1),
            Duration::from_secs(300 * 365 * 86_400),
            Duration::from_nanos(i64::MAX as u64),
            Duration::MAX,
        ] {
            let (k, m) = check(Every::interval(too_long)).unwrap_err();
            assert_eq!(k, ScheduleErrorKind::InvalidSchedule, "{too_long:?}");
            assert!(m.starts_with("invalid interval "), "{m}");
            assert!(m.contains("100 years"), "{m}");
        }
    }

    #[test]
    fn read_back_from_headers() {
        for every in [
            Every::interval(Duration::from_secs(90)),
            Every::interval(Duration::from_secs(7322)),
            Every::interval(Duration::from_millis(1500)),
            Every::daily(),
            Every::cron("0 30 2 * * mon").unwrap().time_zone("Europe/Berlin"),
        ] {
            assert_eq!(Every::from_headers(every.expression(), every.zone()), every);
        }
        let go = Every::from_headers("@every 1h30m", None);
        assert_eq!(go.as_interval(), Some(Duration::from_secs(5400)));
        assert_eq!(go.expression(), "@every 1h30m");
        let other = Every::from_headers("@at 2030-01-01T00:00:00Z", None);
        assert_eq!(other.as_interval(), None);
        assert!(!other.is_cron());
        assert!(other.check().is_err());
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("-1s"), None);
        assert_eq!(parse_go_duration("1x"), None);
    }

    #[test]
    fn next_fire_times() {
        let every = Every::interval(Duration::from_secs(10));
        let declared = t("2026-11-29T10:00:00.4Z");
        assert_eq!(
            every.next_after(declared, t("2026-11-29T10:00:01Z")),
            Some(t("2026-11-29T10:00:10Z"))
        );
        assert_eq!(
            every.next_after(declared, t("2026-11-29T10:00:35Z")),
            Some(t("2026-11-29T10:00:40Z"))
        );
        assert_eq!(
            every.next_after(declared, t("2026-11-29T10:00:40Z")),
            Some(t("2026-11-29T10:00:50Z"))
        );
        let daily = Every::daily();
        assert_eq!(
            daily.next_after(declared, t("2026-11-29T10:00:00Z")),
            Some(t("2026-11-30T00:00:00Z"))
        );
        assert_eq!(daily.clone().time_zone("Europe/Berlin").next_after(declared, declared), None);
        assert_eq!(
            daily.time_zone("UTC").next_after(declared, declared),
            Some(t("2026-11-30T00:00:00Z"))
        );
    }

    #[test]
    fn ticks_before_the_next() {
        let every = Every::interval(Duration::from_secs(1));
        assert_eq!(every.tick_before(t("2026-11-29T09:25:02Z")), Some(t("2026-11-29T09:25:01Z")));
        let nightly = Every::cron("0 30 2 * * *").unwrap().time_zone("Europe/Berlin");
        assert_eq!(
            nightly.tick_before(t("2026-11-30T02:30:00+01:00")),
            Some(t("2026-11-29T02:30:00+01:00"))
        );
    }
}

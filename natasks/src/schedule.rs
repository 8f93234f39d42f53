//! When a delayed task is due: the times a JetStream schedule can name, and the schedule
//! header that names them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::error::{DispatchError, DispatchErrorKind};

/// The last year a due time may fall in, in UTC. nats-server holds a schedule's time in
/// nanoseconds since 1970 (a Go `int64`), which end on 2262-04-11T23:47:16Z: a later time
/// wraps, and the task would be delivered at once or at a wrong time.
const LAST_YEAR: i32 = 2261;

/// What every due-time error says about the limit.
const LIMIT: &str = "after the year 2261 (UTC): nats-server holds schedule times as \
                     nanoseconds since 1970, which end in April 2262";

/// A point in time a task is due, as [`Client::dispatch_at`](crate::Client::dispatch_at)
/// takes it: an [`OffsetDateTime`] or a [`SystemTime`].
///
/// The conversion fails with [`DispatchErrorKind::InvalidDueTime`] for a time after the
/// year 2261 in UTC: nats-server holds a schedule's time in nanoseconds since 1970, which
/// end on 2262-04-11. Times in the past are fine, however far back: they mean now.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use natasks::DueTime;
///
/// let soon = (SystemTime::now() + Duration::from_secs(60)).into_due_time()?;
/// assert!(soon > time::OffsetDateTime::now_utc());
/// let too_far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
/// assert_eq!(too_far.into_due_time().unwrap_err().kind(), natasks::DispatchErrorKind::InvalidDueTime);
/// # Ok::<(), natasks::DispatchError>(())
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a due time",
    label = "not a due time",
    note = "a due time is a `time::OffsetDateTime` or a `std::time::SystemTime`; for a delay, use `Client::dispatch_in`"
)]
pub trait DueTime: sealed::Sealed {
    /// The due time in UTC, or an error naming the time if it is after the year 2261.
    fn into_due_time(self) -> Result<OffsetDateTime, DispatchError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for time::OffsetDateTime {}
    impl Sealed for std::time::SystemTime {}
}

impl DueTime for OffsetDateTime {
    fn into_due_time(self) -> Result<OffsetDateTime, DispatchError> {
        match self.checked_to_offset(UtcOffset::UTC) {
            Some(utc) if utc.year() <= LAST_YEAR => Ok(utc),
            // Before the first time `time` can hold in UTC: as past as any other past time.
            None if self.year() < 0 => Ok(earliest()),
            _ => Err(invalid(format!("due time {} is {LIMIT}", describe(self)))),
        }
    }
}

impl DueTime for SystemTime {
    fn into_due_time(self) -> Result<OffsetDateTime, DispatchError> {
        // `OffsetDateTime::from(SystemTime)` panics on a time it cannot hold.
        match self.duration_since(UNIX_EPOCH) {
            Ok(after) => time::Duration::try_from(after)
                .ok()
                .and_then(|after| OffsetDateTime::UNIX_EPOCH.checked_add(after))
                .filter(|at| at.year() <= LAST_YEAR)
                .ok_or_else(|| {
                    invalid(format!("due time {after:?} after the Unix epoch is {LIMIT}"))
                }),
            Err(before) => Ok(time::Duration::try_from(before.duration())
                .ok()
                .and_then(|before| OffsetDateTime::UNIX_EPOCH.checked_sub(before))
                .unwrap_or_else(earliest)),
        }
    }
}

/// The due time `delay` from now, in UTC.
pub(crate) fn due_in(delay: Duration) -> Result<OffsetDateTime, DispatchError> {
    time::Duration::try_from(delay)
        .ok()
        .and_then(|delay| OffsetDateTime::now_utc().checked_add(delay))
        .filter(|at| at.year() <= LAST_YEAR)
        .ok_or_else(|| invalid(format!("delay {delay:?} puts the due time {LIMIT}")))
}

/// The `Nats-Schedule` header value for a task due at `at`: `@at <RFC 3339 UTC time>`.
/// Checks the time again, since a middleware may have set any time: one after the year
/// 2261 fails, and one before 1970 is sent as 1970-01-01T00:00:00Z, as past as any other
/// (the server's nanoseconds wrap before 1677 too).
pub(crate) fn at_expression(at: OffsetDateTime) -> Result<String, DispatchError> {
    let utc = at.into_due_time()?.max(OffsetDateTime::UNIX_EPOCH);
    let utc = utc.format(&Rfc3339).expect("a UTC time from 1970 to 2261 is RFC 3339");
    Ok(format!("@at {utc}"))
}

/// The earliest time `time` can hold, in UTC.
fn earliest() -> OffsetDateTime {
    PrimitiveDateTime::MIN.assume_utc()
}

/// `at` in RFC 3339 where it can be, else as `time` shows it.
fn describe(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

fn invalid(message: String) -> DispatchError {
    DispatchError::new(DispatchErrorKind::InvalidDueTime, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc3339(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap()
    }

    /// 2262-01-01T00:00:00Z, the first due time refused.
    const YEAR_2262: u64 = 9_214_646_400;

    #[test]
    fn offset_date_times() {
        let last = rfc3339("2261-12-31T23:59:59.999999999Z");
        assert_eq!(last.into_due_time().unwrap(), last);
        // 2262-01-01T00:30:00Z in UTC.
        let west = rfc3339("2261-12-31T23:30:00-01:00");
        let err = west.into_due_time().unwrap_err();
        assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime);
        assert!(err.to_string().contains("2261-12-31T23:30:00-01:00"), "{err}");
        assert!(err.to_string().contains("after the year 2261"), "{err}");
        // Past the last time the server can hold (2262-04-11T23:47:16Z): it would fire at
        // once, or at a wrong time.
        for far in ["2262-04-12T00:00:00Z", "2300-01-01T00:00:00Z", "9999-12-31T23:59:59Z"] {
            let err = rfc3339(far).into_due_time().unwrap_err();
            assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime, "{far}");
            assert!(err.to_string().contains(far), "{err}");
        }
        let east = rfc3339("2030-01-02T05:04:05+02:00");
        assert_eq!(east.into_due_time().unwrap(), rfc3339("2030-01-02T03:04:05Z"));
        assert_eq!(east.into_due_time().unwrap().offset(), UtcOffset::UTC);
        let first = PrimitiveDateTime::MIN.assume_offset(UtcOffset::from_hms(1, 0, 0).unwrap());
        assert_eq!(first.into_due_time().unwrap(), earliest());
    }

    #[test]
    fn system_times() {
        let year_2262 = UNIX_EPOCH + Duration::from_secs(YEAR_2262);
        let last = year_2262 - Duration::from_secs(1);
        assert_eq!(last.into_due_time().unwrap(), rfc3339("2261-12-31T23:59:59Z"));
        let year_10000 = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        for far in [year_2262, year_10000, UNIX_EPOCH + Duration::from_secs(i64::MAX as u64)] {
            let err = far.into_due_time().unwrap_err();
            assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime);
            let secs = far.duration_since(UNIX_EPOCH).unwrap().as_secs();
            assert!(err.to_string().contains(&format!("{secs}s after the Unix epoch")), "{err}");
        }
        let past = UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(past.into_due_time().unwrap(), rfc3339("1969-12-31T00:00:00Z"));
        if let Some(far_past) = UNIX_EPOCH.checked_sub(Duration::from_secs(i64::MAX as u64 / 2)) {
            assert_eq!(far_past.into_due_time().unwrap(), earliest());
        }
    }

    #[test]
    fn delays() {
        assert!(due_in(Duration::from_secs(60)).unwrap() > OffsetDateTime::now_utc());
        for delay in [
            Duration::MAX,
            Duration::from_secs(4_000_000_000 * 86_400),
            Duration::from_secs(300 * 366 * 86_400),
        ] {
            let err = due_in(delay).unwrap_err();
            assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime);
            assert!(err.to_string().contains(&format!("delay {delay:?}")), "{err}");
            assert!(err.to_string().contains("after the year 2261"), "{err}");
        }
        assert!(due_in(Duration::from_secs(200 * 365 * 86_400)).is_ok(), "200 years from now");
    }

    #[test]
    fn schedule_expressions() {
        let at = rfc3339("2030-01-02T05:04:05.5+02:00");
        assert_eq!(at_expression(at).unwrap(), "@at 2030-01-02T03:04:05.5Z");
        // A middleware may set any time: the limit holds there too.
        for far in
            ["2261-12-31T23:30:00-01:00", "2300-01-01T00:00:00Z", "9999-12-31T23:30:00-01:00"]
        {
            let err = at_expression(rfc3339(far)).unwrap_err();
            assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime, "{far}");
            assert!(err.to_string().contains(far), "{err}");
        }
        // Before 1970 the server's nanoseconds would wrap too; any past time means now.
        assert_eq!(
            at_expression(rfc3339("1000-01-01T00:00:00Z")).unwrap(),
            "@at 1970-01-01T00:00:00Z"
        );
        assert_eq!(
            at_expression(PrimitiveDateTime::MIN.assume_utc()).unwrap(),
            "@at 1970-01-01T00:00:00Z"
        );
    }
}

//! Rates: "at most N tasks started per period".

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// At most `count` tasks started per `period`, across every worker of a queue.
///
/// Written `N/period` (`10/s`, `600/1m`, `5/2h`, `100/10s`): the period is whole seconds,
/// from 1 s to a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    period: Duration,
}

/// A rate that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate {input:?}: {problem}")]
pub struct InvalidRate {
    input: String,
    problem: String,
}

/// The longest rate period.
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(24 * 3600);

impl Rate {
    /// At most `count` tasks per `period` (whole seconds, 1 s to a day; `count` at least 1).
    pub fn new(count: u32, period: Duration) -> Result<Self, InvalidRate> {
        let invalid = |problem: &str| InvalidRate {
            input: format!("{count}/{period:?}"),
            problem: problem.to_owned(),
        };
        if count == 0 {
            return Err(invalid("the count must be at least 1 (pause the queue to stop it)"));
        }
        if period < Duration::from_secs(1) || period.subsec_nanos() != 0 {
            return Err(invalid("the period must be whole seconds, at least 1 s"));
        }
        if period > MAX_RATE_PERIOD {
            return Err(invalid("the period must be at most a day"));
        }
        Ok(Self { count, period })
    }

    /// At most `count` tasks a second.
    pub fn per_second(count: u32) -> Result<Self, InvalidRate> {
        Self::new(count, Duration::from_secs(1))
    }

    /// The most tasks started per period.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}s", self.count, self.period.as_secs())
    }
}

impl FromStr for Rate {
    type Err = InvalidRate;

    fn from_str(input: &str) -> Result<Self, InvalidRate> {
        let invalid =
            |problem: &str| InvalidRate { input: input.to_owned(), problem: problem.to_owned() };
        let (count, period) = input
            .trim()
            .split_once('/')
            .ok_or_else(|| invalid("write it as COUNT/PERIOD, e.g. 10/s or 600/1m"))?;
        let count: u32 =
            count.trim().parse().map_err(|_| invalid("the count is not a whole number"))?;
        let period = period.trim();
        let digits = period.find(|c: char| !c.is_ascii_digit()).unwrap_or(period.len());
        let (number, unit) = period.split_at(digits);
        let number: u64 = if number.is_empty() {
            1
        } else {
            number.parse().map_err(|_| invalid("the period is not a whole number of units"))?
        };
        let unit = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(invalid("the period's unit must be s, m or h")),
        };
        let period = number
            .checked_mul(unit)
            .map(Duration::from_secs)
            .ok_or_else(|| invalid("the period is too long"))?;
        Self::new(count, period).map_err(|err| InvalidRate { input: input.to_owned(), ..err })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let rate: Rate = "10/s".parse().unwrap();
        assert_eq!((rate.count(), rate.period()), (10, Duration::from_secs(1)));
        assert_eq!("600/1m".parse::<Rate>().unwrap().period(), Duration::from_secs(60));
        assert_eq!("5/2h".parse::<Rate>().unwrap().to_string(), "5/7200s");
        let round: Rate = rate.to_string().parse().unwrap();
        assert_eq!(round, rate);
    }

    #[test]
    fn refuses_bad_rates() {
        for (input, problem) in [
            ("10", "COUNT/PERIOD"),
            ("0/s", "at least 1"),
            ("-1/s", "whole number"),
            ("10/0s", "at least 1 s"),
            ("10/2d", "unit"),
            ("10/25h", "at most a day"),
            ("x/s", "whole number"),
        ] {
            let err = input.parse::<Rate>().unwrap_err();
            assert!(err.to_string().contains(problem), "{input}: {err}");
        }
        assert!(Rate::new(1, Duration::from_millis(1500)).is_err());
    }
}

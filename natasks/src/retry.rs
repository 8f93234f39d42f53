//! Retry policy: how many deliveries a task gets and how long to wait between them.
//!
//! Retry state lives on the broker: a failed task is negatively acknowledged with a delay
//! and JetStream counts its deliveries, so a crashed worker loses nothing.

use std::time::Duration;

/// When a task is retried and when it is given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// Retries after the first attempt; `None` means unlimited.
    pub(crate) max_retries: Option<u64>,
    /// Delay before retry `n` is `backoff[n - 1]`, the last entry repeating.
    pub(crate) backoff: Vec<Duration>,
}

impl RetryPolicy {
    /// Whether a failure on delivery `attempt` (1-based) used up the retries.
    pub(crate) fn exhausted(&self, attempt: u64) -> bool {
        self.max_retries.is_some_and(|max| attempt > max)
    }

    /// Whether delivery `attempt` is beyond every allowed attempt: earlier deliveries ended
    /// without an outcome (the worker crashed or lost its lease), so it is given up unrun.
    pub(crate) fn overdue(&self, attempt: u64) -> bool {
        self.max_retries.is_some_and(|max| attempt > max.saturating_add(1))
    }

    /// The delay before redelivering a task that failed on delivery `attempt`.
    pub(crate) fn delay(&self, attempt: u64) -> Option<Duration> {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        let delay = self.backoff.get(index).or(self.backoff.last()).copied()?;
        (!delay.is_zero()).then_some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn unlimited_never_exhausts() {
        let p = RetryPolicy { max_retries: None, backoff: vec![] };
        assert!(!p.exhausted(u64::MAX));
        assert!(!p.overdue(u64::MAX));
        assert_eq!(p.delay(3), None);
    }

    #[test]
    fn max_retries_counts_after_first_attempt() {
        let p = RetryPolicy { max_retries: Some(2), backoff: vec![] };
        assert!(!p.exhausted(1));
        assert!(!p.exhausted(2));
        assert!(p.exhausted(3));
        assert!(!p.overdue(3));
        assert!(p.overdue(4));
        let none = RetryPolicy { max_retries: Some(0), backoff: vec![] };
        assert!(none.exhausted(1));
    }

    #[test]
    fn backoff_repeats_last_delay() {
        let p = RetryPolicy { max_retries: None, backoff: vec![ms(100), ms(200)] };
        assert_eq!(p.delay(1), Some(ms(100)));
        assert_eq!(p.delay(2), Some(ms(200)));
        assert_eq!(p.delay(9), Some(ms(200)));
        let zero = RetryPolicy { max_retries: None, backoff: vec![Duration::ZERO] };
        assert_eq!(zero.delay(1), None);
    }
}

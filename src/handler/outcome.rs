//! What a handler decides about an entry, and the policy that turns failed
//! attempts into delays and dead letters.

use std::time::Duration;

use rand::Rng;

use crate::settings::RetrySettings;

/// A handler's decision about one entry.
///
/// Returning `Err(e)` from a handler is the same as [`Outcome::Retry`] with
/// the policy's delay, with `e` recorded as the last error; a panic counts as
/// a failed attempt too.
///
/// ```
/// use std::time::Duration;
/// use redstream::Outcome;
///
/// let done = Outcome::Ack;
/// let later = Outcome::retry_after(Duration::from_secs(30));
/// let never = Outcome::dead_letter("customer does not exist");
/// # let _ = (done, later, never);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Done: acknowledge the entry.
    Ack,
    /// Not now: try again after the given delay, or the policy's delay for
    /// this attempt when `None`. Counts as a failed attempt; after
    /// `max_attempts` the entry is dead-lettered.
    Retry(Option<Duration>),
    /// Never: write the entry to the dead-letter stream with this reason, then
    /// acknowledge it.
    DeadLetter(String),
}

impl Outcome {
    /// `Retry` with the policy's delay.
    pub fn retry() -> Self {
        Outcome::Retry(None)
    }

    /// `Retry` after exactly `delay` (still bounded by the attempt budget).
    pub fn retry_after(delay: Duration) -> Self {
        Outcome::Retry(Some(delay))
    }

    /// `DeadLetter` with a reason.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter(reason.into())
    }
}

/// A group's retry policy: exponential backoff with jitter and an attempt
/// budget.
///
/// ```
/// use std::time::Duration;
/// use redstream::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .with_max_attempts(3)
///     .with_initial_delay(Duration::from_millis(100))
///     .with_jitter(0.0);
/// assert_eq!(policy.delay_for(1), Duration::from_millis(100));
/// assert_eq!(policy.delay_for(2), Duration::from_millis(200));
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Failed attempts after which the entry is dead-lettered.
    pub max_attempts: u32,
    /// Delay after the first failed attempt.
    pub initial_delay: Duration,
    /// Growth factor per attempt.
    pub factor: f64,
    /// Upper bound of a delay.
    pub max_delay: Duration,
    /// Random spread as a fraction of the delay.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::from(&RetrySettings::default())
    }
}

impl From<&RetrySettings> for RetryPolicy {
    fn from(s: &RetrySettings) -> Self {
        RetryPolicy {
            max_attempts: s.max_attempts,
            initial_delay: Duration::from_millis(s.initial_delay_ms),
            factor: s.factor,
            max_delay: Duration::from_millis(s.max_delay_ms),
            jitter: s.jitter,
        }
    }
}

impl RetryPolicy {
    /// Sets the attempt budget.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the first delay.
    pub fn with_initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = d;
        self
    }

    /// Sets the growth factor (at least 1.0).
    pub fn with_factor(mut self, f: f64) -> Self {
        self.factor = if f.is_finite() { f.max(1.0) } else { 1.0 };
        self
    }

    /// Sets the largest delay.
    pub fn with_max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Sets the jitter fraction (0.0 to 1.0).
    pub fn with_jitter(mut self, j: f64) -> Self {
        self.jitter = if j.is_finite() {
            j.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The delay after failed attempt number `attempt` (1-based):
    /// `initial × factor^(attempt-1)`, at most `max_delay`, then spread by a
    /// random ± `jitter` fraction (still at most `max_delay`).
    pub fn delay_for(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial_delay.as_secs_f64() * self.factor.powi(exp);
        let capped = secs.min(self.max_delay.as_secs_f64());
        if self.jitter > 0.0 {
            let spread = rand::rng().random_range(-self.jitter..=self.jitter);
            let jittered = (capped * (1.0 + spread)).clamp(0.0, self.max_delay.as_secs_f64());
            return Duration::from_secs_f64(jittered);
        }
        Duration::from_secs_f64(capped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy::default()
            .with_initial_delay(Duration::from_secs(1))
            .with_factor(3.0)
            .with_max_delay(Duration::from_secs(20))
            .with_jitter(0.0);
        assert_eq!(p.delay_for(1), Duration::from_secs(1));
        assert_eq!(p.delay_for(2), Duration::from_secs(3));
        assert_eq!(p.delay_for(3), Duration::from_secs(9));
        assert_eq!(p.delay_for(4), Duration::from_secs(20));
        assert_eq!(p.delay_for(500), Duration::from_secs(20));
    }

    #[test]
    fn jitter_stays_in_its_band() {
        let p = RetryPolicy::default()
            .with_initial_delay(Duration::from_secs(10))
            .with_jitter(0.2);
        for _ in 0..200 {
            let d = p.delay_for(1).as_secs_f64();
            assert!((8.0..=12.0).contains(&d), "{d}");
        }
    }
}

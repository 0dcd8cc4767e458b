//! Time and backoff: the one home of the process's clocks and of the
//! exponential backoff every retry loop uses.
//!
//! Three clocks, one per kind of decision:
//! - the broker's (Redis `TIME`, [`Diagnostics::server_time_ms`](crate::broker::Diagnostics::server_time_ms)) for
//!   times several processes compare (retry due times, leases);
//! - the monotonic clock ([`mono_ms`], `Instant`) for durations inside one
//!   process;
//! - the wall clock ([`now_ms`]) for data only (an entry's `ts`, a dead
//!   letter's `failed_at`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;

use crate::error::Result;

/// Milliseconds since the Unix epoch, now, by this process's wall clock.
///
/// For times that are data (an entry's `ts`, `processed_at`, a dead
/// letter's `failed_at_ms`, display), never for a decision: times several
/// processes compare come from the broker's clock
/// ([`Diagnostics::server_time_ms`](crate::broker::Diagnostics::server_time_ms), Redis
/// `TIME` inside the scripts), and durations inside a process from the
/// monotonic clock (`Instant`). A wall clock can be stepped (NTP, a VM
/// resumed) and differ between hosts.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds on the monotonic clock since the first call in this
/// process (never moved by a wall-clock step). For in-process durations
/// only.
pub(crate) fn mono_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    millis(base.elapsed())
}

/// How long until the next whole multiple of `period` on the monotonic
/// clock of [`mono_ms`]. Periodic work of many groups with the same period
/// falls due at the same moments, so its commands reach the server
/// together, pipelined on the shared connection, instead of one by one
/// all the time (issue 18: thousands of quiet groups in one process).
pub(crate) fn until_aligned(period: Duration) -> Duration {
    let period_ms = millis(period).max(1);
    Duration::from_millis(period_ms - mono_ms() % period_ms)
}

/// The period of periodic work after `quiet` rounds in a row that found
/// nothing to do: `base` doubled per quiet round, up to `max` (never below
/// `base`). Work resumes at `base` when the caller resets `quiet`.
pub(crate) fn quiet_period(base: Duration, quiet: u32, max: Duration) -> Duration {
    let grown = base.saturating_mul(1 << quiet.min(16));
    grown.min(max).max(base)
}

/// A duration in whole milliseconds, saturating at `u64::MAX` (a
/// duration too long for a `u64` of milliseconds reads as forever).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Exponential backoff for reconnects and restarts (no attempt budget).
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next pause (with ±20 % jitter), doubling the one after it.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let spread = rand::rng().random_range(0.8..=1.2);
        base.mul_f64(spread).min(self.max)
    }

    /// Back to the first pause, after a success.
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Tries a write up to `tries` times with short pauses between, while its
/// error is transient.
pub(crate) async fn with_tries<F, Fut>(tries: u32, mut write: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut done = 0;
    loop {
        done += 1;
        match write().await {
            Ok(()) => return Ok(()),
            Err(e) if done >= tries || !e.is_transient() => return Err(e),
            Err(_) => tokio::time::sleep(backoff.next_delay()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d1 = b.next_delay();
        let _ = b.next_delay();
        let d3 = b.next_delay();
        let d4 = b.next_delay();
        assert!(d1 <= Duration::from_millis(120));
        assert!(d3 >= Duration::from_millis(320) && d4 <= Duration::from_millis(400));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }

    #[test]
    fn quiet_period_doubles_within_bounds() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(10);
        assert_eq!(quiet_period(base, 0, max), base);
        assert_eq!(quiet_period(base, 3, max), Duration::from_secs(8));
        assert_eq!(quiet_period(base, 4, max), max);
        assert_eq!(quiet_period(base, 40, max), max);
        // A base above the bound is kept.
        assert_eq!(
            quiet_period(Duration::from_secs(20), 2, max),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn aligned_waits_end_on_the_same_boundary() {
        let period = Duration::from_millis(500);
        let before = mono_ms();
        let wait = millis(until_aligned(period));
        let after = mono_ms();
        assert!(wait > 0 && wait <= 500);
        // The wait ends on a multiple of the period, whenever in
        // [before, after] it was computed.
        let boundary = (after + wait) / 500 * 500;
        assert!(boundary >= before + wait, "{before}..{after} + {wait}");
    }
}

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
}

//! Scheduled producers: a user function run on a timer, whose events are
//! published through the processor's [`Producer`](crate::Producer).
//!
//! A [`Schedule`] is started and stopped by the [`Processor`](crate::Processor)
//! (added with [`ProcessorBuilder::schedule`](crate::ProcessorBuilder::schedule)),
//! like its groups. Each schedule is one `SchedulerActor` that owns a timer;
//! the work of a run is a plain async function.
//!
//! Rules, for every [`Cadence`]:
//!
//! - **One run at a time.** A tick that comes while the previous run is
//!   still running (including its publish) is *skipped*: counted in
//!   [`ScheduleStats::skipped`] and `redstream_schedule_runs_total{outcome="skipped"}`,
//!   not queued. A slow source therefore never piles up runs.
//! - **Failures never stop the schedule.** A run that returns `Err`,
//!   panics, exceeds its timeout ([`Schedule::with_timeout`]) or whose
//!   publish fails is logged, counted as `failed`, and the next tick runs as
//!   usual. Its events are not published again: the next tick produces fresh
//!   ones.
//! - **Events go to the schedule's stream** in one batch per run, with the
//!   producer's backpressure (a run waits while the buffer is full).
//! - **Shutdown** stops the timer first, then waits (up to
//!   `shutdown.deadline_ms`) for a run in progress to publish, before the
//!   groups and the producer stop.
//!
//! Ticks that the timer could not honour (the arbiter was blocked longer
//! than a period) are not made up for: the schedule continues at the next
//! due time.

pub(crate) mod actor;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use metrics::{Counter, Histogram, counter, histogram};

use crate::error::{BoxError, Error, Result};
use crate::metrics::names;
use crate::wire::Event;

/// When a schedule runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cadence {
    /// Every period, measured from when the processor started (by default
    /// the first run is at start, see [`Schedule::run_at_start`]). Runs do
    /// not drift: tick `n` is due at `start + n × period`.
    Every(Duration),
    /// At wall-clock (UTC) multiples of the period since the Unix epoch:
    /// `Aligned(60 s)` runs at every full minute, `Aligned(30 s)` at `:00`
    /// and `:30`, whichever process runs it. The clock is the Redis
    /// server's (`TIME`), read before each wait, so several processes (or a
    /// restarted one) agree on which slot a run stands for even when their
    /// own clocks differ or are stepped, which makes `Tick::slot_ms` a
    /// natural idempotency key. (If Redis does not answer, the host's clock
    /// stands in for that wait.) By default the first run waits for the
    /// next boundary.
    Aligned(Duration),
}

impl Cadence {
    /// The period.
    pub fn period(&self) -> Duration {
        match *self {
            Cadence::Every(d) | Cadence::Aligned(d) => d,
        }
    }
}

/// What a run is told about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tick {
    /// The schedule's name.
    pub schedule: Arc<str>,
    /// Runs started by this schedule in this process before this one
    /// (0 for the first).
    pub number: u64,
    /// The time this run stands for, in ms since the Unix epoch: for
    /// [`Cadence::Aligned`], the boundary (a multiple of the period; the
    /// run at start stands for the boundary just passed); for
    /// [`Cadence::Every`], the wall-clock time the run started (this host's
    /// clock: a label, not a slot other processes agree on).
    pub slot_ms: u64,
}

/// What a scheduled function returns: the events to publish (none is
/// fine), or an error (logged and counted; the schedule goes on).
pub type JobResult = std::result::Result<Vec<Event>, BoxError>;

/// A scheduled function, type-erased.
pub(crate) trait Job: Send + Sync + 'static {
    fn run(&self, tick: Tick) -> BoxFuture<'static, JobResult>;
}

impl<F, Fut> Job for F
where
    F: Fn(Tick) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = JobResult> + Send + 'static,
{
    fn run(&self, tick: Tick) -> BoxFuture<'static, JobResult> {
        Box::pin(self(tick))
    }
}

/// A scheduled producer: runs an async function on a [`Cadence`] and
/// publishes the events it returns to a stream.
///
/// ```no_run
/// use std::time::Duration;
/// use redstream::{Event, Processor, Schedule, Settings, Tick};
///
/// #[actix::main]
/// async fn main() -> redstream::Result<()> {
///     // Every 5 s, aligned to the wall clock (:00, :05, :10, …).
///     let quotes = Schedule::aligned("quotes", "market", Duration::from_secs(5), |tick: Tick| async move {
///         let price = fetch_price("ACME").await?;
///         let event = Event::new("quote", &serde_json::json!({"symbol": "ACME", "price": price}))?
///             // The slot makes a natural event id: a second producer of the
///             // same slot is absorbed by exactly-once consumers.
///             .with_id(format!("quote:ACME:{}", tick.slot_ms));
///         Ok(vec![event])
///     })
///     .with_timeout(Duration::from_secs(4));
///
///     let processor = Processor::builder(Settings::load()?)
///         .schedule(quotes)
///         .start()
///         .await?;
///     processor.run_until_signal().await?;
///     Ok(())
/// }
///
/// async fn fetch_price(_symbol: &str) -> Result<f64, std::io::Error> {
///     Ok(101.5)
/// }
/// ```
pub struct Schedule {
    pub(crate) name: Arc<str>,
    pub(crate) stream: Arc<str>,
    pub(crate) cadence: Cadence,
    pub(crate) job: Arc<dyn Job>,
    pub(crate) run_at_start: bool,
    pub(crate) timeout: Option<Duration>,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("name", &self.name)
            .field("stream", &self.stream)
            .field("cadence", &self.cadence)
            .field("run_at_start", &self.run_at_start)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Schedule {
    /// A schedule named `name` (unique in the processor; the `schedule`
    /// label of its metrics) that runs `job` on `cadence` and publishes its
    /// events to `stream`. The first run is at start for
    /// [`Cadence::Every`], at the first boundary for [`Cadence::Aligned`].
    pub fn new<F, Fut>(
        name: impl Into<String>,
        stream: impl Into<String>,
        cadence: Cadence,
        job: F,
    ) -> Self
    where
        F: Fn(Tick) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        Schedule {
            name: Arc::from(name.into()),
            stream: Arc::from(stream.into()),
            cadence,
            job: Arc::new(job),
            run_at_start: matches!(cadence, Cadence::Every(_)),
            timeout: None,
        }
    }

    /// Runs every `period`, the first time at start ([`Cadence::Every`]).
    pub fn every<F, Fut>(
        name: impl Into<String>,
        stream: impl Into<String>,
        period: Duration,
        job: F,
    ) -> Self
    where
        F: Fn(Tick) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        Schedule::new(name, stream, Cadence::Every(period), job)
    }

    /// Runs at wall-clock multiples of `period`, the first time at the next
    /// boundary ([`Cadence::Aligned`]).
    pub fn aligned<F, Fut>(
        name: impl Into<String>,
        stream: impl Into<String>,
        period: Duration,
        job: F,
    ) -> Self
    where
        F: Fn(Tick) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        Schedule::new(name, stream, Cadence::Aligned(period), job)
    }

    /// Whether to run once at start, before the first regular tick
    /// (default: `true` for [`Cadence::Every`], `false` for
    /// [`Cadence::Aligned`]).
    pub fn run_at_start(mut self, yes: bool) -> Self {
        self.run_at_start = yes;
        self
    }

    /// Gives up on a run (counted as failed) after `timeout`, publish
    /// included (default: no limit, so a run that hangs makes every later
    /// tick a skipped one).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream its events go to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Its cadence.
    pub fn cadence(&self) -> Cadence {
        self.cadence
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let key = |k: &str| format!("schedule `{}`: {k}", self.name);
        if self.name.is_empty() || self.stream.is_empty() {
            return Err(Error::settings(
                key("name"),
                "name and stream must not be empty",
            ));
        }
        let period = self.cadence.period();
        if period < Duration::from_millis(1) {
            return Err(Error::settings(key("period"), "must be at least 1 ms"));
        }
        if matches!(self.cadence, Cadence::Aligned(_))
            && !period.subsec_nanos().is_multiple_of(1_000_000)
        {
            return Err(Error::settings(
                key("period"),
                "an aligned period must be a whole number of milliseconds",
            ));
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::settings(key("timeout"), "must not be zero"));
        }
        Ok(())
    }
}

/// What a schedule has done since the processor started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduleStats {
    /// Runs started.
    pub runs: u64,
    /// Runs that returned events (or none) and published them all.
    pub succeeded: u64,
    /// Runs that returned an error, panicked, timed out or failed to publish.
    pub failed: u64,
    /// Ticks skipped because the previous run was still running.
    pub skipped: u64,
    /// Events published.
    pub published: u64,
}

/// A schedule's counters and metric handles, shared by its actor and the
/// processor.
pub(crate) struct ScheduleCounters {
    runs: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    published: AtomicU64,
    m_ok: Counter,
    m_failed: Counter,
    m_skipped: Counter,
    m_seconds: Histogram,
}

impl ScheduleCounters {
    pub(crate) fn new(name: &str) -> Self {
        let outcome = |o: &'static str| counter!(names::SCHEDULE_RUNS, "schedule" => name.to_owned(), "outcome" => o);
        ScheduleCounters {
            runs: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            published: AtomicU64::new(0),
            m_ok: outcome("ok"),
            m_failed: outcome("failed"),
            m_skipped: outcome("skipped"),
            m_seconds: histogram!(names::SCHEDULE_RUN_SECONDS, "schedule" => name.to_owned()),
        }
    }

    pub(crate) fn started(&self) -> u64 {
        self.runs.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        self.m_skipped.increment(1);
    }

    pub(crate) fn finished(&self, ok: bool, published: u64, took: Duration) {
        self.published.fetch_add(published, Ordering::Relaxed);
        if ok {
            self.succeeded.fetch_add(1, Ordering::Relaxed);
            self.m_ok.increment(1);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.m_failed.increment(1);
        }
        self.m_seconds.record(took.as_secs_f64());
    }

    pub(crate) fn snapshot(&self) -> ScheduleStats {
        ScheduleStats {
            runs: self.runs.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
        }
    }
}

/// Milliseconds since the Unix epoch, now, by this host's wall clock (0
/// if the clock is before 1970): `Every` tick labels, and the stand-in
/// when the broker's clock cannot be read.
pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The first boundary (multiple of `period_ms`) strictly after `now_ms`.
pub(crate) fn next_boundary(now_ms: u64, period_ms: u64) -> u64 {
    let period = period_ms.max(1);
    (now_ms / period + 1) * period
}

/// The boundary at or before `now_ms`.
pub(crate) fn current_boundary(now_ms: u64, period_ms: u64) -> u64 {
    let period = period_ms.max(1);
    now_ms / period * period
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_multiples_of_the_period() {
        assert_eq!(next_boundary(0, 1_000), 1_000);
        assert_eq!(next_boundary(999, 1_000), 1_000);
        assert_eq!(next_boundary(1_000, 1_000), 2_000, "strictly after");
        assert_eq!(next_boundary(61_234, 30_000), 90_000);
        assert_eq!(current_boundary(61_234, 30_000), 60_000);
        assert_eq!(current_boundary(60_000, 30_000), 60_000);
    }

    #[test]
    fn invalid_schedules_are_refused_with_their_name() {
        let job = |_t: Tick| async { Ok(Vec::new()) };
        let zero = Schedule::every("q", "s", Duration::ZERO, job);
        let err = zero.validate().expect_err("zero period");
        assert!(err.to_string().contains("schedule `q`"), "{err}");
        let odd = Schedule::aligned("q", "s", Duration::from_micros(1_500), job);
        assert!(odd.validate().is_err());
        let no_stream = Schedule::every("q", "", Duration::from_secs(1), job);
        assert!(no_stream.validate().is_err());
        let ok = Schedule::aligned("q", "s", Duration::from_secs(30), job);
        assert!(ok.validate().is_ok());
        assert!(!ok.run_at_start, "aligned waits for the boundary");
        assert!(Schedule::every("q", "s", Duration::from_secs(1), job).run_at_start);
    }
}

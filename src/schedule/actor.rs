//! `SchedulerActor`: one per [`Schedule`](crate::Schedule). It owns the
//! timer and the "a run is in progress" flag; the run itself (the user's
//! function under `catch_unwind`, then the publish) is the plain async
//! function [`run_once`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use crate::broker::Diagnostics;
use crate::handler::panic_message;
use crate::producer::Producer;
use crate::schedule::{
    Cadence, Job, Schedule, ScheduleCounters, Tick, current_boundary, next_boundary, wall_ms,
};

/// How one run ended.
#[derive(Debug)]
pub(crate) struct RunReport {
    pub(crate) published: u64,
    /// `None` when it succeeded.
    pub(crate) error: Option<String>,
}

/// Runs the job once and publishes what it returns. Never panics: a panic
/// of the job becomes an error.
pub(crate) async fn run_once(
    job: Arc<dyn Job>,
    producer: Producer,
    stream: Arc<str>,
    tick: Tick,
    timeout: Option<Duration>,
) -> RunReport {
    let work = async move {
        let produced = AssertUnwindSafe(async move { job.run(tick).await })
            .catch_unwind()
            .await;
        let events = match produced {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => {
                return RunReport {
                    published: 0,
                    error: Some(format!("the job failed: {e}")),
                };
            }
            Err(panic) => {
                return RunReport {
                    published: 0,
                    error: Some(format!("the job panicked: {}", panic_message(&*panic))),
                };
            }
        };
        if events.is_empty() {
            return RunReport {
                published: 0,
                error: None,
            };
        }
        let total = events.len();
        match producer.publish_batch(&stream, events).await {
            Err(e) => RunReport {
                published: 0,
                error: Some(format!("publishing failed: {e}")),
            },
            Ok(results) => {
                let published = results.iter().filter(|r| r.is_ok()).count() as u64;
                let first_error = results.into_iter().find_map(Result::err);
                RunReport {
                    published,
                    error: first_error.map(|e| {
                        format!(
                            "{} of {total} publishes failed, the first with: {e}",
                            total as u64 - published
                        )
                    }),
                }
            }
        }
    };
    match timeout {
        None => work.await,
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(report) => report,
            Err(_) => RunReport {
                published: 0,
                error: Some(format!("the run did not finish within {limit:?}")),
            },
        },
    }
}

/// Runs one schedule.
pub(crate) struct SchedulerActor {
    options: Schedule,
    producer: Producer,
    /// The clock several processes agree on (for [`Cadence::Aligned`]).
    clock: Arc<dyn Diagnostics>,
    counters: Arc<ScheduleCounters>,
    running: bool,
    stopping: bool,
    timer: Option<SpawnHandle>,
    /// For [`Cadence::Every`]: when the next tick is due.
    next_due: Option<Instant>,
    /// For [`Cadence::Aligned`]: the boundary the next tick stands for.
    next_slot: u64,
    idle_waiters: Vec<oneshot::Sender<()>>,
}

impl SchedulerActor {
    pub(crate) fn new(
        options: Schedule,
        producer: Producer,
        clock: Arc<dyn Diagnostics>,
        counters: Arc<ScheduleCounters>,
    ) -> Self {
        SchedulerActor {
            options,
            producer,
            clock,
            counters,
            running: false,
            stopping: false,
            timer: None,
            next_due: None,
            next_slot: 0,
            idle_waiters: Vec::new(),
        }
    }

    /// Arms the timer for the next regular tick.
    fn arm(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        match self.options.cadence {
            Cadence::Every(period) => {
                // In-process: the monotonic clock.
                let now = Instant::now();
                let mut due = self.next_due.unwrap_or(now + period);
                if due <= now {
                    // Fell behind (a blocked arbiter): continue at the next
                    // due time instead of firing the missed ticks at once.
                    let behind = now.duration_since(due);
                    let missed = behind.as_nanos() / period.as_nanos().max(1) + 1;
                    due += period * (missed.min(u32::MAX as u128) as u32);
                }
                self.next_due = Some(due);
                self.arm_after(due.saturating_duration_since(now), ctx);
            }
            Cadence::Aligned(period) => {
                // Processes agree on the slots: they are read on the
                // broker's clock, and only the wait is measured locally.
                let period_ms = period.as_millis() as u64;
                self.with_shared_clock(ctx, move |act, now_ms, ctx| {
                    act.next_slot = next_boundary(now_ms, period_ms).max(act.next_slot);
                    let delay = Duration::from_millis(act.next_slot.saturating_sub(now_ms));
                    act.arm_after(delay, ctx);
                });
            }
        }
    }

    /// Reads the broker's clock (ms since the epoch), then calls `then`
    /// unless the schedule is stopping. If the broker does not answer, the
    /// wall clock stands in, so the schedule goes on.
    fn with_shared_clock(
        &mut self,
        ctx: &mut Context<Self>,
        then: impl FnOnce(&mut Self, u64, &mut Context<Self>) + 'static,
    ) {
        let clock = Arc::clone(&self.clock);
        let read = async move { clock.server_time_ms().await };
        self.timer = Some(ctx.spawn(read.into_actor(self).map(move |now, act, ctx| {
            act.timer = None;
            if act.stopping {
                return;
            }
            let now_ms = now.unwrap_or_else(|e| {
                tracing::debug!(schedule = %act.options.name, "reading the broker's clock failed, using this host's: {e}");
                wall_ms()
            });
            then(act, now_ms, ctx);
        })));
    }

    fn arm_after(&mut self, delay: Duration, ctx: &mut Context<Self>) {
        self.timer = Some(ctx.run_later(delay, |act, ctx| {
            act.timer = None;
            let slot = match act.options.cadence {
                Cadence::Every(period) => {
                    act.next_due = act.next_due.map(|d| d + period);
                    // A label (data): this host's wall clock.
                    wall_ms()
                }
                Cadence::Aligned(period) => {
                    let slot = act.next_slot;
                    act.next_slot = slot + period.as_millis() as u64;
                    slot
                }
            };
            act.tick(slot, ctx);
            act.arm(ctx);
        }));
    }

    fn tick(&mut self, slot_ms: u64, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        if self.running {
            self.counters.skipped();
            tracing::debug!(schedule = %self.options.name, "tick skipped: the previous run is still running");
            return;
        }
        self.running = true;
        let number = self.counters.started();
        let tick = Tick {
            schedule: Arc::clone(&self.options.name),
            number,
            slot_ms,
        };
        let started = Instant::now();
        let span = tracing::info_span!("redstream.schedule", schedule = %self.options.name, stream = %self.options.stream, tick = number);
        let run = run_once(
            Arc::clone(&self.options.job),
            self.producer.clone(),
            Arc::clone(&self.options.stream),
            tick,
            self.options.timeout,
        );
        ctx.spawn(
            tracing::Instrument::instrument(run, span)
                .into_actor(self)
                .map(move |report, act, ctx| {
                    act.running = false;
                    let ok = report.error.is_none();
                    act.counters
                        .finished(ok, report.published, started.elapsed());
                    if let Some(error) = report.error {
                        tracing::warn!(
                            schedule = %act.options.name, tick = number, published = report.published,
                            "scheduled run failed; the schedule goes on: {error}",
                        );
                    }
                    if act.stopping {
                        for waiter in act.idle_waiters.drain(..) {
                            let _ = waiter.send(());
                        }
                        ctx.stop();
                    }
                }),
        );
    }
}

impl Actor for SchedulerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::debug!(schedule = %self.options.name, cadence = ?self.options.cadence, "schedule started");
        if !self.options.run_at_start {
            self.arm(ctx);
            return;
        }
        match self.options.cadence {
            Cadence::Every(period) => {
                self.next_due = Some(Instant::now() + period);
                self.tick(wall_ms(), ctx);
                self.arm(ctx);
            }
            Cadence::Aligned(period) => {
                let period_ms = period.as_millis() as u64;
                self.with_shared_clock(ctx, move |act, now_ms, ctx| {
                    act.tick(current_boundary(now_ms, period_ms), ctx);
                    act.arm(ctx);
                });
            }
        }
    }
}

/// Stop ticking and answer once no run is in progress (processor →
/// scheduler).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct StopSchedule;

impl Handler<StopSchedule> for SchedulerActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StopSchedule, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        if !self.running {
            ctx.stop();
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.idle_waiters.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

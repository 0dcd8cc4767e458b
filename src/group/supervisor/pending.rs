//! The pending check, every `consumer.pending_check_ms`: backpressure
//! (pause reads above `max_pending`, resume 10 % below it), the group's
//! gauges, and recovering a group that disappeared.
//!
//! A quiet group (nothing pending, waiting for a retry or undelivered)
//! checks less often, doubling the period up to [`QUIET_CHECK_MAX`]; the
//! first entry it handles or claims brings the period back. Checks fall due
//! on boundaries of their period ([`until_aligned`]), so the checks of
//! thousands of quiet groups reach Redis together, pipelined.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::{GroupSupervisor, Lifecycle};
use crate::broker::PendingSummary;
use crate::clock::{quiet_period, until_aligned};
use crate::error::Result;
use crate::group::InSpanExt;
use crate::group::{SetPaused, StopConsumer};
use crate::settings::{MissingGroupPolicy, StartFrom};

/// The longest period of a quiet group's pending check. Its history (a
/// sample per check, at most every `HISTORY_EVERY_MS`) has samples further
/// apart while it is quiet, when its figures do not change.
const QUIET_CHECK_MAX: Duration = Duration::from_secs(30);

impl GroupSupervisor {
    /// Schedules the next pending check (replacing one already scheduled).
    pub(super) fn schedule_pending_check(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.pending_timer.take() {
            ctx.cancel_future(timer);
        }
        if self.lifecycle == Lifecycle::Stopping {
            return;
        }
        let base = self.runtime.options.pending_check;
        let period = quiet_period(base, self.quiet_checks, QUIET_CHECK_MAX);
        self.pending_timer = Some(ctx.run_later(until_aligned(period), |act, ctx| {
            act.pending_timer = None;
            act.check_pending(ctx);
        }));
    }

    /// The group handled or claimed entries: a backed-off pending check
    /// comes back to its period.
    pub(super) fn on_activity(&mut self, ctx: &mut Context<Self>) {
        if self.quiet_checks > 0 {
            self.quiet_checks = 0;
            if !self.pending_check_in_flight {
                self.schedule_pending_check(ctx);
            }
        }
    }

    pub(super) fn check_pending(&mut self, ctx: &mut Context<Self>) {
        if self.pending_check_in_flight || self.lifecycle == Lifecycle::Stopping {
            return;
        }
        self.pending_check_in_flight = true;
        let rt = Arc::clone(&self.runtime);
        let mark = rt.budget.mark();
        let fut = async move { rt.diagnostics.pending_summary(&rt.target).await };
        ctx.spawn(
            fut.into_actor(self)
                .map(move |result: Result<PendingSummary>, act, ctx| {
                    act.pending_check_in_flight = false;
                    let quiet = matches!(&result, Ok(summary) if summary.is_quiet());
                    act.quiet_checks = if quiet {
                        act.quiet_checks.saturating_add(1)
                    } else {
                        0
                    };
                    act.schedule_pending_check(ctx);
                    match result {
                        Ok(summary) => {
                            act.runtime.budget.rebase(mark, summary.active());
                            act.apply_backpressure(&summary, ctx);
                            act.record_gauges(&summary);
                            act.last_pending = Some(summary);
                            act.record_history();
                        }
                        Err(e) if e.is_missing_group() => act.recover_group(ctx),
                        Err(e) => {
                            tracing::debug!("pending check failed: {e}");
                        }
                    }
                })
                .in_span(&self.runtime.span),
        );
    }

    pub(super) fn record_gauges(&self, summary: &PendingSummary) {
        let m = &self.runtime.metrics;
        m.pending.set(summary.pending as f64);
        m.waiting_retry.set(summary.waiting_retry as f64);
        m.dead_letters.set(summary.dead_letters as f64);
        if let Some(lag) = summary.lag {
            m.lag.set(lag as f64);
        }
        let longest = summary.longest_pending.unwrap_or_default();
        m.longest_pending_seconds.set(longest.as_secs_f64());
        let latency = summary.queue_latency.unwrap_or_default();
        m.queue_latency_seconds.set(latency.as_secs_f64());
    }

    pub(super) fn apply_backpressure(&mut self, summary: &PendingSummary, ctx: &mut Context<Self>) {
        let max = self.runtime.options.max_pending;
        if max == 0 {
            return;
        }
        let active = summary.active();
        let paused = self.lifecycle.reads_paused();
        let pause = if !paused && active > max {
            true
        } else if paused && active <= max - max / 10 {
            false
        } else {
            return;
        };
        self.lifecycle = match self.lifecycle {
            Lifecycle::Running | Lifecycle::Paused if pause => Lifecycle::Paused,
            Lifecycle::Running | Lifecycle::Paused => Lifecycle::Running,
            Lifecycle::Recovering { .. } => Lifecycle::Recovering { paused: pause },
            // Members are stopping or stopped: nothing to pause.
            Lifecycle::Stopping | Lifecycle::Failed => return,
        };
        if pause {
            tracing::warn!(
                pending = active,
                max_pending = max,
                "pausing reads: too many entries pending",
            );
        } else {
            tracing::info!(pending = active, "resuming reads");
        }
        for slot in &self.members {
            if let Some(addr) = &slot.addr {
                ctx.spawn(
                    addr.send(SetPaused(pause))
                        .into_actor(self)
                        .map(|_, _, _| ())
                        .in_span(&self.runtime.span),
                );
            }
        }
    }

    /// The group or its stream is gone (RELIABILITY.md P16).
    pub(super) fn recover_group(&mut self, ctx: &mut Context<Self>) {
        let rt = Arc::clone(&self.runtime);
        match self.runtime.options.on_missing_group {
            MissingGroupPolicy::Fail => {
                if matches!(
                    self.lifecycle,
                    Lifecycle::Running | Lifecycle::Paused | Lifecycle::Recovering { .. }
                ) {
                    let (stream, group) = (rt.target.stream(), rt.target.name());
                    tracing::error!(
                        "consumer group `{group}` on stream `{stream}` disappeared; policy `fail`: the group stops",
                    );
                    self.lifecycle = Lifecycle::Failed;
                    for slot in &self.members {
                        if let Some(addr) = &slot.addr {
                            addr.do_send(StopConsumer {
                                deadline: Instant::now(),
                            });
                        }
                    }
                }
            }
            MissingGroupPolicy::Recreate => {
                let paused = match self.lifecycle {
                    Lifecycle::Running => false,
                    Lifecycle::Paused => true,
                    // Already at it, or no longer running members.
                    Lifecycle::Recovering { .. } | Lifecycle::Stopping | Lifecycle::Failed => {
                        return;
                    }
                };
                self.lifecycle = Lifecycle::Recovering { paused };
                let rt = Arc::clone(&self.runtime);
                let fut = async move {
                    rt.streams
                        .ensure_group(&rt.target, StartFrom::Beginning)
                        .await
                };
                ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
                    if let Lifecycle::Recovering { paused } = act.lifecycle {
                        act.lifecycle = if paused {
                            Lifecycle::Paused
                        } else {
                            Lifecycle::Running
                        };
                    }
                    let rt = Arc::clone(&act.runtime);
                    let (stream, group) = (rt.target.stream(), rt.target.name());
                    match result {
                        Ok(created) => {
                            act.group_backoff.reset();
                            if created {
                                tracing::warn!(
                                    "consumer group `{group}` on stream `{stream}` was missing (Redis restarted without persistence, DEL or XGROUP DESTROY); recreated at 0: entries still in the stream are read again",
                                );
                            }
                        }
                        Err(e) => {
                            let delay = act.group_backoff.next_delay();
                            tracing::warn!(
                                "recreating consumer group `{group}` on stream `{stream}` failed: {e}; trying again in {delay:?}",
                            );
                            ctx.run_later(delay, |act, ctx| act.recover_group(ctx));
                        }
                    }
                }).in_span(&self.runtime.span));
            }
        }
    }
}

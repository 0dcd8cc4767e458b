//! The pending check, every `consumer.pending_check_ms`: backpressure
//! (pause reads above `max_pending`, resume 10 % below it), the group's
//! gauges, and recovering a group that disappeared.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::{GroupSupervisor, Lifecycle};
use crate::broker::PendingSummary;
use crate::error::Result;
use crate::group::InSpanExt;
use crate::group::{SetPaused, StopConsumer};
use crate::settings::{MissingGroupPolicy, StartFrom};

impl GroupSupervisor {
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

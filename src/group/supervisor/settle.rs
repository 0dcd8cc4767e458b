//! Writing the supervisor's decisions: acks batched into one multi-id call
//! per flush (flushes back to back), retry schedules and dead letters, each
//! tried a few times; and knowing when everything decided is written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::GroupSupervisor;
use crate::broker::{Acks, Receipt, RetrySchedule};
use crate::clock::{Backoff, with_tries};
use crate::group::InSpanExt;
use crate::group::RetryDueAt;
use crate::wire::DeadLetter;

/// Attempts at a retry-schedule or dead-letter write before leaving the
/// entry pending for the reclaimer.
const WRITE_TRIES: u32 = 3;

/// The log target of the one line per dead letter (WARN, with the entry
/// id, attempts, reason and last error), so that a filter can set its
/// level apart from the group's other warnings: e.g.
/// `RUST_LOG=warn,redstream::dead_lettered=error` where dead letters are
/// expected. (Not a prefix of any module path, so such a filter hides
/// nothing else.)
const DEAD_LETTERED_TARGET: &str = "redstream::dead_lettered";

impl GroupSupervisor {
    /// `fut` inside a `redstream.settle` span for `operation` on `count`
    /// entries of this group (with the `opentelemetry` feature; `fut` as it
    /// is without).
    fn in_settle_span<F: Future>(
        &self,
        operation: &'static str,
        count: usize,
        fut: F,
    ) -> impl Future<Output = F::Output> + use<F> {
        #[cfg(feature = "opentelemetry")]
        {
            tracing::Instrument::instrument(
                fut,
                crate::otel::settle_span(
                    self.runtime.target.stream(),
                    self.runtime.target.name(),
                    operation,
                    count,
                ),
            )
        }
        #[cfg(not(feature = "opentelemetry"))]
        {
            let _ = (operation, count);
            fut
        }
    }

    pub(super) fn settled(&self) -> bool {
        self.writes_in_flight == 0 && self.acks.receipts.is_empty() && !self.acks.flushing
    }

    pub(super) fn notify_if_settled(&mut self) {
        if self.settled() {
            for waiter in self.settle_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    pub(super) fn when_settled(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.settle_waiters.push(tx);
        self.notify_if_settled();
        rx
    }

    pub(super) fn flush_acks(&mut self, ctx: &mut Context<Self>) {
        if self.acks.flushing || self.acks.receipts.is_empty() {
            return;
        }
        let receipts = std::mem::take(&mut self.acks.receipts);
        let count = receipts.len();
        let forget = std::mem::take(&mut self.acks.forget);
        self.acks.flushing = true;
        let rt = Arc::clone(&self.runtime);
        let fut = async move {
            let acks = Acks {
                receipts: &receipts,
                forget: &forget,
            };
            let result = if rt.options.delete_acked {
                rt.streams.ack_and_delete(&rt.target, acks).await
            } else {
                rt.streams.ack(&rt.target, acks).await
            };
            if result.is_ok() {
                crate::failpoints::crash_point!("ack.after_xack");
            }
            #[cfg(feature = "opentelemetry")]
            if let Err(e) = &result {
                crate::otel::record_error(&tracing::Span::current(), crate::otel::error_type(e));
            }
            (receipts, forget, result)
        };
        let fut = self.in_settle_span("ack", count, fut);
        ctx.spawn(
            fut.into_actor(self)
                .map(|(receipts, forget, result), act, ctx| {
                    act.acks.flushing = false;
                    match result {
                        Ok(_) => {
                            act.counters.acked += receipts.len() as u64;
                            act.runtime.budget.release(receipts.len());
                            act.ack_backoff.reset();
                            act.flush_acks(ctx);
                        }
                        Err(e) => {
                            let delay = act.ack_backoff.next_delay();
                            tracing::warn!(
                                count = receipts.len(),
                                "XACK failed: {e}; trying again in {delay:?}",
                            );
                            let mut receipts = receipts;
                            receipts.append(&mut act.acks.receipts);
                            act.acks.receipts = receipts;
                            let mut forget = forget;
                            forget.append(&mut act.acks.forget);
                            act.acks.forget = forget;
                            ctx.run_later(delay, |act, ctx| act.flush_acks(ctx));
                        }
                    }
                    act.notify_if_settled();
                })
                .in_span(&self.runtime.span),
        );
    }

    pub(super) fn write_retries(&mut self, retries: Vec<RetrySchedule>, ctx: &mut Context<Self>) {
        if retries.is_empty() {
            return;
        }
        let earliest = retries.iter().map(|r| r.delay).min().unwrap_or_default();
        self.writes_in_flight += 1;
        let rt = Arc::clone(&self.runtime);
        let fut = async move {
            let result = with_tries(WRITE_TRIES, || {
                rt.streams.schedule_retries(&rt.target, &retries)
            })
            .await;
            (retries.len(), result)
        };
        ctx.spawn(fut.into_actor(self).map(move |(n, result), act, _ctx| {
            act.writes_in_flight -= 1;
            match result {
                Ok(()) => {
                    act.counters.retried += n as u64;
                    // Waiting for a retry does not count against max_pending.
                    act.runtime.budget.release(n);
                    // A local wake-up, on the monotonic clock: the broker
                    // made the entries due its own clock's now (before its
                    // reply) plus their delay, so this poll is at or after
                    // the earliest due time.
                    if let Some(r) = &act.reclaimer {
                        r.do_send(RetryDueAt(Instant::now() + earliest));
                    }
                }
                Err(e) => {
                    tracing::error!(
                        count = n,
                        "could not schedule retries: {e}; the entries stay pending and come back through reclaim",
                    );
                }
            }
            act.notify_if_settled();
        }).in_span(&self.runtime.span));
    }

    pub(super) fn write_dead_letters(
        &mut self,
        letters: Vec<(Receipt, DeadLetter)>,
        ctx: &mut Context<Self>,
    ) {
        if letters.is_empty() {
            return;
        }
        self.writes_in_flight += 1;
        let count = letters.len();
        let rt = Arc::clone(&self.runtime);
        let fut = async move {
            let mut pending = letters;
            let mut written = Vec::new();
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            let mut last_error = String::new();
            for attempt in 1..=WRITE_TRIES {
                match rt.streams.dead_letter(&rt.target, &pending).await {
                    Ok(failed) => {
                        crate::failpoints::crash_point!("dlq.after_write");
                        let (bad, good): (Vec<_>, Vec<_>) = pending
                            .into_iter()
                            .partition(|(receipt, _)| failed.iter().any(|(r, _)| r == receipt));
                        written.extend(good);
                        pending = bad;
                        if let Some((_, e)) = failed.first() {
                            last_error = e.clone();
                        }
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        if !e.is_transient() {
                            break;
                        }
                    }
                }
                if pending.is_empty() || attempt == WRITE_TRIES {
                    break;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            #[cfg(feature = "opentelemetry")]
            if !pending.is_empty() {
                crate::otel::record_error(&tracing::Span::current(), "dead_letter_write_failed");
            }
            (written, pending, last_error)
        };
        let fut = self.in_settle_span("dead_letter", count, fut);
        ctx.spawn(fut.into_actor(self).map(|(written, failed, error), act, _ctx| {
            act.writes_in_flight -= 1;
            act.counters.dead_lettered += written.len() as u64;
            act.runtime.budget.release(written.len());
            act.runtime.metrics.dead_lettered.increment(written.len() as u64);
            for (_, l) in &written {
                tracing::warn!(
                    target: DEAD_LETTERED_TARGET,
                    entry_id = %l.origin_id, attempts = l.attempts, error = l.error.as_deref(),
                    "dead-lettered: {}", l.reason,
                );
            }
            for (_, l) in &failed {
                tracing::error!(
                    entry_id = %l.origin_id,
                    "dead-letter write failed: {error}; the entry stays pending (not acked) and comes back through reclaim",
                );
            }
            act.notify_if_settled();
        }).in_span(&self.runtime.span));
    }
}

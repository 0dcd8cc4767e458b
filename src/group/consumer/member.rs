//! A member's entries: what it holds, running or queued, from admission to
//! the result it reports. The loop that drives it is in `member_loop`; the
//! ownership bookkeeping (heartbeats, losses) in `ownership`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures_util::future::{AbortHandle, Abortable, Aborted, BoxFuture};
use futures_util::stream::FuturesUnordered;
use tracing::Instrument;

use crate::broker::{Delivery, EntryState, FROM_START, ReadFrom, Receipt};
use crate::group::{EntryResult, GroupRuntime, Payload};
use crate::handler::{
    self, ErasedHandler, MemberInfo, Meta, Outcome, Ownership, RunBatch, RunEach, Verdict,
};
use crate::wire::Entry;

/// Bookkeeping for an entry this member holds (running or queued).
pub(super) struct Held {
    /// Set while its handler runs (shared by the entries of one batch).
    pub(super) abort: Option<AbortHandle>,
    /// Runs in a batch: losing it must not abort its batch-mates.
    pub(super) in_batch: bool,
    pub(super) ownership: Ownership,
}

/// Per entry: its id, its receipt, and its result (`Err` when its handler
/// was dropped).
pub(super) type Finished = Vec<(String, Receipt, std::result::Result<EntryResult, Aborted>)>;

/// The member's working state between loop turns.
pub(super) struct Member {
    pub(super) runtime: Arc<GroupRuntime>,
    /// The member's index in its group.
    pub(super) index: usize,
    pub(super) info: Arc<MemberInfo>,
    pub(super) running: FuturesUnordered<BoxFuture<'static, Finished>>,
    pub(super) held: HashMap<String, Held>,
    /// How many entries `held` has, as of the loop's last turn: what the
    /// supervisor shows as the member's in-flight count.
    held_count: Arc<AtomicUsize>,
    pub(super) queued: VecDeque<(Delivery, u32)>,
    /// Decoded entries about to start (batched for batch handlers).
    pub(super) ready: Vec<(Arc<Entry>, Receipt, u32)>,
    pub(super) done: Vec<EntryResult>,
    /// Ids taken over while the pending list is being re-read, so that the
    /// re-read does not start them a second time.
    pub(super) seen_in_history: HashSet<String>,
    /// Ids whose ownership a heartbeat found lost.
    pub(super) lost: HashSet<String>,
    pub(super) unfinished: Vec<Receipt>,
    pub(super) source: ReadFrom,
    pub(super) panic: Option<String>,
}

impl Member {
    /// A member holding nothing yet. After a restart under the same name it
    /// reads its own pending entries first, where the broker keeps them per
    /// member.
    pub(super) fn new(
        runtime: Arc<GroupRuntime>,
        index: usize,
        info: Arc<MemberInfo>,
        held_count: Arc<AtomicUsize>,
    ) -> Self {
        let source = if runtime.capabilities.per_member_pending {
            ReadFrom::PendingAfter(FROM_START.to_owned())
        } else {
            ReadFrom::New
        };
        Member {
            runtime,
            index,
            info,
            running: FuturesUnordered::new(),
            held: HashMap::new(),
            held_count,
            queued: VecDeque::new(),
            ready: Vec::new(),
            done: Vec::new(),
            seen_in_history: HashSet::new(),
            lost: HashSet::new(),
            unfinished: Vec::new(),
            source,
            panic: None,
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.runtime.options.in_flight
    }

    /// Room for more entries: `in_flight` counts entries held (running or
    /// queued), not handler futures, so a batch of 100 fills 100 places.
    pub(super) fn free(&self) -> usize {
        self.capacity().saturating_sub(self.held.len())
    }

    /// Tells the supervisor how many entries the member holds now.
    pub(super) fn share_held(&self) {
        self.held_count.store(self.held.len(), Ordering::Relaxed);
    }

    /// Whether to issue a read now: enough room for a worthwhile batch.
    pub(super) fn wants_read(&self) -> bool {
        let opts = &self.runtime.options;
        let low_water = (opts.count.min(opts.in_flight) / 2).max(1);
        self.free() >= low_water || (self.running.is_empty() && self.queued.is_empty())
    }

    /// Starts queued entries while there is room.
    pub(super) fn fill(&mut self) {
        while self.running.len() < self.capacity() {
            let Some((delivery, attempts)) = self.queued.pop_front() else {
                break;
            };
            self.held.remove(delivery.id());
            self.admit(delivery, attempts);
        }
        self.launch();
    }

    /// Takes an entry delivered by the supervisor (reclaimed or due).
    pub(super) fn deliver(&mut self, delivery: Delivery, attempts: u32) {
        if self.held.contains_key(delivery.id()) {
            return;
        }
        if matches!(self.source, ReadFrom::PendingAfter(_)) {
            self.seen_in_history.insert(delivery.id().to_owned());
        }
        self.held.insert(
            delivery.id().to_owned(),
            Held {
                abort: None,
                in_batch: false,
                ownership: Ownership::confirmed_now(delivery.receipt.clone()),
            },
        );
        self.queued.push_back((delivery, attempts));
    }

    /// Decodes and starts an entry, or reports at once why it cannot run.
    fn admit(&mut self, delivery: Delivery, prior_attempts: u32) {
        if self.held.contains_key(delivery.id()) {
            return;
        }
        let Delivery {
            entry: raw,
            receipt,
        } = delivery;
        if prior_attempts >= self.runtime.options.retry.max_attempts {
            self.done.push(EntryResult {
                id: raw.id,
                receipt,
                payload: Payload::Raw(raw.fields),
                prior_attempts,
                verdict: Verdict::Exhausted,
            });
            return;
        }
        if self.ready.iter().any(|(e, _, _)| e.id() == raw.id) {
            return;
        }
        match Entry::decode(raw) {
            Ok(entry) => self.ready.push((Arc::new(entry), receipt, prior_attempts)),
            Err((raw, error)) => self.done.push(EntryResult {
                id: raw.id,
                receipt,
                payload: Payload::Raw(raw.fields),
                prior_attempts,
                verdict: Verdict::Undecodable(error),
            }),
        }
    }

    fn meta_for(
        &mut self,
        entry: &Arc<Entry>,
        receipt: &Receipt,
        prior_attempts: u32,
    ) -> (Meta, Ownership) {
        let ownership = Ownership::confirmed_now(receipt.clone());
        let meta = Meta::new(
            Arc::clone(entry),
            Arc::clone(&self.info),
            prior_attempts + 1,
            ownership.clone(),
        );
        (meta, ownership)
    }

    /// Starts what `admit` made ready: one future per entry, or one per
    /// batch for handlers that share a transaction across entries.
    fn launch(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let ready = std::mem::take(&mut self.ready);
        match self.runtime.handler.clone() {
            ErasedHandler::Each(handler) => {
                for (entry, receipt, prior) in ready {
                    self.start_one(&handler, entry, receipt, prior);
                }
            }
            ErasedHandler::Batch { handler, max } => {
                let mut rest = ready.into_iter().peekable();
                while rest.peek().is_some() {
                    let batch: Vec<_> = rest.by_ref().take(max.max(1)).collect();
                    self.start_batch(&handler, batch);
                }
            }
        }
    }

    fn start_one(
        &mut self,
        handler: &Arc<dyn RunEach>,
        entry: Arc<Entry>,
        receipt: Receipt,
        prior_attempts: u32,
    ) {
        let (meta, ownership) = self.meta_for(&entry, &receipt, prior_attempts);
        let span = meta.span();
        let (abort, registration) = AbortHandle::new_pair();
        let handler = Arc::clone(handler);
        let id = entry.id().to_owned();
        self.held.insert(
            id.clone(),
            Held {
                abort: Some(abort),
                in_batch: false,
                ownership,
            },
        );
        let metrics = self.runtime.metrics.clone();
        metrics
            .delivery_attempt
            .record(f64::from(prior_attempts + 1));
        let work = async move {
            let started = Instant::now();
            let verdict = handler::run(handler.as_ref(), meta).await;
            metrics
                .handler_seconds
                .record(started.elapsed().as_secs_f64());
            crate::handler::record_outcome(
                &tracing::Span::current(),
                verdict_name(&verdict),
                verdict_failed(&verdict),
            );
            verdict
        }
        .instrument(span);
        let (id_out, receipt_out) = (id.clone(), receipt.clone());
        self.running.push(Box::pin(async move {
            let result = Abortable::new(work, registration)
                .await
                .map(|verdict| EntryResult {
                    id,
                    receipt,
                    payload: Payload::Decoded(entry),
                    prior_attempts,
                    verdict,
                });
            vec![(id_out, receipt_out, result)]
        }));
    }

    fn start_batch(&mut self, handler: &Arc<dyn RunBatch>, batch: Vec<(Arc<Entry>, Receipt, u32)>) {
        let (abort, registration) = AbortHandle::new_pair();
        let mut metas = Vec::with_capacity(batch.len());
        for (entry, receipt, prior) in &batch {
            let (meta, ownership) = self.meta_for(entry, receipt, *prior);
            metas.push(meta);
            self.held.insert(
                entry.id().to_owned(),
                Held {
                    abort: Some(abort.clone()),
                    in_batch: true,
                    ownership,
                },
            );
        }
        let run = handler.run_batch(metas);
        #[cfg(feature = "opentelemetry")]
        let run = {
            let span = crate::otel::batch_process_span(&self.info, batch.len());
            for (entry, _, _) in &batch {
                if let Some(cx) = crate::otel::entry_context(entry) {
                    crate::otel::add_link(&span, &cx);
                }
            }
            tracing::Instrument::instrument(run, span)
        };
        let metrics = self.runtime.metrics.clone();
        for (_, _, prior) in &batch {
            metrics.delivery_attempt.record(f64::from(prior + 1));
        }
        self.running.push(Box::pin(async move {
            let started = Instant::now();
            let ran = Abortable::new(run, registration).await;
            // One handler time per entry: the batch's time, shared.
            let share = started.elapsed().as_secs_f64() / batch.len().max(1) as f64;
            for _ in &batch {
                metrics.handler_seconds.record(share);
            }
            match ran {
                Ok(verdicts) => batch
                    .into_iter()
                    .zip(verdicts)
                    .map(|((entry, receipt, prior_attempts), verdict)| {
                        let id = entry.id().to_owned();
                        let result = EntryResult {
                            id: id.clone(),
                            receipt: receipt.clone(),
                            payload: Payload::Decoded(entry),
                            prior_attempts,
                            verdict,
                        };
                        (id, receipt, Ok(result))
                    })
                    .collect(),
                Err(Aborted) => batch
                    .into_iter()
                    .map(|(entry, receipt, _)| (entry.id().to_owned(), receipt, Err(Aborted)))
                    .collect(),
            }
        }));
    }

    pub(super) fn finish(&mut self, finished: Finished) {
        for (id, receipt, result) in finished {
            self.held.remove(&id);
            match result {
                Ok(result) if matches!(result.verdict, Verdict::Lost) => {
                    self.lost.remove(&id);
                }
                Ok(result) => {
                    if let Verdict::Failed {
                        panicked: true,
                        error,
                    } = &result.verdict
                    {
                        tracing::error!(
                            entry_id = %id,
                            "handler panicked: {error}; the member restarts",
                        );
                        self.panic.get_or_insert_with(|| error.clone());
                    }
                    self.done.push(result);
                }
                Err(Aborted) => {
                    if !self.lost.remove(&id) {
                        self.unfinished.push(receipt);
                    }
                }
            }
        }
    }

    /// Handles a read's entries.
    pub(super) fn on_read(&mut self, from: ReadFrom, entries: Vec<(Delivery, EntryState)>) {
        match from {
            ReadFrom::New => {
                for (delivery, _) in entries {
                    self.admit(delivery, 0);
                }
                self.launch();
            }
            ReadFrom::PendingAfter(_) => {
                let Some((last, _)) = entries.last() else {
                    // The member's own pending list is done: on to new entries.
                    self.source = ReadFrom::New;
                    self.seen_in_history.clear();
                    return;
                };
                self.source = ReadFrom::PendingAfter(last.id().to_owned());
                for (delivery, state) in entries {
                    // Entries waiting for a retry belong to the schedule.
                    if state.retry_in.is_some() || self.seen_in_history.contains(delivery.id()) {
                        continue;
                    }
                    self.admit(delivery, state.attempts);
                }
                self.launch();
            }
        }
    }

    /// The deadline passed: abort what still runs, give back what waits.
    pub(super) fn abandon_all(&mut self) {
        for held in self.held.values() {
            if let Some(abort) = &held.abort {
                abort.abort();
            }
        }
        for (delivery, _) in self.queued.drain(..) {
            self.held.remove(delivery.id());
            self.unfinished.push(delivery.receipt);
        }
    }

    pub(super) fn idle(&self) -> bool {
        self.running.is_empty() && self.queued.is_empty() && self.done.is_empty()
    }
}

/// Whether a verdict is a failure of the handler (an error, a panic, an
/// entry it could not read).
fn verdict_failed(v: &Verdict) -> bool {
    matches!(v, Verdict::Failed { .. } | Verdict::Undecodable(_))
}

fn verdict_name(v: &Verdict) -> &'static str {
    match v {
        Verdict::Decided(Outcome::Ack) => "ack",
        Verdict::Decided(Outcome::Retry(_)) => "retry",
        Verdict::Decided(Outcome::DeadLetter(_)) => "dead_letter",
        Verdict::Failed { panicked: true, .. } => "panic",
        Verdict::Failed { .. } => "error",
        Verdict::Undecodable(_) => "undecodable",
        Verdict::Exhausted => "exhausted",
        Verdict::Lost => "lost",
    }
}

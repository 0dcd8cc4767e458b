//! `GroupSupervisor`: one per (stream, group). Owns the group's consumers
//! and its reclaimer, and is the one place where an entry's fate and a
//! member's restart are decided.
//!
//! Decisions, from the facts the children report:
//!
//! | fact | decision |
//! |---|---|
//! | handler returned `Ack` | XACK, batched: one multi-id XACK per flush, flushes back to back |
//! | `Retry`, `Err`, panic | attempts + 1; below the budget: schedule the retry (durable); at the budget: dead letter |
//! | `DeadLetter(reason)` | dead letter with reason `rejected: …` |
//! | payload undecodable | dead letter at once with the decode reason |
//! | budget already spent | dead letter (`max_attempts_exceeded`) |
//! | payload trimmed while pending | dead letter (`trimmed_while_pending`) |
//! | consumer stopped unasked | restart it with backoff, same member name, once every write it caused has settled |
//!
//! A dead letter and the ack of its original are one atomic step; if it
//! fails, the original stays pending and comes back through reclaim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::consumer::ConsumerActor;
use super::reclaimer::ReclaimerActor;
use super::{
    ConsumerStopped, Deliver, EntriesClaimed, EntriesHandled, EntryResult, Exit, GroupRuntime,
    RetryDueAt, SetPaused, StopConsumer, StopReclaimer,
};
use crate::broker::{Acks, PendingSummary, RetrySchedule};
use crate::clock::{Backoff, now_ms, with_tries};
use crate::error::Result;
use crate::handler::Outcome;
use crate::handler::Verdict;
use crate::settings::{MissingGroupPolicy, StartFrom};
use crate::status::{GroupStatus, MemberStatus};
use crate::wire::{DeadLetter, DeadLetterReason, DecodeError};

/// How long a consumer must have run for its restart backoff to reset.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// How often a restart waiting for writes to settle checks again.
const SETTLE_POLL: Duration = Duration::from_millis(20);
/// Attempts at a retry-schedule or dead-letter write before leaving the
/// entry pending for the reclaimer.
const WRITE_TRIES: u32 = 3;

/// Stop the group: members finish by the deadline, decisions are written,
/// unfinished entries are released to other processes.
#[derive(Message, Debug)]
#[rtype(result = "GroupStopReport")]
pub(crate) struct StopGroup {
    pub(crate) deadline: Instant,
}

/// What a group's stop left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupStopReport {
    /// Entries still running at the deadline, released (not acked).
    pub(crate) released: usize,
    /// Whether every decision was written before the deadline.
    pub(crate) settled: bool,
}

/// Ask for the group's status.
#[derive(Message, Debug)]
#[rtype(result = "GroupStatus")]
pub(crate) struct GetStatus;

/// The process's hold on its member names.
#[derive(Clone, Debug)]
pub(crate) struct Lease {
    pub(crate) token: Arc<str>,
    pub(crate) keys: Vec<String>,
}

struct MemberSlot {
    addr: Option<Addr<ConsumerActor>>,
    generation: u64,
    restarts: u64,
    backoff: Backoff,
    started_at: Instant,
    last_error: Option<String>,
    /// Another process holds this member's lease: do not run it.
    lease_lost: bool,
}

#[derive(Default)]
struct AckQueue {
    ids: Vec<String>,
    forget: Vec<String>,
    flushing: bool,
}

#[derive(Default)]
struct Counters {
    acked: u64,
    retried: u64,
    dead_lettered: u64,
}

/// The supervisor of one consumer group.
pub(crate) struct GroupSupervisor {
    runtime: Arc<GroupRuntime>,
    arbiters: Arc<[ArbiterHandle]>,
    arbiter_offset: usize,
    members: Vec<MemberSlot>,
    reclaimer: Option<Addr<ReclaimerActor>>,
    acks: AckQueue,
    ack_backoff: Backoff,
    writes_in_flight: usize,
    settle_waiters: Vec<oneshot::Sender<()>>,
    paused: bool,
    stopping: bool,
    failed: bool,
    recovering: bool,
    group_backoff: Backoff,
    checking_pending: bool,
    last_pending: Option<PendingSummary>,
    lease: Lease,
    counters: Counters,
}

impl GroupSupervisor {
    pub(crate) fn new(
        runtime: Arc<GroupRuntime>,
        arbiters: Arc<[ArbiterHandle]>,
        arbiter_offset: usize,
        lease: Lease,
    ) -> Self {
        let opts = &runtime.options;
        let members = opts
            .member_names
            .iter()
            .map(|_| MemberSlot {
                addr: None,
                generation: 0,
                restarts: 0,
                backoff: Backoff::new(opts.restart_min, opts.restart_max),
                started_at: Instant::now(),
                last_error: None,
                lease_lost: false,
            })
            .collect();
        GroupSupervisor {
            ack_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            group_backoff: Backoff::new(opts.restart_min, opts.restart_max),
            runtime,
            arbiters,
            arbiter_offset,
            members,
            reclaimer: None,
            acks: AckQueue::default(),
            writes_in_flight: 0,
            settle_waiters: Vec::new(),
            paused: false,
            stopping: false,
            failed: false,
            recovering: false,
            checking_pending: false,
            last_pending: None,
            lease,
            counters: Counters::default(),
        }
    }

    fn member_name(&self, index: usize) -> &str {
        &self.runtime.options.member_names[index]
    }

    fn start_member(&mut self, index: usize, ctx: &mut Context<Self>) {
        if self.stopping || self.failed {
            return;
        }
        let me = ctx.address();
        let handled = me.clone().recipient::<EntriesHandled>().downgrade();
        let stopped = me.recipient::<ConsumerStopped>().downgrade();
        let runtime = Arc::clone(&self.runtime);
        let arbiter = &self.arbiters[(self.arbiter_offset + index) % self.arbiters.len()];
        let slot = &mut self.members[index];
        slot.generation += 1;
        let generation = slot.generation;
        let addr = ConsumerActor::start_in_arbiter(arbiter, move |_| {
            ConsumerActor::new(runtime, index, generation, handled, stopped)
        });
        slot.addr = Some(addr.clone());
        slot.started_at = Instant::now();
        if self.paused {
            ctx.spawn(
                addr.send(SetPaused(true))
                    .into_actor(self)
                    .map(|_, _, _| ()),
            );
        }
    }

    /// Restarts a member once every write its last run caused has settled,
    /// so that its re-read of its pending list sees them.
    fn restart_when_settled(&mut self, index: usize, ctx: &mut Context<Self>) {
        let slot = &self.members[index];
        if self.stopping || self.failed || slot.addr.is_some() || slot.lease_lost {
            return;
        }
        if !self.settled() {
            ctx.run_later(SETTLE_POLL, move |act, ctx| {
                act.restart_when_settled(index, ctx)
            });
            return;
        }
        self.start_member(index, ctx);
    }

    fn settled(&self) -> bool {
        self.writes_in_flight == 0 && self.acks.ids.is_empty() && !self.acks.flushing
    }

    fn notify_if_settled(&mut self) {
        if self.settled() {
            for waiter in self.settle_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    fn when_settled(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.settle_waiters.push(tx);
        self.notify_if_settled();
        rx
    }

    fn flush_acks(&mut self, ctx: &mut Context<Self>) {
        if self.acks.flushing || self.acks.ids.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.acks.ids);
        let forget = std::mem::take(&mut self.acks.forget);
        self.acks.flushing = true;
        let rt = Arc::clone(&self.runtime);
        let fut = async move {
            let acks = Acks {
                ids: &ids,
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
            (ids, forget, result)
        };
        ctx.spawn(fut.into_actor(self).map(|(ids, forget, result), act, ctx| {
            act.acks.flushing = false;
            match result {
                Ok(_) => {
                    act.counters.acked += ids.len() as u64;
                    act.runtime.budget.release(ids.len());
                    act.ack_backoff.reset();
                    act.flush_acks(ctx);
                }
                Err(e) => {
                    let delay = act.ack_backoff.next_delay();
                    let rt = Arc::clone(&act.runtime);
                    let (stream, group) = (rt.target.stream(), rt.target.name());
                    tracing::warn!(
                        stream,
                        group,
                        count = ids.len(),
                        "XACK failed: {e}; trying again in {delay:?}",
                    );
                    let mut ids = ids;
                    ids.append(&mut act.acks.ids);
                    act.acks.ids = ids;
                    let mut forget = forget;
                    forget.append(&mut act.acks.forget);
                    act.acks.forget = forget;
                    ctx.run_later(delay, |act, ctx| act.flush_acks(ctx));
                }
            }
            act.notify_if_settled();
        }));
    }

    fn write_retries(&mut self, retries: Vec<RetrySchedule>, ctx: &mut Context<Self>) {
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
                    let rt = Arc::clone(&act.runtime);
                    let (stream, group) = (rt.target.stream(), rt.target.name());
                    tracing::error!(
                        stream, group, count = n,
                        "could not schedule retries: {e}; the entries stay pending and come back through reclaim",
                    );
                }
            }
            act.notify_if_settled();
        }));
    }

    fn write_dead_letters(&mut self, letters: Vec<DeadLetter>, ctx: &mut Context<Self>) {
        if letters.is_empty() {
            return;
        }
        self.writes_in_flight += 1;
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
                        let (bad, good): (Vec<DeadLetter>, Vec<DeadLetter>) = pending
                            .into_iter()
                            .partition(|l| failed.iter().any(|(id, _)| *id == l.origin_id));
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
            (written, pending, last_error)
        };
        ctx.spawn(fut.into_actor(self).map(|(written, failed, error), act, _ctx| {
            act.writes_in_flight -= 1;
            act.counters.dead_lettered += written.len() as u64;
            act.runtime.budget.release(written.len());
            act.runtime.metrics.dead_lettered.increment(written.len() as u64);
            let rt = Arc::clone(&act.runtime);
            let (stream, group) = (rt.target.stream(), rt.target.name());
            for l in &written {
                tracing::warn!(
                    stream, group, entry_id = %l.origin_id, attempts = l.attempts,
                    "dead-lettered: {}", l.reason,
                );
            }
            for l in &failed {
                tracing::error!(
                    stream, group, entry_id = %l.origin_id,
                    "dead-letter write failed: {error}; the entry stays pending (not acked) and comes back through reclaim",
                );
            }
            act.notify_if_settled();
        }));
    }

    /// Turns reported results into acks, retries and dead letters.
    fn decide(&mut self, results: Vec<EntryResult>, ctx: &mut Context<Self>) {
        let policy = &self.runtime.options.retry;
        // Wall-clock time as data only: the dead letters' `failed_at_ms` and
        // the end-to-end latency metric (publish `ts` to now, a cross-host
        // figure that shows clock skew as latency). Retry times are the
        // broker's (see `RetrySchedule::delay`).
        let now = now_ms();
        let mut retries = Vec::new();
        let mut letters = Vec::new();
        for r in results {
            let ran = r.prior_attempts + 1;
            let letter =
                |reason: DeadLetterReason, attempts: u32, error: Option<String>| DeadLetter {
                    origin_id: r.id.clone(),
                    fields: r.payload.fields(),
                    reason,
                    attempts,
                    error,
                    failed_at_ms: now,
                };
            match r.verdict {
                Verdict::Decided(Outcome::Ack) => {
                    let m = &self.runtime.metrics;
                    m.acked.increment(1);
                    if let Some(ts) = r.payload.published_at_ms() {
                        m.end_to_end_seconds
                            .record(now.saturating_sub(ts) as f64 / 1000.0);
                    }
                    if r.prior_attempts > 0 {
                        self.acks.forget.push(r.id.clone());
                    }
                    self.acks.ids.push(r.id);
                }
                Verdict::Decided(Outcome::DeadLetter(reason)) => {
                    letters.push(letter(DeadLetterReason::Rejected(reason), ran, None));
                }
                Verdict::Undecodable(e) => {
                    letters.push(letter(
                        DeadLetterReason::Undecodable(e),
                        r.prior_attempts,
                        None,
                    ));
                }
                Verdict::Lost => {}
                Verdict::Exhausted => letters.push(letter(
                    DeadLetterReason::BudgetSpent,
                    r.prior_attempts,
                    None,
                )),
                verdict @ (Verdict::Decided(Outcome::Retry(_)) | Verdict::Failed { .. }) => {
                    let (asked, error) = match verdict {
                        Verdict::Decided(Outcome::Retry(d)) => (d, None),
                        Verdict::Failed { error, .. } => (None, Some(error)),
                        _ => (None, None),
                    };
                    if ran >= policy.max_attempts {
                        let error = error.or_else(|| Some("handler asked for a retry".to_owned()));
                        letters.push(letter(
                            DeadLetterReason::AttemptsExhausted { attempts: ran },
                            ran,
                            error,
                        ));
                    } else {
                        self.runtime.metrics.retried.increment(1);
                        let delay = asked.unwrap_or_else(|| policy.delay_for(ran));
                        retries.push(RetrySchedule {
                            id: r.id,
                            attempts: ran,
                            delay,
                        });
                    }
                }
            }
        }
        self.flush_acks(ctx);
        self.write_retries(retries, ctx);
        self.write_dead_letters(letters, ctx);
    }

    /// The group or its stream is gone (RELIABILITY.md P16).
    fn recover_group(&mut self, ctx: &mut Context<Self>) {
        let rt = Arc::clone(&self.runtime);
        let (stream, group) = (rt.target.stream(), rt.target.name());
        match self.runtime.options.on_missing_group {
            MissingGroupPolicy::Fail => {
                if !self.failed {
                    tracing::error!(
                        stream,
                        group,
                        "consumer group `{group}` on stream `{stream}` disappeared; policy `fail`: the group stops",
                    );
                    self.failed = true;
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
                if self.recovering {
                    return;
                }
                self.recovering = true;
                let rt = Arc::clone(&self.runtime);
                let fut = async move {
                    rt.streams
                        .ensure_group(&rt.target, StartFrom::Beginning)
                        .await
                };
                ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
                    act.recovering = false;
                    let rt = Arc::clone(&act.runtime);
                    let (stream, group) = (rt.target.stream(), rt.target.name());
                    match result {
                        Ok(created) => {
                            act.group_backoff.reset();
                            if created {
                                tracing::warn!(
                                    stream, group,
                                    "consumer group `{group}` on stream `{stream}` was missing (Redis restarted without persistence, DEL or XGROUP DESTROY); recreated at 0: entries still in the stream are read again",
                                );
                            }
                        }
                        Err(e) => {
                            let delay = act.group_backoff.next_delay();
                            tracing::warn!(
                                stream, group,
                                "recreating consumer group `{group}` on stream `{stream}` failed: {e}; trying again in {delay:?}",
                            );
                            ctx.run_later(delay, |act, ctx| act.recover_group(ctx));
                        }
                    }
                }));
            }
        }
    }

    fn check_pending(&mut self, ctx: &mut Context<Self>) {
        if self.checking_pending || self.stopping {
            return;
        }
        self.checking_pending = true;
        let rt = Arc::clone(&self.runtime);
        let mark = rt.budget.mark();
        let fut = async move { rt.diagnostics.pending_summary(&rt.target).await };
        ctx.spawn(
            fut.into_actor(self)
                .map(move |result: Result<PendingSummary>, act, ctx| {
                    act.checking_pending = false;
                    match result {
                        Ok(summary) => {
                            act.runtime.budget.rebase(mark, summary.active());
                            act.apply_backpressure(&summary, ctx);
                            act.record_gauges(&summary);
                            act.last_pending = Some(summary);
                        }
                        Err(e) if e.is_missing_group() => act.recover_group(ctx),
                        Err(e) => {
                            let rt = Arc::clone(&act.runtime);
                            let (stream, group) = (rt.target.stream(), rt.target.name());
                            tracing::debug!(stream, group, "pending check failed: {e}");
                        }
                    }
                }),
        );
    }

    fn record_gauges(&self, summary: &PendingSummary) {
        let m = &self.runtime.metrics;
        m.pending.set(summary.pending as f64);
        m.waiting_retry.set(summary.waiting_retry as f64);
        m.dead_letters.set(summary.dead_letters as f64);
        if let Some(lag) = summary.lag {
            m.lag.set(lag as f64);
        }
        let oldest = summary.oldest_age.unwrap_or_default();
        m.oldest_pending_seconds.set(oldest.as_secs_f64());
    }

    fn apply_backpressure(&mut self, summary: &PendingSummary, ctx: &mut Context<Self>) {
        let max = self.runtime.options.max_pending;
        if max == 0 {
            return;
        }
        let active = summary.active();
        let pause = if !self.paused && active > max {
            true
        } else if self.paused && active <= max - max / 10 {
            false
        } else {
            return;
        };
        self.paused = pause;
        let rt = Arc::clone(&self.runtime);
        let (stream, group) = (rt.target.stream(), rt.target.name());
        if pause {
            tracing::warn!(
                stream,
                group,
                pending = active,
                max_pending = max,
                "pausing reads: too many entries pending",
            );
        } else {
            tracing::info!(stream, group, pending = active, "resuming reads");
        }
        for slot in &self.members {
            if let Some(addr) = &slot.addr {
                ctx.spawn(
                    addr.send(SetPaused(pause))
                        .into_actor(self)
                        .map(|_, _, _| ()),
                );
            }
        }
    }

    fn renew_leases(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        let rt = Arc::clone(&self.runtime);
        let lease = self.lease.clone();
        let ttl = rt.options.lease_ttl;
        let fut = async move {
            rt.leases
                .acquire_leases(&lease.keys, &lease.token, ttl)
                .await
        };
        ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
            let held = match result {
                Ok(held) => held,
                Err(e) => {
                    let rt = Arc::clone(&act.runtime);
                    let (stream, group) = (rt.target.stream(), rt.target.name());
                    tracing::warn!(stream, group, "lease renewal failed: {e}");
                    return;
                }
            };
            for (index, held) in held.into_iter().enumerate() {
                let name = act.member_name(index).to_owned();
                let rt = Arc::clone(&act.runtime);
                    let (stream, group) = (rt.target.stream(), rt.target.name());
                let slot = &mut act.members[index];
                if !held && !slot.lease_lost {
                    tracing::error!(
                        stream, group, member = %name,
                        "another process took the lease of member `{name}`; stopping it here",
                    );
                    slot.lease_lost = true;
                    if let Some(addr) = &slot.addr {
                        addr.do_send(StopConsumer {
                            deadline: Instant::now(),
                        });
                    }
                } else if held && slot.lease_lost {
                    tracing::info!(stream, group, member = %name, "lease of member `{name}` regained");
                    slot.lease_lost = false;
                    act.restart_when_settled(index, ctx);
                }
            }
        }));
    }

    fn status(&self) -> GroupStatus {
        GroupStatus {
            stream: self.runtime.target.stream().to_owned(),
            group: self.runtime.target.name().to_owned(),
            members: self
                .members
                .iter()
                .enumerate()
                .map(|(i, s)| MemberStatus {
                    name: self.member_name(i).to_owned(),
                    alive: s.addr.as_ref().is_some_and(Addr::connected),
                    restarts: s.restarts,
                    last_error: s.last_error.clone(),
                })
                .collect(),
            acked: self.counters.acked,
            retried: self.counters.retried,
            dead_lettered: self.counters.dead_lettered,
            paused: self.paused,
            failed: self.failed,
            pending: self.last_pending.as_ref().map(|p| p.pending),
            waiting_retry: self.last_pending.as_ref().map(|p| p.waiting_retry),
            lag: self.last_pending.as_ref().and_then(|p| p.lag),
            dead_letters: self.last_pending.as_ref().map(|p| p.dead_letters),
            oldest_pending_ms: self
                .last_pending
                .as_ref()
                .and_then(|p| p.oldest_age)
                .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

fn describe(exit: &Exit) -> String {
    match exit {
        Exit::Stopped => "stopped".to_owned(),
        Exit::Failed { error, .. } => error.clone(),
        Exit::HandlerPanicked(error) => format!("handler panicked: {error}"),
        Exit::Crashed => "the consumer actor crashed".to_owned(),
    }
}

impl Actor for GroupSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Check the pending list before the first read, so a group already
        // over its bound starts paused.
        let rt = Arc::clone(&self.runtime);
        let mark = rt.budget.mark();
        let first_check = async move { rt.diagnostics.pending_summary(&rt.target).await };
        ctx.wait(first_check.into_actor(self).map(move |result, act, ctx| {
            if let Ok(summary) = result {
                act.runtime.budget.rebase(mark, summary.active());
                act.apply_backpressure(&summary, ctx);
                act.last_pending = Some(summary);
            }
            for index in 0..act.members.len() {
                act.start_member(index, ctx);
            }
        }));
        // Reclaiming idle entries and polling for due retries is the
        // runtime's job only where the broker does not redeliver by itself.
        if !self.runtime.capabilities.redelivers_itself {
            let me = ctx.address();
            let reclaimer = ReclaimerActor::new(
                Arc::clone(&self.runtime),
                me.recipient::<EntriesClaimed>().downgrade(),
            );
            self.reclaimer = Some(reclaimer.start());
        }
        let opts = &self.runtime.options;
        ctx.run_interval(opts.pending_check, |act, ctx| act.check_pending(ctx));
        ctx.run_interval(opts.lease_ttl / 3, |act, ctx| act.renew_leases(ctx));
        let rt = Arc::clone(&self.runtime);
        let (stream, group) = (rt.target.stream(), rt.target.name());
        tracing::info!(stream, group, members = self.members.len(), "group started");
    }
}

impl Handler<EntriesHandled> for GroupSupervisor {
    type Result = ();

    fn handle(&mut self, msg: EntriesHandled, ctx: &mut Self::Context) {
        let _ = msg.member;
        self.decide(msg.results, ctx);
    }
}

impl Handler<ConsumerStopped> for GroupSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ConsumerStopped, ctx: &mut Self::Context) {
        let Some(slot) = self.members.get_mut(msg.member) else {
            return;
        };
        if msg.generation != slot.generation {
            return;
        }
        slot.addr = None;
        if self.stopping || self.failed || slot.lease_lost {
            return;
        }
        slot.restarts += 1;
        self.runtime.metrics.restarts.increment(1);
        let description = describe(&msg.exit);
        slot.last_error = Some(description.clone());
        if slot.started_at.elapsed() >= HEALTHY_RUN {
            slot.backoff.reset();
        }
        let delay = slot.backoff.next_delay();
        let restarts = slot.restarts;
        let name = self.member_name(msg.member).to_owned();
        let rt = Arc::clone(&self.runtime);
        let (stream, group) = (rt.target.stream(), rt.target.name());
        tracing::warn!(
            stream, group, member = %name, restarts,
            "consumer stopped ({description}); restarting in {delay:?}",
        );
        if let Exit::Failed {
            missing_group: true,
            ..
        } = &msg.exit
        {
            self.recover_group(ctx);
        }
        let index = msg.member;
        ctx.run_later(delay, move |act, ctx| act.restart_when_settled(index, ctx));
    }
}

impl Handler<EntriesClaimed> for GroupSupervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: EntriesClaimed, ctx: &mut Self::Context) -> Self::Result {
        // Data only (`failed_at_ms` of the letters); whether a retry is due
        // comes from the broker's clock (`EntryState::retry_in`).
        let now = now_ms();
        self.runtime
            .metrics
            .reclaimed
            .increment((msg.entries.len() + msg.trimmed.len()) as u64);
        let letters: Vec<DeadLetter> = msg
            .trimmed
            .into_iter()
            .map(|id| DeadLetter {
                origin_id: id,
                fields: Vec::new(),
                reason: DeadLetterReason::Undecodable(DecodeError::Trimmed),
                attempts: 0,
                error: None,
                failed_at_ms: now,
            })
            .collect();
        self.write_dead_letters(letters, ctx);
        let entries: Vec<_> = msg
            .entries
            .into_iter()
            .filter(|(_, state)| state.retry_in.is_none_or(|left| left.is_zero()))
            .map(|(raw, state)| (raw, state.attempts))
            .collect();
        let addr = self
            .members
            .get(msg.member)
            .and_then(|s| s.addr.clone())
            .filter(|_| !self.stopping);
        Box::pin(async move {
            // A dead member finds these in its own pending list on restart.
            if let (Some(addr), false) = (addr, entries.is_empty()) {
                let _ = addr.send(Deliver { entries }).await;
            }
        })
    }
}

impl Handler<GetStatus> for GroupSupervisor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.status())
    }
}

impl Handler<StopGroup> for GroupSupervisor {
    type Result = ResponseActFuture<Self, GroupStopReport>;

    fn handle(&mut self, msg: StopGroup, _ctx: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        if let Some(reclaimer) = &self.reclaimer {
            reclaimer.do_send(StopReclaimer);
        }
        let deadline = msg.deadline;
        let stops: Vec<_> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.addr.clone().map(|a| (i, a)))
            .map(|(i, addr)| async move {
                (
                    i,
                    addr.send(StopConsumer { deadline })
                        .await
                        .unwrap_or_default(),
                )
            })
            .collect();
        let stop_all = futures_util::future::join_all(stops);
        Box::pin(stop_all.into_actor(self).then(move |unfinished, act, _ctx| {
            let settled = act.when_settled();
            let rt = Arc::clone(&act.runtime);
            let lease = act.lease.clone();
            let names = rt.options.member_names.clone();
            async move {
                // Give the last decisions until the deadline (plus a little,
                // since they were made just before it) to be written.
                let grace = deadline.saturating_duration_since(Instant::now())
                    + Duration::from_secs(2);
                let settled = tokio::time::timeout(grace, settled).await.is_ok();
                let mut released = 0;
                for (index, ids) in unfinished {
                    if ids.is_empty() {
                        continue;
                    }
                    released += ids.len();
                    let name = &names[index];
                    // Pending, but idle enough for any member to reclaim now.
                    if let Err(e) = rt
                        .streams
                        .release(&rt.member(index), &ids, rt.options.min_idle)
                        .await
                    {
                        tracing::warn!(
                            stream = %rt.target.stream(), group = %rt.target.name(), member = %name,
                            "releasing unfinished entries failed: {e}; they are reclaimed after min_idle",
                        );
                    }
                }
                if let Err(e) = rt.leases.release_leases(&lease.keys, &lease.token).await {
                    tracing::warn!(stream = %rt.target.stream(), group = %rt.target.name(), "releasing leases failed: {e}");
                }
                GroupStopReport { released, settled }
            }
            .into_actor(act)
        })
        .map(|report, act, ctx| {
            let rt = Arc::clone(&act.runtime);
                    let (stream, group) = (rt.target.stream(), rt.target.name());
            tracing::info!(
                stream, group, released = report.released, settled = report.settled,
                "group stopped",
            );
            ctx.stop();
            report
        }))
    }
}

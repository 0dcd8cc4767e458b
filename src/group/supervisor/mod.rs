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
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the state ([`Lifecycle`]), deciding, the messages |
//! | `settle.rs` | writing decisions: ack batching, retry schedules, dead letters |
//! | `members.rs` | starting and restarting members, their name leases |
//! | `pending.rs` | the pending check: backpressure, gauges, recovering a missing group |
//! | `history.rs` | the recent history the status page draws, kept compact |

mod history;
mod members;
mod pending;
mod settle;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::consumer::ConsumerActor;
use super::reclaimer::ReclaimerActor;
use super::{
    ConsumerStopped, Deliver, EntriesClaimed, EntriesHandled, EntryResult, Exit, GroupRuntime,
    StopConsumer, StopReclaimer,
};
use crate::broker::{PendingSummary, Receipt, RetrySchedule};
use crate::clock::{Backoff, millis, now_ms};
use crate::group::InSpanExt;
use crate::handler::{Outcome, Verdict};
use crate::status::{GroupStatus, HISTORY_EVERY_MS, HistorySample, MemberStatus};
use crate::wire::{DeadLetter, DeadLetterReason, DecodeError};

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

/// Ask for the group's recent history, oldest first.
#[derive(Message, Debug)]
#[rtype(result = "Vec<HistorySample>")]
pub(crate) struct GetHistory;

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
    /// Entries its consumer holds now (running or waiting for a place),
    /// kept by the consumer; a fresh counter for each run.
    held: Arc<AtomicUsize>,
}

impl MemberSlot {
    /// Entries the member's consumer holds now; 0 while it is not running.
    fn in_flight(&self) -> u64 {
        if self.addr.is_none() {
            return 0;
        }
        u64::try_from(self.held.load(Ordering::Relaxed)).unwrap_or(u64::MAX)
    }
}

#[derive(Default)]
struct AckQueue {
    receipts: Vec<Receipt>,
    forget: Vec<Receipt>,
    flushing: bool,
}

#[derive(Default)]
struct Counters {
    acked: u64,
    retried: u64,
    dead_lettered: u64,
}

/// Where the group is in its life. Members run in `Running`, `Paused` and
/// `Recovering`; `Stopping` and `Failed` start and restart none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lifecycle {
    /// Members read and run entries.
    Running,
    /// Members run what they hold but read nothing new: too many entries
    /// are pending (`consumer.max_pending`).
    Paused,
    /// The group was missing and is being recreated (policy `recreate`);
    /// members keep running (and restarting), paused or not.
    Recovering { paused: bool },
    /// Asked to stop: members finish by the deadline, nothing restarts.
    Stopping,
    /// The group was missing under policy `fail`: its members were stopped
    /// for good.
    Failed,
}

impl Lifecycle {
    /// Whether members are started and restarted.
    fn runs_members(self) -> bool {
        !matches!(self, Lifecycle::Stopping | Lifecycle::Failed)
    }

    /// Whether members must not read new entries.
    fn reads_paused(self) -> bool {
        matches!(
            self,
            Lifecycle::Paused | Lifecycle::Recovering { paused: true }
        )
    }
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
    lifecycle: Lifecycle,
    group_backoff: Backoff,
    /// A pending check is on its way (one at a time).
    pending_check_in_flight: bool,
    /// The next pending check, when one is scheduled.
    pending_timer: Option<SpawnHandle>,
    /// Pending checks in a row that found the group quiet (nothing
    /// pending, waiting or undelivered): the check backs off while it is.
    quiet_checks: u32,
    last_pending: Option<PendingSummary>,
    lease: Lease,
    counters: Counters,
    /// Since when no member has been running (`None` while one runs).
    no_member_since: Option<Instant>,
    /// The last hour, a sample every `HISTORY_EVERY_MS`.
    history: history::History,
    /// What the members' records last said, and when they were written.
    last_presence: Option<(u64, Instant)>,
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
                backoff: opts.restart.backoff(),
                started_at: Instant::now(),
                last_error: None,
                lease_lost: false,
                held: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        GroupSupervisor {
            ack_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            group_backoff: opts.restart.backoff(),
            runtime,
            arbiters,
            arbiter_offset,
            members,
            reclaimer: None,
            acks: AckQueue::default(),
            writes_in_flight: 0,
            settle_waiters: Vec::new(),
            lifecycle: Lifecycle::Running,
            pending_check_in_flight: false,
            pending_timer: None,
            quiet_checks: 0,
            last_pending: None,
            lease,
            counters: Counters::default(),
            // Members start once the first pending check is done.
            no_member_since: Some(Instant::now()),
            history: history::History::default(),
            last_presence: None,
        }
    }

    fn member_name(&self, index: usize) -> &str {
        &self.runtime.options.member_names[index]
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
            let letter = |reason: DeadLetterReason, attempts: u32, error: Option<String>| {
                let letter = DeadLetter {
                    origin_id: r.id.clone(),
                    fields: r.payload.fields(),
                    reason,
                    attempts,
                    error,
                    failed_at_ms: now,
                };
                (r.receipt.clone(), letter)
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
                        self.acks.forget.push(r.receipt.clone());
                    }
                    self.acks.receipts.push(r.receipt);
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
                            receipt: r.receipt,
                            attempts: ran,
                            delay,
                            error: error.or_else(|| Some("handler asked for a retry".to_owned())),
                        });
                    }
                }
            }
        }
        self.flush_acks(ctx);
        self.write_retries(retries, ctx);
        self.write_dead_letters(letters, ctx);
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
                    in_flight: s.in_flight(),
                })
                .collect(),
            acked: self.counters.acked,
            retried: self.counters.retried,
            dead_lettered: self.counters.dead_lettered,
            paused: self.lifecycle.reads_paused(),
            failed: self.lifecycle == Lifecycle::Failed,
            pending: self.last_pending.as_ref().map(|p| p.pending),
            waiting_retry: self.last_pending.as_ref().map(|p| p.waiting_retry),
            lag: self.last_pending.as_ref().and_then(|p| p.lag),
            dead_letters: self.last_pending.as_ref().map(|p| p.dead_letters),
            longest_pending_ms: self
                .last_pending
                .as_ref()
                .and_then(|p| p.longest_pending)
                .map(millis),
            queue_latency_ms: self
                .last_pending
                .as_ref()
                .and_then(|p| p.queue_latency)
                .map(millis),
            min_idle_ms: millis(self.runtime.options.min_idle),
            no_member_for_ms: self.no_member_since.map(|since| millis(since.elapsed())),
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
        ctx.wait(
            first_check
                .into_actor(self)
                .map(move |result, act, ctx| {
                    if let Ok(summary) = result {
                        act.runtime.budget.rebase(mark, summary.active());
                        act.apply_backpressure(&summary, ctx);
                        act.last_pending = Some(summary);
                    }
                    for index in 0..act.members.len() {
                        act.start_member(index, ctx);
                    }
                    act.publish_presence(ctx);
                })
                .in_span(&self.runtime.span),
        );
        // Reclaiming idle entries and polling for due retries is the
        // runtime's job only where the broker does not redeliver by itself.
        if !self.runtime.capabilities.redelivers_itself
            && let Some(redelivery) = &self.runtime.redelivery
        {
            let me = ctx.address();
            let reclaimer = ReclaimerActor::new(
                Arc::clone(&self.runtime),
                Arc::clone(redelivery),
                me.recipient::<EntriesClaimed>().downgrade(),
            );
            self.reclaimer = Some(reclaimer.start());
        }
        self.schedule_pending_check(ctx);
        self.schedule_lease_renewal(ctx);
        let _in_group = self.runtime.span.enter();
        tracing::info!(members = self.members.len(), "group started");
    }
}

impl Handler<EntriesHandled> for GroupSupervisor {
    type Result = ();

    fn handle(&mut self, msg: EntriesHandled, ctx: &mut Self::Context) {
        let _ = msg.member;
        self.on_activity(ctx);
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
        let lease_lost = slot.lease_lost;
        self.members_changed();
        if !self.lifecycle.runs_members() || lease_lost {
            return;
        }
        let slot = &mut self.members[msg.member];
        slot.restarts += 1;
        self.runtime
            .metrics
            .member(msg.member)
            .restarts
            .increment(1);
        let description = describe(&msg.exit);
        slot.last_error = Some(description.clone());
        if slot.started_at.elapsed() >= self.runtime.options.restart.healthy_run {
            slot.backoff.reset();
        }
        let delay = slot.backoff.next_delay();
        let restarts = slot.restarts;
        let name = self.member_name(msg.member).to_owned();
        let span = self.runtime.span.clone();
        let _in_group = span.enter();
        tracing::warn!(
            member = %name, restarts,
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
        self.on_activity(ctx);
        // Data only (`failed_at_ms` of the letters); whether a retry is due
        // comes from the broker's clock (`EntryState::retry_in`).
        let now = now_ms();
        self.runtime
            .metrics
            .reclaimed
            .increment((msg.entries.len() + msg.trimmed.len()) as u64);
        let letters: Vec<(Receipt, DeadLetter)> = msg
            .trimmed
            .into_iter()
            .map(|gone| {
                let letter = DeadLetter {
                    origin_id: gone.entry.id,
                    fields: Vec::new(),
                    reason: DeadLetterReason::Undecodable(DecodeError::Trimmed),
                    attempts: 0,
                    error: None,
                    failed_at_ms: now,
                };
                (gone.receipt, letter)
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
            .filter(|_| self.lifecycle != Lifecycle::Stopping);
        Box::pin(async move {
            // A dead member finds these in its own pending list on restart.
            if let (Some(addr), false) = (addr, entries.is_empty()) {
                let _ = addr.send(Deliver { entries }).await;
            }
        })
    }
}

impl GroupSupervisor {
    /// Adds a history sample when the last is `HISTORY_EVERY_MS` old (after
    /// a pending check, so its figures are fresh).
    pub(super) fn record_history(&mut self) {
        let now = now_ms();
        if self
            .history
            .last_at_ms()
            .is_some_and(|last| now.saturating_sub(last) < HISTORY_EVERY_MS)
        {
            return;
        }
        let pending = self.last_pending.as_ref();
        self.history.push(HistorySample {
            at_ms: now,
            acked: self.counters.acked,
            lag: pending.and_then(|p| p.lag),
            dead_letters: pending.map(|p| p.dead_letters),
            restarts: self.members.iter().map(|s| s.restarts).sum(),
        });
    }
}

impl Handler<GetHistory> for GroupSupervisor {
    type Result = MessageResult<GetHistory>;

    fn handle(&mut self, _msg: GetHistory, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.history.samples())
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
        self.lifecycle = Lifecycle::Stopping;
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
                for (index, receipts) in unfinished {
                    if receipts.is_empty() {
                        continue;
                    }
                    released += receipts.len();
                    let name = &names[index];
                    // Pending, but idle enough for any member to reclaim now.
                    if let Err(e) = rt
                        .streams
                        .release(&rt.member(index), &receipts, rt.options.min_idle)
                        .await
                    {
                        tracing::warn!(
                            member = %name,
                            "releasing unfinished entries failed: {e}; they are reclaimed after min_idle",
                        );
                    }
                }
                if let Err(e) = rt.leases.release_leases(&lease.keys, &lease.token).await {
                    tracing::warn!("releasing leases failed: {e}");
                }
                let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
                if let Err(e) = rt.diagnostics.withdraw_presence(&rt.target, &names).await {
                    tracing::debug!("withdrawing the members' records failed: {e}");
                }
                GroupStopReport { released, settled }
            }
            .into_actor(act)
        })
        .map(|report, act, ctx| {
            act.runtime.metrics.members.set(0.0);
            tracing::info!(
                released = report.released, settled = report.settled,
                "group stopped",
            );
            ctx.stop();
            report
        }).in_span(&self.runtime.span))
    }
}

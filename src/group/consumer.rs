//! `ConsumerActor`: one per group member.
//!
//! The actor is thin: it owns the member's mailbox, runs [`member_loop`] and
//! carries a drop guard that tells the supervisor when it stops, however it
//! stops (a panic in the actor's own code included, RELIABILITY.md P25).
//!
//! The loop, per member:
//!
//! 1. opens the member's own reader connection;
//! 2. reads its own pending entries first (`0`, paged, never blocking),
//!    skipping those waiting for a retry, then new ones (`>`, blocking,
//!    taking turns: at most `consumer.blocked_readers` members of a group
//!    block in Redis at once);
//! 3. runs up to `in_flight` handlers at once, each under `catch_unwind`;
//! 4. reports finished entries to the supervisor in batches (it decides);
//! 5. extends its claim on entries running longer than the heartbeat
//!    interval, and drops the handler of any entry it finds it lost;
//! 6. on a stop, a read error or a handler panic: stops reading, lets running
//!    handlers finish by the deadline, reports, and returns why it stopped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use actix::WeakRecipient;
use actix::prelude::*;
use futures_util::FutureExt;
use futures_util::future::{AbortHandle, Abortable, Aborted, BoxFuture};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{
    ConsumerStopped, Deliver, EntriesHandled, EntryResult, Exit, GroupRuntime, Payload, SetPaused,
    StopConsumer,
};
use crate::broker::{EntryState, FROM_START, GroupReader, ReadFrom};
use crate::error::{Error, Result};
use crate::handler::{
    self, ConfirmFn, ErasedHandler, MemberInfo, Meta, Outcome, Ownership, OwnershipCheck, RunBatch,
    RunEach, Verdict,
};
use crate::wire::{Entry, RawEntry};

/// How often a stopping member checks whether its handler's database
/// refuses writes (then it releases its running entries at once).
const STALL_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// Orders from the actor to its loop.
enum Control {
    Pause(bool),
    Stop {
        deadline: Instant,
        done: oneshot::Sender<Vec<String>>,
    },
}

/// Tells the supervisor the consumer stopped, from `Drop`, so that a panic
/// anywhere in the actor is reported too. A death notice cannot wait for
/// mailbox room, so it is the one `do_send` on the supervision path.
struct DeathNotice {
    supervisor: WeakRecipient<ConsumerStopped>,
    member: usize,
    generation: u64,
    exit: Option<Exit>,
}

impl Drop for DeathNotice {
    fn drop(&mut self) {
        let exit = if std::thread::panicking() {
            Exit::Crashed
        } else {
            self.exit.take().unwrap_or(Exit::Crashed)
        };
        if let Some(supervisor) = self.supervisor.upgrade() {
            supervisor.do_send(ConsumerStopped {
                member: self.member,
                generation: self.generation,
                exit,
            });
        }
    }
}

/// What the loop needs, taken by `started`.
struct LoopParts {
    runtime: Arc<GroupRuntime>,
    member: usize,
    report_to: WeakRecipient<EntriesHandled>,
    control: mpsc::UnboundedReceiver<Control>,
    deliveries: mpsc::Receiver<Vec<(RawEntry, u32)>>,
}

/// The actor of one group member.
pub(crate) struct ConsumerActor {
    parts: Option<LoopParts>,
    control: mpsc::UnboundedSender<Control>,
    deliveries: mpsc::Sender<Vec<(RawEntry, u32)>>,
    notice: DeathNotice,
}

impl ConsumerActor {
    pub(crate) fn new(
        runtime: Arc<GroupRuntime>,
        member: usize,
        generation: u64,
        report_to: WeakRecipient<EntriesHandled>,
        supervisor: WeakRecipient<ConsumerStopped>,
    ) -> Self {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        // One batch at a time: the supervisor (and behind it the reclaimer)
        // waits until the member has room, so claimed entries never pile up
        // in memory.
        let (deliver_tx, deliver_rx) = mpsc::channel(1);
        ConsumerActor {
            parts: Some(LoopParts {
                runtime,
                member,
                report_to,
                control: control_rx,
                deliveries: deliver_rx,
            }),
            control: control_tx,
            deliveries: deliver_tx,
            notice: DeathNotice {
                supervisor,
                member,
                generation,
                exit: None,
            },
        }
    }
}

impl Actor for ConsumerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(parts) = self.parts.take() else {
            ctx.stop();
            return;
        };
        let run = member_loop(parts);
        ctx.spawn(run.into_actor(self).map(|exit, act, ctx| {
            act.notice.exit = Some(exit);
            ctx.stop();
        }));
    }
}

impl Handler<Deliver> for ConsumerActor {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        let tx = self.deliveries.clone();
        Box::pin(async move { tx.send(msg.entries).await.is_ok() })
    }
}

impl Handler<StopConsumer> for ConsumerActor {
    type Result = ResponseFuture<Vec<String>>;

    fn handle(&mut self, msg: StopConsumer, _ctx: &mut Self::Context) -> Self::Result {
        let (done, rx) = oneshot::channel();
        let sent = self.control.send(Control::Stop {
            deadline: msg.deadline,
            done,
        });
        Box::pin(async move {
            if sent.is_err() {
                return Vec::new();
            }
            rx.await.unwrap_or_default()
        })
    }
}

impl Handler<SetPaused> for ConsumerActor {
    type Result = ();

    fn handle(&mut self, msg: SetPaused, _ctx: &mut Self::Context) {
        let _ = self.control.send(Control::Pause(msg.0));
    }
}

/// Bookkeeping for an entry this member holds (running or queued).
struct Held {
    /// Set while its handler runs (shared by the entries of one batch).
    abort: Option<AbortHandle>,
    /// Runs in a batch: losing it must not abort its batch-mates.
    in_batch: bool,
    ownership: Ownership,
}

type Finished = Vec<(String, std::result::Result<EntryResult, Aborted>)>;
/// The ids a heartbeat asked about, and those another member had taken.
type HeartbeatReply = (Vec<String>, Result<Vec<String>>);
type ReadOutput = (
    Box<dyn GroupReader>,
    ReadFrom,
    Result<Vec<(RawEntry, EntryState)>>,
);

/// The member's working state between loop turns.
struct Member {
    runtime: Arc<GroupRuntime>,
    info: Arc<MemberInfo>,
    running: FuturesUnordered<BoxFuture<'static, Finished>>,
    held: HashMap<String, Held>,
    queued: VecDeque<(RawEntry, u32)>,
    /// Decoded entries about to start (batched for batch handlers).
    ready: Vec<(Arc<Entry>, u32)>,
    done: Vec<EntryResult>,
    /// Ids taken over while the pending list is being re-read, so that the
    /// re-read does not start them a second time.
    seen_in_history: HashSet<String>,
    /// Ids whose ownership a heartbeat found lost.
    lost: HashSet<String>,
    unfinished: Vec<String>,
    source: ReadFrom,
    panic: Option<String>,
}

impl Member {
    fn capacity(&self) -> usize {
        self.runtime.options.in_flight
    }

    /// Room for more entries: `in_flight` counts entries held (running or
    /// queued), not handler futures, so a batch of 100 fills 100 places.
    fn free(&self) -> usize {
        self.capacity().saturating_sub(self.held.len())
    }

    /// Whether to issue a read now: enough room for a worthwhile batch.
    fn wants_read(&self) -> bool {
        let opts = &self.runtime.options;
        let low_water = (opts.count.min(opts.in_flight) / 2).max(1);
        self.free() >= low_water || (self.running.is_empty() && self.queued.is_empty())
    }

    /// Starts queued entries while there is room.
    fn fill(&mut self) {
        while self.running.len() < self.capacity() {
            let Some((raw, attempts)) = self.queued.pop_front() else {
                break;
            };
            self.held.remove(&raw.id);
            self.admit(raw, attempts);
        }
        self.launch();
    }

    /// Takes an entry delivered by the supervisor (reclaimed or due).
    fn deliver(&mut self, raw: RawEntry, attempts: u32) {
        if self.held.contains_key(&raw.id) {
            return;
        }
        if matches!(self.source, ReadFrom::PendingAfter(_)) {
            self.seen_in_history.insert(raw.id.clone());
        }
        self.held.insert(
            raw.id.clone(),
            Held {
                abort: None,
                in_batch: false,
                ownership: Ownership::confirmed_now(),
            },
        );
        self.queued.push_back((raw, attempts));
    }

    /// Decodes and starts an entry, or reports at once why it cannot run.
    fn admit(&mut self, raw: RawEntry, prior_attempts: u32) {
        if self.held.contains_key(&raw.id) {
            return;
        }
        if prior_attempts >= self.runtime.options.retry.max_attempts {
            self.done.push(EntryResult {
                id: raw.id,
                payload: Payload::Raw(raw.fields),
                prior_attempts,
                verdict: Verdict::Exhausted,
            });
            return;
        }
        if self.ready.iter().any(|(e, _)| e.id() == raw.id) {
            return;
        }
        match Entry::decode(raw) {
            Ok(entry) => self.ready.push((Arc::new(entry), prior_attempts)),
            Err((raw, error)) => self.done.push(EntryResult {
                id: raw.id,
                payload: Payload::Raw(raw.fields),
                prior_attempts,
                verdict: Verdict::Undecodable(error),
            }),
        }
    }

    fn meta_for(&mut self, entry: &Arc<Entry>, prior_attempts: u32) -> (Meta, Ownership) {
        let ownership = Ownership::confirmed_now();
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
                for (entry, prior) in ready {
                    self.start_one(&handler, entry, prior);
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

    fn start_one(&mut self, handler: &Arc<dyn RunEach>, entry: Arc<Entry>, prior_attempts: u32) {
        let (meta, ownership) = self.meta_for(&entry, prior_attempts);
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
            tracing::Span::current().record("outcome", verdict_name(&verdict));
            verdict
        }
        .instrument(span);
        let id_out = id.clone();
        self.running.push(Box::pin(async move {
            let result = Abortable::new(work, registration)
                .await
                .map(|verdict| EntryResult {
                    id,
                    payload: Payload::Decoded(entry),
                    prior_attempts,
                    verdict,
                });
            vec![(id_out, result)]
        }));
    }

    fn start_batch(&mut self, handler: &Arc<dyn RunBatch>, batch: Vec<(Arc<Entry>, u32)>) {
        let (abort, registration) = AbortHandle::new_pair();
        let mut metas = Vec::with_capacity(batch.len());
        for (entry, prior) in &batch {
            let (meta, ownership) = self.meta_for(entry, *prior);
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
        let metrics = self.runtime.metrics.clone();
        for (_, prior) in &batch {
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
                    .map(|((entry, prior_attempts), verdict)| {
                        let id = entry.id().to_owned();
                        let result = EntryResult {
                            id: id.clone(),
                            payload: Payload::Decoded(entry),
                            prior_attempts,
                            verdict,
                        };
                        (id, Ok(result))
                    })
                    .collect(),
                Err(Aborted) => batch
                    .into_iter()
                    .map(|(entry, _)| (entry.id().to_owned(), Err(Aborted)))
                    .collect(),
            }
        }));
    }

    fn finish(&mut self, finished: Finished) {
        for (id, result) in finished {
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
                            stream = %self.info.stream, group = %self.info.group,
                            member = %self.info.member, entry_id = %id,
                            "handler panicked: {error}; the member restarts",
                        );
                        self.panic.get_or_insert_with(|| error.clone());
                    }
                    self.done.push(result);
                }
                Err(Aborted) => {
                    if !self.lost.remove(&id) {
                        self.unfinished.push(id);
                    }
                }
            }
        }
    }

    /// Handles a read's entries.
    fn on_read(&mut self, from: ReadFrom, entries: Vec<(RawEntry, EntryState)>) {
        match from {
            ReadFrom::New => {
                for (raw, _) in entries {
                    self.admit(raw, 0);
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
                self.source = ReadFrom::PendingAfter(last.id.clone());
                for (raw, state) in entries {
                    // Entries waiting for a retry belong to the schedule.
                    if state.retry_in.is_some() || self.seen_in_history.contains(&raw.id) {
                        continue;
                    }
                    self.admit(raw, state.attempts);
                }
                self.launch();
            }
        }
    }

    /// Entries to extend at this heartbeat tick: every entry held, so each
    /// is extended at every tick, at most one interval (half of `min_idle`)
    /// apart. Extending only entries held a whole interval skipped an entry
    /// read, or moved from the queue to a handler, just after a tick until
    /// the tick after next: two intervals, up to `min_idle` itself, and the
    /// entry of a live handler could be reclaimed. Entries already found lost
    /// (their batch still running) are not asked about again.
    fn due_for_heartbeat(&self) -> Vec<String> {
        self.held
            .iter()
            .filter(|(_, h)| !h.ownership.is_lost())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A heartbeat asked about `asked`; those not `lost` are still ours.
    fn confirm(&self, asked: &[String], lost: &[String]) {
        for id in asked {
            if !lost.contains(id)
                && let Some(held) = self.held.get(id)
            {
                held.ownership.confirm();
            }
        }
    }

    /// Another member took these over: drop their handlers, report nothing.
    /// Each loss is logged and counted once.
    fn lose(&mut self, ids: Vec<String>) {
        for id in ids {
            let Some(held) = self.held.get(&id) else {
                continue;
            };
            if held.ownership.is_lost() {
                continue;
            }
            tracing::warn!(
                stream = %self.info.stream, group = %self.info.group,
                member = %self.info.member, entry_id = %id,
                "entry was taken over by another member; dropping its handler before it commits",
            );
            self.runtime.metrics.ownership_lost.increment(1);
            held.ownership.mark_lost();
            if held.in_batch {
                // Its batch rolls back and runs again without it.
                continue;
            }
            if let Some(held) = self.held.remove(&id) {
                match held.abort {
                    Some(abort) => {
                        abort.abort();
                        self.lost.insert(id);
                    }
                    None => self.queued.retain(|(raw, _)| raw.id != id),
                }
            }
        }
    }

    /// The deadline passed: abort what still runs, give back what waits.
    fn abandon_all(&mut self) {
        for held in self.held.values() {
            if let Some(abort) = &held.abort {
                abort.abort();
            }
        }
        for (raw, _) in self.queued.drain(..) {
            self.held.remove(&raw.id);
            self.unfinished.push(raw.id);
        }
    }

    fn idle(&self) -> bool {
        self.running.is_empty() && self.queued.is_empty() && self.done.is_empty()
    }
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

fn exit_for(error: &Error) -> Exit {
    Exit::Failed {
        error: error.to_string(),
        missing_group: error.is_missing_group(),
    }
}

/// One read, with the durable state of history entries looked up in the
/// same step. A blocking read first waits for a turn (a few members of a
/// group block at once, not all), and reads nothing if the member began
/// stopping meanwhile.
async fn read_once(
    runtime: Arc<GroupRuntime>,
    mut reader: Box<dyn GroupReader>,
    from: ReadFrom,
    count: usize,
    stopping: Arc<AtomicBool>,
) -> ReadOutput {
    let result = async {
        let _turn = if from == ReadFrom::New {
            let turn = runtime.read_turns.acquire().await.ok();
            if stopping.load(Ordering::Acquire) {
                return Ok(Vec::new());
            }
            turn
        } else {
            None
        };
        let entries = reader.read(&from, count).await?;
        if !entries.is_empty() {
            crate::failpoints::crash_point!("consumer.after_read");
        }
        if from == ReadFrom::New || entries.is_empty() {
            return Ok(entries
                .into_iter()
                .map(|e| (e, EntryState::default()))
                .collect());
        }
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let states = runtime
            .redelivery
            .entry_states(&runtime.target, &ids)
            .await?;
        Ok(entries.into_iter().zip(states).collect())
    }
    .await;
    (reader, from, result)
}

/// The member's read-run-report loop. Returns why it ended.
async fn member_loop(parts: LoopParts) -> Exit {
    let LoopParts {
        runtime,
        member: index,
        report_to,
        mut control,
        mut deliveries,
    } = parts;
    let opts = runtime.options.clone();
    let member_name = Arc::clone(&opts.member_names[index]);
    // One owner-checked heartbeat call serves the periodic heartbeat and the
    // check before a commit.
    let me = runtime.member(index);
    let confirm: ConfirmFn = {
        let rt = Arc::clone(&runtime);
        let me = me.clone();
        Arc::new(move |ids: Vec<String>| {
            let rt = Arc::clone(&rt);
            let me = me.clone();
            Box::pin(async move { rt.redelivery.heartbeat(&me, &ids).await })
        })
    };
    let info = Arc::new(MemberInfo {
        stream: Arc::clone(runtime.target.stream_arc()),
        group: Arc::clone(runtime.target.name_arc()),
        member: member_name,
        check: runtime
            .capabilities
            .checks_ownership
            .then(|| OwnershipCheck {
                stale_after: opts.heartbeat * 3 / 2,
                confirm: Arc::clone(&confirm),
            }),
    });
    let reader = match runtime.streams.open_reader(&me, opts.block).await {
        Ok(reader) => reader,
        Err(e) => return exit_for(&e),
    };
    let interrupter = reader.interrupter();
    let mut reader = Some(reader);
    let mut member = Member {
        runtime: Arc::clone(&runtime),
        info: Arc::clone(&info),
        running: FuturesUnordered::new(),
        held: HashMap::new(),
        queued: VecDeque::new(),
        ready: Vec::new(),
        done: Vec::new(),
        seen_in_history: HashSet::new(),
        lost: HashSet::new(),
        unfinished: Vec::new(),
        // After a restart under the same name, its own pending entries
        // first, where the broker keeps them per member.
        source: if runtime.capabilities.per_member_pending {
            ReadFrom::PendingAfter(FROM_START.to_owned())
        } else {
            ReadFrom::New
        },
        panic: None,
    };
    let mut read_fut: Option<BoxFuture<'static, ReadOutput>> = None;
    let mut heartbeat_fut: Option<BoxFuture<'static, HeartbeatReply>> = None;
    let mut heartbeat = tokio::time::interval(opts.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = false;
    let stop_flag = Arc::new(AtomicBool::new(false));
    let mut deadline: Option<Instant> = None;
    let mut stop_reply: Option<oneshot::Sender<Vec<String>>> = None;
    let mut failure: Option<Exit> = None;

    // Room reserved in the group's read budget for the new-entries read in
    // progress (`max_pending`).
    let mut reserved = 0usize;

    loop {
        member.fill();
        let stopping = deadline.is_some();
        // Nothing to read until the group's pending list has room again.
        let mut starved = false;
        if read_fut.is_none() && !stopping && !paused && reader.is_some() && member.wants_read() {
            let want = member.free().clamp(1, opts.count);
            let from = member.source.clone();
            let count = if from == ReadFrom::New {
                reserved = runtime.budget.reserve(want);
                reserved
            } else {
                want
            };
            if count == 0 {
                starved = true;
            } else if let Some(r) = reader.take() {
                read_fut = Some(Box::pin(read_once(
                    Arc::clone(&runtime),
                    r,
                    from,
                    count,
                    Arc::clone(&stop_flag),
                )));
            }
        }
        if stopping && read_fut.is_none() && member.idle() {
            break;
        }
        let far = Instant::now() + std::time::Duration::from_secs(86_400 * 365);
        let stop_at = tokio::time::Instant::from_std(deadline.unwrap_or(far));

        tokio::select! {
            Some(order) = control.recv() => match order {
                Control::Pause(p) => paused = p,
                Control::Stop { deadline: at, done } => {
                    stop_flag.store(true, Ordering::Release);
                    deadline = Some(deadline.map_or(at, |d| d.min(at)));
                    stop_reply = Some(done);
                    if read_fut.is_some()
                        && let Some(interrupter) = &interrupter
                    {
                        // The blocked read returns empty at once.
                        let _ = interrupter.interrupt().await;
                    }
                }
            },
            Some(batch) = deliveries.recv(), if !stopping && member.queued.is_empty() => {
                for (raw, attempts) in batch {
                    member.deliver(raw, attempts);
                }
            }
            Some(finished) = member.running.next(), if !member.running.is_empty() => {
                member.finish(finished);
                while let Some(Some(more)) = member.running.next().now_or_never() {
                    member.finish(more);
                }
            }
            () = runtime.budget.freed(), if starved => {}
            (r, from, result) = async { match read_fut.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if read_fut.is_some() => {
                read_fut = None;
                reader = Some(r);
                // Entries read stay counted until they are settled.
                let got = result.as_ref().map_or(0, Vec::len);
                runtime.budget.release(std::mem::take(&mut reserved).saturating_sub(got));
                match result {
                    Ok(entries) if stopping => {
                        // Read just before the stop took effect: give back.
                        member.unfinished.extend(entries.into_iter().map(|(e, _)| e.id));
                    }
                    Ok(entries) => member.on_read(from, entries),
                    Err(e) => {
                        if !stopping {
                            tracing::warn!(
                                stream = %info.stream, group = %info.group, member = %info.member,
                                "read failed: {e}; finishing running handlers, then restarting",
                            );
                            failure = Some(exit_for(&e));
                            deadline = Some(Instant::now() + opts.shutdown_deadline);
                        }
                        reader = None;
                    }
                }
            }
            _ = heartbeat.tick() => {
                if heartbeat_fut.is_none() {
                    let ids = member.due_for_heartbeat();
                    if !ids.is_empty() {
                        let asked = confirm(ids.clone());
                        heartbeat_fut = Some(Box::pin(async move { (ids, asked.await) }));
                    }
                }
            }
            (asked, lost) = async { match heartbeat_fut.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if heartbeat_fut.is_some() => {
                heartbeat_fut = None;
                match lost {
                    Ok(ids) => {
                        member.confirm(&asked, &ids);
                        member.lose(ids);
                    }
                    Err(e) => tracing::warn!(
                        stream = %info.stream, group = %info.group, member = %info.member,
                        "heartbeat failed: {e}; will try again",
                    ),
                }
            }
            // Stopping while the database refuses writes: the running
            // batches cannot commit, so they are released now rather than at
            // the deadline (nothing of theirs is acked).
            _ = tokio::time::sleep(STALL_CHECK), if stopping && !member.running.is_empty() && runtime.handler.stalled() => {
                tracing::info!(
                    stream = %info.stream, group = %info.group, member = %info.member,
                    "stopping while the database refuses writes: running entries are released now, not at the deadline",
                );
                member.abandon_all();
                read_fut = None;
                runtime.budget.release(std::mem::take(&mut reserved));
                deadline = Some(far);
            }
            _ = tokio::time::sleep_until(stop_at), if stopping => {
                member.abandon_all();
                // A read still blocked after the unblock is dropped with its
                // connection; anything it was handed stays pending for us.
                read_fut = None;
                runtime.budget.release(std::mem::take(&mut reserved));
                deadline = Some(far);
            }
        }

        if let Some(error) = member.panic.take() {
            if deadline.is_none() {
                deadline = Some(Instant::now() + opts.shutdown_deadline);
                // Stop reading at once, so the restart does not wait for a
                // blocked read to time out.
                stop_flag.store(true, Ordering::Release);
                if read_fut.is_some()
                    && let Some(interrupter) = &interrupter
                {
                    let _ = interrupter.interrupt().await;
                }
            }
            failure.get_or_insert(Exit::HandlerPanicked(error));
        }
        if !member.done.is_empty() {
            let results = std::mem::take(&mut member.done);
            let Some(supervisor) = report_to.upgrade() else {
                return Exit::Failed {
                    error: "supervisor is gone".to_owned(),
                    missing_group: false,
                };
            };
            let sent = supervisor
                .send(EntriesHandled {
                    member: index,
                    results,
                })
                .await;
            if sent.is_err() {
                return Exit::Failed {
                    error: "supervisor is gone".to_owned(),
                    missing_group: false,
                };
            }
        }
    }

    if let Some(reply) = stop_reply {
        let _ = reply.send(std::mem::take(&mut member.unfinished));
    }
    failure.unwrap_or(Exit::Stopped)
}

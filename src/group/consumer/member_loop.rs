//! The member's read-run-report loop, one method per event: an order from
//! the actor, a delivery from the supervisor, handlers finishing, a read
//! returning, a heartbeat tick and its reply, a stalled database while
//! stopping, and the stop deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::WeakRecipient;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::member::{Finished, Member};
use super::{Control, LoopParts};
use crate::broker::{Delivery, EntryState, GroupReader, Interrupt, ReadFrom, Receipt};
use crate::error::{Error, Result};
use crate::group::{EntriesHandled, Exit, GroupRuntime};
use crate::handler::{ConfirmFn, MemberInfo, OwnershipCheck};

/// How often a stopping member checks whether its handler's database
/// refuses writes (then it releases its running entries at once).
const STALL_CHECK: Duration = Duration::from_millis(200);

/// The ids a heartbeat asked about, and those another member had taken.
type HeartbeatReply = (Vec<Receipt>, Result<Vec<Receipt>>);
/// A read gives its reader back with what it read.
type ReadOutput = (
    Box<dyn GroupReader>,
    ReadFrom,
    Result<Vec<(Delivery, EntryState)>>,
);

/// Runs one member until it stops. Returns why it ended.
pub(super) async fn member_loop(parts: LoopParts) -> Exit {
    let name = Arc::clone(&parts.runtime.options.member_names[parts.member]);
    // At error level, so that it is enabled wherever the loop's warnings
    // are: an info span is filtered out under `RUST_LOG=warn`, and its
    // warnings would lose the stream, group and member they are about.
    let span = tracing::error_span!(
        "redstream.member",
        stream = %parts.runtime.target.stream(),
        group = %parts.runtime.target.name(),
        member = %name,
    );
    async move {
        match MemberLoop::open(parts).await {
            Ok(run) => run.run().await,
            Err(error) => exit_for(&error),
        }
    }
    .instrument(span)
    .await
}

/// The loop's state between turns.
struct MemberLoop {
    runtime: Arc<GroupRuntime>,
    index: usize,
    report_to: WeakRecipient<EntriesHandled>,
    control: mpsc::UnboundedReceiver<Control>,
    deliveries: mpsc::Receiver<Vec<(Delivery, u32)>>,
    member: Member,
    /// One owner-checked heartbeat call serves the periodic heartbeat and
    /// the check before a commit (where the broker checks ownership).
    confirm: Option<ConfirmFn>,
    interrupter: Option<Arc<dyn Interrupt>>,
    /// The reader, while no read is in progress.
    reader: Option<Box<dyn GroupReader>>,
    read_in_progress: Option<BoxFuture<'static, ReadOutput>>,
    heartbeat_in_progress: Option<BoxFuture<'static, HeartbeatReply>>,
    heartbeat: tokio::time::Interval,
    paused: bool,
    /// Set when stopping, so that a read waiting for its turn reads nothing.
    stop_flag: Arc<AtomicBool>,
    /// Set when stopping: running handlers get until then.
    deadline: Option<Instant>,
    stop_reply: Option<oneshot::Sender<Vec<Receipt>>>,
    failure: Option<Exit>,
    /// Room reserved in the group's read budget (`max_pending`) for the
    /// new-entries read in progress.
    reserved: usize,
}

impl MemberLoop {
    /// Opens the member's reader and sets up its state.
    async fn open(parts: LoopParts) -> Result<Self> {
        let LoopParts {
            runtime,
            member: index,
            held,
            report_to,
            control,
            deliveries,
        } = parts;
        let opts = &runtime.options;
        let me = runtime.member(index);
        let confirm: Option<ConfirmFn> = match &runtime.redelivery {
            Some(redelivery) if runtime.capabilities.checks_ownership => {
                let redelivery = Arc::clone(redelivery);
                Some(Arc::new(move |receipts: Vec<Receipt>| {
                    let redelivery = Arc::clone(&redelivery);
                    let me = me.clone();
                    Box::pin(async move { redelivery.heartbeat(&me, &receipts).await })
                }))
            }
            _ => None,
        };
        let info = Arc::new(MemberInfo {
            stream: Arc::clone(runtime.target.stream_arc()),
            group: Arc::clone(runtime.target.name_arc()),
            member: Arc::clone(&opts.member_names[index]),
            trace_parent: opts.trace_parent,
            check: confirm.as_ref().map(|confirm| OwnershipCheck {
                stale_after: opts.heartbeat * 3 / 2,
                confirm: Arc::clone(confirm),
            }),
        });
        let reader = runtime
            .streams
            .open_reader(&runtime.member(index), opts.block)
            .await?;
        let mut heartbeat = tokio::time::interval(opts.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(MemberLoop {
            member: Member::new(Arc::clone(&runtime), index, info, held),
            runtime,
            index,
            report_to,
            control,
            deliveries,
            confirm,
            interrupter: reader.interrupter(),
            reader: Some(reader),
            read_in_progress: None,
            heartbeat_in_progress: None,
            heartbeat,
            paused: false,
            stop_flag: Arc::new(AtomicBool::new(false)),
            deadline: None,
            stop_reply: None,
            failure: None,
            reserved: 0,
        })
    }

    fn stopping(&self) -> bool {
        self.deadline.is_some()
    }

    async fn run(mut self) -> Exit {
        loop {
            self.member.fill();
            self.member.share_held();
            let starved = self.start_read();
            let stopping = self.stopping();
            if stopping && self.read_in_progress.is_none() && self.member.idle() {
                break;
            }
            let stop_at = tokio::time::Instant::from_std(self.deadline.unwrap_or_else(far_future));
            let stalled =
                stopping && !self.member.running.is_empty() && self.runtime.handler.stalled();

            tokio::select! {
                Some(order) = self.control.recv() => self.on_control(order).await,
                Some(batch) = self.deliveries.recv(), if !stopping && self.member.queued.is_empty() => {
                    for (delivery, attempts) in batch {
                        self.member.deliver(delivery, attempts);
                    }
                }
                Some(finished) = self.member.running.next(), if !self.member.running.is_empty() => {
                    self.on_finished(finished);
                }
                () = self.runtime.budget.freed(), if starved => {}
                (reader, from, result) = in_progress(&mut self.read_in_progress), if self.read_in_progress.is_some() => {
                    self.on_read(reader, from, result);
                }
                _ = self.heartbeat.tick() => self.on_heartbeat_tick(),
                (asked, lost) = in_progress(&mut self.heartbeat_in_progress), if self.heartbeat_in_progress.is_some() => {
                    self.on_heartbeat_reply(&asked, lost);
                }
                _ = tokio::time::sleep(STALL_CHECK), if stalled => self.on_stalled(),
                _ = tokio::time::sleep_until(stop_at), if stopping => self.give_up_running(),
            }

            self.on_handler_panic().await;
            if let Err(exit) = self.report().await {
                return exit;
            }
        }
        if let Some(reply) = self.stop_reply.take() {
            let _ = reply.send(std::mem::take(&mut self.member.unfinished));
        }
        self.failure.take().unwrap_or(Exit::Stopped)
    }

    /// Issues a read when there is room for a worthwhile batch. Returns
    /// whether the member is starved: nothing may be read until the group's
    /// pending list has room again.
    fn start_read(&mut self) -> bool {
        if self.read_in_progress.is_some()
            || self.stopping()
            || self.paused
            || self.reader.is_none()
            || !self.member.wants_read()
        {
            return false;
        }
        let opts = &self.runtime.options;
        let want = self.member.free().clamp(1, opts.count);
        let from = self.member.source.clone();
        let count = if from == ReadFrom::New {
            self.reserved = self.runtime.budget.reserve(want);
            self.reserved
        } else {
            want
        };
        if count == 0 {
            return true;
        }
        if let Some(reader) = self.reader.take() {
            self.read_in_progress = Some(Box::pin(read_once(
                Arc::clone(&self.runtime),
                reader,
                from,
                count,
                Arc::clone(&self.stop_flag),
            )));
        }
        false
    }

    async fn on_control(&mut self, order: Control) {
        match order {
            Control::Pause(paused) => self.paused = paused,
            Control::Stop { deadline, done } => {
                self.stop_reply = Some(done);
                self.begin_stop(deadline).await;
            }
        }
    }

    /// Stops reading (a blocked read returns empty at once) and gives
    /// running handlers until `deadline`.
    async fn begin_stop(&mut self, deadline: Instant) {
        self.stop_flag.store(true, Ordering::Release);
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
        if self.read_in_progress.is_some()
            && let Some(interrupter) = &self.interrupter
        {
            let _ = interrupter.interrupt().await;
        }
    }

    fn on_finished(&mut self, finished: Finished) {
        self.member.finish(finished);
        while let Some(Some(more)) = self.member.running.next().now_or_never() {
            self.member.finish(more);
        }
    }

    fn on_read(
        &mut self,
        reader: Box<dyn GroupReader>,
        from: ReadFrom,
        result: Result<Vec<(Delivery, EntryState)>>,
    ) {
        self.read_in_progress = None;
        self.reader = Some(reader);
        // Entries read stay counted until they are settled.
        let got = result.as_ref().map_or(0, Vec::len);
        self.runtime
            .budget
            .release(std::mem::take(&mut self.reserved).saturating_sub(got));
        match result {
            Ok(entries) if self.stopping() => {
                // Read just before the stop took effect: give back.
                let receipts = entries.into_iter().map(|(d, _)| d.receipt);
                self.member.unfinished.extend(receipts);
            }
            Ok(entries) => self.member.on_read(from, entries),
            Err(e) => {
                if !self.stopping() {
                    tracing::warn!("read failed: {e}; finishing running handlers, then restarting");
                    self.failure = Some(exit_for(&e));
                    self.deadline = Some(Instant::now() + self.runtime.options.shutdown_deadline);
                }
                self.reader = None;
            }
        }
    }

    fn on_heartbeat_tick(&mut self) {
        let Some(confirm) = &self.confirm else {
            return;
        };
        if self.heartbeat_in_progress.is_some() {
            return;
        }
        let ids = self.member.due_for_heartbeat();
        if !ids.is_empty() {
            let asked = confirm(ids.clone());
            self.heartbeat_in_progress = Some(Box::pin(async move { (ids, asked.await) }));
        }
    }

    fn on_heartbeat_reply(&mut self, asked: &[Receipt], lost: Result<Vec<Receipt>>) {
        self.heartbeat_in_progress = None;
        match lost {
            Ok(ids) => {
                self.member.confirm(asked, &ids);
                self.member.lose(ids);
            }
            Err(e) => tracing::warn!("heartbeat failed: {e}; will try again"),
        }
    }

    /// Stopping while the database refuses writes: the running batches
    /// cannot commit, so they are released now rather than at the deadline
    /// (nothing of theirs is acked).
    fn on_stalled(&mut self) {
        tracing::info!(
            "stopping while the database refuses writes: running entries are released now, not at the deadline",
        );
        self.give_up_running();
    }

    /// Aborts what still runs and gives back what waits. A read still
    /// blocked after the unblock is dropped with its connection; anything it
    /// was handed stays pending for this member.
    fn give_up_running(&mut self) {
        self.member.abandon_all();
        self.read_in_progress = None;
        self.runtime
            .budget
            .release(std::mem::take(&mut self.reserved));
        self.deadline = Some(far_future());
    }

    /// A handler panicked: stop reading at once (so the restart does not
    /// wait for a blocked read to time out), finish the others, restart.
    async fn on_handler_panic(&mut self) {
        let Some(error) = self.member.panic.take() else {
            return;
        };
        if !self.stopping() {
            let deadline = Instant::now() + self.runtime.options.shutdown_deadline;
            self.begin_stop(deadline).await;
        }
        self.failure.get_or_insert(Exit::HandlerPanicked(error));
    }

    /// Reports finished entries to the supervisor, which decides.
    async fn report(&mut self) -> std::result::Result<(), Exit> {
        if self.member.done.is_empty() {
            return Ok(());
        }
        let gone = || Exit::Failed {
            error: "supervisor is gone".to_owned(),
            missing_group: false,
        };
        let results = std::mem::take(&mut self.member.done);
        let supervisor = self.report_to.upgrade().ok_or_else(gone)?;
        supervisor
            .send(EntriesHandled {
                member: self.index,
                results,
            })
            .await
            .map_err(|_| gone())
    }
}

/// Awaits the operation in `slot` (the caller's select! guard makes sure
/// there is one).
async fn in_progress<T>(slot: &mut Option<BoxFuture<'static, T>>) -> T {
    match slot.as_mut() {
        Some(operation) => operation.await,
        None => std::future::pending().await,
    }
}

/// A deadline that never comes.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
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
        let Some(redelivery) = &runtime.redelivery else {
            return Ok(entries
                .into_iter()
                .map(|e| (e, EntryState::default()))
                .collect());
        };
        let receipts: Vec<Receipt> = entries.iter().map(|d| d.receipt.clone()).collect();
        let states = redelivery.entry_states(&runtime.target, &receipts).await?;
        Ok(entries.into_iter().zip(states).collect())
    }
    .await;
    (reader, from, result)
}

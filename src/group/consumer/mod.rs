//! `ConsumerActor`: one per group member.
//!
//! The actor is thin: it owns the member's mailbox, runs `member_loop` and
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
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the actor, its messages and its drop guard |
//! | `member_loop.rs` | the loop, one method per event |
//! | `member.rs` | the entries a member holds, from admission to result |
//! | `ownership.rs` | heartbeats' bookkeeping and entries lost to a reclaim |

mod member;
mod member_loop;
mod ownership;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use actix::WeakRecipient;
use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use self::member_loop::member_loop;
use super::{
    ConsumerStopped, Deliver, EntriesHandled, Exit, GroupRuntime, SetPaused, StopConsumer,
};
use crate::broker::{Delivery, Receipt};

/// Orders from the actor to its loop.
enum Control {
    Pause(bool),
    Stop {
        deadline: Instant,
        done: oneshot::Sender<Vec<Receipt>>,
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
    /// Where the member keeps the count of entries it holds, for the
    /// supervisor to read.
    held: Arc<AtomicUsize>,
    report_to: WeakRecipient<EntriesHandled>,
    control: mpsc::UnboundedReceiver<Control>,
    deliveries: mpsc::Receiver<Vec<(Delivery, u32)>>,
}

/// The actor of one group member.
pub(crate) struct ConsumerActor {
    parts: Option<LoopParts>,
    control: mpsc::UnboundedSender<Control>,
    deliveries: mpsc::Sender<Vec<(Delivery, u32)>>,
    notice: DeathNotice,
}

impl ConsumerActor {
    pub(crate) fn new(
        runtime: Arc<GroupRuntime>,
        member: usize,
        generation: u64,
        held: Arc<AtomicUsize>,
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
                held,
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
    type Result = ResponseFuture<Vec<Receipt>>;

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

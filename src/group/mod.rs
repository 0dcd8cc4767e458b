//! One consumer group's runtime: its actors and the messages between them.
//!
//! ```text
//! Processor (handle) ── owns ──▶ ProducerActor
//!                     ├─ owns ──▶ SchedulerActor (per schedule)
//!                     └─ owns ──▶ GroupSupervisor (per stream, group)
//!                                   ├─ owns ──▶ ConsumerActor × members
//!                                   └─ owns ──▶ ReclaimerActor
//! ```
//!
//! Messages are facts, one struct each. Consumers and the reclaimer report
//! what happened ([`EntriesHandled`], [`ConsumerStopped`],
//! [`EntriesClaimed`]); only the [`GroupSupervisor`](supervisor::GroupSupervisor)
//! decides an entry's fate (ack, retry, dead letter) and a member's (restart).
//! Children hold weak references to their parent, so there are no cycles.
//!
//! The actors own state, connections and timers only: the work on an entry
//! is the plain async function [`crate::handler::run`], and the member's
//! read loop is the plain async function `consumer::member_loop`.

pub(crate) mod budget;
pub(crate) mod consumer;
pub(crate) mod reclaimer;
pub(crate) mod supervisor;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Message;

use crate::broker::{
    Capabilities, Delivery, Diagnostics, EntryState, GroupRef, Leases, MemberRef, Receipt,
    Redelivery, Streams,
};
use crate::handler::RetryPolicy;
use crate::handler::{ErasedHandler, Verdict};
use crate::metrics::GroupMetrics;
use crate::settings::{MissingGroupPolicy, StartFrom};
use crate::wire::Entry;

/// Everything the actors of one group share.
pub(crate) struct GroupRuntime {
    pub(crate) metrics: GroupMetrics,
    /// The broker, by capability.
    pub(crate) streams: Arc<dyn Streams>,
    /// Where the broker does not redeliver, check ownership or keep a
    /// pending list per member by itself (checked at start-up).
    pub(crate) redelivery: Option<Arc<dyn Redelivery>>,
    pub(crate) leases: Arc<dyn Leases>,
    pub(crate) diagnostics: Arc<dyn Diagnostics>,
    /// What the broker does by itself.
    pub(crate) capabilities: Capabilities,
    pub(crate) handler: ErasedHandler,
    /// The stream and group this runtime serves.
    pub(crate) target: GroupRef,
    /// The group's span (stream, group): its actors log inside it. At error
    /// level, so that it is enabled wherever their warnings are.
    pub(crate) span: tracing::Span,
    pub(crate) options: GroupOptions,
    /// Turns at a blocking read (`consumer.blocked_readers`), shared by the
    /// group's members.
    pub(crate) read_turns: Arc<tokio::sync::Semaphore>,
    /// Room for new reads below `consumer.max_pending`, shared by the
    /// group's members in this process.
    pub(crate) budget: budget::ReadBudget,
}

impl GroupRuntime {
    /// Member `index` of the group, by its name.
    pub(crate) fn member(&self, index: usize) -> MemberRef {
        self.target
            .member(Arc::clone(&self.options.member_names[index]))
    }
}

/// A group's settings after defaults and overrides are resolved.
#[derive(Clone, Debug)]
pub(crate) struct GroupOptions {
    pub(crate) member_names: Vec<Arc<str>>,
    pub(crate) count: usize,
    pub(crate) in_flight: usize,
    pub(crate) block: Duration,
    pub(crate) max_pending: u64,
    pub(crate) pending_check: Duration,
    pub(crate) start_from: StartFrom,
    pub(crate) on_missing_group: MissingGroupPolicy,
    pub(crate) retry: RetryPolicy,
    pub(crate) min_idle: Duration,
    pub(crate) reclaim_interval: Duration,
    pub(crate) reclaim_count: usize,
    pub(crate) retry_poll: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) lease_ttl: Duration,
    /// Zero: never remove idle consumers.
    pub(crate) remove_idle_consumers: Duration,
    pub(crate) restart: RestartPolicy,
    /// How long the group may have no member running before readiness
    /// turns false (`supervision.unready_after_ms`).
    pub(crate) unready_after: Duration,
    pub(crate) shutdown_deadline: Duration,
    /// Delete entries as they are acked (`retention.delete_acked`, and this
    /// group is the stream's only one, as checked at start-up).
    pub(crate) delete_acked: bool,
    /// Parent `process` spans on the creation context (feature
    /// `opentelemetry`; `Group::with_trace_links_only` turns it off).
    pub(crate) trace_parent: bool,
}

/// How a stopped member, or a failed group recovery, is started again:
/// exponential backoff from `min` to `max`, back to `min` after a member
/// ran `healthy_run` without stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RestartPolicy {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
    pub(crate) healthy_run: Duration,
}

impl RestartPolicy {
    /// How long a member must have run for its restart backoff to reset.
    pub(crate) const HEALTHY_RUN: Duration = Duration::from_secs(60);

    /// A fresh backoff of this policy.
    pub(crate) fn backoff(&self) -> crate::clock::Backoff {
        crate::clock::Backoff::new(self.min, self.max)
    }
}

/// The payload an entry arrived with, kept for its dead letter.
#[derive(Clone, Debug)]
pub(crate) enum Payload {
    /// Decoded (the fields are inside).
    Decoded(Arc<Entry>),
    /// Not decodable; the raw fields (`None`: trimmed away).
    Raw(Option<Vec<(Vec<u8>, Vec<u8>)>>),
}

impl Payload {
    /// The event's publish time, if it was decoded and carries one.
    pub(crate) fn published_at_ms(&self) -> Option<u64> {
        match self {
            Payload::Decoded(entry) => entry.published_at_ms(),
            Payload::Raw(_) => None,
        }
    }

    pub(crate) fn fields(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        match self {
            Payload::Decoded(entry) => entry.fields().to_vec(),
            Payload::Raw(fields) => fields.clone().unwrap_or_default(),
        }
    }
}

/// What happened to one entry at a member.
#[derive(Debug)]
pub(crate) struct EntryResult {
    pub(crate) id: String,
    /// What settling it takes.
    pub(crate) receipt: Receipt,
    pub(crate) payload: Payload,
    /// Failed attempts before this delivery.
    pub(crate) prior_attempts: u32,
    pub(crate) verdict: Verdict,
}

/// A member finished entries (consumer → supervisor).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct EntriesHandled {
    pub(crate) member: usize,
    pub(crate) results: Vec<EntryResult>,
}

/// Why a member's consumer stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Asked to stop, and did.
    Stopped,
    /// Its connection or a command failed; `missing_group` when the group
    /// (or its stream) is gone ([`Error::is_missing_group`](crate::Error::is_missing_group)).
    Failed { error: String, missing_group: bool },
    /// A handler panicked (the panic was caught; the consumer restarts
    /// fresh, as supervision asks).
    HandlerPanicked(String),
    /// The consumer's own code panicked (a bug): its drop guard reports it.
    Crashed,
}

/// A member's consumer stopped (its drop guard → supervisor).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct ConsumerStopped {
    pub(crate) member: usize,
    pub(crate) generation: u64,
    pub(crate) exit: Exit,
}

/// Entries now owned by a member, for it to run (supervisor → consumer).
/// Answers whether the member took them.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub(crate) struct Deliver {
    pub(crate) entries: Vec<(Delivery, u32)>,
}

/// Stop reading, finish running handlers by the deadline, report
/// (supervisor → consumer). Answers with the receipts of the entries left unfinished.
#[derive(Message, Debug)]
#[rtype(result = "Vec<Receipt>")]
pub(crate) struct StopConsumer {
    pub(crate) deadline: Instant,
}

/// Pause or resume reading new entries (supervisor → consumer).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct SetPaused(pub(crate) bool);

/// The reclaimer took entries over for a member (reclaimer → supervisor).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct EntriesClaimed {
    pub(crate) member: usize,
    /// Entries with their durable state.
    pub(crate) entries: Vec<(Delivery, EntryState)>,
    /// Entries whose payload was trimmed away while pending.
    pub(crate) trimmed: Vec<Delivery>,
}

/// A retry falls due at this time (supervisor → reclaimer), so short delays
/// are met without waiting for the next poll.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct RetryDueAt(pub(crate) Instant);

/// Stop the reclaimer's timers (supervisor → reclaimer).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct StopReclaimer;

pin_project_lite::pin_project! {
    /// An actor future run inside a span: its polls, and so the closures of
    /// its `map`s and `then`s, log with the span's fields.
    pub(crate) struct InSpan<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
    }
}

impl<A: actix::Actor, F: actix::ActorFuture<A>> actix::ActorFuture<A> for InSpan<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        act: &mut A,
        ctx: &mut A::Context,
        task: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        this.inner.poll(act, ctx, task)
    }
}

/// Runs actor futures inside a span ([`InSpan`]).
pub(crate) trait InSpanExt<A: actix::Actor>: actix::ActorFuture<A> + Sized {
    /// This future, inside `span`.
    fn in_span(self, span: &tracing::Span) -> InSpan<Self> {
        InSpan {
            inner: self,
            span: span.clone(),
        }
    }
}

impl<A: actix::Actor, F: actix::ActorFuture<A>> InSpanExt<A> for F {}

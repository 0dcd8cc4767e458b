//! # redstream
//!
//! Process events from Redis Streams consumer groups with supervised actix
//! actors: consumer groups, at-least-once delivery, durable retries with
//! backoff, dead letters, reclaim of abandoned entries, backpressure and
//! graceful shutdown, on the Redis you already run.
//!
//! ## One event, end to end
//!
//! 1. **Publish.** [`Producer::publish`] hands an [`Event`] to the
//!    `ProducerActor`, which gives it an id (ULID or UUIDv7), batches it with
//!    others and writes the batch with one pipelined round trip of `XADD`s.
//!    The buffer is bounded: publishers wait when it is full.
//! 2. **Read.** Each group member is a `ConsumerActor` with its own
//!    connection. After (re)start it first re-reads its own pending entries,
//!    then blocks on `XREADGROUP … >` for new ones.
//! 3. **Handle.** The entry is decoded (per entry: a bad one never fails its
//!    batch) into your [`Handler`]'s event type, and the handler runs under
//!    `catch_unwind`, at most `in_flight` at a time per member.
//! 4. **Decide.** The handler's [`Outcome`] goes to the group's
//!    `GroupSupervisor`, the one place where an entry's fate is decided:
//!    - `Ack` → `XACK`, batched into one multi-id call;
//!    - `Retry` / `Err` / panic → the attempt is recorded and the entry is
//!      scheduled for redelivery after an exponential backoff; after
//!      `max_attempts` it is dead-lettered;
//!    - `DeadLetter(reason)` → written to `<stream>:dlq` with the reason,
//!      then acked, atomically.
//! 5. **Reclaim.** The group's `ReclaimerActor` takes over entries whose
//!    member stopped (idle longer than `min_idle`, found with `XAUTOCLAIM`)
//!    and redelivers retries when they fall due.
//!
//! Failed consumers (a lost connection, a handler panic) are restarted by
//! their supervisor with backoff, under the same member name; their siblings
//! keep running. See `docs/semantics.md` for the guarantees.
//!
//! ```no_run
//! use redstream::prelude::*;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderCreated { order_id: String }
//!
//! struct Orders;
//!
//! impl Handler for Orders {
//!     type Event = OrderCreated;
//!     async fn handle(&self, order: OrderCreated, meta: Meta) -> HandlerResult {
//!         println!("order {} (entry {})", order.order_id, meta.entry_id());
//!         Ok(Outcome::Ack)
//!     }
//! }
//!
//! #[actix::main]
//! async fn main() -> redstream::Result<()> {
//!     let processor = Processor::builder(Settings::load()?)
//!         .group(Group::new("orders", "order-processing", Orders).with_members(4))
//!         .start()
//!         .await?;
//!     let order = OrderCreated { order_id: "o-1".into() };
//!     processor.producer().publish("orders", Event::new("order.created", &order)?).await?;
//!     processor.run_until_signal().await?;
//!     Ok(())
//! }
//! ```
//!
//! ## Map of the crate
//!
//! | module | concept |
//! |---|---|
//! | `error` | [`Error`], [`Result`], and the classifier (transient, missing group, …) |
//! | `clock` | the three clocks (the broker's, the monotonic one, the wall clock as data) and the one backoff |
//! | [`settings`] | typed settings: defaults, `settings/*.toml`, `REDSTREAM__…` env |
//! | `wire` | the wire format: [`Event`] out, [`Entry`] in, dead letters and their [`DeadLetterReason`] |
//! | [`broker`] | the boundary, split by capability ([`broker::Streams`], [`broker::Redelivery`], [`broker::Leases`], [`broker::Diagnostics`], [`broker::Admin`]; [`Broker`] is the four the runtime needs) and [`RedisBroker`]: every Redis command |
//! | `handler` | [`Handler`], [`handler_fn`], [`Meta`], [`Outcome`], [`RetryPolicy`], [`Schema`]; running a handler |
//! | `group` | one consumer group's runtime: its supervisor (deciding, settling, members, the pending check), consumers, reclaimer |
//! | `producer` | [`Producer`], the publishing handle, and its batching actor |
//! | `schedule` | [`Schedule`]: scheduled producers (a function run on a [`Cadence`], its events published) |
//! | `store` | [`Store`], [`TxHandler`] (exactly one effect), [`enqueue`] (outbox) and the relay |
//! | `processor` | [`Processor`] (the root), [`ProcessorBuilder`], [`Group`]; groups added and removed at run time ([`RemovedGroup`]) |
//! | `latest` | [`LatestValues`]: the newest value per key in a Redis hash; an older [`Version`] never overwrites a newer one |
//! | [`dead_letters`] | reading dead letters back, redriving them |
//! | [`metrics`] | metric names, `install_prometheus` |
//! | `web` | an actix-web scope: `/health`, `/metrics`, `/status` (feature `web`) |
//! | `handle`, `status` | [`ProcessorHandle`], [`GroupStatus`] |
//! | [`failpoints`] | named crash points for the fault-injection suite (feature `failpoints`) |
//!
//! `docs/architecture.md` walks one event through these modules.
//!
//! The library installs no global tracing subscriber, metrics recorder or
//! panic hook: the host application owns those.

pub mod broker;
mod clock;
pub mod dead_letters;
mod error;
pub mod failpoints;
mod group;
mod handle;
mod handler;
mod latest;
pub mod metrics;
#[cfg(feature = "opentelemetry")]
mod otel;
mod processor;
mod producer;
mod schedule;
pub mod settings;
mod status;
mod store;
#[cfg(feature = "web")]
pub mod web;
mod wire;

pub use broker::{Admin, Broker, RedisBroker, ServerFeatures, ServerReport};
pub use error::{BoxError, Error, Result};
pub use handle::{CheckStatus, Health, HealthCheck, ProcessorHandle};
pub use handler::{
    FnHandler, Handler, HandlerResult, Meta, Outcome, OwnershipLost, RetryPolicy, Schema,
    handler_fn,
};
pub use latest::{Applied, Latest, LatestValues, MAX_VERSION_PART, Version};
pub use processor::{Group, Processor, ProcessorBuilder, RemovedGroup, ShutdownReport};
pub use producer::{Producer, ProducerStats, Published};
pub use schedule::{Cadence, JobResult, Schedule, ScheduleStats, Tick};
pub use settings::{DatabaseUrl, IdFormat, MissingGroupPolicy, RedisUrl, Settings, StartFrom};
pub use status::{
    DETAILS_DEAD_LETTERS, DETAILS_LETTERS, DETAILS_PENDING, DeployedMember, GroupDeployment,
    GroupDetails, GroupHistory, GroupStatus, HISTORY_EVERY_MS, HISTORY_LEN, HistorySample,
    LetterSummary, MemberStatus,
};
pub use store::{DatabaseOutage, Store, StoreStats, TxHandler, enqueue};
pub use wire::{
    DeadLetterReason, DecodeError, Entry, Event, MAX_EVENT_ID_BYTES, MAX_FIELDS, RawEntry,
    dead_letter_field, dead_letter_stream, field,
};

/// The names most programs need: `use redstream::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Event, Group, Handler, HandlerResult, Meta, Outcome, Processor, Producer, RetryPolicy,
        Schedule, Schema, Settings, Store, Tick, TxHandler, enqueue, handler_fn,
    };
}

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

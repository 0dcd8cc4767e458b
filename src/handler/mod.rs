//! The handler API: what user code implements to process entries.
//!
//! A handler receives the decoded event (typed through serde) and its
//! [`Meta`], and returns an [`Outcome`]. `Err` means "retry"; a panic is
//! caught and counts as a failed attempt. Entries that cannot be decoded
//! into the handler's event type never reach it: they are dead-lettered with
//! a specific reason.
//!
//! ```
//! use redstream::{Handler, HandlerResult, Meta, Outcome};
//!
//! #[derive(serde::Deserialize)]
//! struct OrderCreated { order_id: String, total_cents: i64 }
//!
//! struct Orders;
//!
//! impl Handler for Orders {
//!     type Event = OrderCreated;
//!
//!     async fn handle(&self, order: OrderCreated, meta: Meta) -> HandlerResult {
//!         if order.total_cents < 0 {
//!             return Ok(Outcome::dead_letter("negative total"));
//!         }
//!         println!("order {} (attempt {})", order.order_id, meta.attempt());
//!         Ok(Outcome::Ack)
//!     }
//! }
//! ```
//!
//! The closure form, for small handlers:
//!
//! ```
//! use redstream::{handler_fn, Meta, Outcome};
//!
//! let log = handler_fn(|event: serde_json::Value, meta: Meta| async move {
//!     println!("{} {:?}: {event}", meta.entry_id(), meta.event_type());
//!     Ok(Outcome::Ack)
//! });
//! # let _ = log;
//! ```

mod meta;
mod outcome;
mod run;
mod schema;

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;

pub(crate) use self::meta::{
    ConfirmFn, MemberInfo, Ownership, OwnershipCheck, confirm_stale_ownership, record_outcome,
};
pub use self::meta::{Meta, OwnershipLost};
pub use self::outcome::{Outcome, RetryPolicy};
pub(crate) use self::run::{ErasedHandler, RunBatch, RunEach, Verdict, erase, panic_message, run};
pub use self::schema::Schema;
use crate::error::BoxError;

/// What a handler returns: an [`Outcome`], or an error meaning "retry".
pub type HandlerResult = Result<Outcome, BoxError>;

/// Processes the entries of one consumer group.
///
/// Implementations are shared by all members of the group (`&self`), so
/// keep per-entry state in the future, and shared state behind `Arc`s.
pub trait Handler: Send + Sync + 'static {
    /// The payload type, decoded from `data` (or from the fields of an entry
    /// without `data`). Use `serde_json::Value` to take anything.
    type Event: DeserializeOwned + Send + 'static;

    /// Processes one event.
    fn handle(&self, event: Self::Event, meta: Meta) -> impl Future<Output = HandlerResult> + Send;

    /// The schema version this handler reads, and upcasters from older ones.
    /// Default: version 1, no upcasters.
    fn schema(&self) -> Schema {
        Schema::default()
    }
}

/// A shared handler: keep an `Arc` to read the handler's state (counters,
/// caches) while the processor runs it.
impl<H: Handler> Handler for Arc<H> {
    type Event = H::Event;

    fn handle(&self, event: Self::Event, meta: Meta) -> impl Future<Output = HandlerResult> + Send {
        H::handle(self, event, meta)
    }

    fn schema(&self) -> Schema {
        H::schema(self)
    }
}

/// A handler made from a closure; see [`handler_fn`].
pub struct FnHandler<T, F> {
    f: F,
    schema: Schema,
    _event: PhantomData<fn() -> T>,
}

/// Makes a [`Handler`] from an async closure taking the event and its
/// [`Meta`].
pub fn handler_fn<T, F, Fut>(f: F) -> FnHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Meta) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    FnHandler {
        f,
        schema: Schema::default(),
        _event: PhantomData,
    }
}

impl<T, F> FnHandler<T, F> {
    /// Sets the schema (current version and upcasters).
    pub fn with_schema(mut self, schema: Schema) -> Self {
        self.schema = schema;
        self
    }
}

impl<T, F, Fut> Handler for FnHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Meta) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    type Event = T;

    fn handle(&self, event: T, meta: Meta) -> impl Future<Output = HandlerResult> + Send {
        (self.f)(event, meta)
    }

    fn schema(&self) -> Schema {
        self.schema.clone()
    }
}

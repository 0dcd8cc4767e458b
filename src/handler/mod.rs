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

mod outcome;

pub use self::outcome::{Outcome, RetryPolicy};

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;

use crate::clock::mono_ms;
use crate::error::BoxError;
use crate::wire::{DecodeError, Entry};

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

type Upcaster = Arc<dyn Fn(serde_json::Value) -> Result<serde_json::Value, BoxError> + Send + Sync>;

/// The schema version a handler reads, with upcasters that turn payloads of
/// older versions into the next version.
///
/// An entry's version is its `v` field (1 when absent). An entry newer than
/// `current`, or older with a gap in the upcaster chain, is dead-lettered
/// with reason `unknown_schema_version`.
///
/// ```
/// use redstream::{BoxError, Schema};
/// use serde_json::{json, Value};
///
/// // v1 had `amount` in euros; v2 has `amount_cents`.
/// let schema = Schema::new(2).upcast(1, |mut v: Value| {
///     let euros = v["amount"].as_f64().ok_or("amount missing")?;
///     v["amount_cents"] = json!((euros * 100.0).round() as i64);
///     Ok::<_, BoxError>(v)
/// });
/// assert_eq!(schema.current(), 2);
/// ```
#[derive(Clone)]
pub struct Schema {
    current: u32,
    upcasters: BTreeMap<u32, Upcaster>,
}

impl Default for Schema {
    fn default() -> Self {
        Schema::new(1)
    }
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema")
            .field("current", &self.current)
            .field("upcasts_from", &self.upcasters.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Schema {
    /// A schema whose current version is `current`.
    pub fn new(current: u32) -> Self {
        Schema {
            current,
            upcasters: BTreeMap::new(),
        }
    }

    /// The version handlers receive.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// Registers the upcaster from version `from` to `from + 1`.
    pub fn upcast<F, E>(mut self, from: u32, f: F) -> Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        self.upcasters
            .insert(from, Arc::new(move |v| f(v).map_err(Into::into)));
        self
    }

    /// Decodes an entry's payload into `T`, upcasting first if needed.
    pub fn decode<T: DeserializeOwned>(&self, entry: &Entry) -> Result<T, DecodeError> {
        let version = entry.version();
        let bad_json = |e: serde_json::Error| DecodeError::BadJson {
            detail: e.to_string(),
        };
        if version == self.current {
            return match entry.data() {
                Some(data) => serde_json::from_slice(data).map_err(bad_json),
                None => serde_json::from_value(entry.fields_as_json()?).map_err(bad_json),
            };
        }
        let unknown = DecodeError::UnknownVersion {
            version,
            current: self.current,
        };
        if version > self.current
            || !(version..self.current).all(|v| self.upcasters.contains_key(&v))
        {
            return Err(unknown);
        }
        let mut value = match entry.data() {
            Some(data) => serde_json::from_slice(data).map_err(bad_json)?,
            None => entry.fields_as_json()?,
        };
        for from in version..self.current {
            if let Some(up) = self.upcasters.get(&from) {
                value = up(value).map_err(|e| DecodeError::UpcastFailed {
                    from,
                    detail: e.to_string(),
                })?;
            }
        }
        serde_json::from_value(value).map_err(bad_json)
    }
}

/// Whether this process still owns an entry, and when that was last
/// confirmed. A heartbeat that finds another member took the entry over
/// flips it; the handler's future is then dropped and nothing about the
/// entry is acked.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ownership(Arc<OwnershipState>);

#[derive(Debug, Default)]
struct OwnershipState {
    lost: AtomicBool,
    /// When the read or the last heartbeat found it ours, in [`mono_ms`]:
    /// an in-process duration, so a wall-clock step neither makes a fresh
    /// confirmation look stale nor a stale one look fresh.
    confirmed_ms: AtomicU64,
}

impl Ownership {
    /// Owned, as of now (the entry was just read or claimed).
    pub(crate) fn confirmed_now() -> Self {
        let ownership = Ownership::default();
        ownership.confirm();
        ownership
    }

    pub(crate) fn mark_lost(&self) {
        self.0.lost.store(true, Ordering::Release);
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.0.lost.load(Ordering::Acquire)
    }

    /// A heartbeat found the entry still ours.
    pub(crate) fn confirm(&self) {
        self.0.confirmed_ms.store(mono_ms(), Ordering::Release);
    }

    fn confirmed_ms(&self) -> u64 {
        self.0.confirmed_ms.load(Ordering::Acquire)
    }
}

/// Asks the broker which of these entries another member took over (and
/// extends the rest, like a heartbeat).
pub(crate) type ConfirmFn =
    Arc<dyn Fn(Vec<String>) -> BoxFuture<'static, crate::error::Result<Vec<String>>> + Send + Sync>;

/// How a member re-checks ownership before a commit, when its heartbeats
/// may have stalled (the process was stopped, the machine froze).
#[derive(Clone)]
pub(crate) struct OwnershipCheck {
    /// Confirmations older than this are checked again before a commit
    /// (1.5 heartbeat intervals, below `min_idle`).
    pub(crate) stale_after: Duration,
    pub(crate) confirm: ConfirmFn,
}

impl fmt::Debug for OwnershipCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnershipCheck")
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

/// The member an entry was delivered to.
#[derive(Debug)]
pub(crate) struct MemberInfo {
    pub(crate) stream: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) member: Arc<str>,
    pub(crate) check: Option<OwnershipCheck>,
}

/// Longest the ownership check before a commit waits for the broker; if it
/// does not answer, the commit goes ahead (`processed_events` still keeps
/// one effect).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// Before a commit: if this member's last confirmation of some entries is
/// stale, asks the broker whether they are still ours, and marks the ones
/// another member took over as lost, so the commit leaves them out.
pub(crate) async fn confirm_stale_ownership(metas: &[Meta]) {
    let Some(check) = metas.first().and_then(|m| m.member.check.clone()) else {
        return;
    };
    let now = mono_ms();
    let limit = u64::try_from(check.stale_after.as_millis()).unwrap_or(u64::MAX);
    let stale: Vec<&Meta> = metas
        .iter()
        .filter(|m| {
            !m.ownership.is_lost() && now.saturating_sub(m.ownership.confirmed_ms()) > limit
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    let ids = stale.iter().map(|m| m.entry.id().to_owned()).collect();
    match tokio::time::timeout(CONFIRM_TIMEOUT, (check.confirm)(ids)).await {
        Ok(Ok(lost)) => {
            for meta in stale {
                if lost.iter().any(|id| id == meta.entry.id()) {
                    tracing::warn!(
                        stream = %meta.member.stream, group = %meta.member.group,
                        member = %meta.member.member, entry_id = meta.entry.id(),
                        "entry was taken over while this member stalled; its effect is not committed here",
                    );
                    meta.ownership.mark_lost();
                } else {
                    meta.ownership.confirm();
                }
            }
        }
        Ok(Err(e)) => tracing::debug!("ownership check before commit failed: {e}"),
        Err(_) => tracing::debug!("ownership check before commit timed out"),
    }
}

/// An entry was taken over by another member while its handler ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this member no longer owns the entry; another member took it over")]
pub struct OwnershipLost;

/// Everything about a delivery except the payload: where it came from, the
/// attempt number, and whether this process still owns it.
#[derive(Clone, Debug)]
pub struct Meta {
    entry: Arc<Entry>,
    member: Arc<MemberInfo>,
    attempt: u32,
    ownership: Ownership,
}

impl Meta {
    pub(crate) fn new(
        entry: Arc<Entry>,
        member: Arc<MemberInfo>,
        attempt: u32,
        ownership: Ownership,
    ) -> Self {
        Meta {
            entry,
            member,
            attempt,
            ownership,
        }
    }

    /// A `Meta` for calling a handler directly in unit tests.
    pub fn for_test(entry: Entry, stream: &str, group: &str, attempt: u32) -> Self {
        Meta::new(
            Arc::new(entry),
            Arc::new(MemberInfo {
                stream: stream.into(),
                group: group.into(),
                member: "test-0".into(),
                check: None,
            }),
            attempt,
            Ownership::default(),
        )
    }

    /// The stream the entry was read from.
    pub fn stream(&self) -> &str {
        &self.member.stream
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.member.group
    }

    /// The member (consumer name) that received it.
    pub fn member(&self) -> &str {
        &self.member.member
    }

    /// The stream entry id.
    pub fn entry_id(&self) -> &str {
        self.entry.id()
    }

    /// The event id (`id` field), if the writer set one.
    pub fn event_id(&self) -> Option<&str> {
        self.entry.event_id()
    }

    /// The event type (`type` field).
    pub fn event_type(&self) -> Option<&str> {
        self.entry.event_type()
    }

    /// The schema version the entry was written with (before upcasting).
    pub fn version(&self) -> u32 {
        self.entry.version()
    }

    /// Which attempt this is, from 1. Survives restarts of the process and
    /// (with persistence) of Redis; a crash of the consumer does not count.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Publish time (`ts` field).
    pub fn published_at(&self) -> Option<SystemTime> {
        self.entry
            .published_at_ms()
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The ordering key (`key` field).
    pub fn key(&self) -> Option<&str> {
        self.entry.key()
    }

    /// The W3C trace context (`traceparent` field).
    pub fn traceparent(&self) -> Option<&str> {
        self.entry.traceparent()
    }

    /// The key that makes the effect idempotent: the event id, or
    /// `<stream>/<entry id>` for entries written without one.
    pub fn idempotency_key(&self) -> String {
        self.entry.idempotency_key(self.stream())
    }

    /// The whole entry, raw fields included.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// `Err(OwnershipLost)` if another member took the entry over; call it
    /// right before committing an effect.
    pub fn ensure_owned(&self) -> Result<(), OwnershipLost> {
        if self.ownership.is_lost() {
            Err(OwnershipLost)
        } else {
            Ok(())
        }
    }
}

impl Meta {
    /// The tracing span of one entry's handling (`outcome` is recorded when
    /// it ends).
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "redstream.entry",
            stream = %self.member.stream,
            group = %self.member.group,
            member = %self.member.member,
            entry_id = %self.entry.id(),
            event_type = self.entry.event_type().unwrap_or(""),
            attempt = self.attempt,
            outcome = tracing::field::Empty,
        )
    }
}

/// What running a handler on one entry came to.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// The handler decided.
    Decided(Outcome),
    /// The handler returned `Err` or panicked: a failed attempt.
    Failed { error: String, panicked: bool },
    /// The payload could not be decoded for this handler.
    Undecodable(DecodeError),
    /// Not run: its attempt budget was already spent (an earlier
    /// dead-letter write failed, or the budget was lowered).
    Exhausted,
    /// Not committed: another member took the entry over. Nothing is
    /// reported for it.
    Lost,
}

/// A handler with its event type erased, as the consumers hold it.
pub(crate) trait DynHandler: Send + Sync + 'static {
    /// Decodes the entry and starts the handler on it.
    fn start(&self, meta: Meta) -> Result<BoxFuture<'static, HandlerResult>, DecodeError>;

    /// For handlers that process entries in shared transactions: the most
    /// entries per batch. `None` (the default): one future per entry.
    fn batch_size(&self) -> Option<usize> {
        None
    }

    /// Whether the handler cannot make progress now: its database refuses
    /// writes. A member that is stopping releases its running entries at
    /// once then, instead of waiting for the shutdown deadline.
    fn stalled(&self) -> bool {
        false
    }

    /// Runs a batch; one verdict per entry, in order. Only called when
    /// [`DynHandler::batch_size`] is `Some`.
    fn run_batch(&self, metas: Vec<Meta>) -> BoxFuture<'static, Vec<Verdict>> {
        let verdicts = metas
            .into_iter()
            .map(|_| Verdict::Failed {
                error: "this handler does not run batches".to_owned(),
                panicked: false,
            })
            .collect();
        Box::pin(std::future::ready(verdicts))
    }
}

struct Erased<H: Handler> {
    handler: Arc<H>,
    schema: Schema,
}

impl<H: Handler> DynHandler for Erased<H> {
    fn start(&self, meta: Meta) -> Result<BoxFuture<'static, HandlerResult>, DecodeError> {
        let event: H::Event = self.schema.decode(meta.entry())?;
        let handler = Arc::clone(&self.handler);
        Ok(Box::pin(async move { handler.handle(event, meta).await }))
    }
}

/// Erases a handler's event type.
pub(crate) fn erase<H: Handler>(handler: H) -> Arc<dyn DynHandler> {
    let schema = handler.schema();
    Arc::new(Erased {
        handler: Arc::new(handler),
        schema,
    })
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs a handler on one entry: decoding and the handler itself under
/// `catch_unwind`, so neither a bad `Deserialize` impl nor a handler panic
/// escapes into the actor.
pub(crate) async fn run(handler: &dyn DynHandler, meta: Meta) -> Verdict {
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| handler.start(meta)));
    let future = match started {
        Ok(Ok(f)) => f,
        Ok(Err(decode)) => return Verdict::Undecodable(decode),
        Err(payload) => {
            return Verdict::Failed {
                error: format!("panic: {}", panic_message(payload.as_ref())),
                panicked: true,
            };
        }
    };
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(Ok(outcome)) => Verdict::Decided(outcome),
        Ok(Err(error)) => Verdict::Failed {
            error: error.to_string(),
            panicked: false,
        },
        Err(payload) => Verdict::Failed {
            error: format!("panic: {}", panic_message(payload.as_ref())),
            panicked: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(fields: &[(&str, &str)]) -> Entry {
        Entry::from_fields(
            "1-0",
            fields
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        )
        .expect("valid entry")
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        amount_cents: i64,
    }

    #[test]
    fn upcasts_older_versions_and_refuses_unknown_ones() {
        let schema = Schema::new(2).upcast(1, |mut v: serde_json::Value| {
            let euros = v["amount"].as_f64().ok_or("amount missing")?;
            v["amount_cents"] = json!((euros * 100.0).round() as i64);
            Ok::<_, BoxError>(v)
        });
        let v1 = entry(&[("v", "1"), ("data", r#"{"amount": 2.5}"#)]);
        assert_eq!(schema.decode::<Order>(&v1), Ok(Order { amount_cents: 250 }));
        let v2 = entry(&[("v", "2"), ("data", r#"{"amount_cents": 7}"#)]);
        assert_eq!(schema.decode::<Order>(&v2), Ok(Order { amount_cents: 7 }));
        let v3 = entry(&[("v", "3"), ("data", "{}")]);
        assert!(matches!(
            schema.decode::<Order>(&v3),
            Err(DecodeError::UnknownVersion {
                version: 3,
                current: 2
            })
        ));
        let bad = entry(&[("v", "1"), ("data", r#"{"nope": 1}"#)]);
        assert!(matches!(
            schema.decode::<Order>(&bad),
            Err(DecodeError::UpcastFailed { from: 1, .. })
        ));
    }

    #[test]
    fn version_without_upcaster_is_unknown() {
        let old = entry(&[("v", "1"), ("data", "{}")]);
        assert!(matches!(
            Schema::new(3)
                .upcast(2, Ok::<_, BoxError>)
                .decode::<serde_json::Value>(&old),
            Err(DecodeError::UnknownVersion { version: 1, .. })
        ));
    }

    #[test]
    fn bad_json_is_undecodable() {
        let e = entry(&[("data", "{not json")]);
        let err = Schema::default().decode::<Order>(&e).expect_err("bad json");
        assert!(err.reason().starts_with("bad_json"), "{}", err.reason());
    }

    #[actix_rt::test]
    async fn panics_and_errors_become_verdicts() {
        let panicky = erase(handler_fn(|v: serde_json::Value, _m: Meta| async move {
            if v["boom"].as_bool() == Some(true) {
                panic!("boom requested");
            }
            if v["fail"].as_bool() == Some(true) {
                return Err("refused".into());
            }
            Ok(Outcome::Ack)
        }));
        let meta = |data: &str| Meta::for_test(entry(&[("data", data)]), "s", "g", 1);
        assert!(matches!(
            run(panicky.as_ref(), meta(r#"{"boom": true}"#)).await,
            Verdict::Failed { panicked: true, ref error } if error.contains("boom requested")
        ));
        assert!(matches!(
            run(panicky.as_ref(), meta(r#"{"fail": true}"#)).await,
            Verdict::Failed { panicked: false, ref error } if error == "refused"
        ));
        assert!(matches!(
            run(panicky.as_ref(), meta("{}")).await,
            Verdict::Decided(Outcome::Ack)
        ));
        assert!(matches!(
            run(panicky.as_ref(), meta("[")).await,
            Verdict::Undecodable(DecodeError::BadJson { .. })
        ));
    }
}

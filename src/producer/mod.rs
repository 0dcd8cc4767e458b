//! The publishing handle.

use std::collections::HashMap;
use std::sync::Arc;

use actix::Addr;
use tokio::sync::Semaphore;

pub(crate) mod actor;

use self::actor::{Collector, ProducerActor, Publish, Queued, StatCounters};
pub use self::actor::{ProducerStats, Published};
use crate::broker::PublishItem;
use crate::error::{Error, Result};
use crate::settings::IdFormat;
use crate::wire::{Event, OutgoingEntry};

/// Publishes events. Cheap to clone; share it (for example through
/// actix-web's `web::Data`).
///
/// The producer's buffer is bounded (`producer.buffer` events accepted and
/// not yet written): [`Producer::publish`] waits while it is full, and
/// [`Producer::try_publish`] fails at once with [`Error::BufferFull`] instead
/// (an HTTP handler turns that into `503`).
///
/// ```no_run
/// # async fn demo(processor: redstream::Processor) -> redstream::Result<()> {
/// use redstream::Event;
///
/// let producer = processor.producer();
/// let receipt = producer
///     .publish("orders", Event::new("order.created", &serde_json::json!({"order_id": "o-1"}))?)
///     .await?;
/// println!("written as {} with event id {}", receipt.entry_id, receipt.event_id);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    addr: Addr<ProducerActor>,
    stats: Arc<StatCounters>,
    permits: Arc<Semaphore>,
    capacity: usize,
    max_payload: usize,
    id_format: IdFormat,
    default_max_len: Option<u64>,
    max_lens: HashMap<String, u64>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.inner.capacity)
            .field("buffered", &self.buffered())
            .finish_non_exhaustive()
    }
}

/// What a producer handle checks and adds before queueing an event.
pub(crate) struct ProducerLimits {
    pub(crate) capacity: usize,
    pub(crate) max_payload: usize,
    pub(crate) id_format: IdFormat,
    pub(crate) default_max_len: Option<u64>,
    pub(crate) max_lens: HashMap<String, u64>,
}

/// Makes a new event id.
pub(crate) fn new_event_id(format: IdFormat) -> String {
    match format {
        IdFormat::Ulid => ulid::Ulid::new().to_string(),
        IdFormat::Uuidv7 => uuid::Uuid::now_v7().to_string(),
    }
}

impl Producer {
    pub(crate) fn new(
        addr: Addr<ProducerActor>,
        stats: Arc<StatCounters>,
        permits: Arc<Semaphore>,
        limits: ProducerLimits,
    ) -> Self {
        Producer {
            inner: Arc::new(Inner {
                addr,
                stats,
                permits,
                capacity: limits.capacity,
                max_payload: limits.max_payload,
                id_format: limits.id_format,
                default_max_len: limits.default_max_len,
                max_lens: limits.max_lens,
            }),
        }
    }

    /// How many events are accepted and not yet written.
    pub fn buffered(&self) -> usize {
        self.inner
            .capacity
            .saturating_sub(self.inner.permits.available_permits())
    }

    /// What the producer has written so far.
    pub fn stats(&self) -> ProducerStats {
        self.inner.stats.snapshot()
    }

    /// The buffer's size (`producer.buffer`).
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Checks and encodes an event for `stream`.
    fn prepare(&self, stream: &Arc<str>, event: Event) -> Result<PublishItem> {
        let format = self.inner.id_format;
        let entry: OutgoingEntry = event.into_outgoing(|| new_event_id(format))?;
        let actual = entry.encoded_len();
        if actual > self.inner.max_payload {
            return Err(Error::PayloadTooLarge {
                actual,
                limit: self.inner.max_payload,
            });
        }
        let max_len = self
            .inner
            .max_lens
            .get(&**stream)
            .copied()
            .or(self.inner.default_max_len);
        Ok(PublishItem {
            stream: Arc::clone(stream),
            entry,
            max_len,
        })
    }

    /// Publishes one event and waits until it is written. Waits first while
    /// the buffer is full. The event gets an id unless it has one.
    pub async fn publish(&self, stream: &str, event: Event) -> Result<Published> {
        #[cfg(feature = "opentelemetry")]
        return traced(stream, event, |event| self.publish_untraced(stream, event)).await;
        #[cfg(not(feature = "opentelemetry"))]
        self.publish_untraced(stream, event).await
    }

    async fn publish_untraced(&self, stream: &str, event: Event) -> Result<Published> {
        let stream: Arc<str> = Arc::from(stream);
        let item = self.prepare(&stream, event)?;
        let permit = Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::Stopped)?;
        self.send_one(item, permit).await
    }

    /// Like [`Producer::publish`], but fails at once with
    /// [`Error::BufferFull`] when the buffer is full.
    pub async fn try_publish(&self, stream: &str, event: Event) -> Result<Published> {
        #[cfg(feature = "opentelemetry")]
        return traced(stream, event, |event| {
            self.try_publish_untraced(stream, event)
        })
        .await;
        #[cfg(not(feature = "opentelemetry"))]
        self.try_publish_untraced(stream, event).await
    }

    async fn try_publish_untraced(&self, stream: &str, event: Event) -> Result<Published> {
        let stream: Arc<str> = Arc::from(stream);
        let item = self.prepare(&stream, event)?;
        let permit = Arc::clone(&self.inner.permits)
            .try_acquire_owned()
            .map_err(|_| Error::BufferFull {
                capacity: self.inner.capacity,
            })?;
        self.send_one(item, permit).await
    }

    async fn send_one(
        &self,
        item: PublishItem,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Published> {
        let (collector, done) = Collector::new(1);
        let queued = Queued {
            item,
            collector,
            index: 0,
            _permit: Some(permit),
        };
        self.inner
            .addr
            .send(Publish(vec![queued]))
            .await
            .map_err(|_| Error::Stopped)?;
        let mut results = done.await.map_err(|_| Error::Stopped)?;
        results.pop().unwrap_or(Err(Error::Stopped))
    }

    /// Publishes many events to one stream with one message to the
    /// producer per chunk; returns one result per event, in order. Invalid
    /// events (too large, reserved header) fail alone.
    pub async fn publish_batch(
        &self,
        stream: &str,
        events: Vec<Event>,
    ) -> Result<Vec<Result<Published>>> {
        #[cfg(feature = "opentelemetry")]
        return self.publish_batch_traced(stream, events).await;
        #[cfg(not(feature = "opentelemetry"))]
        self.publish_batch_untraced(stream, events).await
    }

    /// [`Producer::publish_batch`] in its `send` span.
    #[cfg(feature = "opentelemetry")]
    async fn publish_batch_traced(
        &self,
        stream: &str,
        events: Vec<Event>,
    ) -> Result<Vec<Result<Published>>> {
        use tracing::Instrument;
        let (span, events) = otel_send_batch(stream, events);
        let results = self
            .publish_batch_untraced(stream, events)
            .instrument(span.clone())
            .await;
        match &results {
            Ok(each) => {
                if let Some(Err(e)) = each.iter().find(|r| r.is_err()) {
                    crate::otel::record_error(&span, crate::otel::error_type(e));
                }
            }
            Err(e) => crate::otel::record_error(&span, crate::otel::error_type(e)),
        }
        results
    }

    async fn publish_batch_untraced(
        &self,
        stream: &str,
        events: Vec<Event>,
    ) -> Result<Vec<Result<Published>>> {
        let stream: Arc<str> = Arc::from(stream);
        let total = events.len();
        let mut results: Vec<Option<Result<Published>>> = (0..total).map(|_| None).collect();
        let mut valid = Vec::with_capacity(total);
        for (i, event) in events.into_iter().enumerate() {
            match self.prepare(&stream, event) {
                Ok(item) => valid.push((i, item)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        // Chunks of at most half the buffer, so two batches can overlap.
        let chunk = (self.inner.capacity / 2).max(1);
        let mut rest = valid.into_iter().peekable();
        while rest.peek().is_some() {
            let part: Vec<(usize, PublishItem)> = rest.by_ref().take(chunk).collect();
            let mut permits = Arc::clone(&self.inner.permits)
                .acquire_many_owned(part.len() as u32)
                .await
                .map_err(|_| Error::Stopped)?;
            let (collector, done) = Collector::new(part.len());
            let mut positions = Vec::with_capacity(part.len());
            let mut queued = Vec::with_capacity(part.len());
            for (k, (i, item)) in part.into_iter().enumerate() {
                positions.push(i);
                queued.push(Queued {
                    item,
                    collector: Arc::clone(&collector),
                    index: k,
                    _permit: permits.split(1),
                });
            }
            self.inner
                .addr
                .send(Publish(queued))
                .await
                .map_err(|_| Error::Stopped)?;
            let written = done.await.map_err(|_| Error::Stopped)?;
            for (i, r) in positions.into_iter().zip(written) {
                results[i] = Some(r);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Error::Stopped)))
            .collect())
    }

    pub(crate) fn actor(&self) -> &Addr<ProducerActor> {
        &self.inner.addr
    }

    /// Refuses new publishes (they fail with [`Error::Stopped`]).
    pub(crate) fn close(&self) {
        self.inner.permits.close();
    }
}

/// The `send` span of one publish: a child of the event's own creation
/// context when it carries one (the outbox relay, a caller-supplied
/// `traceparent`, which is kept), of the current span otherwise; its
/// context becomes the event's creation context.
#[cfg(feature = "opentelemetry")]
fn otel_send(stream: &str, event: Event) -> (tracing::Span, Event) {
    let span = crate::otel::send_span(stream, None);
    if let Some(cx) = crate::otel::event_context(&event) {
        crate::otel::set_parent(&span, cx);
    }
    let event = crate::otel::inject(&span, event);
    (span, event)
}

/// The `send` span of a batch (a child of the current span, or with none,
/// of the first event's creation context, so that a relay's publish
/// continues the trace that enqueued it), linked to every event's creation
/// context; an event without one gets a `create` span, a child of the
/// `send` span.
#[cfg(feature = "opentelemetry")]
fn otel_send_batch(stream: &str, events: Vec<Event>) -> (tracing::Span, Vec<Event>) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = crate::otel::send_span(stream, Some(events.len()));
    let carried: Vec<Option<opentelemetry::Context>> =
        events.iter().map(crate::otel::event_context).collect();
    let no_current = !tracing::Span::current()
        .context()
        .span()
        .span_context()
        .is_valid();
    if no_current && let Some(Some(first)) = carried.iter().find(|c| c.is_some()) {
        crate::otel::set_parent(&span, first.clone());
    }
    for cx in carried.iter().flatten() {
        crate::otel::add_link(&span, cx);
    }
    let events = events
        .into_iter()
        .zip(carried)
        .map(|(event, carried)| {
            if carried.is_some() {
                return event;
            }
            let create = span.in_scope(|| crate::otel::create_span(stream));
            crate::otel::inject(&create, event)
        })
        .collect();
    (span, events)
}

/// Runs one publish in its `send` span and records its outcome there.
#[cfg(feature = "opentelemetry")]
async fn traced<F: std::future::Future<Output = Result<Published>>>(
    stream: &str,
    event: Event,
    publish: impl FnOnce(Event) -> F,
) -> Result<Published> {
    use tracing::Instrument;
    let (span, event) = otel_send(stream, event);
    let span = &span;
    let result = publish(event).instrument(span.clone()).await;
    match &result {
        Ok(published) => {
            span.record("messaging.message.id", published.event_id.as_str());
        }
        Err(e) => crate::otel::record_error(span, crate::otel::error_type(e)),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_in_both_formats_are_unique_and_time_ordered() {
        let u1 = new_event_id(IdFormat::Uuidv7);
        let u2 = new_event_id(IdFormat::Uuidv7);
        let parsed = uuid::Uuid::parse_str(&u1).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 7);
        assert!(u1 < u2, "UUIDv7 ids sort by creation: {u1} {u2}");

        let l1 = new_event_id(IdFormat::Ulid);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let l2 = new_event_id(IdFormat::Ulid);
        assert_eq!(l1.len(), 26);
        assert!(ulid::Ulid::from_string(&l1).is_ok());
        assert!(l1 < l2, "ULIDs sort by creation: {l1} {l2}");
    }
}

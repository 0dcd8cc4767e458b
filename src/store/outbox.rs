//! The transactional outbox: [`enqueue`] writes an event as a row inside
//! the application's own transaction; the relay (`relay.rs`) publishes the
//! rows that committed.

use std::collections::HashMap;

use sea_orm::sea_query::{Alias, Query};
use sea_orm::{ConnectionTrait, DbBackend};

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::producer::new_event_id;
use crate::settings::IdFormat;
use crate::wire::Event;

/// The PostgreSQL channel the relay listens on.
pub(super) const CHANNEL: &str = "redstream_outbox";

pub(super) fn table() -> Alias {
    Alias::new("outbox")
}

pub(super) fn col(name: &str) -> Alias {
    Alias::new(name)
}

/// Writes `event` for `stream` into the outbox through `conn` (normally the
/// application's own transaction, so the event is published if and only if
/// the transaction commits). Returns the event id (assigned when the event
/// has none).
///
/// The row keeps the event's trace context, `traceparent` and
/// `tracestate`, and the relay publishes the event with both. With the
/// feature `opentelemetry`, that is the context current here (a
/// `create <stream>` span, a child of the current span), unless the event
/// carries its own `traceparent`; the relay's publish and the handlers of
/// the event continue that trace.
///
/// ```no_run
/// # async fn demo(store: redstream::Store) -> redstream::Result<()> {
/// use sea_orm::TransactionTrait;
/// use redstream::{enqueue, Event};
///
/// let tx = store.connection().begin().await?;
/// // … the application's own writes through `tx` …
/// enqueue(&tx, "order-events", Event::new("order.confirmed", &serde_json::json!({"order_id": "o-1"}))?).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn enqueue<C: ConnectionTrait>(conn: &C, stream: &str, event: Event) -> Result<String> {
    event.check()?;
    let id = match event.id() {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => new_event_id(IdFormat::Ulid),
    };
    #[cfg(feature = "opentelemetry")]
    let event = {
        let span = crate::otel::create_span(stream);
        span.record("messaging.message.id", id.as_str());
        crate::otel::inject(&span, event)
    };
    let data = std::str::from_utf8(event.data())
        .map_err(|_| Error::InvalidEvent {
            reason: "data is not UTF-8 JSON".to_owned(),
        })?
        .to_owned();
    let headers = if event.headers().is_empty() {
        None
    } else {
        let map: HashMap<&str, &str> = event
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Some(serde_json::to_string(&map).map_err(Error::Encode)?)
    };
    let insert = Query::insert()
        .into_table(table())
        .columns([
            col("stream"),
            col("event_id"),
            col("event_type"),
            col("version"),
            col("data"),
            col("event_key"),
            col("headers"),
            col("traceparent"),
            col("tracestate"),
            col("created_at"),
        ])
        .values([
            stream.into(),
            id.clone().into(),
            event.event_type().into(),
            (event.version() as i32).into(),
            data.into(),
            event.key().map(str::to_owned).into(),
            headers.into(),
            event.traceparent().map(str::to_owned).into(),
            event.tracestate().map(str::to_owned).into(),
            (now_ms() as i64).into(),
        ])
        .map_err(|e| Error::InvalidEvent {
            reason: e.to_string(),
        })?
        .to_owned();
    conn.execute(&insert).await?;
    if conn.get_database_backend() == DbBackend::Postgres {
        // Delivered at commit, so the relay wakes when the row is visible.
        conn.execute_unprepared(&format!("SELECT pg_notify('{CHANNEL}', '')"))
            .await?;
    }
    Ok(id)
}

//! The transactional outbox: [`enqueue`] inside the application's
//! transaction, and the relay that publishes unsent rows.
//!
//! The relay publishes rows in `id` order through the producer, keeping
//! each row's event id, then marks them sent. A crash between the publish
//! and the mark publishes the row again on restart: a duplicate entry with
//! the same event id, which idempotent consumers absorb. One process relays
//! a database's outbox at a time (a lease in `redstream_leases`). On
//! PostgreSQL, `LISTEN`/`NOTIFY` wakes the relay at the commit of a
//! transaction that enqueued; otherwise it polls every `outbox.poll_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, DbBackend, TransactionTrait};
use tokio::sync::{Notify, watch};

use super::Store;
use crate::entry::{Event, now_ms};
use crate::error::{Error, Result};
use crate::producer::{Producer, new_event_id};
use crate::settings::IdFormat;

/// The PostgreSQL channel the relay listens on.
const CHANNEL: &str = "redstream_outbox";
/// The lease name of the relay.
const LEASE: &str = "outbox-relay";

fn table() -> Alias {
    Alias::new("outbox")
}

fn col(name: &str) -> Alias {
    Alias::new(name)
}

/// Writes `event` for `stream` into the outbox through `conn` (normally the
/// application's own transaction, so the event is published if and only if
/// the transaction commits). Returns the event id (assigned when the event
/// has none).
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

/// How the relay works.
#[derive(Clone, Debug)]
pub(crate) struct RelayOptions {
    pub(crate) poll: Duration,
    pub(crate) batch: usize,
    pub(crate) lease_ttl: Duration,
}

/// Stop relaying after a last pass (Processor → relay).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopRelay;

/// The outbox relay actor: owns the relay loop and its stop signal.
pub(crate) struct OutboxRelay {
    parts: Option<(Store, Producer, RelayOptions)>,
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
    done_tx: Option<watch::Sender<bool>>,
}

impl OutboxRelay {
    pub(crate) fn new(store: Store, producer: Producer, options: RelayOptions) -> Self {
        let (stop, _) = watch::channel(false);
        let (done_tx, done) = watch::channel(false);
        OutboxRelay {
            parts: Some((store, producer, options)),
            stop,
            done,
            done_tx: Some(done_tx),
        }
    }
}

impl Actor for OutboxRelay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let (Some((store, producer, options)), Some(done)) =
            (self.parts.take(), self.done_tx.take())
        else {
            return;
        };
        let stop = self.stop.subscribe();
        ctx.spawn(
            relay_loop(store, producer, options, stop)
                .into_actor(self)
                .map(move |(), _act, ctx| {
                    let _ = done.send(true);
                    ctx.stop();
                }),
        );
    }
}

impl Handler<StopRelay> for OutboxRelay {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: StopRelay, _ctx: &mut Self::Context) -> Self::Result {
        let _ = self.stop.send(true);
        let mut done = self.done.clone();
        Box::pin(async move {
            let _ = done.wait_for(|d| *d).await;
        })
    }
}

/// Relays until stopped, then makes one last pass.
async fn relay_loop(
    store: Store,
    producer: Producer,
    options: RelayOptions,
    mut stop: watch::Receiver<bool>,
) {
    let wake = Arc::new(Notify::new());
    let listener = (store.backend() == DbBackend::Postgres)
        .then(|| actix_rt::spawn(listen(store.clone(), Arc::clone(&wake))));
    let token = new_event_id(IdFormat::Ulid);
    let mut lease_until = 0u64;
    loop {
        let stopping = *stop.borrow();
        let now = now_ms();
        if lease_until.saturating_sub(now) < options.lease_ttl.as_millis() as u64 * 2 / 3 {
            lease_until = match take_lease(&store, &token, options.lease_ttl).await {
                Ok(true) => now + options.lease_ttl.as_millis() as u64,
                Ok(false) => 0,
                Err(e) => {
                    tracing::warn!("outbox relay lease: {e}");
                    0
                }
            };
        }
        let mut more = false;
        if lease_until > now {
            match pass(&store, &producer, options.batch).await {
                Ok(relayed) => more = relayed == options.batch,
                Err(e) => tracing::warn!("outbox relay: {e}; trying again"),
            }
        }
        if stopping {
            break;
        }
        if more {
            continue;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(options.poll) => {}
            _ = stop.changed() => {}
        }
    }
    if lease_until > 0 {
        let _ = release_lease(&store, &token).await;
    }
    if let Some(listener) = listener {
        listener.abort();
    }
}

/// Wakes the relay on every NOTIFY (PostgreSQL).
async fn listen(store: Store, wake: Arc<Notify>) {
    use sea_orm::sqlx::postgres::PgListener;
    loop {
        let pool = store.connection().get_postgres_connection_pool();
        let listener = async {
            let mut l = PgListener::connect_with(pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sea_orm::sqlx::Error>(l)
        };
        match listener.await {
            Ok(mut l) => loop {
                match l.recv().await {
                    Ok(_) => wake.notify_one(),
                    Err(e) => {
                        tracing::debug!("outbox LISTEN: {e}; reconnecting");
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!("outbox LISTEN: {e}; polling meanwhile"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Takes or renews the relay lease.
async fn take_lease(store: &Store, token: &str, ttl: Duration) -> Result<bool> {
    let db = store.connection();
    let now = now_ms() as i64;
    let expires = now + ttl.as_millis() as i64;
    let leases = Alias::new("redstream_leases");
    let insert = Query::insert()
        .into_table(leases.clone())
        .columns([col("name"), col("holder"), col("expires_at")])
        .values([LEASE.into(), token.into(), expires.into()])
        .map_err(|e| Error::InvalidEvent {
            reason: e.to_string(),
        })?
        .on_conflict(OnConflict::column(col("name")).do_nothing().to_owned())
        .to_owned();
    if db.execute(&insert).await?.rows_affected() == 1 {
        return Ok(true);
    }
    let update = Query::update()
        .table(leases)
        .value(col("holder"), token)
        .value(col("expires_at"), expires)
        .and_where(Expr::col(col("name")).eq(LEASE))
        .and_where(
            Expr::col(col("holder"))
                .eq(token)
                .or(Expr::col(col("expires_at")).lt(now)),
        )
        .to_owned();
    Ok(db.execute(&update).await?.rows_affected() == 1)
}

async fn release_lease(store: &Store, token: &str) -> Result<()> {
    let delete = Query::delete()
        .from_table(Alias::new("redstream_leases"))
        .and_where(Expr::col(col("name")).eq(LEASE))
        .and_where(Expr::col(col("holder")).eq(token))
        .to_owned();
    store.connection().execute(&delete).await?;
    Ok(())
}

/// One unsent row.
struct Row {
    id: i64,
    stream: String,
    event: Event,
}

/// Publishes up to `batch` unsent rows in order and marks them. Stops at
/// the first row that fails transiently (order is kept); rows that can
/// never be published (too large, invalid) are marked `refused: …`.
/// Returns how many rows were handled.
async fn pass(store: &Store, producer: &Producer, batch: usize) -> Result<usize> {
    let select = Query::select()
        .columns([
            col("id"),
            col("stream"),
            col("event_id"),
            col("event_type"),
            col("version"),
            col("data"),
            col("event_key"),
            col("headers"),
            col("traceparent"),
        ])
        .from(table())
        .and_where(Expr::col(col("sent_at")).is_null())
        .order_by(col("id"), Order::Asc)
        .limit(batch as u64)
        .to_owned();
    let mut rows = Vec::new();
    for r in store.connection().query_all(&select).await? {
        let headers: Option<String> = r.try_get("", "headers")?;
        let mut event = Event::from_json(
            r.try_get::<String>("", "event_type")?,
            r.try_get::<String>("", "data")?.into_bytes(),
        )
        .with_id(r.try_get::<String>("", "event_id")?)
        .with_version(u32::try_from(r.try_get::<i32>("", "version")?).unwrap_or(1));
        if let Some(key) = r.try_get::<Option<String>>("", "event_key")? {
            event = event.with_key(key);
        }
        if let Some(tp) = r.try_get::<Option<String>>("", "traceparent")? {
            event = event.with_traceparent(tp);
        }
        if let Some(h) = headers {
            let map: HashMap<String, String> = serde_json::from_str(&h).unwrap_or_default();
            let mut pairs: Vec<_> = map.into_iter().collect();
            pairs.sort();
            for (k, v) in pairs {
                event = event.with_header(k, v);
            }
        }
        rows.push(Row {
            id: r.try_get("", "id")?,
            stream: r.try_get("", "stream")?,
            event,
        });
    }
    let total = rows.len();
    let mut marks: Vec<(i64, String)> = Vec::with_capacity(total);
    let mut blocked = None;
    let mut rows = rows.into_iter().peekable();
    'runs: while let Some(first) = rows.next() {
        // A run of consecutive rows for one stream is one publish call.
        let stream = first.stream.clone();
        let mut run = vec![first];
        while rows.peek().is_some_and(|r| r.stream == stream) {
            if let Some(r) = rows.next() {
                run.push(r);
            }
        }
        let ids: Vec<i64> = run.iter().map(|r| r.id).collect();
        let events = run.into_iter().map(|r| r.event).collect();
        let results = producer.publish_batch(&stream, events).await?;
        for (id, result) in ids.into_iter().zip(results) {
            match result {
                Ok(published) => marks.push((id, published.entry_id)),
                Err(e @ (Error::PayloadTooLarge { .. } | Error::InvalidEvent { .. })) => {
                    tracing::error!(outbox_id = id, stream = %stream, "outbox row can never be published: {e}; marked refused");
                    marks.push((id, format!("refused: {e}")));
                }
                Err(e) => {
                    blocked = Some(e);
                    break 'runs;
                }
            }
        }
    }
    crate::failpoints::crash_point!("outbox.after_xadd_before_mark");
    mark_sent(store, &marks).await?;
    match blocked {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

async fn mark_sent(store: &Store, marks: &[(i64, String)]) -> Result<()> {
    if marks.is_empty() {
        return Ok(());
    }
    let now = now_ms() as i64;
    let tx = store.connection().begin().await?;
    for (id, entry_id) in marks {
        let update = Query::update()
            .table(table())
            .value(col("sent_at"), now)
            .value(col("entry_id"), entry_id.as_str())
            .and_where(Expr::col(col("id")).eq(*id))
            .to_owned();
        tx.execute(&update).await?;
    }
    tx.commit().await?;
    Ok(())
}

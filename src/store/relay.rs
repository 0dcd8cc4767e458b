//! The outbox relay: the actor that publishes the outbox's committed rows.
//!
//! The relay publishes rows in `id` order through the producer, keeping
//! each row's event id, then marks them sent. One process relays a
//! database's outbox at a time (a lease in `redstream_leases`). On
//! PostgreSQL, `LISTEN`/`NOTIFY` wakes the relay at the commit of a
//! transaction that enqueued; otherwise it polls every `outbox.poll_ms`.
//!
//! Duplicates are bounded. Rows that were published but could not be marked
//! (the database refuses writes) are kept in memory and marked before
//! anything else is published, so a database outage republishes nothing;
//! failed rounds back off from 100 ms to 5 s. A row is published twice only
//! when the relay that published it stops (a crash, or a stop during an
//! outage) or loses its lease before the mark lands: at most one batch
//! (`outbox.batch_size` rows) per such change of relay. Consumers with
//! exactly-once handlers absorb those duplicates by event id.
//!
//! The lease compares no clocks across processes: the holder raises its
//! version at every renewal, and another process takes it over only after
//! seeing one version for a whole `outbox.lease_ttl_ms` on its own
//! monotonic clock. Marks are fenced by the lease: a relay that lost it
//! marks nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, DbBackend};
use tokio::sync::{Notify, watch};

use super::Store;
use super::outbox::{CHANNEL, col, table};
use crate::clock::{Backoff, now_ms};
use crate::error::{Error, Result};
use crate::failpoints::db_fault;
use crate::producer::{Producer, new_event_id};
use crate::settings::IdFormat;
use crate::wire::Event;

/// The lease name of the relay.
const LEASE: &str = "outbox-relay";

/// How the relay works.
#[derive(Clone, Debug)]
pub(crate) struct RelayOptions {
    pub(crate) poll: Duration,
    pub(crate) batch: usize,
    pub(crate) lease_ttl: Duration,
}

/// Stop relaying after a last pass, which ends by `deadline` whatever the
/// database does (Processor → relay).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopRelay {
    pub(crate) deadline: Instant,
}

/// The outbox relay actor: owns the relay loop and its stop signal.
pub(crate) struct OutboxRelay {
    parts: Option<(Store, Producer, RelayOptions)>,
    stop: watch::Sender<Option<Instant>>,
    done: watch::Receiver<bool>,
    done_tx: Option<watch::Sender<bool>>,
}

impl OutboxRelay {
    pub(crate) fn new(store: Store, producer: Producer, options: RelayOptions) -> Self {
        let (stop, _) = watch::channel(None);
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
            relay_loop(Relay::new(store, producer, options), stop)
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

    fn handle(&mut self, msg: StopRelay, _ctx: &mut Self::Context) -> Self::Result {
        let _ = self.stop.send(Some(msg.deadline));
        let mut done = self.done.clone();
        Box::pin(async move {
            let _ = done.wait_for(|d| *d).await;
        })
    }
}

/// The longest wait between failed rounds (less when a third of the lease's
/// lifetime is shorter).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Relays until stopped, then makes one last round, bounded by the stop's
/// deadline.
async fn relay_loop(mut relay: Relay, mut stop: watch::Receiver<Option<Instant>>) {
    let wake = Arc::new(Notify::new());
    let listener = (relay.store.backend() == DbBackend::Postgres)
        .then(|| actix_rt::spawn(listen(relay.store.clone(), Arc::clone(&wake))));
    // Failed rounds back off, but never past a third of the lease's
    // lifetime, so the lease is renewed in time while the database refuses
    // marks.
    let max_backoff = MAX_BACKOFF
        .min(relay.options.lease_ttl / 3)
        .max(Duration::from_millis(100));
    let mut backoff = Backoff::new(Duration::from_millis(100), max_backoff);
    loop {
        let deadline = *stop.borrow();
        let result = match deadline {
            None => relay.round().await,
            Some(at) => tokio::time::timeout_at(at.into(), relay.round())
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Timeout {
                        operation: "the outbox relay's last round",
                        after: Duration::ZERO,
                    })
                }),
        };
        let wait = match result {
            Ok(more) => {
                backoff.reset();
                relay.recovered();
                (!more).then_some(relay.options.poll)
            }
            Err(e) => {
                relay.failed(&e);
                Some(backoff.next_delay())
            }
        };
        if deadline.is_some() {
            break;
        }
        let Some(wait) = wait else { continue };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
    if !relay.unmarked.is_empty() {
        tracing::warn!(
            rows = relay.unmarked.len(),
            "the outbox relay stops with published rows it could not mark sent; the next relay publishes them again"
        );
    }
    let release_for = stop
        .borrow()
        .map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        })
        .max(Duration::from_millis(500));
    let _ = tokio::time::timeout(release_for, relay.release()).await;
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

/// The relay lease as this process holds it.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// When the last renewal that succeeded was sent (monotonic).
    renewed_at: Instant,
}

/// Another process's lease, as this process watches it.
#[derive(Clone, Debug, PartialEq)]
struct Watched {
    holder: String,
    version: i64,
    /// When this process first saw that version (monotonic).
    since: Instant,
}

/// The relay: its lease, and the rows it published but could not mark sent.
///
/// The lease decides with one clock only, the monotonic clock of the
/// process deciding: the holder raises the lease's version at every renewal
/// (every third of `outbox.lease_ttl_ms`); a contender takes the lease over
/// only after seeing the same version for a whole lifetime on its own
/// clock, and the holder relays only while its last renewal is less than
/// two thirds of a lifetime old. Wall clocks, which step and differ between
/// hosts, decide nothing (`expires_at` is written for people to read).
///
/// Marks are fenced: the rows are marked in a transaction that first checks
/// that this process still holds the lease, so a relay that lost it marks
/// nothing.
struct Relay {
    store: Store,
    producer: Producer,
    options: RelayOptions,
    /// This relay's holder name: a fresh id per relay, its fencing token.
    token: String,
    held: Option<Held>,
    watched: Option<Watched>,
    /// Rows published and not yet marked sent, with their entry ids. They
    /// are marked before anything else is published, so a database that
    /// cannot take the marks causes no republishing.
    unmarked: Vec<(i64, String)>,
    /// Whether the last round failed (for one log line per episode).
    failing: bool,
}

impl Relay {
    fn new(store: Store, producer: Producer, options: RelayOptions) -> Self {
        Relay {
            store,
            producer,
            options,
            token: new_event_id(IdFormat::Ulid),
            held: None,
            watched: None,
            unmarked: Vec::new(),
            failing: false,
        }
    }

    /// One round: mark what is left to mark, keep the lease, publish a batch
    /// and mark it. `Ok(true)` when a full batch went out (more may wait).
    async fn round(&mut self) -> Result<bool> {
        // The lease first, even with rows left to mark: a relay that cannot
        // mark must still renew, or another process takes the lease over
        // and publishes the same rows again.
        let leased = self.keep_lease().await?;
        // Fenced: if another relay holds the lease now, nothing is marked
        // and the rows are left to it.
        if !self.unmarked.is_empty() && !self.mark().await? {
            return Ok(false);
        }
        if !leased {
            return Ok(false);
        }
        let relayed = self.publish().await?;
        Ok(relayed == self.options.batch)
    }

    /// Marks `unmarked` sent, fenced by the lease. `Ok(false)` when the lease
    /// was lost: the rows are left to the new holder, which publishes them
    /// again (at most one batch of duplicates per change of relay).
    async fn mark(&mut self) -> Result<bool> {
        if mark_sent(&self.store, &self.token, &self.unmarked).await? {
            self.unmarked.clear();
            return Ok(true);
        }
        tracing::warn!(
            rows = self.unmarked.len(),
            "the outbox relay lost its lease before marking published rows sent; the new relay publishes them again"
        );
        self.unmarked.clear();
        self.held = None;
        Ok(false)
    }

    /// Takes, renews or watches the lease. `Ok(true)` while this process
    /// may relay.
    async fn keep_lease(&mut self) -> Result<bool> {
        let ttl = self.options.lease_ttl;
        let asked_at = Instant::now();
        if let Some(held) = self.held {
            if held.renewed_at.elapsed() < ttl / 3 {
                return Ok(true);
            }
            match renew_lease(&self.store, &self.token, ttl).await {
                Ok(true) => {
                    self.held = Some(Held {
                        renewed_at: asked_at,
                    });
                    return Ok(true);
                }
                Ok(false) => {
                    tracing::warn!("the outbox relay lost its lease to another process");
                    self.held = None;
                    return Ok(false);
                }
                Err(e) => {
                    if held.renewed_at.elapsed() >= ttl * 2 / 3 {
                        // Others may take it over soon: stop relaying.
                        self.held = None;
                    }
                    return Err(e);
                }
            }
        }
        match read_lease(&self.store).await? {
            None => {
                if insert_lease(&self.store, &self.token, ttl).await? {
                    self.took(asked_at);
                }
            }
            Some((holder, _)) if holder == self.token => {
                if renew_lease(&self.store, &self.token, ttl).await? {
                    self.took(asked_at);
                }
            }
            Some((holder, version)) => {
                let stale = self.watched.as_ref().is_some_and(|w| {
                    w.holder == holder && w.version == version && w.since.elapsed() >= ttl
                });
                if stale {
                    if take_over_lease(&self.store, &self.token, &holder, version, ttl).await? {
                        tracing::info!(
                            previous = %holder,
                            "the outbox relay took over a lease not renewed for {ttl:?}"
                        );
                        self.took(asked_at);
                    }
                } else if self
                    .watched
                    .as_ref()
                    .is_none_or(|w| w.holder != holder || w.version != version)
                {
                    self.watched = Some(Watched {
                        holder,
                        version,
                        since: asked_at,
                    });
                }
            }
        }
        Ok(self.held.is_some())
    }

    fn took(&mut self, at: Instant) {
        self.held = Some(Held { renewed_at: at });
        self.watched = None;
    }

    /// Publishes up to a batch of unsent rows and marks them.
    async fn publish(&mut self) -> Result<usize> {
        let (total, blocked) = pass(
            &self.store,
            &self.producer,
            self.options.batch,
            &mut self.unmarked,
        )
        .await?;
        if !self.unmarked.is_empty() {
            // Only a round that published something counts as a hit: an
            // idle poll has nothing to republish after the crash.
            crate::failpoints::crash_point!("outbox.after_xadd_before_mark");
            self.mark().await?;
        }
        match blocked {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    fn failed(&mut self, e: &Error) {
        match e {
            Error::Database(_) => self.store.write_failed("the outbox relay", &e.to_string()),
            _ if !self.failing => tracing::warn!("outbox relay: {e}; trying again with a backoff"),
            _ => tracing::debug!("outbox relay: {e}; trying again"),
        }
        self.failing = true;
    }

    fn recovered(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!("the outbox relay runs again");
        }
    }

    /// Gives the lease up, so another process can relay at once.
    async fn release(&self) -> Result<()> {
        if self.held.is_none() {
            return Ok(());
        }
        let delete = Query::delete()
            .from_table(leases())
            .and_where(Expr::col(col("name")).eq(LEASE))
            .and_where(Expr::col(col("holder")).eq(self.token.as_str()))
            .to_owned();
        self.store.connection().execute(&delete).await?;
        Ok(())
    }
}

fn leases() -> Alias {
    Alias::new("redstream_leases")
}

/// The expiry written for people to read (`redstream` CLI, SQL): the
/// holder's wall clock plus the lifetime. No decision reads it.
fn shown_expiry(ttl: Duration) -> i64 {
    (now_ms() + ttl.as_millis() as u64) as i64
}

/// The lease's holder and version, if someone holds it.
async fn read_lease(store: &Store) -> Result<Option<(String, i64)>> {
    db_fault!("outbox.lease", store.connection())?;
    let select = Query::select()
        .columns([col("holder"), col("version")])
        .from(leases())
        .and_where(Expr::col(col("name")).eq(LEASE))
        .to_owned();
    let row = store.connection().query_one(&select).await?;
    Ok(match row {
        Some(r) => Some((r.try_get("", "holder")?, r.try_get("", "version")?)),
        None => None,
    })
}

/// Takes a lease that nobody holds.
async fn insert_lease(store: &Store, token: &str, ttl: Duration) -> Result<bool> {
    let insert = Query::insert()
        .into_table(leases())
        .columns([
            col("name"),
            col("holder"),
            col("expires_at"),
            col("version"),
        ])
        .values([
            LEASE.into(),
            token.into(),
            shown_expiry(ttl).into(),
            0i64.into(),
        ])
        .map_err(|e| Error::InvalidEvent {
            reason: e.to_string(),
        })?
        .on_conflict(OnConflict::column(col("name")).do_nothing().to_owned())
        .to_owned();
    Ok(store.connection().execute(&insert).await?.rows_affected() == 1)
}

/// Renews this process's lease: raises its version.
async fn renew_lease(store: &Store, token: &str, ttl: Duration) -> Result<bool> {
    db_fault!("outbox.lease", store.connection())?;
    let update = Query::update()
        .table(leases())
        .value(col("version"), Expr::col(col("version")).add(1))
        .value(col("expires_at"), shown_expiry(ttl))
        .and_where(Expr::col(col("name")).eq(LEASE))
        .and_where(Expr::col(col("holder")).eq(token))
        .to_owned();
    Ok(store.connection().execute(&update).await?.rows_affected() == 1)
}

/// Takes over a lease still at the version this process watched go stale.
async fn take_over_lease(
    store: &Store,
    token: &str,
    holder: &str,
    version: i64,
    ttl: Duration,
) -> Result<bool> {
    let update = Query::update()
        .table(leases())
        .value(col("holder"), token)
        .value(col("version"), version + 1)
        .value(col("expires_at"), shown_expiry(ttl))
        .and_where(Expr::col(col("name")).eq(LEASE))
        .and_where(Expr::col(col("holder")).eq(holder))
        .and_where(Expr::col(col("version")).eq(version))
        .to_owned();
    Ok(store.connection().execute(&update).await?.rows_affected() == 1)
}

/// One unsent row.
struct Row {
    id: i64,
    stream: String,
    event: Event,
}

/// Publishes up to `batch` unsent rows in order, adding each published (or
/// refused) row to `marks`. Stops at the first row that fails transiently
/// (order is kept) and returns its error beside the count; rows that can
/// never be published (too large, invalid) are marked `refused: …`.
async fn pass(
    store: &Store,
    producer: &Producer,
    batch: usize,
    marks: &mut Vec<(i64, String)>,
) -> Result<(usize, Option<Error>)> {
    db_fault!("outbox.select", store.connection())?;
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
            col("tracestate"),
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
        if let Some(ts) = r.try_get::<Option<String>>("", "tracestate")? {
            event = event.with_tracestate(ts);
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
    Ok((total, blocked))
}

/// Marks rows sent, in one transaction that first checks that `token` still
/// holds the relay lease (the fence; on PostgreSQL the check also locks the
/// lease row until the commit, so no takeover lands in between). `Ok(false)`
/// when it does not: nothing is marked.
async fn mark_sent(store: &Store, token: &str, marks: &[(i64, String)]) -> Result<bool> {
    if marks.is_empty() {
        return Ok(true);
    }
    let now = now_ms() as i64;
    let tx = store.begin_write().await?;
    let fence = Query::update()
        .table(leases())
        .value(col("holder"), token)
        .and_where(Expr::col(col("name")).eq(LEASE))
        .and_where(Expr::col(col("holder")).eq(token))
        .to_owned();
    if tx.execute(&fence).await?.rows_affected() != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    for (id, entry_id) in marks {
        let update = Query::update()
            .table(table())
            .value(col("sent_at"), now)
            .value(col("entry_id"), entry_id.as_str())
            .and_where(Expr::col(col("id")).eq(*id))
            .to_owned();
        tx.execute(&update).await?;
    }
    db_fault!("outbox.mark", &tx)?;
    tx.commit().await?;
    store.write_succeeded();
    Ok(true)
}

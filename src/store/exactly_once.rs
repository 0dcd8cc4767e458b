//! Exactly one effect per event: handlers that write through a database
//! transaction, batched.
//!
//! A batch (the entries of one read, up to `database.batch_size`) shares one
//! transaction, whose work runs under a batch savepoint (`SAVEPOINT
//! redstream_batch` right after `BEGIN`). It first runs optimistically, in
//! `n + 5` statements: `BEGIN`; the savepoint; one multi-row insert of every
//! entry's key into `processed_events` (`ON CONFLICT DO NOTHING RETURNING`,
//! so the keys that were already there are the duplicates, acked without
//! running the handler); each new entry's handler on the transaction itself;
//! `RELEASE` of the batch savepoint; `COMMIT`. If any handler does anything
//! but `Ack` (an error, a panic, `Retry`, `DeadLetter`), that run is rolled
//! back and the batch runs again the careful way, where each entry has its
//! own savepoint (`redstream_entry`):
//!
//! 1. `SAVEPOINT`; insert `(group, event id)` into `processed_events`
//!    (`ON CONFLICT DO NOTHING`). A conflict means the effect already
//!    committed: release the savepoint and ack, without running the handler.
//! 2. Run the handler on the transaction (panics caught). `Ack` releases the
//!    savepoint; any other outcome, an error or a panic rolls back to it, so
//!    the entry's writes (and its key) disappear while its batch-mates' stay.
//!    A handler that acked although one of its statements failed (and so
//!    PostgreSQL aborted the transaction) is found out by the `RELEASE`: its
//!    writes are rolled back and the entry counts as failed.
//! 3. Before `COMMIT`, check that this member still owns every entry; if a
//!    heartbeat found one taken over, roll the whole batch back and run it
//!    again without that entry.
//! 4. `COMMIT`; the consumer then reports the outcomes, and the acks follow.
//!
//! **No ack without a commit.** The `RELEASE` of the batch savepoint just
//! before `COMMIT` proves that the transaction is still the one the batch
//! began. SQLite rolls a transaction back by itself after `SQLITE_FULL`, some
//! `IOERR`, `BUSY` and `NOMEM` errors, and later statements then run outside
//! any transaction; PostgreSQL commits an aborted transaction as a rollback,
//! without an error. In both cases the savepoint is gone, the `RELEASE`
//! fails, and nothing is reported as committed. A connection whose
//! transaction state is in doubt afterwards (sqlx still counts a transaction
//! that SQLite ended) is closed when it goes back to the pool, never reused
//! (see `keep_if_settled` in `store`).
//!
//! If `COMMIT` itself is refused for a reason that will not pass (a deferred
//! constraint one entry violates), the batch's entries run again one per
//! transaction, so the culprit fails alone and its batch-mates commit.
//!
//! When the database is unavailable (connection lost, pool timeout, busy or
//! locked, a serialization failure, the disk full, out of memory, an I/O
//! error, or a handler passing such an error up with `?`), the whole batch
//! is rolled back and run again after a backoff (50 ms growing to 5 s). The
//! entries stay in flight meanwhile, so their member stops reading; nothing
//! is acked without a commit, and no entry's retry budget is used. The
//! outage is logged once, when it begins and when it ends, and shows in
//! `Store::outage`, the health check and `redstream_database_available`. A
//! commit whose outcome is unknown is simply run again: the keys it may have
//! committed make the second run a no-op.
//!
//! A run that takes longer than `database.batch_timeout_ms` is abandoned and
//! rolled back, since a connection that lost its peer without a reset (a
//! partition that drops packets) would otherwise hold the batch until TCP
//! gives up. The database is then probed: if it does not answer, that is an
//! outage as above; if it does, the batch itself is slow, and its entries
//! run one by one, where one that alone passes the limit fails like a
//! handler error (and spends an attempt).

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sea_orm::sea_query::{Alias, InsertStatement, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde::de::DeserializeOwned;

use super::{PROBE_TIMEOUT, Store};
use crate::clock::Backoff;
use crate::clock::now_ms;
use crate::error::{Error, Result, db_is_transient, is_transient_db_error};
use crate::failpoints::db_fault;
use crate::handler::Outcome;
use crate::handler::{ErasedHandler, HandlerResult, Meta, RunBatch, Schema, Verdict};

/// A handler whose effects are database writes, made exactly-once.
///
/// It receives a transaction (the batch's, or a savepoint of it) to write
/// through; those writes commit together with the event's key in
/// `processed_events`, or not at all. Return `Ok(Outcome::Ack)` to commit.
/// Side effects outside the transaction (HTTP calls, emails) are not covered:
/// write them to the outbox ([`enqueue`](crate::enqueue)) instead.
///
/// ```no_run
/// use redstream::{HandlerResult, Meta, Outcome, TxHandler};
/// use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
/// use sea_orm::{ConnectionTrait, DatabaseTransaction};
///
/// #[derive(serde::Deserialize)]
/// struct Deposit { account: String, cents: i64 }
///
/// struct Ledger;
///
/// impl TxHandler for Ledger {
///     type Event = Deposit;
///
///     async fn handle(&self, d: Deposit, _meta: &Meta, tx: &DatabaseTransaction) -> HandlerResult {
///         let credit = Query::update()
///             .table(Alias::new("accounts"))
///             .value(Alias::new("balance"), Expr::col(Alias::new("balance")).add(d.cents))
///             .and_where(Expr::col(Alias::new("id")).eq(d.account))
///             .to_owned();
///         tx.execute(&credit).await?;
///         Ok(Outcome::Ack)
///     }
/// }
/// ```
pub trait TxHandler: Send + Sync + 'static {
    /// The payload type, decoded as for [`Handler`](crate::Handler).
    type Event: DeserializeOwned + Send + 'static;

    /// Processes one event, writing through `tx`.
    fn handle(
        &self,
        event: Self::Event,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> impl Future<Output = HandlerResult> + Send;

    /// The schema version this handler reads, and its upcasters.
    fn schema(&self) -> Schema {
        Schema::default()
    }
}

impl<H: TxHandler> TxHandler for Arc<H> {
    type Event = H::Event;

    fn handle(
        &self,
        event: Self::Event,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> impl Future<Output = HandlerResult> + Send {
        H::handle(self, event, meta, tx)
    }

    fn schema(&self) -> Schema {
        H::schema(self)
    }
}

struct TxErased<H: TxHandler> {
    store: Store,
    handler: Arc<H>,
    schema: Arc<Schema>,
}

/// Erases a transactional handler for the consumers: batches of at most
/// `database.batch_size` entries, one transaction each.
pub(crate) fn erase_tx<H: TxHandler>(store: Store, handler: H) -> ErasedHandler {
    let schema = Arc::new(handler.schema());
    let max = store.batch_size();
    ErasedHandler::Batch {
        handler: Arc::new(TxErased {
            store,
            handler: Arc::new(handler),
            schema,
        }),
        max,
    }
}

impl<H: TxHandler> RunBatch for TxErased<H> {
    fn stalled(&self) -> bool {
        self.store.outage().is_some()
    }

    fn run_batch(&self, metas: Vec<Meta>) -> BoxFuture<'static, Vec<Verdict>> {
        let store = self.store.clone();
        let handler = Arc::clone(&self.handler);
        let schema = Arc::clone(&self.schema);
        Box::pin(run_batch(store, handler, schema, metas))
    }
}

/// Why a batch has to be run again.
enum Rerun {
    /// The database is unavailable, or the commit's outcome is unknown.
    Unavailable(String),
    /// An entry was taken over by another member before the commit.
    OwnershipLost,
    /// `COMMIT` was refused for a reason that will not pass (a deferred
    /// constraint, say): one of the entries causes it.
    CommitRefused(String),
    /// The run passed `database.batch_timeout_ms` while the database still
    /// answers: one of the entries is too slow.
    TooSlow(Duration),
    /// The batch savepoint was gone before `COMMIT`: the transaction was
    /// rolled back or aborted under the batch.
    NotInTransaction(String),
}

/// Runs a batch until it commits, retrying while the database is
/// unavailable. Returns one verdict per entry, in order.
async fn run_batch<H: TxHandler>(
    store: Store,
    handler: Arc<H>,
    schema: Arc<Schema>,
    metas: Vec<Meta>,
) -> Vec<Verdict> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        match attempt_within_deadline(&store, handler.as_ref(), &schema, &metas).await {
            Ok(verdicts) => return verdicts,
            Err(Rerun::OwnershipLost) => {}
            Err(Rerun::CommitRefused(error)) if metas.len() == 1 => {
                return vec![Verdict::Failed {
                    error: format!("commit refused: {error}"),
                    panicked: false,
                }];
            }
            Err(Rerun::TooSlow(limit)) if metas.len() == 1 => {
                return vec![Verdict::Failed {
                    error: format!(
                        "the handler's transaction took longer than database.batch_timeout_ms ({} ms)",
                        limit.as_millis()
                    ),
                    panicked: false,
                }];
            }
            Err(Rerun::CommitRefused(error)) => {
                let why = format!("the batch's commit was refused ({error})");
                return one_by_one(store, handler, schema, metas, &why).await;
            }
            Err(Rerun::TooSlow(limit)) => {
                let why = format!(
                    "the batch took longer than database.batch_timeout_ms ({} ms) while the database answers",
                    limit.as_millis()
                );
                return one_by_one(store, handler, schema, metas, &why).await;
            }
            Err(Rerun::Unavailable(error) | Rerun::NotInTransaction(error)) => {
                store.count_retry();
                let delay = backoff.next_delay();
                if let Some(meta) = metas.first() {
                    metrics::counter!(
                        crate::metrics::names::DATABASE_RETRIES,
                        "stream" => meta.stream().to_owned(),
                        "group" => meta.group().to_owned()
                    )
                    .increment(1);
                    // Once per outage as a warning, then at debug level.
                    store.write_failed(
                        &format!(
                            "group {}/{}, member {}: a batch of {} entries is rolled back and runs again in {delay:?}",
                            meta.stream(),
                            meta.group(),
                            meta.member(),
                            metas.len()
                        ),
                        &error,
                    );
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Runs each entry of a batch in a transaction of its own, so that the one
/// that spoils the batch (`why`) fails alone and its batch-mates commit.
async fn one_by_one<H: TxHandler>(
    store: Store,
    handler: Arc<H>,
    schema: Arc<Schema>,
    metas: Vec<Meta>,
    why: &str,
) -> Vec<Verdict> {
    if let Some(meta) = metas.first() {
        tracing::warn!(
            stream = meta.stream(),
            group = meta.group(),
            member = meta.member(),
            "{why}; running its entries one by one",
        );
    }
    let mut verdicts = Vec::with_capacity(metas.len());
    for meta in metas {
        let single = Box::pin(run_batch(
            store.clone(),
            Arc::clone(&handler),
            Arc::clone(&schema),
            vec![meta],
        ));
        verdicts.extend(single.await);
    }
    verdicts
}

/// One run of a batch, abandoned (and so rolled back) if it takes longer than
/// `database.batch_timeout_ms`. A run can hang on a connection that will
/// never answer (a partition that drops packets): the probe then tells a
/// database that does not answer (run again later, no attempt spent) from
/// a batch that is too slow on its own.
async fn attempt_within_deadline<H: TxHandler>(
    store: &Store,
    handler: &H,
    schema: &Schema,
    metas: &[Meta],
) -> std::result::Result<Vec<Verdict>, Rerun> {
    let limit = store.batch_timeout();
    let Ok(result) = tokio::time::timeout(limit, attempt(store, handler, schema, metas)).await
    else {
        let probe_limit = limit.min(PROBE_TIMEOUT);
        return match tokio::time::timeout(probe_limit, store.ping()).await {
            Ok(Ok(())) => Err(Rerun::TooSlow(limit)),
            Ok(Err(e)) => Err(unavailable(format!(
                "the batch timed out after {limit:?} and the database does not answer: {e}"
            ))),
            Err(_) => Err(unavailable(format!(
                "the batch timed out after {limit:?} and the database did not answer within {probe_limit:?}"
            ))),
        };
    };
    result
}

fn unavailable(e: impl std::fmt::Display) -> Rerun {
    Rerun::Unavailable(e.to_string())
}

/// Classifies a database error of the runner's own statements: transient
/// errors rerun the batch; others too, since without a working savepoint the
/// batch cannot go on (they are logged with the batch).
fn db_error(e: sea_orm::DbErr) -> Rerun {
    if !db_is_transient(&e) {
        tracing::error!("database error in an exactly-once batch: {e}");
    }
    unavailable(e)
}

/// The savepoint a batch's work runs under. Its `RELEASE`, just before
/// `COMMIT`, proves that the transaction is still the one the batch began:
/// it fails if SQLite rolled the transaction back by itself (after
/// `SQLITE_FULL`, some `IOERR`, `BUSY` or `NOMEM` errors; later statements
/// then run outside any transaction) or if PostgreSQL aborted it (a
/// statement failed, even one whose error a handler swallowed). Without it,
/// a `COMMIT` could succeed and commit nothing: on PostgreSQL, committing
/// an aborted transaction rolls it back without an error.
const BATCH_SAVEPOINT: &str = "redstream_batch";

/// The savepoint of one entry in a careful run.
const ENTRY_SAVEPOINT: &str = "redstream_entry";

async fn savepoint(tx: &DatabaseTransaction, name: &str) -> Result<(), sea_orm::DbErr> {
    tx.execute_unprepared(&format!("SAVEPOINT {name}"))
        .await
        .map(drop)
}

async fn release(tx: &DatabaseTransaction, name: &str) -> Result<(), sea_orm::DbErr> {
    tx.execute_unprepared(&format!("RELEASE SAVEPOINT {name}"))
        .await
        .map(drop)
}

/// Undoes what ran since the savepoint, and drops it.
async fn roll_back_to(tx: &DatabaseTransaction, name: &str) -> Result<(), sea_orm::DbErr> {
    tx.execute_unprepared(&format!("ROLLBACK TO SAVEPOINT {name}"))
        .await?;
    release(tx, name).await
}

/// Opens the batch's write transaction and its batch savepoint.
async fn begin(store: &Store) -> std::result::Result<DatabaseTransaction, Rerun> {
    db_fault!("db.begin", store.connection()).map_err(db_error)?;
    let tx = store.begin_write().await.map_err(|e| match e {
        Error::Database(db) => db_error(db),
        other => unavailable(other),
    })?;
    savepoint(&tx, BATCH_SAVEPOINT).await.map_err(db_error)?;
    Ok(tx)
}

/// Ends a transaction that failed: a rollback that fails leaves the
/// connection in doubt, and the pool closes it when it comes back (see
/// `keep_if_settled` in `store`).
async fn abandon(tx: DatabaseTransaction) {
    if let Err(e) = tx.rollback().await {
        tracing::debug!("rolling back a failed batch: {e}; its connection is discarded");
    }
}

/// One run of a batch: optimistic first, careful if some entry needs it.
async fn attempt<H: TxHandler>(
    store: &Store,
    handler: &H,
    schema: &Schema,
    metas: &[Meta],
) -> std::result::Result<Vec<Verdict>, Rerun> {
    if metas.len() > 1
        && let Some(verdicts) = optimistic(store, handler, schema, metas).await?
    {
        return Ok(verdicts);
    }
    careful(store, handler, schema, metas).await
}

/// The batch with no savepoint per entry: `None` when an entry did not
/// simply ack, or when the transaction did not survive the run, after
/// rolling everything back.
async fn optimistic<H: TxHandler>(
    store: &Store,
    handler: &H,
    schema: &Schema,
    metas: &[Meta],
) -> std::result::Result<Option<Vec<Verdict>>, Rerun> {
    let tx = begin(store).await?;
    let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(metas.len());
    let mut runnable = Vec::with_capacity(metas.len());
    for (i, meta) in metas.iter().enumerate() {
        match prepare::<H::Event>(schema, meta) {
            Ok(event) => {
                verdicts.push(None);
                runnable.push((i, event));
            }
            Err(verdict) => verdicts.push(Some(verdict)),
        }
    }
    let keyed: Vec<&Meta> = runnable.iter().map(|(i, _)| &metas[*i]).collect();
    db_fault!("db.keys", &tx).map_err(db_error)?;
    let mut new_keys = insert_keys(&tx, &keyed).await.map_err(db_error)?;
    let (mut committed, mut duplicates) = (0, 0);
    for (i, event) in runnable {
        let meta = &metas[i];
        // `remove`: a key twice in one batch runs once.
        if !new_keys.remove(&meta.idempotency_key()) {
            duplicates += 1;
            verdicts[i] = Some(Verdict::Decided(Outcome::Ack));
            continue;
        }
        let result = AssertUnwindSafe(handler.handle(event, meta, &tx))
            .catch_unwind()
            .await;
        match result {
            Ok(Ok(Outcome::Ack)) => {
                committed += 1;
                verdicts[i] = Some(Verdict::Decided(Outcome::Ack));
            }
            Ok(Err(error)) if is_transient_db_error(&error) => {
                abandon(tx).await;
                return Err(unavailable(error));
            }
            _ => {
                tx.rollback().await.map_err(db_error)?;
                return Ok(None);
            }
        }
    }
    let verdicts: Vec<Verdict> = verdicts
        .into_iter()
        .map(|v| v.unwrap_or(Verdict::Lost))
        .collect();
    match finish(store, tx, metas, verdicts, committed, duplicates).await {
        // A handler went on after a statement of its failed: run each entry
        // on its own savepoint, where the one that did fails alone.
        Err(Rerun::NotInTransaction(e)) => {
            tracing::warn!(
                "an exactly-once batch's transaction did not survive its handlers ({e}); running it again with a savepoint per entry"
            );
            Ok(None)
        }
        other => other.map(Some),
    }
}

/// Whether an entry can run: still owned, and decodable.
fn prepare<E: DeserializeOwned>(schema: &Schema, meta: &Meta) -> std::result::Result<E, Verdict> {
    if meta.ensure_owned().is_err() {
        return Err(Verdict::Lost);
    }
    schema
        .decode::<E>(meta.entry())
        .map_err(Verdict::Undecodable)
}

/// Proves the transaction is intact, checks ownership, commits, counts.
async fn finish(
    store: &Store,
    tx: DatabaseTransaction,
    metas: &[Meta],
    verdicts: Vec<Verdict>,
    committed: u64,
    duplicates: u64,
) -> std::result::Result<Vec<Verdict>, Rerun> {
    if let Err(e) = release(&tx, BATCH_SAVEPOINT).await {
        abandon(tx).await;
        return Err(if db_is_transient(&e) {
            unavailable(e)
        } else {
            Rerun::NotInTransaction(e.to_string())
        });
    }
    crate::handler::confirm_stale_ownership(metas).await;
    let lost_while_running = metas
        .iter()
        .zip(&verdicts)
        .any(|(m, v)| m.ensure_owned().is_err() && !matches!(v, Verdict::Lost));
    if lost_while_running {
        // Lost while running: undo everything, run again without it.
        tx.rollback().await.map_err(db_error)?;
        return Err(Rerun::OwnershipLost);
    }
    crate::failpoints::crash_point!("handler.before_commit");
    if let Err(e) = db_fault!("db.commit", &tx) {
        abandon(tx).await;
        return Err(commit_failed(e));
    }
    tx.commit().await.map_err(commit_failed)?;
    crate::failpoints::crash_point!("handler.after_commit_before_ack");
    store.write_succeeded();
    store.count(committed, duplicates);
    if duplicates > 0
        && let Some(meta) = metas.first()
    {
        metrics::counter!(
            crate::metrics::names::DUPLICATES,
            "stream" => meta.stream().to_owned(),
            "group" => meta.group().to_owned()
        )
        .increment(duplicates);
    }
    Ok(verdicts)
}

/// A `COMMIT` that failed. A transient error leaves the outcome unknown:
/// the batch runs again, and the keys it may have committed make that run
/// a no-op. Any other error refuses the commit for a reason that will not
/// pass.
fn commit_failed(e: sea_orm::DbErr) -> Rerun {
    if db_is_transient(&e) {
        unavailable(format!("the commit's outcome is unknown: {e}"))
    } else {
        Rerun::CommitRefused(e.to_string())
    }
}

/// The batch with a savepoint per entry, so that one entry's failure undoes
/// only its own writes.
async fn careful<H: TxHandler>(
    store: &Store,
    handler: &H,
    schema: &Schema,
    metas: &[Meta],
) -> std::result::Result<Vec<Verdict>, Rerun> {
    let tx = begin(store).await?;
    let mut verdicts = Vec::with_capacity(metas.len());
    let (mut committed, mut duplicates) = (0, 0);
    for meta in metas {
        let event = match prepare::<H::Event>(schema, meta) {
            Ok(event) => event,
            Err(verdict) => {
                verdicts.push(verdict);
                continue;
            }
        };
        db_fault!("db.savepoint", &tx).map_err(db_error)?;
        savepoint(&tx, ENTRY_SAVEPOINT).await.map_err(db_error)?;
        db_fault!("db.keys", &tx).map_err(db_error)?;
        if !insert_key(&tx, meta).await.map_err(db_error)? {
            db_fault!("db.release", &tx).map_err(db_error)?;
            release(&tx, ENTRY_SAVEPOINT).await.map_err(db_error)?;
            duplicates += 1;
            verdicts.push(Verdict::Decided(Outcome::Ack));
            continue;
        }
        let result = AssertUnwindSafe(handler.handle(event, meta, &tx))
            .catch_unwind()
            .await;
        let verdict = match result {
            Ok(Ok(Outcome::Ack)) => match keep_entry(&tx).await {
                Ok(()) => {
                    committed += 1;
                    verdicts.push(Verdict::Decided(Outcome::Ack));
                    continue;
                }
                Err(e) if db_is_transient(&e) => return Err(unavailable(e)),
                // On PostgreSQL, a statement of the handler failed and the
                // handler acked anyway: its writes are not all there.
                Err(e) => Verdict::Failed {
                    error: format!("the handler returned Ack, but its transaction had failed: {e}"),
                    panicked: false,
                },
            },
            Ok(Ok(outcome)) => Verdict::Decided(outcome),
            Ok(Err(error)) if is_transient_db_error(&error) => return Err(unavailable(error)),
            Ok(Err(error)) => Verdict::failed(error),
            Err(payload) => Verdict::panicked(payload.as_ref()),
        };
        // If even this fails, the transaction is gone (SQLite rolled it back
        // by itself): the whole batch runs again.
        roll_back_to(&tx, ENTRY_SAVEPOINT).await.map_err(db_error)?;
        verdicts.push(verdict);
    }
    finish(store, tx, metas, verdicts, committed, duplicates)
        .await
        .map_err(|rerun| match rerun {
            Rerun::NotInTransaction(e) => {
                unavailable(format!("the transaction did not survive the batch: {e}"))
            }
            other => other,
        })
}

/// Keeps an acked entry's writes: releases its savepoint.
async fn keep_entry(tx: &DatabaseTransaction) -> Result<(), sea_orm::DbErr> {
    db_fault!("db.release", tx)?;
    release(tx, ENTRY_SAVEPOINT).await
}

/// The insert of entries' keys into `processed_events`, skipping keys that
/// are there already.
fn keys_insert(metas: &[&Meta]) -> Result<InsertStatement, sea_orm::DbErr> {
    let mut insert = Query::insert();
    insert.into_table(Alias::new("processed_events")).columns([
        Alias::new("group_name"),
        Alias::new("event_id"),
        Alias::new("stream"),
        Alias::new("entry_id"),
        Alias::new("processed_at"),
    ]);
    let now = now_ms() as i64;
    let mut seen = HashSet::with_capacity(metas.len());
    for meta in metas {
        let key = meta.idempotency_key();
        if !seen.insert(key.clone()) {
            continue;
        }
        insert
            .values([
                meta.group().into(),
                key.into(),
                meta.stream().into(),
                meta.entry_id().into(),
                now.into(),
            ])
            .map_err(|e| sea_orm::DbErr::Custom(e.to_string()))?;
    }
    insert.on_conflict(
        OnConflict::columns([Alias::new("group_name"), Alias::new("event_id")])
            .do_nothing()
            .to_owned(),
    );
    Ok(insert)
}

/// Inserts one event's key; false if it was already there.
async fn insert_key(tx: &DatabaseTransaction, meta: &Meta) -> Result<bool, sea_orm::DbErr> {
    let result = tx.execute(&keys_insert(&[meta])?).await?;
    Ok(result.rows_affected() == 1)
}

/// Inserts many keys in one statement; returns those that were new.
async fn insert_keys(
    tx: &DatabaseTransaction,
    metas: &[&Meta],
) -> Result<HashSet<String>, sea_orm::DbErr> {
    if metas.is_empty() {
        return Ok(HashSet::new());
    }
    let mut insert = keys_insert(metas)?;
    insert.returning_col(Alias::new("event_id"));
    let rows = tx.query_all(&insert).await?;
    rows.iter()
        .map(|row| row.try_get::<String>("", "event_id"))
        .collect()
}

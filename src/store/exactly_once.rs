//! Exactly one effect per event: handlers that write through a database
//! transaction, batched.
//!
//! A batch (the entries of one read, up to `database.batch_size`) shares one
//! transaction. It first runs optimistically, in `n + 3` statements:
//! `BEGIN`; one multi-row insert of every entry's key into
//! `processed_events` (`ON CONFLICT DO NOTHING RETURNING`, so the keys that
//! were already there are the duplicates, acked without running the
//! handler); each new entry's handler on the transaction itself; `COMMIT`.
//! If any handler does anything but `Ack` (an error, a panic, `Retry`,
//! `DeadLetter`), that run is rolled back and the batch runs again the
//! careful way, where each entry has its own savepoint:
//!
//! 1. `SAVEPOINT`; insert `(group, event id)` into `processed_events`
//!    (`ON CONFLICT DO NOTHING`). A conflict means the effect already
//!    committed: release the savepoint and ack, without running the handler.
//! 2. Run the handler with the savepoint as its transaction (panics caught).
//!    `Ack` releases the savepoint; any other outcome, an error or a panic
//!    rolls back to it, so the entry's writes (and its key) disappear while
//!    its batch-mates' stay.
//! 3. Before `COMMIT`, check that this member still owns every entry; if a
//!    heartbeat found one taken over, roll the whole batch back and run it
//!    again without that entry.
//! 4. `COMMIT`; the consumer then reports the outcomes, and the acks follow.
//!
//! If `COMMIT` itself is refused for a reason that will not pass (a deferred
//! constraint one entry violates), the batch's entries run again one per
//! transaction, so the culprit fails alone and its batch-mates commit.
//!
//! When the database is unavailable (connection lost, pool timeout, SQLite
//! busy, a serialization failure, or a handler passing such an error up with
//! `?`), the whole batch is rolled back and run again after a backoff. The
//! entries stay in flight meanwhile, so their member stops reading; nothing
//! is acked without a commit, and no entry's retry budget is used. A commit
//! whose outcome is unknown is simply run again: the keys it may have
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
use sea_orm::{ConnectionTrait, DatabaseTransaction, TransactionTrait};
use serde::de::DeserializeOwned;

use super::{PROBE_TIMEOUT, Store};
use crate::entry::{DecodeError, now_ms};
use crate::error::{Error, Result, db_is_transient, is_transient_db_error};
use crate::handler::{DynHandler, HandlerResult, Meta, Schema, Verdict, panic_message};
use crate::outcome::{Backoff, Outcome};

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

/// Erases a transactional handler for the consumers.
pub(crate) fn erase_tx<H: TxHandler>(store: Store, handler: H) -> Arc<dyn DynHandler> {
    let schema = Arc::new(handler.schema());
    Arc::new(TxErased {
        store,
        handler: Arc::new(handler),
        schema,
    })
}

impl<H: TxHandler> DynHandler for TxErased<H> {
    fn start(
        &self,
        meta: Meta,
    ) -> std::result::Result<BoxFuture<'static, HandlerResult>, DecodeError> {
        self.schema.decode::<H::Event>(meta.entry())?;
        let run = self.run_batch(vec![meta]);
        Ok(Box::pin(async move {
            match run.await.pop() {
                Some(Verdict::Decided(outcome)) => Ok(outcome),
                Some(Verdict::Failed { error, .. }) => Err(error.into()),
                Some(other) => Err(format!("not handled: {other:?}").into()),
                None => Err("not handled".into()),
            }
        }))
    }

    fn batch_size(&self) -> Option<usize> {
        Some(self.store.batch_size())
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
            Err(Rerun::Unavailable(error)) => {
                store.count_retry();
                if let Some(meta) = metas.first() {
                    metrics::counter!(
                        crate::metrics::names::DATABASE_RETRIES,
                        "stream" => meta.stream().to_owned(),
                        "group" => meta.group().to_owned()
                    )
                    .increment(1);
                }
                let delay = backoff.next_delay();
                if let Some(meta) = metas.first() {
                    tracing::warn!(
                        stream = meta.stream(),
                        group = meta.group(),
                        member = meta.member(),
                        entries = metas.len(),
                        "database unavailable ({error}); the batch is rolled back and runs again in {delay:?}",
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

/// Opens the batch's write transaction.
async fn begin(store: &Store) -> std::result::Result<DatabaseTransaction, Rerun> {
    store.begin_write().await.map_err(|e| match e {
        Error::Database(db) => db_error(db),
        other => unavailable(other),
    })
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

/// The batch with no savepoints: `None` when an entry did not simply ack,
/// after rolling everything back.
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
                let _ = tx.rollback().await;
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
    finish(store, tx, metas, verdicts, committed, duplicates)
        .await
        .map(Some)
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

/// Checks ownership, commits, counts.
async fn finish(
    store: &Store,
    tx: DatabaseTransaction,
    metas: &[Meta],
    verdicts: Vec<Verdict>,
    committed: u64,
    duplicates: u64,
) -> std::result::Result<Vec<Verdict>, Rerun> {
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
    tx.commit().await.map_err(|e| {
        if db_is_transient(&e) {
            unavailable(e)
        } else {
            Rerun::CommitRefused(e.to_string())
        }
    })?;
    crate::failpoints::crash_point!("handler.after_commit_before_ack");
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
        let savepoint = tx.begin().await.map_err(db_error)?;
        if !insert_key(&savepoint, meta).await.map_err(db_error)? {
            savepoint.commit().await.map_err(db_error)?;
            duplicates += 1;
            verdicts.push(Verdict::Decided(Outcome::Ack));
            continue;
        }
        let result = AssertUnwindSafe(handler.handle(event, meta, &savepoint))
            .catch_unwind()
            .await;
        let verdict = match result {
            Ok(Ok(Outcome::Ack)) => {
                savepoint.commit().await.map_err(db_error)?;
                committed += 1;
                verdicts.push(Verdict::Decided(Outcome::Ack));
                continue;
            }
            Ok(Ok(outcome)) => Verdict::Decided(outcome),
            Ok(Err(error)) if is_transient_db_error(&error) => return Err(unavailable(error)),
            Ok(Err(error)) => Verdict::Failed {
                error: error.to_string(),
                panicked: false,
            },
            Err(payload) => Verdict::Failed {
                error: format!("panic: {}", panic_message(payload.as_ref())),
                panicked: true,
            },
        };
        savepoint.rollback().await.map_err(db_error)?;
        verdicts.push(verdict);
    }
    finish(store, tx, metas, verdicts, committed, duplicates).await
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

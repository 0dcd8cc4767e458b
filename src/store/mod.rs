//! The database side, on sea-orm: exactly one effect per event, and the
//! transactional outbox.
//!
//! Delivery from Redis is at-least-once. A [`TxHandler`] makes the *effect*
//! exactly-once: its writes and the insert of the event's key into
//! `processed_events` (keyed by group and event id) commit in one
//! transaction, and the entry is acked only after the commit. A redelivered
//! event finds its key and is acked without running the handler again.
//!
//! The outbox closes the other side: [`enqueue`] writes an event into the
//! `outbox` table inside the application's own transaction, and the outbox
//! relay (started by [`ProcessorBuilder::outbox`](crate::ProcessorBuilder::outbox))
//! publishes unsent rows in order and marks them sent. No event is lost
//! between a database write and a publish.
//!
//! SQLite (a file, no server; the default) runs in WAL mode with a busy
//! timeout and `synchronous = FULL`, so a commit that the ack follows is on
//! disk. PostgreSQL is chosen by a `postgres://` URL. Migrations
//! (`redstream-migrations`) run at connect, under a lock, with their own
//! bookkeeping table, so the store can share the application's database;
//! with `database.migrate = false` (a role without DDL rights) connect only
//! checks that they were applied.

mod exactly_once;
mod outbox;
mod relay;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redstream_migrations::MigratorTrait;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, TransactionTrait,
};

pub use self::exactly_once::TxHandler;
pub(crate) use self::exactly_once::erase_tx;
pub use self::outbox::enqueue;
pub(crate) use self::relay::{OutboxRelay, RelayOptions, StopRelay};
use crate::clock::millis;
use crate::error::{Error, Result};
use crate::settings::DatabaseSettings;

/// A lock id for migrations (PostgreSQL advisory lock): "redstrm" in ASCII.
const MIGRATION_LOCK_ID: i64 = 0x0072_6564_7374_726d;

/// Counts of what the store did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Events whose effect committed.
    pub committed: u64,
    /// Redelivered events that found their key and were acked without a
    /// second effect.
    pub duplicates: u64,
    /// Batches rolled back and retried because the database was unavailable.
    pub retried_batches: u64,
}

#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    duplicates: AtomicU64,
    retried_batches: AtomicU64,
}

/// An episode in which the database refuses writes (unreachable, disk full,
/// locked, out of memory): from the first failed write to the next one that
/// succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatabaseOutage {
    /// How long writes have been failing.
    pub for_ms: u64,
    /// The last error seen.
    pub last_error: String,
    /// Writes that failed in this episode (batches rerun, relay passes
    /// put off).
    pub failures: u64,
}

struct Outage {
    since: std::time::Instant,
    last_error: String,
    failures: u64,
}

struct Inner {
    db: DatabaseConnection,
    backend: DbBackend,
    counters: Counters,
    batch_size: usize,
    /// Longest a batch's transaction may take (`database.batch_timeout_ms`).
    batch_timeout: Duration,
    /// The URL without its password, for lease keys and logs.
    shown_url: String,
    /// The current outage, if writes are failing.
    outage: std::sync::Mutex<Option<Outage>>,
}

/// Longest the database may take to answer a probe: after a batch timed out,
/// and when a PostgreSQL connection goes back to the pool.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long start-up waits for a busy or unreachable database (to connect
/// and run the migrations).
const START_PATIENCE: Duration = Duration::from_secs(30);

/// Runs a start-up step again, with a backoff, while the database is busy
/// (SQLite's write lock held by another process) or unreachable, for up to
/// `START_PATIENCE`.
async fn patiently<T, E, F, Fut>(step: &str, mut run: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
    E: Into<Error>,
{
    let started = std::time::Instant::now();
    let mut backoff = crate::clock::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        match run().await.map_err(Into::into) {
            Err(Error::Database(e))
                if crate::error::db_may_recover(&e) && started.elapsed() < START_PATIENCE =>
            {
                let delay = backoff.next_delay();
                tracing::warn!(
                    "{step}: the database is busy or unavailable ({e}); trying again in {delay:?}"
                );
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

/// A migration refused for want of rights becomes an error naming
/// `database.migrate`, the setting for roles without DDL rights.
fn refused_ddl(e: Error) -> Error {
    match &e {
        Error::Database(db) => {
            let text = db.to_string();
            if text.contains("permission denied") || text.contains("must be owner") {
                Error::settings(
                    "database.migrate",
                    format!(
                        "the migrations were refused ({text}): this role may not create tables; run them once as a role that may, and set database.migrate = false for this one"
                    ),
                )
            } else {
                e
            }
        }
        _ => e,
    }
}

/// A database connection pool with redstream's tables migrated.
///
/// ```no_run
/// # async fn demo() -> redstream::Result<()> {
/// use redstream::{Settings, Store};
///
/// let settings = Settings::load()?;
/// let store = Store::connect(&settings.database).await?; // runs the migrations
/// let db = store.connection(); // a sea-orm DatabaseConnection for your own queries
/// # let _ = db;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.inner.shown_url)
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects (SQLite: WAL, busy timeout, `synchronous = FULL`) and runs
    /// the migrations, or with `database.migrate = false` checks that they
    /// were applied.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self> {
        let mut options = ConnectOptions::new(settings.url.expose().to_owned());
        options
            .max_connections(settings.max_connections)
            .min_connections(1)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            .sqlx_logging(false);
        if settings.url.is_sqlite() {
            options.map_sqlx_sqlite_pool_opts(|o| {
                o.after_release(keep_if_settled::<sea_orm::sqlx::Sqlite>)
                    .before_acquire(|conn, _| {
                        Box::pin(
                            async move { Ok(outside_transaction::<sea_orm::sqlx::Sqlite>(conn)) },
                        )
                    })
            });
        } else {
            options.map_sqlx_postgres_pool_opts(|o| {
                o.after_release(keep_if_settled::<sea_orm::sqlx::Postgres>)
                    .before_acquire(|conn, _| {
                        Box::pin(
                            async move { Ok(outside_transaction::<sea_orm::sqlx::Postgres>(conn)) },
                        )
                    })
            });
        }
        if settings.url.is_sqlite() {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            let busy = Duration::from_millis(settings.busy_timeout_ms);
            options.map_sqlx_sqlite_opts(move |o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(busy)
                    .foreign_keys(true)
            });
        }
        let db = patiently("connecting", || Database::connect(options.clone())).await?;
        let store = Self::wrap(
            db,
            settings.batch_size,
            Duration::from_millis(settings.batch_timeout_ms),
            settings.url.to_string(),
        );
        if settings.migrate {
            store.migrate().await.map_err(refused_ddl)?;
        } else {
            store.check_migrated().await?;
        }
        Ok(store)
    }

    /// Wraps an existing connection pool (for example the application's)
    /// and runs the migrations on it. Batches get the default
    /// `database.batch_timeout_ms` (30 s).
    ///
    /// The pool keeps its own options: prefer [`Store::connect`], whose pool
    /// closes a connection whose transaction state is in doubt instead of
    /// reusing it. Batches still never ack without a commit on such a pool,
    /// but one bad connection can stall them until it is recycled.
    pub async fn from_connection(
        db: DatabaseConnection,
        batch_size: usize,
        shown_url: String,
    ) -> Result<Self> {
        let batch_timeout = Duration::from_millis(DatabaseSettings::default().batch_timeout_ms);
        let store = Self::wrap(db, batch_size, batch_timeout, shown_url);
        store.migrate().await?;
        Ok(store)
    }

    fn wrap(
        db: DatabaseConnection,
        batch_size: usize,
        batch_timeout: Duration,
        shown_url: String,
    ) -> Self {
        let backend = db.get_database_backend();
        Store {
            inner: Arc::new(Inner {
                db,
                backend,
                counters: Counters::default(),
                batch_size: batch_size.max(1),
                batch_timeout,
                shown_url,
                outage: std::sync::Mutex::new(None),
            }),
        }
    }

    /// Runs redstream's migrations, one process at a time (a PostgreSQL
    /// advisory lock, or SQLite's write lock). A database that is busy (a
    /// writer of another process holding SQLite's lock) or briefly
    /// unreachable is retried with a backoff for up to 30 s before start-up
    /// fails.
    pub async fn migrate(&self) -> Result<()> {
        patiently("migrations", || self.migrate_once()).await
    }

    /// Checks, with a `SELECT` only, that every migration was applied: for
    /// a role without DDL rights (`database.migrate = false`).
    pub async fn check_migrated(&self) -> Result<()> {
        use sea_orm::sea_query::{Alias, Expr, Query};
        let query = Query::select()
            .expr(Expr::col(Alias::new("version")))
            .from(Alias::new(redstream_migrations::MIGRATION_TABLE))
            .to_owned();
        let rows = patiently("checking the migrations", || self.inner.db.query_all(&query))
            .await
            .map_err(|e| {
                Error::settings(
                    "database.migrate",
                    format!(
                        "is false, but `{}` cannot be read ({e}): run the migrations first with a role that may create tables (a process with database.migrate = true), and grant this role SELECT, INSERT, UPDATE, DELETE on redstream's tables",
                        redstream_migrations::MIGRATION_TABLE
                    ),
                )
            })?;
        let applied: std::collections::HashSet<String> = rows
            .iter()
            .filter_map(|r| r.try_get_by_index::<String>(0).ok())
            .collect();
        let missing: Vec<String> = redstream_migrations::Migrator::migrations()
            .iter()
            .map(|m| m.name().to_owned())
            .filter(|name| !applied.contains(name))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::settings(
                "database.migrate",
                format!(
                    "is false, but migrations {} are not applied: run them with a role that may create tables (a process with database.migrate = true)",
                    missing.join(", ")
                ),
            ))
        }
    }

    async fn migrate_once(&self) -> Result<()> {
        let db = &self.inner.db;
        match self.inner.backend {
            DbBackend::Postgres => {
                let tx = db.begin().await?;
                tx.execute_unprepared(&format!(
                    "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})"
                ))
                .await?;
                redstream_migrations::Migrator::up(&tx, None).await?;
                tx.commit().await?;
            }
            _ => {
                let tx = db.begin_with_options(immediate()).await?;
                redstream_migrations::Migrator::up(&tx, None).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// The sea-orm connection pool.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// The database backend (SQLite or PostgreSQL).
    pub fn backend(&self) -> DbBackend {
        self.inner.backend
    }

    /// What the store did so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        StoreStats {
            committed: c.committed.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            retried_batches: c.retried_batches.load(Ordering::Relaxed),
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<()> {
        self.inner.db.ping().await?;
        Ok(())
    }

    /// Whether two handles share one pool.
    pub(crate) fn same_as(&self, other: &Store) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether `group` has committed the effect of `event_id`.
    pub async fn is_processed(&self, group: &str, event_id: &str) -> Result<bool> {
        use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
        let query = Query::select()
            .expr(Expr::val(1))
            .from(Alias::new("processed_events"))
            .and_where(Expr::col(Alias::new("group_name")).eq(group))
            .and_where(Expr::col(Alias::new("event_id")).eq(event_id))
            .to_owned();
        Ok(self.inner.db.query_one(&query).await?.is_some())
    }

    pub(crate) fn batch_size(&self) -> usize {
        self.inner.batch_size
    }

    pub(crate) fn batch_timeout(&self) -> Duration {
        self.inner.batch_timeout
    }

    /// Begins a transaction that takes SQLite's write lock at once (so two
    /// writers never deadlock upgrading a read lock).
    pub(crate) async fn begin_write(&self) -> Result<sea_orm::DatabaseTransaction> {
        let tx = match self.inner.backend {
            DbBackend::Sqlite => self.inner.db.begin_with_options(immediate()).await?,
            _ => self.inner.db.begin().await?,
        };
        Ok(tx)
    }

    fn count(&self, committed: u64, duplicates: u64) {
        let c = &self.inner.counters;
        c.committed.fetch_add(committed, Ordering::Relaxed);
        c.duplicates.fetch_add(duplicates, Ordering::Relaxed);
    }

    fn count_retry(&self) {
        self.inner
            .counters
            .retried_batches
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The current outage: writes have failed since some time and none has
    /// succeeded since. `None` while writes succeed.
    pub fn outage(&self) -> Option<DatabaseOutage> {
        let outage = self.lock_outage();
        outage.as_ref().map(|o| DatabaseOutage {
            for_ms: millis(o.since.elapsed()),
            last_error: o.last_error.clone(),
            failures: o.failures,
        })
    }

    /// Records a write that failed because the database is unavailable. The
    /// first failure of an episode is logged as a warning and flips the
    /// `redstream_database_available` gauge; later ones only at debug level.
    pub(crate) fn write_failed(&self, what: &str, error: &str) {
        let mut outage = self.lock_outage();
        match outage.as_mut() {
            Some(o) => {
                o.failures += 1;
                o.last_error = error.to_owned();
                tracing::debug!(database = %self.inner.shown_url, "{what}: the database is still unavailable ({error})");
            }
            None => {
                *outage = Some(Outage {
                    since: std::time::Instant::now(),
                    last_error: error.to_owned(),
                    failures: 1,
                });
                tracing::warn!(
                    database = %self.inner.shown_url,
                    "{what}: the database is unavailable for writes ({error}); exactly-once groups pause and the outbox relay waits, without spending attempts, until it answers"
                );
                self.availability_metrics(false);
            }
        }
    }

    /// Records a write that committed: ends an outage, with a log line.
    pub(crate) fn write_succeeded(&self) {
        let mut outage = self.lock_outage();
        if let Some(o) = outage.take() {
            tracing::info!(
                database = %self.inner.shown_url,
                "the database takes writes again after {:.1?} ({} failed writes in between)",
                o.since.elapsed(),
                o.failures
            );
            self.availability_metrics(true);
        }
    }

    fn availability_metrics(&self, available: bool) {
        let database = self.inner.shown_url.clone();
        metrics::gauge!(crate::metrics::names::DATABASE_AVAILABLE, "database" => database.clone())
            .set(if available { 1.0 } else { 0.0 });
        if !available {
            metrics::counter!(crate::metrics::names::DATABASE_OUTAGES, "database" => database)
                .increment(1);
        }
    }

    fn lock_outage(&self) -> std::sync::MutexGuard<'_, Option<Outage>> {
        // The state is a plain value: a panic elsewhere cannot leave it torn.
        self.inner
            .outage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Decides whether a connection given back to the pool may be used again.
///
/// - One that does not answer a ping within [`PROBE_TIMEOUT`] is closed: a
///   statement of its hangs (its batch timed out on a connection whose peer
///   went silent), and it would otherwise hold its pool slot until TCP gives
///   up, so a few such connections starve the pool after the database is
///   back.
/// - One whose transaction state is in doubt is closed. sqlx counts the
///   transactions it opened and lowers the count only when `COMMIT` or
///   `ROLLBACK` succeeds; SQLite rolls a transaction back by itself on
///   `SQLITE_FULL`, some `IOERR`, `BUSY` and `NOMEM` errors, after which the
///   `ROLLBACK` fails and the count stays up. Reused, such a connection turns
///   the next `BEGIN` into a `SAVEPOINT` inside a transaction that is never
///   committed, and its "commits" into `RELEASE`s that commit nothing.
///
/// The ping comes first: it queues behind the rollback that a dropped
/// transaction sent, so the count read after it is settled.
fn keep_if_settled<DB>(
    conn: &mut DB::Connection,
    _meta: sea_orm::sqlx::pool::PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'_, std::result::Result<bool, sea_orm::sqlx::Error>>
where
    DB: sea_orm::sqlx::Database,
{
    use sea_orm::sqlx::Connection;
    Box::pin(async move {
        let answers = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, conn.ping()).await,
            Ok(Ok(()))
        );
        let settled = outside_transaction::<DB>(conn);
        if answers && !settled {
            tracing::debug!(
                "a database connection whose transaction state is in doubt is closed, not reused"
            );
        }
        Ok(answers && settled)
    })
}

/// Whether sqlx counts no open transaction on `conn`.
fn outside_transaction<DB: sea_orm::sqlx::Database>(conn: &DB::Connection) -> bool {
    use sqlx_core::transaction::TransactionManager;
    <DB::TransactionManager as TransactionManager>::get_transaction_depth(conn) == 0
}

fn immediate() -> sea_orm::TransactionOptions {
    sea_orm::TransactionOptions {
        sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
        ..Default::default()
    }
}

impl From<sea_orm::TransactionError<Error>> for Error {
    fn from(e: sea_orm::TransactionError<Error>) -> Self {
        match e {
            sea_orm::TransactionError::Connection(db) => Error::Database(db),
            sea_orm::TransactionError::Transaction(e) => e,
        }
    }
}

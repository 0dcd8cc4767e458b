//! Named crash points for the fault-injection suite (`tests/chaos`).
//!
//! With the `failpoints` feature, each point is a [`fail`](https://docs.rs/fail) failpoint that a
//! test process configures (`fail::cfg`, `fail::cfg_callback`, or the
//! `FAILPOINTS` environment variable with `fail::FailScenario`), typically to
//! abort the process at a known step. Without the feature (the default),
//! every point compiles to nothing.
//!
//! | point | where |
//! |---|---|
//! | `consumer.after_read` | a member's `XREADGROUP` returned entries, before any handler runs |
//! | `handler.before_commit` | an exactly-once batch ran its handlers, before `COMMIT` |
//! | `handler.after_commit_before_ack` | the batch committed, before its outcomes are reported (so before `XACK`) |
//! | `ack.after_xack` | an `XACK` returned, before the supervisor records it |
//! | `reclaimer.after_claim` | `XAUTOCLAIM` returned entries, before they are handed on |
//! | `dlq.after_write` | the dead-letter script returned (its `XADD` and the original's `XACK` are one atomic step, so there is no point between them) |
//! | `producer.after_send` | a batch's `XADD`s were answered, before the publishers are |
//! | `outbox.after_xadd_before_mark` | the relay published rows, before it marks them sent |

/// Every crash point's name.
pub const POINTS: [&str; 8] = [
    "consumer.after_read",
    "handler.before_commit",
    "handler.after_commit_before_ack",
    "ack.after_xack",
    "reclaimer.after_claim",
    "dlq.after_write",
    "producer.after_send",
    "outbox.after_xadd_before_mark",
];

/// A crash point: a `fail` failpoint with the `failpoints` feature, nothing
/// without it.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

pub(crate) use crash_point;

/// Makes the process abort (as a `kill -9` would end it, with no cleanup)
/// the `hit`-th time (1-based) execution passes `point`.
///
/// ```no_run
/// # #[cfg(feature = "failpoints")]
/// redstream::failpoints::crash_at("handler.after_commit_before_ack", 1)?;
/// # Ok::<(), redstream::Error>(())
/// ```
#[cfg(feature = "failpoints")]
pub fn crash_at(point: &str, hit: u64) -> crate::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    if !POINTS.contains(&point) {
        return Err(crate::Error::settings(
            "failpoints",
            format!(
                "unknown crash point `{point}`; known: {}",
                POINTS.join(", ")
            ),
        ));
    }
    let passes = AtomicU64::new(0);
    fail::cfg_callback(point, move || {
        if passes.fetch_add(1, Ordering::SeqCst) + 1 == hit {
            eprintln!("crash point reached: aborting");
            std::process::abort();
        }
    })
    .map_err(|e| crate::Error::settings("failpoints", e))
}

/// Every database fault point: the statements of the exactly-once path and
/// of the outbox relay where `inject_db_fault` (feature `failpoints`) can make the database fail.
///
/// | point | where |
/// |---|---|
/// | `db.begin` | a batch's `BEGIN` |
/// | `db.keys` | the insert of the batch's keys into `processed_events` |
/// | `db.savepoint` | an entry's `SAVEPOINT` (the careful run) |
/// | `db.release` | an entry's `RELEASE SAVEPOINT` after its handler acked |
/// | `db.handler` | a handler's own statement (the handler calls `db_point`) |
/// | `db.commit` | the batch's `COMMIT` |
/// | `outbox.lease` | the relay takes or renews its lease |
/// | `outbox.select` | the relay reads unsent rows |
/// | `outbox.mark` | the relay marks published rows sent |
pub const DB_POINTS: [&str; 9] = [
    "db.begin",
    "db.keys",
    "db.savepoint",
    "db.release",
    "db.handler",
    "db.commit",
    "outbox.lease",
    "outbox.select",
    "outbox.mark",
];

/// A class of database error, as `inject_db_fault` (feature `failpoints`) makes it happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DbFault {
    /// The disk is full: SQLite `SQLITE_FULL` (13), PostgreSQL `53100`.
    Full,
    /// An I/O error: SQLite `SQLITE_IOERR_WRITE` (778), PostgreSQL `58030`.
    Io,
    /// Busy or locked: SQLite `SQLITE_BUSY` (5), PostgreSQL `55P03`.
    Busy,
    /// Out of memory: SQLite `SQLITE_NOMEM` (7), PostgreSQL `53200`.
    OutOfMemory,
    /// The connection is lost: on PostgreSQL the backend is really
    /// terminated (`pg_terminate_backend`); SQLite has no connection to lose,
    /// so it fails like [`DbFault::Io`].
    ConnectionLost,
    /// The commit takes effect, then the caller sees a lost connection (or,
    /// on SQLite, an I/O error): at the points just before a `COMMIT`
    /// (`db.commit`, `outbox.mark`) the transaction really commits;
    /// elsewhere it fails like [`DbFault::ConnectionLost`].
    OutcomeUnknown,
}

impl DbFault {
    /// Every class.
    pub const ALL: [DbFault; 6] = [
        DbFault::Full,
        DbFault::Io,
        DbFault::Busy,
        DbFault::OutOfMemory,
        DbFault::ConnectionLost,
        DbFault::OutcomeUnknown,
    ];
}

#[cfg(feature = "failpoints")]
struct Armed {
    fault: DbFault,
    /// Whether the database rolls the whole transaction back (as SQLite may
    /// on these errors, and as PostgreSQL aborts it).
    rolls_back: bool,
    skip: u32,
    remaining: u32,
    hits: u32,
}

#[cfg(feature = "failpoints")]
static ARMED: std::sync::Mutex<Vec<(String, Armed)>> = std::sync::Mutex::new(Vec::new());

#[cfg(feature = "failpoints")]
fn armed() -> std::sync::MutexGuard<'static, Vec<(String, Armed)>> {
    ARMED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Arms `point` to fail with `fault` `times` times, after letting `skip`
/// passes through. With `rolls_back`, the database also rolls the open
/// transaction back before the error is returned, as SQLite does by itself
/// after `SQLITE_FULL`, some `IOERR`, `BUSY` and `NOMEM` errors (the
/// connection is left outside any transaction while sqlx still counts one);
/// on PostgreSQL the transaction is aborted instead (a failing statement
/// runs first), as any error there does. Replaces an earlier arming of the
/// same point.
///
/// ```no_run
/// # #[cfg(feature = "failpoints")]
/// # fn demo() -> redstream::Result<()> {
/// use redstream::failpoints::{DbFault, inject_db_fault};
/// inject_db_fault("db.commit", DbFault::Full, true, 0, 2)?;
/// # Ok(()) }
/// ```
#[cfg(feature = "failpoints")]
pub fn inject_db_fault(
    point: &str,
    fault: DbFault,
    rolls_back: bool,
    skip: u32,
    times: u32,
) -> crate::Result<()> {
    if !DB_POINTS.contains(&point) {
        return Err(crate::Error::settings(
            "failpoints",
            format!(
                "unknown database fault point `{point}`; known: {}",
                DB_POINTS.join(", ")
            ),
        ));
    }
    let mut armed = armed();
    armed.retain(|(p, _)| p != point);
    armed.push((
        point.to_owned(),
        Armed {
            fault,
            rolls_back,
            skip,
            remaining: times,
            hits: 0,
        },
    ));
    Ok(())
}

/// Disarms every database fault point.
#[cfg(feature = "failpoints")]
pub fn clear_db_faults() {
    armed().clear();
}

/// How many times `point` injected its fault since it was armed.
#[cfg(feature = "failpoints")]
pub fn db_fault_hits(point: &str) -> u32 {
    armed()
        .iter()
        .find(|(p, _)| p == point)
        .map_or(0, |(_, a)| a.hits)
}

/// Passes a database fault point: `Ok` unless the point is armed, in which
/// case the fault happens on `conn` (the open transaction, if any) and its
/// error is returned. Library statements pass their points themselves;
/// a test handler calls this with `db.handler` before its own statement.
#[cfg(feature = "failpoints")]
pub async fn db_point<C>(point: &str, conn: Option<&C>) -> Result<(), sea_orm::DbErr>
where
    C: sea_orm::ConnectionTrait,
{
    let hit = {
        let mut armed = armed();
        armed
            .iter_mut()
            .find(|(p, _)| p == point)
            .and_then(|(_, a)| {
                if a.skip > 0 {
                    a.skip -= 1;
                    return None;
                }
                if a.remaining == 0 {
                    return None;
                }
                a.remaining -= 1;
                a.hits += 1;
                Some((a.fault, a.rolls_back))
            })
    };
    let Some((fault, rolls_back)) = hit else {
        return Ok(());
    };
    tracing::debug!("fault point {point}: injecting {fault:?} (rolls back: {rolls_back})");
    injected::fail(point, fault, rolls_back, conn).await
}

#[cfg(feature = "failpoints")]
mod injected {
    use std::borrow::Cow;

    use sea_orm::sqlx::error::{DatabaseError, ErrorKind};
    use sea_orm::{ConnectionTrait, DbBackend, DbErr, RuntimeErr};

    use super::DbFault;

    /// A database error with the code a real server or SQLite gives.
    #[derive(Debug)]
    struct Injected {
        code: &'static str,
        message: String,
    }

    impl std::fmt::Display for Injected {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} (code {}, injected)", self.message, self.code)
        }
    }

    impl std::error::Error for Injected {}

    impl DatabaseError for Injected {
        fn message(&self) -> &str {
            &self.message
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.code))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    fn database_error(code: &'static str, message: &str) -> DbErr {
        let error = sea_orm::sqlx::Error::Database(Box::new(Injected {
            code,
            message: message.to_owned(),
        }));
        DbErr::Exec(RuntimeErr::SqlxError(std::sync::Arc::new(error)))
    }

    fn connection_lost() -> DbErr {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset (injected)",
        );
        DbErr::Exec(RuntimeErr::SqlxError(std::sync::Arc::new(
            sea_orm::sqlx::Error::Io(io),
        )))
    }

    pub(super) async fn fail<C: ConnectionTrait>(
        point: &str,
        fault: DbFault,
        rolls_back: bool,
        conn: Option<&C>,
    ) -> Result<(), DbErr> {
        let backend = conn.map(ConnectionTrait::get_database_backend);
        let sqlite = backend != Some(DbBackend::Postgres);
        if fault == DbFault::OutcomeUnknown {
            if let Some(conn) = conn
                && matches!(point, "db.commit" | "outbox.mark")
            {
                // The commit happens; its answer is lost.
                conn.execute_unprepared("COMMIT").await?;
            }
            return Err(if sqlite {
                database_error("778", "disk I/O error")
            } else {
                connection_lost()
            });
        }
        if fault == DbFault::ConnectionLost
            && !sqlite
            && let Some(conn) = conn
        {
            // Really gone: the server ends this backend.
            return match conn
                .execute_unprepared("SELECT pg_terminate_backend(pg_backend_pid())")
                .await
            {
                Err(e) => Err(e),
                Ok(_) => Err(connection_lost()),
            };
        }
        if rolls_back && let Some(conn) = conn {
            if sqlite {
                // What SQLite does by itself after these errors: the
                // transaction is gone, behind sqlx's back.
                let _ = conn.execute_unprepared("ROLLBACK").await;
            } else {
                // Any error aborts a PostgreSQL transaction.
                let _ = conn.execute_unprepared("SELECT 1/0").await;
            }
        }
        let (sqlite_code, pg_code, message) = match fault {
            DbFault::Full => ("13", "53100", "database or disk is full"),
            DbFault::Io | DbFault::ConnectionLost | DbFault::OutcomeUnknown => {
                ("778", "58030", "disk I/O error")
            }
            DbFault::Busy => ("5", "55P03", "database is locked"),
            DbFault::OutOfMemory => ("7", "53200", "out of memory"),
        };
        Err(database_error(
            if sqlite { sqlite_code } else { pg_code },
            message,
        ))
    }
}

/// A database fault point: with the `failpoints` feature, an expression of
/// type `Result<(), DbErr>` that fails when the point is armed; without
/// it, `Ok(())`.
macro_rules! db_fault {
    ($name:literal, $conn:expr) => {{
        #[cfg(feature = "failpoints")]
        let result = crate::failpoints::db_point($name, Some($conn)).await;
        #[cfg(not(feature = "failpoints"))]
        let result = {
            let _ = $conn;
            Ok::<(), sea_orm::DbErr>(())
        };
        result
    }};
}

pub(crate) use db_fault;

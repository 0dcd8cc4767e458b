//! The one error type of the library, and how to classify it.
//!
//! Variants are named by cause and carry the facts a caller needs to act on
//! them (which setting, which limit, which lease). [`Error::is_transient`] is
//! the single classifier the actors use to decide between "back off and try
//! again" and "this will not get better by retrying".

use std::time::Duration;

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The error type handlers may return: anything that implements
/// [`std::error::Error`] (including `anyhow::Error` through its `From`
/// conversion). Returning `Err` from a handler means "retry this entry".
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in redstream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing, malformed or out of range. Start-up stops here.
    #[error("invalid setting `{key}`: {reason}")]
    Settings {
        /// The dotted key, e.g. `producer.batch_size`.
        key: String,
        /// What was expected, in words.
        reason: String,
    },

    /// A publish was refused because its encoded size is over the limit.
    #[error(
        "payload of {actual} bytes exceeds the limit of {limit} bytes (setting `producer.max_payload_bytes`)"
    )]
    PayloadTooLarge {
        /// Encoded size of the entry's fields, in bytes.
        actual: usize,
        /// The configured limit, in bytes.
        limit: usize,
    },

    /// The event is not valid for publishing (for example a header uses a
    /// reserved field name).
    #[error("invalid event: {reason}")]
    InvalidEvent {
        /// What is wrong with it.
        reason: String,
    },

    /// The event could not be encoded as JSON.
    #[error("cannot encode event data as JSON: {0}")]
    Encode(#[source] serde_json::Error),

    /// A Redis command failed. The message never contains credentials.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// A database operation failed.
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),

    /// Redis answered with something the broker did not expect.
    #[error("unexpected reply to {command}: {detail}")]
    UnexpectedReply {
        /// The command whose reply was not understood.
        command: &'static str,
        /// What was wrong with it.
        detail: String,
    },

    /// A publish failed on every attempt; the event was not written (or its
    /// outcome is unknown, see `docs/semantics.md`).
    #[error("publish to `{stream}` failed after {attempts} attempts: {last_error}")]
    PublishFailed {
        /// The target stream.
        stream: String,
        /// How many times the write was tried.
        attempts: u32,
        /// The error of the last attempt.
        last_error: String,
    },

    /// The producer's bounded buffer is full (only from
    /// [`Producer::try_publish`](crate::Producer::try_publish); `publish`
    /// waits instead).
    #[error("producer buffer is full ({capacity} events waiting to be written)")]
    BufferFull {
        /// The configured buffer size (`producer.buffer`).
        capacity: usize,
    },

    /// Another live process holds the lease of a member name this process
    /// wanted to use.
    #[error(
        "member `{member}` of group `{group}` on stream `{stream}` is held by another live process (lease key `{key}`); give this process another `instance.name`"
    )]
    LeaseHeld {
        /// The stream.
        stream: String,
        /// The consumer group.
        group: String,
        /// The member name in use.
        member: String,
        /// The lease key in Redis.
        key: String,
    },

    /// [`Processor`](crate::Processor) was started outside an actix
    /// `System`.
    #[error(
        "redstream must run inside an actix System: use #[actix::main], #[actix_web::main], #[actix_rt::test] or actix_rt::System::new().block_on(..)"
    )]
    NoActixSystem,

    /// The processor (or the actor a call needed) has stopped.
    #[error("the processor is stopped")]
    Stopped,

    /// An operation named a stream or group this processor does not run.
    #[error("this processor runs no {what}")]
    NotServed {
        /// The stream or group asked for.
        what: String,
    },

    /// The broker cannot do this operation.
    #[error("the broker does not support {operation}")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
    },

    /// An operation did not finish within its deadline.
    #[error("{operation} did not finish within {after:?}")]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
}

impl Error {
    /// Builds a [`Error::Settings`] for `key`.
    pub fn settings(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Settings {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Whether trying again later can succeed: dropped connections,
    /// timeouts, a server that is loading, busy or out of memory, a database
    /// that is unreachable or locked. The actors back off and retry these;
    /// everything else is reported.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis(e) => redis_is_transient(e),
            Error::Database(e) => db_is_transient(e),
            Error::Timeout { .. } | Error::BufferFull { .. } | Error::PublishFailed { .. } => true,
            _ => false,
        }
    }

    /// Whether the error means the connection it happened on cannot be
    /// trusted any more and must be rebuilt.
    pub fn needs_reconnect(&self) -> bool {
        match self {
            Error::Redis(e) => e.is_unrecoverable_error() || e.is_timeout() || e.is_io_error(),
            Error::Timeout { .. } => true,
            _ => false,
        }
    }

    /// The same error for another caller it fails too (one batch serving
    /// many): a Redis error as it is, others by their message.
    pub(crate) fn clone_for_caller(&self) -> Error {
        match self {
            Error::Redis(e) => Error::Redis(e.clone()),
            other => Error::UnexpectedReply {
                command: "batch",
                detail: other.to_string(),
            },
        }
    }

    /// The Redis error code (`NOGROUP`, `BUSYGROUP`, `OOM`, …), if any.
    pub fn redis_code(&self) -> Option<&str> {
        match self {
            Error::Redis(e) => e.code(),
            _ => None,
        }
    }

    /// Whether the consumer group, or the stream it was on, no longer
    /// exists (Redis `NOGROUP`: deleted, or lost with the data).
    pub fn is_missing_group(&self) -> bool {
        self.redis_code() == Some("NOGROUP")
    }
}

/// Server error codes after which a retry may succeed.
const TRANSIENT_CODES: &[&str] = &[
    "LOADING",
    "BUSY",
    "OOM",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "NOGROUP",
    "UNBLOCKED",
];

fn redis_is_transient(e: &redis::RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    match e.code() {
        Some(code) => TRANSIENT_CODES.contains(&code),
        None => e.is_unrecoverable_error(),
    }
}

/// Whether a database error can go away by itself, so that the batch is
/// run again later with no attempt spent: the connection or pool failed, the
/// server is shutting down, a lock or serialization conflict, or the
/// database ran out of a resource (disk, memory) or hit an I/O error.
///
/// - SQLite, by primary result code: `BUSY` (5), `LOCKED` (6), `NOMEM` (7),
///   `IOERR` (10), `FULL` (13), `PROTOCOL` (15). After `FULL`, `IOERR`,
///   `BUSY` and `NOMEM` SQLite may already have rolled the transaction back:
///   the exactly-once runner checks before `COMMIT` that it is still inside
///   it, and a connection left in doubt is closed (see `store`).
/// - PostgreSQL, by SQLSTATE: class 08 (connection), 53 (insufficient
///   resources: disk full, out of memory, too many connections), 57P
///   (shutdown), 58 (system and I/O errors), 40001, 40P01, 55P03, 25P03.
///
/// Constraint violations and bad SQL are not transient.
pub(crate) fn db_is_transient(e: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    match e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(s)) | DbErr::Query(RuntimeErr::SqlxError(s)) => {
            sqlx_is_transient(s)
        }
        _ => false,
    }
}

/// Like [`db_is_transient`], but a failed connection counts only when its
/// cause may pass (refused, reset, busy), not when it never will (a wrong
/// password, a missing database): for start-up, which should fail fast on a
/// bad setting.
pub(crate) fn db_may_recover(e: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    match e {
        DbErr::Conn(RuntimeErr::SqlxError(s)) => sqlx_is_transient(s),
        other => db_is_transient(other),
    }
}

fn sqlx_is_transient(e: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error as E;
    match e {
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed
        | E::BeginFailed => true,
        E::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            if db
                .try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
                .is_some()
            {
                sqlite_code_is_transient(code)
            } else if db
                .try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                pg_code_is_transient(code)
            } else {
                // Another driver's error (or one the fault suite injects):
                // SQLite's numeric codes and PostgreSQL's SQLSTATEs do not
                // overlap among the transient ones.
                sqlite_code_is_transient(code) || pg_code_is_transient(code)
            }
        }
        _ => false,
    }
}

/// SQLite result codes (extended codes carry the primary code in their low
/// byte) after which trying again later can succeed.
fn sqlite_code_is_transient(code: &str) -> bool {
    const BUSY: u32 = 5;
    const LOCKED: u32 = 6;
    const NOMEM: u32 = 7;
    const IOERR: u32 = 10;
    const FULL: u32 = 13;
    const PROTOCOL: u32 = 15;
    code.parse::<u32>()
        .is_ok_and(|c| matches!(c & 0xff, BUSY | LOCKED | NOMEM | IOERR | FULL | PROTOCOL))
}

/// PostgreSQL SQLSTATEs after which trying again later can succeed.
fn pg_code_is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code.starts_with("58")
        || matches!(code, "40001" | "40P01" | "55P03" | "25P03")
}

/// Whether a handler's error is really a transient database failure (a
/// `sea_orm::DbErr` passed up with `?`), which is retried without using
/// the entry's attempt budget.
pub(crate) fn is_transient_db_error(e: &BoxError) -> bool {
    if let Some(db) = e.downcast_ref::<sea_orm::DbErr>() {
        return db_is_transient(db);
    }
    if let Some(Error::Database(db)) = e.downcast_ref::<Error>() {
        return db_is_transient(db);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_error_names_the_key() {
        let e = Error::settings("producer.batch_size", "must be at least 1");
        assert_eq!(
            e.to_string(),
            "invalid setting `producer.batch_size`: must be at least 1"
        );
        assert!(!e.is_transient());
    }

    #[test]
    fn dropped_connection_is_transient_and_needs_reconnect() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let e = Error::from(redis::RedisError::from(io));
        assert!(e.is_transient());
        assert!(e.needs_reconnect());
    }

    #[test]
    fn payload_too_large_names_the_limit() {
        let e = Error::PayloadTooLarge {
            actual: 2_000_000,
            limit: 1_048_576,
        };
        let text = e.to_string();
        assert!(text.contains("1048576"), "{text}");
        assert!(text.contains("producer.max_payload_bytes"), "{text}");
    }
}

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

    /// The Redis error code (`NOGROUP`, `BUSYGROUP`, `OOM`, …), if any.
    pub fn redis_code(&self) -> Option<&str> {
        match self {
            Error::Redis(e) => e.code(),
            _ => None,
        }
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

fn db_is_transient(e: &sea_orm::DbErr) -> bool {
    use sea_orm::DbErr;
    match e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        other => {
            let text = other.to_string().to_ascii_lowercase();
            [
                "database is locked",
                "busy",
                "connection",
                "timed out",
                "broken pipe",
            ]
            .iter()
            .any(|needle| text.contains(needle))
        }
    }
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

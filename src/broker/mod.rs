//! The broker boundary: every stream operation the actors need, as one
//! trait. [`RedisBroker`] implements it for Redis Streams; no Redis command
//! appears anywhere else in the crate, so another broker (Kafka, NATS
//! JetStream) or Redis Cluster is an addition, not a rewrite.
//!
//! Besides the stream itself, a group keeps three pieces of durable state per
//! entry, next to its pending list: the number of failed attempts, the time
//! before which it must not be retried, and (for dead letters) the letter.
//! Keeping them beside the pending list means they share its fate: what
//! survives a Redis restart survives together.
//!
//! **One clock per decision.** Times that several processes compare (when a
//! retry is due) are the broker's: a retry is written as a delay and the
//! broker turns it into a due time with its own clock, and compares due
//! times with that same clock when it hands them out. A worker whose wall
//! clock is stepped or skewed therefore retries neither early nor late.
//! Durations inside one process use the monotonic clock.

pub mod admin;
mod redis;

use std::time::Duration;

use async_trait::async_trait;

pub use self::admin::Admin;
pub use self::redis::RedisBroker;
use crate::entry::{OutgoingEntry, RawEntry};
use crate::error::Result;
use crate::settings::StartFrom;

/// One entry to write, with the stream it goes to.
#[derive(Clone, Debug)]
pub struct PublishItem {
    /// Target stream.
    pub stream: std::sync::Arc<str>,
    /// The entry.
    pub entry: OutgoingEntry,
    /// `MAXLEN ~` for this write, if the stream is trimmed by length.
    pub max_len: Option<u64>,
}

/// Where a member's read starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    /// Entries never delivered to the group (`>`), blocking up to the
    /// reader's block time when there are none.
    New,
    /// The member's own pending entries with ids after the given one (`0`
    /// for all). Never blocks.
    PendingAfter(String),
}

/// The id that means "from the start" in [`ReadFrom::PendingAfter`].
pub const FROM_START: &str = "0";
/// The XAUTOCLAIM cursor that starts (and, when returned, ends) a scan.
pub const CURSOR_START: &str = "0-0";

/// A reader for one group member, holding its own connection (a blocking
/// read occupies the connection it runs on).
#[async_trait]
pub trait GroupReader: Send {
    /// Reads up to `count` entries.
    async fn read(&mut self, from: &ReadFrom, count: usize) -> Result<Vec<RawEntry>>;

    /// A token that makes a blocked [`GroupReader::read`] return at once
    /// (through [`Broker::unblock`]).
    fn unblock_token(&self) -> Option<i64>;
}

/// Durable per-entry state of a group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryState {
    /// Failed attempts so far.
    pub attempts: u32,
    /// If waiting for a retry: how long until it is due, by the broker's
    /// clock (zero once it is due).
    pub retry_in: Option<Duration>,
}

/// An entry to redeliver later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    /// The stream entry id.
    pub id: String,
    /// Failed attempts, including the one that just failed.
    pub attempts: u32,
    /// Not before this long after the write: the broker adds it to its own
    /// clock, so the writer's wall clock plays no part.
    pub delay: Duration,
}

/// An entry to move to the dead-letter stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The original entry id.
    pub origin_id: String,
    /// The original fields (empty if the payload was trimmed away).
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Why: a stable code, a colon, details.
    pub reason: String,
    /// Failed attempts.
    pub attempts: u32,
    /// The last error, if an attempt failed.
    pub error: Option<String>,
    /// When it was dead-lettered (ms since the epoch, the writer's wall
    /// clock: data for people, never compared to decide anything).
    pub failed_at_ms: u64,
}

/// The reply of one reclaim scan step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimReply {
    /// Cursor for the next call; [`CURSOR_START`] when the scan wrapped.
    pub next_cursor: String,
    /// Entries now owned by the claiming member.
    pub claimed: Vec<RawEntry>,
    /// Ids that were pending but whose payload is gone; the broker already
    /// dropped them from the pending list, so they must be dead-lettered.
    pub deleted: Vec<String>,
}

/// Entries taken from the retry schedule because they are due.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DueReply {
    /// Entries now owned by the claiming member, with their failed attempts.
    pub claimed: Vec<(RawEntry, u32)>,
}

/// Pending-list figures of a group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingSummary {
    /// Entries delivered and not yet acked (including those waiting for a
    /// retry).
    pub pending: u64,
    /// Of those, entries waiting for a retry.
    pub waiting_retry: u64,
    /// Oldest pending id.
    pub oldest_id: Option<String>,
    /// Age of the oldest pending entry, by the broker's clock (its id is
    /// the broker's time when it was added).
    pub oldest_age: Option<Duration>,
    /// Pending count per member.
    pub per_member: Vec<(String, u64)>,
    /// Entries not yet delivered to the group, when the server can tell
    /// (XINFO GROUPS `lag`, Redis 7.0+).
    pub lag: Option<u64>,
    /// Length of the dead-letter stream.
    pub dead_letters: u64,
}

impl PendingSummary {
    /// Pending entries that hold up the group: not waiting for a retry.
    pub fn active(&self) -> u64 {
        self.pending.saturating_sub(self.waiting_retry)
    }
}

/// What the server is and whether it can lose stream data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerReport {
    /// The `redis_version` the server reports, e.g. `7.0.15` (Valkey
    /// reports `7.2.4` for compatibility, whatever its own version).
    pub version: String,
    /// The server by name and its own version, e.g. `Redis 8.2.3` or
    /// `Valkey 9.1.2`.
    pub server: String,
    /// The newer stream commands the server has, found by asking it for
    /// them (not by its version).
    pub features: ServerFeatures,
    /// Settings that can lose or evict stream data, in words.
    pub warnings: Vec<String>,
}

/// Newer stream commands a server has, detected when the broker connects
/// (`COMMAND INFO`, `COMMAND DOCS`). Where one is missing the broker uses
/// the Redis 7.0 way, with the same results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerFeatures {
    /// `XACKDEL … ACKED` (Redis 8.2+): acks and deletes in one step what no
    /// group still needs. Used only for groups with `retention.delete_acked`
    /// on streams one group reads; without it a script does the same.
    pub xackdel: bool,
    /// `XTRIM … ACKED` (Redis 8.2+): a trim that the server itself stops at
    /// entries a group still needs. Without it the trim is by `MINID` alone,
    /// below the id the fan-out-safe plan found.
    pub trim_acked: bool,
}

impl ServerFeatures {
    /// The newer commands in use, for people: e.g. `XACKDEL, XTRIM ACKED`,
    /// or `none (Redis 7.0 commands)`.
    pub fn describe(&self) -> String {
        let mut used = Vec::new();
        if self.xackdel {
            used.push("XACKDEL");
        }
        if self.trim_acked {
            used.push("XTRIM ACKED");
        }
        if used.is_empty() {
            "none (Redis 7.0 commands)".to_owned()
        } else {
            used.join(", ")
        }
    }
}

/// Every stream operation the actors use.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Creates the group (and the stream) if missing. Returns whether it was
    /// created; an existing group is success.
    async fn ensure_group(&self, stream: &str, group: &str, start: StartFrom) -> Result<bool>;

    /// Writes a batch in one round trip. The outer error means the whole
    /// batch's outcome is unknown (connection lost); otherwise there is one
    /// result per item, the entry id or that item's error.
    async fn publish(&self, items: &[PublishItem]) -> Result<Vec<Result<String>>>;

    /// Opens a reader with its own connection for one member.
    async fn open_reader(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        block: Duration,
    ) -> Result<Box<dyn GroupReader>>;

    /// Makes a blocked read return (see [`GroupReader::unblock_token`]).
    async fn unblock(&self, token: i64) -> Result<()>;

    /// Acknowledges entries in one call, and forgets the attempt counts of
    /// `forget` (entries that had failed before).
    async fn ack(
        &self,
        stream: &str,
        group: &str,
        ids: &[String],
        forget: &[String],
    ) -> Result<u64>;

    /// Like [`Broker::ack`], then deletes from the stream each entry this
    /// call acked that no group still needs (pending in none, delivered to
    /// every one), in the same atomic step. Returns how many were acked.
    /// The default only acks.
    async fn ack_and_delete(
        &self,
        stream: &str,
        group: &str,
        ids: &[String],
        forget: &[String],
    ) -> Result<u64> {
        self.ack(stream, group, ids, forget).await
    }

    /// How many consumer groups read `stream` (0 if there is no stream).
    async fn group_count(&self, stream: &str) -> Result<u64>;

    /// The durable state of some entries, in the order asked.
    async fn entry_states(
        &self,
        stream: &str,
        group: &str,
        ids: &[String],
    ) -> Result<Vec<EntryState>>;

    /// Records failed attempts and when each may be retried, atomically:
    /// due at the broker's clock now plus the entry's delay.
    async fn schedule_retries(
        &self,
        stream: &str,
        group: &str,
        retries: &[RetrySchedule],
    ) -> Result<()>;

    /// Writes dead letters to `<stream>:dlq`, acking each original in the
    /// same atomic step as its letter: an original is acked only if its
    /// letter was written. Returns `(id, error)` for letters that could not
    /// be written; their originals stay pending.
    async fn dead_letter(
        &self,
        stream: &str,
        group: &str,
        letters: &[DeadLetter],
    ) -> Result<Vec<(String, String)>>;

    /// One reclaim step: claims for `member` up to `count` entries idle at
    /// least `min_idle`, from `cursor`.
    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<ClaimReply>;

    /// Takes up to `count` entries whose retry time has come, by the
    /// broker's clock, and claims them for `member`, atomically (two
    /// processes never take the same one).
    async fn claim_due(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        count: usize,
    ) -> Result<DueReply>;

    /// Extends `member`'s claim on entries it is still working on, after
    /// checking it still owns each. Returns the ids it lost.
    async fn heartbeat(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        ids: &[String],
    ) -> Result<Vec<String>>;

    /// Hands entries `member` cannot finish to other members at once: they
    /// stay pending but look idle for `idle`.
    async fn release(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        ids: &[String],
        idle: Duration,
    ) -> Result<()>;

    /// Ids pending for one member (at most `count`).
    async fn pending_of(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        count: usize,
    ) -> Result<Vec<String>>;

    /// Pending-list figures of a group.
    async fn pending_summary(&self, stream: &str, group: &str) -> Result<PendingSummary>;

    /// Takes or renews leases (`true` per key held by `token` afterwards).
    async fn acquire_leases(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<bool>>;

    /// Gives up leases still held by `token`.
    async fn release_leases(&self, keys: &[String], token: &str) -> Result<()>;

    /// The lease key of a member.
    fn lease_key(&self, stream: &str, group: &str, member: &str) -> String;

    /// Removes the group's consumers that have nothing pending, have been
    /// idle longer than `idle` and whose name no live process leases.
    /// Returns their names. Never drops a pending entry.
    async fn remove_idle_consumers(
        &self,
        stream: &str,
        group: &str,
        idle: Duration,
    ) -> Result<Vec<String>>;

    /// Server version and data-loss warnings.
    async fn server_report(&self) -> Result<ServerReport>;

    /// Whether the server answers.
    async fn ping(&self) -> Result<()>;

    /// The broker's clock: ms since the Unix epoch (Redis `TIME`). The one
    /// clock for times several processes must agree on.
    async fn server_time_ms(&self) -> Result<u64>;
}

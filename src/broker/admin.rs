//! Operator operations: looking at streams, groups and pending lists,
//! dead letters, and trimming safely. Used by the `redstream` CLI; separate
//! from [`Broker`](super::Broker), which is what the actors need.

use async_trait::async_trait;
use serde::Serialize;

use crate::error::Result;
use crate::wire::RawEntry;

/// A stream and its groups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamInfo {
    /// The stream key.
    pub stream: String,
    /// Entries in the stream.
    pub length: u64,
    /// Its first entry id.
    pub first_id: Option<String>,
    /// Its last entry id.
    pub last_id: Option<String>,
    /// Its consumer groups.
    pub groups: Vec<GroupInfo>,
    /// Length of `<stream>:dlq`.
    pub dead_letters: u64,
}

/// A consumer group as Redis sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group name.
    pub name: String,
    /// Consumers (member names) Redis knows, stale ones included: a name
    /// stays until the janitor removes it. See `live_members`.
    pub consumers: u64,
    /// Of those, members whose name a running process leases now.
    pub live_members: u64,
    /// The running processes holding those leases.
    pub live_processes: u64,
    /// Entries delivered and not acked.
    pub pending: u64,
    /// Of those, entries waiting for a retry.
    pub waiting_retry: u64,
    /// The last entry delivered to it.
    pub last_delivered_id: String,
    /// Entries not yet delivered (Redis 7.0+; `None` when it cannot tell).
    pub lag: Option<u64>,
    /// The oldest pending entry.
    pub oldest_pending_id: Option<String>,
    /// The longest time an entry has been pending, in ms (since delivery or
    /// last claim, entries waiting for a retry left out): high when entries
    /// are stuck, not during a backlog.
    pub longest_pending_ms: Option<u64>,
    /// The age of the oldest entry not yet delivered, in ms (queue latency).
    pub queue_latency_ms: Option<u64>,
}

impl GroupInfo {
    /// Whether the group has work (entries pending or not yet delivered)
    /// and no running process serves it.
    pub fn unattended(&self) -> bool {
        self.live_members == 0 && (self.pending > 0 || self.lag.is_some_and(|l| l > 0))
    }
}

/// A consumer group as `XINFO GROUPS` reports it: what Redis keeps for the
/// group itself, without the pending-list ages, retries or leases that
/// [`GroupInfo`] adds (see [`Admin::groups`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupSummary {
    /// The group name.
    pub name: String,
    /// Consumers (member names) Redis knows, stale ones included.
    pub consumers: u64,
    /// Entries delivered and not acked.
    pub pending: u64,
    /// The last entry delivered to it.
    pub last_delivered_id: String,
    /// Entries not yet delivered (Redis 7.0+; `None` when it cannot tell).
    pub lag: Option<u64>,
}

/// A consumer (member name) of a group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// Entries it holds.
    pub pending: u64,
    /// Milliseconds since it was last seen.
    pub idle_ms: u64,
    /// The process that leases its name now (its lease token: a process id
    /// and where it runs), `None` when no running process does.
    pub held_by: Option<String>,
}

impl ConsumerInfo {
    /// Whether a running process leases this name.
    pub fn live(&self) -> bool {
        self.held_by.is_some()
    }
}

/// One pending entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PendingEntry {
    /// The entry id.
    pub id: String,
    /// The consumer that holds it.
    pub consumer: String,
    /// Milliseconds since it was delivered or last claimed.
    pub idle_ms: u64,
    /// Redis's delivery counter (not the attempt count, see the semantics:
    /// it also counts claims and reads that failed nothing).
    pub deliveries: u64,
    /// Failed attempts redstream recorded (0 while none failed).
    pub attempts: u32,
    /// When its retry is due, ms since the Unix epoch by the broker's clock;
    /// `None` when it is not waiting for a retry.
    pub retry_at_ms: Option<u64>,
    /// The event's `type` field; `None` when absent, or when its payload
    /// is gone from the stream.
    pub event_type: Option<String>,
    /// The error of its last failed attempt.
    pub last_error: Option<String>,
}

/// What a fan-out-safe trim would remove.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TrimPlan {
    /// The stream.
    pub stream: String,
    /// Entries below this id are acked by every group and can go; `None`
    /// when nothing can (no groups, or a group has read nothing).
    pub min_id: Option<String>,
    /// How many entries that is.
    pub removable: u64,
    /// For each group, the first id it still needs.
    pub needed_by: Vec<(String, String)>,
}

/// Where [`Admin::seek`] moves a group: the next entry it is given is the
/// first one after this position.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SeekTo {
    /// Before the first entry: everything still in the stream is read
    /// again.
    Start,
    /// After the last entry: only entries added from now on are read.
    End,
    /// After this entry id.
    AfterId(String),
    /// Entries added at or after this time (ms since the Unix epoch, the
    /// broker's clock that made the ids) are read.
    Time(u64),
}

/// What moving a group would change (see [`Admin::seek_plan`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SeekPlan {
    /// The group's last delivered id now.
    pub from_id: String,
    /// Its last delivered id after the move.
    pub to_id: String,
    /// Entries delivered before that will be read again.
    pub reread: u64,
    /// Entries not yet delivered that will be skipped.
    pub skipped: u64,
    /// Pending entries: a move leaves them pending (they are still
    /// reclaimed and retried).
    pub pending: u64,
}

/// What removing a consumer did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RemovedConsumer {
    /// Its name.
    pub name: String,
    /// Pending entries it held, moved to [`ORPHANS`] (keeping their idle
    /// time) so that the reclaimer hands them to a live member: nothing is
    /// dropped from the pending list.
    pub moved: u64,
}

/// The consumer that [`Admin::remove_consumer`] hands a removed consumer's
/// pending entries to, until the reclaimer takes them.
pub const ORPHANS: &str = "redstream-orphans";

/// Operator operations on streams.
#[async_trait]
pub trait Admin: Send + Sync {
    /// Stream keys matching a glob pattern (dead-letter streams excluded
    /// unless the pattern asks for them).
    async fn streams(&self, pattern: &str) -> Result<Vec<String>>;

    /// A stream, its groups and its dead-letter depth; `None` if there is
    /// no such stream.
    async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>>;

    /// The groups of a stream, from one `XINFO GROUPS` (cheap beside
    /// [`Admin::stream_info`]); `None` if there is no such stream.
    async fn groups(&self, stream: &str) -> Result<Option<Vec<GroupSummary>>>;

    /// The consumers of a group.
    async fn consumers(&self, stream: &str, group: &str) -> Result<Vec<ConsumerInfo>>;

    /// Pending entries of a group (of one consumer, if given), oldest first,
    /// with redstream's attempts, retry time, event type and last error.
    async fn pending_entries(
        &self,
        stream: &str,
        group: &str,
        count: usize,
        consumer: Option<&str>,
    ) -> Result<Vec<PendingEntry>>;

    /// Entries waiting for a retry, soonest due first, at most `count`,
    /// with the same details as [`Admin::pending_entries`].
    async fn waiting_retries(
        &self,
        stream: &str,
        group: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>>;

    /// Makes these entries, if they are waiting for a retry, due now by
    /// the broker's clock: the reclaimer redelivers them at its next check
    /// (their attempt count is kept). Returns how many were waiting; other
    /// ids are left alone.
    async fn retry_now(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64>;

    /// Entries from `start` to `end` (`-` and `+` for the ends), at most
    /// `count`.
    async fn range(
        &self,
        stream: &str,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<RawEntry>>;

    /// Creates a consumer group reading from `from` (`0` for the first
    /// entry, `$` for new ones only, or an id), creating the stream if it
    /// does not exist; `false` if the group existed already.
    async fn create_group(&self, stream: &str, group: &str, from: &str) -> Result<bool>;

    /// Deletes a consumer group, its pending list and redstream's retry
    /// schedule and attempt counts for it; `false` if there was none.
    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool>;

    /// Removes a consumer from a group, first moving the pending entries it
    /// holds to [`ORPHANS`] with their idle time kept.
    async fn remove_consumer(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
    ) -> Result<RemovedConsumer>;

    /// What moving a group to `to` would re-read and skip; `None` if there
    /// is no such group.
    async fn seek_plan(&self, stream: &str, group: &str, to: &SeekTo) -> Result<Option<SeekPlan>>;

    /// Moves the group's last delivered id to the plan's `to_id`.
    async fn seek(&self, stream: &str, group: &str, to_id: &str) -> Result<()>;

    /// Deletes entries; returns how many existed.
    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64>;

    /// What a trim that keeps everything any group still needs would remove.
    async fn trim_plan(&self, stream: &str) -> Result<TrimPlan>;

    /// Removes the entries below `min_id`; returns how many.
    async fn trim_below(&self, stream: &str, min_id: &str) -> Result<u64>;

    /// The fan-out-safe trim: removes the entries below `min_id` (from
    /// [`Admin::trim_plan`]) that no group still needs. Where the server has
    /// `XTRIM … ACKED` (Redis 8.2+) it checks each entry itself, so a group
    /// created or an entry claimed since the plan is still safe; elsewhere
    /// it is [`Admin::trim_below`]. Below a plan's `min_id` both remove the
    /// same entries. Returns how many.
    async fn trim_acked_below(&self, stream: &str, min_id: &str) -> Result<u64>;
}

/// Stream ids compare by their two numbers, not as text.
pub(crate) fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The id right before `id` (`None` for `0-0`).
pub(crate) fn previous_id(id: &str) -> Option<String> {
    let (ms, seq) = parse_id(id)?;
    match (ms, seq) {
        (0, 0) => None,
        (ms, 0) => Some(format!("{}-{}", ms - 1, u64::MAX)),
        (ms, seq) => Some(format!("{ms}-{}", seq - 1)),
    }
}

/// The id right after `id`.
pub(crate) fn next_id(id: &str) -> Option<String> {
    let (ms, seq) = parse_id(id)?;
    Some(match seq.checked_add(1) {
        Some(seq) => format!("{ms}-{seq}"),
        None => format!("{}-0", ms + 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_compare_numerically_and_step() {
        assert!(parse_id("9-0") < parse_id("10-0"));
        assert!(parse_id("10-2") < parse_id("10-10"));
        assert_eq!(next_id("5-1").as_deref(), Some("5-2"));
        assert_eq!(next_id("0-0").as_deref(), Some("0-1"));
        assert_eq!(parse_id("nonsense"), None);
        assert_eq!(previous_id("5-2").as_deref(), Some("5-1"));
        assert_eq!(
            previous_id("5-0").as_deref(),
            Some("4-18446744073709551615")
        );
        assert_eq!(previous_id("0-0"), None);
    }
}

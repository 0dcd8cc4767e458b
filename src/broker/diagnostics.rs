//! What the runtime asks about a group and the server: pending figures for
//! backpressure and gauges, the number of groups on a stream, idle-consumer
//! removal, the server report, a ping, and the server's clock.

use std::time::Duration;

use async_trait::async_trait;

use super::GroupRef;
use crate::error::Result;

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
    /// The longest time an entry has been pending: since its delivery (or
    /// last claim), not since it was published, so a backlog alone does not
    /// raise it. Entries waiting for a retry are left out (their wait is
    /// scheduled); see [`PENDING_SAMPLE`] for which entries are looked at.
    /// `None` when nothing counts.
    pub longest_pending: Option<Duration>,
    /// The age of the oldest entry not yet delivered to the group (queue
    /// latency: how long the next entry has waited), by the broker's clock.
    /// `None` when everything was delivered.
    pub queue_latency: Option<Duration>,
    /// Pending count per member.
    pub per_member: Vec<(String, u64)>,
    /// Entries not yet delivered to the group, when the server can tell
    /// (XINFO GROUPS `lag`, Redis 7.0+).
    pub lag: Option<u64>,
    /// Length of the dead-letter stream.
    pub dead_letters: u64,
}

/// How many of a group's oldest pending entries (by id) the longest
/// pending time is taken from: an entry pending for long is almost always
/// among the oldest, and reading them all each check would cost as much as
/// the pending list is long.
pub const PENDING_SAMPLE: usize = 32;

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

/// Figures, health and housekeeping.
#[async_trait]
pub trait Diagnostics: Send + Sync + 'static {
    /// Pending-list figures of a group.
    async fn pending_summary(&self, group: &GroupRef) -> Result<PendingSummary>;

    /// How many consumer groups read `stream` (0 if there is no stream).
    async fn group_count(&self, stream: &str) -> Result<u64>;

    /// Removes the group's consumers that have nothing pending, have been
    /// idle longer than `idle` and whose name no live process leases.
    /// Returns their names. Never drops a pending entry.
    async fn remove_idle_consumers(&self, group: &GroupRef, idle: Duration) -> Result<Vec<String>>;

    /// Server version and data-loss warnings.
    async fn server_report(&self) -> Result<ServerReport>;

    /// Whether the server answers.
    async fn ping(&self) -> Result<()>;

    /// The broker's clock: ms since the Unix epoch (Redis `TIME`). The one
    /// clock for times several processes must agree on.
    async fn server_time_ms(&self) -> Result<u64>;
}

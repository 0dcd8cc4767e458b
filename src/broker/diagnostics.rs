//! What the runtime asks about a group and the server: pending figures for
//! backpressure and gauges, the number of groups on a stream, idle-consumer
//! removal, the server report, a ping, and the server's clock.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

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

    /// Whether the group has nothing to do: nothing pending, nothing
    /// waiting for a retry, nothing undelivered (an unknown lag counts as
    /// none: new entries wake the group's blocked read anyway).
    pub fn is_quiet(&self) -> bool {
        self.pending == 0 && self.waiting_retry == 0 && self.lag.unwrap_or(0) == 0
    }
}

/// One member of a group as its process last told: what the status page
/// and `redstream consumers` show of processes other than their own. Written
/// by each process for its members every `reclaim.lease_ttl_ms / 3` (with
/// its lease renewal) and withdrawn when it stops; times are the writer's
/// wall clock, for people (liveness itself is the member-name lease).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MemberPresence {
    /// The member (consumer) name.
    pub name: String,
    /// The process: its lease token, `<host>/<pid>/<ulid>`.
    pub process: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When its consumer last started, ms since the Unix epoch.
    pub since_ms: u64,
    /// When this record was written, ms since the Unix epoch.
    pub seen_ms: u64,
    /// Whether its consumer was running (not in a restart backoff).
    pub running: bool,
    /// Its restarts in that process.
    pub restarts: u64,
    /// Entries it held when the record was written: handlers running and
    /// entries waiting for a place (0 in records of older versions).
    #[serde(default)]
    pub in_flight: u64,
    /// Why it last stopped, if it did.
    pub last_error: Option<String>,
    /// The process's lease lifetime: without a new record within it, the
    /// member is no longer live.
    pub lease_ttl_ms: u64,
}

impl MemberPresence {
    /// Whether the record is fresh at `now_ms` (the reader's wall clock):
    /// written within its lease lifetime.
    pub fn fresh_at(&self, now_ms: u64) -> bool {
        now_ms <= self.seen_ms.saturating_add(self.lease_ttl_ms)
    }

    /// A member for the record of `process` (a lease token
    /// `<host>/<pid>/<ulid>`), with host and pid read from it.
    pub fn of_process(name: impl Into<String>, process: impl Into<String>) -> Self {
        let process = process.into();
        let mut parts = process.split('/');
        let host = parts.next().unwrap_or_default().to_owned();
        let pid = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        MemberPresence {
            name: name.into(),
            host,
            pid,
            process,
            ..MemberPresence::default()
        }
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

    /// Records this process's members of a group for operators, replacing
    /// their previous records; the group's records expire after `ttl`
    /// without a write. A backend that keeps no presence does nothing.
    async fn publish_presence(
        &self,
        _group: &GroupRef,
        _members: &[MemberPresence],
        _ttl: Duration,
    ) -> Result<()> {
        Ok(())
    }

    /// Removes the records of these members (a stopping process).
    async fn withdraw_presence(&self, _group: &GroupRef, _names: &[String]) -> Result<()> {
        Ok(())
    }

    /// The members of a group that processes recorded, every process's.
    async fn presence(&self, _group: &GroupRef) -> Result<Vec<MemberPresence>> {
        Ok(Vec::new())
    }
}

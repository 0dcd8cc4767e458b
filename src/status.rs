//! What a running processor can tell about itself: per group, its members,
//! their restarts and the outcomes handled so far.

use serde::Serialize;

use crate::broker::MemberPresence;

/// The state of one consumer group in this process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupStatus {
    /// The stream.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// Its members in this process.
    pub members: Vec<MemberStatus>,
    /// Entries acknowledged.
    pub acked: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Entries written to the dead-letter stream.
    pub dead_lettered: u64,
    /// Whether reading is paused because too many entries are pending.
    pub paused: bool,
    /// Whether the group has given up (its Redis group disappeared and the
    /// policy is `fail`).
    pub failed: bool,
    /// Pending entries at the last check (including those waiting for a
    /// retry).
    pub pending: Option<u64>,
    /// Of those, entries waiting for a retry.
    pub waiting_retry: Option<u64>,
    /// Entries not yet delivered to the group, at the last check.
    pub lag: Option<u64>,
    /// Length of the dead-letter stream, at the last check.
    pub dead_letters: Option<u64>,
    /// The longest time an entry has been pending (since its delivery or
    /// last claim; entries waiting for a retry left out), in ms, at the last
    /// check: what stays high when entries are stuck, and not during a
    /// mere backlog.
    pub longest_pending_ms: Option<u64>,
    /// The age of the oldest entry not yet delivered to the group (queue
    /// latency), in ms, at the last check: what grows during a backlog.
    pub queue_latency_ms: Option<u64>,
    /// The group's `reclaim.min_idle_ms`: an entry pending longer is taken
    /// for stuck (the status page compares `longest_pending_ms` with it).
    pub min_idle_ms: u64,
    /// How long, in milliseconds, no member of the group has been running
    /// in this process; `None` while at least one runs.
    pub no_member_for_ms: Option<u64>,
}

impl GroupStatus {
    /// Consumer restarts, all members together.
    pub fn restarts(&self) -> u64 {
        self.members.iter().map(|m| m.restarts).sum()
    }

    /// Whether every member's consumer is running.
    pub fn all_alive(&self) -> bool {
        self.members.iter().all(|m| m.alive)
    }

    /// How many members' consumers are running.
    pub fn running(&self) -> usize {
        self.members.iter().filter(|m| m.alive).count()
    }
}

/// The state of one member (consumer actor).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MemberStatus {
    /// The member (consumer) name.
    pub name: String,
    /// Whether its consumer is running now.
    pub alive: bool,
    /// How many times it was restarted.
    pub restarts: u64,
    /// Why it last stopped, if it did.
    pub last_error: Option<String>,
    /// Entries it holds now: handlers running and entries waiting for a
    /// place (what the group's `in_flight` bounds); 0 while it is not
    /// running.
    pub in_flight: u64,
}

/// A group of this process as every process serving it recorded itself:
/// what the status page shows of the deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupDeployment {
    /// The stream.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// Each member any process recorded, this one's included.
    pub members: Vec<DeployedMember>,
}

impl GroupDeployment {
    /// Members whose process recorded them within its lease lifetime.
    pub fn live_members(&self) -> usize {
        self.members.iter().filter(|m| m.live).count()
    }

    /// The distinct processes with a live member.
    pub fn live_processes(&self) -> usize {
        let mut processes: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.live)
            .map(|m| m.presence.process.as_str())
            .collect();
        processes.sort_unstable();
        processes.dedup();
        processes.len()
    }
}

/// One member of a [`GroupDeployment`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeployedMember {
    /// What its process recorded.
    #[serde(flatten)]
    pub presence: MemberPresence,
    /// Whether the record is fresh (written within the process's lease
    /// lifetime, by this process's clock).
    pub live: bool,
    /// How long ago it was written, in ms.
    pub seen_ago_ms: u64,
}

/// One point of a group's recent history, kept by its supervisor every
/// [`HISTORY_EVERY_MS`] for the last hour (the status page draws it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HistorySample {
    /// When, ms since the Unix epoch (this process's clock).
    pub at_ms: u64,
    /// Entries acknowledged so far (a counter).
    pub acked: u64,
    /// Entries not yet delivered.
    pub lag: Option<u64>,
    /// Length of the dead-letter stream.
    pub dead_letters: Option<u64>,
    /// Consumer restarts so far (a counter).
    pub restarts: u64,
}

/// A group's recent history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupHistory {
    /// The stream.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// Oldest first.
    pub samples: Vec<HistorySample>,
}

/// How often a group's history is sampled, in ms.
pub const HISTORY_EVERY_MS: u64 = 10_000;

/// How many samples a group keeps: an hour's.
pub const HISTORY_LEN: usize = 360;

/// What the status page shows of one group when asked: its pending entries
/// and its dead letters by reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupDetails {
    /// The stream.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// The oldest pending entries: owner, idle, attempts, next retry, type,
    /// last error.
    pub pending: Vec<crate::broker::admin::PendingEntry>,
    /// The stream's dead letters this group wrote, by reason.
    pub dead_letters: Vec<crate::dead_letters::ReasonCount>,
    /// How many of the oldest dead letters were read to count them.
    pub dead_letters_read: usize,
    /// The newest dead letters this group wrote (of those read), newest
    /// first, at most [`DETAILS_LETTERS`]: without their payload.
    pub letters: Vec<LetterSummary>,
}

/// One dead letter as the console lists it: what happened, not the
/// payload (the page may be shown to more people than the data may).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LetterSummary {
    /// Its id in the dead-letter stream (what redrive and delete take).
    pub id: String,
    /// The original entry id.
    pub origin_id: String,
    /// The event's `type`, if it had one.
    pub event_type: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Failed attempts.
    pub attempts: u32,
    /// The last error, if an attempt failed.
    pub error: Option<String>,
    /// Redrives before this letter was written.
    pub redrives: u32,
    /// When, in ms since the Unix epoch.
    pub failed_at_ms: u64,
}

impl From<&crate::dead_letters::DeadLetterEntry> for LetterSummary {
    fn from(letter: &crate::dead_letters::DeadLetterEntry) -> Self {
        LetterSummary {
            id: letter.id.clone(),
            origin_id: letter.origin_id.clone(),
            event_type: letter
                .original
                .iter()
                .find(|(name, _)| name.as_slice() == crate::wire::field::TYPE.as_bytes())
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned()),
            reason: letter.reason.clone(),
            attempts: letter.attempts,
            error: letter.error.clone(),
            redrives: letter.redrives,
            failed_at_ms: letter.failed_at_ms,
        }
    }
}

/// Most dead letters [`GroupDetails`] lists one by one.
pub const DETAILS_LETTERS: usize = 20;

/// Most pending entries [`GroupDetails`] lists.
pub const DETAILS_PENDING: usize = 100;

/// Most dead letters [`GroupDetails`] reads to count them.
pub const DETAILS_DEAD_LETTERS: usize = 1_000;

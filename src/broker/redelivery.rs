//! The pending list, for brokers that do not redeliver by themselves
//! ([`Capabilities::redelivers_itself`](super::Capabilities) false): claims
//! of idle entries and of due retries, heartbeats that check ownership, and
//! the durable attempt counts.

use std::time::Duration;

use async_trait::async_trait;

use super::{Delivery, GroupRef, MemberRef, Receipt};
use crate::error::Result;

/// Durable per-entry state of a group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryState {
    /// Failed attempts so far.
    pub attempts: u32,
    /// If waiting for a retry: how long until it is due, by the broker's
    /// clock (zero once it is due).
    pub retry_in: Option<Duration>,
}

/// One step of a reclaim scan.
#[derive(Clone, Copy, Debug)]
pub struct ClaimIdle<'a> {
    /// Only entries idle at least this long.
    pub min_idle: Duration,
    /// Where the scan is ([`CURSOR_START`](super::CURSOR_START) to begin).
    pub cursor: &'a str,
    /// At most this many entries.
    pub count: usize,
}

/// The reply of one reclaim scan step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimReply {
    /// Cursor for the next call; [`CURSOR_START`](super::CURSOR_START) when the scan wrapped.
    pub next_cursor: String,
    /// Entries now owned by the claiming member.
    pub claimed: Vec<Delivery>,
    /// Entries that were pending but whose payload is gone (`fields` is
    /// `None`); the broker already dropped them from the pending list, so
    /// they must be dead-lettered.
    pub deleted: Vec<Delivery>,
}

/// Entries taken from the retry schedule because they are due.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DueReply {
    /// Entries now owned by the claiming member, with their failed attempts.
    pub claimed: Vec<(Delivery, u32)>,
}

/// Redelivery done by the runtime on the broker's pending list.
#[async_trait]
pub trait Redelivery: Send + Sync + 'static {
    /// One reclaim step: claims for `member` entries idle at least
    /// [`ClaimIdle::min_idle`], from [`ClaimIdle::cursor`].
    async fn claim_idle(&self, member: &MemberRef, step: ClaimIdle<'_>) -> Result<ClaimReply>;

    /// Takes up to `count` entries whose retry time has come, by the
    /// broker's clock, and claims them for `member`, atomically (two
    /// processes never take the same one).
    async fn claim_due(&self, member: &MemberRef, count: usize) -> Result<DueReply>;

    /// Extends `member`'s claim on entries it is still working on, after
    /// checking it still owns each. Returns the receipts it lost.
    async fn heartbeat(&self, member: &MemberRef, receipts: &[Receipt]) -> Result<Vec<Receipt>>;

    /// The durable state of some deliveries, in the order asked.
    async fn entry_states(&self, group: &GroupRef, receipts: &[Receipt])
    -> Result<Vec<EntryState>>;
}

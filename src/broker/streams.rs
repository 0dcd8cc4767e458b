//! The core capability: groups, publishing, reading and settling.

use std::time::Duration;

use async_trait::async_trait;

use super::{Capabilities, Delivery, GroupRef, MemberRef, Receipt};
use crate::error::Result;
use crate::settings::StartFrom;
use crate::wire::{DeadLetter, OutgoingEntry};

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

/// A reader for one group member, holding its own connection (a blocking
/// read occupies the connection it runs on).
#[async_trait]
pub trait GroupReader: Send {
    /// Reads up to `count` entries.
    async fn read(&mut self, from: &ReadFrom, count: usize) -> Result<Vec<Delivery>>;

    /// What makes a blocked [`GroupReader::read`] return at once, if the
    /// backend can (Redis: `CLIENT UNBLOCK` on the reader's connection).
    /// Without one, a stopping member waits at most the block time.
    fn interrupter(&self) -> Option<std::sync::Arc<dyn Interrupt>>;
}

/// Makes one reader's blocked read return at once.
#[async_trait]
pub trait Interrupt: Send + Sync {
    /// Interrupts the read, if one is blocked; errors are the caller's to
    /// log, and a read that stays blocked ends with its block time.
    async fn interrupt(&self) -> Result<()>;
}

/// The entries one ack call settles.
#[derive(Clone, Copy, Debug, Default)]
pub struct Acks<'a> {
    /// The deliveries handled.
    pub receipts: &'a [Receipt],
    /// Of those, the ones that had failed before, whose attempt counts are
    /// forgotten in the same step.
    pub forget: &'a [Receipt],
}

/// An entry to redeliver later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    /// The delivery to retry.
    pub receipt: Receipt,
    /// Failed attempts, including the one that just failed.
    pub attempts: u32,
    /// Not before this long after the write: the broker adds it to its own
    /// clock, so the writer's wall clock plays no part.
    pub delay: Duration,
    /// The error of the attempt that failed, kept for operators (`redstream
    /// pending` shows it) until the entry is settled.
    pub error: Option<String>,
}

/// Every group needs these: creating the group, publishing, reading for a
/// member, and settling what was read.
#[async_trait]
pub trait Streams: Send + Sync + 'static {
    /// What the broker does by itself (the runtime does the rest).
    fn capabilities(&self) -> Capabilities;

    /// Creates the group (and the stream) if missing. Returns whether it was
    /// created; an existing group is success.
    async fn ensure_group(&self, group: &GroupRef, start: StartFrom) -> Result<bool>;

    /// Writes a batch in one round trip. The outer error means the whole
    /// batch's outcome is unknown (connection lost); otherwise there is one
    /// result per item, the entry id or that item's error.
    async fn publish(&self, items: &[PublishItem]) -> Result<Vec<Result<String>>>;

    /// Opens a reader with its own connection for one member; a read for
    /// new entries blocks up to `block` when there are none.
    async fn open_reader(
        &self,
        member: &MemberRef,
        block: Duration,
    ) -> Result<Box<dyn GroupReader>>;

    /// Acknowledges entries in one call, and forgets the attempt counts of
    /// [`Acks::forget`]. Returns how many were pending.
    async fn ack(&self, group: &GroupRef, acks: Acks<'_>) -> Result<u64>;

    /// Like [`Streams::ack`], then deletes from the stream each entry this
    /// call acked that no group still needs (pending in none, delivered to
    /// every one), in the same atomic step. Returns how many were acked.
    /// The default only acks.
    async fn ack_and_delete(&self, group: &GroupRef, acks: Acks<'_>) -> Result<u64> {
        self.ack(group, acks).await
    }

    /// Records failed attempts and when each may be retried, atomically:
    /// due at the broker's clock now plus the entry's delay.
    async fn schedule_retries(&self, group: &GroupRef, retries: &[RetrySchedule]) -> Result<()>;

    /// Writes dead letters to `<stream>:dlq`, acking each original (by its
    /// receipt) in the same atomic step as its letter: an original is acked
    /// only if its letter was written. Returns `(receipt, error)` for
    /// letters that could not be written; their originals stay pending.
    async fn dead_letter(
        &self,
        group: &GroupRef,
        letters: &[(Receipt, DeadLetter)],
    ) -> Result<Vec<(Receipt, String)>>;

    /// Hands entries `member` cannot finish to other members at once: they
    /// stay pending but look idle for `idle`.
    async fn release(&self, member: &MemberRef, receipts: &[Receipt], idle: Duration)
    -> Result<()>;
}

//! The broker boundary, split by capability, so that a backend implements
//! what it has and the runtime asks what it may rely on:
//!
//! | trait | what it does | the runtime uses it for |
//! |---|---|---|
//! | [`Streams`] | create a group, publish, read for a member, settle (ack, retry after a delay, dead-letter, release) | every group |
//! | [`Redelivery`] | the pending list: claim idle entries, claim due retries, heartbeats that check ownership, attempts | the reclaimer, the retry poll and ownership checks, where [`Capabilities::redelivers_itself`] is false |
//! | [`Leases`] | named leases with a token and a lifetime | member names (one live process per name) |
//! | [`Diagnostics`] | pending figures, the group count, idle-consumer removal, server report, ping, the server's clock | backpressure, gauges, health, retention checks |
//! | [`Admin`] | listing streams and groups, reading ranges, trimming | the CLI and operators |
//!
//! [`Broker`] is the sum of the first four, implemented for every type that
//! has them: [`RedisBroker`] is one. Group-scoped calls take a [`GroupRef`]
//! and member-scoped ones a [`MemberRef`]; calls with several knobs take an
//! options struct. A member's reader owns its interruption
//! ([`GroupReader::interrupter`]), so no connection detail of the backend
//! leaks into the runtime. No Redis command appears outside
//! `broker/redis/`.
//!
//! Besides the stream itself, a Redis group keeps three pieces of durable
//! state per entry, next to its pending list: the number of failed attempts,
//! the time before which it must not be retried, and (for dead letters) the
//! letter. Keeping them beside the pending list means they share its fate:
//! what survives a Redis restart survives together.
//!
//! **One clock per decision.** Times that several processes compare (when a
//! retry is due) are the broker's: a retry is written as a delay and the
//! broker turns it into a due time with its own clock, and compares due
//! times with that same clock when it hands them out. A worker whose wall
//! clock is stepped or skewed therefore retries neither early nor late.
//! Durations inside one process use the monotonic clock.

pub mod admin;
mod diagnostics;
mod leases;
mod receipt;
mod redelivery;
mod redis;
mod streams;

use std::sync::Arc;

pub use self::admin::Admin;
pub use self::diagnostics::{
    Diagnostics, MemberPresence, PENDING_SAMPLE, PendingSummary, ServerFeatures, ServerReport,
};
pub use self::leases::Leases;
pub use self::receipt::{Delivery, Receipt};
pub use self::redelivery::{ClaimIdle, ClaimReply, DueReply, EntryState, Redelivery};
pub use self::redis::RedisBroker;
pub use self::streams::{
    Acks, GroupReader, Interrupt, PublishItem, ReadFrom, RetrySchedule, Streams,
};
/// The letter [`Streams::dead_letter`] writes (its home is the wire format).
pub use crate::wire::DeadLetter;
/// The fields of one entry to write, in a [`PublishItem`].
pub use crate::wire::OutgoingEntry;

/// The id that means "from the start" in [`ReadFrom::PendingAfter`].
pub const FROM_START: &str = "0";
/// The cursor that starts (and, when returned, ends) a [`Redelivery::claim_idle`] scan.
pub const CURSOR_START: &str = "0-0";

/// A consumer group on a stream: what every group-scoped call takes. Cheap
/// to clone.
///
/// ```
/// use redstream::broker::GroupRef;
///
/// let billing = GroupRef::new("orders", "billing");
/// assert_eq!((billing.stream(), billing.name()), ("orders", "billing"));
/// assert_eq!(billing.member("billing-1").member(), "billing-1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupRef {
    stream: Arc<str>,
    name: Arc<str>,
}

impl GroupRef {
    /// The group `name` on `stream`.
    pub fn new(stream: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        GroupRef {
            stream: stream.into(),
            name: name.into(),
        }
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream's name, shared.
    pub fn stream_arc(&self) -> &Arc<str> {
        &self.stream
    }

    /// The group's name, shared.
    pub fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// A member of this group.
    pub fn member(&self, member: impl Into<Arc<str>>) -> MemberRef {
        MemberRef {
            group: self.clone(),
            member: member.into(),
        }
    }
}

/// One member (a named consumer) of a group: what member-scoped calls take.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MemberRef {
    group: GroupRef,
    member: Arc<str>,
}

impl MemberRef {
    /// Its group.
    pub fn group(&self) -> &GroupRef {
        &self.group
    }

    /// The member's name.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// The member's name, shared.
    pub fn member_arc(&self) -> &Arc<str> {
        &self.member
    }
}

/// What a backend does by itself, read by the runtime to decide what it
/// must do on top. Redis: [`Capabilities::REDIS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The broker redelivers unsettled entries by itself (an ack wait, a
    /// delayed negative ack): no reclaimer or retry poll is needed. When
    /// false, the runtime runs them through [`Redelivery`].
    pub redelivers_itself: bool,
    /// Settling can check that the member still owns the entry (Redis: the
    /// heartbeat script), so a member that lost an entry to a reclaim does
    /// not commit its effect.
    pub checks_ownership: bool,
    /// Failed-attempt counts survive a process crash (they are stored by
    /// the broker, not counted from deliveries).
    pub durable_attempts: bool,
    /// Each member has its own pending list, which it re-reads first after
    /// a restart under the same name.
    pub per_member_pending: bool,
    /// A dead letter is written and its original acked in one atomic step.
    pub atomic_dead_letter: bool,
}

impl Capabilities {
    /// Redis Streams.
    pub const REDIS: Capabilities = Capabilities {
        redelivers_itself: false,
        checks_ownership: true,
        durable_attempts: true,
        per_member_pending: true,
        atomic_dead_letter: true,
    };

    /// A broker that redelivers by itself and does nothing else the runtime
    /// relies on (every other flag false): the runtime then needs no
    /// [`Redelivery`]. A starting point for a backend's own value:
    ///
    /// ```
    /// use redstream::broker::Capabilities;
    ///
    /// let jetstream = Capabilities::SELF_REDELIVERING.with_durable_attempts(true);
    /// assert_eq!(jetstream.needing_redelivery(), None);
    /// assert!(Capabilities::REDIS.needing_redelivery().is_some());
    /// ```
    pub const SELF_REDELIVERING: Capabilities = Capabilities {
        redelivers_itself: true,
        checks_ownership: false,
        durable_attempts: false,
        per_member_pending: false,
        atomic_dead_letter: false,
    };

    /// With [`Capabilities::redelivers_itself`] set to `yes`.
    pub const fn with_redelivers_itself(mut self, yes: bool) -> Self {
        self.redelivers_itself = yes;
        self
    }

    /// With [`Capabilities::checks_ownership`] set to `yes`.
    pub const fn with_checks_ownership(mut self, yes: bool) -> Self {
        self.checks_ownership = yes;
        self
    }

    /// With [`Capabilities::durable_attempts`] set to `yes`.
    pub const fn with_durable_attempts(mut self, yes: bool) -> Self {
        self.durable_attempts = yes;
        self
    }

    /// With [`Capabilities::per_member_pending`] set to `yes`.
    pub const fn with_per_member_pending(mut self, yes: bool) -> Self {
        self.per_member_pending = yes;
        self
    }

    /// With [`Capabilities::atomic_dead_letter`] set to `yes`.
    pub const fn with_atomic_dead_letter(mut self, yes: bool) -> Self {
        self.atomic_dead_letter = yes;
        self
    }
}

/// What a processor runs on: [`Streams`], [`Leases`] and [`Diagnostics`],
/// and [`Redelivery`] where the broker has a pending list the runtime works
/// on. [`RedisBroker`] is one.
///
/// A broker that redelivers by itself, does not check ownership and keeps
/// no pending list per member (see [`Capabilities`]) answers `None` from
/// [`Broker::redelivery`] and implements nothing more; otherwise start-up
/// fails with an error naming the capability.
pub trait Broker: Streams + Leases + Diagnostics {
    /// The pending-list operations, if the broker has them.
    fn redelivery(self: Arc<Self>) -> Option<Arc<dyn Redelivery>>;

    /// The operator operations (pending entries with their details, dead
    /// letters), if the broker has them: the status page's drill-down
    /// reads through them. `None` by default.
    fn admin(self: Arc<Self>) -> Option<Arc<dyn Admin>> {
        None
    }
}

impl Capabilities {
    /// The capability that needs [`Redelivery`], if any: the reclaimer and
    /// the retry poll (the broker does not redeliver by itself), ownership
    /// checks and re-reading a member's own pending list all run on it.
    pub fn needing_redelivery(&self) -> Option<&'static str> {
        if !self.redelivers_itself {
            Some("redelivers_itself = false")
        } else if self.checks_ownership {
            Some("checks_ownership")
        } else if self.per_member_pending {
            Some("per_member_pending")
        } else {
            None
        }
    }
}

//! [`Meta`], what a handler knows about a delivery besides its payload, and
//! the ownership record that tells whether this process still owns it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;

use crate::broker::Receipt;
use crate::clock::{millis, mono_ms};
use crate::wire::Entry;

/// Whether this process still owns an entry, and when that was last
/// confirmed. A heartbeat that finds another member took the entry over
/// flips it; the handler's future is then dropped and nothing about the
/// entry is acked.
#[derive(Clone, Debug)]
pub(crate) struct Ownership(Arc<OwnershipState>);

#[derive(Debug)]
struct OwnershipState {
    /// The delivery this is about, as the broker settles it.
    receipt: Receipt,
    lost: AtomicBool,
    /// When the read or the last heartbeat found it ours, in [`mono_ms`]:
    /// an in-process duration, so a wall-clock step neither makes a fresh
    /// confirmation look stale nor a stale one look fresh.
    confirmed_ms: AtomicU64,
}

impl Ownership {
    /// Owned, as of now (the delivery was just read or claimed).
    pub(crate) fn confirmed_now(receipt: Receipt) -> Self {
        Ownership(Arc::new(OwnershipState {
            receipt,
            lost: AtomicBool::new(false),
            confirmed_ms: AtomicU64::new(mono_ms()),
        }))
    }

    /// The delivery's receipt.
    pub(crate) fn receipt(&self) -> &Receipt {
        &self.0.receipt
    }

    pub(crate) fn mark_lost(&self) {
        self.0.lost.store(true, Ordering::Release);
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.0.lost.load(Ordering::Acquire)
    }

    /// A heartbeat found the entry still ours.
    pub(crate) fn confirm(&self) {
        self.0.confirmed_ms.store(mono_ms(), Ordering::Release);
    }

    fn confirmed_ms(&self) -> u64 {
        self.0.confirmed_ms.load(Ordering::Acquire)
    }
}

/// Asks the broker which of these deliveries another member took over (and
/// extends the rest, like a heartbeat).
pub(crate) type ConfirmFn = Arc<
    dyn Fn(Vec<Receipt>) -> BoxFuture<'static, crate::error::Result<Vec<Receipt>>> + Send + Sync,
>;

/// How a member re-checks ownership before a commit, when its heartbeats
/// may have stalled (the process was stopped, the machine froze).
#[derive(Clone)]
pub(crate) struct OwnershipCheck {
    /// Confirmations older than this are checked again before a commit
    /// (1.5 heartbeat intervals, below `min_idle`).
    pub(crate) stale_after: Duration,
    pub(crate) confirm: ConfirmFn,
}

impl fmt::Debug for OwnershipCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnershipCheck")
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

/// The member an entry was delivered to.
#[derive(Debug)]
pub(crate) struct MemberInfo {
    pub(crate) stream: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) member: Arc<str>,
    pub(crate) check: Option<OwnershipCheck>,
    /// Feature `opentelemetry`: parent each `process` span on the entry's
    /// creation context (true), or only link to it.
    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) trace_parent: bool,
}

/// Longest the ownership check before a commit waits for the broker; if it
/// does not answer, the commit goes ahead (`processed_events` still keeps
/// one effect).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// Before a commit: if this member's last confirmation of some entries is
/// stale, asks the broker whether they are still ours, and marks the ones
/// another member took over as lost, so the commit leaves them out.
pub(crate) async fn confirm_stale_ownership(metas: &[Meta]) {
    let Some(check) = metas.first().and_then(|m| m.member.check.clone()) else {
        return;
    };
    let now = mono_ms();
    let limit = millis(check.stale_after);
    let stale: Vec<&Meta> = metas
        .iter()
        .filter(|m| {
            !m.ownership.is_lost() && now.saturating_sub(m.ownership.confirmed_ms()) > limit
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    let receipts = stale
        .iter()
        .map(|m| m.ownership.receipt().clone())
        .collect();
    match tokio::time::timeout(CONFIRM_TIMEOUT, (check.confirm)(receipts)).await {
        Ok(Ok(lost)) => {
            for meta in stale {
                if lost.contains(meta.ownership.receipt()) {
                    tracing::warn!(
                        stream = %meta.member.stream, group = %meta.member.group,
                        member = %meta.member.member, entry_id = meta.entry.id(),
                        "entry was taken over while this member stalled; its effect is not committed here",
                    );
                    meta.ownership.mark_lost();
                } else {
                    meta.ownership.confirm();
                }
            }
        }
        Ok(Err(e)) => tracing::debug!("ownership check before commit failed: {e}"),
        Err(_) => tracing::debug!("ownership check before commit timed out"),
    }
}

/// An entry was taken over by another member while its handler ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this member no longer owns the entry; another member took it over")]
pub struct OwnershipLost;

/// Everything about a delivery except the payload: where it came from, the
/// attempt number, and whether this process still owns it.
#[derive(Clone, Debug)]
pub struct Meta {
    entry: Arc<Entry>,
    member: Arc<MemberInfo>,
    attempt: u32,
    ownership: Ownership,
}

impl Meta {
    pub(crate) fn new(
        entry: Arc<Entry>,
        member: Arc<MemberInfo>,
        attempt: u32,
        ownership: Ownership,
    ) -> Self {
        Meta {
            entry,
            member,
            attempt,
            ownership,
        }
    }

    /// A `Meta` for calling a handler directly in unit tests.
    pub fn for_test(entry: Entry, stream: &str, group: &str, attempt: u32) -> Self {
        let receipt = Receipt::new(stream, entry.id());
        Meta::new(
            Arc::new(entry),
            Arc::new(MemberInfo {
                stream: stream.into(),
                group: group.into(),
                member: "test-0".into(),
                check: None,
                trace_parent: true,
            }),
            attempt,
            Ownership::confirmed_now(receipt),
        )
    }

    /// The stream the entry was read from.
    pub fn stream(&self) -> &str {
        &self.member.stream
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.member.group
    }

    /// The member (consumer name) that received it.
    pub fn member(&self) -> &str {
        &self.member.member
    }

    /// The stream entry id.
    pub fn entry_id(&self) -> &str {
        self.entry.id()
    }

    /// The event id (`id` field), if the writer set one.
    pub fn event_id(&self) -> Option<&str> {
        self.entry.event_id()
    }

    /// The event type (`type` field).
    pub fn event_type(&self) -> Option<&str> {
        self.entry.event_type()
    }

    /// The schema version the entry was written with (before upcasting).
    pub fn version(&self) -> u32 {
        self.entry.version()
    }

    /// Which attempt this is, from 1. Survives restarts of the process and
    /// (with persistence) of Redis; a crash of the consumer does not count.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Publish time (`ts` field).
    pub fn published_at(&self) -> Option<SystemTime> {
        self.entry
            .published_at_ms()
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The ordering key (`key` field).
    pub fn key(&self) -> Option<&str> {
        self.entry.key()
    }

    /// The W3C trace context (`traceparent` field).
    pub fn traceparent(&self) -> Option<&str> {
        self.entry.traceparent()
    }

    /// The key that makes the effect idempotent: the event id, or
    /// `<stream>/<entry id>` for entries written without one.
    pub fn idempotency_key(&self) -> String {
        self.entry.idempotency_key(self.stream())
    }

    /// The whole entry, raw fields included.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// `Err(OwnershipLost)` if another member took the entry over; call it
    /// right before committing an effect.
    pub fn ensure_owned(&self) -> Result<(), OwnershipLost> {
        if self.ownership.is_lost() {
            Err(OwnershipLost)
        } else {
            Ok(())
        }
    }
}

impl Meta {
    /// The tracing span of one entry's handling (`outcome` is recorded when
    /// it ends, with [`record_outcome`]).
    #[cfg(not(feature = "opentelemetry"))]
    pub(crate) fn span(&self) -> tracing::Span {
        // A root: each delivery is its own trace, not a child of the
        // member's long-lived span that is current where it starts.
        tracing::info_span!(
            parent: None,
            "redstream.entry",
            stream = %self.member.stream,
            group = %self.member.group,
            member = %self.member.member,
            entry_id = %self.entry.id(),
            event_type = self.entry.event_type().unwrap_or(""),
            attempt = self.attempt,
            outcome = tracing::field::Empty,
        )
    }

    /// The `process <stream>` span of one handler call (kind consumer,
    /// messaging conventions): linked to the entry's creation context and,
    /// unless the group only links, parented on it; otherwise a root.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn span(&self) -> tracing::Span {
        let span = tracing::info_span!(
            parent: None,
            "redstream.entry",
            otel.name = %format_args!("process {}", self.member.stream),
            otel.kind = "consumer",
            messaging.system = crate::otel::SYSTEM,
            messaging.operation.name = "process",
            messaging.operation.type = "process",
            messaging.destination.name = %self.member.stream,
            messaging.consumer.group.name = %self.member.group,
            messaging.client.id = %self.member.member,
            messaging.message.id = self.entry.event_id(),
            redstream.entry.id = %self.entry.id(),
            redstream.event.type = self.entry.event_type().unwrap_or(""),
            redstream.attempt = i64::from(self.attempt),
            redstream.outcome = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(cx) = crate::otel::entry_context(&self.entry) {
            crate::otel::add_link(&span, &cx);
            if self.member.trace_parent {
                crate::otel::set_parent(&span, cx);
            }
        }
        span
    }
}

/// Records how one handler call ended on its span (`outcome`; with the
/// feature `opentelemetry`, `redstream.outcome`, and `error.type` when it
/// failed).
pub(crate) fn record_outcome(span: &tracing::Span, outcome: &'static str, failed: bool) {
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = failed;
        span.record("outcome", outcome);
    }
    #[cfg(feature = "opentelemetry")]
    {
        span.record("redstream.outcome", outcome);
        if failed {
            crate::otel::record_error(span, outcome);
        }
    }
}

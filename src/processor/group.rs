//! [`Group`]: a consumer group to run, and how its settings resolve.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::group::{GroupOptions, RestartPolicy};
use crate::handler::{ErasedHandler, Handler, RetryPolicy, erase, handler_fn};
use crate::settings::{Settings, StartFrom};
use crate::store::{Store, TxHandler, erase_tx};

/// A consumer group to run in this process: a stream, a group name and the
/// handler for its entries, with optional overrides of the `[consumer]` and
/// `[retry]` settings.
///
/// ```
/// use std::time::Duration;
/// use redstream::{handler_fn, Group, Meta, Outcome, RetryPolicy};
///
/// let group = Group::new("orders", "billing", handler_fn(|_: serde_json::Value, _: Meta| async {
///     Ok(Outcome::Ack)
/// }))
/// .with_members(4)
/// .with_retry(RetryPolicy::default().with_max_attempts(8).with_initial_delay(Duration::from_secs(2)));
/// # let _ = group;
/// ```
pub struct Group {
    pub(super) stream: String,
    pub(super) group: String,
    pub(super) handler: ErasedHandler,
    pub(super) store: Option<Store>,
    pub(super) members: Option<usize>,
    pub(super) in_flight: Option<usize>,
    pub(super) count: Option<usize>,
    pub(super) max_pending: Option<u64>,
    pub(super) start_from: Option<StartFrom>,
    pub(super) retry: Option<RetryPolicy>,
    pub(super) min_idle: Option<Duration>,
    pub(super) trace_parent: bool,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// A group named `group` reading `stream` with `handler`.
    pub fn new<H: Handler>(
        stream: impl Into<String>,
        group: impl Into<String>,
        handler: H,
    ) -> Self {
        Group {
            stream: stream.into(),
            group: group.into(),
            handler: erase(handler),
            store: None,
            members: None,
            in_flight: None,
            count: None,
            max_pending: None,
            start_from: None,
            retry: None,
            min_idle: None,
            trace_parent: true,
        }
    }

    /// A group whose handler writes through a database transaction, with
    /// exactly one effect per event (see [`TxHandler`]). Entries of one read
    /// share a transaction (up to `database.batch_size`).
    pub fn transactional<H: TxHandler>(
        stream: impl Into<String>,
        group: impl Into<String>,
        store: &Store,
        handler: H,
    ) -> Self {
        let mut g = Group::new(
            stream,
            group,
            handler_fn(|_: serde_json::Value, _: crate::Meta| async { Ok(crate::Outcome::Ack) }),
        );
        g.handler = erase_tx(store.clone(), handler);
        g.store = Some(store.clone());
        g
    }

    /// Members in this process (default `consumer.members`).
    pub fn with_members(mut self, n: usize) -> Self {
        self.members = Some(n);
        self
    }

    /// Handlers running at once per member (default `consumer.in_flight`).
    pub fn with_in_flight(mut self, n: usize) -> Self {
        self.in_flight = Some(n);
        self
    }

    /// Entries per read (default `consumer.count`).
    pub fn with_count(mut self, n: usize) -> Self {
        self.count = Some(n);
        self
    }

    /// Pending bound above which reading pauses, 0 for none (default
    /// `consumer.max_pending`).
    pub fn with_max_pending(mut self, n: u64) -> Self {
        self.max_pending = Some(n);
        self
    }

    /// Where the group starts if it does not exist (default
    /// `consumer.start_from`).
    pub fn with_start_from(mut self, start: StartFrom) -> Self {
        self.start_from = Some(start);
        self
    }

    /// Retry and dead-letter policy (default from `[retry]`).
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Idle time after which entries are reclaimed (default
    /// `reclaim.min_idle_ms`). A heartbeat period longer than half of it is
    /// cut to a third of it.
    pub fn with_min_idle(mut self, d: Duration) -> Self {
        self.min_idle = Some(d);
        self
    }

    /// Feature `opentelemetry`: each `process` span only links to the
    /// creation context its entry carries instead of being its child, so
    /// that every delivery starts its own trace (the default parents it on
    /// the creation context, one trace from publish to handler).
    #[cfg(feature = "opentelemetry")]
    pub fn with_trace_links_only(mut self) -> Self {
        self.trace_parent = false;
        self
    }

    /// The stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The group name.
    pub fn name(&self) -> &str {
        &self.group
    }

    pub(super) fn resolve(&self, s: &Settings, instance: &str) -> Result<GroupOptions> {
        let key = |k: &str| format!("group `{}` on `{}`: {k}", self.group, self.stream);
        let members = self.members.unwrap_or(s.consumer.members);
        let in_flight = self.in_flight.unwrap_or(s.consumer.in_flight);
        let count = self.count.unwrap_or(s.consumer.count);
        for (name, value) in [
            ("members", members),
            ("in_flight", in_flight),
            ("count", count),
        ] {
            if value == 0 {
                return Err(Error::settings(key(name), "must be at least 1"));
            }
        }
        if self.stream.is_empty() || self.group.is_empty() {
            return Err(Error::settings(
                key("name"),
                "stream and group must not be empty",
            ));
        }
        let min_idle = self
            .min_idle
            .unwrap_or(Duration::from_millis(s.reclaim.min_idle_ms));
        let mut heartbeat = Duration::from_millis(s.reclaim.heartbeat_ms);
        if heartbeat * 2 > min_idle {
            heartbeat = min_idle / 3;
        }
        Ok(GroupOptions {
            member_names: (0..members)
                .map(|i| Arc::from(format!("{instance}-{i}")))
                .collect(),
            count,
            in_flight,
            block: Duration::from_millis(s.consumer.block_ms),
            max_pending: self.max_pending.unwrap_or(s.consumer.max_pending),
            pending_check: Duration::from_millis(s.consumer.pending_check_ms),
            start_from: self.start_from.unwrap_or(s.consumer.start_from),
            on_missing_group: s.consumer.on_missing_group,
            retry: self
                .retry
                .clone()
                .unwrap_or_else(|| RetryPolicy::from(&s.retry)),
            min_idle,
            reclaim_interval: Duration::from_millis(s.reclaim.interval_ms),
            reclaim_count: s.reclaim.count,
            retry_poll: Duration::from_millis(s.reclaim.retry_poll_ms),
            heartbeat,
            lease_ttl: Duration::from_millis(s.reclaim.lease_ttl_ms),
            remove_idle_consumers: Duration::from_millis(s.reclaim.remove_idle_consumers_ms),
            restart: RestartPolicy {
                min: Duration::from_millis(s.supervision.restart_min_ms),
                max: Duration::from_millis(s.supervision.restart_max_ms),
                healthy_run: RestartPolicy::HEALTHY_RUN,
            },
            unready_after: Duration::from_millis(s.supervision.unready_after_ms),
            shutdown_deadline: Duration::from_millis(s.shutdown.deadline_ms),
            // Decided at start-up, once the stream's groups are known.
            delete_acked: false,
            trace_parent: self.trace_parent,
        })
    }
}

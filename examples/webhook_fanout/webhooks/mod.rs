//! The webhook fan-out domain: endpoints and their subscriptions, Standard
//! Webhooks signatures, the three groups on the order stream, the
//! per-endpoint delivery groups, and the tables they write. Shared by the
//! example's binary and the integration tests.
//!
//! ```text
//! orders ──┬── webhook-delivery    (TxHandler) ── outbox: one entry per subscribed endpoint ──▶ orders:webhooks:<endpoint>
//!          ├── analytics-pipeline  (TxHandler) ── analytics_event_counts (type, hour) += 1
//!          └── notification-sender (TxHandler) ── notifications: one row per order
//!
//! orders:webhooks:<endpoint> ── webhook-delivery (Deliverer) ── HTTP POST ──▶ endpoint
//!                                                    └── webhook_deliveries: one row per attempt
//! ```
//!
//! Why one delivery stream per endpoint: a retry of endpoint A re-sends to
//! A only, and A's retries, timeouts and dead letters live in A's stream,
//! pending list and `:dlq`, so a failing endpoint never holds the consumers
//! or the backlog of a healthy one.
//!
//! Endpoints live in the table `webhook_endpoints` and are read through an
//! [`EndpointCache`], refreshed every few seconds: the fan-out and every
//! delivery read the cache, so a changed URL, secret, subscription or
//! timeout, or a disabled endpoint, takes effect at the next refresh. An
//! endpoint that appears gets its delivery group started by the
//! [`EndpointWatcher`] (added to the running processor), also at the next
//! refresh. Rows that do not validate are logged and skipped.
//!
//! The parts, one file each:
//!
//! - `endpoint`: an [`Endpoint`], its subscription, secret and checks;
//! - `signing`: the Standard Webhooks signature ([`sign`](signing::sign),
//!   [`verify`]);
//! - `tables`: the example's tables and their creation;
//! - `registry`: `webhook_endpoints` rows in and out (add, enable or
//!   disable, load) and the [`EndpointCache`] over them;
//! - `fan_out`: the three handlers on the order stream;
//! - `delivery`: the HTTP attempt of one delivery and what its answer
//!   means (ack, retry, dead letter);
//! - `groups`: the [`Wiring`] that makes the groups;
//! - `watcher`: the [`EndpointWatcher`] that starts the groups of new
//!   endpoints.

use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) mod delivery;
pub(crate) mod endpoint;
pub(crate) mod fan_out;
pub(crate) mod groups;
pub(crate) mod registry;
pub(crate) mod signing;
pub(crate) mod tables;
pub(crate) mod watcher;

pub(crate) use endpoint::{Endpoint, parse_event_types};
pub(crate) use groups::Wiring;
pub(crate) use registry::{
    EndpointCache, endpoint_from_row, set_endpoint_enabled, upsert_endpoint,
};
pub(crate) use signing::verify;
pub(crate) use tables::{attempt_row, create_tables, endpoint_row, event_count, notification};
pub(crate) use watcher::EndpointWatcher;

/// The group on the order stream that fans events out to endpoints; also
/// the group name on every per-endpoint delivery stream.
pub(crate) const WEBHOOK_GROUP: &str = "webhook-delivery";
/// The group that counts events per type and hour.
pub(crate) const ANALYTICS_GROUP: &str = "analytics-pipeline";
/// The group that records one notification per order.
pub(crate) const NOTIFICATION_GROUP: &str = "notification-sender";
/// An order was placed (the order example's contract).
pub(crate) const ORDER_CREATED: &str = "order.created";
/// The event type of the entries on a delivery stream.
pub(crate) const DELIVERY_EVENT: &str = "webhook.delivery";

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// The delivery stream of one endpoint: `<source>:webhooks:<endpoint>`.
pub(crate) fn delivery_stream(source: &str, endpoint: &str) -> String {
    format!("{source}:webhooks:{endpoint}")
}

/// Now, in ms since the epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use redstream::{
    Event, Group, Handler, HandlerResult, Meta, Outcome, RetryPolicy, Store, TxHandler, enqueue,
};
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::{ExprTrait, Index, OnConflict};
use sea_orm::{ConnectionTrait, DatabaseTransaction, Schema, Set};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

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
/// Requests that answer with a longer `Retry-After` wait this long at most.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// The delivery stream of one endpoint: `<source>:webhooks:<endpoint>`.
pub(crate) fn delivery_stream(source: &str, endpoint: &str) -> String {
    format!("{source}:webhooks:{endpoint}")
}

/// A webhook endpoint and the event types it subscribes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    /// A short name (`[a-z0-9_-]`), part of its delivery stream's key.
    pub(crate) name: String,
    /// Where deliveries are POSTed.
    pub(crate) url: String,
    /// The signing secret, `whsec_<base64>` as in Standard Webhooks.
    pub(crate) secret: String,
    /// Event types delivered to it; `*` for all.
    pub(crate) event_types: Vec<String>,
    /// Per-request timeout in milliseconds (connect to last byte).
    #[serde(default = "default_timeout_ms")]
    pub(crate) timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5_000
}

impl Endpoint {
    /// Whether events of this type go to this endpoint.
    pub(crate) fn subscribes(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|t| t == "*" || t == event_type)
    }

    /// The HMAC key: the base64 after `whsec_`.
    pub(crate) fn key(&self) -> Result<Vec<u8>, String> {
        let encoded = self.secret.strip_prefix("whsec_").unwrap_or(&self.secret);
        BASE64
            .decode(encoded)
            .map_err(|e| format!("endpoint `{}`: secret is not base64: {e}", self.name))
    }

    /// The per-request timeout.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Checks names (unique, usable in a key), URLs and secrets.
pub(crate) fn validate_endpoints(endpoints: &[Endpoint]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for e in endpoints {
        let ok_name = !e.name.is_empty()
            && e.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !ok_name {
            return Err(format!(
                "endpoint name `{}` must be non-empty [a-z0-9_-]",
                e.name
            ));
        }
        if !seen.insert(e.name.as_str()) {
            return Err(format!("endpoint `{}` is configured twice", e.name));
        }
        let url = reqwest::Url::parse(&e.url)
            .map_err(|err| format!("endpoint `{}`: bad url `{}`: {err}", e.name, e.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("endpoint `{}`: url must be http(s)", e.name));
        }
        if e.key()?.is_empty() {
            return Err(format!("endpoint `{}`: empty secret", e.name));
        }
        if e.timeout_ms == 0 {
            return Err(format!(
                "endpoint `{}`: timeout_ms must be positive",
                e.name
            ));
        }
    }
    Ok(())
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, the Standard
/// Webhooks signature.
pub(crate) fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|e| format!("hmac key: {e}"))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
}

/// Whether one of the space-separated `v1,<sig>` in `header` is the
/// signature of this message (constant-time comparison).
pub(crate) fn verify(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    header.split(' ').any(|candidate| {
        let Some(sig) = candidate.strip_prefix("v1,") else {
            return false;
        };
        let Ok(sig) = BASE64.decode(sig) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            return false;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    })
}

/// One entry on a delivery stream: a source event for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Delivery {
    /// The source event's id: the `webhook-id`, the same for every endpoint
    /// and every attempt, so receivers can deduplicate.
    pub(crate) webhook_id: String,
    /// The endpoint it is for.
    pub(crate) endpoint: String,
    /// The source event's type.
    pub(crate) event_type: String,
    /// When the source event was published, ms since the epoch.
    pub(crate) published_at_ms: i64,
    /// The exact JSON that is signed and POSTed.
    pub(crate) body: String,
}

/// `webhook_deliveries`: one row per delivery attempt.
pub(crate) mod attempt_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_deliveries")]
    pub(crate) struct Model {
        #[sea_orm(primary_key)]
        pub(crate) id: i64,
        /// The source event id (`webhook-id`).
        pub(crate) event_id: String,
        pub(crate) endpoint: String,
        /// From 1.
        pub(crate) attempt: i32,
        /// The HTTP status, when there was an answer.
        pub(crate) status_code: Option<i32>,
        /// The error (connect, timeout, …) or a short description of a
        /// non-2xx answer.
        pub(crate) error: Option<String>,
        pub(crate) latency_ms: i64,
        /// `delivered`, `retry`, `rejected` (dead-lettered at once) or
        /// `exhausted` (dead-lettered after the last attempt).
        pub(crate) outcome: String,
        /// When the attempt started, ms since the epoch.
        pub(crate) attempted_at: i64,
        /// When the source event was published, ms since the epoch.
        pub(crate) published_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `analytics_event_counts`: events per type and hour.
pub(crate) mod event_count {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "analytics_event_counts")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) event_type: String,
        /// The hour's start, seconds since the epoch.
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) hour_start: i64,
        pub(crate) events: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `notifications`: one per order.
pub(crate) mod notification {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "notifications")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) order_id: String,
        pub(crate) customer_id: String,
        pub(crate) message: String,
        /// The source event id.
        pub(crate) event_id: String,
        pub(crate) created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Creates the example's tables if they do not exist.
pub(crate) async fn create_tables(db: &DatabaseConnection) -> Result<(), DbErr> {
    let schema = Schema::new(db.get_database_backend());
    let mut attempts = schema.create_table_from_entity(attempt_row::Entity);
    let mut counts = schema.create_table_from_entity(event_count::Entity);
    let mut notes = schema.create_table_from_entity(notification::Entity);
    for create in [&mut attempts, &mut counts, &mut notes] {
        create.if_not_exists();
        db.execute(&*create).await?;
    }
    let index = Index::create()
        .if_not_exists()
        .name("idx_webhook_deliveries_event")
        .table(attempt_row::Entity)
        .col(attempt_row::Column::EventId)
        .col(attempt_row::Column::Endpoint)
        .to_owned();
    db.execute(&index).await?;
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn published_ms(meta: &Meta) -> i64 {
    meta.entry()
        .published_at_ms()
        .map(|ms| ms as i64)
        .unwrap_or_else(now_ms)
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `webhook-delivery` on the order stream: one delivery entry per subscribed
/// endpoint, written through the outbox in the same transaction as the
/// event's processed key, so each (event, endpoint) is fanned out once.
pub(crate) struct Router {
    /// The order stream (delivery streams are named after it).
    pub(crate) source: String,
    pub(crate) endpoints: Arc<[Endpoint]>,
}

impl TxHandler for Router {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        data: serde_json::Value,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let Some(event_type) = meta.event_type() else {
            return Ok(Outcome::dead_letter("no event type: nothing to route by"));
        };
        let webhook_id = meta.idempotency_key();
        let published_at_ms = published_ms(meta);
        // The Standard Webhooks payload shape: type, timestamp, data.
        let body = serde_json::to_string(&serde_json::json!({
            "type": event_type,
            "timestamp": rfc3339(published_at_ms),
            "data": data,
        }))?;
        for endpoint in self.endpoints.iter().filter(|e| e.subscribes(event_type)) {
            let delivery = Delivery {
                webhook_id: webhook_id.clone(),
                endpoint: endpoint.name.clone(),
                event_type: event_type.to_owned(),
                published_at_ms,
                body: body.clone(),
            };
            let event = Event::new(DELIVERY_EVENT, &delivery)?
                .with_id(format!("{webhook_id}:{}", endpoint.name))
                .with_key(endpoint.name.clone());
            enqueue(tx, &delivery_stream(&self.source, &endpoint.name), event).await?;
        }
        Ok(Outcome::Ack)
    }
}

/// `analytics-pipeline`: counts events per type and hour of publication.
pub(crate) struct Analytics;

impl TxHandler for Analytics {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        _data: serde_json::Value,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let event_type = meta.event_type().unwrap_or("unknown").to_owned();
        let hour_start = published_ms(meta) / 1000 / 3600 * 3600;
        let row = event_count::ActiveModel {
            event_type: Set(event_type),
            hour_start: Set(hour_start),
            events: Set(1),
        };
        let bump = OnConflict::columns([
            event_count::Column::EventType,
            event_count::Column::HourStart,
        ])
        .value(
            event_count::Column::Events,
            Expr::col((event_count::Entity, event_count::Column::Events)).add(1),
        )
        .to_owned();
        event_count::Entity::insert(row)
            .on_conflict(bump)
            .exec_without_returning(tx)
            .await?;
        Ok(Outcome::Ack)
    }
}

/// The part of `order.created` the notification needs.
#[derive(Deserialize)]
struct PlacedOrder {
    order_id: String,
    customer_id: String,
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

/// `notification-sender`: one notification per order (the same order in
/// two events still gets one). Other event types are acked.
pub(crate) struct Notifications;

impl TxHandler for Notifications {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        data: serde_json::Value,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        if meta.event_type() != Some(ORDER_CREATED) {
            return Ok(Outcome::Ack);
        }
        let order: PlacedOrder = match serde_json::from_value(data) {
            Ok(o) => o,
            Err(e) => return Ok(Outcome::dead_letter(format!("not an order: {e}"))),
        };
        if order.order_id.trim().is_empty() || order.customer_id.trim().is_empty() {
            return Ok(Outcome::dead_letter("order_id or customer_id is empty"));
        }
        let row = notification::ActiveModel {
            message: Set(format!(
                "Thank you for order {} ({} items)",
                order.order_id,
                order.items.len()
            )),
            order_id: Set(order.order_id),
            customer_id: Set(order.customer_id),
            event_id: Set(meta.idempotency_key()),
            created_at: Set(now_ms()),
        };
        notification::Entity::insert(row)
            .on_conflict_do_nothing_on([notification::Column::OrderId])
            .exec_without_returning(tx)
            .await?;
        Ok(Outcome::Ack)
    }
}

/// What one HTTP attempt gave.
#[derive(Debug)]
struct Answer {
    status: Option<u16>,
    error: Option<String>,
    retry_after: Option<Duration>,
}

/// A `Retry-After` value: seconds, or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The per-endpoint delivery handler: POSTs the signed body, records the
/// attempt, and decides.
///
/// | answer | outcome |
/// |---|---|
/// | 2xx | delivered (ack) |
/// | connect error, timeout, 5xx, 429 | retry after `max(backoff, Retry-After)`; after the last attempt, dead letter `max_attempts_exceeded` with the last error |
/// | any other status (3xx, 4xx) | dead letter at once: `rejected: http_<status>: …` |
pub(crate) struct Deliverer {
    endpoint: Endpoint,
    key: Vec<u8>,
    client: reqwest::Client,
    store: Store,
    policy: RetryPolicy,
}

impl Deliverer {
    pub(crate) fn new(
        endpoint: Endpoint,
        store: Store,
        policy: RetryPolicy,
    ) -> Result<Self, AnyError> {
        let key = endpoint.key()?;
        let client = reqwest::Client::builder()
            // A webhook answers where it was sent; a redirect is not followed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("redstream-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Deliverer {
            endpoint,
            key,
            client,
            store,
            policy,
        })
    }

    async fn post(&self, d: &Delivery, timestamp: i64) -> Result<Answer, AnyError> {
        let signature = sign(&self.key, &d.webhook_id, timestamp, d.body.as_bytes())?;
        let sent = self
            .client
            .post(&self.endpoint.url)
            .timeout(self.endpoint.timeout())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &d.webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header("webhook-event-type", &d.event_type)
            .body(d.body.clone())
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "request"
                };
                return Ok(Answer {
                    status: None,
                    error: Some(format!("{kind}: {e}")),
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if status.is_success() {
            // Read the body so the connection is reused; its content is ignored.
            let _ = response.bytes().await;
            return Ok(Answer {
                status: Some(status.as_u16()),
                error: None,
                retry_after: None,
            });
        }
        let text = response.text().await.unwrap_or_default();
        let snippet: String = text.chars().take(200).collect();
        Ok(Answer {
            status: Some(status.as_u16()),
            error: Some(format!("HTTP {status}: {snippet}").trim_end().to_owned()),
            retry_after,
        })
    }
}

impl Handler for Deliverer {
    type Event = Delivery;

    async fn handle(&self, d: Delivery, meta: Meta) -> HandlerResult {
        if d.endpoint != self.endpoint.name {
            return Ok(Outcome::dead_letter(format!(
                "misrouted: for endpoint `{}`, read from `{}`",
                d.endpoint,
                meta.stream()
            )));
        }
        let attempted_at = now_ms();
        let started = Instant::now();
        let answer = self.post(&d, attempted_at / 1000).await?;
        let latency = started.elapsed();
        let last = meta.attempt() >= self.policy.max_attempts;
        let error = answer.error.clone().unwrap_or_default();
        let (label, result): (&str, HandlerResult) = match answer.status {
            Some(s) if (200..300).contains(&s) => ("delivered", Ok(Outcome::Ack)),
            None | Some(429) | Some(500..=599) if last => {
                // The library dead-letters it (`max_attempts_exceeded`),
                // keeping this as the last error.
                ("exhausted", Err(error.clone().into()))
            }
            None | Some(429) | Some(500..=599) => {
                let backoff = self.policy.delay_for(meta.attempt());
                let delay = match answer.retry_after {
                    Some(asked) => asked.min(MAX_RETRY_AFTER).max(backoff),
                    None => backoff,
                };
                ("retry", Ok(Outcome::retry_after(delay)))
            }
            Some(s) => (
                "rejected",
                Ok(Outcome::dead_letter(format!(
                    "http_{s}: endpoint `{}` refused the delivery: {error}",
                    self.endpoint.name
                ))),
            ),
        };
        let row = attempt_row::ActiveModel {
            event_id: Set(d.webhook_id.clone()),
            endpoint: Set(self.endpoint.name.clone()),
            attempt: Set(meta.attempt() as i32),
            status_code: Set(answer.status.map(i32::from)),
            error: Set(answer.error),
            latency_ms: Set(latency.as_millis() as i64),
            outcome: Set(label.to_owned()),
            attempted_at: Set(attempted_at),
            published_at: Set(d.published_at_ms),
            ..Default::default()
        };
        // An attempt that cannot be recorded is retried: the receiver may
        // see it twice (same `webhook-id`), the record has no gap.
        attempt_row::Entity::insert(row)
            .exec_without_returning(self.store.connection())
            .await?;
        tracing::debug!(endpoint = %self.endpoint.name, event = %d.webhook_id, attempt = meta.attempt(), outcome = label, "webhook attempt");
        result
    }
}

/// How the groups run: members and in-flight bounds, retry policy.
#[derive(Clone, Debug)]
pub(crate) struct Wiring {
    /// The order stream.
    pub(crate) source: String,
    pub(crate) endpoints: Arc<[Endpoint]>,
    /// The delivery retry policy (attempts, backoff, jitter).
    pub(crate) policy: RetryPolicy,
    /// Members per group.
    pub(crate) members: usize,
    /// Concurrent requests per delivery member.
    pub(crate) in_flight: usize,
}

impl Wiring {
    /// The three groups on the order stream.
    pub(crate) fn fan_out_groups(&self, store: &Store) -> Vec<Group> {
        let router = Router {
            source: self.source.clone(),
            endpoints: Arc::clone(&self.endpoints),
        };
        vec![
            Group::transactional(&self.source, WEBHOOK_GROUP, store, router)
                .with_members(self.members),
            Group::transactional(&self.source, ANALYTICS_GROUP, store, Analytics)
                .with_members(self.members),
            Group::transactional(&self.source, NOTIFICATION_GROUP, store, Notifications)
                .with_members(self.members),
        ]
    }

    /// One delivery group per endpoint, each on its own stream.
    pub(crate) fn delivery_groups(&self, store: &Store) -> Result<Vec<Group>, AnyError> {
        validate_endpoints(&self.endpoints)?;
        let mut groups = Vec::with_capacity(self.endpoints.len());
        for endpoint in self.endpoints.iter() {
            // Entries must outlive a request in flight before a reclaim.
            let min_idle = (endpoint.timeout() * 3).max(Duration::from_secs(10));
            let deliverer = Deliverer::new(endpoint.clone(), store.clone(), self.policy.clone())?;
            groups.push(
                Group::new(
                    delivery_stream(&self.source, &endpoint.name),
                    WEBHOOK_GROUP,
                    deliverer,
                )
                .with_members(self.members)
                .with_in_flight(self.in_flight)
                .with_retry(self.policy.clone())
                .with_min_idle(min_idle),
            );
        }
        Ok(groups)
    }

    /// The streams this wiring reads: the order stream and every delivery
    /// stream.
    pub(crate) fn streams(&self) -> Vec<String> {
        std::iter::once(self.source.clone())
            .chain(
                self.endpoints
                    .iter()
                    .map(|e| delivery_stream(&self.source, &e.name)),
            )
            .collect()
    }
}

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
//! [`EndpointWatcher`] (a small processor of its own), also at the next
//! refresh. Rows that do not validate are logged and skipped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use redstream::{
    Event, Group, Handler, HandlerResult, Meta, Outcome, Processor, RetryPolicy, Settings, Store,
    TxHandler, enqueue,
};
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::{ExprTrait, Index, OnConflict};
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryOrder, Schema, Set};
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
    /// A disabled endpoint gets no new deliveries; what is queued for it is
    /// dead-lettered (`endpoint_disabled`).
    #[serde(default = "enabled_by_default")]
    pub(crate) enabled: bool,
    /// When the endpoint was added, ms since the epoch: it gets only events
    /// published at or after this.
    #[serde(default)]
    pub(crate) created_at_ms: i64,
}

fn default_timeout_ms() -> u64 {
    5_000
}

fn enabled_by_default() -> bool {
    true
}

impl Endpoint {
    /// An enabled endpoint that gets every event published (created at 0).
    pub(crate) fn new(
        name: impl Into<String>,
        url: impl Into<String>,
        secret: impl Into<String>,
        event_types: Vec<String>,
        timeout_ms: u64,
    ) -> Endpoint {
        Endpoint {
            name: name.into(),
            url: url.into(),
            secret: secret.into(),
            event_types,
            timeout_ms,
            enabled: true,
            created_at_ms: 0,
        }
    }

    /// Whether the fan-out sends this event to this endpoint: enabled,
    /// subscribed to the type, and the event is not older than the
    /// endpoint.
    pub(crate) fn wants(&self, event_type: &str, published_at_ms: i64) -> bool {
        self.enabled && self.subscribes(event_type) && published_at_ms >= self.created_at_ms
    }

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

/// Checks one endpoint: a name usable in a key, an http(s) URL, a
/// non-empty base64 secret, at least one event type, a positive timeout.
pub(crate) fn validate_endpoint(e: &Endpoint) -> Result<(), String> {
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
    let url = reqwest::Url::parse(&e.url)
        .map_err(|err| format!("endpoint `{}`: bad url `{}`: {err}", e.name, e.url))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "endpoint `{}`: bad url `{}`: must be http(s)",
            e.name, e.url
        ));
    }
    if e.key()?.is_empty() {
        return Err(format!("endpoint `{}`: empty secret", e.name));
    }
    if e.event_types.is_empty() || e.event_types.iter().any(|t| t.trim().is_empty()) {
        return Err(format!(
            "endpoint `{}`: needs at least one event type (`*` for all), none empty",
            e.name
        ));
    }
    if e.timeout_ms == 0 {
        return Err(format!(
            "endpoint `{}`: timeout_ms must be positive",
            e.name
        ));
    }
    Ok(())
}

/// Checks every endpoint and that no name is used twice.
pub(crate) fn validate_endpoints(endpoints: &[Endpoint]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for e in endpoints {
        validate_endpoint(e)?;
        if !seen.insert(e.name.as_str()) {
            return Err(format!("endpoint `{}` is configured twice", e.name));
        }
    }
    Ok(())
}

/// Event types from the table or the command line: a JSON array
/// (`["order.created"]`) or a comma list (`order.created, order.cancelled`);
/// `*` for all. Empty items are an error, as is an empty list.
pub(crate) fn parse_event_types(text: &str) -> Result<Vec<String>, String> {
    let text = text.trim();
    let items: Vec<String> = if text.starts_with('[') {
        serde_json::from_str::<Vec<String>>(text)
            .map_err(|e| format!("event types `{text}`: not a JSON array of strings: {e}"))?
    } else {
        text.split(',').map(str::to_owned).collect()
    };
    let items: Vec<String> = items.iter().map(|t| t.trim().to_owned()).collect();
    if items.iter().all(String::is_empty) {
        return Err("no event types: name at least one (`*` for all)".to_owned());
    }
    if items.iter().any(String::is_empty) {
        return Err(format!("event types `{text}`: an empty item"));
    }
    Ok(items)
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

/// `webhook_endpoints`: the configured endpoints, one row per name.
pub(crate) mod endpoint_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_endpoints")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) name: String,
        pub(crate) url: String,
        /// `whsec_<base64>`.
        pub(crate) secret: String,
        /// A comma list (`order.created,order.cancelled`) or a JSON array;
        /// `*` for all.
        pub(crate) event_types: String,
        pub(crate) timeout_ms: i64,
        pub(crate) enabled: bool,
        /// ms since the epoch; kept when the row is updated.
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
    let mut endpoints = schema.create_table_from_entity(endpoint_row::Entity);
    for create in [&mut attempts, &mut counts, &mut notes, &mut endpoints] {
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

/// Adds an endpoint, or replaces its URL, secret, event types, timeout and
/// enabled flag if the name exists (its `created_at` is kept). Validates
/// first: a bad endpoint is an error, nothing is written.
pub(crate) async fn upsert_endpoint<C: ConnectionTrait>(
    db: &C,
    e: &Endpoint,
) -> Result<(), AnyError> {
    validate_endpoint(e)?;
    let row = endpoint_row::ActiveModel {
        name: Set(e.name.clone()),
        url: Set(e.url.clone()),
        secret: Set(e.secret.clone()),
        event_types: Set(e.event_types.join(",")),
        timeout_ms: Set(i64::try_from(e.timeout_ms).unwrap_or(i64::MAX)),
        enabled: Set(e.enabled),
        created_at: Set(now_ms()),
    };
    let update = OnConflict::column(endpoint_row::Column::Name)
        .update_columns([
            endpoint_row::Column::Url,
            endpoint_row::Column::Secret,
            endpoint_row::Column::EventTypes,
            endpoint_row::Column::TimeoutMs,
            endpoint_row::Column::Enabled,
        ])
        .to_owned();
    endpoint_row::Entity::insert(row)
        .on_conflict(update)
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Enables or disables an endpoint; `false` when there is no such name.
pub(crate) async fn set_endpoint_enabled<C: ConnectionTrait>(
    db: &C,
    name: &str,
    enabled: bool,
) -> Result<bool, DbErr> {
    let result = endpoint_row::Entity::update_many()
        .col_expr(endpoint_row::Column::Enabled, Expr::value(enabled))
        .filter(endpoint_row::Column::Name.eq(name))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// A table row as an endpoint, checked.
pub(crate) fn endpoint_from_row(row: endpoint_row::Model) -> Result<Endpoint, String> {
    let event_types =
        parse_event_types(&row.event_types).map_err(|e| format!("endpoint `{}`: {e}", row.name))?;
    let timeout_ms = u64::try_from(row.timeout_ms).unwrap_or(0);
    let endpoint = Endpoint {
        name: row.name,
        url: row.url,
        secret: row.secret,
        event_types,
        timeout_ms,
        enabled: row.enabled,
        created_at_ms: row.created_at,
    };
    validate_endpoint(&endpoint)?;
    Ok(endpoint)
}

/// Every row of `webhook_endpoints` (disabled ones included), by name; the
/// rows that do not validate are left out and described in the second list.
pub(crate) async fn load_endpoints<C: ConnectionTrait>(
    db: &C,
) -> Result<(Vec<Endpoint>, Vec<String>), DbErr> {
    let rows = endpoint_row::Entity::find()
        .order_by_asc(endpoint_row::Column::Name)
        .all(db)
        .await?;
    let mut endpoints = Vec::with_capacity(rows.len());
    let mut problems = Vec::new();
    for row in rows {
        match endpoint_from_row(row) {
            Ok(e) => endpoints.push(e),
            Err(problem) => problems.push(problem),
        }
    }
    Ok((endpoints, problems))
}

/// The endpoints the fan-out and the deliveries use: a snapshot of
/// `webhook_endpoints` replaced by [`refresh`](Self::refresh), or a fixed
/// list.
#[derive(Clone, Debug, Default)]
pub(crate) struct EndpointCache {
    current: Arc<RwLock<Arc<[Endpoint]>>>,
    /// The invalid rows of the last refresh (logged when they change).
    problems: Arc<Mutex<Vec<String>>>,
}

impl EndpointCache {
    /// A cache that holds these endpoints until a refresh.
    #[allow(dead_code)] // the tests' endpoints
    pub(crate) fn fixed(endpoints: Vec<Endpoint>) -> EndpointCache {
        EndpointCache {
            current: Arc::new(RwLock::new(Arc::from(endpoints))),
            problems: Arc::default(),
        }
    }

    /// The endpoints now, disabled ones included.
    pub(crate) fn snapshot(&self) -> Arc<[Endpoint]> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// One endpoint now.
    pub(crate) fn get(&self, name: &str) -> Option<Endpoint> {
        self.snapshot().iter().find(|e| e.name == name).cloned()
    }

    /// Reloads the table. Invalid rows are skipped and logged (once per
    /// change) and returned; the valid ones replace the snapshot. On a
    /// database error the snapshot is kept.
    pub(crate) async fn refresh<C: ConnectionTrait>(&self, db: &C) -> Result<Vec<String>, DbErr> {
        let (endpoints, problems) = load_endpoints(db).await?;
        match self.current.write() {
            Ok(mut c) => *c = Arc::from(endpoints),
            Err(poisoned) => *poisoned.into_inner() = Arc::from(endpoints),
        }
        if let Ok(mut last) = self.problems.lock()
            && *last != problems
        {
            for p in problems.iter().filter(|p| !last.contains(p)) {
                tracing::warn!("webhook_endpoints: row skipped: {p}");
            }
            *last = problems.clone();
        }
        Ok(problems)
    }
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

/// `webhook-delivery` on the order stream: one delivery entry per enabled,
/// subscribed endpoint not newer than the event ([`Endpoint::wants`]),
/// written through the outbox in the same transaction as the event's
/// processed key, so each (event, endpoint) is fanned out once.
pub(crate) struct Router {
    /// The order stream (delivery streams are named after it).
    pub(crate) source: String,
    pub(crate) endpoints: EndpointCache,
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
        let endpoints = self.endpoints.snapshot();
        for endpoint in endpoints
            .iter()
            .filter(|e| e.wants(event_type, published_at_ms))
        {
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
///
/// The endpoint (URL, secret, timeout, enabled) is looked up in the cache
/// on every attempt, so a change takes effect at the next refresh. An
/// entry for an endpoint that is disabled or gone from the table is
/// dead-lettered (`endpoint_disabled`, `endpoint_unknown`), redrivable once
/// it is back.
pub(crate) struct Deliverer {
    name: String,
    endpoints: EndpointCache,
    client: reqwest::Client,
    store: Store,
    policy: RetryPolicy,
}

impl Deliverer {
    pub(crate) fn new(
        name: impl Into<String>,
        endpoints: EndpointCache,
        store: Store,
        policy: RetryPolicy,
    ) -> Result<Self, AnyError> {
        let client = reqwest::Client::builder()
            // A webhook answers where it was sent; a redirect is not followed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("redstream-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Deliverer {
            name: name.into(),
            endpoints,
            client,
            store,
            policy,
        })
    }

    async fn post(
        &self,
        endpoint: &Endpoint,
        d: &Delivery,
        timestamp: i64,
    ) -> Result<Answer, AnyError> {
        let signature = sign(
            &endpoint.key()?,
            &d.webhook_id,
            timestamp,
            d.body.as_bytes(),
        )?;
        let sent = self
            .client
            .post(&endpoint.url)
            .timeout(endpoint.timeout())
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
        if d.endpoint != self.name {
            return Ok(Outcome::dead_letter(format!(
                "misrouted: for endpoint `{}`, read from `{}`",
                d.endpoint,
                meta.stream()
            )));
        }
        let Some(endpoint) = self.endpoints.get(&self.name) else {
            return Ok(Outcome::dead_letter(format!(
                "endpoint_unknown: `{}` is not in webhook_endpoints (or its row is invalid)",
                self.name
            )));
        };
        if !endpoint.enabled {
            return Ok(Outcome::dead_letter(format!(
                "endpoint_disabled: `{}` is disabled",
                self.name
            )));
        }
        let attempted_at = now_ms();
        let started = Instant::now();
        let answer = self.post(&endpoint, &d, attempted_at / 1000).await?;
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
                    self.name
                ))),
            ),
        };
        let row = attempt_row::ActiveModel {
            event_id: Set(d.webhook_id.clone()),
            endpoint: Set(self.name.clone()),
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
        tracing::debug!(endpoint = %self.name, event = %d.webhook_id, attempt = meta.attempt(), outcome = label, "webhook attempt");
        result
    }
}

/// How the groups run: members and in-flight bounds, retry policy.
#[derive(Clone, Debug)]
pub(crate) struct Wiring {
    /// The order stream.
    pub(crate) source: String,
    pub(crate) endpoints: EndpointCache,
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
            endpoints: self.endpoints.clone(),
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

    /// The delivery group of one endpoint, on its own stream. It reads its
    /// stream from the beginning: entries the fan-out wrote before the
    /// group existed are delivered.
    pub(crate) fn delivery_group(
        &self,
        store: &Store,
        endpoint: &Endpoint,
    ) -> Result<Group, AnyError> {
        // Entries must outlive a request in flight before a reclaim.
        let min_idle = (endpoint.timeout() * 3).max(Duration::from_secs(10));
        let deliverer = Deliverer::new(
            endpoint.name.clone(),
            self.endpoints.clone(),
            store.clone(),
            self.policy.clone(),
        )?;
        Ok(Group::new(
            delivery_stream(&self.source, &endpoint.name),
            WEBHOOK_GROUP,
            deliverer,
        )
        .with_members(self.members)
        .with_in_flight(self.in_flight)
        .with_retry(self.policy.clone())
        .with_min_idle(min_idle)
        .with_start_from(redstream::settings::StartFrom::Beginning))
    }

    /// One delivery group per endpoint in the cache now (disabled ones
    /// too: they dead-letter what is queued for them).
    pub(crate) fn delivery_groups(&self, store: &Store) -> Result<Vec<Group>, AnyError> {
        let endpoints = self.endpoints.snapshot();
        validate_endpoints(&endpoints)?;
        endpoints
            .iter()
            .map(|e| self.delivery_group(store, e))
            .collect()
    }

    /// The streams this wiring reads: the order stream and the delivery
    /// stream of every endpoint in the cache now.
    pub(crate) fn streams(&self) -> Vec<String> {
        std::iter::once(self.source.clone())
            .chain(
                self.endpoints
                    .snapshot()
                    .iter()
                    .map(|e| delivery_stream(&self.source, &e.name)),
            )
            .collect()
    }
}

/// Refreshes the endpoint cache from `webhook_endpoints` every `every` and
/// starts the delivery group of each endpoint that appears (one small
/// [`Processor`] per new endpoint, one worker thread), so endpoints are
/// added, changed and disabled without a restart. [`stop`](Self::stop)
/// ends the refresh and shuts those processors down.
pub(crate) struct EndpointWatcher {
    task: tokio::task::JoinHandle<()>,
    started: Arc<tokio::sync::Mutex<Vec<Processor>>>,
}

impl EndpointWatcher {
    /// Starts watching. `running` names the endpoints whose delivery group
    /// already runs (started with the main processor); `settings` are those
    /// of the main processor.
    pub(crate) fn spawn(
        wiring: Wiring,
        store: Store,
        settings: Settings,
        running: impl IntoIterator<Item = String>,
        every: Duration,
    ) -> EndpointWatcher {
        let started: Arc<tokio::sync::Mutex<Vec<Processor>>> = Arc::default();
        let processors = Arc::clone(&started);
        let mut running: HashSet<String> = running.into_iter().collect();
        let mut settings = settings;
        settings.consumer.workers = 1;
        let task = actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut failed: HashMap<String, String> = HashMap::new();
            loop {
                tick.tick().await;
                if let Err(e) = wiring.endpoints.refresh(store.connection()).await {
                    tracing::warn!(
                        "webhook_endpoints: refresh failed, keeping the last endpoints: {e}"
                    );
                    continue;
                }
                for endpoint in wiring.endpoints.snapshot().iter() {
                    if running.contains(&endpoint.name) {
                        continue;
                    }
                    let started = match wiring.delivery_group(&store, endpoint) {
                        Ok(group) => Processor::builder(settings.clone())
                            .group(group)
                            .start()
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match started {
                        Ok(p) => {
                            tracing::info!(endpoint = %endpoint.name, "new webhook endpoint: delivery group started");
                            running.insert(endpoint.name.clone());
                            failed.remove(&endpoint.name);
                            processors.lock().await.push(p);
                        }
                        Err(e) => {
                            // Tried again at the next refresh; its deliveries
                            // wait in its stream meanwhile.
                            if failed.get(&endpoint.name) != Some(&e) {
                                tracing::warn!(endpoint = %endpoint.name, "cannot start the delivery group yet: {e}");
                                failed.insert(endpoint.name.clone(), e);
                            }
                        }
                    }
                }
            }
        });
        EndpointWatcher { task, started }
    }

    /// How many delivery groups were started after launch.
    #[allow(dead_code)] // checked by the tests
    pub(crate) async fn started(&self) -> usize {
        self.started.lock().await.len()
    }

    /// Stops refreshing and shuts down the delivery groups it started.
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let processors = std::mem::take(&mut *self.started.lock().await);
        for p in processors {
            if let Err(e) = p.shutdown().await {
                tracing::warn!("delivery group shutdown: {e}");
            }
        }
    }
}

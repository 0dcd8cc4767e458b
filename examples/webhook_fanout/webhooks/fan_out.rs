//! The three groups' handlers on the order stream: the fan-out to the
//! delivery streams, the analytics counts and the notifications.

use redstream::{Event, HandlerResult, Meta, Outcome, TxHandler, enqueue};
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::{ExprTrait, OnConflict};
use sea_orm::{DatabaseTransaction, Set};
use serde::Deserialize;

use super::delivery::Delivery;
use super::registry::EndpointCache;
use super::tables::{event_count, notification};
use super::{DELIVERY_EVENT, ORDER_CREATED, delivery_stream, now_ms};

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

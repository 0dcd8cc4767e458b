//! The order-processing domain: the `order.created` contract, validation,
//! the `orders` table and the exactly-once handler. Shared by the example's
//! binary and the integration tests.

use redstream::{Event, HandlerResult, Meta, Outcome, TxHandler, enqueue};
use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, DatabaseTransaction, Schema, Set, TryInsertResult};
use serde::{Deserialize, Serialize};

/// The stream orders arrive on.
pub(crate) const ORDERS_STREAM: &str = "orders";
/// The stream confirmations go to.
pub(crate) const ORDER_EVENTS_STREAM: &str = "order-events";
/// The consumer group.
pub(crate) const GROUP: &str = "order-processing";
/// The event type of an incoming order.
pub(crate) const ORDER_CREATED: &str = "order.created";
/// The event type of a confirmation.
pub(crate) const ORDER_CONFIRMED: &str = "order.confirmed";

/// `order.created`: what other services publish.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct OrderCreated {
    pub(crate) order_id: String,
    pub(crate) customer_id: String,
    pub(crate) items: Vec<Item>,
}

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Item {
    pub(crate) sku: String,
    pub(crate) qty: i64,
    pub(crate) unit_price_cents: i64,
}

/// `order.confirmed`: what this service publishes, through the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct OrderConfirmed {
    pub(crate) order_id: String,
    pub(crate) customer_id: String,
    pub(crate) total_cents: i64,
    pub(crate) item_count: i64,
}

/// The `orders` table: one row per order.
pub(crate) mod order {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) order_id: String,
        pub(crate) customer_id: String,
        pub(crate) total_cents: i64,
        pub(crate) item_count: i64,
        /// Milliseconds since the Unix epoch.
        pub(crate) created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Creates the `orders` table if it does not exist.
pub(crate) async fn create_tables(db: &DatabaseConnection) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    let mut create = Schema::new(backend).create_table_from_entity(order::Entity);
    create.if_not_exists();
    db.execute(&create).await?;
    Ok(())
}

/// Checks an order; returns its total and item count, or why it is invalid.
pub(crate) fn validate(order: &OrderCreated) -> Result<(i64, i64), String> {
    if order.order_id.trim().is_empty() {
        return Err("order_id is empty".to_owned());
    }
    if order.customer_id.trim().is_empty() {
        return Err("customer_id is empty".to_owned());
    }
    if order.items.is_empty() {
        return Err("no items".to_owned());
    }
    let mut total: i64 = 0;
    let mut count: i64 = 0;
    for item in &order.items {
        if item.qty <= 0 {
            return Err(format!(
                "item {}: qty must be positive, got {}",
                item.sku, item.qty
            ));
        }
        if item.unit_price_cents < 0 {
            return Err(format!(
                "item {}: negative price {}",
                item.sku, item.unit_price_cents
            ));
        }
        let line = item
            .qty
            .checked_mul(item.unit_price_cents)
            .ok_or_else(|| format!("item {}: total overflows", item.sku))?;
        total = total
            .checked_add(line)
            .ok_or_else(|| "order total overflows".to_owned())?;
        count += item.qty;
    }
    Ok((total, count))
}

/// The handler: one row per order id and one confirmation per order, in
/// one transaction with the event's processed key. An order id seen before
/// (in another event) is acked without a second effect.
pub(crate) struct Orders {
    /// Where confirmations go.
    pub(crate) confirmations: String,
}

impl TxHandler for Orders {
    type Event = OrderCreated;

    async fn handle(
        &self,
        order: OrderCreated,
        _meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let (total_cents, item_count) = match validate(&order) {
            Ok(totals) => totals,
            Err(reason) => return Ok(Outcome::dead_letter(reason)),
        };
        let row = order::ActiveModel {
            order_id: Set(order.order_id.clone()),
            customer_id: Set(order.customer_id.clone()),
            total_cents: Set(total_cents),
            item_count: Set(item_count),
            created_at: Set(now_ms()),
        };
        let inserted = order::Entity::insert(row)
            .on_conflict_do_nothing_on([order::Column::OrderId])
            .exec_without_returning(tx)
            .await?;
        if matches!(
            inserted,
            TryInsertResult::Conflicted | TryInsertResult::Inserted(0)
        ) {
            // The same order in another event: already done.
            return Ok(Outcome::Ack);
        }
        let confirmed = OrderConfirmed {
            order_id: order.order_id,
            customer_id: order.customer_id.clone(),
            total_cents,
            item_count,
        };
        let event = Event::new(ORDER_CONFIRMED, &confirmed)?.with_key(order.customer_id);
        enqueue(tx, &self.confirmations, event).await?;
        Ok(Outcome::Ack)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A valid order: `order_id`, customer `c-<n % 17>`, one to three items.
pub(crate) fn sample_order(order_id: &str, n: u64) -> OrderCreated {
    let items = (0..(n % 3 + 1))
        .map(|i| Item {
            sku: format!("sku-{}", (n + i) % 50),
            qty: (i + 1) as i64,
            unit_price_cents: 199 + ((n * 37 + i * 11) % 5_000) as i64,
        })
        .collect();
    OrderCreated {
        order_id: order_id.to_owned(),
        customer_id: format!("c-{}", n % 17),
        items,
    }
}

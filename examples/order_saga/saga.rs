//! The order saga's domain: the event contract, the tables (orders, the
//! books of money and stock, the step log) and the five exactly-once steps.
//! Shared by the example's binary and the integration tests.
//!
//! Every step is a [`TxHandler`]: its effect on the books, the order's new
//! state and the next event (written with [`enqueue`], the outbox) commit
//! in one transaction with the event's processed key, or not at all.

use std::collections::BTreeMap;

use redstream::{Event, HandlerResult, Meta, Outcome, TxHandler, enqueue};
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, QueryFilter, QueryOrder, Schema, Set, TransactionTrait,
    TryInsertResult,
};
use serde::{Deserialize, Serialize};

/// An order was placed (stream `<prefix>:orders`).
pub(crate) const ORDER_PLACED: &str = "order.placed";
/// Funds were reserved (stream `<prefix>:payments`).
pub(crate) const PAYMENT_RESERVED: &str = "payment.reserved";
/// Stock was reserved (stream `<prefix>:stock`).
pub(crate) const STOCK_RESERVED: &str = "stock.reserved";
/// Compensation: give the reserved funds back (stream `<prefix>:refunds`).
pub(crate) const PAYMENT_REFUNDED: &str = "payment.refunded";
/// Compensation: put the reserved stock back (stream `<prefix>:releases`).
pub(crate) const STOCK_RELEASED: &str = "stock.released";
/// Final: shipment scheduled (stream `<prefix>:order-events`).
pub(crate) const ORDER_COMPLETED: &str = "order.completed";
/// Final: every compensation done (stream `<prefix>:order-events`).
pub(crate) const ORDER_CANCELLED: &str = "order.cancelled";

/// The groups, one per step.
pub(crate) const PAYMENT: &str = "payment";
pub(crate) const INVENTORY: &str = "inventory";
pub(crate) const SHIPPING: &str = "shipping";
pub(crate) const REFUND: &str = "payment-refund";
pub(crate) const RELEASE: &str = "stock-release";

/// Order states. `completed` and `cancelled` are final.
pub(crate) const PLACED: &str = "placed";
pub(crate) const PAID: &str = "paid";
pub(crate) const STOCK_HELD: &str = "stock_reserved";
pub(crate) const CANCELLING: &str = "cancelling";
pub(crate) const COMPLETED: &str = "completed";
pub(crate) const CANCELLED: &str = "cancelled";

/// The card number the simulated gateway always declines.
pub(crate) const DECLINED_CARD: &str = "4000000000000002";
/// A card it accepts.
pub(crate) const GOOD_CARD: &str = "4242424242424242";
/// The destination no carrier serves.
pub(crate) const UNSERVED_COUNTRY: &str = "AQ";

/// The streams of one saga deployment, all under one prefix.
#[derive(Clone, Debug)]
pub(crate) struct Streams {
    pub(crate) orders: String,
    pub(crate) payments: String,
    pub(crate) stock: String,
    pub(crate) refunds: String,
    pub(crate) releases: String,
    pub(crate) order_events: String,
}

impl Streams {
    pub(crate) fn new(prefix: &str) -> Streams {
        Streams {
            orders: format!("{prefix}:orders"),
            payments: format!("{prefix}:payments"),
            stock: format!("{prefix}:stock"),
            refunds: format!("{prefix}:refunds"),
            releases: format!("{prefix}:releases"),
            order_events: format!("{prefix}:order-events"),
        }
    }

    /// (stream, group) of every step.
    pub(crate) fn groups(&self) -> [(&str, &'static str); 5] {
        [
            (&self.orders, PAYMENT),
            (&self.payments, INVENTORY),
            (&self.stock, SHIPPING),
            (&self.refunds, REFUND),
            (&self.releases, RELEASE),
        ]
    }
}

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Line {
    pub(crate) sku: String,
    pub(crate) qty: i64,
    pub(crate) unit_price_cents: i64,
}

/// The payload of every step event: the order it is about. The order's row
/// is the saga's context (lines, card, address); the events only point at it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OrderRef {
    pub(crate) order_id: String,
}

/// The payload of a compensation: the order and why it is cancelled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Compensation {
    pub(crate) order_id: String,
    pub(crate) reason: String,
}

/// The payload of `order.completed` / `order.cancelled`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OrderFinished {
    pub(crate) order_id: String,
    pub(crate) state: String,
    pub(crate) reason: Option<String>,
}

/// `saga_orders`: one row per order, its state and the saga's context.
pub(crate) mod order {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_orders")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) order_id: String,
        /// The run (a batch of orders placed together) it belongs to.
        pub(crate) run: String,
        pub(crate) customer_id: String,
        pub(crate) total_cents: i64,
        /// The lines, JSON.
        pub(crate) lines: String,
        pub(crate) card: String,
        pub(crate) country: String,
        /// `placed`, `paid`, `stock_reserved`, `cancelling`, `completed`,
        /// `cancelled`.
        pub(crate) state: String,
        /// Why it was cancelled.
        pub(crate) reason: Option<String>,
        /// Compensations published and not yet applied.
        pub(crate) compensations_pending: i64,
        /// The simulation's dice: `step=n;…`, the first n attempts of that
        /// step fail transiently (a gateway timeout).
        pub(crate) glitches: String,
        /// Milliseconds since the Unix epoch.
        pub(crate) placed_at: i64,
        pub(crate) updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `saga_accounts`: a customer's money. `initial = balance + reserved`
/// always holds.
pub(crate) mod account {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_accounts")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) customer_id: String,
        pub(crate) run: String,
        pub(crate) initial_cents: i64,
        /// Available to spend.
        pub(crate) balance_cents: i64,
        /// Held for orders (completed ones, and those not yet refunded).
        pub(crate) reserved_cents: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `saga_stock`: a SKU's units. `initial = on_hand + reserved` always holds.
pub(crate) mod stock {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_stock")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) sku: String,
        pub(crate) run: String,
        pub(crate) initial_units: i64,
        pub(crate) on_hand: i64,
        pub(crate) reserved: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `saga_payments`: one row per order that reached the payment step.
pub(crate) mod payment {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_payments")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) order_id: String,
        pub(crate) customer_id: String,
        pub(crate) amount_cents: i64,
        /// `reserved`, `declined` or `refunded`.
        pub(crate) status: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `saga_stock_lines`: the units reserved per (order, SKU).
pub(crate) mod stock_line {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_stock_lines")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) order_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) sku: String,
        pub(crate) qty: i64,
        /// `reserved` or `released`.
        pub(crate) status: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `saga_shipments`: one row per scheduled shipment.
pub(crate) mod shipment {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_shipments")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) order_id: String,
        pub(crate) carrier: String,
        pub(crate) country: String,
        pub(crate) scheduled_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `saga_steps`: one row per (order, step) whose effect committed. A step
/// delivered again under another event id finds its row, counts a repeat and
/// has no second effect (redeliveries of the same event id never get this
/// far: the library's processed key absorbs them).
pub(crate) mod step {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_steps")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) order_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) step: String,
        /// What it did: `reserved`, `declined`, `out_of_stock`, …
        pub(crate) result: String,
        pub(crate) event_id: String,
        /// The group member that committed it (`<instance>-<n>`).
        pub(crate) member: String,
        /// Deliveries of this step after the first that committed.
        pub(crate) repeats: i64,
        pub(crate) at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Creates the saga's tables if they do not exist.
pub(crate) async fn create_tables(db: &DatabaseConnection) -> Result<(), DbErr> {
    let schema = Schema::new(db.get_database_backend());
    let mut tables = [
        schema.create_table_from_entity(order::Entity),
        schema.create_table_from_entity(account::Entity),
        schema.create_table_from_entity(stock::Entity),
        schema.create_table_from_entity(payment::Entity),
        schema.create_table_from_entity(stock_line::Entity),
        schema.create_table_from_entity(shipment::Entity),
        schema.create_table_from_entity(step::Entity),
    ];
    for table in &mut tables {
        table.if_not_exists();
        db.execute(&*table).await?;
    }
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The event id of an order's event of a type: deterministic, so that the
/// outbox (whose event ids are unique) could never hold two of them.
pub(crate) fn event_id(order_id: &str, event_type: &str) -> String {
    format!("{order_id}/{event_type}")
}

fn event<T: Serialize>(
    order_id: &str,
    event_type: &str,
    payload: &T,
) -> Result<Event, redstream::Error> {
    Ok(Event::new(event_type, payload)?
        .with_id(event_id(order_id, event_type))
        .with_key(order_id))
}

/// Places orders: each row (state `placed`) and its `order.placed` event
/// commit together, in transactions of up to 100 orders.
pub(crate) async fn place_orders(
    db: &DatabaseConnection,
    streams: &Streams,
    orders: Vec<order::Model>,
) -> Result<(), redstream::BoxError> {
    for chunk in orders.chunks(100) {
        let tx = db.begin().await?;
        for o in chunk {
            let placed = event(
                &o.order_id,
                ORDER_PLACED,
                &OrderRef {
                    order_id: o.order_id.clone(),
                },
            )?;
            order::Entity::insert(order::ActiveModel::from(o.clone()))
                .exec_without_returning(&tx)
                .await?;
            enqueue(&tx, &streams.orders, placed).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

/// Why a step cannot run now: the simulated downstream call timed out.
#[derive(Debug, thiserror::Error)]
#[error("{step}: simulated gateway timeout for order {order_id} (attempt {attempt})")]
pub(crate) struct Glitch {
    step: &'static str,
    order_id: String,
    attempt: u32,
}

/// How many first attempts of `step` fail transiently for this order.
fn glitches(order: &order::Model, step: &str) -> u32 {
    order
        .glitches
        .split(';')
        .filter_map(|part| part.split_once('='))
        .find(|(s, _)| *s == step)
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

/// What every step does first, in its transaction: load the order, fail
/// transiently if the dice say so, and claim the (order, step) row.
/// `Ok(None)` means: acknowledge without an effect (a repeat).
async fn begin_step(
    tx: &DatabaseTransaction,
    meta: &Meta,
    order_id: &str,
    step_name: &'static str,
    expected_type: &str,
) -> Result<Result<Option<order::Model>, Outcome>, redstream::BoxError> {
    if meta.event_type() != Some(expected_type) {
        return Ok(Err(Outcome::dead_letter(format!(
            "{step_name} reads `{expected_type}`, got {:?}",
            meta.event_type()
        ))));
    }
    let Some(order) = order::Entity::find_by_id(order_id.to_owned())
        .one(tx)
        .await?
    else {
        return Ok(Err(Outcome::dead_letter(format!(
            "unknown order `{order_id}`"
        ))));
    };
    if meta.attempt() <= glitches(&order, step_name) {
        return Err(Glitch {
            step: step_name,
            order_id: order_id.to_owned(),
            attempt: meta.attempt(),
        }
        .into());
    }
    let claim = step::ActiveModel {
        order_id: Set(order_id.to_owned()),
        step: Set(step_name.to_owned()),
        result: Set(String::new()),
        event_id: Set(meta.idempotency_key()),
        member: Set(meta.member().to_owned()),
        repeats: Set(0),
        at: Set(now_ms()),
    };
    let inserted = step::Entity::insert(claim)
        .on_conflict_do_nothing_on([step::Column::OrderId, step::Column::Step])
        .exec_without_returning(tx)
        .await?;
    if matches!(
        inserted,
        TryInsertResult::Conflicted | TryInsertResult::Inserted(0)
    ) {
        step::Entity::update_many()
            .col_expr(
                step::Column::Repeats,
                Expr::col(step::Column::Repeats).add(1),
            )
            .filter(step::Column::OrderId.eq(order_id))
            .filter(step::Column::Step.eq(step_name))
            .exec(tx)
            .await?;
        return Ok(Ok(None));
    }
    Ok(Ok(Some(order)))
}

/// A class of rows that several steps update: a customer's account, a
/// SKU's stock, a cancelling order's row (both compensations count it
/// down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Books {
    Accounts = 1,
    Stock = 2,
    Cancellations = 3,
}

/// On PostgreSQL, takes the transaction-scoped advisory locks of `books`,
/// in their fixed order, before any of their rows is touched.
///
/// A batch of entries shares one transaction, and its entries update the
/// shared rows in the order they come: two batches could lock two accounts
/// in opposite orders, a deadlock PostgreSQL breaks only after
/// `deadlock_timeout` (1 s) by rolling one back. With these locks, taken
/// by a batch's first entry (they are re-entrant), the writers of one class
/// of rows take turns, and every transaction takes its classes in the same
/// order, so no two wait for each other. SQLite has one writer at a time
/// and needs nothing.
async fn lock_books(tx: &DatabaseTransaction, books: &[Books]) -> Result<(), DbErr> {
    if tx.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    debug_assert!(books.is_sorted());
    for b in books {
        // 0x5a6a_0000 + class: a key space of the example's own.
        let key = 0x5a6a_0000_i64 + *b as i64;
        tx.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({key})"))
            .await?;
    }
    Ok(())
}

/// Records what the step did in its `saga_steps` row.
async fn finish_step(
    tx: &DatabaseTransaction,
    order_id: &str,
    step_name: &str,
    result: &str,
) -> Result<(), DbErr> {
    step::Entity::update_many()
        .col_expr(step::Column::Result, Expr::value(result))
        .filter(step::Column::OrderId.eq(order_id))
        .filter(step::Column::Step.eq(step_name))
        .exec(tx)
        .await?;
    Ok(())
}

/// Moves the order from `from` to `to` (with a reason and the number of
/// compensations now pending). `false` if it was not in `from`.
async fn transition(
    tx: &DatabaseTransaction,
    order_id: &str,
    from: &str,
    to: &str,
    reason: Option<&str>,
    pending: i64,
) -> Result<bool, DbErr> {
    let moved = order::Entity::update_many()
        .col_expr(order::Column::State, Expr::value(to))
        .col_expr(
            order::Column::Reason,
            Expr::value(reason.map(str::to_owned)),
        )
        .col_expr(order::Column::CompensationsPending, Expr::value(pending))
        .col_expr(order::Column::UpdatedAt, Expr::value(now_ms()))
        .filter(order::Column::OrderId.eq(order_id))
        .filter(order::Column::State.eq(from))
        .exec(tx)
        .await?;
    Ok(moved.rows_affected == 1)
}

fn wrong_state(order: &order::Model, expected: &str) -> Outcome {
    Outcome::dead_letter(format!(
        "order `{}` is `{}`, expected `{expected}`",
        order.order_id, order.state
    ))
}

fn parse_lines(order: &order::Model) -> Result<Vec<Line>, serde_json::Error> {
    serde_json::from_str(&order.lines)
}

/// Cancels an order in the failing step's transaction: publishes a
/// compensation for each step already done, or, with none to run, cancels
/// it at once and publishes `order.cancelled`.
async fn cancel(
    tx: &DatabaseTransaction,
    streams: &Streams,
    order: &order::Model,
    from: &str,
    reason: &str,
    compensations: &[(&str, &str)],
) -> Result<Outcome, redstream::BoxError> {
    let id = &order.order_id;
    if compensations.is_empty() {
        if !transition(tx, id, from, CANCELLED, Some(reason), 0).await? {
            return Ok(wrong_state(order, from));
        }
        let finished = OrderFinished {
            order_id: id.clone(),
            state: CANCELLED.to_owned(),
            reason: Some(reason.to_owned()),
        };
        enqueue(
            tx,
            &streams.order_events,
            event(id, ORDER_CANCELLED, &finished)?,
        )
        .await?;
        return Ok(Outcome::Ack);
    }
    let pending = compensations.len() as i64;
    if !transition(tx, id, from, CANCELLING, Some(reason), pending).await? {
        return Ok(wrong_state(order, from));
    }
    for (stream, event_type) in compensations {
        let payload = Compensation {
            order_id: id.clone(),
            reason: reason.to_owned(),
        };
        enqueue(tx, stream, event(id, event_type, &payload)?).await?;
    }
    Ok(Outcome::Ack)
}

/// After a compensation: one fewer pending; the last one cancels the order
/// and publishes `order.cancelled`.
async fn compensated(
    tx: &DatabaseTransaction,
    streams: &Streams,
    order_id: &str,
) -> Result<(), redstream::BoxError> {
    order::Entity::update_many()
        .col_expr(
            order::Column::CompensationsPending,
            Expr::col(order::Column::CompensationsPending).sub(1),
        )
        .col_expr(order::Column::UpdatedAt, Expr::value(now_ms()))
        .filter(order::Column::OrderId.eq(order_id))
        .filter(order::Column::State.eq(CANCELLING))
        .exec(tx)
        .await?;
    let done = order::Entity::update_many()
        .col_expr(order::Column::State, Expr::value(CANCELLED))
        .filter(order::Column::OrderId.eq(order_id))
        .filter(order::Column::State.eq(CANCELLING))
        .filter(order::Column::CompensationsPending.eq(0))
        .exec(tx)
        .await?;
    if done.rows_affected == 1 {
        let order = order::Entity::find_by_id(order_id.to_owned())
            .one(tx)
            .await?
            .ok_or_else(|| format!("order `{order_id}` vanished"))?;
        let finished = OrderFinished {
            order_id: order_id.to_owned(),
            state: CANCELLED.to_owned(),
            reason: order.reason,
        };
        enqueue(
            tx,
            &streams.order_events,
            event(order_id, ORDER_CANCELLED, &finished)?,
        )
        .await?;
    }
    Ok(())
}

/// Step 1, group `payment` on `<prefix>:orders`: reserve the order's total
/// on the customer's account (balance → reserved). A declined card or too
/// small a balance cancels the order: nothing to compensate.
pub(crate) struct Payment {
    pub(crate) streams: Streams,
}

impl TxHandler for Payment {
    type Event = OrderRef;

    async fn handle(&self, ev: OrderRef, meta: &Meta, tx: &DatabaseTransaction) -> HandlerResult {
        let order = match begin_step(tx, meta, &ev.order_id, PAYMENT, ORDER_PLACED).await? {
            Ok(Some(order)) => order,
            Ok(None) => return Ok(Outcome::Ack),
            Err(outcome) => return Ok(outcome),
        };
        lock_books(tx, &[Books::Accounts]).await?;
        let id = &order.order_id;
        let amount = order.total_cents;
        let declined = if order.card == DECLINED_CARD {
            Some("payment declined: card declined")
        } else {
            // Conditional: two orders of one customer never spend one cent
            // twice, whatever runs concurrently.
            let held = account::Entity::update_many()
                .col_expr(
                    account::Column::BalanceCents,
                    Expr::col(account::Column::BalanceCents).sub(amount),
                )
                .col_expr(
                    account::Column::ReservedCents,
                    Expr::col(account::Column::ReservedCents).add(amount),
                )
                .filter(account::Column::CustomerId.eq(order.customer_id.as_str()))
                .filter(account::Column::BalanceCents.gte(amount))
                .exec(tx)
                .await?;
            (held.rows_affected != 1).then_some("payment declined: insufficient funds")
        };
        let status = if declined.is_some() {
            "declined"
        } else {
            "reserved"
        };
        payment::Entity::insert(payment::ActiveModel {
            order_id: Set(id.clone()),
            customer_id: Set(order.customer_id.clone()),
            amount_cents: Set(amount),
            status: Set(status.to_owned()),
        })
        .exec_without_returning(tx)
        .await?;
        finish_step(tx, id, PAYMENT, status).await?;
        if let Some(reason) = declined {
            return cancel(tx, &self.streams, &order, PLACED, reason, &[]).await;
        }
        if !transition(tx, id, PLACED, PAID, None, 0).await? {
            return Ok(wrong_state(&order, PLACED));
        }
        let next = event(id, PAYMENT_RESERVED, &ev)?;
        enqueue(tx, &self.streams.payments, next).await?;
        Ok(Outcome::Ack)
    }
}

/// Step 2, group `inventory` on `<prefix>:payments`: reserve every line's
/// units (on_hand → reserved), all or none. A line short of stock cancels
/// the order: its partial reservation is rolled back (a savepoint), and
/// `payment.refunded` compensates the payment.
pub(crate) struct Inventory {
    pub(crate) streams: Streams,
}

impl TxHandler for Inventory {
    type Event = OrderRef;

    async fn handle(&self, ev: OrderRef, meta: &Meta, tx: &DatabaseTransaction) -> HandlerResult {
        let order = match begin_step(tx, meta, &ev.order_id, INVENTORY, PAYMENT_RESERVED).await? {
            Ok(Some(order)) => order,
            Ok(None) => return Ok(Outcome::Ack),
            Err(outcome) => return Ok(outcome),
        };
        let id = &order.order_id;
        let lines = match parse_lines(&order) {
            Ok(lines) => lines,
            Err(e) => return Ok(Outcome::dead_letter(format!("order `{id}` lines: {e}"))),
        };
        // One quantity per SKU, in a fixed order (fewer lock-order deadlocks
        // between concurrent batches on PostgreSQL).
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for line in &lines {
            *wanted.entry(line.sku.as_str()).or_default() += line.qty;
        }
        lock_books(tx, &[Books::Stock]).await?;
        let savepoint = tx.begin().await?;
        let mut short = None;
        for (sku, qty) in &wanted {
            let held = stock::Entity::update_many()
                .col_expr(
                    stock::Column::OnHand,
                    Expr::col(stock::Column::OnHand).sub(*qty),
                )
                .col_expr(
                    stock::Column::Reserved,
                    Expr::col(stock::Column::Reserved).add(*qty),
                )
                .filter(stock::Column::Sku.eq(*sku))
                .filter(stock::Column::OnHand.gte(*qty))
                .exec(&savepoint)
                .await?;
            if held.rows_affected != 1 {
                short = Some(*sku);
                break;
            }
            stock_line::Entity::insert(stock_line::ActiveModel {
                order_id: Set(id.clone()),
                sku: Set((*sku).to_owned()),
                qty: Set(*qty),
                status: Set("reserved".to_owned()),
            })
            .exec_without_returning(&savepoint)
            .await?;
        }
        if let Some(sku) = short {
            savepoint.rollback().await?;
            finish_step(tx, id, INVENTORY, "out_of_stock").await?;
            let reason = format!("out of stock: {sku}");
            let undo = [(self.streams.refunds.as_str(), PAYMENT_REFUNDED)];
            return cancel(tx, &self.streams, &order, PAID, &reason, &undo).await;
        }
        savepoint.commit().await?;
        finish_step(tx, id, INVENTORY, "reserved").await?;
        if !transition(tx, id, PAID, STOCK_HELD, None, 0).await? {
            return Ok(wrong_state(&order, PAID));
        }
        let next = event(id, STOCK_RESERVED, &ev)?;
        enqueue(tx, &self.streams.stock, next).await?;
        Ok(Outcome::Ack)
    }
}

/// Step 3, group `shipping` on `<prefix>:stock`: schedule the shipment and
/// complete the order. A destination no carrier serves cancels it, with
/// `payment.refunded` and `stock.released` compensating both earlier steps.
pub(crate) struct Shipping {
    pub(crate) streams: Streams,
}

/// The carrier serving a country, if any.
pub(crate) fn carrier(country: &str) -> Option<&'static str> {
    match country {
        "DE" | "NL" | "FR" => Some("dhl"),
        "US" => Some("ups"),
        "JP" => Some("yamato"),
        _ => None,
    }
}

impl TxHandler for Shipping {
    type Event = OrderRef;

    async fn handle(&self, ev: OrderRef, meta: &Meta, tx: &DatabaseTransaction) -> HandlerResult {
        let order = match begin_step(tx, meta, &ev.order_id, SHIPPING, STOCK_RESERVED).await? {
            Ok(Some(order)) => order,
            Ok(None) => return Ok(Outcome::Ack),
            Err(outcome) => return Ok(outcome),
        };
        let id = &order.order_id;
        let Some(carrier) = carrier(&order.country) else {
            finish_step(tx, id, SHIPPING, "no_carrier").await?;
            let reason = format!("shipping refused: no carrier serves {}", order.country);
            let undo = [
                (self.streams.refunds.as_str(), PAYMENT_REFUNDED),
                (self.streams.releases.as_str(), STOCK_RELEASED),
            ];
            return cancel(tx, &self.streams, &order, STOCK_HELD, &reason, &undo).await;
        };
        shipment::Entity::insert(shipment::ActiveModel {
            order_id: Set(id.clone()),
            carrier: Set(carrier.to_owned()),
            country: Set(order.country.clone()),
            scheduled_at: Set(now_ms()),
        })
        .exec_without_returning(tx)
        .await?;
        finish_step(tx, id, SHIPPING, "scheduled").await?;
        if !transition(tx, id, STOCK_HELD, COMPLETED, None, 0).await? {
            return Ok(wrong_state(&order, STOCK_HELD));
        }
        let finished = OrderFinished {
            order_id: id.clone(),
            state: COMPLETED.to_owned(),
            reason: None,
        };
        enqueue(
            tx,
            &self.streams.order_events,
            event(id, ORDER_COMPLETED, &finished)?,
        )
        .await?;
        Ok(Outcome::Ack)
    }
}

/// Compensation, group `payment-refund` on `<prefix>:refunds`: give the
/// order's reserved funds back (reserved → balance). Never declined; only
/// retried.
pub(crate) struct Refund {
    pub(crate) streams: Streams,
}

impl TxHandler for Refund {
    type Event = Compensation;

    async fn handle(
        &self,
        ev: Compensation,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let order = match begin_step(tx, meta, &ev.order_id, REFUND, PAYMENT_REFUNDED).await? {
            Ok(Some(order)) => order,
            Ok(None) => return Ok(Outcome::Ack),
            Err(outcome) => return Ok(outcome),
        };
        lock_books(tx, &[Books::Accounts, Books::Cancellations]).await?;
        let id = &order.order_id;
        let Some(paid) = payment::Entity::find_by_id(id.clone()).one(tx).await? else {
            return Ok(Outcome::dead_letter(format!("order `{id}`: no payment")));
        };
        let refunded = payment::Entity::update_many()
            .col_expr(payment::Column::Status, Expr::value("refunded"))
            .filter(payment::Column::OrderId.eq(id.as_str()))
            .filter(payment::Column::Status.eq("reserved"))
            .exec(tx)
            .await?;
        if refunded.rows_affected != 1 {
            return Ok(Outcome::dead_letter(format!(
                "order `{id}`: payment is `{}`, not reserved",
                paid.status
            )));
        }
        account::Entity::update_many()
            .col_expr(
                account::Column::BalanceCents,
                Expr::col(account::Column::BalanceCents).add(paid.amount_cents),
            )
            .col_expr(
                account::Column::ReservedCents,
                Expr::col(account::Column::ReservedCents).sub(paid.amount_cents),
            )
            .filter(account::Column::CustomerId.eq(paid.customer_id.as_str()))
            .exec(tx)
            .await?;
        finish_step(tx, id, REFUND, "refunded").await?;
        compensated(tx, &self.streams, id).await?;
        Ok(Outcome::Ack)
    }
}

/// Compensation, group `stock-release` on `<prefix>:releases`: put the
/// order's reserved units back (reserved → on_hand). Never declined; only
/// retried.
pub(crate) struct Release {
    pub(crate) streams: Streams,
}

impl TxHandler for Release {
    type Event = Compensation;

    async fn handle(
        &self,
        ev: Compensation,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let order = match begin_step(tx, meta, &ev.order_id, RELEASE, STOCK_RELEASED).await? {
            Ok(Some(order)) => order,
            Ok(None) => return Ok(Outcome::Ack),
            Err(outcome) => return Ok(outcome),
        };
        lock_books(tx, &[Books::Stock, Books::Cancellations]).await?;
        let id = &order.order_id;
        let lines = stock_line::Entity::find()
            .filter(stock_line::Column::OrderId.eq(id.as_str()))
            .filter(stock_line::Column::Status.eq("reserved"))
            .order_by_asc(stock_line::Column::Sku)
            .all(tx)
            .await?;
        if lines.is_empty() {
            return Ok(Outcome::dead_letter(format!(
                "order `{id}`: no reserved stock to release"
            )));
        }
        // SKUs ascending, the order the inventory step locks them in.
        for line in &lines {
            stock::Entity::update_many()
                .col_expr(
                    stock::Column::OnHand,
                    Expr::col(stock::Column::OnHand).add(line.qty),
                )
                .col_expr(
                    stock::Column::Reserved,
                    Expr::col(stock::Column::Reserved).sub(line.qty),
                )
                .filter(stock::Column::Sku.eq(line.sku.as_str()))
                .exec(tx)
                .await?;
        }
        stock_line::Entity::update_many()
            .col_expr(stock_line::Column::Status, Expr::value("released"))
            .filter(stock_line::Column::OrderId.eq(id.as_str()))
            .filter(stock_line::Column::Status.eq("reserved"))
            .exec(tx)
            .await?;
        finish_step(tx, id, RELEASE, "released").await?;
        compensated(tx, &self.streams, id).await?;
        Ok(Outcome::Ack)
    }
}

//! The saga's simulated world and its books: a seeded run of customers,
//! SKUs and orders (with a share of declined cards, thin accounts, sold-out
//! and scarce SKUs, unserved destinations and transient failures), and the
//! invariants that must hold once every order has ended.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    TransactionTrait,
};

use super::saga::{
    self, CANCELLED, COMPLETED, DECLINED_CARD, GOOD_CARD, INVENTORY, Line, ORDER_CANCELLED,
    ORDER_COMPLETED, PAYMENT, REFUND, RELEASE, SHIPPING, Streams, UNSERVED_COUNTRY, account, order,
    payment, shipment, step, stock, stock_line,
};

const CUSTOMERS: usize = 24;
const SKUS: usize = 12;
/// Customers whose balance covers about a third of what they order.
const THIN_CUSTOMERS: usize = 2;
const SERVED: [&str; 5] = ["DE", "NL", "FR", "US", "JP"];

/// One run: its accounts, stock and orders, not yet written.
pub(crate) struct Plan {
    pub(crate) accounts: Vec<account::Model>,
    pub(crate) stock: Vec<stock::Model>,
    pub(crate) orders: Vec<order::Model>,
}

/// What a run of `count` orders looks like for `seed`. Ids start with the
/// run (`<run>-c07`, `<run>-sku03`, `<run>-42`), so runs never share rows.
pub(crate) fn plan(run: &str, seed: u64, count: usize) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let prices: Vec<i64> = (0..SKUS).map(|_| rng.random_range(199..5_000)).collect();
    let sku = |i: usize| format!("{run}-sku{i:02}");
    let customer = |i: usize| format!("{run}-c{i:02}");
    let mut orders = Vec::with_capacity(count);
    let mut demand = [0i64; SKUS];
    let mut spend = [0i64; CUSTOMERS];
    let now = saga::now_ms();
    for i in 0..count {
        let c = rng.random_range(0..CUSTOMERS);
        let mut lines: Vec<Line> = Vec::new();
        for _ in 0..rng.random_range(1..=2) {
            // sku00 (sold out) is drawn half as often as the others.
            let s = loop {
                let s = rng.random_range(0..SKUS);
                if s != 0 || rng.random_bool(0.5) {
                    break s;
                }
            };
            if lines.iter().any(|l| l.sku == sku(s)) {
                continue;
            }
            let qty = rng.random_range(1..=3);
            demand[s] += qty;
            lines.push(Line {
                sku: sku(s),
                qty,
                unit_price_cents: prices[s],
            });
        }
        let total: i64 = lines.iter().map(|l| l.qty * l.unit_price_cents).sum();
        spend[c] += total;
        let card = if rng.random_bool(0.07) {
            DECLINED_CARD
        } else {
            GOOD_CARD
        };
        let country = if rng.random_bool(0.05) {
            UNSERVED_COUNTRY
        } else {
            SERVED[rng.random_range(0..SERVED.len())]
        };
        let mut glitches = Vec::new();
        for s in [PAYMENT, INVENTORY, SHIPPING, REFUND, RELEASE] {
            if rng.random_bool(0.06) {
                glitches.push(format!("{s}={}", rng.random_range(1..=2)));
            }
        }
        orders.push(order::Model {
            order_id: format!("{run}-{i}"),
            run: run.to_owned(),
            customer_id: customer(c),
            total_cents: total,
            lines: serde_json::to_string(&lines).unwrap_or_default(),
            card: card.to_owned(),
            country: country.to_owned(),
            state: saga::PLACED.to_owned(),
            reason: None,
            compensations_pending: 0,
            glitches: glitches.join(";"),
            placed_at: now,
            updated_at: now,
        });
    }
    let accounts = (0..CUSTOMERS)
        .map(|c| {
            let initial = if c < THIN_CUSTOMERS {
                spend[c] / 3
            } else {
                spend[c] + 1_000
            };
            account::Model {
                customer_id: customer(c),
                run: run.to_owned(),
                initial_cents: initial,
                balance_cents: initial,
                reserved_cents: 0,
            }
        })
        .collect();
    let stock = (0..SKUS)
        .map(|s| {
            // sku00 sold out, sku01 scarce (half of what is ordered).
            let initial = match s {
                0 => 0,
                1 => demand[s] / 2,
                _ => demand[s] + 3,
            };
            stock::Model {
                sku: sku(s),
                run: run.to_owned(),
                initial_units: initial,
                on_hand: initial,
                reserved: 0,
            }
        })
        .collect();
    Plan {
        accounts,
        stock,
        orders,
    }
}

/// Writes the run's accounts and stock, then places its orders (each row
/// with its `order.placed` in the outbox).
pub(crate) async fn open(
    db: &DatabaseConnection,
    streams: &Streams,
    plan: Plan,
) -> Result<(), redstream::BoxError> {
    let tx = db.begin().await?;
    account::Entity::insert_many(plan.accounts.into_iter().map(account::ActiveModel::from))
        .exec_without_returning(&tx)
        .await?;
    stock::Entity::insert_many(plan.stock.into_iter().map(stock::ActiveModel::from))
        .exec_without_returning(&tx)
        .await?;
    tx.commit().await?;
    saga::place_orders(db, streams, plan.orders).await
}

/// Orders (of `run`, or all) not yet in a final state.
pub(crate) async fn unfinished(db: &DatabaseConnection, run: Option<&str>) -> Result<u64, DbErr> {
    let mut open =
        order::Entity::find().filter(order::Column::State.is_not_in([COMPLETED, CANCELLED]));
    if let Some(run) = run {
        open = open.filter(order::Column::Run.eq(run));
    }
    sea_orm::PaginatorTrait::count(open, db).await
}

/// Saga events (of `run`, or all; of one type, or all) still waiting in the
/// outbox.
pub(crate) async fn unsent(
    db: &DatabaseConnection,
    run: Option<&str>,
    event_type: Option<&str>,
) -> Result<u64, DbErr> {
    let mut q = Query::select()
        .expr(Expr::col(Alias::new("id")).count())
        .from(Alias::new("outbox"))
        .and_where(Expr::col(Alias::new("sent_at")).is_null())
        .to_owned();
    if let Some(run) = run {
        q.and_where(Expr::col(Alias::new("event_id")).like(format!("{run}-%")));
    }
    if let Some(t) = event_type {
        q.and_where(Expr::col(Alias::new("event_type")).eq(t));
    }
    match db.query_one(&q).await? {
        Some(row) => Ok(row.try_get_by_index::<i64>(0)? as u64),
        None => Ok(0),
    }
}

/// Cancellations by cause.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Causes {
    pub(crate) card_declined: u64,
    pub(crate) insufficient_funds: u64,
    pub(crate) out_of_stock: u64,
    pub(crate) no_carrier: u64,
}

/// The books after a run, and what is wrong with them.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) orders: u64,
    pub(crate) completed: u64,
    pub(crate) cancelled: u64,
    pub(crate) causes: Causes,
    pub(crate) refunds: u64,
    pub(crate) releases: u64,
    pub(crate) steps: u64,
    /// Step deliveries that found their (order, step) row (0 when every
    /// redelivery was absorbed by the library's processed keys).
    pub(crate) repeats: i64,
    pub(crate) initial_cents: i64,
    pub(crate) balance_cents: i64,
    pub(crate) reserved_cents: i64,
    pub(crate) completed_cents: i64,
    pub(crate) initial_units: i64,
    pub(crate) on_hand_units: i64,
    pub(crate) reserved_units: i64,
    pub(crate) completed_units: i64,
    /// Every broken invariant, one line each.
    pub(crate) problems: Vec<String>,
}

impl Report {
    pub(crate) fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, p: String) {
        self.problems.push(p);
    }

    /// The summary, on stdout.
    pub(crate) fn print(&self) {
        let c = &self.causes;
        let cents = |v: i64| format!("{}.{:02}", v / 100, (v % 100).abs());
        println!("orders:          {}", self.orders);
        println!("  completed:     {}", self.completed);
        println!(
            "  cancelled:     {} (card declined {}, insufficient funds {}, out of stock {}, no carrier {})",
            self.cancelled, c.card_declined, c.insufficient_funds, c.out_of_stock, c.no_carrier
        );
        println!(
            "compensations:   {} refunds, {} stock releases",
            self.refunds, self.releases
        );
        println!(
            "steps committed: {} (repeats absorbed by the step log: {})",
            self.steps, self.repeats
        );
        println!(
            "money:           initial {} = balance {} + reserved {}; reserved = completed orders {}",
            cents(self.initial_cents),
            cents(self.balance_cents),
            cents(self.reserved_cents),
            cents(self.completed_cents)
        );
        println!(
            "stock (units):   initial {} = on hand {} + reserved {}; reserved = completed lines {}",
            self.initial_units, self.on_hand_units, self.reserved_units, self.completed_units
        );
        if self.ok() {
            println!("invariants:      hold");
        } else {
            println!("invariants:      {} broken", self.problems.len());
            for p in self.problems.iter().take(20) {
                println!("  - {p}");
            }
        }
    }
}

/// One outbox row, as far as the check cares.
struct OutboxRow {
    event_id: String,
    event_type: String,
    sent: bool,
}

async fn outbox_rows(db: &DatabaseConnection, run: Option<&str>) -> Result<Vec<OutboxRow>, DbErr> {
    let mut q = Query::select()
        .columns([
            Alias::new("event_id"),
            Alias::new("event_type"),
            Alias::new("sent_at"),
        ])
        .from(Alias::new("outbox"))
        .to_owned();
    if let Some(run) = run {
        q.and_where(Expr::col(Alias::new("event_id")).like(format!("{run}-%")));
    }
    let mut rows = Vec::new();
    for row in db.query_all(&q).await? {
        rows.push(OutboxRow {
            event_id: row.try_get_by_index(0)?,
            event_type: row.try_get_by_index(1)?,
            sent: row.try_get_by_index::<Option<i64>>(2)?.is_some(),
        });
    }
    Ok(rows)
}

/// Checks the books of `run` (or of every run in the database): every
/// order final, once; money and stock balanced to the cent and the unit;
/// every step's effect there once, and only where the order's path says.
pub(crate) async fn check(db: &DatabaseConnection, run: Option<&str>) -> Result<Report, DbErr> {
    let mut orders = order::Entity::find();
    let mut accounts = account::Entity::find();
    let mut stocks = stock::Entity::find();
    if let Some(run) = run {
        orders = orders.filter(order::Column::Run.eq(run));
        accounts = accounts.filter(account::Column::Run.eq(run));
        stocks = stocks.filter(stock::Column::Run.eq(run));
    }
    let orders = orders.all(db).await?;
    let accounts = accounts.all(db).await?;
    let stocks = stocks.all(db).await?;
    let ids: HashSet<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
    let mine = |id: &str| ids.contains(id);
    let payments: HashMap<String, payment::Model> = payment::Entity::find()
        .all(db)
        .await?
        .into_iter()
        .filter(|p| mine(&p.order_id))
        .map(|p| (p.order_id.clone(), p))
        .collect();
    let mut lines_of: HashMap<String, Vec<stock_line::Model>> = HashMap::new();
    for l in stock_line::Entity::find().all(db).await? {
        if mine(&l.order_id) {
            lines_of.entry(l.order_id.clone()).or_default().push(l);
        }
    }
    let shipped: HashSet<String> = shipment::Entity::find()
        .all(db)
        .await?
        .into_iter()
        .filter(|s| mine(&s.order_id))
        .map(|s| s.order_id)
        .collect();
    let mut steps_of: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut r = Report::default();
    for s in step::Entity::find().all(db).await? {
        if mine(&s.order_id) {
            r.steps += 1;
            r.repeats += s.repeats;
            steps_of
                .entry(s.order_id.clone())
                .or_default()
                .insert(s.step, s.result);
        }
    }
    let mut finals: HashMap<String, Vec<String>> = HashMap::new();
    let mut unsent = 0u64;
    for row in outbox_rows(db, run).await? {
        let Some((order_id, _)) = row.event_id.split_once('/') else {
            continue;
        };
        if !mine(order_id) {
            continue;
        }
        if !row.sent {
            unsent += 1;
        }
        if row.event_type == ORDER_COMPLETED || row.event_type == ORDER_CANCELLED {
            finals
                .entry(order_id.to_owned())
                .or_default()
                .push(row.event_type);
        }
    }
    if unsent > 0 {
        r.problem(format!("{unsent} saga events still in the outbox"));
    }

    let sold_out: HashSet<&str> = stocks
        .iter()
        .filter(|s| s.initial_units == 0)
        .map(|s| s.sku.as_str())
        .collect();
    let mut completed_cents: HashMap<&str, i64> = HashMap::new();
    let mut completed_units: HashMap<String, i64> = HashMap::new();
    r.orders = orders.len() as u64;
    for o in &orders {
        let id = &o.order_id;
        let lines: Vec<Line> = match serde_json::from_str(&o.lines) {
            Ok(lines) => lines,
            Err(e) => {
                r.problem(format!("{id}: unreadable lines: {e}"));
                continue;
            }
        };
        let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
        for l in &lines {
            *wanted.entry(l.sku.clone()).or_default() += l.qty;
        }
        let reason = o.reason.as_deref().unwrap_or("");
        let expected_final = match o.state.as_str() {
            COMPLETED => ORDER_COMPLETED,
            CANCELLED => ORDER_CANCELLED,
            other => {
                r.problem(format!("{id}: not final (`{other}`)"));
                continue;
            }
        };
        match finals.get(id).map(Vec::as_slice) {
            Some([one]) if one == expected_final => {}
            other => r.problem(format!("{id}: `{}` with final events {other:?}", o.state)),
        }
        if o.compensations_pending != 0 {
            r.problem(format!(
                "{id}: {} compensations pending",
                o.compensations_pending
            ));
        }
        let steps = steps_of.get(id).cloned().unwrap_or_default();
        let payment = payments.get(id);
        let held: BTreeMap<String, (i64, String)> = lines_of
            .get(id)
            .map(|ls| {
                ls.iter()
                    .map(|l| (l.sku.clone(), (l.qty, l.status.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let step_results = |names: &[&str]| -> bool {
            steps.len() == names.len() && names.iter().all(|n| steps.contains_key(*n))
        };
        if o.state == COMPLETED {
            r.completed += 1;
            if o.reason.is_some() {
                r.problem(format!("{id}: completed with a reason"));
            }
            if o.card == DECLINED_CARD
                || saga::carrier(&o.country).is_none()
                || wanted.keys().any(|s| sold_out.contains(s.as_str()))
            {
                r.problem(format!("{id}: completed although it could not be"));
            }
            match payment {
                Some(p) if p.status == "reserved" && p.amount_cents == o.total_cents => {}
                other => r.problem(format!("{id}: completed with payment {other:?}")),
            }
            let all_held = held.len() == wanted.len()
                && wanted
                    .iter()
                    .all(|(s, q)| held.get(s) == Some(&(*q, "reserved".to_owned())));
            if !all_held {
                r.problem(format!(
                    "{id}: completed with stock {held:?}, wants {wanted:?}"
                ));
            }
            if !shipped.contains(id) {
                r.problem(format!("{id}: completed without a shipment"));
            }
            if !step_results(&[PAYMENT, INVENTORY, SHIPPING]) {
                r.problem(format!("{id}: completed after steps {steps:?}"));
            }
            *completed_cents.entry(o.customer_id.as_str()).or_default() += o.total_cents;
            for (s, q) in &wanted {
                *completed_units.entry(s.clone()).or_default() += q;
            }
            continue;
        }
        r.cancelled += 1;
        if shipped.contains(id) {
            r.problem(format!("{id}: cancelled with a shipment"));
        }
        let (pay_status, expect_lines, expect_steps): (&str, Option<&str>, &[&str]) =
            if reason == "payment declined: card declined" {
                r.causes.card_declined += 1;
                ("declined", None, &[PAYMENT])
            } else if reason == "payment declined: insufficient funds" {
                r.causes.insufficient_funds += 1;
                ("declined", None, &[PAYMENT])
            } else if let Some(sku) = reason.strip_prefix("out of stock: ") {
                r.causes.out_of_stock += 1;
                r.refunds += 1;
                if !wanted.contains_key(sku) {
                    r.problem(format!(
                        "{id}: out of stock of {sku}, which it did not order"
                    ));
                }
                ("refunded", None, &[PAYMENT, INVENTORY, REFUND])
            } else if reason.starts_with("shipping refused: ") {
                r.causes.no_carrier += 1;
                r.refunds += 1;
                r.releases += 1;
                if saga::carrier(&o.country).is_some() {
                    r.problem(format!("{id}: refused shipping to {}", o.country));
                }
                (
                    "refunded",
                    Some("released"),
                    &[PAYMENT, INVENTORY, SHIPPING, REFUND, RELEASE],
                )
            } else {
                r.problem(format!("{id}: cancelled for `{reason}`"));
                continue;
            };
        if (o.card == DECLINED_CARD) != (reason == "payment declined: card declined") {
            r.problem(format!("{id}: card {} but `{reason}`", o.card));
        }
        match payment {
            Some(p) if p.status == pay_status && p.amount_cents == o.total_cents => {}
            other => r.problem(format!("{id}: `{reason}` with payment {other:?}")),
        }
        let lines_ok = match expect_lines {
            None => held.is_empty(),
            Some(status) => {
                held.len() == wanted.len()
                    && wanted
                        .iter()
                        .all(|(s, q)| held.get(s) == Some(&(*q, status.to_owned())))
            }
        };
        if !lines_ok {
            r.problem(format!("{id}: `{reason}` with stock lines {held:?}"));
        }
        if !step_results(expect_steps) {
            r.problem(format!("{id}: `{reason}` after steps {steps:?}"));
        }
    }

    for a in &accounts {
        r.initial_cents += a.initial_cents;
        r.balance_cents += a.balance_cents;
        r.reserved_cents += a.reserved_cents;
        let done = completed_cents
            .get(a.customer_id.as_str())
            .copied()
            .unwrap_or(0);
        r.completed_cents += done;
        if a.balance_cents + a.reserved_cents != a.initial_cents {
            r.problem(format!(
                "account {}: balance {} + reserved {} != initial {}",
                a.customer_id, a.balance_cents, a.reserved_cents, a.initial_cents
            ));
        }
        if a.balance_cents < 0 {
            r.problem(format!("account {}: negative balance", a.customer_id));
        }
        if a.reserved_cents != done {
            r.problem(format!(
                "account {}: reserved {} != completed orders {done}",
                a.customer_id, a.reserved_cents
            ));
        }
    }
    for s in &stocks {
        r.initial_units += s.initial_units;
        r.on_hand_units += s.on_hand;
        r.reserved_units += s.reserved;
        let done = completed_units.get(&s.sku).copied().unwrap_or(0);
        r.completed_units += done;
        if s.on_hand + s.reserved != s.initial_units {
            r.problem(format!(
                "stock {}: on hand {} + reserved {} != initial {}",
                s.sku, s.on_hand, s.reserved, s.initial_units
            ));
        }
        if s.on_hand < 0 {
            r.problem(format!("stock {}: negative on hand", s.sku));
        }
        if s.reserved != done {
            r.problem(format!(
                "stock {}: reserved {} != completed lines {done}",
                s.sku, s.reserved
            ));
        }
    }
    Ok(r)
}

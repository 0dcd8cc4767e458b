//! F26: every database error at every statement of the exactly-once path and
//! of the outbox relay, on SQLite and PostgreSQL (RELIABILITY.md).
//!
//! Each cell arms one fault point (`redstream::failpoints::DB_POINTS`) with
//! one error class for two hits, runs a batch of events through an
//! exactly-once group (or rows through the relay), and asserts what users
//! rely on: no entry is acked without its effect, no effect happens twice,
//! the outage spends no attempt and dead-letters nothing, and the group (or
//! the relay) recovers once the error stops. On SQLite a fault may also roll
//! the transaction back behind sqlx's back, as SQLite itself does after
//! `SQLITE_FULL`, some `IOERR`, `BUSY` and `NOMEM` errors; both variants run.
//!
//! Fault points are process-wide, so this is a test binary of its own and
//! its cells run one at a time. Needs the `failpoints` feature:
//!
//! ```text
//! cargo test --features failpoints --test db_faults -- --nocapture
//! ```

#![cfg(feature = "failpoints")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs,
    dead_code,
    unused_imports
)]

#[path = "../it/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redstream::failpoints::{DbFault, clear_db_faults, db_fault_hits, db_point, inject_db_fault};
use redstream::prelude::*;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction, TransactionTrait};

use support::db::{Backend, TestDb};
use support::{TestContext, eventually, numbered, on_both_databases, publish_all, start_group};

/// Cells run one at a time: fault points are global to the process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Events per cell: one read, one batch.
const EVENTS: i64 = 12;

/// The event that fails its first attempt on purpose, so that each batch
/// also takes the careful path (a savepoint per entry).
const FAILS_ONCE: i64 = 5;

/// The exactly-once points, in the order a batch passes them.
const TX_POINTS: [&str; 6] = [
    "db.begin",
    "db.keys",
    "db.savepoint",
    "db.handler",
    "db.release",
    "db.commit",
];

/// A deliberately non-idempotent effect: one row per execution.
struct Effects {
    cell: String,
}

impl TxHandler for Effects {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        v: serde_json::Value,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let n = v["n"].as_i64().unwrap_or(-1);
        // The handler's own statement fails when `db.handler` is armed, and
        // the handler passes the error up, as handlers should.
        db_point("db.handler", Some(tx)).await?;
        let insert = Query::insert()
            .into_table(Alias::new("effects"))
            .columns([Alias::new("cell"), Alias::new("n"), Alias::new("attempt")])
            .values([
                self.cell.clone().into(),
                n.into(),
                i64::from(meta.attempt()).into(),
            ])?
            .to_owned();
        tx.execute(&insert).await?;
        if n == FAILS_ONCE && meta.attempt() == 1 {
            return Err("fails its first attempt on purpose".into());
        }
        Ok(Outcome::Ack)
    }
}

/// What one cell varies.
#[derive(Clone, Copy, Debug)]
struct Cell {
    point: &'static str,
    fault: DbFault,
    /// The database rolls the transaction back (SQLite may; PostgreSQL
    /// always aborts it).
    rolls_back: bool,
}

impl Cell {
    fn name(&self) -> String {
        format!(
            "{} {:?}{}",
            self.point,
            self.fault,
            if self.rolls_back { " +rollback" } else { "" }
        )
    }
}

/// Every cell that makes sense on `backend`.
fn cells(backend: Backend, points: &[&'static str], commit_point: &str) -> Vec<Cell> {
    let mut cells = Vec::new();
    for &point in points {
        for fault in DbFault::ALL {
            if fault == DbFault::OutcomeUnknown && point != commit_point {
                continue;
            }
            let variants: &[bool] = match (backend, fault) {
                (Backend::Sqlite, DbFault::ConnectionLost | DbFault::OutcomeUnknown) => &[true],
                (Backend::Sqlite, _) => &[true, false],
                (Backend::Postgres, _) => &[true],
            };
            for &rolls_back in variants {
                cells.push(Cell {
                    point,
                    fault,
                    rolls_back,
                });
            }
        }
    }
    cells
}

/// The database and a producer shared by the cells. Each cell gets a pool
/// of its own with two connections, so that a connection left in doubt is
/// soon picked again within the cell. (A pool is not shared across
/// processors here: a PostgreSQL connection opened on a processor's arbiter
/// dies with it.)
struct World {
    ctx: TestContext,
    db: TestDb,
    store: Store,
    producer: Processor,
}

impl World {
    async fn new(db: TestDb) -> Option<World> {
        let ctx = TestContext::new()?;
        let store = Store::connect(&db.settings).await.expect("store");
        store
            .connection()
            .execute_unprepared(
                "CREATE TABLE effects (cell TEXT NOT NULL, n BIGINT NOT NULL, attempt BIGINT NOT NULL)",
            )
            .await
            .expect("create effects");
        let producer = Processor::builder(ctx.settings())
            .start()
            .await
            .expect("producer");
        Some(World {
            ctx,
            db,
            store,
            producer,
        })
    }

    /// Creates `group` at the start of `stream` and publishes the cell's
    /// events before any consumer runs, so they arrive in one read.
    async fn publish_before_start(&self, stream: &str, group: &str) {
        self.ctx.create_group(stream, group).await;
        let events = (0..EVENTS).map(numbered).collect();
        publish_all(&self.producer.producer(), stream, events).await;
    }

    /// Writes the cell's events to the outbox for `stream`, in one
    /// transaction.
    async fn enqueue_all(&self, stream: &str) {
        let tx = self.store.connection().begin().await.unwrap();
        for n in 0..EVENTS {
            enqueue(&tx, stream, numbered(n)).await.unwrap();
        }
        tx.commit().await.unwrap();
    }

    /// A pool of two connections for one cell.
    async fn cell_store(&self) -> Store {
        let mut settings = self.db.settings.clone();
        settings.max_connections = 2;
        Store::connect(&settings).await.expect("store")
    }

    fn settings(&self) -> Settings {
        let mut s = self.ctx.settings();
        s.consumer.count = 50;
        s.consumer.workers = 1;
        s.retry.initial_delay_ms = 20;
        s.outbox.poll_ms = 20;
        s
    }

    /// (n → attempts of its effect rows) for `cell`.
    async fn effects(&self, cell: &str) -> HashMap<i64, Vec<i64>> {
        let q = Query::select()
            .columns([Alias::new("n"), Alias::new("attempt")])
            .from(Alias::new("effects"))
            .and_where(Expr::col(Alias::new("cell")).eq(cell))
            .to_owned();
        let mut out: HashMap<i64, Vec<i64>> = HashMap::new();
        for row in self.store.connection().query_all(&q).await.unwrap() {
            out.entry(row.try_get("", "n").unwrap())
                .or_default()
                .push(row.try_get("", "attempt").unwrap());
        }
        out
    }

    async fn run_tx_cell(&self, index: usize, cell: Cell) -> String {
        let name = format!("{:?} {}", self.db.backend, cell.name());
        let stream = self.ctx.stream(&format!("tx{index}"));
        let group = format!("g{index}");
        self.publish_before_start(&stream, &group).await;

        let store = self.cell_store().await;
        inject_db_fault(cell.point, cell.fault, cell.rolls_back, 0, 2).unwrap();
        let started = Instant::now();
        let processor = start_group(
            self.settings(),
            Group::transactional(&stream, &group, &store, Effects { cell: name.clone() }),
        )
        .await;
        let what = format!("{name}: every event effected and acked");
        eventually(Duration::from_secs(30), &what, || async {
            self.effects(&name).await.len() == EVENTS as usize
                && self.ctx.pending(&stream, &group).await == 0
        })
        .await;
        let took = started.elapsed();
        let hits = db_fault_hits(cell.point);
        let status = processor.group_status(&stream, &group).await.unwrap();
        processor.shutdown().await.unwrap();
        clear_db_faults();

        assert!(hits > 0, "{name}: the fault was injected");
        let effects = self.effects(&name).await;
        for n in 0..EVENTS {
            // The event that fails once leaves its first attempt's row
            // rolled back: one row, from attempt 2.
            let expected = if n == FAILS_ONCE { vec![2] } else { vec![1] };
            assert_eq!(
                effects.get(&n),
                Some(&expected),
                "{name}: event {n} has one effect, at the attempt expected (the outage spends none): {effects:?}"
            );
        }
        assert_eq!(status.dead_lettered, 0, "{name}: nothing dead-lettered");
        assert!(
            store.outage().is_none(),
            "{name}: the outage ended with the first commit"
        );
        format!(
            "| {:?} | {} | {:?} | {} | {hits} | {} | 0 | 0 | {:.2} |",
            self.db.backend,
            cell.point,
            cell.fault,
            if cell.rolls_back { "yes" } else { "no" },
            EVENTS,
            took.as_secs_f64()
        )
    }

    async fn run_relay_cell(&self, index: usize, cell: Cell) -> String {
        let name = format!("{:?} {}", self.db.backend, cell.name());
        let stream = self.ctx.stream(&format!("out{index}"));
        self.enqueue_all(&stream).await;

        let store = self.cell_store().await;
        inject_db_fault(cell.point, cell.fault, cell.rolls_back, 0, 2).unwrap();
        let started = Instant::now();
        let processor = Processor::builder(self.settings())
            .outbox(&store)
            .start()
            .await
            .unwrap();
        let what = format!("{name}: every outbox row relayed and marked sent");
        eventually(Duration::from_secs(30), &what, || async {
            self.unsent(&stream).await == 0 && self.ctx.xlen(&stream).await >= EVENTS as u64
        })
        .await;
        let took = started.elapsed();
        let hits = db_fault_hits(cell.point);
        processor.shutdown().await.unwrap();
        clear_db_faults();

        assert!(hits > 0, "{name}: the fault was injected");
        let entries = self.ctx.entries(&stream).await;
        let mut ids: Vec<String> = entries
            .iter()
            .filter_map(|(_, fields)| {
                fields
                    .iter()
                    .find(|(k, _)| k == "id")
                    .map(|(_, v)| v.clone())
            })
            .collect();
        let published = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), EVENTS as usize, "{name}: every row published");
        // The relay keeps what it published and could not mark, and marks it
        // before publishing anything else: no row goes out twice.
        assert_eq!(published, EVENTS as usize, "{name}: no row published twice");
        format!(
            "| {:?} | {} | {:?} | {} | {hits} | {} | 0 | {} | {:.2} |",
            self.db.backend,
            cell.point,
            cell.fault,
            if cell.rolls_back { "yes" } else { "no" },
            EVENTS,
            published - ids.len(),
            took.as_secs_f64()
        )
    }

    async fn unsent(&self, stream: &str) -> u64 {
        let q = Query::select()
            .expr(Expr::col(Alias::new("id")).count())
            .from(Alias::new("outbox"))
            .and_where(Expr::col(Alias::new("stream")).eq(stream))
            .and_where(Expr::col(Alias::new("sent_at")).is_null())
            .to_owned();
        match self.store.connection().query_one(&q).await {
            Ok(Some(row)) => row.try_get_by_index::<i64>(0).unwrap_or(-1) as u64,
            _ => u64::MAX,
        }
    }
}

const HEADER: &str = "| db | point | error | rolled back | hits | events | lost | duplicated | seconds |\n|---|---|---|---|---|---|---|---|---|";

async fn matrix(db: TestDb) {
    let _serial = SERIAL.lock().await;
    let backend = db.backend;
    let Some(world) = World::new(db).await else {
        return;
    };
    let mut rows = vec![HEADER.to_owned()];
    let tx_cells = cells(backend, &TX_POINTS, "db.commit");
    for (i, cell) in tx_cells.into_iter().enumerate() {
        rows.push(world.run_tx_cell(i, cell).await);
    }
    let relay_cells = cells(
        backend,
        &["outbox.lease", "outbox.select", "outbox.mark"],
        "outbox.mark",
    );
    for (i, cell) in relay_cells.into_iter().enumerate() {
        rows.push(world.run_relay_cell(i, cell).await);
    }
    let report = rows.join("\n");
    println!("{report}");
    if let Ok(path) = std::env::var("CHAOS_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{report}");
        }
    }
    world.producer.shutdown().await.unwrap();
}

on_both_databases!(
    f26_every_error_at_every_statement_sqlite,
    f26_every_error_at_every_statement_postgres,
    matrix
);

/// A stop while the database refuses writes ends long before the shutdown
/// deadline (the running batches cannot commit, so they are released at
/// once), acks nothing, and the next processor effects every event once.
async fn stop_during_outage(db: TestDb) {
    let _serial = SERIAL.lock().await;
    let backend = db.backend;
    let Some(world) = World::new(db).await else {
        return;
    };
    let stream = world.ctx.stream("stop");
    let group = "g-stop";
    world.publish_before_start(&stream, group).await;
    let name = format!("{backend:?} stop during outage");
    let store = world.cell_store().await;
    let mut settings = world.settings();
    settings.shutdown.deadline_ms = 20_000;
    inject_db_fault("db.commit", DbFault::Full, true, 0, u32::MAX).unwrap();
    let processor = start_group(
        settings.clone(),
        Group::transactional(&stream, group, &store, Effects { cell: name.clone() }),
    )
    .await;
    eventually(Duration::from_secs(10), "the outage is seen", || async {
        store.outage().is_some()
    })
    .await;
    let health = processor.health().await;
    assert!(
        !health.ready
            && health
                .checks
                .iter()
                .any(|c| c.name == "database" && !c.ok && c.detail.contains("writes failing")),
        "the health check shows the failing writes: {health:?}"
    );
    let report = processor.shutdown().await.unwrap();
    clear_db_faults();
    assert!(
        report.took < Duration::from_secs(10),
        "a stop during an outage does not wait for the 20 s deadline: {report:?}"
    );
    assert_eq!(
        world.ctx.pending(&stream, group).await,
        EVENTS as u64,
        "nothing acked"
    );
    assert!(world.effects(&name).await.is_empty(), "nothing committed");

    let processor = start_group(
        settings,
        Group::transactional(&stream, group, &store, Effects { cell: name.clone() }),
    )
    .await;
    eventually(Duration::from_secs(30), "every event effected", || async {
        world.effects(&name).await.len() == EVENTS as usize
            && world.ctx.pending(&stream, group).await == 0
    })
    .await;
    processor.shutdown().await.unwrap();
    let effects = world.effects(&name).await;
    assert!(
        effects.values().all(|attempts| attempts.len() == 1),
        "one effect each: {effects:?}"
    );
    world.producer.shutdown().await.unwrap();
}

on_both_databases!(
    a_stop_during_an_outage_releases_at_once_sqlite,
    a_stop_during_an_outage_releases_at_once_postgres,
    stop_during_outage
);

/// While the database refuses the relay's marks for several lease
/// lifetimes, the relay keeps renewing its lease: a second relay waiting on
/// the same database never takes over, so no row is published twice.
async fn relay_keeps_its_lease_while_marks_fail(db: TestDb) {
    let _serial = SERIAL.lock().await;
    let backend = db.backend;
    let Some(world) = World::new(db).await else {
        return;
    };
    let stream = world.ctx.stream("lease");
    let store = world.cell_store().await;
    let mut settings = world.settings();
    settings.outbox.lease_ttl_ms = 600;
    let first = Processor::builder(settings.clone())
        .outbox(&store)
        .start()
        .await
        .unwrap();
    // The first relay holds the lease before the second one starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second_store = world.cell_store().await;
    let second = Processor::builder(settings)
        .outbox(&second_store)
        .start()
        .await
        .unwrap();
    // About 2.5 s of failing marks: four lease lifetimes.
    inject_db_fault("outbox.mark", DbFault::Full, true, 0, 14).unwrap();
    world.enqueue_all(&stream).await;
    let what = format!("{backend:?}: every row relayed and marked after the marks fail");
    eventually(Duration::from_secs(30), &what, || async {
        db_fault_hits("outbox.mark") == 14 && world.unsent(&stream).await == 0
    })
    .await;
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    clear_db_faults();
    assert_eq!(
        world.ctx.xlen(&stream).await,
        EVENTS as u64,
        "{backend:?}: no row published twice while the marks failed"
    );
    world.producer.shutdown().await.unwrap();
}

on_both_databases!(
    a_relay_keeps_its_lease_while_marks_fail_sqlite,
    a_relay_keeps_its_lease_while_marks_fail_postgres,
    relay_keeps_its_lease_while_marks_fail
);

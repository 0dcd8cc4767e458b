//! Exactly one effect through the database, and the transactional outbox,
//! on SQLite and PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redstream::prelude::*;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction, TransactionTrait};

use crate::support::db::{Backend, TestDb};
use crate::support::{
    TestContext, eventually, numbered, on_both_databases, publish_all, publish_one, select_n,
    start_group,
};

/// A deliberately non-idempotent effect: one row per execution, no unique
/// key. Exactly-once shows as one row per event.
struct Effects {
    /// event number → fail (Err) on these attempts.
    fail_on: HashMap<u64, Vec<u32>>,
    /// event number → panic on these attempts.
    panic_on: HashMap<u64, Vec<u32>>,
    /// Sleep inside the transaction (to make outages overlap a batch).
    work: Duration,
    /// event number → sleep this long inside the transaction, on every attempt.
    slow_on: HashMap<u64, Duration>,
}

impl Effects {
    fn plain() -> Self {
        Effects {
            fail_on: HashMap::new(),
            panic_on: HashMap::new(),
            work: Duration::ZERO,
            slow_on: HashMap::new(),
        }
    }
}

impl TxHandler for Effects {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        v: serde_json::Value,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let n = v["n"].as_u64().unwrap_or(0);
        let insert = Query::insert()
            .into_table(Alias::new("effects"))
            .columns([
                Alias::new("event_id"),
                Alias::new("n"),
                Alias::new("attempt"),
            ])
            .values([
                meta.idempotency_key().into(),
                (n as i64).into(),
                (meta.attempt() as i64).into(),
            ])?
            .to_owned();
        tx.execute(&insert).await?;
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        if let Some(pause) = self.slow_on.get(&n) {
            tokio::time::sleep(*pause).await;
        }
        if self
            .panic_on
            .get(&n)
            .is_some_and(|a| a.contains(&meta.attempt()))
        {
            panic!("event {n} panics on attempt {}", meta.attempt());
        }
        if self
            .fail_on
            .get(&n)
            .is_some_and(|a| a.contains(&meta.attempt()))
        {
            return Err(format!("event {n} fails on attempt {}", meta.attempt()).into());
        }
        Ok(Outcome::Ack)
    }
}

async fn create_effects_table(store: &Store) {
    store
        .connection()
        .execute_unprepared(
            "CREATE TABLE effects (event_id TEXT NOT NULL, n BIGINT NOT NULL, attempt BIGINT NOT NULL)",
        )
        .await
        .expect("create effects");
}

/// (n, attempt) of every effect row.
async fn effects(store: &Store) -> Vec<(i64, i64)> {
    let q = Query::select()
        .columns([Alias::new("n"), Alias::new("attempt")])
        .from(Alias::new("effects"))
        .to_owned();
    store
        .connection()
        .query_all(&q)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get("", "n").unwrap(),
                r.try_get("", "attempt").unwrap(),
            )
        })
        .collect()
}

async fn publish_numbers(processor: &Processor, stream: &str, range: std::ops::Range<u64>) {
    let events = range.map(numbered).collect();
    publish_all(&processor.producer(), stream, events).await;
}

/// Creates group `g` at the start of `stream` and publishes `range` before
/// any consumer runs, so the events arrive in one read.
async fn publish_before_start(ctx: &TestContext, stream: &str, range: std::ops::Range<u64>) {
    ctx.create_group(stream, "g").await;
    let producer_only = Processor::builder(ctx.settings()).start().await.unwrap();
    publish_numbers(&producer_only, stream, range).await;
    producer_only.shutdown().await.unwrap();
}

async fn exactly_one_effect_under_redelivery(db: TestDb) {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("ledger");
    let store = db.store().await;
    create_effects_table(&store).await;
    let processor = start_group(
        ctx.settings(),
        Group::transactional(&stream, "ledger", &store, Effects::plain()).with_members(2),
    )
    .await;
    publish_numbers(&processor, &stream, 0..200).await;
    eventually(Duration::from_secs(20), "200 effects", || async {
        effects(&store).await.len() == 200
    })
    .await;
    eventually(Duration::from_secs(5), "all acked", || async {
        ctx.pending(&stream, "ledger").await == 0
    })
    .await;
    // Replay the whole stream to the group: every event is delivered again.
    ctx.replay_group(&stream, "ledger").await;
    eventually(
        Duration::from_secs(20),
        "200 duplicates absorbed",
        || async { store.stats().duplicates == 200 },
    )
    .await;
    eventually(Duration::from_secs(5), "replay acked", || async {
        ctx.pending(&stream, "ledger").await == 0
    })
    .await;
    let rows = effects(&store).await;
    assert_eq!(
        rows.len(),
        200,
        "one effect per event after a full replay ({:?})",
        db.backend
    );
    let mut ns: Vec<i64> = rows.iter().map(|(n, _)| *n).collect();
    ns.sort();
    ns.dedup();
    assert_eq!(ns.len(), 200);
    for n in 0..200u64 {
        assert!(
            store
                .is_processed("ledger", &find_event_id(&ctx, &stream, n).await)
                .await
                .unwrap()
        );
    }
    assert_eq!(store.stats().committed, 200);
    processor.shutdown().await.unwrap();
}

/// The event id of event `n` in `stream`.
async fn find_event_id(ctx: &TestContext, stream: &str, n: u64) -> String {
    let entries = ctx.entries(stream).await;
    for (_, fields) in entries {
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        let data: serde_json::Value = serde_json::from_str(&get("data").unwrap()).unwrap();
        if data["n"].as_u64() == Some(n) {
            return get("id").unwrap();
        }
    }
    panic!("event {n} not found");
}

on_both_databases!(
    exactly_one_effect_under_redelivery_sqlite,
    exactly_one_effect_under_redelivery_postgres,
    exactly_one_effect_under_redelivery
);

#[actix_rt::test]
async fn duplicate_publishes_of_one_event_have_one_effect() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let stream = ctx.stream("dups");
        let store = db.store().await;
        create_effects_table(&store).await;
        let processor = start_group(
            ctx.settings(),
            Group::transactional(&stream, "g", &store, Effects::plain()),
        )
        .await;
        for _ in 0..3 {
            let event = numbered(7).with_id("fixed-event-id");
            processor.producer().publish(&stream, event).await.unwrap();
        }
        eventually(Duration::from_secs(10), "3 deliveries settled", || async {
            let s = store.stats();
            s.committed + s.duplicates == 3 && ctx.pending(&stream, "g").await == 0
        })
        .await;
        assert_eq!(effects(&store).await, vec![(7, 1)], "{:?}", db.backend);
        assert_eq!(store.stats().duplicates, 2);
        processor.shutdown().await.unwrap();
    }
}

/// Entries of one read share a transaction; a failing or panicking entry
/// rolls back only its own writes, and is retried alone.
#[actix_rt::test]
async fn a_failing_entry_does_not_undo_its_batch_mates() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let stream = ctx.stream("batch");
        let store = db.store().await;
        create_effects_table(&store).await;
        let handler = Effects {
            fail_on: HashMap::from([(5, vec![1]), (11, vec![1, 2])]),
            panic_on: HashMap::from([(8, vec![1])]),
            ..Effects::plain()
        };
        publish_before_start(&ctx, &stream, 0..20).await;
        let processor = start_group(
            ctx.settings(),
            Group::transactional(&stream, "g", &store, handler),
        )
        .await;
        eventually(Duration::from_secs(15), "all 20 effected", || async {
            effects(&store).await.len() == 20 && ctx.pending(&stream, "g").await == 0
        })
        .await;
        let mut rows = effects(&store).await;
        rows.sort();
        for (n, attempt) in &rows {
            let expected = match n {
                5 | 8 => 2,
                11 => 3,
                _ => 1,
            };
            assert_eq!(*attempt, expected, "event {n} ({:?}): {rows:?}", db.backend);
        }
        let status = processor.group_status(&stream, "g").await.unwrap();
        assert_eq!(status.retried, 4, "{status:?}");
        assert_eq!(status.dead_lettered, 0);
        processor.shutdown().await.unwrap();
    }
}

/// A batch that passes `database.batch_timeout_ms` while the database
/// answers is rolled back and its entries run one by one: the slow entry
/// fails alone (spending its attempts, then dead-lettered with the reason)
/// and its batch-mates commit at their first attempt.
#[actix_rt::test]
async fn an_entry_slower_than_the_batch_timeout_fails_alone() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let stream = ctx.stream("slow");
        let mut settings = db.settings.clone();
        settings.batch_timeout_ms = 1_000;
        let store = Store::connect(&settings).await.unwrap();
        create_effects_table(&store).await;
        let handler = Effects {
            slow_on: HashMap::from([(3, Duration::from_secs(3))]),
            ..Effects::plain()
        };
        publish_before_start(&ctx, &stream, 0..10).await;
        let processor = start_group(
            ctx.settings(),
            Group::transactional(&stream, "g", &store, handler).with_retry(
                RetryPolicy::default()
                    .with_max_attempts(2)
                    .with_initial_delay(Duration::from_millis(50)),
            ),
        )
        .await;
        let dlq = redstream::dead_letter_stream(&stream);
        eventually(
            Duration::from_secs(20),
            "9 committed, 1 dead-lettered",
            || async { ctx.xlen(&dlq).await == 1 && ctx.pending(&stream, "g").await == 0 },
        )
        .await;
        let mut rows = effects(&store).await;
        rows.sort();
        let expected: Vec<(i64, i64)> = (0..10).filter(|n| *n != 3).map(|n| (n, 1)).collect();
        assert_eq!(rows, expected, "{:?}", db.backend);
        let letters = ctx.entries(&dlq).await;
        let get = |k: &str| letters[0].1.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert!(
            get("error").contains("database.batch_timeout_ms"),
            "{letters:?}"
        );
        assert_eq!(get("attempts"), "2", "{letters:?}");
        processor.shutdown().await.unwrap();
    }
}

/// A database outage pauses the batch and retries it; nothing is acked
/// without a commit, no attempt is used, and each event has one effect.
#[actix_rt::test]
async fn a_database_outage_is_retried_without_using_attempts() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let stream = ctx.stream("outage");
        let mut settings = db.settings.clone();
        settings.busy_timeout_ms = 100;
        let store = Store::connect(&settings).await.unwrap();
        create_effects_table(&store).await;
        let handler = Effects {
            work: Duration::from_millis(200),
            ..Effects::plain()
        };
        let processor = start_group(
            ctx.settings(),
            Group::transactional(&stream, "g", &store, handler),
        )
        .await;
        // SQLite: another writer holds the database for 1.5 s from before
        // the events arrive, so their first batch surely finds it busy.
        let other_writer = match db.backend {
            Backend::Sqlite => {
                let other = sea_orm::Database::connect(db.settings.url.expose())
                    .await
                    .unwrap();
                let tx = other.begin().await.unwrap();
                tx.execute_unprepared("INSERT INTO effects VALUES ('lock', -1, 0)")
                    .await
                    .unwrap();
                Some(tx)
            }
            Backend::Postgres => None,
        };
        publish_numbers(&processor, &stream, 0..10).await;
        match db.backend {
            Backend::Postgres => {
                // Cut every connection of the test database mid-batch.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let admin = sea_orm::Database::connect(crate::support::db::postgres_admin_url())
                    .await
                    .unwrap();
                admin
                    .execute_unprepared(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
                        db.pg_name().unwrap()
                    ))
                    .await
                    .unwrap();
            }
            Backend::Sqlite => {
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                if let Some(tx) = other_writer {
                    tx.rollback().await.unwrap();
                }
            }
        }
        eventually(Duration::from_secs(20), "all 10 effected once", || async {
            effects(&store).await.len() == 10 && ctx.pending(&stream, "g").await == 0
        })
        .await;
        let rows = effects(&store).await;
        assert!(
            rows.iter().all(|(_, attempt)| *attempt == 1),
            "{:?}: {rows:?}",
            db.backend
        );
        assert!(
            store.stats().retried_batches >= 1,
            "{:?}: the outage was seen",
            db.backend
        );
        let status = processor.group_status(&stream, "g").await.unwrap();
        assert_eq!((status.retried, status.dead_lettered), (0, 0), "{status:?}");
        processor.shutdown().await.unwrap();
    }
}

/// What a group saw of the events relayed from the outbox.
#[derive(Default)]
struct Relayed {
    ids: Mutex<Vec<(String, u64)>>,
}

impl Handler for Relayed {
    type Event = serde_json::Value;

    async fn handle(&self, v: serde_json::Value, meta: Meta) -> HandlerResult {
        self.ids.lock().unwrap().push((
            meta.event_id().unwrap().to_owned(),
            v["n"].as_u64().unwrap(),
        ));
        Ok(Outcome::Ack)
    }
}

#[actix_rt::test]
async fn the_outbox_publishes_committed_rows_in_order_and_never_rolled_back_ones() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let stream = ctx.stream("outbox");
        let store = db.store().await;
        let relayed = Arc::new(Relayed::default());
        let processor = Processor::builder(ctx.settings())
            .outbox(&store)
            .group(Group::new(&stream, "g", Arc::clone(&relayed)))
            .start()
            .await
            .unwrap();
        let tx = store.connection().begin().await.unwrap();
        let mut ids = Vec::new();
        for n in 0..30 {
            ids.push(enqueue(&tx, &stream, numbered(n)).await.unwrap());
        }
        tx.commit().await.unwrap();
        let rolled_back = store.connection().begin().await.unwrap();
        enqueue(&rolled_back, &stream, numbered(999)).await.unwrap();
        rolled_back.rollback().await.unwrap();

        eventually(
            Duration::from_secs(10),
            "30 relayed and handled",
            || async { relayed.ids.lock().unwrap().len() == 30 },
        )
        .await;
        // In order, with the event ids the outbox assigned.
        let entries = ctx.entries(&stream).await;
        let stream_ids: Vec<String> = entries
            .iter()
            .map(|(_, f)| f.iter().find(|(k, _)| k == "id").unwrap().1.clone())
            .collect();
        assert_eq!(stream_ids, ids, "{:?}", db.backend);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            relayed.ids.lock().unwrap().iter().all(|(_, n)| *n != 999),
            "a rolled-back row was published"
        );
        processor.shutdown().await.unwrap();
    }
}

/// A crash between publishing a row and marking it sent publishes it again:
/// a duplicate entry with the same event id, absorbed by an exactly-once
/// consumer.
#[actix_rt::test]
async fn a_relay_crash_before_marking_gives_duplicates_that_consumers_absorb() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let stream = ctx.stream("outbox-dup");
        let store = db.store().await;
        create_effects_table(&store).await;
        let processor = Processor::builder(ctx.settings())
            .outbox(&store)
            .group(Group::transactional(&stream, "g", &store, Effects::plain()))
            .start()
            .await
            .unwrap();
        let tx = store.connection().begin().await.unwrap();
        for n in 0..10 {
            enqueue(&tx, &stream, numbered(n)).await.unwrap();
        }
        tx.commit().await.unwrap();
        eventually(Duration::from_secs(10), "10 effected", || async {
            effects(&store).await.len() == 10
        })
        .await;
        // Consumers can be faster than the relay's mark: wait for it, so
        // that the reset below is not overwritten by a late mark.
        eventually(Duration::from_secs(10), "10 rows marked sent", || async {
            let unsent = Query::select()
                .expr(Expr::col(Alias::new("id")).count())
                .from(Alias::new("outbox"))
                .and_where(Expr::col(Alias::new("sent_at")).is_null())
                .to_owned();
            let row = store
                .connection()
                .query_one(&unsent)
                .await
                .unwrap()
                .unwrap();
            row.try_get_by_index::<i64>(0).unwrap() == 0
        })
        .await;
        // As if the relay died after publishing, before marking.
        let reset = Query::update()
            .table(Alias::new("outbox"))
            .value(Alias::new("sent_at"), Expr::val(Option::<i64>::None))
            .to_owned();
        store.connection().execute(&reset).await.unwrap();
        eventually(
            Duration::from_secs(10),
            "republished and absorbed",
            || async { store.stats().duplicates == 10 && ctx.pending(&stream, "g").await == 0 },
        )
        .await;
        assert_eq!(ctx.xlen(&stream).await, 20, "each row published twice");
        assert_eq!(
            effects(&store).await.len(),
            10,
            "{:?}: one effect each",
            db.backend
        );
        processor.shutdown().await.unwrap();
    }
}

/// On PostgreSQL the relay wakes at commit (LISTEN/NOTIFY), not at its
/// next poll.
#[actix_rt::test]
async fn postgres_wakes_the_relay_at_commit() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("notify");
    let store = db.store().await;
    let mut settings = ctx.settings();
    settings.outbox.poll_ms = 30_000;
    let processor = Processor::builder(settings)
        .outbox(&store)
        .start()
        .await
        .unwrap();
    // Let the relay take its lease and start listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let tx = store.connection().begin().await.unwrap();
    enqueue(&tx, &stream, numbered(1)).await.unwrap();
    tx.commit().await.unwrap();
    eventually(
        Duration::from_secs(5),
        "published without waiting for a poll",
        || async { ctx.xlen(&stream).await == 1 },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    processor.shutdown().await.unwrap();
}

/// Writes a child row whose parent must exist at commit (a deferred
/// foreign key): event 5 names a parent that does not.
struct Children;

impl TxHandler for Children {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        v: serde_json::Value,
        _meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let n = v["n"].as_u64().unwrap_or(0);
        let parent = if n == 5 { "missing" } else { "p" };
        let insert = Query::insert()
            .into_table(Alias::new("children"))
            .columns([Alias::new("n"), Alias::new("parent")])
            .values([(n as i64).into(), parent.into()])?
            .to_owned();
        tx.execute(&insert).await?;
        Ok(Outcome::Ack)
    }
}

/// One entry whose effect is refused only at `COMMIT` does not hold its
/// batch-mates back: they commit, it fails alone and is dead-lettered.
#[actix_rt::test]
async fn a_commit_refused_because_of_one_entry_does_not_block_the_batch() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("deferred");
    let store = db.store().await;
    for sql in [
        "CREATE TABLE parents (id TEXT PRIMARY KEY)",
        "INSERT INTO parents VALUES ('p')",
        "CREATE TABLE children (n BIGINT NOT NULL, parent TEXT NOT NULL REFERENCES parents(id) DEFERRABLE INITIALLY DEFERRED)",
    ] {
        store.connection().execute_unprepared(sql).await.unwrap();
    }
    publish_before_start(&ctx, &stream, 0..10).await;
    let processor = start_group(
        ctx.settings(),
        Group::transactional(&stream, "g", &store, Children).with_retry(
            RetryPolicy::default()
                .with_max_attempts(2)
                .with_initial_delay(Duration::from_millis(50)),
        ),
    )
    .await;
    let dlq = redstream::dead_letter_stream(&stream);
    eventually(
        Duration::from_secs(15),
        "9 committed, 1 dead-lettered",
        || async { ctx.xlen(&dlq).await == 1 && ctx.pending(&stream, "g").await == 0 },
    )
    .await;
    let ns = select_n(&store, "SELECT n FROM children ORDER BY n").await;
    assert_eq!(ns, [0, 1, 2, 3, 4, 6, 7, 8, 9]);
    let letters = ctx.entries(&dlq).await;
    let get = |k: &str| letters[0].1.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert!(
        get("reason").starts_with("max_attempts_exceeded"),
        "{letters:?}"
    );
    assert!(get("error").contains("commit refused"), "{letters:?}");
    processor.shutdown().await.unwrap();
}

/// Hands control to the test before returning, so the test can stall the
/// ack that follows the commit.
struct Gate {
    reached: tokio::sync::mpsc::UnboundedSender<()>,
    go: Arc<tokio::sync::Notify>,
    inner: Effects,
}

impl TxHandler for Gate {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        v: serde_json::Value,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let outcome = self.inner.handle(v, meta, tx).await?;
        if meta.attempt() == 1 && self.reached.send(()).is_ok() {
            self.go.notified().await;
        }
        Ok(outcome)
    }
}

/// The process dies after the commit, before the ack lands: the entry is
/// redelivered, finds its key, and is acked with no second effect.
#[actix_rt::test]
async fn a_crash_between_commit_and_ack_gives_no_second_effect() {
    let server = crate::support::RedisServer::start();
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::with_url(&server.url()) else {
            return;
        };
        let stream = ctx.stream("commit-ack");
        let store = db.store().await;
        create_effects_table(&store).await;
        let (reached, mut at_gate) = tokio::sync::mpsc::unbounded_channel();
        let go = Arc::new(tokio::sync::Notify::new());
        let gate = Gate {
            reached,
            go: Arc::clone(&go),
            inner: Effects::plain(),
        };
        let mut settings = ctx.settings();
        settings.redis.command_timeout_ms = 500;
        settings.shutdown.deadline_ms = 300;
        let processor = start_group(
            settings.clone(),
            Group::transactional(&stream, "g", &store, gate),
        )
        .await;
        publish_one(&processor, &stream, numbered(1)).await;
        at_gate.recv().await.unwrap();
        // Writes stall from now on: the XACK after the commit will hang.
        server.cmd(&["CLIENT", "PAUSE", "20000", "WRITE"]);
        go.notify_one();
        // The commit happened, and the processor's command connection,
        // where its XACK goes, is held by the pause (postponed clients show
        // flag `b`): whatever write reached it first, the XACK waits
        // behind it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let clients = format!("{:?}", server.cmd(&["CLIENT", "LIST"]));
            if store.stats().committed == 1 && command_connection_held(&clients) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the commit happened ({} committed) and the XACK is stuck: {clients}",
                store.stats().committed
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The process "dies": it stops, and its connections are cut before
        // the stuck XACK could run.
        let report = processor.shutdown().await.unwrap();
        assert!(!report.settled, "the ack could not be written");
        server.cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
        server.cmd(&["CLIENT", "UNPAUSE"]);
        assert_eq!(ctx.pending(&stream, "g").await, 1, "the ack was lost");

        // The restarted process has the usual timeout: the short one above
        // only serves to end the stuck XACK, and on a loaded machine it can
        // fail start-up's own commands.
        settings.redis.command_timeout_ms = Settings::default().redis.command_timeout_ms;
        let processor = start_group(
            settings,
            Group::transactional(&stream, "g", &store, Effects::plain()),
        )
        .await;
        eventually(
            Duration::from_secs(15),
            "redelivered and absorbed",
            || async { store.stats().duplicates == 1 && ctx.pending(&stream, "g").await == 0 },
        )
        .await;
        assert_eq!(
            effects(&store).await,
            vec![(1, 1)],
            "{:?}: one effect",
            db.backend
        );
        processor.shutdown().await.unwrap();
    }
}

/// Whether `CLIENT LIST` shows a redstream command connection (named
/// `redstream:<instance>:cmd`) postponed by `CLIENT PAUSE`.
fn command_connection_held(clients: &str) -> bool {
    clients.split("id=").any(|client| {
        let field = |name: &str| {
            client
                .split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or("")
        };
        field("name=").starts_with("redstream:")
            && field("name=").ends_with(":cmd")
            && field("flags=").contains('b')
    })
}

/// Start-up waits for a SQLite file that another process's writer holds,
/// instead of failing on the first "database is locked".
#[actix_rt::test]
async fn migrations_wait_for_a_busy_sqlite_database() {
    let db = TestDb::sqlite();
    let mut settings = db.settings.clone();
    settings.busy_timeout_ms = 100;
    // Another writer holds the write lock for 1.5 s.
    let other = sea_orm::Database::connect(settings.url.expose())
        .await
        .unwrap();
    let lock = other
        .begin_with_options(sea_orm::TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Exclusive),
            ..Default::default()
        })
        .await
        .unwrap();
    lock.execute_unprepared("CREATE TABLE held (x INTEGER)")
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        lock.commit().await.unwrap();
    });
    let started = std::time::Instant::now();
    let store = Store::connect(&settings)
        .await
        .expect("connects once the lock is released");
    assert!(
        started.elapsed() >= Duration::from_millis(1_000),
        "it waited for the lock: {:?}",
        started.elapsed()
    );
    assert!(!store.is_processed("g", "e").await.unwrap(), "migrated");
    release.await.unwrap();
}

//! Reclaim: entries of a member that stopped are taken over; entries
//! trimmed while pending are dead-lettered; live owners keep their entries
//! through heartbeats, and an owner that lost one does not commit it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use redstream::prelude::*;

use crate::support::{TestContext, eventually, publish_one, read_group, select_n, start_group};

async fn create_group(ctx: &TestContext, stream: &str) {
    ctx.create_group(stream, "g").await;
}

/// Reads `count` new entries as `consumer` and never acks them.
async fn read_as(ctx: &TestContext, stream: &str, consumer: &str, count: usize) -> Vec<String> {
    read_group(&mut ctx.conn().await, stream, "g", consumer, count).await
}

fn counting_handler(
    counts: &Arc<Mutex<HashMap<String, u32>>>,
) -> impl Handler<Event = serde_json::Value> + use<> {
    let sink = Arc::clone(counts);
    handler_fn(move |_: serde_json::Value, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            *sink
                .lock()
                .unwrap()
                .entry(meta.entry_id().to_owned())
                .or_default() += 1;
            Ok(Outcome::Ack)
        }
    })
}

/// A member read 300 entries and died. The first 50 were touched again a
/// moment ago, so early scans find nothing idle but must go on (P8); with 5
/// entries per XAUTOCLAIM call each call examines at most 50. Every entry
/// is taken over and handled once.
#[actix_rt::test]
async fn a_dead_members_entries_are_taken_over_across_a_large_pending_list() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("ghost");
    create_group(&ctx, &stream).await;
    let mut c = ctx.conn().await;
    for i in 0..300 {
        let _: String = c
            .xadd(&stream, "*", &[("data", format!("{{\"n\":{i}}}"))])
            .await
            .unwrap();
    }
    let ids = read_as(&ctx, &stream, "ghost", 300).await;
    assert_eq!(ids.len(), 300);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // The head of the pending list is fresh again, the rest is idle.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg("g")
        .arg("ghost")
        .arg(0)
        .arg(&ids[..50])
        .arg("JUSTID")
        .query_async(&mut c)
        .await
        .unwrap();

    let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut settings = ctx.settings();
    settings.reclaim.min_idle_ms = 1_000;
    settings.reclaim.heartbeat_ms = 300;
    settings.reclaim.count = 5;
    settings.reclaim.interval_ms = 100;
    let processor = start_group(
        settings,
        Group::new(&stream, "g", counting_handler(&counts)).with_members(2),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "all 300 taken over and handled",
        || async { counts.lock().unwrap().len() == 300 && ctx.pending(&stream, "g").await == 0 },
    )
    .await;
    let counts = counts.lock().unwrap().clone();
    assert!(counts.values().all(|n| *n == 1), "each handled once");
    assert!(ids.iter().all(|id| counts.contains_key(id)));
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert_eq!(status.acked, 300);
    processor.shutdown().await.unwrap();
}

/// Entries deleted while pending: the reclaimer's XAUTOCLAIM reports them
/// (a dead member's), and a restarted member finds them in its own pending
/// list. Both are dead-lettered as `trimmed_while_pending`.
#[actix_rt::test]
async fn entries_trimmed_while_pending_are_dead_lettered() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("trimmed");
    create_group(&ctx, &stream).await;
    let mut c = ctx.conn().await;
    for i in 0..6 {
        let _: String = c
            .xadd(&stream, "*", &[("data", format!("{{\"n\":{i}}}"))])
            .await
            .unwrap();
    }
    let settings = ctx.settings();
    let own = format!("{}-0", settings.instance.name);
    // Three read by a member that is gone, three by this process's own
    // member name in an earlier life.
    let ghost = read_as(&ctx, &stream, "ghost", 3).await;
    let mine = read_as(&ctx, &stream, &own, 3).await;
    let _: u64 = c.xdel(&stream, &[&ghost[0], &mine[0]]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut settings = settings;
    settings.reclaim.min_idle_ms = 1_000;
    settings.reclaim.heartbeat_ms = 300;
    let processor = start_group(
        settings,
        Group::new(&stream, "g", counting_handler(&counts)),
    )
    .await;
    let dlq = redstream::dead_letter_stream(&stream);
    eventually(
        Duration::from_secs(15),
        "4 handled, 2 dead-lettered",
        || async { counts.lock().unwrap().len() == 4 && ctx.xlen(&dlq).await == 2 },
    )
    .await;
    ctx.eventually_nothing_pending(&stream, "g", Duration::from_secs(5))
        .await;
    let letters = ctx.entries(&dlq).await;
    let mut origins = Vec::new();
    for (_, fields) in &letters {
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert!(
            get("reason").unwrap().starts_with("trimmed_while_pending"),
            "{fields:?}"
        );
        origins.push(get("origin_id").unwrap());
    }
    origins.sort();
    let mut expected = vec![ghost[0].clone(), mine[0].clone()];
    expected.sort();
    assert_eq!(origins, expected);
    processor.shutdown().await.unwrap();
}

/// A handler that runs three times `min_idle` keeps its entry: heartbeats
/// extend the claim, so it is never run twice, and Redis's delivery count
/// stays 1.
#[actix_rt::test]
async fn a_long_handler_keeps_its_entry() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("long");
    let runs = Arc::new(AtomicU32::new(0));
    let running = Arc::new(AtomicU32::new(0));
    let max_concurrent = Arc::new(AtomicU32::new(0));
    let (r, c2, m) = (
        Arc::clone(&runs),
        Arc::clone(&running),
        Arc::clone(&max_concurrent),
    );
    let handler = handler_fn(move |_: serde_json::Value, _meta: Meta| {
        let (r, c2, m) = (Arc::clone(&r), Arc::clone(&c2), Arc::clone(&m));
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            let now = c2.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(3_000)).await;
            c2.fetch_sub(1, Ordering::SeqCst);
            Ok(Outcome::Ack)
        }
    });
    let mut settings = ctx.settings();
    settings.reclaim.min_idle_ms = 1_000;
    settings.reclaim.heartbeat_ms = 300;
    settings.reclaim.interval_ms = 100;
    let processor = start_group(settings, Group::new(&stream, "g", handler).with_members(2)).await;
    publish_one(
        &processor,
        &stream,
        Event::new("slow", &serde_json::json!({})).unwrap(),
    )
    .await;
    // Mid-run, Redis still counts one delivery.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let rows = ctx.pending_entries(&stream, "g", 10).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].3, 1, "delivered once: {rows:?}");
    assert!(
        rows[0].2 < 1_000,
        "idle kept below min_idle by heartbeats: {rows:?}"
    );
    eventually(Duration::from_secs(10), "done", || async {
        ctx.pending(&stream, "g").await == 0
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "run once");
    assert_eq!(max_concurrent.load(Ordering::SeqCst), 1);
    processor.shutdown().await.unwrap();
}

/// Another member takes an entry over while its handler runs (a zombie
/// owner): the heartbeat notices and the handler is dropped before it
/// reaches its commit.
#[actix_rt::test]
async fn an_owner_that_lost_its_entry_does_not_commit() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("stolen");
    let committed = Arc::new(AtomicU32::new(0));
    let c1 = Arc::clone(&committed);
    let handler = handler_fn(move |_: serde_json::Value, _meta: Meta| {
        let committed = Arc::clone(&c1);
        async move {
            tokio::time::sleep(Duration::from_millis(2_000)).await;
            committed.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Ack)
        }
    });
    let mut settings = ctx.settings();
    settings.reclaim.min_idle_ms = 60_000;
    settings.reclaim.heartbeat_ms = 200;
    let processor = start_group(settings, Group::new(&stream, "g", handler)).await;
    let published = publish_one(
        &processor,
        &stream,
        Event::new("x", &serde_json::json!({})).unwrap(),
    )
    .await;
    eventually(Duration::from_secs(5), "delivered", || async {
        ctx.pending(&stream, "g").await == 1
    })
    .await;
    // Another process's member takes it.
    let mut c = ctx.conn().await;
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg("g")
        .arg("other-process-0")
        .arg(0)
        .arg(&published.entry_id)
        .arg("JUSTID")
        .query_async(&mut c)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        committed.load(Ordering::SeqCst),
        0,
        "the lost handler never committed"
    );
    // Still pending, and still the other member's: nothing acked it.
    let rows = ctx.pending_entries(&stream, "g", 10).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].1, "other-process-0",
        "the heartbeat did not take it back"
    );
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert_eq!((status.acked, status.retried), (0, 0));
    processor.shutdown().await.unwrap();
}

/// The same with an exactly-once handler: the entry's writes are rolled
/// back and its batch runs again without it, so it has no effect here.
#[actix_rt::test]
async fn an_exactly_once_batch_drops_an_entry_it_lost() {
    use sea_orm::sea_query::{Alias, Query};
    use sea_orm::{ConnectionTrait, DatabaseTransaction};

    struct Slow;
    impl TxHandler for Slow {
        type Event = serde_json::Value;
        async fn handle(
            &self,
            v: serde_json::Value,
            meta: &Meta,
            tx: &DatabaseTransaction,
        ) -> HandlerResult {
            let insert = Query::insert()
                .into_table(Alias::new("effects"))
                .columns([Alias::new("n")])
                .values([v["n"].as_i64().unwrap().into()])?
                .to_owned();
            tx.execute(&insert).await?;
            if meta.attempt() == 1 && v["n"] == 0 {
                tokio::time::sleep(Duration::from_millis(1_500)).await;
            }
            Ok(Outcome::Ack)
        }
    }

    let Some(ctx) = TestContext::new() else {
        return;
    };
    let db = crate::support::db::TestDb::sqlite();
    let store = db.store().await;
    store
        .connection()
        .execute_unprepared("CREATE TABLE effects (n BIGINT NOT NULL)")
        .await
        .unwrap();
    let stream = ctx.stream("stolen-tx");
    create_group(&ctx, &stream).await;
    let mut c = ctx.conn().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let id: String = c
            .xadd(
                &stream,
                "*",
                &[("id", format!("e{n}")), ("data", format!("{{\"n\":{n}}}"))],
            )
            .await
            .unwrap();
        ids.push(id);
    }
    let mut settings = ctx.settings();
    settings.reclaim.min_idle_ms = 60_000;
    settings.reclaim.heartbeat_ms = 200;
    let processor = start_group(settings, Group::transactional(&stream, "g", &store, Slow)).await;
    eventually(Duration::from_secs(5), "the batch is running", || async {
        ctx.pending(&stream, "g").await == 3
    })
    .await;
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg("g")
        .arg("other-process-0")
        .arg(0)
        .arg(&ids[0])
        .arg("JUSTID")
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the other two committed and acked",
        || async { ctx.pending(&stream, "g").await == 1 && store.stats().committed == 2 },
    )
    .await;
    let ns = select_n(&store, "SELECT n FROM effects ORDER BY n").await;
    assert_eq!(ns, [1, 2], "the lost entry's write was rolled back");
    assert!(!store.is_processed("g", "e0").await.unwrap());
    processor.shutdown().await.unwrap();
}

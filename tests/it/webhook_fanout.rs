//! The webhook fan-out example's domain against real Redis, SQLite and
//! PostgreSQL, with real HTTP receivers on loopback: three groups each get
//! every event, a stalled group delays no other, signatures verify, retries
//! (5xx, 429 with `Retry-After`, timeouts), dead letters (4xx at once, after
//! the last attempt), per-endpoint isolation, the attempt records, exactly
//! one analytics count and notification under redelivery, and fan-out-safe
//! trimming.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use redstream::prelude::*;
use redstream::{RedisBroker, dead_letter_stream};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder};

use crate::support::db::TestDb;
use crate::support::{TestContext, eventually, publish_all, publish_one, read_group, xadd};

#[path = "../../examples/webhook_fanout/webhooks/mod.rs"]
// The tests use part of the example's module, not every re-export.
#[allow(dead_code, unused_imports)]
mod webhooks;

#[path = "../../examples/webhook_fanout/receivers.rs"]
#[allow(dead_code)]
mod receivers;

#[path = "../../examples/webhook_fanout/retention.rs"]
#[allow(dead_code)]
mod retention;

use receivers::{Received, Receiver, Reply};
use retention::{RetentionPolicy, trim_once};
use webhooks::{
    ANALYTICS_GROUP, Endpoint, EndpointCache, EndpointWatcher, NOTIFICATION_GROUP, ORDER_CREATED,
    WEBHOOK_GROUP, Wiring, attempt_row, delivery_stream, event_count, notification,
};

const WAIT: Duration = Duration::from_secs(30);

fn secret(name: &str) -> String {
    format!("whsec_{}", BASE64.encode(format!("test-secret-{name}")))
}

fn endpoint(name: &str, url: &str, types: &[&str], timeout_ms: u64) -> Endpoint {
    Endpoint::new(
        name,
        url,
        secret(name),
        types.iter().map(|t| (*t).to_owned()).collect(),
        timeout_ms,
    )
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(max_attempts)
        .with_initial_delay(Duration::from_millis(50))
        .with_factor(2.0)
        .with_max_delay(Duration::from_millis(500))
        .with_jitter(0.0)
}

fn wiring(ctx: &TestContext, endpoints: Vec<Endpoint>, policy: RetryPolicy) -> Wiring {
    Wiring {
        source: ctx.stream("orders"),
        endpoints: EndpointCache::fixed(endpoints),
        policy,
        members: 2,
        in_flight: 8,
    }
}

fn order(i: usize) -> Event {
    Event::new(
        ORDER_CREATED,
        &serde_json::json!({
            "order_id": format!("o-{i}"),
            "customer_id": format!("c-{}", i % 3),
            "items": [{"sku": "s-1", "qty": 1, "unit_price_cents": 100 + i}],
        }),
    )
    .unwrap()
    .with_id(format!("e-{i}"))
}

fn replying(reply: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> receivers::Behaviour {
    Arc::new(reply)
}

async fn healthy() -> Receiver {
    Receiver::start(replying(|_| Reply::Status(200)))
        .await
        .unwrap()
}

async fn store_for(db: &TestDb) -> Store {
    let store = db.store().await;
    webhooks::create_tables(store.connection()).await.unwrap();
    store
}

async fn start(ctx: &TestContext, store: &Store, groups: Vec<Group>) -> Processor {
    let mut settings = ctx.settings();
    settings.outbox.poll_ms = 20;
    let mut builder = Processor::builder(settings).outbox(store);
    for g in groups {
        builder = builder.group(g);
    }
    builder.start().await.unwrap()
}

/// A fan-out deployment on `db`: the [`Wiring`] of `endpoints` with
/// `policy`, its fan-out and delivery groups running.
async fn deploy(
    ctx: &TestContext,
    db: &TestDb,
    endpoints: Vec<Endpoint>,
    policy: RetryPolicy,
) -> (Store, Wiring, Processor) {
    let store = store_for(db).await;
    let w = wiring(ctx, endpoints, policy);
    let mut groups = w.fan_out_groups(&store);
    groups.extend(w.delivery_groups(&store).unwrap());
    let processor = start(ctx, &store, groups).await;
    (store, w, processor)
}

/// Every attempt recorded for an endpoint, by event then attempt.
async fn attempts(store: &Store, endpoint: &str) -> Vec<attempt_row::Model> {
    attempt_row::Entity::find()
        .filter(attempt_row::Column::Endpoint.eq(endpoint))
        .order_by_asc(attempt_row::Column::EventId)
        .order_by_asc(attempt_row::Column::Attempt)
        .all(store.connection())
        .await
        .unwrap()
}

async fn notifications(store: &Store) -> u64 {
    notification::Entity::find()
        .count(store.connection())
        .await
        .unwrap()
}

/// Events counted by analytics, per type.
async fn counted(store: &Store) -> HashMap<String, i64> {
    let mut by_type = HashMap::new();
    for row in event_count::Entity::find()
        .all(store.connection())
        .await
        .unwrap()
    {
        *by_type.entry(row.event_type).or_insert(0) += row.events;
    }
    by_type
}

fn distinct_ids(received: &[Received]) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for r in received {
        *ids.entry(r.webhook_id.clone()).or_insert(0) += 1;
    }
    ids
}

fn field(fields: &[(String, String)], name: &str) -> String {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

#[test]
fn retry_after_reads_seconds_and_http_dates() {
    assert_eq!(
        webhooks::delivery::parse_retry_after(" 7 "),
        Some(Duration::from_secs(7))
    );
    let later = SystemTime::now() + Duration::from_secs(120);
    let parsed = webhooks::delivery::parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
    assert!(parsed > Duration::from_secs(110) && parsed <= Duration::from_secs(120));
    assert_eq!(webhooks::delivery::parse_retry_after("soon"), None);
}

/// The three groups on `orders` each get every event: every event reaches
/// the endpoint once, is counted once and (orders) notified once.
#[actix_rt::test]
async fn each_of_the_three_groups_gets_every_event() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let receiver = healthy().await;
        let endpoints = vec![endpoint("all", &receiver.url, &["*"], 2_000)];
        let (store, w, processor) = deploy(&ctx, &db, endpoints, policy(3)).await;
        let mut events: Vec<Event> = (0..30).map(order).collect();
        for i in 0..5 {
            events.push(
                Event::new(
                    "order.cancelled",
                    &serde_json::json!({"order_id": format!("o-{i}")}),
                )
                .unwrap()
                .with_id(format!("x-{i}")),
            );
        }
        publish(&processor, &w.source, events).await;
        eventually(WAIT, "every group handled every event", || async {
            distinct_ids(&receiver.received()).len() == 35
                && notifications(&store).await == 30
                && counted(&store).await.values().sum::<i64>() == 35
        })
        .await;
        let counts = counted(&store).await;
        assert_eq!(
            counts.get(ORDER_CREATED),
            Some(&30),
            "{db:?}",
            db = db.backend
        );
        assert_eq!(counts.get("order.cancelled"), Some(&5));
        assert_eq!(receiver.received().len(), 35, "each event POSTed once");
        for group in [WEBHOOK_GROUP, ANALYTICS_GROUP, NOTIFICATION_GROUP] {
            let status = processor.group_status(&w.source, group).await.unwrap();
            assert_eq!(status.acked, 35, "group {group}");
            assert_eq!(ctx.pending(&w.source, group).await, 0, "group {group}");
        }
        processor.shutdown().await.unwrap();
        receiver.stop().await;
    }
}

/// Analytics is stuck in its handler; webhooks and notifications finish
/// every event anyway, and analytics catches up once released.
#[actix_rt::test]
async fn a_stalled_group_does_not_delay_the_others() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let db = TestDb::sqlite();
    let store = store_for(&db).await;
    let receiver = healthy().await;
    let w = wiring(
        &ctx,
        vec![endpoint("a", &receiver.url, &["*"], 2_000)],
        policy(3),
    );
    let (open, gate) = tokio::sync::watch::channel(false);
    let entered = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (e, d) = (Arc::clone(&entered), Arc::clone(&done));
    let stalled = handler_fn(move |_: serde_json::Value, _: Meta| {
        let mut gate = gate.clone();
        let (e, d) = (Arc::clone(&e), Arc::clone(&d));
        async move {
            e.fetch_add(1, Ordering::SeqCst);
            let _ = gate.wait_for(|open| *open).await;
            d.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Ack)
        }
    });
    let mut groups: Vec<Group> = w
        .fan_out_groups(&store)
        .into_iter()
        .filter(|g| g.name() != ANALYTICS_GROUP)
        .collect();
    groups.push(
        Group::new(&w.source, ANALYTICS_GROUP, stalled).with_min_idle(Duration::from_secs(30)),
    );
    groups.extend(w.delivery_groups(&store).unwrap());
    let processor = start(&ctx, &store, groups).await;
    let events: Vec<Event> = (0..20).map(order).collect();
    publish(&processor, &w.source, events).await;
    eventually(
        WAIT,
        "webhooks and notifications done while analytics is stuck",
        || async {
            distinct_ids(&receiver.received()).len() == 20 && notifications(&store).await == 20
        },
    )
    .await;
    assert!(entered.load(Ordering::SeqCst) > 0, "analytics did start");
    assert_eq!(done.load(Ordering::SeqCst), 0, "analytics is still stuck");
    assert!(ctx.pending(&w.source, ANALYTICS_GROUP).await > 0);
    open.send(true).unwrap();
    eventually(WAIT, "analytics catches up", || async {
        done.load(Ordering::SeqCst) == 20 && ctx.pending(&w.source, ANALYTICS_GROUP).await == 0
    })
    .await;
    processor.shutdown().await.unwrap();
    receiver.stop().await;
}

/// Recomputes the Standard Webhooks signature from what the receiver got.
#[actix_rt::test]
async fn deliveries_are_signed_and_carry_their_headers() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let receiver = healthy().await;
    let ep = endpoint("signed", &receiver.url, &[ORDER_CREATED], 2_000);
    let key = BASE64
        .decode(ep.secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let db = TestDb::sqlite();
    let (_store, w, processor) = deploy(&ctx, &db, vec![ep], policy(3)).await;
    let events: Vec<Event> = (0..3).map(order).collect();
    publish(&processor, &w.source, events).await;
    eventually(WAIT, "three deliveries", || async {
        receiver.received().len() == 3
    })
    .await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut ids: Vec<String> = Vec::new();
    for r in receiver.received() {
        let ts: i64 = r.timestamp.parse().unwrap();
        assert!((now - ts).abs() < 60, "timestamp {ts} is now");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{}.{}.", r.webhook_id, r.timestamp).as_bytes());
        mac.update(&r.body);
        let expected = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
        assert_eq!(r.signature, expected, "signature of {}", r.webhook_id);
        // A different secret does not verify.
        let mut other = Hmac::<sha2::Sha256>::new_from_slice(b"not-the-secret").unwrap();
        other.update(format!("{}.{}.", r.webhook_id, r.timestamp).as_bytes());
        other.update(&r.body);
        assert_ne!(
            r.signature,
            format!("v1,{}", BASE64.encode(other.finalize().into_bytes()))
        );
        assert_eq!(r.event_type, ORDER_CREATED);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["type"], ORDER_CREATED);
        let n = r.webhook_id.strip_prefix("e-").unwrap();
        assert_eq!(body["data"]["order_id"], format!("o-{n}"));
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
        ids.push(r.webhook_id.clone());
    }
    ids.sort();
    assert_eq!(ids, ["e-0", "e-1", "e-2"], "webhook-id is the event id");
    processor.shutdown().await.unwrap();
    receiver.stop().await;
}

/// 503, then 429 with `Retry-After: 2`, then a timeout, then 200: retried
/// each time, delivered on the 4th attempt, the wait after the 429 at
/// least the 2 s asked, and one recorded row per attempt.
#[actix_rt::test]
async fn transient_failures_are_retried_until_delivered() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let receiver = Receiver::start(replying(|r| match r.nth {
        1 => Reply::Status(503),
        2 => Reply::RetryAfter(429, 2),
        3 => Reply::Slow(Duration::from_millis(1_500), 200),
        _ => Reply::Status(200),
    }))
    .await
    .unwrap();
    let db = TestDb::sqlite();
    let endpoints = vec![endpoint("flaky", &receiver.url, &["*"], 300)];
    let (store, w, processor) = deploy(&ctx, &db, endpoints, policy(5)).await;
    publish_one(&processor, &w.source, order(1)).await;
    eventually(WAIT, "delivered", || async {
        attempts(&store, "flaky")
            .await
            .iter()
            .any(|r| r.outcome == "delivered")
    })
    .await;
    let rows = attempts(&store, "flaky").await;
    let summary: Vec<(i32, Option<i32>, &str)> = rows
        .iter()
        .map(|r| (r.attempt, r.status_code, r.outcome.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, Some(503), "retry"),
            (2, Some(429), "retry"),
            (3, None, "retry"),
            (4, Some(200), "delivered"),
        ]
    );
    assert!(
        rows[2].error.as_deref().unwrap().contains("timeout"),
        "{:?}",
        rows[2].error
    );
    assert!(
        rows[2].latency_ms >= 300,
        "timed out after the request timeout"
    );
    assert!(rows.iter().all(|r| r.event_id == "e-1"));
    let got = receiver.received();
    assert_eq!(got.len(), 4, "one request per recorded attempt");
    let waited = got[2].at.duration_since(got[1].at);
    assert!(
        waited >= Duration::from_secs(2),
        "Retry-After honoured: waited {waited:?}"
    );
    let dlq = dead_letter_stream(&delivery_stream(&w.source, "flaky"));
    assert_eq!(ctx.xlen(&dlq).await, 0);
    processor.shutdown().await.unwrap();
    receiver.stop().await;
}

/// A 404 is dead-lettered at once, with the status in the reason.
#[actix_rt::test]
async fn a_client_error_is_dead_lettered_at_once() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let receiver = Receiver::start(replying(|_| Reply::Status(404)))
        .await
        .unwrap();
    let db = TestDb::sqlite();
    let (store, w, processor) = deploy(
        &ctx,
        &db,
        vec![endpoint("gone", &receiver.url, &["*"], 2_000)],
        policy(5),
    )
    .await;
    publish_one(&processor, &w.source, order(7)).await;
    let dlq = dead_letter_stream(&delivery_stream(&w.source, "gone"));
    eventually(WAIT, "dead-lettered", || async {
        ctx.xlen(&dlq).await == 1
    })
    .await;
    // Longer than the first retry delay: a retry would have come by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1, "no retry");
    let letters = ctx.entries(&dlq).await;
    let reason = field(&letters[0].1, "reason");
    assert!(reason.starts_with("rejected: http_404"), "{reason}");
    assert_eq!(field(&letters[0].1, "attempts"), "1");
    let rows = attempts(&store, "gone").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status_code, rows[0].outcome.as_str()),
        (Some(404), "rejected")
    );
    processor.shutdown().await.unwrap();
    receiver.stop().await;
}

/// Always 500: three attempts, then a dead letter with the last error.
#[actix_rt::test]
async fn exhausted_retries_are_dead_lettered() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let receiver = Receiver::start(replying(|_| Reply::Status(500)))
        .await
        .unwrap();
    let db = TestDb::sqlite();
    let (store, w, processor) = deploy(
        &ctx,
        &db,
        vec![endpoint("broken", &receiver.url, &["*"], 2_000)],
        policy(3),
    )
    .await;
    publish_one(&processor, &w.source, order(2)).await;
    let dlq = dead_letter_stream(&delivery_stream(&w.source, "broken"));
    eventually(WAIT, "dead-lettered", || async {
        ctx.xlen(&dlq).await == 1
    })
    .await;
    let letters = ctx.entries(&dlq).await;
    let reason = field(&letters[0].1, "reason");
    assert!(reason.starts_with("max_attempts_exceeded"), "{reason}");
    assert!(
        field(&letters[0].1, "error").contains("500"),
        "{:?}",
        letters[0].1
    );
    assert_eq!(field(&letters[0].1, "attempts"), "3");
    let rows = attempts(&store, "broken").await;
    let outcomes: Vec<(i32, Option<i32>, &str)> = rows
        .iter()
        .map(|r| (r.attempt, r.status_code, r.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (1, Some(500), "retry"),
            (2, Some(500), "retry"),
            (3, Some(500), "exhausted")
        ]
    );
    assert_eq!(receiver.received().len(), 3);
    processor.shutdown().await.unwrap();
    receiver.stop().await;
}

/// One endpoint times out on every request and is being retried; the
/// healthy one gets every event once, without waiting for it, and its
/// deliveries are never re-sent by the other's retries.
#[actix_rt::test]
async fn a_failing_endpoint_does_not_stall_a_healthy_one() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let db = TestDb::sqlite();
    let store = store_for(&db).await;
    let ok = healthy().await;
    let down = Receiver::start(replying(|_| Reply::Slow(Duration::from_secs(3), 200)))
        .await
        .unwrap();
    let mut w = wiring(
        &ctx,
        vec![
            endpoint("ok", &ok.url, &["*"], 1_000),
            endpoint("down", &down.url, &["*"], 1_000),
        ],
        policy(10).with_initial_delay(Duration::from_millis(300)),
    );
    w.members = 1;
    w.in_flight = 2;
    let mut groups = w.fan_out_groups(&store);
    groups.extend(w.delivery_groups(&store).unwrap());
    let processor = start(&ctx, &store, groups).await;
    let events: Vec<Event> = (0..30).map(order).collect();
    publish(&processor, &w.source, events).await;
    eventually(
        Duration::from_secs(10),
        "the healthy endpoint got all 30",
        || async { distinct_ids(&ok.received()).len() == 30 },
    )
    .await;
    // With 2 requests at a time of 1 s each, the failing one is far behind.
    assert!(distinct_ids(&down.received()).len() < 30);
    eventually(WAIT, "the failing endpoint is being retried", || async {
        down.received().iter().any(|r| r.nth >= 2)
    })
    .await;
    let per_id = distinct_ids(&ok.received());
    assert!(
        per_id.values().all(|n| *n == 1),
        "each event once at the healthy endpoint: {per_id:?}"
    );
    assert_eq!(ok.received().len(), 30);
    assert!(
        attempts(&store, "ok")
            .await
            .iter()
            .all(|r| r.outcome == "delivered" && r.attempt == 1)
    );
    processor.shutdown().await.unwrap();
    ok.stop().await;
    down.stop().await;
}

/// Analytics counts and notifications have one effect per event (and per
/// order) although events are published twice and the whole stream is
/// delivered to both groups again.
#[actix_rt::test]
async fn analytics_and_notifications_are_exactly_once_under_redelivery() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let store = store_for(&db).await;
        let w = wiring(&ctx, Vec::new(), policy(3));
        let groups = || {
            w.fan_out_groups(&store)
                .into_iter()
                .filter(|g| g.name() != WEBHOOK_GROUP)
                .collect::<Vec<_>>()
        };
        let processor = start(&ctx, &store, groups()).await;
        let mut events: Vec<Event> = (0..10).map(order).collect();
        // The same event again (a retried publish), twice.
        events.push(order(1));
        events.push(order(2));
        // The same order in a new event: counted as an event, notified once.
        events.push(order(3).with_id("e-3-again"));
        publish(&processor, &w.source, events).await;
        let settled = || async {
            ctx.pending(&w.source, ANALYTICS_GROUP).await == 0
                && ctx.pending(&w.source, NOTIFICATION_GROUP).await == 0
                && processor
                    .group_status(&w.source, ANALYTICS_GROUP)
                    .await
                    .unwrap()
                    .acked
                    == 13
                && processor
                    .group_status(&w.source, NOTIFICATION_GROUP)
                    .await
                    .unwrap()
                    .acked
                    == 13
        };
        eventually(WAIT, "both groups acked all 13 entries", settled).await;
        assert_eq!(counted(&store).await.get(ORDER_CREATED), Some(&11));
        assert_eq!(notifications(&store).await, 10);
        processor.shutdown().await.unwrap();

        // Redeliver everything: both groups start over from the beginning.
        for group in [ANALYTICS_GROUP, NOTIFICATION_GROUP] {
            ctx.replay_group(&w.source, group).await;
        }
        let before = store.stats().duplicates;
        let processor = start(&ctx, &store, groups()).await;
        eventually(WAIT, "all 26 redeliveries absorbed", || async {
            store.stats().duplicates - before >= 26
                && ctx.pending(&w.source, ANALYTICS_GROUP).await == 0
                && ctx.pending(&w.source, NOTIFICATION_GROUP).await == 0
        })
        .await;
        assert_eq!(store.stats().duplicates - before, 26);
        assert_eq!(
            counted(&store).await.get(ORDER_CREATED),
            Some(&11),
            "{:?}",
            db.backend
        );
        assert_eq!(notifications(&store).await, 10);
        processor.shutdown().await.unwrap();
    }
}

/// Reads `count` new entries as `consumer` and acks the first `ack` of them.
async fn read_and_ack(
    c: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    count: usize,
    ack: usize,
) {
    let ids: Vec<String> = read_group(c, stream, group, "c1", count)
        .await
        .into_iter()
        .take(ack)
        .collect();
    if !ids.is_empty() {
        let _: u64 = redis::cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(&ids)
            .query_async(c)
            .await
            .unwrap();
    }
}

/// Ten entries from long ago (ids `1-0`…`10-0`), then three from now;
/// returns the new ids.
async fn old_and_new(c: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<String> {
    for i in 1..=10 {
        xadd(c, stream, &format!("{i}-0")).await;
    }
    let mut new = Vec::new();
    for _ in 0..3 {
        new.push(xadd(c, stream, "*").await);
    }
    new
}

/// Trimming keeps every entry some group has not acked: pending entries of
/// a slow group and entries a lagging group has not read yet.
#[actix_rt::test]
async fn fan_out_trim_never_removes_what_a_group_still_needs() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let admin = RedisBroker::connect(&ctx.settings().redis, "trim-test")
        .await
        .unwrap();
    let stream = ctx.stream("fanout");
    let mut c = ctx.conn().await;
    let all = ctx
        .stream_with_groups(&stream, &["fast", "slow", "behind"], 10)
        .await;
    read_and_ack(&mut c, &stream, "fast", 10, 10).await;
    read_and_ack(&mut c, &stream, "slow", 10, 6).await; // 7th..10th pending
    read_and_ack(&mut c, &stream, "behind", 3, 3).await; // 4th.. not read yet
    let policy = RetentionPolicy {
        dead_after: Duration::from_secs(3600),
        max_age: Duration::from_secs(24 * 3600),
    };
    let report = trim_once(&admin, &stream, policy).await.unwrap();
    assert_eq!(report.removed, 3);
    assert!(report.overridden.is_empty());
    assert_eq!(
        ctx.entry_ids(&stream).await,
        all[3..],
        "what `behind` has not read is kept"
    );

    read_and_ack(&mut c, &stream, "behind", 5, 5).await; // now through the 8th
    let report = trim_once(&admin, &stream, policy).await.unwrap();
    assert_eq!(report.removed, 3);
    assert_eq!(
        ctx.entry_ids(&stream).await,
        all[6..],
        "the slow group's pending entries are kept"
    );
    assert_eq!(ctx.pending(&stream, "slow").await, 4);

    // A trim with nothing to remove removes nothing.
    assert_eq!(trim_once(&admin, &stream, policy).await.unwrap().removed, 0);
}

/// A group with no consumer seen for `dead_after` holds entries only up to
/// the age ceiling (logged); a live group past the ceiling is still kept.
#[actix_rt::test]
async fn a_dead_group_is_overridden_by_the_age_ceiling_a_live_one_is_not() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let admin = RedisBroker::connect(&ctx.settings().redis, "trim-test")
        .await
        .unwrap();
    let policy = RetentionPolicy {
        dead_after: Duration::from_secs(3600),
        max_age: Duration::from_secs(3600),
    };
    let mut c = ctx.conn().await;

    let dead = ctx.stream("dead");
    ctx.create_group(&dead, "live").await;
    ctx.create_group(&dead, "gone").await; // never read: no consumer
    let new = old_and_new(&mut c, &dead).await;
    read_and_ack(&mut c, &dead, "live", 13, 13).await;
    let report = trim_once(&admin, &dead, policy).await.unwrap();
    assert_eq!(report.overridden, ["gone"]);
    assert_eq!(report.removed, 10);
    assert_eq!(
        ctx.entry_ids(&dead).await,
        new,
        "entries younger than max_age are kept"
    );

    let slow = ctx.stream("slow");
    ctx.create_group(&slow, "live").await;
    ctx.create_group(&slow, "slowpoke").await;
    old_and_new(&mut c, &slow).await;
    read_and_ack(&mut c, &slow, "live", 13, 13).await;
    read_and_ack(&mut c, &slow, "slowpoke", 1, 0).await; // seen now, holds 1-0
    let report = trim_once(&admin, &slow, policy).await.unwrap();
    assert!(report.overridden.is_empty());
    assert_eq!(report.removed, 0, "a live group is never overridden");
    assert_eq!(ctx.xlen(&slow).await, 13);
}

// ---- Endpoints from the `webhook_endpoints` table ----

/// How often the tests' watchers re-read the table.
const REFRESH: Duration = Duration::from_millis(200);

/// A wiring whose endpoints are read from `webhook_endpoints`.
async fn table_wiring(ctx: &TestContext, store: &Store) -> Wiring {
    let cache = EndpointCache::default();
    let problems = cache.refresh(store.connection()).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    Wiring {
        source: ctx.stream("orders"),
        endpoints: cache,
        policy: policy(3),
        members: 1,
        in_flight: 4,
    }
}

/// The fan-out groups and the delivery group of every endpoint in the
/// table, plus the watcher that re-reads it.
async fn start_watched(
    ctx: &TestContext,
    store: &Store,
    w: &Wiring,
) -> (Processor, EndpointWatcher) {
    let mut groups = w.fan_out_groups(store);
    groups.extend(w.delivery_groups(store).unwrap());
    let processor = start(ctx, store, groups).await;
    let running = w
        .endpoints
        .snapshot()
        .iter()
        .map(|e| e.name.clone())
        .collect::<Vec<_>>();
    let watcher = EndpointWatcher::spawn(
        w.clone(),
        store.clone(),
        processor.handle(),
        running,
        REFRESH,
    );
    (processor, watcher)
}

async fn put(store: &Store, e: &Endpoint) {
    webhooks::upsert_endpoint(store.connection(), e)
        .await
        .unwrap();
}

/// A row written as is (no validation), as an operator's SQL would.
async fn put_raw(store: &Store, name: &str, url: &str, types: &str) {
    use sea_orm::{ActiveModelTrait, Set};
    webhooks::endpoint_row::ActiveModel {
        name: Set(name.to_owned()),
        url: Set(url.to_owned()),
        secret: Set(secret(name)),
        event_types: Set(types.to_owned()),
        timeout_ms: Set(2_000),
        enabled: Set(true),
        created_at: Set(webhooks::now_ms()),
    }
    .insert(store.connection())
    .await
    .unwrap();
}

fn cancellation(i: usize) -> Event {
    Event::new(
        "order.cancelled",
        &serde_json::json!({"order_id": format!("o-{i}")}),
    )
    .unwrap()
    .with_id(format!("x-{i}"))
}

async fn publish(p: &Processor, stream: &str, events: Vec<Event>) {
    publish_all(&p.producer(), stream, events).await;
}

fn sorted_ids(received: &[Received]) -> Vec<String> {
    let mut ids: Vec<String> = distinct_ids(received).into_keys().collect();
    ids.sort();
    ids
}

/// Three endpoints in the table, subscribed by a comma list, a JSON array
/// and `*`: each gets the event types it subscribes to and no other.
#[actix_rt::test]
async fn endpoints_come_from_the_table_with_their_event_types() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let store = store_for(&db).await;
        let (created, cancelled, all) = (healthy().await, healthy().await, healthy().await);
        put(
            &store,
            &endpoint("created", &created.url, &[ORDER_CREATED], 2_000),
        )
        .await;
        put_raw(
            &store,
            "cancelled",
            &cancelled.url,
            r#"["order.cancelled"]"#,
        )
        .await;
        put_raw(&store, "all", &all.url, " * ").await;
        let w = table_wiring(&ctx, &store).await;
        let read: Vec<(String, Vec<String>)> = w
            .endpoints
            .snapshot()
            .iter()
            .map(|e| (e.name.clone(), e.event_types.clone()))
            .collect();
        assert_eq!(
            read,
            [
                ("all".to_owned(), vec!["*".to_owned()]),
                ("cancelled".to_owned(), vec!["order.cancelled".to_owned()]),
                ("created".to_owned(), vec![ORDER_CREATED.to_owned()]),
            ],
            "{:?}",
            db.backend
        );
        let (processor, watcher) = start_watched(&ctx, &store, &w).await;
        let mut events: Vec<Event> = (0..3).map(order).collect();
        events.extend((0..2).map(cancellation));
        publish(&processor, &w.source, events).await;
        eventually(WAIT, "`all` got all five", || async {
            distinct_ids(&all.received()).len() == 5
                && distinct_ids(&created.received()).len() >= 3
                && distinct_ids(&cancelled.received()).len() >= 2
        })
        .await;
        // Longer than a fan-out and delivery round: a stray one would be here.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(sorted_ids(&created.received()), ["e-0", "e-1", "e-2"]);
        assert!(
            created
                .received()
                .iter()
                .all(|r| r.event_type == ORDER_CREATED)
        );
        assert_eq!(sorted_ids(&cancelled.received()), ["x-0", "x-1"]);
        assert!(
            cancelled
                .received()
                .iter()
                .all(|r| r.event_type == "order.cancelled")
        );
        assert_eq!(all.received().len(), 5);
        watcher.stop().await;
        processor.shutdown().await.unwrap();
        for r in [&created, &cancelled, &all] {
            r.stop().await;
        }
    }
}

/// Disabled in the table while running: no new delivery reaches it (a
/// second endpoint shows the events went out); enabled again, it gets what
/// is published from then on, not what it missed.
#[actix_rt::test]
async fn a_disabled_endpoint_gets_nothing_new() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let store = store_for(&db).await;
        let (target, witness) = (healthy().await, healthy().await);
        put(&store, &endpoint("target", &target.url, &["*"], 2_000)).await;
        put(&store, &endpoint("witness", &witness.url, &["*"], 2_000)).await;
        let w = table_wiring(&ctx, &store).await;
        let (processor, watcher) = start_watched(&ctx, &store, &w).await;
        publish(&processor, &w.source, vec![order(0)]).await;
        eventually(WAIT, "both got e-0", || async {
            target.received().len() == 1 && witness.received().len() == 1
        })
        .await;

        assert!(
            webhooks::set_endpoint_enabled(store.connection(), "target", false)
                .await
                .unwrap()
        );
        assert!(
            !webhooks::set_endpoint_enabled(store.connection(), "nobody", false)
                .await
                .unwrap(),
            "an unknown name is reported"
        );
        eventually(WAIT, "the refresh saw it disabled", || async {
            w.endpoints.get("target").is_some_and(|e| !e.enabled)
        })
        .await;
        publish(&processor, &w.source, (1..4).map(order).collect()).await;
        eventually(WAIT, "the witness got e-1..e-3", || async {
            distinct_ids(&witness.received()).len() == 4
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            sorted_ids(&target.received()),
            ["e-0"],
            "nothing new while disabled ({:?})",
            db.backend
        );
        assert_eq!(
            ctx.xlen(&delivery_stream(&w.source, "target")).await,
            1,
            "the fan-out wrote nothing for it while disabled"
        );

        assert!(
            webhooks::set_endpoint_enabled(store.connection(), "target", true)
                .await
                .unwrap()
        );
        eventually(WAIT, "the refresh saw it enabled", || async {
            w.endpoints.get("target").is_some_and(|e| e.enabled)
        })
        .await;
        publish(&processor, &w.source, vec![order(4)]).await;
        eventually(WAIT, "e-4 reached it", || async {
            distinct_ids(&target.received()).contains_key("e-4")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sorted_ids(&target.received()), ["e-0", "e-4"]);
        watcher.stop().await;
        processor.shutdown().await.unwrap();
        target.stop().await;
        witness.stop().await;
    }
}

/// An endpoint only gets events published after it was added (one added
/// while an event waits is not sent it); an endpoint added to the table
/// while running gets its delivery group and new events within a refresh;
/// a changed URL and subscription take effect without a restart.
#[actix_rt::test]
async fn endpoints_added_or_changed_in_the_table_are_picked_up_while_running() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let store = store_for(&db).await;
        let (a, a2, b, c) = (
            healthy().await,
            healthy().await,
            healthy().await,
            healthy().await,
        );
        put(&store, &endpoint("a", &a.url, &[ORDER_CREATED], 2_000)).await;
        // Published before `b` exists, handled by the fan-out after.
        let publisher = start(&ctx, &store, Vec::new()).await;
        publish(&publisher, &ctx.stream("orders"), vec![order(0)]).await;
        publisher.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        put(&store, &endpoint("b", &b.url, &["*"], 2_000)).await;

        let w = table_wiring(&ctx, &store).await;
        let (processor, watcher) = start_watched(&ctx, &store, &w).await;
        publish(&processor, &w.source, vec![order(1)]).await;
        eventually(WAIT, "a got e-0 and e-1, b got e-1", || async {
            distinct_ids(&a.received()).len() == 2 && !b.received().is_empty()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            sorted_ids(&b.received()),
            ["e-1"],
            "not the event published before it was added ({:?})",
            db.backend
        );

        // Added while running: its own delivery group starts.
        put(&store, &endpoint("c", &c.url, &["*"], 2_000)).await;
        eventually(WAIT, "the watcher started c's delivery group", || async {
            watcher.started().await == 1 && w.endpoints.get("c").is_some()
        })
        .await;
        // Changed while running: a's URL and subscription.
        put(&store, &endpoint("a", &a2.url, &["order.cancelled"], 2_000)).await;
        eventually(WAIT, "the refresh saw a's change", || async {
            w.endpoints.get("a").is_some_and(|e| e.url == a2.url)
        })
        .await;
        publish(&processor, &w.source, vec![order(2), cancellation(0)]).await;
        eventually(WAIT, "c and b got e-2 and x-0; a2 got x-0", || async {
            distinct_ids(&c.received()).len() == 2
                && distinct_ids(&b.received()).len() == 3
                && !a2.received().is_empty()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sorted_ids(&c.received()), ["e-2", "x-0"]);
        assert_eq!(
            sorted_ids(&a2.received()),
            ["x-0"],
            "new subscription, new URL"
        );
        assert_eq!(
            sorted_ids(&a.received()),
            ["e-0", "e-1"],
            "old URL: nothing new"
        );
        watcher.stop().await;
        processor.shutdown().await.unwrap();
        for r in [&a, &a2, &b, &c] {
            r.stop().await;
        }
    }
}

/// Rows with a bad URL, no event types or a bad name are reported (with
/// the endpoint and the problem) and skipped, at start and while running;
/// the good endpoint keeps getting its deliveries. The management path
/// refuses such input before writing.
#[actix_rt::test]
async fn invalid_endpoint_rows_are_reported_and_skipped() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let store = store_for(&db).await;
        let good = healthy().await;
        put(&store, &endpoint("good", &good.url, &["*"], 2_000)).await;
        put_raw(&store, "bad-url", "not a url", "*").await;
        put_raw(&store, "no-types", &good.url, " , ").await;
        put_raw(&store, "Bad Name", &good.url, "*").await;
        let cache = EndpointCache::default();
        let problems = cache.refresh(store.connection()).await.unwrap();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("`bad-url`") && p.contains("bad url `not a url`")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("`no-types`") && p.contains("event type")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("`Bad Name`")),
            "{problems:?}"
        );
        let names: Vec<String> = cache.snapshot().iter().map(|e| e.name.clone()).collect();
        assert_eq!(names, ["good"], "{:?}", db.backend);

        let w = Wiring {
            endpoints: cache,
            ..table_wiring_no_check(&ctx)
        };
        let (processor, watcher) = start_watched(&ctx, &store, &w).await;
        publish(&processor, &w.source, vec![order(0)]).await;
        eventually(WAIT, "good got e-0", || async {
            good.received().len() == 1
        })
        .await;
        // One more bad row while running.
        put_raw(&store, "later-bad", "ftp://example.com/hook", "*").await;
        tokio::time::sleep(REFRESH * 3).await;
        publish(&processor, &w.source, vec![order(1)]).await;
        eventually(WAIT, "good got e-1", || async {
            good.received().len() == 2
        })
        .await;
        assert_eq!(watcher.started().await, 0, "no group for invalid rows");
        assert!(w.endpoints.get("later-bad").is_none());
        for bad in ["bad-url", "no-types", "later-bad"] {
            assert_eq!(ctx.xlen(&delivery_stream(&w.source, bad)).await, 0, "{bad}");
        }

        // The management path checks before writing.
        let err = webhooks::upsert_endpoint(
            store.connection(),
            &endpoint("typo", "htp//nowhere", &["*"], 1_000),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad url"), "{err}");
        let err =
            webhooks::upsert_endpoint(store.connection(), &endpoint("none", &good.url, &[], 1_000))
                .await
                .unwrap_err()
                .to_string();
        assert!(err.contains("event type"), "{err}");
        let (rows, _) = webhooks::registry::load_endpoints(store.connection())
            .await
            .unwrap();
        assert!(rows.iter().all(|e| e.name != "typo" && e.name != "none"));
        watcher.stop().await;
        processor.shutdown().await.unwrap();
        good.stop().await;
    }
}

fn table_wiring_no_check(ctx: &TestContext) -> Wiring {
    Wiring {
        source: ctx.stream("orders"),
        endpoints: EndpointCache::default(),
        policy: policy(3),
        members: 1,
        in_flight: 4,
    }
}

#[test]
fn event_types_are_a_comma_list_or_a_json_array() {
    assert_eq!(
        webhooks::parse_event_types(" order.created , order.cancelled ").unwrap(),
        ["order.created", "order.cancelled"]
    );
    assert_eq!(webhooks::parse_event_types(r#"["*"]"#).unwrap(), ["*"]);
    for bad in ["", " , ", "a,,b", "[]", "[1]", "[\"a\""] {
        assert!(webhooks::parse_event_types(bad).is_err(), "`{bad}`");
    }
    let mut e = endpoint("e", "http://127.0.0.1:1/hook", &["*"], 1_000);
    e.created_at_ms = 1_000;
    assert!(e.wants(ORDER_CREATED, 1_000));
    assert!(
        !e.wants(ORDER_CREATED, 999),
        "published before it was added"
    );
    e.enabled = false;
    assert!(!e.wants(ORDER_CREATED, 2_000), "disabled");
}

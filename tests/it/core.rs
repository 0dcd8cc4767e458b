//! The happy path: publish, read, handle, ack; typed and untyped handlers;
//! entries written by other clients; several groups on one stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use redstream::prelude::*;
use serde::{Deserialize, Serialize};

use crate::support::{TestContext, eventually, publish_all, start_group};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct OrderCreated {
    order_id: String,
    total_cents: i64,
}

/// What a handler saw of one delivery.
#[derive(Clone, Debug)]
struct Seen {
    order: OrderCreated,
    event_id: Option<String>,
    event_type: Option<String>,
    attempt: u32,
}

fn recording_handler() -> (Arc<Mutex<Vec<Seen>>>, impl Handler<Event = OrderCreated>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let handler = handler_fn(move |order: OrderCreated, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            sink.lock().unwrap().push(Seen {
                order,
                event_id: meta.event_id().map(str::to_owned),
                event_type: meta.event_type().map(str::to_owned),
                attempt: meta.attempt(),
            });
            Ok(Outcome::Ack)
        }
    });
    (seen, handler)
}

fn order(i: i64) -> OrderCreated {
    OrderCreated {
        order_id: format!("o-{i}"),
        total_cents: i * 100,
    }
}

#[actix_rt::test]
async fn round_trip_delivers_every_event_once_and_acks_it() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("orders");
    let (seen, handler) = recording_handler();
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "billing", handler).with_members(2),
    )
    .await;
    let producer = processor.producer();
    let mut receipts = Vec::new();
    for i in 0..50 {
        let event = Event::new("order.created", &order(i)).unwrap();
        receipts.push(producer.publish(&stream, event).await.expect("publish"));
    }
    eventually(
        Duration::from_secs(10),
        "all 50 handled and acked",
        || async { seen.lock().unwrap().len() >= 50 && ctx.pending(&stream, "billing").await == 0 },
    )
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 50, "each event exactly once");
    for (i, receipt) in receipts.iter().enumerate() {
        let s = seen
            .iter()
            .find(|s| s.order.order_id == format!("o-{i}"))
            .expect("delivered");
        assert_eq!(s.order, order(i as i64));
        assert_eq!(s.event_id.as_deref(), Some(receipt.event_id.as_str()));
        assert_eq!(s.event_type.as_deref(), Some("order.created"));
        assert_eq!(s.attempt, 1);
    }
    // The wire format of what was written.
    let entries = ctx.entries(&stream).await;
    let (_, fields) = &entries[0];
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["data", "id", "ts", "type", "v"]);
    let report = processor.shutdown().await.expect("shutdown");
    assert!(report.settled);
}

#[actix_rt::test]
async fn typed_and_untyped_handlers_read_the_same_entries() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("orders");
    let (typed_seen, typed) = recording_handler();
    let untyped_seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = Arc::clone(&untyped_seen);
    let untyped = handler_fn(move |value: serde_json::Value, _meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            sink.lock().unwrap().push(value);
            Ok(Outcome::Ack)
        }
    });
    let processor = Processor::builder(ctx.settings())
        .group(Group::new(&stream, "typed", typed))
        .group(Group::new(&stream, "untyped", untyped))
        .start()
        .await
        .expect("start");
    for i in 0..10 {
        let event = Event::new("order.created", &order(i)).unwrap();
        processor.producer().publish(&stream, event).await.unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "both groups handled 10",
        || async {
            typed_seen.lock().unwrap().len() == 10 && untyped_seen.lock().unwrap().len() == 10
        },
    )
    .await;
    let values = untyped_seen.lock().unwrap().clone();
    assert!(values.contains(&serde_json::json!({"order_id": "o-3", "total_cents": 300})));
    processor.shutdown().await.unwrap();
}

/// Any client can write entries: without `data` and `id`, the fields are
/// the payload, and the idempotency key falls back to stream/entry id.
#[actix_rt::test]
async fn entries_written_by_a_plain_client_are_delivered_as_their_fields() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("foreign");

    #[derive(Debug, Deserialize)]
    struct Restock {
        sku: String,
        qty: String,
    }
    /// sku, qty, event id, idempotency key, entry id.
    type Delivery = (String, String, Option<String>, String, String);
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let handler = handler_fn(move |r: Restock, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            sink.lock().unwrap().push((
                r.sku,
                r.qty,
                meta.event_id().map(str::to_owned),
                meta.idempotency_key(),
                meta.entry_id().to_owned(),
            ));
            Ok(Outcome::Ack)
        }
    });
    let processor = start_group(ctx.settings(), Group::new(&stream, "stock", handler)).await;
    let mut c = ctx.conn().await;
    let id: String = c
        .xadd(&stream, "*", &[("sku", "A-1"), ("qty", "3")])
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "foreign entry handled", || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    let (sku, qty, event_id, key, entry_id) = seen.lock().unwrap()[0].clone();
    assert_eq!((sku.as_str(), qty.as_str()), ("A-1", "3"));
    assert_eq!(event_id, None);
    assert_eq!(entry_id, id);
    assert_eq!(key, format!("{stream}/{id}"));
    eventually(Duration::from_secs(5), "acked", || async {
        ctx.pending(&stream, "stock").await == 0
    })
    .await;
    processor.shutdown().await.unwrap();
}

/// One bad entry never fails its batch: it goes to the dead-letter stream
/// with a specific reason, its batch-mates are processed.
#[actix_rt::test]
async fn a_malformed_entry_is_dead_lettered_and_its_batch_mates_processed() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("mixed");
    let (seen, handler) = recording_handler();
    // Entries are written before the processor starts, so that they arrive
    // in one read.
    ctx.create_group(&stream, "billing").await;
    let mut c = ctx.conn().await;
    let good = serde_json::to_string(&order(1)).unwrap();
    let mut bad_ids = HashMap::new();
    for (i, data) in [
        good.as_str(),
        "{not json",
        good.as_str(),
        r#"{"order_id": 5}"#,
        good.as_str(),
    ]
    .iter()
    .enumerate()
    {
        let id: String = c
            .xadd(
                &stream,
                "*",
                &[("id", format!("e{i}").as_str()), ("data", *data)],
            )
            .await
            .unwrap();
        if i == 1 || i == 3 {
            bad_ids.insert(id, i);
        }
    }
    // A non-UTF-8 field name, which fails whole batches in other clients.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&b"\xff\xfename"[..])
        .arg("x")
        .query_async(&mut c)
        .await
        .unwrap();
    let processor = start_group(ctx.settings(), Group::new(&stream, "billing", handler)).await;
    let dlq = redstream::dead_letter_stream(&stream);
    eventually(
        Duration::from_secs(10),
        "3 good handled, 3 dead-lettered",
        || async { seen.lock().unwrap().len() == 3 && ctx.xlen(&dlq).await == 3 },
    )
    .await;
    ctx.eventually_nothing_pending(&stream, "billing", Duration::from_secs(5))
        .await;
    let letters = ctx.entries(&dlq).await;
    let reasons: Vec<String> = letters
        .iter()
        .map(|(_, f)| f.iter().find(|(k, _)| k == "reason").unwrap().1.clone())
        .collect();
    assert!(
        reasons.iter().filter(|r| r.starts_with("bad_json")).count() == 2,
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("malformed_field_name")),
        "{reasons:?}"
    );
    for (_, fields) in &letters {
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("group").as_deref(), Some("billing"));
        assert!(get("origin_id").is_some());
        assert!(get("failed_at").is_some());
        if let Some(origin) = get("origin_id")
            && bad_ids.contains_key(&origin)
        {
            // The original fields travel with the letter.
            assert!(get("data").is_some(), "original data kept: {fields:?}");
        }
    }
    processor.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn every_group_on_a_stream_gets_every_event() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("fanout");
    let mut recorders = Vec::new();
    let mut builder = Processor::builder(ctx.settings());
    for name in ["webhooks", "analytics", "notifications"] {
        let (seen, handler) = recording_handler();
        recorders.push(seen);
        builder = builder.group(Group::new(&stream, name, handler).with_members(2));
    }
    let processor = builder.start().await.expect("start");
    let events: Vec<Event> = (0..100)
        .map(|i| Event::new("order.created", &order(i)).unwrap())
        .collect();
    publish_all(&processor.producer(), &stream, events).await;
    eventually(
        Duration::from_secs(10),
        "each group handled 100",
        || async { recorders.iter().all(|r| r.lock().unwrap().len() >= 100) },
    )
    .await;
    for seen in &recorders {
        let mut ids: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.order.order_id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 100, "every event, once");
    }
    processor.shutdown().await.unwrap();
}

/// A group stops reading while too many entries are pending, and resumes
/// once they are acked.
#[actix_rt::test]
async fn reading_pauses_above_the_pending_bound_and_resumes_below_it() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("bounded");
    ctx.create_group(&stream, "g").await;
    let mut c = ctx.conn().await;
    // Another process read 50 entries and has not acked them yet.
    for i in 0..50 {
        let data = serde_json::to_string(&order(i)).unwrap();
        let _: String = c.xadd(&stream, "*", &[("data", data)]).await.unwrap();
    }
    let ghost: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("ghost")
        .arg("COUNT")
        .arg(50)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    let ghost_ids: Vec<String> = match ghost {
        redis::Value::Array(streams) => match &streams[0] {
            redis::Value::Array(pair) => match &pair[1] {
                redis::Value::Array(entries) => entries
                    .iter()
                    .map(|e| match e {
                        redis::Value::Array(kv) => redis::from_redis_value_ref(&kv[0]).unwrap(),
                        _ => panic!("entry"),
                    })
                    .collect(),
                _ => panic!("entries"),
            },
            _ => panic!("stream"),
        },
        other => panic!("{other:?}"),
    };
    assert_eq!(ghost_ids.len(), 50);

    let (seen, handler) = recording_handler();
    let mut settings = ctx.settings();
    settings.reclaim.min_idle_ms = 600_000;
    settings.reclaim.heartbeat_ms = 60_000;
    let processor = start_group(
        settings,
        Group::new(&stream, "g", handler).with_max_pending(20),
    )
    .await;
    assert!(processor.group_status(&stream, "g").await.unwrap().paused);
    for i in 100..110 {
        let event = Event::new("order.created", &order(i)).unwrap();
        processor.producer().publish(&stream, event).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing read while over the bound"
    );
    assert_eq!(ctx.pending(&stream, "g").await, 50);

    // The other process acks: the group drops below its bound and resumes.
    let _: u64 = c.xack(&stream, "g", &ghost_ids).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "resumed and handled the 10",
        || async { seen.lock().unwrap().len() == 10 },
    )
    .await;
    assert!(!processor.group_status(&stream, "g").await.unwrap().paused);
    processor.shutdown().await.unwrap();
}

/// Between two pending checks, members do not read past the pending bound:
/// a slow handler with plenty of in-flight room and a backlog keeps the
/// pending list within `max_pending` (RELIABILITY.md F19).
#[actix_rt::test]
async fn reads_between_pending_checks_stay_within_the_pending_bound() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("bounded-between-checks");
    let mut c = ctx.conn().await;
    for i in 0..300 {
        let data = serde_json::to_string(&order(i)).unwrap();
        let _: String = c.xadd(&stream, "*", &[("data", data)]).await.unwrap();
    }
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let handler = handler_fn(move |_order: OrderCreated, _meta: Meta| {
        let counter = Arc::clone(&counter);
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Outcome::Ack)
        }
    });
    let mut settings = ctx.settings();
    // Checks far apart: only the read budget holds the members back.
    settings.consumer.pending_check_ms = 60_000;
    settings.consumer.count = 10;
    settings.consumer.in_flight = 100;
    let processor = start_group(
        settings,
        Group::new(&stream, "g", handler)
            .with_members(2)
            .with_max_pending(20),
    )
    .await;
    let mut max_pending = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        max_pending = max_pending.max(ctx.pending(&stream, "g").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        max_pending <= 20,
        "{max_pending} pending with max_pending 20"
    );
    // Acks free the room: reading went on all the while.
    assert!(
        handled.load(std::sync::atomic::Ordering::SeqCst) > 40,
        "handled {}",
        handled.load(std::sync::atomic::Ordering::SeqCst)
    );
    processor.shutdown().await.unwrap();
}

//! Graceful shutdown: nothing acked is lost, nothing unhandled is acked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redstream::prelude::*;

use crate::support::{TestContext, eventually, numbered, publish_all, start_group};

type Done = Arc<Mutex<HashMap<u64, u32>>>;

fn slow_handler(done: &Done, work: Duration) -> impl Handler<Event = serde_json::Value> {
    let sink = Arc::clone(done);
    handler_fn(move |v: serde_json::Value, _meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            tokio::time::sleep(work).await;
            *sink
                .lock()
                .unwrap()
                .entry(v["n"].as_u64().unwrap())
                .or_default() += 1;
            Ok(Outcome::Ack)
        }
    })
}

async fn publish_numbers(processor: &Processor, stream: &str, n: u64) {
    let events = (0..n).map(numbered).collect();
    publish_all(&processor.producer(), stream, events).await;
}

/// The `n` of every entry pending in group `g`.
async fn pending_event_numbers(ctx: &TestContext, stream: &str) -> Vec<u64> {
    let rows = ctx.pending_entries(stream, "g", 1000).await;
    let all = ctx.entries(stream).await;
    rows.iter()
        .map(|(id, ..)| {
            let (_, fields) = all.iter().find(|(eid, _)| eid == id).unwrap();
            let data = &fields.iter().find(|(k, _)| k == "data").unwrap().1;
            serde_json::from_str::<serde_json::Value>(data).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// How many entries group `g` was delivered (XINFO GROUPS entries-read).
async fn entries_read(ctx: &TestContext, stream: &str) -> u64 {
    let mut c = ctx.conn().await;
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut c)
        .await
        .unwrap();
    match &groups[0]["entries-read"] {
        redis::Value::Int(n) => *n as u64,
        other => panic!("entries-read: {other:?}"),
    }
}

/// Running handlers finish within the deadline and are acked; entries not
/// yet started stay pending for the next start; across the two runs every
/// event is handled exactly once.
#[actix_rt::test]
async fn shutdown_finishes_running_work_and_acks_only_what_was_handled() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("drain");
    let done: Done = Arc::default();
    let settings = ctx.settings();
    let processor = start_group(
        settings.clone(),
        Group::new(
            &stream,
            "g",
            slow_handler(&done, Duration::from_millis(150)),
        )
        .with_in_flight(4),
    )
    .await;
    publish_numbers(&processor, &stream, 40).await;
    eventually(Duration::from_secs(5), "some handled", || async {
        !done.lock().unwrap().is_empty()
    })
    .await;
    let report = processor.shutdown().await.unwrap();
    assert!(report.settled, "{report:?}");
    assert_eq!(report.released, 0, "all running handlers finished in time");
    let handled = done.lock().unwrap().len() as u64;
    assert!(handled < 40, "the stop came before the end");
    // Nothing unhandled was acked and nothing handled is left unacked:
    // the pending entries are exactly the delivered, unhandled ones.
    let pending_numbers = pending_event_numbers(&ctx, &stream).await;
    let handled_now: Vec<u64> = done.lock().unwrap().keys().copied().collect();
    assert!(
        pending_numbers.iter().all(|n| !handled_now.contains(n)),
        "a handled entry is still pending: {pending_numbers:?}"
    );
    let delivered = entries_read(&ctx, &stream).await;
    assert_eq!(
        delivered,
        handled + pending_numbers.len() as u64,
        "acked = handled"
    );

    let processor = start_group(
        settings,
        Group::new(&stream, "g", slow_handler(&done, Duration::ZERO)),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the rest handled after restart",
        || async { done.lock().unwrap().len() == 40 },
    )
    .await;
    ctx.eventually_nothing_pending(&stream, "g", Duration::from_secs(5))
        .await;
    let counts = done.lock().unwrap().clone();
    assert!(
        counts.values().all(|c| *c == 1),
        "each event handled once: {counts:?}"
    );
    processor.shutdown().await.unwrap();
}

/// A handler still running at the deadline is dropped, its entry is not
/// acked but released: pending, and immediately reclaimable by others.
#[actix_rt::test]
async fn work_unfinished_at_the_deadline_is_released_not_acked() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("deadline");
    let done: Done = Arc::default();
    let mut settings = ctx.settings();
    settings.shutdown.deadline_ms = 300;
    settings.reclaim.min_idle_ms = 60_000;
    settings.reclaim.heartbeat_ms = 20_000;
    let processor = start_group(
        settings.clone(),
        Group::new(&stream, "g", slow_handler(&done, Duration::from_secs(30))).with_in_flight(3),
    )
    .await;
    publish_numbers(&processor, &stream, 3).await;
    eventually(
        Duration::from_secs(5),
        "three entries delivered",
        || async { ctx.pending(&stream, "g").await == 3 },
    )
    .await;
    let report = processor.shutdown().await.unwrap();
    assert_eq!(report.released, 3, "{report:?}");
    assert!(done.lock().unwrap().is_empty(), "no handler completed");
    assert_eq!(
        ctx.pending(&stream, "g").await,
        3,
        "nothing unhandled was acked"
    );
    // Released: idle at least min_idle, so any member may take them now.
    let rows = ctx.pending_entries(&stream, "g", 10).await;
    assert!(
        rows.iter().all(|(_, _, idle, _)| *idle >= 60_000),
        "{rows:?}"
    );
    // Another process picks them up at once, not after min_idle.
    settings.instance.name = format!("{}-other", settings.instance.name);
    let processor = start_group(
        settings,
        Group::new(&stream, "g", slow_handler(&done, Duration::ZERO)),
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "released entries handled elsewhere",
        || async { done.lock().unwrap().len() == 3 },
    )
    .await;
    processor.shutdown().await.unwrap();
}

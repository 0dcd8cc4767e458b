//! Groups added to and removed from a running processor: an added group
//! reads at once, a removed one drains what it runs and reads no more, and
//! adding and removing under load loses nothing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redstream::StartFrom;
use redstream::prelude::*;

use crate::support::{TestContext, eventually, numbered, publish_all, start_group};

/// A handler that records the `n` of each event into `seen`, after `delay`.
fn recorder(
    delay: Duration,
    seen: &Arc<Mutex<Vec<u64>>>,
) -> impl Handler<Event = serde_json::Value> + use<> {
    let record = Arc::clone(seen);
    handler_fn(move |event: serde_json::Value, _: Meta| {
        let record = Arc::clone(&record);
        async move {
            tokio::time::sleep(delay).await;
            record
                .lock()
                .unwrap()
                .push(event["n"].as_u64().unwrap_or(u64::MAX));
            Ok(Outcome::Ack)
        }
    })
}

fn listed(groups: &[redstream::GroupStatus], stream: &str, group: &str) -> bool {
    groups
        .iter()
        .any(|g| g.stream == stream && g.group == group)
}

#[actix_rt::test]
async fn an_added_group_reads_and_a_removed_one_drains_and_stops_reading() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let first = ctx.stream("first");
    let processor = start_group(ctx.settings(), Group::new(&first, "base", idle_handler())).await;
    let handle = processor.handle();

    // Added: it reads what is published from now on (start_from `new`) and
    // is listed everywhere the first group is.
    let added = ctx.stream("added");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let slow = || recorder(Duration::from_millis(200), &seen);
    handle
        .add_group(Group::new(&added, "late", slow()).with_in_flight(8))
        .await
        .unwrap();
    assert!(listed(&handle.status().await.unwrap(), &added, "late"));
    publish_all(
        &processor.producer(),
        &added,
        (0..8).map(numbered).collect(),
    )
    .await;
    eventually(Duration::from_secs(5), "in flight", || async {
        handle
            .group_status(&added, "late")
            .await
            .unwrap()
            .members
            .iter()
            .any(|m| m.in_flight > 0)
    })
    .await;
    let again = handle
        .add_group(Group::new(&added, "late", slow()))
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("runs already"), "{again}");

    // Removed while its handlers run: they finish, every decision is
    // written, and nothing more is read.
    let removed = handle
        .remove_group(&added, "late", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(removed.settled, "{removed:?}");
    assert_eq!(
        removed.released, 0,
        "every handler finished within the drain"
    );
    let handled: HashSet<u64> = seen.lock().unwrap().iter().copied().collect();
    assert_eq!(handled, (0..8).collect(), "what it held was handled");
    assert_eq!(ctx.pending(&added, "late").await, 0, "and acked");
    assert!(!listed(&handle.status().await.unwrap(), &added, "late"));
    assert!(handle.group_status(&added, "late").await.is_err());
    let gone = handle
        .remove_group(&added, "late", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(gone, redstream::Error::NotServed { .. }), "{gone}");

    publish_all(
        &processor.producer(),
        &added,
        (8..12).map(numbered).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        8,
        "a removed group reads nothing"
    );

    // Added back: it goes on from where the group stood in Redis.
    handle
        .add_group(Group::new(&added, "late", slow()))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the rest handled", || async {
        seen.lock().unwrap().len() == 12 && ctx.pending(&added, "late").await == 0
    })
    .await;
    let handled: HashSet<u64> = seen.lock().unwrap().iter().copied().collect();
    assert_eq!(handled, (0..12).collect());

    // The stop stops added groups too.
    let report = processor.shutdown().await.unwrap();
    assert!(report.settled, "{report:?}");
    let stopped = handle
        .add_group(Group::new(&first, "too-late", idle_handler()))
        .await;
    assert!(
        matches!(stopped, Err(redstream::Error::Stopped)),
        "{stopped:?}"
    );
}

fn idle_handler() -> impl Handler<Event = serde_json::Value> {
    handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) })
}

#[actix_rt::test]
async fn adding_and_removing_a_group_under_load_loses_nothing() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("churn");
    let base = ctx.stream("churn-base");
    let processor = start_group(ctx.settings(), Group::new(&base, "base", idle_handler())).await;
    let handle = processor.handle();
    // The group exists before the load, so every event is its to handle.
    ctx.create_group(&stream, "churning").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = || recorder(Duration::from_millis(2), &seen);
    let producer = processor.producer();
    let total = 3_000u64;
    let publisher = {
        let stream = stream.clone();
        actix_rt::spawn(async move {
            for batch in (0..total).collect::<Vec<_>>().chunks(100) {
                publish_all(
                    &producer,
                    &stream,
                    batch.iter().map(|n| numbered(*n)).collect(),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Three rounds of add, work a little, remove (with a drain), while the
    // events keep coming; then added for good.
    for _ in 0..3 {
        handle
            .add_group(
                Group::new(&stream, "churning", handler())
                    .with_members(2)
                    .with_in_flight(16),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let removed = handle
            .remove_group(&stream, "churning", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(removed.settled, "{removed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle
        .add_group(Group::new(&stream, "churning", handler()).with_members(2))
        .await
        .unwrap();
    publisher.await.unwrap();
    eventually(Duration::from_secs(30), "every event handled", || async {
        let distinct: HashSet<u64> = seen.lock().unwrap().iter().copied().collect();
        distinct.len() as u64 == total && ctx.pending(&stream, "churning").await == 0
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let distinct: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(distinct, (0..total).collect(), "nothing lost");
    assert_eq!(
        seen.len() as u64,
        total,
        "a drained removal hands nothing over twice"
    );
    processor.shutdown().await.unwrap();
}

/// A group added to a processor whose shared read has been blocked for a
/// while (its block time backed off) reads its stream at once: the added
/// member unblocks the shared read instead of waiting out its block time.
#[actix_rt::test]
async fn an_added_group_reads_at_once_though_the_shared_read_is_blocked() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let quiet = ctx.stream("quiet");
    let mut settings = ctx.settings();
    settings.consumer.block_ms = 5_000;
    let processor = start_group(settings, Group::new(&quiet, "same", idle_handler())).await;
    // Let the shared read of `same` block.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let added = ctx.stream("added-later");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = recorder(Duration::ZERO, &seen);
    let handle = processor.handle();
    publish_all(&processor.producer(), &added, vec![numbered(7)]).await;
    let adding = std::time::Instant::now();
    handle
        .add_group(Group::new(&added, "same", record).with_start_from(StartFrom::Beginning))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the added group's entry",
        || async { !seen.lock().unwrap().is_empty() },
    )
    .await;
    let took = adding.elapsed();
    eprintln!("an added group handled its first entry {took:?} after add_group was called");
    // Well below the 5 s block time the shared read was in.
    assert!(took < Duration::from_millis(1_000), "took {took:?}");
    processor.shutdown().await.unwrap();
}

//! Many streams in one process (issue 18): 2,000 streams with a group each
//! are read through one connection, every event handled once, nothing left
//! pending; a hot stream with a backlog does not hold back cold ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use redstream::prelude::*;

use crate::support::{TestContext, eventually, numbered, publish_all};

/// Settings for thousands of groups: the periods of the defaults. The fast
/// timers of `TestContext::settings` (a pending check every 100 ms, a retry
/// poll every 50 ms, entries reclaimed after 2 s) multiplied by thousands
/// of groups load a shared CI Redis until acks come later than `min_idle`,
/// and a reclaimed entry runs twice (at-least-once, as documented).
fn many_groups_settings(ctx: &TestContext) -> Settings {
    let mut s = ctx.settings();
    let d = Settings::default();
    s.consumer.pending_check_ms = d.consumer.pending_check_ms;
    s.reclaim.retry_poll_ms = d.reclaim.retry_poll_ms;
    s.reclaim.interval_ms = d.reclaim.interval_ms;
    s.reclaim.min_idle_ms = d.reclaim.min_idle_ms;
    s.reclaim.heartbeat_ms = d.reclaim.heartbeat_ms;
    s.reclaim.lease_ttl_ms = d.reclaim.lease_ttl_ms;
    s.reclaim.lease_wait_ms = d.reclaim.lease_wait_ms;
    s
}

/// The names of the clients of this instance's shared reads.
async fn read_connections(ctx: &TestContext, instance: &str) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut ctx.conn().await)
        .await
        .unwrap();
    list.lines()
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("name="))
                .map(str::to_owned)
        })
        .filter(|name| name.contains(instance) && name.ends_with(":read"))
        .collect()
}

/// Pending entries of `group` over every stream.
async fn pending_over(ctx: &TestContext, streams: &[String], group: &str) -> u64 {
    let mut pipe = redis::pipe();
    for stream in streams {
        pipe.cmd("XPENDING").arg(stream).arg(group);
    }
    let replies: Vec<(u64, redis::Value, redis::Value, redis::Value)> =
        pipe.query_async(&mut ctx.conn().await).await.unwrap();
    replies.iter().map(|r| r.0).sum()
}

#[actix_rt::test]
async fn two_thousand_streams_share_one_read_and_handle_every_event_once() {
    const STREAMS: usize = 2_000;
    const PER_STREAM: u64 = 5;
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let settings = many_groups_settings(&ctx);
    let instance = settings.instance.name.clone();
    let streams: Vec<String> = (0..STREAMS)
        .map(|i| ctx.stream(&format!("tenant:{i}")))
        .collect();
    let seen: Arc<Mutex<HashMap<(String, u64), u32>>> = Arc::default();
    let mut builder = Processor::builder(settings);
    for stream in &streams {
        let seen = Arc::clone(&seen);
        let record = handler_fn(move |event: serde_json::Value, meta: Meta| {
            let key = (
                meta.stream().to_owned(),
                event["n"].as_u64().unwrap_or(u64::MAX),
            );
            *seen.lock().unwrap().entry(key).or_default() += 1;
            async { Ok(Outcome::Ack) }
        });
        builder = builder.group(Group::new(stream, "tenants", record));
    }
    let started = Instant::now();
    let processor = builder.start().await.unwrap();
    eprintln!("{STREAMS} groups started in {:?}", started.elapsed());

    let producer = processor.producer();
    for stream in &streams {
        publish_all(&producer, stream, (0..PER_STREAM).map(numbered).collect()).await;
    }
    let total = STREAMS as u64 * PER_STREAM;
    eventually(Duration::from_secs(60), "every event handled", || async {
        seen.lock().unwrap().len() as u64 == total
    })
    .await;
    eventually(Duration::from_secs(10), "nothing pending", || async {
        pending_over(&ctx, &streams, "tenants").await == 0
    })
    .await;
    let repeated: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    assert!(repeated.is_empty(), "handled more than once: {repeated:?}");
    // One member per group, one group name: one reading connection for all
    // 2,000 streams (a member restarted on a loaded machine may leave its
    // old hub's connection open for a moment).
    eventually(Duration::from_secs(10), "one read connection", || async {
        let reads = read_connections(&ctx, &instance).await;
        eprintln!("read connections: {reads:?}");
        reads.len() == 1
    })
    .await;
    processor.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_hot_stream_with_a_backlog_does_not_hold_back_cold_ones() {
    const COLD: usize = 1_000;
    const HOT_EVENTS: u64 = 20_000;
    /// The bound a cold entry may wait, publish to handler, while the hot
    /// stream has a backlog.
    const BOUND: Duration = Duration::from_secs(2);
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let hot = ctx.stream("hot");
    let cold: Vec<String> = (0..COLD)
        .map(|i| ctx.stream(&format!("cold:{i}")))
        .collect();
    let hot_done = Arc::new(AtomicU64::new(0));
    let cold_waits: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let hot_at_last_cold = Arc::new(AtomicU64::new(0));

    let counted = Arc::clone(&hot_done);
    // About 3,000 entries a second: the hot stream keeps a backlog for
    // seconds.
    let hot_handler = handler_fn(move |_: serde_json::Value, _: Meta| {
        let counted = Arc::clone(&counted);
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            counted.fetch_add(1, Ordering::Relaxed);
            Ok(Outcome::Ack)
        }
    });
    let mut builder = Processor::builder(many_groups_settings(&ctx))
        .group(Group::new(&hot, "work", hot_handler).with_in_flight(16));
    for stream in &cold {
        let (waits, hot_done, at_last) = (
            Arc::clone(&cold_waits),
            Arc::clone(&hot_done),
            Arc::clone(&hot_at_last_cold),
        );
        let record = handler_fn(move |_: serde_json::Value, meta: Meta| {
            let waited = meta
                .published_at()
                .and_then(|at| SystemTime::now().duration_since(at).ok())
                .unwrap_or_default();
            waits.lock().unwrap().push(waited);
            at_last.store(hot_done.load(Ordering::Relaxed), Ordering::Relaxed);
            async { Ok(Outcome::Ack) }
        });
        builder = builder.group(Group::new(stream, "work", record));
    }
    let processor = builder.start().await.unwrap();
    let producer = processor.producer();

    for batch in 0..HOT_EVENTS / 1_000 {
        let events = (batch * 1_000..(batch + 1) * 1_000).map(numbered).collect();
        publish_all(&producer, &hot, events).await;
    }
    eventually(
        Duration::from_secs(30),
        "the hot stream under way",
        || async { hot_done.load(Ordering::Relaxed) > 500 },
    )
    .await;
    for stream in &cold {
        publish_all(&producer, stream, vec![numbered(0)]).await;
    }
    eventually(
        Duration::from_secs(30),
        "every cold entry handled",
        || async { cold_waits.lock().unwrap().len() == COLD },
    )
    .await;
    let longest = cold_waits.lock().unwrap().iter().copied().max().unwrap();
    let hot_then = hot_at_last_cold.load(Ordering::Relaxed);
    assert!(
        hot_then < HOT_EVENTS - 1_000,
        "the hot stream's backlog was gone ({hot_then} of {HOT_EVENTS} handled) before the cold entries were: the test did not test"
    );
    assert!(
        longest <= BOUND,
        "a cold entry waited {longest:?} behind the hot stream (bound {BOUND:?})"
    );
    eprintln!("longest cold wait {longest:?}, hot stream at {hot_then} of {HOT_EVENTS}");
    processor.shutdown().await.unwrap();
}

//! The producer: batching, trimming, limits, backpressure, failed writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use redstream::Error;
use redstream::prelude::*;

use crate::support::{TestContext, eventually, publish_all};

fn payload(i: usize) -> Event {
    Event::new("tick", &serde_json::json!({ "n": i })).unwrap()
}

#[actix_rt::test]
async fn concurrent_publishes_share_round_trips() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("batched");
    let processor = Processor::builder(ctx.settings()).start().await.unwrap();
    let producer = processor.producer();
    let publishes = (0..1_000).map(|i| {
        let producer = producer.clone();
        let stream = stream.clone();
        async move { producer.publish(&stream, payload(i)).await }
    });
    let results = futures_util::future::join_all(publishes).await;
    assert!(results.iter().all(Result::is_ok));
    let stats = producer.stats();
    assert_eq!(stats.written, 1_000);
    assert!(
        stats.round_trips < 100,
        "1000 events took {} round trips",
        stats.round_trips
    );
    assert_eq!(ctx.xlen(&stream).await, 1_000, "each event written once");
    // Entry ids are unique and every event got its own event id.
    let entries = ctx.entries(&stream).await;
    let mut ids: Vec<String> = entries
        .iter()
        .map(|(_, f)| f.iter().find(|(k, _)| k == "id").unwrap().1.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1_000);
    processor.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn max_len_trims_the_stream_approximately() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("trimmed");
    let processor = Processor::builder(ctx.settings())
        .stream_max_len(&stream, 100)
        .start()
        .await
        .unwrap();
    let events = (0..3_000).map(payload).collect();
    publish_all(&processor.producer(), &stream, events).await;
    let len = ctx.xlen(&stream).await;
    assert!((100..=300).contains(&len), "XLEN {len} after MAXLEN ~ 100");
    processor.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn oversized_payloads_are_refused_with_the_limit() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("big");
    let mut settings = ctx.settings();
    settings.producer.max_payload_bytes = 1024;
    let processor = Processor::builder(settings).start().await.unwrap();
    let big = Event::new("blob", &"x".repeat(2_000)).unwrap();
    match processor.producer().publish(&stream, big).await {
        Err(Error::PayloadTooLarge { actual, limit }) => {
            assert_eq!(limit, 1024);
            assert!(actual > 2_000);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!(ctx.xlen(&stream).await, 0, "nothing written");
    processor.shutdown().await.unwrap();
}

/// A full buffer makes publishers wait (and `try_publish` fail fast); it
/// never grows past its bound and nothing is dropped.
#[actix_rt::test]
async fn a_full_buffer_makes_publishers_wait() {
    let Some((server, ctx)) = TestContext::on_own_server() else {
        return;
    };
    let stream = ctx.stream("slow");
    let mut settings = ctx.settings();
    settings.producer.buffer = 8;
    settings.producer.batch_size = 4;
    let processor = Processor::builder(settings).start().await.unwrap();
    let producer = processor.producer();
    // Writes stall on the server for a while.
    server.cmd(&["CLIENT", "PAUSE", "1500", "WRITE"]);
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..30 {
        let producer = producer.clone();
        let stream = stream.clone();
        let done = Arc::clone(&done);
        tasks.push(actix_rt::spawn(async move {
            let r = producer.publish(&stream, payload(i)).await;
            done.fetch_add(1, Ordering::SeqCst);
            r
        }));
    }
    eventually(Duration::from_secs(2), "buffer full", || async {
        producer.buffered() == 8
    })
    .await;
    match producer.try_publish(&stream, payload(99)).await {
        Err(Error::BufferFull { capacity }) => assert_eq!(capacity, 8),
        other => panic!("expected BufferFull, got {other:?}"),
    }
    assert_eq!(done.load(Ordering::SeqCst), 0, "publishers are waiting");
    let mut max_buffered = 0;
    for task in tasks {
        max_buffered = max_buffered.max(producer.buffered());
        assert!(task.await.unwrap().is_ok());
    }
    assert!(max_buffered <= 8);
    assert_eq!(ctx.xlen(&stream).await, 30);
    processor.shutdown().await.unwrap();
}

/// A write that cannot succeed is retried with backoff, then reported to
/// the caller; after Redis is back, publishing works again.
#[actix_rt::test]
async fn a_failed_publish_is_retried_then_reported() {
    let Some((mut server, ctx)) = TestContext::on_own_server() else {
        return;
    };
    let stream = ctx.stream("down");
    let mut settings = ctx.settings();
    settings.producer.publish_attempts = 3;
    settings.producer.retry_initial_ms = 20;
    settings.producer.retry_max_ms = 50;
    settings.redis.command_timeout_ms = 300;
    settings.redis.connect_timeout_ms = 300;
    let processor = Processor::builder(settings).start().await.unwrap();
    let producer = processor.producer();
    producer.publish(&stream, payload(0)).await.unwrap();
    server.stop(crate::support::redis_server::Stop::Kill9);
    match producer.publish(&stream, payload(1)).await {
        Err(Error::PublishFailed {
            attempts,
            stream: s,
            ..
        }) => {
            assert_eq!(attempts, 3);
            assert_eq!(s, stream);
        }
        other => panic!("expected PublishFailed, got {other:?}"),
    }
    server.restart(crate::support::redis_server::Stop::Kill9);
    eventually(
        Duration::from_secs(10),
        "publishing works again",
        || async { producer.publish(&stream, payload(2)).await.is_ok() },
    )
    .await;
    let mut c = ctx.conn().await;
    let len: u64 = c.xlen(&stream).await.unwrap();
    assert!(
        len >= 2,
        "entries before the outage (AOF) and after it: {len}"
    );
    processor.shutdown().await.unwrap();
}

//! Retries and dead letters: growing delays, the attempt budget, dead
//! letters with every field, and attempt counts that survive restarts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redstream::prelude::*;

use crate::support::redis_server::Stop;
use crate::support::{TestContext, eventually, numbered, publish_one, start_group};

/// When each attempt of each event ran.
type Attempts = Arc<Mutex<HashMap<u64, Vec<(u32, Instant)>>>>;

fn record(attempts: &Attempts, n: u64, attempt: u32) {
    attempts
        .lock()
        .unwrap()
        .entry(n)
        .or_default()
        .push((attempt, Instant::now()));
}

fn field(fields: &[(String, String)], name: &str) -> Option<String> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// A handler that always fails: redelivered after 100, 200, 400 ms, then
/// dead-lettered after the 4th attempt with every field.
#[actix_rt::test]
async fn retries_back_off_and_end_in_a_dead_letter_with_every_field() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("retries");
    let (_logs, logged) = crate::support::capture_warnings();
    let attempts: Attempts = Arc::default();
    let sink = Arc::clone(&attempts);
    let handler = handler_fn(move |v: serde_json::Value, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            record(&sink, v["n"].as_u64().unwrap(), meta.attempt());
            Err(format!("downstream refused attempt {}", meta.attempt()).into())
        }
    });
    let policy = RetryPolicy::default()
        .with_max_attempts(4)
        .with_initial_delay(Duration::from_millis(100))
        .with_factor(2.0)
        .with_jitter(0.0);
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "g", handler).with_retry(policy),
    )
    .await;
    let published = publish_one(&processor, &stream, numbered(1)).await;
    let dlq = redstream::dead_letter_stream(&stream);
    eventually(Duration::from_secs(10), "dead-lettered", || async {
        ctx.xlen(&dlq).await == 1 && ctx.pending(&stream, "g").await == 0
    })
    .await;

    let runs = attempts.lock().unwrap()[&1].clone();
    let numbers: Vec<u32> = runs.iter().map(|(a, _)| *a).collect();
    assert_eq!(numbers, [1, 2, 3, 4], "four attempts, numbered from 1");
    for (i, expected_ms) in [100u64, 200, 400].iter().enumerate() {
        let gap = runs[i + 1].1.duration_since(runs[i].1);
        assert!(
            gap >= Duration::from_millis(expected_ms - 5),
            "gap {} is {gap:?}, expected at least {expected_ms} ms",
            i + 1
        );
    }
    let (_, fields) = &ctx.entries(&dlq).await[0];
    assert!(
        field(fields, "reason")
            .unwrap()
            .starts_with("max_attempts_exceeded")
    );
    assert_eq!(field(fields, "origin_id").unwrap(), published.entry_id);
    assert_eq!(field(fields, "group").as_deref(), Some("g"));
    assert_eq!(field(fields, "attempts").as_deref(), Some("4"));
    assert!(field(fields, "failed_at").unwrap().parse::<u64>().is_ok());
    assert_eq!(
        field(fields, "error").as_deref(),
        Some("downstream refused attempt 4")
    );
    // The log line names the letter's reason and last error, under its own
    // target.
    let logged = String::from_utf8_lossy(&logged.lock().unwrap()).into_owned();
    let line = logged
        .lines()
        .find(|l| l.contains("dead-lettered: max_attempts_exceeded"))
        .unwrap_or_else(|| panic!("no dead-letter line in: {logged}"));
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("redstream::dead_lettered"), "{line}");
    assert!(
        line.contains("error=\"downstream refused attempt 4\""),
        "{line}"
    );
    // The original fields travel with the letter.
    assert_eq!(field(fields, "id"), Some(published.event_id.clone()));
    assert_eq!(field(fields, "type").as_deref(), Some("n"));
    assert_eq!(field(fields, "data").as_deref(), Some(r#"{"n":1}"#));
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert_eq!(
        (status.retried, status.dead_lettered, status.acked),
        (3, 1, 0)
    );
    // The attempt count is cleaned up with the entry.
    let mut c = ctx.conn().await;
    let left: u64 = redis::cmd("HLEN")
        .arg(format!("{stream}:attempts:g"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(left, 0);
    processor.shutdown().await.unwrap();
}

/// `retry_after(d)` waits `d`, whatever the policy says, and a handler's
/// own dead letter carries its reason.
#[actix_rt::test]
async fn a_handler_can_choose_the_delay_and_the_dead_letter_reason() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("chosen");
    let attempts: Attempts = Arc::default();
    let sink = Arc::clone(&attempts);
    let handler = handler_fn(move |v: serde_json::Value, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            let n = v["n"].as_u64().unwrap();
            record(&sink, n, meta.attempt());
            Ok(match (n, meta.attempt()) {
                (1, 1) => Outcome::retry_after(Duration::from_millis(700)),
                (2, _) => Outcome::dead_letter("customer unknown"),
                _ => Outcome::Ack,
            })
        }
    });
    let policy = RetryPolicy::default().with_initial_delay(Duration::from_millis(10));
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "g", handler).with_retry(policy),
    )
    .await;
    publish_one(&processor, &stream, numbered(1)).await;
    publish_one(&processor, &stream, numbered(2)).await;
    eventually(Duration::from_secs(10), "both settled", || async {
        attempts
            .lock()
            .unwrap()
            .get(&1)
            .is_some_and(|a| a.len() == 2)
            && ctx.pending(&stream, "g").await == 0
    })
    .await;
    let runs = attempts.lock().unwrap()[&1].clone();
    let gap = runs[1].1.duration_since(runs[0].1);
    assert!(
        gap >= Duration::from_millis(695),
        "waited the asked 700 ms, not 10: {gap:?}"
    );
    let letters = ctx.entries(&redstream::dead_letter_stream(&stream)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        field(&letters[0].1, "reason").as_deref(),
        Some("rejected: customer unknown")
    );
    assert_eq!(field(&letters[0].1, "attempts").as_deref(), Some("1"));
    processor.shutdown().await.unwrap();
}

/// Fails attempts 1 and 2; records the attempt numbers it sees.
fn fails_twice(attempts: &Attempts) -> impl Handler<Event = serde_json::Value> + use<> {
    let sink = Arc::clone(attempts);
    handler_fn(move |v: serde_json::Value, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            record(&sink, v["n"].as_u64().unwrap(), meta.attempt());
            if meta.attempt() <= 2 {
                return Err("not yet".into());
            }
            Ok(Outcome::Ack)
        }
    })
}

/// The process stops while the entry waits for its third attempt; the next
/// process runs it as attempt 3, not before its time: the wait and the count
/// are in Redis, not in the process.
#[actix_rt::test]
async fn attempts_and_waiting_retries_survive_a_process_restart() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("restart");
    let attempts: Attempts = Arc::default();
    let policy = RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(100))
        .with_factor(15.0)
        .with_jitter(0.0);
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "g", fails_twice(&attempts)).with_retry(policy.clone()),
    )
    .await;
    publish_one(&processor, &stream, numbered(1)).await;
    eventually(Duration::from_secs(10), "two attempts failed", || async {
        attempts
            .lock()
            .unwrap()
            .get(&1)
            .is_some_and(|a| a.len() == 2)
    })
    .await;
    // Attempt 2 failed; attempt 3 is due 1.5 s later. Stop meanwhile.
    let second = attempts.lock().unwrap()[&1][1].1;
    processor.shutdown().await.unwrap();
    assert_eq!(ctx.pending(&stream, "g").await, 1, "waiting, not lost");

    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "g", fails_twice(&attempts)).with_retry(policy),
    )
    .await;
    eventually(Duration::from_secs(10), "the third attempt", || async {
        attempts.lock().unwrap()[&1].len() == 3 && ctx.pending(&stream, "g").await == 0
    })
    .await;
    let (number, when) = attempts.lock().unwrap()[&1][2];
    assert_eq!(number, 3, "the count survived the restart");
    assert!(
        when.duration_since(second) >= Duration::from_millis(1_495),
        "not retried before its time: {:?}",
        when.duration_since(second)
    );
    processor.shutdown().await.unwrap();
}

/// Redis is killed with SIGKILL and restarted on the same data (AOF
/// `always`) while the entry waits: the count does not reset.
#[actix_rt::test]
async fn attempts_survive_a_redis_restart_with_aof() {
    let Some((mut server, ctx)) = TestContext::on_own_server() else {
        return;
    };
    let stream = ctx.stream("aof");
    let attempts: Attempts = Arc::default();
    let policy = RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(100))
        .with_factor(20.0)
        .with_jitter(0.0);
    let mut settings = ctx.settings();
    settings.redis.command_timeout_ms = 500;
    settings.redis.connect_timeout_ms = 300;
    let processor = start_group(
        settings,
        Group::new(&stream, "g", fails_twice(&attempts)).with_retry(policy),
    )
    .await;
    publish_one(&processor, &stream, numbered(1)).await;
    eventually(Duration::from_secs(10), "two attempts failed", || async {
        attempts
            .lock()
            .unwrap()
            .get(&1)
            .is_some_and(|a| a.len() == 2)
    })
    .await;
    server.restart(Stop::Kill9);
    eventually(
        Duration::from_secs(30),
        "the third attempt after Redis came back",
        || async { attempts.lock().unwrap()[&1].len() == 3 },
    )
    .await;
    eventually(Duration::from_secs(10), "acked", || async {
        ctx.pending(&stream, "g").await == 0
    })
    .await;
    assert_eq!(attempts.lock().unwrap()[&1][2].0, 3, "attempt 3, not 1");
    processor.shutdown().await.unwrap();
}

/// Entries of a newer schema version than the handler reads are
/// dead-lettered; older ones are upcast.
#[actix_rt::test]
async fn schema_versions_are_upcast_or_dead_lettered() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("versions");
    #[derive(serde::Deserialize)]
    struct Payment {
        amount_cents: i64,
    }
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let handler = handler_fn(move |p: Payment, _meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            sink.lock().unwrap().push(p.amount_cents);
            Ok(Outcome::Ack)
        }
    })
    .with_schema(Schema::new(2).upcast(1, |mut v: serde_json::Value| {
        let euros = v["amount"].as_f64().ok_or("amount missing")?;
        v["amount_cents"] = serde_json::json!((euros * 100.0).round() as i64);
        Ok::<_, redstream::BoxError>(v)
    }));
    let processor = start_group(ctx.settings(), Group::new(&stream, "g", handler)).await;
    let producer = processor.producer();
    let old = Event::new("payment", &serde_json::json!({"amount": 2.5}))
        .unwrap()
        .with_version(1);
    let current = Event::new("payment", &serde_json::json!({"amount_cents": 7}))
        .unwrap()
        .with_version(2);
    let future = Event::new("payment", &serde_json::json!({"cents": 1}))
        .unwrap()
        .with_version(3);
    for e in [old, current, future] {
        producer.publish(&stream, e).await.unwrap();
    }
    let dlq = redstream::dead_letter_stream(&stream);
    eventually(
        Duration::from_secs(10),
        "two handled, one dead-lettered",
        || async { seen.lock().unwrap().len() == 2 && ctx.xlen(&dlq).await == 1 },
    )
    .await;
    let mut amounts = seen.lock().unwrap().clone();
    amounts.sort();
    assert_eq!(amounts, [7, 250]);
    let reason = field(&ctx.entries(&dlq).await[0].1, "reason").unwrap();
    assert!(
        reason.starts_with("unknown_schema_version: version 3"),
        "{reason}"
    );
    processor.shutdown().await.unwrap();
}

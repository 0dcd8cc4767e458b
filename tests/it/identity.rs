//! Groups that disappear, member-name leases, dead-letter writes that
//! fail, and start-up warnings about Redis persistence.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redstream::prelude::*;
use redstream::{Error, MissingGroupPolicy};

use crate::support::{
    RedisServer, TestContext, eventually, eventually_all_alive, publish_one, start_group,
};

fn counter() -> (
    Arc<AtomicU64>,
    impl Handler<Event = serde_json::Value> + use<>,
) {
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    let handler = handler_fn(move |_: serde_json::Value, _: Meta| {
        let c = Arc::clone(&c);
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Ack)
        }
    });
    (count, handler)
}

fn event() -> Event {
    Event::new("x", &serde_json::json!({})).unwrap()
}

/// `XGROUP DESTROY` and then `DEL` of the stream while the group runs: the
/// group is recreated and processing resumes, without a hot error loop.
#[actix_rt::test]
async fn a_group_or_stream_that_disappears_is_recreated() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("vanishing");
    let (count, handler) = counter();
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "g", handler).with_members(2),
    )
    .await;
    let producer = processor.producer();
    producer.publish(&stream, event()).await.unwrap();
    eventually(Duration::from_secs(5), "first handled", || async {
        count.load(Ordering::SeqCst) == 1
    })
    .await;

    let mut c = ctx.conn().await;
    let _: u64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg("g")
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the group exists again",
        || async {
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&stream)
                .query_async(&mut ctx.conn().await)
                .await
                .unwrap();
            matches!(groups, redis::Value::Array(ref g) if !g.is_empty())
        },
    )
    .await;
    // Recreated at 0: the first entry comes again (idempotent handlers
    // absorb it), and new ones are handled.
    producer.publish(&stream, event()).await.unwrap();
    eventually(Duration::from_secs(10), "processing resumed", || async {
        count.load(Ordering::SeqCst) >= 3
    })
    .await;

    let _: u64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the stream and group exist again",
        || async {
            ctx.xlen(&stream).await == 0 && {
                let groups: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&stream)
                    .query_async(&mut ctx.conn().await)
                    .await;
                matches!(groups, Ok(redis::Value::Array(ref g)) if !g.is_empty())
            }
        },
    )
    .await;
    let before = count.load(Ordering::SeqCst);
    producer.publish(&stream, event()).await.unwrap();
    eventually(Duration::from_secs(10), "handled after the DEL", || async {
        count.load(Ordering::SeqCst) == before + 1
    })
    .await;
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert!(!status.failed);
    // Backoff, not a hot loop: a handful of restarts, not hundreds.
    assert!(status.restarts() < 20, "{status:?}");
    eventually_all_alive(&processor, &stream, "g", "all members alive").await;
    processor.shutdown().await.unwrap();
}

/// With `on_missing_group = "fail"` the group stops and says so.
#[actix_rt::test]
async fn the_fail_policy_stops_the_group() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("fail-policy");
    let (_, handler) = counter();
    let mut settings = ctx.settings();
    settings.consumer.on_missing_group = MissingGroupPolicy::Fail;
    let processor = start_group(settings, Group::new(&stream, "g", handler)).await;
    let mut c = ctx.conn().await;
    let _: u64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg("g")
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the group failed", || async {
        processor.group_status(&stream, "g").await.unwrap().failed
    })
    .await;
    let health = processor.health().await;
    assert!(!health.ready);
    let group = format!("group {stream}/g");
    assert!(
        health
            .checks
            .iter()
            .any(|c| c.name == group && c.status == redstream::CheckStatus::Failed && !c.ok),
        "{health:?}"
    );
    processor.shutdown().await.unwrap();
}

/// A second live process with the same member names waits for the lease,
/// then refuses to start; once the first stops, it can.
#[actix_rt::test]
async fn a_second_process_with_the_same_member_names_is_refused() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("lease");
    let settings = ctx.settings();
    let (_, first_handler) = counter();
    let first = start_group(
        settings.clone(),
        Group::new(&stream, "g", first_handler).with_members(2),
    )
    .await;

    let mut second_settings = settings.clone();
    second_settings.reclaim.lease_wait_ms = 500;
    let (_, handler) = counter();
    let started = std::time::Instant::now();
    match Processor::builder(second_settings.clone())
        .group(Group::new(&stream, "g", handler).with_members(2))
        .start()
        .await
    {
        Err(Error::LeaseHeld {
            member, key, group, ..
        }) => {
            assert_eq!(member, format!("{}-0", settings.instance.name));
            assert_eq!(group, "g");
            assert!(key.contains(":lease:g:"), "{key}");
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "it waited for the lease first"
    );

    first.shutdown().await.unwrap();
    let (_, handler) = counter();
    let second = start_group(
        second_settings,
        Group::new(&stream, "g", handler).with_members(2),
    )
    .await;
    second.shutdown().await.unwrap();
}

/// When writing the dead letter fails, the original is not acked: it stays
/// pending, and is dead-lettered once writing works again.
#[actix_rt::test]
async fn a_failed_dead_letter_write_leaves_the_entry_pending() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("dlq-fails");
    let dlq = redstream::dead_letter_stream(&stream);
    let mut c = ctx.conn().await;
    // A key of the wrong type where the dead-letter stream should be.
    let _: () = redis::cmd("SET")
        .arg(&dlq)
        .arg("not a stream")
        .query_async(&mut c)
        .await
        .unwrap();
    let handler =
        handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::dead_letter("no")) });
    let mut settings = ctx.settings();
    settings.reclaim.min_idle_ms = 1_000;
    settings.reclaim.heartbeat_ms = 300;
    let processor = start_group(settings, Group::new(&stream, "g", handler)).await;
    publish_one(&processor, &stream, event()).await;
    eventually(Duration::from_secs(5), "delivered", || async {
        ctx.pending(&stream, "g").await == 1
    })
    .await;
    // Several tries later: still pending, nothing dead-lettered or acked.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        ctx.pending(&stream, "g").await,
        1,
        "never acked without its dead letter"
    );
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert_eq!((status.dead_lettered, status.acked), (0, 0), "{status:?}");

    let _: () = redis::cmd("DEL")
        .arg(&dlq)
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "dead-lettered once writing works",
        || async { ctx.xlen(&dlq).await == 1 && ctx.pending(&stream, "g").await == 0 },
    )
    .await;
    processor.shutdown().await.unwrap();
}

/// Start-up says when Redis can lose or evict stream data.
#[actix_rt::test]
async fn start_up_warns_about_settings_that_lose_data() {
    let cases: [(&[&str], &[&str]); 3] = [
        (&["--appendonly", "no"], &["appendonly is `no`"]),
        (
            &[
                "--appendfsync",
                "everysec",
                "--maxmemory-policy",
                "allkeys-lru",
            ],
            &["appendfsync is `everysec`", "allkeys-lru"],
        ),
        (&[], &[]),
    ];
    for (args, expected) in cases {
        let server = RedisServer::start_with(args);
        let Some(ctx) = TestContext::with_url(&server.url()) else {
            return;
        };
        let processor = Processor::builder(ctx.settings()).start().await.unwrap();
        let warnings = processor.server().warnings.clone();
        assert_eq!(warnings.len(), expected.len(), "{args:?}: {warnings:?}");
        for needle in expected {
            assert!(
                warnings.iter().any(|w| w.contains(needle)),
                "{args:?}: {warnings:?}"
            );
        }
        let report = processor.server();
        assert!(
            report.version.split('.').count() == 3
                && (report.server.starts_with("Redis ") || report.server.starts_with("Valkey ")),
            "version read: {report:?}"
        );
        processor.shutdown().await.unwrap();
    }
}

//! F02: a crash at every crash point (`redstream::failpoints`). The worker
//! aborts — no cleanup, like `kill -9` — the Nth time it passes the point;
//! a fresh worker with the same names takes over. Pass: nothing lost, no
//! duplicated effect, the PEL drains, and the point-specific promises hold:
//! a commit whose ack was lost is absorbed by `processed_events`; a dead
//! letter is written once; an outbox row published but not marked is
//! published again with the same event id.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};

/// Reads `(entry id, fields)` of a whole stream.
async fn entries(c: &Chaos, stream: &str) -> Vec<HashMap<String, String>> {
    let Some(mut conn) = c.redis_conn().await else {
        return Vec::new();
    };
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .into_iter()
                .filter_map(|(k, v)| match v {
                    redis::Value::BulkString(b) => {
                        Some((k, String::from_utf8_lossy(&b).into_owned()))
                    }
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// Waits for worker `i` to die at its crash point; false if it lives on.
async fn crashed(c: &mut Chaos, i: usize, within: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if !c.workers[i].alive() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn run(backend: Backend, point: &'static str) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F02 crash points", backend, "aof-always", &[]).await else {
        return;
    };
    let n = c.tier.pick(400, 2_000);
    let poison = 37;
    let mut hit = 3;
    match point {
        "dlq.after_write" => {
            c.set_env("CHAOS_PANIC_SEQ", poison);
            c.set_env("REDSTREAM__RETRY__MAX_ATTEMPTS", 2);
            hit = 1;
        }
        "producer.after_send" | "outbox.after_xadd_before_mark" => {
            c.set_env("CHAOS_OUTBOX", 1);
            // The dead relay's lease must expire before the next relays.
            c.set_env("REDSTREAM__OUTBOX__LEASE_TTL_MS", 2_000);
        }
        "reclaimer.after_claim" => {
            c.set_env("REDSTREAM__RECLAIM__MIN_IDLE_MS", 1_000);
            c.set_env("REDSTREAM__RECLAIM__HEARTBEAT_MS", 400);
            hit = 1;
        }
        _ => {}
    }
    c.start_sampler();
    if point == "reclaimer.after_claim" {
        // Worker a dies right after a read, leaving entries pending for its
        // members; worker b (other names) reclaims them, and dies there.
        c.set_env("CHAOS_CRASH_POINT", "consumer.after_read");
        c.set_env("CHAOS_CRASH_AT", 3);
        c.spawn_worker("f02-a", 1, true).await;
        let producing = c.start_producing(n, Duration::from_secs(3)).await;
        assert!(
            crashed(&mut c, 0, Duration::from_secs(30)).await,
            "worker a crashed after a read"
        );
        c.fault();
        c.set_env("CHAOS_CRASH_POINT", point);
        c.set_env("CHAOS_CRASH_AT", hit);
        c.spawn_worker("f02-b", 1, true).await;
        assert!(
            crashed(&mut c, 1, Duration::from_secs(30)).await,
            "worker b crashed after claiming (seed {})",
            c.seed
        );
        c.fault();
        c.set_env("CHAOS_CRASH_POINT", "");
        c.respawn(1, 1, true).await;
        return finish(c, point, producing.await.expect("producer"), poison).await;
    }
    c.set_env("CHAOS_CRASH_POINT", point);
    c.set_env("CHAOS_CRASH_AT", hit);
    c.spawn_worker("f02", 2, true).await;
    let producing = c.start_producing(n, Duration::from_secs(3)).await;
    assert!(
        crashed(&mut c, 0, Duration::from_secs(30)).await,
        "the worker never reached crash point {point} (seed {})",
        c.seed
    );
    c.fault();
    c.set_env("CHAOS_CRASH_POINT", "");
    c.respawn(0, 2, true).await;
    finish(c, point, producing.await.expect("producer"), poison).await;
}

async fn finish(mut c: Chaos, point: &'static str, history: crate::workload::History, poison: i64) {
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let mut note = format!("crash at {point}");
    let out_stream = format!("{}:out", c.stream);
    let mut out = entries(&c, &out_stream).await;
    if !out.is_empty() {
        // The relay catches up after the consumers: wait for every effect's
        // outbox event.
        let effected = crate::ledger::effect_rows(&c.conn).await as usize;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let ids: HashSet<String> = out.iter().filter_map(|f| f.get("id").cloned()).collect();
            if ids.len() >= effected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            out = entries(&c, &out_stream).await;
        }
    }
    let letters = entries(&c, &format!("{}:dlq", c.stream)).await;
    let last_metrics = c
        .workers
        .last()
        .and_then(|w| w.events("metrics").last().cloned());
    let absorbed = last_metrics
        .as_ref()
        .and_then(|m| m["duplicates"].as_u64())
        .unwrap_or(0);
    if !out.is_empty() {
        let ids: HashSet<&str> = out
            .iter()
            .filter_map(|f| f.get("id").map(String::as_str))
            .collect();
        note.push_str(&format!(
            "; outbox: {} entries, {} distinct ids",
            out.len(),
            ids.len()
        ));
    }
    note.push_str(&format!("; redeliveries absorbed {absorbed}"));
    let (v, _) = c.finish(&history, drain, &note).await;
    c.assert_core(&v, drain);
    match point {
        "handler.after_commit_before_ack" => assert!(
            absorbed >= 1,
            "the committed batch came back and was absorbed by processed_events (seed {})",
            c.seed
        ),
        "dlq.after_write" => {
            let poisoned: Vec<_> = letters
                .iter()
                .filter(|f| {
                    f.get("data")
                        .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                        .and_then(|d| d["seq"].as_i64())
                        == Some(poison)
                })
                .collect();
            assert_eq!(
                poisoned.len(),
                1,
                "one dead letter for the poison event: {letters:?}"
            );
            assert_eq!(v.dead_total(), 1, "{:?}", v.dead_lettered);
        }
        "producer.after_send" | "outbox.after_xadd_before_mark" => {
            let ids: HashSet<&str> = out
                .iter()
                .filter_map(|f| f.get("id").map(String::as_str))
                .collect();
            assert_eq!(
                ids.len(),
                v.effected_once,
                "every effect's outbox event reached the stream (seed {})",
                c.seed
            );
            assert!(
                out.len() > ids.len(),
                "the crash between publish and mark republished rows with the same id"
            );
        }
        _ => assert_eq!(v.dead_total(), 0, "{:?}", v.dead_lettered),
    }
    c.shutdown().await;
}

macro_rules! crash_tests {
    ($($name:ident: $point:literal,)*) => {
        mod sqlite {
            $(
                #[actix_rt::test]
                async fn $name() {
                    super::run(crate::db::Backend::Sqlite, $point).await;
                }
            )*
        }
        mod pg {
            $(
                #[actix_rt::test]
                async fn $name() {
                    super::run(crate::db::Backend::Postgres, $point).await;
                }
            )*
        }
    };
}

crash_tests! {
    f02_after_read: "consumer.after_read",
    f02_before_commit: "handler.before_commit",
    f02_after_commit_before_ack: "handler.after_commit_before_ack",
    f02_after_xack: "ack.after_xack",
    f02_after_claim: "reclaimer.after_claim",
    f02_after_dead_letter_write: "dlq.after_write",
    f02_producer_after_send: "producer.after_send",
    f02_outbox_after_publish_before_mark: "outbox.after_xadd_before_mark",
}

#[test]
fn every_crash_point_has_a_scenario() {
    let source = include_str!("f02_crash_points.rs");
    for point in redstream::failpoints::POINTS {
        assert!(
            source.contains(&format!("\"{point}\",\n")),
            "crash point {point} has no F02 scenario"
        );
    }
}

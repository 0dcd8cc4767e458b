//! F18: injected duplicate deliveries and a full replay. Copies of already
//! effected entries (same event id) are XADDed again, then the group is
//! rewound with `XGROUP SETID … 0` so every entry is delivered again. Pass:
//! the effects are unchanged (one per event), and the store counts every
//! redelivery as an absorbed duplicate.

use std::time::{Duration, Instant};

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};

/// Duplicates absorbed so far by the worker, from its metrics lines.
fn absorbed(c: &Chaos) -> u64 {
    c.workers
        .first()
        .and_then(|w| w.events("metrics").last().cloned())
        .and_then(|m| m["duplicates"].as_u64())
        .unwrap_or(0)
}

async fn run(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F18 duplicates and replay", backend, "aof-always", &[]).await
    else {
        return;
    };
    let n = c.tier.pick(1_000, 20_000);
    let injected = 50;
    c.spawn_worker("f18", 2, true).await;
    c.start_sampler();
    let history = c
        .start_producing(n, Duration::from_secs(2))
        .await
        .await
        .expect("producer");
    assert!(
        c.wait_drained(Duration::from_secs(60)).await.is_some(),
        "first pass drained"
    );

    // Copies of the first entries, same fields (so the same event id).
    let mut conn = c.redis_conn().await.expect("redis");
    let first: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&c.stream)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(injected)
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    for entry in &first.ids {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&c.stream).arg("*");
        for (k, v) in &entry.map {
            if let redis::Value::BulkString(bytes) = v {
                cmd.arg(k).arg(bytes.as_slice());
            }
        }
        let _: String = cmd.query_async(&mut conn).await.expect("XADD copy");
    }
    c.fault();
    assert!(
        c.wait_drained(Duration::from_secs(60)).await.is_some(),
        "duplicates drained"
    );

    // A full replay: every entry is delivered again.
    let started = Instant::now();
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(&c.stream)
        .arg(&c.group)
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("XGROUP SETID");
    c.fault();
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let replay = started.elapsed();
    // Every redelivery shows up as absorbed: the copies once, then every
    // entry (originals and copies) in the replay.
    let want = (injected + n + injected) as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while absorbed(&c) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = absorbed(&c);
    let (v, _) = c
        .finish(
            &history,
            drain,
            &format!(
                "{injected} copies + replay of {} entries: absorbed {got}; replay drained in {:.1}s (incl. the 0.6 s settle window)",
                n + injected,
                replay.as_secs_f64()
            ),
        )
        .await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "{:?}", v.dead_lettered);
    assert_eq!(
        v.effected_once, n,
        "every event effected once, copies and replay included"
    );
    assert!(
        got >= want,
        "absorbed {got} redeliveries, expected {want} (seed {})",
        c.seed
    );
    c.shutdown().await;
}

scenario_tests! {
    f18_duplicates_and_replay_sqlite => run(Backend::Sqlite);
    f18_duplicates_and_replay_pg => run(Backend::Postgres);
}

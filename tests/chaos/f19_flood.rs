//! F19: a slow consumer under a producer flood. The producer publishes 5×
//! faster than the handler can go for the whole flood; the consumer must
//! stay within its bounds (pending entries, memory), publishing must never
//! drop an event, no entry may be reclaimed merely for waiting in the
//! worker, and once the handler is fast again everything drains.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL, Tier};
use crate::workload::Outcome;

/// What the Redis-side sampler saw during the flood.
#[derive(Default, Debug)]
struct Peaks {
    samples: usize,
    max_pel: u64,
    max_xlen: u64,
    max_lag: u64,
    /// Entries seen pending with a delivery count above 1: reclaimed (or
    /// redelivered) although their member never stopped.
    redelivered: HashSet<String>,
}

fn int(v: &redis::Value) -> Option<u64> {
    match v {
        redis::Value::Int(n) => Some(*n as u64),
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// One sample of the stream and group: PEL size, XLEN, lag, and the
/// delivery counts of (up to 2,000 of) the pending entries.
async fn sample(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    peaks: &Mutex<Peaks>,
) {
    let summary: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await;
    let pel = match summary {
        Ok(redis::Value::Array(parts)) => parts.first().and_then(int).unwrap_or(0),
        _ => return,
    };
    let xlen: u64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap_or(0);
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap_or_default();
    let lag = groups
        .iter()
        .find(|g| g.get("name").is_some_and(|n| text(n) == group))
        .and_then(|g| g.get("lag"))
        .and_then(int)
        .unwrap_or(0);
    let detail: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(2_000)
        .query_async(conn)
        .await
        .unwrap_or_default();
    let mut p = peaks.lock().unwrap_or_else(|e| e.into_inner());
    p.samples += 1;
    p.max_pel = p.max_pel.max(pel);
    p.max_xlen = p.max_xlen.max(xlen);
    p.max_lag = p.max_lag.max(lag);
    for (id, _consumer, _idle, deliveries) in detail {
        if deliveries > 1 {
            p.redelivered.insert(id);
        }
    }
}

async fn f19(backend: Backend, tier: Tier) {
    let _serial = SERIAL.lock().await;
    // Build the worker first: the wall time is the scenario's own.
    crate::worker::worker_binary();
    let Some(mut c) = Chaos::new("F19 slow consumer flood", backend, "aof-always", &[]).await
    else {
        return;
    };
    let flood = Duration::from_secs(tier.pick(15, 60));
    let members = 2u64;
    let count = 50u64;
    let max_pending = 100u64;
    let sleep_ms = 20u64;
    // What the handler can do at most: each member handles one event per
    // `sleep_ms`. The producer goes 5× faster.
    let handler_rate = members * 1_000 / sleep_ms;
    let n = (handler_rate * 5 * flood.as_secs()) as usize;
    c.set_env("CHAOS_SLEEP_MS", sleep_ms);
    // Slow for the flood (and a little after it), then fast: the backlog
    // drains.
    c.set_env("CHAOS_SLEEP_FOR_MS", flood.as_millis() + 1_000);
    c.set_env("REDSTREAM__CONSUMER__COUNT", count);
    c.set_env("REDSTREAM__CONSUMER__MAX_PENDING", max_pending);
    // Room for more than `max_pending` in each member: the pending bound,
    // not the in-flight one, is what must hold the group back.
    c.set_env("REDSTREAM__CONSUMER__IN_FLIGHT", 500);
    c.spawn_worker("f19", members as usize, true).await;
    c.start_sampler();

    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let sampling = {
        let mut conn = c.redis_conn().await.expect("test redis");
        let (stream, group) = (c.stream.clone(), c.group.clone());
        let peaks = Arc::clone(&peaks);
        tokio::spawn(async move {
            loop {
                sample(&mut conn, &stream, &group, &peaks).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    c.fault();
    let flood_started = Instant::now();
    let producing = c.start_producing(n, flood).await;
    let history = producing.await.expect("producer task");
    let flood_took = flood_started.elapsed();
    let drain = c.wait_drained(Duration::from_secs(90)).await;
    sampling.abort();
    let peaks = std::mem::take(&mut *peaks.lock().unwrap_or_else(|e| e.into_inner()));
    let alive = c.workers.iter_mut().all(|w| w.alive());
    let rss = c.peak_rss_mb();
    let ok = history.count(Outcome::Ok);
    let bound = max_pending + members * count;
    let note = format!(
        "{n} events in {:.1}s against a handler of {handler_rate}/s; max publish latency {:.2}s; \
         max PEL {} (bound {bound}), max XLEN {}, max lag {}; spurious reclaims {}; {} samples",
        flood_took.as_secs_f64(),
        history.max_latency.as_secs_f64(),
        peaks.max_pel,
        peaks.max_xlen,
        peaks.max_lag,
        peaks.redelivered.len(),
        peaks.samples,
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    assert!(alive, "the worker exited (seed {})", c.seed);
    // Publishing never dropped anything: every publish returned Ok.
    assert_eq!(ok, n, "publishes not ok: {} of {n}", n - ok);
    assert!(peaks.samples > 20, "too few samples: {}", peaks.samples);
    // The flood really outran the consumer…
    assert!(
        peaks.max_lag > 10 * max_pending,
        "no backlog built up (max lag {}): the flood did not outrun the handler",
        peaks.max_lag
    );
    // …yet the group stopped reading while pending was above its bound.
    assert!(
        peaks.max_pel <= bound,
        "max PEL {} above max_pending {max_pending} + one read per member ({bound}) (seed {})",
        peaks.max_pel,
        c.seed
    );
    // Entries waiting inside the worker are heartbeated, never reclaimed.
    assert!(
        peaks.redelivered.is_empty(),
        "{} entries reclaimed or redelivered while their member was alive, e.g. {:?} (seed {})",
        peaks.redelivered.len(),
        peaks.redelivered.iter().take(5).collect::<Vec<_>>(),
        c.seed
    );
    assert!(rss < 128.0, "worker peak RSS {rss:.1} MB (seed {})", c.seed);
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "dead letters: {:?}", v.dead_lettered);
    c.shutdown().await;
}

scenario_tests! {
    f19_slow_consumer_flood_sqlite => f19(Backend::Sqlite, Tier::from_env());
    f19_slow_consumer_flood_pg => f19(Backend::Postgres, Tier::from_env());
}

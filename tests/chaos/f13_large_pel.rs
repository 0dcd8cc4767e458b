//! F13: a large pending list and the reclaimer's cursor (the opik bug).
//!
//! A raw consumer reads every entry of the stream (CI 20k, soak 50k) into
//! one consumer name without acking, and goes away. The first 1k entries
//! are kept from going idle (`XCLAIM … JUSTID` to the same consumer every
//! 300 ms), so an `XAUTOCLAIM` from `0-0` examines them (COUNT × 10 at most)
//! and returns an empty claimed list with a non-zero cursor: a reclaimer
//! that stops there never reaches the rest. Then a worker starts; pass:
//! every idle entry is reclaimed while the first 1k are still held, then
//! those once they turn idle; every event is effected once; the PEL drains
//! within a bound; no `XAUTOCLAIM` is slow (`SLOWLOG` with every command
//! logged) and its `COUNT` stays bounded.

use std::time::{Duration, Instant};

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};

const DEAD: &str = "f13-dead";
/// Entries kept busy at the head of the pending list.
const HELD: usize = 1_000;
/// `reclaim.count` (the default).
const RECLAIM_COUNT: usize = 100;

/// Keeps the ids held by `DEAD` from going idle, only while it still owns
/// them (so it never steals one back from a worker).
const RETOUCH_LUA: &str = r#"
local n = 0
for i = 1, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], KEYS[2], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == KEYS[3] then
    redis.call('XCLAIM', KEYS[1], KEYS[2], KEYS[3], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"#;

async fn pending_of(conn: &mut redis::aio::MultiplexedConnection, c: &Chaos, who: &str) -> u64 {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(&c.stream)
        .arg(&c.group)
        .query_async(conn)
        .await
        .expect("XPENDING");
    // [count, first, last, [[consumer, count], …]]
    let redis::Value::Array(parts) = reply else {
        return 0;
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return 0;
    };
    for c in consumers {
        let Ok((name, n)) = redis::from_redis_value::<(String, String)>(c.clone()) else {
            continue;
        };
        if name == who {
            return n.parse().unwrap_or(0);
        }
    }
    0
}

/// (calls, upper bound of the slowest call in µs) from `LATENCY HISTOGRAM
/// <cmd>`: `[name, [calls, n, histogram_usec, [bucket, cumulative, …]]]`,
/// the last bucket holding the slowest call.
async fn latency_histogram(conn: &mut redis::aio::MultiplexedConnection, cmd: &str) -> (u64, u64) {
    let reply: redis::Value = redis::cmd("LATENCY")
        .arg("HISTOGRAM")
        .arg(cmd)
        .query_async(conn)
        .await
        .expect("LATENCY HISTOGRAM");
    let int = |v: &redis::Value| match v {
        redis::Value::Int(i) => Some(*i as u64),
        _ => None,
    };
    let fields = match reply {
        redis::Value::Array(top) => match top.get(1) {
            Some(redis::Value::Array(f)) => f.clone(),
            _ => return (0, 0),
        },
        redis::Value::Map(top) => match top.first() {
            Some((_, redis::Value::Map(f))) => {
                f.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect()
            }
            _ => return (0, 0),
        },
        _ => return (0, 0),
    };
    let calls = fields.get(1).and_then(int).unwrap_or(0);
    let max = match fields.get(3) {
        Some(redis::Value::Array(buckets)) => {
            buckets.iter().step_by(2).filter_map(int).max().unwrap_or(0)
        }
        Some(redis::Value::Map(buckets)) => buckets
            .iter()
            .filter_map(|(k, _)| int(k))
            .max()
            .unwrap_or(0),
        _ => 0,
    };
    (calls, max)
}

async fn run(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F13 large PEL", backend, "aof-always", &[]).await else {
        return;
    };
    let n = c.tier.pick(20_000, 50_000);
    let min_idle_ms = 2_000u64;
    c.set_env("REDSTREAM__RECLAIM__MIN_IDLE_MS", min_idle_ms);
    c.set_env("REDSTREAM__RECLAIM__HEARTBEAT_MS", 500);
    c.set_env("REDSTREAM__RECLAIM__INTERVAL_MS", 200);
    c.set_env("REDSTREAM__RECLAIM__COUNT", RECLAIM_COUNT);
    c.set_env("REDSTREAM__CONSUMER__COUNT", 100);
    let mut conn = c.redis_conn().await.expect("redis");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&c.stream)
        .arg(&c.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");
    let history = c
        .start_producing(n, Duration::from_secs(1))
        .await
        .await
        .expect("producer");
    c.phase(&format!("published {n}"));

    // The raw consumer reads everything and never acks.
    let mut ids: Vec<String> = Vec::with_capacity(n);
    loop {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&c.group)
            .arg(DEAD)
            .arg("COUNT")
            .arg(5_000)
            .arg("STREAMS")
            .arg(&c.stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .expect("XREADGROUP");
        let before = ids.len();
        for key in reply.keys {
            ids.extend(key.ids.into_iter().map(|e| e.id));
        }
        if ids.len() == before {
            break;
        }
    }
    assert_eq!(ids.len(), n, "the raw consumer read every entry");
    let head: Vec<String> = ids[..HELD].to_vec();
    let retouch = redis::Script::new(RETOUCH_LUA);
    let touched: usize = retouch
        .key(&c.stream)
        .key(&c.group)
        .key(DEAD)
        .arg(&head)
        .invoke_async(&mut conn)
        .await
        .expect("re-touch");
    assert_eq!(touched, HELD);
    c.phase(&format!(
        "{n} entries pending for {DEAD}, the first {HELD} re-touched"
    ));

    // From now on: per-command latency histograms (CONFIG RESETSTAT clears
    // them), and the last 2,000 commands in the slow log (for XAUTOCLAIM's
    // arguments; the whole run would be hundreds of thousands of commands).
    for (k, v) in [
        ("slowlog-log-slower-than", "0"),
        ("slowlog-max-len", "2000"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut conn)
            .await
            .expect("CONFIG SET");
    }
    for cmd in [["SLOWLOG", "RESET"], ["CONFIG", "RESETSTAT"]] {
        let _: () = redis::cmd(cmd[0])
            .arg(cmd[1])
            .query_async(&mut conn)
            .await
            .expect("reset stats");
    }

    // Keep the head busy while the worker reclaims the rest.
    let keeper = {
        let mut conn = c.redis_conn().await.expect("redis");
        let (stream, group) = (c.stream.clone(), c.group.clone());
        let head = head.clone();
        tokio::spawn(async move {
            let script = redis::Script::new(RETOUCH_LUA);
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _: redis::RedisResult<usize> = script
                    .key(&stream)
                    .key(&group)
                    .key(DEAD)
                    .arg(&head)
                    .invoke_async(&mut conn)
                    .await;
            }
        })
    };

    let started = Instant::now();
    c.spawn_worker("f13", 2, true).await;
    c.start_sampler();
    c.fault();
    // Phase 1: every idle entry leaves DEAD; the head stays.
    let mut min_dead = n as u64;
    let mut tail_reclaimed = None;
    while started.elapsed() < Duration::from_secs(120) {
        let left = pending_of(&mut conn, &c, DEAD).await;
        min_dead = min_dead.min(left);
        if left <= HELD as u64 {
            tail_reclaimed = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    keeper.abort();
    let tail = tail_reclaimed.unwrap_or_else(|| {
        panic!(
            "the {} idle entries behind the {HELD} busy ones were not all reclaimed in 120 s ({} left; seed {})",
            n - HELD,
            min_dead,
            c.seed
        )
    });
    let head_left = pending_of(&mut conn, &c, DEAD).await;
    c.phase(&format!(
        "{} idle entries reclaimed in {:.1}s; head still held: {head_left}",
        n - HELD,
        tail.as_secs_f64()
    ));

    // Phase 2: the head turns idle and is reclaimed too.
    let drain = c.wait_drained(Duration::from_secs(90)).await;
    let total = started.elapsed();
    c.phase("drained; reading the slow log");
    let (autoclaims, max_us) = latency_histogram(&mut conn, "xautoclaim").await;
    let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(2_000)
        .query_async(&mut conn)
        .await
        .expect("SLOWLOG GET");
    // Each entry: [id, time, µs, [command, args…], client, name].
    let mut recent = 0usize;
    let mut max_count = 0usize;
    for e in &slow {
        let redis::Value::Array(f) = e else { continue };
        let Some(redis::Value::Array(args)) = f.get(3) else {
            continue;
        };
        let args: Vec<String> = args
            .iter()
            .filter_map(|a| redis::from_redis_value::<String>(a.clone()).ok())
            .collect();
        if !args
            .first()
            .is_some_and(|a| a.eq_ignore_ascii_case("xautoclaim"))
        {
            continue;
        }
        recent += 1;
        if let Some(i) = args.iter().position(|a| a.eq_ignore_ascii_case("count"))
            && let Some(count) = args.get(i + 1).and_then(|v| v.parse().ok())
        {
            max_count = max_count.max(count);
        }
    }
    let rate = (n - HELD) as f64 / tail.as_secs_f64();
    let note = format!(
        "{n} entries pending for one gone consumer, first {HELD} kept busy; idle ones reclaimed in {:.1}s ({rate:.0} entries/s) with the head still held ({head_left} left); all drained {:.1}s after the worker started; XAUTOCLAIM calls {autoclaims}, max ≤ {:.3} ms (LATENCY HISTOGRAM bucket), COUNT {max_count} in the last {recent} calls; min_idle {min_idle_ms} ms",
        tail.as_secs_f64(),
        total.as_secs_f64(),
        max_us as f64 / 1000.0,
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "{:?}", v.dead_lettered);
    assert_eq!(v.effected_once, n, "every event effected once");
    assert_eq!(
        head_left, HELD as u64,
        "busy head entries were reclaimed while their consumer kept them (seed {})",
        c.seed
    );
    assert!(autoclaims > 0, "no XAUTOCLAIM in the latency histogram");
    assert!(recent > 0, "no XAUTOCLAIM among the last slow-log entries");
    assert!(
        max_count <= RECLAIM_COUNT,
        "XAUTOCLAIM COUNT {max_count} above reclaim.count {RECLAIM_COUNT}"
    );
    // A call examines at most COUNT × 10 entries: about 1–5 ms; the ceiling
    // (a histogram bucket bound, up to 2× the real maximum) leaves room for
    // a loaded 2-core machine descheduling redis-server.
    assert!(
        max_us <= 262_144,
        "an XAUTOCLAIM took up to {max_us} µs (ceiling 262 ms)"
    );
    c.shutdown().await;
}

scenario_tests! {
    f13_large_pel_sqlite => run(Backend::Sqlite);
    f13_large_pel_pg => run(Backend::Postgres);
}

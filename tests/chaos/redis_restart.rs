//! Redis dies under load: F05 (kill -9 with AOF `always`), F04 (the retry
//! budget across Redis restarts) and F06 (weaker persistence: `everysec`,
//! `everysec` with a simulated OS crash that cuts the unsynced tail off the
//! AOF, and `appendonly no`, where losses are expected and classified, and
//! duplicated effects must stay 0).

use std::time::Duration;

use rand::Rng;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL, Tier};
use crate::redis_server::Stop;

struct Plan {
    scenario: &'static str,
    mode: &'static str,
    args: &'static [&'static str],
    restarts: u32,
    /// Losses are expected (weaker persistence): report, do not fail.
    losses_expected: bool,
    /// (percent of events, failing first attempts, max attempts).
    failing: Option<(u32, u32, u32)>,
    /// Handler time per event: > 0 makes the consumers slower than the
    /// producer, so a backlog of published, not yet consumed entries is in
    /// Redis at each crash (what weaker persistence can lose).
    handler_sleep_ms: u64,
    /// Simulated OS crash: cut a seeded number of bytes in this range off
    /// the newest incremental AOF before each restart.
    truncate_aof: Option<(u64, u64)>,
}

async fn run(backend: Backend, tier: Tier, plan: Plan) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new(plan.scenario, backend, plan.mode, plan.args).await else {
        return;
    };
    let n = tier.pick(3_000, 100_000);
    let restarts: u32 = tier.pick(plan.restarts, plan.restarts * 10);
    if let Some((pct, first, max)) = plan.failing {
        c.set_env("CHAOS_FAIL_PCT", pct);
        c.set_env("CHAOS_FAIL_FIRST", first);
        c.set_env("REDSTREAM__RETRY__MAX_ATTEMPTS", max);
        c.set_env("REDSTREAM__RETRY__INITIAL_DELAY_MS", 200);
        c.set_env("REDSTREAM__RETRY__JITTER", 0);
    }
    let secs = tier.pick(10, 200);
    if plan.handler_sleep_ms > 0 {
        c.set_env("CHAOS_SLEEP_MS", plan.handler_sleep_ms);
        if plan.truncate_aof.is_some() {
            // Slow while producing (a backlog at each crash), fast after:
            // the drain does not wait for the sleeps.
            c.set_env("CHAOS_SLEEP_FOR_MS", secs * 1_000 + 1_000);
        }
    }
    if plan.losses_expected {
        // The group may vanish with the data: recreate it.
        c.set_env("REDSTREAM__CONSUMER__ON_MISSING_GROUP", "recreate");
    }
    c.spawn_worker("w-a", 2, true).await;
    c.spawn_worker("w-b", 2, true).await;
    c.start_sampler();
    let producing = c.start_producing(n, Duration::from_secs(secs)).await;
    let gap = (secs * 1000) / (u64::from(restarts) + 1);
    let mut cut = Vec::new();
    for _ in 0..restarts {
        let pause = c.jitter_ms(gap / 2, gap);
        tokio::time::sleep(pause).await;
        c.fault();
        match plan.truncate_aof {
            Some((lo, hi)) => {
                let k = c.rng.random_range(lo..=hi);
                let (file, bytes, len) = c.redis.crash_truncating_aof(k);
                c.phase(&format!(
                    "cut {bytes} of {len} bytes off {}",
                    file.file_name().and_then(|f| f.to_str()).unwrap_or("?")
                ));
                cut.push(bytes);
            }
            None => c.redis.restart(Stop::Kill9),
        }
    }
    let history = producing.await.expect("producer task");
    let drain = c.wait_drained(Duration::from_secs(90)).await;
    let alive = c.workers.iter_mut().all(|w| w.alive());
    let unknown = history.count(crate::workload::Outcome::Unknown);
    let mut note = format!(
        "{restarts} redis kill -9; publishes unknown {unknown}, max publish latency {:.1}s",
        history.max_latency.as_secs_f64()
    );
    // Worker counters from their last metrics lines: redeliveries absorbed
    // by `processed_events`, and consumer restarts.
    let last = |key: &str| -> u64 {
        c.workers
            .iter()
            .filter_map(|w| w.events("metrics").last().and_then(|m| m[key].as_u64()))
            .sum()
    };
    let absorbed = last("duplicates");
    let member_restarts = last("restarts");
    if plan.truncate_aof.is_some() {
        // "AOF <file> loaded anyway because aof-load-truncated is enabled"
        let truncated_loads = c.redis.log().matches("loaded anyway").count();
        note = format!(
            "{note}; AOF tail cut {cut:?} bytes ({truncated_loads} truncated loads); \
             replays absorbed {absorbed}; member restarts {member_restarts}"
        );
    }
    let (v, _) = c.finish(&history, drain, &note).await;
    assert!(alive, "a worker exited (seed {})", c.seed);
    if plan.losses_expected {
        // Losses are the figure to report; a second effect never is.
        assert!(drain.is_some(), "the group did not drain (seed {})", c.seed);
        // No crash loop: each Redis restart costs each member a restart or
        // two, not an endless series.
        assert!(
            member_restarts <= u64::from(restarts) * 4 * 4,
            "{member_restarts} member restarts after {restarts} Redis crashes: a crash loop (seed {})",
            c.seed
        );
        assert_eq!(
            v.unexpected, 0,
            "an event whose publish failed was effected (seed {})",
            c.seed
        );
        eprintln!(
            "{}: lost acknowledged publishes {} of {}; replays absorbed {absorbed}",
            plan.scenario,
            v.lost.len(),
            history.records.len()
        );
    } else {
        c.assert_core(&v, drain);
        assert_eq!(v.dead_total(), 0, "dead letters: {:?}", v.dead_lettered);
    }
    if let Some((pct, first, max)) = plan.failing {
        let failing: Vec<i64> = history
            .records
            .iter()
            .map(|r| r.seq)
            .filter(|s| (*s as u64).wrapping_mul(2_654_435_761) % 100 < u64::from(pct))
            .collect();
        let mut histogram = std::collections::BTreeMap::new();
        for s in &failing {
            let a = v.attempts.get(s).copied().unwrap_or(0);
            *histogram.entry(a).or_insert(0) += 1;
        }
        eprintln!("attempt that committed, for the failing share: {histogram:?}");
        for s in &failing {
            let a = v.attempts.get(s).copied().unwrap_or(0);
            assert!(
                a > u64::from(first) && a <= u64::from(max),
                "seq {s} committed at attempt {a}: the attempt count reset or overran (seed {})",
                c.seed
            );
        }
    }
    c.shutdown().await;
}

fn f05() -> Plan {
    Plan {
        scenario: "F05 redis kill -9",
        mode: "aof-always",
        args: &[],
        restarts: 3,
        losses_expected: false,
        failing: None,
        handler_sleep_ms: 0,
        truncate_aof: None,
    }
}

fn f04() -> Plan {
    Plan {
        scenario: "F04 retry budget, redis kill -9",
        mode: "aof-always",
        args: &[],
        restarts: 2,
        losses_expected: false,
        failing: Some((10, 3, 5)),
        handler_sleep_ms: 0,
        truncate_aof: None,
    }
}

fn f06a() -> Plan {
    Plan {
        scenario: "F06a everysec + kill -9",
        mode: "aof-everysec",
        args: &["--appendfsync", "everysec"],
        restarts: 3,
        losses_expected: true,
        failing: None,
        // 4 members × 1/20 ms = 200 events/s against 300 published: a
        // growing backlog.
        handler_sleep_ms: 20,
        truncate_aof: None,
    }
}

fn f06b() -> Plan {
    Plan {
        scenario: "F06b everysec + OS crash (AOF tail cut)",
        mode: "aof-everysec",
        args: &["--appendfsync", "everysec", "--aof-load-truncated", "yes"],
        restarts: 3,
        losses_expected: true,
        failing: None,
        // A backlog at each crash, as in F06 (a).
        handler_sleep_ms: 20,
        // Up to about a second of this workload's AOF writes.
        truncate_aof: Some((1_024, 96 * 1_024)),
    }
}

fn f06c() -> Plan {
    Plan {
        scenario: "F06c appendonly no + kill -9",
        mode: "appendonly-no",
        args: &["--appendonly", "no"],
        restarts: 3,
        losses_expected: true,
        failing: None,
        // 4 members × 1/20 ms = 200 events/s against 300 published: a
        // growing backlog.
        handler_sleep_ms: 20,
        truncate_aof: None,
    }
}

scenario_tests! {
    f05_redis_kill9_sqlite => run(Backend::Sqlite, Tier::from_env(), f05());
    f05_redis_kill9_pg => run(Backend::Postgres, Tier::from_env(), f05());
    f04_retry_budget_across_redis_restarts_sqlite => run(Backend::Sqlite, Tier::from_env(), f04());
    f06a_everysec_kill9_sqlite => run(Backend::Sqlite, Tier::from_env(), f06a());
    f06b_everysec_os_crash_sqlite => run(Backend::Sqlite, Tier::from_env(), f06b());
    f06c_appendonly_no_kill9_sqlite => run(Backend::Sqlite, Tier::from_env(), f06c());
}

#[actix_rt::test]
#[ignore = "soak tier"]
async fn f05_redis_kill9_soak() {
    run(Backend::Sqlite, Tier::Soak, f05()).await;
    run(Backend::Postgres, Tier::Soak, f05()).await;
}

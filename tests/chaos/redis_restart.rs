//! Redis dies under load: F05 (kill -9 with AOF `always`), F04 (the retry
//! budget across Redis restarts) and F06 (weaker persistence: `everysec`
//! and `appendonly no`, where losses are expected and classified, and
//! duplicated effects must stay 0).

use std::time::Duration;

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
    if plan.handler_sleep_ms > 0 {
        c.set_env("CHAOS_SLEEP_MS", plan.handler_sleep_ms);
    }
    if plan.losses_expected {
        // The group may vanish with the data: recreate it.
        c.set_env("REDSTREAM__CONSUMER__ON_MISSING_GROUP", "recreate");
    }
    c.spawn_worker("w-a", 2, true).await;
    c.spawn_worker("w-b", 2, true).await;
    c.start_sampler();
    let secs = tier.pick(10, 200);
    let producing = c.start_producing(n, Duration::from_secs(secs)).await;
    let gap = (secs * 1000) / (u64::from(restarts) + 1);
    for _ in 0..restarts {
        let pause = c.jitter_ms(gap / 2, gap);
        tokio::time::sleep(pause).await;
        c.fault();
        c.redis.restart(Stop::Kill9);
    }
    let history = producing.await.expect("producer task");
    let drain = c.wait_drained(Duration::from_secs(90)).await;
    let alive = c.workers.iter_mut().all(|w| w.alive());
    let unknown = history.count(crate::workload::Outcome::Unknown);
    let note = format!(
        "{restarts} redis kill -9; publishes unknown {unknown}, max publish latency {:.1}s",
        history.max_latency.as_secs_f64()
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    assert!(alive, "a worker exited (seed {})", c.seed);
    if plan.losses_expected {
        // Losses are the figure to report; a second effect never is.
        assert!(drain.is_some(), "the group did not drain (seed {})", c.seed);
        assert!(
            v.duplicated.is_empty() && v.balance_drift == 0,
            "duplicated effects {:?} (seed {})",
            v.duplicated,
            c.seed
        );
        eprintln!(
            "{}: lost acknowledged publishes {} of {}",
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
    }
}

#[actix_rt::test]
async fn f05_redis_kill9_sqlite() {
    run(Backend::Sqlite, Tier::from_env(), f05()).await;
}

#[actix_rt::test]
async fn f05_redis_kill9_pg() {
    run(Backend::Postgres, Tier::from_env(), f05()).await;
}

#[actix_rt::test]
async fn f04_retry_budget_across_redis_restarts_sqlite() {
    run(Backend::Sqlite, Tier::from_env(), f04()).await;
}

#[actix_rt::test]
async fn f06a_everysec_kill9_sqlite() {
    run(Backend::Sqlite, Tier::from_env(), f06a()).await;
}

#[actix_rt::test]
async fn f06c_appendonly_no_kill9_sqlite() {
    run(Backend::Sqlite, Tier::from_env(), f06c()).await;
}

#[actix_rt::test]
#[ignore = "soak tier"]
async fn f05_redis_kill9_soak() {
    run(Backend::Sqlite, Tier::Soak, f05()).await;
    run(Backend::Postgres, Tier::Soak, f05()).await;
}

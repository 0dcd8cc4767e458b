//! F16: racing `XGROUP CREATE` and start-up order. The producer publishes
//! first to a stream that does not exist (no group yet); then 8 worker
//! processes × 1 member start at the same moment, each creating the group.
//! Exactly one create succeeds, `BUSYGROUP` counts as success for the other
//! seven (no error reaches the user: every worker prints `started`), and the
//! events published before the group existed are all effected (created at
//! `0`, nothing skipped).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL, Tier};
use crate::workload::Outcome;

/// `cmdstat_xgroup|create` from `INFO commandstats`: (calls, failed calls).
fn xgroup_create_stats(c: &Chaos) -> (u64, u64) {
    let info = match c.redis.cmd(&["INFO", "commandstats"]) {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => format!("{other:?}"),
    };
    let Some(line) = info
        .lines()
        .find(|l| l.starts_with("cmdstat_xgroup|create:"))
    else {
        return (0, 0);
    };
    let fields: HashMap<&str, u64> = line
        .split_once(':')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
        .collect();
    (
        fields.get("calls").copied().unwrap_or(0),
        fields.get("failed_calls").copied().unwrap_or(0),
    )
}

async fn f16(backend: Backend, tier: Tier) {
    let _serial = SERIAL.lock().await;
    // Build the worker first, so that neither the wall time nor the start-up
    // time includes compiling it.
    crate::worker::worker_binary();
    let Some(mut c) = Chaos::new("F16 racing XGROUP CREATE", backend, "aof-always", &[]).await
    else {
        return;
    };
    let processes = 8usize;
    let n = tier.pick(2_000, 50_000);
    let secs = tier.pick(4, 60);
    c.start_sampler();
    // The producer starts first, on a stream nobody created.
    let producing = c.start_producing(n, Duration::from_secs(secs)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let groups_before = match c.redis.cmd(&["EXISTS", &c.stream]) {
        redis::Value::Int(1) => match c.redis.cmd(&["XINFO", "GROUPS", &c.stream]) {
            redis::Value::Array(g) => g.len(),
            _ => 0,
        },
        _ => 0,
    };
    assert_eq!(
        groups_before, 0,
        "the group must not exist before the workers start"
    );
    let xlen_before = match c.redis.cmd(&["XLEN", &c.stream]) {
        redis::Value::Int(n) => n as u64,
        _ => 0,
    };
    // 8 processes × 1 member, started together, nobody waits for anybody.
    c.fault();
    let spawned = Instant::now();
    for i in 0..processes {
        c.spawn_worker(&format!("f16-{i}"), 1, false).await;
    }
    let mut startup = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending: Vec<usize> = (0..processes).collect();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for i in pending {
            if c.workers[i].started() {
                startup.push(spawned.elapsed());
            } else if !c.workers[i].alive() {
                let instance = c.workers[i].instance.clone();
                let error = c.workers[i].events("error");
                panic!(
                    "worker {instance} exited during start-up (seed {}): {error:?}\n{}",
                    c.seed,
                    crate::worker::Worker::log_tail(&c.log_dir, &instance, 20)
                );
            } else {
                still.push(i);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        pending.is_empty(),
        "workers {pending:?} did not start within 60 s (seed {})",
        c.seed
    );
    startup.sort();
    let (creates, failed_creates) = xgroup_create_stats(&c);
    let history = producing.await.expect("producer task");
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let consumers = c.consumers().await;
    let alive = c.workers.iter_mut().all(|w| w.alive());
    let errors: usize = c.workers.iter().map(|w| w.events("error").len()).sum();
    let before_group = history
        .records
        .iter()
        .filter(|r| r.returned <= spawned && r.outcome == Outcome::Ok)
        .count();
    let note = format!(
        "{processes} processes × 1 member started at once; start-up p50 {:.2}s, max {:.2}s; \
         XGROUP CREATE calls {creates}, BUSYGROUP {failed_creates}; \
         {before_group} events ({xlen_before} entries) published before the group existed; consumers {}",
        startup[startup.len() / 2].as_secs_f64(),
        startup.last().copied().unwrap_or_default().as_secs_f64(),
        consumers.len()
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    assert!(alive, "a worker exited (seed {})", c.seed);
    assert_eq!(errors, 0, "a worker reported an error (seed {})", c.seed);
    assert!(
        before_group > 0 && xlen_before > 0,
        "nothing was published before the group existed: the race was not tested"
    );
    // Every process tried to create the group; one won, the others got
    // BUSYGROUP and went on.
    assert_eq!(creates, processes as u64, "XGROUP CREATE calls");
    assert_eq!(failed_creates, processes as u64 - 1, "BUSYGROUP replies");
    // lost = 0 covers the events published before the group: none skipped.
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0);
    assert_eq!(
        history.count(Outcome::Ok),
        history.records.len(),
        "a publish failed"
    );
    assert_eq!(consumers.len(), processes, "{consumers:?}");
    c.shutdown().await;
}

scenario_tests! {
    f16_group_create_race_sqlite => f16(Backend::Sqlite, Tier::from_env());
    f16_group_create_race_pg => f16(Backend::Postgres, Tier::from_env());
}

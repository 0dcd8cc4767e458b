//! The soak tier's long run: kill loops for `SOAK_MINUTES` (60 unless set)
//! on one database, while the producer publishes `SOAK_RATE` events a
//! second (100 unless set). 3 workers × 2 members with stable names; every
//! 200–800 ms a random worker is SIGKILLed and restarted (F01), every 20th
//! fault is a SIGTERM that must end in a clean exit instead (F24), and every
//! `SOAK_REDIS_EVERY_S` seconds (300 unless set) redis-server itself is
//! killed -9 and restarted on its AOF (F05). Pass: I1–I3, no dead letters,
//! every SIGTERM clean, no more consumers than members.
//!
//! The two tests do not take the suite's lock, so that both databases soak
//! at once; run them alone:
//!
//! ```text
//! SOAK_MINUTES=60 cargo test --release --features failpoints --test chaos -- --ignored soak_hour --test-threads 2
//! ```

use std::time::{Duration, Instant};

use rand::Rng;

use crate::db::Backend;
use crate::harness::Chaos;
use crate::redis_server::Stop;
use crate::worker::Worker;

const WORKERS: usize = 3;
const MEMBERS: usize = 2;

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run(backend: Backend) {
    let minutes = env_u64("SOAK_MINUTES", 60);
    let rate = env_u64("SOAK_RATE", 100);
    let redis_every = Duration::from_secs(env_u64("SOAK_REDIS_EVERY_S", 300));
    let Some(mut c) = Chaos::new("SOAK kill loops", backend, "aof-always", &[]).await else {
        return;
    };
    let length = Duration::from_secs(minutes * 60);
    let n = usize::try_from(rate * minutes * 60).expect("event count");
    for name in ["a", "b", "c"].iter().take(WORKERS) {
        c.spawn_worker(&format!("soak-{name}"), MEMBERS, true).await;
    }
    c.start_sampler();
    let producing = c.start_producing(n, length).await;
    let (mut kills, mut terms, mut unclean, mut redis_kills) = (0u32, 0u32, 0u32, 0u32);
    // Workers that exited by themselves: a start-up that met a Redis
    // restart fails with that error (exit 1) instead of waiting.
    let mut startup_exits = 0u32;
    let mut stop_times = Vec::new();
    let started = Instant::now();
    let mut last_redis_kill = Instant::now();
    let mut last_report = Instant::now();
    while started.elapsed() < length {
        let pause = c.jitter_ms(200, 800);
        tokio::time::sleep(pause).await;
        if last_redis_kill.elapsed() >= redis_every {
            c.fault();
            c.redis.restart(Stop::Kill9);
            redis_kills += 1;
            last_redis_kill = Instant::now();
            continue;
        }
        let i = c.rng.random_range(0..WORKERS);
        c.sample_rss_now();
        c.fault();
        if (kills + terms) % 20 == 19 {
            // A worker whose start-up met the Redis restart exited with
            // that error: restart it, as a process supervisor would.
            if !c.workers[i].alive() {
                startup_exits += 1;
                c.respawn(i, MEMBERS, false).await;
            }
            // A SIGTERM before the signal handler is installed ends the
            // process by the default action: stop a running worker.
            assert!(
                c.workers[i].wait_started(Duration::from_secs(30)).await,
                "a worker did not restart (seed {}): {}",
                c.seed,
                Worker::log_tail(&c.log_dir, &c.workers[i].instance, 20)
            );
            let (took, clean) = c.workers[i].terminate(Duration::from_secs(15)).await;
            stop_times.push(took);
            terms += 1;
            if !clean {
                unclean += 1;
                let instance = c.workers[i].instance.clone();
                eprintln!(
                    "unclean stop of {instance}:\n{}",
                    Worker::log_tail(&c.log_dir, &instance, 20)
                );
            }
        } else {
            c.workers[i].kill9();
            kills += 1;
        }
        c.respawn(i, MEMBERS, false).await;
        if last_report.elapsed() >= Duration::from_secs(60) {
            c.phase(&format!(
                "{kills} SIGKILLs, {terms} SIGTERMs, {redis_kills} redis kills"
            ));
            last_report = Instant::now();
        }
    }
    c.phase("faults done");
    let history = producing.await.expect("producer task");
    for i in 0..WORKERS {
        if !c.workers[i].alive() {
            startup_exits += 1;
            c.respawn(i, MEMBERS, false).await;
        }
        assert!(
            c.workers[i].wait_started(Duration::from_secs(30)).await,
            "a restarted worker did not start (seed {})",
            c.seed
        );
    }
    let drain = c.wait_drained(Duration::from_secs(120)).await;
    let consumers = c.consumers().await;
    stop_times.sort();
    let p99 = stop_times
        .get((stop_times.len() * 99 / 100).min(stop_times.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    let unknown = history.count(crate::workload::Outcome::Unknown);
    let note = format!(
        "{minutes} min; {kills} SIGKILLs, {terms} SIGTERMs (unclean {unclean}, stop p99 {:.2}s), \
         {redis_kills} redis kill -9 ({startup_exits} start-ups failed on it and were restarted); \
         publishes unknown {unknown}, max publish latency {:.1}s; consumers at end {}",
        p99.as_secs_f64(),
        history.max_latency.as_secs_f64(),
        consumers.len()
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "dead letters: {:?}", v.dead_lettered);
    assert_eq!(
        unclean, 0,
        "a SIGTERM did not end cleanly (seed {})",
        c.seed
    );
    assert!(
        consumers.len() <= WORKERS * MEMBERS,
        "consumers beyond the members: {consumers:?}"
    );
    c.shutdown().await;
}

scenario_tests! {
    #[ignore = "soak tier: an hour of kill loops"] soak_hour_sqlite => run(Backend::Sqlite);
    #[ignore = "soak tier: an hour of kill loops"] soak_hour_pg => run(Backend::Postgres);
}

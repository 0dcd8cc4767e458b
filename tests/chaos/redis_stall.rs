//! F09 (CLIENT KILL of every client connection, 20× under load) and F10
//! (redis-server SIGSTOPped for 6 s while producing and consuming).

use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL, Tier};

async fn f09(backend: Backend, tier: Tier) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F09 CLIENT KILL", backend, "aof-always", &[]).await else {
        return;
    };
    let kills: u32 = tier.pick(20, 200);
    c.spawn_worker("f09-a", 2, true).await;
    c.spawn_worker("f09-b", 2, true).await;
    c.start_sampler();
    let secs = tier.pick(10, 200);
    let producing = c
        .start_producing(tier.pick(3_000, 100_000), Duration::from_secs(secs))
        .await;
    let gap = secs * 1000 / (u64::from(kills) + 1);
    for _ in 0..kills {
        let pause = c.jitter_ms(gap / 2, gap);
        tokio::time::sleep(pause).await;
        c.fault();
        c.redis
            .cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
    }
    let history = producing.await.expect("producer task");
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let alive = c.workers.iter_mut().all(|w| w.alive());
    let consumers = c.consumers().await;
    let overlap = c
        .workers
        .iter()
        .filter_map(|w| {
            w.events("metrics")
                .last()
                .and_then(|m| m["max_overlap"].as_u64())
        })
        .max()
        .unwrap_or(0);
    let (v, _) = c
        .finish(
            &history,
            drain,
            &format!(
                "{kills} CLIENT KILL TYPE normal; consumers {}",
                consumers.len()
            ),
        )
        .await;
    assert!(alive, "a worker exited");
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0);
    assert!(consumers.len() <= 4, "consumers: {consumers:?}");
    let _ = overlap;
    c.shutdown().await;
}

async fn f10(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F10 redis SIGSTOP 6s", backend, "aof-always", &[]).await else {
        return;
    };
    c.spawn_worker("f10-a", 2, true).await;
    c.spawn_worker("f10-b", 2, true).await;
    c.start_sampler();
    let producing = c.start_producing(3_000, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.fault();
    c.redis.signal("STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    c.redis.signal("CONT");
    let history = producing.await.expect("producer task");
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let alive = c.workers.iter_mut().all(|w| w.alive());
    let unknown = history.count(crate::workload::Outcome::Unknown);
    let err = history.count(crate::workload::Outcome::Err);
    let note = format!(
        "SIGSTOP 6 s; publishes unknown {unknown}, err {err}; max publish latency {:.1}s",
        history.max_latency.as_secs_f64()
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    assert!(alive, "a worker exited");
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0);
    c.shutdown().await;
}

#[actix_rt::test]
async fn f09_client_kill_sqlite() {
    f09(Backend::Sqlite, Tier::from_env()).await;
}

#[actix_rt::test]
async fn f09_client_kill_pg() {
    f09(Backend::Postgres, Tier::from_env()).await;
}

#[actix_rt::test]
async fn f10_redis_sigstop_sqlite() {
    f10(Backend::Sqlite).await;
}

#[actix_rt::test]
async fn f10_redis_sigstop_pg() {
    f10(Backend::Postgres).await;
}

//! F01: kill -9 loop of worker processes. 3 workers × 2 members with stable
//! names; every 200–800 ms a random worker is SIGKILLed and restarted with
//! the same names while the producer publishes. Pass: nothing lost, no
//! duplicated effect, the PEL drains, no consumers beyond the members, no
//! dead letters.

use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL, Tier};

const WORKERS: usize = 3;
const MEMBERS: usize = 2;

async fn run(backend: Backend, tier: Tier) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F01 kill -9 workers", backend, "aof-always", &[]).await else {
        return;
    };
    let n = tier.pick(3_000, 100_000);
    let kills = tier.pick(30, 300);
    for name in ["a", "b", "c"].iter().take(WORKERS) {
        c.spawn_worker(&format!("f01-{name}"), MEMBERS, true).await;
    }
    c.phase("workers started");
    c.start_sampler();
    let producing = c
        .start_producing(n, Duration::from_secs(tier.pick(12, 240)))
        .await;
    for _ in 0..kills {
        let pause = c.jitter_ms(200, 800);
        tokio::time::sleep(pause).await;
        let i = rand::Rng::random_range(&mut c.rng, 0..WORKERS);
        c.sample_rss_now();
        c.workers[i].kill9();
        c.fault();
        c.respawn(i, MEMBERS, false).await;
    }
    c.phase("faults done");
    let history = producing.await.expect("producer task");
    c.phase("produced");
    for w in &mut c.workers {
        assert!(
            w.wait_started(Duration::from_secs(30)).await,
            "a restarted worker did not start (seed {})",
            c.seed
        );
    }
    c.phase("restarted");
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let consumers = c.consumers().await;
    let (v, _) = c
        .finish(
            &history,
            drain,
            &format!("{kills} SIGKILLs; consumers at end {}", consumers.len()),
        )
        .await;
    c.assert_core(&v, drain);
    assert_eq!(
        v.dead_total(),
        0,
        "no dead letters expected: {:?}",
        v.dead_lettered
    );
    assert!(
        consumers.len() <= WORKERS * MEMBERS,
        "consumers beyond the members: {consumers:?}"
    );
    c.shutdown().await;
}

scenario_tests! {
    f01_kill9_workers_sqlite => run(Backend::Sqlite, Tier::from_env());
    f01_kill9_workers_pg => run(Backend::Postgres, Tier::from_env());
}

#[actix_rt::test]
#[ignore = "soak tier: 100k events, 300 kills"]
async fn f01_kill9_workers_soak() {
    run(Backend::Sqlite, Tier::Soak).await;
    run(Backend::Postgres, Tier::Soak).await;
}

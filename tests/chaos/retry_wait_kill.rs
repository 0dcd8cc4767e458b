//! A worker killed (SIGKILL) while entries wait for their retry: the delays
//! are durable, so the entries are retried by the next worker — not lost,
//! not retried early by more than the reclaim interval, and their attempt
//! counts go on from where they were.

use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};

/// Events whose seq is in the failing share fail this many first attempts.
const FAIL_FIRST: u32 = 2;

async fn run(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) =
        Chaos::new("Kill while waiting for a retry", backend, "aof-always", &[]).await
    else {
        return;
    };
    let n = c.tier.pick(500, 5_000);
    c.set_env("CHAOS_FAIL_PCT", 20);
    c.set_env("CHAOS_FAIL_FIRST", FAIL_FIRST);
    // Long enough that the kill lands while retries wait.
    c.set_env("REDSTREAM__RETRY__INITIAL_DELAY_MS", 2_000);
    c.set_env("REDSTREAM__RETRY__MAX_DELAY_MS", 4_000);
    c.set_env("REDSTREAM__RETRY__JITTER", 0.0);
    c.set_env("REDSTREAM__RETRY__MAX_ATTEMPTS", 5);
    c.spawn_worker("retry-kill", 2, true).await;
    c.start_sampler();
    let history = c
        .start_producing(n, Duration::from_secs(2))
        .await
        .await
        .expect("producer");
    // Everything read once; the failing share now waits ~2 s for its retry.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    c.workers[0].kill9();
    c.fault();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.respawn(0, 2, true).await;
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let (v, _) = c
        .finish(
            &history,
            drain,
            "SIGKILL while 20 % of events waited for a retry",
        )
        .await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "no dead letters: {:?}", v.dead_lettered);
    let failing: Vec<i64> = v
        .attempts
        .iter()
        .filter(|(_, a)| **a > 1)
        .map(|(s, _)| *s)
        .collect();
    assert!(!failing.is_empty(), "some events were retried");
    assert!(
        v.attempts
            .values()
            .all(|a| *a == 1 || *a == u64::from(FAIL_FIRST) + 1),
        "each failing event committed at attempt {}: the count survived the kill (seed {}): {:?}",
        FAIL_FIRST + 1,
        c.seed,
        v.attempts.values().filter(|a| **a != 1).collect::<Vec<_>>()
    );
    c.shutdown().await;
}

scenario_tests! {
    kill_while_waiting_for_retry_sqlite => run(Backend::Sqlite);
    kill_while_waiting_for_retry_pg => run(Backend::Postgres);
}

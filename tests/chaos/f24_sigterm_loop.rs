//! F24: SIGTERM restart loop under load. Each stop must be graceful (exit
//! 0, within the shutdown deadline), and a clean restart must not see acked
//! events again.

use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL, Tier};
use crate::worker::Worker;

async fn run(backend: Backend, tier: Tier) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F24 SIGTERM loop", backend, "aof-always", &[]).await else {
        return;
    };
    let n = tier.pick(3_000, 100_000);
    let stops = tier.pick(30, 300);
    for name in ["a", "b", "c"] {
        c.spawn_worker(&format!("f24-{name}"), 2, true).await;
    }
    c.start_sampler();
    let producing = c
        .start_producing(n, Duration::from_secs(tier.pick(12, 240)))
        .await;
    let mut stop_times = Vec::new();
    let mut unclean = 0;
    let mut redelivered_after_clean = 0u64;
    for _ in 0..stops {
        let pause = c.jitter_ms(100, 500);
        tokio::time::sleep(pause).await;
        let i = rand::Rng::random_range(&mut c.rng, 0..3);
        // A SIGTERM that lands before the worker installed its signal
        // handler (while it connects and migrates) ends it by the default
        // action; the stop under test is that of a running worker.
        assert!(
            c.workers[i].wait_started(Duration::from_secs(30)).await,
            "worker did not restart (seed {})",
            c.seed
        );
        c.sample_rss_now();
        c.fault();
        let (took, clean) = c.workers[i].terminate(Duration::from_secs(15)).await;
        stop_times.push(took);
        if !clean {
            unclean += 1;
            let instance = c.workers[i].instance.clone();
            eprintln!(
                "unclean stop of {instance}, exit {:?}:\n{}",
                c.workers[i].exit_code(),
                Worker::log_tail(&c.log_dir, &instance, 20)
            );
        }
        redelivered_after_clean += c.workers[i]
            .events("metrics")
            .last()
            .and_then(|m| m["duplicates"].as_u64())
            .unwrap_or(0);
        c.respawn(i, 2, false).await;
    }
    let history = producing.await.expect("producer task");
    for w in &mut c.workers {
        assert!(w.wait_started(Duration::from_secs(30)).await);
    }
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    stop_times.sort();
    let p99 = stop_times[(stop_times.len() * 99 / 100).min(stop_times.len() - 1)];
    let note = format!(
        "{stops} SIGTERMs; stop p99 {:.2}s, max {:.2}s; unclean {unclean}; duplicates absorbed {redelivered_after_clean}",
        p99.as_secs_f64(),
        stop_times.last().map(|d| d.as_secs_f64()).unwrap_or(0.0)
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0);
    assert_eq!(
        unclean, 0,
        "a SIGTERM did not end in a clean exit (seed {})",
        c.seed
    );
    assert!(
        p99 < Duration::from_secs(10),
        "stops took too long: p99 {p99:?} (deadline 5 s)"
    );
    c.shutdown().await;
}

scenario_tests! {
    f24_sigterm_loop_sqlite => run(Backend::Sqlite, Tier::from_env());
    f24_sigterm_loop_pg => run(Backend::Postgres, Tier::from_env());
}

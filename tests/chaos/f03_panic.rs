//! F03: a handler that panics on one event, every attempt. The process
//! stays alive, the event is dead-lettered with reason `panic…` after
//! `max_attempts`, every other event is effected once.

use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};

const POISON: i64 = 137;

async fn run(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F03 handler panic", backend, "aof-always", &[]).await else {
        return;
    };
    c.set_env("CHAOS_PANIC_SEQ", POISON);
    c.set_env("REDSTREAM__RETRY__MAX_ATTEMPTS", 5);
    c.set_env("REDSTREAM__CONSUMER__COUNT", 10);
    c.spawn_worker("f03", 2, true).await;
    c.start_sampler();
    let producing = c.start_producing(1_000, Duration::from_secs(3)).await;
    let history = producing.await.expect("producer task");
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let alive = c.workers[0].alive();
    let restarts = c.workers[0]
        .events("metrics")
        .last()
        .and_then(|m| m["restarts"].as_u64())
        .unwrap_or(0);
    let (v, _) = c
        .finish(&history, drain, &format!("member restarts {restarts}"))
        .await;
    assert!(alive, "the worker died of a handler panic (I5)");
    c.assert_core(&v, drain);
    let poison = history
        .records
        .iter()
        .find(|r| r.seq == POISON)
        .expect("poison published");
    let (reason, attempts) = v
        .dead_letters
        .get(&poison.id)
        .cloned()
        .expect("the poison event is dead-lettered");
    // The reason code is `max_attempts_exceeded`; the last error names the panic.
    assert!(reason.contains("panic"), "reason and last error: {reason}");
    assert_eq!(attempts, 5, "attempts recorded in the dead letter");
    assert_eq!(
        v.dead_total(),
        1,
        "only the poison event: {:?}",
        v.dead_lettered
    );
    assert_eq!(v.effected_once, history.records.len() - 1);
    assert!(restarts <= 5, "member restarts {restarts}");
    c.shutdown().await;
}

scenario_tests! {
    f03_handler_panic_sqlite => run(Backend::Sqlite);
    f03_handler_panic_pg => run(Backend::Postgres);
}

//! F21 (b): a second process started with member names already held by a
//! live process is refused (the member lease), and the first keeps going.

use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};

#[actix_rt::test]
async fn f21_second_process_same_names_refused() {
    let _serial = SERIAL.lock().await;
    let Some(mut c) =
        Chaos::new("F21 same names refused", Backend::Sqlite, "aof-always", &[]).await
    else {
        return;
    };
    c.spawn_worker("f21", 2, true).await;
    c.start_sampler();
    c.set_env("REDSTREAM__RECLAIM__LEASE_WAIT_MS", 1_500);
    c.fault();
    let second = c.spawn_worker("f21", 2, false).await;
    let start = std::time::Instant::now();
    while c.workers[second].alive() && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let code = c.workers[second].exit_code();
    let error = c.workers[second]
        .events("error")
        .first()
        .and_then(|e| e["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let producing = c.start_producing(500, Duration::from_secs(2)).await;
    let history = producing.await.expect("producer task");
    let drain = c.wait_drained(Duration::from_secs(30)).await;
    let consumers = c.consumers().await;
    let (v, _) = c
        .finish(
            &history,
            drain,
            &format!(
                "second process exit {code:?}; consumers {}",
                consumers.len()
            ),
        )
        .await;
    assert_eq!(code, Some(1), "the second process must refuse: {error}");
    assert!(error.contains("held by another live process"), "{error}");
    assert!(c.workers[0].alive(), "the first process keeps running");
    c.assert_core(&v, drain);
    assert_eq!(consumers.len(), 2, "{consumers:?}");
    c.shutdown().await;
}

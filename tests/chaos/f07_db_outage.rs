//! F07: a PostgreSQL outage under load, through the chaos proxy between the
//! worker and the database: a blackhole (connections hang, nothing answers),
//! then resets of every connection, then the database is back. Pass: nothing
//! acked without a commit, no attempt spent on the outage (no dead letters,
//! every event commits at its first attempt), nothing lost or done twice,
//! and processing resumes.

use std::time::{Duration, Instant};

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};
use crate::proxy::{Mode, Proxy};

async fn run() {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new(
        "F07 DB outage (proxy)",
        Backend::Postgres,
        "aof-always",
        &[],
    )
    .await
    else {
        return;
    };
    let n = c.tier.pick(3_000, 50_000);
    let url = c.db.settings.url.expose().to_owned();
    let proxy = Proxy::start(5432).await;
    let proxied = url.replacen(":5432/", &format!(":{}/", proxy.port), 1);
    assert_ne!(proxied, url, "the database URL names port 5432: {url}");
    c.set_env("DATABASE_URL", proxied);
    c.set_env("REDSTREAM__DATABASE__ACQUIRE_TIMEOUT_MS", 1_000);
    c.spawn_worker("f07", 2, true).await;
    c.start_sampler();
    let producing = c.start_producing(n, Duration::from_secs(12)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let outage = Instant::now();
    proxy.set(Mode::Blackhole);
    c.fault();
    tokio::time::sleep(Duration::from_secs(c.tier.pick(5, 20))).await;
    // Hanging connections are reset, a few times, before the database
    // comes back.
    for _ in 0..3 {
        proxy.set(Mode::Reset);
        c.fault();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    proxy.set(Mode::Pass);
    let back = Instant::now();
    let effects_at_return = crate::ledger::effect_rows(&c.conn).await;
    // Time from the database's return to the first new effect.
    while crate::ledger::effect_rows(&c.conn).await <= effects_at_return
        && back.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = back.elapsed();

    let history = producing.await.expect("producer");
    let drain = c.wait_drained(Duration::from_secs(90)).await;
    let (v, _) = c
        .finish(
            &history,
            drain,
            &format!(
                "blackhole {:.0}s then 3 resets; resumed {:.2}s after the database returned; {} connections through the proxy",
                (back - outage).as_secs_f64(),
                resumed.as_secs_f64(),
                proxy.accepted()
            ),
        )
        .await;
    c.assert_core(&v, drain);
    assert_eq!(
        v.dead_total(),
        0,
        "the outage spent no attempts: {:?}",
        v.dead_lettered
    );
    assert!(
        v.attempts.values().all(|a| *a == 1),
        "every event committed at its first attempt (seed {})",
        c.seed
    );
    c.shutdown().await;
}

#[actix_rt::test]
async fn f07_postgres_outage_through_proxy() {
    run().await;
}

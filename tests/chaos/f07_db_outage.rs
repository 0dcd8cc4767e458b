//! F07: a database outage under load. Pass: nothing acked without a commit,
//! no attempt spent on the outage (no dead letters, every event commits at
//! its first attempt), nothing lost or done twice, and processing resumes.
//!
//! - PostgreSQL through the chaos proxy: a blackhole (connections hang,
//!   nothing answers), then resets of every connection, then the database is
//!   back.
//! - PostgreSQL, a blackhole that ends without a reset: the connections that
//!   hung stay hung, so only `database.batch_timeout_ms` frees the batch
//!   that waits on one.
//! - SQLite: a second connection holds `BEGIN EXCLUSIVE`.

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, TransactionTrait};

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};
use crate::proxy::{Mode, Proxy};

/// How the database goes away.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outage {
    /// PostgreSQL blackholed, then every connection reset 3×.
    BlackholeThenResets,
    /// PostgreSQL blackholed, then back, with no reset.
    BlackholeOnly,
    /// SQLite's write lock held by another connection.
    ExclusiveLock,
}

async fn run(outage: Outage) {
    let _serial = SERIAL.lock().await;
    let (name, backend) = match outage {
        Outage::BlackholeThenResets => ("F07 DB outage (proxy)", Backend::Postgres),
        Outage::BlackholeOnly => ("F07 DB blackhole, no reset", Backend::Postgres),
        Outage::ExclusiveLock => ("F07 DB locked (BEGIN EXCLUSIVE)", Backend::Sqlite),
    };
    let Some(mut c) = Chaos::new(name, backend, "aof-always", &[]).await else {
        return;
    };
    let n = c.tier.pick(3_000, 50_000);
    let proxy = match outage {
        Outage::ExclusiveLock => None,
        _ => {
            let url = c.db.settings.url.expose().to_owned();
            let proxy = Proxy::start(5432).await;
            let proxied = url.replacen(":5432/", &format!(":{}/", proxy.port), 1);
            assert_ne!(proxied, url, "the database URL names port 5432: {url}");
            c.set_env("DATABASE_URL", proxied);
            c.set_env("REDSTREAM__DATABASE__ACQUIRE_TIMEOUT_MS", 1_000);
            c.set_env("REDSTREAM__DATABASE__BATCH_TIMEOUT_MS", 2_000);
            if outage == Outage::BlackholeOnly {
                // Members sit in a transaction most of the time, so the
                // blackhole catches batches between statements.
                c.set_env("CHAOS_SLEEP_MS", 5);
            }
            Some(proxy)
        }
    };
    c.spawn_worker("f07", 2, true).await;
    c.start_sampler();
    let producing = c.start_producing(n, Duration::from_secs(12)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let down_for = Duration::from_secs(c.tier.pick(6, 20));
    let detail = match (outage, &proxy) {
        (Outage::ExclusiveLock, _) => {
            let lock = c
                .conn
                .begin_with_options(sea_orm::TransactionOptions {
                    sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Exclusive),
                    ..Default::default()
                })
                .await
                .expect("BEGIN EXCLUSIVE");
            // A read inside it proves the lock is held, not merely asked for.
            lock.execute_unprepared("SELECT COUNT(*) FROM effects_log")
                .await
                .expect("read under the lock");
            c.fault();
            tokio::time::sleep(down_for).await;
            lock.rollback().await.expect("release the lock");
            format!("BEGIN EXCLUSIVE held {:.0}s", down_for.as_secs_f64())
        }
        (_, Some(proxy)) => {
            proxy.set(Mode::Blackhole);
            c.fault();
            c.phase("blackhole");
            tokio::time::sleep(down_for).await;
            let blackhole = format!("blackhole {:.0}s", down_for.as_secs_f64());
            let detail = if outage == Outage::BlackholeThenResets {
                // Hanging connections are reset, a few times, before the
                // database comes back.
                for _ in 0..3 {
                    proxy.set(Mode::Reset);
                    c.fault();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                format!("{blackhole} then 3 resets")
            } else {
                format!("{blackhole}, no reset (hung connections stay hung)")
            };
            proxy.set(Mode::Pass);
            detail
        }
        (_, None) => unreachable!("a proxy for every PostgreSQL outage"),
    };
    let back = Instant::now();
    c.phase("the database is back");
    let effects_at_return = crate::ledger::effect_rows(&c.conn).await;
    // Time from the database's return to the first new effect.
    while crate::ledger::effect_rows(&c.conn).await <= effects_at_return
        && back.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = back.elapsed();
    c.phase("processing resumed");

    let history = producing.await.expect("producer");
    c.phase("producer done");
    let drain = c.wait_drained(Duration::from_secs(90)).await;
    let retried_batches = c.workers[0]
        .events("metrics")
        .last()
        .and_then(|m| m["db_retried_batches"].as_u64())
        .unwrap_or(0);
    let mut note = format!(
        "{detail}; resumed {:.2}s after the database returned; batches rerun {retried_batches}",
        resumed.as_secs_f64()
    );
    if let Some(proxy) = &proxy {
        note.push_str(&format!(
            "; {} connections through the proxy",
            proxy.accepted()
        ));
    }
    let (v, _) = c.finish(&history, drain, &note).await;
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
    assert!(
        resumed < Duration::from_secs(30),
        "processing resumed {resumed:?} after the database returned"
    );
    c.shutdown().await;
}

scenario_tests! {
    f07_postgres_outage_through_proxy => run(Outage::BlackholeThenResets);
    f07_postgres_blackhole_without_reset => run(Outage::BlackholeOnly);
    f07_sqlite_exclusive_lock => run(Outage::ExclusiveLock);
}

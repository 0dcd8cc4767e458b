//! F08: ambiguous commits on PostgreSQL. (a) `pg_terminate_backend` of the
//! worker's connections while their handlers sleep inside the transaction;
//! (c) the chaos proxy cuts a connection right after it forwarded `COMMIT`,
//! so the server may have committed and the worker never hears. ((b), the
//! crash between commit and ack, is F02's `handler.after_commit_before_ack`.)
//!
//! Pass: one effect per event (a batch whose commit did hold is absorbed by
//! `processed_events` when it runs again), nothing lost, no dead letter, and
//! every event commits at its first attempt: a lost connection spends no
//! attempt.

use std::time::Duration;

use sea_orm::ConnectionTrait;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};
use crate::proxy::{Mode, Proxy};

/// How the commit is made ambiguous.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// `pg_terminate_backend` of backends idle in a transaction.
    TerminateBackend,
    /// The proxy cuts the connection after forwarding `COMMIT`.
    SeverAfterCommit,
}

async fn run(cut: Cut) {
    let _serial = SERIAL.lock().await;
    let name = match cut {
        Cut::TerminateBackend => "F08a pg_terminate_backend",
        Cut::SeverAfterCommit => "F08c commit severed",
    };
    let Some(mut c) = Chaos::new(name, Backend::Postgres, "aof-always", &[]).await else {
        return;
    };
    let n = c.tier.pick(3_000, 50_000);
    let faults = c.tier.pick(10, 100);
    // Handlers sleep inside the transaction, so a fault finds batches open.
    c.set_env("CHAOS_SLEEP_MS", 2);
    let proxy = match cut {
        Cut::TerminateBackend => None,
        Cut::SeverAfterCommit => {
            let url = c.db.settings.url.expose().to_owned();
            let proxy = Proxy::start(5432).await;
            let proxied = url.replacen(":5432/", &format!(":{}/", proxy.port), 1);
            assert_ne!(proxied, url, "the database URL names port 5432: {url}");
            // In clear text, so the proxy can see `COMMIT` go by.
            let sep = if proxied.contains('?') { '&' } else { '?' };
            c.set_env("DATABASE_URL", format!("{proxied}{sep}sslmode=disable"));
            Some(proxy)
        }
    };
    c.spawn_worker("f08", 2, true).await;
    c.start_sampler();
    let producing = c
        .start_producing(n, Duration::from_secs(c.tier.pick(12, 120)))
        .await;
    let mut struck = 0u64;
    for _ in 0..faults {
        let pause = c.jitter_ms(300, 800);
        tokio::time::sleep(pause).await;
        c.fault();
        match (&proxy, cut) {
            (None, _) => {
                let rows = c
                    .conn
                    .query_all_raw(sea_orm::Statement::from_string(
                        c.conn.get_database_backend(),
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid() \
                         AND state IN ('idle in transaction', 'active')",
                    ))
                    .await
                    .expect("pg_terminate_backend");
                struck += rows.len() as u64;
            }
            (Some(proxy), _) => {
                let before = proxy.severed();
                proxy.set(Mode::SeverOn(b"COMMIT"));
                let waited = std::time::Instant::now();
                while proxy.severed() == before && waited.elapsed() < Duration::from_secs(5) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                proxy.set(Mode::Pass);
                struck = proxy.severed();
            }
        }
    }
    let history = producing.await.expect("producer");
    let drain = c.wait_drained(Duration::from_secs(90)).await;
    let metrics = c.workers[0].events("metrics");
    let last = metrics.last();
    let absorbed = last.and_then(|m| m["duplicates"].as_u64()).unwrap_or(0);
    let reruns = last
        .and_then(|m| m["db_retried_batches"].as_u64())
        .unwrap_or(0);
    let what = match cut {
        Cut::TerminateBackend => "backends terminated",
        Cut::SeverAfterCommit => "connections cut after COMMIT",
    };
    let note = format!(
        "{struck} {what} in {faults} strikes; batches rerun {reruns}; redeliveries absorbed {absorbed}"
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    c.assert_core(&v, drain);
    assert!(struck > 0, "no fault struck a connection (seed {})", c.seed);
    assert_eq!(v.dead_total(), 0, "{:?}", v.dead_lettered);
    assert!(
        v.attempts.values().all(|a| *a == 1),
        "every event committed at its first attempt (seed {})",
        c.seed
    );
    c.shutdown().await;
}

scenario_tests! {
    f08a_terminate_backend_mid_transaction_pg => run(Cut::TerminateBackend);
    f08c_commit_severed_pg => run(Cut::SeverAfterCommit);
}

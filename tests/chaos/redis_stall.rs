//! F09 (CLIENT KILL of every client connection, 20× under load) and F10
//! (redis-server stalled for 6 s while producing and consuming: SIGSTOP,
//! `DEBUG SLEEP 6` or `CLIENT PAUSE 6000 ALL`).

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

/// How F10 stalls redis-server for 6 s.
#[derive(Clone, Copy, Debug)]
enum Stall {
    /// SIGSTOP, then SIGCONT: the process does nothing, the kernel still
    /// accepts connections.
    SigStop,
    /// `DEBUG SLEEP 6`: the event loop blocks inside a command.
    DebugSleep,
    /// `CLIENT PAUSE 6000 ALL`: every client's commands wait; the server
    /// itself keeps running.
    ClientPause,
}

impl Stall {
    fn scenario(self) -> &'static str {
        match self {
            Stall::SigStop => "F10 redis SIGSTOP 6s",
            Stall::DebugSleep => "F10 redis DEBUG SLEEP 6s",
            Stall::ClientPause => "F10 CLIENT PAUSE 6s ALL",
        }
    }

    /// Stalls the server for 6 s; returns once the stall is over.
    async fn apply(self, c: &Chaos) {
        match self {
            Stall::SigStop => {
                c.redis.signal("STOP");
                tokio::time::sleep(Duration::from_secs(6)).await;
                c.redis.signal("CONT");
            }
            Stall::DebugSleep => {
                // The command blocks its caller for the whole stall: run it
                // on a thread so the producer (this runtime) keeps going.
                let url = c.redis.url();
                let sleeper = std::thread::spawn(move || {
                    let client = redis::Client::open(url).expect("url");
                    let mut conn = client
                        .get_connection_with_timeout(Duration::from_secs(2))
                        .expect("connect to test redis");
                    redis::cmd("DEBUG")
                        .arg("SLEEP")
                        .arg(6)
                        .query::<()>(&mut conn)
                        .expect("DEBUG SLEEP 6");
                });
                while !sleeper.is_finished() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                sleeper.join().expect("DEBUG SLEEP thread");
            }
            Stall::ClientPause => {
                c.redis.cmd(&["CLIENT", "PAUSE", "6000", "ALL"]);
                tokio::time::sleep(Duration::from_secs(6)).await;
            }
        }
    }
}

/// Reconnects: the number of clients ever accepted by the test redis
/// (`total_connections_received`).
fn connections_received(c: &Chaos) -> u64 {
    let info = match c.redis.cmd(&["INFO", "stats"]) {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => format!("{other:?}"),
    };
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn f10(backend: Backend, stall: Stall) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new(stall.scenario(), backend, "aof-always", &[]).await else {
        return;
    };
    c.spawn_worker("f10-a", 2, true).await;
    c.spawn_worker("f10-b", 2, true).await;
    c.start_sampler();
    let producing = c.start_producing(3_000, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let conns_before = connections_received(&c);
    c.fault();
    stall.apply(&c).await;
    let history = producing.await.expect("producer task");
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    // Connections made from the stall to the end of the drain (the test's
    // own probes included): a reconnect loop would make thousands.
    let reconnects = connections_received(&c).saturating_sub(conns_before);
    let alive = c.workers.iter_mut().all(|w| w.alive());
    let restarts: u64 = c
        .workers
        .iter()
        .filter_map(|w| {
            w.events("metrics")
                .last()
                .and_then(|m| m["restarts"].as_u64())
        })
        .sum();
    let unknown = history.count(crate::workload::Outcome::Unknown);
    let err = history.count(crate::workload::Outcome::Err);
    let ok = history.count(crate::workload::Outcome::Ok);
    let note = format!(
        "{:?} 6 s; publishes ok {ok}, unknown {unknown}, err {err}; max publish latency {:.1}s; \
         connections during stall+drain {reconnects}; member restarts {restarts}",
        stall,
        history.max_latency.as_secs_f64()
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    assert!(alive, "a worker exited");
    // No publish vanished: each one is recorded as ok, err or unknown.
    assert_eq!(ok + unknown + err, 3_000, "a publish vanished");
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0);
    // No reconnect storm: a handful per member and probe, not a loop.
    assert!(
        reconnects < 400,
        "{reconnects} connections during the stall and drain: a reconnect loop (seed {})",
        c.seed
    );
    assert!(
        restarts <= 20,
        "{restarts} member restarts: a restart loop (seed {})",
        c.seed
    );
    c.shutdown().await;
}

scenario_tests! {
    f09_client_kill_sqlite => f09(Backend::Sqlite, Tier::from_env());
    f09_client_kill_pg => f09(Backend::Postgres, Tier::from_env());
    f10_redis_sigstop_sqlite => f10(Backend::Sqlite, Stall::SigStop);
    f10_redis_sigstop_pg => f10(Backend::Postgres, Stall::SigStop);
    f10_redis_debug_sleep_sqlite => f10(Backend::Sqlite, Stall::DebugSleep);
    f10_redis_debug_sleep_pg => f10(Backend::Postgres, Stall::DebugSleep);
    f10_client_pause_all_sqlite => f10(Backend::Sqlite, Stall::ClientPause);
}

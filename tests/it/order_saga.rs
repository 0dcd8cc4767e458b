//! The order saga example under faults: its `consume` binary killed with
//! SIGKILL at random moments and restarted, and two of them at once; after
//! each, the books must balance (`world::check`): every order final once,
//! money to the cent, stock to the unit, every step's effect there once.
//!
//! `SAGA_TEST_SEED` replays a run (the kill moments and the orders).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait};

use crate::support::db::TestDb;
use crate::support::{TestContext, eventually, on_both_databases};

#[path = "../../examples/order_saga/saga.rs"]
#[allow(dead_code)]
mod saga;
#[path = "../../examples/order_saga/world.rs"]
#[allow(dead_code)]
mod world;

/// Orders per test run.
const KILL_ORDERS: usize = 500;
const TWO_WORKER_ORDERS: usize = 400;

fn seed() -> u64 {
    let seed = std::env::var("SAGA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("order saga test seed {seed} (replay with SAGA_TEST_SEED={seed})");
    seed
}

/// The example binary, built once with this test binary's features (so
/// the library is not built a second time).
fn binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let features: &[&str] = if cfg!(feature = "failpoints") {
                &["--features", "failpoints"]
            } else {
                &[]
            };
            crate::support::examples::build_example("order_saga", features)
        })
        .clone()
}

/// One test's saga deployment: streams under the test's prefix, a fresh
/// database, fast timers, logs in a file per process.
struct Saga {
    ctx: TestContext,
    db: TestDb,
    conn: DatabaseConnection,
    streams: saga::Streams,
    env: Vec<(String, String)>,
    logs: PathBuf,
    spawned: usize,
    orders: usize,
}

/// A child process, killed (SIGKILL) if still running when dropped, so a
/// failed test leaves no worker behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Saga {
    async fn new(db: TestDb, orders: usize) -> Option<Saga> {
        let ctx = TestContext::new()?;
        let prefix = ctx.stream("saga");
        let env = [
            ("REDSTREAM__REDIS__URL", ctx.url.clone()),
            (
                "REDSTREAM__DATABASE__URL",
                db.settings.url.expose().to_owned(),
            ),
            ("REDSTREAM__CONSUMER__BLOCK_MS", "500".into()),
            ("REDSTREAM__CONSUMER__WORKERS", "1".into()),
            ("REDSTREAM__RETRY__INITIAL_DELAY_MS", "100".into()),
            ("REDSTREAM__RETRY__MAX_DELAY_MS", "1000".into()),
            ("REDSTREAM__RECLAIM__LEASE_TTL_MS", "1000".into()),
            ("REDSTREAM__RECLAIM__MIN_IDLE_MS", "2000".into()),
            ("REDSTREAM__RECLAIM__HEARTBEAT_MS", "500".into()),
            ("REDSTREAM__RECLAIM__INTERVAL_MS", "200".into()),
            ("REDSTREAM__RECLAIM__RETRY_POLL_MS", "100".into()),
            ("REDSTREAM__OUTBOX__LEASE_TTL_MS", "1000".into()),
            ("REDSTREAM__SHUTDOWN__DEADLINE_MS", "5000".into()),
            ("SAGA_STREAM_PREFIX", prefix.clone()),
            ("SAGA_MEMBERS", "2".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let store = db.store().await;
        saga::create_tables(store.connection()).await.unwrap();
        let logs = std::env::temp_dir().join("redstream-order-saga");
        std::fs::create_dir_all(&logs).unwrap();
        Some(Saga {
            conn: store.connection().clone(),
            streams: saga::Streams::new(&prefix),
            ctx,
            db,
            env,
            logs,
            spawned: 0,
            orders,
        })
    }

    fn tag(&self) -> &str {
        &self.ctx.prefix[self.ctx.prefix.len() - 6..]
    }

    /// Starts the example with `args` as instance `instance`.
    fn spawn(&mut self, instance: &str, args: &[&str]) -> Proc {
        self.spawned += 1;
        let log = self
            .logs
            .join(format!("{}-{}-{instance}.log", self.tag(), self.spawned));
        let stderr = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary())
            .args(args)
            .envs(self.env.iter().cloned())
            .env(
                "REDSTREAM__INSTANCE__NAME",
                format!("{instance}-{}", self.tag()),
            )
            .env("RUST_LOG", "warn,redstream=warn")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn the example");
        Proc(child)
    }

    async fn produce(&mut self, seed: u64) {
        let seed = seed.to_string();
        let count = self.orders.to_string();
        let mut p = self.spawn("producer", &["produce", "--count", &count, "--seed", &seed]);
        let status = tokio::task::spawn_blocking(move || p.0.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(
            status.success(),
            "produce: {status:?} (logs in {:?})",
            self.logs
        );
        assert_eq!(
            self.ctx.xlen(&self.streams.orders).await,
            self.orders as u64
        );
    }

    async fn steps(&self) -> u64 {
        saga::step::Entity::find()
            .count(&self.conn)
            .await
            .unwrap_or(0)
    }

    async fn done(&self) -> bool {
        world::unfinished(&self.conn, None).await.ok() == Some(0)
            && world::unsent(&self.conn, None, None).await.ok() == Some(0)
    }

    /// Waits until every order is final and relayed, and no step has
    /// anything pending.
    async fn drained(&self, timeout: Duration) {
        eventually(
            timeout,
            "every order final, every event relayed",
            || async {
                if !self.done().await {
                    return false;
                }
                for (stream, group) in self.streams.groups() {
                    if self.ctx.xlen(stream).await > 0 && self.ctx.pending(stream, group).await > 0
                    {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    /// The books balance, every step once, nothing dead-lettered.
    async fn assert_books(&self) -> world::Report {
        let report = world::check(&self.conn, None).await.unwrap();
        report.print();
        assert!(
            report.ok(),
            "{:?}: broken invariants: {:#?}",
            self.db.backend,
            report.problems
        );
        assert_eq!(report.orders, self.orders as u64);
        assert_eq!(report.completed + report.cancelled, self.orders as u64);
        assert_eq!(report.repeats, 0, "a step delivered again found its row");
        assert!(report.completed > 0 && report.cancelled > 0, "{report:?}");
        assert!(report.causes.out_of_stock > 0 && report.causes.no_carrier > 0);
        for (stream, _) in self.streams.groups() {
            assert_eq!(
                self.ctx.xlen(&redstream::dead_letter_stream(stream)).await,
                0,
                "dead letters on {stream}"
            );
        }
        report
    }
}

fn kill(mut child: Proc) {
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
}

async fn terminate(mut child: Proc) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful stop on SIGTERM: {status:?}");
}

async fn killed_at_random_points(db: TestDb) {
    let Some(mut saga) = Saga::new(db, KILL_ORDERS).await else {
        return;
    };
    let started = Instant::now();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    saga.produce(seed).await;
    let mut kills = 0;
    let mut mid_run = 0;
    for _ in 0..4 {
        let before = saga.steps().await;
        let worker = saga.spawn("worker", &["consume"]);
        // Once it is committing steps, kill it a random moment later.
        eventually(
            Duration::from_secs(20),
            "the worker commits steps",
            || async { saga.steps().await > before },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..700))).await;
        if !saga.done().await {
            mid_run += 1;
        }
        kill(worker);
        kills += 1;
        if saga.done().await {
            break;
        }
    }
    assert!(mid_run >= 2, "{mid_run} of {kills} kills came mid-run");
    let worker = saga.spawn("worker", &["consume"]);
    saga.drained(Duration::from_secs(45)).await;
    terminate(worker).await;
    let report = saga.assert_books().await;
    eprintln!(
        "{:?}: {kills} kills ({mid_run} mid-run), {} completed, {} cancelled, in {:.1} s",
        saga.db.backend,
        report.completed,
        report.cancelled,
        started.elapsed().as_secs_f64()
    );
}

on_both_databases!(
    order_saga_killed_at_random_points_balances_after_restart_sqlite,
    order_saga_killed_at_random_points_balances_after_restart_postgres,
    killed_at_random_points
);

async fn two_workers_at_once(db: TestDb) {
    let Some(mut saga) = Saga::new(db, TWO_WORKER_ORDERS).await else {
        return;
    };
    let started = Instant::now();
    let seed = seed();
    saga.produce(seed).await;
    let a = saga.spawn("a", &["consume"]);
    let b = saga.spawn("b", &["consume"]);
    saga.drained(Duration::from_secs(45)).await;
    terminate(a).await;
    terminate(b).await;
    let report = saga.assert_books().await;
    // Both took part.
    let members: Vec<String> = saga::step::Entity::find()
        .all(&saga.conn)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.member)
        .collect();
    for instance in ["a", "b"] {
        let name = format!("{instance}-{}-", saga.tag());
        let n = members.iter().filter(|m| m.starts_with(&name)).count();
        assert!(n > 0, "instance {instance} committed no step");
        eprintln!("instance {instance}: {n} steps");
    }
    // The check is not vacuous: one cent off is found.
    saga.conn
        .execute_unprepared(
            "UPDATE saga_accounts SET balance_cents = balance_cents + 1 \
             WHERE customer_id = (SELECT MIN(customer_id) FROM saga_accounts)",
        )
        .await
        .unwrap();
    let tampered = world::check(&saga.conn, None).await.unwrap();
    assert!(
        tampered.problems.iter().any(|p| p.contains("balance")),
        "{:?}",
        tampered.problems
    );
    eprintln!(
        "{:?}: {} completed, {} cancelled, in {:.1} s",
        saga.db.backend,
        report.completed,
        report.cancelled,
        started.elapsed().as_secs_f64()
    );
}

on_both_databases!(
    order_saga_two_workers_at_once_sqlite,
    order_saga_two_workers_at_once_postgres,
    two_workers_at_once
);

/// `--help` (also after a mode) prints the usage on stdout and exits 0,
/// instead of running the demo; an unknown mode is bad usage (2).
#[test]
fn help_prints_usage_and_exits_0() {
    for args in [&["--help"][..], &["-h"], &["consume", "--help"]] {
        let output = Command::new(binary())
            .args(args)
            .env_remove("RUST_LOG")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
        assert!(stdout.starts_with("usage: order_saga"), "{stdout}");
        assert!(output.stderr.is_empty(), "{output:?}");
    }
    let output = Command::new(binary())
        .arg("bogus")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown mode `bogus`"));
}

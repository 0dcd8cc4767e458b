//! One scenario's world: a test-owned redis-server, a fresh database with the
//! ledger, worker processes, the producer, a sampler (effects over time,
//! worker RSS), drain detection and the result row.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::DatabaseConnection;

use crate::checker::{self, Verdict};
use crate::db::{Backend, TestDb};
use crate::ledger;
use crate::redis_server::RedisServer;
use crate::report::Row;
use crate::worker::{Worker, peak_rss_kb};
use crate::workload::{self, History};

/// Scenarios run one at a time: they measure time and RSS, and spawn
/// processes.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How big a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Small: a few thousand events, tens of faults, under a minute.
    Ci,
    /// `CHAOS_TIER=soak` or the `#[ignore]`d `*_soak` tests: 100k events,
    /// hundreds of faults.
    Soak,
}

impl Tier {
    pub fn from_env() -> Tier {
        match std::env::var("CHAOS_TIER").as_deref() {
            Ok("soak") => Tier::Soak,
            _ => Tier::Ci,
        }
    }

    /// `ci` in CI, `soak` in soak.
    pub fn pick<T>(self, ci: T, soak: T) -> T {
        match self {
            Tier::Ci => ci,
            Tier::Soak => soak,
        }
    }
}

/// The seed: `CHAOS_SEED`, or a random one.
pub fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

pub struct Chaos {
    pub scenario: &'static str,
    pub tier: Tier,
    pub db: TestDb,
    pub db_label: &'static str,
    pub redis: RedisServer,
    pub redis_mode: String,
    pub seed: u64,
    pub rng: StdRng,
    pub stream: String,
    pub group: String,
    pub log_dir: PathBuf,
    pub conn: DatabaseConnection,
    pub worker_env: Vec<(String, String)>,
    pub workers: Vec<Worker>,
    pub faults: u32,
    pub fault_times: Vec<Instant>,
    pub started: Instant,
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    pids: Arc<Mutex<Vec<u32>>>,
    rss: Arc<Mutex<HashMap<u32, u64>>>,
    sampler: Option<tokio::task::JoinHandle<()>>,
    producer: Option<redstream::Processor>,
}

/// Settings every worker gets: short timers so faults heal fast.
fn base_worker_env() -> Vec<(String, String)> {
    [
        ("REDSTREAM__CONSUMER__BLOCK_MS", "500"),
        ("REDSTREAM__CONSUMER__PENDING_CHECK_MS", "200"),
        ("REDSTREAM__CONSUMER__WORKERS", "1"),
        ("REDSTREAM__CONSUMER__COUNT", "50"),
        ("REDSTREAM__RETRY__INITIAL_DELAY_MS", "100"),
        ("REDSTREAM__RETRY__MAX_DELAY_MS", "1000"),
        ("REDSTREAM__RECLAIM__MIN_IDLE_MS", "3000"),
        ("REDSTREAM__RECLAIM__INTERVAL_MS", "500"),
        ("REDSTREAM__RECLAIM__RETRY_POLL_MS", "100"),
        ("REDSTREAM__RECLAIM__HEARTBEAT_MS", "1000"),
        ("REDSTREAM__RECLAIM__LEASE_TTL_MS", "2000"),
        ("REDSTREAM__RECLAIM__LEASE_WAIT_MS", "30000"),
        ("REDSTREAM__SUPERVISION__RESTART_MIN_MS", "50"),
        ("REDSTREAM__SUPERVISION__RESTART_MAX_MS", "1000"),
        ("REDSTREAM__SHUTDOWN__DEADLINE_MS", "5000"),
        ("REDSTREAM__DATABASE__MAX_CONNECTIONS", "4"),
        ("CHAOS_METRICS_MS", "500"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Chaos {
    /// A scenario on `backend` (`None` when PostgreSQL does not answer
    /// outside CI), with a redis-server started with `redis_args`.
    pub async fn new(
        scenario: &'static str,
        backend: Backend,
        redis_mode: &str,
        redis_args: &[&str],
    ) -> Option<Chaos> {
        crate::init_tracing();
        let db = match backend {
            Backend::Sqlite => TestDb::sqlite(),
            Backend::Postgres => TestDb::postgres().await?,
        };
        Some(Chaos::on(scenario, db, redis_mode, redis_args).await)
    }

    /// A scenario on a database the test prepared (e.g. a SQLite file on a
    /// filesystem it mounted).
    pub async fn on(
        scenario: &'static str,
        db: TestDb,
        redis_mode: &str,
        redis_args: &[&str],
    ) -> Chaos {
        crate::init_tracing();
        let db_label = match db.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "pg",
        };
        let seed = seed();
        let tier = Tier::from_env();
        eprintln!(
            "chaos {scenario} on {db_label}, redis {redis_mode}: seed {seed} (replay with CHAOS_SEED={seed})"
        );
        let redis = RedisServer::start_with(redis_args);
        let store = db.store().await;
        let conn = store.connection().clone();
        ledger::create(&conn).await;
        let tag = format!("{}-{db_label}-{seed}", scenario.to_lowercase());
        let log_dir = std::env::temp_dir().join("redstream-chaos").join(&tag);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let stream = format!("chaos:{tag}");
        let group = "ledger".to_owned();
        let mut worker_env = base_worker_env();
        worker_env.extend([
            ("REDIS_URL".to_owned(), redis.url()),
            (
                "DATABASE_URL".to_owned(),
                db.settings.url.expose().to_owned(),
            ),
            ("CHAOS_STREAM".to_owned(), stream.clone()),
            ("CHAOS_GROUP".to_owned(), group.clone()),
        ]);
        Chaos {
            scenario,
            tier,
            db,
            db_label,
            redis,
            redis_mode: redis_mode.to_owned(),
            seed,
            rng: StdRng::seed_from_u64(seed),
            stream,
            group,
            log_dir,
            conn,
            worker_env,
            workers: Vec::new(),
            faults: 0,
            fault_times: Vec::new(),
            started: Instant::now(),
            samples: Arc::new(Mutex::new(Vec::new())),
            pids: Arc::new(Mutex::new(Vec::new())),
            rss: Arc::new(Mutex::new(HashMap::new())),
            sampler: None,
            producer: None,
        }
    }

    /// Sets (or overrides) a worker environment variable.
    pub fn set_env(&mut self, key: &str, value: impl ToString) {
        self.worker_env.retain(|(k, _)| k != key);
        self.worker_env.push((key.to_owned(), value.to_string()));
    }

    /// Spawns a worker with `instance` name and `members` members; waits
    /// until it runs when `wait` is set.
    pub async fn spawn_worker(&mut self, instance: &str, members: usize, wait: bool) -> usize {
        let w = self.start_worker(instance, members, wait, "start").await;
        self.workers.push(w);
        self.workers.len() - 1
    }

    /// Replaces worker `i` by a new process with the same names.
    pub async fn respawn(&mut self, i: usize, members: usize, wait: bool) {
        let instance = self.workers[i].instance.clone();
        self.workers[i] = self.start_worker(&instance, members, wait, "restart").await;
    }

    /// A worker process with the scenario's environment, its pid sampled;
    /// when `wait`, asserts it printed `started` within 30 s.
    async fn start_worker(&self, instance: &str, members: usize, wait: bool, what: &str) -> Worker {
        let mut env = self.worker_env.clone();
        env.push(("CHAOS_MEMBERS".to_owned(), members.to_string()));
        let mut w = Worker::spawn(&env, instance, &self.log_dir);
        self.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w.pid());
        if wait {
            let ok = w.wait_started(Duration::from_secs(30)).await;
            assert!(
                ok,
                "worker {instance} did not {what} (seed {}): {}",
                self.seed,
                Worker::log_tail(&self.log_dir, instance, 20)
            );
        }
        w
    }

    /// Logs how far into the scenario a phase is reached.
    pub fn phase(&self, what: &str) {
        eprintln!(
            "  [{:>6.2}s] {} {}: {what}",
            self.started.elapsed().as_secs_f64(),
            self.scenario,
            self.db_label
        );
    }

    /// Records a fault now.
    pub fn fault(&mut self) {
        self.faults += 1;
        self.fault_times.push(Instant::now());
    }

    /// A random duration in `[lo, hi]` ms from the seeded RNG.
    pub fn jitter_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(lo..=hi))
    }

    /// Starts the sampler: effects count and worker peak RSS, every 100 ms.
    pub fn start_sampler(&mut self) {
        let conn = self.conn.clone();
        let samples = Arc::clone(&self.samples);
        let pids = Arc::clone(&self.pids);
        let rss = Arc::clone(&self.rss);
        self.sampler = Some(tokio::spawn(async move {
            loop {
                let n = ledger::effect_rows(&conn).await;
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), n));
                {
                    // A gone process is dropped from the list: a soak
                    // restarts workers thousands of times.
                    let mut live = pids.lock().unwrap_or_else(|e| e.into_inner());
                    let mut peaks = rss.lock().unwrap_or_else(|e| e.into_inner());
                    live.retain(|&pid| match peak_rss_kb(pid) {
                        Some(kb) => {
                            let p = peaks.entry(pid).or_insert(0);
                            *p = (*p).max(kb);
                            true
                        }
                        None => false,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    /// Samples the RSS of every live worker now (before killing one).
    pub fn sample_rss_now(&self) {
        let mut peaks = self.rss.lock().unwrap_or_else(|e| e.into_inner());
        for w in &self.workers {
            if let Some(kb) = peak_rss_kb(w.pid()) {
                let p = peaks.entry(w.pid()).or_insert(0);
                *p = (*p).max(kb);
            }
        }
    }

    /// Highest peak RSS of any worker process, in MB.
    pub fn peak_rss_mb(&self) -> f64 {
        self.sample_rss_now();
        let peaks = self.rss.lock().unwrap_or_else(|e| e.into_inner());
        peaks.values().copied().max().unwrap_or(0) as f64 / 1024.0
    }

    /// The in-process producer (a processor with no groups).
    pub async fn producer(&mut self) -> redstream::Producer {
        if self.producer.is_none() {
            let mut s = redstream::Settings::default();
            s.redis.url = self.redis.url().parse().expect("redis url");
            s.instance.name = format!("producer-{}", self.seed);
            s.producer.publish_attempts = 8;
            s.producer.retry_max_ms = 1_000;
            let p = redstream::Processor::builder(s)
                .start()
                .await
                .expect("producer starts");
            self.producer = Some(p);
        }
        self.producer.as_ref().expect("producer").producer()
    }

    /// Starts publishing `n` events over `duration` in the background.
    pub async fn start_producing(
        &mut self,
        n: usize,
        duration: Duration,
    ) -> tokio::task::JoinHandle<History> {
        let producer = self.producer().await;
        tokio::spawn(workload::produce(
            producer,
            self.stream.clone(),
            0,
            n,
            duration,
            self.seed,
        ))
    }

    /// A fresh connection to the test redis.
    pub async fn redis_conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.redis.url()).ok()?;
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()
    }

    /// (pending, caught up): XPENDING count, and whether the group has read
    /// every entry of the stream.
    pub async fn group_state(&self) -> Option<(u64, bool)> {
        let mut c = self.redis_conn().await?;
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut c)
            .await
            .ok()?;
        let pending = match pending {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        };
        let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut c)
            .await
            .ok()?;
        let g = groups
            .iter()
            .find(|g| g.get("name").is_some_and(|n| text(n) == self.group))?;
        let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.stream)
            .query_async(&mut c)
            .await
            .ok()?;
        let last_delivered = g.get("last-delivered-id").map(text).unwrap_or_default();
        let last_generated = info.get("last-generated-id").map(text).unwrap_or_default();
        let lag_zero = matches!(g.get("lag"), Some(redis::Value::Int(0)));
        Some((pending, lag_zero || last_delivered == last_generated))
    }

    /// Consumer names in the group (`XINFO CONSUMERS`).
    pub async fn consumers(&self) -> Vec<String> {
        let Some(mut c) = self.redis_conn().await else {
            return Vec::new();
        };
        let list: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        list.iter()
            .filter_map(|m| m.get("name").map(text))
            .collect()
    }

    /// Waits until the PEL is empty, the group has read everything and the
    /// effects stopped changing; returns how long that took, or `None` after
    /// `timeout`.
    pub async fn wait_drained(&self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut stable_since: Option<(Instant, u64)> = None;
        while start.elapsed() < timeout {
            let effects = ledger::effect_rows(&self.conn).await;
            let state = self.group_state().await;
            if let Some((0, true)) = state {
                match stable_since {
                    Some((t, n)) if n == effects => {
                        if t.elapsed() >= Duration::from_millis(600) {
                            return Some(t.duration_since(start));
                        }
                    }
                    _ => stable_since = Some((Instant::now(), effects)),
                }
            } else {
                stable_since = None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Recovery time per fault: from the fault until the effects count grew
    /// again, for faults that struck while a backlog existed (`produced`
    /// more than effected).
    pub fn recovery_times(&self, history: &History) -> Vec<Duration> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for &t in &self.fault_times {
            let before = samples
                .iter()
                .rev()
                .find(|(s, _)| *s <= t)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            let produced = history.records.iter().filter(|r| r.returned <= t).count() as u64;
            if before >= produced {
                continue;
            }
            if let Some((s, _)) = samples.iter().find(|(s, n)| *s > t && *n > before) {
                out.push(s.duration_since(t));
            }
        }
        out
    }

    /// Checks, prints and appends the result row.
    pub async fn finish(
        &mut self,
        history: &History,
        drain: Option<Duration>,
        note: &str,
    ) -> (Verdict, Row) {
        if let Some(s) = self.sampler.take() {
            s.abort();
        }
        let verdict = checker::check(history, &self.conn, &self.redis.url(), &self.stream).await;
        let mut rec = self.recovery_times(history);
        rec.sort();
        let p50 = rec.get(rec.len() / 2).copied();
        let max = rec.last().copied();
        let row = Row {
            scenario: self.scenario.to_owned(),
            db: self.db_label.to_owned(),
            redis_mode: self.redis_mode.clone(),
            seed: self.seed,
            n: history.records.len(),
            faults: self.faults,
            lost: verdict.lost.len(),
            dup_effects: verdict.dup_effects(),
            recovered: verdict.recovered,
            dead: verdict.dead_summary(),
            recovery_p50: p50,
            recovery_max: max,
            drain,
            peak_rss_mb: self.peak_rss_mb(),
            wall: self.started.elapsed(),
            note: note.to_owned(),
        };
        row.emit();
        (verdict, row)
    }

    /// Asserts I1 (lost = 0), I2 (no duplicated effect) and I3 (drained).
    pub fn assert_core(&self, v: &Verdict, drain: Option<Duration>) {
        let seed = self.seed;
        let logs = self.log_dir.display();
        assert!(
            drain.is_some(),
            "{}: the group did not drain (PEL/lag not 0) (seed {seed}, logs {logs})",
            self.scenario
        );
        assert!(
            v.duplicated.is_empty() && v.balance_drift == 0,
            "{}: duplicated effects {:?}, balance drift {} (seed {seed}, logs {logs})",
            self.scenario,
            &v.duplicated[..v.duplicated.len().min(10)],
            v.balance_drift
        );
        assert!(
            v.lost.is_empty(),
            "{}: {} acknowledged events lost, e.g. seqs {:?} (seed {seed}, logs {logs})",
            self.scenario,
            v.lost.len(),
            &v.lost[..v.lost.len().min(10)]
        );
        assert_eq!(
            v.unexpected, 0,
            "an event whose publish failed was effected"
        );
    }

    /// Stops every worker gracefully (then the producer).
    pub async fn shutdown(&mut self) {
        for w in &mut self.workers {
            if w.alive() {
                w.terminate(Duration::from_secs(10)).await;
            }
        }
        if let Some(p) = self.producer.take() {
            let _ = p.shutdown().await;
        }
    }
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

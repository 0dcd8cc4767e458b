//! redstream versus hand-written redis-rs, side by side in one run.
//!
//! ```text
//! cargo bench --bench streams                 # every scenario, writes BENCHMARKS.md
//! cargo bench --bench streams -- flood paced  # some scenarios (prints only)
//! cargo bench --bench streams -- --smoke      # seconds: the harness and exactly-once still hold
//! cargo test --bench streams                  # the same smoke run (part of `cargo test --all-targets`)
//! ```
//!
//! Each run is a child process (so its peak RSS is its own) on a fresh
//! stream; runs alternate redstream / baseline, at least three pairs, and
//! the report gives medians with min–max and the median ratio. A run that
//! loses or repeats an event, or leaves one pending, has no result and fails
//! the benchmark. Environment: `REDIS_URL` (default redis://127.0.0.1:6379),
//! `DATABASE_URL` (PostgreSQL admin URL, default
//! postgres://postgres:postgres@127.0.0.1:5432/test), `BENCH_EXTRA_TOML`
//! (redstream settings appended after its `[consumer]` table, for
//! experiments; `\n` separates lines).

#![allow(missing_docs, unreachable_pub)]

mod baseline;
mod framework;
mod report;
mod spec;
mod workload;

use std::ops::Range;
use std::process::Command;
use std::time::Duration;

use sea_orm::ConnectionTrait;

use crate::spec::{RunResult, Scenario, Side, Spec};

fn main() {
    if let Ok(spec) = std::env::var("REDSTREAM_BENCH_CHILD") {
        child(&spec);
        return;
    }
    if let Err(e) = parent() {
        eprintln!("benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

/// Runs one side of one scenario and prints its result as JSON.
fn child(spec: &str) {
    let result = serde_json::from_str::<Spec>(spec)
        .map_err(anyhow::Error::from)
        .and_then(|spec| match (spec.scenario, spec.side) {
            (Scenario::Produce, Side::Redstream) => framework::produce(&spec),
            (Scenario::Produce, Side::Baseline) => baseline::produce(&spec),
            (_, Side::Redstream) if spec.streams > 0 => framework::many_streams(&spec),
            (_, Side::Baseline) if spec.streams > 0 => baseline::many_streams(&spec),
            (_, Side::Redstream) => framework::run(&spec),
            (_, Side::Baseline) => baseline::run(&spec),
            (_, Side::RedisBenchmark) => anyhow::bail!("redis-benchmark is not a child"),
        });
    let result = result.unwrap_or_else(|e| RunResult {
        error: Some(format!("{e:#}")),
        ..RunResult::default()
    });
    println!(
        "RESULT {}",
        serde_json::to_string(&result).unwrap_or_default()
    );
}

/// How big each scenario is.
#[derive(Clone, Copy)]
struct Sizes {
    pairs: usize,
    flood: u64,
    paced_rate: u64,
    paced_secs: u64,
    many_members: usize,
    many_rate: u64,
    many_secs: u64,
    db_events: u64,
    produce: u64,
    /// Streams of the three many-streams scenarios, their events, and the
    /// idle time measured after each run.
    many_streams: [usize; 3],
    streams_events: u64,
    idle_secs: u64,
}

const FULL: Sizes = Sizes {
    pairs: 3,
    flood: 1_000_000,
    paced_rate: 10_000,
    paced_secs: 30,
    many_members: 500,
    many_rate: 12_000,
    many_secs: 30,
    db_events: 100_000,
    produce: 1_000_000,
    many_streams: [10, 1_000, 10_000],
    streams_events: 100_000,
    idle_secs: 10,
};

const SMOKE: Sizes = Sizes {
    pairs: 1,
    flood: 20_000,
    paced_rate: 2_000,
    paced_secs: 2,
    many_members: 50,
    many_rate: 2_000,
    many_secs: 2,
    db_events: 2_000,
    produce: 20_000,
    many_streams: [2, 20, 200],
    streams_events: 2_000,
    idle_secs: 1,
};

fn parent() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not,
    // and gets the smoke run.
    let smoke = args.iter().any(|a| a == "--smoke") || !args.iter().any(|a| a == "--bench");
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let sizes = if smoke { SMOKE } else { FULL };
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let all = [
        Scenario::Flood,
        Scenario::Paced,
        Scenario::Many,
        Scenario::Sqlite,
        Scenario::Postgres,
        Scenario::Produce,
        Scenario::Streams10,
        Scenario::Streams1k,
        Scenario::Streams10k,
    ];
    let scenarios: Vec<Scenario> = all
        .into_iter()
        .filter(|s| wanted.is_empty() || wanted.contains(&s.name()))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report =
        report::Report::new(&redis_url, smoke, rt.block_on(redis_version(&redis_url))?);
    for scenario in scenarios {
        let runs = rt.block_on(run_scenario(scenario, sizes, &redis_url))?;
        report.add(scenario, runs);
    }
    let text = report.render();
    println!("{text}");
    if !smoke && wanted.is_empty() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md"),
            report.document(&text),
        )?;
        println!("written to BENCHMARKS.md");
    }
    if let Some(bad) = report.invalid() {
        anyhow::bail!("{bad}");
    }
    Ok(())
}

async fn redis_version(url: &str) -> anyhow::Result<String> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned())
}

/// Runs A B A B … and returns every run, in order.
async fn run_scenario(
    scenario: Scenario,
    sizes: Sizes,
    redis_url: &str,
) -> anyhow::Result<Vec<(Side, RunResult)>> {
    let (events, rate, members) = match scenario {
        Scenario::Flood => (sizes.flood, 0, 4),
        Scenario::Paced => (sizes.paced_rate * sizes.paced_secs, sizes.paced_rate, 4),
        Scenario::Many => (
            sizes.many_rate * sizes.many_secs,
            sizes.many_rate,
            sizes.many_members,
        ),
        // SQLite has one writer at a time; PostgreSQL's throughput is bound
        // by round trips and commit latency, so more members help it.
        Scenario::Sqlite => (sizes.db_events, 0, 4),
        Scenario::Postgres => (sizes.db_events, 0, 8),
        Scenario::Produce => (sizes.produce, 0, 1),
        Scenario::Streams10 | Scenario::Streams1k | Scenario::Streams10k => {
            (sizes.streams_events, 0, 1)
        }
    };
    let streams = match scenario {
        Scenario::Streams10 => sizes.many_streams[0],
        Scenario::Streams1k => sizes.many_streams[1],
        Scenario::Streams10k => sizes.many_streams[2],
        _ => 0,
    };
    let sides: &[Side] = match scenario {
        // The database scenarios have absolute targets; no baseline.
        Scenario::Sqlite | Scenario::Postgres => &[Side::Redstream],
        Scenario::Produce => &[Side::Redstream, Side::Baseline, Side::RedisBenchmark],
        _ => &[Side::Redstream, Side::Baseline],
    };
    let mut runs = Vec::new();
    for pair in 0..sizes.pairs {
        for &side in sides {
            let stream = format!(
                "bench:{}:{}:{pair}",
                ulid::Ulid::new().to_string().to_lowercase(),
                scenario.name()
            );
            eprintln!("{} / {} (run {})…", scenario.name(), side.name(), pair + 1);
            let database = match scenario {
                Scenario::Sqlite => Some(Database::sqlite()?),
                Scenario::Postgres => Some(Database::postgres().await?),
                _ => None,
            };
            let spec = Spec {
                scenario,
                side,
                events,
                rate,
                members,
                redis_url: redis_url.to_owned(),
                stream: stream.clone(),
                database_url: database.as_ref().map(|d| d.url.clone()),
                track_latency: matches!(scenario, Scenario::Paced | Scenario::Many),
                streams,
                idle_secs: sizes.idle_secs,
            };
            let result = match side {
                Side::RedisBenchmark => redis_benchmark(&spec)?,
                _ => spawn_child(&spec)?,
            };
            eprintln!("  {}", report::one_line(&result));
            cleanup(redis_url, &stream).await?;
            if let Some(db) = database {
                db.drop().await?;
            }
            runs.push((side, result));
        }
    }
    Ok(runs)
}

fn spawn_child(spec: &Spec) -> anyhow::Result<RunResult> {
    let out = Command::new(std::env::current_exe()?)
        .env("REDSTREAM_BENCH_CHILD", serde_json::to_string(spec)?)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| anyhow::anyhow!("the child printed no result ({})", out.status))?;
    Ok(serde_json::from_str(line)?)
}

/// `redis-benchmark -P 64` writing the same five fields per XADD.
fn redis_benchmark(spec: &Spec) -> anyhow::Result<RunResult> {
    let url = url::Url::parse(&spec.redis_url)?;
    let payload = workload::payload(0, workload::now_us());
    let out = Command::new("redis-benchmark")
        .args(["-h", url.host_str().unwrap_or("127.0.0.1")])
        .args(["-p", &url.port().unwrap_or(6379).to_string()])
        .args(["-P", "64", "-q", "-n", &spec.events.to_string()])
        .args(["XADD", &spec.stream, "*"])
        .args([
            "id",
            "01JD5Q9Z3F5VJ1Y0C7W6N8T2KX",
            "type",
            "bench.event",
            "v",
            "1",
        ])
        .args(["ts", "1764000000000", "data", &payload])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "XADD …: 312500.00 requests per second, p50=…"
    let rps = text
        .rsplit('\r')
        .next()
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected redis-benchmark output: {text}"))?;
    Ok(RunResult {
        events: spec.events,
        seconds: spec.events as f64 / rps,
        events_per_s: rps,
        ..RunResult::default()
    })
}

/// The producer-only scenario's publishers: 4 tasks, each writing every
/// fourth batch of 1,000 events, back to back.
pub fn publishers(events: u64) -> impl Iterator<Item = Vec<Range<u64>>> {
    const TASKS: u64 = 4;
    const BATCH: u64 = 1_000;
    (0..TASKS).map(move |t| {
        (0..events.div_ceil(BATCH))
            .filter(|k| k % TASKS == t)
            .map(|k| k * BATCH..((k + 1) * BATCH).min(events))
            .collect()
    })
}

/// How long a run may take before it counts as stuck.
pub fn ceiling(spec: &Spec) -> Duration {
    let expected = spec
        .events
        .checked_div(spec.rate)
        .unwrap_or(spec.events / 5_000);
    Duration::from_secs(60 + 3 * expected)
}

/// Entries still pending in a group.
pub async fn pending_count(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> anyhow::Result<u64> {
    let (count, ..): (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await?;
    Ok(count)
}

/// The result of a producer-only run, after checking every event is in the
/// stream once.
pub async fn produced_result(
    conn: &mut redis::aio::MultiplexedConnection,
    spec: &Spec,
    seconds: f64,
    redis_cpu_s: f64,
) -> anyhow::Result<RunResult> {
    let len: u64 = redis::cmd("XLEN")
        .arg(&spec.stream)
        .query_async(conn)
        .await?;
    let mut check = workload::Check::default();
    if len < spec.events {
        check.missing = spec.events - len;
    } else {
        check.duplicated = len - spec.events;
    }
    Ok(RunResult {
        events: spec.events,
        seconds,
        events_per_s: spec.events as f64 / seconds,
        peak_rss_mib: workload::peak_rss_kib() as f64 / 1024.0,
        redis_cpu_s,
        check,
        ..RunResult::default()
    })
}

/// Deletes every key of a run.
async fn cleanup(redis_url: &str, stream: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{stream}*"))
        .query_async(&mut conn)
        .await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
    }
    Ok(())
}

/// When each batch of events is due: back to back, or at `rate` per second
/// checked every millisecond.
pub struct Schedule {
    total: u64,
    rate: u64,
    batch: u64,
    sent: u64,
    start: tokio::time::Instant,
    tick: tokio::time::Interval,
}

impl Schedule {
    pub fn new(total: u64, rate: u64, batch: u64) -> Schedule {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Schedule {
            total,
            rate,
            batch,
            sent: 0,
            start: tokio::time::Instant::now(),
            tick,
        }
    }

    /// The next events to publish, `None` when all are.
    pub async fn next(&mut self) -> Option<Range<u64>> {
        if self.sent >= self.total {
            return None;
        }
        if self.rate == 0 {
            let end = (self.sent + self.batch).min(self.total);
            return Some(std::mem::replace(&mut self.sent, end)..end);
        }
        loop {
            let elapsed = self.start.elapsed().as_micros() as u64;
            let due = (self.rate * elapsed / 1_000_000).min(self.total);
            if due > self.sent {
                let end = due.min(self.sent + 10 * self.batch);
                return Some(std::mem::replace(&mut self.sent, end)..end);
            }
            self.tick.tick().await;
        }
    }
}

/// A database for one run: a SQLite file, or a fresh PostgreSQL database.
struct Database {
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Database {
    fn sqlite() -> anyhow::Result<Database> {
        let dir = tempfile::tempdir()?;
        Ok(Database {
            url: format!("sqlite://{}/bench.db?mode=rwc", dir.path().display()),
            _dir: Some(dir),
            pg: None,
        })
    }

    async fn postgres() -> anyhow::Result<Database> {
        let admin = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/test".to_owned());
        let name = format!("bench_{}", ulid::Ulid::new().to_string().to_lowercase());
        let conn = sea_orm::Database::connect(admin.as_str()).await?;
        conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        conn.close().await?;
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        Ok(Database {
            url: format!("{base}/{name}"),
            _dir: None,
            pg: Some((admin, name)),
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        if let Some((admin, name)) = self.pg {
            let conn = sea_orm::Database::connect(admin.as_str()).await?;
            conn.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await?;
            conn.close().await?;
        }
        Ok(())
    }
}

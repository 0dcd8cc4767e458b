//! The worker process of the fault-injection suite (`tests/chaos`).
//!
//! Runs one `Group::transactional` handler on a deliberately
//! non-idempotent ledger: in the library's transaction it adds the event's
//! `amount` to the member's account (`balance = balance + amount`, an upsert)
//! and appends a row to `effects_log` (no unique key). The library's
//! `processed_events` is the only fence against a second effect, so a
//! duplicated effect shows as an `effects_log` row twice or a balance that
//! is not the sum of the amounts.
//!
//! Configured by environment (the test sets these):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `REDIS_URL` | Redis | settings |
//! | `DATABASE_URL` | SQLite or PostgreSQL | settings |
//! | `CHAOS_STREAM`, `CHAOS_GROUP` | stream and group | `chaos`, `ledger` |
//! | `CHAOS_MEMBERS` | members in this process | 2 |
//! | `CHAOS_INSTANCE` | instance name (members `<instance>-<i>`) | settings |
//! | `CHAOS_FAIL_PCT`, `CHAOS_FAIL_FIRST` | this % of events (by seq) fail their first N attempts | 0, 0 |
//! | `CHAOS_PANIC_SEQ` | the event with this seq panics on every attempt | none |
//! | `CHAOS_SLEEP_MS` | sleep per event, inside the transaction | 0 |
//! | `CHAOS_SLEEP_FOR_MS` | apply that sleep only this long after start-up (a consumer that is slow, then catches up) | always |
//! | `CHAOS_METRICS_MS` | period of the metrics line | 500 |
//! | `CHAOS_OUTBOX` | `1`: each effect also writes an event to `<stream>:out` through the outbox, relayed by this process | off |
//! | `CHAOS_UNIQUE_NAMES` | `1`: the instance name gets `-p<pid>` appended, so each process has its own member names | off |
//! | `CHAOS_EXEC_LOG` | append a line to this file when a handler starts (`S seq pid member start_us`) and when it ends (`seq pid member start_us end_us completed start_mono_us end_mono_us attempt ok entry_id`; `start_us`/`end_us` wall-clock µs, `*_mono_us` CLOCK_MONOTONIC µs (system-wide, not moved by a wall-clock step); `completed` 0 when the handler was dropped, e.g. after its entry was taken over; `ok` 1 when it returned `Ok`) | none |
//! | `CHAOS_CRASH_POINT`, `CHAOS_CRASH_AT` | abort the process the Nth time execution passes this crash point (needs the `failpoints` feature; see `redstream::failpoints`) | none, 1 |
//!
//! Every other setting (retry policy, timers) comes from `REDSTREAM__…`
//! variables, e.g. `REDSTREAM__RETRY__MAX_ATTEMPTS=5`.
//!
//! Prints JSON lines on stdout: `{"event":"started",…}` once the
//! processor runs, `{"event":"metrics",…}` periodically, and
//! `{"event":"stopped",…}` after a graceful stop (SIGTERM or SIGINT).
//!
//! ```text
//! CHAOS_STREAM=s DATABASE_URL=sqlite:///tmp/l.db?mode=rwc cargo run --example chaos_worker
//! ```

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redstream::prelude::*;
use redstream::{HandlerResult, Meta};
use sea_orm::sea_query::{Alias, Expr, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde::Deserialize;

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// What the test publishes.
#[derive(Deserialize)]
struct Deposit {
    seq: i64,
    amount: i64,
}

/// The handler's behaviour, from the environment.
struct Ledger {
    /// Writes an event per effect to this stream through the outbox.
    outbox_to: Option<String>,
    fail_pct: u64,
    fail_first: u32,
    panic_seq: Option<i64>,
    sleep: Duration,
    /// The sleep applies until then (`None`: always).
    sleep_until: Option<std::time::Instant>,
    /// Calls per seq in this process (attempts seen here).
    calls: Mutex<HashMap<i64, u32>>,
    in_handler: AtomicU64,
    max_overlap: AtomicU64,
    /// `CHAOS_EXEC_LOG`: where each execution is recorded.
    exec_log: Option<std::path::PathBuf>,
}

/// CLOCK_MONOTONIC in µs: one clock for every process on this host, which
/// a wall-clock step (or libfaketime with `FAKETIME_DONT_FAKE_MONOTONIC=1`)
/// leaves alone.
fn mono_us() -> u128 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u128 * 1_000_000 + t.tv_nsec as u128 / 1_000
}

fn epoch_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// Records one handler execution in `CHAOS_EXEC_LOG` when dropped, whether
/// the handler finished or its future was dropped midway.
/// Also leaves the in-handler count, so a dropped handler does not inflate
/// `max_overlap`.
struct Execution<'a> {
    in_handler: &'a AtomicU64,
    log: Option<&'a std::path::Path>,
    seq: i64,
    member: String,
    start_us: u128,
    start_mono_us: u128,
    attempt: u32,
    entry_id: String,
    completed: bool,
    ok: bool,
}

impl Execution<'_> {
    fn started(&self) {
        if let Some(path) = self.log {
            append_line(
                path,
                &format!(
                    "S {} {} {} {}\n",
                    self.seq,
                    std::process::id(),
                    self.member,
                    self.start_us
                ),
            );
        }
    }
}

impl Drop for Execution<'_> {
    fn drop(&mut self) {
        self.in_handler.fetch_sub(1, Ordering::SeqCst);
        let Some(path) = self.log else { return };
        let line = format!(
            "{} {} {} {} {} {} {} {} {} {} {}\n",
            self.seq,
            std::process::id(),
            self.member,
            self.start_us,
            epoch_us(),
            u8::from(self.completed),
            self.start_mono_us,
            mono_us(),
            self.attempt,
            u8::from(self.ok),
            self.entry_id
        );
        append_line(path, &line);
    }
}

/// One write(2) per line on an O_APPEND file: lines from several processes
/// do not interleave.
fn append_line(path: &std::path::Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Whether `seq` is in the failing share: a fixed hash, so every process
/// agrees.
fn in_failing_share(seq: i64, pct: u64) -> bool {
    pct > 0 && (seq as u64).wrapping_mul(2_654_435_761) % 100 < pct
}

impl TxHandler for Ledger {
    type Event = Deposit;

    async fn handle(&self, d: Deposit, meta: &Meta, tx: &DatabaseTransaction) -> HandlerResult {
        let calls = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let n = calls.entry(d.seq).or_insert(0);
            *n += 1;
            *n
        };
        let now = self.in_handler.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_overlap.fetch_max(now, Ordering::SeqCst);
        let mut execution = Execution {
            in_handler: &self.in_handler,
            log: self.exec_log.as_deref(),
            seq: d.seq,
            member: meta.member().to_owned(),
            start_us: epoch_us(),
            start_mono_us: mono_us(),
            attempt: meta.attempt(),
            entry_id: meta.entry_id().to_owned(),
            completed: false,
            ok: false,
        };
        execution.started();
        let result = self.apply(d, meta, tx, calls).await;
        execution.completed = true;
        execution.ok = result.is_ok();
        result
    }
}

impl Ledger {
    async fn apply(
        &self,
        d: Deposit,
        meta: &Meta,
        tx: &DatabaseTransaction,
        calls: u32,
    ) -> HandlerResult {
        if self.panic_seq == Some(d.seq) {
            #[allow(clippy::panic)]
            {
                panic!("poison event seq {}", d.seq);
            }
        }
        if in_failing_share(d.seq, self.fail_pct) && meta.attempt() <= self.fail_first {
            return Err(format!("injected failure, attempt {}", meta.attempt()).into());
        }
        if !self.sleep.is_zero()
            && self
                .sleep_until
                .is_none_or(|until| std::time::Instant::now() < until)
        {
            tokio::time::sleep(self.sleep).await;
        }
        // balance = balance + amount, on the member's own account (one row
        // lock per member: no lock-order deadlocks between members).
        let credit = Query::insert()
            .into_table(Alias::new("accounts"))
            .columns([Alias::new("id"), Alias::new("balance")])
            .values_panic([meta.member().into(), d.amount.into()])
            .on_conflict(
                OnConflict::column(Alias::new("id"))
                    .value(
                        Alias::new("balance"),
                        Expr::cust("accounts.balance + excluded.balance"),
                    )
                    .to_owned(),
            )
            .to_owned();
        tx.execute(&credit).await?;
        let log = Query::insert()
            .into_table(Alias::new("effects_log"))
            .columns([
                Alias::new("event_id"),
                Alias::new("seq"),
                Alias::new("attempt"),
                Alias::new("calls"),
                Alias::new("member"),
            ])
            .values_panic([
                meta.event_id().unwrap_or_default().into(),
                d.seq.into(),
                i64::from(meta.attempt()).into(),
                i64::from(calls).into(),
                meta.member().into(),
            ])
            .to_owned();
        tx.execute(&log).await?;
        if let Some(out) = &self.outbox_to {
            let event = Event::new("deposit.applied", &serde_json::json!({"seq": d.seq}))?
                .with_id(meta.event_id().unwrap_or_default());
            enqueue(tx, out, event).await?;
        }
        Ok(Outcome::Ack)
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn line(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

#[actix::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            line(serde_json::json!({"event": "error", "error": e.to_string()}));
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), AnyError> {
    let mut settings = Settings::load()?;
    if let Ok(url) = std::env::var("REDIS_URL") {
        settings.redis.url = url.parse()?;
    }
    if let Ok(url) = std::env::var("DATABASE_URL") {
        settings.database.url = url.parse()?;
    }
    if let Ok(name) = std::env::var("CHAOS_INSTANCE") {
        settings.instance.name = name;
    }
    if env_or("CHAOS_UNIQUE_NAMES", 0u8) == 1 {
        settings.instance.name = format!("{}-p{}", settings.instance.name, std::process::id());
    }
    let stream: String = env_or("CHAOS_STREAM", "chaos".to_owned());
    let group: String = env_or("CHAOS_GROUP", "ledger".to_owned());
    let members: usize = env_or("CHAOS_MEMBERS", 2);
    arm_crash_point()?;
    let outbox = env_or("CHAOS_OUTBOX", 0u8) == 1;
    let ledger = std::sync::Arc::new(Ledger {
        outbox_to: outbox.then(|| format!("{stream}:out")),
        fail_pct: env_or("CHAOS_FAIL_PCT", 0),
        fail_first: env_or("CHAOS_FAIL_FIRST", 0),
        panic_seq: std::env::var("CHAOS_PANIC_SEQ")
            .ok()
            .and_then(|v| v.parse().ok()),
        sleep: Duration::from_millis(env_or("CHAOS_SLEEP_MS", 0)),
        sleep_until: std::env::var("CHAOS_SLEEP_FOR_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(|ms| std::time::Instant::now() + Duration::from_millis(ms)),
        calls: Mutex::new(HashMap::new()),
        in_handler: AtomicU64::new(0),
        max_overlap: AtomicU64::new(0),
        exec_log: std::env::var_os("CHAOS_EXEC_LOG").map(std::path::PathBuf::from),
    });
    let period = Duration::from_millis(env_or("CHAOS_METRICS_MS", 500));

    let store = Store::connect(&settings.database).await?;
    let mut builder = Processor::builder(settings);
    if outbox {
        builder = builder.outbox(&store);
    }
    let processor = builder
        .group(
            Group::transactional(&stream, &group, &store, std::sync::Arc::clone(&ledger))
                .with_members(members),
        )
        .start()
        .await?;
    line(serde_json::json!({
        "event": "started",
        "pid": std::process::id(),
        "instance": processor.instance(),
        "redis_warnings": processor.server().warnings,
    }));

    let handle = processor.handle();
    let metrics_store = store.clone();
    let metrics_ledger = std::sync::Arc::clone(&ledger);
    let (stream2, group2) = (stream.clone(), group.clone());
    let metrics = actix::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let status = handle.group_status(&stream2, &group2).await.ok();
            let stats = metrics_store.stats();
            line(serde_json::json!({
                "event": "metrics",
                "acked": status.as_ref().map(|s| s.acked),
                "retried": status.as_ref().map(|s| s.retried),
                "dead_lettered": status.as_ref().map(|s| s.dead_lettered),
                "restarts": status.as_ref().map(|s| s.restarts()),
                "pending": status.as_ref().and_then(|s| s.pending),
                "committed": stats.committed,
                "duplicates": stats.duplicates,
                "db_retried_batches": stats.retried_batches,
                "max_overlap": metrics_ledger.max_overlap.load(Ordering::SeqCst),
            }));
        }
    });
    let report = processor.run_until_signal().await?;
    metrics.abort();
    let stats = store.stats();
    line(serde_json::json!({
        "event": "stopped",
        "released": report.released,
        "settled": report.settled,
        "took_ms": report.took.as_millis() as u64,
        "committed": stats.committed,
        "duplicates": stats.duplicates,
    }));
    Ok(())
}

/// `CHAOS_CRASH_POINT` / `CHAOS_CRASH_AT`: abort at a crash point.
fn arm_crash_point() -> Result<(), AnyError> {
    let point = std::env::var("CHAOS_CRASH_POINT").unwrap_or_default();
    if point.is_empty() {
        return Ok(());
    }
    #[cfg(feature = "failpoints")]
    {
        let hit: u64 = env_or("CHAOS_CRASH_AT", 1);
        redstream::failpoints::crash_at(&point, hit)?;
        Ok(())
    }
    #[cfg(not(feature = "failpoints"))]
    {
        Err(format!("CHAOS_CRASH_POINT={point} needs the `failpoints` feature").into())
    }
}

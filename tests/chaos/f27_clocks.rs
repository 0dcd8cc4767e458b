//! F27 — clocks. Workers run under libfaketime, each with its own clock
//! file (`FAKETIME_TIMESTAMP_FILE`, re-read on every call), so the test can
//! step a running worker's wall clock. The monotonic clock is left alone
//! (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as a real NTP step leaves it; Redis
//! and the database run on the real clock.
//!
//! - **step**: one worker's clock stepped back an hour mid-run, then forward
//!   an hour, while a fifth of the events wait for retries;
//! - **step + crash**: the same, each step followed by kill -9 and a restart
//!   (the new process keeps the stepped clock);
//! - **skew**: two workers 30 s apart (−15 s and +15 s) sharing the group;
//! - **skew + outbox**: the same, each worker also writing an outbox row per
//!   effect and relaying the outbox; additionally asserts every row relayed
//!   once (before the relay's lease stopped comparing process wall-clock
//!   times, about half the rows went out twice). `CHAOS_F27_SKEW_S` sets the
//!   skew (0: the control run).
//!
//! Each asserts: every event effected once, no dead letter, each failing
//! event committed at attempt `FAIL_FIRST + 1`, nothing stuck (drained),
//! and every redelivery after a failed attempt came no earlier than the
//! policy's delay and no later than the delay plus [`TOLERANCE`] (plus the
//! downtime, for a retry that fell due while its only worker was down).
//! Redeliveries are timed with CLOCK_MONOTONIC, which all processes share.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// Events whose seq is in the failing share fail this many first attempts.
const FAIL_FIRST: u32 = 2;
const INITIAL_DELAY_MS: u64 = 1_500;
const MAX_DELAY_MS: u64 = 3_000;
/// How late a redelivery may be: `reclaim.retry_poll_ms` (100 ms in the
/// suite), the hand-over to a member, and an exactly-once batch already
/// running ahead of it on a shared 2-core machine (seen up to ~550 ms, and
/// 1,100 ms with the outbox on PostgreSQL on a day the whole suite ran 40 %
/// slower). A clock bug shows as lateness of the skew itself (15–30 s
/// here), far past this; being early is held to `EARLY_SLACK`.
const TOLERANCE: Duration = Duration::from_millis(1_500);
/// A redelivery may start this much before its delay has passed: the
/// failed attempt's end is logged just before the library schedules it, so
/// only timer granularity is allowed.
const EARLY_SLACK: Duration = Duration::from_millis(5);

/// The policy's delay after failed attempt `attempt` (factor 2, no jitter).
fn policy_delay(attempt: u32) -> Duration {
    let ms = INITIAL_DELAY_MS.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    Duration::from_millis(ms.min(MAX_DELAY_MS))
}

/// CLOCK_MONOTONIC in µs (the clock the worker's execution log uses).
fn mono_us() -> u128 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u128 * 1_000_000 + t.tv_nsec as u128 / 1_000
}

/// Sets a worker's fake clock offset (libfaketime syntax, e.g. `-1h`,
/// `+15`): written to a temporary file and renamed, so a worker never reads
/// half a line.
fn set_clock(path: &Path, offset: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset}\n")).expect("write clock file");
    std::fs::rename(&tmp, path).expect("rename clock file");
}

/// One finished handler execution, from `CHAOS_EXEC_LOG`.
#[derive(Clone, Debug)]
struct Execution {
    seq: i64,
    entry_id: String,
    start_mono_us: u128,
    end_mono_us: u128,
    attempt: u32,
    completed: bool,
    ok: bool,
}

fn executions(path: &Path) -> Vec<Execution> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("S "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Execution {
                seq: f.first()?.parse().ok()?,
                completed: *f.get(5)? == "1",
                start_mono_us: f.get(6)?.parse().ok()?,
                end_mono_us: f.get(7)?.parse().ok()?,
                attempt: f.get(8)?.parse().ok()?,
                ok: *f.get(9)? == "1",
                entry_id: (*f.get(10)?).to_owned(),
            })
        })
        .collect()
}

/// Due times seen in the group's retry schedule, per entry id, in ms of the
/// Redis server's clock (the real wall clock: the server is not faked).
type DueTimes = Arc<Mutex<HashMap<String, BTreeSet<u64>>>>;

/// Samples `<stream>:retry:<group>` every 20 ms (a retry waits at least
/// 1.5 s, so none is missed).
fn watch_schedule(c: &Chaos) -> (DueTimes, tokio::task::JoinHandle<()>) {
    let seen: DueTimes = Arc::default();
    let key = format!("{}:retry:{}", c.stream, c.group);
    let url = c.redis.url();
    let sink = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let Ok(client) = redis::Client::open(url) else {
            return;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return;
        };
        loop {
            let items: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            {
                let mut seen = sink.lock().unwrap_or_else(|e| e.into_inner());
                for (id, score) in items {
                    seen.entry(id).or_default().insert(score as u64);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (seen, task)
}

/// The real wall clock minus CLOCK_MONOTONIC, in µs (this test process is
/// not faked): turns the server's due times into monotonic ones.
fn wall_minus_mono_us() -> i128 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    wall as i128 - mono_us() as i128
}

/// One measured redelivery: a failed attempt, its due time as written in
/// Redis, and the start of the next attempt.
#[derive(Clone, Copy, Debug)]
struct Redelivery {
    seq: i64,
    failed_attempt: u32,
    policy: Duration,
    /// From the retry's scheduling (its due time minus the policy's delay)
    /// to the next attempt's start.
    actual: Duration,
    /// From the failed handler's return to the scheduling (the batch's
    /// commit and the script's round trip).
    recorded_after: Duration,
    /// How much later than the policy's delay it may be.
    allowed_late: Duration,
}

impl Redelivery {
    fn late(&self) -> Duration {
        self.actual.saturating_sub(self.policy)
    }

    fn early(&self) -> Duration {
        self.policy.saturating_sub(self.actual)
    }
}

/// Pairs each execution at attempt `a + 1` with the latest failed
/// execution at attempt `a` that ended before it started, and with the due
/// time Redis held for that retry. `downtime` lists (from, to)
/// CLOCK_MONOTONIC µs during which no worker could claim: a retry that fell
/// due inside one may be late by the rest of it.
fn redeliveries(
    execs: &[Execution],
    due_times: &HashMap<String, BTreeSet<u64>>,
    wall_minus_mono: i128,
    downtime: &[(u128, u128)],
) -> (Vec<Redelivery>, usize) {
    let mut by_seq: HashMap<i64, Vec<&Execution>> = HashMap::new();
    for e in execs {
        by_seq.entry(e.seq).or_default().push(e);
    }
    let mut out = Vec::new();
    let mut unmatched = 0;
    for (seq, list) in by_seq {
        for next in list.iter().filter(|e| e.attempt > 1) {
            let failed = list
                .iter()
                .filter(|e| {
                    e.attempt + 1 == next.attempt
                        && e.completed
                        && !e.ok
                        && e.end_mono_us <= next.start_mono_us
                })
                .max_by_key(|e| e.end_mono_us);
            let Some(failed) = failed else { continue };
            let policy = policy_delay(failed.attempt);
            // The first due time written after the failure.
            let scheduled_us = due_times
                .get(&failed.entry_id)
                .into_iter()
                .flatten()
                .map(|ms| (*ms as i128) * 1_000 - wall_minus_mono - policy.as_micros() as i128)
                .filter(|at| *at + 2_000 >= failed.end_mono_us as i128)
                .min();
            let scheduled = match scheduled_us {
                Some(at) => at.max(0) as u128,
                None => {
                    unmatched += 1;
                    failed.end_mono_us
                }
            };
            let due = scheduled + policy.as_micros();
            let waited_down = downtime
                .iter()
                .filter(|(from, to)| due < *to && *from < next.start_mono_us)
                .map(|(from, to)| *to - due.max(*from))
                .sum::<u128>();
            out.push(Redelivery {
                seq,
                failed_attempt: failed.attempt,
                policy,
                actual: Duration::from_micros(next.start_mono_us.saturating_sub(scheduled) as u64),
                recorded_after: Duration::from_micros(
                    scheduled.saturating_sub(failed.end_mono_us) as u64
                ),
                allowed_late: TOLERANCE + Duration::from_micros(waited_down as u64),
            });
        }
    }
    out.sort_by_key(|r| (r.seq, r.failed_attempt));
    (out, unmatched)
}

fn p50_max(mut v: Vec<Duration>) -> (u128, u128) {
    v.sort();
    let p50 = v.get(v.len() / 2).copied().unwrap_or_default();
    let max = v.last().copied().unwrap_or_default();
    (p50.as_millis(), max.as_millis())
}

/// The figures for the note.
fn summary(rs: &[Redelivery]) -> String {
    let (late_p50, late_max) = p50_max(rs.iter().map(Redelivery::late).collect());
    let (rec_p50, rec_max) = p50_max(rs.iter().map(|r| r.recorded_after).collect());
    let early = rs.iter().map(Redelivery::early).max().unwrap_or_default();
    format!(
        "{} redeliveries, policy {}/{} ms: late p50 {late_p50} ms, max {late_max} ms \
         (tolerance +{} ms), early max {} ms; failure to schedule p50 {rec_p50} ms, max {rec_max} ms",
        rs.len(),
        policy_delay(1).as_millis(),
        policy_delay(2).as_millis(),
        TOLERANCE.as_millis(),
        early.as_millis(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Step,
    StepCrash,
    Skew,
    SkewOutbox,
}

/// Points worker `instance` at its own clock file (starting at `offset`).
fn fake_clock(c: &mut Chaos, instance: &str, offset: &str) -> PathBuf {
    let file = c.log_dir.join(format!("clock-{instance}.rc"));
    set_clock(&file, offset);
    c.set_env("LD_PRELOAD", LIBFAKETIME);
    c.set_env("FAKETIME_TIMESTAMP_FILE", file.display());
    c.set_env("FAKETIME_NO_CACHE", 1);
    c.set_env("FAKETIME_DONT_FAKE_MONOTONIC", 1);
    file
}

/// Entries of `<stream>:out` per event id (what the outbox relay wrote).
async fn relayed(c: &Chaos) -> HashMap<String, usize> {
    let mut conn = c.redis_conn().await.expect("redis");
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(format!("{}:out", c.stream))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE out");
    let mut out = HashMap::new();
    let redis::Value::Array(items) = reply else {
        return out;
    };
    for item in &items {
        let redis::Value::Array(pair) = item else {
            continue;
        };
        let Some(redis::Value::Array(flat)) = pair.get(1) else {
            continue;
        };
        for kv in flat.chunks(2) {
            if let [redis::Value::BulkString(k), redis::Value::BulkString(v)] = kv
                && k.as_slice() == b"id"
            {
                *out.entry(String::from_utf8_lossy(v).into_owned())
                    .or_insert(0) += 1;
            }
        }
    }
    out
}

async fn run(backend: Backend, case: Case) {
    let _serial = SERIAL.lock().await;
    if !Path::new(LIBFAKETIME).exists() {
        assert!(
            !crate::in_ci(),
            "libfaketime is missing: scripts/services.sh faketime"
        );
        eprintln!("skipping F27: libfaketime is not installed (scripts/services.sh faketime)");
        return;
    }
    let name = match case {
        Case::Step => "F27 clock step",
        Case::StepCrash => "F27 clock step + kill",
        Case::Skew => "F27 clocks 30 s apart",
        Case::SkewOutbox => "F27 clocks 30 s apart + outbox",
    };
    let Some(mut c) = Chaos::new(name, backend, "aof-always", &[]).await else {
        return;
    };
    let n = c.tier.pick(400, 4_000);
    let produce_for = Duration::from_secs(c.tier.pick(5, 30));
    let exec_log = c.log_dir.join("executions.log");
    c.set_env("CHAOS_EXEC_LOG", exec_log.display());
    c.set_env("CHAOS_FAIL_PCT", 20);
    c.set_env("CHAOS_FAIL_FIRST", FAIL_FIRST);
    c.set_env("REDSTREAM__RETRY__INITIAL_DELAY_MS", INITIAL_DELAY_MS);
    c.set_env("REDSTREAM__RETRY__MAX_DELAY_MS", MAX_DELAY_MS);
    c.set_env("REDSTREAM__RETRY__FACTOR", 2.0);
    c.set_env("REDSTREAM__RETRY__JITTER", 0.0);
    c.set_env("REDSTREAM__RETRY__MAX_ATTEMPTS", 5);
    let mut downtime = Vec::new();
    let wall_minus_mono = wall_minus_mono_us();
    let (due_times, watcher) = watch_schedule(&c);
    let history = match case {
        Case::Step | Case::StepCrash => {
            let clock = fake_clock(&mut c, "clock-0", "+0");
            c.spawn_worker("clock-0", 2, true).await;
            c.start_sampler();
            let producing = c.start_producing(n, produce_for).await;
            let crash = case == Case::StepCrash;
            // Back an hour while retries wait, then forward an hour.
            for (at, offset) in [(1_500u64, "-1h"), (2_500, "+0")] {
                tokio::time::sleep(Duration::from_millis(at)).await;
                set_clock(&clock, offset);
                c.fault();
                c.phase(&format!("clock stepped to {offset}"));
                if crash {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let down = mono_us();
                    c.workers[0].kill9();
                    c.fault();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    c.respawn(0, 2, true).await;
                    downtime.push((down, mono_us()));
                    c.phase("killed -9 and restarted on the stepped clock");
                }
            }
            producing.await.expect("producer")
        }
        Case::Skew | Case::SkewOutbox => {
            if case == Case::SkewOutbox {
                c.set_env("CHAOS_OUTBOX", 1);
            }
            let half: u64 = std::env::var("CHAOS_F27_SKEW_S")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(30)
                / 2;
            fake_clock(&mut c, "skew-a", &format!("-{half}"));
            c.spawn_worker("skew-a", 2, true).await;
            fake_clock(&mut c, "skew-b", &format!("+{half}"));
            c.spawn_worker("skew-b", 2, true).await;
            c.fault();
            c.start_sampler();
            c.start_producing(n, produce_for)
                .await
                .await
                .expect("producer")
        }
    };
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    watcher.abort();
    let execs = executions(&exec_log);
    let due_times = due_times.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (rs, unmatched) = redeliveries(&execs, &due_times, wall_minus_mono, &downtime);
    assert_eq!(
        unmatched, 0,
        "every retry's due time was seen in the schedule"
    );
    let skew = std::env::var("CHAOS_F27_SKEW_S").unwrap_or_else(|_| "30".to_owned());
    let note = match case {
        Case::Step => "clock −1h then +1h mid-run".to_owned(),
        Case::StepCrash => "clock −1h, kill -9, restart; +1h, kill -9, restart".to_owned(),
        Case::Skew => format!("two workers {skew} s apart"),
        Case::SkewOutbox => format!("two workers {skew} s apart, outbox on"),
    };
    let (v, _) = c
        .finish(&history, drain, &format!("{note}; {}", summary(&rs)))
        .await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "no dead letters: {:?}", v.dead_lettered);
    assert!(
        v.attempts
            .values()
            .all(|a| *a == 1 || *a == u64::from(FAIL_FIRST) + 1),
        "each failing event committed at attempt {} (seed {})",
        FAIL_FIRST + 1,
        c.seed
    );
    let failing = v.attempts.values().filter(|a| **a > 1).count();
    assert!(failing > 0, "some events were retried");
    // Every failing event shows both of its redeliveries.
    assert!(
        rs.len() >= failing * FAIL_FIRST as usize,
        "{} redeliveries measured for {failing} failing events",
        rs.len()
    );
    let early: Vec<&Redelivery> = rs.iter().filter(|r| r.early() > EARLY_SLACK).collect();
    assert!(
        early.is_empty(),
        "{} redeliveries came before their delay, e.g. {:?} (seed {}, logs {})",
        early.len(),
        &early[..early.len().min(5)],
        c.seed,
        c.log_dir.display()
    );
    let late: Vec<&Redelivery> = rs.iter().filter(|r| r.late() > r.allowed_late).collect();
    assert!(
        late.is_empty(),
        "{} redeliveries came later than their delay + tolerance, e.g. {:?} (seed {}, logs {})",
        late.len(),
        &late[..late.len().min(5)],
        c.seed,
        c.log_dir.display()
    );
    if case == Case::SkewOutbox {
        let out = relayed(&c).await;
        let effected = crate::ledger::effects(&c.conn).await;
        let missing = effected.keys().filter(|id| !out.contains_key(*id)).count();
        let twice: Vec<(&String, &usize)> = out.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            missing == 0 && twice.is_empty(),
            "outbox: {missing} rows not relayed, {} relayed more than once, e.g. {:?} (seed {})",
            twice.len(),
            &twice[..twice.len().min(5)],
            c.seed
        );
    }
    c.shutdown().await;
}

scenario_tests! {
    f27_clock_step_sqlite => run(Backend::Sqlite, Case::Step);
    f27_clock_step_pg => run(Backend::Postgres, Case::Step);
    f27_clock_step_kill_sqlite => run(Backend::Sqlite, Case::StepCrash);
    f27_clock_step_kill_pg => run(Backend::Postgres, Case::StepCrash);
    f27_clocks_skewed_sqlite => run(Backend::Sqlite, Case::Skew);
    f27_clocks_skewed_pg => run(Backend::Postgres, Case::Skew);
    f27_outbox_clocks_skewed_sqlite => run(Backend::Sqlite, Case::SkewOutbox);
    f27_outbox_clocks_skewed_pg => run(Backend::Postgres, Case::SkewOutbox);
}

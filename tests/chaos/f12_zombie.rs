//! F12: a zombie consumer and long-running handlers.
//!
//! (a) A worker is SIGSTOPped for 3 × `min_idle` while its handler runs
//! (a slow handler that sleeps inside the transaction); the other worker's
//! member reclaims its entries; then SIGCONT. One effect per event; the
//! zombie never takes an entry back (its heartbeat checks ownership), and its
//! late work is absorbed (rolled back before commit, or its commit makes the
//! new owner's run a duplicate).
//!
//! (b) A healthy handler runs 2 × `min_idle`: the owner-checked heartbeat
//! keeps its entries below `min_idle`, so nobody reclaims them: no two
//! executions of one event at once, and the delivery count stays 1.
//!
//! Executions are recorded by the worker (`CHAOS_EXEC_LOG`), the pending
//! list is sampled every 50 ms (owner, idle, delivery count per entry), and
//! heartbeat extensions are counted from `INFO commandstats` (each is an
//! `XCLAIM … JUSTID` in the heartbeat script; nothing else here calls
//! XCLAIM).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};
use crate::worker::signal;

/// What the pending list showed over a run.
#[derive(Default, Debug)]
struct PelLog {
    /// Owners of each entry, in the order seen (consecutive repeats merged).
    owners: HashMap<String, Vec<String>>,
    max_delivered: u64,
    max_idle_ms: u64,
    samples: u64,
}

impl PelLog {
    /// Entries whose owner changed (reclaimed).
    fn reclaimed(&self) -> usize {
        self.owners.values().filter(|o| o.len() > 1).count()
    }

    /// Entries that went back to an owner that had lost them (A → B → A).
    fn taken_back(&self) -> Vec<(String, Vec<String>)> {
        self.owners
            .iter()
            .filter(|(_, o)| o.iter().enumerate().any(|(i, a)| o[i + 1..].contains(a)))
            .map(|(id, o)| (id.clone(), o.clone()))
            .collect()
    }
}

/// Samples `XPENDING <stream> <group> - + 10000` every 50 ms.
fn sample_pel(c: &Chaos) -> (Arc<Mutex<PelLog>>, tokio::task::JoinHandle<()>) {
    let log = Arc::new(Mutex::new(PelLog::default()));
    let sink = Arc::clone(&log);
    let url = c.redis.url();
    let (stream, group) = (c.stream.clone(), c.group.clone());
    let task = tokio::spawn(async move {
        let client = redis::Client::open(url).expect("redis url");
        let mut conn = None;
        loop {
            if conn.is_none() {
                conn = client.get_multiplexed_async_connection().await.ok();
            }
            if let Some(cn) = conn.as_mut() {
                let rows: redis::RedisResult<Vec<(String, String, u64, u64)>> =
                    redis::cmd("XPENDING")
                        .arg(&stream)
                        .arg(&group)
                        .arg("-")
                        .arg("+")
                        .arg(10_000)
                        .query_async(cn)
                        .await;
                match rows {
                    Ok(rows) => {
                        let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                        log.samples += 1;
                        for (id, owner, idle, delivered) in rows {
                            log.max_delivered = log.max_delivered.max(delivered);
                            log.max_idle_ms = log.max_idle_ms.max(idle);
                            let owners = log.owners.entry(id).or_default();
                            if owners.last() != Some(&owner) {
                                owners.push(owner);
                            }
                        }
                    }
                    Err(_) => conn = None,
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (log, task)
}

/// One handler execution from `CHAOS_EXEC_LOG`.
#[derive(Clone, Debug)]
struct Execution {
    seq: i64,
    pid: u32,
    member: String,
    start_us: u128,
    end_us: u128,
    completed: bool,
}

/// Finished (or dropped) executions; start lines (`S …`) are skipped.
fn executions(path: &Path) -> Vec<Execution> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("S "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Execution {
                seq: f.first()?.parse().ok()?,
                pid: f.get(1)?.parse().ok()?,
                member: (*f.get(2)?).to_owned(),
                start_us: f.get(3)?.parse().ok()?,
                end_us: f.get(4)?.parse().ok()?,
                completed: *f.get(5)? == "1",
            })
        })
        .collect()
}

/// Whether process `pid` has a handler running now: a start line with no
/// end line for the same (seq, start).
fn running_in(path: &Path, pid: u32) -> bool {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let pid = pid.to_string();
    let mut open: HashMap<(String, String), i32> = HashMap::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["S", seq, p, _member, start] if *p == pid => {
                *open
                    .entry(((*seq).to_owned(), (*start).to_owned()))
                    .or_default() += 1;
            }
            [seq, p, _member, start, _end, _done] if *p == pid => {
                *open
                    .entry(((*seq).to_owned(), (*start).to_owned()))
                    .or_default() -= 1;
            }
            _ => {}
        }
    }
    open.values().any(|n| *n > 0)
}

/// (events executed more than once, events with two executions at once).
fn doubles(execs: &[Execution]) -> (usize, usize) {
    let mut by_seq: HashMap<i64, Vec<&Execution>> = HashMap::new();
    for e in execs {
        by_seq.entry(e.seq).or_default().push(e);
    }
    let twice = by_seq.values().filter(|v| v.len() > 1).count();
    let concurrent = by_seq
        .values()
        .filter(|v| {
            v.iter().enumerate().any(|(i, a)| {
                v[i + 1..]
                    .iter()
                    .any(|b| a.start_us < b.end_us && b.start_us < a.end_us)
            })
        })
        .count();
    (twice, concurrent)
}

/// Calls of `cmd` since the last `CONFIG RESETSTAT` (`INFO commandstats`).
async fn command_calls(c: &Chaos, cmd: &str) -> u64 {
    let Some(mut conn) = c.redis_conn().await else {
        return 0;
    };
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

async fn reset_stats(c: &Chaos) {
    let mut conn = c.redis_conn().await.expect("redis");
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .expect("CONFIG RESETSTAT");
}

/// Entries pending for `consumer`.
async fn pending_of(c: &Chaos, consumer: &str) -> Vec<String> {
    let Some(mut conn) = c.redis_conn().await else {
        return Vec::new();
    };
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&c.stream)
        .arg(&c.group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(consumer)
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    rows.into_iter().map(|(id, ..)| id).collect()
}

/// Duplicates absorbed and max in-process overlap, from a worker's last
/// metrics line.
fn worker_metrics(c: &Chaos, i: usize) -> (u64, u64) {
    let m = c.workers[i]
        .events("metrics")
        .last()
        .cloned()
        .unwrap_or_default();
    (
        m["duplicates"].as_u64().unwrap_or(0),
        m["max_overlap"].as_u64().unwrap_or(0),
    )
}

/// Timers of both parts: `min_idle` 1 s, heartbeat 500 ms (half of it, the
/// most the settings allow), scans every 200 ms.
const MIN_IDLE_MS: u64 = 1_000;

fn configure(c: &mut Chaos, sleep_ms: u64) -> std::path::PathBuf {
    let exec_log = c.log_dir.join("executions.log");
    c.set_env("CHAOS_EXEC_LOG", exec_log.display());
    c.set_env("CHAOS_SLEEP_MS", sleep_ms);
    c.set_env("REDSTREAM__RECLAIM__MIN_IDLE_MS", MIN_IDLE_MS);
    c.set_env("REDSTREAM__RECLAIM__HEARTBEAT_MS", MIN_IDLE_MS / 2);
    c.set_env("REDSTREAM__RECLAIM__INTERVAL_MS", 200);
    exec_log
}

async fn zombie(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F12a zombie SIGSTOP", backend, "aof-always", &[]).await else {
        return;
    };
    let n = c.tier.pick(30, 300);
    let stop_for = Duration::from_millis(3 * MIN_IDLE_MS);
    let exec_log = configure(&mut c, 400);
    // Small batches, one at a time per member: a handler is almost always
    // running, and SQLite writers do not queue behind each other for long.
    c.set_env("REDSTREAM__CONSUMER__COUNT", 2);
    c.set_env("REDSTREAM__CONSUMER__IN_FLIGHT", 2);
    let instances = ["f12a-a", "f12a-b"];
    for name in instances {
        c.spawn_worker(name, 1, true).await;
    }
    reset_stats(&c).await;
    c.start_sampler();
    let (pel, pel_task) = sample_pel(&c);
    let history = c
        .start_producing(n, Duration::from_millis(500))
        .await
        .await
        .expect("producer");

    // Stop a worker while one of its handlers runs (it sleeps 400 ms per
    // entry inside the transaction) and it holds entries: that one is the
    // zombie. Either may be: on SQLite a writer that keeps the write lock
    // can starve the other for many seconds (the lock is not fair).
    let wait = Instant::now();
    let mut caught = None;
    while caught.is_none() && wait.elapsed() < Duration::from_secs(20) {
        for (i, name) in instances.iter().enumerate() {
            if running_in(&exec_log, c.workers[i].pid()) {
                let held = pending_of(&c, &format!("{name}-0")).await;
                if !held.is_empty() {
                    caught = Some((i, held));
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some((z, held)) = caught else {
        panic!("no worker held an entry mid-handler (seed {})", c.seed);
    };
    let h = 1 - z;
    let zombie_member = format!("{}-0", instances[z]);
    let zombie_member = zombie_member.as_str();
    let zombie_pid = c.workers[z].pid();
    c.fault();
    let stopped_at_us = epoch_us();
    signal(zombie_pid, "STOP");
    c.phase(&format!("SIGSTOP zombie holding {} entries", held.len()));
    tokio::time::sleep(stop_for).await;
    let held_after_stall = pending_of(&c, zombie_member).await;
    signal(zombie_pid, "CONT");
    c.phase(&format!(
        "SIGCONT; the zombie still owns {} of them",
        held_after_stall.len()
    ));

    let drain = c.wait_drained(Duration::from_secs(60)).await;
    // Let the zombie's last metrics line come out.
    tokio::time::sleep(Duration::from_millis(700)).await;
    pel_task.abort();
    let execs = executions(&exec_log);
    let (twice, concurrent) = doubles(&execs);
    let mid_handler = execs
        .iter()
        .any(|e| e.pid == zombie_pid && e.start_us < stopped_at_us && e.end_us > stopped_at_us);
    // The zombie's executions caught by the SIGSTOP, and who committed the
    // effect of their events.
    let stalled: Vec<&Execution> = execs
        .iter()
        .filter(|e| e.pid == zombie_pid && e.start_us < stopped_at_us && e.end_us > stopped_at_us)
        .collect();
    let dropped = stalled.iter().filter(|e| !e.completed).count();
    let effected_by = effect_members(&c).await;
    let by_zombie = stalled
        .iter()
        .filter(|e| effected_by.get(&e.seq).is_some_and(|m| m == zombie_member))
        .count();
    let heartbeats = command_calls(&c, "xclaim").await;
    let log = std::mem::take(&mut *pel.lock().unwrap_or_else(|e| e.into_inner()));
    let taken_back = log.taken_back();
    let took_over = Path::new(&c.log_dir).join(format!("{}.log", instances[z]));
    let lost_warnings = std::fs::read_to_string(&took_over)
        .unwrap_or_default()
        .matches("taken over by another member")
        .count();
    let (dup_z, _) = worker_metrics(&c, z);
    let (dup_h, _) = worker_metrics(&c, h);
    let note = format!(
        "SIGSTOP {:.1}s (3×min_idle) holding {} entries, mid-handler {mid_handler}; reclaimed {} entries, taken back by the zombie {}; double executions {twice} (concurrent {concurrent}), stalled zombie executions {} (handler future dropped {dropped}; effect committed by the zombie {by_zombie}, by the healthy member {}), zombie 'taken over' warnings {lost_warnings}; duplicates absorbed {} (zombie {dup_z}, healthy {dup_h}); max delivery count {}; heartbeat XCLAIMs {heartbeats}",
        stop_for.as_secs_f64(),
        held.len(),
        log.reclaimed(),
        taken_back.len(),
        stalled.len(),
        stalled.len() - by_zombie,
        dup_z + dup_h,
        log.max_delivered,
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "{:?}", v.dead_lettered);
    assert_eq!(v.effected_once, n, "every event effected once");
    assert!(
        held_after_stall.len() < held.len(),
        "nothing was reclaimed from the stopped zombie within 3×min_idle: {held_after_stall:?}"
    );
    assert!(log.reclaimed() > 0, "no entry changed owner");
    assert!(mid_handler, "the zombie was not stopped mid-handler");
    // Each loss is reported once (a batch whose entry was lost keeps running
    // until its ownership check; it must not be re-reported at every
    // heartbeat meanwhile).
    assert!(
        lost_warnings <= held.len() + log.reclaimed(),
        "{lost_warnings} 'taken over' warnings for {} entries held (seed {})",
        held.len(),
        c.seed
    );
    assert!(
        taken_back.is_empty(),
        "the zombie took entries back after SIGCONT: {taken_back:?}"
    );
    // After SIGCONT the zombie checks ownership before committing (its
    // confirmations are stale) and leaves out what was taken over.
    assert!(
        by_zombie <= held_after_stall.len(),
        "the zombie committed {by_zombie} effects of entries taken over during its stall (seed {})",
        c.seed
    );
    assert!(
        c.workers[z].alive() && c.workers[h].alive(),
        "workers alive"
    );
    c.shutdown().await;
}

async fn long_handler(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F12b long handler", backend, "aof-always", &[]).await else {
        return;
    };
    let n = c.tier.pick(6, 40);
    let run_for = 2 * MIN_IDLE_MS;
    let exec_log = configure(&mut c, run_for);
    // One entry per read and one at a time per member: each entry runs
    // 2×min_idle with nothing but the heartbeat keeping it.
    c.set_env("REDSTREAM__CONSUMER__COUNT", 1);
    c.set_env("REDSTREAM__CONSUMER__IN_FLIGHT", 1);
    c.spawn_worker("f12b-a", 1, true).await;
    c.spawn_worker("f12b-b", 1, true).await;
    reset_stats(&c).await;
    c.start_sampler();
    let (pel, pel_task) = sample_pel(&c);
    let history = c
        .start_producing(n, Duration::from_millis(200))
        .await
        .await
        .expect("producer");
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    pel_task.abort();
    let execs = executions(&exec_log);
    let (twice, concurrent) = doubles(&execs);
    let longest = execs
        .iter()
        .map(|e| e.end_us.saturating_sub(e.start_us))
        .max()
        .unwrap_or(0);
    let heartbeats = command_calls(&c, "xclaim").await;
    let autoclaims = command_calls(&c, "xautoclaim").await;
    let log = std::mem::take(&mut *pel.lock().unwrap_or_else(|e| e.into_inner()));
    let (dup_a, overlap_a) = worker_metrics(&c, 0);
    let (dup_b, overlap_b) = worker_metrics(&c, 1);
    let note = format!(
        "handler {:.1}s (2×min_idle); executions {} (double {twice}, concurrent {concurrent}, longest {:.2}s); reclaimed 0 expected: {}; max delivery count {}; max idle seen {} ms (min_idle {MIN_IDLE_MS}); heartbeat XCLAIMs {heartbeats}, XAUTOCLAIM scans {autoclaims}; duplicates absorbed {}; max_overlap {}/{}",
        run_for as f64 / 1000.0,
        execs.len(),
        longest as f64 / 1e6,
        log.reclaimed(),
        log.max_delivered,
        log.max_idle_ms,
        dup_a + dup_b,
        overlap_a,
        overlap_b,
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "{:?}", v.dead_lettered);
    assert_eq!(v.effected_once, n, "every event effected once");
    assert!(
        longest >= u128::from(run_for) * 1000,
        "the handler did not run 2×min_idle"
    );
    assert_eq!(concurrent, 0, "an event ran twice at once: {execs:?}");
    assert_eq!(
        log.reclaimed(),
        0,
        "entries of a live handler were reclaimed: {:?}",
        log.owners
    );
    assert!(log.samples > 0, "the pending list was never sampled");
    assert_eq!(log.max_delivered, 1, "the delivery count grew");
    assert!(
        log.max_idle_ms < MIN_IDLE_MS,
        "an entry of a live handler went idle {} ms (min_idle {MIN_IDLE_MS})",
        log.max_idle_ms
    );
    assert!(heartbeats > 0, "no heartbeat extended a claim");
    c.shutdown().await;
}

/// The member that committed each event's effect.
async fn effect_members(c: &Chaos) -> HashMap<i64, String> {
    use sea_orm::ConnectionTrait;
    let rows = c
        .conn
        .query_all_raw(sea_orm::Statement::from_string(
            c.conn.get_database_backend(),
            "SELECT seq, member FROM effects_log",
        ))
        .await
        .expect("effects_log");
    rows.into_iter()
        .filter_map(|r| {
            let seq: i64 = r.try_get_by_index(0).ok()?;
            let member: String = r.try_get_by_index(1).ok()?;
            Some((seq, member))
        })
        .collect()
}

fn epoch_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

scenario_tests! {
    f12a_zombie_sigstop_sqlite => zombie(Backend::Sqlite);
    f12a_zombie_sigstop_pg => zombie(Backend::Postgres);
    f12b_long_handler_sqlite => long_handler(Backend::Sqlite);
    f12b_long_handler_pg => long_handler(Backend::Postgres);
}

//! What both sides do: the same events, the same bookkeeping, the same
//! exactly-once check.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::spec::{RunResult, Spec};

/// Bytes of each event's `data` field.
pub const PAYLOAD_BYTES: usize = 100;

/// Microseconds since the epoch (the clock both sides stamp and read).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What a handler reads from an event's `data`.
#[derive(Debug, Deserialize)]
pub struct BenchEvent {
    /// Position in the run, 0..n.
    pub seq: u64,
    /// Publish time, µs since the epoch.
    pub sent_us: u64,
}

/// The `data` of event `seq`: JSON padded to [`PAYLOAD_BYTES`].
pub fn payload(seq: u64, sent_us: u64) -> String {
    let head = format!(r#"{{"seq":{seq},"sent_us":{sent_us},"pad":""#);
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(PAYLOAD_BYTES);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// Counts how often each event was handled.
pub struct Tally {
    counts: Vec<AtomicU8>,
    handled: AtomicU64,
}

/// What the exactly-once check found.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Check {
    pub missing: u64,
    pub duplicated: u64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicated == 0
    }
}

impl Tally {
    pub fn new(n: u64) -> Tally {
        Tally {
            counts: (0..n).map(|_| AtomicU8::new(0)).collect(),
            handled: AtomicU64::new(0),
        }
    }

    pub fn record(&self, seq: u64) {
        if let Some(c) = self.counts.get(seq as usize) {
            c.fetch_add(1, Relaxed);
        }
        self.handled.fetch_add(1, Relaxed);
    }

    pub fn handled(&self) -> u64 {
        self.handled.load(Relaxed)
    }

    pub fn check(&self) -> Check {
        let mut check = Check::default();
        for c in &self.counts {
            match c.load(Relaxed) {
                0 => check.missing += 1,
                1 => {}
                _ => check.duplicated += 1,
            }
        }
        check
    }
}

/// End-to-end latencies in µs.
#[derive(Default)]
pub struct Latencies(Mutex<Vec<u32>>);

impl Latencies {
    pub fn extend(&self, values: impl IntoIterator<Item = u32>) {
        if let Ok(mut v) = self.0.lock() {
            v.extend(values);
        }
    }

    /// p50, p99 and p99.9 in ms (`None` when nothing was recorded).
    pub fn percentiles(&self) -> Option<[f64; 3]> {
        let mut v = self.0.lock().ok()?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i]) / 1000.0
        };
        Some([at(0.50), at(0.99), at(0.999)])
    }
}

/// What either side records while a run goes: which events were handled,
/// how many acks returned and when, and the latencies.
pub struct Progress {
    pub tally: Tally,
    pub latencies: Latencies,
    acked: AtomicU64,
    last_ack_us: AtomicU64,
}

impl Progress {
    pub fn new(events: u64) -> Progress {
        Progress {
            tally: Tally::new(events),
            latencies: Latencies::default(),
            acked: AtomicU64::new(0),
            last_ack_us: AtomicU64::new(0),
        }
    }

    /// `n` entries were acked at `now_us`.
    pub fn acked(&self, n: u64, now_us: u64) {
        self.last_ack_us.fetch_max(now_us, Relaxed);
        self.acked.fetch_add(n, Relaxed);
    }

    /// Waits until every event of the run is acked, or the run's ceiling.
    pub async fn wait_all_acked(&self, spec: &Spec) -> anyhow::Result<()> {
        let ceiling = crate::ceiling(spec);
        let deadline = tokio::time::Instant::now() + ceiling;
        while self.acked.load(Relaxed) < spec.events {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "only {} of {} acked within {ceiling:?} (handled {})",
                    self.acked.load(Relaxed),
                    spec.events,
                    self.tally.handled()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// The run's result: from `start_us` to the last ack.
    pub fn result(
        &self,
        spec: &Spec,
        start_us: u64,
        redis_cpu_s: f64,
        pending_after: u64,
    ) -> RunResult {
        let seconds = self.last_ack_us.load(Relaxed).saturating_sub(start_us) as f64 / 1e6;
        RunResult {
            events: spec.events,
            seconds,
            events_per_s: spec.events as f64 / seconds,
            latency_ms: self.latencies.percentiles(),
            peak_rss_mib: peak_rss_kib() as f64 / 1024.0,
            redis_cpu_s,
            check: self.tally.check(),
            pending_after,
            ..RunResult::default()
        }
    }
}

/// The id fields every event carries on both sides, so Redis does the same
/// work: `id`, `type`, `v`, `ts`, `data` (the redstream wire format).
pub fn baseline_fields(seq: u64, sent_us: u64) -> [(&'static str, String); 5] {
    [
        ("id", ulid::Ulid::new().to_string()),
        ("type", "bench.event".to_owned()),
        ("v", "1".to_owned()),
        ("ts", (sent_us / 1000).to_string()),
        ("data", payload(seq, sent_us)),
    ]
}

/// The peak resident set size of this process, in KiB.
pub fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

/// The resident set size of this process now, in KiB.
pub fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// A `/proc/self/status` figure in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Redis's CPU time so far (user + system), in seconds.
pub async fn redis_cpu_seconds(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = match redis::cmd("INFO").arg("cpu").query_async(conn).await {
        Ok(s) => s,
        Err(_) => return 0.0,
    };
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// Stream `i` of a many-streams run.
pub fn stream_name(spec: &Spec, i: usize) -> String {
    format!("{}:{i}", spec.stream)
}

/// Publishes every event of a many-streams run, event `seq` to stream
/// `seq % streams`, in pipelines of 1,000 (the same for both sides).
pub async fn publish_many(
    conn: &mut redis::aio::MultiplexedConnection,
    spec: &Spec,
) -> anyhow::Result<()> {
    const PIPELINE: u64 = 1_000;
    let names: Vec<String> = (0..spec.streams).map(|i| stream_name(spec, i)).collect();
    let mut seq = 0;
    while seq < spec.events {
        let end = (seq + PIPELINE).min(spec.events);
        let mut pipe = redis::pipe();
        for s in seq..end {
            pipe.cmd("XADD")
                .arg(&names[(s % spec.streams as u64) as usize])
                .arg("*");
            for (k, v) in baseline_fields(s, now_us()) {
                pipe.arg(k).arg(v);
            }
            pipe.ignore();
        }
        let () = pipe.query_async(conn).await?;
        seq = end;
    }
    Ok(())
}

/// How long a many-streams run waits after its last ack before measuring
/// the idle cost: periodic work backs off while groups are quiet, and this
/// measures where it settles (the longest backoff is 30 s).
pub const IDLE_SETTLE_SECS: u64 = 35;

/// After a many-streams run: Redis CPU over `spec.idle_secs` of idle, in %
/// of a core (after `IDLE_SETTLE_SECS`, shorter in a smoke run), and the
/// clients connected (without the one asking).
pub async fn idle_cost(
    conn: &mut redis::aio::MultiplexedConnection,
    spec: &Spec,
) -> anyhow::Result<(f64, u64)> {
    let settle = if spec.idle_secs >= 10 {
        IDLE_SETTLE_SECS
    } else {
        1
    };
    tokio::time::sleep(std::time::Duration::from_secs(settle)).await;
    let before = redis_cpu_seconds(conn).await;
    tokio::time::sleep(std::time::Duration::from_secs(spec.idle_secs)).await;
    let after = redis_cpu_seconds(conn).await;
    let info: String = redis::cmd("INFO").arg("clients").query_async(conn).await?;
    let clients = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let pct = (after - before) / spec.idle_secs.max(1) as f64 * 100.0;
    Ok((pct, clients.saturating_sub(1)))
}

/// Entries still pending over every stream of a many-streams run.
pub async fn pending_many(
    conn: &mut redis::aio::MultiplexedConnection,
    spec: &Spec,
    group: &str,
) -> anyhow::Result<u64> {
    let mut pipe = redis::pipe();
    for i in 0..spec.streams {
        pipe.cmd("XPENDING").arg(stream_name(spec, i)).arg(group);
    }
    let replies: Vec<(u64, redis::Value, redis::Value, redis::Value)> =
        pipe.query_async(conn).await?;
    Ok(replies.iter().map(|r| r.0).sum())
}

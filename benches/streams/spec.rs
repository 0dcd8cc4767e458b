//! One run of one side of one scenario, and what it measured.

use serde::{Deserialize, Serialize};

use crate::workload::Check;

/// The scenarios of BENCHMARKS.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scenario {
    /// As fast as possible, no-op handler.
    Flood,
    /// A steady rate, latency measured.
    Paced,
    /// A steady rate with many members.
    Many,
    /// An exactly-once handler writing to SQLite.
    Sqlite,
    /// An exactly-once handler writing to PostgreSQL.
    Postgres,
    /// Publishing only.
    Produce,
    /// Many quiet streams, a group each, in one process: 10 of them.
    Streams10,
    /// 1,000 streams.
    Streams1k,
    /// 10,000 streams.
    Streams10k,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Flood => "flood",
            Scenario::Paced => "paced",
            Scenario::Many => "many-members",
            Scenario::Sqlite => "idempotent-sqlite",
            Scenario::Postgres => "idempotent-postgres",
            Scenario::Produce => "produce",
            Scenario::Streams10 => "streams-10",
            Scenario::Streams1k => "streams-1000",
            Scenario::Streams10k => "streams-10000",
        }
    }

    pub fn is_database(self) -> bool {
        matches!(self, Scenario::Sqlite | Scenario::Postgres)
    }
}

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// The library.
    Redstream,
    /// Hand-written redis-rs on tokio.
    Baseline,
    /// `redis-benchmark -P 64` (producer scenario only).
    RedisBenchmark,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Redstream => "redstream",
            Side::Baseline => "redis-rs baseline",
            Side::RedisBenchmark => "redis-benchmark -P 64",
        }
    }
}

/// What a child process is asked to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    pub scenario: Scenario,
    pub side: Side,
    /// Events in the run.
    pub events: u64,
    /// Events per second; 0 publishes as fast as possible.
    pub rate: u64,
    /// Group members (consumers).
    pub members: usize,
    pub redis_url: String,
    /// A stream key unique to the run; every key of the run starts with it.
    pub stream: String,
    /// For the database scenarios.
    pub database_url: Option<String>,
    /// Whether end-to-end latency is recorded per event.
    pub track_latency: bool,
    /// Streams `<stream>:0` … `<stream>:<n-1>`, a group each (the
    /// many-streams scenarios); 0: the one stream `<stream>`.
    #[serde(default)]
    pub streams: usize,
    /// Many streams: how long the idle cost is measured after the run.
    #[serde(default)]
    pub idle_secs: u64,
}

/// What one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub events: u64,
    /// From the first publish to the last ack (or the last write, for the
    /// producer scenario).
    pub seconds: f64,
    pub events_per_s: f64,
    /// p50, p99, p99.9 of ack time − publish time, in ms.
    pub latency_ms: Option<[f64; 3]>,
    pub peak_rss_mib: f64,
    /// Redis CPU seconds spent during the run.
    pub redis_cpu_s: f64,
    pub check: Check,
    /// Entries still pending in the group after the run (must be 0).
    pub pending_after: u64,
    /// Why the run has no result.
    pub error: Option<String>,
    /// Many streams: from start to reading every stream (redstream: until
    /// `start()` returned), in seconds.
    #[serde(default)]
    pub startup_s: f64,
    /// Many streams: Redis CPU while idle after the run, in % of a core.
    #[serde(default)]
    pub idle_cpu_pct: f64,
    /// Many streams: client connections the run held open at Redis.
    #[serde(default)]
    pub connections: u64,
    /// Many streams: resident set size at the end of the idle period,
    /// before shutdown (the peak also counts the largest read reply).
    #[serde(default)]
    pub end_rss_mib: f64,
}

impl RunResult {
    /// A run that lost or repeated events, or left entries pending, has no
    /// result.
    pub fn valid(&self) -> bool {
        self.error.is_none() && self.check.ok() && self.pending_after == 0
    }
}

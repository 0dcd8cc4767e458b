//! Typed settings, loaded in layers with `config`.
//!
//! Order (later wins): the built-in defaults (identical to
//! `settings/default.toml`, a test keeps them equal), `settings/default.toml`,
//! `settings/<REDSTREAM_ENV>.toml`, then environment variables named
//! `REDSTREAM__<SECTION>__<KEY>`, e.g. `REDSTREAM__REDIS__URL` or
//! `REDSTREAM__CONSUMER__IN_FLIGHT`. Durations are integers with an `_ms`
//! suffix so that every key can be set from the environment.
//!
//! A bad value stops start-up with [`Error::Settings`] naming the key and what
//! was expected. URLs may carry credentials; their `Debug` and `Display`
//! forms redact the password, and no error message repeats a URL.
//!
//! ```
//! use redstream::Settings;
//!
//! // Built in code: start from the defaults and change what you need.
//! let mut settings = Settings::default();
//! settings.redis.url = "redis://127.0.0.1:6379".parse().unwrap();
//! settings.consumer.in_flight = 32;
//! settings.validate().unwrap();
//!
//! // Or layered over the defaults from TOML text.
//! let settings = Settings::from_toml("[retry]\nmax_attempts = 8\n").unwrap();
//! assert_eq!(settings.retry.max_attempts, 8);
//! ```

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "REDSTREAM";
/// Environment variable naming the settings file layered over the defaults.
pub const ENV_SELECTOR: &str = "REDSTREAM_ENV";

/// All settings of a redstream process.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// Where Redis is and how long to wait for it.
    pub redis: RedisSettings,
    /// The database for exactly-once effects and the outbox.
    pub database: DatabaseSettings,
    /// The transactional outbox relay.
    pub outbox: OutboxSettings,
    /// This process's identity (member names derive from it).
    pub instance: InstanceSettings,
    /// The batching producer.
    pub producer: ProducerSettings,
    /// Defaults for every consumer group's members.
    pub consumer: ConsumerSettings,
    /// Defaults for every group's retry and dead-letter policy.
    pub retry: RetrySettings,
    /// Reclaiming idle entries, heartbeats and member leases.
    pub reclaim: ReclaimSettings,
    /// Restarting failed consumers.
    pub supervision: SupervisionSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
    /// What happens to acked entries.
    pub retention: RetentionSettings,
}

/// `[redis]`: the connection to Redis.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    /// Default `redis://127.0.0.1:6379`.
    pub url: RedisUrl,
    /// How long establishing a connection may take. Default 2000.
    pub connect_timeout_ms: u64,
    /// Response timeout of non-blocking commands (XADD, XACK, XAUTOCLAIM, …).
    /// Blocking reads use `consumer.block_ms` plus a margin instead.
    /// Default 5000.
    pub command_timeout_ms: u64,
    /// Members' blocking reads share one connection and one `XREADGROUP`
    /// per (group name, member name) across the process's streams, so
    /// connections do not grow with the number of streams. `false`: a
    /// blocking connection per member. Default true.
    pub shared_reads: bool,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: RedisUrl::default(),
            connect_timeout_ms: 2_000,
            command_timeout_ms: 5_000,
            shared_reads: true,
        }
    }
}

/// `[database]`: where processed-event keys and the outbox live.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DatabaseSettings {
    /// `sqlite://path?mode=rwc` (the default, a file in the working
    /// directory) or `postgres://user:password@host/db`.
    pub url: DatabaseUrl,
    /// Largest number of pooled connections (SQLite always uses WAL, so
    /// readers do not block the writer). Default 8.
    pub max_connections: u32,
    /// How long to wait for a pooled connection. Default 5000.
    pub acquire_timeout_ms: u64,
    /// Most entries whose effects share one transaction (exactly-once
    /// handlers). Default 100.
    pub batch_size: usize,
    /// SQLite: how long a writer waits for the write lock before the batch
    /// is retried as "database busy". Default 5000.
    pub busy_timeout_ms: u64,
    /// Longest an exactly-once batch's transaction may take. Past it the
    /// batch is abandoned (rolled back) and the database is asked whether
    /// it answers: if not (a hung connection, a partition), the batch runs
    /// again later and spends no attempt; if it does, the batch's entries
    /// run one by one, and one that alone takes longer fails like a handler
    /// error. Keep it above the slowest batch. Default 30000.
    pub batch_timeout_ms: u64,
    /// Whether `Store::connect` runs redstream's migrations (DDL). `false`
    /// for a role without DDL rights: the store then only checks, with a
    /// `SELECT`, that every migration was applied (by a process with `true`,
    /// as a role that may create tables), and fails start-up naming this key
    /// if not. Default true.
    pub migrate: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: DatabaseUrl::default(),
            max_connections: 8,
            acquire_timeout_ms: 5_000,
            batch_size: 100,
            busy_timeout_ms: 5_000,
            batch_timeout_ms: 30_000,
            migrate: true,
        }
    }
}

/// `[outbox]`: relaying the transactional outbox to streams.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OutboxSettings {
    /// How often the relay looks for unsent rows when nothing woke it
    /// (PostgreSQL wakes it at each commit). Default 100.
    pub poll_ms: u64,
    /// Most rows relayed per round. Default 500.
    pub batch_size: usize,
    /// Lifetime of the lease that makes one process the relay of a
    /// database. Default 10000.
    pub lease_ttl_ms: u64,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        OutboxSettings {
            poll_ms: 100,
            batch_size: 500,
            lease_ttl_ms: 10_000,
        }
    }
}

/// `[instance]`: the identity of this process.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct InstanceSettings {
    /// Member names are `<name>-<index>`, stable across restarts so a
    /// restarted member finds its own pending entries. Empty (the default)
    /// means the host name. Two processes on one host need different names;
    /// a lease refuses the second one otherwise.
    pub name: String,
}

impl InstanceSettings {
    /// The configured name, or the host name when none is set.
    pub fn resolved_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        gethostname::gethostname()
            .into_string()
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "redstream".to_owned())
    }
}

/// `[producer]`: the batching producer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProducerSettings {
    /// Most entries written in one pipelined round trip. Default 256.
    pub batch_size: usize,
    /// Most batches being written at once. They go out in order on one
    /// connection, so Redis applies them in publish order; more than one
    /// lets the next batch be encoded while Redis works on the last.
    /// Default 4.
    pub max_in_flight: usize,
    /// Longest time an entry waits for companions before its batch is
    /// written. Default 0: a batch is written as soon as a write slot is
    /// free, so batches form by themselves under load and a lone event is
    /// not delayed (a 1 ms linger costs 1–2 ms of latency at every rate).
    pub linger_ms: u64,
    /// Most events accepted but not yet written; publishers wait beyond it.
    /// Default 10000.
    pub buffer: usize,
    /// Largest encoded entry (all fields) accepted. Default 1048576 (1 MiB).
    pub max_payload_bytes: usize,
    /// `MAXLEN ~` applied to every XADD; 0 (the default) never trims. Per
    /// stream limits can be set in code.
    pub max_len: u64,
    /// How many times a batch is written before its publishers get an
    /// error. Default 5.
    pub publish_attempts: u32,
    /// First pause between write attempts. Default 50.
    pub retry_initial_ms: u64,
    /// Longest pause between write attempts. Default 2000.
    pub retry_max_ms: u64,
    /// Format of the event ids the producer assigns. Default `ulid`.
    pub id_format: IdFormat,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            batch_size: 256,
            max_in_flight: 4,
            linger_ms: 0,
            buffer: 10_000,
            max_payload_bytes: 1 << 20,
            max_len: 0,
            publish_attempts: 5,
            retry_initial_ms: 50,
            retry_max_ms: 2_000,
            id_format: IdFormat::Ulid,
        }
    }
}

/// Format of producer-assigned event ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String", into = "String")]
#[non_exhaustive]
pub enum IdFormat {
    /// 26-character ULID (sortable by creation time).
    #[default]
    Ulid,
    /// RFC 9562 UUID version 7 (sortable by creation time).
    Uuidv7,
}

impl TryFrom<String> for IdFormat {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ulid" => Ok(IdFormat::Ulid),
            "uuidv7" => Ok(IdFormat::Uuidv7),
            _ => Err("expected `ulid` or `uuidv7`".to_owned()),
        }
    }
}

impl From<IdFormat> for String {
    fn from(f: IdFormat) -> String {
        match f {
            IdFormat::Ulid => "ulid",
            IdFormat::Uuidv7 => "uuidv7",
        }
        .to_owned()
    }
}

/// Where a newly created consumer group starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
#[non_exhaustive]
pub enum StartFrom {
    /// From the first entry still in the stream (`0`): nothing written
    /// before the group existed is skipped. The default.
    #[default]
    Beginning,
    /// Only entries written after the group is created (`$`).
    Latest,
}

impl TryFrom<String> for StartFrom {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "beginning" => Ok(StartFrom::Beginning),
            "latest" => Ok(StartFrom::Latest),
            _ => Err("expected `beginning` or `latest`".to_owned()),
        }
    }
}

impl From<StartFrom> for String {
    fn from(s: StartFrom) -> String {
        match s {
            StartFrom::Beginning => "beginning",
            StartFrom::Latest => "latest",
        }
        .to_owned()
    }
}

/// What a group does when its stream or group disappears underneath it
/// (Redis restarted without persistence, `DEL`, `XGROUP DESTROY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
#[non_exhaustive]
pub enum MissingGroupPolicy {
    /// Recreate the group at `0` (MKSTREAM), with backoff and a warning
    /// naming the key: whatever the stream still holds is read again and
    /// absorbed by idempotency. The default.
    #[default]
    Recreate,
    /// Stop the group's members and report the group as failed.
    Fail,
}

impl TryFrom<String> for MissingGroupPolicy {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "recreate" => Ok(MissingGroupPolicy::Recreate),
            "fail" => Ok(MissingGroupPolicy::Fail),
            _ => Err("expected `recreate` or `fail`".to_owned()),
        }
    }
}

impl From<MissingGroupPolicy> for String {
    fn from(p: MissingGroupPolicy) -> String {
        match p {
            MissingGroupPolicy::Recreate => "recreate",
            MissingGroupPolicy::Fail => "fail",
        }
        .to_owned()
    }
}

/// `[consumer]`: defaults for the members of every group.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// Members (consumer actors) per group in this process. Default 1.
    pub members: usize,
    /// Most entries asked for by one XREADGROUP. Default 100.
    pub count: usize,
    /// How long a read blocks waiting for new entries. Default 2000.
    pub block_ms: u64,
    /// Most entries a member holds at once (running or queued; a batch of
    /// an exactly-once handler counts each of its entries). Default 100.
    pub in_flight: usize,
    /// A group stops reading while its pending entries (not counting those
    /// waiting for a retry) are above this; 0 means no bound. Default 10000.
    pub max_pending: u64,
    /// How often the pending count is checked. Default 1000.
    pub pending_check_ms: u64,
    /// Where a group that does not exist yet starts. Default `beginning`.
    pub start_from: StartFrom,
    /// What to do when a group disappears. Default `recreate`.
    pub on_missing_group: MissingGroupPolicy,
    /// Threads (actix arbiters) that run consumers; 0 means one per CPU,
    /// at most 4. Default 0.
    pub workers: usize,
    /// Most members of one group waiting in a blocking read at once; the
    /// others wait their turn in this process, costing Redis nothing. Every
    /// reader blocked on a stream is woken at each XADD, so hundreds of them
    /// cost Redis CPU and latency. Default 4.
    pub blocked_readers: usize,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            members: 1,
            count: 100,
            block_ms: 2_000,
            in_flight: 100,
            max_pending: 10_000,
            pending_check_ms: 1_000,
            start_from: StartFrom::Beginning,
            on_missing_group: MissingGroupPolicy::Recreate,
            workers: 0,
            blocked_readers: 4,
        }
    }
}

/// `[retry]`: defaults for every group's retry and dead-letter policy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetrySettings {
    /// Failed attempts after which an entry is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// Delay before the first retry. Default 1000.
    pub initial_delay_ms: u64,
    /// Each further delay is the previous one times this. Default 2.0.
    pub factor: f64,
    /// Longest delay between attempts. Default 300000 (5 minutes).
    pub max_delay_ms: u64,
    /// Random spread of each delay, as a fraction (0.2 = ±20 %). Default 0.2.
    pub jitter: f64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 5,
            initial_delay_ms: 1_000,
            factor: 2.0,
            max_delay_ms: 300_000,
            jitter: 0.2,
        }
    }
}

/// `[reclaim]`: taking over entries from members that stopped, heartbeats
/// for long handlers, and member leases.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReclaimSettings {
    /// An entry pending longer than this without a heartbeat is taken over
    /// by a live member (XAUTOCLAIM). Default 60000.
    pub min_idle_ms: u64,
    /// How often the reclaimer scans the pending list. Default 5000.
    pub interval_ms: u64,
    /// Entries per XAUTOCLAIM call. Default 100.
    pub count: usize,
    /// How often entries due for a retry are looked for (entries this
    /// process scheduled also wake a timer at their due time). Default 1000.
    pub retry_poll_ms: u64,
    /// How often running handlers extend their claim on their entries; must
    /// be well below `min_idle_ms`. Default 20000.
    pub heartbeat_ms: u64,
    /// Lifetime of a member-name lease; renewed every third of it. Default
    /// 10000.
    pub lease_ttl_ms: u64,
    /// How long start-up waits for a lease held by another process (for
    /// example one killed a moment ago) before failing. Default 15000.
    pub lease_wait_ms: u64,
    /// Consumers (member names) with nothing pending, idle this long and
    /// not leased by a live process are removed from the group, so names of
    /// instances that are gone do not pile up; 0 never removes them.
    /// Default 3600000 (an hour).
    pub remove_idle_consumers_ms: u64,
}

impl Default for ReclaimSettings {
    fn default() -> Self {
        ReclaimSettings {
            min_idle_ms: 60_000,
            interval_ms: 5_000,
            count: 100,
            retry_poll_ms: 1_000,
            heartbeat_ms: 20_000,
            lease_ttl_ms: 10_000,
            lease_wait_ms: 15_000,
            remove_idle_consumers_ms: 3_600_000,
        }
    }
}

/// `[supervision]`: restarting failed consumers.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SupervisionSettings {
    /// First pause before restarting a failed consumer. Default 100.
    pub restart_min_ms: u64,
    /// Longest pause between restarts of one consumer. Default 30000.
    pub restart_max_ms: u64,
    /// How long a group may have no member running in this process before
    /// readiness turns false. Members that are restarting make a group
    /// degraded, not unready; a restart waits at most `restart_max_ms`, so
    /// this must be above it. Default 60000 (twice the default
    /// `restart_max_ms`).
    pub unready_after_ms: u64,
}

impl Default for SupervisionSettings {
    fn default() -> Self {
        SupervisionSettings {
            restart_min_ms: 100,
            restart_max_ms: 30_000,
            unready_after_ms: 60_000,
        }
    }
}

/// `[shutdown]`: graceful stop.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ShutdownSettings {
    /// How long running handlers may take to finish once a stop begins;
    /// entries still running then are released for others, not acked.
    /// Default 30000.
    pub deadline_ms: u64,
}

/// `[retention]`: what happens to entries once they are acked.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetentionSettings {
    /// Delete each entry from the stream when it is acked, on streams that
    /// exactly one group reads (checked at start-up; on a stream several
    /// groups read, acked entries are kept and a warning says so). A deleted
    /// entry can no longer be replayed (`XRANGE`, a new group from the
    /// start); dead-lettered originals stay. Uses `XACKDEL … ACKED` where
    /// the server has it, a script elsewhere; either way an entry a group
    /// still needs is kept. Default false.
    pub delete_acked: bool,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            deadline_ms: 30_000,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl ConsumerSettings {
    /// `block_ms` as a duration.
    pub fn block(&self) -> Duration {
        ms(self.block_ms)
    }
}

impl ReclaimSettings {
    /// `min_idle_ms` as a duration.
    pub fn min_idle(&self) -> Duration {
        ms(self.min_idle_ms)
    }
}

impl Settings {
    /// Loads `settings/default.toml`, `settings/<REDSTREAM_ENV>.toml` and the
    /// `REDSTREAM__…` environment, relative to the working directory.
    pub fn load() -> Result<Self> {
        Self::load_from("settings")
    }

    /// Like [`Settings::load`], with the settings directory given.
    ///
    /// `default.toml` is optional (the built-in defaults are the same); the
    /// file named by `REDSTREAM_ENV` is required when that variable is set.
    pub fn load_from(dir: impl AsRef<Path>) -> Result<Self> {
        let env = std::env::var(ENV_SELECTOR).ok().filter(|e| !e.is_empty());
        let env_vars = std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX));
        Self::load_layers(dir.as_ref(), env.as_deref(), env_vars.collect())
    }

    /// The layering behind [`Settings::load_from`], with the environment
    /// passed in (tests use this so they need not touch process globals).
    pub fn load_layers(
        dir: &Path,
        env_name: Option<&str>,
        env_vars: std::collections::HashMap<String, String>,
    ) -> Result<Self> {
        use config::{Config, Environment, File};
        let mut builder =
            Config::builder().add_source(File::from(dir.join("default.toml")).required(false));
        if let Some(name) = env_name {
            let file = dir.join(format!("{name}.toml"));
            if !file.exists() {
                return Err(Error::settings(
                    ENV_SELECTOR,
                    format!("names `{name}`, but {} does not exist", file.display()),
                ));
            }
            builder = builder.add_source(File::from(file).required(true));
        }
        let env_source = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .source(Some(env_vars));
        let config = builder
            .add_source(env_source)
            .build()
            .map_err(config_error)?;
        let settings: Settings = config.try_deserialize().map_err(config_error)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses TOML text layered over the defaults, then validates it.
    pub fn from_toml(text: &str) -> Result<Self> {
        use config::{Config, File, FileFormat};
        let settings: Settings = Config::builder()
            .add_source(File::from_str(text, FileFormat::Toml))
            .build()
            .and_then(Config::try_deserialize)
            .map_err(config_error)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks ranges and relations between keys. Called by every loader and
    /// by [`Processor`](crate::Processor) at start-up, so settings built in
    /// code are checked too.
    pub fn validate(&self) -> Result<()> {
        fn at_least(key: &str, value: u64, min: u64) -> Result<()> {
            if value < min {
                return Err(Error::settings(
                    key,
                    format!("must be at least {min}, got {value}"),
                ));
            }
            Ok(())
        }
        let p = &self.producer;
        at_least("redis.connect_timeout_ms", self.redis.connect_timeout_ms, 1)?;
        at_least("redis.command_timeout_ms", self.redis.command_timeout_ms, 1)?;
        at_least(
            "database.max_connections",
            self.database.max_connections.into(),
            1,
        )?;
        at_least(
            "database.batch_timeout_ms",
            self.database.batch_timeout_ms,
            1,
        )?;
        at_least("producer.batch_size", p.batch_size as u64, 1)?;
        at_least("producer.max_in_flight", p.max_in_flight as u64, 1)?;
        at_least("producer.buffer", p.buffer as u64, 1)?;
        at_least("producer.max_payload_bytes", p.max_payload_bytes as u64, 64)?;
        at_least("producer.publish_attempts", p.publish_attempts.into(), 1)?;
        if p.retry_max_ms < p.retry_initial_ms {
            return Err(Error::settings(
                "producer.retry_max_ms",
                "must not be below producer.retry_initial_ms",
            ));
        }
        let c = &self.consumer;
        at_least("consumer.members", c.members as u64, 1)?;
        at_least("consumer.count", c.count as u64, 1)?;
        at_least("consumer.block_ms", c.block_ms, 1)?;
        at_least("consumer.in_flight", c.in_flight as u64, 1)?;
        at_least("consumer.blocked_readers", c.blocked_readers as u64, 1)?;
        at_least("consumer.pending_check_ms", c.pending_check_ms, 10)?;
        let r = &self.retry;
        at_least("retry.max_attempts", r.max_attempts.into(), 1)?;
        if !(r.factor.is_finite() && r.factor >= 1.0) {
            return Err(Error::settings(
                "retry.factor",
                "must be a number of at least 1.0",
            ));
        }
        if !(r.jitter.is_finite() && (0.0..=1.0).contains(&r.jitter)) {
            return Err(Error::settings(
                "retry.jitter",
                "must be a fraction between 0.0 and 1.0",
            ));
        }
        if r.max_delay_ms < r.initial_delay_ms {
            return Err(Error::settings(
                "retry.max_delay_ms",
                "must not be below retry.initial_delay_ms",
            ));
        }
        let rc = &self.reclaim;
        at_least("reclaim.min_idle_ms", rc.min_idle_ms, 100)?;
        at_least("reclaim.interval_ms", rc.interval_ms, 10)?;
        at_least("reclaim.count", rc.count as u64, 1)?;
        at_least("reclaim.retry_poll_ms", rc.retry_poll_ms, 10)?;
        at_least("reclaim.heartbeat_ms", rc.heartbeat_ms, 10)?;
        if rc.heartbeat_ms * 2 > rc.min_idle_ms {
            return Err(Error::settings(
                "reclaim.heartbeat_ms",
                format!(
                    "must be at most half of reclaim.min_idle_ms ({}), or live handlers lose their entries",
                    rc.min_idle_ms
                ),
            ));
        }
        at_least("reclaim.lease_ttl_ms", rc.lease_ttl_ms, 300)?;
        let s = &self.supervision;
        at_least("supervision.restart_min_ms", s.restart_min_ms, 1)?;
        if s.restart_max_ms < s.restart_min_ms {
            return Err(Error::settings(
                "supervision.restart_max_ms",
                "must not be below supervision.restart_min_ms",
            ));
        }
        if s.unready_after_ms <= s.restart_max_ms {
            return Err(Error::settings(
                "supervision.unready_after_ms",
                format!(
                    "must be above supervision.restart_max_ms ({}), or a group whose members are only restarting turns unready",
                    s.restart_max_ms
                ),
            ));
        }
        Ok(())
    }
}

fn config_error(e: config::ConfigError) -> Error {
    use config::ConfigError;
    let key = match &e {
        ConfigError::Type { key: Some(k), .. } | ConfigError::At { key: Some(k), .. } => k.clone(),
        ConfigError::NotFound(k) => k.clone(),
        ConfigError::FileParse { uri: Some(uri), .. } => uri.clone(),
        _ => "settings".to_owned(),
    };
    Error::settings(key, e.to_string())
}

/// Writes a URL with its password replaced by `***`.
fn write_redacted(f: &mut fmt::Formatter<'_>, raw: &str) -> fmt::Result {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            f.write_str(u.as_str())
        }
        Err(_) => f.write_str("<unparsable url>"),
    }
}

/// A Redis URL. Its `Debug` and `Display` hide the password, so it can be
/// logged; [`RedisUrl::expose`] gives the full text to the client.
///
/// ```
/// let url: redstream::RedisUrl = "rediss://app:s3cret@cache.internal:6380/2".parse().unwrap();
/// assert_eq!(url.to_string(), "rediss://app:***@cache.internal:6380/2");
/// assert!(url.is_tls());
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL with credentials, for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the URL asks for TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }
}

impl Default for RedisUrl {
    fn default() -> Self {
        RedisUrl("redis://127.0.0.1:6379".to_owned())
    }
}

impl FromStr for RedisUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        RedisUrl::try_from(s.to_owned()).map_err(|reason| Error::settings("redis.url", reason))
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        // The value itself is never echoed: it may hold a password.
        let parsed = url::Url::parse(&s)
            .map_err(|e| format!("expected a redis:// or rediss:// URL ({e})"))?;
        match parsed.scheme() {
            "redis" | "rediss" => {}
            "redis+unix" | "unix" => {}
            other => {
                return Err(format!(
                    "expected a redis:// or rediss:// URL, got scheme `{other}`"
                ));
            }
        }
        if parsed.scheme().starts_with("redis") && parsed.host_str().unwrap_or("").is_empty() {
            return Err("expected a host in the redis URL".to_owned());
        }
        redis::Client::open(s.as_str())
            .map_err(|e| format!("not accepted by the redis client: {}", e.category()))?;
        Ok(RedisUrl(s))
    }
}

impl From<RedisUrl> for String {
    fn from(u: RedisUrl) -> String {
        u.0
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_redacted(f, &self.0)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisUrl(")?;
        write_redacted(f, &self.0)?;
        f.write_str(")")
    }
}

/// A database URL (`sqlite://…` or `postgres://…`). Like [`RedisUrl`], its
/// `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL with credentials, for the database driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether this is a SQLite URL.
    pub fn is_sqlite(&self) -> bool {
        self.0.starts_with("sqlite:")
    }
}

impl Default for DatabaseUrl {
    fn default() -> Self {
        DatabaseUrl("sqlite://redstream.db?mode=rwc".to_owned())
    }
}

impl FromStr for DatabaseUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DatabaseUrl::try_from(s.to_owned())
            .map_err(|reason| Error::settings("database.url", reason))
    }
}

impl TryFrom<String> for DatabaseUrl {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        let ok = ["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|p| s.starts_with(p));
        if !ok {
            return Err("expected a sqlite:// or postgres:// URL".to_owned());
        }
        Ok(DatabaseUrl(s))
    }
}

impl From<DatabaseUrl> for String {
    fn from(u: DatabaseUrl) -> String {
        u.0
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_redacted(f, &self.0)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(")?;
        write_redacted(f, &self.0)?;
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn repo_settings_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("settings")
    }

    #[test]
    fn default_toml_matches_built_in_defaults() {
        let loaded = Settings::load_layers(&repo_settings_dir(), None, HashMap::new())
            .expect("settings/default.toml loads");
        assert_eq!(loaded, Settings::default());
    }

    #[test]
    fn every_key_in_default_toml_is_commented() {
        let text = std::fs::read_to_string(repo_settings_dir().join("default.toml"))
            .expect("settings/default.toml exists");
        let mut previous = "";
        for line in text.lines() {
            let t = line.trim();
            let is_key = !t.is_empty() && !t.starts_with('#') && !t.starts_with('[');
            if is_key {
                assert!(
                    previous.starts_with('#'),
                    "key without a comment above it: {t}"
                );
            }
            previous = t;
        }
        // And every field of the struct appears in the file.
        let defaults = serde_json::to_value(Settings::default()).expect("serializes");
        for (section, fields) in defaults.as_object().expect("object") {
            assert!(
                text.contains(&format!("[{section}]")),
                "missing [{section}]"
            );
            for field in fields.as_object().expect("section is a table").keys() {
                assert!(
                    text.contains(&format!("\n{field} =")),
                    "missing {section}.{field}"
                );
            }
        }
    }

    #[test]
    fn environment_overrides_files() {
        let env = HashMap::from([
            ("REDSTREAM__CONSUMER__IN_FLIGHT".to_owned(), "7".to_owned()),
            (
                "REDSTREAM__REDIS__URL".to_owned(),
                "redis://u:pw@127.0.0.1:7000/1".to_owned(),
            ),
            (
                "REDSTREAM__PRODUCER__ID_FORMAT".to_owned(),
                "uuidv7".to_owned(),
            ),
            ("REDSTREAM__RETRY__FACTOR".to_owned(), "1.5".to_owned()),
        ]);
        let s = Settings::load_layers(&repo_settings_dir(), None, env).expect("loads");
        assert_eq!(s.consumer.in_flight, 7);
        assert_eq!(s.redis.url.expose(), "redis://u:pw@127.0.0.1:7000/1");
        assert_eq!(s.producer.id_format, IdFormat::Uuidv7);
        assert_eq!(s.retry.factor, 1.5);
    }

    #[test]
    fn env_file_layers_between_defaults_and_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("default.toml"), "[consumer]\ncount = 10\n").expect("w");
        std::fs::write(
            dir.path().join("staging.toml"),
            "[consumer]\ncount = 20\nblock_ms = 500\n",
        )
        .expect("w");
        let env = HashMap::from([("REDSTREAM__CONSUMER__COUNT".to_owned(), "30".to_owned())]);
        let s = Settings::load_layers(dir.path(), Some("staging"), env).expect("loads");
        assert_eq!(s.consumer.count, 30);
        assert_eq!(s.consumer.block_ms, 500);

        let missing = Settings::load_layers(dir.path(), Some("prod"), HashMap::new())
            .expect_err("missing env file");
        assert!(missing.to_string().contains("REDSTREAM_ENV"), "{missing}");
    }

    fn key_of(e: &Error) -> &str {
        match e {
            Error::Settings { key, .. } => key,
            other => panic!("not a settings error: {other}"),
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("[producer]\nbatch_size = \"lots\"", "producer.batch_size"),
            ("[producer]\nbatch_size = 0", "producer.batch_size"),
            ("[retry]\nfactor = 0.5", "retry.factor"),
            ("[producer]\nid_format = \"uuidv4\"", "producer.id_format"),
            ("[redis]\nurl = \"http://x\"", "redis.url"),
            ("[consumer]\nstart_from = \"middle\"", "consumer.start_from"),
            (
                "[reclaim]\nmin_idle_ms = 1000\nheartbeat_ms = 900",
                "reclaim.heartbeat_ms",
            ),
            ("[redis]\nurll = \"redis://x\"", "redis"),
            (
                "[retention]\ndelete_acked = \"sometimes\"",
                "retention.delete_acked",
            ),
        ];
        for (toml, key) in cases {
            let e = Settings::from_toml(toml).expect_err(toml);
            assert_eq!(key_of(&e), key, "{toml}: {e}");
        }
    }

    #[test]
    fn bad_environment_value_names_the_key() {
        let env = HashMap::from([("REDSTREAM__CONSUMER__COUNT".to_owned(), "many".to_owned())]);
        let e = Settings::load_layers(&repo_settings_dir(), None, env).expect_err("bad");
        assert_eq!(key_of(&e), "consumer.count");
        assert!(e.to_string().contains("integer"), "{e}");
    }

    #[test]
    fn delete_acked_is_off_unless_set_and_a_bad_value_names_it() {
        assert!(!Settings::default().retention.delete_acked);
        let env = HashMap::from([(
            "REDSTREAM__RETENTION__DELETE_ACKED".to_owned(),
            "maybe".to_owned(),
        )]);
        let e = Settings::load_layers(&repo_settings_dir(), None, env).expect_err("bad");
        assert_eq!(key_of(&e), "retention.delete_acked");
        let env = HashMap::from([(
            "REDSTREAM__RETENTION__DELETE_ACKED".to_owned(),
            "true".to_owned(),
        )]);
        let s = Settings::load_layers(&repo_settings_dir(), None, env).expect("valid");
        assert!(s.retention.delete_acked);
    }

    #[test]
    fn credentials_never_shown() {
        let toml = "[redis]\nurl = \"http://user:hunter2@x\"";
        let e = Settings::from_toml(toml).expect_err("bad scheme");
        assert!(!e.to_string().contains("hunter2"), "{e}");

        let s = Settings::from_toml("[redis]\nurl = \"redis://user:hunter2@127.0.0.1:1/0\"")
            .expect("valid");
        let shown = format!("{s:?} {}", s.redis.url);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user:***@127.0.0.1"), "{shown}");

        let db: DatabaseUrl = "postgres://app:topsecret@db/x".parse().expect("valid");
        assert!(!format!("{db} {db:?}").contains("topsecret"));
    }
}

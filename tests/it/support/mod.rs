//! Shared test harness: isolation per test, waiting for conditions, and
//! test-owned Redis servers for faults that hit every client.

#![allow(dead_code)]

pub mod browser;
pub mod db;
pub mod examples;
pub mod redis_server;

use std::future::Future;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redstream::{Event, Group, Processor, Producer, Published, Settings, Store};
use sea_orm::ConnectionTrait;

pub use redis_server::RedisServer;

/// The shared Redis used by tests that do not break it.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Whether the tests run in CI, where a missing service is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Installs a test log subscriber once (RUST_LOG to see it; `warn` when
/// it is not set).
pub fn init_tracing() {
    init_tracing_at("warn");
}

/// Installs a test log subscriber once, filtering with RUST_LOG, or with
/// `default` when it is not set.
pub fn init_tracing_at(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_test_writer()
        .try_init();
}

/// Log lines written on this thread while the guard lives (plain text,
/// WARN and above), for tests of what the library logs. The group
/// supervisors run on the thread that starts the processor.
pub fn capture_warnings() -> (
    tracing::subscriber::DefaultGuard,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    capture_logs(tracing::Level::WARN)
}

/// Like [`capture_warnings`], for `level` and above.
pub fn capture_logs(
    level: tracing::Level,
) -> (
    tracing::subscriber::DefaultGuard,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    #[derive(Clone)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = std::sync::Arc::<std::sync::Mutex<Vec<u8>>>::default();
    let sink = Sink(std::sync::Arc::clone(&buffer));
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(true)
        .with_writer(move || sink.clone())
        .finish();
    (tracing::subscriber::set_default(subscriber), buffer)
}

/// One test's isolation: a unique key prefix on the shared Redis, and every
/// key under it deleted on drop.
pub struct TestContext {
    pub prefix: String,
    pub url: String,
    client: redis::Client,
}

impl TestContext {
    /// A context on the shared Redis; `None` (test skipped, with a printed
    /// reason) when it does not answer outside CI.
    pub fn new() -> Option<Self> {
        Self::with_url(&redis_url())
    }

    /// A context on a given Redis (a test-owned server).
    pub fn with_url(url: &str) -> Option<Self> {
        init_tracing();
        let client = redis::Client::open(url).expect("valid REDIS_URL");
        let reachable = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok();
        if !reachable {
            assert!(!in_ci(), "Redis at {url} does not answer, and CI=true");
            eprintln!("SKIPPED: Redis at {url} does not answer; run scripts/test.sh to start one");
            return None;
        }
        let prefix = format!("rstest:{}", ulid::Ulid::new().to_string().to_lowercase());
        Some(TestContext {
            prefix,
            url: url.to_owned(),
            client,
        })
    }

    /// A stream name unique to this test.
    pub fn stream(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// Settings for fast tests: short blocks, timers and backoffs, a unique
    /// instance name.
    pub fn settings(&self) -> Settings {
        let mut s = Settings::default();
        s.redis.url = self.url.parse().expect("valid url");
        s.instance.name = format!("t{}", &self.prefix[self.prefix.len() - 6..]);
        s.consumer.block_ms = 200;
        s.consumer.pending_check_ms = 100;
        s.consumer.workers = 2;
        s.retry.initial_delay_ms = 50;
        s.retry.max_delay_ms = 1_000;
        s.reclaim.min_idle_ms = 2_000;
        s.reclaim.interval_ms = 200;
        s.reclaim.retry_poll_ms = 50;
        s.reclaim.heartbeat_ms = 500;
        s.reclaim.lease_ttl_ms = 2_000;
        s.reclaim.lease_wait_ms = 5_000;
        s.supervision.restart_min_ms = 20;
        s.supervision.restart_max_ms = 500;
        s.shutdown.deadline_ms = 5_000;
        s
    }

    /// A test-owned Redis ([`RedisServer::start`]) and a context on it, for
    /// tests that hurt the server; `None` as for [`with_url`](Self::with_url).
    pub fn on_own_server() -> Option<(RedisServer, TestContext)> {
        let server = RedisServer::start();
        let ctx = TestContext::with_url(&server.url())?;
        Some((server, ctx))
    }

    /// A plain redis-rs connection, for checking and for writing entries the
    /// way other clients do.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis")
    }

    /// Creates `group` on `stream` (and the stream) from its first entry,
    /// as another client would: `XGROUP CREATE … 0 MKSTREAM`.
    pub async fn create_group(&self, stream: &str, group: &str) {
        self.xgroup(&["CREATE", stream, group, "0", "MKSTREAM"])
            .await;
    }

    /// Moves `group`'s last-delivered id back to the start (`XGROUP SETID
    /// … 0`): every entry is delivered to it again.
    pub async fn replay_group(&self, stream: &str, group: &str) {
        self.xgroup(&["SETID", stream, group, "0"]).await;
    }

    /// `XGROUP <args>`, which must succeed.
    async fn xgroup(&self, args: &[&str]) {
        let mut c = self.conn().await;
        let _: () = redis::cmd("XGROUP")
            .arg(args)
            .query_async(&mut c)
            .await
            .unwrap();
    }

    /// Creates `groups` on `stream` from its start, then adds `n` `f v`
    /// entries as another client would; returns their ids.
    pub async fn stream_with_groups(&self, stream: &str, groups: &[&str], n: usize) -> Vec<String> {
        for g in groups {
            self.create_group(stream, g).await;
        }
        let mut c = self.conn().await;
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(xadd(&mut c, stream, "*").await);
        }
        ids
    }

    /// XPENDING count of a group.
    pub async fn pending(&self, stream: &str, group: &str) -> u64 {
        let mut c = self.conn().await;
        let reply: redis::Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .query_async(&mut c)
            .await
            .expect("XPENDING");
        match reply {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// `XPENDING <stream> <group> - + <count>`: (id, consumer, ms idle,
    /// deliveries) of each pending entry.
    pub async fn pending_entries(
        &self,
        stream: &str,
        group: &str,
        count: usize,
    ) -> Vec<(String, String, u64, u64)> {
        let mut c = self.conn().await;
        redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(count)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Waits up to `timeout` until `group` has nothing pending; panics
    /// after that.
    pub async fn eventually_nothing_pending(&self, stream: &str, group: &str, timeout: Duration) {
        eventually(timeout, "nothing pending", || async {
            self.pending(stream, group).await == 0
        })
        .await;
    }

    /// XLEN of a stream.
    pub async fn xlen(&self, stream: &str) -> u64 {
        let mut c = self.conn().await;
        c.xlen(stream).await.expect("XLEN")
    }

    /// The ids of every entry of a stream, oldest first.
    pub async fn entry_ids(&self, stream: &str) -> Vec<String> {
        self.entries(stream)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// All entries of a stream as (id, fields as lossy strings, sorted).
    /// Parsed from raw values: redis-rs's typed stream replies reject
    /// non-UTF-8 field names.
    pub async fn entries(&self, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut c = self.conn().await;
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .expect("XRANGE");
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            other => format!("{other:?}"),
        };
        let redis::Value::Array(items) = reply else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| match item {
                redis::Value::Array(pair) if pair.len() == 2 => {
                    let fields = match &pair[1] {
                        redis::Value::Array(flat) => {
                            let mut f: Vec<(String, String)> = flat
                                .chunks(2)
                                .map(|kv| (text(&kv[0]), text(&kv[1])))
                                .collect();
                            f.sort();
                            f
                        }
                        _ => Vec::new(),
                    };
                    Some((text(&pair[0]), fields))
                }
                _ => None,
            })
            .collect()
    }
}

impl Drop for TestContext {
    fn drop(&mut self) {
        let Ok(mut c) = self
            .client
            .get_connection_with_timeout(Duration::from_secs(2))
        else {
            return;
        };
        let keys: Vec<String> = match redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut c)
        {
            Ok(keys) => keys,
            Err(_) => return,
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut c);
        }
    }
}

/// Adds one `f v` entry to `stream` with `id` (`*` for a new one), as
/// another client would; returns its id.
pub async fn xadd(c: &mut redis::aio::MultiplexedConnection, stream: &str, id: &str) -> String {
    redis::cmd("XADD")
        .arg(stream)
        .arg(id)
        .arg("f")
        .arg("v")
        .query_async(c)
        .await
        .unwrap()
}

/// Starts a processor with `settings` and this one group.
pub async fn start_group(settings: Settings, group: Group) -> Processor {
    Processor::builder(settings)
        .group(group)
        .start()
        .await
        .expect("start the processor")
}

/// The event `n` with data `{"n": n}`.
pub fn numbered(n: impl serde::Serialize) -> Event {
    Event::new("n", &serde_json::json!({ "n": n })).unwrap()
}

/// The column `n` of every row `sql` selects, in order.
pub async fn select_n(store: &Store, sql: &str) -> Vec<i64> {
    let rows = store
        .connection()
        .query_all_raw(sea_orm::Statement::from_string(
            store.backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap();
    rows.iter().map(|r| r.try_get("", "n").unwrap()).collect()
}

/// Reads up to `count` new entries of `stream` for `group` as `consumer`
/// (`XREADGROUP … >`), as another client would; returns their ids.
pub async fn read_group(
    c: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(c)
        .await
        .unwrap();
    reply
        .keys
        .iter()
        .flat_map(|k| k.ids.iter().map(|i| i.id.clone()))
        .collect()
}

/// Publishes one event to `stream`, which must succeed.
pub async fn publish_one(processor: &Processor, stream: &str, event: Event) -> Published {
    processor.producer().publish(stream, event).await.unwrap()
}

/// Waits up to 5 s until every member of `group` on `stream` runs;
/// panics with `what` after that.
pub async fn eventually_all_alive(processor: &Processor, stream: &str, group: &str, what: &str) {
    eventually(Duration::from_secs(5), what, || async {
        processor
            .group_status(stream, group)
            .await
            .unwrap()
            .all_alive()
    })
    .await;
}

/// The one row `sql` selects.
pub async fn select_row(store: &Store, sql: &str) -> sea_orm::QueryResult {
    store
        .connection()
        .query_one_raw(sea_orm::Statement::from_string(
            store.backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap()
        .unwrap()
}

/// Publishes `events` to `stream` in one batch and asserts that every one
/// of them was published.
pub async fn publish_all(producer: &Producer, stream: &str, events: Vec<Event>) {
    let results = producer.publish_batch(stream, events).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "publish {i} to {stream}: {r:?}");
    }
}

/// One test per database for a scenario `async fn(TestDb)`: `$sqlite` on
/// a fresh SQLite file, `$postgres` on a fresh PostgreSQL database
/// (skipped with a message when PostgreSQL does not answer outside CI).
macro_rules! on_both_databases {
    ($sqlite:ident, $postgres:ident, $scenario:ident) => {
        #[actix_rt::test]
        async fn $sqlite() {
            $scenario($crate::support::db::TestDb::sqlite()).await;
        }

        #[actix_rt::test]
        async fn $postgres() {
            if let Some(db) = $crate::support::db::TestDb::postgres().await {
                $scenario(db).await;
            }
        }
    };
}
pub(crate) use on_both_databases;

/// Waits until `check` returns true, polling every 20 ms; panics with
/// `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

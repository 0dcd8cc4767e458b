//! The broker traits for Redis Streams (Redis 7.0+). Every Redis command
//! the crate sends is in this directory, split by concern:
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | connecting, server features, key names |
//! | `settle.rs` | [`Streams`](crate::broker::Streams): groups, publish, readers, ack, retries, dead letters, release |
//! | `claim.rs` | [`Redelivery`](crate::broker::Redelivery): reclaim scans, due retries, heartbeats, attempts |
//! | `leases.rs` | [`Leases`](crate::broker::Leases) |
//! | `diagnostics.rs` | [`Diagnostics`](crate::broker::Diagnostics) |
//! | `admin.rs` | [`Admin`](crate::broker::Admin): listings, ranges, trims |
//! | `latest.rs` | the latest-value maps |
//! | `shared_read.rs` | the read hubs: one blocking read for many streams |
//! | `scripts.rs`, `reply.rs` | the Lua scripts; decoding replies |
//!
//! Newer servers: on connecting, the broker asks the server which newer
//! stream commands it has ([`ServerFeatures`]) and uses them where they give
//! the same results in fewer steps: `XACKDEL … ACKED` (Redis 8.2) for
//! groups that delete what they ack, `XTRIM … ACKED` for the fan-out-safe
//! trim. Elsewhere (Redis 7.0–8.0, Valkey) a script or the 7.0 commands do
//! the same.
//!
//! Connections: one shared, auto-reconnecting multiplexed connection
//! (redis-rs `ConnectionManager`) for every non-blocking command, and one
//! dedicated connection for blocking XREADGROUPs per (group name, member
//! name), whose one read serves every stream of that pair in this process
//! (`shared_read.rs`; with `redis.shared_reads = false`, one per member),
//! and whose response timeout is longer than the block time (redis-rs
//! defaults every async connection to 500 ms, which would break `BLOCK`). Replies are
//! decoded from raw `redis::Value`, one entry at a time, so a malformed
//! entry cannot fail the batch it arrived in.
//!
//! Keys, all derived from the stream name (so a stream named `{orders}`
//! keeps everything in one cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<stream>:dlq` | stream | dead letters |
//! | `<stream>:retry:<group>` | sorted set | entry id → not-before time (ms) |
//! | `<stream>:attempts:<group>` | hash | entry id → failed attempts |
//! | `<stream>:lease:<group>:<member>` | string | lease token of the process using the member name |
//!
//! The latest-value maps of [`LatestValues`](crate::LatestValues) (in
//! `latest.rs`) use two hashes of the application's choosing: `<key>`
//! (field → value) and `<key>:version` (field → `<at_ms>:<tiebreak>`).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, Value};

mod admin;
mod claim;
mod diagnostics;
mod latest;
mod leases;
mod reply;
mod scripts;
mod settle;
mod shared_read;

use self::reply::unexpected;
use self::scripts::Scripts;
use crate::broker::{Admin, Broker, Delivery, Receipt, Redelivery};
use crate::wire::RawEntry;

use super::ServerFeatures;
use crate::error::Result;
use crate::settings::RedisSettings;

/// The id of the first entry of a stream, for `XGROUP CREATE … 0`.
const STREAM_START: &str = "0";
/// The id meaning "entries added after now", for `XGROUP CREATE … $`.
const STREAM_END: &str = "$";
/// The id meaning "never delivered to this group", for `XREADGROUP … >`.
const UNDELIVERED: &str = ">";
/// The id that lets Redis assign one, for `XADD … *`.
const AUTO_ID: &str = "*";

fn retry_key(stream: &str, group: &str) -> String {
    format!("{stream}:retry:{group}")
}

/// Milliseconds since the epoch from a `TIME` reply (seconds, microseconds).
fn server_ms(time: &[String]) -> Result<u64> {
    let part = |i: usize| time.get(i).and_then(|v| v.parse::<u64>().ok());
    match (part(0), part(1)) {
        (Some(secs), Some(micros)) => Ok(secs * 1_000 + micros / 1_000),
        _ => Err(unexpected("TIME", "not two integers")),
    }
}

/// The entry ids behind Redis receipts: a Redis receipt's token is the
/// entry id (its stream is the group's).
fn entry_ids(receipts: &[Receipt]) -> Vec<&str> {
    receipts.iter().map(Receipt::token).collect()
}

/// Entries read from `stream`, each with its receipt.
fn deliveries(stream: &Arc<str>, entries: Vec<RawEntry>) -> Vec<Delivery> {
    entries
        .into_iter()
        .map(|entry| {
            let receipt = Receipt::new(Arc::clone(stream), entry.id.as_str());
            Delivery::new(entry, receipt)
        })
        .collect()
}

fn attempts_key(stream: &str, group: &str) -> String {
    format!("{stream}:attempts:{group}")
}

/// The field of the attempts hash that keeps an entry's last error (its
/// count is under the entry id itself).
fn error_field(id: &str) -> String {
    format!("{id}:error")
}

/// The attempts-hash fields of entries whose failed attempts are settled:
/// each id's count and its last error.
fn attempt_fields(ids: &[Receipt]) -> Vec<String> {
    ids.iter()
        .flat_map(|r| [r.token().to_owned(), error_field(r.token())])
        .collect()
}

/// Longest last error the attempts hash keeps for an entry, in bytes.
const MAX_KEPT_ERROR: usize = 1_024;

/// `text` cut to at most `max` bytes, on a character boundary.
fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The hash of a group's member records (field: member name, value: JSON).
fn presence_key(stream: &str, group: &str) -> String {
    format!("{stream}:members:{group}")
}

fn lease_prefix(stream: &str, group: &str) -> String {
    format!("{stream}:lease:{group}:")
}

/// Makes a string safe for `CLIENT SETNAME` (no spaces or control bytes).
fn client_name(parts: &[&str]) -> String {
    parts
        .join(":")
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
}

/// A connection of its own for blocking reads of `group`'s `member`, with
/// its response timeout, named `redstream:<group>:<member>:read`; returns
/// it with its client id (for `CLIENT UNBLOCK`).
async fn open_read_connection(
    client: &Client,
    connect_timeout: Duration,
    response_timeout: Duration,
    group: &str,
    member: &str,
) -> Result<(redis::aio::MultiplexedConnection, i64)> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let (_, client_id): ((), i64) = redis::pipe()
        .cmd("CLIENT")
        .arg("SETNAME")
        .arg(client_name(&["redstream", group, member, "read"]))
        .cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await?;
    Ok((conn, client_id))
}

struct Inner {
    client: Client,
    conn: ConnectionManager,
    connect_timeout: Duration,
    instance: String,
    scripts: Scripts,
    /// What the server has, as detected at connect.
    detected: ServerFeatures,
    /// Member readers share a connection and a read per (group name,
    /// member name) (`redis.shared_reads`).
    shared_reads: bool,
    hubs: shared_read::ReadHubs,
    /// Lease calls waiting to go out together.
    lease_calls: leases::LeaseCalls,
}

/// The Redis Streams broker.
///
/// ```no_run
/// # async fn demo() -> redstream::Result<()> {
/// use redstream::broker::{GroupRef, Streams};
/// use redstream::{RedisBroker, Settings, StartFrom};
///
/// let settings = Settings::default();
/// let broker = RedisBroker::connect(&settings.redis, "my-service").await?;
/// broker.ensure_group(&GroupRef::new("orders", "billing"), StartFrom::Beginning).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
    /// The newer commands in use (detected at connect, or turned off).
    features: ServerFeatures,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("instance", &self.inner.instance)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Connects the shared command connection, names it
    /// `redstream:<instance>:cmd`, and detects the newer commands the server
    /// has ([`RedisBroker::features`]).
    pub async fn connect(settings: &RedisSettings, instance: &str) -> Result<Self> {
        let client = Client::open(settings.url.expose())?;
        let connect_timeout = Duration::from_millis(settings.connect_timeout_ms);
        // One direct attempt first: a wrong password or a server that is not
        // Redis fails here at once with its own error, where the connection
        // manager would retry it for its whole backoff. A refused or silent
        // port (Redis still starting) goes on to the manager's retries.
        let probe = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(connect_timeout));
        match client
            .get_multiplexed_async_connection_with_config(&probe)
            .await
        {
            Err(e) if !(e.is_io_error() || e.is_timeout() || e.is_connection_refusal()) => {
                return Err(e.into());
            }
            _ => {}
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(Duration::from_millis(settings.command_timeout_ms)))
            .set_number_of_retries(6)
            .set_max_delay(Duration::from_secs(2));
        let mut conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        let _: () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(client_name(&["redstream", instance, "cmd"]))
            .query_async(&mut conn)
            .await?;
        let features = detect_features(&mut conn).await;
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                client,
                conn,
                connect_timeout,
                instance: instance.to_owned(),
                scripts: Scripts::new(),
                detected: features,
                shared_reads: settings.shared_reads,
                hubs: shared_read::ReadHubs::default(),
                lease_calls: leases::LeaseCalls::default(),
            }),
            features,
        })
    }

    /// The newer stream commands this broker uses.
    pub fn features(&self) -> ServerFeatures {
        self.features
    }

    /// With `false`, uses the Redis 7.0 commands even where the server has
    /// newer ones (the results are the same; for comparing the two ways, or
    /// to step around a server bug). With `true`, uses what was detected.
    pub fn with_newer_commands(mut self, use_them: bool) -> Self {
        self.features = if use_them {
            self.inner.detected
        } else {
            ServerFeatures::default()
        };
        self
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }
}

/// Whether a reply (of `COMMAND DOCS`) holds `word` as a string anywhere.
fn mentions(v: &Value, word: &str) -> bool {
    match v {
        Value::BulkString(b) => b.eq_ignore_ascii_case(word.as_bytes()),
        Value::SimpleString(s) => s.eq_ignore_ascii_case(word),
        Value::Array(items) | Value::Set(items) => items.iter().any(|i| mentions(i, word)),
        Value::Map(pairs) => pairs
            .iter()
            .any(|(k, v)| mentions(k, word) || mentions(v, word)),
        _ => false,
    }
}

/// Asks the server for the newer commands by name, not by version (Valkey
/// reports `redis_version` 7.2.4). A server that refuses `COMMAND` (an ACL
/// without it) gets the 7.0 commands.
async fn detect_features(conn: &mut ConnectionManager) -> ServerFeatures {
    let reply: redis::RedisResult<(Value, Value)> = redis::pipe()
        .cmd("COMMAND")
        .arg("INFO")
        .arg("XACKDEL")
        .cmd("COMMAND")
        .arg("DOCS")
        .arg("XTRIM")
        .query_async(conn)
        .await;
    match reply {
        Ok((info, docs)) => ServerFeatures {
            // An unknown command is a nil in the reply's one slot.
            xackdel: matches!(&info, Value::Array(a) if a.first().is_some_and(|c| !matches!(c, Value::Nil))),
            trim_acked: mentions(&docs, "ACKED"),
        },
        Err(e) => {
            tracing::debug!(
                "could not ask the server for its commands ({e}); using the Redis 7.0 ones"
            );
            ServerFeatures::default()
        }
    }
}

impl Broker for RedisBroker {
    fn redelivery(self: Arc<Self>) -> Option<Arc<dyn Redelivery>> {
        Some(self)
    }

    fn admin(self: Arc<Self>) -> Option<Arc<dyn Admin>> {
        Some(self)
    }
}

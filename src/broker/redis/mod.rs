//! [`Broker`] for Redis Streams (Redis 7.0+). Every Redis command the crate
//! sends is in this file.
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
//! dedicated connection per member for its blocking XREADGROUP, whose
//! response timeout is longer than the block time (redis-rs defaults every
//! async connection to 500 ms, which would break `BLOCK`). Replies are
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

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Value};

mod admin;
mod latest;
mod reply;
mod scripts;

use self::reply::{
    group_field, int, major_version, parse_entries, parse_fields, parse_read_reply, text,
    unexpected,
};
use self::scripts::Scripts;

use super::{
    Broker, ClaimReply, DeadLetter, DueReply, EntryState, GroupReader, PendingSummary, PublishItem,
    ReadFrom, RetrySchedule, ServerFeatures, ServerReport,
};
use crate::entry::{RawEntry, dead_letter_fields, dead_letter_stream};
use crate::error::Result;
use crate::settings::{RedisSettings, StartFrom};

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

fn attempts_key(stream: &str, group: &str) -> String {
    format!("{stream}:attempts:{group}")
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

struct Inner {
    client: Client,
    conn: ConnectionManager,
    connect_timeout: Duration,
    instance: String,
    scripts: Scripts,
    /// What the server has, as detected at connect.
    detected: ServerFeatures,
}

/// The Redis Streams broker.
///
/// ```no_run
/// # async fn demo() -> redstream::Result<()> {
/// use redstream::{Broker, RedisBroker, Settings, StartFrom};
///
/// let settings = Settings::default();
/// let broker = RedisBroker::connect(&settings.redis, "my-service").await?;
/// broker.ensure_group("orders", "billing", StartFrom::Beginning).await?;
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

/// A member's reader: its own connection, named after the member.
struct RedisReader {
    conn: MultiplexedConnection,
    stream: String,
    group: String,
    member: String,
    block_ms: u64,
    client_id: Option<i64>,
}

#[async_trait]
impl GroupReader for RedisReader {
    async fn read(&mut self, from: &ReadFrom, count: usize) -> Result<Vec<RawEntry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.member)
            .arg("COUNT")
            .arg(count.max(1));
        let id = match from {
            ReadFrom::New => {
                cmd.arg("BLOCK").arg(self.block_ms);
                UNDELIVERED
            }
            ReadFrom::PendingAfter(after) => after.as_str(),
        };
        cmd.arg("STREAMS").arg(&self.stream).arg(id);
        let reply: Value = cmd.query_async(&mut self.conn).await?;
        parse_read_reply(reply)
    }

    fn unblock_token(&self) -> Option<i64> {
        self.client_id
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn ensure_group(&self, stream: &str, group: &str, start: StartFrom) -> Result<bool> {
        let id = match start {
            StartFrom::Beginning => STREAM_START,
            StartFrom::Latest => STREAM_END,
        };
        let result: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(id)
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn publish(&self, items: &[PublishItem]) -> Result<Vec<Result<String>>> {
        let mut pipe = redis::Pipeline::with_capacity(items.len());
        for item in items {
            // Sized up front: one allocation per command, not one per
            // argument that outgrows the buffer.
            let args = 6 + 2 * item.entry.fields.len();
            let bytes = 32 + item.stream.len() + item.entry.encoded_len();
            let mut cmd = redis::Cmd::with_capacity(args, bytes);
            cmd.arg("XADD").arg(&*item.stream);
            if let Some(n) = item.max_len {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg(AUTO_ID);
            for (name, value) in &item.entry.fields {
                cmd.arg(name.as_bytes()).arg(value.as_slice());
            }
            pipe.add_command(cmd);
        }
        pipe.ignore_errors();
        let replies: Vec<redis::RedisResult<Value>> = pipe.query_async(&mut self.conn()).await?;
        Ok(replies
            .into_iter()
            .map(|r| match r {
                Ok(v) => text(&v).ok_or_else(|| unexpected("XADD", "no entry id")),
                Err(e) => Err(e.into()),
            })
            .collect())
    }

    async fn open_reader(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        block: Duration,
    ) -> Result<Box<dyn GroupReader>> {
        // A server woken for an entry another member took re-blocks with a
        // fresh timeout (redis/redis#12998), so allow twice the block time.
        let response_timeout = block * 2 + Duration::from_secs(1);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.connect_timeout))
            .set_response_timeout(Some(response_timeout));
        let mut conn = self
            .inner
            .client
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
        Ok(Box::new(RedisReader {
            conn,
            stream: stream.to_owned(),
            group: group.to_owned(),
            member: member.to_owned(),
            block_ms: block.as_millis() as u64,
            client_id: Some(client_id),
        }))
    }

    async fn unblock(&self, token: i64) -> Result<()> {
        let _: Value = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(token)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn ack(
        &self,
        stream: &str,
        group: &str,
        ids: &[String],
        forget: &[String],
    ) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(stream).arg(group).arg(ids);
        if !forget.is_empty() {
            pipe.cmd("HDEL")
                .arg(attempts_key(stream, group))
                .arg(forget)
                .ignore();
        }
        let (acked,): (u64,) = pipe.query_async(&mut self.conn()).await?;
        Ok(acked)
    }

    async fn ack_and_delete(
        &self,
        stream: &str,
        group: &str,
        ids: &[String],
        forget: &[String],
    ) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        // Per id: -1 not pending in this group (nothing done), 1 acked and
        // deleted, 2 acked and kept because a group still needs it.
        let codes: Vec<i64> = if self.features.xackdel {
            let mut pipe = redis::pipe();
            pipe.cmd("XACKDEL")
                .arg(stream)
                .arg(group)
                .arg("ACKED")
                .arg("IDS")
                .arg(ids.len())
                .arg(ids);
            if !forget.is_empty() {
                pipe.cmd("HDEL")
                    .arg(attempts_key(stream, group))
                    .arg(forget)
                    .ignore();
            }
            let (codes,): (Vec<i64>,) = pipe.query_async(&mut self.conn()).await?;
            codes
        } else {
            let mut invocation = self.inner.scripts.ack_delete.prepare_invoke();
            invocation
                .key(stream)
                .key(attempts_key(stream, group))
                .arg(group)
                .arg(forget.len())
                .arg(forget)
                .arg(ids);
            invocation.invoke_async(&mut self.conn()).await?
        };
        Ok(codes.iter().filter(|&&c| c > 0).count() as u64)
    }

    async fn group_count(&self, stream: &str) -> Result<u64> {
        let groups: redis::RedisResult<Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut self.conn())
            .await;
        match groups {
            Ok(Value::Array(groups)) => Ok(groups.len() as u64),
            Ok(_) => Err(unexpected("XINFO GROUPS", "not an array")),
            Err(e) if e.to_string().contains("no such key") => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    async fn entry_states(
        &self,
        stream: &str,
        group: &str,
        ids: &[String],
    ) -> Result<Vec<EntryState>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // The due times were written with the server's clock: compare them
        // with the same clock, read in the same round trip.
        let (time, attempts, scores): (Vec<String>, Vec<Option<u32>>, Vec<Option<f64>>) =
            redis::pipe()
                .cmd("TIME")
                .cmd("HMGET")
                .arg(attempts_key(stream, group))
                .arg(ids)
                .cmd("ZMSCORE")
                .arg(retry_key(stream, group))
                .arg(ids)
                .query_async(&mut self.conn())
                .await?;
        let now = server_ms(&time)?;
        Ok(attempts
            .into_iter()
            .zip(scores)
            .map(|(a, s)| EntryState {
                attempts: a.unwrap_or(0),
                retry_in: s.map(|due| Duration::from_millis((due as u64).saturating_sub(now))),
            })
            .collect())
    }

    async fn schedule_retries(
        &self,
        stream: &str,
        group: &str,
        retries: &[RetrySchedule],
    ) -> Result<()> {
        if retries.is_empty() {
            return Ok(());
        }
        let mut invocation = self.inner.scripts.schedule_retries.prepare_invoke();
        invocation
            .key(attempts_key(stream, group))
            .key(retry_key(stream, group));
        for r in retries {
            let delay_ms = u64::try_from(r.delay.as_millis()).unwrap_or(u64::MAX);
            invocation.arg(&r.id).arg(r.attempts).arg(delay_ms);
        }
        let _now: u64 = invocation.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn dead_letter(
        &self,
        stream: &str,
        group: &str,
        letters: &[DeadLetter],
    ) -> Result<Vec<(String, String)>> {
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.inner.scripts.dead_letter.prepare_invoke();
        invocation
            .key(stream)
            .key(dead_letter_stream(stream))
            .key(attempts_key(stream, group))
            .key(retry_key(stream, group))
            .arg(group)
            .arg(letters.len());
        for letter in letters {
            let fields = dead_letter_fields(letter, group);
            invocation.arg(&letter.origin_id).arg(fields.len());
            for (name, value) in fields {
                invocation.arg(name).arg(value);
            }
        }
        let failed: Vec<(String, String)> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(failed)
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<ClaimReply> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(group)
            .arg(member)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut self.conn())
            .await?;
        let Value::Array(mut parts) = reply else {
            return Err(unexpected("XAUTOCLAIM", "not an array"));
        };
        if parts.len() < 2 {
            return Err(unexpected("XAUTOCLAIM", "fewer than 2 elements"));
        }
        let deleted = match parts.get(2) {
            Some(Value::Array(ids)) => ids.iter().filter_map(text).collect(),
            _ => Vec::new(),
        };
        let claimed = parse_entries(std::mem::take(&mut parts[1]))?;
        let next_cursor = text(&parts[0]).ok_or_else(|| unexpected("XAUTOCLAIM", "no cursor"))?;
        Ok(ClaimReply {
            next_cursor,
            claimed,
            deleted,
        })
    }

    async fn claim_due(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        count: usize,
    ) -> Result<DueReply> {
        let reply: Value = self
            .inner
            .scripts
            .claim_due
            .key(stream)
            .key(retry_key(stream, group))
            .key(attempts_key(stream, group))
            .arg(group)
            .arg(member)
            .arg(count.max(1))
            .invoke_async(&mut self.conn())
            .await?;
        let Value::Array(items) = reply else {
            return Ok(DueReply::default());
        };
        let mut claimed = Vec::with_capacity(items.len());
        for item in items {
            let Value::Array(mut parts) = item else {
                return Err(unexpected("claim_due", "item is not an array"));
            };
            let id = parts
                .first()
                .and_then(text)
                .ok_or_else(|| unexpected("claim_due", "no id"))?;
            let attempts = parts
                .get(1)
                .and_then(text)
                .and_then(|a| a.parse::<u32>().ok())
                .unwrap_or(0);
            let fields = match parts.get_mut(2) {
                Some(v) => parse_fields(std::mem::take(v))?,
                None => None,
            };
            claimed.push((RawEntry { id, fields }, attempts));
        }
        Ok(DueReply { claimed })
    }

    async fn heartbeat(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        ids: &[String],
    ) -> Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lost: Vec<String> = self
            .inner
            .scripts
            .heartbeat
            .key(stream)
            .arg(group)
            .arg(member)
            .arg(ids)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(lost)
    }

    async fn release(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        ids: &[String],
        idle: Duration,
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: Value = redis::cmd("XCLAIM")
            .arg(stream)
            .arg(group)
            .arg(member)
            .arg(0)
            .arg(ids)
            .arg("IDLE")
            .arg(idle.as_millis() as u64)
            .arg("JUSTID")
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn pending_of(
        &self,
        stream: &str,
        group: &str,
        member: &str,
        count: usize,
    ) -> Result<Vec<String>> {
        let reply: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(count.max(1))
            .arg(member)
            .query_async(&mut self.conn())
            .await?;
        let Value::Array(rows) = reply else {
            return Ok(Vec::new());
        };
        Ok(rows
            .iter()
            .filter_map(|row| match row {
                Value::Array(cols) => cols.first().and_then(text),
                _ => None,
            })
            .collect())
    }

    async fn pending_summary(&self, stream: &str, group: &str) -> Result<PendingSummary> {
        let (time, summary, waiting_retry, groups, dead_letters): (
            Vec<String>,
            Value,
            u64,
            Value,
            u64,
        ) = redis::pipe()
            .cmd("TIME")
            .cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .cmd("ZCARD")
            .arg(retry_key(stream, group))
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .cmd("XLEN")
            .arg(dead_letter_stream(stream))
            .query_async(&mut self.conn())
            .await?;
        let lag = group_field(&groups, group, "lag").and_then(|v| int(&v));
        let Value::Array(parts) = summary else {
            return Err(unexpected("XPENDING", "not an array"));
        };
        let pending = parts.first().and_then(int).unwrap_or(0);
        let oldest_id = parts.get(1).and_then(text);
        let per_member = match parts.get(3) {
            Some(Value::Array(rows)) => rows
                .iter()
                .filter_map(|row| match row {
                    Value::Array(cols) => Some((
                        cols.first().and_then(text)?,
                        cols.get(1).and_then(int).unwrap_or(0),
                    )),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        // An id's time part is the server's clock when it was added: its
        // age is measured with the same clock.
        let now = server_ms(&time)?;
        let oldest_age = oldest_id
            .as_deref()
            .and_then(|id| id.split('-').next()?.parse::<u64>().ok())
            .map(|ms| Duration::from_millis(now.saturating_sub(ms)));
        Ok(PendingSummary {
            pending,
            waiting_retry,
            oldest_id,
            oldest_age,
            per_member,
            lag,
            dead_letters,
        })
    }

    async fn acquire_leases(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.inner.scripts.lease_acquire.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(token).arg(ttl.as_millis() as u64);
        let held: Vec<i64> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(held.into_iter().map(|h| h == 1).collect())
    }

    async fn release_leases(&self, keys: &[String], token: &str) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut invocation = self.inner.scripts.lease_release.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(token);
        let _: Value = invocation.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    fn lease_key(&self, stream: &str, group: &str, member: &str) -> String {
        format!("{}{member}", lease_prefix(stream, group))
    }

    async fn remove_idle_consumers(
        &self,
        stream: &str,
        group: &str,
        idle: Duration,
    ) -> Result<Vec<String>> {
        let removed: Vec<String> = self
            .inner
            .scripts
            .remove_idle_consumers
            .key(stream)
            .arg(group)
            .arg(idle.as_millis() as u64)
            .arg(lease_prefix(stream, group))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(removed)
    }

    async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn server_time_ms(&self) -> Result<u64> {
        let time: Vec<String> = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        server_ms(&time)
    }

    async fn server_report(&self) -> Result<ServerReport> {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.conn())
            .await?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let mut warnings = Vec::new();
        if major_version(&version).is_some_and(|major| major < 7) {
            warnings.push(format!(
                "Redis {version} is older than 7.0; XAUTOCLAIM's deleted-id report and group lag need 7.0+"
            ));
        }
        let config: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .arg("appendfsync")
            .arg("maxmemory-policy")
            .query_async(&mut self.conn())
            .await;
        match config {
            Ok(pairs) => {
                let get = |name: &str| {
                    pairs
                        .chunks(2)
                        .find(|kv| kv[0] == name)
                        .and_then(|kv| kv.get(1).cloned())
                        .unwrap_or_default()
                };
                if get("appendonly") != "yes" {
                    warnings.push(
                        "appendonly is `no`: a Redis restart loses every write since the last RDB snapshot (entries, acks, retry state)".to_owned(),
                    );
                } else if get("appendfsync") != "always" {
                    warnings.push(format!(
                        "appendfsync is `{}`, not `always`: a crash of the Redis host can lose up to about a second of acknowledged writes",
                        get("appendfsync")
                    ));
                }
                let policy = get("maxmemory-policy");
                if policy.starts_with("allkeys-") {
                    warnings.push(format!(
                        "maxmemory-policy is `{policy}`: Redis may evict stream keys, losing events and their pending lists; use `noeviction` or a `volatile-*` policy"
                    ));
                }
            }
            Err(e) => warnings.push(format!(
                "could not read the persistence settings (CONFIG GET: {}); check appendonly, appendfsync and maxmemory-policy by hand",
                e.code().unwrap_or("error")
            )),
        }
        let server = match info.lines().find_map(|l| l.strip_prefix("valkey_version:")) {
            Some(v) => format!("Valkey {}", v.trim()),
            None => format!("Redis {version}"),
        };
        Ok(ServerReport {
            version,
            server,
            features: self.features,
            warnings,
        })
    }
}

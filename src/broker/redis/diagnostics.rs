//! [`Diagnostics`] for Redis: pending figures in one pipeline, the group
//! count, the idle-consumer janitor script, `INFO` / `CONFIG GET` for the
//! server report, `PING` and `TIME`.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use redis::aio::ConnectionManager;

use super::reply::{group_field, int, major_version, parse_entries, text, unexpected};
use super::{RedisBroker, lease_prefix, presence_key, retry_key, server_ms};
use crate::broker::PENDING_SAMPLE;
use crate::broker::{Diagnostics, GroupRef, MemberPresence, PendingSummary, ServerReport};
use crate::clock::millis;
use crate::error::Result;
use crate::wire::dead_letter_stream;

/// What the two ages of a group are measured from: the server's time, the
/// group's figures from the same pipeline, and (in [`GroupAges::measure`])
/// an `XPENDING … - + n` sample of its oldest pending entries.
pub(super) struct GroupAges<'a> {
    pub(super) stream: &'a str,
    pub(super) group: &'a str,
    /// The server's `TIME`, in ms.
    pub(super) now_ms: u64,
    pub(super) waiting_retry: u64,
    pub(super) lag: Option<u64>,
    /// The group's `last-delivered-id`.
    pub(super) last_delivered: Option<&'a str>,
}

/// The longest time pending and the queue latency, in ms.
pub(super) struct Ages {
    pub(super) longest_pending: Option<Duration>,
    pub(super) queue_latency: Option<Duration>,
}

impl GroupAges<'_> {
    /// Measures both ages; one more round trip only when the group has
    /// entries waiting for a retry or entries not yet delivered.
    pub(super) async fn measure(
        &self,
        conn: &mut ConnectionManager,
        sample: &Value,
    ) -> Result<Ages> {
        // Rows of the extended XPENDING: [id, consumer, idle ms, deliveries].
        let rows: Vec<(String, u64)> = match sample {
            Value::Array(rows) => rows
                .iter()
                .filter_map(|row| match row {
                    Value::Array(cols) => {
                        Some((cols.first().and_then(text)?, cols.get(2).and_then(int)?))
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let check_retries = self.waiting_retry > 0 && !rows.is_empty();
        let next_undelivered = match (self.lag, self.last_delivered) {
            (Some(0), _) | (_, None) => None,
            (_, Some(last)) => Some(last),
        };
        let mut pipe = redis::pipe();
        if check_retries {
            pipe.cmd("ZMSCORE")
                .arg(retry_key(self.stream, self.group))
                .arg(rows.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>());
        }
        if let Some(last) = next_undelivered {
            pipe.cmd("XRANGE")
                .arg(self.stream)
                .arg(format!("({last}"))
                .arg("+")
                .arg("COUNT")
                .arg(1);
        }
        let mut replies: Vec<Value> = if check_retries || next_undelivered.is_some() {
            pipe.query_async(conn).await?
        } else {
            Vec::new()
        }
        .into_iter()
        .rev()
        .collect();
        let scheduled: Vec<bool> = match check_retries.then(|| replies.pop()).flatten() {
            Some(Value::Array(scores)) => scores.iter().map(|s| !matches!(s, Value::Nil)).collect(),
            _ => Vec::new(),
        };
        let longest_pending = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| !scheduled.get(*i).copied().unwrap_or(false))
            .map(|(_, (_, idle))| *idle)
            .max()
            .map(Duration::from_millis);
        // An id's time part is the server's clock when it was added: its
        // age is measured with the same clock.
        let queue_latency = match next_undelivered.and_then(|_| replies.pop()) {
            Some(reply) => parse_entries(reply)?
                .first()
                .and_then(|e| e.id.split('-').next()?.parse::<u64>().ok())
                .map(|ms| Duration::from_millis(self.now_ms.saturating_sub(ms))),
            None => None,
        };
        Ok(Ages {
            longest_pending,
            queue_latency,
        })
    }
}

#[async_trait]
impl Diagnostics for RedisBroker {
    async fn pending_summary(&self, group: &GroupRef) -> Result<PendingSummary> {
        let (stream, group) = (group.stream(), group.name());
        let mut conn = self.conn();
        let (time, summary, sample, waiting_retry, groups, dead_letters): (
            Vec<String>,
            Value,
            Value,
            u64,
            Value,
            u64,
        ) = redis::pipe()
            .cmd("TIME")
            .cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(PENDING_SAMPLE)
            .cmd("ZCARD")
            .arg(retry_key(stream, group))
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .cmd("XLEN")
            .arg(dead_letter_stream(stream))
            .query_async(&mut conn)
            .await?;
        let lag = group_field(&groups, group, "lag").and_then(|v| int(&v));
        let last_delivered =
            group_field(&groups, group, "last-delivered-id").and_then(|v| text(&v));
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
        let ages = GroupAges {
            stream,
            group,
            now_ms: server_ms(&time)?,
            waiting_retry,
            lag,
            last_delivered: last_delivered.as_deref(),
        }
        .measure(&mut conn, &sample)
        .await
        // The ages are for people; backpressure needs only the counts, so
        // a refused XRANGE (an ACL from before the ages) costs the ages.
        .unwrap_or_else(|e| {
            tracing::debug!("pending ages not measured: {e}");
            Ages {
                longest_pending: None,
                queue_latency: None,
            }
        });
        Ok(PendingSummary {
            pending,
            waiting_retry,
            oldest_id,
            longest_pending: ages.longest_pending,
            queue_latency: ages.queue_latency,
            per_member,
            lag,
            dead_letters,
        })
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

    async fn remove_idle_consumers(&self, group: &GroupRef, idle: Duration) -> Result<Vec<String>> {
        let (stream, group) = (group.stream(), group.name());
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

    async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn server_time_ms(&self) -> Result<u64> {
        let time: Vec<String> = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        server_ms(&time)
    }

    async fn publish_presence(
        &self,
        group: &GroupRef,
        members: &[MemberPresence],
        ttl: Duration,
    ) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        let key = presence_key(group.stream(), group.name());
        let mut pipe = redis::pipe();
        let hset = pipe.cmd("HSET").arg(&key);
        for m in members {
            let record = serde_json::to_string(m).map_err(crate::Error::Encode)?;
            hset.arg(&m.name).arg(record);
        }
        pipe.ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(millis(ttl))
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn withdraw_presence(&self, group: &GroupRef, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let () = redis::cmd("HDEL")
            .arg(presence_key(group.stream(), group.name()))
            .arg(names)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn presence(&self, group: &GroupRef) -> Result<Vec<MemberPresence>> {
        let records: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(presence_key(group.stream(), group.name()))
            .query_async(&mut self.conn())
            .await?;
        // A record another version wrote and this one cannot read is left
        // out, not an error: it is for people.
        let mut members: Vec<MemberPresence> = records
            .into_iter()
            .filter_map(|(_, json)| serde_json::from_str(&json).ok())
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(members)
    }
}

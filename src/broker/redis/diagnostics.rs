//! [`Diagnostics`] for Redis: pending figures in one pipeline, the group
//! count, the idle-consumer janitor script, `INFO` / `CONFIG GET` for the
//! server report, `PING` and `TIME`.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::reply::{group_field, int, major_version, text, unexpected};
use super::{RedisBroker, lease_prefix, retry_key, server_ms};
use crate::broker::{Diagnostics, GroupRef, PendingSummary, ServerReport};
use crate::error::Result;
use crate::wire::dead_letter_stream;

#[async_trait]
impl Diagnostics for RedisBroker {
    async fn pending_summary(&self, group: &GroupRef) -> Result<PendingSummary> {
        let (stream, group) = (group.stream(), group.name());
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
}

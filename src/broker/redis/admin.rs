//! [`Admin`] for Redis Streams.

use async_trait::async_trait;
use redis::Value;

use super::reply::{int, parse_entries, text, unexpected};
use super::{RedisBroker, retry_key};
use crate::broker::admin::{
    Admin, ConsumerInfo, GroupInfo, PendingEntry, StreamInfo, TrimPlan, next_id, parse_id,
};
use crate::error::Result;
use crate::wire::{RawEntry, dead_letter_stream};

/// Entries read per page when counting what a trim would remove.
const COUNT_PAGE: usize = 10_000;

/// The name/value pairs of a flat RESP2 array or a RESP3 map.
fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|kv| Some((text(kv.first()?)?, kv.get(1)?)))
            .collect(),
        Value::Map(map) => map
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v)))
            .collect(),
        _ => Vec::new(),
    }
}

fn field<'a>(pairs: &'a [(String, &'a Value)], name: &str) -> Option<&'a Value> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

fn no_such_key(e: &redis::RedisError) -> bool {
    e.to_string().contains("no such key")
}

#[async_trait]
impl Admin for RedisBroker {
    async fn streams(&self, pattern: &str) -> Result<Vec<String>> {
        let mut conn = self.conn();
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1_000)
                .arg("TYPE")
                .arg("stream")
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if !pattern.ends_with(":dlq") {
            keys.retain(|k| !k.ends_with(":dlq"));
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>> {
        let mut conn = self.conn();
        let info: redis::RedisResult<Value> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(stream)
            .query_async(&mut conn)
            .await;
        let info = match info {
            Ok(v) => v,
            Err(e) if no_such_key(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let info = pairs(&info);
        let first_id = match field(&info, "first-entry") {
            Some(Value::Array(entry)) => entry.first().and_then(text),
            _ => None,
        };
        let (groups, dead_letters): (Value, u64) = redis::pipe()
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .cmd("XLEN")
            .arg(dead_letter_stream(stream))
            .query_async(&mut conn)
            .await?;
        let Value::Array(groups) = groups else {
            return Err(unexpected("XINFO GROUPS", "not an array"));
        };
        let mut out = Vec::with_capacity(groups.len());
        for g in &groups {
            let g = pairs(g);
            let name = field(&g, "name").and_then(text).unwrap_or_default();
            let (summary, waiting_retry): (Value, u64) = redis::pipe()
                .cmd("XPENDING")
                .arg(stream)
                .arg(&name)
                .cmd("ZCARD")
                .arg(retry_key(stream, &name))
                .query_async(&mut conn)
                .await?;
            let oldest_pending_id = match &summary {
                Value::Array(parts) => parts.get(1).and_then(text),
                _ => None,
            };
            out.push(GroupInfo {
                consumers: field(&g, "consumers").and_then(int).unwrap_or(0),
                pending: field(&g, "pending").and_then(int).unwrap_or(0),
                waiting_retry,
                last_delivered_id: field(&g, "last-delivered-id")
                    .and_then(text)
                    .unwrap_or_else(|| "0-0".to_owned()),
                lag: field(&g, "lag").and_then(int),
                oldest_pending_id,
                name,
            });
        }
        Ok(Some(StreamInfo {
            stream: stream.to_owned(),
            length: field(&info, "length").and_then(int).unwrap_or(0),
            first_id,
            last_id: field(&info, "last-generated-id").and_then(text),
            groups: out,
            dead_letters,
        }))
    }

    async fn consumers(&self, stream: &str, group: &str) -> Result<Vec<ConsumerInfo>> {
        let reply: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(group)
            .query_async(&mut self.conn())
            .await?;
        let Value::Array(rows) = reply else {
            return Ok(Vec::new());
        };
        Ok(rows
            .iter()
            .map(|row| {
                let row = pairs(row);
                ConsumerInfo {
                    name: field(&row, "name").and_then(text).unwrap_or_default(),
                    pending: field(&row, "pending").and_then(int).unwrap_or(0),
                    idle_ms: field(&row, "idle").and_then(int).unwrap_or(0),
                }
            })
            .collect())
    }

    async fn pending_entries(
        &self,
        stream: &str,
        group: &str,
        count: usize,
        consumer: Option<&str>,
    ) -> Result<Vec<PendingEntry>> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(count.max(1));
        if let Some(c) = consumer {
            cmd.arg(c);
        }
        let reply: Value = cmd.query_async(&mut self.conn()).await?;
        let Value::Array(rows) = reply else {
            return Ok(Vec::new());
        };
        Ok(rows
            .iter()
            .filter_map(|row| match row {
                Value::Array(cols) => Some(PendingEntry {
                    id: cols.first().and_then(text)?,
                    consumer: cols.get(1).and_then(text)?,
                    idle_ms: cols.get(2).and_then(int).unwrap_or(0),
                    deliveries: cols.get(3).and_then(int).unwrap_or(0),
                }),
                _ => None,
            })
            .collect())
    }

    async fn range(
        &self,
        stream: &str,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<RawEntry>> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut self.conn())
            .await?;
        parse_entries(reply)
    }

    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let n: u64 = redis::cmd("XDEL")
            .arg(stream)
            .arg(ids)
            .query_async(&mut self.conn())
            .await?;
        Ok(n)
    }

    async fn trim_plan(&self, stream: &str) -> Result<TrimPlan> {
        let Some(info) = self.stream_info(stream).await? else {
            return Ok(TrimPlan {
                stream: stream.to_owned(),
                ..TrimPlan::default()
            });
        };
        // What each group still needs: its oldest pending entry (retries
        // waiting included), or else the entry after the last it was given.
        let needed_by: Vec<(String, String)> = info
            .groups
            .iter()
            .filter_map(|g| {
                let first_needed = match &g.oldest_pending_id {
                    Some(id) => id.clone(),
                    None => next_id(&g.last_delivered_id)?,
                };
                Some((g.name.clone(), first_needed))
            })
            .collect();
        let min_id = if needed_by.len() < info.groups.len() || needed_by.is_empty() {
            None
        } else {
            needed_by
                .iter()
                .map(|(_, id)| id)
                .min_by_key(|id| parse_id(id))
                .cloned()
        };
        let mut removable = 0u64;
        if let Some(min) = &min_id {
            let mut start = "-".to_owned();
            loop {
                let page = self
                    .range(stream, &start, &format!("({min}"), COUNT_PAGE)
                    .await?;
                removable += page.len() as u64;
                match page.last() {
                    Some(last) if page.len() == COUNT_PAGE => start = format!("({}", last.id),
                    _ => break,
                }
            }
        }
        Ok(TrimPlan {
            stream: stream.to_owned(),
            min_id,
            removable,
            needed_by,
        })
    }

    async fn trim_below(&self, stream: &str, min_id: &str) -> Result<u64> {
        let removed: u64 = redis::cmd("XTRIM")
            .arg(stream)
            .arg("MINID")
            .arg(min_id)
            .query_async(&mut self.conn())
            .await?;
        Ok(removed)
    }

    async fn trim_acked_below(&self, stream: &str, min_id: &str) -> Result<u64> {
        if !self.features.trim_acked {
            return self.trim_below(stream, min_id).await;
        }
        // Exact (`=`, the default), not `~`: `~ ACKED` is slow (RELIABILITY
        // P7), and an exact trim removes what the plan counted.
        let removed: u64 = redis::cmd("XTRIM")
            .arg(stream)
            .arg("MINID")
            .arg(min_id)
            .arg("ACKED")
            .query_async(&mut self.conn())
            .await?;
        Ok(removed)
    }
}

//! [`Admin`] for Redis Streams.

use async_trait::async_trait;
use redis::Value;

use super::diagnostics::GroupAges;
use super::reply::{int, parse_entries, text, unexpected};
use super::{RedisBroker, attempts_key, error_field, lease_prefix, retry_key, server_ms};
use crate::broker::PENDING_SAMPLE;
use crate::broker::admin::{
    Admin, ConsumerInfo, GroupInfo, GroupSummary, ORPHANS, PendingEntry, RemovedConsumer, SeekPlan,
    SeekTo, StreamInfo, TrimPlan, next_id, parse_id, previous_id,
};
use crate::clock::millis;
use crate::error::Result;
use crate::wire::{RawEntry, dead_letter_stream, field};

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

/// One group of an `XINFO GROUPS` reply.
fn group_summary(g: &[(String, &Value)]) -> GroupSummary {
    GroupSummary {
        name: field(g, "name").and_then(text).unwrap_or_default(),
        consumers: field(g, "consumers").and_then(int).unwrap_or(0),
        pending: field(g, "pending").and_then(int).unwrap_or(0),
        last_delivered_id: field(g, "last-delivered-id")
            .and_then(text)
            .unwrap_or_else(|| "0-0".to_owned()),
        lag: field(g, "lag").and_then(int),
    }
}

/// One row of the extended `XPENDING`: id, consumer, idle ms, deliveries.
fn pending_row(row: &Value) -> Option<PendingEntry> {
    let Value::Array(cols) = row else {
        return None;
    };
    Some(PendingEntry {
        id: cols.first().and_then(text)?,
        consumer: cols.get(1).and_then(text)?,
        idle_ms: cols.get(2).and_then(int).unwrap_or(0),
        deliveries: cols.get(3).and_then(int).unwrap_or(0),
        ..PendingEntry::default()
    })
}

impl RedisBroker {
    /// The stream's last generated id (`XINFO STREAM`); `None` if there is
    /// no such stream.
    async fn last_generated_id(&self, stream: &str) -> Result<Option<String>> {
        let info: redis::RedisResult<Value> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(stream)
            .query_async(&mut self.conn())
            .await;
        match info {
            Ok(info) => Ok(field(&pairs(&info), "last-generated-id").and_then(text)),
            Err(e) if no_such_key(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Entries with ids after `low` and up to `high`, counted a page at a
    /// time.
    async fn count_between(&self, stream: &str, low: &str, high: &str) -> Result<u64> {
        let mut count = 0u64;
        let mut start = format!("({low}");
        loop {
            let page = self.range(stream, &start, high, COUNT_PAGE).await?;
            count += page.len() as u64;
            match page.last() {
                Some(last) if page.len() == COUNT_PAGE => start = format!("({}", last.id),
                _ => return Ok(count),
            }
        }
    }

    /// Fills in redstream's details of pending entries: attempts and last
    /// error (the attempts hash), retry time (the retry schedule) and event
    /// type (the entry itself), in one round trip.
    async fn with_details(
        &self,
        stream: &str,
        group: &str,
        mut entries: Vec<PendingEntry>,
    ) -> Result<Vec<PendingEntry>> {
        if entries.is_empty() {
            return Ok(entries);
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let mut fields = Vec::with_capacity(ids.len() * 2);
        for id in &ids {
            fields.push((*id).to_owned());
            fields.push(error_field(id));
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(attempts_key(stream, group))
            .arg(&fields)
            .cmd("ZMSCORE")
            .arg(retry_key(stream, group))
            .arg(&ids);
        for id in &ids {
            pipe.cmd("XRANGE").arg(stream).arg(*id).arg(*id);
        }
        let mut replies: Vec<Value> = pipe.query_async(&mut self.conn()).await?;
        let ranges = replies.split_off(2.min(replies.len()));
        let mut replies = replies.into_iter();
        let (kept, scores) = (replies.next(), replies.next());
        let kept: Vec<Option<String>> = match kept {
            Some(Value::Array(values)) => values.iter().map(text).collect(),
            _ => Vec::new(),
        };
        let scores: Vec<Option<u64>> = match scores {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::Double(d) => Some(*d as u64),
                    other => text(other)
                        .and_then(|t| t.parse::<f64>().ok())
                        .map(|d| d as u64),
                })
                .collect(),
            _ => Vec::new(),
        };
        for (i, (entry, range)) in entries.iter_mut().zip(ranges).enumerate() {
            entry.attempts = kept
                .get(2 * i)
                .cloned()
                .flatten()
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            entry.last_error = kept.get(2 * i + 1).cloned().flatten();
            entry.retry_at_ms = scores.get(i).copied().flatten();
            entry.event_type = parse_entries(range)
                .ok()
                .and_then(|mut e| e.pop())
                .and_then(|e| e.fields)
                .and_then(|fields| {
                    fields
                        .into_iter()
                        .find(|(name, _)| name.as_slice() == field::TYPE.as_bytes())
                })
                .map(|(_, value)| String::from_utf8_lossy(&value).into_owned());
        }
        Ok(entries)
    }

    /// The consumers Redis knows for a group, without lease holders.
    async fn redis_consumers(&self, stream: &str, group: &str) -> Result<Vec<ConsumerInfo>> {
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
                    held_by: None,
                }
            })
            .collect())
    }

    /// Which of `names` (a group's consumers) a running process leases now,
    /// with the holder's token. One `MGET` of their lease keys: a live
    /// member is a Redis consumer from its first read on, and the janitor
    /// never removes a leased name.
    async fn lease_holders(
        &self,
        stream: &str,
        group: &str,
        names: &[String],
    ) -> Result<Vec<(String, String)>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = lease_prefix(stream, group);
        let keys: Vec<String> = names.iter().map(|n| format!("{prefix}{n}")).collect();
        let tokens: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await?;
        Ok(names
            .iter()
            .zip(tokens)
            .filter_map(|(name, token)| Some((name.clone(), token?)))
            .collect())
    }
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
            let GroupSummary {
                name,
                consumers,
                pending,
                last_delivered_id,
                lag,
            } = group_summary(&pairs(g));
            let (time, summary, sample, waiting_retry): (Vec<String>, Value, Value, u64) =
                redis::pipe()
                    .cmd("TIME")
                    .cmd("XPENDING")
                    .arg(stream)
                    .arg(&name)
                    .cmd("XPENDING")
                    .arg(stream)
                    .arg(&name)
                    .arg("-")
                    .arg("+")
                    .arg(PENDING_SAMPLE)
                    .cmd("ZCARD")
                    .arg(retry_key(stream, &name))
                    .query_async(&mut conn)
                    .await?;
            let oldest_pending_id = match &summary {
                Value::Array(parts) => parts.get(1).and_then(text),
                _ => None,
            };
            let ages = GroupAges {
                stream,
                group: &name,
                now_ms: server_ms(&time)?,
                waiting_retry,
                lag,
                last_delivered: Some(&last_delivered_id),
            }
            .measure(&mut conn, &sample)
            .await?;
            let holders: Vec<String> = self
                .consumers(stream, &name)
                .await?
                .into_iter()
                .filter_map(|c| c.held_by)
                .collect();
            let mut processes: Vec<&str> = holders.iter().map(String::as_str).collect();
            processes.sort_unstable();
            processes.dedup();
            out.push(GroupInfo {
                consumers,
                live_members: holders.len() as u64,
                live_processes: processes.len() as u64,
                pending,
                waiting_retry,
                last_delivered_id,
                lag,
                oldest_pending_id,
                longest_pending_ms: ages.longest_pending.map(millis),
                queue_latency_ms: ages.queue_latency.map(millis),
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

    async fn groups(&self, stream: &str) -> Result<Option<Vec<GroupSummary>>> {
        let groups: redis::RedisResult<Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut self.conn())
            .await;
        let groups = match groups {
            Ok(Value::Array(groups)) => groups,
            Ok(_) => return Err(unexpected("XINFO GROUPS", "not an array")),
            Err(e) if no_such_key(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(
            groups.iter().map(|g| group_summary(&pairs(g))).collect(),
        ))
    }

    async fn consumers(&self, stream: &str, group: &str) -> Result<Vec<ConsumerInfo>> {
        let mut consumers = self.redis_consumers(stream, group).await?;
        let names: Vec<String> = consumers.iter().map(|c| c.name.clone()).collect();
        let holders = self.lease_holders(stream, group, &names).await?;
        for c in &mut consumers {
            c.held_by = holders
                .iter()
                .find(|(name, _)| *name == c.name)
                .map(|(_, token)| token.clone());
        }
        Ok(consumers)
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
        let entries: Vec<PendingEntry> = rows.iter().filter_map(pending_row).collect();
        self.with_details(stream, group, entries).await
    }

    async fn waiting_retries(
        &self,
        stream: &str,
        group: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>> {
        let due: Vec<String> = redis::cmd("ZRANGE")
            .arg(retry_key(stream, group))
            .arg(0)
            .arg(count.max(1) - 1)
            .query_async(&mut self.conn())
            .await?;
        let mut pipe = redis::pipe();
        for id in &due {
            pipe.cmd("XPENDING")
                .arg(stream)
                .arg(group)
                .arg(id)
                .arg(id)
                .arg(1);
        }
        let rows: Vec<Value> = if due.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.conn()).await?
        };
        // A stale schedule item (its entry no longer pending) is left out.
        let entries: Vec<PendingEntry> = rows
            .iter()
            .filter_map(|reply| match reply {
                Value::Array(rows) => rows.first().and_then(pending_row),
                _ => None,
            })
            .collect();
        self.with_details(stream, group, entries).await
    }

    async fn retry_now(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let key = retry_key(stream, group);
        let mut moved = 0;
        // A page at a time: the script unpacks its arguments onto Lua's stack.
        for page in ids.chunks(1_000) {
            let mut invocation = self.inner.scripts.retry_now.key(&key);
            for id in page {
                invocation.arg(id);
            }
            let n: u64 = invocation.invoke_async(&mut self.conn()).await?;
            moved += n;
        }
        Ok(moved)
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

    async fn create_group(&self, stream: &str, group: &str, from: &str) -> Result<bool> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(from)
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        let destroyed: redis::RedisResult<(u64,)> = redis::pipe()
            .cmd("XGROUP")
            .arg("DESTROY")
            .arg(stream)
            .arg(group)
            .cmd("DEL")
            .arg(retry_key(stream, group))
            .arg(attempts_key(stream, group))
            .ignore()
            .query_async(&mut self.conn())
            .await;
        match destroyed {
            Ok((n,)) => Ok(n > 0),
            Err(e) if no_such_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_consumer(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
    ) -> Result<RemovedConsumer> {
        let moved: u64 = self
            .inner
            .scripts
            .remove_consumer
            .key(stream)
            .arg(group)
            .arg(consumer)
            .arg(ORPHANS)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(RemovedConsumer {
            name: consumer.to_owned(),
            moved,
        })
    }

    async fn seek_plan(&self, stream: &str, group: &str, to: &SeekTo) -> Result<Option<SeekPlan>> {
        let Some(g) = self
            .groups(stream)
            .await?
            .and_then(|groups| groups.into_iter().find(|g| g.name == group))
        else {
            return Ok(None);
        };
        let to_id = match to {
            SeekTo::Start => "0-0".to_owned(),
            SeekTo::End => self
                .last_generated_id(stream)
                .await?
                .unwrap_or_else(|| "0-0".to_owned()),
            SeekTo::AfterId(id) => id.clone(),
            SeekTo::Time(ms) => previous_id(&format!("{ms}-0")).unwrap_or_else(|| "0-0".to_owned()),
        };
        let from_id = g.last_delivered_id.clone();
        let (low, high) = match (parse_id(&from_id), parse_id(&to_id)) {
            (Some(f), Some(t)) if t < f => (&to_id, &from_id),
            _ => (&from_id, &to_id),
        };
        let between = self.count_between(stream, low, high).await?;
        let rereads = parse_id(&to_id) < parse_id(&from_id);
        Ok(Some(SeekPlan {
            reread: if rereads { between } else { 0 },
            skipped: if rereads { 0 } else { between },
            pending: g.pending,
            from_id,
            to_id,
        }))
    }

    async fn seek(&self, stream: &str, group: &str, to_id: &str) -> Result<()> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("SETID").arg(stream).arg(group).arg(to_id);
        if to_id == "0-0" {
            // Everything is undelivered again: the lag is the length.
            cmd.arg("ENTRIESREAD").arg(0);
        }
        let _: () = cmd.query_async(&mut self.conn()).await?;
        Ok(())
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

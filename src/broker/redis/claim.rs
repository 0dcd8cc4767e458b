//! [`Redelivery`] for Redis: `XAUTOCLAIM` scans, the due-retry and
//! heartbeat scripts, and the attempt and due-time keys.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::reply::{parse_entries, parse_fields, text, unexpected};
use super::{RedisBroker, attempts_key, deliveries, entry_ids, retry_key, server_ms};
use crate::broker::{
    ClaimIdle, ClaimReply, Delivery, DueReply, EntryState, GroupRef, MemberRef, Receipt, Redelivery,
};
use crate::error::Result;
use crate::wire::RawEntry;

#[async_trait]
impl Redelivery for RedisBroker {
    #[tracing::instrument(level = "debug", skip_all, fields(stream = member.group().stream(), group = member.group().name(), member = member.member()))]
    async fn claim_idle(&self, member: &MemberRef, step: ClaimIdle<'_>) -> Result<ClaimReply> {
        let stream_arc = member.group().stream_arc();
        let (stream, group, member) = (
            member.group().stream(),
            member.group().name(),
            member.member(),
        );
        let ClaimIdle {
            min_idle,
            cursor,
            count,
        } = step;
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
            Some(Value::Array(ids)) => ids
                .iter()
                .filter_map(text)
                .map(|id| RawEntry { id, fields: None })
                .collect(),
            _ => Vec::new(),
        };
        let deleted = deliveries(stream_arc, deleted);
        let claimed = deliveries(stream_arc, parse_entries(std::mem::take(&mut parts[1]))?);
        let next_cursor = text(&parts[0]).ok_or_else(|| unexpected("XAUTOCLAIM", "no cursor"))?;
        Ok(ClaimReply {
            next_cursor,
            claimed,
            deleted,
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream = member.group().stream(), group = member.group().name(), member = member.member()))]
    async fn claim_due(&self, member: &MemberRef, count: usize) -> Result<DueReply> {
        let member_ref = member;
        let (stream, group, member) = (
            member.group().stream(),
            member.group().name(),
            member.member(),
        );
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
            let receipt = Receipt::new(Arc::clone(member_ref.group().stream_arc()), id.as_str());
            claimed.push((Delivery::new(RawEntry { id, fields }, receipt), attempts));
        }
        Ok(DueReply { claimed })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream = member.group().stream(), group = member.group().name(), member = member.member()))]
    async fn heartbeat(&self, member: &MemberRef, receipts: &[Receipt]) -> Result<Vec<Receipt>> {
        let stream_arc = Arc::clone(member.group().stream_arc());
        let ids = entry_ids(receipts);
        let (stream, group, member) = (
            member.group().stream(),
            member.group().name(),
            member.member(),
        );
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
        Ok(lost
            .into_iter()
            .map(|id| Receipt::new(Arc::clone(&stream_arc), id))
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream = group.stream(), group = group.name()))]
    async fn entry_states(
        &self,
        group: &GroupRef,
        receipts: &[Receipt],
    ) -> Result<Vec<EntryState>> {
        let ids = entry_ids(receipts);
        let (stream, group) = (group.stream(), group.name());
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
                .arg(&ids)
                .cmd("ZMSCORE")
                .arg(retry_key(stream, group))
                .arg(&ids)
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
}

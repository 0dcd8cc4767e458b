//! [`Streams`] for Redis: groups, `XADD` batches, member readers
//! (`XREADGROUP` on a connection of their own, interrupted by
//! `CLIENT UNBLOCK`), and settling (`XACK`, the retry and dead-letter
//! scripts, `XCLAIM … IDLE` to release).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use redis::aio::{ConnectionManager, MultiplexedConnection};

use super::reply::{parse_read_reply, text, unexpected};
use super::{
    AUTO_ID, MAX_KEPT_ERROR, RedisBroker, STREAM_END, STREAM_START, UNDELIVERED, attempt_fields,
    attempts_key, clip, deliveries, entry_ids, open_read_connection, retry_key,
};
use crate::broker::{
    Acks, Capabilities, DeadLetter, Delivery, GroupReader, GroupRef, Interrupt, MemberRef,
    PublishItem, ReadFrom, Receipt, RetrySchedule, Streams,
};
use crate::clock::millis;
use crate::error::Result;
use crate::settings::StartFrom;
use crate::wire::{dead_letter_fields, dead_letter_stream};

/// A member's reader: its own connection, named after the member.
struct RedisReader {
    conn: MultiplexedConnection,
    stream: Arc<str>,
    group: String,
    member: String,
    block_ms: u64,
    /// Interrupts this reader's blocked read from another connection.
    interrupt: Arc<dyn Interrupt>,
}

#[async_trait]
impl GroupReader for RedisReader {
    async fn read(&mut self, from: &ReadFrom, count: usize) -> Result<Vec<Delivery>> {
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
        cmd.arg("STREAMS").arg(&*self.stream).arg(id);
        let reply: Value = cmd.query_async(&mut self.conn).await?;
        Ok(deliveries(&self.stream, parse_read_reply(reply)?))
    }

    fn interrupter(&self) -> Option<Arc<dyn Interrupt>> {
        Some(Arc::clone(&self.interrupt))
    }
}

/// `CLIENT UNBLOCK <id>` for one reader's connection, sent on the shared
/// command connection (the reader's own is busy with the read).
struct Unblock {
    conn: ConnectionManager,
    client_id: i64,
}

#[async_trait]
impl Interrupt for Unblock {
    async fn interrupt(&self) -> Result<()> {
        let _: Value = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(self.client_id)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Streams for RedisBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::REDIS
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream = group.stream(), group = group.name()))]
    async fn ensure_group(&self, group: &GroupRef, start: StartFrom) -> Result<bool> {
        let (stream, group) = (group.stream(), group.name());
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

    #[tracing::instrument(level = "debug", skip_all, fields(stream = member.group().stream(), group = member.group().name(), member = member.member()))]
    async fn open_reader(
        &self,
        member: &MemberRef,
        block: Duration,
    ) -> Result<Box<dyn GroupReader>> {
        if self.inner.shared_reads {
            return Ok(self.open_shared_reader(member, block));
        }
        let stream = Arc::clone(member.group().stream_arc());
        let (group, member) = (member.group().name(), member.member());
        // A server woken for an entry another member took re-blocks with a
        // fresh timeout (redis/redis#12998), so allow twice the block time.
        let response_timeout = block * 2 + Duration::from_secs(1);
        let (conn, client_id) = open_read_connection(
            &self.inner.client,
            self.inner.connect_timeout,
            response_timeout,
            group,
            member,
        )
        .await?;
        Ok(Box::new(RedisReader {
            conn,
            stream,
            group: group.to_owned(),
            member: member.to_owned(),
            block_ms: block.as_millis() as u64,
            interrupt: Arc::new(Unblock {
                conn: self.conn(),
                client_id,
            }),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream = group.stream(), group = group.name()))]
    async fn ack(&self, group: &GroupRef, acks: Acks<'_>) -> Result<u64> {
        let (stream, group) = (group.stream(), group.name());
        let (ids, forget) = (entry_ids(acks.receipts), attempt_fields(acks.forget));
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

    #[tracing::instrument(level = "debug", skip_all, fields(stream = group.stream(), group = group.name()))]
    async fn ack_and_delete(&self, group: &GroupRef, acks: Acks<'_>) -> Result<u64> {
        let (stream, group) = (group.stream(), group.name());
        let (ids, forget) = (entry_ids(acks.receipts), attempt_fields(acks.forget));
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

    #[tracing::instrument(level = "debug", skip_all, fields(stream = group.stream(), group = group.name()))]
    async fn schedule_retries(&self, group: &GroupRef, retries: &[RetrySchedule]) -> Result<()> {
        let (stream, group) = (group.stream(), group.name());
        if retries.is_empty() {
            return Ok(());
        }
        let mut invocation = self.inner.scripts.schedule_retries.prepare_invoke();
        invocation
            .key(attempts_key(stream, group))
            .key(retry_key(stream, group));
        for r in retries {
            let delay_ms = millis(r.delay);
            invocation
                .arg(r.receipt.token())
                .arg(r.attempts)
                .arg(delay_ms)
                .arg(r.error.as_deref().map_or("", |e| clip(e, MAX_KEPT_ERROR)));
        }
        let _now: u64 = invocation.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream = group.stream(), group = group.name()))]
    async fn dead_letter(
        &self,
        group: &GroupRef,
        letters: &[(Receipt, DeadLetter)],
    ) -> Result<Vec<(Receipt, String)>> {
        let stream_arc = group.stream_arc();
        let (stream, group) = (group.stream(), group.name());
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
        for (receipt, letter) in letters {
            let fields = dead_letter_fields(letter, group);
            invocation.arg(receipt.token()).arg(fields.len());
            for (name, value) in fields {
                invocation.arg(name).arg(value);
            }
        }
        let failed: Vec<(String, String)> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(failed
            .into_iter()
            .map(|(id, error)| (Receipt::new(Arc::clone(stream_arc), id), error))
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream = member.group().stream(), group = member.group().name(), member = member.member()))]
    async fn release(
        &self,
        member: &MemberRef,
        receipts: &[Receipt],
        idle: Duration,
    ) -> Result<()> {
        let ids = entry_ids(receipts);
        let (stream, group, member) = (
            member.group().stream(),
            member.group().name(),
            member.member(),
        );
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
}

//! Shared reads (`redis.shared_reads`, on by default): the member readers
//! of one (group name, member name) pair in this process read new entries
//! through one connection and one command,
//! `XREADGROUP GROUP <g> <m> COUNT <n> BLOCK <ms> STREAMS s1 … sN > … >`,
//! instead of a blocking connection each. A process serving 10,000 streams
//! whose groups share a name and a member count opens `members` reading
//! connections, not 10,000.
//!
//! A [`ReadHub`] is a task that keeps the streams whose readers wait for
//! new entries, and one read in flight over all of them:
//!
//! - A stream that had entries gets them (at most `COUNT`, the smallest
//!   count its waiting readers asked for: the bound on entries per stream
//!   per round that keeps a hot stream from crowding out cold ones) and
//!   leaves the set until its reader asks again.
//! - A read that times out is sent again; a waiting reader is answered only
//!   with entries, an error, or an interrupt (a stop), so quiet streams cost
//!   one command per block time between them, not one each. While reads
//!   keep timing out, the block time doubles, up to [`QUIET_BLOCK_MAX`]
//!   (a blocked read over 10,000 streams costs Redis about 20 ms to set up
//!   and take down); the first read that brings entries restores it.
//! - A reader that starts waiting, or is interrupted, while the read is
//!   blocked makes the hub unblock it (`CLIENT UNBLOCK`, as if it timed
//!   out), so the next read includes it at once. An interrupted reader gets
//!   what the unblocked read brought for its stream, if anything (it hands
//!   that back, as after a plain read).
//! - A missing group fails its own reader (`NOGROUP` names the stream), not
//!   the others; a connection error fails every waiting reader (their
//!   members restart, as with a connection each) and the next read opens a
//!   new connection.
//!
//! Reading a member's own pending entries (`PendingAfter`) never blocks, so
//! it goes on the shared command connection.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use futures_util::future::Fuse;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{Client, Value};
use tokio::sync::{mpsc, oneshot};

use super::reply::{parse_multi_read_reply, parse_read_reply};
use super::{RedisBroker, UNDELIVERED, deliveries, open_read_connection};
use crate::broker::{Delivery, GroupReader, Interrupt, MemberRef, ReadFrom};
use crate::clock::{millis, quiet_period};
use crate::error::{Error, Result};

/// How often a hub tries `CLIENT UNBLOCK` while its read has not started
/// blocking yet, and for how long at most.
const UNBLOCK_RETRY: Duration = Duration::from_millis(2);
const UNBLOCK_TRIES: u32 = 250;

/// The longest block time of a hub whose reads keep timing out.
const QUIET_BLOCK_MAX: Duration = Duration::from_secs(30);

/// A hub's key: (group name, member name).
type HubKey = (Arc<str>, Arc<str>);

/// The hubs of one broker, by (group name, member name). A hub lives while a
/// reader of its pair does.
#[derive(Default)]
pub(super) struct ReadHubs {
    hubs: Mutex<HashMap<HubKey, mpsc::WeakUnboundedSender<Order>>>,
}

/// What a reader tells its hub.
enum Order {
    /// Wait for new entries of `stream`, at most `count`.
    Read {
        stream: Arc<str>,
        ticket: u64,
        count: usize,
        reply: oneshot::Sender<Result<Vec<Delivery>>>,
    },
    /// The reader's wait ends now (it is stopping).
    Interrupt { stream: Arc<str>, ticket: u64 },
}

/// Tells readers apart, so that a stale reader's interrupt cannot end the
/// wait of the reader that replaced it.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

impl RedisBroker {
    /// A reader that waits for new entries through the hub of its member's
    /// (group name, member name), started if none runs.
    pub(super) fn open_shared_reader(
        &self,
        member: &MemberRef,
        block: Duration,
    ) -> Box<dyn GroupReader> {
        let group = Arc::clone(member.group().name_arc());
        let name = Arc::clone(member.member_arc());
        let hub = {
            let mut hubs = self
                .inner
                .hubs
                .hubs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            hubs.retain(|_, hub| hub.strong_count() > 0);
            let key = (Arc::clone(&group), Arc::clone(&name));
            let running = hubs
                .get(&key)
                .and_then(mpsc::WeakUnboundedSender::upgrade)
                .filter(|hub| !hub.is_closed());
            match running {
                Some(hub) => hub,
                None => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let hub = ReadHub {
                        client: self.inner.client.clone(),
                        commands: self.conn(),
                        connect_timeout: self.inner.connect_timeout,
                        group: Arc::clone(&group),
                        member: Arc::clone(&name),
                        block,
                        conn: None,
                        waiting: HashMap::new(),
                        quiet_reads: 0,
                    };
                    tokio::spawn(hub.run(rx));
                    hubs.insert(key, tx.downgrade());
                    tx
                }
            }
        };
        Box::new(SharedReader {
            hub: hub.clone(),
            commands: self.conn(),
            stream: Arc::clone(member.group().stream_arc()),
            group,
            member: name,
            interrupt: Arc::new(HubInterrupt {
                hub,
                stream: Arc::clone(member.group().stream_arc()),
                ticket: NEXT_TICKET.fetch_add(1, Ordering::Relaxed),
            }),
        })
    }
}

/// A member's reader on a hub.
struct SharedReader {
    hub: mpsc::UnboundedSender<Order>,
    /// The shared command connection, for pending entries.
    commands: ConnectionManager,
    stream: Arc<str>,
    group: Arc<str>,
    member: Arc<str>,
    interrupt: Arc<HubInterrupt>,
}

#[async_trait]
impl GroupReader for SharedReader {
    async fn read(&mut self, from: &ReadFrom, count: usize) -> Result<Vec<Delivery>> {
        match from {
            ReadFrom::PendingAfter(after) => {
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&*self.group)
                    .arg(&*self.member)
                    .arg("COUNT")
                    .arg(count.max(1))
                    .arg("STREAMS")
                    .arg(&*self.stream)
                    .arg(after)
                    .query_async(&mut self.commands)
                    .await?;
                Ok(deliveries(&self.stream, parse_read_reply(reply)?))
            }
            ReadFrom::New => {
                let (reply, answer) = oneshot::channel();
                let order = Order::Read {
                    stream: Arc::clone(&self.stream),
                    ticket: self.interrupt.ticket,
                    count: count.max(1),
                    reply,
                };
                self.hub.send(order).map_err(|_| hub_gone())?;
                answer.await.map_err(|_| hub_gone())?
            }
        }
    }

    fn interrupter(&self) -> Option<Arc<dyn Interrupt>> {
        Some(Arc::clone(&self.interrupt) as Arc<dyn Interrupt>)
    }
}

fn hub_gone() -> Error {
    Error::Redis(redis::RedisError::from((
        redis::ErrorKind::Io,
        "the shared read of this member stopped",
    )))
}

/// Ends one reader's wait at its hub.
struct HubInterrupt {
    hub: mpsc::UnboundedSender<Order>,
    stream: Arc<str>,
    ticket: u64,
}

#[async_trait]
impl Interrupt for HubInterrupt {
    async fn interrupt(&self) -> Result<()> {
        let order = Order::Interrupt {
            stream: Arc::clone(&self.stream),
            ticket: self.ticket,
        };
        self.hub.send(order).map_err(|_| hub_gone())
    }
}

/// A reader waiting at the hub.
struct Waiting {
    ticket: u64,
    count: usize,
    reply: oneshot::Sender<Result<Vec<Delivery>>>,
    /// Interrupted while its stream was in the read in flight: answered
    /// when that read returns.
    interrupted: bool,
}

/// The hub of one (group name, member name): its connection and waiting
/// readers.
struct ReadHub {
    client: Client,
    /// For `CLIENT UNBLOCK` (the hub's own connection is busy reading).
    commands: ConnectionManager,
    connect_timeout: Duration,
    group: Arc<str>,
    member: Arc<str>,
    block: Duration,
    /// The reading connection and its client id, opened at the first read.
    conn: Option<(MultiplexedConnection, i64)>,
    waiting: HashMap<Arc<str>, Waiting>,
    /// Reads in a row that timed out with nothing.
    quiet_reads: u32,
}

/// What an order means for the read in flight.
#[derive(PartialEq, Eq)]
enum Effect {
    None,
    /// The read must end so that the next one covers the change.
    Unblock,
}

impl ReadHub {
    async fn run(mut self, mut orders: mpsc::UnboundedReceiver<Order>) {
        let mut in_flight: HashSet<Arc<str>> = HashSet::new();
        loop {
            while let Ok(order) = orders.try_recv() {
                self.apply(order, &in_flight);
            }
            if self.waiting.is_empty() {
                match orders.recv().await {
                    Some(order) => {
                        self.apply(order, &in_flight);
                        continue;
                    }
                    None => return,
                }
            }
            let (mut conn, client_id) = match self.connection().await {
                Ok(conn) => conn,
                Err(e) => {
                    self.fail_all(&e);
                    continue;
                }
            };
            in_flight = self.waiting.keys().cloned().collect();
            let count = self.waiting.values().map(|w| w.count).min().unwrap_or(1);
            let block = quiet_period(self.block, self.quiet_reads, QUIET_BLOCK_MAX);
            // A server woken for an entry another reader took re-blocks with
            // a fresh timeout (redis/redis#12998), so allow twice the block.
            conn.set_response_timeout(block * 2 + Duration::from_secs(1));
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&*self.group)
                .arg(&*self.member)
                .arg("COUNT")
                .arg(count)
                .arg("BLOCK")
                .arg(millis(block).max(1))
                .arg("STREAMS");
            for stream in &in_flight {
                cmd.arg(&**stream);
            }
            for _ in &in_flight {
                cmd.arg(UNDELIVERED);
            }
            let read = async move {
                let reply: redis::RedisResult<Value> = cmd.query_async(&mut conn).await;
                reply
            };
            tokio::pin!(read);
            let mut unblock = Fuse::terminated();
            let mut unblocking = false;
            let mut closed = false;
            let reply = loop {
                let effect = tokio::select! {
                    reply = &mut read => break reply,
                    order = orders.recv(), if !closed => match order {
                        Some(order) => self.apply(order, &in_flight),
                        // Every reader is gone: end the read.
                        None => {
                            closed = true;
                            Effect::Unblock
                        }
                    },
                    () = &mut unblock => Effect::None,
                };
                if effect == Effect::Unblock && !unblocking {
                    unblocking = true;
                    unblock = unblock_read(self.commands.clone(), client_id)
                        .boxed()
                        .fuse();
                }
            };
            let timed_out = matches!(reply, Ok(Value::Nil)) && !unblocking;
            self.quiet_reads = if timed_out {
                self.quiet_reads.saturating_add(1)
            } else {
                0
            };
            self.settle(reply, &in_flight);
            in_flight.clear();
            if closed && self.waiting.is_empty() {
                return;
            }
        }
    }

    /// Takes an order in; says whether the read in flight must end for it.
    fn apply(&mut self, order: Order, in_flight: &HashSet<Arc<str>>) -> Effect {
        match order {
            Order::Read {
                stream,
                ticket,
                count,
                reply,
            } => {
                let waiting = Waiting {
                    ticket,
                    count,
                    reply,
                    interrupted: false,
                };
                // A reader that replaced a stale one (a restarted member)
                // takes its place: the stale one is answered with nothing.
                if let Some(stale) = self.waiting.insert(Arc::clone(&stream), waiting) {
                    let _ = stale.reply.send(Ok(Vec::new()));
                }
                if in_flight.contains(&stream) {
                    Effect::None
                } else {
                    Effect::Unblock
                }
            }
            Order::Interrupt { stream, ticket } => {
                let Some(waiting) = self.waiting.get_mut(&stream) else {
                    return Effect::None;
                };
                if waiting.ticket != ticket {
                    return Effect::None;
                }
                if in_flight.contains(&stream) {
                    waiting.interrupted = true;
                    Effect::Unblock
                } else {
                    if let Some(waiting) = self.waiting.remove(&stream) {
                        let _ = waiting.reply.send(Ok(Vec::new()));
                    }
                    Effect::None
                }
            }
        }
    }

    /// Hands out what a read returned.
    fn settle(&mut self, reply: redis::RedisResult<Value>, in_flight: &HashSet<Arc<str>>) {
        match reply.map_err(Error::from).and_then(parse_multi_read_reply) {
            Ok(streams) => {
                for (name, entries) in streams {
                    let Some((stream, waiting)) = self.waiting.remove_entry(name.as_str()) else {
                        // Its reader is gone: the entries stay pending for
                        // this member name (read again at its restart, or
                        // reclaimed), as when a reader's connection drops.
                        tracing::debug!(stream = %name, "a shared read brought entries for a reader that left");
                        continue;
                    };
                    if let Err(Ok(entries)) = waiting.reply.send(Ok(deliveries(&stream, entries))) {
                        tracing::debug!(stream = %stream, left = entries.len(), "a shared read brought entries for a reader that left");
                    }
                }
            }
            Err(e) => {
                if let Some(stream) = self.missing_stream(&e) {
                    if let Some(waiting) = self.waiting.remove(stream.as_str()) {
                        let _ = waiting.reply.send(Err(e));
                    }
                } else if e.redis_code() == Some("UNBLOCKED") {
                    // A stream or group was deleted under the blocked read:
                    // the next read names it (NOGROUP).
                } else {
                    if e.needs_reconnect() {
                        self.conn = None;
                    }
                    self.fail_all(&e);
                }
            }
        }
        // Interrupted readers whose stream brought nothing.
        let interrupted: Vec<Arc<str>> = self
            .waiting
            .iter()
            .filter(|(stream, w)| w.interrupted && in_flight.contains(*stream))
            .map(|(stream, _)| Arc::clone(stream))
            .collect();
        for stream in interrupted {
            if let Some(waiting) = self.waiting.remove(&stream) {
                let _ = waiting.reply.send(Ok(Vec::new()));
            }
        }
    }

    /// The stream a `NOGROUP` error names: `No such key '<stream>' or
    /// consumer group '<group>' in XREADGROUP with GROUP option`.
    fn missing_stream(&self, e: &Error) -> Option<String> {
        let Error::Redis(e) = e else {
            return None;
        };
        if e.code() != Some("NOGROUP") {
            return None;
        }
        let suffix = format!(
            "' or consumer group '{}' in XREADGROUP with GROUP option",
            self.group
        );
        let detail = e.detail()?.trim();
        let stream = detail
            .strip_prefix("No such key '")?
            .strip_suffix(suffix.as_str())?;
        Some(stream.to_owned())
    }

    fn fail_all(&mut self, e: &Error) {
        for (_, waiting) in self.waiting.drain() {
            let _ = waiting.reply.send(Err(e.clone_for_caller()));
        }
    }

    /// The reading connection, opened (and named) if there is none.
    async fn connection(&mut self) -> Result<(MultiplexedConnection, i64)> {
        if let Some((conn, id)) = &self.conn {
            return Ok((conn.clone(), *id));
        }
        // Each read sets its own response timeout, after its block time.
        let (conn, client_id) = open_read_connection(
            &self.client,
            self.connect_timeout,
            self.connect_timeout,
            &self.group,
            &self.member,
        )
        .await?;
        self.conn = Some((conn.clone(), client_id));
        Ok((conn, client_id))
    }
}

/// Ends the hub's blocked read as if it timed out. The read may not be
/// blocking yet (the unblock overtook it on the other connection), so this
/// tries again until it unblocks something, for half a second at most; the
/// hub drops it when its read returns.
async fn unblock_read(mut commands: ConnectionManager, client_id: i64) {
    for _ in 0..UNBLOCK_TRIES {
        let unblocked: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(client_id)
            .query_async(&mut commands)
            .await;
        match unblocked {
            Ok(1) => return,
            Ok(_) => tokio::time::sleep(UNBLOCK_RETRY).await,
            Err(e) => {
                tracing::debug!("CLIENT UNBLOCK of a shared read failed: {e}");
                return;
            }
        }
    }
}

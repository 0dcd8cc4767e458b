//! `ProducerActor`: batches publishes and writes each batch in one pipelined
//! round trip.
//!
//! A batch is written when it reaches `producer.batch_size`, when its oldest
//! entry has waited `producer.linger_ms`, or as soon as a write slot is free
//! (whichever comes first). Up to `producer.max_in_flight` batches are being
//! written at once; they are sent in order on one connection, so Redis
//! applies entries in publish order unless a write has to be retried. A
//! write that fails on a transient error is retried with backoff up to
//! `producer.publish_attempts` times; then every publisher of the batch gets
//! the error. Nothing is dropped silently.
//!
//! The buffer is bounded by the [`Producer`](crate::Producer) handle: a
//! publisher holds one permit per event until its entry is written, so at
//! most `producer.buffer` events are accepted and unwritten at any time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::broker::{PublishItem, Streams};
use crate::clock::Backoff;
use crate::error::{Error, Result};

/// The id and entry id of a published event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// The stream entry id Redis assigned.
    pub entry_id: String,
    /// The event id (the idempotency key).
    pub event_id: String,
}

/// Collects the results of one publish call (one or many events) and hands
/// them over when the last is known.
pub(crate) struct Collector {
    results: Mutex<Vec<Option<Result<Published>>>>,
    remaining: Mutex<usize>,
    done: Mutex<Option<oneshot::Sender<Vec<Result<Published>>>>>,
}

impl Collector {
    pub(crate) fn new(n: usize) -> (Arc<Self>, oneshot::Receiver<Vec<Result<Published>>>) {
        let (tx, rx) = oneshot::channel();
        let collector = Collector {
            results: Mutex::new((0..n).map(|_| None).collect()),
            remaining: Mutex::new(n),
            done: Mutex::new(Some(tx)),
        };
        (Arc::new(collector), rx)
    }

    fn set(&self, index: usize, result: Result<Published>) {
        let Ok(mut results) = self.results.lock() else {
            return;
        };
        if let Some(slot) = results.get_mut(index) {
            *slot = Some(result);
        }
        let Ok(mut remaining) = self.remaining.lock() else {
            return;
        };
        *remaining = remaining.saturating_sub(1);
        if *remaining == 0 {
            let all = results
                .drain(..)
                .map(|r| r.unwrap_or(Err(Error::Stopped)))
                .collect();
            if let Some(tx) = self.done.lock().ok().and_then(|mut d| d.take()) {
                let _ = tx.send(all);
            }
        }
    }
}

/// One event waiting to be written.
pub(crate) struct Queued {
    pub(crate) item: PublishItem,
    pub(crate) collector: Arc<Collector>,
    pub(crate) index: usize,
    /// Released when the entry is written (or given up on).
    pub(crate) _permit: Option<OwnedSemaphorePermit>,
}

/// Queue events for writing (producer handle → actor).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Publish(pub(crate) Vec<Queued>);

/// Write everything buffered, then answer (used at shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Flush;

/// Counts of what the producer wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProducerStats {
    /// Events written.
    pub written: u64,
    /// Events given up on (their publishers got an error).
    pub failed: u64,
    /// Pipelined round trips made (batches, retries included).
    pub round_trips: u64,
}

/// Shared counters, updated by the writing task.
#[derive(Debug, Default)]
pub(crate) struct StatCounters {
    written: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    round_trips: std::sync::atomic::AtomicU64,
}

impl StatCounters {
    pub(crate) fn snapshot(&self) -> ProducerStats {
        use std::sync::atomic::Ordering::Relaxed;
        ProducerStats {
            written: self.written.load(Relaxed),
            failed: self.failed.load(Relaxed),
            round_trips: self.round_trips.load(Relaxed),
        }
    }
}

/// How the producer writes.
#[derive(Clone, Debug)]
pub(crate) struct ProducerOptions {
    /// The publishers' permits, to report how full the buffer is.
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    pub(crate) capacity: usize,
    pub(crate) batch_size: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) linger: Duration,
    pub(crate) attempts: u32,
    pub(crate) retry_min: Duration,
    pub(crate) retry_max: Duration,
}

/// The batching producer.
pub(crate) struct ProducerActor {
    broker: Arc<dyn Streams>,
    options: ProducerOptions,
    stats: Arc<StatCounters>,
    buffer: Vec<Queued>,
    /// Batches being written.
    writing: usize,
    linger_armed: bool,
    flush_waiters: Vec<oneshot::Sender<()>>,
}

impl ProducerActor {
    pub(crate) fn new(
        broker: Arc<dyn Streams>,
        options: ProducerOptions,
        stats: Arc<StatCounters>,
    ) -> Self {
        ProducerActor {
            broker,
            options,
            stats,
            buffer: Vec::new(),
            writing: 0,
            linger_armed: false,
            flush_waiters: Vec::new(),
        }
    }

    /// Starts writing batches while there are entries and free write slots.
    fn write_next(&mut self, ctx: &mut Context<Self>) {
        while self.writing < self.options.max_in_flight && !self.buffer.is_empty() {
            self.write_one(ctx);
        }
        if self.buffer.is_empty() && self.writing == 0 {
            for waiter in self.flush_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    fn write_one(&mut self, ctx: &mut Context<Self>) {
        let n = self.buffer.len().min(self.options.batch_size);
        let batch: Vec<Queued> = self.buffer.drain(..n).collect();
        self.writing += 1;
        let broker = Arc::clone(&self.broker);
        let options = self.options.clone();
        let stats = Arc::clone(&self.stats);
        ctx.spawn(
            write_batch(broker, options, stats, batch)
                .into_actor(self)
                .map(|(), act, ctx| {
                    act.writing -= 1;
                    let o = &act.options;
                    let buffered = o.capacity.saturating_sub(o.permits.available_permits());
                    crate::metrics::producer_buffer(buffered, o.capacity);
                    act.write_next(ctx);
                }),
        );
    }
}

/// Writes a batch, retrying what failed transiently, and answers each
/// publisher.
async fn write_batch(
    broker: Arc<dyn Streams>,
    options: ProducerOptions,
    stats: Arc<StatCounters>,
    batch: Vec<Queued>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut written_per_stream: Vec<Arc<str>> = Vec::new();
    // The entries, and beside them who waits for each (so that nothing is
    // copied to write them).
    let (mut items, mut waiters): (Vec<PublishItem>, Vec<Waiter>) = batch
        .into_iter()
        .map(|q| {
            let waiter = Waiter {
                collector: q.collector,
                index: q.index,
                _permit: q._permit,
            };
            (q.item, waiter)
        })
        .unzip();
    let mut backoff = Backoff::new(options.retry_min, options.retry_max);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last_try = attempt >= options.attempts;
        let mut retry = (Vec::new(), Vec::new());
        stats.round_trips.fetch_add(1, Relaxed);
        let written = broker.publish(&items).await;
        crate::failpoints::crash_point!("producer.after_send");
        match written {
            Ok(results) => {
                for ((item, waiter), result) in items.into_iter().zip(waiters).zip(results) {
                    match result {
                        Ok(entry_id) => {
                            written_per_stream.push(Arc::clone(&item.stream));
                            let published = Published {
                                entry_id,
                                event_id: item.entry.event_id,
                            };
                            waiter.collector.set(waiter.index, Ok(published));
                            stats.written.fetch_add(1, Relaxed);
                        }
                        Err(e) if e.is_transient() && !last_try => {
                            retry.0.push(item);
                            retry.1.push(waiter);
                        }
                        Err(e) => {
                            stats.failed.fetch_add(1, Relaxed);
                            fail(&item.stream, waiter, attempt, &e);
                        }
                    }
                }
            }
            // The whole round trip failed: outcome unknown. Writing again
            // may duplicate entries, which carry the same event id.
            Err(e) if e.is_transient() && !last_try => {
                tracing::warn!(
                    count = items.len(),
                    attempt,
                    "publish failed: {e}; retrying"
                );
                retry = (items, waiters);
            }
            Err(e) => {
                stats.failed.fetch_add(items.len() as u64, Relaxed);
                for (item, waiter) in items.into_iter().zip(waiters) {
                    fail(&item.stream, waiter, attempt, &e);
                }
            }
        }
        count_written(&mut written_per_stream);
        if retry.0.is_empty() {
            return;
        }
        (items, waiters) = retry;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Who waits for one entry of a batch being written.
struct Waiter {
    collector: Arc<Collector>,
    index: usize,
    /// Released when the entry is written (or given up on).
    _permit: Option<OwnedSemaphorePermit>,
}

/// Adds written events to the per-stream counters.
fn count_written(streams: &mut Vec<Arc<str>>) {
    let mut counted: Vec<(Arc<str>, u64)> = Vec::new();
    for stream in streams.drain(..) {
        match counted.iter_mut().find(|(s, _)| *s == stream) {
            Some((_, n)) => *n += 1,
            None => counted.push((stream, 1)),
        }
    }
    for (stream, n) in counted {
        crate::metrics::published(&stream, n, 0);
    }
}

fn fail(stream: &str, waiter: Waiter, attempts: u32, error: &Error) {
    tracing::error!(stream, attempts, "publish failed: {error}");
    crate::metrics::published(stream, 0, 1);
    let e = Error::PublishFailed {
        stream: stream.to_owned(),
        attempts,
        last_error: error.to_string(),
    };
    waiter.collector.set(waiter.index, Err(e));
}

impl Actor for ProducerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Permits bound what is buffered; the mailbox only needs to keep
        // publishers from waiting on each other.
        ctx.set_mailbox_capacity(1024);
    }
}

impl Handler<Publish> for ProducerActor {
    type Result = ();

    fn handle(&mut self, msg: Publish, ctx: &mut Self::Context) {
        self.buffer.extend(msg.0);
        if self.buffer.len() >= self.options.batch_size || self.options.linger.is_zero() {
            self.write_next(ctx);
        } else if !self.linger_armed && self.writing == 0 {
            self.linger_armed = true;
            ctx.run_later(self.options.linger, |act, ctx| {
                act.linger_armed = false;
                act.write_next(ctx);
            });
        }
    }
}

impl Handler<Flush> for ProducerActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Flush, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.flush_waiters.push(tx);
        self.write_next(ctx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

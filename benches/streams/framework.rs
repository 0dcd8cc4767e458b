//! The redstream side: the same work through the library's public API. The
//! broker is wrapped (`Timed`) only to see when each XACK returns, which is
//! where end-to-end latency ends; the wrapper adds one delegating call per
//! operation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redstream::broker::{
    Acks, Broker, Capabilities, ClaimIdle, ClaimReply, DeadLetter, Diagnostics, DueReply,
    EntryState, GroupReader, GroupRef, Leases, MemberPresence, MemberRef, PendingSummary,
    PublishItem, Receipt, Redelivery, RetrySchedule, ServerReport, Streams,
};
use redstream::prelude::*;
use redstream::{RedisBroker, StartFrom};
use sea_orm::{ConnectionTrait, DatabaseTransaction};

use crate::spec::{RunResult, Spec};
use crate::workload::{self, BenchEvent, Progress, now_us};

const GROUP: &str = "bench";
const BATCH: u64 = 100;

/// What the handler and the ack observer share.
struct Probe {
    progress: Progress,
    /// Publish time by entry id, from handling until the ack returns.
    sent: Vec<Mutex<HashMap<String, u64>>>,
    track_latency: bool,
}

const SHARDS: usize = 16;

impl Probe {
    fn shard(&self, id: &str) -> &Mutex<HashMap<String, u64>> {
        let h = id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.sent[h % SHARDS]
    }

    fn handled(&self, event: &BenchEvent, entry_id: &str) {
        self.progress.tally.record(event.seq);
        if self.track_latency
            && let Ok(mut m) = self.shard(entry_id).lock()
        {
            m.insert(entry_id.to_owned(), event.sent_us);
        }
    }

    /// `receipts` were acked: a Redis receipt's token is the entry id.
    fn acked(&self, receipts: &[Receipt], n: u64) {
        let now = now_us();
        if self.track_latency {
            let lat: Vec<u32> = receipts
                .iter()
                .map(Receipt::token)
                .filter_map(|id| self.shard(id).lock().ok()?.remove(id))
                .map(|sent| now.saturating_sub(sent) as u32)
                .collect();
            self.progress.latencies.extend(lat);
        }
        self.progress.acked(n, now);
    }
}

pub fn run(spec: &Spec) -> anyhow::Result<RunResult> {
    actix::System::new().block_on(run_async(spec.clone()))
}

fn settings(spec: &Spec) -> anyhow::Result<Settings> {
    let db = spec
        .database_url
        .clone()
        .unwrap_or_else(|| "sqlite::memory:".to_owned());
    Ok(Settings::from_toml(&format!(
        r#"
        [redis]
        url = "{redis}"
        [database]
        url = "{db}"
        max_connections = {connections}
        [instance]
        name = "bench"
        [consumer]
        members = {members}
        {extra}
        "#,
        extra = std::env::var("BENCH_EXTRA_TOML")
            .unwrap_or_default()
            .replace("\\n", "\n"),
        redis = spec.redis_url,
        connections = spec.members.max(8),
        members = spec.members,
    ))?)
}

async fn run_async(spec: Spec) -> anyhow::Result<RunResult> {
    let settings = settings(&spec)?;
    let probe = Arc::new(Probe {
        progress: Progress::new(spec.events),
        sent: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        track_latency: spec.track_latency,
    });
    let redis = RedisBroker::connect(&settings.redis, "bench").await?;
    let broker = Arc::new(Timed {
        inner: redis,
        probe: Arc::clone(&probe),
    });
    let group = if spec.scenario.is_database() {
        let store = Store::connect(&settings.database).await?;
        store.migrate().await?;
        store
            .connection()
            .execute_unprepared(
                "CREATE TABLE IF NOT EXISTS bench_effects (seq BIGINT PRIMARY KEY, sent_us BIGINT NOT NULL)",
            )
            .await?;
        Group::transactional(
            spec.stream.clone(),
            GROUP,
            &store,
            DbHandler(Arc::clone(&probe)),
        )
    } else {
        let p = Arc::clone(&probe);
        Group::new(
            spec.stream.clone(),
            GROUP,
            handler_fn(move |event: BenchEvent, meta: Meta| {
                p.handled(&event, meta.entry_id());
                async { Ok(Outcome::Ack) }
            }),
        )
    };
    let processor = Processor::builder(settings)
        .broker(broker)
        .group(group.with_start_from(StartFrom::Beginning))
        .start()
        .await?;
    let producer = processor.producer();

    let client = redis::Client::open(spec.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let cpu_before = workload::redis_cpu_seconds(&mut conn).await;
    let start_us = now_us();
    publish(&producer, &spec).await?;
    probe.progress.wait_all_acked(&spec).await?;
    let cpu_after = workload::redis_cpu_seconds(&mut conn).await;
    processor.shutdown().await?;
    let pending_after = crate::pending_count(&mut conn, &spec.stream, GROUP).await?;
    Ok(probe
        .progress
        .result(&spec, start_us, cpu_after - cpu_before, pending_after))
}

/// Publishes every event through the producer, in the baseline's batches.
async fn publish(producer: &Producer, spec: &Spec) -> anyhow::Result<()> {
    let mut schedule = crate::Schedule::new(spec.events, spec.rate, BATCH);
    while let Some(range) = schedule.next().await {
        publish_range(producer, &spec.stream, range).await?;
    }
    Ok(())
}

async fn publish_range(
    producer: &Producer,
    stream: &str,
    range: std::ops::Range<u64>,
) -> anyhow::Result<()> {
    let events = range
        .map(|seq| Event::from_json("bench.event", workload::payload(seq, now_us())))
        .collect();
    for r in producer.publish_batch(stream, events).await? {
        r?;
    }
    Ok(())
}

/// The producer-only scenario.
pub fn produce(spec: &Spec) -> anyhow::Result<RunResult> {
    let spec = spec.clone();
    actix::System::new().block_on(async move {
        let settings = settings(&spec)?;
        let processor = Processor::builder(settings).start().await?;
        let producer = processor.producer();
        let client = redis::Client::open(spec.redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let cpu_before = workload::redis_cpu_seconds(&mut conn).await;
        let start = std::time::Instant::now();
        let tasks = crate::publishers(spec.events).map(|chunks| {
            let producer = producer.clone();
            let stream = spec.stream.clone();
            actix_rt::spawn(async move {
                for range in chunks {
                    publish_range(&producer, &stream, range).await?;
                }
                anyhow::Ok(())
            })
        });
        for task in futures_util::future::join_all(tasks).await {
            task??;
        }
        let seconds = start.elapsed().as_secs_f64();
        let cpu_after = workload::redis_cpu_seconds(&mut conn).await;
        processor.shutdown().await?;
        crate::produced_result(&mut conn, &spec, seconds, cpu_after - cpu_before).await
    })
}

/// The idempotent handler: one row per event, in the library's transaction
/// (which also records the event in `processed_events`).
struct DbHandler(Arc<Probe>);

impl TxHandler for DbHandler {
    type Event = BenchEvent;

    async fn handle(
        &self,
        event: BenchEvent,
        meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let stmt = sea_orm::Statement::from_sql_and_values(
            tx.get_database_backend(),
            match tx.get_database_backend() {
                sea_orm::DbBackend::Postgres => {
                    "INSERT INTO bench_effects (seq, sent_us) VALUES ($1, $2)"
                }
                _ => "INSERT INTO bench_effects (seq, sent_us) VALUES (?, ?)",
            },
            [(event.seq as i64).into(), (event.sent_us as i64).into()],
        );
        tx.execute_raw(stmt).await?;
        self.0.handled(&event, meta.entry_id());
        Ok(Outcome::Ack)
    }
}

/// The Redis broker, observing acks.
struct Timed {
    inner: RedisBroker,
    probe: Arc<Probe>,
}

#[async_trait]
impl Streams for Timed {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn ensure_group(&self, group: &GroupRef, start: StartFrom) -> redstream::Result<bool> {
        self.inner.ensure_group(group, start).await
    }
    async fn publish(
        &self,
        items: &[PublishItem],
    ) -> redstream::Result<Vec<redstream::Result<String>>> {
        self.inner.publish(items).await
    }
    async fn open_reader(
        &self,
        member: &MemberRef,
        block: Duration,
    ) -> redstream::Result<Box<dyn GroupReader>> {
        self.inner.open_reader(member, block).await
    }
    async fn ack(&self, group: &GroupRef, acks: Acks<'_>) -> redstream::Result<u64> {
        let n = self.inner.ack(group, acks).await?;
        self.probe.acked(acks.receipts, n);
        Ok(n)
    }
    async fn schedule_retries(
        &self,
        group: &GroupRef,
        retries: &[RetrySchedule],
    ) -> redstream::Result<()> {
        self.inner.schedule_retries(group, retries).await
    }
    async fn dead_letter(
        &self,
        group: &GroupRef,
        letters: &[(Receipt, DeadLetter)],
    ) -> redstream::Result<Vec<(Receipt, String)>> {
        self.inner.dead_letter(group, letters).await
    }
    async fn release(
        &self,
        member: &MemberRef,
        receipts: &[Receipt],
        idle: Duration,
    ) -> redstream::Result<()> {
        self.inner.release(member, receipts, idle).await
    }
}

impl Broker for Timed {
    fn redelivery(self: Arc<Self>) -> Option<Arc<dyn Redelivery>> {
        Some(self)
    }
}

#[async_trait]
impl Redelivery for Timed {
    async fn claim_idle(
        &self,
        member: &MemberRef,
        step: ClaimIdle<'_>,
    ) -> redstream::Result<ClaimReply> {
        self.inner.claim_idle(member, step).await
    }
    async fn claim_due(&self, member: &MemberRef, count: usize) -> redstream::Result<DueReply> {
        self.inner.claim_due(member, count).await
    }
    async fn heartbeat(
        &self,
        member: &MemberRef,
        receipts: &[Receipt],
    ) -> redstream::Result<Vec<Receipt>> {
        self.inner.heartbeat(member, receipts).await
    }
    async fn entry_states(
        &self,
        group: &GroupRef,
        receipts: &[Receipt],
    ) -> redstream::Result<Vec<EntryState>> {
        self.inner.entry_states(group, receipts).await
    }
}

#[async_trait]
impl Leases for Timed {
    async fn acquire_leases(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> redstream::Result<Vec<bool>> {
        self.inner.acquire_leases(keys, token, ttl).await
    }
    async fn release_leases(&self, keys: &[String], token: &str) -> redstream::Result<()> {
        self.inner.release_leases(keys, token).await
    }
    fn lease_key(&self, member: &MemberRef) -> String {
        self.inner.lease_key(member)
    }
}

#[async_trait]
impl Diagnostics for Timed {
    async fn pending_summary(&self, group: &GroupRef) -> redstream::Result<PendingSummary> {
        self.inner.pending_summary(group).await
    }
    async fn group_count(&self, stream: &str) -> redstream::Result<u64> {
        self.inner.group_count(stream).await
    }
    async fn remove_idle_consumers(
        &self,
        group: &GroupRef,
        idle: Duration,
    ) -> redstream::Result<Vec<String>> {
        self.inner.remove_idle_consumers(group, idle).await
    }
    async fn server_report(&self) -> redstream::Result<ServerReport> {
        self.inner.server_report().await
    }
    async fn ping(&self) -> redstream::Result<()> {
        self.inner.ping().await
    }
    async fn server_time_ms(&self) -> redstream::Result<u64> {
        self.inner.server_time_ms().await
    }
    async fn publish_presence(
        &self,
        group: &GroupRef,
        members: &[MemberPresence],
        ttl: Duration,
    ) -> redstream::Result<()> {
        self.inner.publish_presence(group, members, ttl).await
    }
    async fn withdraw_presence(&self, group: &GroupRef, names: &[String]) -> redstream::Result<()> {
        self.inner.withdraw_presence(group, names).await
    }
    async fn presence(&self, group: &GroupRef) -> redstream::Result<Vec<MemberPresence>> {
        self.inner.presence(group).await
    }
}

/// Many streams, a group each, in one processor.
pub fn many_streams(spec: &Spec) -> anyhow::Result<RunResult> {
    actix::System::new().block_on(many_streams_async(spec.clone()))
}

async fn many_streams_async(spec: Spec) -> anyhow::Result<RunResult> {
    let settings = settings(&spec)?;
    let probe = Arc::new(Probe {
        progress: Progress::new(spec.events),
        sent: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        track_latency: false,
    });
    let started = std::time::Instant::now();
    let redis = RedisBroker::connect(&settings.redis, "bench").await?;
    let broker = Arc::new(Timed {
        inner: redis,
        probe: Arc::clone(&probe),
    });
    let mut builder = Processor::builder(settings).broker(broker);
    for i in 0..spec.streams {
        let p = Arc::clone(&probe);
        let handler = handler_fn(move |event: BenchEvent, meta: Meta| {
            p.handled(&event, meta.entry_id());
            async { Ok(Outcome::Ack) }
        });
        builder = builder.group(
            Group::new(workload::stream_name(&spec, i), GROUP, handler)
                .with_start_from(StartFrom::Beginning),
        );
    }
    let processor = builder.start().await?;
    let startup_s = started.elapsed().as_secs_f64();

    let client = redis::Client::open(spec.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let cpu_before = workload::redis_cpu_seconds(&mut conn).await;
    let start_us = now_us();
    workload::publish_many(&mut conn, &spec).await?;
    probe.progress.wait_all_acked(&spec).await?;
    let cpu_after = workload::redis_cpu_seconds(&mut conn).await;
    let (idle_cpu_pct, connections) = workload::idle_cost(&mut conn, &spec).await?;
    let end_rss_mib = workload::rss_kib() as f64 / 1024.0;
    processor.shutdown().await?;
    let pending_after = workload::pending_many(&mut conn, &spec, GROUP).await?;
    let mut result = probe
        .progress
        .result(&spec, start_us, cpu_after - cpu_before, pending_after);
    result.startup_s = startup_s;
    result.idle_cpu_pct = idle_cpu_pct;
    result.connections = connections;
    result.end_rss_mib = end_rss_mib;
    Ok(result)
}

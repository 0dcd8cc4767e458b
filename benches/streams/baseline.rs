//! The hand-written baseline: plain redis-rs on tokio, the code a careful
//! engineer writes without a framework. Pipelined XADD batches of 100; one
//! task per member, each with its own connection, blocking on
//! `XREADGROUP … COUNT 100 BLOCK 2000`; one multi-id XACK per batch. Many
//! streams: one task and one connection reading every stream with one
//! `XREADGROUP … STREAMS s1 … sN > … >`, acking each round in one pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Value};

use crate::spec::{RunResult, Spec};
use crate::workload::{self, BenchEvent, Progress, now_us};

const GROUP: &str = "bench";
const BATCH: u64 = 100;

/// The state readers share.
struct Shared {
    progress: Progress,
    stop: AtomicBool,
}

pub fn run(spec: &Spec) -> anyhow::Result<RunResult> {
    let rt = runtime()?;
    rt.block_on(run_async(spec))
}

async fn run_async(spec: &Spec) -> anyhow::Result<RunResult> {
    let client = redis::Client::open(spec.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&spec.stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await?;
    let shared = Arc::new(Shared {
        progress: Progress::new(spec.events),
        stop: AtomicBool::new(false),
    });
    let block = Duration::from_millis(2000);
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(block * 2));
    let mut readers = Vec::new();
    for i in 0..spec.members {
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let member = format!("member-{i}");
        readers.push(tokio::spawn(read_loop(
            conn,
            spec.clone(),
            member,
            Arc::clone(&shared),
        )));
    }

    let cpu_before = workload::redis_cpu_seconds(&mut conn).await;
    let start_us = now_us();
    publish(&mut conn, spec).await?;
    shared.progress.wait_all_acked(spec).await?;
    let cpu_after = workload::redis_cpu_seconds(&mut conn).await;
    shared.stop.store(true, Relaxed);
    for r in &readers {
        r.abort();
    }
    let pending_after = crate::pending_count(&mut conn, &spec.stream, GROUP).await?;
    Ok(shared
        .progress
        .result(spec, start_us, cpu_after - cpu_before, pending_after))
}

/// Publishes every event: batches of 100 back to back, or paced.
async fn publish(conn: &mut MultiplexedConnection, spec: &Spec) -> anyhow::Result<()> {
    let mut schedule = crate::Schedule::new(spec.events, spec.rate, BATCH);
    while let Some(range) = schedule.next().await {
        publish_range(conn, &spec.stream, range).await?;
    }
    Ok(())
}

async fn publish_range(
    conn: &mut MultiplexedConnection,
    stream: &str,
    range: std::ops::Range<u64>,
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    for seq in range {
        pipe.cmd("XADD").arg(stream).arg("*");
        for (k, v) in workload::baseline_fields(seq, now_us()) {
            pipe.arg(k).arg(v);
        }
    }
    let _: Vec<String> = pipe.query_async(conn).await?;
    Ok(())
}

async fn read_loop(
    mut conn: MultiplexedConnection,
    spec: Spec,
    member: String,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    while !shared.stop.load(Relaxed) {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&member)
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(2000)
            .arg("STREAMS")
            .arg(&spec.stream)
            .arg(">")
            .query_async(&mut conn)
            .await?;
        let Some(reply) = reply else { continue };
        let mut ids = Vec::with_capacity(BATCH as usize);
        let mut sent = Vec::with_capacity(BATCH as usize);
        for key in reply.keys {
            for entry in key.ids {
                let Some(Value::BulkString(data)) = entry.map.get("data") else {
                    anyhow::bail!("entry {} has no data", entry.id);
                };
                let event: BenchEvent = serde_json::from_slice(data)?;
                shared.progress.tally.record(event.seq);
                sent.push(event.sent_us);
                ids.push(entry.id);
            }
        }
        if ids.is_empty() {
            continue;
        }
        let _: u64 = redis::cmd("XACK")
            .arg(&spec.stream)
            .arg(GROUP)
            .arg(&ids)
            .query_async(&mut conn)
            .await?;
        let now = now_us();
        if spec.track_latency {
            shared
                .progress
                .latencies
                .extend(sent.iter().map(|s| now.saturating_sub(*s) as u32));
        }
        shared.progress.acked(ids.len() as u64, now);
    }
    Ok(())
}

/// The producer-only scenario: concurrent publishers, each writing pipelined
/// batches.
pub fn produce(spec: &Spec) -> anyhow::Result<RunResult> {
    let rt = runtime()?;
    rt.block_on(async {
        let client = redis::Client::open(spec.redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let cpu_before = workload::redis_cpu_seconds(&mut conn).await;
        let start = std::time::Instant::now();
        let tasks = crate::publishers(spec.events).map(|chunks| {
            let mut conn = conn.clone();
            let stream = spec.stream.clone();
            tokio::spawn(async move {
                for range in chunks {
                    publish_range(&mut conn, &stream, range).await?;
                }
                anyhow::Ok(())
            })
        });
        for task in futures_util::future::join_all(tasks).await {
            task??;
        }
        let seconds = start.elapsed().as_secs_f64();
        let cpu_after = workload::redis_cpu_seconds(&mut conn).await;
        crate::produced_result(&mut conn, spec, seconds, cpu_after - cpu_before).await
    })
}

/// Many streams, a group each: one reader over all of them.
pub fn many_streams(spec: &Spec) -> anyhow::Result<RunResult> {
    let rt = runtime()?;
    rt.block_on(many_streams_async(spec))
}

async fn many_streams_async(spec: &Spec) -> anyhow::Result<RunResult> {
    let started = std::time::Instant::now();
    let client = redis::Client::open(spec.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut pipe = redis::pipe();
    for i in 0..spec.streams {
        pipe.cmd("XGROUP")
            .arg("CREATE")
            .arg(workload::stream_name(spec, i))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await?;
    let shared = Arc::new(Shared {
        progress: Progress::new(spec.events),
        stop: AtomicBool::new(false),
    });
    let block = Duration::from_millis(2000);
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(block * 2));
    let reader_conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let reader = tokio::spawn(read_many(
        reader_conn,
        conn.clone(),
        spec.clone(),
        Arc::clone(&shared),
    ));
    let startup_s = started.elapsed().as_secs_f64();

    let cpu_before = workload::redis_cpu_seconds(&mut conn).await;
    let start_us = now_us();
    workload::publish_many(&mut conn, spec).await?;
    shared.progress.wait_all_acked(spec).await?;
    let cpu_after = workload::redis_cpu_seconds(&mut conn).await;
    let (idle_cpu_pct, connections) = workload::idle_cost(&mut conn, spec).await?;
    let end_rss_mib = workload::rss_kib() as f64 / 1024.0;
    shared.stop.store(true, Relaxed);
    reader.abort();
    let pending_after = workload::pending_many(&mut conn, spec, GROUP).await?;
    let mut result = shared
        .progress
        .result(spec, start_us, cpu_after - cpu_before, pending_after);
    result.startup_s = startup_s;
    result.idle_cpu_pct = idle_cpu_pct;
    result.connections = connections;
    result.end_rss_mib = end_rss_mib;
    Ok(result)
}

async fn read_many(
    mut reader: MultiplexedConnection,
    mut acks: MultiplexedConnection,
    spec: Spec,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let names: Vec<String> = (0..spec.streams)
        .map(|i| workload::stream_name(&spec, i))
        .collect();
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(GROUP)
        .arg("member-0")
        .arg("COUNT")
        .arg(BATCH)
        .arg("BLOCK")
        .arg(2000)
        .arg("STREAMS")
        .arg(&names);
    for _ in &names {
        read.arg(">");
    }
    while !shared.stop.load(Relaxed) {
        let reply: Option<StreamReadReply> = read.query_async(&mut reader).await?;
        let Some(reply) = reply else { continue };
        let mut pipe = redis::pipe();
        let mut n = 0;
        for key in reply.keys {
            let mut ids = Vec::with_capacity(key.ids.len());
            for entry in key.ids {
                let Some(Value::BulkString(data)) = entry.map.get("data") else {
                    anyhow::bail!("entry {} has no data", entry.id);
                };
                let event: BenchEvent = serde_json::from_slice(data)?;
                shared.progress.tally.record(event.seq);
                ids.push(entry.id);
            }
            n += ids.len();
            pipe.cmd("XACK").arg(&key.key).arg(GROUP).arg(&ids).ignore();
        }
        if n == 0 {
            continue;
        }
        let () = pipe.query_async(&mut acks).await?;
        shared.progress.acked(n as u64, now_us());
    }
    Ok(())
}

/// The baseline's runtime: tokio on 2 threads.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

//! Scheduled producers and the latest-value helper, against the real Redis:
//! rates, wall-clock alignment, failures that do not stop a schedule,
//! skipped overlapping runs, shutdown, and out-of-order latest values.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redstream::prelude::*;
use redstream::{Applied, LatestValues, RedisBroker, ScheduleStats, Version};

use crate::support::{TestContext, eventually};

fn stats(processor: &Processor, name: &str) -> ScheduleStats {
    processor.schedule_stats(name).expect("schedule exists")
}

fn one_event(tick: &Tick) -> Vec<Event> {
    vec![
        Event::new("tick", &serde_json::json!({"n": tick.number}))
            .unwrap()
            .with_id(format!("{}-{}", tick.schedule, tick.number)),
    ]
}

type Ready = futures_util::future::Ready<redstream::JobResult>;

/// A job that records when it ran and publishes one event.
fn recording(times: Arc<Mutex<Vec<Instant>>>) -> impl Fn(Tick) -> Ready + Send + Sync + 'static {
    move |tick: Tick| {
        times.lock().unwrap().push(Instant::now());
        futures_util::future::ready(Ok(one_event(&tick)))
    }
}

#[actix_rt::test]
async fn schedules_fire_at_their_rates() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("ticks");
    let fast = Arc::new(Mutex::new(Vec::new()));
    let slow = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let processor = Processor::builder(ctx.settings())
        .schedule(Schedule::every(
            "fast",
            &stream,
            Duration::from_millis(100),
            recording(Arc::clone(&fast)),
        ))
        .schedule(Schedule::every(
            "slow",
            &stream,
            Duration::from_millis(250),
            recording(Arc::clone(&slow)),
        ))
        .start()
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "25 fast runs", || async {
        fast.lock().unwrap().len() >= 25
    })
    .await;
    let elapsed = started.elapsed();
    let fast_stats = stats(&processor, "fast");
    let slow_stats = stats(&processor, "slow");
    let report = processor.shutdown().await.unwrap();
    assert!(report.settled);

    let fast = fast.lock().unwrap().clone();
    let slow = slow.lock().unwrap().clone();
    // Runs at start, then one per period: n ≈ elapsed / period + 1. The
    // bounds are generous for a loaded machine, and still fail for a
    // schedule that fires twice per tick or at the other one's rate.
    let expect = |period_ms: f64| elapsed.as_millis() as f64 / period_ms + 1.0;
    let (f, s) = (fast.len() as f64, slow.len() as f64);
    assert!(
        f >= expect(100.0) * 0.6 && f <= expect(100.0) + 2.0,
        "fast: {f} runs in {elapsed:?}"
    );
    assert!(
        s >= expect(250.0) * 0.6 && s <= expect(250.0) + 2.0,
        "slow: {s} runs in {elapsed:?}"
    );
    assert!(f / s > 1.8, "fast/slow ratio {f}/{s}, expected about 2.5");
    // No bursts: a late tick is followed by one due sooner, never by a
    // double fire.
    for pair in fast.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(20),
            "two fast runs {gap:?} apart"
        );
    }
    assert!(fast_stats.runs >= 25 && fast_stats.failed == 0 && fast_stats.skipped == 0);
    assert_eq!(fast_stats.succeeded, fast_stats.published);
    assert_eq!(slow_stats.failed, 0);
    // Every run's event reached the stream (the shutdown waited for them).
    assert_eq!(ctx.xlen(&stream).await as usize, fast.len() + slow.len());
}

#[actix_rt::test]
async fn aligned_schedules_run_on_wall_clock_boundaries() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("aligned");
    let runs: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&runs);
    let processor = Processor::builder(ctx.settings())
        .schedule(Schedule::aligned(
            "aligned",
            &stream,
            Duration::from_millis(300),
            move |tick: Tick| {
                seen.lock().unwrap().push((tick.slot_ms, now_ms()));
                futures_util::future::ready(Ok(one_event(&tick)))
            },
        ))
        .start()
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "4 aligned runs", || async {
        runs.lock().unwrap().len() >= 4
    })
    .await;
    processor.shutdown().await.unwrap();
    let runs = runs.lock().unwrap().clone();
    for (slot, ran_at) in &runs {
        assert_eq!(slot % 300, 0, "slot {slot} is not a boundary");
        assert!(
            *ran_at + 20 >= *slot,
            "ran at {ran_at}, before its slot {slot}"
        );
        assert!(
            *ran_at < slot + 300,
            "ran at {ran_at}, a whole period after its slot {slot}"
        );
    }
    for pair in runs.windows(2) {
        let step = pair[1].0 - pair[0].0;
        assert!(step > 0 && step % 300 == 0, "slots {runs:?}");
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[actix_rt::test]
async fn failing_runs_do_not_stop_the_schedule() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("flaky");
    let processor = Processor::builder(ctx.settings())
        .schedule(Schedule::every(
            "flaky",
            &stream,
            Duration::from_millis(50),
            |tick: Tick| async move {
                match tick.number {
                    1 | 3 => Err(format!("source down at tick {}", tick.number).into()),
                    2 => panic!("a bug in the source"),
                    _ => Ok(one_event(&tick)),
                }
            },
        ))
        .start()
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "5 good runs after the failures",
        || async { stats(&processor, "flaky").succeeded >= 5 },
    )
    .await;
    let s = stats(&processor, "flaky");
    processor.shutdown().await.unwrap();
    assert_eq!(s.failed, 3, "{s:?}");
    assert_eq!(s.published, s.succeeded, "{s:?}");
    let entries = ctx.entries(&stream).await;
    let ids: Vec<String> = entries
        .iter()
        .filter_map(|(_, f)| f.iter().find(|(k, _)| k == "id").map(|(_, v)| v.clone()))
        .collect();
    assert!(ids.contains(&"flaky-0".to_owned()));
    assert!(
        ids.contains(&"flaky-4".to_owned()),
        "runs after the panic publish: {ids:?}"
    );
    assert!(
        !ids.iter()
            .any(|i| i == "flaky-1" || i == "flaky-2" || i == "flaky-3")
    );
}

#[actix_rt::test]
async fn overlapping_runs_are_skipped() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("slow");
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (Arc::clone(&running), Arc::clone(&most));
    let processor = Processor::builder(ctx.settings())
        .schedule(Schedule::every(
            "slow",
            &stream,
            Duration::from_millis(50),
            move |tick: Tick| {
                let (r, m) = (Arc::clone(&r), Arc::clone(&m));
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    Ok(one_event(&tick))
                }
            },
        ))
        .start()
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "3 slow runs", || async {
        stats(&processor, "slow").succeeded >= 3
    })
    .await;
    let s = stats(&processor, "slow");
    processor.shutdown().await.unwrap();
    assert_eq!(most.load(Ordering::SeqCst), 1, "two runs overlapped");
    // Each 300 ms run spans about five 50 ms ticks.
    assert!(s.skipped >= 2 * s.succeeded, "{s:?}");
    assert_eq!(s.failed, 0, "{s:?}");
}

#[actix_rt::test]
async fn shutdown_lets_a_running_job_publish_then_stops_ticking() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("stop");
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let processor = Processor::builder(ctx.settings())
        .schedule(Schedule::every(
            "stop",
            &stream,
            Duration::from_millis(100),
            move |tick: Tick| {
                let c = Arc::clone(&c);
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Ok(one_event(&tick))
                }
            },
        ))
        .start()
        .await
        .unwrap();
    // The first run starts at once; stop while it sleeps.
    eventually(Duration::from_secs(5), "the first run started", || async {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    processor.shutdown().await.unwrap();
    assert_eq!(
        ctx.xlen(&stream).await,
        1,
        "the running job's event was published"
    );
    let after = calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(calls.load(Ordering::SeqCst), after, "no run after shutdown");
}

#[actix_rt::test]
async fn an_older_value_never_overwrites_a_newer_one() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let settings = ctx.settings();
    let broker = RedisBroker::connect(&settings.redis, "latest-test")
        .await
        .unwrap();
    let key = ctx.stream("latest");
    let latest = LatestValues::new(&broker, &key);

    let put = |v: Version, value: &'static str| {
        let latest = latest.clone();
        async move { latest.put("AAPL", v, value).await.unwrap() }
    };
    assert_eq!(put(Version::new(2_000, 0), "b").await, Applied::Updated);
    assert_eq!(put(Version::new(1_000, 9), "a").await, Applied::Stale);
    assert_eq!(put(Version::new(2_000, 0), "b").await, Applied::Unchanged);
    // A tie keeps the value written first, whatever the new value is.
    assert_eq!(put(Version::new(2_000, 0), "c").await, Applied::Unchanged);
    let got = latest.get("AAPL").await.unwrap().unwrap();
    assert_eq!(
        (got.value.as_slice(), got.version),
        (&b"b"[..], Version::new(2_000, 0))
    );
    // The tiebreak orders equal times.
    assert_eq!(put(Version::new(2_000, 1), "d").await, Applied::Updated);
    assert_eq!(put(Version::new(2_000, 0), "e").await, Applied::Stale);
    // Readable by any client: the plain value, its version beside it.
    let mut conn = ctx.conn().await;
    let (value, version): (String, String) = redis::pipe()
        .cmd("HGET")
        .arg(&key)
        .arg("AAPL")
        .cmd("HGET")
        .arg(format!("{key}:version"))
        .arg("AAPL")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((value.as_str(), version.as_str()), ("d", "2000:1"));

    // Many writers in a scrambled order: the newest always wins.
    let mut versions: Vec<u64> = (0..200).collect();
    versions.sort_by_key(|v| (v * 7919) % 200);
    let writes = versions.iter().map(|&v| {
        let latest = latest.clone();
        async move {
            latest
                .put_json("MSFT", Version::new(10_000 + v, 0), &v)
                .await
                .unwrap()
        }
    });
    let applied = futures_util::future::join_all(writes).await;
    assert!(applied.contains(&Applied::Stale), "some writes were stale");
    let msft = latest.get_json::<u64>("MSFT").await.unwrap().unwrap();
    assert_eq!(msft.value, 199);
    assert_eq!(msft.version, Version::new(10_199, 0));
    let all = latest.all().await.unwrap();
    let fields: Vec<&str> = all.iter().map(|l| l.field.as_str()).collect();
    assert_eq!(fields, ["AAPL", "MSFT"]);
    // Versions Lua cannot compare exactly are refused before Redis.
    assert!(
        latest
            .put("AAPL", Version::new(u64::MAX, 0), "x")
            .await
            .is_err()
    );
}

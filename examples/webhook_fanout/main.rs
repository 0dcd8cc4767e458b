//! Webhook fan-out: three consumer groups on one stream, real HTTP delivery
//! with signatures, retries and dead letters, and fan-out-safe retention.
//!
//! The `order.created` events of the order example (stream `orders`) are
//! read by three groups, each getting every event:
//!
//! - `webhook-delivery` fans each event out to the endpoints subscribed to
//!   its type: one entry per (event, endpoint) on the endpoint's own stream
//!   `orders:webhooks:<endpoint>`, whose `webhook-delivery` group POSTs it,
//!   signed the Standard Webhooks way, retrying with backoff;
//! - `analytics-pipeline` counts events per type and hour (exactly once);
//! - `notification-sender` records one notification per order (exactly once).
//!
//! The demo starts three receivers on loopback (healthy; flaky, failing a
//! seeded share of requests with 503, 429 + `Retry-After`, timeouts and a
//! few 400s; slow, always past the timeout), publishes orders, waits until
//! every delivery is delivered or dead-lettered, prints a summary per
//! endpoint and exits 0. Retention runs meanwhile, trimming what every group
//! has acked.
//!
//! Endpoints come from the table `webhook_endpoints` (created here on
//! SQLite or PostgreSQL). The demo upserts its three receivers into it at
//! start; other rows are delivered to as well. The table is re-read every
//! `--refresh-secs` (5 s): a changed or disabled endpoint takes effect,
//! and a new one gets its delivery group, within that delay, without a
//! restart. A new endpoint gets only events published after it was added.
//!
//! ```text
//! cargo run --example webhook_fanout                    # demo: 40 orders + 8 cancellations, summary, exit
//! cargo run --example webhook_fanout -- --orders 200    # more orders
//! cargo run --example webhook_fanout -- --follow        # keep running (receivers, groups, retention) until SIGINT/SIGTERM
//! cargo run --example webhook_fanout -- endpoints add crm https://crm.example/hooks --types order.created,order.cancelled [--secret whsec_…] [--timeout-ms 5000]
//! cargo run --example webhook_fanout -- endpoints list
//! cargo run --example webhook_fanout -- endpoints disable crm    # or enable
//! ```
//!
//! Settings come from `settings/` and `REDSTREAM__…` variables (Redis:
//! `REDSTREAM__REDIS__URL`; database: `REDSTREAM__DATABASE__URL`, default
//! the SQLite file `redstream.db`). `WEBHOOK_ORDERS_STREAM` renames the
//! order stream, `WEBHOOK_FLAKY_SEED` changes the flaky receiver's dice.

#[path = "../order_processing/orders.rs"]
#[allow(dead_code)]
mod orders;
mod receivers;
mod retention;
mod webhooks;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use redstream::prelude::*;
use redstream::settings::StartFrom;
use redstream::{RedisBroker, dead_letter_stream};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder};

use receivers::{Receiver, Reply, dice};
use retention::RetentionPolicy;
use webhooks::{Endpoint, EndpointCache, EndpointWatcher, Wiring, attempt_row, notification};

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// The event type of a cancellation (delivered to endpoints that subscribe
/// to it; counted by analytics).
const ORDER_CANCELLED: &str = "order.cancelled";

/// Webhook fan-out demo and endpoint management.
#[derive(clap::Parser, Debug)]
#[command(name = "webhook_fanout")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Orders to publish in the demo.
    #[arg(long, default_value_t = 40)]
    orders: usize,
    /// Keep running after the summary until SIGINT/SIGTERM.
    #[arg(long)]
    follow: bool,
    /// How often `webhook_endpoints` is re-read, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    refresh_secs: u64,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Manage the rows of `webhook_endpoints`.
    #[command(subcommand)]
    Endpoints(EndpointsCommand),
}

#[derive(clap::Subcommand, Debug)]
enum EndpointsCommand {
    /// Adds an endpoint, or replaces the one with this name (enabled).
    Add {
        /// `[a-z0-9_-]`, part of its delivery stream's key.
        name: String,
        /// Where deliveries are POSTed (http or https).
        url: String,
        /// Event types it subscribes to, comma-separated; `*` for all.
        #[arg(long)]
        types: String,
        /// The signing secret, `whsec_<base64>`; a random one if left out.
        #[arg(long)]
        secret: Option<String>,
        /// Per-request timeout.
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// Lists every endpoint, invalid rows included.
    List,
    /// Stops new deliveries to an endpoint.
    Disable { name: String },
    /// Resumes deliveries to an endpoint (events published while it was
    /// disabled are not sent).
    Enable { name: String },
}

#[actix::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Dead letters are expected here (the slow endpoint): keep the
                // library's per-entry warnings out of the summary.
                .unwrap_or_else(|_| "warn,redstream=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A demo secret per endpoint (`whsec_` + base64), derived from its name.
fn demo_secret(name: &str) -> String {
    let raw = format!("redstream-demo-secret-{name}");
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A random `whsec_` secret (24 bytes).
fn random_secret() -> String {
    let raw: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

async fn manage(store: &Store, command: EndpointsCommand) -> Result<ExitCode, AnyError> {
    let db = store.connection();
    match command {
        EndpointsCommand::Add {
            name,
            url,
            types,
            secret,
            timeout_ms,
        } => {
            let event_types =
                webhooks::parse_event_types(&types).map_err(|e| format!("--types: {e}"))?;
            let generated = secret.is_none();
            let endpoint = Endpoint::new(
                name,
                url,
                secret.unwrap_or_else(random_secret),
                event_types,
                timeout_ms,
            );
            webhooks::upsert_endpoint(db, &endpoint).await?;
            println!(
                "endpoint `{}` → {} for {} (timeout {} ms), enabled",
                endpoint.name,
                endpoint.url,
                endpoint.event_types.join(","),
                endpoint.timeout_ms
            );
            if generated {
                println!("secret: {}", endpoint.secret);
            }
            println!(
                "running processes pick it up at their next refresh (--refresh-secs, 5 s by default); it gets events published from now on"
            );
        }
        EndpointsCommand::List => {
            let rows = webhooks::endpoint_row::Entity::find()
                .order_by_asc(webhooks::endpoint_row::Column::Name)
                .all(db)
                .await?;
            if rows.is_empty() {
                println!("no endpoints");
            }
            for row in rows {
                let created = chrono::DateTime::from_timestamp_millis(row.created_at)
                    .unwrap_or_default()
                    .format("%Y-%m-%d %H:%M:%SZ");
                let state = if row.enabled { "enabled" } else { "disabled" };
                let problem = webhooks::endpoint_from_row(row.clone())
                    .err()
                    .map(|p| format!("  INVALID, skipped: {p}"))
                    .unwrap_or_default();
                println!(
                    "{:<12} {:<8} {:<40} {:<32} {:>6}ms  added {created}{problem}",
                    row.name, state, row.url, row.event_types, row.timeout_ms
                );
            }
        }
        EndpointsCommand::Disable { name } => return set_enabled(store, &name, false).await,
        EndpointsCommand::Enable { name } => return set_enabled(store, &name, true).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_enabled(store: &Store, name: &str, enabled: bool) -> Result<ExitCode, AnyError> {
    if !webhooks::set_endpoint_enabled(store.connection(), name, enabled).await? {
        return Err(format!("no endpoint named `{name}` (see `endpoints list`)").into());
    }
    let state = if enabled { "enabled" } else { "disabled" };
    println!(
        "endpoint `{name}` {state}; running processes apply it at their next refresh (--refresh-secs, 5 s by default)"
    );
    Ok(ExitCode::SUCCESS)
}

async fn run() -> Result<ExitCode, AnyError> {
    let args = <Cli as clap::Parser>::parse();
    let settings = Settings::load()?;
    let database = |e: redstream::Error| format!("database at {}: {e}", settings.database.url);
    if let Some(Command::Endpoints(command)) = args.command {
        let store = Store::connect(&settings.database).await.map_err(database)?;
        webhooks::create_tables(store.connection()).await?;
        return manage(&store, command).await;
    }
    let source = std::env::var("WEBHOOK_ORDERS_STREAM").unwrap_or_else(|_| "orders".to_owned());
    let seed: u64 = match std::env::var("WEBHOOK_FLAKY_SEED") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("WEBHOOK_FLAKY_SEED must be a number, got `{v}`"))?,
        Err(_) => 7,
    };

    let store = Store::connect(&settings.database).await.map_err(database)?;
    webhooks::create_tables(store.connection()).await?;

    // The receivers. The healthy one checks signatures and answers 401 to
    // a bad one.
    let healthy_key = Endpoint::new("healthy", "", demo_secret("healthy"), Vec::new(), 1).key()?;
    let healthy = Receiver::start(Arc::new(move |r: &receivers::Received| {
        if r.event_type.is_empty() {
            return Reply::Status(400);
        }
        if webhooks::verify(
            &healthy_key,
            &r.webhook_id,
            &r.timestamp,
            &r.body,
            &r.signature,
        ) {
            Reply::Status(204)
        } else {
            Reply::Status(401)
        }
    }))
    .await?;
    let flaky = Receiver::start(Arc::new(move |r: &receivers::Received| {
        match dice(seed, &r.webhook_id, r.nth) % 100 {
            0..=24 => Reply::Status(503),
            25..=34 => Reply::RetryAfter(429, 1),
            35..=39 => Reply::Slow(Duration::from_millis(1_500), 200),
            40..=41 if r.nth == 1 => Reply::Status(400),
            _ => Reply::Status(200),
        }
    }))
    .await?;
    let slow = Receiver::start(Arc::new(|_: &receivers::Received| {
        Reply::Slow(Duration::from_secs(3), 200)
    }))
    .await?;
    // Into the table: upserted, since the receivers' ports change between
    // runs (and enabled again if an operator disabled them).
    let types = |t: &[&str]| t.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    for demo in [
        Endpoint::new(
            "healthy",
            healthy.url.clone(),
            demo_secret("healthy"),
            types(&["*"]),
            1_000,
        ),
        Endpoint::new(
            "flaky",
            flaky.url.clone(),
            demo_secret("flaky"),
            types(&[webhooks::ORDER_CREATED]),
            1_000,
        ),
        Endpoint::new(
            "slow",
            slow.url.clone(),
            demo_secret("slow"),
            types(&[webhooks::ORDER_CREATED, ORDER_CANCELLED]),
            1_000,
        ),
    ] {
        webhooks::upsert_endpoint(store.connection(), &demo).await?;
    }
    let cache = EndpointCache::default();
    let problems = cache.refresh(store.connection()).await?;
    for p in &problems {
        eprintln!("webhook_endpoints: row skipped: {p}");
    }
    let endpoints = cache.snapshot();

    // A demo-sized policy: 4 attempts, 250 ms doubling to 2 s, ±20 %.
    let wiring = Wiring {
        source: source.clone(),
        endpoints: cache.clone(),
        policy: RetryPolicy::default()
            .with_max_attempts(4)
            .with_initial_delay(Duration::from_millis(250))
            .with_factor(2.0)
            .with_max_delay(Duration::from_secs(2))
            .with_jitter(0.2),
        members: 2,
        in_flight: 16,
    };
    let redis = settings.redis.url.clone();
    let admin = Arc::new(
        RedisBroker::connect(&settings.redis, "webhook-retention")
            .await
            .map_err(|e| format!("Redis at {redis}: {e}"))?,
    );
    let mut builder = Processor::builder(settings).outbox(&store);
    // The demo's groups start at the end of `orders`, so a first run does
    // not deliver the stream's history to these loopback receivers.
    for group in wiring.fan_out_groups(&store) {
        builder = builder.group(group.with_start_from(StartFrom::Latest));
    }
    for group in wiring.delivery_groups(&store)? {
        builder = builder.group(group);
    }
    let processor = builder
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    // New endpoints get their delivery group here, within a refresh.
    let watcher = EndpointWatcher::spawn(
        wiring.clone(),
        store.clone(),
        processor.handle(),
        endpoints.iter().map(|e| e.name.clone()),
        Duration::from_secs(args.refresh_secs),
    );

    let trimmed = Arc::new(AtomicU64::new(0));
    let streams_of = wiring.clone();
    let retention = retention::spawn_periodic(
        admin,
        move || streams_of.streams(),
        RetentionPolicy {
            dead_after: Duration::from_secs(3600),
            max_age: Duration::from_secs(7 * 24 * 3600),
        },
        Duration::from_secs(1),
        Arc::clone(&trimmed),
    );

    // Publish: orders, cancellations, and a few orders again with the same
    // event id (a retried publish) that every group absorbs.
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let mut events = Vec::new();
    let mut expected: HashMap<&str, usize> = HashMap::new();
    for i in 0..args.orders {
        let order = orders::sample_order(&format!("{run}-o{i}"), i as u64);
        let event =
            Event::new(webhooks::ORDER_CREATED, &order)?.with_id(format!("{run}-created-{i}"));
        if i % 10 == 0 {
            events.push(event.clone());
        }
        events.push(event);
    }
    let cancellations = args.orders / 5;
    for i in 0..cancellations {
        let data = serde_json::json!({"order_id": format!("{run}-o{i}"), "reason": "customer"});
        events.push(Event::new(ORDER_CANCELLED, &data)?.with_id(format!("{run}-cancelled-{i}")));
    }
    let publishing = webhooks::now_ms();
    for e in endpoints.iter() {
        let n = if e.wants(webhooks::ORDER_CREATED, publishing) {
            args.orders
        } else {
            0
        } + if e.wants(ORDER_CANCELLED, publishing) {
            cancellations
        } else {
            0
        };
        expected.insert(e.name.as_str(), n);
    }
    let total = events.len();
    let results = processor.producer().publish_batch(&source, events).await?;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        return Err(format!("{failed} of {total} publishes failed").into());
    }
    println!(
        "published {total} events to `{source}`: {} orders ({} of them twice), {cancellations} cancellations",
        args.orders,
        args.orders.div_ceil(10)
    );

    // Wait until every (event, endpoint) is delivered or dead-lettered and
    // every order has its notification.
    let like = format!("{run}-%");
    let started = Instant::now();
    loop {
        let finals = attempt_row::Entity::find()
            .filter(attempt_row::Column::EventId.like(like.as_str()))
            .filter(attempt_row::Column::Outcome.is_in(["delivered", "rejected", "exhausted"]))
            .count(store.connection())
            .await? as usize;
        let notes = notification::Entity::find()
            .filter(notification::Column::OrderId.like(like.as_str()))
            .count(store.connection())
            .await? as usize;
        if finals >= expected.values().sum::<usize>() && notes >= args.orders {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            eprintln!("timed out: {finals} deliveries settled, {notes} notifications");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let ok = summary(
        &store,
        &source,
        &run,
        &endpoints,
        &expected,
        args.orders,
        &trimmed,
    )
    .await?;
    let requests: Vec<String> = [("healthy", &healthy), ("flaky", &flaky), ("slow", &slow)]
        .iter()
        .map(|(name, r)| format!("{name} {}", r.received().len()))
        .collect();
    println!("requests the receivers saw: {}", requests.join(", "));
    if args.follow {
        println!(
            "\nfollowing `{source}`: receivers, groups and retention keep running; Ctrl-C to stop"
        );
        println!(
            "endpoints are re-read from `webhook_endpoints` every {} s (`endpoints add|disable|enable|list`)",
            args.refresh_secs
        );
        for e in endpoints.iter() {
            println!("  endpoint `{}` at {}", e.name, e.url);
        }
        let report = processor.run_until_signal().await?;
        println!(
            "stopped in {:?}; decisions written: {}",
            report.took, report.settled
        );
    } else {
        processor.shutdown().await?;
    }
    watcher.stop().await;
    retention.abort();
    for r in [&healthy, &flaky, &slow] {
        r.stop().await;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The p-th percentile (nearest rank) in milliseconds, `-` for none.
fn percentile(sorted: &[i64], p: f64) -> String {
    if sorted.is_empty() {
        return "-".to_owned();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    format!("{}ms", sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Prints the summary; whether every delivery settled and the healthy
/// endpoint got all of its own.
async fn summary(
    store: &Store,
    source: &str,
    run: &str,
    endpoints: &[Endpoint],
    expected: &HashMap<&str, usize>,
    orders: usize,
    trimmed: &AtomicU64,
) -> Result<bool, AnyError> {
    let rows = attempt_row::Entity::find()
        .filter(attempt_row::Column::EventId.like(format!("{run}-%")))
        .all(store.connection())
        .await?;
    println!();
    println!(
        "{:<8} {:>9} {:>9} {:>8} {:>13} {:>9} {:>9} {:>11} {:>11}",
        "endpoint",
        "expected",
        "delivered",
        "retried",
        "dead-letters",
        "http p50",
        "http p99",
        "deliv. p50",
        "deliv. p99"
    );
    let mut ok = true;
    for e in endpoints {
        let mine: Vec<&attempt_row::Model> = rows.iter().filter(|r| r.endpoint == e.name).collect();
        let count = |o: &str| mine.iter().filter(|r| r.outcome == o).count();
        let delivered = count("delivered");
        let dead = count("rejected") + count("exhausted");
        let mut http: Vec<i64> = mine.iter().map(|r| r.latency_ms).collect();
        http.sort_unstable();
        // Delivery latency: from publish to the end of the successful attempt.
        let mut end_to_end: Vec<i64> = mine
            .iter()
            .filter(|r| r.outcome == "delivered")
            .map(|r| r.attempted_at + r.latency_ms - r.published_at)
            .collect();
        end_to_end.sort_unstable();
        let want = expected.get(e.name.as_str()).copied().unwrap_or(0);
        println!(
            "{:<8} {:>9} {:>9} {:>8} {:>13} {:>9} {:>9} {:>11} {:>11}",
            e.name,
            want,
            delivered,
            count("retry"),
            dead,
            percentile(&http, 50.0),
            percentile(&http, 99.0),
            percentile(&end_to_end, 50.0),
            percentile(&end_to_end, 99.0),
        );
        ok &= delivered + dead == want;
        if e.name == "healthy" {
            ok &= delivered == want;
        }
    }
    let notes = notification::Entity::find()
        .filter(notification::Column::OrderId.like(format!("{run}-%")))
        .count(store.connection())
        .await?;
    let counts = webhooks::event_count::Entity::find()
        .all(store.connection())
        .await?;
    println!();
    println!("notifications for this run's orders: {notes} (orders: {orders})");
    println!("analytics (events per type and hour, all runs):");
    for c in counts.iter().rev().take(6) {
        let hour = chrono::DateTime::from_timestamp(c.hour_start, 0).unwrap_or_default();
        println!(
            "  {:<16} {}  {}",
            c.event_type,
            hour.format("%Y-%m-%d %H:00Z"),
            c.events
        );
    }
    println!(
        "entries trimmed by retention (acked by every group): {}",
        trimmed.load(Ordering::Relaxed)
    );
    for e in endpoints {
        let stream = webhooks::delivery_stream(source, &e.name);
        println!(
            "dead letters of `{}` are in `{}`: `redstream dlq list {stream}`",
            e.name,
            dead_letter_stream(&stream)
        );
    }
    ok &= notes as usize == orders;
    Ok(ok)
}

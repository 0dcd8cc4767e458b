//! Order processing with exactly one effect per order.
//!
//! Reads `order.created` events from stream `orders` in group
//! `order-processing`, writes one row per order to table `orders`, and
//! publishes one `order.confirmed` per order to stream `order-events`
//! through the transactional outbox. Invalid orders go to `orders:dlq` with
//! a reason and leave no row; an order published twice (same event id, or
//! the same `order_id` in two events) has one effect.
//!
//! ```text
//! cargo run --example order_processing                        # demo: publish a few hundred orders (some invalid, some duplicated), process them, print a summary, exit
//! cargo run --example order_processing consume [--members N]  # run the consumers until SIGINT/SIGTERM, then stop gracefully
//! cargo run --example order_processing produce --count N      # publish N valid orders
//! cargo run --example order_processing -- --help              # usage
//! ```
//!
//! Logs go to stderr (`RUST_LOG` filters them), summaries to stdout. The
//! demo's invalid orders are expected dead letters: its default filter
//! hides the library's line per dead letter (target
//! `redstream::dead_lettered`), and the summary counts them by reason.
//!
//! Settings come from `settings/` and `REDSTREAM__…` variables: Redis from
//! `REDSTREAM__REDIS__URL`, the database from `REDSTREAM__DATABASE__URL`
//! (default: the SQLite file `redstream.db` in the working directory;
//! `postgres://…` for PostgreSQL; with `REDSTREAM__DATABASE__MIGRATE=false`
//! neither redstream's tables nor `orders` are created, for a role without
//! DDL rights). Members: `--members N` or
//! `ORDERS_MEMBERS` (default 4). `ORDERS_STREAM` and `ORDER_EVENTS_STREAM`
//! rename the streams (the tests use that).

mod orders;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use redstream::prelude::*;
use redstream::{GroupStatus, dead_letter_stream};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter};

use orders::{GROUP, ORDER_CREATED, Orders, order, sample_order};

type AnyError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "\
usage: order_processing [consume [--members N] | produce --count N]

  (no argument)        demo: publish a few hundred orders (some invalid, some
                       duplicated), process them, print a summary, exit
  consume              run the consumers until SIGINT/SIGTERM, then stop
                       gracefully (--members N, or ORDERS_MEMBERS; default 4)
  produce --count N    publish N valid orders
  -h, --help           this text

Redis from REDSTREAM__REDIS__URL, the database from REDSTREAM__DATABASE__URL
(default: the SQLite file redstream.db); streams ORDERS_STREAM (orders) and
ORDER_EVENTS_STREAM (order-events). Logs go to stderr (RUST_LOG), summaries
to stdout.
";

struct Config {
    orders_stream: String,
    events_stream: String,
    members: usize,
}

fn config(args: &[String]) -> Result<Config, AnyError> {
    let members = match flag(args, "--members")? {
        Some(n) => n,
        None => match std::env::var("ORDERS_MEMBERS") {
            Ok(v) => v
                .parse()
                .map_err(|_| format!("ORDERS_MEMBERS must be a positive integer, got `{v}`"))?,
            Err(_) => 4,
        },
    };
    if members == 0 {
        return Err("--members must be at least 1".into());
    }
    Ok(Config {
        orders_stream: std::env::var("ORDERS_STREAM")
            .unwrap_or_else(|_| orders::ORDERS_STREAM.into()),
        events_stream: std::env::var("ORDER_EVENTS_STREAM")
            .unwrap_or_else(|_| orders::ORDER_EVENTS_STREAM.into()),
        members,
    })
}

/// The value of `--name N`, if given.
fn flag(args: &[String], name: &str) -> Result<Option<usize>, AnyError> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let value = args
                .get(i + 1)
                .ok_or_else(|| format!("{name} needs a number"))?;
            let n = value
                .parse()
                .map_err(|_| format!("{name} needs a number, got `{value}`"))?;
            Ok(Some(n))
        }
    }
}

#[actix::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The demo's invalid orders are expected dead letters: its summary
    // counts them, so their one line each stays out of the way.
    let default_filter = match args.first() {
        None => "warn,redstream=info,redstream::dead_lettered=error",
        Some(_) => "warn,redstream=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match args.first().map(String::as_str) {
        None => demo(&args).await,
        Some("-h" | "--help") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some("consume") => consume(&args).await,
        Some("produce") => produce(&args).await,
        Some(other) => {
            eprint!("error: unknown mode `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn start(settings: Settings, config: &Config, store: &Store) -> Result<Processor, AnyError> {
    let handler = Orders {
        confirmations: config.events_stream.clone(),
    };
    let redis = settings.redis.url.clone();
    let processor = Processor::builder(settings)
        .outbox(store)
        .group(
            Group::transactional(&config.orders_stream, GROUP, store, handler)
                .with_members(config.members),
        )
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    Ok(processor)
}

async fn connect() -> Result<(Settings, Store), AnyError> {
    let settings = Settings::load()?;
    let store = Store::connect(&settings.database)
        .await
        .map_err(|e| format!("database at {}: {e}", settings.database.url))?;
    // A role without DDL rights (`database.migrate = false`) finds the
    // table made by the role that ran the migrations.
    if settings.database.migrate {
        orders::create_tables(store.connection()).await?;
    }
    Ok((settings, store))
}

/// Runs the consumers until SIGINT or SIGTERM.
async fn consume(args: &[String]) -> Result<ExitCode, AnyError> {
    let config = config(args)?;
    let (settings, store) = connect().await?;
    let processor = start(settings, &config, &store).await?;
    println!(
        "consuming `{}` as group `{GROUP}` with {} members; Ctrl-C to stop",
        config.orders_stream, config.members
    );
    let report = processor.run_until_signal().await?;
    println!(
        "stopped in {:?}: {} unfinished entries released, all decisions written: {}",
        report.took, report.released, report.settled
    );
    Ok(ExitCode::SUCCESS)
}

/// Publishes N valid orders.
async fn produce(args: &[String]) -> Result<ExitCode, AnyError> {
    let config = config(args)?;
    let count = flag(args, "--count")?.ok_or("produce needs --count N")?;
    let settings = Settings::load()?;
    let redis = settings.redis.url.clone();
    let processor = Processor::builder(settings)
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let events = (0..count)
        .map(|i| {
            Event::new(
                ORDER_CREATED,
                &sample_order(&format!("{run}-{i}"), i as u64),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let results = processor
        .producer()
        .publish_batch(&config.orders_stream, events)
        .await?;
    let failed = results.iter().filter(|r| r.is_err()).count();
    println!(
        "published {} orders to `{}` ({failed} failed)",
        count - failed,
        config.orders_stream
    );
    processor.shutdown().await?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the demo publishes.
struct Published {
    valid: usize,
    same_event_again: usize,
    same_order_again: usize,
    invalid: usize,
}

async fn demo(args: &[String]) -> Result<ExitCode, AnyError> {
    let config = config(args)?;
    let (settings, store) = connect().await?;
    let redis = settings.redis.url.clone();
    let processor = start(settings, &config, &store).await?;
    let producer = processor.producer();
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let stream = &config.orders_stream;

    let mut events = Vec::new();
    let mut published = Published {
        valid: 300,
        same_event_again: 0,
        same_order_again: 0,
        invalid: 0,
    };
    for i in 0..published.valid {
        let order = sample_order(&format!("{run}-{i}"), i as u64);
        // Every 15th order is published twice with the same event id (a
        // retried publish); every 20th a second time in a new event.
        let id = format!("{run}-evt-{i}");
        events.push(Event::new(ORDER_CREATED, &order)?.with_id(id.clone()));
        if i % 15 == 0 {
            events.push(Event::new(ORDER_CREATED, &order)?.with_id(id));
            published.same_event_again += 1;
        }
        if i % 20 == 0 {
            events.push(Event::new(ORDER_CREATED, &order)?);
            published.same_order_again += 1;
        }
    }
    // Invalid orders, with event ids of this run (their dead letters carry
    // them, so the summary finds this run's letters).
    let bad = |id: String, json: String| {
        Event::from_json(ORDER_CREATED, json.into_bytes()).with_id(format!("{run}-bad-{id}"))
    };
    for i in 0..6 {
        let id = format!("{run}-bad-{i}");
        events.push(bad(format!("{i}t"), "{\"order_id\": \"truncated".into()));
        events.push(bad(
            format!("{i}a"),
            format!(r#"{{"order_id": "{id}a", "items": []}}"#),
        ));
        events.push(bad(
            format!("{i}b"),
            format!(r#"{{"order_id": "{id}b", "customer_id": "c-1", "items": []}}"#),
        ));
        events.push(bad(
            format!("{i}c"),
            format!(
                r#"{{"order_id": "{id}c", "customer_id": "c-1", "items": [{{"sku": "s", "qty": 0, "unit_price_cents": 100}}]}}"#
            ),
        ));
        events.push(bad(
            format!("{i}d"),
            format!(
                r#"{{"order_id": "{id}d", "customer_id": "c-1", "items": [{{"sku": "s", "qty": 2, "unit_price_cents": -5}}]}}"#
            ),
        ));
        published.invalid += 5;
    }
    let total = events.len();
    let results = producer.publish_batch(stream, events).await?;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        return Err(format!("{failed} of {total} publishes failed").into());
    }
    println!(
        "published {total} events to `{stream}`: {} orders, {} again with the same event id, {} again in a new event, {} invalid",
        published.valid, published.same_event_again, published.same_order_again, published.invalid
    );

    // Wait until every order of this run has its row and its confirmation
    // is relayed, and every invalid one is dead-lettered.
    let like = format!("{run}-%");
    let started = Instant::now();
    let (rows, status) = loop {
        let rows = order::Entity::find()
            .filter(order::Column::OrderId.like(like.as_str()))
            .count(store.connection())
            .await?;
        let status = processor.group_status(stream, GROUP).await?;
        let unsent = unsent_confirmations(&store, &run).await?;
        if rows as usize >= published.valid
            && status.dead_lettered as usize >= published.invalid
            && unsent == 0
        {
            break (rows, status);
        }
        if started.elapsed() > Duration::from_secs(120) {
            eprintln!("timed out: {rows} rows, status {status:?}, {unsent} confirmations unsent");
            processor.shutdown().await?;
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stats = store.stats();
    let duplicates = published.same_event_again + published.same_order_again;
    let dlq = dead_letter_stream(stream);
    // Best effort: a least-privilege worker may not read streams by range.
    let reasons = dead_letter_reasons(&redis, &dlq, &run, published.invalid)
        .await
        .map_err(|e| e.to_string());
    print_summary(&config, &status, rows, duplicates, stats, reasons);
    processor.shutdown().await?;

    let ok = rows as usize == published.valid && status.dead_lettered as usize == published.invalid;
    if !ok {
        eprintln!(
            "unexpected result: {rows} rows for {} orders",
            published.valid
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Confirmations of this run still waiting in the outbox.
async fn unsent_confirmations(store: &Store, run: &str) -> Result<u64, AnyError> {
    let q = Query::select()
        .expr(Expr::col(Alias::new("id")).count())
        .from(Alias::new("outbox"))
        .and_where(Expr::col(Alias::new("sent_at")).is_null())
        .and_where(Expr::col(Alias::new("data")).like(format!("%\"order_id\":\"{run}-%")))
        .to_owned();
    let row = store.connection().query_one(&q).await?;
    Ok(row
        .map(|r| r.try_get_by_index::<i64>(0))
        .transpose()?
        .unwrap_or(0) as u64)
}

/// This run's dead letters (their original event id starts with `run`),
/// counted by reason: the last `expected × 2` entries of the dead-letter
/// stream are read.
async fn dead_letter_reasons(
    redis: &redstream::RedisUrl,
    dlq: &str,
    run: &str,
    expected: usize,
) -> Result<BTreeMap<String, usize>, AnyError> {
    let mut conn = redis::Client::open(redis.expose())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(dlq)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(expected * 2)
        .query_async(&mut conn)
        .await?;
    let mut reasons = BTreeMap::new();
    for letter in reply.ids {
        let ours = letter
            .get::<String>("id")
            .is_some_and(|id| id.starts_with(run));
        if let (true, Some(reason)) = (ours, letter.get::<String>("reason")) {
            *reasons.entry(reason).or_insert(0) += 1;
        }
    }
    Ok(reasons)
}

fn print_summary(
    config: &Config,
    status: &GroupStatus,
    rows: u64,
    duplicates: usize,
    stats: redstream::StoreStats,
    reasons: Result<BTreeMap<String, usize>, String>,
) {
    println!();
    println!("summary");
    println!("  orders processed (rows in `orders`): {rows}");
    println!(
        "  duplicates absorbed:                 {duplicates} ({} redeliveries of the same event id found their key)",
        stats.duplicates
    );
    println!(
        "  dead-lettered:                       {} (the invalid orders, to `{}`), by reason:",
        status.dead_lettered,
        dead_letter_stream(&config.orders_stream)
    );
    match reasons {
        Ok(reasons) => {
            for (reason, n) in reasons {
                println!("    {n:>4}  {reason}");
            }
        }
        Err(e) => println!("    (not read back: {e})"),
    }
    println!(
        "  confirmations relayed:               {rows} to `{}`",
        config.events_stream
    );
    println!("  retries scheduled:                   {}", status.retried);
    println!(
        "  consumer restarts:                   {}",
        status.restarts()
    );
}

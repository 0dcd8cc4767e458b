//! An order saga: payment → inventory → shipping, each step exactly once,
//! with compensations when a step fails for good.
//!
//! Placing an order writes its row (state `placed`) and an `order.placed`
//! event in one transaction (the outbox). Five groups then move it on, each
//! a `TxHandler` whose effect, the order's new state and the next event
//! commit together:
//!
//! ```text
//!  place order ── row `placed` + order.placed ──▶ saga:orders
//!                                                   │
//!                                            [payment] reserve funds ── declined ──▶ cancelled (nothing to undo)
//!                                                   │ payment.reserved
//!                                                   ▼ saga:payments
//!                                          [inventory] reserve stock ── out of stock ──▶ payment.refunded
//!                                                   │ stock.reserved
//!                                                   ▼ saga:stock
//!                                           [shipping] schedule ── no carrier ──▶ payment.refunded + stock.released
//!                                                   │
//!                                                   ▼ order.completed (saga:order-events)
//!
//!  saga:refunds  ── payment.refunded ──▶ [payment-refund] reserved → balance ─┐ the last compensation
//!  saga:releases ── stock.released   ──▶ [stock-release]  reserved → on hand ─┘ cancels: order.cancelled
//! ```
//!
//! A failure for good (declined card, too small a balance, a SKU out of
//! stock, a destination no carrier serves) is not an error: the step
//! commits "declined" and the compensations of the steps already done. A
//! transient failure (a simulated gateway timeout, seeded) is an `Err`, and
//! the library retries the step with backoff. Database errors go up with
//! `?`: the library rolls the batch back and runs it again.
//!
//! ```text
//! cargo run --example order_saga                               # demo: 300 seeded orders, summary, invariants; exit 0 iff they hold
//! cargo run --example order_saga -- --orders 1000 --seed 7     # another demo
//! cargo run --example order_saga consume [--members N]         # run the five steps until SIGINT/SIGTERM
//! cargo run --example order_saga produce --count N [--seed S]  # open a run: accounts, stock, N orders placed
//! cargo run --example order_saga check [--run RUN]             # check the books (of one run, or all); exit 0 iff they balance
//! cargo run --example order_saga -- --help                     # usage
//! ```
//!
//! Settings come from `settings/` and `REDSTREAM__…` variables: Redis from
//! `REDSTREAM__REDIS__URL`, the database from `REDSTREAM__DATABASE__URL`
//! (default: the SQLite file `redstream.db`; `postgres://…` for
//! PostgreSQL). `SAGA_STREAM_PREFIX` (default `saga`) names the streams,
//! `SAGA_MEMBERS` (default 2) the members per step. Logs go to stderr,
//! summaries to stdout.

mod saga;
mod world;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use redstream::prelude::*;
use redstream::{GroupStatus, ProcessorBuilder, dead_letter_stream};

use saga::{Inventory, Payment, Refund, Release, Shipping, Streams};

type AnyError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "\
usage: order_saga [--orders N] [--seed S]
       order_saga consume [--members N]
       order_saga produce --count N [--seed S]
       order_saga check [--run RUN]

  (no mode)    demo: N seeded orders (default 300, seed 20), a summary, the
               invariants checked; exit 0 only if they hold
  consume      run the five steps until SIGINT/SIGTERM (--members N, or
               SAGA_MEMBERS; default 2 per step)
  produce      open a run: accounts, stock, N orders placed
  check        check the books (of one run, or all); exit 0 only if they
               balance
  -h, --help   this text

Redis from REDSTREAM__REDIS__URL, the database from REDSTREAM__DATABASE__URL
(default: the SQLite file redstream.db); SAGA_STREAM_PREFIX (default saga)
names the streams. Logs go to stderr (RUST_LOG), summaries to stdout.
";

struct Config {
    streams: Streams,
    members: usize,
}

fn config(args: &[String]) -> Result<Config, AnyError> {
    let members = match number(args, "--members")? {
        Some(n) => n as usize,
        None => match std::env::var("SAGA_MEMBERS") {
            Ok(v) => v
                .parse()
                .map_err(|_| format!("SAGA_MEMBERS must be a positive integer, got `{v}`"))?,
            Err(_) => 2,
        },
    };
    if members == 0 {
        return Err("--members must be at least 1".into());
    }
    let prefix = std::env::var("SAGA_STREAM_PREFIX").unwrap_or_else(|_| "saga".to_owned());
    if prefix.is_empty() {
        return Err("SAGA_STREAM_PREFIX must not be empty".into());
    }
    Ok(Config {
        streams: Streams::new(&prefix),
        members,
    })
}

/// The value of `--name X`, if given.
fn value<'a>(args: &'a [String], name: &str) -> Result<Option<&'a str>, AnyError> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .map(|v| Some(v.as_str()))
            .ok_or_else(|| format!("{name} needs a value").into()),
    }
}

/// The value of `--name N`, if given.
fn number(args: &[String], name: &str) -> Result<Option<u64>, AnyError> {
    value(args, name)?
        .map(|v| {
            v.parse()
                .map_err(|_| format!("{name} needs a number, got `{v}`").into())
        })
        .transpose()
}

#[actix::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Transient failures are expected here: keep the library's
                // per-entry retry warnings out of the way.
                .unwrap_or_else(|_| "warn,redstream=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        _ if args.iter().any(|a| a == "-h" || a == "--help") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        None => demo(&args).await,
        Some(a) if a.starts_with("--") => demo(&args).await,
        Some("consume") => consume(&args).await,
        Some("produce") => produce(&args).await,
        Some("check") => check(&args).await,
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

/// Every step retries with the `[retry]` settings.
fn groups(builder: ProcessorBuilder, config: &Config, store: &Store) -> ProcessorBuilder {
    let s = &config.streams;
    let n = config.members;
    let payment = Payment { streams: s.clone() };
    let inventory = Inventory { streams: s.clone() };
    let shipping = Shipping { streams: s.clone() };
    let refund = Refund { streams: s.clone() };
    let release = Release { streams: s.clone() };
    builder
        .group(Group::transactional(&s.orders, saga::PAYMENT, store, payment).with_members(n))
        .group(Group::transactional(&s.payments, saga::INVENTORY, store, inventory).with_members(n))
        .group(Group::transactional(&s.stock, saga::SHIPPING, store, shipping).with_members(n))
        .group(Group::transactional(&s.refunds, saga::REFUND, store, refund).with_members(n))
        .group(Group::transactional(&s.releases, saga::RELEASE, store, release).with_members(n))
}

async fn connect(settings: &Settings) -> Result<Store, AnyError> {
    let store = Store::connect(&settings.database)
        .await
        .map_err(|e| format!("database at {}: {e}", settings.database.url))?;
    saga::create_tables(store.connection()).await?;
    Ok(store)
}

/// Runs the five steps until SIGINT or SIGTERM.
async fn consume(args: &[String]) -> Result<ExitCode, AnyError> {
    let config = config(args)?;
    let settings = Settings::load()?;
    let store = connect(&settings).await?;
    let redis = settings.redis.url.clone();
    let processor = groups(Processor::builder(settings).outbox(&store), &config, &store)
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    println!(
        "consuming the saga's streams `{}` … with {} members per step; Ctrl-C to stop",
        config.streams.orders, config.members
    );
    let report = processor.run_until_signal().await?;
    println!(
        "stopped in {:?}: {} unfinished entries released, all decisions written: {}",
        report.took, report.released, report.settled
    );
    Ok(ExitCode::SUCCESS)
}

/// Opens a run: its accounts and stock, and `--count` orders placed
/// through the outbox; returns once they are relayed.
async fn produce(args: &[String]) -> Result<ExitCode, AnyError> {
    let config = config(args)?;
    let count = number(args, "--count")?.ok_or("produce needs --count N")? as usize;
    let seed = number(args, "--seed")?.unwrap_or_else(rand::random);
    let settings = Settings::load()?;
    let store = connect(&settings).await?;
    let redis = settings.redis.url.clone();
    let processor = Processor::builder(settings)
        .outbox(&store)
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    let run = ulid::Ulid::new().to_string().to_lowercase();
    world::open(
        store.connection(),
        &config.streams,
        world::plan(&run, seed, count),
    )
    .await?;
    let started = Instant::now();
    while world::unsent(store.connection(), Some(&run), Some(saga::ORDER_PLACED)).await? > 0 {
        if started.elapsed() > Duration::from_secs(60) {
            processor.shutdown().await?;
            return Err("the placed orders were not relayed within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    processor.shutdown().await?;
    println!(
        "run {run}: placed {count} orders (seed {seed}) on `{}`",
        config.streams.orders
    );
    Ok(ExitCode::SUCCESS)
}

/// Checks the books of one run (`--run`) or of all.
async fn check(args: &[String]) -> Result<ExitCode, AnyError> {
    let run = value(args, "--run")?;
    let settings = Settings::load()?;
    let store = connect(&settings).await?;
    let report = world::check(store.connection(), run).await?;
    report.print();
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn demo(args: &[String]) -> Result<ExitCode, AnyError> {
    let config = config(args)?;
    let count = number(args, "--orders")?.unwrap_or(300) as usize;
    let seed = number(args, "--seed")?.unwrap_or(20);
    let mut settings = Settings::load()?;
    // Short first retries, so the seeded timeouts heal in a moment.
    settings.retry.initial_delay_ms = settings.retry.initial_delay_ms.min(200);
    settings.retry.max_delay_ms = settings.retry.max_delay_ms.min(2_000);
    let store = connect(&settings).await?;
    let started = Instant::now();
    let redis = settings.redis.url.clone();
    let processor = groups(Processor::builder(settings).outbox(&store), &config, &store)
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let plan = world::plan(&run, seed, count);
    let glitched = plan
        .orders
        .iter()
        .filter(|o| !o.glitches.is_empty())
        .count();
    world::open(store.connection(), &config.streams, plan).await?;
    println!(
        "run {run}: placed {count} orders (seed {seed}); {glitched} of them meet a seeded transient failure if they reach the step it is in"
    );
    let db = store.connection();
    loop {
        let open = world::unfinished(db, Some(&run)).await?;
        if open == 0 && world::unsent(db, Some(&run), None).await? == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            eprintln!("timed out: {open} orders not final after 120 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    let report = world::check(db, Some(&run)).await?;
    let mut statuses = Vec::new();
    for (stream, group) in config.streams.groups() {
        statuses.push(processor.group_status(stream, group).await?);
    }
    println!();
    println!("summary (done in {:.1} s)", took.as_secs_f64());
    report.print();
    print_groups(&statuses);
    let dead: u64 = statuses.iter().map(|s| s.dead_lettered).sum();
    processor.shutdown().await?;
    Ok(if report.ok() && dead == 0 {
        ExitCode::SUCCESS
    } else {
        if dead > 0 {
            eprintln!("{dead} entries dead-lettered");
        }
        ExitCode::FAILURE
    })
}

fn print_groups(statuses: &[GroupStatus]) {
    println!("steps (group: acked, retries, dead letters):");
    for s in statuses {
        println!(
            "  {:<15} {:>5} acked, {:>3} retries, {} dead letters (`{}`)",
            s.group,
            s.acked,
            s.retried,
            s.dead_lettered,
            dead_letter_stream(&s.stream)
        );
    }
}

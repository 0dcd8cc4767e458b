//! Market scanner: scheduled producers, history in the database, the latest
//! value in Redis.
//!
//! Three simulated sources (deterministic, seeded, no network) run on their
//! own schedules, aligned to the wall clock: price quotes every 3 s, news
//! every 30 s, analyst recommendations every minute (each also once at
//! start). They publish to stream `market`. One consumer group, `scanner`,
//! writes the history to tables `quotes`, `recommendations` and `news`
//! (exactly once per event; a repeated news article leaves one row) and
//! keeps the latest value per symbol and signal in the Redis hash
//! `market:latest`, where an older signal never replaces a newer one. While
//! it runs it prints a table per symbol.
//!
//! ```text
//! cargo run --example market_scanner                  # run until Ctrl-C
//! cargo run --example market_scanner -- --for 30s     # stop after 30 s and print a summary
//! cargo run --example market_scanner -- --watchlist AAPL,MSFT --seed 7 --for 1m
//! ```
//!
//! Settings come from `settings/` and `REDSTREAM__…` variables, as for every
//! example: the database is the SQLite file `redstream.db` by default, or
//! PostgreSQL with `REDSTREAM__DATABASE__URL=postgres://…`. The watchlist is
//! `--watchlist` or `MARKET_WATCHLIST` (default `AAPL,MSFT,NVDA,AMZN,GOOG`),
//! the seed `--seed` or `MARKET_SEED` (default 42); `MARKET_STREAM` and
//! `MARKET_LATEST_KEY` rename the stream and the hash (the tests use that).

mod market;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use redstream::prelude::*;
use redstream::{LatestValues, RedisBroker};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait};

use market::{GROUP, News, Quote, Recommendation, Scanner};

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// How often the live table is printed.
const TABLE_EVERY: Duration = Duration::from_secs(3);

struct Config {
    watchlist: Vec<String>,
    seed: u64,
    stream: String,
    latest_key: String,
    run_for: Option<Duration>,
}

fn config(args: &[String]) -> Result<Config, AnyError> {
    let value = |flag: &str, env: &str| -> Result<Option<String>, AnyError> {
        match args.iter().position(|a| a == flag) {
            Some(i) => Ok(Some(
                args.get(i + 1)
                    .ok_or_else(|| format!("{flag} needs a value"))?
                    .clone(),
            )),
            None => Ok(std::env::var(env).ok()),
        }
    };
    for a in args.iter().filter(|a| a.starts_with("--")) {
        if !["--watchlist", "--seed", "--for"].contains(&a.as_str()) {
            return Err(format!("unknown option `{a}`: use --watchlist, --seed or --for").into());
        }
    }
    let watchlist: Vec<String> = value("--watchlist", "MARKET_WATCHLIST")?
        .unwrap_or_else(|| "AAPL,MSFT,NVDA,AMZN,GOOG".into())
        .split(',')
        .map(|s| s.trim().to_uppercase())
        .filter(|s| !s.is_empty())
        .collect();
    if watchlist.is_empty() {
        return Err("the watchlist is empty".into());
    }
    let seed = match value("--seed", "MARKET_SEED")? {
        Some(s) => s
            .parse()
            .map_err(|_| format!("the seed must be a number, got `{s}`"))?,
        None => 42,
    };
    let run_for = match value("--for", "MARKET_RUN_FOR")? {
        Some(d) => Some(parse_duration(&d)?),
        None => None,
    };
    Ok(Config {
        watchlist,
        seed,
        stream: std::env::var("MARKET_STREAM").unwrap_or_else(|_| market::MARKET_STREAM.into()),
        latest_key: std::env::var("MARKET_LATEST_KEY")
            .unwrap_or_else(|_| market::LATEST_KEY.into()),
        run_for,
    })
}

/// `500ms`, `30s`, `2m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, AnyError> {
    let bad = || format!("`{s}` is not a duration like 500ms, 30s, 2m or 1h");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3_600),
        _ => return Err(bad().into()),
    })
}

#[actix::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<(), AnyError> {
    let config = config(args)?;
    let settings = Settings::load()?;
    let store = Store::connect(&settings.database)
        .await
        .map_err(|e| format!("database at {}: {e}", settings.database.url))?;
    market::create_tables(store.connection()).await?;
    let redis = settings.redis.url.clone();
    let broker = RedisBroker::connect(&settings.redis, "market-scanner")
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    let latest = LatestValues::new(&broker, &config.latest_key);

    let mut builder = Processor::builder(settings).group(Group::transactional(
        &config.stream,
        GROUP,
        &store,
        Scanner {
            latest: latest.clone(),
        },
    ));
    for schedule in market::schedules(&config.stream, &config.watchlist, config.seed) {
        builder = builder.schedule(schedule);
    }
    let processor = builder
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    println!(
        "scanning {} on stream `{}` (group `{GROUP}`, latest values in `{}`); {}",
        config.watchlist.join(", "),
        config.stream,
        config.latest_key,
        match config.run_for {
            Some(d) => format!("stopping after {d:?}"),
            None => "Ctrl-C to stop".to_owned(),
        }
    );

    let started = Instant::now();
    let stop = async {
        match config.run_for {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(TABLE_EVERY) => {
                print_table(&config, &latest, &store, started.elapsed()).await?;
            }
        }
    }

    let stats: Vec<_> = ["quotes", "recommendations", "news"]
        .iter()
        .map(|n| (*n, processor.schedule_stats(n).unwrap_or_default()))
        .collect();
    let status = processor.group_status(&config.stream, GROUP).await?;
    let report = processor.shutdown().await?;
    print_table(&config, &latest, &store, started.elapsed()).await?;

    let db = store.connection();
    println!();
    println!("summary after {:?}", started.elapsed());
    println!(
        "  history rows: {} quotes, {} recommendations, {} news",
        market::quote::Entity::find().count(db).await?,
        market::recommendation::Entity::find().count(db).await?,
        market::news_item::Entity::find().count(db).await?,
    );
    for (name, s) in stats {
        println!(
            "  schedule {name:<16} {} runs ({} failed, {} skipped), {} events",
            s.runs, s.failed, s.skipped, s.published
        );
    }
    println!(
        "  events handled: {} acked, {} dead-lettered; {} redeliveries absorbed",
        status.acked,
        status.dead_lettered,
        store.stats().duplicates
    );
    println!("  stopped cleanly: {}", report.settled);
    Ok(())
}

/// One row per symbol: latest price and change, last recommendation, news
/// count. Latest values come from Redis, the count from the database.
async fn print_table(
    config: &Config,
    latest: &LatestValues,
    store: &Store,
    elapsed: Duration,
) -> Result<(), AnyError> {
    let mut quotes: BTreeMap<String, Quote> = BTreeMap::new();
    let mut recs: BTreeMap<String, Recommendation> = BTreeMap::new();
    let mut last_news: BTreeMap<String, News> = BTreeMap::new();
    for l in latest.all().await? {
        let Some((symbol, signal)) = l.field.rsplit_once(':') else {
            continue;
        };
        let symbol = symbol.to_owned();
        match signal {
            "quote" => {
                if let Ok(q) = serde_json::from_slice(&l.value) {
                    quotes.insert(symbol, q);
                }
            }
            "recommendation" => {
                if let Ok(r) = serde_json::from_slice(&l.value) {
                    recs.insert(symbol, r);
                }
            }
            "news" => {
                if let Ok(n) = serde_json::from_slice(&l.value) {
                    last_news.insert(symbol, n);
                }
            }
            _ => {}
        }
    }
    let counts = news_counts(store).await?;
    println!();
    println!(
        "t+{:>3}s  {:<6} {:>10} {:>8}  {:<28} {:>4}  latest headline",
        elapsed.as_secs(),
        "symbol",
        "price",
        "change",
        "recommendation",
        "news"
    );
    for symbol in &config.watchlist {
        let (price, change) = match quotes.get(symbol) {
            Some(q) => (
                format!("{:.2}", q.price_cents as f64 / 100.0),
                format!(
                    "{:+.2}%",
                    (q.price_cents - q.prev_cents) as f64 * 100.0
                        / std::cmp::max(q.prev_cents, 1) as f64
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        let rec = recs
            .get(symbol)
            .map(|r| format!("{} ({})", r.rating, r.analyst))
            .unwrap_or_else(|| "-".into());
        let headline = last_news
            .get(symbol)
            .map(|n| n.headline.as_str())
            .unwrap_or("-");
        println!(
            "        {:<6} {:>10} {:>8}  {:<28} {:>4}  {}",
            symbol,
            price,
            change,
            rec,
            counts.get(symbol).copied().unwrap_or(0),
            headline
        );
    }
    Ok(())
}

/// Articles per symbol.
async fn news_counts(store: &Store) -> Result<BTreeMap<String, i64>, AnyError> {
    let q = Query::select()
        .column(Alias::new("symbol"))
        .expr(Expr::col(Alias::new("article_id")).count())
        .from(Alias::new("news"))
        .group_by_col(Alias::new("symbol"))
        .to_owned();
    let rows = store.connection().query_all(&q).await?;
    let mut out = BTreeMap::new();
    for row in rows {
        let symbol: String = row.try_get_by_index(0)?;
        let n: i64 = row.try_get_by_index(1)?;
        out.insert(symbol, n);
    }
    Ok(out)
}

//! The market-data domain: the signals, their deterministic simulated
//! sources, the history tables and the exactly-once handler that also keeps
//! the latest value per symbol and signal in Redis. Shared by the example's
//! binary and the integration tests.
//!
//! Each signal is three small, separate pieces: a source function (what a
//! schedule runs), a variant of [`Signal`] (the event), and a table with its
//! arm in [`Scanner::handle`]. Adding a fifth touches none of the others.

use std::time::Duration;

use redstream::{
    Event, HandlerResult, LatestValues, Meta, Outcome, Schedule, Tick, TxHandler, Version,
};
use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, DatabaseTransaction, Schema, Set};
use serde::{Deserialize, Serialize};

/// The stream every signal goes to.
pub(crate) const MARKET_STREAM: &str = "market";
/// The consumer group that keeps history and latest values.
pub(crate) const GROUP: &str = "scanner";
/// The hash of latest values (and `<key>:version`).
pub(crate) const LATEST_KEY: &str = "market:latest";

/// How often each source runs (wall-clock aligned, and once at start).
pub(crate) const QUOTES_EVERY: Duration = Duration::from_secs(3);
/// Analyst recommendations: every minute.
pub(crate) const RECOMMENDATIONS_EVERY: Duration = Duration::from_secs(60);
/// News: every half minute.
pub(crate) const NEWS_EVERY: Duration = Duration::from_secs(30);

/// A signal, as published (`data`, tagged by `signal`) and as the handler
/// decodes it. The event's `type` is `market.<signal>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case")]
pub(crate) enum Signal {
    Quote(Quote),
    Recommendation(Recommendation),
    News(News),
}

/// A price quote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Quote {
    pub(crate) symbol: String,
    pub(crate) price_cents: i64,
    /// The previous quote's price, for the change.
    pub(crate) prev_cents: i64,
    /// The source's time (ms since the epoch): the version of the latest value.
    pub(crate) as_of_ms: i64,
}

/// An analyst recommendation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Recommendation {
    pub(crate) symbol: String,
    pub(crate) analyst: String,
    pub(crate) rating: String,
    pub(crate) target_cents: i64,
    pub(crate) as_of_ms: i64,
}

/// A news article; feeds repeat articles, so `article_id` is the key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct News {
    pub(crate) article_id: String,
    pub(crate) symbol: String,
    pub(crate) headline: String,
    pub(crate) published_ms: i64,
    /// Orders articles published in the same millisecond.
    pub(crate) seq: u64,
}

impl Signal {
    /// The event to publish. Quotes and recommendations get ids derived
    /// from their slot, so a slot produced twice (a restart within a
    /// period, two instances) has one effect; news keeps fresh ids, and
    /// repeated articles are absorbed by the `news` table's key.
    pub(crate) fn into_event(self) -> Result<Event, redstream::Error> {
        let (kind, id, symbol) = match &self {
            Signal::Quote(q) => (
                "market.quote",
                Some(format!("quote:{}:{}", q.symbol, q.as_of_ms)),
                q.symbol.clone(),
            ),
            Signal::Recommendation(r) => (
                "market.recommendation",
                Some(format!("rec:{}:{}", r.symbol, r.as_of_ms)),
                r.symbol.clone(),
            ),
            Signal::News(n) => ("market.news", None, n.symbol.clone()),
        };
        let event = Event::new(kind, &self)?.with_key(symbol);
        Ok(match id {
            Some(id) => event.with_id(id),
            None => event,
        })
    }
}

// ---------------------------------------------------------------------------
// Simulated sources: deterministic functions of (seed, symbol, slot), so a
// run is reproducible and a restart produces the same values for a slot.

/// splitmix64 over a few inputs.
fn mix(parts: &[u64]) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for p in parts {
        x ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
    }
    x
}

fn symbol_hash(symbol: &str) -> u64 {
    symbol.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The simulated price of `symbol` in slot `index`.
pub(crate) fn price_at(seed: u64, symbol: &str, index: i64) -> i64 {
    let h = symbol_hash(symbol);
    let base = 2_000.0 + (h % 48_000) as f64;
    let phase = (h % 628) as f64 / 100.0;
    let wave = (index as f64 / 25.0 + phase).sin() * 0.06;
    let noise = (mix(&[seed, h, index as u64]) % 2_001) as f64 / 1_000.0 - 1.0;
    (base * (1.0 + wave + noise * 0.004)).round() as i64
}

/// The quote source: one quote per symbol for the slot.
pub(crate) fn quotes(seed: u64, watchlist: &[String], tick: &Tick) -> Vec<Signal> {
    let index = (tick.slot_ms / QUOTES_EVERY.as_millis() as u64) as i64;
    watchlist
        .iter()
        .map(|s| {
            Signal::Quote(Quote {
                symbol: s.clone(),
                price_cents: price_at(seed, s, index),
                prev_cents: price_at(seed, s, index - 1),
                as_of_ms: tick.slot_ms as i64,
            })
        })
        .collect()
}

const RATINGS: [&str; 5] = ["strong sell", "sell", "hold", "buy", "strong buy"];
const ANALYSTS: [&str; 4] = ["Kestrel Research", "Northgate", "Ploughman & Co", "Vantage"];

/// The recommendation source: one analyst view per symbol for the slot.
pub(crate) fn recommendations(seed: u64, watchlist: &[String], tick: &Tick) -> Vec<Signal> {
    let index = (tick.slot_ms / RECOMMENDATIONS_EVERY.as_millis() as u64) as i64;
    watchlist
        .iter()
        .map(|s| {
            let r = mix(&[seed, symbol_hash(s), index as u64, 1]);
            let price = price_at(seed, s, index);
            Signal::Recommendation(Recommendation {
                symbol: s.clone(),
                analyst: ANALYSTS[(r % ANALYSTS.len() as u64) as usize].to_owned(),
                rating: RATINGS[((r >> 8) % RATINGS.len() as u64) as usize].to_owned(),
                target_cents: price + price * ((r >> 16) % 30) as i64 / 100 - price / 10,
                as_of_ms: tick.slot_ms as i64,
            })
        })
        .collect()
}

const HEADLINES: [&str; 6] = [
    "beats earnings expectations",
    "announces share buyback",
    "faces regulatory review",
    "names new chief financial officer",
    "expands into new markets",
    "cuts full-year guidance",
];

fn article(seed: u64, symbol: &str, index: i64, slot_ms: i64) -> Option<News> {
    let r = mix(&[seed, symbol_hash(symbol), index as u64, 2]);
    r.is_multiple_of(2).then(|| News {
        article_id: format!("{symbol}-{index}-{:04x}", r % 0xffff),
        symbol: symbol.to_owned(),
        headline: format!("{symbol} {}", HEADLINES[((r >> 8) % 6) as usize]),
        published_ms: slot_ms,
        seq: r % 1_000,
    })
}

/// The news source: about half the symbols get an article per slot, and
/// the feed repeats the previous slot's articles (as real feeds do).
pub(crate) fn news(seed: u64, watchlist: &[String], tick: &Tick) -> Vec<Signal> {
    let period = NEWS_EVERY.as_millis() as i64;
    let index = tick.slot_ms as i64 / period;
    let mut out = Vec::new();
    for s in watchlist {
        out.extend(article(seed, s, index, tick.slot_ms as i64));
        out.extend(article(seed, s, index - 1, tick.slot_ms as i64 - period));
    }
    out.into_iter().map(Signal::News).collect()
}

/// The three schedules, publishing to `stream`. Each runs once at start,
/// then on its wall-clock boundaries.
pub(crate) fn schedules(stream: &str, watchlist: &[String], seed: u64) -> Vec<Schedule> {
    type Source = fn(u64, &[String], &Tick) -> Vec<Signal>;
    let make = |name: &str, every: Duration, source: Source| {
        let watchlist = watchlist.to_vec();
        Schedule::aligned(name, stream, every, move |tick: Tick| {
            let signals = source(seed, &watchlist, &tick);
            async move {
                signals
                    .into_iter()
                    .map(|s| s.into_event().map_err(Into::into))
                    .collect()
            }
        })
        .run_at_start(true)
        .with_timeout(every)
    };
    vec![
        make("quotes", QUOTES_EVERY, quotes),
        make("recommendations", RECOMMENDATIONS_EVERY, recommendations),
        make("news", NEWS_EVERY, news),
    ]
}

// ---------------------------------------------------------------------------
// History tables.

/// `quotes`: one row per symbol and time.
pub(crate) mod quote {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "quotes")]
    pub(crate) struct Model {
        /// `<symbol>@<as_of_ms>`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) quote_id: String,
        pub(crate) symbol: String,
        pub(crate) price_cents: i64,
        pub(crate) prev_cents: i64,
        pub(crate) as_of_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `recommendations`: one row per symbol and time.
pub(crate) mod recommendation {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "recommendations")]
    pub(crate) struct Model {
        /// `<symbol>@<as_of_ms>`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) rec_id: String,
        pub(crate) symbol: String,
        pub(crate) analyst: String,
        pub(crate) rating: String,
        pub(crate) target_cents: i64,
        pub(crate) as_of_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `news`: one row per article.
pub(crate) mod news_item {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "news")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) article_id: String,
        pub(crate) symbol: String,
        pub(crate) headline: String,
        pub(crate) published_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Creates the history tables if they do not exist.
pub(crate) async fn create_tables(db: &DatabaseConnection) -> Result<(), DbErr> {
    let schema = Schema::new(db.get_database_backend());
    let mut q = schema.create_table_from_entity(quote::Entity);
    let mut r = schema.create_table_from_entity(recommendation::Entity);
    let mut n = schema.create_table_from_entity(news_item::Entity);
    for create in [&mut q, &mut r, &mut n] {
        create.if_not_exists();
        db.execute(&*create).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The handler.

/// Persists each signal's history (exactly once, through the transaction)
/// and then, as its last step, the latest value per symbol and signal.
pub(crate) struct Scanner {
    pub(crate) latest: LatestValues,
}

/// A version from a source timestamp, or why it is unusable.
fn version(at_ms: i64, tiebreak: u64) -> Result<Version, String> {
    u64::try_from(at_ms)
        .map(|ms| Version::new(ms, tiebreak))
        .map_err(|_| format!("negative timestamp {at_ms}"))
}

impl TxHandler for Scanner {
    type Event = Signal;

    async fn handle(
        &self,
        signal: Signal,
        _meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let (field, version, latest) = match &signal {
            Signal::Quote(q) => {
                let v = match version(q.as_of_ms, 0) {
                    Ok(v) => v,
                    Err(reason) => return Ok(Outcome::dead_letter(reason)),
                };
                let row = quote::ActiveModel {
                    quote_id: Set(format!("{}@{}", q.symbol, q.as_of_ms)),
                    symbol: Set(q.symbol.clone()),
                    price_cents: Set(q.price_cents),
                    prev_cents: Set(q.prev_cents),
                    as_of_ms: Set(q.as_of_ms),
                };
                quote::Entity::insert(row)
                    .on_conflict_do_nothing_on([quote::Column::QuoteId])
                    .exec_without_returning(tx)
                    .await?;
                (format!("{}:quote", q.symbol), v, serde_json::to_vec(q)?)
            }
            Signal::Recommendation(r) => {
                let v = match version(r.as_of_ms, 0) {
                    Ok(v) => v,
                    Err(reason) => return Ok(Outcome::dead_letter(reason)),
                };
                let row = recommendation::ActiveModel {
                    rec_id: Set(format!("{}@{}", r.symbol, r.as_of_ms)),
                    symbol: Set(r.symbol.clone()),
                    analyst: Set(r.analyst.clone()),
                    rating: Set(r.rating.clone()),
                    target_cents: Set(r.target_cents),
                    as_of_ms: Set(r.as_of_ms),
                };
                recommendation::Entity::insert(row)
                    .on_conflict_do_nothing_on([recommendation::Column::RecId])
                    .exec_without_returning(tx)
                    .await?;
                (
                    format!("{}:recommendation", r.symbol),
                    v,
                    serde_json::to_vec(r)?,
                )
            }
            Signal::News(n) => {
                let v = match version(n.published_ms, n.seq) {
                    Ok(v) => v,
                    Err(reason) => return Ok(Outcome::dead_letter(reason)),
                };
                let row = news_item::ActiveModel {
                    article_id: Set(n.article_id.clone()),
                    symbol: Set(n.symbol.clone()),
                    headline: Set(n.headline.clone()),
                    published_ms: Set(n.published_ms),
                };
                // A repeated article (new event, same id) leaves one row.
                news_item::Entity::insert(row)
                    .on_conflict_do_nothing_on([news_item::Column::ArticleId])
                    .exec_without_returning(tx)
                    .await?;
                (format!("{}:news", n.symbol), v, serde_json::to_vec(n)?)
            }
        };
        // Last: an older signal never replaces a newer latest value.
        self.latest.put(&field, version, latest).await?;
        Ok(Outcome::Ack)
    }
}

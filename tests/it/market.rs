//! The market-scanner example's domain, on SQLite and PostgreSQL: repeated
//! news leaves one row, an older quote never replaces a newer latest value,
//! and a restart with the same tables adds no duplicate history.

use std::time::Duration;

use redstream::prelude::*;
use redstream::{LatestValues, RedisBroker};
use sea_orm::{EntityTrait, PaginatorTrait};

use crate::support::db::TestDb;
use crate::support::{TestContext, eventually, publish_all, select_row};

#[path = "../../examples/market_scanner/market.rs"]
#[allow(dead_code)]
mod domain;

use domain::{GROUP, News, Quote, Scanner, Signal};

async fn start(ctx: &TestContext, store: &Store, stream: &str, schedules: bool) -> Processor {
    let broker = RedisBroker::connect(&ctx.settings().redis, "market-test")
        .await
        .unwrap();
    let latest = LatestValues::new(&broker, ctx.stream("latest"));
    let mut builder = Processor::builder(ctx.settings()).group(Group::transactional(
        stream,
        GROUP,
        store,
        Scanner { latest },
    ));
    if schedules {
        let watchlist = vec!["AAPL".to_owned(), "MSFT".to_owned()];
        for s in domain::schedules(stream, &watchlist, 7) {
            builder = builder.schedule(s);
        }
    }
    builder.start().await.unwrap()
}

async fn settled(ctx: &TestContext, stream: &str) -> bool {
    ctx.pending(stream, GROUP).await == 0
}

fn news(id: &str, symbol: &str, at: i64) -> Signal {
    Signal::News(News {
        article_id: id.to_owned(),
        symbol: symbol.to_owned(),
        headline: format!("{symbol} {id}"),
        published_ms: at,
        seq: 0,
    })
}

fn quote(symbol: &str, price: i64, at: i64) -> Signal {
    Signal::Quote(Quote {
        symbol: symbol.to_owned(),
        price_cents: price,
        prev_cents: price,
        as_of_ms: at,
    })
}

#[actix_rt::test]
async fn repeated_news_leaves_one_row_and_old_quotes_do_not_win() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let stream = ctx.stream("market");
        let store = db.store().await;
        domain::create_tables(store.connection()).await.unwrap();
        let processor = start(&ctx, &store, &stream, false).await;
        // The same article in three events (fresh event ids), another one,
        // and quotes whose newest arrives first.
        let signals = vec![
            news("a-1", "AAPL", 1_000),
            news("a-1", "AAPL", 1_000),
            news("a-2", "AAPL", 2_000),
            news("a-1", "AAPL", 1_000),
            quote("AAPL", 300, 3_000),
            quote("AAPL", 200, 2_000),
            quote("AAPL", 100, 1_000),
        ];
        let events = signals
            .into_iter()
            .map(|s| s.into_event().unwrap())
            .collect();
        publish_all(&processor.producer(), &stream, events).await;
        let db_conn = store.connection();
        eventually(Duration::from_secs(20), "7 events handled", || async {
            processor
                .group_status(&stream, GROUP)
                .await
                .is_ok_and(|s| s.acked >= 7)
                && settled(&ctx, &stream).await
        })
        .await;
        let news_rows = domain::news_item::Entity::find()
            .count(db_conn)
            .await
            .unwrap();
        assert_eq!(news_rows, 2, "{:?}: one row per article", db.backend);
        let quote_rows = domain::quote::Entity::find().count(db_conn).await.unwrap();
        assert_eq!(quote_rows, 3, "every quote is history");

        let broker = RedisBroker::connect(&ctx.settings().redis, "market-check")
            .await
            .unwrap();
        let latest = LatestValues::new(&broker, ctx.stream("latest"));
        let q = latest
            .get_json::<Quote>("AAPL:quote")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((q.value.price_cents, q.value.as_of_ms), (300, 3_000));
        let n = latest.get_json::<News>("AAPL:news").await.unwrap().unwrap();
        assert_eq!(n.value.article_id, "a-2");
        assert_eq!(ctx.xlen(&redstream::dead_letter_stream(&stream)).await, 0);
        processor.shutdown().await.unwrap();
    }
}

/// Rows in `table` and distinct values of `key` in it.
async fn rows_and_distinct(store: &Store, table: &str, key: &str) -> (i64, i64) {
    let row = select_row(
        store,
        &format!("SELECT COUNT(*), COUNT(DISTINCT {key}) FROM {table}"),
    )
    .await;
    (
        row.try_get_by_index::<i64>(0).unwrap(),
        row.try_get_by_index::<i64>(1).unwrap(),
    )
}

#[actix_rt::test]
async fn a_restart_resumes_without_duplicate_history() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let stream = ctx.stream("market");
        let store = db.store().await;
        domain::create_tables(store.connection()).await.unwrap();

        // First run: the run at start, then the first aligned quote tick.
        let first = start(&ctx, &store, &stream, true).await;
        eventually(
            domain::QUOTES_EVERY * 3,
            "a quote run on a boundary",
            || async {
                first
                    .schedule_stats("quotes")
                    .is_some_and(|s| s.succeeded >= 2)
            },
        )
        .await;
        eventually(Duration::from_secs(20), "first run handled", || async {
            settled(&ctx, &stream).await
        })
        .await;
        first.shutdown().await.unwrap();
        let before = rows_and_distinct(&store, "quotes", "quote_id").await;

        // Restarted within the same periods: every source's run at start
        // stands for the slot the first run already produced.
        let second = start(&ctx, &store, &stream, true).await;
        eventually(Duration::from_secs(20), "second run produced", || async {
            ["quotes", "recommendations", "news"]
                .iter()
                .all(|n| second.schedule_stats(n).is_some_and(|s| s.succeeded >= 1))
        })
        .await;
        eventually(Duration::from_secs(20), "second run handled", || async {
            settled(&ctx, &stream).await
        })
        .await;
        second.shutdown().await.unwrap();

        // The repeated slot was published again and absorbed: the
        // recommendations (one per minute) were produced twice for sure.
        assert!(
            store.stats().duplicates >= 2,
            "{:?}: repeated slots reached the handler as duplicates: {:?}",
            db.backend,
            store.stats()
        );
        let after = rows_and_distinct(&store, "quotes", "quote_id").await;
        assert_eq!(after.0, after.1, "no duplicate quote rows");
        assert!(after.0 >= before.0);
        let recs = rows_and_distinct(&store, "recommendations", "rec_id").await;
        assert_eq!(recs.0, recs.1);
        let news = rows_and_distinct(&store, "news", "article_id").await;
        assert_eq!(news.0, news.1);
        // One row per symbol and slot, never more.
        let (rows, distinct_slots) = rows_and_distinct(&store, "quotes", "as_of_ms").await;
        assert_eq!(rows, distinct_slots * 2, "two symbols per slot");
        assert_eq!(ctx.xlen(&redstream::dead_letter_stream(&stream)).await, 0);
    }
}

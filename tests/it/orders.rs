//! The order-processing example's contract, on SQLite and PostgreSQL: the
//! domain code in-process, and the `consume` binary killed with SIGKILL
//! mid-run and restarted.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redstream::prelude::*;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

use crate::support::db::TestDb;
use crate::support::examples::build_example;
use crate::support::{TestContext, eventually, on_both_databases, publish_all, select_row};

#[path = "../../examples/order_processing/orders.rs"]
#[allow(dead_code)]
pub(crate) mod domain;

use domain::{GROUP, ORDER_CONFIRMED, ORDER_CREATED, Orders, order, sample_order};

async fn count_orders(store: &Store, prefix: &str) -> u64 {
    order::Entity::find()
        .filter(order::Column::OrderId.like(format!("{prefix}%")))
        .count(store.connection())
        .await
        .unwrap()
}

async fn count_confirmations_in_outbox(store: &Store) -> i64 {
    let row = select_row(
        store,
        &format!("SELECT COUNT(*) AS n FROM outbox WHERE event_type = '{ORDER_CONFIRMED}'"),
    )
    .await;
    row.try_get_by_index::<i64>(0).unwrap()
}

#[actix_rt::test]
async fn orders_have_one_effect_invalid_ones_are_dead_lettered() {
    for db in TestDb::both().await {
        let Some(ctx) = TestContext::new() else {
            return;
        };
        let orders_stream = ctx.stream("orders");
        let events_stream = ctx.stream("order-events");
        let store = db.store().await;
        domain::create_tables(store.connection()).await.unwrap();
        let processor = Processor::builder(ctx.settings())
            .outbox(&store)
            .group(
                Group::transactional(
                    &orders_stream,
                    GROUP,
                    &store,
                    Orders {
                        confirmations: events_stream.clone(),
                    },
                )
                .with_members(4),
            )
            .start()
            .await
            .unwrap();
        let producer = processor.producer();
        let mut events = Vec::new();
        for i in 0..50 {
            let order = sample_order(&format!("o-{i}"), i);
            events.push(
                Event::new(ORDER_CREATED, &order)
                    .unwrap()
                    .with_id(format!("e-{i}")),
            );
        }
        // The same event id again, and the same order in a new event.
        events.push(
            Event::new(ORDER_CREATED, &sample_order("o-3", 3))
                .unwrap()
                .with_id("e-3"),
        );
        events.push(Event::new(ORDER_CREATED, &sample_order("o-4", 4)).unwrap());
        // Invalid: unparsable, missing field, no items, qty 0, negative price.
        let bad = |json: &str| Event::from_json(ORDER_CREATED, json.as_bytes().to_vec());
        events.push(bad("{\"order_id\": "));
        events.push(bad(r#"{"order_id": "x1", "items": []}"#));
        events.push(bad(
            r#"{"order_id": "x2", "customer_id": "c", "items": []}"#,
        ));
        events.push(bad(
            r#"{"order_id": "x3", "customer_id": "c", "items": [{"sku": "a", "qty": 0, "unit_price_cents": 1}]}"#,
        ));
        events.push(bad(
            r#"{"order_id": "x4", "customer_id": "c", "items": [{"sku": "a", "qty": 1, "unit_price_cents": -1}]}"#,
        ));
        publish_all(&producer, &orders_stream, events).await;
        let dlq = redstream::dead_letter_stream(&orders_stream);
        eventually(
            Duration::from_secs(20),
            "50 rows, 5 dead letters, 50 confirmations",
            || async {
                count_orders(&store, "o-").await == 50
                    && ctx.xlen(&dlq).await == 5
                    && ctx.xlen(&events_stream).await == 50
                    && ctx.pending(&orders_stream, GROUP).await == 0
            },
        )
        .await;
        assert_eq!(
            count_orders(&store, "x").await,
            0,
            "invalid orders leave no row"
        );
        assert_eq!(count_confirmations_in_outbox(&store).await, 50);
        let mut reasons: Vec<String> = ctx
            .entries(&dlq)
            .await
            .iter()
            .map(|(_, f)| f.iter().find(|(k, _)| k == "reason").unwrap().1.clone())
            .collect();
        reasons.sort();
        assert!(reasons[0].starts_with("bad_json"), "{reasons:?}");
        assert!(
            reasons[1].starts_with("bad_json") && reasons[1].contains("customer_id"),
            "{reasons:?}"
        );
        assert_eq!(
            &reasons[2..],
            [
                "rejected: item a: negative price -1",
                "rejected: item a: qty must be positive, got 0",
                "rejected: no items"
            ],
            "{:?}",
            db.backend
        );
        // A confirmation carries the order's totals.
        let confirmations = ctx.entries(&events_stream).await;
        let (_, fields) = &confirmations[0];
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("type"), ORDER_CONFIRMED);
        let data: domain::OrderConfirmed = serde_json::from_str(&get("data")).unwrap();
        let source = sample_order(&data.order_id, data.order_id[2..].parse().unwrap());
        assert_eq!(
            (data.total_cents, data.item_count),
            domain::validate(&source).unwrap()
        );
        processor.shutdown().await.unwrap();
    }
}

fn run_example(binary: &std::path::Path, env: &[(String, String)], args: &[&str]) -> Child {
    Command::new(binary)
        .args(args)
        .envs(env.iter().cloned())
        .env("RUST_LOG", "error")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the example")
}

async fn kill9_mid_run_then_restart(db: TestDb) {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let binary = build_example("order_processing", &[]);
    let orders_stream = ctx.stream("orders");
    let env: Vec<(String, String)> = [
        ("REDSTREAM__REDIS__URL", ctx.url.clone()),
        (
            "REDSTREAM__DATABASE__URL",
            db.settings.url.expose().to_owned(),
        ),
        (
            "REDSTREAM__INSTANCE__NAME",
            format!("kill-{}", &ctx.prefix[ctx.prefix.len() - 6..]),
        ),
        ("REDSTREAM__RECLAIM__LEASE_TTL_MS", "1000".into()),
        ("REDSTREAM__RECLAIM__MIN_IDLE_MS", "2000".into()),
        ("REDSTREAM__RECLAIM__HEARTBEAT_MS", "500".into()),
        ("REDSTREAM__RECLAIM__INTERVAL_MS", "200".into()),
        ("REDSTREAM__DATABASE__BATCH_SIZE", "20".into()),
        ("ORDERS_STREAM", orders_stream.clone()),
        ("ORDER_EVENTS_STREAM", ctx.stream("order-events")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let produced = run_example(&binary, &env, &["produce", "--count", "3000"])
        .wait()
        .unwrap();
    assert!(produced.success());
    assert_eq!(ctx.xlen(&orders_stream).await, 3000);

    let store = db.store().await;
    let mut consumer = run_example(&binary, &env, &["consume", "--members", "2"]);
    eventually(
        Duration::from_secs(30),
        "the first orders committed",
        || async {
            domain::create_tables(store.connection()).await.is_ok()
                && count_orders(&store, "").await >= 100
        },
    )
    .await;
    consumer.kill().unwrap(); // SIGKILL
    consumer.wait().unwrap();
    let at_kill = count_orders(&store, "").await;
    assert!(at_kill < 3000, "killed mid-run ({at_kill} done)");

    let mut consumer = run_example(&binary, &env, &["consume", "--members", "2"]);
    eventually(
        Duration::from_secs(60),
        "every order done after the restart",
        || async {
            count_orders(&store, "").await == 3000 && ctx.pending(&orders_stream, GROUP).await == 0
        },
    )
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &consumer.id().to_string()])
        .status();
    let status = consumer.wait().unwrap();
    assert!(status.success(), "graceful stop on SIGTERM: {status:?}");
    assert_eq!(count_orders(&store, "").await, 3000, "{:?}", db.backend);
    assert_eq!(
        count_confirmations_in_outbox(&store).await,
        3000,
        "one confirmation per order ({:?})",
        db.backend
    );
    assert_eq!(
        ctx.xlen(&redstream::dead_letter_stream(&orders_stream))
            .await,
        0
    );
}

on_both_databases!(
    a_killed_consumer_restarts_with_every_order_exactly_once_sqlite,
    a_killed_consumer_restarts_with_every_order_exactly_once_postgres,
    kill9_mid_run_then_restart
);

/// The example run as a user runs it: no `RUST_LOG` (its default filter),
/// stdout and stderr captured (pipes, not a terminal), a SQLite file in a
/// temporary directory, the test's streams.
fn run_as_user(ctx: &TestContext, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let binary = build_example("order_processing", &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env("REDSTREAM__REDIS__URL", &ctx.url)
        .env(
            "REDSTREAM__DATABASE__URL",
            format!("sqlite://{}/orders.db?mode=rwc", dir.path().display()),
        )
        .env(
            "REDSTREAM__INSTANCE__NAME",
            format!("user-{}", &ctx.prefix[ctx.prefix.len() - 6..]),
        )
        .env("ORDERS_STREAM", ctx.stream("orders"))
        .env("ORDER_EVENTS_STREAM", ctx.stream("order-events"))
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run the example")
}

/// A log line of the fmt subscriber: a timestamp, then a level.
fn is_log_line(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let stamped = words
        .next()
        .is_some_and(|w| w.len() > 20 && w.as_bytes()[4] == b'-' && w.contains('T'));
    let level = words
        .next()
        .is_some_and(|w| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&w));
    stamped && level
}

/// The demo's stdout is its summary, with no log line, and counts this
/// run's dead letters by reason; its logs go to stderr without colours
/// (stderr is a pipe), and the expected dead letters are not one warning
/// each there.
#[actix_rt::test]
async fn the_demo_prints_its_summary_on_stdout_and_logs_on_stderr() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let output = run_as_user(&ctx, &[], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("\nsummary\n"), "{stdout}");
    assert!(
        stdout.contains("orders processed (rows in `orders`): 300"),
        "{stdout}"
    );
    let dead_lettered = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("dead-lettered:"))
        .unwrap_or_else(|| panic!("no dead-letter count: {stdout}"));
    assert!(dead_lettered.contains(" 30 "), "{dead_lettered}");
    // Six of each kind of invalid order, by the reason in its letter.
    for reason in [
        "bad_json: EOF while parsing",
        "bad_json: missing field `customer_id`",
        "rejected: no items",
        "rejected: item s: qty must be positive, got 0",
        "rejected: item s: negative price -5",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with("6  ") && l.contains(reason)),
            "no line `6  {reason}`: {stdout}"
        );
    }
    let logged: Vec<&str> = stdout.lines().filter(|l| is_log_line(l)).collect();
    assert!(logged.is_empty(), "log lines on stdout: {logged:?}");
    assert!(
        !stdout.contains('\u{1b}'),
        "colour codes on stdout: {stdout:?}"
    );
    // The logs are on stderr, plain: the group's start and stop.
    assert!(
        stderr
            .lines()
            .any(|l| is_log_line(l) && l.contains("group started")),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes on a pipe: {stderr:?}"
    );
    assert!(
        !stderr.contains("dead-lettered"),
        "the expected dead letters are counted in the summary, not logged: {stderr}"
    );
}

/// `--help` and `-h` print the usage on stdout and exit 0; an unknown mode
/// is bad usage (2), with the usage on stderr.
#[actix_rt::test]
async fn help_prints_usage_and_exits_0() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    for flag in ["--help", "-h"] {
        let output = run_as_user(&ctx, &[flag], &[]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{flag}: {output:?}");
        assert!(stdout.starts_with("usage: order_processing"), "{stdout}");
        assert!(stdout.contains("produce --count N"), "{stdout}");
    }
    let output = run_as_user(&ctx, &["--bogus"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr.contains("unknown mode `--bogus`") && stderr.contains("usage:"),
        "{stderr}"
    );
}

/// A Redis or database that cannot be reached: the error names the address
/// tried, without the password.
#[actix_rt::test]
async fn connection_errors_name_the_address_without_the_password() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    // Nothing listens on port 1.
    let output = run_as_user(
        &ctx,
        &[],
        &[(
            "REDSTREAM__REDIS__URL",
            "redis://app:hunter2@127.0.0.1:1".into(),
        )],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr.contains("error: Redis at redis://app:***@127.0.0.1:1: "),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let missing = tempfile::tempdir().unwrap().path().join("no/such/dir");
    let url = format!("sqlite://{}/orders.db?mode=rwc", missing.display());
    let output = run_as_user(&ctx, &[], &[("REDSTREAM__DATABASE__URL", url.clone())]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr.contains(&format!("error: database at {url}: ")),
        "{stderr}"
    );
}

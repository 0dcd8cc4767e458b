//! The `redstream` operator CLI against real Redis.

use std::time::Duration;

use assert_cmd::Command;
use redis::AsyncCommands;
use redstream::prelude::*;
use sea_orm::sea_query::{Alias, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction};

use crate::support::db::TestDb;
use crate::support::{TestContext, eventually, numbered, read_group, select_row, start_group};

fn cli(ctx: &TestContext) -> Command {
    let mut cmd = Command::cargo_bin("redstream").expect("the redstream binary");
    cmd.arg("--redis-url").arg(&ctx.url);
    cmd
}

fn json(output: &[u8]) -> serde_json::Value {
    serde_json::from_slice(output)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(output)))
}

#[actix_rt::test]
async fn status_and_pending_show_groups_owners_and_counts() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-status");
    ctx.create_group(&stream, "billing").await;
    ctx.create_group(&stream, "audit").await;
    let mut c = ctx.conn().await;
    for i in 0..10 {
        let _: String = c.xadd(&stream, "*", &[("n", i.to_string())]).await.unwrap();
    }
    // `billing` has 4 entries out with one consumer; `audit` read nothing.
    read_group(&mut c, &stream, "billing", "worker-1", 4).await;

    let out = cli(&ctx)
        .args(["--json", "status", &stream])
        .assert()
        .success();
    let status = json(&out.get_output().stdout);
    let s = &status[0];
    assert_eq!(s["stream"], stream.as_str());
    assert_eq!(s["length"], 10);
    let billing = s["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "billing")
        .unwrap();
    assert_eq!(
        (billing["pending"].as_u64(), billing["lag"].as_u64()),
        (Some(4), Some(6))
    );
    assert_eq!(billing["consumers"], 1);
    let audit = s["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "audit")
        .unwrap();
    assert_eq!(audit["lag"], 10);

    let table = cli(&ctx).args(["status", &stream]).assert().success();
    let text = String::from_utf8_lossy(&table.get_output().stdout).into_owned();
    assert!(
        text.contains("PENDING") && text.contains("billing"),
        "{text}"
    );

    let out = cli(&ctx)
        .args(["--json", "pending", &stream, "billing"])
        .assert()
        .success();
    let pending = json(&out.get_output().stdout);
    let rows = pending.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!(
        rows.iter()
            .all(|r| r["consumer"] == "worker-1" && r["deliveries"] == 1)
    );
}

#[actix_rt::test]
async fn exit_codes_for_unknown_things_and_unreachable_redis() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-codes");
    cli(&ctx).args(["pending", &stream, "g"]).assert().code(3);
    ctx.create_group(&stream, "g").await;
    cli(&ctx)
        .args(["pending", &stream, "nope"])
        .assert()
        .code(3);
    cli(&ctx)
        .args(["dlq", "show", "1-1", "--stream", &stream])
        .assert()
        .code(3);
    cli(&ctx).args(["dlq", "redrive", &stream]).assert().code(2);
    Command::cargo_bin("redstream")
        .unwrap()
        .args(["--redis-url", "redis://127.0.0.1:1", "status"])
        .assert()
        .code(4);
}

/// Rejects event 3 while `gate` holds no row; writes one row per effect.
struct Gated;

impl TxHandler for Gated {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        v: serde_json::Value,
        _meta: &Meta,
        tx: &DatabaseTransaction,
    ) -> HandlerResult {
        let n = v["n"].as_i64().unwrap();
        let open = tx
            .query_one_raw(sea_orm::Statement::from_string(
                tx.get_database_backend(),
                "SELECT 1 FROM gate",
            ))
            .await?
            .is_some();
        if n == 3 && !open {
            return Ok(Outcome::dead_letter("gate closed"));
        }
        let insert = Query::insert()
            .into_table(Alias::new("effects"))
            .columns([Alias::new("n")])
            .values([n.into()])?
            .to_owned();
        tx.execute(&insert).await?;
        Ok(Outcome::Ack)
    }
}

async fn effects_of(store: &Store, n: i64) -> i64 {
    let row = select_row(
        store,
        &format!("SELECT COUNT(*) FROM effects WHERE n = {n}"),
    )
    .await;
    row.try_get_by_index(0).unwrap()
}

/// A dead letter redriven after the cause is fixed has exactly one effect,
/// even when it was dead-lettered twice.
#[actix_rt::test]
async fn redrive_round_trip_has_exactly_one_effect() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let db = TestDb::sqlite();
    let store = db.store().await;
    for sql in [
        "CREATE TABLE gate (open INTEGER)",
        "CREATE TABLE effects (n BIGINT NOT NULL)",
    ] {
        store.connection().execute_unprepared(sql).await.unwrap();
    }
    let stream = ctx.stream("cli-redrive");
    let processor = start_group(
        ctx.settings(),
        Group::transactional(&stream, "g", &store, Gated),
    )
    .await;
    let events = (0..6).map(numbered).collect();
    processor
        .producer()
        .publish_batch(&stream, events)
        .await
        .unwrap();
    let dlq = redstream::dead_letter_stream(&stream);
    eventually(
        Duration::from_secs(10),
        "5 effects, 1 dead letter",
        || async { ctx.xlen(&dlq).await == 1 && ctx.pending(&stream, "g").await == 0 },
    )
    .await;
    assert_eq!(effects_of(&store, 3).await, 0);

    // The same event dead-lettered twice (a duplicate letter).
    let letters = ctx.entries(&dlq).await;
    let mut c = ctx.conn().await;
    let mut copy = redis::cmd("XADD");
    copy.arg(&dlq).arg("*");
    for (k, v) in &letters[0].1 {
        copy.arg(k).arg(v);
    }
    let _: String = copy.query_async(&mut c).await.unwrap();

    let out = cli(&ctx)
        .args(["--json", "dlq", "list", &stream])
        .assert()
        .success();
    let listed = json(&out.get_output().stdout);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["reason"], "rejected: gate closed");
    let first = listed[0]["id"].as_str().unwrap().to_owned();
    let out = cli(&ctx)
        .args(["--json", "dlq", "show", &first])
        .assert()
        .success();
    assert_eq!(json(&out.get_output().stdout)["original"]["type"], "n");

    // Fix the cause, then redrive everything.
    store
        .connection()
        .execute_unprepared("INSERT INTO gate VALUES (1)")
        .await
        .unwrap();
    // A redrive of everything asks first; with no terminal to ask, it
    // refuses and changes nothing. A dry run says what it would do.
    cli(&ctx)
        .args(["dlq", "redrive", &stream, "--all"])
        .assert()
        .code(2);
    let out = cli(&ctx)
        .args(["--json", "dlq", "redrive", &stream, "--all", "--dry-run"])
        .assert()
        .success();
    assert_eq!(json(&out.get_output().stdout)["would_redrive"], 2);
    assert_eq!(
        ctx.xlen(&dlq).await,
        2,
        "neither refusal nor dry run redrives"
    );
    let before = ctx.xlen(&stream).await;
    let out = cli(&ctx)
        .args(["--json", "dlq", "redrive", &stream, "--all", "--yes"])
        .assert()
        .success();
    assert_eq!(json(&out.get_output().stdout)["redriven"], 2);
    assert_eq!(ctx.xlen(&dlq).await, 0, "removed once republished");
    let redriven = ctx.entries(&stream).await;
    assert!(
        redriven[before as usize..]
            .iter()
            .all(|(_, fields)| fields.iter().any(|(k, v)| k == "redrives" && v == "1")),
        "a redriven entry counts its redrive: {redriven:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the redriven event handled",
        || async { effects_of(&store, 3).await == 1 && ctx.pending(&stream, "g").await == 0 },
    )
    .await;
    eventually(Duration::from_secs(5), "the duplicate absorbed", || async {
        store.stats().duplicates == 1
    })
    .await;
    assert_eq!(effects_of(&store, 3).await, 1, "exactly one effect");
    for n in [0, 1, 2, 4, 5] {
        assert_eq!(effects_of(&store, n).await, 1, "other events untouched");
    }
    // Redriving an id that is gone says so.
    cli(&ctx)
        .args(["dlq", "redrive", &stream, "--id", &first])
        .assert()
        .code(3);
    processor.shutdown().await.unwrap();
}

/// Trim removes only what every group has acked.
#[actix_rt::test]
async fn trim_keeps_what_any_group_still_needs() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-trim");
    ctx.create_group(&stream, "fast").await;
    ctx.create_group(&stream, "slow").await;
    let mut c = ctx.conn().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let id: String = c.xadd(&stream, "*", &[("n", i.to_string())]).await.unwrap();
        ids.push(id);
    }
    // `fast` read and acked everything; `slow` acked the first 8, holds 4.
    read_group(&mut c, &stream, "fast", "w", 20).await;
    let _: u64 = c.xack(&stream, "fast", &ids).await.unwrap();
    read_group(&mut c, &stream, "slow", "w", 12).await;
    let _: u64 = c.xack(&stream, "slow", &ids[..8]).await.unwrap();

    let out = cli(&ctx)
        .args(["--json", "trim", &stream, "--dry-run"])
        .assert()
        .success();
    let plan = json(&out.get_output().stdout);
    assert_eq!(
        plan["min_id"],
        ids[8].as_str(),
        "slow still needs its oldest pending entry"
    );
    assert_eq!(plan["removable"], 8);
    assert_eq!(ctx.xlen(&stream).await, 20, "a dry run removes nothing");

    // Without a terminal to ask, trim refuses unless told `--yes`.
    cli(&ctx).args(["trim", &stream]).assert().code(2);
    assert_eq!(
        ctx.xlen(&stream).await,
        20,
        "a refused trim removes nothing"
    );
    let out = cli(&ctx)
        .args(["--json", "trim", &stream, "--yes"])
        .assert()
        .success();
    assert_eq!(json(&out.get_output().stdout)["removed"], 8);
    let left: Vec<String> = ctx
        .entries(&stream)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        left,
        ids[8..].to_vec(),
        "everything slow needs is still there"
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn group_of<'a>(status: &'a serde_json::Value, group: &str) -> &'a serde_json::Value {
    status[0]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == group)
        .unwrap_or_else(|| panic!("no group {group} in {status}"))
}

async fn status_json(ctx: &TestContext, stream: &str) -> serde_json::Value {
    let out = cli(ctx)
        .args(["--json", "status", stream])
        .assert()
        .success();
    json(&out.get_output().stdout)
}

/// `status` tells a group that a live process serves from one nobody
/// serves, and entries stuck from a mere backlog: the longest time pending
/// counts from delivery, the queue latency from publish.
#[actix_rt::test]
async fn status_shows_live_members_and_both_ages() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-ages");
    let mut c = ctx.conn().await;
    // Ten entries published a minute ago.
    let minute_ago = now_ms() - 60_000;
    for i in 0..10 {
        let _: String = c
            .xadd(
                &stream,
                format!("{minute_ago}-{i}"),
                &[("n", i.to_string())],
            )
            .await
            .unwrap();
    }
    ctx.create_group(&stream, "g").await;
    // Two of them delivered just now, to a member no process runs.
    read_group(&mut c, &stream, "g", "gone-0", 2).await;

    let status = status_json(&ctx, &stream).await;
    let g = group_of(&status, "g");
    assert_eq!(
        (g["consumers"].as_u64(), g["live_members"].as_u64()),
        (Some(1), Some(0))
    );
    let longest = g["longest_pending_ms"].as_u64().unwrap();
    assert!(
        longest < 30_000,
        "pending for moments, not since publish a minute ago: {longest} ms"
    );
    let latency = g["queue_latency_ms"].as_u64().unwrap();
    assert!(
        latency >= 59_000,
        "the next entry waited a minute: {latency} ms"
    );
    let table = cli(&ctx).args(["status", &stream]).assert().success();
    let text = String::from_utf8_lossy(&table.get_output().stdout).into_owned();
    assert!(
        text.contains("LONGEST PENDING") && text.contains("has work and no live process"),
        "{text}"
    );
    let out = cli(&ctx)
        .args(["--json", "consumers", &stream, "g"])
        .assert()
        .success();
    let consumers = json(&out.get_output().stdout);
    assert_eq!(consumers[0]["name"], "gone-0");
    assert!(
        consumers[0]["held_by"].is_null(),
        "a stale name: {consumers}"
    );

    // A running processor: its members are live, held by this process.
    let processor = start_group(
        ctx.settings(),
        Group::new(
            &stream,
            "g",
            handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) }),
        ),
    )
    .await;
    eventually(Duration::from_secs(10), "live members", || async {
        group_of(&status_json(&ctx, &stream).await, "g")["live_members"]
            .as_u64()
            .is_some_and(|n| n > 0)
    })
    .await;
    let out = cli(&ctx)
        .args(["--json", "consumers", &stream, "g"])
        .assert()
        .success();
    let consumers = json(&out.get_output().stdout);
    let me = format!("/{}/", std::process::id());
    assert!(
        consumers
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["held_by"].as_str().is_some_and(|h| h.contains(&me))),
        "a member held by this process ({me}): {consumers}"
    );
    // Each process records its members: restarts, since, its pid.
    let pid = std::process::id();
    eventually(Duration::from_secs(5), "the member's record", || async {
        let out = cli(&ctx)
            .args(["--json", "consumers", &stream, "g"])
            .assert()
            .success();
        json(&out.get_output().stdout)
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["record"]["pid"] == pid && c["record"]["running"] == true)
    })
    .await;
    processor.shutdown().await.unwrap();
    let g = status_json(&ctx, &stream).await;
    assert_eq!(
        group_of(&g, "g")["live_members"],
        0,
        "a stopped process gives its names up"
    );
}

/// The cell of `column` in the row of `consumer` in a `consumers` table.
fn table_cell(text: &str, consumer: &str, column: &str) -> Option<String> {
    let mut lines = text.lines();
    let at = lines.next()?.find(column)?;
    let row = lines.find(|l| l.starts_with(consumer))?;
    row.get(at..)?.split_whitespace().next().map(str::to_owned)
}

/// Each member's entries in flight: with its handler blocked on 3 entries,
/// the member shows 3 in its status, in its process's record
/// (`deployment()`) and in `redstream consumers` (JSON and the IN-FLIGHT
/// column), and 0 everywhere once they finish; a record written before
/// the field existed still reads (as 0).
#[actix_rt::test]
async fn members_show_their_entries_in_flight() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-in-flight");
    // Handlers wait for a permit; none until the test gives them.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (handler_gate, handler_started) = (gate.clone(), started.clone());
    let processor = start_group(
        ctx.settings(),
        Group::new(
            &stream,
            "g",
            handler_fn(move |_: serde_json::Value, _: Meta| {
                let (gate, started) = (handler_gate.clone(), handler_started.clone());
                async move {
                    started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    gate.acquire().await.unwrap().forget();
                    Ok(Outcome::Ack)
                }
            }),
        )
        .with_members(1)
        .with_in_flight(8),
    )
    .await;
    let handle = processor.handle();
    let events = (0..3).map(numbered).collect();
    crate::support::publish_all(&processor.producer(), &stream, events).await;
    eventually(Duration::from_secs(10), "3 handlers running", || async {
        started.load(std::sync::atomic::Ordering::SeqCst) == 3
    })
    .await;

    let status_in_flight = || async {
        let status = handle.group_status(&stream, "g").await.unwrap();
        status
            .members
            .iter()
            .map(|m| m.in_flight)
            .collect::<Vec<_>>()
    };
    let recorded_in_flight = || async {
        handle
            .deployment()
            .await
            .into_iter()
            .filter(|d| d.stream == stream)
            .flat_map(|d| d.members)
            .map(|m| (m.live, m.presence.in_flight))
            .collect::<Vec<_>>()
    };
    let cli_in_flight = || {
        let out = cli(&ctx)
            .args(["--json", "consumers", &stream, "g"])
            .assert()
            .success();
        json(&out.get_output().stdout)
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["record"]["in_flight"].as_u64())
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(5), "status: 3 in flight", || async {
        status_in_flight().await == [3]
    })
    .await;
    // Written with the next lease renewal (every lease_ttl / 3).
    eventually(Duration::from_secs(5), "record: 3 in flight", || async {
        recorded_in_flight().await == [(true, 3)]
    })
    .await;
    assert_eq!(cli_in_flight(), [Some(3)]);
    let member = handle.group_status(&stream, "g").await.unwrap().members[0]
        .name
        .clone();
    let out = cli(&ctx)
        .args(["consumers", &stream, "g"])
        .assert()
        .success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert_eq!(
        table_cell(&text, &member, "IN-FLIGHT").as_deref(),
        Some("3"),
        "{text}"
    );

    // Released: they finish, and nothing is held any more.
    gate.add_permits(3);
    ctx.eventually_nothing_pending(&stream, "g", Duration::from_secs(10))
        .await;
    eventually(Duration::from_secs(5), "status: 0 in flight", || async {
        status_in_flight().await == [0]
    })
    .await;
    eventually(Duration::from_secs(5), "record: 0 in flight", || async {
        recorded_in_flight().await == [(true, 0)]
    })
    .await;
    assert_eq!(cli_in_flight(), [Some(0)]);
    processor.shutdown().await.unwrap();

    // A record from a version without the field, for a consumer no
    // process runs: it still reads, with 0 in flight; the table shows no
    // figure for a record that is not fresh.
    let old = ctx.stream("cli-in-flight-old");
    ctx.create_group(&old, "g").await;
    let mut c = ctx.conn().await;
    let _: String = c.xadd(&old, "*", &[("n", "1")]).await.unwrap();
    read_group(&mut c, &old, "g", "old-0", 1).await;
    let record = serde_json::json!({
        "name": "old-0", "process": "elsewhere/7/01J", "host": "elsewhere",
        "pid": 7, "since_ms": 1, "seen_ms": 2, "running": true,
        "restarts": 4, "last_error": null, "lease_ttl_ms": 2000,
    });
    let _: () = c
        .hset(format!("{old}:members:g"), "old-0", record.to_string())
        .await
        .unwrap();
    let out = cli(&ctx)
        .args(["--json", "consumers", &old, "g"])
        .assert()
        .success();
    let consumers = json(&out.get_output().stdout);
    assert_eq!(consumers[0]["record"]["restarts"], 4, "{consumers}");
    assert_eq!(consumers[0]["record"]["in_flight"], 0, "{consumers}");
    let out = cli(&ctx).args(["consumers", &old, "g"]).assert().success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert_eq!(
        table_cell(&text, "old-0", "IN-FLIGHT").as_deref(),
        Some("-"),
        "{text}"
    );
}

/// `pending` and `retries` show redstream's own attempts, the retry time,
/// the event type and the last error; an unknown consumer is not found,
/// and an empty list says so.
#[actix_rt::test]
async fn pending_and_retries_show_attempts_due_time_type_and_error() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-pending");
    let processor = start_group(
        ctx.settings(),
        Group::new(
            &stream,
            "g",
            handler_fn(|v: serde_json::Value, _: Meta| async move {
                if v["n"] == 1 {
                    return Err("boom on 1".into());
                }
                Ok(Outcome::Ack)
            }),
        )
        .with_retry(
            RetryPolicy::default()
                .with_max_attempts(5)
                .with_initial_delay(Duration::from_secs(60))
                .with_jitter(0.0),
        ),
    )
    .await;
    let events = (0..3).map(numbered).collect();
    processor
        .producer()
        .publish_batch(&stream, events)
        .await
        .unwrap();
    let retries = || async {
        let out = cli(&ctx)
            .args(["--json", "retries", &stream, "g"])
            .assert()
            .success();
        json(&out.get_output().stdout)
    };
    eventually(Duration::from_secs(10), "one entry waiting", || async {
        retries().await.as_array().unwrap().len() == 1 && ctx.pending(&stream, "g").await == 1
    })
    .await;
    let out = cli(&ctx)
        .args(["--json", "pending", &stream, "g"])
        .assert()
        .success();
    let pending = json(&out.get_output().stdout);
    let e = &pending[0];
    assert_eq!(e["attempts"], 1, "{pending}");
    assert_eq!(e["event_type"], "n");
    assert!(
        e["last_error"].as_str().unwrap().contains("boom on 1"),
        "{pending}"
    );
    let due = e["retry_at_ms"].as_u64().unwrap();
    assert!(due > now_ms() + 30_000, "due a minute after the failure");
    assert_eq!(retries().await[0]["id"], e["id"]);
    let table = cli(&ctx).args(["pending", &stream, "g"]).assert().success();
    let text = String::from_utf8_lossy(&table.get_output().stdout).into_owned();
    assert!(text.contains("boom on 1") && text.contains("in "), "{text}");

    cli(&ctx)
        .args(["pending", &stream, "g", "--consumer", "nobody"])
        .assert()
        .code(3);
    ctx.create_group(&stream, "idle").await;
    let empty = cli(&ctx)
        .args(["pending", &stream, "idle"])
        .assert()
        .success();
    let text = String::from_utf8_lossy(&empty.get_output().stdout).into_owned();
    assert!(text.contains("no pending entries"), "{text}");
    processor.shutdown().await.unwrap();
}

/// `dlq list` shows the last error, filters by reason and group, counts
/// per reason, and says when it cut the list; `redrive --reason` takes
/// only that reason, after a dry run shows it.
#[actix_rt::test]
async fn dlq_list_shows_causes_filters_and_counts() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-dlq");
    let dlq = redstream::dead_letter_stream(&stream);
    let mut c = ctx.conn().await;
    let _: String = c.xadd(&stream, "*", &[("n", "0")]).await.unwrap();
    let letters = [
        (
            "max_attempts_exceeded: 4 attempts failed",
            "billing",
            "timeout calling the bank",
        ),
        (
            "max_attempts_exceeded: 4 attempts failed",
            "billing",
            "bank said 503",
        ),
        ("rejected: card declined", "audit", "card declined"),
    ];
    for (i, (reason, group, error)) in letters.iter().enumerate() {
        let failed_at = now_ms().to_string();
        let id = format!("E{i}");
        let fields = [
            ("reason", *reason),
            ("origin_id", "1-0"),
            ("group", *group),
            ("attempts", "4"),
            ("failed_at", failed_at.as_str()),
            ("error", *error),
            ("id", id.as_str()),
            ("type", "n"),
            ("data", "{\"n\":0}"),
        ];
        let _: String = c.xadd(&dlq, "*", &fields).await.unwrap();
    }
    let list = |args: &[&str]| {
        let mut cmd = cli(&ctx);
        cmd.args(["--json", "dlq", "list", &stream]).args(args);
        json(&cmd.assert().success().get_output().stdout)
    };
    let table = cli(&ctx).args(["dlq", "list", &stream]).assert().success();
    let text = String::from_utf8_lossy(&table.get_output().stdout).into_owned();
    assert!(
        text.contains("LAST ERROR") && text.contains("timeout calling the bank"),
        "{text}"
    );
    let cut = cli(&ctx)
        .args(["dlq", "list", &stream, "--count", "1"])
        .assert()
        .success();
    let note = String::from_utf8_lossy(&cut.get_output().stderr).into_owned();
    assert!(note.contains("showing the oldest 1 of 3"), "{note}");
    assert_eq!(list(&["--reason", "rejected"]).as_array().unwrap().len(), 1);
    assert_eq!(list(&["--group", "billing"]).as_array().unwrap().len(), 2);
    let counts = list(&["--by-reason"]);
    assert_eq!(counts[0]["reason"], "max_attempts_exceeded", "{counts}");
    assert_eq!(counts[0]["count"], 2);
    assert_eq!(counts[0]["newest_error"], "bank said 503");
    assert_eq!(
        (counts[1]["reason"].as_str(), counts[1]["count"].as_u64()),
        (Some("rejected"), Some(1))
    );

    let out = cli(&ctx)
        .args([
            "--json",
            "dlq",
            "redrive",
            &stream,
            "--reason",
            "rejected",
            "--dry-run",
        ])
        .assert()
        .success();
    assert_eq!(json(&out.get_output().stdout)["would_redrive"], 1);
    assert_eq!(ctx.xlen(&dlq).await, 3, "a dry run redrives nothing");
    let out = cli(&ctx)
        .args([
            "--json", "dlq", "redrive", &stream, "--reason", "rejected", "--yes",
        ])
        .assert()
        .success();
    assert_eq!(json(&out.get_output().stdout)["redriven"], 1);
    let left = list(&[]);
    assert_eq!(left.as_array().unwrap().len(), 2);
    assert!(
        left.as_array()
            .unwrap()
            .iter()
            .all(|l| l["group"] == "billing")
    );
}

/// Each way a command can fail names its cause, with the documented exit
/// code, and a connection attempt gives up at the connect timeout.
#[actix_rt::test]
async fn errors_name_their_cause_with_the_documented_exit_codes() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let fails = |args: &[&str], code: i32, says: &str| {
        let out = Command::cargo_bin("redstream")
            .unwrap()
            .args(args)
            .assert()
            .code(code);
        let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    let url = ctx.url.as_str();
    fails(
        &["--redis-url", url, "dlq", "show", "garbage"],
        2,
        "not a stream entry id",
    );
    fails(&["--redis-url", "http://x", "status"], 2, "--redis-url");
    // An ACL user that does not exist: refused, not "unreachable".
    let ghost = url.replacen("redis://", "redis://ghost:secret@", 1);
    fails(
        &["--redis-url", &ghost, "status"],
        5,
        "authentication failed",
    );
    let out = Command::cargo_bin("redstream")
        .unwrap()
        .args(["--redis-url", &ghost, "status"])
        .assert()
        .code(5);
    assert!(
        !String::from_utf8_lossy(&out.get_output().stderr).contains("secret"),
        "the password is never printed"
    );
    // A port where an HTTP server answers.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_url = format!("redis://{}", http.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in http.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 256];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    fails(
        &["--redis-url", &http_url, "status"],
        4,
        "does not answer as a Redis server",
    );
    // A port that accepts and never answers: given up at the connect
    // timeout, not after the reconnect backoff.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("redis://{}", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    fails(
        &[
            "--redis-url",
            &silent_url,
            "--connect-timeout-ms",
            "500",
            "status",
        ],
        4,
        "no answer within 500 ms",
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up after {:?}",
        started.elapsed()
    );
    drop(silent);
    fails(
        &["--redis-url", "redis://127.0.0.1:1", "status"],
        4,
        "connection refused",
    );
    // JSON errors under --json.
    let out = Command::cargo_bin("redstream")
        .unwrap()
        .args(["--redis-url", url, "--json", "dlq", "show", "1-1"])
        .assert()
        .code(3);
    let error = json(&out.get_output().stderr);
    assert_eq!(
        (
            error["error"]["kind"].as_str(),
            error["error"]["exit_code"].as_u64()
        ),
        (Some("not_found"), Some(3))
    );
    // --version names the commit when built from a checkout.
    let out = Command::cargo_bin("redstream")
        .unwrap()
        .arg("--version")
        .assert()
        .success();
    let version = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(
        version.starts_with(&format!("redstream {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
}

/// `groups create / delete`, `consumers remove` and `seek` change a group
/// the way Kafka's tools do, refuse what would hurt a live process unless
/// forced, and drop no pending entry.
#[actix_rt::test]
async fn groups_consumers_and_seek_change_groups_safely() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-manage");
    let run = |args: &[&str]| {
        let mut cmd = cli(&ctx);
        cmd.args(args);
        cmd.assert()
    };
    let json_of = |args: &[&str]| {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        json(&run(&all).success().get_output().stdout)
    };
    run(&["groups", "create", &stream, "g"]).success();
    run(&["groups", "create", &stream, "g"]).code(1);
    let mut c = ctx.conn().await;
    let ids: Vec<String> = (1..=10).map(|i| format!("{}-0", i * 1000)).collect();
    for id in &ids {
        let _: String = c.xadd(&stream, id, &[("n", id.as_str())]).await.unwrap();
    }
    // `gone-0` took four entries and stopped.
    read_group(&mut c, &stream, "g", "gone-0", 4).await;

    // Seeking: what a move re-reads or skips, said before it is done.
    let plan = json_of(&["seek", &stream, "g", "--to-start", "--dry-run"]);
    assert_eq!(
        (
            plan["reread"].as_u64(),
            plan["skipped"].as_u64(),
            plan["pending"].as_u64()
        ),
        (Some(4), Some(0), Some(4)),
        "{plan}"
    );
    run(&["seek", &stream, "g", "--to-end"]).code(2); // no terminal to ask
    let moved = json_of(&["seek", &stream, "g", "--to-end", "--yes"]);
    assert_eq!(moved["skipped"], 6, "{moved}");
    assert_eq!(last_delivered(&ctx, &stream).await, "10000-0");
    let moved = json_of(&["seek", &stream, "g", "--to-id", "6000-0", "--yes"]);
    assert_eq!(moved["reread"], 4);
    let plan = json_of(&["seek", &stream, "g", "--to-time", "3000", "--dry-run"]);
    assert_eq!(plan["reread"], 4, "3000 to 6000, from the time on: {plan}");
    assert_eq!(
        last_delivered(&ctx, &stream).await,
        "6000-0",
        "a dry run moves nothing"
    );
    run(&["seek", &stream, "g", "--to-time", "yesterday"]).code(2);
    run(&["seek", &stream, "g", "--to-id", "garbage"]).code(2);

    // Removing a stopped consumer keeps its entries pending, with their
    // idle time, for the reclaimer.
    assert_eq!(ctx.pending(&stream, "g").await, 4);
    let removed = json_of(&["consumers", "remove", &stream, "g", "gone-0"]);
    assert_eq!(removed["moved"], 4);
    let consumers = json_of(&["consumers", &stream, "g"]);
    let names: Vec<&str> = consumers
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["redstream-orphans"], "{consumers}");
    assert_eq!(
        ctx.pending(&stream, "g").await,
        4,
        "no pending entry dropped"
    );
    run(&["consumers", "remove", &stream, "g", "nobody"]).code(3);

    // A group a live process serves: its members are not removed, the
    // group neither moved nor deleted, unless forced.
    let processor = start_group(
        ctx.settings(),
        Group::new(
            &stream,
            "served",
            handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) }),
        ),
    )
    .await;
    let member = eventually_live_member(&ctx, &stream, "served").await;
    run(&["consumers", "remove", &stream, "served", &member]).code(1);
    run(&["seek", &stream, "served", "--to-start", "--yes"]).code(1);
    run(&["groups", "delete", &stream, "served", "--yes"]).code(1);
    processor.shutdown().await.unwrap();

    run(&["groups", "delete", &stream, "g"]).code(2); // no terminal to ask
    run(&["groups", "delete", &stream, "g", "--yes"]).success();
    let out = json_of(&["status", &stream]);
    let groups: Vec<&str> = out[0]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(groups, ["served"]);

    let completions = run(&["completions", "bash"]).success();
    assert!(String::from_utf8_lossy(&completions.get_output().stdout).contains("_redstream"));
}

/// Waits until a live member serves the group; returns its name.
async fn eventually_live_member(ctx: &TestContext, stream: &str, group: &str) -> String {
    let mut found = String::new();
    for _ in 0..100 {
        let out = cli(ctx)
            .args(["--json", "consumers", stream, group])
            .assert()
            .success();
        let consumers = json(&out.get_output().stdout);
        if let Some(name) = consumers
            .as_array()
            .unwrap()
            .iter()
            .find(|c| !c["held_by"].is_null())
            .and_then(|c| c["name"].as_str())
        {
            found = name.to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!found.is_empty(), "no live member of {group}");
    found
}

/// The group's last delivered id.
async fn last_delivered(ctx: &TestContext, stream: &str) -> String {
    let mut c = ctx.conn().await;
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut c)
        .await
        .unwrap();
    redis::from_redis_value::<String>(groups[0]["last-delivered-id"].clone()).unwrap()
}

/// `retries --now` makes a retry scheduled an hour out due at once: the
/// entry is redelivered and acked; an id that is not waiting is reported,
/// and when none is, the command says so with "not found" (exit 3).
#[actix_rt::test]
async fn retries_now_redelivers_a_waiting_entry_at_once() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-retry-now");
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = std::sync::Arc::clone(&attempts);
    // The first attempt asks for a retry in an hour.
    let handler = handler_fn(move |_: serde_json::Value, _: Meta| {
        let seen = std::sync::Arc::clone(&seen);
        async move {
            match seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => Ok(Outcome::retry_after(Duration::from_secs(3600))),
                _ => Ok(Outcome::Ack),
            }
        }
    });
    let processor = start_group(ctx.settings(), Group::new(&stream, "g", handler)).await;
    processor
        .producer()
        .publish_batch(&stream, vec![numbered(1)])
        .await
        .unwrap();
    let retries = || async {
        let out = cli(&ctx)
            .args(["--json", "retries", &stream, "g"])
            .assert()
            .success();
        json(&out.get_output().stdout)
    };
    eventually(Duration::from_secs(10), "one entry waiting", || async {
        retries().await.as_array().unwrap().len() == 1
    })
    .await;
    let waiting = retries().await;
    let id = waiting[0]["id"].as_str().unwrap().to_owned();
    assert!(
        waiting[0]["retry_at_ms"].as_u64().unwrap() > now_ms() + 3_000_000,
        "due in an hour: {waiting}"
    );

    let out = cli(&ctx)
        .args(["--json", "retries", &stream, "g", "--now", &id, "1-1"])
        .assert()
        .success();
    let done = json(&out.get_output().stdout);
    assert_eq!(done["made_due"], 1, "{done}");
    assert_eq!(done["due_now"], serde_json::json!([id]), "{done}");
    assert_eq!(done["not_waiting"], serde_json::json!(["1-1"]), "{done}");
    eventually(Duration::from_secs(10), "redelivered and acked", || async {
        attempts.load(std::sync::atomic::Ordering::SeqCst) == 2
            && ctx.pending(&stream, "g").await == 0
    })
    .await;
    assert_eq!(retries().await, serde_json::json!([]), "nothing waits");

    // Nothing waiting any more: said, exit 3; the table form too.
    let out = cli(&ctx)
        .args(["retries", &stream, "g", "--now", &id])
        .assert()
        .code(3);
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stdout.contains(&format!("not waiting for a retry: {id}")),
        "{stdout}"
    );
    assert!(
        stderr.contains("none of these entries is waiting for a retry"),
        "{stderr}"
    );
    cli(&ctx)
        .args(["retries", &stream, "nope", "--now", &id])
        .assert()
        .code(3);
    cli(&ctx)
        .args(["retries", &stream, "g", "--now", "garbage"])
        .assert()
        .code(2);
    processor.shutdown().await.unwrap();
}

/// `dlq delete` removes exactly the letters named by id, or by reason (of
/// one group), after `--yes`; a dry run removes nothing; without a terminal
/// to ask and without `--yes` it refuses (exit 2). `redrive --reason
/// --group` takes only that group's letters.
#[actix_rt::test]
async fn dlq_delete_removes_exactly_the_named_letters() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("cli-dlq-delete");
    let dlq = redstream::dead_letter_stream(&stream);
    let mut c = ctx.conn().await;
    let _: String = c.xadd(&stream, "*", &[("n", "0")]).await.unwrap();
    let letters = [
        ("rejected: card declined", "billing"),
        ("rejected: card declined", "audit"),
        ("rejected: card declined", "audit"),
        ("bad_json: expected value", "billing"),
        ("max_attempts_exceeded: 4 attempts failed", "billing"),
        ("max_attempts_exceeded: 4 attempts failed", "audit"),
    ];
    let mut ids = Vec::new();
    for (i, (reason, group)) in letters.iter().enumerate() {
        let failed_at = now_ms().to_string();
        let event = format!("E{i}");
        let fields = [
            ("reason", *reason),
            ("origin_id", "1-0"),
            ("group", *group),
            ("attempts", "4"),
            ("failed_at", failed_at.as_str()),
            ("error", "boom"),
            ("id", event.as_str()),
            ("type", "n"),
            ("data", "{\"n\":0}"),
        ];
        let id: String = c.xadd(&dlq, "*", &fields).await.unwrap();
        ids.push(id);
    }
    let left = || async {
        let out = cli(&ctx)
            .args(["--json", "dlq", "list", &stream])
            .assert()
            .success();
        let list = json(&out.get_output().stdout);
        list.as_array()
            .unwrap()
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_owned())
            .collect::<Vec<String>>()
    };
    let run = |args: &[&str]| {
        let mut cmd = cli(&ctx);
        cmd.args(["dlq", "delete", &stream]).args(args);
        cmd.assert()
    };

    // A dry run says what would go, and removes nothing.
    let out = run(&["--json", "--reason", "rejected", "--dry-run"]).success();
    let plan = json(&out.get_output().stdout);
    assert_eq!(
        (plan["dry_run"].as_bool(), plan["would_delete"].as_u64()),
        (Some(true), Some(3)),
        "{plan}"
    );
    run(&[&ids[0], "--dry-run"]).success();
    assert_eq!(left().await, ids, "a dry run deletes nothing");

    // No terminal to ask, no --yes: refused, nothing deleted.
    run(&["--reason", "rejected"]).code(2);
    run(&[&ids[0]]).code(2);
    run(&["--all"]).code(2);
    assert_eq!(left().await, ids, "a refusal deletes nothing");
    run(&[]).code(2); // ids, --reason or --all
    run(&["garbage", "--yes"]).code(2);
    run(&["--group", "audit", "--yes"]).code(2); // --group needs --reason

    // By id: exactly those; an id that is not a letter is reported (exit 3).
    let out = run(&["--json", &ids[3], "--yes"]).success();
    let report = json(&out.get_output().stdout);
    assert_eq!(report["deleted"], 1, "{report}");
    let expected: Vec<String> = [0, 1, 2, 4, 5].iter().map(|&i| ids[i].clone()).collect();
    assert_eq!(left().await, expected);
    let out = run(&["--json", &ids[4], "1-1", "--yes"]).code(3);
    let report = json(&out.get_output().stdout);
    assert_eq!(
        (report["deleted"].as_u64(), report["not_found"].clone()),
        (Some(1), serde_json::json!(["1-1"])),
        "{report}"
    );
    let expected: Vec<String> = [0, 1, 2, 5].iter().map(|&i| ids[i].clone()).collect();
    assert_eq!(left().await, expected);

    // By reason, of one group: only audit's rejections.
    let out = run(&[
        "--json", "--reason", "rejected", "--group", "audit", "--yes",
    ])
    .success();
    assert_eq!(json(&out.get_output().stdout)["deleted"], 2);
    let expected: Vec<String> = [0, 5].iter().map(|&i| ids[i].clone()).collect();
    assert_eq!(left().await, expected);

    // Redrive by reason and group: only that group's letter.
    let out = cli(&ctx)
        .args([
            "--json",
            "dlq",
            "redrive",
            &stream,
            "--reason",
            "max_attempts_exceeded",
            "--group",
            "billing",
            "--dry-run",
        ])
        .assert()
        .success();
    assert_eq!(
        json(&out.get_output().stdout)["would_redrive"],
        0,
        "billing's went by id"
    );
    let out = cli(&ctx)
        .args([
            "--json",
            "dlq",
            "redrive",
            &stream,
            "--reason",
            "max_attempts_exceeded",
            "--group",
            "audit",
            "--yes",
        ])
        .assert()
        .success();
    assert_eq!(json(&out.get_output().stdout)["redriven"], 1);
    assert_eq!(left().await, [ids[0].clone()]);

    // By reason, every group: the rest.
    let out = run(&["--reason", "rejected", "--yes"]).success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(text.contains("deleted 1 dead letters"), "{text}");
    assert_eq!(left().await, Vec::<String>::new());
    assert_eq!(ctx.xlen(&dlq).await, 0);
}

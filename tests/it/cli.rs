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
    let out = cli(&ctx)
        .args(["--json", "dlq", "redrive", &stream, "--all"])
        .assert()
        .success();
    assert_eq!(json(&out.get_output().stdout)["redriven"], 2);
    assert_eq!(ctx.xlen(&dlq).await, 0, "removed once republished");
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

    let out = cli(&ctx)
        .args(["--json", "trim", &stream])
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

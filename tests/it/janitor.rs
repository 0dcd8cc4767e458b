//! Consumer names of instances that are gone are removed; names with
//! pending entries, and names leased by live processes, are kept (P11).

use std::time::Duration;

use redis::AsyncCommands;
use redstream::prelude::*;

use crate::support::{TestContext, eventually, read_group, start_group};

async fn consumers(ctx: &TestContext, stream: &str, group: &str) -> Vec<(String, u64)> {
    let mut c = ctx.conn().await;
    let rows: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            let name: String = redis::from_redis_value_ref(&r["name"]).unwrap();
            let pending: u64 = redis::from_redis_value_ref(&r["pending"]).unwrap();
            (name, pending)
        })
        .collect();
    out.sort();
    out
}

#[actix_rt::test]
async fn consumers_of_gone_instances_are_removed_and_pending_ones_kept() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("names");
    ctx.create_group(&stream, "g").await;
    let mut c = ctx.conn().await;
    for i in 0..15 {
        let _: String = c.xadd(&stream, "*", &[("n", i.to_string())]).await.unwrap();
    }
    // Ten instances that came and went, each acked what it read.
    for i in 0..10 {
        let ids = read_group(&mut ctx.conn().await, &stream, "g", &format!("gone-{i}"), 1).await;
        let _: u64 = c.xack(&stream, "g", &ids).await.unwrap();
    }
    // One that still holds 5 unacked entries.
    assert_eq!(
        read_group(&mut ctx.conn().await, &stream, "g", "holder", 5)
            .await
            .len(),
        5
    );

    let mut settings = ctx.settings();
    settings.reclaim.remove_idle_consumers_ms = 300;
    settings.reclaim.min_idle_ms = 600_000;
    settings.reclaim.heartbeat_ms = 60_000;
    settings.reclaim.interval_ms = 100;
    let handler = handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) });
    let processor = start_group(
        settings.clone(),
        Group::new(&stream, "g", handler).with_members(2),
    )
    .await;
    let live: Vec<String> = (0..2)
        .map(|i| format!("{}-{i}", settings.instance.name))
        .collect();
    eventually(
        Duration::from_secs(10),
        "gone instances removed",
        || async {
            consumers(&ctx, &stream, "g")
                .await
                .iter()
                .all(|(name, _)| !name.starts_with("gone-"))
        },
    )
    .await;
    let left = consumers(&ctx, &stream, "g").await;
    let names: Vec<&str> = left.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"holder"),
        "a consumer with pending entries is kept: {left:?}"
    );
    assert_eq!(
        left.iter().find(|(n, _)| n == "holder").unwrap().1,
        5,
        "its entries too"
    );
    for name in &live {
        assert!(
            names.contains(&name.as_str()),
            "live leased members are kept: {left:?}"
        );
    }
    // Several cleanup rounds later the live members are still there, though
    // on a quiet stream their idle time passes the threshold (an empty read
    // does not reset it before Redis 7.2): their leases protect them.
    let mut max_idle = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = consumers_with_idle(&ctx, &stream, "g").await;
        for name in &live {
            let idle = now
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("live member {name} was removed: {now:?}"))
                .1;
            max_idle = max_idle.max(idle);
        }
    }
    // Since Redis 7.2 (and on Valkey) an empty read resets `idle` (and
    // `inactive` counts from the last entry read): live members reading a
    // quiet stream never pass the threshold, so there the reads keep them.
    let mut c = ctx.conn().await;
    let rows: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&stream)
        .arg("g")
        .query_async(&mut c)
        .await
        .unwrap();
    let empty_reads_reset_idle = rows.iter().any(|r| r.contains_key("inactive"));
    if !empty_reads_reset_idle {
        assert!(
            max_idle > 300,
            "the live members went idle past the threshold (max {max_idle} ms), so the lease is what kept them"
        );
    }
    processor.shutdown().await.unwrap();
}

async fn consumers_with_idle(ctx: &TestContext, stream: &str, group: &str) -> Vec<(String, u64)> {
    let mut c = ctx.conn().await;
    let rows: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(&mut c)
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let name: String = redis::from_redis_value_ref(&r["name"]).unwrap();
            let idle: u64 = redis::from_redis_value_ref(&r["idle"]).unwrap();
            (name, idle)
        })
        .collect()
}

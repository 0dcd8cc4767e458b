//! Newer servers: what is detected (by command, not version), and that the
//! newer commands and their Redis 7.0 fallbacks give the same results.
//! Every test here runs both ways on whichever server `REDIS_URL` names
//! (`RedisBroker::with_newer_commands(false)` forces the fallback); on
//! Redis 7.0 and Valkey both ways are the fallback.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use redstream::broker::{Acks, Diagnostics, GroupRef, Receipt, Streams};
use redstream::prelude::*;
use redstream::{Admin, RedisBroker, ServerFeatures};

/// The receipts of entries of `stream` (a Redis receipt is the entry id).
fn receipts(stream: &str, ids: &[String]) -> Vec<Receipt> {
    ids.iter()
        .map(|id| Receipt::new(stream, id.as_str()))
        .collect()
}

/// An ack call that forgets no attempt counts.
fn acks(receipts: &[Receipt]) -> Acks<'_> {
    Acks {
        receipts,
        forget: &[],
    }
}

use crate::support::{TestContext, eventually, read_group};

async fn broker(ctx: &TestContext, newer: bool) -> RedisBroker {
    RedisBroker::connect(&ctx.settings().redis, "servers-test")
        .await
        .unwrap()
        .with_newer_commands(newer)
}

/// The report names the server and its newer commands, found by asking for
/// the commands: they match `COMMAND INFO` whatever `redis_version` says.
#[actix_rt::test]
async fn newer_commands_are_detected_by_name_not_version() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let mut c = ctx.conn().await;
    let info: Vec<Value> = redis::cmd("COMMAND")
        .arg("INFO")
        .arg("XACKDEL")
        .query_async(&mut c)
        .await
        .unwrap();
    let has_xackdel = !matches!(info.first(), None | Some(Value::Nil));
    let server_info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap();
    let valkey = server_info.contains("valkey_version:");

    let b = broker(&ctx, true).await;
    let report = b.server_report().await.unwrap();
    eprintln!(
        "server: {} (redis_version {}), newer commands: {}",
        report.server,
        report.version,
        report.features.describe()
    );
    assert_eq!(report.features.xackdel, has_xackdel, "{report:?}");
    assert_eq!(
        report.features.trim_acked, has_xackdel,
        "XTRIM ACKED came with XACKDEL (Redis 8.2): {report:?}"
    );
    assert_eq!(report.server.starts_with("Valkey "), valkey, "{report:?}");
    assert!(!report.version.is_empty());

    let off = broker(&ctx, false).await.server_report().await.unwrap();
    assert_eq!(off.features, ServerFeatures::default());
    assert_eq!(off.features.describe(), "none (Redis 7.0 commands)");
}

/// `ack_and_delete` deletes what it acked and no other group needs, keeps
/// what another group has pending or has not read, and does nothing for ids
/// not pending: the same on `XACKDEL … ACKED` and on the script.
#[actix_rt::test]
async fn ack_and_delete_is_the_same_both_ways() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let mut results = Vec::new();
    for newer in [true, false] {
        let b = broker(&ctx, newer).await;
        let stream = ctx.stream(&format!("ackdel-{newer}"));
        let mut c = ctx.conn().await;
        let all = ctx.stream_with_groups(&stream, &["a", "b"], 6).await;
        assert_eq!(read_group(&mut c, &stream, "a", "c1", 6).await, all);
        assert_eq!(read_group(&mut c, &stream, "b", "c1", 3).await, all[..3]); // b: 4th.. unread
        // b acks and deletes 1st, 2nd: a still has them pending, so kept.
        let n = b
            .ack_and_delete(
                &GroupRef::new(stream.as_str(), "b"),
                acks(&receipts(&stream, &all[..2])),
            )
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(ctx.entry_ids(&stream).await, all, "a still needs them");
        // a acks 1st, 2nd, 5th, and an id it never had: 1st and 2nd go (b
        // acked them), the 5th stays (b has not read it).
        let never = format!("{}-0", u64::MAX / 2);
        let acked = [all[0].clone(), all[1].clone(), all[4].clone(), never];
        let n = b
            .ack_and_delete(
                &GroupRef::new(stream.as_str(), "a"),
                acks(&receipts(&stream, &acked)),
            )
            .await
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(ctx.entry_ids(&stream).await, all[2..]);
        // b acks its 3rd; a still has it pending.
        assert_eq!(
            b.ack_and_delete(
                &GroupRef::new(stream.as_str(), "b"),
                acks(&receipts(&stream, &all[2..3]))
            )
            .await
            .unwrap(),
            1
        );
        assert_eq!(ctx.entry_ids(&stream).await, all[2..]);
        assert_eq!(ctx.pending(&stream, "a").await, 3);
        assert_eq!(ctx.pending(&stream, "b").await, 0);
        results.push(ctx.entry_ids(&stream).await.len());
    }
    assert_eq!(results[0], results[1]);
}

async fn run_single_group(ctx: &TestContext, newer: bool, groups: &[&str]) -> (String, Processor) {
    let stream = ctx.stream(&format!("delete-acked-{newer}-{}", groups.len()));
    let mut settings = ctx.settings();
    settings.retention.delete_acked = true;
    let mut builder = Processor::builder(settings).broker(Arc::new(broker(ctx, newer).await));
    for g in groups {
        let handler = handler_fn(|v: serde_json::Value, _meta: Meta| async move {
            if v["n"] == 3 {
                Ok(Outcome::dead_letter("bad: three"))
            } else {
                Ok(Outcome::Ack)
            }
        });
        builder = builder.group(Group::new(&stream, *g, handler));
    }
    let processor = builder.start().await.expect("start");
    (stream, processor)
}

/// With `retention.delete_acked` on a stream one group reads, acked
/// entries leave the stream; a dead-lettered original stays. On a stream
/// two groups read, nothing is deleted and a warning says why. Both ways.
#[actix_rt::test]
async fn delete_acked_deletes_only_on_a_single_group_stream_both_ways() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    for newer in [true, false] {
        for groups in [&["only"][..], &["one", "two"][..]] {
            let (stream, processor) = run_single_group(&ctx, newer, groups).await;
            let producer = processor.producer();
            for n in 0..10 {
                let event = Event::new("t", &serde_json::json!({ "n": n })).unwrap();
                producer.publish(&stream, event).await.expect("publish");
            }
            eventually(Duration::from_secs(10), "all handled", || async {
                let mut done = true;
                for g in groups {
                    done &= ctx.pending(&stream, g).await == 0;
                }
                done && ctx.xlen(&redstream::dead_letter_stream(&stream)).await
                    == groups.len() as u64
            })
            .await;
            let warnings = processor.server().warnings.clone();
            processor.shutdown().await.unwrap();
            let expect_warning = groups.len() > 1;
            assert_eq!(
                warnings
                    .iter()
                    .any(|w| w.contains("retention.delete_acked")),
                expect_warning,
                "newer={newer} groups={groups:?}: {warnings:?}"
            );
            let left = ctx.entries(&stream).await;
            if groups.len() == 1 {
                assert_eq!(
                    left.len(),
                    1,
                    "newer={newer}: only the dead-lettered original stays"
                );
                assert!(
                    left[0].1.iter().any(|(_, v)| v.contains(r#""n":3"#)),
                    "{left:?}"
                );
            } else {
                assert_eq!(
                    left.len(),
                    10,
                    "newer={newer}: two groups read it, nothing deleted"
                );
            }
        }
    }
}

/// The fan-out-safe trim below a plan's `min_id` removes the same entries
/// with `XTRIM … ACKED` as by `MINID` alone.
#[actix_rt::test]
async fn trim_acked_below_is_the_same_both_ways() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let mut outcomes = Vec::new();
    for newer in [true, false] {
        let b = broker(&ctx, newer).await;
        let stream = ctx.stream(&format!("trim-{newer}"));
        let mut c = ctx.conn().await;
        let all = ctx
            .stream_with_groups(&stream, &["fast", "slow", "behind"], 10)
            .await;
        let fast = read_group(&mut c, &stream, "fast", "c1", 10).await;
        b.ack(
            &GroupRef::new(stream.as_str(), "fast"),
            acks(&receipts(&stream, &fast)),
        )
        .await
        .unwrap();
        let slow = read_group(&mut c, &stream, "slow", "c1", 10).await;
        b.ack(
            &GroupRef::new(stream.as_str(), "slow"),
            acks(&receipts(&stream, &slow[..6])),
        )
        .await
        .unwrap(); // 7th.. pending
        let behind = read_group(&mut c, &stream, "behind", "c1", 3).await;
        b.ack(
            &GroupRef::new(stream.as_str(), "behind"),
            acks(&receipts(&stream, &behind)),
        )
        .await
        .unwrap(); // 4th.. unread

        let plan = b.trim_plan(&stream).await.unwrap();
        let min = plan.min_id.clone().expect("a plan");
        assert_eq!(plan.removable, 3);
        assert_eq!(b.trim_acked_below(&stream, &min).await.unwrap(), 3);
        assert_eq!(ctx.entry_ids(&stream).await, all[3..]);

        let more = read_group(&mut c, &stream, "behind", "c1", 5).await; // through the 8th
        b.ack(
            &GroupRef::new(stream.as_str(), "behind"),
            acks(&receipts(&stream, &more)),
        )
        .await
        .unwrap();
        let plan = b.trim_plan(&stream).await.unwrap();
        let min = plan.min_id.clone().expect("a plan");
        assert_eq!(min, all[6], "the slow group's oldest pending");
        assert_eq!(plan.removable, 3);
        assert_eq!(b.trim_acked_below(&stream, &min).await.unwrap(), 3);
        assert_eq!(ctx.entry_ids(&stream).await, all[6..]);
        assert_eq!(ctx.pending(&stream, "slow").await, 4);
        assert_eq!(b.trim_acked_below(&stream, &min).await.unwrap(), 0);
        outcomes.push(ctx.xlen(&stream).await);
    }
    assert_eq!(outcomes, [4, 4]);
}

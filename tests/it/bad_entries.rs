//! Entries that try to break out of the wire format, written with raw XADDs
//! between well-formed events: 10,000 fields, reserved fields with bad
//! values (`v=-1`, `ts=abc`, a 10 kB `id`), a `traceparent` that is not a
//! trace context. Each is dead-lettered with its reason or handled; no
//! member stops, and the good events after them are handled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redstream::prelude::*;
use serde::Deserialize;

use crate::support::{TestContext, eventually, start_group};

#[derive(Debug, Deserialize)]
struct Deposit {
    seq: u64,
}

/// (deposit seq, traceparent seen by the handler).
type Seen = Arc<Mutex<Vec<(u64, Option<String>)>>>;
/// (what, fields, expected dead-letter reason).
type Bad = (&'static str, Vec<(Vec<u8>, Vec<u8>)>, &'static str);

fn f(name: &str, value: impl AsRef<[u8]>) -> (Vec<u8>, Vec<u8>) {
    (name.as_bytes().to_vec(), value.as_ref().to_vec())
}

async fn xadd(ctx: &TestContext, stream: &str, fields: &[(Vec<u8>, Vec<u8>)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(k.as_slice()).arg(v.as_slice());
    }
    cmd.query_async(&mut ctx.conn().await).await.expect("XADD")
}

#[actix_rt::test]
async fn entries_that_try_to_break_out_are_dead_lettered_and_stop_no_member() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("deposits");
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let handler = handler_fn(move |d: Deposit, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            sink.lock()
                .unwrap()
                .push((d.seq, meta.traceparent().map(str::to_owned)));
            Ok(Outcome::Ack)
        }
    });
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "g", handler).with_members(2),
    )
    .await;
    let deposit = |seq: u64| format!(r#"{{"seq":{seq}}}"#);
    let good = |seq: u64| vec![f("id", format!("good-{seq}")), f("data", deposit(seq))];
    for seq in 0..5 {
        xadd(&ctx, &stream, &good(seq)).await;
    }

    let mut many: Vec<(Vec<u8>, Vec<u8>)> = (0..10_000).map(|i| f(&format!("f{i}"), "x")).collect();
    many.push(f("data", deposit(1_000)));
    let bad: Vec<Bad> = vec![
        (
            "10,000 fields",
            many,
            "too_many_fields: 10001 fields, at most 1024",
        ),
        (
            "v=-1",
            vec![f("id", "neg-v"), f("v", "-1"), f("data", deposit(1_001))],
            "malformed_field: `v` is not a non-negative integer",
        ),
        (
            "ts=abc",
            vec![f("id", "bad-ts"), f("ts", "abc"), f("data", deposit(1_002))],
            "malformed_field: `ts` is not a non-negative integer",
        ),
        (
            "a 10 kB id",
            vec![f("id", "i".repeat(10_240)), f("data", deposit(1_003))],
            "oversized_field: `id` is 10240 bytes, at most 512",
        ),
    ];
    let mut origin = std::collections::HashMap::new();
    for (what, fields, reason) in &bad {
        let id = xadd(&ctx, &stream, fields).await;
        origin.insert(id, (*what, *reason));
    }
    // Not a trace context, and not even UTF-8: handled, the value ignored.
    xadd(
        &ctx,
        &stream,
        &[
            f("id", "bad-trace"),
            f("traceparent", "'; DROP TABLE spans; --"),
            f("data", deposit(2_000)),
        ],
    )
    .await;
    xadd(
        &ctx,
        &stream,
        &[
            f("id", "bytes-trace"),
            (b"traceparent".to_vec(), vec![0xff, 0xfe, 0x00]),
            f("data", deposit(2_001)),
        ],
    )
    .await;
    let valid_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    xadd(
        &ctx,
        &stream,
        &[
            f("id", "good-trace"),
            f("traceparent", valid_trace),
            f("data", deposit(2_002)),
        ],
    )
    .await;
    for seq in 5..10 {
        xadd(&ctx, &stream, &good(seq)).await;
    }

    let dlq = redstream::dead_letter_stream(&stream);
    eventually(
        Duration::from_secs(20),
        "13 good events handled, 4 dead letters, nothing pending",
        || async {
            seen.lock().unwrap().len() >= 13
                && ctx.xlen(&dlq).await == 4
                && ctx.pending(&stream, "g").await == 0
        },
    )
    .await;
    let mut handled = seen.lock().unwrap().clone();
    handled.sort();
    let seqs: Vec<u64> = handled.iter().map(|(s, _)| *s).collect();
    let mut expected: Vec<u64> = (0..10).collect();
    expected.extend([2_000, 2_001, 2_002]);
    assert_eq!(
        seqs, expected,
        "every good event once, after the bad ones too"
    );
    let traces: Vec<Option<&str>> = handled[10..].iter().map(|(_, t)| t.as_deref()).collect();
    assert_eq!(traces, [None, None, Some(valid_trace)]);

    let mut conn = ctx.conn().await;
    let letters: redis::Value = redis::cmd("XRANGE")
        .arg(&dlq)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let letters: Vec<redstream::dead_letters::DeadLetterEntry> = match letters {
        redis::Value::Array(items) => items
            .into_iter()
            .filter_map(|item| {
                let redis::Value::Array(mut pair) = item else {
                    return None;
                };
                let fields = pair.pop()?;
                let id = match pair.pop()? {
                    redis::Value::BulkString(b) => String::from_utf8(b).ok()?,
                    _ => return None,
                };
                let redis::Value::Array(flat) = fields else {
                    return None;
                };
                let bytes = |v: &redis::Value| match v {
                    redis::Value::BulkString(b) => b.clone(),
                    _ => Vec::new(),
                };
                let fields = flat
                    .chunks(2)
                    .map(|kv| (bytes(&kv[0]), bytes(&kv[1])))
                    .collect();
                redstream::dead_letters::DeadLetterEntry::parse(redstream::RawEntry {
                    id,
                    fields: Some(fields),
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    assert_eq!(letters.len(), 4);
    for letter in &letters {
        let (what, reason) = origin[&letter.origin_id];
        assert_eq!(letter.reason, reason, "{what}");
        if what == "10,000 fields" {
            assert_eq!(letter.original.len(), redstream::MAX_FIELDS);
            assert_eq!(letter.omitted_fields, 10_001 - 1_024);
            let refused = letter.original_entry().expect_err("not redriven cut short");
            assert!(refused.contains("left out"), "{refused}");
        } else {
            assert_eq!(letter.omitted_fields, 0);
            assert!(letter.original_entry().is_ok(), "{what}: redrivable");
        }
    }
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert_eq!(status.restarts(), 0, "no member stopped: {status:?}");
    processor.shutdown().await.unwrap();
}

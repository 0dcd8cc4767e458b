//! F17: poison, malformed, oversized and foreign entries, written with raw
//! XADDs into well-formed traffic. Pass: each bad entry is dead-lettered
//! with its specific reason code (and acked), the well-formed events around
//! it are effected once, the producer refuses an oversized publish naming
//! the limit, and the worker's memory stays bounded.

use std::time::Duration;

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL};

/// One raw entry and the dead-letter reason code it must get.
struct Bad {
    what: &'static str,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    reason: &'static str,
}

fn f(name: &str, value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (name.as_bytes().to_vec(), value.to_vec())
}

fn bad_entries() -> Vec<Bad> {
    let deposit = br#"{"seq":999999,"amount":1}"#;
    vec![
        Bad {
            what: "data that is not JSON",
            fields: vec![
                f("id", b"bad-json"),
                f("type", b"deposit"),
                f("data", b"{not json"),
            ],
            reason: "bad_json",
        },
        Bad {
            what: "a field name that is not UTF-8",
            fields: vec![
                f("id", b"bad-name"),
                (vec![0xff, 0xfe], b"x".to_vec()),
                f("data", deposit),
            ],
            reason: "malformed_field_name",
        },
        Bad {
            what: "a duplicate field",
            fields: vec![
                f("id", b"dup-field"),
                f("data", deposit),
                f("data", deposit),
            ],
            reason: "duplicate_field",
        },
        Bad {
            what: "an unknown schema version",
            fields: vec![f("id", b"bad-version"), f("v", b"99"), f("data", deposit)],
            reason: "unknown_schema_version",
        },
        Bad {
            what: "a version that is not a number",
            fields: vec![f("id", b"bad-v"), f("v", b"two"), f("data", deposit)],
            reason: "malformed_field",
        },
        Bad {
            what: "5 MB of data that is not JSON",
            fields: vec![f("id", b"huge"), f("data", &vec![b'x'; 5 << 20])],
            reason: "bad_json",
        },
        Bad {
            what: "a foreign entry with only its own fields",
            fields: vec![f("sensor", b"t-1"), f("celsius", b"21.5")],
            reason: "bad_json",
        },
    ]
}

async fn run(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F17 bad input", backend, "aof-always", &[]).await else {
        return;
    };
    let n = c.tier.pick(2_000, 20_000);
    c.spawn_worker("f17", 2, true).await;
    c.start_sampler();
    let producing = c.start_producing(n, Duration::from_secs(4)).await;
    let bad = bad_entries();
    let mut conn = c.redis_conn().await.expect("redis");
    for b in &bad {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&c.stream).arg("*");
        for (k, v) in &b.fields {
            cmd.arg(k.as_slice()).arg(v.as_slice());
        }
        let _: String = cmd.query_async(&mut conn).await.expect(b.what);
        c.fault();
    }
    // The producer refuses an oversized event, naming the setting.
    let producer = c.producer().await;
    let huge = redstream::Event::new("deposit", &serde_json::json!({"pad": "x".repeat(2 << 20)}))
        .expect("event");
    let refused = producer.publish(&c.stream, huge).await;
    let message = refused.expect_err("a 2 MB event is refused").to_string();
    assert!(message.contains("producer.max_payload_bytes"), "{message}");

    let history = producing.await.expect("producer");
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    let (v, _) = c
        .finish(&history, drain, &format!("{} raw bad entries", bad.len()))
        .await;
    c.assert_core(&v, drain);
    // Each bad entry is dead-lettered once, with its reason code.
    let letters = crate::checker::dead_letters(&c.redis.url(), &c.stream).await;
    let mut reasons: Vec<String> = letters
        .values()
        .map(|(reason, _)| reason.split(':').next().unwrap_or("").to_owned())
        .collect();
    reasons.sort();
    let mut expected: Vec<String> = bad.iter().map(|b| b.reason.to_owned()).collect();
    expected.sort();
    assert_eq!(reasons, expected, "dead-letter reasons: {letters:?}");
    assert_eq!(v.foreign_effects, 0, "no bad entry had an effect");
    let rss = c.peak_rss_mb();
    assert!(rss < 256.0, "worker peak RSS {rss:.0} MB");
    c.shutdown().await;
}

scenario_tests! {
    f17_bad_input_sqlite => run(Backend::Sqlite);
    f17_bad_input_pg => run(Backend::Postgres);
}

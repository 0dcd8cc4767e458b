//! Supervision: consumers that panic or lose their connection are
//! restarted under the same name; their siblings keep running; nothing is
//! lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redstream::prelude::*;

use crate::support::{
    TestContext, eventually, eventually_all_alive, numbered, publish_one, start_group,
};

/// Counts deliveries per event number, by attempt.
type Tally = Arc<Mutex<HashMap<u64, Vec<(u32, String)>>>>;

#[actix_rt::test]
async fn a_handler_panic_restarts_its_consumer_and_the_entry_is_handled_later() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("panics");
    let tally: Tally = Arc::default();
    let sink = Arc::clone(&tally);
    let handler = handler_fn(move |v: serde_json::Value, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            let n = v["n"].as_u64().unwrap();
            sink.lock()
                .unwrap()
                .entry(n)
                .or_default()
                .push((meta.attempt(), meta.member().to_owned()));
            if n == 7 && meta.attempt() == 1 {
                panic!("poisoned by event 7");
            }
            Ok(Outcome::Ack)
        }
    });
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "g", handler).with_members(2),
    )
    .await;
    for i in 0..40 {
        publish_one(&processor, &stream, numbered(i)).await;
    }
    eventually(
        Duration::from_secs(15),
        "all 40 handled, 7 twice",
        || async {
            let t = tally.lock().unwrap();
            t.len() == 40 && t.get(&7).is_some_and(|d| d.iter().any(|(a, _)| *a == 2))
        },
    )
    .await;
    ctx.eventually_nothing_pending(&stream, "g", Duration::from_secs(5))
        .await;
    // The member that ran the panicking handler is restarted (once its
    // other handlers finished); its sibling is not.
    let seven = tally.lock().unwrap()[&7].clone();
    let crashed = &seven[0].1;
    eventually(
        Duration::from_secs(5),
        "the crashed member restarted",
        || async {
            let status = processor.group_status(&stream, "g").await.unwrap();
            status
                .members
                .iter()
                .any(|m| &m.name == crashed && m.restarts > 0)
        },
    )
    .await;
    let status = processor.group_status(&stream, "g").await.unwrap();
    let by_name: HashMap<&str, u64> = status
        .members
        .iter()
        .map(|m| (m.name.as_str(), m.restarts))
        .collect();
    assert_eq!(by_name[crashed.as_str()], 1, "{status:?}");
    assert_eq!(
        by_name.values().sum::<u64>(),
        1,
        "siblings unaffected: {status:?}"
    );
    let crashed_status = status.members.iter().find(|m| &m.name == crashed).unwrap();
    assert!(
        crashed_status
            .last_error
            .as_deref()
            .unwrap()
            .contains("poisoned by event 7")
    );
    eventually_all_alive(&processor, &stream, "g", "restarted consumer alive").await;
    // Every event other than 7 ran exactly once: nothing was re-run because
    // of the crash of a batch-mate.
    for (n, deliveries) in tally.lock().unwrap().iter() {
        if *n != 7 {
            assert_eq!(deliveries.len(), 1, "event {n}: {deliveries:?}");
        }
    }
    assert_eq!(status.retried, 1);
    processor.shutdown().await.unwrap();
}

/// `CLIENT KILL` of every client: the consumers rebuild their connections,
/// re-read what they had pending, and nothing is lost.
#[actix_rt::test]
async fn killed_connections_are_rebuilt_and_nothing_is_lost() {
    let Some((server, ctx)) = TestContext::on_own_server() else {
        return;
    };
    let stream = ctx.stream("killed");
    let tally: Tally = Arc::default();
    let sink = Arc::clone(&tally);
    let handler = handler_fn(move |v: serde_json::Value, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            let n = v["n"].as_u64().unwrap();
            sink.lock()
                .unwrap()
                .entry(n)
                .or_default()
                .push((meta.attempt(), meta.member().to_owned()));
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(Outcome::Ack)
        }
    });
    let processor = start_group(
        ctx.settings(),
        Group::new(&stream, "g", handler).with_members(3),
    )
    .await;
    let producer = processor.producer();
    let mut published = 0u64;
    for round in 0..5 {
        for _ in 0..100 {
            producer
                .publish(&stream, numbered(published))
                .await
                .unwrap();
            published += 1;
        }
        // The member connections are named after the member.
        let clients = format!("{:?}", server.cmd(&["CLIENT", "LIST"]));
        assert!(
            clients.contains(":read"),
            "reader connections are named: {clients}"
        );
        server.cmd(&["CLIENT", "KILL", "TYPE", "normal"]);
        tokio::time::sleep(Duration::from_millis(50 * round)).await;
    }
    eventually(
        Duration::from_secs(20),
        "every published event handled",
        || async { tally.lock().unwrap().len() as u64 == published },
    )
    .await;
    ctx.eventually_nothing_pending(&stream, "g", Duration::from_secs(10))
        .await;
    let status = processor.group_status(&stream, "g").await.unwrap();
    assert!(
        status.restarts() >= 1,
        "the kills restarted consumers: {status:?}"
    );
    eventually_all_alive(&processor, &stream, "g", "all consumers alive again").await;
    processor.shutdown().await.unwrap();
}

/// Handler panics are caught only if panics unwind: no profile may abort.
#[test]
fn no_cargo_profile_aborts_on_panic() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("Cargo.toml");
    let normalized: String = manifest.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(
        !normalized.contains("panic=\"abort\""),
        "a Cargo profile sets panic = \"abort\": handler panics would kill the process"
    );
}

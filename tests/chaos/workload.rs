//! The producer side: publishes `{seq, amount}` events with ULID ids
//! through redstream's producer and records each outcome as ok, err (a
//! definite failure before sending) or unknown (may have been written).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redstream::{Error, Event, Producer};

/// What a publish returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Err,
    Unknown,
}

/// One publish.
#[derive(Clone, Debug)]
pub struct Record {
    pub seq: i64,
    pub id: String,
    pub amount: i64,
    pub outcome: Outcome,
    /// When the publish call returned.
    pub returned: Instant,
}

/// Every publish of a run.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub records: Vec<Record>,
    /// Longest a publish batch took.
    pub max_latency: Duration,
}

impl History {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.records.iter().filter(|r| r.outcome == outcome).count()
    }
}

fn classify(e: &Error) -> Outcome {
    match e {
        Error::PayloadTooLarge { .. }
        | Error::InvalidEvent { .. }
        | Error::Encode(_)
        | Error::BufferFull { .. } => Outcome::Err,
        // A failed write may have reached Redis before its reply was lost.
        _ => Outcome::Unknown,
    }
}

/// Publishes `n` events starting at `first_seq`, spread evenly over
/// `duration`, in chunks of `chunk`. Amounts come from `seed`.
pub async fn produce(
    producer: Producer,
    stream: String,
    first_seq: i64,
    n: usize,
    duration: Duration,
    seed: u64,
) -> History {
    let chunk = 25usize;
    let chunks = n.div_ceil(chunk).max(1);
    let pace = duration / chunks as u32;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0fa1);
    let mut history = History::default();
    let start = Instant::now();
    for c in 0..chunks {
        let due = start + pace * c as u32;
        tokio::time::sleep_until(due.into()).await;
        let mut batch = Vec::new();
        let mut events = Vec::new();
        for i in (c * chunk)..((c + 1) * chunk).min(n) {
            let seq = first_seq + i as i64;
            let id = ulid::Ulid::new().to_string();
            let amount: i64 = rng.random_range(1..=1_000);
            let event = Event::new(
                "deposit",
                &serde_json::json!({"seq": seq, "amount": amount}),
            )
            .expect("encode")
            .with_id(id.clone());
            batch.push((seq, id, amount));
            events.push(event);
        }
        let sent = Instant::now();
        let results = tokio::time::timeout(
            Duration::from_secs(30),
            producer.publish_batch(&stream, events),
        )
        .await;
        history.max_latency = history.max_latency.max(sent.elapsed());
        let returned = Instant::now();
        for (k, (seq, id, amount)) in batch.into_iter().enumerate() {
            let outcome = match &results {
                Ok(Ok(per_event)) => match &per_event[k] {
                    Ok(_) => Outcome::Ok,
                    Err(e) => classify(e),
                },
                Ok(Err(e)) => classify(e),
                Err(_timeout) => Outcome::Unknown,
            };
            history.records.push(Record {
                seq,
                id,
                amount,
                outcome,
                returned,
            });
        }
    }
    history
}

//! Quick start: publish events, process them in a consumer group with
//! retries and dead letters, print what happened, exit.
//!
//! Shows the handler API (a typed handler returning `Outcome`s), the
//! producer, the group status and a graceful shutdown.
//!
//! Run (Redis on 127.0.0.1:6379, or set REDSTREAM__REDIS__URL):
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redstream::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    payment_id: String,
    amount_cents: i64,
}

/// Accepts payments; asks for a retry the first time it sees every fifth
/// one (a flaky downstream); rejects negative amounts for good.
#[derive(Default)]
struct Payments {
    accepted: AtomicU64,
}

impl Handler for Payments {
    type Event = Payment;

    async fn handle(&self, payment: Payment, meta: Meta) -> HandlerResult {
        if payment.amount_cents < 0 {
            return Ok(Outcome::dead_letter("negative amount"));
        }
        let n: u64 = payment.payment_id.trim_start_matches("p-").parse()?;
        if n.is_multiple_of(5) && meta.attempt() == 1 {
            return Ok(Outcome::retry_after(Duration::from_millis(200)));
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome::Ack)
    }
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,redstream=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut settings = Settings::load()?;
    settings.retry.initial_delay_ms = 100;
    let stream = "examples:quickstart:payments";
    let payments = Arc::new(Payments::default());

    let redis = settings.redis.url.clone(); // shown without its password
    let processor = Processor::builder(settings)
        // One group reads this stream, so trimming by length is safe.
        .stream_max_len(stream, 1_000)
        .group(Group::new(stream, "ledger", Arc::clone(&payments)).with_members(2))
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;

    let events: Vec<Event> = (0..100)
        .map(|i| {
            let amount_cents = if i % 25 == 24 { -1 } else { 100 * i };
            Event::new(
                "payment.received",
                &Payment {
                    payment_id: format!("p-{i}"),
                    amount_cents,
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let results = processor.producer().publish_batch(stream, events).await?;
    println!(
        "published {} events to `{stream}`",
        results.iter().filter(|r| r.is_ok()).count()
    );

    // Wait until everything is acked or dead-lettered.
    let status = loop {
        let status = processor.group_status(stream, "ledger").await?;
        if status.acked + status.dead_lettered >= 100 {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "accepted {}, retried {}, dead-lettered {} (see `{}`), consumer restarts {}",
        payments.accepted.load(Ordering::Relaxed),
        status.retried,
        status.dead_lettered,
        redstream::dead_letter_stream(stream),
        status.restarts(),
    );
    let report = processor.shutdown().await?;
    println!("stopped in {:?}", report.took);
    Ok(())
}

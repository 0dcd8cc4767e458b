//! The broker boundary: a backend implements what it has. A broker that
//! redelivers by itself needs no `Redelivery`; one whose capabilities need
//! it and lacks it is refused at start-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redstream::broker::{
    Acks, Capabilities, DeadLetter, Diagnostics, GroupReader, GroupRef, Leases, MemberRef,
    PendingSummary, PublishItem, Receipt, Redelivery, RetrySchedule, ServerReport, Streams,
};
use redstream::prelude::*;
use redstream::{Broker, RedisBroker, StartFrom};

use crate::support::{TestContext, eventually};

/// Redis behind the three core traits only, with the capabilities a test
/// chooses, and no `Redelivery`.
struct Bare {
    inner: RedisBroker,
    capabilities: Capabilities,
}

#[async_trait]
impl Streams for Bare {
    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }
    async fn ensure_group(&self, group: &GroupRef, start: StartFrom) -> redstream::Result<bool> {
        self.inner.ensure_group(group, start).await
    }
    async fn publish(
        &self,
        items: &[PublishItem],
    ) -> redstream::Result<Vec<redstream::Result<String>>> {
        self.inner.publish(items).await
    }
    async fn open_reader(
        &self,
        member: &MemberRef,
        block: Duration,
    ) -> redstream::Result<Box<dyn GroupReader>> {
        self.inner.open_reader(member, block).await
    }
    async fn ack(&self, group: &GroupRef, acks: Acks<'_>) -> redstream::Result<u64> {
        self.inner.ack(group, acks).await
    }
    async fn schedule_retries(
        &self,
        group: &GroupRef,
        retries: &[RetrySchedule],
    ) -> redstream::Result<()> {
        self.inner.schedule_retries(group, retries).await
    }
    async fn dead_letter(
        &self,
        group: &GroupRef,
        letters: &[(Receipt, DeadLetter)],
    ) -> redstream::Result<Vec<(Receipt, String)>> {
        self.inner.dead_letter(group, letters).await
    }
    async fn release(
        &self,
        member: &MemberRef,
        receipts: &[Receipt],
        idle: Duration,
    ) -> redstream::Result<()> {
        self.inner.release(member, receipts, idle).await
    }
}

#[async_trait]
impl Leases for Bare {
    async fn acquire_leases(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> redstream::Result<Vec<bool>> {
        self.inner.acquire_leases(keys, token, ttl).await
    }
    async fn release_leases(&self, keys: &[String], token: &str) -> redstream::Result<()> {
        self.inner.release_leases(keys, token).await
    }
    fn lease_key(&self, member: &MemberRef) -> String {
        self.inner.lease_key(member)
    }
}

#[async_trait]
impl Diagnostics for Bare {
    async fn pending_summary(&self, group: &GroupRef) -> redstream::Result<PendingSummary> {
        self.inner.pending_summary(group).await
    }
    async fn group_count(&self, stream: &str) -> redstream::Result<u64> {
        self.inner.group_count(stream).await
    }
    async fn remove_idle_consumers(
        &self,
        group: &GroupRef,
        idle: Duration,
    ) -> redstream::Result<Vec<String>> {
        self.inner.remove_idle_consumers(group, idle).await
    }
    async fn server_report(&self) -> redstream::Result<ServerReport> {
        self.inner.server_report().await
    }
    async fn ping(&self) -> redstream::Result<()> {
        self.inner.ping().await
    }
    async fn server_time_ms(&self) -> redstream::Result<u64> {
        self.inner.server_time_ms().await
    }
}

impl Broker for Bare {
    fn redelivery(self: Arc<Self>) -> Option<Arc<dyn Redelivery>> {
        None
    }
}

async fn bare(ctx: &TestContext, capabilities: Capabilities) -> Arc<Bare> {
    let inner = RedisBroker::connect(&ctx.settings().redis, "boundary-test")
        .await
        .expect("connect");
    Arc::new(Bare {
        inner,
        capabilities,
    })
}

#[actix_rt::test]
async fn a_broker_that_needs_redelivery_and_lacks_it_is_refused_at_start() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("boundary-refused");
    let broker = bare(&ctx, Capabilities::REDIS).await;
    let handler = handler_fn(|_: serde_json::Value, _meta: Meta| async { Ok(Outcome::Ack) });
    let started = Processor::builder(ctx.settings())
        .broker(broker)
        .group(Group::new(&stream, "g", handler))
        .start()
        .await;
    let Err(error) = started else {
        panic!("a processor started on a broker that cannot redeliver");
    };
    let message = error.to_string();
    assert!(
        message.contains("`broker`") && message.contains("redelivers_itself = false"),
        "the error names the setting and the capability: {message}"
    );
}

#[actix_rt::test]
async fn a_self_redelivering_broker_acks_and_dead_letters_without_redelivery() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("boundary-bare");
    let broker = bare(&ctx, Capabilities::SELF_REDELIVERING).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&handled);
    let handler = handler_fn(move |event: serde_json::Value, _meta: Meta| {
        seen.fetch_add(1, Ordering::SeqCst);
        let odd = event["i"].as_u64().unwrap_or(0) % 2 == 1;
        async move {
            Ok(if odd {
                Outcome::dead_letter("odd")
            } else {
                Outcome::Ack
            })
        }
    });
    let processor = Processor::builder(ctx.settings())
        .broker(broker)
        .group(Group::new(&stream, "g", handler).with_start_from(StartFrom::Beginning))
        .start()
        .await
        .expect("a broker that redelivers by itself needs no Redelivery");
    let producer = processor.producer();
    for i in 0..20 {
        let event = Event::new("n", &serde_json::json!({ "i": i })).unwrap();
        producer.publish(&stream, event).await.expect("publish");
    }
    eventually(
        Duration::from_secs(10),
        "20 handled, none pending, 10 dead-lettered",
        || async {
            handled.load(Ordering::SeqCst) >= 20
                && ctx.pending(&stream, "g").await == 0
                && ctx.xlen(&format!("{stream}:dlq")).await == 10
        },
    )
    .await;
    assert_eq!(handled.load(Ordering::SeqCst), 20, "each event once");
    processor.shutdown().await.expect("shutdown");
}

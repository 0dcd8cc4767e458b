//! The happy path: publish, read, handle, ack.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redstream::prelude::*;
use serde::{Deserialize, Serialize};

use crate::support::{TestContext, eventually};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct OrderCreated {
    order_id: String,
    total_cents: i64,
}

#[actix_rt::test]
async fn round_trip_delivers_every_event_once_and_acks_it() {
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("orders");
    let seen: Arc<Mutex<Vec<(OrderCreated, String, Option<String>, u32)>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let handler = handler_fn(move |order: OrderCreated, meta: Meta| {
        let sink = Arc::clone(&sink);
        async move {
            sink.lock().unwrap().push((
                order,
                meta.event_id().unwrap_or_default().to_owned(),
                meta.event_type().map(str::to_owned),
                meta.attempt(),
            ));
            Ok(Outcome::Ack)
        }
    });
    let processor = Processor::builder(ctx.settings())
        .group(Group::new(&stream, "billing", handler).with_members(2))
        .start()
        .await
        .expect("start");
    let producer = processor.producer();
    let mut receipts = Vec::new();
    for i in 0..50 {
        let order = OrderCreated {
            order_id: format!("o-{i}"),
            total_cents: i * 100,
        };
        let event = Event::new("order.created", &order).unwrap();
        receipts.push(producer.publish(&stream, event).await.expect("publish"));
    }
    eventually(Duration::from_secs(10), "all 50 handled", || async {
        seen.lock().unwrap().len() >= 50
    })
    .await;
    eventually(Duration::from_secs(5), "all acked", || async {
        ctx.pending(&stream, "billing").await == 0
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 50, "each event exactly once");
    for (i, receipt) in receipts.iter().enumerate() {
        let (order, event_id, event_type, attempt) = seen
            .iter()
            .find(|(o, ..)| o.order_id == format!("o-{i}"))
            .expect("delivered");
        assert_eq!(order.total_cents, i as i64 * 100);
        assert_eq!(event_id, &receipt.event_id);
        assert_eq!(event_type.as_deref(), Some("order.created"));
        assert_eq!(*attempt, 1);
    }
    let report = processor.shutdown().await.expect("shutdown");
    assert!(report.settled);
}

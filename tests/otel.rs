//! OpenTelemetry (feature `opentelemetry`) against a real Redis and a real
//! SQLite outbox: spans kept by an in-memory exporter, through a global
//! subscriber with the `tracing-opentelemetry` layer. Global, because the
//! consumers run on actix arbiters (other threads), where a per-thread
//! default subscriber would not see them; hence a binary of its own.
//! Tests tell their spans apart by their unique stream names.

#![cfg(feature = "opentelemetry")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

#[path = "it/support/mod.rs"]
#[allow(unused_macros, unused_imports)]
mod support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceContextExt, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use redstream::{
    Event, Group, Handler, HandlerResult, Meta, Outcome, Processor, Store, enqueue, handler_fn,
};
use sea_orm::TransactionTrait;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use support::db::TestDb;
use support::{TestContext, eventually};

/// The exporter and provider behind the global subscriber, set up once.
fn telemetry() -> &'static (InMemorySpanExporter, SdkTracerProvider) {
    static TELEMETRY: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("redstream-test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        (exporter, provider)
    })
}

/// Every finished span so far.
fn finished() -> Vec<SpanData> {
    let (exporter, provider) = telemetry();
    let _ = provider.force_flush();
    exporter.get_finished_spans().expect("spans")
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k.as_str() == key)
        .map(|kv| &kv.value)
}

fn attr_str(span: &SpanData, key: &str) -> String {
    match attr(span, key) {
        Some(v) => v.as_str().into_owned(),
        None => panic!("span `{}` has no `{key}`: {:?}", span.name, span.attributes),
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found = named(spans, name);
    assert_eq!(
        found.len(),
        1,
        "one `{name}` span, got {:?}",
        spans.iter().map(|s| s.name.as_ref()).collect::<Vec<_>>()
    );
    found[0]
}

fn links_to(span: &SpanData, target: &SpanData) -> bool {
    span.links
        .links
        .iter()
        .any(|l| l.span_context.span_id() == target.span_context.span_id())
}

/// The `traceparent` a span's context is written as.
fn traceparent_of(span: &SpanData) -> String {
    let cx = &span.span_context;
    format!("00-{}-{}-01", cx.trace_id(), cx.span_id())
}

/// The first handler: confirms each order by enqueueing an event into the
/// outbox, in its own transaction.
struct Confirm {
    store: Store,
    next: String,
}

impl Handler for Confirm {
    type Event = serde_json::Value;

    async fn handle(&self, order: serde_json::Value, _meta: Meta) -> HandlerResult {
        let tx = self.store.connection().begin().await?;
        enqueue(&tx, &self.next, Event::new("order.confirmed", &order)?).await?;
        tx.commit().await?;
        Ok(Outcome::Ack)
    }
}

/// Publish → handler → outbox → relay → next handler is one trace: each
/// span a child of the one before (the relay's `send` too), each `process`
/// span linked to the creation context its entry carries, with the
/// messaging attributes.
#[actix_rt::test]
async fn one_trace_from_publish_through_the_outbox_to_the_next_handler() {
    telemetry();
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let orders = ctx.stream("orders");
    let confirmed = ctx.stream("confirmed");
    let db = TestDb::sqlite();
    let store = db.store().await;
    let seen = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
    let seen_by_handler = Arc::clone(&seen);
    let settings = ctx.settings();
    let instance = settings.instance.name.clone();
    let processor = Processor::builder(settings)
        .outbox(&store)
        .group(Group::new(
            &orders,
            "billing",
            Confirm {
                store: store.clone(),
                next: confirmed.clone(),
            },
        ))
        .group(Group::new(
            &confirmed,
            "shipping",
            handler_fn(move |_: serde_json::Value, meta: Meta| {
                let seen = Arc::clone(&seen_by_handler);
                async move {
                    seen.lock()
                        .unwrap()
                        .push(meta.traceparent().map(str::to_owned));
                    Ok(Outcome::Ack)
                }
            }),
        ))
        .start()
        .await
        .unwrap();

    // The application's request, under which the order is published.
    let request = tracing::info_span!("checkout");
    let request_trace = request.context().span().span_context().trace_id();
    let published = {
        let producer = processor.producer();
        let order = Event::new("order.created", &serde_json::json!({"order_id": "o-1"})).unwrap();
        tracing::Instrument::instrument(producer.publish(&orders, order), request.clone())
            .await
            .unwrap()
    };
    drop(request);

    eventually(
        Duration::from_secs(15),
        "the confirmation handled",
        || async { !seen.lock().unwrap().is_empty() },
    )
    .await;
    ctx.eventually_nothing_pending(&confirmed, "shipping", Duration::from_secs(5))
        .await;
    ctx.eventually_nothing_pending(&orders, "billing", Duration::from_secs(5))
        .await;
    processor.shutdown().await.unwrap();

    let spans = finished();
    let checkout = one(&spans, "checkout");
    let send = one(&spans, &format!("send {orders}"));
    let process = one(&spans, &format!("process {orders}"));
    let create = one(&spans, &format!("create {confirmed}"));
    let relay_send = one(&spans, &format!("send {confirmed}"));
    let process_next = one(&spans, &format!("process {confirmed}"));

    // One trace, the application's.
    for s in [send, process, create, relay_send, process_next] {
        assert_eq!(
            s.span_context.trace_id(),
            request_trace,
            "`{}` is in the request's trace",
            s.name
        );
    }
    assert_eq!(checkout.span_context.trace_id(), request_trace);

    // Kinds.
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(create.span_kind, SpanKind::Producer);
    assert_eq!(relay_send.span_kind, SpanKind::Client, "a batch send");
    assert_eq!(process_next.span_kind, SpanKind::Consumer);

    // Parents and links.
    assert_eq!(send.parent_span_id, checkout.span_context.span_id());
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert!(
        links_to(process, send),
        "process links to its creation context"
    );
    assert_eq!(create.parent_span_id, process.span_context.span_id());
    assert_eq!(
        relay_send.parent_span_id,
        create.span_context.span_id(),
        "the relay's publish continues the trace that enqueued the event"
    );
    assert!(links_to(relay_send, create));
    assert_eq!(process_next.parent_span_id, create.span_context.span_id());
    assert!(links_to(process_next, create));

    // The entries carry the creation contexts.
    let written = |entries: &[(String, Vec<(String, String)>)]| {
        entries[0]
            .1
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        written(&ctx.entries(&orders).await),
        Some(traceparent_of(send))
    );
    assert_eq!(
        written(&ctx.entries(&confirmed).await),
        Some(traceparent_of(create))
    );
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        &[Some(traceparent_of(create))]
    );

    // The messaging conventions, and redstream's own attributes.
    assert_eq!(attr_str(send, "messaging.system"), "redis");
    assert_eq!(attr_str(send, "messaging.destination.name"), orders);
    assert_eq!(attr_str(send, "messaging.message.id"), published.event_id);
    assert_eq!(attr_str(process, "messaging.system"), "redis");
    assert_eq!(attr_str(process, "messaging.destination.name"), orders);
    assert_eq!(
        attr_str(process, "messaging.consumer.group.name"),
        "billing"
    );
    assert_eq!(
        attr_str(process, "messaging.message.id"),
        published.event_id
    );
    assert_eq!(attr_str(process, "messaging.operation.type"), "process");
    assert!(
        attr_str(process, "messaging.client.id").starts_with(&instance),
        "the member name: {:?}",
        attr(process, "messaging.client.id")
    );
    assert_eq!(attr_str(process, "redstream.event.type"), "order.created");
    assert_eq!(attr(process, "redstream.attempt"), Some(&Value::I64(1)));
    assert_eq!(attr_str(process, "redstream.outcome"), "ack");
    assert_eq!(attr(process, "error.type"), None);
    assert_eq!(attr_str(create, "messaging.destination.name"), confirmed);
    assert_eq!(
        attr_str(process_next, "messaging.consumer.group.name"),
        "shipping"
    );
    assert_eq!(
        attr_str(process_next, "redstream.event.type"),
        "order.confirmed"
    );

    // The acks were settled under `settle` spans.
    let settles = named(&spans, &format!("settle {orders}"));
    assert!(!settles.is_empty(), "a settle span for the ack");
    assert!(settles.iter().all(|s| {
        s.span_kind == SpanKind::Client
            && attr_str(s, "messaging.operation.name") == "ack"
            && attr_str(s, "messaging.consumer.group.name") == "billing"
    }));
}

/// A caller-supplied `traceparent` (and `tracestate`) is kept; a group that
/// only links starts a trace per delivery, linked to the creation context;
/// a failed attempt records `error.type`.
#[actix_rt::test]
async fn links_only_a_supplied_context_is_kept_and_failures_are_recorded() {
    telemetry();
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("links");
    let supplied = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let attempts = Arc::new(Mutex::new(0u32));
    let counted = Arc::clone(&attempts);
    let processor = support::start_group(
        ctx.settings(),
        Group::new(
            &stream,
            "audit",
            handler_fn(move |_: serde_json::Value, _meta: Meta| {
                let counted = Arc::clone(&counted);
                async move {
                    let mut n = counted.lock().unwrap();
                    *n += 1;
                    if *n == 1 {
                        return Err("first attempt fails".into());
                    }
                    Ok(Outcome::Ack)
                }
            }),
        )
        .with_trace_links_only(),
    )
    .await;
    let event = Event::new("audit.logged", &serde_json::json!({}))
        .unwrap()
        .with_traceparent(supplied)
        .with_tracestate("vendor=abc");
    processor.producer().publish(&stream, event).await.unwrap();
    eventually(Duration::from_secs(10), "a second attempt", || async {
        *attempts.lock().unwrap() == 2
    })
    .await;
    ctx.eventually_nothing_pending(&stream, "audit", Duration::from_secs(10))
        .await;
    processor.shutdown().await.unwrap();

    let fields = &ctx.entries(&stream).await[0].1;
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(field("traceparent"), Some(supplied), "kept as supplied");
    assert_eq!(field("tracestate"), Some("vendor=abc"));

    let spans = finished();
    let send = one(&spans, &format!("send {stream}"));
    assert_eq!(
        format!("{:032x}", send.span_context.trace_id()),
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "the send span continues the supplied context"
    );
    assert_eq!(format!("{:016x}", send.parent_span_id), "00f067aa0ba902b7");
    let mut processes = named(&spans, &format!("process {stream}"));
    processes.sort_by_key(|s| match attr(s, "redstream.attempt") {
        Some(Value::I64(n)) => *n,
        other => panic!("attempt: {other:?}"),
    });
    assert_eq!(
        processes.len(),
        2,
        "two attempts: {:?}",
        processes
            .iter()
            .map(|s| (&s.attributes, s.parent_span_id))
            .collect::<Vec<_>>()
    );
    for p in &processes {
        assert_eq!(
            p.parent_span_id,
            SpanId::INVALID,
            "a root when only linking"
        );
        assert_ne!(
            format!("{:032x}", p.span_context.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let link = p
            .links
            .links
            .first()
            .expect("a link to the creation context");
        assert_eq!(
            format!("{:016x}", link.span_context.span_id()),
            "00f067aa0ba902b7"
        );
        assert_eq!(link.span_context.trace_state().get("vendor"), Some("abc"));
    }
    assert_eq!(attr_str(processes[0], "redstream.outcome"), "error");
    assert_eq!(attr_str(processes[0], "error.type"), "error");
    assert!(matches!(processes[0].status, Status::Error { .. }));
    assert_eq!(attr_str(processes[1], "redstream.outcome"), "ack");
    assert_eq!(attr(processes[1], "error.type"), None);
}

/// The outbox keeps a caller's `tracestate` beside its `traceparent`, on
/// SQLite and PostgreSQL: the relay's entry carries both, the handler's
/// entry has it, and the `process` span continues (and links to) the
/// context with its trace state.
#[actix_rt::test]
async fn the_outbox_keeps_a_supplied_tracestate() {
    telemetry();
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let supplied = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for (i, db) in TestDb::both().await.into_iter().enumerate() {
        let stream = ctx.stream(&format!("outbox-tracestate-{i}"));
        let store = db.store().await;
        let seen = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
        let seen_by_handler = Arc::clone(&seen);
        let processor = Processor::builder(ctx.settings())
            .outbox(&store)
            .group(Group::new(
                &stream,
                "audit",
                handler_fn(move |_: serde_json::Value, meta: Meta| {
                    let seen = Arc::clone(&seen_by_handler);
                    async move {
                        seen.lock()
                            .unwrap()
                            .push(meta.entry().tracestate().map(str::to_owned));
                        Ok(Outcome::Ack)
                    }
                }),
            ))
            .start()
            .await
            .unwrap();
        let event = Event::new("audit.logged", &serde_json::json!({}))
            .unwrap()
            .with_traceparent(supplied)
            .with_tracestate("vendor=abc,other=1");
        let tx = store.connection().begin().await.unwrap();
        enqueue(&tx, &stream, event).await.unwrap();
        tx.commit().await.unwrap();
        eventually(Duration::from_secs(15), "the event handled", || async {
            !seen.lock().unwrap().is_empty()
        })
        .await;
        ctx.eventually_nothing_pending(&stream, "audit", Duration::from_secs(5))
            .await;
        processor.shutdown().await.unwrap();

        let backend = format!("{:?}", store.backend());
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            &[Some("vendor=abc,other=1".to_owned())],
            "the handler's entry has the tracestate ({backend})"
        );
        let fields = &ctx.entries(&stream).await[0].1;
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(field("traceparent"), Some(supplied), "{backend}");
        assert_eq!(field("tracestate"), Some("vendor=abc,other=1"), "{backend}");

        let spans = finished();
        let process = one(&spans, &format!("process {stream}"));
        assert_eq!(
            format!("{:016x}", process.parent_span_id),
            "b7ad6b7169203331",
            "a child of the supplied context ({backend})"
        );
        assert_eq!(
            process.span_context.trace_state().get("vendor"),
            Some("abc"),
            "the trace state continues ({backend})"
        );
        let link = process
            .links
            .links
            .first()
            .expect("a link to the creation context");
        assert_eq!(link.span_context.trace_state().get("other"), Some("1"));
    }
}

/// Spans leave through OTLP (gRPC) as a collector receives them: a fake
/// collector runs in the test; the publish's `send` span arrives with its
/// messaging attributes and the ids written into the entry.
#[actix_rt::test]
async fn spans_reach_an_otlp_collector() {
    telemetry(); // the global propagator
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start()
        .await
        .expect("a fake collector on loopback");
    let provider = fake_opentelemetry_collector::setup_tracer_provider(&collector).await;
    let stream = ctx.stream("otlp");
    let processor = support::start_group(
        ctx.settings(),
        Group::new(
            &stream,
            "g",
            handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) }),
        ),
    )
    .await;
    let published = {
        // The publish runs on this thread: a default subscriber of its own
        // sees its `send` span.
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("otlp-test")));
        let _guard = tracing::subscriber::set_default(subscriber);
        let event = Event::new("otlp.checked", &serde_json::json!({})).unwrap();
        processor.producer().publish(&stream, event).await.unwrap()
    };
    // The batch exporter sends from its own thread through the gRPC
    // channel this runtime drives: flush without blocking it.
    let flushing = provider.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush())
        .await
        .unwrap()
        .expect("flushed to the collector");
    let spans = collector.exported_spans(1, Duration::from_secs(10)).await;
    processor.shutdown().await.unwrap();
    let send = spans
        .iter()
        .find(|s| s.name == format!("send {stream}"))
        .unwrap_or_else(|| panic!("a send span among {spans:?}"));
    assert_eq!(send.kind, "SPAN_KIND_PRODUCER");
    // The fake collector gives attribute values as the protobuf's debug
    // text: `Some(AnyValue { value: Some(StringValue("…")) })`.
    let string_attr = |key: &str| {
        let text = send.attributes.get(key)?;
        let start = text.find("StringValue(\"")? + "StringValue(\"".len();
        let len = text[start..].find("\")")?;
        Some(text[start..start + len].to_owned())
    };
    assert_eq!(string_attr("messaging.system").as_deref(), Some("redis"));
    assert_eq!(
        string_attr("messaging.destination.name"),
        Some(stream.clone())
    );
    assert_eq!(
        string_attr("messaging.message.id"),
        Some(published.event_id.clone())
    );
    let traceparent = ctx.entries(&stream).await[0]
        .1
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone());
    assert_eq!(
        traceparent,
        Some(format!("00-{}-{}-01", send.trace_id, send.span_id)),
        "the entry carries the exported span's context"
    );
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    collector.abort();
}

/// Counts the events an exactly-once batch handled.
struct Ledger;

impl redstream::TxHandler for Ledger {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        _event: serde_json::Value,
        _meta: &Meta,
        _tx: &sea_orm::DatabaseTransaction,
    ) -> HandlerResult {
        Ok(Outcome::Ack)
    }
}

/// An exactly-once batch runs in one `process` span, a root linked to the
/// creation context of each of its entries.
#[actix_rt::test]
async fn an_exactly_once_batch_links_to_each_entry() {
    telemetry();
    let Some(ctx) = TestContext::new() else {
        return;
    };
    let stream = ctx.stream("ledger");
    let db = TestDb::sqlite();
    let store = db.store().await;
    let processor = Processor::builder(ctx.settings()).start().await.unwrap();
    // Published before the group starts, so that one read takes them all.
    let events = (0..3)
        .map(|n| Event::new("ledger.entry", &serde_json::json!({ "n": n })).unwrap())
        .collect();
    let published = processor
        .producer()
        .publish_batch(&stream, events)
        .await
        .unwrap();
    processor.shutdown().await.unwrap();
    let processor = support::start_group(
        ctx.settings(),
        Group::transactional(&stream, "ledger", &store, Ledger),
    )
    .await;
    eventually(Duration::from_secs(10), "the batch acked", || async {
        ctx.pending(&stream, "ledger").await == 0
            && !named(&finished(), &format!("process {stream}")).is_empty()
    })
    .await;
    processor.shutdown().await.unwrap();

    let spans = finished();
    let send = one(&spans, &format!("send {stream}"));
    assert_eq!(send.span_kind, SpanKind::Client);
    assert_eq!(
        attr(send, "messaging.batch.message_count"),
        Some(&Value::I64(3))
    );
    let creates = named(&spans, &format!("create {stream}"));
    assert_eq!(creates.len(), 3, "a create span per event");
    for c in &creates {
        assert_eq!(c.parent_span_id, send.span_context.span_id());
    }
    assert_eq!(published.iter().filter(|r| r.is_ok()).count(), 3);
    let process = one(&spans, &format!("process {stream}"));
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(process.parent_span_id, SpanId::INVALID, "a root");
    assert_eq!(attr_str(process, "messaging.consumer.group.name"), "ledger");
    for c in &creates {
        assert!(
            links_to(process, c),
            "the batch links to each creation context"
        );
    }
}

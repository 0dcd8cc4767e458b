//! OpenTelemetry (feature `opentelemetry`): spans with the messaging
//! semantic conventions, and the trace context carried by entries
//! (`traceparent`, `tracestate`) through the host's global text-map
//! propagator. The library installs no SDK, no subscriber and no
//! propagator; with the host's defaults (none) these spans and contexts
//! are no-ops.
//!
//! | span (`otel.name`) | kind | where |
//! |---|---|---|
//! | `send <stream>` | producer (client for a batch) | `Producer::publish`, `Producer::publish_batch` |
//! | `create <stream>` | producer | each event of a batch, and `enqueue` into the outbox |
//! | `process <stream>` | consumer | each handler call; each exactly-once batch (linked to every entry) |
//! | `settle <stream>` | client | each ack batch and dead-letter write |

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::wire::{Entry, Event, field};

/// The `messaging.system` of every span.
pub(crate) const SYSTEM: &str = "redis";

/// Collects the trace-context fields a propagator writes; only the
/// reserved `traceparent` and `tracestate` are kept (an entry has no place
/// for others, such as `baggage`).
#[derive(Default)]
struct Fields {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Fields {
    fn set(&mut self, key: &str, value: String) {
        match key {
            field::TRACEPARENT => self.traceparent = Some(value),
            field::TRACESTATE if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// An entry's trace-context fields, for a propagator to read.
struct EntryFields<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for EntryFields<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            field::TRACEPARENT => self.traceparent,
            field::TRACESTATE => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = Vec::with_capacity(2);
        if self.traceparent.is_some() {
            keys.push(field::TRACEPARENT);
        }
        if self.tracestate.is_some() {
            keys.push(field::TRACESTATE);
        }
        keys
    }
}

fn extract_fields(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Context> {
    traceparent?;
    let carrier = EntryFields {
        traceparent,
        tracestate,
    };
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The creation context an event carries (a caller-supplied `traceparent`,
/// or one the outbox stored), if the propagator reads a valid one.
pub(crate) fn event_context(event: &Event) -> Option<Context> {
    extract_fields(event.traceparent(), event.tracestate())
}

/// The creation context an entry carries, if the propagator reads a valid
/// one from its `traceparent` / `tracestate`.
pub(crate) fn entry_context(entry: &Entry) -> Option<Context> {
    extract_fields(entry.traceparent(), entry.tracestate())
}

/// Gives `event` the context of `span` as its creation context, unless it
/// already carries one (a caller-supplied `traceparent` is kept).
pub(crate) fn inject(span: &tracing::Span, event: Event) -> Event {
    if event.traceparent().is_some() {
        return event;
    }
    let cx = span.context();
    let mut fields = Fields::default();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut fields));
    let mut event = event;
    if let Some(tp) = fields.traceparent {
        event = event.with_traceparent(tp);
        if let Some(ts) = fields.tracestate {
            event = event.with_tracestate(ts);
        }
    }
    event
}

/// Parents `span` on `cx` (before it starts: call this first). A span the
/// subscriber filtered out, or a subscriber without the OpenTelemetry
/// layer, simply keeps its own parent.
pub(crate) fn set_parent(span: &tracing::Span, cx: Context) {
    if let Err(e) = span.set_parent(cx) {
        tracing::trace!("trace context not applied: {e}");
    }
}

/// Links `span` to the span of `cx`.
pub(crate) fn add_link(span: &tracing::Span, cx: &Context) {
    span.add_link(cx.span().span_context().clone());
}

/// A count as an attribute: an integer (unsigned ones are exported as
/// strings).
fn count_attr(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A `create <stream>` span (kind producer): one event's creation, a child
/// of the current span.
pub(crate) fn create_span(stream: &str) -> tracing::Span {
    tracing::info_span!(
        "redstream.create",
        otel.name = %format_args!("create {stream}"),
        otel.kind = "producer",
        messaging.system = SYSTEM,
        messaging.operation.name = "create",
        messaging.operation.type = "create",
        messaging.destination.name = %stream,
        messaging.message.id = tracing::field::Empty,
    )
}

/// A `send <stream>` span: kind producer for one event, client for a batch
/// (whose events each have a `create` span, linked from it).
pub(crate) fn send_span(stream: &str, batch: Option<usize>) -> tracing::Span {
    let kind = if batch.is_some() {
        "client"
    } else {
        "producer"
    };
    tracing::info_span!(
        "redstream.send",
        otel.name = %format_args!("send {stream}"),
        otel.kind = kind,
        messaging.system = SYSTEM,
        messaging.operation.name = "send",
        messaging.operation.type = "send",
        messaging.destination.name = %stream,
        messaging.batch.message_count = batch.map(count_attr),
        messaging.message.id = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// The `process <stream>` span of an exactly-once batch (kind consumer): a
/// root, linked to each entry's creation context (one transaction, many
/// producers).
pub(crate) fn batch_process_span(
    member: &crate::handler::MemberInfo,
    count: usize,
) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "redstream.batch",
        otel.name = %format_args!("process {}", member.stream),
        otel.kind = "consumer",
        messaging.system = SYSTEM,
        messaging.operation.name = "process",
        messaging.operation.type = "process",
        messaging.destination.name = %member.stream,
        messaging.consumer.group.name = %member.group,
        messaging.client.id = %member.member,
        messaging.batch.message_count = count_attr(count),
    )
}

/// A `settle <stream>` span (kind client) for `count` entries of `group`:
/// `operation` is `ack` or `dead_letter`. A root: one write settles
/// entries of many traces.
pub(crate) fn settle_span(
    stream: &str,
    group: &str,
    operation: &str,
    count: usize,
) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "redstream.settle",
        otel.name = %format_args!("settle {stream}"),
        otel.kind = "client",
        messaging.system = SYSTEM,
        messaging.operation.name = operation,
        messaging.operation.type = "settle",
        messaging.destination.name = %stream,
        messaging.consumer.group.name = %group,
        messaging.batch.message_count = count_attr(count),
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records a failure on a span: `error.type` and an error status.
pub(crate) fn record_error(span: &tracing::Span, error_type: &str) {
    span.record("error.type", error_type);
    span.record("otel.status_code", "ERROR");
}

/// The `error.type` of an error: its variant, in snake case.
pub(crate) fn error_type(error: &crate::Error) -> &'static str {
    use crate::Error;
    match error {
        Error::Settings { .. } => "settings",
        Error::PayloadTooLarge { .. } => "payload_too_large",
        Error::InvalidEvent { .. } => "invalid_event",
        Error::Encode(_) => "encode",
        Error::Redis(_) => "redis",
        Error::Database(_) => "database",
        Error::UnexpectedReply { .. } => "unexpected_reply",
        Error::PublishFailed { .. } => "publish_failed",
        Error::BufferFull { .. } => "buffer_full",
        Error::LeaseHeld { .. } => "lease_held",
        Error::NoActixSystem => "no_actix_system",
        Error::Stopped => "stopped",
        Error::NotServed { .. } => "not_served",
        Error::Unsupported { .. } => "unsupported",
        Error::Timeout { .. } => "timeout",
    }
}

//! Embedding redstream in an existing actix-web 4 application.
//!
//! Shows: the actor system started inside the application's own actix
//! runtime (no second runtime, no global state besides the metrics recorder
//! the application chooses to install); `redstream::web::configure_with_metrics`
//! mounting redstream's `/ops/health`, `/ops/metrics` and `/ops/status` next
//! to the application's routes and registering `web::Data<ProcessorHandle>`,
//! which the application's handlers take as an extractor: `POST /orders`
//! publishes through it (answering `202` with the event id, or `503` with
//! `Retry-After` when the producer's buffer is full) and `GET /orders/audit`
//! reads the group's status through it; and `redstream::web::shutdown_signal`
//! as the server's shutdown signal, so SIGTERM or SIGINT stops in the order
//! a load balancer needs: readiness off (`/ops/health` answers `503`) while
//! the consumers drain and the producer flushes, then the server stops.
//!
//! An order with `"work_ms": N` keeps its handler busy for N ms (at most
//! 10 s), to watch the drain.
//!
//! ```text
//! cargo run --example embed_actix_web            # listens on 127.0.0.1:8080 (LISTEN_ADDR to change)
//! curl -i -X POST localhost:8080/orders -H 'content-type: application/json' \
//!      -d '{"order_id": "o-1", "customer_id": "c-1", "items": []}'
//! curl localhost:8080/orders/audit
//! open http://127.0.0.1:8080/ops/status
//! ```

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use redstream::prelude::*;
use redstream::{Error, ProcessorHandle};

/// The stream the HTTP handler publishes to and the group reads
/// (`WEB_ORDERS_STREAM`, default `web-orders`).
static STREAM: LazyLock<String> = LazyLock::new(|| {
    std::env::var("WEB_ORDERS_STREAM").unwrap_or_else(|_| "web-orders".to_owned())
});
/// The group that audits them.
const GROUP: &str = "order-audit";

/// Counts what the consumer group saw (a stand-in for real work).
#[derive(Default)]
struct Audit {
    seen: AtomicU64,
}

impl Handler for Audit {
    type Event = serde_json::Value;

    async fn handle(&self, order: serde_json::Value, meta: Meta) -> HandlerResult {
        if let Some(ms) = order["work_ms"].as_u64() {
            tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
        }
        self.seen.fetch_add(1, Ordering::Relaxed);
        tracing::info!(entry_id = meta.entry_id(), order_id = %order["order_id"], "order audited");
        Ok(Outcome::Ack)
    }
}

async fn create_order(
    redstream: web::Data<ProcessorHandle>,
    body: web::Json<serde_json::Value>,
) -> HttpResponse {
    let order = body.into_inner();
    if !order["order_id"].is_string() {
        return HttpResponse::BadRequest()
            .json(serde_json::json!({"error": "order_id is required"}));
    }
    let event = match Event::new("order.created", &order) {
        Ok(event) => event,
        Err(e) => {
            return HttpResponse::BadRequest().json(serde_json::json!({"error": e.to_string()}));
        }
    };
    match redstream.producer().try_publish(&STREAM, event).await {
        Ok(published) => HttpResponse::Accepted().json(serde_json::json!({
            "event_id": published.event_id,
            "entry_id": published.entry_id,
        })),
        // Backpressure becomes 503, never an unbounded queue.
        Err(Error::BufferFull { .. }) | Err(Error::Stopped) => HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(serde_json::json!({"error": "busy, try again shortly"})),
        Err(e @ Error::PayloadTooLarge { .. }) => {
            HttpResponse::PayloadTooLarge().json(serde_json::json!({"error": e.to_string()}))
        }
        Err(e) => {
            HttpResponse::InternalServerError().json(serde_json::json!({"error": e.to_string()}))
        }
    }
}

/// The audit group as the processor sees it, through the handle that
/// `redstream::web::configure_with_metrics` registered.
async fn audit_status(redstream: web::Data<ProcessorHandle>) -> HttpResponse {
    match redstream.group_status(&STREAM, GROUP).await {
        Ok(status) => HttpResponse::Ok().json(serde_json::json!({
            "instance": redstream.instance(),
            "stopping": redstream.is_stopping(),
            "members_running": status.running(),
            "acked": status.acked,
            "pending": status.pending,
        })),
        Err(e) => {
            HttpResponse::ServiceUnavailable().json(serde_json::json!({"error": e.to_string()}))
        }
    }
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,redstream=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // The application installs the recorder, before the processor starts.
    let prometheus = redstream::metrics::install_prometheus()?;
    let settings = Settings::load()?;
    let audit = Arc::new(Audit::default());
    // Started once, before HttpServer::new: the app factory runs per worker.
    let redis = settings.redis.url.clone();
    let processor = Processor::builder(settings)
        .group(Group::new(STREAM.as_str(), GROUP, Arc::clone(&audit)).with_members(2))
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    let handle = processor.handle();
    let listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    // SIGTERM or SIGINT: readiness off, the processor drains, then the
    // server stops accepting and finishes its requests.
    let (stop_signal, drained) = redstream::web::shutdown_signal(processor);

    let server = HttpServer::new(move || {
        let prometheus = prometheus.clone();
        App::new()
            .configure(redstream::web::configure_with_metrics(
                "/ops",
                handle.clone(),
                move || prometheus.render(),
            ))
            .route("/orders", web::post().to(create_order))
            .route("/orders/audit", web::get().to(audit_status))
    })
    .shutdown_signal(stop_signal)
    .shutdown_timeout(10)
    .bind(&listen)?
    .run();
    println!("listening on http://{listen} (POST /orders, GET /ops/status); Ctrl-C to stop");
    server.await?;
    let report = drained.await?;
    println!(
        "stopped: {} orders audited, {} entries released, all written: {}",
        audit.seen.load(Ordering::Relaxed),
        report.released,
        report.settled
    );
    Ok(())
}

//! Embedding redstream in an existing actix-web 4 application.
//!
//! Shows: the actor system started inside the application's own actix
//! runtime (no second runtime, no global state besides the metrics recorder
//! the application chooses to install), the producer shared through
//! `web::Data`, publishing from an HTTP handler (`POST /orders` answers
//! `202` with the event id, or `503` with `Retry-After` when the producer's
//! buffer is full), redstream's `/ops/health`, `/ops/metrics` and
//! `/ops/status` mounted next to the application's routes, and an ordered
//! shutdown on SIGTERM or SIGINT: the server stops accepting and finishes
//! its requests, then the consumers drain and the producer flushes.
//!
//! ```text
//! cargo run --example embed_actix_web            # listens on 127.0.0.1:8080 (LISTEN_ADDR to change)
//! curl -i -X POST localhost:8080/orders -H 'content-type: application/json' \
//!      -d '{"order_id": "o-1", "customer_id": "c-1", "items": []}'
//! open http://127.0.0.1:8080/ops/status
//! ```

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::{App, HttpResponse, HttpServer, web};
use redstream::prelude::*;
use redstream::{Error, Producer};

/// The stream the HTTP handler publishes to and the group reads.
const STREAM: &str = "web-orders";

/// Counts what the consumer group saw (a stand-in for real work).
#[derive(Default)]
struct Audit {
    seen: AtomicU64,
}

impl Handler for Audit {
    type Event = serde_json::Value;

    async fn handle(&self, order: serde_json::Value, meta: Meta) -> HandlerResult {
        self.seen.fetch_add(1, Ordering::Relaxed);
        tracing::info!(entry_id = meta.entry_id(), order_id = %order["order_id"], "order audited");
        Ok(Outcome::Ack)
    }
}

async fn create_order(
    producer: web::Data<Producer>,
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
    match producer.try_publish(STREAM, event).await {
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

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
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
        .group(Group::new(STREAM, "order-audit", Arc::clone(&audit)).with_members(2))
        .start()
        .await
        .map_err(|e| format!("Redis at {redis}: {e}"))?;
    let handle = processor.handle();
    let producer = web::Data::new(processor.producer());
    let listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());

    let server = HttpServer::new(move || {
        let prometheus = prometheus.clone();
        App::new()
            .app_data(producer.clone())
            .route("/orders", web::post().to(create_order))
            .service(redstream::web::scope_with_metrics(
                "/ops",
                handle.clone(),
                move || prometheus.render(),
            ))
    })
    .disable_signals()
    .shutdown_timeout(10)
    .bind(&listen)?
    .run();
    let server_handle = server.handle();
    let server_task = actix_rt::spawn(server);
    println!("listening on http://{listen} (POST /orders, GET /ops/status); Ctrl-C to stop");

    wait_for_stop_signal().await;
    // 1. stop accepting and finish the requests in flight;
    server_handle.stop(true).await;
    let _ = server_task.await;
    // 2. consumers drain, decisions are written, the producer flushes.
    let report = processor.shutdown().await?;
    println!(
        "stopped: {} orders audited, {} entries released, all written: {}",
        audit.seen.load(Ordering::Relaxed),
        report.released,
        report.settled
    );
    Ok(())
}

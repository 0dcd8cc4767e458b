//! An actix-web scope that an application mounts under any path:
//!
//! | route | answers |
//! |---|---|
//! | `GET …/health` | readiness: `200` when the process can do its job (not stopping; Redis and the databases answer and take writes; no group failed; every group had a member running within `supervision.unready_after_ms`), else `503`; JSON with `ready`, `degraded` (members restarting) and each check with its `status` (`ok`, `degraded`, `failed`) |
//! | `GET …/health/live` | liveness: `200` while the actors answer, else `503` |
//! | `GET …/metrics` | the Prometheus exposition text (when a renderer is given) |
//! | `GET …/status` | a small HTML page for people: each stream and group at a glance (lag, pending, throughput, dead letters, consumers and restarts), refreshing itself; no external assets |
//! | `GET …/status.json` | the same data as JSON |
//!
//! ```no_run
//! # async fn demo(processor: redstream::Processor) -> std::io::Result<()> {
//! use actix_web::{App, HttpServer};
//!
//! let prometheus = redstream::metrics::install_prometheus().expect("recorder"); // before Processor::start, in real code
//! let handle = processor.handle();
//! HttpServer::new(move || {
//!     let prometheus = prometheus.clone();
//!     App::new().service(redstream::web::scope_with_metrics("/ops", handle.clone(), move || prometheus.render()))
//! })
//! .bind(("127.0.0.1", 8080))?
//! .run()
//! .await
//! # }
//! ```
//!
//! Or, with [`configure`] and [`shutdown_signal`]: the routes plus
//! `web::Data<ProcessorHandle>` for the application's own handlers, and a
//! stop in the order a load balancer needs (readiness off, the processor
//! drains while the server still answers, then the server stops):
//!
//! ```no_run
//! # async fn demo(processor: redstream::Processor) -> std::io::Result<()> {
//! use actix_web::{App, HttpServer, web};
//! use redstream::ProcessorHandle;
//!
//! async fn whoami(handle: web::Data<ProcessorHandle>) -> String {
//!     handle.instance().to_owned()
//! }
//!
//! let handle = processor.handle();
//! let (signal, drained) = redstream::web::shutdown_signal(processor);
//! HttpServer::new(move || {
//!     App::new()
//!         .configure(redstream::web::configure("/ops", handle.clone()))
//!         .route("/whoami", web::get().to(whoami))
//! })
//! .shutdown_signal(signal)
//! .bind(("127.0.0.1", 8080))?
//! .run()
//! .await?;
//! let report = drained.await; // what the processor's stop did
//! # let _ = report;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::http::header;
use actix_web::{HttpResponse, Scope, web};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::handle::{Health, ProcessorHandle};
use crate::processor::{Processor, ShutdownReport};
use crate::producer::ProducerStats;
use crate::status::{GroupDeployment, GroupHistory, GroupStatus};

type Render = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct Ops {
    handle: ProcessorHandle,
    metrics: Option<Render>,
}

/// The scope, mounted at `path`, without a `/metrics` route.
pub fn scope(path: &str, handle: ProcessorHandle) -> Scope {
    build(
        path,
        Ops {
            handle,
            metrics: None,
        },
    )
}

/// The scope, with `/metrics` answering what `render` returns (for
/// Prometheus: `move || handle.render()`).
pub fn scope_with_metrics(
    path: &str,
    handle: ProcessorHandle,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> Scope {
    build(
        path,
        Ops {
            handle,
            metrics: Some(Arc::new(render)),
        },
    )
}

/// For [`App::configure`](actix_web::App::configure): registers
/// `web::Data<ProcessorHandle>` (so the application's handlers can take it
/// as an extractor) and mounts [`scope`] at `path`.
pub fn configure(
    path: &str,
    handle: ProcessorHandle,
) -> impl FnOnce(&mut web::ServiceConfig) + Clone + use<> {
    let path = path.to_owned();
    move |config: &mut web::ServiceConfig| {
        config
            .app_data(web::Data::new(handle.clone()))
            .service(scope(&path, handle));
    }
}

/// Like [`configure`], with `/metrics` answering what `render` returns
/// (see [`scope_with_metrics`]).
pub fn configure_with_metrics<R>(
    path: &str,
    handle: ProcessorHandle,
    render: R,
) -> impl FnOnce(&mut web::ServiceConfig) + Clone + use<R>
where
    R: Fn() -> String + Send + Sync + 'static,
{
    let path = path.to_owned();
    let render: Render = Arc::new(render);
    move |config: &mut web::ServiceConfig| {
        config
            .app_data(web::Data::new(handle.clone()))
            .service(build(
                &path,
                Ops {
                    handle,
                    metrics: Some(render),
                },
            ));
    }
}

/// For [`HttpServer::shutdown_signal`](actix_web::HttpServer::shutdown_signal):
/// a future that waits for SIGINT or SIGTERM, then stops `processor`
/// ([`Processor::shutdown`]) and only then completes, so the order is:
///
/// 1. readiness turns false at once (`/health` answers `503`, check
///    `processor` `stopping`), while the server still serves requests;
/// 2. the processor drains: members finish their handlers by
///    `shutdown.deadline_ms`, decisions are written, the producer flushes;
/// 3. the future completes and the server stops gracefully (it stops
///    accepting and finishes the requests in flight within its
///    `shutdown_timeout`).
///
/// The second value resolves to the processor's [`ShutdownReport`] once it
/// has stopped (or to [`Error::Stopped`] if the first was dropped before).
/// Give the server no other signal handling: `shutdown_signal` replaces it.
/// Keep `shutdown.deadline_ms` plus the server's `shutdown_timeout` below
/// the time the platform waits before killing the process (Kubernetes:
/// `terminationGracePeriodSeconds`).
pub fn shutdown_signal(
    processor: Processor,
) -> (impl Future<Output = ()> + Send + 'static + use<>, Drained) {
    shutdown_when(processor, crate::processor::wait_for_signal())
}

/// Like [`shutdown_signal`], with the stop begun when `trigger` completes
/// instead of at a signal (the application's own stop, or a test's).
pub fn shutdown_when<T>(
    processor: Processor,
    trigger: T,
) -> (impl Future<Output = ()> + Send + 'static + use<T>, Drained)
where
    T: Future<Output = ()> + Send + 'static,
{
    let (report_tx, report_rx) = oneshot::channel();
    let signal = async move {
        trigger.await;
        tracing::info!("stop requested; readiness off, draining the processor");
        let report = processor.shutdown().await;
        let _ = report_tx.send(report);
    };
    (signal, Drained { report: report_rx })
}

/// The processor's [`ShutdownReport`], once the future from
/// [`shutdown_signal`] or [`shutdown_when`] has stopped it.
#[derive(Debug)]
#[must_use = "await it for the report, or drop it"]
pub struct Drained {
    report: oneshot::Receiver<Result<ShutdownReport>>,
}

impl Future for Drained {
    type Output = Result<ShutdownReport>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.report)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(Error::Stopped)))
    }
}

fn build(path: &str, ops: Ops) -> Scope {
    web::scope(path)
        .app_data(web::Data::new(ops))
        .route("/health", web::get().to(ready))
        .route("/health/live", web::get().to(live))
        .route("/metrics", web::get().to(metrics))
        .route("/status", web::get().to(status_page))
        .route("/status.json", web::get().to(status_json))
        .route("/status/group.json", web::get().to(group_json))
}

async fn ready(ops: web::Data<Ops>) -> HttpResponse {
    let health = ops.handle.health().await;
    let mut response = if health.ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response.json(health)
}

async fn live(ops: web::Data<Ops>) -> HttpResponse {
    let health = ops.handle.health().await;
    let mut response = if health.live {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response.json(serde_json::json!({ "live": health.live }))
}

async fn metrics(ops: web::Data<Ops>) -> HttpResponse {
    match &ops.metrics {
        Some(render) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(render()),
        None => HttpResponse::NotFound().body("no metrics renderer configured\n"),
    }
}

/// Everything the status page shows.
#[derive(Debug, Serialize)]
struct StatusReport {
    instance: String,
    uptime_ms: u64,
    redis_version: String,
    /// The server by name and version (`Redis 8.2.3`, `Valkey 9.1.2`).
    server: String,
    /// The newer stream commands in use, in words.
    newer_commands: String,
    warnings: Vec<String>,
    stopping: bool,
    producer: ProducerView,
    groups: Vec<GroupStatus>,
    /// Every process's members of these groups.
    deployment: Vec<GroupDeployment>,
    /// The last hour of each group: in the page's embedded data only (the
    /// page adds its own samples as it polls).
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<Vec<GroupHistory>>,
    health: Health,
}

#[derive(Debug, Serialize)]
struct ProducerView {
    buffered: usize,
    capacity: usize,
    written: u64,
    failed: u64,
    round_trips: u64,
}

impl From<(&crate::Producer, ProducerStats)> for ProducerView {
    fn from((p, s): (&crate::Producer, ProducerStats)) -> Self {
        ProducerView {
            buffered: p.buffered(),
            capacity: p.capacity(),
            written: s.written,
            failed: s.failed,
            round_trips: s.round_trips,
        }
    }
}

async fn report(handle: &ProcessorHandle, with_history: bool) -> StatusReport {
    let producer = handle.producer();
    StatusReport {
        instance: handle.instance().to_owned(),
        uptime_ms: handle.uptime().as_millis() as u64,
        redis_version: handle.server().version.clone(),
        server: handle.server().server.clone(),
        newer_commands: handle.server().features.describe(),
        warnings: handle.server().warnings.clone(),
        stopping: handle.is_stopping(),
        producer: ProducerView::from((&producer, producer.stats())),
        groups: handle.status().await.unwrap_or_default(),
        deployment: handle.deployment().await,
        history: match with_history {
            true => Some(handle.history().await.unwrap_or_default()),
            false => None,
        },
        health: handle.health().await,
    }
}

async fn status_json(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(report(&ops.handle, false).await)
}

/// `?stream=…&group=…` of the drill-down.
#[derive(serde::Deserialize)]
struct GroupQuery {
    stream: String,
    group: String,
}

async fn group_json(ops: web::Data<Ops>, query: web::Query<GroupQuery>) -> HttpResponse {
    match ops.handle.group_details(&query.stream, &query.group).await {
        Ok(Some(details)) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(details),
        Ok(None) => HttpResponse::NotFound().json(serde_json::json!({
            "error": format!("this process runs no group `{}` on `{}`", query.group, query.stream)
        })),
        Err(e) => {
            HttpResponse::ServiceUnavailable().json(serde_json::json!({ "error": e.to_string() }))
        }
    }
}

async fn status_page(ops: web::Data<Ops>) -> HttpResponse {
    let data =
        serde_json::to_string(&report(&ops.handle, true).await).unwrap_or_else(|_| "{}".into());
    // `</` cannot end the script element early once escaped.
    let data = data.replace("</", "<\\/");
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(STATUS_PAGE.replace("/*DATA*/null", &data))
}

/// The status page (`status_page.html`): the initial data is embedded, the
/// script renders it and then polls `status.json` every two seconds,
/// keeping an hour of history in the page.
const STATUS_PAGE: &str = include_str!("status_page.html");

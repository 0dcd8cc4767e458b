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
use crate::status::GroupStatus;

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

async fn report(handle: &ProcessorHandle) -> StatusReport {
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
        health: handle.health().await,
    }
}

async fn status_json(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(report(&ops.handle).await)
}

async fn status_page(ops: web::Data<Ops>) -> HttpResponse {
    let data = serde_json::to_string(&report(&ops.handle).await).unwrap_or_else(|_| "{}".into());
    // `</` cannot end the script element early once escaped.
    let data = data.replace("</", "<\\/");
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(STATUS_PAGE.replace("/*DATA*/null", &data))
}

/// The status page: the initial data is embedded, the script renders it and
/// then polls `status.json` every two seconds.
const STATUS_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>redstream status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2330; background: #fafbfc; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  .meta { color: #5b6475; margin-bottom: 1rem; }
  .ok { color: #137333; } .bad { color: #b3261e; font-weight: 600; } .warn { color: #8a5a00; }
  table { border-collapse: collapse; margin: .5rem 0 1.5rem; background: #fff; min-width: 60%; }
  th, td { border: 1px solid #d8dce3; padding: .3rem .6rem; text-align: right; }
  th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
  th { background: #eef1f5; font-weight: 600; }
  #checks th, #checks td { text-align: left; }
  .members span { display: inline-block; margin: 0 .3rem .2rem 0; padding: 0 .4rem; border-radius: .6rem; background: #e6f4ea; }
  .members span.down { background: #fef7e0; }
  .group-failed .members span.down { background: #fce8e6; }
  ul.warnings { margin: .2rem 0 1rem; }
</style>
</head>
<body>
<h1>redstream</h1>
<div class="meta" id="meta"></div>
<ul class="warnings" id="warnings"></ul>
<table id="groups">
  <thead><tr><th>stream</th><th>group</th><th>lag</th><th>pending</th><th>waiting retry</th><th>longest pending</th><th>queue latency</th><th>acked/s</th><th>acked</th><th>retried</th><th>dead letters</th><th>consumers (restarts)</th></tr></thead>
  <tbody></tbody>
</table>
<table id="checks"><thead><tr><th>check</th><th>state</th><th>detail</th></tr></thead><tbody></tbody></table>
<script id="initial" type="application/json">/*DATA*/null</script>
<script>
"use strict";
let previous = null;
function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value === null || value === undefined ? "–" : String(value);
  if (cls) el.className = cls;
  return el;
}
function age(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return ms + " ms";
  if (ms < 120000) return (ms / 1000).toFixed(1) + " s";
  return Math.round(ms / 60000) + " min";
}
function render(data, at) {
  if (!data) return;
  const h = data.health;
  document.getElementById("meta").replaceChildren(
    text("span", "instance " + data.instance + " · " + data.server + " (newer commands: " + data.newer_commands + ") · up " + age(data.uptime_ms) + " · "),
    text("span", !h.ready ? (data.stopping ? "stopping" : "not ready") : (h.degraded ? "ready, degraded" : "ready"), !h.ready ? "bad" : (h.degraded ? "warn" : "ok")),
    text("span", " · producer " + data.producer.buffered + "/" + data.producer.capacity + " buffered, " + data.producer.written + " written, " + data.producer.failed + " failed"));
  document.getElementById("warnings").replaceChildren(...data.warnings.map(w => text("li", w, "warn")));
  const groupChecks = {};
  h.checks.forEach(c => { groupChecks[c.name] = c.status; });
  const rows = data.groups.map(g => {
    const tr = document.createElement("tr");
    const key = g.stream + "/" + g.group;
    if (groupChecks["group " + key] === "failed") tr.className = "group-failed";
    let rate = "–";
    if (previous && previous.rates[key] !== undefined && at > previous.at) {
      rate = ((g.acked - previous.rates[key]) * 1000 / (at - previous.at)).toFixed(1);
    }
    const members = document.createElement("td");
    members.className = "members";
    members.replaceChildren(...g.members.map(m => {
      const el = text("span", m.name + " (" + m.restarts + ")" + (m.alive ? "" : " not running"), m.alive ? "" : "down");
      if (m.last_error) el.title = m.last_error;
      return el;
    }));
    tr.replaceChildren(text("td", g.stream), text("td", g.group + (g.failed ? " (failed)" : g.paused ? " (paused)" : ""), g.failed ? "bad" : ""),
      text("td", g.lag), text("td", g.pending), text("td", g.waiting_retry), text("td", age(g.longest_pending_ms)), text("td", age(g.queue_latency_ms)),
      text("td", rate), text("td", g.acked), text("td", g.retried),
      text("td", g.dead_letters, g.dead_letters > 0 ? "warn" : ""), members);
    return tr;
  });
  document.querySelector("#groups tbody").replaceChildren(...rows);
  document.querySelector("#checks tbody").replaceChildren(...h.checks.map(c => {
    const tr = document.createElement("tr");
    const cls = { ok: "ok", degraded: "warn", failed: "bad" }[c.status] || "bad";
    tr.replaceChildren(text("td", c.name), text("td", c.status, cls), text("td", c.detail));
    return tr;
  }));
  const rates = {};
  data.groups.forEach(g => { rates[g.stream + "/" + g.group] = g.acked; });
  previous = { at: at, rates: rates };
}
render(JSON.parse(document.getElementById("initial").textContent), Date.now());
setInterval(() => {
  fetch("status.json", { cache: "no-store" })
    .then(r => r.json())
    .then(d => render(d, Date.now()))
    .catch(() => {});
}, 2000);
</script>
</body>
</html>
"##;

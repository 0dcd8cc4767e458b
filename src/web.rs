//! An actix-web scope that an application mounts under any path:
//!
//! | route | answers |
//! |---|---|
//! | `GET …/health` | readiness: `200` when the process can do its job (not stopping; Redis and the databases answer and take writes; no group failed; every group had a member running within `supervision.unready_after_ms`), else `503`; JSON with `ready`, `degraded` (members restarting) and each check with its `status` (`ok`, `degraded`, `failed`) |
//! | `GET …/health/live` | liveness: `200` while the actors answer, else `503` |
//! | `GET …/metrics` | the Prometheus exposition text (when a renderer is given) |
//! | `GET …/status` | a small HTML page for people: each stream and group at a glance (lag, pending, throughput, dead letters, consumers and restarts), refreshing itself; no external assets |
//! | `GET …/status.json` | the same data as JSON |
//! | `GET …/status/group.json?stream=…&group=…` | one group's drill-down: pending entries, dead letters by reason, the newest letters |
//! | `POST …/actions/…` | the write actions, off unless [`Console::with_actions`] turns them on with a token |
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

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, Scope, web};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::dead_letters::Selection;
use crate::error::{Error, Result};
use crate::handle::{Health, ProcessorHandle};
use crate::processor::{Processor, ShutdownReport};
use crate::producer::ProducerStats;
use crate::status::{GroupDeployment, GroupHistory, GroupStatus};

type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The routes of the scope, read-only unless given an [`ActionToken`]:
/// [`scope`] and [`configure`] are its shortcuts.
///
/// With [`Console::with_actions`], the status page's drill-down also offers
/// the write actions (redrive dead letters, one or a reason at a time,
/// delete them, and make a waiting retry due now), each a `POST` that must
/// carry the token as `Authorization: Bearer <token>` and is logged under
/// the target `redstream::console`:
///
/// | route | body (JSON) | does |
/// |---|---|---|
/// | `POST …/actions/redrive` | `stream`, and `ids` or `reason` (with `group`, that group's letters only) | [`ProcessorHandle::redrive`] |
/// | `POST …/actions/delete` | the same | [`ProcessorHandle::delete_dead_letters`] |
/// | `POST …/actions/retry-now` | `stream`, `group`, `ids` | [`ProcessorHandle::retry_now`] |
///
/// They act only on the streams and groups this process runs. The page
/// asks for the token and keeps it in the tab's session storage; it is
/// never part of the page or its URL.
///
/// ```no_run
/// # async fn demo(processor: redstream::Processor) -> Result<(), Box<dyn std::error::Error>> {
/// use actix_web::{App, HttpServer};
/// use redstream::web::{ActionToken, Console};
///
/// let handle = processor.handle();
/// // `None` (read-only) unless REDSTREAM_CONSOLE_TOKEN is set.
/// let token = ActionToken::from_env("REDSTREAM_CONSOLE_TOKEN")?;
/// HttpServer::new(move || {
///     let mut console = Console::new(handle.clone());
///     if let Some(token) = token.clone() {
///         console = console.with_actions(token);
///     }
///     App::new().service(console.scope("/ops"))
/// })
/// .bind(("127.0.0.1", 8080))?
/// .run()
/// .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Console {
    handle: ProcessorHandle,
    metrics: Option<Render>,
    actions: Option<ActionToken>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("handle", &self.handle)
            .field("metrics", &self.metrics.is_some())
            .field("actions", &self.actions.is_some())
            .finish()
    }
}

impl Console {
    /// The read-only console of `handle`, without a `/metrics` route.
    pub fn new(handle: ProcessorHandle) -> Self {
        Console {
            handle,
            metrics: None,
            actions: None,
        }
    }

    /// With `/metrics` answering what `render` returns (for Prometheus:
    /// `move || handle.render()`).
    pub fn with_metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// With the write actions, for requests that carry `token`.
    pub fn with_actions(mut self, token: ActionToken) -> Self {
        self.actions = Some(token);
        self
    }

    /// The scope, mounted at `path`.
    pub fn scope(self, path: &str) -> Scope {
        web::scope(path)
            .app_data(web::Data::new(self))
            .route("/health", web::get().to(ready))
            .route("/health/live", web::get().to(live))
            .route("/metrics", web::get().to(metrics))
            .route("/status", web::get().to(status_page))
            .route("/status.json", web::get().to(status_json))
            .route("/status/group.json", web::get().to(group_json))
            .route("/actions/{action}", web::post().to(action))
    }

    /// For [`App::configure`](actix_web::App::configure): registers
    /// `web::Data<ProcessorHandle>` and mounts the scope at `path`.
    pub fn configure(self, path: &str) -> impl FnOnce(&mut web::ServiceConfig) + Clone + use<> {
        let path = path.to_owned();
        move |config: &mut web::ServiceConfig| {
            config
                .app_data(web::Data::new(self.handle.clone()))
                .service(self.scope(&path));
        }
    }
}

/// The secret that turns the console's write actions on (see [`Console`]).
/// Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct ActionToken(Arc<str>);

impl std::fmt::Debug for ActionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActionToken(…)")
    }
}

/// The shortest token [`ActionToken::new`] takes.
pub const MIN_TOKEN_LEN: usize = 16;

impl ActionToken {
    /// A token of at least [`MIN_TOKEN_LEN`] visible ASCII characters (no
    /// spaces); anything else is [`Error::Settings`] with the key
    /// `console.action_token`.
    pub fn new(token: impl Into<String>) -> Result<Self> {
        let token = token.into();
        if token.len() < MIN_TOKEN_LEN {
            return Err(Error::settings(
                "console.action_token",
                format!(
                    "a token of {} characters is too short to guard write actions; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 24`)",
                    token.len()
                ),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::settings(
                "console.action_token",
                "use visible ASCII characters only (no spaces): it travels in an HTTP header",
            ));
        }
        Ok(ActionToken(token.into()))
    }

    /// The token in the environment variable `var`: `None` when it is unset
    /// or empty (the console stays read-only), an error naming `var` when it
    /// is not a valid token.
    pub fn from_env(var: &str) -> Result<Option<Self>> {
        match std::env::var(var) {
            Ok(value) if !value.is_empty() => {
                ActionToken::new(value).map(Some).map_err(|e| match e {
                    Error::Settings { reason, .. } => Error::settings(var, reason),
                    other => other,
                })
            }
            _ => Ok(None),
        }
    }

    /// Compares in time that does not depend on where they differ.
    fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        let mut differ = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            differ |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
        }
        differ == 0
    }
}

/// The scope, mounted at `path`, without a `/metrics` route (read-only:
/// [`Console`] adds the write actions).
pub fn scope(path: &str, handle: ProcessorHandle) -> Scope {
    Console::new(handle).scope(path)
}

/// The scope, with `/metrics` answering what `render` returns (for
/// Prometheus: `move || handle.render()`).
pub fn scope_with_metrics(
    path: &str,
    handle: ProcessorHandle,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> Scope {
    Console::new(handle).with_metrics(render).scope(path)
}

/// For [`App::configure`](actix_web::App::configure): registers
/// `web::Data<ProcessorHandle>` (so the application's handlers can take it
/// as an extractor) and mounts [`scope`] at `path`.
pub fn configure(
    path: &str,
    handle: ProcessorHandle,
) -> impl FnOnce(&mut web::ServiceConfig) + Clone + use<> {
    Console::new(handle).configure(path)
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
    Console::new(handle).with_metrics(render).configure(path)
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

async fn ready(console: web::Data<Console>) -> HttpResponse {
    let health = console.handle.health().await;
    let mut response = if health.ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response.json(health)
}

async fn live(console: web::Data<Console>) -> HttpResponse {
    let health = console.handle.health().await;
    let mut response = if health.live {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response.json(serde_json::json!({ "live": health.live }))
}

async fn metrics(console: web::Data<Console>) -> HttpResponse {
    match &console.metrics {
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
    /// Whether the write actions are on (they still need the token).
    actions: bool,
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

async fn report(console: &Console, with_history: bool) -> StatusReport {
    let handle = &console.handle;
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
        actions: console.actions.is_some(),
    }
}

async fn status_json(console: web::Data<Console>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(report(&console, false).await)
}

/// `?stream=…&group=…` of the drill-down.
#[derive(serde::Deserialize)]
struct GroupQuery {
    stream: String,
    group: String,
}

async fn group_json(console: web::Data<Console>, query: web::Query<GroupQuery>) -> HttpResponse {
    match console
        .handle
        .group_details(&query.stream, &query.group)
        .await
    {
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

/// The body of a write action: which letters (or entries) it acts on.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRequest {
    stream: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    reason: Option<String>,
}

impl ActionRequest {
    /// The dead letters named: `ids`, or a `reason` (of `group`'s letters
    /// when it is given), never both.
    fn selection(&self) -> std::result::Result<Selection, String> {
        match (&self.reason, self.ids.is_empty()) {
            (Some(_), false) => Err("give `ids` or `reason`, not both".to_owned()),
            (None, true) => Err("give the dead letters' `ids`, or a `reason`".to_owned()),
            (None, false) => Ok(Selection::Ids(self.ids.clone())),
            (Some(reason), true) => Ok(match &self.group {
                Some(group) => Selection::GroupReason {
                    group: group.clone(),
                    reason: reason.clone(),
                },
                None => Selection::Reason(reason.clone()),
            }),
        }
    }
}

/// The console's write actions, by their route names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Redrive,
    Delete,
    RetryNow,
}

impl Action {
    fn named(name: &str) -> Option<Self> {
        match name {
            "redrive" => Some(Action::Redrive),
            "delete" => Some(Action::Delete),
            "retry-now" => Some(Action::RetryNow),
            _ => None,
        }
    }
}

/// `POST …/actions/{redrive|delete|retry-now}`: checks the token, acts,
/// logs what was done and by whom (the peer address).
async fn action(
    console: web::Data<Console>,
    request: HttpRequest,
    name: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let refuse = |status: StatusCode, message: String| {
        HttpResponse::build(status).json(serde_json::json!({ "error": message }))
    };
    let peer = request
        .peer_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    let name = name.into_inner();
    let Some(kind) = Action::named(&name) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "no such action (redrive, delete, retry-now)".to_owned(),
        );
    };
    let Some(token) = &console.actions else {
        return refuse(
            StatusCode::FORBIDDEN,
            "the console is read-only: its actions are off (the application turns them on with Console::with_actions)".to_owned(),
        );
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| token.matches(p)) {
        tracing::warn!(
            target: "redstream::console", action = %name, %peer,
            "console action refused: {}",
            if presented.is_some() { "wrong token" } else { "no token" },
        );
        return HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
            .json(serde_json::json!({ "error": "this action needs the console token (Authorization: Bearer <token>)" }));
    }
    let req: ActionRequest = match serde_json::from_slice(&body) {
        Ok(req) => req,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("bad request body: {e}")),
    };
    let handle = &console.handle;
    let done: Result<serde_json::Value> = match kind {
        Action::Redrive | Action::Delete => match req.selection() {
            Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
            Ok(selection) if kind == Action::Redrive => handle
                .redrive(&req.stream, &selection)
                .await
                .map(|r| serde_json::json!(r)),
            Ok(selection) => handle
                .delete_dead_letters(&req.stream, &selection)
                .await
                .map(|r| serde_json::json!(r)),
        },
        Action::RetryNow => {
            let Some(group) = &req.group else {
                return refuse(StatusCode::BAD_REQUEST, "give the `group`".to_owned());
            };
            if req.ids.is_empty() || req.reason.is_some() {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "give the waiting entries' `ids` (and no `reason`)".to_owned(),
                );
            }
            handle
                .retry_now(&req.stream, group, &req.ids)
                .await
                .map(|made_due| serde_json::json!({ "made_due": made_due }))
        }
    };
    match done {
        Ok(outcome) => {
            tracing::info!(
                target: "redstream::console", action = %name, stream = %req.stream,
                group = req.group.as_deref().unwrap_or(""), ids = ?req.ids,
                reason = req.reason.as_deref().unwrap_or(""), %peer, %outcome,
                "console action {name} on {}", req.stream,
            );
            HttpResponse::Ok().json(outcome)
        }
        Err(e) => {
            tracing::warn!(
                target: "redstream::console", action = %name, stream = %req.stream, %peer,
                "console action {name} on {} failed: {e}", req.stream,
            );
            let status = match e {
                Error::NotServed { .. } => StatusCode::NOT_FOUND,
                Error::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            refuse(status, e.to_string())
        }
    }
}

async fn status_page(console: web::Data<Console>) -> HttpResponse {
    let data = serde_json::to_string(&report(&console, true).await).unwrap_or_else(|_| "{}".into());
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

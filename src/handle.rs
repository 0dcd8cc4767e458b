//! A cheap, clonable view of a running processor, for the parts of an
//! application that need to publish, look at status or answer health
//! probes (actix-web handlers through `web::Data`, for example). Stopping
//! stays with the [`Processor`](crate::Processor).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::Addr;
use serde::Serialize;

use crate::broker::{Diagnostics, ServerReport};
use crate::error::{Error, Result};
use crate::group::supervisor::{GetStatus, GroupSupervisor};
use crate::producer::Producer;
use crate::status::GroupStatus;
use crate::store::Store;

/// How long a health check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct GroupHandle {
    pub(crate) stream: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) addr: Addr<GroupSupervisor>,
}

pub(crate) struct Inner {
    pub(crate) producer: Producer,
    pub(crate) groups: Vec<GroupHandle>,
    pub(crate) broker: Arc<dyn Diagnostics>,
    pub(crate) stores: Vec<Store>,
    pub(crate) server: ServerReport,
    pub(crate) instance: String,
    pub(crate) started: Instant,
    pub(crate) stopping: AtomicBool,
}

/// A clonable view of a running processor: publish, status, health.
///
/// ```no_run
/// # async fn demo(processor: redstream::Processor) {
/// let handle = processor.handle();
/// let health = handle.health().await;
/// if !health.ready {
///     for check in health.checks.iter().filter(|c| !c.ok) {
///         eprintln!("{}: {}", check.name, check.detail);
///     }
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct ProcessorHandle {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorHandle")
            .field("instance", &self.inner.instance)
            .field("groups", &self.inner.groups.len())
            .finish_non_exhaustive()
    }
}

/// One check of a health probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HealthCheck {
    /// What was checked: `redis`, `database`, `group <stream>/<group>`,
    /// `processor`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// The answer of a health probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// The actor system answers (restart the process when this is false).
    pub live: bool,
    /// Redis and every database answer (and take writes), and every group's
    /// consumers run (send traffic only when this is true).
    pub ready: bool,
    /// Each check, passed or not.
    pub checks: Vec<HealthCheck>,
}

impl ProcessorHandle {
    /// The publishing handle.
    pub fn producer(&self) -> Producer {
        self.inner.producer.clone()
    }

    /// This process's instance name.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// The Redis server's version and data-loss warnings, read at start.
    pub fn server(&self) -> &ServerReport {
        &self.inner.server
    }

    /// How long the processor has run.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Whether a graceful stop has begun.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    /// The status of every group.
    pub async fn status(&self) -> Result<Vec<GroupStatus>> {
        let mut out = Vec::with_capacity(self.inner.groups.len());
        for g in &self.inner.groups {
            out.push(g.addr.send(GetStatus).await.map_err(|_| Error::Stopped)?);
        }
        Ok(out)
    }

    /// The status of one group.
    pub async fn group_status(&self, stream: &str, group: &str) -> Result<GroupStatus> {
        let handle = self
            .inner
            .groups
            .iter()
            .find(|g| &*g.stream == stream && &*g.group == group)
            .ok_or(Error::Stopped)?;
        handle
            .addr
            .send(GetStatus)
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Checks Redis, the databases and every group. Liveness only needs the
    /// actors to answer; readiness needs everything, and is false once a
    /// stop has begun.
    pub async fn health(&self) -> Health {
        let mut checks = Vec::new();
        let stopping = self.is_stopping();
        checks.push(HealthCheck {
            name: "processor".to_owned(),
            ok: !stopping,
            detail: if stopping { "stopping" } else { "running" }.to_owned(),
        });
        let redis = tokio::time::timeout(CHECK_TIMEOUT, self.inner.broker.ping()).await;
        checks.push(check(
            "redis",
            redis.map_err(|_| "no answer within 2 s".to_owned()),
        ));
        for store in &self.inner.stores {
            let db = tokio::time::timeout(CHECK_TIMEOUT, store.ping()).await;
            let mut db_check = check(
                "database",
                db.map_err(|_| "no answer within 2 s".to_owned()),
            );
            // A full disk still answers a ping: failing writes count too.
            if let Some(outage) = store.outage() {
                db_check.ok = false;
                db_check.detail = format!(
                    "writes failing for {:.1} s ({} failures): {}",
                    outage.for_ms as f64 / 1000.0,
                    outage.failures,
                    outage.last_error
                );
            }
            checks.push(db_check);
        }
        let mut live = true;
        for g in &self.inner.groups {
            let name = format!("group {}/{}", g.stream, g.group);
            let answer = tokio::time::timeout(CHECK_TIMEOUT, g.addr.send(GetStatus)).await;
            let (ok, detail) = match answer {
                Ok(Ok(status)) if status.failed => (
                    false,
                    "failed: its Redis group is gone and the policy is `fail`".to_owned(),
                ),
                Ok(Ok(status)) => {
                    let down: Vec<&str> = status
                        .members
                        .iter()
                        .filter(|m| !m.alive)
                        .map(|m| m.name.as_str())
                        .collect();
                    if down.is_empty() {
                        (true, format!("{} members running", status.members.len()))
                    } else {
                        (false, format!("members not running: {}", down.join(", ")))
                    }
                }
                _ => {
                    live = false;
                    (false, "its supervisor does not answer".to_owned())
                }
            };
            checks.push(HealthCheck { name, ok, detail });
        }
        let ready = checks.iter().all(|c| c.ok);
        Health {
            live,
            ready,
            checks,
        }
    }

    pub(crate) fn mark_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }
}

fn check(name: &str, result: std::result::Result<Result<()>, String>) -> HealthCheck {
    let (ok, detail) = match result {
        Ok(Ok(())) => (true, "answers".to_owned()),
        Ok(Err(e)) => (false, e.to_string()),
        Err(timeout) => (false, timeout),
    };
    HealthCheck {
        name: name.to_owned(),
        ok,
        detail,
    }
}

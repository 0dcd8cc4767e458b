//! A cheap, clonable view of a running processor, for the parts of an
//! application that need to publish, look at status or answer health
//! probes (actix-web handlers through `web::Data`, for example). Stopping
//! stays with the [`Processor`](crate::Processor).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::Addr;
use serde::Serialize;

use crate::broker::{Admin, Broker, GroupRef, ServerReport};
use crate::dead_letters::{
    DeadLetterEntry, DeleteReport, RedriveReport, Selection, by_reason, redrive_through,
};
use crate::error::{Error, Result};
use crate::group::supervisor::{GetHistory, GetStatus, GroupSupervisor};
use crate::processor::GroupsAtRunTime;
use crate::producer::Producer;
use crate::status::{
    DETAILS_DEAD_LETTERS, DETAILS_LETTERS, DETAILS_PENDING, DeployedMember, GroupDeployment,
    GroupDetails, GroupHistory, GroupStatus, LetterSummary,
};
use crate::store::Store;
use crate::wire::dead_letter_stream;

/// How long a health check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct GroupHandle {
    pub(crate) stream: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) addr: Addr<GroupSupervisor>,
    /// How long the group may have no member running before readiness
    /// turns false (`supervision.unready_after_ms`).
    pub(crate) unready_after: Duration,
}

pub(crate) struct Inner {
    pub(crate) producer: Producer,
    /// The running groups: the ones started with the processor, and those
    /// added and not removed since.
    pub(crate) groups: RwLock<Vec<GroupHandle>>,
    pub(crate) broker: Arc<dyn Broker>,
    /// The broker's operator operations, where it has them.
    pub(crate) admin: Option<Arc<dyn Admin>>,
    pub(crate) stores: RwLock<Vec<Store>>,
    /// Starts and stops groups while the processor runs.
    pub(crate) groups_at_run_time: GroupsAtRunTime,
    pub(crate) server: ServerReport,
    pub(crate) instance: String,
    pub(crate) started: Instant,
    pub(crate) stopping: AtomicBool,
}

/// A clonable view of a running processor: publish, status, health.
///
/// ```no_run
/// # async fn demo(processor: redstream::Processor) {
/// use redstream::CheckStatus;
///
/// let handle = processor.handle();
/// let health = handle.health().await;
/// if !health.ready || health.degraded {
///     for check in health.checks.iter().filter(|c| c.status != CheckStatus::Ok) {
///         eprintln!("{} {:?}: {}", check.name, check.status, check.detail);
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
            .field("groups", &self.groups().len())
            .finish_non_exhaustive()
    }
}

/// How one check of a health probe came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CheckStatus {
    /// All is well.
    Ok,
    /// Working, with something to look at: a group some of whose members
    /// are restarting (in their restart backoff). Does not make the
    /// process unready.
    Degraded,
    /// Cannot do its job: the process is not ready.
    Failed,
}

/// One check of a health probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HealthCheck {
    /// What was checked: `redis`, `database`, `group <stream>/<group>`,
    /// `processor`.
    pub name: String,
    /// How it came out.
    pub status: CheckStatus,
    /// Whether it passed: false only when `status` is `failed` (a degraded
    /// check passes; kept for readers of the older answer).
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

impl HealthCheck {
    fn new(name: &str, status: CheckStatus, detail: String) -> Self {
        HealthCheck {
            name: name.to_owned(),
            status,
            ok: status != CheckStatus::Failed,
            detail,
        }
    }
}

/// The answer of a health probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// The actor system answers (restart the process when this is false).
    pub live: bool,
    /// The process can do its job (send traffic only when this is true):
    /// not stopping, Redis and every database answer (and take writes),
    /// no group has failed, every supervisor answers, and every group has
    /// had a member running within `supervision.unready_after_ms`. Members
    /// that are restarting do not make it false (see `degraded`).
    pub ready: bool,
    /// Some check is degraded: ready, with something to look at (members
    /// restarting).
    pub degraded: bool,
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
        let groups = self.groups();
        let mut out = Vec::with_capacity(groups.len());
        for g in &groups {
            out.push(g.addr.send(GetStatus).await.map_err(|_| Error::Stopped)?);
        }
        Ok(out)
    }

    /// Every process's members of this process's groups, as each process
    /// last recorded them (every `reclaim.lease_ttl_ms / 3`): who serves the
    /// deployment, not only this process. A group whose records cannot be
    /// read is listed with none.
    ///
    /// ```no_run
    /// # async fn demo(handle: redstream::ProcessorHandle) {
    /// for g in handle.deployment().await {
    ///     println!("{}/{}: {} live members in {} processes", g.stream, g.group, g.live_members(), g.live_processes());
    /// }
    /// # }
    /// ```
    pub async fn deployment(&self) -> Vec<GroupDeployment> {
        let now = crate::clock::now_ms();
        let groups = self.groups();
        let mut out = Vec::with_capacity(groups.len());
        for g in &groups {
            let target = GroupRef::new(Arc::clone(&g.stream), Arc::clone(&g.group));
            let read =
                tokio::time::timeout(CHECK_TIMEOUT, self.inner.broker.presence(&target)).await;
            let records = match read {
                Ok(Ok(records)) => records,
                Ok(Err(e)) => {
                    tracing::debug!(
                        "reading the members of {}/{} failed: {e}",
                        g.stream,
                        g.group
                    );
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
            out.push(GroupDeployment {
                stream: g.stream.to_string(),
                group: g.group.to_string(),
                members: records
                    .into_iter()
                    .map(|presence| DeployedMember {
                        live: presence.fresh_at(now),
                        seen_ago_ms: now.saturating_sub(presence.seen_ms),
                        presence,
                    })
                    .collect(),
            });
        }
        out
    }

    /// The last hour of each group, a sample every
    /// [`HISTORY_EVERY_MS`](crate::HISTORY_EVERY_MS), oldest first.
    pub async fn history(&self) -> Result<Vec<GroupHistory>> {
        let groups = self.groups();
        let mut out = Vec::with_capacity(groups.len());
        for g in &groups {
            out.push(GroupHistory {
                stream: g.stream.to_string(),
                group: g.group.to_string(),
                samples: g.addr.send(GetHistory).await.map_err(|_| Error::Stopped)?,
            });
        }
        Ok(out)
    }

    /// One group's pending entries (the oldest
    /// [`DETAILS_PENDING`](crate::DETAILS_PENDING)) and its dead
    /// letters by reason (of the oldest
    /// [`DETAILS_DEAD_LETTERS`](crate::DETAILS_DEAD_LETTERS)):
    /// the status page's drill-down. `None` when this process does not run
    /// the group or its broker has no operator operations.
    pub async fn group_details(&self, stream: &str, group: &str) -> Result<Option<GroupDetails>> {
        // Not served here, or a broker without operator operations.
        let Ok(admin) = self.admin_of_group(stream, Some(group)) else {
            return Ok(None);
        };
        let pending = admin
            .pending_entries(stream, group, DETAILS_PENDING, None)
            .await?;
        let letters: Vec<DeadLetterEntry> = admin
            .range(&dead_letter_stream(stream), "-", "+", DETAILS_DEAD_LETTERS)
            .await?
            .into_iter()
            .filter_map(DeadLetterEntry::parse)
            .collect();
        Ok(Some(GroupDetails {
            stream: stream.to_owned(),
            group: group.to_owned(),
            pending,
            dead_letters: by_reason(letters.iter().filter(|l| l.group == group)),
            dead_letters_read: letters.len(),
            letters: letters
                .iter()
                .rev()
                .filter(|l| l.group == group)
                .take(DETAILS_LETTERS)
                .map(LetterSummary::from)
                .collect(),
        }))
    }

    /// Redrives the dead letters of `stream` that `selection` names back
    /// to it (see [`dead_letters::redrive`](crate::dead_letters::redrive)):
    /// what the console's redrive buttons do. Only for a stream this
    /// process runs a group of.
    ///
    /// ```no_run
    /// # async fn demo(handle: redstream::ProcessorHandle) -> redstream::Result<()> {
    /// use redstream::dead_letters::Selection;
    ///
    /// let report = handle.redrive("orders", &Selection::Reason("bad_json".into())).await?;
    /// println!("{} redriven, {} left in place", report.redriven, report.skipped.len());
    /// # Ok(()) }
    /// ```
    pub async fn redrive(&self, stream: &str, selection: &Selection) -> Result<RedriveReport> {
        let admin = self.admin_of_stream(stream)?;
        let streams: &dyn crate::broker::Streams = &*self.inner.broker;
        redrive_through(streams, &**admin, stream, selection, |_, _| {}).await
    }

    /// Deletes the dead letters of `stream` that `selection` names, for
    /// good (see [`dead_letters::delete`](crate::dead_letters::delete)).
    /// Only for a stream this process runs a group of.
    pub async fn delete_dead_letters(
        &self,
        stream: &str,
        selection: &Selection,
    ) -> Result<DeleteReport> {
        let admin = self.admin_of_stream(stream)?;
        crate::dead_letters::delete(&**admin, stream, selection).await
    }

    /// Makes entries of a group that wait for a retry due now (see
    /// [`Admin::retry_now`]); returns how many were waiting. Only for a
    /// group this process runs.
    pub async fn retry_now(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64> {
        let admin = self.admin_of_group(stream, Some(group))?;
        admin.retry_now(stream, group, ids).await
    }

    fn admin_of_stream(&self, stream: &str) -> Result<&Arc<dyn Admin>> {
        self.admin_of_group(stream, None)
    }

    /// The broker's operator operations, for a stream (and group) this
    /// process runs.
    fn admin_of_group(&self, stream: &str, group: Option<&str>) -> Result<&Arc<dyn Admin>> {
        let runs_it = self
            .groups()
            .iter()
            .any(|g| &*g.stream == stream && group.is_none_or(|group| &*g.group == group));
        if !runs_it {
            return Err(Error::NotServed {
                what: match group {
                    Some(group) => format!("group `{group}` on `{stream}`"),
                    None => format!("stream `{stream}`"),
                },
            });
        }
        self.inner.admin.as_ref().ok_or(Error::Unsupported {
            operation: "operator operations (this broker has no Admin)",
        })
    }

    /// Starts a consumer group on the running processor, as if it had
    /// been added to the builder: the group is created (from its
    /// `start_from`) if it does not exist, its member names are leased
    /// (waiting up to `reclaim.lease_wait_ms` for leases another process
    /// holds) and its members start reading at once. Errors: the group runs
    /// here already, or its settings are invalid (`Error::Settings`), a
    /// member name stays leased elsewhere (`Error::LeaseHeld`), the
    /// processor is stopping (`Error::Stopped`); nothing is started then.
    ///
    /// ```no_run
    /// # async fn demo(handle: redstream::ProcessorHandle) -> redstream::Result<()> {
    /// use redstream::prelude::*;
    ///
    /// let deliver = handler_fn(|_: serde_json::Value, _: Meta| async { Ok(Outcome::Ack) });
    /// handle.add_group(Group::new("webhooks:acme", "delivery", deliver)).await?;
    /// // … later, when the endpoint is gone: finish what runs, within 5 s.
    /// handle.remove_group("webhooks:acme", "delivery", std::time::Duration::from_secs(5)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn add_group(&self, group: crate::Group) -> Result<()> {
        self.inner.groups_at_run_time.add(self, group).await
    }

    /// Stops a running group of this process as a shutdown would: it is at
    /// once no longer listed, its members read nothing more and finish
    /// their handlers within `drain` (what runs past it is released to
    /// other processes, not acked), every decision is written, and its
    /// member leases and records are given up. The consumer group itself,
    /// its pending entries and its retry schedule stay in Redis (another
    /// process, or this one after `add_group`, goes on from there; `redstream
    /// groups delete` removes them). `Error::NotServed` when it does not run
    /// here.
    pub async fn remove_group(
        &self,
        stream: &str,
        group: &str,
        drain: Duration,
    ) -> Result<crate::RemovedGroup> {
        self.inner
            .groups_at_run_time
            .remove(self, stream, group, drain)
            .await
    }

    /// The status of one group.
    pub async fn group_status(&self, stream: &str, group: &str) -> Result<GroupStatus> {
        let handle = self
            .groups()
            .into_iter()
            .find(|g| &*g.stream == stream && &*g.group == group)
            .ok_or(Error::Stopped)?;
        handle
            .addr
            .send(GetStatus)
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Checks Redis, the databases and every group. Liveness only needs the
    /// actors to answer; readiness needs every check to pass (`ok` or
    /// `degraded`), and is false once a stop has begun.
    ///
    /// A group is `ok` when every member runs; `degraded` while some do
    /// not (they are in their restart backoff), or none does for less than
    /// `supervision.unready_after_ms`; `failed` when it has given up
    /// (policy `fail`), its supervisor does not answer, or no member has
    /// run for `unready_after_ms` (restarts alone never take that long).
    pub async fn health(&self) -> Health {
        let mut checks = Vec::new();
        let stopping = self.is_stopping();
        checks.push(if stopping {
            HealthCheck::new("processor", CheckStatus::Failed, "stopping".to_owned())
        } else {
            HealthCheck::new("processor", CheckStatus::Ok, "running".to_owned())
        });
        let redis = tokio::time::timeout(CHECK_TIMEOUT, self.inner.broker.ping()).await;
        checks.push(check(
            "redis",
            redis.map_err(|_| "no answer within 2 s".to_owned()),
        ));
        let stores = self
            .inner
            .stores
            .read()
            .map_or_else(|e| e.into_inner().clone(), |s| s.clone());
        for store in &stores {
            let db = tokio::time::timeout(CHECK_TIMEOUT, store.ping()).await;
            let mut db_check = check(
                "database",
                db.map_err(|_| "no answer within 2 s".to_owned()),
            );
            // A full disk still answers a ping: failing writes count too.
            if let Some(outage) = store.outage() {
                db_check.status = CheckStatus::Failed;
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
        for g in &self.groups() {
            let name = format!("group {}/{}", g.stream, g.group);
            let answer = tokio::time::timeout(CHECK_TIMEOUT, g.addr.send(GetStatus)).await;
            let (status, detail) = match answer {
                Ok(Ok(status)) => group_check(&status, g.unready_after),
                _ => {
                    live = false;
                    (
                        CheckStatus::Failed,
                        "its supervisor does not answer".to_owned(),
                    )
                }
            };
            checks.push(HealthCheck::new(&name, status, detail));
        }
        let ready = checks.iter().all(|c| c.status != CheckStatus::Failed);
        let degraded = checks.iter().any(|c| c.status == CheckStatus::Degraded);
        Health {
            live,
            ready,
            degraded,
            checks,
        }
    }

    /// A snapshot of the running groups.
    pub(crate) fn groups(&self) -> Vec<GroupHandle> {
        match self.inner.groups.read() {
            Ok(groups) => groups.clone(),
            // A panic while the list was held changes nothing in it.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn mark_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }
}

fn check(name: &str, result: std::result::Result<Result<()>, String>) -> HealthCheck {
    match result {
        Ok(Ok(())) => HealthCheck::new(name, CheckStatus::Ok, "answers".to_owned()),
        Ok(Err(e)) => HealthCheck::new(name, CheckStatus::Failed, e.to_string()),
        Err(timeout) => HealthCheck::new(name, CheckStatus::Failed, timeout),
    }
}

/// A group's check from its status (see [`ProcessorHandle::health`]).
fn group_check(status: &GroupStatus, unready_after: Duration) -> (CheckStatus, String) {
    if status.failed {
        return (
            CheckStatus::Failed,
            "failed: its Redis group is gone and the policy is `fail`".to_owned(),
        );
    }
    let down: Vec<String> = status
        .members
        .iter()
        .filter(|m| !m.alive)
        .map(|m| match &m.last_error {
            Some(error) => format!("{} ({} restarts, last: {error})", m.name, m.restarts),
            None => m.name.clone(),
        })
        .collect();
    if down.is_empty() {
        return (
            CheckStatus::Ok,
            format!("{} members running", status.members.len()),
        );
    }
    let bound = unready_after.as_millis();
    match status.no_member_for_ms {
        Some(for_ms) if u128::from(for_ms) >= bound => (
            CheckStatus::Failed,
            format!(
                "no member running for {:.1} s (the bound is {:.1} s): {}",
                for_ms as f64 / 1000.0,
                bound as f64 / 1000.0,
                down.join(", ")
            ),
        ),
        _ => (
            CheckStatus::Degraded,
            format!(
                "{} of {} members running; not running: {}",
                status.running(),
                status.members.len(),
                down.join(", ")
            ),
        ),
    }
}

//! The root: builds and starts the actor system, and stops it in order.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Processor`]: the running system, its status and its stop |
//! | `builder.rs` | [`ProcessorBuilder`]: what to run, and `start` in named steps |
//! | `group.rs` | [`Group`]: a consumer group to run, and its settings |
//! | `run_time.rs` | groups added to and removed from a running processor |

mod builder;
mod group;
mod run_time;

pub use self::builder::ProcessorBuilder;
pub use self::group::Group;
pub(crate) use self::run_time::GroupsAtRunTime;
pub use self::run_time::RemovedGroup;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::broker::ServerReport;
use crate::error::Result;
use crate::group::supervisor::{GroupStopReport, StopGroup};
use crate::handle::{Health, ProcessorHandle};
use crate::producer::Producer;
use crate::producer::actor::Flush;
use crate::schedule::actor::{SchedulerActor, StopSchedule};
use crate::schedule::{ScheduleCounters, ScheduleStats};
use crate::settings::Settings;
use crate::status::GroupStatus;
use crate::store::{OutboxRelay, StopRelay};

/// What a graceful stop did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Entries still running at the deadline: not acked, released at once
    /// to other processes.
    pub released: usize,
    /// Whether every ack, retry and dead-letter decision was written.
    pub settled: bool,
    /// How long the stop took.
    pub took: Duration,
}

/// The running actor system: the producer and one supervisor per group.
/// The one handle to start ([`Processor::builder`]) and stop
/// ([`Processor::shutdown`]).
///
/// ```no_run
/// use redstream::{handler_fn, Event, Group, Meta, Outcome, Processor, Settings};
///
/// #[actix::main]
/// async fn main() -> redstream::Result<()> {
///     let settings = Settings::load()?;
///     let orders = handler_fn(|order: serde_json::Value, meta: Meta| async move {
///         println!("{} attempt {}: {order}", meta.entry_id(), meta.attempt());
///         Ok(Outcome::Ack)
///     });
///     let processor = Processor::builder(settings)
///         .group(Group::new("orders", "order-processing", orders).with_members(4))
///         .start()
///         .await?;
///     processor
///         .producer()
///         .publish("orders", Event::new("order.created", &serde_json::json!({"order_id": "o-1"}))?)
///         .await?;
///     processor.run_until_signal().await?;
///     Ok(())
/// }
/// ```
pub struct Processor {
    handle: ProcessorHandle,
    relay: Option<Addr<OutboxRelay>>,
    schedules: Vec<ScheduleHandle>,
    arbiters: Vec<Arbiter>,
    settings: Settings,
}

/// A running schedule, as the processor keeps it.
struct ScheduleHandle {
    name: Arc<str>,
    addr: Addr<SchedulerActor>,
    counters: Arc<ScheduleCounters>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl Processor {
    /// Starts building a processor from settings.
    pub fn builder(settings: Settings) -> ProcessorBuilder {
        ProcessorBuilder {
            settings,
            groups: Vec::new(),
            schedules: Vec::new(),
            outbox: None,
            max_lens: HashMap::new(),
            broker: None,
        }
    }

    /// A clonable view for publishing, status and health probes (share it
    /// with actix-web handlers through `web::Data`).
    pub fn handle(&self) -> ProcessorHandle {
        self.handle.clone()
    }

    /// The publishing handle.
    pub fn producer(&self) -> Producer {
        self.handle.producer()
    }

    /// This process's instance name (member names are `<instance>-<i>`).
    pub fn instance(&self) -> &str {
        self.handle.instance()
    }

    /// The Redis server's version and data-loss warnings, read at start.
    pub fn server(&self) -> &ServerReport {
        self.handle.server()
    }

    /// The status of every group.
    pub async fn status(&self) -> Result<Vec<GroupStatus>> {
        self.handle.status().await
    }

    /// The status of one group.
    pub async fn group_status(&self, stream: &str, group: &str) -> Result<GroupStatus> {
        self.handle.group_status(stream, group).await
    }

    /// What the schedule named `name` has done, if there is one.
    pub fn schedule_stats(&self, name: &str) -> Option<ScheduleStats> {
        self.schedules
            .iter()
            .find(|s| &*s.name == name)
            .map(|s| s.counters.snapshot())
    }

    /// Redis, databases and groups: see [`ProcessorHandle::health`].
    pub async fn health(&self) -> Health {
        self.handle.health().await
    }

    /// Stops in order: schedules stop ticking and a run in progress may
    /// finish publishing; members stop reading and finish running handlers by
    /// `shutdown.deadline_ms`; their acks, retries and dead letters are
    /// written; entries still running at the deadline are released (not
    /// acked); the outbox relay makes a last pass; then the producer writes
    /// what it holds and refuses more.
    pub async fn shutdown(self) -> Result<ShutdownReport> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.settings.shutdown.deadline_ms);
        self.handle.mark_stopping();
        let inner = &self.handle.inner;
        // No group is added or removed from here on.
        let _no_changes = inner.groups_at_run_time.changing.lock().await;
        let schedule_stops = self.schedules.iter().map(|s| s.addr.send(StopSchedule));
        let schedules_stopped = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            futures_util::future::join_all(schedule_stops),
        )
        .await
        .is_ok();
        if !schedules_stopped {
            tracing::warn!("a scheduled run was still running at the shutdown deadline");
        }
        let groups = self.handle.groups();
        let stops = groups.iter().map(|g| g.addr.send(StopGroup { deadline }));
        let reports: Vec<GroupStopReport> = futures_util::future::join_all(stops)
            .await
            .into_iter()
            .map(|r| {
                r.unwrap_or(GroupStopReport {
                    released: 0,
                    settled: false,
                })
            })
            .collect();
        if let Some(relay) = &self.relay {
            // A last pass, so rows committed by the handlers just stopped go
            // out. It ends by the deadline even while the database is down;
            // giving up the lease takes half a second more at most.
            let _ = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1),
                relay.send(StopRelay { deadline }),
            )
            .await;
        }
        inner.producer.close();
        let flush_for = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        let flushed = tokio::time::timeout(flush_for, inner.producer.actor().send(Flush))
            .await
            .is_ok_and(|r| r.is_ok());
        if !flushed {
            tracing::error!("the producer did not finish writing before the deadline");
        }
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        let report = ShutdownReport {
            released: reports.iter().map(|r| r.released).sum(),
            settled: flushed && reports.iter().all(|r| r.settled),
            took: started.elapsed(),
        };
        tracing::info!(
            released = report.released, settled = report.settled, took = ?report.took,
            "redstream processor stopped",
        );
        Ok(report)
    }

    /// Runs until SIGINT or SIGTERM, then [`Processor::shutdown`].
    pub async fn run_until_signal(self) -> Result<ShutdownReport> {
        wait_for_signal().await;
        tracing::info!("stop signal received; shutting down");
        self.shutdown().await
    }
}

/// Waits for SIGINT or SIGTERM (SIGINT only where there is no SIGTERM).
#[cfg(unix)]
pub(crate) async fn wait_for_signal() {
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

/// Waits for Ctrl-C.
#[cfg(not(unix))]
pub(crate) async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

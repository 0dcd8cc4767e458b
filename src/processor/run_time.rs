//! Groups added to and removed from a running processor (through
//! [`ProcessorHandle::add_group`] and [`ProcessorHandle::remove_group`]),
//! started and stopped with the same steps as the groups it started with.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use actix::ArbiterHandle;

use super::Group;
use super::builder::{prepare_groups, start_groups, take_leases};
use crate::broker::{Broker, ServerReport};
use crate::error::{Error, Result};
use crate::group::supervisor::{GroupStopReport, StopGroup};
use crate::handle::ProcessorHandle;
use crate::settings::Settings;

/// What a removed group's stop did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemovedGroup {
    /// Entries still running at the drain deadline: not acked, released at
    /// once (any process's member of the group takes them).
    pub released: usize,
    /// Whether every decision of the group was written before the deadline.
    pub settled: bool,
}

/// What starting a group while the processor runs needs: what
/// [`ProcessorBuilder::start`](super::ProcessorBuilder::start) had.
pub(crate) struct GroupsAtRunTime {
    pub(super) settings: Settings,
    pub(super) instance: String,
    pub(super) broker: Arc<dyn Broker>,
    pub(super) arbiters: Arc<[ArbiterHandle]>,
    /// This process's lease token, the same for every group.
    pub(super) token: Arc<str>,
    /// Where the next group's members go among the arbiters.
    pub(super) next_member: AtomicUsize,
    /// One change at a time; the stop takes it too, so no group starts
    /// while the processor stops.
    pub(crate) changing: tokio::sync::Mutex<()>,
}

impl GroupsAtRunTime {
    /// Creates the group if needed, takes its member leases and starts it.
    pub(crate) async fn add(&self, handle: &ProcessorHandle, group: Group) -> Result<()> {
        let _one_change = self.changing.lock().await;
        if handle.is_stopping() {
            return Err(Error::Stopped);
        }
        let running = handle.groups();
        if running
            .iter()
            .any(|g| *g.stream == *group.stream && *g.group == *group.group)
        {
            return Err(Error::settings(
                "groups",
                format!(
                    "group `{}` on stream `{}` runs already",
                    group.group, group.stream
                ),
            ));
        }
        if self.settings.retention.delete_acked
            && running.iter().any(|g| *g.stream == *group.stream)
        {
            return Err(Error::settings(
                "retention.delete_acked",
                format!(
                    "a group of this process reads `{}` and may delete what it acks: a second group would lose those entries; add it at start-up, where the readers are counted",
                    group.stream
                ),
            ));
        }
        let mut server = ServerReport::default();
        let runtimes = prepare_groups(
            std::slice::from_ref(&group),
            &self.settings,
            &self.instance,
            &self.broker,
            &mut server,
        )
        .await?;
        let leases = take_leases(&self.broker, &runtimes, &self.settings, &self.token).await?;
        let started = start_groups(runtimes, leases, &self.arbiters, &self.next_member);
        if let Some(store) = &group.store {
            let mut stores = handle
                .inner
                .stores
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !stores.iter().any(|s| s.same_as(store)) {
                stores.push(store.clone());
            }
        }
        handle
            .inner
            .groups
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(started);
        tracing::info!(stream = %group.stream, group = %group.group, "group added");
        Ok(())
    }

    /// Takes the group out of the running set, then stops it as a shutdown
    /// would, with `drain` for its members to finish their handlers.
    pub(crate) async fn remove(
        &self,
        handle: &ProcessorHandle,
        stream: &str,
        group: &str,
        drain: Duration,
    ) -> Result<RemovedGroup> {
        let _one_change = self.changing.lock().await;
        if handle.is_stopping() {
            return Err(Error::Stopped);
        }
        let removed = {
            let mut groups = handle
                .inner
                .groups
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let at = groups
                .iter()
                .position(|g| &*g.stream == stream && &*g.group == group)
                .ok_or_else(|| Error::NotServed {
                    what: format!("group `{group}` on `{stream}`"),
                })?;
            groups.remove(at)
        };
        let deadline = Instant::now() + drain;
        let report = removed
            .addr
            .send(StopGroup { deadline })
            .await
            .unwrap_or(GroupStopReport {
                released: 0,
                settled: false,
            });
        tracing::info!(
            stream,
            group,
            released = report.released,
            settled = report.settled,
            "group removed",
        );
        Ok(RemovedGroup {
            released: report.released,
            settled: report.settled,
        })
    }
}

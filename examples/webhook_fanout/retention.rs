//! Retention for a stream that several groups read: trim by the slowest
//! group, never by length, with a ceiling for groups that are gone.
//!
//! A trim removes only entries below the first one some group still needs
//! (its oldest pending entry, retries waiting included, or the entry after
//! the last one it was given): the fan-out-safe plan of
//! [`Admin::trim_plan`], the same as `redstream trim`.
//!
//! A group nobody runs any more would hold the stream forever. A group is
//! *dead* when none of its consumers has been seen for `dead_after` (or it
//! has none). For a dead group only, the first entry it needs is raised to
//! the age ceiling (`max_age`): entries older than that are trimmed even
//! though it never acked them, and a warning names the group. When it comes
//! back, its pending entries that were trimmed are dead-lettered
//! (`trimmed_while_pending`) and the undelivered ones are skipped. A live
//! group, however slow, is never overridden.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redstream::Admin;

/// When to override a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RetentionPolicy {
    /// A group with no consumer seen for this long is dead.
    pub(crate) dead_after: Duration,
    /// Entries older than this are not kept for a dead group.
    pub(crate) max_age: Duration,
}

/// What one trim did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TrimReport {
    /// Entries below this id were removed.
    pub(crate) min_id: Option<String>,
    pub(crate) removed: u64,
    /// Dead groups whose unacked entries older than `max_age` were trimmed.
    pub(crate) overridden: Vec<String>,
}

fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Trims `stream` once under `policy`. A stream without groups is left
/// alone.
pub(crate) async fn trim_once(
    admin: &dyn Admin,
    stream: &str,
    policy: RetentionPolicy,
) -> redstream::Result<TrimReport> {
    let plan = admin.trim_plan(stream).await?;
    if plan.needed_by.is_empty() {
        return Ok(TrimReport::default());
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let ceiling = format!(
        "{}-0",
        now_ms.saturating_sub(policy.max_age.as_millis() as u64)
    );
    let dead_after_ms = policy.dead_after.as_millis() as u64;
    let mut overridden = Vec::new();
    let mut min: Option<String> = None;
    for (group, needed) in &plan.needed_by {
        let consumers = admin.consumers(stream, group).await?;
        let last_seen_ms = consumers.iter().map(|c| c.idle_ms).min();
        let dead = last_seen_ms.is_none_or(|idle| idle > dead_after_ms);
        let effective = if dead && parse_id(needed) < parse_id(&ceiling) {
            tracing::warn!(
                stream, group, needed = %needed, ceiling = %ceiling,
                last_seen_ms = ?last_seen_ms,
                "group has no consumer seen for longer than {:?}: its entries older than {:?} are trimmed although it has not acked them",
                policy.dead_after, policy.max_age,
            );
            overridden.push(group.clone());
            ceiling.clone()
        } else {
            needed.clone()
        };
        if min
            .as_ref()
            .is_none_or(|m| parse_id(&effective) < parse_id(m))
        {
            min = Some(effective);
        }
    }
    let Some(min_id) = min else {
        return Ok(TrimReport::default());
    };
    let removed = admin.trim_below(stream, &min_id).await?;
    if removed > 0 {
        tracing::info!(stream, removed, below = %min_id, "trimmed what every group has acked");
    }
    Ok(TrimReport {
        min_id: Some(min_id),
        removed,
        overridden,
    })
}

/// Trims the streams `streams()` names (asked on every round, so streams
/// added meanwhile are included) every `every` until the returned task is
/// aborted; `removed` counts what went.
pub(crate) fn spawn_periodic(
    admin: Arc<dyn Admin>,
    streams: impl Fn() -> Vec<String> + 'static,
    policy: RetentionPolicy,
    every: Duration,
    removed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for stream in &streams() {
                match trim_once(admin.as_ref(), stream, policy).await {
                    Ok(report) => {
                        removed.fetch_add(report.removed, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(stream = %stream, "retention: trim failed: {e}"),
                }
            }
        }
    })
}

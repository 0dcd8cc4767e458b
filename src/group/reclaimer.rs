//! `ReclaimerActor`: one per group. Takes entries back from the pending list
//! for redelivery, and reports them to the supervisor; it never decides
//! their fate.
//!
//! Two passes, each never overlapping itself:
//!
//! - **idle scan**, every `reclaim.interval_ms`: XAUTOCLAIM of entries idle
//!   longer than `min_idle` (their member died or stalled without a
//!   heartbeat), carrying the cursor from call to call until it wraps to
//!   `0-0`, so a pending list larger than one call examines is covered
//!   (RELIABILITY.md P8). Ids whose payload was trimmed away come back in
//!   XAUTOCLAIM's deleted list and are reported for the dead-letter stream
//!   (P5, P6).
//! - **due retries**, every `reclaim.retry_poll_ms` and at the due time of
//!   each retry this process scheduled: entries whose retry time has come
//!   are taken from the schedule and claimed in one atomic step.
//!
//! A pass that finds nothing to do backs off: a quiet group's idle scan
//! runs at most every `min_idle / 2` (30 s at most), its retry poll every
//! [`QUIET_POLL_MAX`]; both come back to their period when they claim
//! something, and the poll also at each retry this process schedules. A
//! retry scheduled by a process that died meanwhile is therefore claimed
//! up to [`QUIET_POLL_MAX`] late. Passes fall due on boundaries of their
//! period, so those of thousands of quiet groups reach Redis together.
//!
//! After a full idle scan (at most once a minute), consumers of instances
//! that are gone (nothing pending, idle longer than
//! `reclaim.remove_idle_consumers_ms`, no live lease) are removed from the
//! group, so member names do not pile up (P11).
//!
//! Claimed entries go to the group's members in turn. The next step waits
//! until the member took them, so a large backlog is reclaimed at the pace it
//! is processed, not into memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::WeakRecipient;
use actix::prelude::*;

use super::{EntriesClaimed, GroupRuntime, RetryDueAt, StopReclaimer};
use crate::broker::{CURSOR_START, ClaimIdle, EntryState, Receipt, Redelivery};
use crate::clock::{quiet_period, until_aligned};
use crate::group::InSpanExt;

/// How often idle consumers are looked for, at most.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// The longest period of a quiet group's retry poll.
const QUIET_POLL_MAX: Duration = Duration::from_secs(10);

/// The longest period of a quiet group's idle scan (and at most half of
/// `min_idle`, so that an entry left by a dead member waits at most 1.5 ×
/// `min_idle`).
const QUIET_SCAN_MAX: Duration = Duration::from_secs(30);

/// The reclaimer of one group.
pub(crate) struct ReclaimerActor {
    runtime: Arc<GroupRuntime>,
    /// The broker's pending list, which this actor works on.
    redelivery: Arc<dyn Redelivery>,
    supervisor: WeakRecipient<EntriesClaimed>,
    cursor: String,
    next_member: usize,
    scanning: bool,
    polling: bool,
    /// A poll was asked for while one was on its way: poll again after it.
    poll_again: bool,
    stopped: bool,
    last_cleanup: Option<Instant>,
    /// Passes in a row that claimed nothing, per kind.
    quiet_scans: u32,
    quiet_polls: u32,
    scan_timer: Option<SpawnHandle>,
    poll_timer: Option<SpawnHandle>,
}

impl ReclaimerActor {
    pub(crate) fn new(
        runtime: Arc<GroupRuntime>,
        redelivery: Arc<dyn Redelivery>,
        supervisor: WeakRecipient<EntriesClaimed>,
    ) -> Self {
        ReclaimerActor {
            runtime,
            redelivery,
            supervisor,
            cursor: CURSOR_START.to_owned(),
            next_member: 0,
            scanning: false,
            polling: false,
            poll_again: false,
            stopped: false,
            last_cleanup: None,
            quiet_scans: 0,
            quiet_polls: 0,
            scan_timer: None,
            poll_timer: None,
        }
    }

    fn schedule_scan(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.scan_timer.take() {
            ctx.cancel_future(timer);
        }
        let opts = &self.runtime.options;
        let max = (opts.min_idle / 2).min(QUIET_SCAN_MAX);
        let period = quiet_period(opts.reclaim_interval, self.quiet_scans, max);
        self.scan_timer = Some(ctx.run_later(until_aligned(period), |act, ctx| {
            act.scan_timer = None;
            act.scan(ctx);
        }));
    }

    fn schedule_poll(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.poll_timer.take() {
            ctx.cancel_future(timer);
        }
        let period = quiet_period(
            self.runtime.options.retry_poll,
            self.quiet_polls,
            QUIET_POLL_MAX,
        );
        self.poll_timer = Some(ctx.run_later(until_aligned(period), |act, ctx| {
            act.poll_timer = None;
            act.poll_due(ctx);
        }));
    }

    fn scan(&mut self, ctx: &mut Context<Self>) {
        if self.scanning || self.stopped {
            return;
        }
        self.scanning = true;
        let fut = idle_scan(
            Arc::clone(&self.runtime),
            Arc::clone(&self.redelivery),
            self.supervisor.clone(),
            self.cursor.clone(),
            self.next_member,
        );
        ctx.spawn(
            fut.into_actor(self)
                .map(|(cursor, next_member, claimed), act, ctx| {
                    act.scanning = false;
                    let wrapped = cursor == CURSOR_START;
                    act.cursor = cursor;
                    act.next_member = next_member;
                    if claimed {
                        act.quiet_scans = 0;
                    } else if wrapped {
                        act.quiet_scans = act.quiet_scans.saturating_add(1);
                    }
                    if wrapped {
                        act.remove_idle_consumers(ctx);
                    }
                    if !act.stopped {
                        act.schedule_scan(ctx);
                    }
                })
                .in_span(&self.runtime.span),
        );
    }

    /// After a full scan, at most once a minute: removes consumers of gone
    /// instances (nothing pending, idle, no lease).
    fn remove_idle_consumers(&mut self, ctx: &mut Context<Self>) {
        let idle = self.runtime.options.remove_idle_consumers;
        let every = idle.min(CLEANUP_EVERY);
        if idle.is_zero() || self.last_cleanup.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last_cleanup = Some(Instant::now());
        let rt = Arc::clone(&self.runtime);
        let fut = async move {
            match rt.diagnostics.remove_idle_consumers(&rt.target, idle).await {
                Ok(removed) if !removed.is_empty() => tracing::info!(
                    removed = ?removed,
                    "removed consumers with nothing pending, idle longer than {idle:?} and no live lease",
                ),
                Ok(_) => {}
                Err(e) => tracing::debug!("consumer cleanup failed: {e}"),
            }
        };
        ctx.spawn(fut.into_actor(self).in_span(&self.runtime.span));
    }

    fn poll_due(&mut self, ctx: &mut Context<Self>) {
        if self.stopped {
            return;
        }
        if self.polling {
            self.poll_again = true;
            return;
        }
        self.polling = true;
        let fut = due_pass(
            Arc::clone(&self.runtime),
            Arc::clone(&self.redelivery),
            self.supervisor.clone(),
            self.next_member,
        );
        ctx.spawn(
            fut.into_actor(self)
                .map(|(next_member, claimed), act, ctx| {
                    act.polling = false;
                    act.next_member = next_member;
                    act.quiet_polls = if claimed {
                        0
                    } else {
                        act.quiet_polls.saturating_add(1)
                    };
                    if std::mem::take(&mut act.poll_again) {
                        act.poll_due(ctx);
                    } else if !act.stopped {
                        act.schedule_poll(ctx);
                    }
                })
                .in_span(&self.runtime.span),
        );
    }
}

impl Actor for ReclaimerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.schedule_scan(ctx);
        self.poll_due(ctx);
    }
}

impl Handler<RetryDueAt> for ReclaimerActor {
    type Result = ();

    fn handle(&mut self, msg: RetryDueAt, ctx: &mut Self::Context) {
        let wait = msg.0.saturating_duration_since(Instant::now());
        self.quiet_polls = 0;
        ctx.run_later(wait, |act, ctx| act.poll_due(ctx));
    }
}

impl Handler<StopReclaimer> for ReclaimerActor {
    type Result = ();

    fn handle(&mut self, _msg: StopReclaimer, ctx: &mut Self::Context) {
        self.stopped = true;
        ctx.stop();
    }
}

/// Reports claimed entries and waits until a member took them. Returns
/// false when the supervisor is gone.
async fn report(supervisor: &WeakRecipient<EntriesClaimed>, msg: EntriesClaimed) -> bool {
    match supervisor.upgrade() {
        Some(s) => s.send(msg).await.is_ok(),
        None => false,
    }
}

/// One idle scan, from `cursor` until the cursor wraps. Returns where to
/// start next time, the next member in turn, and whether it claimed
/// anything.
async fn idle_scan(
    rt: Arc<GroupRuntime>,
    redelivery: Arc<dyn Redelivery>,
    supervisor: WeakRecipient<EntriesClaimed>,
    mut cursor: String,
    mut member: usize,
) -> (String, usize, bool) {
    let opts = &rt.options;
    let members = opts.member_names.len();
    let mut claimed = false;
    loop {
        let index = member % members;
        let step = async {
            let step = ClaimIdle {
                min_idle: opts.min_idle,
                cursor: &cursor,
                count: opts.reclaim_count,
            };
            let reply = redelivery.claim_idle(&rt.member(index), step).await?;
            let receipts: Vec<Receipt> = reply.claimed.iter().map(|d| d.receipt.clone()).collect();
            if !receipts.is_empty() {
                crate::failpoints::crash_point!("reclaimer.after_claim");
            }
            let states = redelivery.entry_states(&rt.target, &receipts).await?;
            Ok::<_, crate::error::Error>((reply, states))
        };
        let (reply, states) = match step.await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("reclaim step failed: {e}");
                return (cursor, member, claimed);
            }
        };
        if !reply.claimed.is_empty() || !reply.deleted.is_empty() {
            claimed = true;
            tracing::info!(
                member = %opts.member_names[index],
                claimed = reply.claimed.len(), trimmed = reply.deleted.len(),
                "reclaimed idle entries",
            );
            let msg = EntriesClaimed {
                member: index,
                entries: reply.claimed.into_iter().zip(states).collect(),
                trimmed: reply.deleted,
            };
            if !report(&supervisor, msg).await {
                return (reply.next_cursor, member, claimed);
            }
            member += 1;
        }
        cursor = reply.next_cursor;
        if cursor == CURSOR_START {
            return (cursor, member, claimed);
        }
    }
}

/// Claims due retries until none is left. Returns the next member in turn,
/// and whether it claimed anything.
async fn due_pass(
    rt: Arc<GroupRuntime>,
    redelivery: Arc<dyn Redelivery>,
    supervisor: WeakRecipient<EntriesClaimed>,
    mut member: usize,
) -> (usize, bool) {
    let mut claimed = false;
    let opts = &rt.options;
    let members = opts.member_names.len();
    loop {
        let index = member % members;
        let reply = match redelivery
            .claim_due(&rt.member(index), opts.reclaim_count)
            .await
        {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!("retry poll failed: {e}");
                return (member, claimed);
            }
        };
        let n = reply.claimed.len();
        if n == 0 {
            return (member, claimed);
        }
        claimed = true;
        let msg = EntriesClaimed {
            member: index,
            entries: reply
                .claimed
                .into_iter()
                .map(|(raw, attempts)| {
                    let state = EntryState {
                        attempts,
                        retry_in: None,
                    };
                    (raw, state)
                })
                .collect(),
            trimmed: Vec::new(),
        };
        if !report(&supervisor, msg).await {
            return (member, claimed);
        }
        member += 1;
        if n < opts.reclaim_count {
            return (member, claimed);
        }
    }
}

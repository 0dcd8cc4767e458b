//! Members: starting each consumer on its arbiter, restarting one once the
//! writes its last run caused have settled, and renewing the process's
//! leases on the member names (a member whose name another process took is
//! stopped here).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::{GroupSupervisor, Lifecycle};
use crate::broker::MemberPresence;
use crate::clock::{millis, now_ms};
use crate::group::InSpanExt;
use crate::group::consumer::ConsumerActor;
use crate::group::{ConsumerStopped, EntriesHandled, SetPaused, StopConsumer};

/// How often a restart waiting for writes to settle checks again.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// How many lease lifetimes a group's member records outlive their last
/// write.
const PRESENCE_TTL_FACTOR: u32 = 30;

impl GroupSupervisor {
    pub(super) fn start_member(&mut self, index: usize, ctx: &mut Context<Self>) {
        if !self.lifecycle.runs_members() {
            return;
        }
        let me = ctx.address();
        let handled = me.clone().recipient::<EntriesHandled>().downgrade();
        let stopped = me.recipient::<ConsumerStopped>().downgrade();
        let runtime = Arc::clone(&self.runtime);
        let arbiter = &self.arbiters[(self.arbiter_offset + index) % self.arbiters.len()];
        let slot = &mut self.members[index];
        slot.generation += 1;
        let generation = slot.generation;
        // A fresh count per run: a run that ended cannot touch the next's.
        slot.held = Arc::new(AtomicUsize::new(0));
        let held = Arc::clone(&slot.held);
        let addr = ConsumerActor::start_in_arbiter(arbiter, move |_| {
            ConsumerActor::new(runtime, index, generation, held, handled, stopped)
        });
        slot.addr = Some(addr.clone());
        slot.started_at = Instant::now();
        self.members_changed();
        if self.lifecycle.reads_paused() {
            ctx.spawn(
                addr.send(SetPaused(true))
                    .into_actor(self)
                    .map(|_, _, _| ())
                    .in_span(&self.runtime.span),
            );
        }
    }

    /// After a member started or stopped: the members gauge, and since when
    /// none runs (for readiness, `supervision.unready_after_ms`).
    pub(super) fn members_changed(&mut self) {
        let running = self.members.iter().filter(|s| s.addr.is_some()).count();
        self.runtime.metrics.members.set(running as f64);
        if running > 0 {
            self.no_member_since = None;
        } else if self.no_member_since.is_none() {
            self.no_member_since = Some(Instant::now());
        }
    }

    /// Restarts a member once every write its last run caused has settled,
    /// so that its re-read of its pending list sees them.
    pub(super) fn restart_when_settled(&mut self, index: usize, ctx: &mut Context<Self>) {
        let slot = &self.members[index];
        if !self.lifecycle.runs_members() || slot.addr.is_some() || slot.lease_lost {
            return;
        }
        if !self.settled() {
            ctx.run_later(SETTLE_POLL, move |act, ctx| {
                act.restart_when_settled(index, ctx)
            });
            return;
        }
        self.start_member(index, ctx);
    }

    /// Renews the leases every third of their lifetime, on boundaries of
    /// that period, so the renewals of thousands of groups reach Redis
    /// together.
    pub(super) fn schedule_lease_renewal(&mut self, ctx: &mut Context<Self>) {
        if self.lifecycle == Lifecycle::Stopping {
            return;
        }
        let period = self.runtime.options.lease_ttl / 3;
        ctx.run_later(crate::clock::until_aligned(period), |act, ctx| {
            act.renew_leases(ctx);
            act.schedule_lease_renewal(ctx);
        });
    }

    pub(super) fn renew_leases(&mut self, ctx: &mut Context<Self>) {
        if self.lifecycle == Lifecycle::Stopping {
            return;
        }
        let rt = Arc::clone(&self.runtime);
        let lease = self.lease.clone();
        let ttl = rt.options.lease_ttl;
        let fut = async move {
            rt.leases
                .acquire_leases(&lease.keys, &lease.token, ttl)
                .await
        };
        ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
            let held = match result {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!("lease renewal failed: {e}");
                    return;
                }
            };
            for (index, held) in held.into_iter().enumerate() {
                let name = act.member_name(index).to_owned();
                let slot = &mut act.members[index];
                if !held && !slot.lease_lost {
                    tracing::error!(
                        member = %name,
                        "another process took the lease of member `{name}`; stopping it here",
                    );
                    slot.lease_lost = true;
                    if let Some(addr) = &slot.addr {
                        addr.do_send(StopConsumer {
                            deadline: Instant::now(),
                        });
                    }
                } else if held && slot.lease_lost {
                    tracing::info!(member = %name, "lease of member `{name}` regained");
                    slot.lease_lost = false;
                    act.restart_when_settled(index, ctx);
                }
            }
            act.publish_presence(ctx);
        }).in_span(&self.runtime.span));
    }

    /// Records the members this process holds for operators (the status
    /// page and `redstream consumers` of every process read them).
    pub(super) fn publish_presence(&mut self, ctx: &mut Context<Self>) {
        let now = now_ms();
        let members: Vec<MemberPresence> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, slot)| !slot.lease_lost)
            .map(|(index, slot)| {
                let mut m = MemberPresence::of_process(self.member_name(index), &*self.lease.token);
                m.since_ms = now.saturating_sub(millis(slot.started_at.elapsed()));
                m.seen_ms = now;
                m.running = slot.addr.is_some();
                m.restarts = slot.restarts;
                m.in_flight = slot.in_flight();
                m.last_error = slot.last_error.clone();
                m.lease_ttl_ms = millis(self.runtime.options.lease_ttl);
                m
            })
            .collect();
        // Unchanged records are written again only when half their
        // freshness (the lease lifetime) has passed: a quiet group costs a
        // write every `lease_ttl / 2`, not one per renewal.
        let fingerprint = presence_fingerprint(&members);
        let lease_ttl = self.runtime.options.lease_ttl;
        if self
            .last_presence
            .is_some_and(|(last, at)| last == fingerprint && at.elapsed() < lease_ttl / 2)
        {
            return;
        }
        self.last_presence = Some((fingerprint, Instant::now()));
        let rt = Arc::clone(&self.runtime);
        // Kept a while after the last write: a process that died is shown
        // as not seen since, then its records go with the key.
        let ttl = rt.options.lease_ttl * PRESENCE_TTL_FACTOR;
        let fut = async move {
            if let Err(e) = rt
                .diagnostics
                .publish_presence(&rt.target, &members, ttl)
                .await
            {
                tracing::debug!("recording members for operators failed: {e}");
            }
        };
        ctx.spawn(fut.into_actor(self).in_span(&self.runtime.span));
    }
}

/// What operators see of the members, without the times: two records with
/// the same fingerprint say the same.
fn presence_fingerprint(members: &[MemberPresence]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for m in members {
        (&m.name, m.running, m.restarts, m.in_flight, &m.last_error).hash(&mut hasher);
    }
    hasher.finish()
}

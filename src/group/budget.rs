//! `ReadBudget`: how many new entries the members of a group in this process
//! may still read before the group's pending list would exceed
//! `consumer.max_pending` (RELIABILITY.md F19).
//!
//! The supervisor's pending check pauses reading, but it runs every
//! `consumer.pending_check_ms`; in between, members would read as fast as
//! their in-flight room allows. The budget closes that gap: a member
//! reserves what it asks `XREADGROUP … >` for, gives back what it did not
//! get, and the supervisor credits every entry that leaves the active
//! pending list (acked, dead-lettered, or waiting for a retry). Each check
//! re-bases the budget on the pending count Redis reported, so drift (entries
//! settled by other processes, re-reads of the pending list) lasts one check
//! at most.
//!
//! Per process: several processes of one group each hold their own budget,
//! so together they may exceed the bound by up to one budget each until
//! their next checks.

use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

pub(crate) struct ReadBudget {
    /// `consumer.max_pending`; 0 means no bound.
    max: u64,
    /// New entries read (or reserved for a read in progress) minus entries
    /// settled, since start.
    used: AtomicI64,
    /// `used` may grow up to this.
    limit: AtomicI64,
    freed: Notify,
}

impl ReadBudget {
    pub(crate) fn new(max_pending: u64) -> Self {
        ReadBudget {
            max: max_pending,
            used: AtomicI64::new(0),
            limit: AtomicI64::new(i64::try_from(max_pending).unwrap_or(i64::MAX)),
            freed: Notify::new(),
        }
    }

    /// Reserves room for a read of up to `want` new entries; returns how
    /// many may be asked for (0: none until room is freed).
    pub(crate) fn reserve(&self, want: usize) -> usize {
        if self.max == 0 {
            return want;
        }
        let want = i64::try_from(want).unwrap_or(i64::MAX);
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let room = self.limit.load(Ordering::Acquire).saturating_sub(used);
            if room <= 0 {
                return 0;
            }
            let take = want.min(room);
            match self.used.compare_exchange_weak(
                used,
                used.saturating_add(take),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return usize::try_from(take).unwrap_or(0),
                Err(now) => used = now,
            }
        }
    }

    /// Gives back room: a reservation not used by a read, or entries that
    /// left the active pending list.
    pub(crate) fn release(&self, n: usize) {
        if self.max == 0 || n == 0 {
            return;
        }
        self.used
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
        self.freed.notify_waiters();
    }

    /// Taken just before a pending check is sent; pass it to [`Self::rebase`].
    pub(crate) fn mark(&self) -> i64 {
        self.used.load(Ordering::Acquire)
    }

    /// The pending check sent at `mark` found `active` entries pending (not
    /// counting those waiting for a retry).
    pub(crate) fn rebase(&self, mark: i64, active: u64) {
        if self.max == 0 {
            return;
        }
        let room = i64::try_from(self.max)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(active).unwrap_or(i64::MAX));
        self.limit
            .store(mark.saturating_add(room), Ordering::Release);
        self.freed.notify_waiters();
    }

    /// Resolves when room may have been freed.
    pub(crate) async fn freed(&self) {
        self.freed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::ReadBudget;

    #[test]
    fn unbounded_grants_everything() {
        let b = ReadBudget::new(0);
        assert_eq!(b.reserve(500), 500);
        assert_eq!(b.reserve(500), 500);
    }

    #[test]
    fn reads_stop_at_the_bound_and_resume_as_entries_settle() {
        let b = ReadBudget::new(100);
        assert_eq!(b.reserve(50), 50);
        assert_eq!(b.reserve(80), 50);
        assert_eq!(b.reserve(10), 0);
        // A read that got 20 of its 50 gives 30 back.
        b.release(30);
        assert_eq!(b.reserve(50), 30);
        assert_eq!(b.reserve(1), 0);
        // 40 acked.
        b.release(40);
        assert_eq!(b.reserve(50), 40);
    }

    #[test]
    fn a_check_rebases_on_what_redis_reports() {
        let b = ReadBudget::new(100);
        assert_eq!(b.reserve(100), 100);
        let mark = b.mark();
        // Read after the check was sent: still counted.
        b.release(10);
        assert_eq!(b.reserve(10), 10);
        // Redis says 30 are pending (others were settled elsewhere): 70 of
        // room, minus nothing read since the mark (net 0).
        b.rebase(mark, 30);
        assert_eq!(b.reserve(100), 70);
        // More pending than the bound (another process): no room.
        let mark = b.mark();
        b.rebase(mark, 250);
        assert_eq!(b.reserve(1), 0);
    }
}

//! Ownership of held entries: which to extend at a heartbeat, which a
//! heartbeat confirmed, and dropping the handlers of entries another member
//! took over.

use std::collections::HashSet;

use super::member::Member;
use crate::broker::Receipt;

impl Member {
    /// Entries to extend at this heartbeat tick: every entry held, so each
    /// is extended at every tick, at most one interval (half of `min_idle`)
    /// apart. Extending only entries held a whole interval skipped an entry
    /// read, or moved from the queue to a handler, just after a tick until
    /// the tick after next: two intervals, up to `min_idle` itself, and the
    /// entry of a live handler could be reclaimed. Entries already found lost
    /// (their batch still running) are not asked about again.
    pub(super) fn due_for_heartbeat(&self) -> Vec<Receipt> {
        self.held
            .values()
            .filter(|h| !h.ownership.is_lost())
            .map(|h| h.ownership.receipt().clone())
            .collect()
    }

    /// A heartbeat asked about `asked`; those not `lost` are still ours.
    pub(super) fn confirm(&self, asked: &[Receipt], lost: &[Receipt]) {
        let asked: HashSet<&Receipt> = asked.iter().collect();
        let lost: HashSet<&Receipt> = lost.iter().collect();
        for held in self.held.values() {
            let receipt = held.ownership.receipt();
            if asked.contains(receipt) && !lost.contains(receipt) {
                held.ownership.confirm();
            }
        }
    }

    /// Another member took these over: drop their handlers, report nothing.
    /// Each loss is logged and counted once.
    pub(super) fn lose(&mut self, lost: Vec<Receipt>) {
        if lost.is_empty() {
            return;
        }
        let lost: HashSet<Receipt> = lost.into_iter().collect();
        let ids: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| !h.ownership.is_lost() && lost.contains(h.ownership.receipt()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let Some(held) = self.held.get(&id) else {
                continue;
            };
            tracing::warn!(
                entry_id = %id,
                "entry was taken over by another member; dropping its handler before it commits",
            );
            self.runtime
                .metrics
                .member(self.index)
                .ownership_lost
                .increment(1);
            held.ownership.mark_lost();
            if held.in_batch {
                // Its batch rolls back and runs again without it.
                continue;
            }
            if let Some(held) = self.held.remove(&id) {
                match held.abort {
                    Some(abort) => {
                        abort.abort();
                        self.lost.insert(id);
                    }
                    None => self.queued.retain(|(delivery, _)| delivery.id() != id),
                }
            }
        }
    }
}

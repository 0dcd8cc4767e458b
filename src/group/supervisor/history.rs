//! A group's recent history, kept compact: consecutive samples with the
//! same figures are stored as one run. A quiet group (most of them, when a
//! process serves thousands of streams) holds a run or two, not an hour of
//! identical copies; a busy one holds at most [`HISTORY_LEN`] runs.

use std::collections::VecDeque;

use crate::status::{HISTORY_LEN, HistorySample};

/// The last [`HISTORY_LEN`] samples of one group.
#[derive(Debug, Default)]
pub(super) struct History {
    runs: VecDeque<Run>,
    /// Samples held, over all runs.
    len: usize,
}

/// Samples in a row with the same figures: the first, when the last was
/// taken, and how many there were.
#[derive(Clone, Copy, Debug)]
struct Run {
    first: HistorySample,
    last_at_ms: u64,
    count: usize,
}

impl Run {
    /// When the `k`-th sample of the run was taken: exact for the first and
    /// the last, spread evenly in between (samples come at a steady pace
    /// while the figures stand still).
    fn at_ms(&self, k: usize) -> u64 {
        if self.count < 2 {
            return self.first.at_ms;
        }
        let span = self.last_at_ms.saturating_sub(self.first.at_ms);
        self.first.at_ms + span * k as u64 / (self.count - 1) as u64
    }
}

/// Whether two samples differ only in when they were taken.
fn same_figures(a: &HistorySample, b: &HistorySample) -> bool {
    HistorySample { at_ms: 0, ..*a } == HistorySample { at_ms: 0, ..*b }
}

impl History {
    /// When the newest sample was taken.
    pub(super) fn last_at_ms(&self) -> Option<u64> {
        self.runs.back().map(|run| run.last_at_ms)
    }

    /// Adds a sample, dropping the oldest beyond [`HISTORY_LEN`].
    pub(super) fn push(&mut self, sample: HistorySample) {
        match self.runs.back_mut() {
            Some(run) if same_figures(&run.first, &sample) => {
                run.count += 1;
                run.last_at_ms = sample.at_ms;
            }
            _ => self.runs.push_back(Run {
                first: sample,
                last_at_ms: sample.at_ms,
                count: 1,
            }),
        }
        self.len += 1;
        while self.len > HISTORY_LEN {
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        let Some(front) = self.runs.front_mut() else {
            return;
        };
        self.len -= 1;
        if front.count == 1 {
            self.runs.pop_front();
            // A busy hour grew the queue; a quiet one after it gives the
            // room back.
            if self.runs.capacity() > 4 * self.runs.len().max(4) {
                self.runs.shrink_to_fit();
            }
        } else {
            front.first.at_ms = front.at_ms(1);
            front.count -= 1;
        }
    }

    /// Every sample held, oldest first.
    pub(super) fn samples(&self) -> Vec<HistorySample> {
        let mut out = Vec::with_capacity(self.len);
        for run in &self.runs {
            out.extend((0..run.count).map(|k| HistorySample {
                at_ms: run.at_ms(k),
                ..run.first
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, acked: u64) -> HistorySample {
        HistorySample {
            at_ms,
            acked,
            lag: Some(0),
            dead_letters: Some(0),
            restarts: 0,
        }
    }

    #[test]
    fn a_quiet_group_is_one_run_that_gives_back_every_sample() {
        let mut history = History::default();
        let taken: Vec<_> = (0..100).map(|i| sample(1_000 + i * 10_000, 7)).collect();
        for s in &taken {
            history.push(*s);
        }
        assert_eq!(history.runs.len(), 1);
        assert_eq!(history.samples(), taken);
        assert_eq!(history.last_at_ms(), Some(1_000 + 99 * 10_000));
    }

    #[test]
    fn a_busy_group_keeps_the_last_samples_only() {
        let mut history = History::default();
        for i in 0..(HISTORY_LEN as u64 + 50) {
            history.push(sample(i * 10_000, i));
        }
        let kept = history.samples();
        assert_eq!(kept.len(), HISTORY_LEN);
        assert_eq!(kept[0], sample(50 * 10_000, 50));
        assert_eq!(
            kept.last(),
            Some(&sample(
                (HISTORY_LEN as u64 + 49) * 10_000,
                HISTORY_LEN as u64 + 49
            ))
        );
    }

    #[test]
    fn the_oldest_run_shrinks_from_its_start() {
        let mut history = History::default();
        // A long quiet run, then a busy stretch that pushes part of it out.
        let mut taken = Vec::new();
        for i in 0..300 {
            taken.push(sample(i * 10_000, 0));
        }
        for i in 300..(HISTORY_LEN as u64 + 100) {
            taken.push(sample(i * 10_000, i));
        }
        for s in &taken {
            history.push(*s);
        }
        assert_eq!(history.samples(), taken[taken.len() - HISTORY_LEN..]);
    }

    #[test]
    fn a_change_in_any_figure_starts_a_new_run() {
        let mut history = History::default();
        history.push(sample(0, 1));
        history.push(HistorySample {
            lag: Some(3),
            ..sample(10, 1)
        });
        history.push(HistorySample {
            restarts: 1,
            ..sample(20, 1)
        });
        history.push(HistorySample {
            dead_letters: None,
            ..sample(30, 1)
        });
        history.push(sample(40, 2));
        assert_eq!(history.runs.len(), 5);
        assert_eq!(history.samples().len(), 5);
    }
}

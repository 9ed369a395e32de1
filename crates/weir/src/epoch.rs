//! Timestamps and epochs.
//!
//! A timely timestamp is `epoch << 32 | batch`: the high half is the checkpoint epoch, the low
//! half counts a source's batches within it. Batches give the flow-control probe fine-grained
//! progress; epochs give barriers. The order is lexicographic, so a frontier past
//! `epoch_start(n + 1)` means epoch `n` is complete everywhere upstream.

use std::collections::BTreeMap;

/// A timely timestamp.
pub type Time = u64;

/// The epoch of a time.
#[inline]
pub const fn epoch_of(t: Time) -> u64 {
    t >> 32
}

/// The first time of an epoch.
#[inline]
pub const fn epoch_start(epoch: u64) -> Time {
    epoch << 32
}

/// What an [`EpochAligner`] asks its operator to do next.
pub(crate) enum Aligned<C, D> {
    /// Epoch `n` is complete at this operator's input: snapshot (the barrier).
    Close(u64),
    /// Process records of the now-current epoch that arrived early.
    Stashed(C, Vec<D>),
}

/// Aligned barriers: records of the current epoch are processed at once; records of later
/// epochs (from upstream workers already past the barrier) wait here until the frontier passes
/// the current epoch.
pub(crate) struct EpochAligner<C, D> {
    epoch: u64,
    stash: BTreeMap<u64, Vec<(C, Vec<D>)>>,
    closed_final: bool,
    /// When the first record of a later epoch arrived (the barrier's first sight).
    aligning_since: Option<std::time::Instant>,
}

impl<C, D> EpochAligner<C, D> {
    pub(crate) fn new(first_epoch: u64) -> Self {
        Self { epoch: first_epoch, stash: BTreeMap::new(), closed_final: false, aligning_since: None }
    }

    /// The open epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Keep records of a later epoch until it opens.
    pub(crate) fn stash(&mut self, epoch: u64, cap: C, data: Vec<D>) {
        debug_assert!(epoch > self.epoch);
        self.aligning_since.get_or_insert_with(std::time::Instant::now);
        self.stash.entry(epoch).or_default().push((cap, data));
    }

    /// At an epoch's close: how long records of a later epoch waited for it (µs), Flink's
    /// alignment duration; 0 when none arrived early.
    pub(crate) fn take_alignment_us(&mut self) -> u64 {
        self.aligning_since.take().map(|t| t.elapsed().as_micros() as u64).unwrap_or(0)
    }

    /// The next thing to do, given the epoch of the input frontier (`None` if the frontier is
    /// empty, in which case `last_epoch` is the final epoch of the job).
    pub(crate) fn next(&mut self, frontier_epoch: Option<u64>, last_epoch: Option<u64>) -> Option<Aligned<C, D>> {
        if let Some(batches) = self.stash.get_mut(&self.epoch) {
            if let Some((cap, data)) = batches.pop() {
                return Some(Aligned::Stashed(cap, data));
            }
            self.stash.remove(&self.epoch);
        }
        let bound = match (frontier_epoch, last_epoch) {
            (Some(f), _) => f,
            (None, Some(last)) if !self.closed_final => last + 1,
            _ => return None,
        };
        if self.epoch < bound {
            let closed = self.epoch;
            self.epoch += 1;
            // Stashed batches were pushed in arrival order; `pop` takes from the back.
            if let Some(b) = self.stash.get_mut(&self.epoch) {
                b.reverse();
            }
            if frontier_epoch.is_none() && closed + 1 == bound {
                self.closed_final = true;
            }
            return Some(Aligned::Close(closed));
        }
        None
    }
}

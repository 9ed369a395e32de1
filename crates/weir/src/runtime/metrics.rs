//! Per-worker operator metrics: counters the operators bump once per batch (plain cells: a
//! worker's operators share its thread), latency from the emit time that sources encode in
//! every batch's timestamp, and the periodic report to the coordinator.
//!
//! Latency, as Flink's latency markers measure it and better: every batch is a marker. A source
//! stamps each batch with its emit time in the low half of the timely timestamp (units of
//! [`STAMP_UNIT_US`] since the wall time at which its epoch opened: the trigger of the
//! checkpoint before it, or the attempt's start), so an operator reads the source → operator
//! latency of every batch it receives from the batch's time alone: no extra records, no extra
//! channel, weighted by records. Clocks of other hosts count as in Flink (wall clocks).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use crate::epoch::{epoch_of, epoch_start, Time};
use crate::monitor::{LatencyHistogram, MetricsReport, OpSample, VertexKind};
use crate::runtime::control::WorkerShared;

/// The resolution of the emit time a source encodes in a batch's timestamp. A source gives each
/// batch a later time than the one before, so batches closer together than this would push
/// stamps ahead of the clock: 10 µs is 100,000 batches a second per source.
pub(crate) const STAMP_UNIT_US: u64 = 10;
/// Stamps use the lower half of the low 32 bits: 2^31 units, about six hours per epoch (with
/// checkpoints off, per attempt). Past that a source counts batches in the upper half as it does
/// without latency tracking, and latency is not measured until the next epoch.
const STAMP_MAX: u64 = 1 << 31;

/// One operator instance's counters.
#[derive(Default)]
pub(crate) struct OpMetrics {
    pub records_in: Cell<u64>,
    pub records_out: Cell<u64>,
    busy_us: Cell<u64>,
    backpressured_us: Cell<u64>,
    reported_busy_us: Cell<u64>,
    reported_backpressured_us: Cell<u64>,
    latency: RefCell<LatencyHistogram>,
}

impl OpMetrics {
    /// `n` records arrived in a batch at time `t`; `now_us` is the wall clock (µs), read once
    /// per activation.
    #[inline]
    pub(crate) fn batch_in(&self, shared: &WorkerShared, t: Time, n: usize, now_us: Option<u64>) {
        self.records_in.set(self.records_in.get() + n as u64);
        if let (Some(now), Some(emitted)) = (now_us, emit_time_us(shared, t)) {
            self.latency.borrow_mut().record(now.saturating_sub(emitted), n as u64);
        }
    }

    #[inline]
    pub(crate) fn out(&self, n: usize) {
        self.records_out.set(self.records_out.get() + n as u64);
    }

    #[inline]
    pub(crate) fn busy_since(&self, t0: Instant) {
        self.busy_us.set(self.busy_us.get() + t0.elapsed().as_micros() as u64);
    }

    #[inline]
    pub(crate) fn backpressured(&self, us: u64) {
        self.backpressured_us.set(self.backpressured_us.get() + us);
    }

    fn sample(&self, vertex: u32) -> OpSample {
        let (busy, bp) = (self.busy_us.get(), self.backpressured_us.get());
        let s = OpSample {
            vertex,
            records_in: self.records_in.get(),
            records_out: self.records_out.get(),
            busy_us_delta: busy - self.reported_busy_us.get(),
            backpressured_us_delta: bp - self.reported_backpressured_us.get(),
            // The report takes the interval's histogram; the next one starts empty.
            latency: std::mem::take(&mut *self.latency.borrow_mut()),
        };
        self.reported_busy_us.set(busy);
        self.reported_backpressured_us.set(bp);
        s
    }
}

/// A vertex of the job graph as one worker built it.
pub(crate) struct VertexInfo {
    pub name: String,
    pub uid: String,
    pub kind: VertexKind,
    pub inputs: Vec<usize>,
    pub metrics: Rc<OpMetrics>,
}

/// The wall time (µs) that batch time `t` encodes, if its epoch's opening time is known here.
#[inline]
pub(crate) fn emit_time_us(shared: &WorkerShared, t: Time) -> Option<u64> {
    let low = t - epoch_start(epoch_of(t));
    if !shared.latency_on || low >= STAMP_MAX {
        return None;
    }
    let base = *shared.trigger_us.get(&epoch_of(t).checked_sub(1)?)?;
    Some(base + low * STAMP_UNIT_US)
}

/// The timestamp a source gives a batch of `epoch` emitted now: the emit time since the epoch
/// opened, never before `current` (a timestamp only moves forward).
#[inline]
pub(crate) fn stamp(shared: &WorkerShared, epoch: u64, current: Time, now_us: u64) -> Time {
    let Some(base) = epoch.checked_sub(1).and_then(|e| shared.trigger_us.get(&e)) else { return current };
    let low = now_us.saturating_sub(*base) / STAMP_UNIT_US;
    if low >= STAMP_MAX {
        return current;
    }
    current.max(epoch_start(epoch) + low)
}

/// The report of one worker's operators since its last one.
pub(crate) fn report(worker: u32, vertices: &[VertexInfo], interval_us: u64) -> MetricsReport {
    MetricsReport { worker, interval_us, ops: vertices.iter().enumerate().map(|(i, v)| v.metrics.sample(i as u32)).collect() }
}

/// A stable 32-hex-digit id for a vertex (Flink's vertex ids are 16 bytes in hex).
pub(crate) fn vertex_id(uid: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("weir-vertex:{uid}").as_bytes());
    h[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_time_reads_back_as_its_emit_time() {
        let mut sh = WorkerShared { latency_on: true, ..Default::default() };
        sh.trigger_us.insert(6, 1_000_000_000);
        let t = stamp(&sh, 7, epoch_start(7), 1_000_123_456);
        assert_eq!(epoch_of(t), 7);
        // Within one stamp unit of the truth, never later.
        let back = emit_time_us(&sh, t).unwrap();
        assert!(back <= 1_000_123_456 && 1_000_123_456 - back < STAMP_UNIT_US, "{back}");
        // Monotone: a clock that steps back keeps the time.
        assert_eq!(stamp(&sh, 7, t, 1_000_000_001), t);
        // An epoch whose opening is unknown here is not measured.
        assert_eq!(emit_time_us(&sh, epoch_start(9) + 5), None);
        // Past the stamp range: the time is kept (the source counts on), and not measured.
        let late = 1_000_000_000 + STAMP_MAX * STAMP_UNIT_US;
        assert_eq!(stamp(&sh, 7, epoch_start(7) + STAMP_MAX + 3, late), epoch_start(7) + STAMP_MAX + 3);
        assert_eq!(emit_time_us(&sh, epoch_start(7) + STAMP_MAX + 3), None);
        sh.latency_on = false;
        assert_eq!(emit_time_us(&sh, t), None);
    }

    #[test]
    fn latency_is_weighted_by_records_and_reported_once() {
        let mut sh = WorkerShared { latency_on: true, ..Default::default() };
        sh.trigger_us.insert(0, 5_000_000);
        let m = OpMetrics::default();
        let t = epoch_start(1) + 10; // emitted at 5_000_100 µs
        m.batch_in(&sh, t, 99, Some(5_002_100)); // 2 ms
        m.batch_in(&sh, t, 1, Some(5_050_100)); // 50 ms
        m.out(7);
        let s = m.sample(3);
        assert_eq!((s.vertex, s.records_in, s.records_out, s.latency.count()), (3, 100, 7, 100));
        let sum = s.latency.summary();
        assert!((sum.p50 - 2.0).abs() < 0.2 && sum.max == 50.0, "{sum:?}");
        assert_eq!(m.sample(3).latency.count(), 0, "a report takes the interval's histogram");
        sh.trigger_us.clear();
    }
}

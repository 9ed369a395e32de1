//! Live figures of the GPU operators for the monitor's GPU panel: each instance of a GPU
//! operator holds a [`GpuProbe`] that counts its batches, their device and transfer time, and
//! measures S = T_cpu / T_gpu on a sample of batches by also running the kernels' CPU twin on
//! the same input.
//!
//! Cost: nothing per record; per batch, one clock read, a few relaxed atomic adds and one box
//! (the [`Pending`] hook). A sampled batch is waited for (its overlap with the next batches is
//! lost) and its input run once more on the CPU path, on the operator's thread; its CPU result is
//! dropped, the GPU result goes on as it would have, in the same place of the output: sampling
//! changes neither output nor order. Samples are at most 1 in [`SAMPLE_EVERY`] batches, at most
//! one per [`MIN_INTERVAL`] per instance, and the next sample waits 99 times the last sample's
//! cost (GPU wait + CPU twin): the sampling takes at most 1 % of an instance's wall time (after
//! its first sample, which is the instance's second batch, so tests see a speedup soon and the
//! pipeline compilation of the first batch is not in it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use weir_gpu::kernels::cpu::CpuKernels;
use weir_gpu::kernels::gpu::GpuKernels;
use weir_gpu::kernels::Kernels;
use weir_gpu::Pending;

/// One batch in this many is a candidate for a sample.
pub const SAMPLE_EVERY: u64 = 64;
/// Samples of one instance are at least this far apart.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The next sample waits this many times the last one's cost: sampling ≤ 1 % of wall time.
const COST_FACTOR: u32 = 99;
/// Weight of the older samples in S (a decayed sum: S follows the recent batches).
const DECAY: f64 = 0.5;

/// What one operator instance reports, shared with the registry.
pub(crate) struct ProbeStats {
    /// The operator's name.
    pub(crate) name: String,
    /// Its kernels (their device context and transfer engine).
    pub(crate) gpu: GpuKernels,
    batches: AtomicU64,
    kernel_ns: AtomicU64,
    transfer_ns: AtomicU64,
    /// Decayed sums of the sampled CPU-twin and GPU times, ns.
    samples: Mutex<Option<(f64, f64)>>,
}

impl ProbeStats {
    /// Batches done on the device.
    pub(crate) fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Device time (submit → result, less host transfer), ns in total.
    pub(crate) fn kernel_ns(&self) -> u64 {
        self.kernel_ns.load(Ordering::Relaxed)
    }

    /// Host transfer time (packing inputs, reading results), ns in total.
    pub(crate) fn transfer_ns(&self) -> u64 {
        self.transfer_ns.load(Ordering::Relaxed)
    }

    /// The decayed sums of sampled (CPU, GPU) times, if a batch was sampled.
    pub(crate) fn samples(&self) -> Option<(f64, f64)> {
        *self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, latency: Duration, transfer: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.kernel_ns.fetch_add(latency.saturating_sub(transfer).as_nanos() as u64, Ordering::Relaxed);
        self.transfer_ns.fetch_add(transfer.as_nanos() as u64, Ordering::Relaxed);
    }

    fn sample(&self, cpu: Duration, gpu: Duration) {
        let (c, g) = (cpu.as_nanos() as f64, gpu.as_nanos() as f64);
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        *s = Some(match *s {
            Some((sc, sg)) => (sc * DECAY + c, sg * DECAY + g),
            None => (c, g),
        });
    }
}

/// Every live probe of the process (instances drop out when their operator does).
static PROBES: Mutex<Vec<Weak<ProbeStats>>> = Mutex::new(Vec::new());

/// The live probes, in the order they were made (dead ones are pruned).
pub(crate) fn live() -> Vec<Arc<ProbeStats>> {
    let mut probes = PROBES.lock().unwrap_or_else(|p| p.into_inner());
    probes.retain(|w| w.strong_count() > 0);
    probes.iter().filter_map(Weak::upgrade).collect()
}

/// When to sample: the second batch, then 1 in [`SAMPLE_EVERY`] no sooner than allowed.
#[derive(Default)]
struct Sampler {
    batches: u64,
    not_before: Option<Instant>,
}

impl Sampler {
    /// Whether the batch about to be submitted at `now` is sampled.
    fn due(&mut self, now: Instant) -> bool {
        let n = self.batches;
        self.batches += 1;
        n % SAMPLE_EVERY == 1 && self.not_before.is_none_or(|t| now >= t)
    }

    /// A sample that cost `cost` (GPU wait + CPU twin) ended at `done`.
    fn sampled(&mut self, done: Instant, cost: Duration) {
        self.not_before = Some(done + MIN_INTERVAL.max(cost * COST_FACTOR));
    }
}

/// One GPU operator instance's probe. Made only on the GPU path: an operator on the CPU path
/// has none, so it is not in the GPU panel and reports no S.
pub(crate) struct GpuProbe {
    stats: Arc<ProbeStats>,
    cpu: CpuKernels,
    sampler: Sampler,
}

impl GpuProbe {
    /// A probe for operator `name` if `kernels` are on the GPU path (registered at once).
    pub(crate) fn new(name: &str, kernels: &dyn Kernels) -> Option<GpuProbe> {
        let gpu = kernels.as_gpu()?.clone();
        let stats = Arc::new(ProbeStats {
            name: name.to_string(),
            gpu,
            batches: AtomicU64::new(0),
            kernel_ns: AtomicU64::new(0),
            transfer_ns: AtomicU64::new(0),
            samples: Mutex::new(None),
        });
        PROBES.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&stats));
        // One thread: what the CPU path runs per worker (`shared_kernels`).
        Some(GpuProbe { stats, cpu: CpuKernels::new(1), sampler: Sampler::default() })
    }

    /// Submit a batch with `gpu` and account for it. On a sampled batch, wait for it (GPU time:
    /// submit → result there), then time `twin` (the same input on the CPU path, given the GPU
    /// result for what it needs besides the input) and drop the twin's result.
    pub(crate) fn run<T: 'static, C>(&mut self, gpu: impl FnOnce() -> Pending<T>, twin: impl FnOnce(&CpuKernels, &T) -> C) -> Pending<T> {
        let t0 = Instant::now();
        let sampled = self.sampler.due(t0);
        let stats = Arc::clone(&self.stats);
        let pending = gpu().on_ready(move |transfer| stats.record(t0.elapsed(), transfer));
        if !sampled {
            return pending;
        }
        let result = pending.wait();
        let t_gpu = t0.elapsed();
        if let Ok(r) = &result {
            let t1 = Instant::now();
            std::hint::black_box(twin(&self.cpu, r));
            let t_cpu = t1.elapsed();
            self.stats.sample(t_cpu, t_gpu);
            self.sampler.sampled(Instant::now(), t_gpu + t_cpu);
        }
        Pending::ready(result)
    }
}

/// [`GpuProbe::run`] where there is a probe, else `gpu()` as is (the CPU path).
pub(crate) fn observe<T: 'static, C>(probe: &mut Option<GpuProbe>, gpu: impl FnOnce() -> Pending<T>, twin: impl FnOnce(&CpuKernels, &T) -> C) -> Pending<T> {
    match probe {
        Some(p) => p.run(gpu, twin),
        None => gpu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The second batch is sampled, then at most 1 in 64 and never within the interval or
    /// sooner than 99 times the last sample's cost.
    #[test]
    fn samples_the_second_batch_then_one_in_64_no_sooner_than_allowed() {
        let mut s = Sampler::default();
        let t = Instant::now();
        let due: Vec<u64> = (0..200).filter(|_| s.due(t)).collect();
        assert_eq!(due, vec![1, 65, 129, 193], "1 in 64 from the second batch");
        let mut s = Sampler::default();
        let mut sampled = Vec::new();
        for i in 0..400u64 {
            // 10 ms between batches: 4 s in all.
            let now = t + Duration::from_millis(10 * i);
            if s.due(now) {
                sampled.push(i);
                s.sampled(now, Duration::from_millis(1));
            }
        }
        // 1, then 65 is at 650 ms (< 1 s after), 129 at 1.29 s, 193 too soon, 257 at 2.57 s, ...
        assert_eq!(sampled, vec![1, 129, 257, 385]);
        let mut s = Sampler::default();
        assert!(!s.due(t) && s.due(t), "the second batch");
        // A sample that cost 50 ms: the next waits 99 × 50 ms ≈ 5 s, not 1 s.
        s.sampled(t, Duration::from_millis(50));
        let later = t + Duration::from_secs(2);
        assert!(!(0..200).any(|_| s.due(later)));
        assert!((0..64).any(|_| s.due(t + Duration::from_millis(4951))));
    }
}

//! The GPU panel of the monitor: the adapter, the memory pool, the transfer engine and each GPU
//! operator's live figures, read on process 0 at every metrics report.
//!
//! The registry is the live GPU operators' probes ([`crate::ops::gpu_probe`]): the contexts in
//! use are those of the job's GPU operators, so a job whose operators all run on the CPU path
//! (or that has none) shows no GPU, even where the process opened a device for an earlier job.

use std::sync::Arc;

use crate::monitor::{GpuOperatorView, GpuView};
use crate::ops::gpu_probe::{self, ProbeStats};

/// What process 0's GPU shows now; `None` when the job uses no GPU.
pub(crate) fn snapshot() -> Option<GpuView> {
    view(&gpu_probe::live())
}

/// The panel over `probes`: the device of the first one (a process opens one device per
/// configuration, so a job's operators share it), its pool, the counters of every transfer
/// engine on it, and the operators on it by name, in the order they were built.
fn view(probes: &[Arc<ProbeStats>]) -> Option<GpuView> {
    let ctx = Arc::clone(probes.first()?.gpu.context());
    let on_ctx: Vec<&Arc<ProbeStats>> = probes.iter().filter(|p| Arc::ptr_eq(p.gpu.context(), &ctx)).collect();
    let mut v = GpuView {
        adapter: ctx.adapter.name.clone(),
        backend: ctx.adapter.backend.clone(),
        device_type: ctx.adapter.device_type.clone(),
        ..GpuView::default()
    };
    let mut engines: Vec<&Arc<ProbeStats>> = Vec::new();
    for p in &on_ctx {
        if !engines.iter().any(|e| e.gpu.same_engine(&p.gpu)) {
            engines.push(p);
        }
    }
    // Each engine's ring lock alone, then the pool's: never nested (transfer.rs's lock order).
    for e in engines {
        let (stats, in_flight) = e.gpu.transfer_stats_and_in_flight();
        v.batches += stats.batches;
        v.bytes_up += stats.bytes_up;
        v.bytes_down += stats.bytes_down;
        v.batches_in_flight += in_flight as u64;
    }
    {
        let pool = ctx.pool.lock().unwrap_or_else(|p| p.into_inner());
        let s = pool.stats();
        (v.pool_budget_bytes, v.pool_reserved_bytes, v.pool_in_use_bytes, v.pool_peak_bytes) = (pool.budget(), s.reserved, s.in_use, s.peak);
    }
    // Per operator name: its instances (one per worker) summed; S over their sampled batches.
    let mut samples: Vec<(f64, f64)> = Vec::new();
    for p in on_ctx {
        let i = match v.operators.iter().position(|o| o.name == p.name) {
            Some(i) => i,
            None => {
                v.operators.push(GpuOperatorView { name: p.name.clone(), ..GpuOperatorView::default() });
                samples.push((0.0, 0.0));
                v.operators.len() - 1
            }
        };
        let o = &mut v.operators[i];
        o.batches += p.batches();
        o.kernel_ms += p.kernel_ns() as f64 / 1e6;
        o.transfer_ms += p.transfer_ns() as f64 / 1e6;
        if let Some((c, g)) = p.samples() {
            samples[i].0 += c;
            samples[i].1 += g;
        }
    }
    for (o, (c, g)) in v.operators.iter_mut().zip(samples) {
        o.speedup = (g > 0.0 && c > 0.0).then_some(c / g);
    }
    Some(v)
}

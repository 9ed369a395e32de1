//! Batches just past the device's real limits (Mesa lavapipe in CI: 65,535 workgroups per
//! dimension, 128 MiB per storage binding): the GPU path splits them into several submissions and
//! returns what the CPU path returns, where wgpu used to panic. Values are small integers, so
//! both paths' f32 results are exact and compared for equality.

use std::sync::Arc;

use weir_gpu::kernels::{cpu::CpuKernels, gpu::GpuKernels, Kernels};
use weir_gpu::{GpuConfig, GpuContext, GpuMode};

/// A device of its own with a 2 GiB budget; `None` (skip) without an adapter unless
/// `WEIR_REQUIRE_GPU=1`.
fn gpu() -> Option<GpuKernels> {
    let required = std::env::var("WEIR_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let cfg = GpuConfig { mode: if required { GpuMode::On } else { GpuMode::Auto }, memory: 4 << 30, fraction: 0.5, ..GpuConfig::default() };
    let ctx = GpuContext::select(&cfg).expect("WEIR_REQUIRE_GPU=1 but no GPU adapter");
    if ctx.is_none() {
        eprintln!("no GPU adapter: limit tests skipped");
    }
    ctx.map(|c| GpuKernels::new(Arc::clone(&c)))
}

/// Workgroups per dimension and the largest storage binding of `g`'s device.
fn limits(g: &GpuKernels) -> (usize, usize) {
    let l = g.context().device.limits();
    (l.max_compute_workgroups_per_dimension as usize, l.max_storage_buffer_binding_size as usize)
}

#[test]
fn kmeans_past_the_dispatch_limit() {
    let Some(g) = gpu() else { return };
    let (groups, _) = limits(&g);
    let n = groups * 64 + 100; // one invocation per point: one workgroup too many
    let points: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
    let centroids = [0.1f32, 0.9];
    let got = g.kmeans_step(&points, &centroids, 1).unwrap();
    let want = CpuKernels::new(1).kmeans_step(&points, &centroids, 1).unwrap();
    assert_eq!(want.counts, vec![n.div_ceil(2) as u32, (n / 2) as u32]);
    assert_eq!(got, want);
}

#[test]
fn gemm_past_the_dispatch_limit() {
    let Some(g) = gpu() else { return };
    let (groups, _) = limits(&g);
    let m = groups * 64 + 1; // 64-row tiles in y: one tile too many
    let a: Vec<f32> = (0..m).map(|i| (i % 7) as f32).collect();
    let got = g.gemm(&a, &[2.0], m, 1, 1).unwrap();
    assert_eq!(got.len(), m);
    assert!(got.iter().enumerate().all(|(i, &c)| c == 2.0 * (i % 7) as f32), "C = 2·A row by row");
}

#[test]
fn gemm_past_the_binding_limit() {
    let Some(g) = gpu() else { return };
    let (_, max_binding) = limits(&g);
    let k = 16;
    let m = max_binding / (k * 4) + 64; // A is 4 KiB over the largest binding
    let a: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32).collect();
    let b = vec![1f32; k];
    let got = g.gemm(&a, &b, m, 1, k).unwrap();
    let want = CpuKernels::new(2).gemm(&a, &b, m, 1, k).unwrap();
    assert_eq!(got, want);
}

/// More points than one shader loop may run on llvmpipe (65,535 iterations): the update pass
/// sums segments, so every point counts (a loop over the whole batch counted the first 65,535).
#[test]
fn kmeans_counts_every_point_of_a_large_batch() {
    let Some(g) = gpu() else { return };
    let n = 100_000;
    let points: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
    let centroids = [0.0f32, 1.0, 2.0];
    let got = g.kmeans_step(&points, &centroids, 1).unwrap();
    assert_eq!(got.counts, vec![33_334, 33_333, 33_333]);
    assert_eq!(got.sums, vec![0.0, 33_333.0, 66_666.0]);
}

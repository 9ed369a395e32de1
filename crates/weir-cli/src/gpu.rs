//! `weir gpu info` and `weir bench gpu`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use weir_gpu::kernels::cpu::CpuKernels;
use weir_gpu::kernels::gpu::GpuKernels;
use weir_gpu::kernels::{Image, Kernels};
use weir_gpu::{GpuConfig, GpuContext, GpuMode};

pub fn info() -> Result<()> {
    let adapters = weir_gpu::device::discover();
    if adapters.is_empty() {
        println!("no Vulkan adapter found: GPU operators run on the CPU path (Debian: apt-get install mesa-vulkan-drivers for lavapipe)");
        return Ok(());
    }
    println!("{:<3} {:<36} {:<11} {:<14} {:<8} {:>14} {:>16}  transfers", "#", "name", "vendor", "type", "backend", "max buffer", "max storage bind");
    for a in &adapters {
        println!(
            "{:<3} {:<36} {:<11} {:<14} {:<8} {:>14} {:>16}  {}",
            a.index,
            a.name,
            a.vendor,
            a.device_type,
            a.backend,
            a.max_buffer_size,
            a.max_storage_binding,
            if a.unified_memory { "direct (host-visible)" } else { "staged" }
        );
    }
    if let Some(ctx) = GpuContext::select(&GpuConfig::default())? {
        println!("weir.gpu.enabled=auto selects #{}: {}", ctx.adapter.index, ctx.adapter.name);
    }
    Ok(())
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    f(); // warm-up: compile pipelines, fill the pool
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// One kernel at one size: times on the CPU (one core, all cores) and the GPU, speed-ups, the
/// share of the GPU time spent moving data (the same batch with its kernels skipped), and the
/// GPU's rate for `flop` operations.
fn measure(label: &str, reps: usize, flop: f64, one: &CpuKernels, all: &CpuKernels, gpu: &GpuKernels, f: impl Fn(&dyn Kernels)) {
    let (t1, tn, tg) = (time(reps, || f(one)), time(reps, || f(all)), time(reps, || f(gpu)));
    let tx = time(reps, || gpu.without_compute(|| f(gpu)));
    println!(
        "{label:<26} {:>11.2} {:>11.2} {:>11.2} {:>9.2} {:>9.2} {:>9.0}% {:>10.1}",
        t1 * 1e3,
        tn * 1e3,
        tg * 1e3,
        t1 / tg,
        tn / tg,
        100.0 * (tx / tg).min(1.0),
        flop / tg / 1e9
    );
}

/// A stream of `batches` K-means batches through `gpu`: one at a time (wait for each) and
/// pipelined (up to `depth` in flight); returns both times.
fn stream_kmeans(gpu: &GpuKernels, pts: &[f32], cents: &[f32], d: usize, batches: usize, depth: usize) -> (f64, f64) {
    let serial = time(1, || {
        for _ in 0..batches {
            gpu.kmeans_step(pts, cents, d).unwrap();
        }
    });
    let piped = time(1, || {
        let mut q = std::collections::VecDeque::new();
        for _ in 0..batches {
            if q.len() == depth {
                let p: weir_gpu::Pending<_> = q.pop_front().unwrap();
                p.wait().unwrap();
            }
            q.push_back(gpu.kmeans_step_async(pts, cents, d));
        }
        q.into_iter().for_each(|p| {
            p.wait().unwrap();
        });
    });
    (serial, piped)
}

pub fn bench(device: Option<String>) -> Result<()> {
    let cfg = GpuConfig { mode: GpuMode::On, device, memory: 8 << 30, fraction: 0.5, ..GpuConfig::default() };
    let ctx = GpuContext::select(&cfg)?.context("no GPU")?;
    let gpu = GpuKernels::new(Arc::clone(&ctx));
    let one = CpuKernels::new(1);
    let all = CpuKernels::all_cores();
    println!(
        "GPU: {} ({}, {}); transfers: {}, ring of {} slots; CPU: {}",
        ctx.adapter.name,
        ctx.adapter.vendor,
        ctx.adapter.device_type,
        if gpu.direct() { "direct (kernels bind host-visible memory)" } else { "staged" },
        gpu.ring_slots(),
        all.name()
    );
    println!(
        "{:<26} {:>11} {:>11} {:>11} {:>9} {:>9} {:>10} {:>10}",
        "kernel", "T_cpu1 ms", "T_cpuN ms", "T_gpu ms", "S(1 core)", "S(all)", "transfer", "GFLOP/s"
    );
    for n in [256usize, 512, 1024] {
        let (a, b) = (rand(n * n, 1), rand(n * n, 2));
        let reps = if n <= 256 { 5 } else { 2 };
        // The CPU side of S is matrixmultiply's sgemm (packed SIMD), not a plain loop.
        measure(&format!("gemm {n}³ (cpu: sgemm)"), reps, 2.0 * (n as f64).powi(3), &one, &all, &gpu, |k| {
            k.gemm(&a, &b, n, n, n).unwrap();
        });
    }
    let (k, d) = (64usize, 32usize);
    let cents = rand(k * d, 3);
    for n in [10_000usize, 100_000, 1_000_000] {
        let pts = rand(n * d, 4);
        let reps = if n <= 100_000 { 3 } else { 1 };
        measure(&format!("kmeans n={n} k={k} d={d}"), reps, 3.0 * (n * k * d) as f64, &one, &all, &gpu, |kern| {
            kern.kmeans_step(&pts, &cents, d).unwrap();
        });
    }
    for (w, h) in [(320usize, 240usize), (1280, 720), (3840, 2160)] {
        let img = Image { w, h, c: 3, data: rand(w * h * 3, 7).into_iter().map(|v| (v + 0.5) * 255.0).collect() };
        let reps = if w <= 1280 { 3 } else { 1 };
        let px = (w * h * 3) as f64;
        measure(&format!("resize {w}×{h}→½ rgb"), reps, 8.0 * px / 4.0, &one, &all, &gpu, |k| {
            k.resize_bilinear(&img, w / 2, h / 2).unwrap();
        });
        measure(&format!("gaussian σ=2 {w}×{h} rgb"), reps, 2.0 * 2.0 * 13.0 * px, &one, &all, &gpu, |k| {
            k.gaussian_blur(&img, 2.0).unwrap();
        });
        measure(&format!("sobel {w}×{h} rgb"), reps, 20.0 * px, &one, &all, &gpu, |k| {
            k.sobel(&img).unwrap();
        });
    }
    let cnn = weir_gpu::cnn::SmallCnn::load(std::path::Path::new("models/digits_cnn.safetensors"), 8, 8)
        .context("models/digits_cnn.safetensors (run from the repository root)")?;
    for n in [256usize, 4096, 65536] {
        let imgs: Vec<f32> = rand(n * 64, 8).into_iter().map(|v| v + 0.5).collect();
        let reps = if n <= 4096 { 3 } else { 1 };
        // conv 8×64×9 + dense 10×128 multiply-adds per image
        measure(&format!("cnn digits batch {n}"), reps, 2.0 * (8.0 * 64.0 * 9.0 + 1280.0) * n as f64, &one, &all, &gpu, |k| {
            k.cnn_forward(&cnn, &imgs, n).unwrap();
        });
    }
    // A stream of batches: one at a time vs pipelined through the ring, on each transfer path.
    let (batches, n) = (32usize, 65_536usize);
    let pts = rand(n * d, 9);
    println!("\nstream of {batches} K-means batches ({n} points, k={k}, d={d}): one at a time vs pipelined ({} in flight)", gpu.ring_slots() - 1);
    let mut paths = vec![(if gpu.direct() { "direct" } else { "staged" }, &gpu)];
    let staged;
    if gpu.direct() {
        staged = GpuKernels::with_transfer(Arc::clone(&ctx), weir_gpu::TransferMode::Staged, gpu.ring_slots())?;
        paths.push(("staged", &staged));
    }
    for (name, g) in paths {
        let (serial, piped) = stream_kmeans(g, &pts, &cents, d, batches, g.ring_slots().saturating_sub(1).max(1));
        let rate = |t: f64| (batches * n) as f64 / t / 1e6;
        println!(
            "  {name:<7} one at a time {:>8.1} ms ({:>6.1} M points/s)   pipelined {:>8.1} ms ({:>6.1} M points/s)   overlap speed-up {:.2}×",
            serial * 1e3,
            rate(serial),
            piped * 1e3,
            rate(piped),
            serial / piped
        );
    }
    // Pool allocations after warm-up: 1000 small batches.
    let (a, b) = (rand(64 * 64, 5), rand(64 * 64, 6));
    gpu.gemm(&a, &b, 64, 64, 64)?;
    let before = gpu.buffer_creations();
    for _ in 0..1000 {
        gpu.gemm(&a, &b, 64, 64, 64)?;
    }
    let stats = ctx.pool.lock().map_err(|_| anyhow::anyhow!("pool"))?.stats();
    let ts = gpu.transfer_stats();
    println!(
        "\ndevice buffers created per 1000 batches after warm-up: {} (pool: {} MiB reserved, peak {} MiB in use, {} allocations served; \
         transfer engine: {} batches, {} staging buffers created, at most {} in flight)",
        gpu.buffer_creations() - before,
        stats.reserved >> 20,
        stats.peak >> 20,
        stats.allocations,
        ts.batches,
        ts.staging_creations,
        ts.max_in_flight
    );
    Ok(())
}

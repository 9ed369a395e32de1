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
    println!("{:<3} {:<36} {:<11} {:<14} {:<8} {:>14} {:>16}  uploads", "#", "name", "vendor", "type", "backend", "max buffer", "max storage bind");
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
            if a.unified_memory { "host-visible" } else { "staged" }
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

/// One result line: times (CPU one core, CPU all cores, GPU), speed-ups, the GPU call's
/// transfer share, and the GPU's rate for `flop` operations.
fn row(label: &str, [t1, tn, tg]: [f64; 3], gpu: &GpuKernels, flop: f64) {
    let tt = gpu.last_times();
    let share = (tt.upload + tt.download).as_secs_f64() / (tt.upload + tt.compute + tt.download).as_secs_f64();
    println!(
        "{label:<26} {:>11.2} {:>11.2} {:>11.2} {:>9.2} {:>9.2} {:>9.0}% {:>10.1}",
        t1 * 1e3,
        tn * 1e3,
        tg * 1e3,
        t1 / tg,
        tn / tg,
        100.0 * share,
        flop / tg / 1e9
    );
}

pub fn bench(device: Option<String>) -> Result<()> {
    let cfg = GpuConfig { mode: GpuMode::On, device, memory: 8 << 30, fraction: 0.5, ..GpuConfig::default() };
    let ctx = GpuContext::select(&cfg)?.context("no GPU")?;
    let gpu = GpuKernels::new(Arc::clone(&ctx));
    let one = CpuKernels::new(1);
    let all = CpuKernels::all_cores();
    println!("GPU: {} ({}, {}); CPU: {}", ctx.adapter.name, ctx.adapter.vendor, ctx.adapter.device_type, all.name());
    println!(
        "{:<26} {:>11} {:>11} {:>11} {:>9} {:>9} {:>10} {:>10}",
        "kernel", "T_cpu1 ms", "T_cpuN ms", "T_gpu ms", "S(1 core)", "S(all)", "transfer", "GFLOP/s"
    );
    for n in [256usize, 512, 1024] {
        let (a, b) = (rand(n * n, 1), rand(n * n, 2));
        let reps = if n <= 256 { 5 } else { 2 };
        let t1 = time(reps, || one.gemm(&a, &b, n, n, n).unwrap());
        let tn = time(reps, || all.gemm(&a, &b, n, n, n).unwrap());
        let tg = time(reps, || gpu.gemm(&a, &b, n, n, n).unwrap());
        row(&format!("gemm {n}×{n}×{n}"), [t1, tn, tg], &gpu, 2.0 * (n as f64).powi(3));
    }
    let (k, d) = (64usize, 32usize);
    let cents = rand(k * d, 3);
    for n in [10_000usize, 100_000, 1_000_000] {
        let pts = rand(n * d, 4);
        let reps = if n <= 100_000 { 3 } else { 1 };
        let t1 = time(reps, || one.kmeans_step(&pts, &cents, d).unwrap());
        let tn = time(reps, || all.kmeans_step(&pts, &cents, d).unwrap());
        let tg = time(reps, || gpu.kmeans_step(&pts, &cents, d).unwrap());
        row(&format!("kmeans n={n} k={k} d={d}"), [t1, tn, tg], &gpu, 3.0 * (n * k * d) as f64);
    }
    for (w, h) in [(320usize, 240usize), (1280, 720), (3840, 2160)] {
        let img = Image { w, h, c: 3, data: rand(w * h * 3, 7).into_iter().map(|v| (v + 0.5) * 255.0).collect() };
        let reps = if w <= 1280 { 3 } else { 1 };
        let px = (w * h * 3) as f64;
        let t = |k: &dyn Kernels| time(reps, || k.resize_bilinear(&img, w / 2, h / 2).unwrap());
        let (t1, tn, tg) = (t(&one), t(&all), t(&gpu));
        row(&format!("resize {w}×{h}→½ rgb"), [t1, tn, tg], &gpu, 8.0 * px / 4.0);
        let t = |k: &dyn Kernels| time(reps, || k.gaussian_blur(&img, 2.0).unwrap());
        let (t1, tn, tg) = (t(&one), t(&all), t(&gpu));
        row(&format!("gaussian σ=2 {w}×{h} rgb"), [t1, tn, tg], &gpu, 2.0 * 2.0 * 13.0 * px);
        let t = |k: &dyn Kernels| time(reps, || k.sobel(&img).unwrap());
        let (t1, tn, tg) = (t(&one), t(&all), t(&gpu));
        row(&format!("sobel {w}×{h} rgb"), [t1, tn, tg], &gpu, 20.0 * px);
    }
    let cnn = weir_gpu::cnn::SmallCnn::load(std::path::Path::new("models/digits_cnn.safetensors"), 8, 8)
        .context("models/digits_cnn.safetensors (run from the repository root)")?;
    for n in [256usize, 4096, 65536] {
        let imgs: Vec<f32> = rand(n * 64, 8).into_iter().map(|v| v + 0.5).collect();
        let reps = if n <= 4096 { 3 } else { 1 };
        let t = |k: &dyn Kernels| time(reps, || k.cnn_forward(&cnn, &imgs, n).unwrap());
        let (t1, tn, tg) = (t(&one), t(&all), t(&gpu));
        // conv 8×64×9 + dense 10×128 multiply-adds per image
        row(&format!("cnn digits batch {n}"), [t1, tn, tg], &gpu, 2.0 * (8.0 * 64.0 * 9.0 + 1280.0) * n as f64);
    }
    // Pool allocations after warm-up: 1000 small batches.
    let (a, b) = (rand(64 * 64, 5), rand(64 * 64, 6));
    gpu.gemm(&a, &b, 64, 64, 64)?;
    let before = gpu.buffer_creations();
    for _ in 0..1000 {
        gpu.gemm(&a, &b, 64, 64, 64)?;
    }
    let stats = ctx.pool.lock().map_err(|_| anyhow::anyhow!("pool"))?.stats();
    println!(
        "\ndevice buffers created per 1000 batches after warm-up: {} (pool: {} MiB reserved, peak {} MiB in use, {} allocations served)",
        gpu.buffer_creations() - before,
        stats.reserved >> 20,
        stats.peak >> 20,
        stats.allocations
    );
    Ok(())
}

//! `weir gpu info` and `weir bench gpu`.

mod peaks;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use weir_gpu::kernels::cpu::CpuKernels;
use weir_gpu::kernels::gpu::GpuKernels;
use weir_gpu::kernels::{Image, Kernels};
use weir_gpu::{GpuConfig, GpuContext, GpuError, GpuMode};

pub fn info() -> Result<()> {
    let adapters = weir_gpu::device::discover();
    if adapters.is_empty() {
        println!("no Vulkan adapter found: GPU operators run on the CPU path (Debian: apt-get install mesa-vulkan-drivers for lavapipe)");
        return Ok(());
    }
    println!(
        "{:<3} {:<36} {:<11} {:<14} {:<8} {:>14} {:>16} {:>12}  transfers",
        "#", "name", "vendor", "type", "backend", "max buffer", "max storage bind", "FP32 TFLOP/s"
    );
    for a in &adapters {
        println!(
            "{:<3} {:<36} {:<11} {:<14} {:<8} {:>14} {:>16} {:>12}  {}",
            a.index,
            a.name,
            a.vendor,
            a.device_type,
            a.backend,
            a.max_buffer_size,
            a.max_storage_binding,
            peaks::fp32_peak(&a.name).map_or("-".to_string(), |p| format!("{:.1}", p.tflops)),
            if a.unified_memory { "direct (host-visible)" } else { "staged" }
        );
    }
    for a in &adapters {
        match peaks::fp32_peak(&a.name) {
            Some(p) => println!("#{} FP32 peak: {:.1} TFLOP/s ({}; non-tensor FP32 at the boost clock)", a.index, p.tflops, p.source),
            None => println!("#{} FP32 peak unknown ('{}' is not in weir's table of known cards)", a.index, a.name),
        }
    }
    if let Some(ctx) = GpuContext::select(&GpuConfig::default())? {
        println!("weir.gpu.enabled=auto selects #{}: {}", ctx.adapter.index, ctx.adapter.name);
    }
    Ok(())
}

/// One size `weir bench gpu` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Case {
    /// An n × n × n GEMM.
    Gemm(usize),
    /// One K-means step over n points (k = 64, d = 32).
    Kmeans(usize),
    /// A w × h RGB image: resize to half, gaussian blur, sobel.
    Image(usize, usize),
    /// The digits CNN over a batch of n images.
    Cnn(usize),
}

/// One `--sizes` token: a preset's cases or a single case.
#[derive(Clone, Debug)]
pub struct Sizes(pub Vec<Case>);

/// What `--sizes` accepts, for its errors.
const ACCEPTED: &str = "accepted: the presets quick, default, full, or KIND:SIZE with KIND gemm (n for an n×n GEMM), kmeans (points), \
                        image (WxH) or cnn (batch) and SIZE a positive integer with an optional k or M suffix \
                        (e.g. --sizes quick,gemm:4096,kmeans:10M,image:1920x1080,cnn:4096)";

/// The cases of a preset.
fn preset(name: &str) -> Option<Vec<Case>> {
    use Case::*;
    Some(match name {
        "quick" => vec![Gemm(128), Gemm(256), Kmeans(10_000), Image(320, 240), Cnn(256)],
        "default" => vec![
            Gemm(256),
            Gemm(512),
            Gemm(1024),
            Kmeans(10_000),
            Kmeans(100_000),
            Kmeans(1_000_000),
            Image(320, 240),
            Image(1280, 720),
            Image(3840, 2160),
            Cnn(256),
            Cnn(4096),
            Cnn(65_536),
        ],
        "full" => vec![
            Gemm(256),
            Gemm(1024),
            Gemm(2048),
            Gemm(4096),
            Kmeans(10_000),
            Kmeans(1_000_000),
            Kmeans(10_000_000),
            Image(320, 240),
            Image(1280, 720),
            Image(1920, 1080),
            Image(3840, 2160),
            Cnn(256),
            Cnn(4096),
            Cnn(65_536),
        ],
        _ => return None,
    })
}

/// A positive count with an optional k (10³) or M (10⁶) suffix: `10k`, `1M`, `4096`.
fn count(s: &str) -> Option<usize> {
    let (digits, unit) = match s.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1_000),
        None => s.strip_suffix(['M', 'm']).map_or((s, 1), |d| (d, 1_000_000)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<usize>().ok()?.checked_mul(unit).filter(|&n| n > 0)
}

/// Parses one comma-separated `--sizes` token (clap's value parser: its errors name the token).
pub fn parse_sizes_token(token: &str) -> Result<Sizes, String> {
    let t = token.trim();
    if let Some(cases) = preset(&t.to_ascii_lowercase()) {
        return Ok(Sizes(cases));
    }
    let Some((kind, size)) = t.split_once(':') else { return Err(format!("neither a preset nor KIND:SIZE; {ACCEPTED}")) };
    let case = match kind.to_ascii_lowercase().as_str() {
        "gemm" => count(size).map(Case::Gemm),
        "kmeans" => count(size).map(Case::Kmeans),
        "cnn" => count(size).map(Case::Cnn),
        "image" => size.split_once(['x', 'X', '×']).and_then(|(w, h)| Some((count(w)?, count(h)?))).filter(|&(w, h)| w >= 2 && h >= 2).map(|(w, h)| Case::Image(w, h)),
        other => return Err(format!("unknown kind '{other}'; {ACCEPTED}")),
    };
    let want = if kind.eq_ignore_ascii_case("image") { "WxH, both at least 2" } else { "a positive integer, optionally with a k or M suffix" };
    case.map(|c| Sizes(vec![c])).ok_or_else(|| format!("'{size}' is not a size ({want}); {ACCEPTED}"))
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

/// Seconds per call of `f` over `reps` calls, after one warm-up call (pipelines compiled, the
/// pool filled) when `warm`.
fn time(reps: usize, warm: bool, mut f: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
    if warm {
        f()?;
    }
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

/// The three paths a row compares, and the GPU's FP32 peak in GFLOP/s where known.
struct Paths<'a> {
    one: &'a CpuKernels,
    all: &'a CpuKernels,
    gpu: &'a GpuKernels,
    peak_gflops: Option<f64>,
}

/// One kernel at one size, in seconds per call: the CPU on one core and on all cores, the GPU,
/// and the GPU's batch with its kernels skipped (the data movement alone).
#[derive(Clone, Copy)]
struct Row {
    t1: f64,
    tn: f64,
    tg: f64,
    tx: f64,
}

/// Times one kernel at one size on the GPU, then the CPU (one core, all cores), and prints
/// the times, speed-ups, the share of the GPU time spent moving data, the CPU's and the GPU's
/// rates for `flop` operations and the GPU's fraction of its FP32 peak. `big`: the CPU runs
/// `reps` times with no warm-up (one core takes long at these sizes). A failure (a size over
/// the device's limits) prints the error in the row and returns None.
fn measure(p: &Paths<'_>, label: &str, reps: usize, big: bool, flop: f64, f: impl Fn(&dyn Kernels) -> Result<(), GpuError>) -> Option<Row> {
    let run = || -> Result<Row, GpuError> {
        let tg = time(reps, true, || f(p.gpu))?;
        let tx = time(reps, true, || p.gpu.without_compute(|| f(p.gpu)))?;
        let t1 = time(reps, !big, || f(p.one))?;
        let tn = time(reps, !big, || f(p.all))?;
        Ok(Row { t1, tn, tg, tx })
    };
    match run() {
        Ok(r) => {
            let gpu_gflops = flop / r.tg / 1e9;
            println!(
                "{label:<26} {:>11.2} {:>11.2} {:>11.2} {:>9.2} {:>9.2} {:>9.0}% {:>12.1} {:>12.1} {:>7}",
                r.t1 * 1e3,
                r.tn * 1e3,
                r.tg * 1e3,
                r.t1 / r.tg,
                r.tn / r.tg,
                100.0 * (r.tx / r.tg).min(1.0),
                flop / r.tn / 1e9,
                gpu_gflops,
                p.peak_gflops.map_or("-".to_string(), |peak| format!("{:.1}%", 100.0 * gpu_gflops / peak))
            );
            Some(r)
        }
        Err(e) => {
            println!("{label:<26} error: {e}");
            None
        }
    }
}

/// Seconds of one call of `f`.
fn time_once(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// A stream of `batches` K-means batches through `gpu`: one at a time (wait for each) and
/// pipelined (up to `depth` in flight), after one batch of warm-up; returns both times.
fn stream_kmeans(gpu: &GpuKernels, pts: &[f32], cents: &[f32], d: usize, batches: usize, depth: usize) -> (f64, f64) {
    gpu.kmeans_step(pts, cents, d).unwrap();
    let serial = time_once(|| {
        for _ in 0..batches {
            gpu.kmeans_step(pts, cents, d).unwrap();
        }
    });
    let piped = time_once(|| {
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

/// `weir gpu tune`'s arguments.
#[derive(clap::Args)]
pub struct TuneArgs {
    /// The adapter (`weir.gpu.device`: index or name substring; default: the one `auto` selects).
    #[arg(long)]
    device: Option<String>,
    /// Square GEMM sizes to measure, increasing.
    #[arg(long, value_delimiter = ',', default_value = "64,128,192,256,384,512,768,1024")]
    sizes: Vec<usize>,
    /// Timed runs per kernel and size (the median counts), after one warm-up run.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The tuning file (`weir.gpu.tuning.file`; default: `$XDG_CACHE_HOME/weir/gpu-tuning.json`,
    /// else `~/.cache/weir/gpu-tuning.json`).
    #[arg(long)]
    file: Option<std::path::PathBuf>,
}

/// `weir gpu tune`.
pub fn tune(args: TuneArgs) -> Result<()> {
    if args.sizes.is_empty() || args.sizes.contains(&0) || !args.sizes.windows(2).all(|w| w[0] < w[1]) {
        anyhow::bail!("--sizes: expected increasing positive sizes, got {:?}", args.sizes);
    }
    let file = args.file.or_else(weir_gpu::kernels::tune::default_tuning_file).context("no tuning file: set --file (neither XDG_CACHE_HOME nor HOME is set)")?;
    // The built-in values while measuring: an earlier tuning must not decide what is compared.
    let cfg = GpuConfig { mode: GpuMode::On, device: args.device, tuning_file: None, ..GpuConfig::default() };
    let ctx = GpuContext::select(&cfg)?.context("no GPU")?;
    let gpu = GpuKernels::new(Arc::clone(&ctx));
    println!("tuning GEMM on {} ({}, driver {}): median of {} runs per kernel and size", ctx.adapter.name, ctx.adapter.vendor, ctx.adapter.driver, args.reps);
    let report = gpu.tune(&args.sizes, args.reps, Some(&file))?;
    println!("{:>6} {:>14} {:>20} {:>20}", "n", "64×64 ms", "128×128 K=8 ms", "128×128 K=16 ms");
    for r in &report.rows {
        let deep = r.deep_ms.map_or("-".to_string(), |d| format!("{d:.3}"));
        println!("{:>6} {:>14.3} {:>20.3} {:>20}", r.n, r.small_ms, r.tiled_ms, deep);
    }
    println!("{:<28} {:>14} {:>14}", "image kernel", "per value ms", "tiled ms");
    for (name, per_value, tiled) in &report.image_rows {
        println!("{name:<28} {per_value:>14.3} {tiled:>14.3}");
    }
    let t = &report.tuning;
    match t.tiled_min_work {
        usize::MAX => println!("the 64×64 kernel at every size measured: the tiled kernel is not used on this adapter"),
        w => println!("tiled kernel from m·n·k = {w} ({}³) on, K steps of {}", (w as f64).cbrt().round(), if t.deep { 16 } else { 8 }),
    }
    println!("image kernels (Gaussian, Sobel): {}", if t.image_tiled { "tiled through workgroup memory" } else { "per value" });
    println!("cached in {} (jobs and benchmarks that open this adapter read it)", file.display());
    Ok(())
}

/// `weir bench gpu`: the cases of `sizes` (the `default` preset when empty), each on one CPU
/// core, all cores and the GPU; then the headline targets where their sizes ran, a
/// stream of K-means batches (when any K-means size ran) and the pool's allocations.
pub fn bench(device: Option<String>, sizes: &[Sizes]) -> Result<()> {
    let cases: BTreeSet<Case> = if sizes.is_empty() {
        preset("default").unwrap_or_default().into_iter().collect()
    } else {
        sizes.iter().flat_map(|s| s.0.iter().copied()).collect()
    };
    let cnn = if cases.iter().any(|c| matches!(c, Case::Cnn(_))) {
        Some(
            weir_gpu::cnn::SmallCnn::load(std::path::Path::new("models/digits_cnn.safetensors"), 8, 8)
                .context("models/digits_cnn.safetensors (run from the repository root)")?,
        )
    } else {
        None
    };
    let cfg = GpuConfig { mode: GpuMode::On, device, memory: 8 << 30, fraction: 0.5, ..GpuConfig::default() };
    let ctx = GpuContext::select(&cfg)?.context("no GPU")?;
    let gpu = GpuKernels::new(Arc::clone(&ctx));
    let one = CpuKernels::new(1);
    let all = CpuKernels::all_cores();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let peak = peaks::fp32_peak(&ctx.adapter.name);
    let paths = Paths { one: &one, all: &all, gpu: &gpu, peak_gflops: peak.as_ref().map(|p| p.tflops * 1e3) };
    println!(
        "GPU: {} ({}, {}); transfers: {}, ring of {} slots",
        ctx.adapter.name,
        ctx.adapter.vendor,
        ctx.adapter.device_type,
        if gpu.direct() { "direct (kernels bind host-visible memory)" } else { "staged" },
        gpu.ring_slots()
    );
    let work = gpu.gemm_tiled_min_work();
    println!(
        "GEMM: the 128×128-tile kernel (K steps of {}) from m·n·k = {} on, the 64×64 one below ({}; `weir gpu tune` measures this adapter)",
        if gpu.gemm_deep() { 16 } else { 8 },
        if work == usize::MAX { "never".to_string() } else { format!("{work} ({}³)", (work as f64).cbrt().round()) },
        if gpu.tuned() { "tuned on this adapter" } else { "built-in values" },
    );
    println!("image kernels (Gaussian, Sobel): {}", if gpu.image_tiled() { "tiled through workgroup memory" } else { "per value" });
    match &peak {
        Some(p) => println!("GPU FP32 peak: {:.1} TFLOP/s ({}; non-tensor FP32 at the boost clock)", p.tflops, p.source),
        None => println!("GPU FP32 peak unknown ('{}' is not in weir's table of known cards): '% peak' shows '-'", ctx.adapter.name),
    }
    println!(
        "CPU: {}; GEMM's CPU BLAS is matrixmultiply's sgemm (packed, cache-blocked SIMD kernels), rows split over the threads; \
         K-means assigns with the centroids transposed, vectorised over them (AVX2 and FMA where the CPU has them); \
         the other CPU kernels are plain loops split over the threads",
        all.name()
    );
    println!(
        "{:<26} {:>11} {:>11} {:>11} {:>9} {:>9} {:>10} {:>12} {:>12} {:>7}",
        "kernel", "T_cpu1 ms", "T_cpuN ms", "T_gpu ms", "S(1 core)", "S(all)", "transfer", "GFLOP/s cpuN", "GFLOP/s gpu", "% peak"
    );
    let (k, d) = (64usize, 32usize);
    let cents = rand(k * d, 3);
    let (mut gemm_4096, mut kmeans_1m) = (None, None);
    for &case in &cases {
        match case {
            Case::Gemm(n) => {
                let (a, b) = (rand(n * n, 1), rand(n * n, 2));
                let reps = if n <= 256 { 5 } else if n < 2048 { 2 } else { 1 };
                let row = measure(&paths, &format!("gemm n={n}"), reps, n >= 2048, 2.0 * (n as f64).powi(3), |k| k.gemm(&a, &b, n, n, n).map(drop));
                if n == 4096 {
                    gemm_4096 = Some(row);
                }
            }
            Case::Kmeans(n) => {
                let pts = rand(n * d, 4);
                let reps = if n <= 100_000 { 3 } else { 1 };
                let row = measure(&paths, &format!("kmeans n={n} k={k} d={d}"), reps, n >= 10_000_000, 3.0 * (n * k * d) as f64, |kern| {
                    kern.kmeans_step(&pts, &cents, d).map(drop)
                });
                if n == 1_000_000 {
                    kmeans_1m = Some(row);
                }
            }
            Case::Image(w, h) => {
                let img = Image { w, h, c: 3, data: rand(w * h * 3, 7).into_iter().map(|v| (v + 0.5) * 255.0).collect() };
                let reps = if w * h <= 1280 * 720 { 3 } else { 1 };
                let big = w * h > 3840 * 2160;
                let px = (w * h * 3) as f64;
                measure(&paths, &format!("resize {w}×{h}→½ rgb"), reps, big, 8.0 * px / 4.0, |k| k.resize_bilinear(&img, w / 2, h / 2).map(drop));
                measure(&paths, &format!("gaussian σ=2 {w}×{h} rgb"), reps, big, 2.0 * 2.0 * 13.0 * px, |k| k.gaussian_blur(&img, 2.0).map(drop));
                measure(&paths, &format!("sobel {w}×{h} rgb"), reps, big, 20.0 * px, |k| k.sobel(&img).map(drop));
            }
            Case::Cnn(n) => {
                let Some(cnn) = &cnn else { continue };
                let imgs: Vec<f32> = rand(n * 64, 8).into_iter().map(|v| v + 0.5).collect();
                let reps = if n <= 4096 { 3 } else { 1 };
                // conv 8×64×9 + dense 10×128 multiply-adds per image
                measure(&paths, &format!("cnn digits batch {n}"), reps, n > 65_536, 2.0 * (8.0 * 64.0 * 9.0 + 1280.0) * n as f64, |k| {
                    k.cnn_forward(cnn, &imgs, n).map(drop)
                });
            }
        }
    }
    // The headline targets, where their sizes ran.
    if gemm_4096.is_some() || kmeans_1m.is_some() {
        println!();
    }
    match gemm_4096 {
        Some(Some(r)) => {
            let gflops = 2.0 * 4096f64.powi(3) / r.tg / 1e9;
            match paths.peak_gflops {
                Some(peak) => {
                    let pct = 100.0 * gflops / peak;
                    println!("GEMM n=4096: {gflops:.1} GFLOP/s = {pct:.1} % of FP32 peak (target ≥ 50 %): {}", if pct >= 50.0 { "met" } else { "not met" })
                }
                None => println!("GEMM n=4096: {gflops:.1} GFLOP/s, peak unknown (target ≥ 50 % of FP32 peak)"),
            }
        }
        Some(None) => println!("GEMM n=4096: no result (the error is in its row) (target ≥ 50 % of FP32 peak)"),
        None => {}
    }
    match kmeans_1m {
        Some(Some(r)) => println!(
            "K-means 1M k={k} d={d}: GPU vs one CPU core {:.1}× (target ≥ 20×): {}, vs all {cores} cores {:.1}×",
            r.t1 / r.tg,
            if r.t1 / r.tg >= 20.0 { "met" } else { "not met" },
            r.tn / r.tg
        ),
        Some(None) => println!("K-means 1M k={k} d={d}: no result (the error is in its row) (target ≥ 20× one CPU core)"),
        None => {}
    }
    // A stream of batches: one at a time vs pipelined through the ring, on each transfer path
    // (32 batches of 65536 points; 8 of the largest size when only smaller K-means sizes ran).
    if let Some(n) = cases.iter().filter_map(|c| if let Case::Kmeans(n) = c { Some(*n) } else { None }).max().map(|n| n.min(65_536)) {
        let batches = if n == 65_536 { 32usize } else { 8 };
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

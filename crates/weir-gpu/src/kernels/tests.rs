//! One test suite, run on the CPU path and on the GPU path. On the GPU path a missing adapter
//! fails the tests when `WEIR_REQUIRE_GPU=1` (CI, on Mesa's lavapipe); it never skips silently.

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;

use super::cpu::CpuKernels;
use super::gpu::GpuKernels;
use super::*;
use crate::device::{GpuConfig, GpuContext, GpuMode};

use crate::test_device::gpu;

/// The same device through the staged transfer path (the default on a discrete GPU; lavapipe
/// defaults to the direct path).
fn gpu_staged() -> Option<&'static GpuKernels> {
    static GPU: OnceLock<Option<GpuKernels>> = OnceLock::new();
    GPU.get_or_init(|| gpu().map(|g| GpuKernels::with_transfer(Arc::clone(g.context()), crate::TransferMode::Staged, 3).unwrap())).as_ref()
}

/// Every path: the CPU, the GPU's default transfer path, and the staged path where the default
/// is direct.
fn paths() -> Vec<&'static dyn Kernels> {
    static CPU: OnceLock<CpuKernels> = OnceLock::new();
    let mut v: Vec<&'static dyn Kernels> = vec![CPU.get_or_init(|| CpuKernels::new(2))];
    if let Some(g) = gpu() {
        v.push(g);
        if g.direct() {
            v.push(gpu_staged().expect("staged path"));
        }
    }
    v
}

fn naive_gemm(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
        }
    }
    c
}

fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// f32 GEMM against an f64 reference: |error| <= 1e-5 × k × max|a|·max|b| + 1e-6.
fn check_gemm_on(kern: &dyn Kernels, m: usize, n: usize, k: usize, seed: u64) {
    let a = lcg(seed, m * k);
    let b = lcg(seed ^ 0xABCD, k * n);
    let got = kern.gemm(&a, &b, m, n, k).unwrap();
    let want = naive_gemm(&a, &b, m, n, k);
    assert_eq!(got.len(), want.len());
    let tol = 1e-5 * k as f64 + 1e-6;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol, "{}: C[{}][{}] = {g}, expected {w} ({m}×{n}×{k})", kern.name(), i / n, i % n);
    }
}

#[test]
fn gemm_matches_reference_on_every_path() {
    for kern in paths() {
        for (m, n, k) in [(1, 1, 1), (64, 64, 64), (65, 63, 17), (130, 7, 200), (3, 129, 64), (200, 200, 1)] {
            check_gemm_on(kern, m, n, k, (m * 1000 + n * 10 + k) as u64);
        }
    }
}

/// A tiled GEMM kernel forced on `g` for m×n×k, against the CPU twin and the f64 reference:
/// errors within 1e-5 × k + 1e-6 of either (inputs in [-1, 1]).
fn check_gemm_tiled_on(g: &GpuKernels, kernel: super::gpu::GemmKernel, m: usize, n: usize, k: usize, seed: u64) {
    let a = lcg(seed, m * k);
    let b = lcg(seed ^ 0xABCD, k * n);
    let got = g.gemm_with(kernel, &a, &b, m, n, k).wait().unwrap();
    let twin = CpuKernels::new(1).gemm(&a, &b, m, n, k).unwrap();
    let want = naive_gemm(&a, &b, m, n, k);
    assert_eq!(got.len(), m * n, "tiled {m}×{n}×{k}");
    let tol = 1e-5 * k as f64 + 1e-6;
    for (i, ((g, t), w)) in got.iter().zip(&twin).zip(&want).enumerate() {
        let (r, c) = (i / n, i % n);
        assert!((*g as f64 - w).abs() <= tol, "tiled: C[{r}][{c}] = {g}, reference {w} ({m}×{n}×{k})");
        assert!((*g as f64 - *t as f64).abs() <= tol, "tiled: C[{r}][{c}] = {g}, CPU twin {t} ({m}×{n}×{k})");
    }
}

/// The default and the staged transfer paths with K steps of 8, and with K steps of 16 where
/// the device admits 32 KiB of workgroup memory (lavapipe does: CI would fail otherwise).
fn deep_variants(g: &'static GpuKernels) -> Vec<(&'static GpuKernels, bool)> {
    let staged = gpu_staged().expect("staged path");
    let mut v = vec![(g, false), (staged, false)];
    if g.gemm_fits(super::gpu::GemmKernel::Tiled { vec4: false, deep: true }) {
        v.extend([(g, true), (staged, true)]);
    } else {
        assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1"), "CI's lavapipe offers 32 KiB of workgroup memory: the deep variant must be tested");
    }
    v
}

#[test]
fn gemm_tiled_matches_cpu_twin_and_reference_on_odd_shapes_and_edge_tiles() {
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let shapes = [
        (1, 1, 1),
        (1, 300, 37),   // 1×N: one row of an edge tile
        (300, 1, 37),   // N×1
        (129, 130, 1),  // k = 1: only the prologue's step, never a full K step
        (128, 128, 8),  // one interior tile, one K step
        (128, 128, 128),
        (256, 128, 40), // two interior tiles, five full K steps
        (127, 129, 9),  // edges in every dimension, one partial K step after a full one
        (257, 131, 15),
        (1, 1, 1000),   // a long K loop on one output
        (5, 200, 3),
        (130, 257, 7),  // k below one step: every load checked
        (200, 300, 64),
    ];
    for (kern, deep) in deep_variants(g) {
        for (m, n, k) in shapes {
            check_gemm_tiled_on(kern, super::gpu::GemmKernel::Tiled { vec4: false, deep }, m, n, k, (m * 7919 + n * 31 + k) as u64);
        }
    }
}

#[test]
fn gemm_tiled_vec4_matches_cpu_twin_and_reference_on_edge_tiles() {
    use super::gpu::GemmKernel;
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    // k and n multiples of 4, m anything: vectors wholly inside or outside A, B and C.
    let shapes = [
        (1, 4, 4),      // one vector of B and C
        (128, 128, 8),  // one interior tile, one K step
        (129, 132, 4),  // edge tiles in m and n, k below one step
        (256, 256, 12), // interior tiles, a partial K step after a full one
        (300, 260, 36),
        (7, 516, 200),
        (130, 4, 1000), // one vector column, a long K loop
    ];
    for (kern, deep) in deep_variants(g) {
        for (m, n, k) in shapes {
            check_gemm_tiled_on(kern, GemmKernel::Tiled { vec4: true, deep }, m, n, k, (m * 7919 + n * 31 + k) as u64);
        }
    }
    // Shapes it cannot take are refused, not computed wrong.
    let (a, b) = (lcg(1, 8 * 6), lcg(2, 6 * 8));
    let err = g.gemm_with(GemmKernel::Tiled { vec4: true, deep: false }, &a, &b, 8, 8, 6).wait().unwrap_err().to_string();
    assert!(err.contains("multiples of 4"), "{err}");
}

#[test]
fn gemm_tiled_splits_rows_within_the_limits() {
    use super::gpu::GemmKernel;
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    // One workgroup per dimension: 128 rows of C per submission, three submissions for 300 rows.
    let limits = crate::transfer::Limits { max_binding: 1 << 20, max_groups: 1 };
    let small = GpuKernels::with_limits(Arc::clone(g.context()), crate::TransferMode::Auto, 2, limits).unwrap();
    let (m, n, k) = (300, 100, 33);
    let (a, b) = (lcg(11, m * k), lcg(12, k * n));
    let before = small.transfer_stats().batches;
    let got = small.gemm_with(GemmKernel::Tiled { vec4: false, deep: false }, &a, &b, m, n, k).wait().unwrap();
    assert_eq!(small.transfer_stats().batches - before, 3, "one submission per 128 rows");
    let want = naive_gemm(&a, &b, m, n, k);
    for (i, (x, w)) in got.iter().zip(&want).enumerate() {
        assert!((*x as f64 - w).abs() <= 1e-5 * k as f64 + 1e-6, "C[{}][{}] = {x}, expected {w}", i / n, i % n);
    }
}

#[test]
fn gemm_takes_the_tiled_kernel_from_the_threshold_on() {
    use super::gpu::{GemmKernel, GEMM_TILED_MIN_WORK};
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    assert_eq!(GEMM_TILED_MIN_WORK, 256 * 256 * 256, "the shapes below straddle the threshold");
    // lavapipe and every real GPU admit 256 invocations and 16 KiB of workgroup memory.
    assert_eq!(g.gemm_kernel_for(256, 256, 256), GemmKernel::Tiled { vec4: true, deep: false });
    assert_eq!(g.gemm_kernel_for(256, 254, 260), GemmKernel::Tiled { vec4: false, deep: false }, "n not a multiple of 4: scalar loads");
    assert_eq!(g.gemm_kernel_for(256, 256, 257), GemmKernel::Tiled { vec4: false, deep: false }, "k not a multiple of 4: scalar loads");
    assert_eq!(g.gemm_kernel_for(256, 256, 255), GemmKernel::Small);
    assert_eq!(g.gemm_kernel_for(1, 1, 1), GemmKernel::Small);
    // Odd shapes just below and just above, through the public entry point on every path.
    for (m, n, k, kernel) in [(257, 255, 255, GemmKernel::Small), (255, 257, 257, GemmKernel::Tiled { vec4: false, deep: false }), (255, 260, 260, GemmKernel::Tiled { vec4: true, deep: false })] {
        assert_eq!(g.gemm_kernel_for(m, n, k), kernel, "{m}×{n}×{k}");
        for kern in paths() {
            check_gemm_on(kern, m, n, k, (m + n + k) as u64);
        }
    }
}

#[test]
fn gpu_path_is_present_when_required() {
    if std::env::var("WEIR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        assert!(gpu().is_some(), "WEIR_REQUIRE_GPU=1 and no GPU path");
        assert!(paths().len() >= 2);
        assert_eq!(paths().len(), if gpu().unwrap().direct() { 3 } else { 2 }, "staged is tested beside direct");
    }
}

#[test]
fn kmeans_step_matches_on_every_path() {
    let d = 8;
    let points = lcg(7, 1000 * d);
    let centroids = lcg(9, 16 * d);
    let want = CpuKernels::new(1).kmeans_step(&points, &centroids, d).unwrap();
    assert_eq!(want.counts.iter().sum::<u32>(), 1000);
    for kern in paths() {
        let got = kern.kmeans_step(&points, &centroids, d).unwrap();
        assert_eq!(got.counts, want.counts, "{}", kern.name());
        for (g, w) in got.sums.iter().zip(&want.sums) {
            assert!((g - w).abs() <= 1e-3, "{}: sum {g} vs {w}", kern.name());
        }
    }
}

#[test]
fn no_buffer_creation_per_batch_after_warm_up() {
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    // A device of its own: the shared one's pool and ring grow with the other tests.
    let cfg = GpuConfig { mode: GpuMode::On, device: Some(g.context().adapter.name.clone()), ..GpuConfig::default() };
    let g = GpuKernels::new(GpuContext::select(&cfg).unwrap().unwrap());
    let a = lcg(1, 100 * 100);
    let want = g.gemm(&a, &a, 100, 100, 100).unwrap();
    // Warm-up: every slot of the ring in use at once.
    let warm: Vec<_> = (0..g.ring_slots()).map(|_| g.gemm_async(&a, &a, 100, 100, 100)).collect();
    warm.into_iter().for_each(|p| assert_eq!(p.wait().unwrap(), want));
    let before = g.buffer_creations();
    // 40 batches, up to 3 in flight: results in order, no buffer created.
    let mut in_flight = std::collections::VecDeque::new();
    for i in 0..40 {
        in_flight.push_back(g.gemm_async(&a, &a, 100, 100, 100));
        if in_flight.len() == 3 || i == 39 {
            while let Some(p) = in_flight.pop_front() {
                assert_eq!(p.wait().unwrap(), want);
            }
        }
    }
    assert_eq!(g.buffer_creations(), before);
    assert!(g.transfer_stats().max_in_flight >= 2, "batches overlapped: {:?}", g.transfer_stats());
}

#[test]
fn out_of_memory_is_a_typed_error() {
    let Some(ctx) = crate::test_device::context(1 << 20, 1.0) else { return };
    let g = GpuKernels::new(ctx);
    let a = vec![1f32; 512 * 512]; // 1 MiB per matrix: three do not fit in 1 MiB
    let err = g.gemm(&a, &a, 512, 512, 512).map(|c| c.len()).unwrap_err();
    assert!(matches!(err, crate::GpuError::OutOfMemory { .. }), "{err}");
    // The pool is intact afterwards.
    assert_eq!(g.gemm(&[2.0], &[3.0], 1, 1, 1).unwrap(), vec![6.0]);
}

#[test]
fn device_selection() {
    let missing = GpuConfig { device: Some("no-such-gpu-xyz".into()), mode: GpuMode::Auto, ..GpuConfig::default() };
    assert!(GpuContext::select(&missing).unwrap().is_none(), "auto falls back to the CPU path");
    let err = GpuContext::select(&GpuConfig { mode: GpuMode::On, ..missing }).unwrap_err();
    assert!(err.to_string().contains("no-such-gpu-xyz"), "{err}");
    let off = GpuConfig { mode: GpuMode::Off, ..GpuConfig::default() };
    assert!(GpuContext::select(&off).unwrap().is_none());
}

/// A GPU path with its image kernels forced tiled or per value (the adapter's choice aside).
struct ImageVariant(&'static GpuKernels, bool);

impl Kernels for ImageVariant {
    fn name(&self) -> String {
        format!("{} {}", self.0.name(), if self.1 { "tiled" } else { "per value" })
    }
    fn gemm_async(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> crate::Pending<Vec<f32>> {
        self.0.gemm_async(a, b, m, n, k)
    }
    fn kmeans_step_async(&self, points: &[f32], centroids: &[f32], d: usize) -> crate::Pending<KmeansStep> {
        self.0.kmeans_step_async(points, centroids, d)
    }
    fn resize_bilinear_async(&self, img: &Image, nw: usize, nh: usize) -> crate::Pending<Image> {
        self.0.resize_bilinear_async(img, nw, nh)
    }
    fn gaussian_blur_async(&self, img: &Image, sigma: f32) -> crate::Pending<Image> {
        self.0.gaussian_blur_with(img, sigma, self.1)
    }
    fn sobel_async(&self, img: &Image) -> crate::Pending<Image> {
        self.0.sobel_with(img, self.1)
    }
    fn cnn_forward_async(&self, cnn: &crate::cnn::SmallCnn, images: &[f32], n: usize) -> crate::Pending<Vec<f32>> {
        self.0.cnn_forward_async(cnn, images, n)
    }
}

/// Every path for the image kernels: the CPU, and each GPU path with its image kernels tiled
/// and per value (whichever the adapter takes by default, both are tested).
fn image_paths() -> Vec<&'static dyn Kernels> {
    static VARIANTS: OnceLock<Vec<ImageVariant>> = OnceLock::new();
    let variants = VARIANTS.get_or_init(|| {
        let gpus = gpu().into_iter().chain(gpu().filter(|g| g.direct()).and(gpu_staged()));
        gpus.flat_map(|g| [ImageVariant(g, true), ImageVariant(g, false)]).collect()
    });
    let mut v = vec![paths()[0]];
    v.extend(variants.iter().map(|x| x as &dyn Kernels));
    v
}

fn test_image(w: usize, h: usize, c: usize, seed: u64) -> Image {
    Image { w, h, c, data: lcg(seed, w * h * c).into_iter().map(|v| (v + 1.0) * 127.5).collect() }
}

fn assert_close(kern: &dyn Kernels, what: &str, got: &Image, want: &Image, tol: f32) {
    assert_eq!((got.w, got.h, got.c), (want.w, want.h, want.c), "{}: {what} shape", kern.name());
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        assert!((g - w).abs() <= tol, "{}: {what} value {i}: {g} vs {w}", kern.name());
    }
}

#[test]
fn image_kernels_match_on_every_path() {
    let reference = CpuKernels::new(1);
    for (w, h, c) in [(1, 1, 1), (17, 9, 3), (64, 48, 1), (5, 70, 3)] {
        let img = test_image(w, h, c, (w * h) as u64);
        let blur = reference.gaussian_blur(&img, 1.5).unwrap();
        let sob = reference.sobel(&img).unwrap();
        let small = reference.resize_bilinear(&img, (w / 2).max(1), (h / 3).max(1)).unwrap();
        let big = reference.resize_bilinear(&img, w * 2 + 1, h + 3).unwrap();
        for kern in image_paths() {
            assert_close(kern, "blur", &kern.gaussian_blur(&img, 1.5).unwrap(), &blur, 1e-3);
            assert_close(kern, "sobel", &kern.sobel(&img).unwrap(), &sob, 1e-2);
            assert_close(kern, "resize down", &kern.resize_bilinear(&img, small.w, small.h).unwrap(), &small, 1e-3);
            assert_close(kern, "resize up", &kern.resize_bilinear(&img, big.w, big.h).unwrap(), &big, 1e-3);
        }
    }
}

#[test]
fn image_kernels_do_what_they_say() {
    let cpu = CpuKernels::new(1);
    // A flat image: blur and resize keep it, Sobel finds no edge.
    let flat = Image { w: 8, h: 6, c: 3, data: vec![42.0; 8 * 6 * 3] };
    for kern in image_paths() {
        assert!(kern.gaussian_blur(&flat, 2.0).unwrap().data.iter().all(|v| (v - 42.0).abs() < 1e-3));
        assert!(kern.resize_bilinear(&flat, 3, 11).unwrap().data.iter().all(|v| (v - 42.0).abs() < 1e-3));
        assert!(kern.sobel(&flat).unwrap().data.iter().all(|v| v.abs() < 1e-3));
    }
    // A vertical edge: Sobel responds on the edge columns only; RGB8 round-trips.
    let mut rgb = vec![0u8; 8 * 4 * 3];
    for y in 0..4 {
        for x in 4..8 {
            rgb[(y * 8 + x) * 3..][..3].copy_from_slice(&[255, 255, 255]);
        }
    }
    let img = Image::from_rgb8(8, 4, &rgb).unwrap();
    assert_eq!(img.to_rgb8(), rgb);
    let edges = cpu.sobel(&img).unwrap();
    for x in 0..8 {
        let v = edges.data[(8 + x) * 3];
        assert_eq!(v > 0.0, x == 3 || x == 4, "column {x}: {v}");
    }
}

/// The tiled image passes and their per-value fallbacks, on shapes that span several tiles and
/// end in partial ones, against the CPU twin; the plan assertions prove which path ran.
#[test]
fn image_kernels_tiled_and_fallback_passes_match_the_cpu_twin() {
    use super::gpu::ImagePlan;
    let reference = CpuKernels::new(1);
    // (w, h, c, σ, blur_h tiled, blur_v tiled, sobel tiled)
    let cases = [
        (300, 130, 3, 1.5, true, true, true),   // 4 row tiles of 256 values, 3 of 54 rows, 9 of 16
        (257, 17, 1, 0.5, true, true, true),    // one value past a 256-value tile
        (70, 200, 1, 9.0, true, false, true),   // r = 27: blur_v falls back
        (9, 7, 90, 8.0, false, true, false),    // r·c = 2160: blur_h falls back; 90 channels: Sobel too
        (1, 40, 2, 2.0, true, true, true),      // one pixel wide
        (40, 1, 3, 2.0, true, true, true),      // one row
    ];
    for (w, h, c, sigma, th, tv, ts) in cases {
        let img = test_image(w, h, c, (w * 31 + h * 7 + c) as u64);
        let r = gaussian_weights(sigma).len() / 2;
        let plan = ImagePlan::new(&img, 65535, true);
        assert_eq!((plan.blur_h(r).is_some(), plan.blur_v(r).is_some(), plan.sobel().is_some()), (th, tv, ts), "{w}×{h}×{c} σ={sigma}");
        let blur = reference.gaussian_blur(&img, sigma).unwrap();
        let sob = reference.sobel(&img).unwrap();
        let down = reference.resize_bilinear(&img, (w / 3).max(1), (h / 2).max(1)).unwrap();
        for kern in image_paths() {
            let what = format!("{w}×{h}×{c} σ={sigma}");
            assert_close(kern, &format!("blur {what}"), &kern.gaussian_blur(&img, sigma).unwrap(), &blur, 1e-3);
            assert_close(kern, &format!("sobel {what}"), &kern.sobel(&img).unwrap(), &sob, 1e-2);
            assert_close(kern, &format!("resize {what}"), &kern.resize_bilinear(&img, down.w, down.h).unwrap(), &down, 1e-3);
        }
    }
}

/// Image kernels against values computed by hand, not by the CPU twin: the blur of an impulse is
/// the outer product of the normalised Gaussian, Sobel of a plane a·x + b·y is 8·√(a² + b²) away
/// from the border, and halving an image bilinearly averages each 2 × 2 block.
#[test]
fn image_kernels_match_hand_computed_values() {
    let (w, h, c) = (301, 77, 2);
    let (cx, cy) = (150usize, 40usize);
    let mut impulse = Image { w, h, c, data: vec![0.0; w * h * c] };
    impulse.data[(cy * w + cx) * c + 1] = 1.0;
    let sigma = 2.0f64;
    let g: Vec<f64> = (-6i32..=6).map(|k| (-(k * k) as f64 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f64 = g.iter().sum();
    let mut ramp = Image { w, h, c, data: vec![0.0; w * h * c] };
    for y in 0..h {
        for x in 0..w {
            ramp.data[(y * w + x) * c] = 0.5 * x as f32 + 0.25 * y as f32;
            ramp.data[(y * w + x) * c + 1] = -2.0 * y as f32;
        }
    }
    let mut blocks = Image { w: 200, h: 60, c: 3, data: Vec::new() };
    blocks.data = lcg(77, 200 * 60 * 3).into_iter().map(|v| (v + 1.0) * 100.0).collect();
    for kern in image_paths() {
        let name = kern.name();
        let blur = kern.gaussian_blur(&impulse, sigma as f32).unwrap();
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as i64 - cx as i64, y as i64 - cy as i64);
                let want = if dx.abs() <= 6 && dy.abs() <= 6 { g[(dx + 6) as usize] * g[(dy + 6) as usize] / (total * total) } else { 0.0 };
                let got = blur.data[(y * w + x) * c + 1] as f64;
                assert!((got - want).abs() < 1e-6, "{name}: blur of the impulse at ({x}, {y}) = {got}, expected {want}");
                assert_eq!(blur.data[(y * w + x) * c], 0.0, "{name}: channel 0 stays black at ({x}, {y})");
            }
        }
        let sob = kern.sobel(&ramp).unwrap();
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                let (g0, g1) = (sob.data[(y * w + x) * c], sob.data[(y * w + x) * c + 1]);
                let want0 = 8.0 * (0.5f32 * 0.5 + 0.25 * 0.25).sqrt();
                assert!((g0 - want0).abs() < 1e-3 && (g1 - 16.0).abs() < 1e-3, "{name}: Sobel of the planes at ({x}, {y}) = {g0}, {g1}");
            }
        }
        let half = kern.resize_bilinear(&blocks, 100, 30).unwrap();
        for y in 0..30 {
            for x in 0..100 {
                for ch in 0..3 {
                    let at = |xx: usize, yy: usize| blocks.data[(yy * 200 + xx) * 3 + ch];
                    let want = (at(2 * x, 2 * y) + at(2 * x + 1, 2 * y) + at(2 * x, 2 * y + 1) + at(2 * x + 1, 2 * y + 1)) / 4.0;
                    let got = half.data[(y * 100 + x) * 3 + ch];
                    assert!((got - want).abs() < 1e-3, "{name}: half-size ({x}, {y}, {ch}) = {got}, expected the 2×2 mean {want}");
                }
            }
        }
    }
}

#[test]
fn cnn_forward_matches_on_every_path_and_loads_the_trained_model() {
    // Cargo sets CARGO_MANIFEST_DIR when it runs a test too: prefer that to the compile-time
    // path, which is stale when a shared target directory reuses a build from another clone.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let path = dir.join("../../models/digits_cnn.safetensors");
    let cnn = crate::cnn::SmallCnn::load(&path, 8, 8).unwrap();
    assert_eq!((cnn.in_c, cnn.conv_c, cnn.classes), (1, 8, 10));
    let n = 37;
    let images: Vec<f32> = lcg(3, n * 64).into_iter().map(|v| (v + 1.0) / 2.0).collect();
    let want = CpuKernels::new(1).cnn_forward(&cnn, &images, n).unwrap();
    for kern in paths() {
        let got = kern.cnn_forward(&cnn, &images, n).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-3, "{}: logit {g} vs {w}", kern.name());
        }
    }
    let mut broken = std::fs::read(&path).unwrap();
    broken.truncate(broken.len() - 10);
    let tmp = std::env::temp_dir().join(format!("weir-broken-{}.safetensors", std::process::id()));
    std::fs::write(&tmp, broken).unwrap();
    let err = crate::cnn::SmallCnn::load(&tmp, 8, 8).unwrap_err().to_string();
    assert!(err.contains("weir-broken") && err.contains("out of bounds"), "{err}");
    std::fs::remove_file(tmp).ok();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn gemm_random_shapes(m in 1usize..150, n in 1usize..150, k in 1usize..150, seed in any::<u64>()) {
        for kern in paths() {
            check_gemm_on(kern, m, n, k, seed);
        }
    }

    #[test]
    fn resize_random_shapes(w in 1usize..40, h in 1usize..40, nw in 1usize..60, nh in 1usize..60, c in 1usize..4, seed in any::<u64>()) {
        let img = test_image(w, h, c, seed);
        let want = CpuKernels::new(1).resize_bilinear(&img, nw, nh).unwrap();
        for kern in paths() {
            assert_close(kern, "resize", &kern.resize_bilinear(&img, nw, nh).unwrap(), &want, 1e-3);
        }
    }

    /// Blur and Sobel on odd shapes and radii: tiles cut anywhere, both sides of every fallback.
    #[test]
    fn blur_and_sobel_random_shapes(w in 1usize..300, h in 1usize..90, c in 1usize..5, sigma in 0.2f32..10.0, seed in any::<u64>()) {
        let img = test_image(w, h, c, seed);
        let cpu = CpuKernels::new(1);
        let (blur, sob) = (cpu.gaussian_blur(&img, sigma).unwrap(), cpu.sobel(&img).unwrap());
        for kern in image_paths() {
            assert_close(kern, "blur", &kern.gaussian_blur(&img, sigma).unwrap(), &blur, 1e-3);
            assert_close(kern, "sobel", &kern.sobel(&img).unwrap(), &sob, 1e-2);
        }
    }
}

/// Two workers contend for a ring of one slot: slots are granted first come first served, so
/// neither runs ahead of the other (with a plain lock the releasing thread tends to win again).
#[test]
fn contending_workers_alternate() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let one = Arc::new(GpuKernels::with_transfer(Arc::clone(g.context()), crate::TransferMode::Auto, 1).unwrap());
    let done: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let start = Arc::new(std::sync::Barrier::new(2));
    let a = lcg(3, 64 * 64);
    let want = g.gemm(&a, &a, 64, 64, 64).unwrap();
    let workers: Vec<_> = (0..2usize)
        .map(|w| {
            let (one, done, start, a, want) = (one.clone(), done.clone(), start.clone(), a.clone(), want.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..100 {
                    assert_eq!(one.gemm(&a, &a, 64, 64, 64).unwrap(), want);
                    done[w].fetch_add(1, Ordering::SeqCst);
                }
                // How far the other worker had come when this one finished.
                done[1 - w].load(Ordering::SeqCst)
            })
        })
        .collect();
    let other: Vec<usize> = workers.into_iter().map(|t| t.join().unwrap()).collect();
    let behind = other.iter().min().unwrap();
    assert!(*behind >= 75, "when one worker finished its 100 batches the other had done {behind}: {other:?}");
    assert!(one.transfer_stats().slot_waits > 0, "the workers contended");
}

/// An independent Lloyd step in f64: labels (lowest index on ties), per-centre sums, counts and
/// sums of |x| (for the tolerance), the new centres (old where no point was assigned), and the
/// points whose two nearest centres are within a relative 2e-6 (where f32 may choose otherwise).
struct LloydReference {
    counts: Vec<u32>,
    sums: Vec<f64>,
    abs_sums: Vec<f64>,
    centres: Vec<f64>,
    near_ties: usize,
}

fn lloyd_f64(points: &[f32], centroids: &[f32], d: usize) -> LloydReference {
    let (n, k) = (points.len() / d, centroids.len() / d);
    let mut r = LloydReference { counts: vec![0; k], sums: vec![0.0; k * d], abs_sums: vec![0.0; k * d], centres: vec![0.0; k * d], near_ties: 0 };
    for p in points.chunks(d).take(n) {
        let dist: Vec<f64> = centroids.chunks(d).map(|c| p.iter().zip(c).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum()).collect();
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(a.cmp(&b)));
        if k > 1 && dist[order[1]] - dist[order[0]] <= 2e-6 * dist[order[1]] {
            r.near_ties += 1;
        }
        let c = order[0];
        r.counts[c] += 1;
        for j in 0..d {
            r.sums[c * d + j] += p[j] as f64;
            r.abs_sums[c * d + j] += (p[j] as f64).abs();
        }
    }
    for i in 0..k * d {
        let cnt = r.counts[i / d];
        r.centres[i] = if cnt == 0 { centroids[i] as f64 } else { r.sums[i] / cnt as f64 };
    }
    r
}

/// `g`'s Lloyd step on n points of d dimensions against k centroids, the last one far from every
/// point when k > 1 (an empty cluster): against the CPU twin (its step, the centres from it as
/// `apply_step`'s rule, an empty cluster unchanged) and the f64 reference. Summation orders
/// differ: sums within 1e-5 of the sum of |x|, centres within a relative 1e-4.
fn check_lloyd_on(g: &GpuKernels, n: usize, k: usize, d: usize, seed: u64) {
    let data = |seed: u64| {
        let points = lcg(seed, n * d);
        let mut centroids = lcg(seed ^ 0x5EED, k * d);
        if k > 1 {
            centroids[(k - 1) * d..].iter_mut().for_each(|x| *x += 1000.0);
        }
        let reference = lloyd_f64(&points, &centroids, d);
        (points, centroids, reference)
    };
    // The first of the seeds from `seed` whose data has no near-tie (in many dimensions random
    // points are nearly equidistant from random centres, and one near-tie in a few hundred
    // points is common).
    let (points, centroids, reference) =
        (seed..seed + 50).map(data).find(|(_, _, r)| r.near_ties == 0).expect("data without near-ties in 50 seeds");
    let what = format!("{}: lloyd n={n} k={k} d={d}", g.name());
    assert_eq!(reference.counts.iter().map(|&c| c as usize).sum::<usize>(), n);
    if k > 1 {
        assert_eq!(reference.counts[k - 1], 0, "{what}: the far centre is empty");
    }
    let twin = CpuKernels::new(1).kmeans_step(&points, &centroids, d).unwrap();
    let (step, centres) = g.kmeans_lloyd_step_async(&points, &centroids, d).wait().unwrap();
    assert_eq!(step.counts, reference.counts, "{what}: counts against the f64 reference");
    assert_eq!(step.counts, twin.counts, "{what}: counts against the CPU twin");
    assert_eq!(centres.len(), k * d, "{what}");
    for i in 0..k * d {
        let tol = 1e-5 * reference.abs_sums[i] + 1e-5;
        assert!((step.sums[i] as f64 - reference.sums[i]).abs() <= tol, "{what}: sum {i}: {} vs {}", step.sums[i], reference.sums[i]);
        assert!((step.sums[i] - twin.sums[i]).abs() as f64 <= 2.0 * tol, "{what}: sum {i}: {} vs twin {}", step.sums[i], twin.sums[i]);
        let cnt = twin.counts[i / d];
        let twin_centre = if cnt == 0 { centroids[i] } else { twin.sums[i] / cnt as f32 };
        let w = reference.centres[i];
        let tol = 1e-4 * w.abs().max(1.0);
        assert!((centres[i] as f64 - w).abs() <= tol, "{what}: centre {i}: {} vs {w}", centres[i]);
        assert!((centres[i] - twin_centre).abs() as f64 <= tol, "{what}: centre {i}: {} vs twin {twin_centre}", centres[i]);
        if cnt == 0 {
            assert_eq!(centres[i], centroids[i], "{what}: an empty cluster keeps its centre");
        }
    }
}

/// Shapes for every path of the K-means kernel: centres in workgroup memory (k·d <= 4096) or not,
/// the workgroup reduction with many lanes (small d), one lane (d >= 64, or k·d + k = 4096) or
/// the fallback beyond workgroup memory (k·d + k > 4096); odd n, n below one workgroup, k = 1,
/// d = 1, an empty cluster, and 200,000 points (196 blocks).
#[test]
fn kmeans_lloyd_step_matches_reference_and_twin() {
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let staged = gpu_staged();
    for (n, k, d) in [
        (1000, 16, 8),
        (1001, 5, 3),
        (777, 1, 4),
        (50, 4, 1),
        (33, 7, 5),
        (1, 3, 2),
        (3000, 64, 63),
        (700, 20, 100),
        (600, 60, 68),
        (500, 100, 50),
        (200_000, 16, 8),
    ] {
        check_lloyd_on(g, n, k, d, (n * 31 + k * 7 + d + 1) as u64);
        if let Some(s) = staged.filter(|_| g.direct() && n <= 1001) {
            check_lloyd_on(s, n, k, d, (n * 31 + k * 7 + d + 1) as u64);
        }
    }
}

/// A batch split over submissions (tiny limits: 128 points each): the steps are added and the
/// centres computed from the total.
#[test]
fn kmeans_lloyd_step_split_over_submissions() {
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let limits = crate::transfer::Limits { max_binding: 4096, max_groups: 2 };
    let small = GpuKernels::with_limits(Arc::clone(g.context()), crate::TransferMode::Auto, 2, limits).unwrap();
    let before = small.transfer_stats().batches;
    check_lloyd_on(&small, 1000, 5, 3, 11);
    assert_eq!(small.transfer_stats().batches - before, 8, "1000 points in submissions of 128");
}

/// 10 M points (beyond one 1-D dispatch of 65,535 × 64): every point counts. Integer
/// coordinates keep the sums exact.
#[test]
fn kmeans_lloyd_step_ten_million_points() {
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let n = 10_000_000;
    let points: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
    let (step, centres) = g.kmeans_lloyd_step_async(&points, &[0.1, 0.9, 2.2, 50.0], 1).wait().unwrap();
    assert_eq!(step.counts, vec![3_333_334, 3_333_333, 3_333_333, 0]);
    assert_eq!(step.sums, vec![0.0, 3_333_333.0, 6_666_666.0, 0.0]);
    assert_eq!(centres, vec![0.0, 1.0, 2.0, 50.0]);
}

#[test]
fn gemm_tuning_threshold_is_where_the_tiled_kernel_wins_from_then_on() {
    use super::tune::threshold;
    // (n, 64×64 ms, tiled ms)
    assert_eq!(threshold(&[(128, 1.0, 2.0), (256, 4.0, 3.0), (512, 20.0, 9.0)]), 256 * 256 * 256);
    assert_eq!(threshold(&[(128, 1.0, 0.5), (256, 4.0, 5.0), (512, 20.0, 9.0)]), 512 * 512 * 512, "a win below a loss does not count");
    assert_eq!(threshold(&[(128, 1.0, 0.5), (256, 2.0, 1.0)]), 128 * 128 * 128);
    assert_eq!(threshold(&[(128, 1.0, 2.0), (256, 2.0, 3.0)]), usize::MAX, "never: the 64×64 kernel always");
    assert_eq!(threshold(&[]), usize::MAX);
}

/// A tuning pass on a device of its own: measured, applied, stored beside another adapter's
/// entry, and taken by the next device opened with the file; a corrupt file is ignored.
#[test]
fn gemm_tuning_is_measured_cached_per_adapter_and_taken_at_start() {
    use super::tune::cached;
    let Some(ctx) = crate::test_device::context(1 << 30, 0.5) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let dir = std::env::temp_dir().join(format!("weir-tune-{}", std::process::id()));
    let file = dir.join("gpu-tuning.json");
    std::fs::create_dir_all(&dir).unwrap();
    let other = r#"{"0123456789abcdef": {"adapter": "Another GPU", "driver": "x 1", "tiled_min_work": 4096, "deep": true, "image_tiled": true, "measured_at": 1}}"#;
    std::fs::write(&file, other).unwrap();
    let g = GpuKernels::new(Arc::clone(&ctx));
    assert_eq!(g.gemm_tiled_min_work(), super::gpu::GEMM_TILED_MIN_WORK, "no tuning file: the built-in value");
    assert_eq!(g.image_tiled(), ctx.adapter.device_type != "Cpu", "untuned: image kernels tiled except on a CPU device");
    assert!(!g.tuned());
    let report = g.tune(&[64, 128], 1, Some(&file)).unwrap();
    assert_eq!(report.image_rows.len(), 2, "Gaussian and Sobel measured");
    assert_eq!(g.image_tiled(), report.tuning.image_tiled, "the image path applied");
    assert_eq!(report.rows.iter().map(|r| r.n).collect::<Vec<_>>(), vec![64, 128]);
    assert!(report.rows.iter().all(|r| r.small_ms > 0.0 && r.tiled_ms > 0.0 && r.deep_ms.is_none_or(|d| d > 0.0)), "{:?}", report.rows);
    assert_eq!(report.rows[1].deep_ms.is_some(), ctx.device.limits().max_compute_workgroup_storage_size >= 32 * 1024, "K steps of 16 measured where they fit");
    assert!([64 * 64 * 64, 128 * 128 * 128, usize::MAX].contains(&report.tuning.tiled_min_work), "{:?}", report.tuning);
    assert_eq!(g.gemm_tiled_min_work(), report.tuning.tiled_min_work, "applied to the device");
    assert_eq!(cached(&file, &ctx.adapter), Some(report.tuning.clone()));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("Another GPU") && text.contains(&ctx.adapter.name), "both adapters' entries: {text}");
    let cfg = GpuConfig { mode: GpuMode::On, device: Some(ctx.adapter.name.clone()), tuning_file: Some(file.clone()), ..GpuConfig::default() };
    let again = GpuKernels::new(GpuContext::select(&cfg).unwrap().unwrap());
    assert_eq!(again.gemm_tiled_min_work(), report.tuning.tiled_min_work, "a device opened later takes the cached value");
    std::fs::write(&file, b"{ not json").unwrap();
    assert_eq!(cached(&file, &ctx.adapter), None, "a corrupt file is ignored");
    let fresh = GpuKernels::new(GpuContext::select(&cfg).unwrap().unwrap());
    assert_eq!(fresh.gemm_tiled_min_work(), super::gpu::GEMM_TILED_MIN_WORK);
    std::fs::remove_dir_all(&dir).ok();
}

/// A point whose distances to the centroids come near f32::MAX: the GPU started its search at
/// 3.4e38, below f32::MAX, where the CPU path starts, so the two took different centroids
/// (the device kept centroid 0, at an infinite distance). Both now take centroid 1.
#[test]
fn kmeans_distances_near_f32_max_pick_the_same_centroid_on_every_path() {
    // (−2e19)² overflows to ∞; 1.8442e19² ≈ 3.4011e38 lies between 3.4e38 and f32::MAX.
    let (points, centroids) = ([0.0f32], [-2e19f32, 1.8442e19]);
    for kern in paths() {
        let step = kern.kmeans_step(&points, &centroids, 1).unwrap();
        assert_eq!(step.counts, vec![0, 1], "{}: the point goes to centroid 1", kern.name());
    }
}

/// lavapipe ends an invocation's loops after 65,535 iterations: a GEMM with a longer K gave
/// wrong sums there (52,429 for k = 530,000 ones). K is now split on such a device.
#[test]
fn gemm_with_a_k_beyond_the_loop_limit_is_exact_on_every_kernel() {
    use super::gpu::GemmKernel;
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let (m, n, k) = (3, 8, 70_004);
    let ones = vec![1.0f32; m.max(n) * k];
    let kernels = [GemmKernel::Small, GemmKernel::Tiled { vec4: false, deep: false }, GemmKernel::Tiled { vec4: true, deep: true }];
    for kernel in kernels.into_iter().filter(|&x| g.gemm_fits(x)) {
        let c = g.gemm_with(kernel, &ones[..m * k], &ones[..k * n], m, n, k).wait().unwrap();
        assert!(c.iter().all(|&v| v == k as f32), "{kernel:?}: {:?}, expected {k} everywhere", &c[..4]);
    }
    let (a, b) = (lcg(5, m * k), lcg(6, k * n));
    let got = g.gemm(&a, &b, m, n, k).unwrap();
    for (i, (x, w)) in got.iter().zip(naive_gemm(&a, &b, m, n, k)).enumerate() {
        assert!((*x as f64 - w).abs() <= 1e-5 * k as f64, "C[{}][{}] = {x}, expected {w}", i / n, i % n);
    }
}

/// Resize one invocation per pixel looped over the channels, beyond lavapipe's loop limit at
/// 65,536 channels (the last channel came out 0): many channels resize per value.
#[test]
fn resize_of_an_image_with_many_channels_matches_the_cpu() {
    let c = 65_600;
    let img = Image { w: 2, h: 1, c, data: (0..2 * c).map(|i| (i % 7) as f32).collect() };
    let want = CpuKernels::new(1).resize_bilinear(&img, 3, 1).unwrap();
    for kern in paths() {
        assert_close(kern, "resize 2×1×65600 → 3×1", &kern.resize_bilinear(&img, 3, 1).unwrap(), &want, 1e-4);
    }
}

/// Work that would run past lavapipe's loop limit is refused with an error naming the shape and
/// the way out, never computed wrong; on other devices it runs.
#[test]
fn work_beyond_the_loop_limit_is_refused_on_a_device_that_has_one() {
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    // k·(d + 1) = 60,000 passed the first check; a loop of N iterations costs N + 1 there, so
    // k·(d + 2) + 1 is what counts (30,000 × 1 and 6,000 × 9 came back with wrong labels).
    for (k, d) in [(256, 300), (30_000, 1), (6_000, 9)] {
        let (points, centroids) = (lcg(1, 10 * d), lcg(2, k * d));
        match g.kmeans_step(&points, &centroids, d) {
            Err(e) => {
                assert!(g.loops_capped(), "refused on a device without the limit: {e}");
                assert!(e.to_string().contains("65,535") && e.to_string().contains("weir.gpu.enabled"), "{e}");
            }
            Ok(step) => {
                assert!(!g.loops_capped(), "lavapipe computed k = {k}, d = {d} past its loop limit");
                assert_eq!(step, CpuKernels::new(1).kmeans_step(&points, &centroids, d).unwrap());
            }
        }
    }
    // A CNN whose logits loop over 17 × 64 × 64 = 69,632 features.
    let cnn = crate::cnn::SmallCnn {
        in_c: 1,
        h: 128,
        w: 128,
        conv_c: 17,
        classes: 2,
        conv_w: lcg(3, 17 * 9),
        conv_b: vec![0.0; 17],
        dense_w: lcg(4, 2 * 17 * 64 * 64),
        dense_b: vec![0.0; 2],
        metadata: Default::default(),
    };
    let images = lcg(5, 128 * 128);
    match g.cnn_forward(&cnn, &images, 1) {
        Err(e) => assert!(g.loops_capped() && e.to_string().contains("65,535"), "{e}"),
        Ok(logits) => {
            assert!(!g.loops_capped(), "lavapipe computed 69,632-feature logits past its loop limit");
            let want = CpuKernels::new(1).cnn_forward(&cnn, &images, 1).unwrap();
            assert!(logits.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-2 * b.abs().max(1.0)), "{logits:?} vs {want:?}");
        }
    }
}

/// K-means with one centroid of 4,000 dimensions: pass 1's lane looped over 1,024 points × 63
/// value strides, past lavapipe's limit (counts came back 0). There it now takes the per-sum pass.
#[test]
fn kmeans_with_thousands_of_dimensions_matches_the_cpu() {
    let (n, d) = (1024, 4000);
    let (points, centroids) = (lcg(8, n * d), lcg(9, d));
    let want = CpuKernels::new(1).kmeans_step(&points, &centroids, d).unwrap();
    for kern in paths() {
        let got = kern.kmeans_step(&points, &centroids, d).unwrap();
        assert_eq!(got.counts, want.counts, "{}", kern.name());
        for (a, b) in got.sums.iter().zip(&want.sums) {
            assert!((a - b).abs() <= 1e-2, "{}: {a} vs {b}", kern.name());
        }
    }
}

/// Writers of the tuning file at once (two `weir gpu tune` on two adapters) keep every entry:
/// the read-modify-write holds a lock, and each writer has a temporary file of its own.
#[test]
fn concurrent_tuning_writers_keep_every_adapter_entry() {
    use super::tune::{cached, store, AdapterTuning};
    let dir = std::env::temp_dir().join(format!("weir-tune-race-{}", std::process::id()));
    let file = dir.join("gpu-tuning.json");
    let adapter = |i: usize| crate::AdapterDesc {
        index: i,
        name: format!("GPU {i}"),
        vendor: "test".into(),
        device_type: "DiscreteGpu".into(),
        backend: "Vulkan".into(),
        driver: "test 1".into(),
        max_buffer_size: 1 << 30,
        max_storage_binding: 1 << 27,
        unified_memory: false,
    };
    std::thread::scope(|s| {
        for i in 0..4 {
            let (file, a) = (&file, adapter(i));
            s.spawn(move || {
                for round in 0..20 {
                    let t = AdapterTuning { adapter: a.name.clone(), driver: a.driver.clone(), tiled_min_work: round, deep: false, image_tiled: true, measured_at: 0 };
                    store(file, &a, &t).unwrap();
                }
            });
        }
    });
    for i in 0..4 {
        assert_eq!(cached(&file, &adapter(i)).map(|t| t.tiled_min_work), Some(19), "adapter {i}'s last entry");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains(".tmp.")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}

//! The GPU path: WGSL kernels on wgpu. Each call is one batch through the
//! [transfer engine](crate::transfer): inputs packed into a mapped staging slot, one submission
//! (copies, kernels, copy-back), the result delivered asynchronously as a [`Pending`]. No buffer
//! is created per batch after warm-up (pool slabs and staging buffers stay constant).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{check_cnn, check_gemm, check_kmeans, gaussian_weights, Image, Kernels, KmeansStep};
use crate::device::GpuContext;
use crate::transfer::{Bind, Engine, Limits, TransferMode, TransferStats};
use crate::{GpuError, Pending};

const GEMM: &str = include_str!("../shaders/gemm.wgsl");
const GEMM_TILED: &str = include_str!("../shaders/gemm_tiled.wgsl");
const GEMM_TILED_SCALAR: &str = include_str!("../shaders/gemm_tiled_scalar.wgsl");
const GEMM_TILED_VEC4: &str = include_str!("../shaders/gemm_tiled_vec4.wgsl");
const KMEANS: &str = include_str!("../shaders/kmeans.wgsl");
const IMAGE: &str = include_str!("../shaders/image.wgsl");
const CNN: &str = include_str!("../shaders/cnn.wgsl");

/// Kernels on a GPU.
#[derive(Clone)]
pub struct GpuKernels {
    pub(crate) ctx: Arc<GpuContext>,
    pub(crate) engine: Arc<Engine>,
}

/// The output bytes of a batch as `T`s (the mapped range is only byte-aligned for us).
fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    bytemuck::pod_collect_to_vec(bytes)
}

impl GpuKernels {
    /// Kernels on `ctx`'s device, with the configured transfer path and ring
    /// (`weir.gpu.transfer.mode`, `weir.gpu.transfer.ring-size`).
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        let (mode, slots) = ctx.transfer;
        Self::with_transfer(ctx, mode, slots).expect("the configured transfer mode was checked when the device was opened")
    }

    /// Kernels on `ctx`'s device through `mode` with a ring of `slots` staging slots.
    pub fn with_transfer(ctx: Arc<GpuContext>, mode: TransferMode, slots: usize) -> Result<Self, GpuError> {
        let engine = Engine::new(Arc::clone(&ctx), mode, slots)?;
        Ok(Self { ctx, engine })
    }

    /// Kernels whose batches stay within `limits` instead of the device's (tests of splitting).
    #[cfg(test)]
    pub(crate) fn with_limits(ctx: Arc<GpuContext>, mode: TransferMode, slots: usize, limits: Limits) -> Result<Self, GpuError> {
        let engine = Engine::with_limits(Arc::clone(&ctx), mode, slots, limits)?;
        Ok(Self { ctx, engine })
    }

    /// The device context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Whether kernels bind host-mapped memory (no staging copies).
    pub fn direct(&self) -> bool {
        self.engine.direct()
    }

    /// Staging slots in the ring.
    pub fn ring_slots(&self) -> usize {
        self.engine.slots()
    }

    /// The transfer engine's counters.
    pub fn transfer_stats(&self) -> TransferStats {
        self.engine.stats()
    }

    /// The transfer engine's counters and its batches in flight now (the monitor's GPU panel).
    pub fn transfer_stats_and_in_flight(&self) -> (TransferStats, usize) {
        self.engine.stats_and_in_flight()
    }

    /// Whether `self` and `other` share one transfer engine (one ring and its counters).
    pub fn same_engine(&self, other: &GpuKernels) -> bool {
        Arc::ptr_eq(&self.engine, &other.engine)
    }

    /// Device buffers created so far: pool slabs plus staging buffers.
    pub fn buffer_creations(&self) -> u64 {
        // The ring's counters before the pool's: never the ring while holding the pool (the lock
        // order of transfer.rs).
        let staging = self.engine.stats().staging_creations;
        self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).stats().slab_creations + staging
    }

    /// Run `f` with kernels skipped: the same uploads, clears and downloads, no compute (the
    /// benchmark's measure of transfer time). Results are meaningless meanwhile.
    pub fn without_compute<R>(&self, f: impl FnOnce() -> R) -> R {
        self.engine.skip_compute.store(true, Ordering::Relaxed);
        let r = f();
        self.engine.skip_compute.store(false, Ordering::Relaxed);
        r
    }

    /// Whether this device ends an invocation's loops early: Mesa's llvmpipe (lavapipe, a CPU
    /// device) silently stops them after 65,535 iterations in all, leaving wrong results.
    pub(crate) fn loops_capped(&self) -> bool {
        self.ctx.loops_capped
    }

    /// Refuse work of `iterations` loop iterations per invocation on a device that would end
    /// them early ([`GpuKernels::loops_capped`]), naming `what` (built only then); Ok elsewhere.
    pub(crate) fn check_loops(&self, iterations: usize, what: impl FnOnce() -> String) -> Result<(), GpuError> {
        if self.loops_capped() && iterations > LOOP_BUDGET {
            return Err(GpuError::Input(format!(
                "{}: {iterations} loop iterations per GPU invocation; {} ({}) ends an invocation's loops after 65,535, \
                 which would give wrong results: use a smaller shape, or the CPU path (weir.gpu.enabled: false)",
                what(),
                self.ctx.adapter.name,
                self.ctx.adapter.driver
            )));
        }
        Ok(())
    }

    /// The compiled pipeline of `entry`, with an explicit layout of `bindings` read-write storage
    /// buffers (an automatic layout would drop the bindings an entry point does not use).
    pub(crate) fn pipeline(&self, key: &'static str, src: &'static str, entry: &'static str, bindings: u32) -> Arc<wgpu::ComputePipeline> {
        let mut cache = self.ctx.pipelines.lock().expect("pipelines");
        cache
            .entry(key)
            .or_insert_with(|| {
                let module = self.ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(key),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                });
                let entries: Vec<wgpu::BindGroupLayoutEntry> = (0..bindings)
                    .map(|binding| wgpu::BindGroupLayoutEntry {
                        binding,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage { read_only: false },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    })
                    .collect();
                let bgl = self.ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(key), entries: &entries });
                let layout = self.ctx.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(key),
                    bind_group_layouts: &[Some(&bgl)],
                    ..Default::default()
                });
                Arc::new(self.ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key),
                    layout: Some(&layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                }))
            })
            .clone()
    }
}

/// An input error as a ready result, or the checked value.
macro_rules! checked {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Pending::ready(Err(e)),
        }
    };
}

impl Kernels for GpuKernels {
    fn name(&self) -> String {
        format!("gpu ({})", self.ctx.adapter.name)
    }

    fn as_gpu(&self) -> Option<&GpuKernels> {
        Some(self)
    }

    fn gemm_async(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Pending<Vec<f32>> {
        self.gemm_with(self.gemm_kernel_for(m, n, k), a, b, m, n, k)
    }

    fn kmeans_step_async(&self, points: &[f32], centroids: &[f32], d: usize) -> Pending<KmeansStep> {
        self.kmeans_lloyd_step_async(points, centroids, d).map(|(step, _)| step)
    }

    fn resize_bilinear_async(&self, img: &Image, nw: usize, nh: usize) -> Pending<Image> {
        checked!(img.check());
        if nw == 0 || nh == 0 {
            return Pending::ready(Err(GpuError::Input(format!("resize to {nw}×{nh}"))));
        }
        // One invocation per pixel loops over its channels: per value beyond a few (lavapipe
        // ends loops after 65,535 iterations; on a GPU long loops idle the other invocations).
        let pass = if img.c <= RESIZE_PX_MAX_CHANNELS {
            let (gx, gy) = grid(nw * nh);
            ("image_resize_px", "resize_px", gx, gy)
        } else {
            let (gx, gy) = grid(nw * nh * img.c);
            ("image_resize", "resize", gx, gy)
        };
        self.image_passes(img, nw, nh, &[0.0], 0, &[pass])
    }

    fn gaussian_blur_async(&self, img: &Image, sigma: f32) -> Pending<Image> {
        self.gaussian_blur_with(img, sigma, self.image_tiled())
    }

    fn sobel_async(&self, img: &Image) -> Pending<Image> {
        self.sobel_with(img, self.image_tiled())
    }

    fn cnn_forward_async(&self, m: &crate::cnn::SmallCnn, images: &[f32], n: usize) -> Pending<Vec<f32>> {
        checked!(check_cnn(m, images, n));
        // A logit loops over the features, a convolution over the input channels × 3 × 3.
        checked!(self.check_loops(m.conv_c * (m.h / 2) * (m.w / 2) + 16 * m.in_c + 8, || format!("cnn: a model of {} features", m.conv_c * (m.h / 2) * (m.w / 2))));
        if n == 0 {
            return Pending::ready(Ok(Vec::new()));
        }
        let dims = [n as u32, m.in_c as u32, m.h as u32, m.w as u32, m.conv_c as u32, m.classes as u32, 0, 0];
        let conv_len = n * m.conv_c * m.h * m.w;
        let pool_len = conv_len / 4;
        let pass = |entry: &'static str, len: usize| {
            let (gx, gy) = grid(len);
            (self.pipeline(entry, CNN, entry, 9), gx, gy)
        };
        let out_len = n * m.classes;
        self.engine.submit(
            &[
                Bind::In(bytemuck::cast_slice(images)),
                Bind::In(bytemuck::cast_slice(&m.conv_w)),
                Bind::In(bytemuck::cast_slice(&m.conv_b)),
                Bind::Out((conv_len * 4) as u64),
                Bind::Out((pool_len * 4) as u64),
                Bind::In(bytemuck::cast_slice(&m.dense_w)),
                Bind::In(bytemuck::cast_slice(&m.dense_b)),
                Bind::Out((out_len * 4) as u64),
                Bind::In(bytemuck::cast_slice(&dims)),
            ],
            &[pass("conv_relu", conv_len), pass("max_pool", pool_len), pass("dense", out_len)],
            7,
            move |bytes| Ok(cast::<f32>(&bytes[..out_len * 4])),
        )
    }
}

/// K per product on a device that ends loops early (a multiple of 4: the vec4 kernel's K parts
/// stay aligned).
const GEMM_CAPPED_K: usize = 32_768;

/// Loop iterations per invocation allowed on a device that ends loops after 65,535 in all
/// (lavapipe), with a margin for a kernel's short loops (tile loads, zeroing).
pub(crate) const LOOP_BUDGET: usize = 60_000;

/// Loop iterations of K-means' assignment per point, counted as lavapipe counts them (a loop of
/// N iterations costs N + 1): k centroids × d dimensions, and the centres' copy to workgroup
/// memory.
pub(crate) fn kmeans_assign_loops(k: usize, d: usize) -> usize {
    k * (d + 2) + (k * d).div_ceil(64) + 2
}

/// Points per block of the K-means update (`slice` in kmeans.wgsl): one workgroup's share in the
/// reduction; every shader loop stays far below llvmpipe's 65,535 iterations, and a submission's
/// at most 65,535 × 64 points make at most 4,096 blocks.
const KMEANS_BLOCK: usize = 1024;

/// Floats of workgroup memory the K-means shader declares per entry point (`CENTRES` and `ACC` in
/// kmeans.wgsl): 16 KiB, the least every WebGPU device offers.
const KMEANS_WORKGROUP_FLOATS: usize = 4096;

/// Lanes of the K-means update's pass 1 (`partial` in kmeans.wgsl) for `k` centres of `d`
/// dimensions: as many as 64 invocations split into lanes of at least `d` invocations and
/// whose accumulators fit workgroup memory; 0 when one lane's do not (the fallback pass).
fn kmeans_lanes(k: usize, d: usize) -> usize {
    (64 / d.min(64)).min(KMEANS_WORKGROUP_FLOATS / (k * d + k))
}

/// Rows of a batch per submission: as many as `max_groups` workgroups of `rows_per_group` rows
/// cover, and as fit the largest storage binding in each binding of `row_bytes[i]` bytes per row.
/// 0 when a single row does not fit.
pub(crate) fn rows_per_submission(limits: Limits, rows_per_group: usize, row_bytes: &[usize]) -> usize {
    let by_groups = limits.max_groups as usize * rows_per_group;
    row_bytes.iter().filter(|&&b| b > 0).map(|&b| (limits.max_binding as usize) / b).fold(by_groups, usize::min)
}

/// The GEMM shaders: gemm.wgsl (64×64 tiles, 4×4 outputs per invocation) and gemm_tiled.wgsl
/// (128×128 tiles, 8×8 outputs per invocation, double-buffered K steps) in four variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmKernel {
    /// gemm.wgsl: fewer idle invocations on small or thin shapes.
    Small,
    /// gemm_tiled.wgsl with vec4 global loads and stores (k and n positive multiples of 4) or
    /// scalar ones (any shape); K steps of 16 (`deep`: 32 KiB of workgroup memory, half the
    /// barriers) or of 8 (16 KiB).
    Tiled { vec4: bool, deep: bool },
}

impl GemmKernel {
    /// Rows and columns of C per workgroup.
    fn tile(self) -> usize {
        match self {
            GemmKernel::Small => 64,
            GemmKernel::Tiled { .. } => 128,
        }
    }

    /// Whether the kernel computes an m×n×k product: the vec4 ones need k and n multiples of 4.
    pub(crate) fn admits(self, n: usize, k: usize) -> bool {
        !matches!(self, GemmKernel::Tiled { vec4: true, .. }) || (n.is_multiple_of(4) && k.is_multiple_of(4) && n > 0 && k > 0)
    }

    /// Bytes of workgroup memory.
    fn workgroup_bytes(self) -> u32 {
        match self {
            GemmKernel::Small => 8 * 1024,
            GemmKernel::Tiled { deep, .. } => if deep { 32 * 1024 } else { 16 * 1024 },
        }
    }

    fn index(self) -> usize {
        match self {
            GemmKernel::Small => 4,
            GemmKernel::Tiled { vec4, deep } => vec4 as usize + 2 * deep as usize,
        }
    }

    /// The shader source: the tiled kernel with its K step and its prelude of bindings, loads
    /// and stores.
    fn source(self) -> &'static str {
        use std::sync::OnceLock;
        static TILED: [OnceLock<String>; 4] = [const { OnceLock::new() }; 4];
        match self {
            GemmKernel::Small => GEMM,
            GemmKernel::Tiled { vec4, deep } => TILED[self.index()].get_or_init(|| {
                let prelude = if vec4 { GEMM_TILED_VEC4 } else { GEMM_TILED_SCALAR };
                format!("const TK: u32 = {}u;\n{prelude}\n{GEMM_TILED}", if deep { 16 } else { 8 })
            }),
        }
    }

    /// The pipeline cache's key.
    fn key(self) -> &'static str {
        ["gemm_tiled", "gemm_tiled_vec4", "gemm_tiled_deep", "gemm_tiled_vec4_deep", "gemm"][self.index()]
    }
}

/// m·n·k from which gemm_async takes the tiled kernel unless the adapter was tuned
/// ([`tune`](super::tune)): below it, a 128×128 tile leaves most of a GPU's cores idle (e.g. 128³
/// is one workgroup), and the 64×64 kernel's four times as many workgroups finish sooner.
pub const GEMM_TILED_MIN_WORK: usize = 256 * 256 * 256;

/// The sources of the kernels a tuning pass chooses between (the tuning file's key changes with
/// them).
pub(crate) fn tuned_sources() -> [&'static str; 5] {
    [GEMM, GEMM_TILED, GEMM_TILED_SCALAR, GEMM_TILED_VEC4, IMAGE]
}

impl GpuKernels {
    /// Whether this device's limits admit `kernel` (256 invocations of 16 × 16, its workgroup
    /// memory).
    pub(crate) fn gemm_fits(&self, kernel: GemmKernel) -> bool {
        let l = self.ctx.device.limits();
        kernel == GemmKernel::Small
            || (l.max_compute_invocations_per_workgroup >= 256
                && l.max_compute_workgroup_size_x >= 16
                && l.max_compute_workgroup_size_y >= 16
                && l.max_compute_workgroup_storage_size >= kernel.workgroup_bytes())
    }

    /// The GEMM shader for an m×n×k product on this device: the tiled one from the device's
    /// threshold on (built in or tuned), with vec4 global loads where k and n are multiples of 4
    /// and K steps of 16 where tuning found them faster, within the device's limits.
    pub(crate) fn gemm_kernel_for(&self, m: usize, n: usize, k: usize) -> GemmKernel {
        use std::sync::atomic::Ordering::Relaxed;
        if m.saturating_mul(n).saturating_mul(k) < self.gemm_tiled_min_work() {
            return GemmKernel::Small;
        }
        let vec4 = GemmKernel::Tiled { vec4: true, deep: false }.admits(n, k);
        let deep = self.ctx.gemm_deep.load(Relaxed);
        [GemmKernel::Tiled { vec4, deep }, GemmKernel::Tiled { vec4, deep: false }].into_iter().find(|&g| self.gemm_fits(g)).unwrap_or(GemmKernel::Small)
    }

    /// `C[m×n] = A[m×k] · B[k×n]` through `kernel`, split into submissions by rows.
    pub(crate) fn gemm_with(&self, kernel: GemmKernel, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Pending<Vec<f32>> {
        checked!(check_gemm(a, b, m, n, k));
        if !kernel.admits(n, k) {
            return Pending::ready(Err(GpuError::Input(format!("gemm {m}×{n}×{k}: the {kernel:?} kernel needs k and n multiples of 4"))));
        }
        if !self.gemm_fits(kernel) {
            return Pending::ready(Err(GpuError::Input(format!("gemm: the {kernel:?} kernel exceeds the device's workgroup limits"))));
        }
        if m == 0 || n == 0 {
            return Pending::ready(Ok(vec![0.0; m * n]));
        }
        // lavapipe ends an invocation's loops after 65,535 iterations (about 1.25 per k): split
        // a long K into products of at most GEMM_CAPPED_K and add them on the host.
        if self.loops_capped() && k > GEMM_CAPPED_K {
            let parts = (0..k).step_by(GEMM_CAPPED_K).map(|k0| {
                let kc = GEMM_CAPPED_K.min(k - k0);
                let a_part: Vec<f32> = a.chunks_exact(k).flat_map(|row| &row[k0..k0 + kc]).copied().collect();
                self.gemm_with(kernel, &a_part, &b[k0 * n..(k0 + kc) * n], m, n, kc)
            });
            return Pending::all(parts.collect()).map(move |cs: Vec<Vec<f32>>| {
                let mut c = vec![0f32; m * n];
                for part in cs {
                    c.iter_mut().zip(part).for_each(|(x, y)| *x += y);
                }
                c
            });
        }
        let limits = self.engine.limits();
        let tile = kernel.tile();
        // B is bound whole and its column tiles are the dispatch's x: only rows split.
        if k * n * 4 > limits.max_binding as usize || n.div_ceil(tile) > limits.max_groups as usize {
            return Pending::ready(Err(GpuError::Input(format!(
                "gemm {m}×{n}×{k}: B is {} bytes in {} column tiles; the device binds at most {} bytes and dispatches at most {} workgroups per dimension",
                k * n * 4,
                n.div_ceil(tile),
                limits.max_binding,
                limits.max_groups
            ))));
        }
        // Rows of A and C per submission: row tiles in y, A and C bindings within the limit.
        let rows = rows_per_submission(limits, tile, &[k * 4, n * 4]);
        if rows == 0 {
            return Pending::ready(Err(GpuError::Input(format!(
                "gemm {m}×{n}×{k}: one row of A ({} bytes) or C ({} bytes) exceeds the device's largest storage binding ({} bytes)",
                k * 4,
                n * 4,
                limits.max_binding
            ))));
        }
        if m <= rows {
            return self.gemm_rows(kernel, a, b, m, n, k);
        }
        let parts = (0..m).step_by(rows).map(|r0| {
            let r = rows.min(m - r0);
            self.gemm_rows(kernel, &a[r0 * k..(r0 + r) * k], b, r, n, k)
        });
        Pending::all(parts.collect()).map(|chunks: Vec<Vec<f32>>| chunks.concat())
    }

    /// One submission of `C[m×n] = A[m×k] · B[k×n]` through `kernel` (within the device's limits).
    fn gemm_rows(&self, kernel: GemmKernel, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Pending<Vec<f32>> {
        let dims = [m as u32, n as u32, k as u32, 0];
        let pipe = self.pipeline(kernel.key(), kernel.source(), "main", 4);
        let tile = kernel.tile();
        self.engine.submit(
            &[Bind::In(bytemuck::cast_slice(a)), Bind::In(bytemuck::cast_slice(b)), Bind::Out((m * n * 4) as u64), Bind::In(bytemuck::cast_slice(&dims))],
            &[(pipe, n.div_ceil(tile) as u32, m.div_ceil(tile) as u32)],
            2,
            move |bytes| Ok(cast::<f32>(&bytes[..m * n * 4])),
        )
    }

    /// One submission of a K-means step over `n` points (within the device's limits): assign, the
    /// blocks' partial sums, their reduction and the new centres. The step and the new centres.
    fn kmeans_points(&self, points: &[f32], centroids: &[f32], n: usize, k: usize, d: usize) -> Pending<(KmeansStep, Vec<f32>)> {
        let blocks = n.div_ceil(KMEANS_BLOCK).max(1);
        let lanes = kmeans_lanes(k, d);
        let dims = [n as u32, k as u32, d as u32, lanes as u32, blocks as u32, KMEANS_BLOCK as u32, 0, 0];
        let (ax, ay) = grid(n);
        // Centres in workgroup memory where they fit; else read from storage.
        let assign = if k * d <= KMEANS_WORKGROUP_FLOATS {
            (self.pipeline("kmeans_assign_tiled", KMEANS, "assign_tiled", 6), ax, ay)
        } else {
            (self.pipeline("kmeans_assign", KMEANS, "assign", 6), ax, ay)
        };
        // Pass 1: a workgroup per block where one lane's accumulators fit workgroup memory (and,
        // on lavapipe, a lane's loop over its points and their values stays within the limit).
        let lane_loops = if lanes > 0 { (KMEANS_BLOCK.div_ceil(lanes) + 1) * (d.div_ceil(64 / lanes) + 2) + 2 * (lanes * (k * d + k)).div_ceil(64) + 4 } else { 0 };
        let update = if lanes > 0 && !(self.loops_capped() && lane_loops > LOOP_BUDGET) {
            (self.pipeline("kmeans_partial", KMEANS, "partial", 6), blocks as u32, 1)
        } else {
            (self.pipeline("kmeans_update", KMEANS, "update", 6), (k * d).div_ceil(64) as u32, blocks as u32)
        };
        let reduce = (self.pipeline("kmeans_reduce", KMEANS, "reduce", 6), (k * d + k).div_ceil(64) as u32, 1);
        self.engine.submit(
            &[
                Bind::In(bytemuck::cast_slice(points)),
                Bind::In(bytemuck::cast_slice(centroids)),
                Bind::Out((n * 4) as u64),
                Bind::Out(((2 * k * d + k) * 4) as u64),
                Bind::In(bytemuck::cast_slice(&dims)),
                Bind::Out((blocks * (k * d + k) * 4) as u64),
            ],
            &[assign, update, reduce],
            3,
            move |bytes| {
                let vals: Vec<f32> = cast(&bytes[..(2 * k * d + k) * 4]);
                let counts = vals[k * d..k * d + k].iter().map(|&c| c as u32).collect();
                Ok((KmeansStep { sums: vals[..k * d].to_vec(), counts }, vals[k * d + k..].to_vec()))
            },
        )
    }

    /// One Lloyd step of K-means: the [`Kernels::kmeans_step`] of `points` (n × d) against
    /// `centroids` (k × d), and the new centroids: each the mean of its points, or unchanged
    /// where none was assigned. A batch within one submission computes the centroids on the
    /// device; a batch split over several (beyond the device's limits) on the host, from the
    /// added steps.
    pub fn kmeans_lloyd_step_async(&self, points: &[f32], centroids: &[f32], d: usize) -> Pending<(KmeansStep, Vec<f32>)> {
        let (n, k) = checked!(check_kmeans(points, centroids, d));
        checked!(self.check_loops(kmeans_assign_loops(k, d), || format!("kmeans: assigning a point to {k} centroids of {d} dimensions")));
        let limits = self.engine.limits();
        // Centroids and sums are bound whole; the reduction runs one invocation per
        // (centroid, dimension): only points split.
        if (2 * k * d + k) * 4 > limits.max_binding as usize || (k * d + k).div_ceil(64) > limits.max_groups as usize {
            return Pending::ready(Err(GpuError::Input(format!(
                "kmeans: {k} centroids of {d} dimensions need {} bytes of sums and centroids and {} workgroups; \
                 the device binds at most {} bytes and dispatches at most {} workgroups per dimension",
                (2 * k * d + k) * 4,
                (k * d + k).div_ceil(64),
                limits.max_binding,
                limits.max_groups
            ))));
        }
        // Points per submission: at most 65,535 × 64 (4,096 blocks, f32 counts exact); points,
        // labels and the blocks' partial sums within the binding limit.
        let width = (k * d + k) * 4;
        let per = rows_per_submission(limits, 64, &[d * 4, 4]).min(limits.max_binding as usize / width * KMEANS_BLOCK);
        if per == 0 {
            return Pending::ready(Err(GpuError::Input(format!(
                "kmeans: one point of {d} dimensions ({} bytes) exceeds the device's largest storage binding ({} bytes)",
                d * 4,
                limits.max_binding
            ))));
        }
        if n <= per {
            return self.kmeans_points(points, centroids, n, k, d);
        }
        let parts = points.chunks(per * d).map(|p| self.kmeans_points(p, centroids, p.len() / d, k, d));
        let old = centroids.to_vec();
        Pending::all(parts.collect()).map(move |steps: Vec<(KmeansStep, Vec<f32>)>| {
            let mut total = KmeansStep { sums: vec![0.0; k * d], counts: vec![0; k] };
            for (s, _) in steps {
                total.sums.iter_mut().zip(&s.sums).for_each(|(t, v)| *t += v);
                total.counts.iter_mut().zip(&s.counts).for_each(|(t, c)| *t += c);
            }
            let centres = (0..k * d).map(|i| match total.counts[i / d] {
                0 => old[i],
                c => total.sums[i] / c as f32,
            });
            let centres = centres.collect();
            (total, centres)
        })
    }
}

/// Workgroups of 64 invocations for `len` items: a 2-D grid beyond 65535 groups.
pub(crate) fn grid(len: usize) -> (u32, u32) {
    let g = len.div_ceil(64);
    (g.min(65535) as u32, g.div_ceil(65535) as u32)
}

/// Channels up to which resize runs one invocation per pixel (`resize_px`), else per value.
pub(crate) const RESIZE_PX_MAX_CHANNELS: usize = 64;

/// Floats of workgroup memory of image.wgsl's tiled passes (`tile`): 16 KiB.
const IMAGE_TILE_FLOATS: usize = 4096;

/// Rows of `tmp` in a `blur_v_tiled` workgroup's tile: it computes 64 − 2r of them.
const IMAGE_TILE_ROWS: usize = 64;

/// Which image passes run tiled on an image, and their dispatches (`None`: the per-value pass,
/// dispatched as `gx × gy`). Tiling is chosen per adapter ([`GpuKernels::image_tiled`]) and then
/// per shape: a tile must fit workgroup memory and the dispatch limits.
pub(crate) struct ImagePlan {
    tiled: bool,
    w: usize,
    h: usize,
    c: usize,
    max_groups: usize,
    gx: u32,
    gy: u32,
}

impl ImagePlan {
    /// The plan for `img` on a device of `max_groups` workgroups per dimension; `tiled: false`
    /// plans every pass per value.
    pub(crate) fn new(img: &Image, max_groups: usize, tiled: bool) -> Self {
        let (gx, gy) = grid(img.w * img.h * img.c);
        ImagePlan { tiled, w: img.w, h: img.h, c: img.c, max_groups, gx, gy }
    }

    fn dispatch(&self, x: usize, y: usize) -> Option<(u32, u32)> {
        (self.tiled && x <= self.max_groups && y <= self.max_groups).then_some((x as u32, y as u32))
    }

    /// `blur_h_tiled` at radius `r`: a workgroup per 256 values of a row, with r pixels either side.
    pub(crate) fn blur_h(&self, r: usize) -> Option<(u32, u32)> {
        if 256 + 2 * r * self.c > IMAGE_TILE_FLOATS {
            return None;
        }
        self.dispatch((self.w * self.c).div_ceil(256), self.h)
    }

    /// `blur_v_tiled` at radius `r`: a workgroup per 64 values of 64 − 2r rows (r ≤ 24, so that a
    /// tile computes at least 16 rows).
    pub(crate) fn blur_v(&self, r: usize) -> Option<(u32, u32)> {
        if 2 * r + 16 > IMAGE_TILE_ROWS {
            return None;
        }
        self.dispatch((self.w * self.c).div_ceil(64), self.h.div_ceil(IMAGE_TILE_ROWS - 2 * r))
    }

    /// `sobel_tiled`: a workgroup per 64 values of 16 rows, 18 rows of 64 + 2c values loaded.
    pub(crate) fn sobel(&self) -> Option<(u32, u32)> {
        if 18 * (64 + 2 * self.c) > IMAGE_TILE_FLOATS {
            return None;
        }
        self.dispatch((self.w * self.c).div_ceil(64), self.h.div_ceil(16))
    }
}

impl GpuKernels {
    /// The Gaussian blur through the tiled passes (`tiled`, where the shape admits them) or the
    /// per-value ones.
    pub(crate) fn gaussian_blur_with(&self, img: &Image, sigma: f32, tiled: bool) -> Pending<Image> {
        checked!(img.check());
        let weights = gaussian_weights(sigma);
        let r = weights.len() / 2;
        checked!(self.check_loops(2 * r + 64, || format!("gaussian blur σ = {sigma} (radius {r})")));
        let plan = ImagePlan::new(img, self.engine.limits().max_groups as usize, tiled);
        let (h, v) = (plan.blur_h(r), plan.blur_v(r));
        let th = v.map_or(0, |_| IMAGE_TILE_ROWS - 2 * r);
        let h = h.map_or(("image_blur_h", "blur_h", plan.gx, plan.gy), |(x, y)| ("image_blur_h_tiled", "blur_h_tiled", x, y));
        let v = v.map_or(("image_blur_v", "blur_v", plan.gx, plan.gy), |(x, y)| ("image_blur_v_tiled", "blur_v_tiled", x, y));
        self.image_passes(img, img.w, img.h, &weights, th, &[h, v])
    }


    /// Sobel through the tiled pass (`tiled`, where the shape admits it) or the per-value one.
    pub(crate) fn sobel_with(&self, img: &Image, tiled: bool) -> Pending<Image> {
        checked!(img.check());
        let plan = ImagePlan::new(img, self.engine.limits().max_groups as usize, tiled);
        let pass = plan.sobel().map_or(("image_sobel", "sobel", plan.gx, plan.gy), |(x, y)| ("image_sobel_tiled", "sobel_tiled", x, y));
        self.image_passes(img, img.w, img.h, &[0.0], 0, &[pass])
    }


    /// Image kernels share one binding layout: src, tmp, dst, weights, dims. Each pass is an
    /// entry point of image.wgsl (its pipeline key, entry and dispatch) producing the `nw × nh ×
    /// c` output; `th` is `blur_v_tiled`'s rows per workgroup.
    fn image_passes(&self, img: &Image, nw: usize, nh: usize, weights: &[f32], th: usize, passes: &[(&'static str, &'static str, u32, u32)]) -> Pending<Image> {
        let r = (weights.len() / 2) as u32;
        let dims = [img.w as u32, img.h as u32, img.c as u32, nw as u32, nh as u32, r, th as u32, 0];
        let c = img.c;
        let out = nw * nh * c;
        let n_in = img.data.len();
        let pipes: Vec<_> = passes.iter().map(|&(key, entry, gx, gy)| (self.pipeline(key, IMAGE, entry, 5), gx, gy)).collect();
        self.engine.submit(
            &[
                Bind::In(bytemuck::cast_slice(&img.data)),
                Bind::Out((n_in.max(out) * 4) as u64),
                Bind::Out((out * 4) as u64),
                Bind::In(bytemuck::cast_slice(weights)),
                Bind::In(bytemuck::cast_slice(&dims)),
            ],
            &pipes,
            2,
            move |bytes| Ok(Image { w: nw, h: nh, c, data: cast(&bytes[..out * 4]) }),
        )
    }
}

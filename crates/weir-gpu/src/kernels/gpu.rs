//! The GPU path: WGSL kernels on wgpu, memory from the [`DevicePool`](crate::pool::DevicePool).
//!
//! One call = one batch: inputs are written into pooled blocks, one compute submission runs the
//! kernels, results come back through a reused readback buffer. No buffer is created per batch
//! after warm-up (the pool's `slab_creations` and the readback buffer stay constant).

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{check_cnn, check_gemm, check_kmeans, gaussian_weights, Image, Kernels, KmeansStep};
use crate::device::GpuContext;
use crate::pool::Block;
use crate::GpuError;

const GEMM: &str = include_str!("../shaders/gemm.wgsl");
const KMEANS: &str = include_str!("../shaders/kmeans.wgsl");
const IMAGE: &str = include_str!("../shaders/image.wgsl");
const CNN: &str = include_str!("../shaders/cnn.wgsl");

/// Time split of the last call: upload, compute, download.
#[derive(Clone, Copy, Debug, Default)]
pub struct TransferTimes {
    /// Host → device.
    pub upload: Duration,
    /// Kernels.
    pub compute: Duration,
    /// Device → host.
    pub download: Duration,
}

/// Kernels on a GPU.
pub struct GpuKernels {
    ctx: Arc<GpuContext>,
    readback: Mutex<Option<wgpu::Buffer>>,
    last: Mutex<TransferTimes>,
    readback_creations: Mutex<u64>,
}

impl GpuKernels {
    /// Kernels on `ctx`'s device.
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        Self { ctx, readback: Mutex::new(None), last: Mutex::default(), readback_creations: Mutex::new(0) }
    }

    /// The device context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// The time split of the last call.
    pub fn last_times(&self) -> TransferTimes {
        *self.last.lock().expect("times")
    }

    /// Device buffers created so far: pool slabs plus readback buffers.
    pub fn buffer_creations(&self) -> u64 {
        self.ctx.pool.lock().expect("pool").stats().slab_creations + *self.readback_creations.lock().expect("count")
    }

    /// The compiled pipeline of `entry`, with an explicit layout of `bindings` read-write storage
    /// buffers (an automatic layout would drop the bindings an entry point does not use).
    fn pipeline(&self, key: &'static str, src: &'static str, entry: &'static str, bindings: u32) -> Arc<wgpu::ComputePipeline> {
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

    fn wait(&self) -> Result<(), GpuError> {
        self.ctx.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| GpuError::Device(e.to_string()))
    }

    /// One batch: upload the `In` bindings, clear the `Out` ones, run `passes` (pipeline,
    /// workgroups x, y) in one submission, read back binding `read` as `T`.
    fn run<T: bytemuck::Pod>(
        &self,
        bindings: &[Bind<'_>],
        passes: &[(Arc<wgpu::ComputePipeline>, u32, u32)],
        read: usize,
    ) -> Result<Vec<T>, GpuError> {
        let dev = &self.ctx.device;
        let queue = &self.ctx.queue;
        let mut pool = self.ctx.pool.lock().expect("pool");
        let mut blocks: Vec<(Block, u64)> = Vec::with_capacity(bindings.len());
        let result = (|| {
            let t0 = Instant::now();
            let mut encoder = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("weir-batch") });
            for bind in bindings {
                let len = match bind {
                    Bind::In(bytes) => bytes.len() as u64,
                    Bind::Out(len) => *len,
                }
                .max(4)
                .next_multiple_of(4);
                let b = pool.alloc(Some(dev), len)?;
                blocks.push((b, len));
                match bind {
                    Bind::In(bytes) if !bytes.is_empty() => queue.write_buffer(pool.buffer(b.slab), b.offset, bytes),
                    Bind::In(_) => {}
                    Bind::Out(_) => encoder.clear_buffer(pool.buffer(b.slab), b.offset, Some(len)),
                }
            }
            queue.submit(None);
            self.wait()?;
            let t1 = Instant::now();
            for (pipe, gx, gy) in passes {
                let layout = pipe.get_bind_group_layout(0);
                let entries: Vec<wgpu::BindGroupEntry<'_>> = blocks
                    .iter()
                    .enumerate()
                    .map(|(i, (b, len))| wgpu::BindGroupEntry {
                        binding: i as u32,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: pool.buffer(b.slab),
                            offset: b.offset,
                            size: NonZeroU64::new(*len),
                        }),
                    })
                    .collect();
                let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &layout, entries: &entries });
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                pass.set_pipeline(pipe);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(*gx, *gy, 1);
            }
            queue.submit([encoder.finish()]);
            self.wait()?;
            let t2 = Instant::now();
            let (ob, olen) = blocks[read];
            let mut rb = self.readback.lock().expect("readback");
            if rb.as_ref().is_none_or(|b| b.size() < olen) {
                *rb = Some(dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("weir-readback"),
                    size: olen.next_power_of_two(),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }));
                *self.readback_creations.lock().expect("count") += 1;
            }
            let rb = rb.as_ref().expect("readback buffer");
            let mut encoder = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("weir-readback") });
            encoder.copy_buffer_to_buffer(pool.buffer(ob.slab), ob.offset, rb, 0, olen);
            queue.submit([encoder.finish()]);
            let slice = rb.slice(0..olen);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            self.wait()?;
            rx.recv().map_err(|e| GpuError::Device(e.to_string()))?.map_err(|e| GpuError::Device(e.to_string()))?;
            let out: Vec<T> = bytemuck::cast_slice(&slice.get_mapped_range().map_err(|e| GpuError::Device(e.to_string()))?).to_vec();
            rb.unmap();
            *self.last.lock().expect("times") = TransferTimes { upload: t1 - t0, compute: t2 - t1, download: t2.elapsed() };
            Ok(out)
        })();
        for (b, _) in blocks {
            pool.free(b);
        }
        result
    }
}

/// A binding of a batch, in binding order.
enum Bind<'a> {
    /// Uploaded input.
    In(&'a [u8]),
    /// Zeroed output of this many bytes.
    Out(u64),
}

impl Kernels for GpuKernels {
    fn name(&self) -> String {
        format!("gpu ({})", self.ctx.adapter.name)
    }

    fn gemm(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Vec<f32>, GpuError> {
        check_gemm(a, b, m, n, k)?;
        if m == 0 || n == 0 {
            return Ok(vec![0.0; m * n]);
        }
        let dims = [m as u32, n as u32, k as u32, 0];
        let pipe = self.pipeline("gemm", GEMM, "main", 4);
        let mut out: Vec<f32> = self.run(
            &[Bind::In(bytemuck::cast_slice(a)), Bind::In(bytemuck::cast_slice(b)), Bind::Out((m * n * 4) as u64), Bind::In(bytemuck::cast_slice(&dims))],
            &[(pipe, n.div_ceil(64) as u32, m.div_ceil(64) as u32)],
            2,
        )?;
        out.truncate(m * n);
        Ok(out)
    }

    fn kmeans_step(&self, points: &[f32], centroids: &[f32], d: usize) -> Result<KmeansStep, GpuError> {
        let (n, k) = check_kmeans(points, centroids, d)?;
        let dims = [n as u32, k as u32, d as u32, 0];
        let assign = self.pipeline("kmeans_assign", KMEANS, "assign", 5);
        let update = self.pipeline("kmeans_update", KMEANS, "update", 5);
        let vals: Vec<f32> = self.run(
            &[
                Bind::In(bytemuck::cast_slice(points)),
                Bind::In(bytemuck::cast_slice(centroids)),
                Bind::Out((n * 4) as u64),
                Bind::Out(((k * d + k) * 4) as u64),
                Bind::In(bytemuck::cast_slice(&dims)),
            ],
            &[(assign, n.div_ceil(64) as u32, 1), (update, (k * d).div_ceil(64) as u32, 1)],
            3,
        )?;
        let sums = vals[..k * d].to_vec();
        let counts = vals[k * d..k * d + k].iter().map(|&c| c as u32).collect();
        Ok(KmeansStep { sums, counts })
    }

    fn resize_bilinear(&self, img: &Image, nw: usize, nh: usize) -> Result<Image, GpuError> {
        img.check()?;
        if nw == 0 || nh == 0 {
            return Err(GpuError::Input(format!("resize to {nw}×{nh}")));
        }
        let data = self.image_passes(img, nw, nh, &[0.0], &[("image_resize", "resize")], nw * nh * img.c)?;
        Ok(Image { w: nw, h: nh, c: img.c, data })
    }

    fn gaussian_blur(&self, img: &Image, sigma: f32) -> Result<Image, GpuError> {
        img.check()?;
        let wts = gaussian_weights(sigma);
        let n = img.w * img.h * img.c;
        let data = self.image_passes(img, img.w, img.h, &wts, &[("image_blur_h", "blur_h"), ("image_blur_v", "blur_v")], n)?;
        Ok(Image { data, ..img.clone() })
    }

    fn cnn_forward(&self, m: &crate::cnn::SmallCnn, images: &[f32], n: usize) -> Result<Vec<f32>, GpuError> {
        check_cnn(m, images, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let dims = [n as u32, m.in_c as u32, m.h as u32, m.w as u32, m.conv_c as u32, m.classes as u32, 0, 0];
        let conv_len = n * m.conv_c * m.h * m.w;
        let pool_len = conv_len / 4;
        let grid = |len: usize| {
            let g = len.div_ceil(64);
            (g.min(65535) as u32, g.div_ceil(65535) as u32)
        };
        let pass = |entry: &'static str, len: usize| {
            let (gx, gy) = grid(len);
            (self.pipeline(entry, CNN, entry, 9), gx, gy)
        };
        let mut logits: Vec<f32> = self.run(
            &[
                Bind::In(bytemuck::cast_slice(images)),
                Bind::In(bytemuck::cast_slice(&m.conv_w)),
                Bind::In(bytemuck::cast_slice(&m.conv_b)),
                Bind::Out((conv_len * 4) as u64),
                Bind::Out((pool_len * 4) as u64),
                Bind::In(bytemuck::cast_slice(&m.dense_w)),
                Bind::In(bytemuck::cast_slice(&m.dense_b)),
                Bind::Out((n * m.classes * 4) as u64),
                Bind::In(bytemuck::cast_slice(&dims)),
            ],
            &[pass("conv_relu", conv_len), pass("max_pool", pool_len), pass("dense", n * m.classes)],
            7,
        )?;
        logits.truncate(n * m.classes);
        Ok(logits)
    }

    fn sobel(&self, img: &Image) -> Result<Image, GpuError> {
        img.check()?;
        let n = img.w * img.h * img.c;
        let data = self.image_passes(img, img.w, img.h, &[0.0], &[("image_sobel", "sobel")], n)?;
        Ok(Image { data, ..img.clone() })
    }
}

impl GpuKernels {
    /// Image kernels share one binding layout: src, tmp, dst, weights, dims. `out` values are
    /// computed by each pass, one invocation each (a 2-D grid beyond 65535 workgroups).
    fn image_passes(&self, img: &Image, nw: usize, nh: usize, weights: &[f32], passes: &[(&'static str, &'static str)], out: usize) -> Result<Vec<f32>, GpuError> {
        let r = (weights.len() / 2) as u32;
        let dims = [img.w as u32, img.h as u32, img.c as u32, nw as u32, nh as u32, r, 0, 0];
        let groups = out.div_ceil(64);
        let (gx, gy) = (groups.min(65535) as u32, groups.div_ceil(65535) as u32);
        let n_in = img.data.len();
        let pipes: Vec<_> = passes.iter().map(|(key, entry)| (self.pipeline(key, IMAGE, entry, 5), gx, gy)).collect();
        let mut v: Vec<f32> = self.run(
            &[
                Bind::In(bytemuck::cast_slice(&img.data)),
                Bind::Out((n_in.max(out) * 4) as u64),
                Bind::Out((out * 4) as u64),
                Bind::In(bytemuck::cast_slice(weights)),
                Bind::In(bytemuck::cast_slice(&dims)),
            ],
            &pipes,
            2,
        )?;
        v.truncate(out);
        Ok(v)
    }
}

//! The transfer engine under failure: callers that fail or panic half-way, mappings that fail,
//! device errors, batches beyond the device's limits, staging memory, lock order. Each test that
//! needs a device opens its own (their rings and pools must not be shared with other tests); a
//! missing adapter skips them unless `WEIR_REQUIRE_GPU=1`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError};

use super::*;

#[test]
fn ready_and_mapped_results() {
    let p = Pending::ready(Ok(20)).map(|x| x + 1).map(|x| x * 2);
    assert_eq!(p.wait().unwrap(), 42);
    let mut e: Pending<u32> = Pending::ready(Err(GpuError::Input("bad".into())));
    assert!(matches!(e.poll(false), Some(Err(GpuError::Input(_)))));
    let all = Pending::all(vec![Pending::ready(Ok(1)), Pending::ready(Ok(2)).map(|x| x * 10)]);
    assert_eq!(all.wait().unwrap(), vec![1, 20]);
    let failed = Pending::all(vec![Pending::ready(Ok(1)), Pending::ready(Err(GpuError::Input("second".into())))]);
    assert!(matches!(failed.wait(), Err(GpuError::Input(m)) if m == "second"));
}

/// A device of its own with `memory` bytes of budget (see [`crate::test_device::context`]).
fn context(memory: u64) -> Option<Arc<GpuContext>> {
    crate::test_device::context(memory, 1.0)
}

/// Run `f` on a thread of its own and wait at most 30 s for it: a hang fails the test instead
/// of hanging the suite.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => panic!("{what}: still waiting after 30 s (hung)"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

const ADD_ONE: &str = r#"
@group(0) @binding(0) var<storage, read_write> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<storage, read_write> dims: array<u32, 4>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= dims[0]) { return; }
    dst[i] = src[i] + 1u;
}
"#;

/// `dst[i] = src[i] + 1` over three read-write storage bindings (src, dst, dims).
fn add_one(ctx: &GpuContext) -> Arc<wgpu::ComputePipeline> {
    let dev = &ctx.device;
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some("add_one"), source: wgpu::ShaderSource::Wgsl(ADD_ONE.into()) });
    let entries: Vec<wgpu::BindGroupLayoutEntry> = (0..3)
        .map(|binding| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Storage { read_only: false }, has_dynamic_offset: false, min_binding_size: None },
            count: None,
        })
        .collect();
    let bgl = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: None, entries: &entries });
    let layout = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor { label: None, bind_group_layouts: &[Some(&bgl)], ..Default::default() });
    Arc::new(dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("add_one"),
        layout: Some(&layout),
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    }))
}

/// One batch of `add_one` over `input`.
fn add_one_batch(engine: &Arc<Engine>, pipe: &Arc<wgpu::ComputePipeline>, input: &[u32]) -> Pending<Vec<u32>> {
    let n = input.len();
    let dims = [n as u32, 0, 0, 0];
    let groups = n.div_ceil(64).max(1);
    let (gx, gy) = (groups.min(65535) as u32, groups.div_ceil(65535) as u32);
    engine.submit(
        &[Bind::In(bytemuck::cast_slice(input)), Bind::Out((n * 4) as u64), Bind::In(bytemuck::cast_slice(&dims))],
        &[(pipe.clone(), gx, gy)],
        1,
        move |bytes| Ok(bytemuck::pod_collect_to_vec::<u8, u32>(&bytes[..n * 4])),
    )
}

fn check_add_one(engine: &Arc<Engine>, pipe: &Arc<wgpu::ComputePipeline>, n: usize) {
    let input: Vec<u32> = (0..n as u32).collect();
    let got = add_one_batch(engine, pipe, &input).wait().unwrap();
    assert_eq!(got, (1..=n as u32).collect::<Vec<_>>());
}

fn in_use(ctx: &GpuContext) -> u64 {
    ctx.pool.lock().unwrap().stats().in_use
}

/// A caller whose poll fails after it took its ticket (here an injected harvest error) must not
/// leave the queue waiting for it: the next caller is served.
#[test]
fn a_caller_failing_after_taking_its_ticket_does_not_block_the_queue() {
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let engine = Engine::new(ctx.clone(), TransferMode::Auto, 1).unwrap();
    let pipe = add_one(&ctx);
    check_add_one(&engine, &pipe, 100);
    engine.faults.fail_harvest.store(1, Ordering::SeqCst);
    let err = add_one_batch(&engine, &pipe, &[1, 2, 3]).wait().unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    within("the batch after a failed caller", move || check_add_one(&engine, &pipe, 100));
}

/// A panic between taking a slot and submitting (here after packing, when the upload buffer is
/// already unmapped) gives back the slot and the pool blocks.
#[test]
fn a_panic_between_acquire_and_submit_frees_the_slot_and_its_blocks() {
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let engine = Engine::new(ctx.clone(), TransferMode::Staged, 1).unwrap();
    let pipe = add_one(&ctx);
    check_add_one(&engine, &pipe, 1000);
    let before = in_use(&ctx);
    engine.faults.panic_after_pack.store(true, Ordering::SeqCst);
    let input: Vec<u32> = (0..1000).collect();
    let panicked = catch_unwind(AssertUnwindSafe(|| add_one_batch(&engine, &pipe, &input)));
    assert!(panicked.is_err(), "the injected panic");
    assert_eq!(in_use(&ctx), before, "the batch's pool blocks were given back");
    assert!(engine.lock().slots.iter().all(|s| s.free), "the slot was given back");
    let e = engine.clone();
    within("the batch after a panicked caller", move || check_add_one(&e, &pipe, 1000));
    assert_eq!(in_use(&ctx), before);
}

/// A re-map of a slot's upload buffer that fails (here: the buffer is destroyed while its
/// re-map is pending) must not leave the slot dead: the next batch gets a fresh buffer.
#[test]
fn a_failed_re_map_does_not_kill_the_slot() {
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let engine = Engine::new(ctx.clone(), TransferMode::Auto, 1).unwrap();
    let pipe = add_one(&ctx);
    check_add_one(&engine, &pipe, 100);
    let input: Vec<u32> = (0..100).collect();
    let pending = add_one_batch(&engine, &pipe, &input);
    // No poll ran since the submission: the upload buffer's re-map is still pending.
    engine.lock().slots[0].upload.as_ref().expect("the slot's upload buffer").destroy();
    // Its own result may be either (its input buffer is gone); it must come.
    let _ = pending.wait();
    let e = engine.clone();
    within("the batch after a failed re-map", move || check_add_one(&e, &pipe, 100));
    assert!(engine.stats().slot_recoveries >= 1, "{:?}", engine.stats());
}

/// A device validation error in a batch (a binding of a buffer without STORAGE usage) is an
/// error of that batch's result, not wgpu's panic; the engine goes on.
#[test]
fn a_device_validation_error_is_the_batch_result() {
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let pipe = add_one(&ctx);
    for mode in [TransferMode::Auto, TransferMode::Staged] {
        let engine = Engine::new(ctx.clone(), mode, 2).unwrap();
        let not_storage = ctx.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: 1024, usage: wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
        let dims = [256u32, 0, 0, 0];
        let pending = engine.submit(
            &[Bind::Resident(&not_storage, 0, 1024), Bind::Out(1024), Bind::In(bytemuck::cast_slice(&dims))],
            &[(pipe.clone(), 4, 1)],
            1,
            |bytes| Ok(bytes.len()),
        );
        let err = pending.wait().unwrap_err();
        assert!(matches!(&err, GpuError::Device(m) if m.contains("STORAGE") || m.to_lowercase().contains("usage")), "{mode:?}: {err}");
        check_add_one(&engine, &pipe, 300);
        assert!(engine.lock().slots.iter().all(|s| s.free), "{mode:?}: slots given back");
    }
}

/// On the staged path the staging buffers count against the pool's budget, and a slot's
/// buffers shrink back once recent batches are much smaller than one huge batch.
#[test]
fn staging_buffers_count_against_the_budget_and_shrink() {
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let engine = Engine::new(ctx.clone(), TransferMode::Staged, 2).unwrap();
    let pipe = add_one(&ctx);
    let staging = |e: &Engine| -> u64 { e.lock().slots.iter().flat_map(|s| [&s.upload, &s.download]).flatten().map(|b| b.size()).sum() };
    check_add_one(&engine, &pipe, 1 << 20); // 4 MiB in, 4 MiB out
    let big = staging(&engine);
    assert!(big >= 8 << 20, "{big}");
    let stats = ctx.pool.lock().unwrap().stats();
    assert!(stats.reserved >= big + (8 << 20), "staging ({big} bytes) and blocks are reserved: {stats:?}");
    for _ in 0..24 {
        check_add_one(&engine, &pipe, 64);
    }
    let small = staging(&engine);
    assert!(small <= 16 << 10, "staging after small batches: {small} bytes (was {big})");
    let after = ctx.pool.lock().unwrap().stats();
    assert_eq!(stats.reserved - after.reserved, big - small, "the shrunk staging left the budget: {stats:?} → {after:?}");
}

/// `buffer_creations` (pool, then ring) against batches being harvested (ring, then pool): one
/// lock order everywhere, so this cannot deadlock.
#[test]
fn pool_and_ring_locks_are_taken_in_one_order() {
    use crate::kernels::{gpu::GpuKernels, Kernels};
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let g = Arc::new(GpuKernels::with_transfer(ctx, TransferMode::Auto, 2).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (g2, stop2) = (g.clone(), stop.clone());
    let reader = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            n = n.max(g2.buffer_creations());
        }
        n
    });
    within("batches beside buffer_creations", move || {
        let a = [1f32; 64];
        for _ in 0..3000 {
            assert_eq!(g.gemm(&a, &a, 8, 8, 8).unwrap()[0], 8.0);
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(reader.join().unwrap() > 0);
}

/// A binding beyond the largest storage binding, a dispatch beyond the workgroups per
/// dimension, a resident binding outside its buffer: typed input errors before anything is
/// recorded (wgpu would panic), naming the sizes and the limit.
#[test]
fn batches_beyond_the_device_limits_are_refused_with_the_sizes() {
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let limits = Limits { max_binding: 4096, max_groups: 8 };
    let engine = Engine::with_limits(ctx.clone(), TransferMode::Auto, 2, limits).unwrap();
    let pipe = add_one(&ctx);
    let err = add_one_batch(&engine, &pipe, &[7; 1025]).wait().unwrap_err();
    assert!(matches!(&err, GpuError::Input(m) if m.contains("4100 bytes") && m.contains("4096 bytes")), "{err}");
    let dims = [4u32, 0, 0, 0];
    let too_many = engine.submit(&[Bind::In(&[0; 16]), Bind::Out(16), Bind::In(bytemuck::cast_slice(&dims))], &[(pipe.clone(), 9, 1)], 1, |b| Ok(b.len()));
    let err = too_many.wait().unwrap_err();
    assert!(matches!(&err, GpuError::Input(m) if m.contains("9×1") && m.contains("8 per dimension")), "{err}");
    let small = ctx.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: 512, usage: wgpu::BufferUsages::STORAGE, mapped_at_creation: false });
    for (offset, len) in [(256, 512), (4, 16)] {
        let outside = engine.submit(&[Bind::Resident(&small, offset, len), Bind::Out(16), Bind::In(bytemuck::cast_slice(&dims))], &[(pipe.clone(), 1, 1)], 1, |b| Ok(b.len()));
        let err = outside.wait().unwrap_err();
        assert!(matches!(&err, GpuError::Input(m) if m.contains(&format!("{len} bytes at offset {offset} of a 512-byte buffer"))), "{err}");
    }
    check_add_one(&engine, &pipe, 500);
}

/// GEMM and K-means batches beyond the limits are split into several submissions whose
/// results are those of one (limits made small here; `tests/limits.rs` crosses the real ones).
#[test]
fn kernels_split_batches_beyond_the_limits() {
    use crate::kernels::{cpu::CpuKernels, gpu::GpuKernels, Kernels};
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let limits = Limits { max_binding: 4096, max_groups: 2 };
    let cpu = CpuKernels::new(1);
    let lcg = |seed: u64, n: usize| -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    };
    for mode in [TransferMode::Auto, TransferMode::Staged] {
        let g = GpuKernels::with_limits(ctx.clone(), mode, 2, limits).unwrap();
        // 300 rows: at most 128 per submission (2 tiles of 64), and 4096 / (30 × 4) = 34 for C.
        let (m, n, k) = (300, 30, 20);
        let (a, b) = (lcg(1, m * k), lcg(2, k * n));
        let before = g.transfer_stats().batches;
        let got = g.gemm(&a, &b, m, n, k).unwrap();
        assert_eq!(g.transfer_stats().batches - before, m.div_ceil(34) as u64, "{mode:?}: one submission per 34 rows");
        let want = cpu.gemm(&a, &b, m, n, k).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!((x - y).abs() <= 1e-4, "{mode:?}: C[{}][{}] = {x}, expected {y}", i / n, i % n);
        }
        // B beyond the binding limit: refused, naming the sizes.
        let err = g.gemm(&lcg(3, 40 * 30), &lcg(4, 40 * 30), 30, 30, 40).unwrap_err();
        assert!(matches!(&err, GpuError::Input(m) if m.contains("4800 bytes") && m.contains("4096 bytes")), "{err}");

        // 1000 points of 3 dimensions: at most 128 points per submission (2 groups of 64).
        let (d, centroids) = (3, lcg(5, 5 * 3));
        let points = lcg(6, 1000 * d);
        let before = g.transfer_stats().batches;
        let got = g.kmeans_step(&points, &centroids, d).unwrap();
        assert_eq!(g.transfer_stats().batches - before, 1000u64.div_ceil(128), "{mode:?}: one submission per 128 points");
        let want = cpu.kmeans_step(&points, &centroids, d).unwrap();
        assert_eq!(got.counts, want.counts, "{mode:?}");
        for (x, y) in got.sums.iter().zip(&want.sums) {
            assert!((x - y).abs() <= 1e-3, "{mode:?}: sum {x} vs {y}");
        }
        // Centroids beyond what one submission binds: refused.
        let err = g.kmeans_step(&points[..30], &lcg(7, 400 * 3), d).unwrap_err();
        assert!(matches!(&err, GpuError::Input(m) if m.contains("400 centroids") && m.contains("4096 bytes")), "{err}");
    }
}

/// A result conversion that panics fails its own batch only: the slot and blocks come back.
#[test]
fn a_panicking_result_conversion_fails_only_its_batch() {
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let engine = Engine::new(ctx.clone(), TransferMode::Staged, 1).unwrap();
    let pipe = add_one(&ctx);
    check_add_one(&engine, &pipe, 10);
    let before = in_use(&ctx);
    let dims = [4u32, 0, 0, 0];
    let bad: Pending<u32> = engine.submit(&[Bind::In(&[0; 16]), Bind::Out(16), Bind::In(bytemuck::cast_slice(&dims))], &[(pipe.clone(), 1, 1)], 1, |_| panic!("a broken conversion"));
    let err = bad.wait().unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert_eq!(in_use(&ctx), before);
    within("the batch after a panicking conversion", move || check_add_one(&engine, &pipe, 10));
}

/// `on_ready` reports a batch once, when its result is first there, with its host transfer
/// time (zero on the CPU path; positive for a GPU batch, summed over the parts of `all`), and
/// leaves the result alone.
#[test]
fn on_ready_reports_each_batch_once_with_its_transfer_time() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let seen: Rc<RefCell<Vec<Duration>>> = Rc::default();
    let s = seen.clone();
    let p = Pending::ready(Ok(7)).on_ready(move |t| s.borrow_mut().push(t));
    assert_eq!(p.wait().unwrap(), 7);
    assert_eq!(*seen.borrow(), vec![Duration::ZERO]);
    let Some(ctx) = context(64 << 20) else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let k = crate::kernels::gpu::GpuKernels::new(ctx);
    use crate::kernels::Kernels;
    let a: Vec<f32> = (0..64 * 32).map(|x| (x % 7) as f32).collect();
    let b: Vec<f32> = (0..32 * 16).map(|x| (x % 3) as f32).collect();
    let want = crate::kernels::cpu::CpuKernels::new(1).gemm(&a, &b, 64, 16, 32).unwrap();
    let s = seen.clone();
    let parts = vec![k.gemm_async(&a, &b, 64, 16, 32), k.gemm_async(&a, &b, 64, 16, 32)];
    let mut p = Pending::all(parts).on_ready(move |t| s.borrow_mut().push(t));
    let got = p.poll(true).expect("blocking poll").unwrap();
    assert!(p.transfer_time() > Duration::ZERO);
    assert_eq!(got, vec![want.clone(), want]);
    let seen = seen.borrow();
    assert_eq!(seen.len(), 2, "once per batch: {seen:?}");
    assert!(seen[1] > Duration::ZERO, "{seen:?}");
}

//! `weir bench gpu-state`: the naive barrier for device-resident state (drain the batches in
//! flight, read the whole state back on the worker) against the resident design (a device-side
//! copy at the barrier, dirty chunks read back by the snapshot writer), on one adapter in one
//! run:
//!
//! - a `kmeans` job over many keys, with 1 s checkpoints and with checkpointing off, in both
//!   `weir.gpu.state.snapshot-mode`s: the worker's pause per checkpoint (`sync_us` of the
//!   checkpoint metadata) and throughput;
//! - on a bare [`StateArena`] of the same model shape: what one checkpoint reads back and
//!   writes with 1 % and with 100 % of the keys changed, against a full snapshot;
//! - restore of that arena from the VRAM tier (a device-side copy) and from storage (read the
//!   full file, decode it, upload).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use weir::ops::kmeans::StreamingKMeans;
use weir::sink::BlackholeSink;
use weir::source::BlobSource;
use weir::{JobConfig, Row, StreamEnv, Value};
use weir_checkpoint::CheckpointMetadata;
use weir_gpu::kernels::gpu::GpuKernels;
use weir_gpu::kernels::Kernels;
use weir_gpu::state::kmeans::{step, KmeansShape};
use weir_gpu::state::{ArenaLayout, SnapshotChunks, StateArena};
use weir_state::format::{decode_block, write_entries, WrittenSnapshot};
use weir_state::keygroup::key_group;

use super::{percentile, BenchArgs};

/// Key groups of the state files written here (the job's default).
const MAX_PARALLELISM: u32 = 128;

/// One run of the kmeans job.
struct JobRun {
    label: String,
    secs: f64,
    checkpoints: Vec<CheckpointMetadata>,
}

impl JobRun {
    /// The kmeans operator's worker pause per periodic checkpoint (its largest subtask's
    /// `sync_us`); the final checkpoint at the end of input stalls nothing.
    fn stalls(&self) -> Vec<u64> {
        self.checkpoints
            .iter()
            .filter(|m| !m.is_final)
            .map(|m| m.subtasks.iter().filter(|(_, s)| s.operator_name.starts_with("kmeans")).map(|(_, s)| s.stats.sync_us).max().unwrap_or(0))
            .collect()
    }
}

fn job_config(args: &BenchArgs, blocking: bool, interval: Option<&str>) -> Result<JobConfig> {
    let mut pairs = vec![
        ("parallelism.default".to_string(), args.parallelism.to_string()),
        ("execution.checkpointing.dir".to_string(), args.dir.clone()),
        ("weir.gpu.enabled".to_string(), "true".to_string()),
        ("taskmanager.gpu.memory".to_string(), args.gpu_memory.clone()),
        ("weir.gpu.batch.max-records".to_string(), "16384".to_string()),
        ("weir.gpu.state.snapshot-mode".to_string(), if blocking { "blocking" } else { "async" }.to_string()),
    ];
    if let Some(d) = &args.device {
        pairs.push(("weir.gpu.device".into(), d.clone()));
    }
    if let Some(i) = interval {
        pairs.push(("execution.checkpointing.interval".into(), i.to_string()));
    }
    Ok(JobConfig::from_pairs(pairs)?)
}

/// The job's kernels: every run of the process shares them (one adapter, one device).
fn kernels(args: &BenchArgs) -> Result<Arc<dyn Kernels>> {
    let config = job_config(args, false, None)?;
    let k = weir_gpu::kernels::shared_kernels(&config.gpu)?;
    if k.as_gpu().is_none() {
        bail!("no GPU adapter: weir bench gpu-state measures device-resident state");
    }
    Ok(k)
}

fn run_job(args: &BenchArgs, points: u64, keys: u64, blocking: bool, interval: Option<&str>, n: usize) -> Result<JobRun> {
    let name = format!("bench-gpu-state-{}-{n}", std::process::id());
    let config = job_config(args, blocking, interval)?;
    let kernels = kernels(args)?;
    let blobs = BlobSource { count: points, centers: args.k, dim: args.dim, sigma: 1.0, keys, seed: 7 };
    let (k, in_flight) = (args.k, config.gpu_max_inflight);
    let env = StreamEnv::new(&name, config);
    let start = Instant::now();
    let result = env.execute(move |job| {
        job.source("blobs", blobs.clone())
            .key_by(|r: &Row| r.get(0).clone())
            .process_batches("kmeans", StreamingKMeans::new(k, 1, kernels.clone()).max_in_flight(in_flight))
            .sink("blackhole", BlackholeSink);
    })?;
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(std::path::Path::new(&args.dir).join(&name));
    let mode = if blocking { "naive (blocking)" } else { "resident (async)" };
    let label = format!("{mode}, {}", interval.map(|i| format!("{i} checkpoints")).unwrap_or_else(|| "checkpointing off".into()));
    Ok(JobRun { label, secs, checkpoints: result.checkpoints })
}

/// Wait until the device has run everything enqueued so far (buffer writes run at the next
/// submission: an empty one flushes them).
fn device_idle(gpu: &GpuKernels) -> Result<()> {
    gpu.context().queue.submit([]);
    gpu.context().device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| anyhow::anyhow!("waiting for the device: {e}"))?;
    Ok(())
}

/// A K-means step over `per_key` points for each key of `slots`, waited for: it changes (and
/// marks dirty) exactly those keys' models.
fn touch(arena: &mut StateArena, shape: KmeansShape, slots: &[u32], per_key: u32, seed: u64) -> Result<()> {
    let starts: Vec<u32> = (0..=slots.len() as u32).map(|j| j * per_key).collect();
    let mut x = seed | 1;
    let points: Vec<f32> = (0..slots.len() * per_key as usize * shape.d)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 20.0 - 10.0
        })
        .collect();
    step(arena, shape, slots, &starts, &points).wait()?;
    Ok(())
}

/// The state file a snapshot read gives (the operator's format: key `Value::Int(slot)`, its
/// chunks by word offset), as the snapshot writer builds it.
fn state_file(chunks: SnapshotChunks, chunk_words: u32) -> Result<WrittenSnapshot> {
    let mut entries: Vec<(u32, Value, Vec<(u32, Vec<u32>)>)> = chunks
        .entries
        .into_iter()
        .map(|(slot, cs)| {
            let key = Value::Int(slot as i64);
            (key_group(&key, MAX_PARALLELISM), key, cs.into_iter().map(|(c, w)| (c * chunk_words, w)).collect())
        })
        .collect();
    entries.sort_by_key(|e| e.0);
    Ok(write_entries(&entries)?)
}

/// One checkpoint of `arena` read back as a delta (`full`: every chunk) and serialised: (keys
/// written, bytes read back from the device, file bytes, seconds).
fn checkpoint(arena: &mut StateArena, full: bool) -> Result<(u64, u64, u64, f64)> {
    let chunk_words = arena.layout().chunk_words as u32;
    let t = Instant::now();
    let chunks = arena.snapshot()?.read(full)?;
    let down = chunks.bytes_down;
    let file = state_file(chunks, chunk_words)?;
    Ok((file.entries, down, file.bytes.len() as u64, t.elapsed().as_secs_f64()))
}

/// What the bare-arena part measured.
struct ArenaFigures {
    rows: Vec<(String, (u64, u64, u64, f64))>,
    delta_1: u64,
    full: u64,
    vram_restore: f64,
    storage_restore: f64,
    restored_keys: usize,
    /// The worker's pause at a barrier (median of 5): resident, naive.
    pause: (f64, f64),
}

fn arena_figures(args: &BenchArgs, gpu: &GpuKernels) -> Result<ArenaFigures> {
    let n = args.state_keys as usize;
    let shape = KmeansShape { k: args.k, d: args.dim };
    let layout = ArenaLayout::new(shape.words());
    let mut arena = StateArena::new(layout, Some(gpu), "bench gpu-state")?;
    let inits: Vec<Vec<u32>> = (0..n).map(|i| shape.init_slot(&vec![i as f32; shape.k * shape.d])).collect();
    let refs: Vec<&[u32]> = inits.iter().map(Vec::as_slice).collect();
    arena.alloc_slots(&refs)?;
    drop(inits);
    // The first checkpoint after the keys arrive holds every key: it leaves the dirty map empty.
    let first = checkpoint(&mut arena, false)?;
    let all: Vec<u32> = (0..n as u32).collect();
    let one_percent: Vec<u32> = all.iter().copied().step_by(100).collect();
    touch(&mut arena, shape, &one_percent, 4, 1)?;
    let delta_1 = checkpoint(&mut arena, false)?;
    touch(&mut arena, shape, &all, 4, 2)?;
    let delta_100 = checkpoint(&mut arena, false)?;
    let full = checkpoint(&mut arena, true)?;
    // The worker's part of a barrier alone, without the job around it: enqueue the device copy
    // (resident), or that and the full read-back (naive; a drain comes on top in the job).
    let (mut enqueue, mut blocking) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let snap = arena.snapshot()?;
        enqueue.push(t.elapsed().as_secs_f64());
        snap.read(true)?;
        device_idle(gpu)?;
        let t = Instant::now();
        arena.snapshot()?.read(true)?;
        blocking.push(t.elapsed().as_secs_f64());
    }
    enqueue.sort_by(f64::total_cmp);
    blocking.sort_by(f64::total_cmp);

    // Restore from the VRAM tier: the snapshot area stays in device memory after its read.
    let snap = arena.snapshot()?;
    let vram = snap.vram().context("a device arena's snapshot has a device copy")?;
    let chunks = snap.read(true)?;
    let file = state_file(chunks, layout.chunk_words as u32)?;
    let mut fresh = StateArena::new(layout, Some(gpu), "bench gpu-state (VRAM restore)")?;
    device_idle(gpu)?;
    let t = Instant::now();
    fresh.restore_from_vram(&vram)?;
    device_idle(gpu)?;
    let vram_restore = t.elapsed().as_secs_f64();
    drop(fresh);

    // Restore from storage: the full file written, then read, decoded and uploaded.
    let dir = std::path::Path::new(&args.dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("gpu-state-{}.state", std::process::id()));
    std::fs::write(&path, &file.bytes).with_context(|| format!("writing {}", path.display()))?;
    let shown = path.display().to_string();
    let t = Instant::now();
    let bytes = std::fs::read(&path).with_context(|| format!("reading {shown}"))?;
    let mut image: Vec<Vec<u32>> = Vec::with_capacity(n);
    for b in &file.index {
        let block = &bytes[b.offset as usize..(b.offset + b.len) as usize];
        decode_block(block, b, &shown, |_: Value, chunks: Vec<(u32, Vec<u32>)>| {
            let mut words = vec![0u32; layout.state_words];
            for (off, w) in chunks {
                words[off as usize..off as usize + w.len()].copy_from_slice(&w);
            }
            image.push(words);
            Ok(())
        })?;
    }
    let refs: Vec<&[u32]> = image.iter().map(Vec::as_slice).collect();
    let mut fresh = StateArena::new(layout, Some(gpu), "bench gpu-state (storage restore)")?;
    fresh.alloc_slots(&refs)?;
    device_idle(gpu)?;
    let storage_restore = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(ArenaFigures {
        rows: vec![
            ("first (every key new)".into(), first),
            ("1 % of keys dirty".into(), delta_1),
            ("100 % of keys dirty".into(), delta_100),
            ("full".into(), full),
        ],
        delta_1: delta_1.2,
        full: full.2,
        vram_restore,
        storage_restore,
        restored_keys: image.len(),
        pause: (enqueue[2], blocking[2]),
    })
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let kernels = kernels(args)?;
    let gpu = kernels.as_gpu().context("GPU kernels")?;
    let shape = KmeansShape { k: args.k, d: args.dim };
    let adapter = &gpu.context().adapter;
    println!("adapter: {} ({}, {}, {})", adapter.name, adapter.vendor, adapter.device_type, adapter.backend);
    println!(
        "kmeans job: {} points over {} keys (k = {}, d = {}: {} B of model per key), parallelism {}, batches of 16384 points",
        args.points,
        args.model_keys,
        args.k,
        args.dim,
        shape.words() * 4,
        args.parallelism
    );
    // Warm-up: compile the pipelines and fill the pool outside the measured runs.
    run_job(args, 20_000 * args.k as u64, 2, false, None, 0)?;
    let configs: [(bool, Option<&str>); 4] = [(true, Some("1s")), (false, Some("1s")), (true, None), (false, None)];
    let mut runs: Vec<Vec<JobRun>> = configs.iter().map(|_| Vec::new()).collect();
    let repeat = args.repeat.unwrap_or(1).max(1);
    // Interleaved, so a slow moment of the machine hits every configuration.
    for rep in 0..repeat {
        for (i, (blocking, interval)) in configs.iter().enumerate() {
            runs[i].push(run_job(args, args.points, args.model_keys, *blocking, *interval, 1 + rep * configs.len() + i)?);
        }
    }
    println!();
    println!("{:<40} {:>10} {:>6} {:>16} {:>13} {:>16}", "run", "M pts/s", "chk", "stall µs median", "stall µs max", "MB written/chk");
    let mut medians = Vec::new();
    for r in &runs {
        // Throughput: the median run; stalls: every periodic checkpoint of every run.
        let mut secs: Vec<f64> = r.iter().map(|x| x.secs).collect();
        secs.sort_by(f64::total_cmp);
        let rate = args.points as f64 / secs[secs.len() / 2];
        let mut stalls: Vec<u64> = r.iter().flat_map(JobRun::stalls).collect();
        // Bytes each checkpoint wrote (a delta's checkpoint also lists the full file before it).
        let written = |m: &CheckpointMetadata| m.subtasks.iter().map(|(_, s)| s.stats.bytes).sum::<u64>();
        let mut bytes: Vec<u64> = r.iter().flat_map(|x| x.checkpoints.iter().filter(|m| !m.is_final).map(written)).collect();
        let chk = stalls.len();
        let (med, max) = (percentile(&mut stalls, 0.5), percentile(&mut stalls, 1.0));
        let show = |v: u64| if chk == 0 { "-".to_string() } else { v.to_string() };
        println!(
            "{:<40} {:>10.3} {:>6} {:>16} {:>13} {:>16}",
            r[0].label,
            rate / 1e6,
            chk,
            show(med),
            show(max),
            if chk == 0 { "-".to_string() } else { format!("{:.2}", percentile(&mut bytes, 0.5) as f64 / 1e6) }
        );
        medians.push((rate, med, chk));
    }
    println!();
    let n = args.state_keys;
    println!("state arena: {n} keys × {} B ({:.1} MB), one checkpoint each:", shape.words() * 4, n as f64 * shape.words() as f64 * 4.0 / 1e6);
    let a = arena_figures(args, gpu)?;
    println!("{:<24} {:>12} {:>16} {:>14} {:>10}", "checkpoint", "keys written", "bytes read back", "file bytes", "ms");
    for (label, (keys, down, file, secs)) in &a.rows {
        println!("{label:<24} {keys:>12} {down:>16} {file:>14} {:>10.2}", secs * 1e3);
    }
    println!(
        "barrier pause of the bare arena (median of 5): resident (enqueue the device copy) {:.3} ms, naive (full read-back) {:.2} ms",
        a.pause.0 * 1e3,
        a.pause.1 * 1e3
    );
    println!(
        "restore of {} keys: from the VRAM tier {:.2} ms, from storage (read, decode, upload) {:.2} ms",
        a.restored_keys,
        a.vram_restore * 1e3,
        a.storage_restore * 1e3
    );
    println!();
    let ((_, naive_stall, naive_chk), (res_rate, res_stall, res_chk), (off, _, _)) = (medians[0], medians[1], medians[3]);
    if naive_chk == 0 || res_chk == 0 {
        println!("stall ratio naive/resident: - (no periodic checkpoint completed: raise --points)");
    } else {
        println!("stall ratio naive/resident: {:.1}", naive_stall as f64 / res_stall.max(1) as f64);
    }
    println!("throughput with 1s checkpoints / off: {:.3}", res_rate / off);
    println!("incremental bytes / full bytes at 1% dirty: {:.4}", a.delta_1 as f64 / a.full as f64);
    Ok(())
}

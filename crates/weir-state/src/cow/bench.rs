//! What a checkpoint costs the processing thread: the heap backend's copy-on-write measured
//! alone, without the engine (`weir bench state` and `examples/cow_cost.rs` run it).
//!
//! A map of `keys` entries with `value_bytes`-byte values is updated, every key (or `updates`
//! keys) once per pass in a scattered order, first with no snapshot alive, then while a
//! background thread serialises a snapshot taken at the start of the pass (as a checkpoint does).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::CowMap;
use crate::format::{write_snapshot, write_snapshot_releasing};
use crate::keygroup::KeyGroupRange;

/// What to measure.
#[derive(Clone, Copy, Debug, Default)]
pub struct CostConfig {
    /// Keys in the map.
    pub keys: u64,
    /// Bytes per value (a `Vec<u8>`); 0: the keyed sum's `(i64, u64)` (sum, count) instead,
    /// updated with `entry_or_default`.
    pub value_bytes: usize,
    /// Passes with and without a snapshot in flight.
    pub rounds: usize,
    /// Updates per pass, over distinct keys (0: every key once). Fewer than the keys model a
    /// checkpoint interval that touches only part of the state.
    pub updates: u64,
    /// Bytes the calling thread has allocated so far (a counting global allocator's figure),
    /// to report the bytes each pass allocates: the copies that copy-on-write makes.
    pub allocated_bytes: Option<fn() -> u64>,
    /// Track changed keys ([`CowMap::track_changes`]), as for incremental checkpoints.
    pub track_changes: bool,
    /// The writer lets go of each key group once written ([`write_snapshot_releasing`]).
    pub release_written: bool,
    /// Copy a shard whole once its overlay × this ≥ its table, instead of the map's own
    /// threshold (for experiments: `usize::MAX` ≈ copy a shard on its second write, as a
    /// per-shard copy-on-write does; 0 ≈ never).
    pub copy_shard_at: Option<usize>,
}

/// The measured costs, averaged over the rounds.
#[derive(Clone, Debug, Default)]
pub struct CowCost {
    /// Main-thread ns per update with no snapshot alive.
    pub idle_ns_per_update: f64,
    /// Main-thread ns per update while the snapshot writer was still running.
    pub in_flight_ns_per_update: f64,
    /// Main-thread ns per update over the whole pass that started with a snapshot (in flight,
    /// then after the writer finished: merges included).
    pub pass_ns_per_update: f64,
    /// Fraction of the pass's updates made while the writer was running.
    pub in_flight_fraction: f64,
    /// The synchronous pause of `snapshot()`, in µs.
    pub snapshot_pause_us: f64,
    /// The background writer's time per snapshot, in ms.
    pub write_ms: f64,
    /// Bytes of one snapshot file.
    pub file_bytes: u64,
    /// Bytes the main thread allocated per idle pass (`None` without `allocated_bytes`).
    pub idle_alloc_bytes: Option<u64>,
    /// Bytes the main thread allocated per pass with a snapshot: the copies.
    pub pass_alloc_bytes: Option<u64>,
    /// Entries copied per pass with a snapshot ([`CowMap::copied_entries`]).
    pub copied_entries: u64,
}

/// The `i`-th key of a pass: a permutation of `0..keys` that scatters neighbours over the
/// key groups, as a stream of uniformly spread keys does.
#[inline]
fn nth_key(i: u64, keys: u64) -> u64 {
    // 1_000_003 is prime: coprime with `keys` unless a multiple of it.
    let step = if keys.is_multiple_of(1_000_003) { 999_983 } else { 1_000_003 };
    (i as u128 * step as u128 % keys as u128) as u64
}

/// Run the measurement.
pub fn checkpoint_cost(cfg: &CostConfig) -> CowCost {
    assert!(cfg.keys > 0 && cfg.rounds > 0, "cow cost: keys and rounds must be positive");
    if cfg.value_bytes == 0 {
        run(cfg, |_| (0i64, 0u64), |m, k| {
            let e = m.entry_or_default(k);
            e.0 += 1;
            e.1 += 1;
        })
    } else {
        run(cfg, |k| vec![k as u8; cfg.value_bytes], |m, k| {
            let v = m.get_mut(&k).expect("populated key");
            v[0] = v[0].wrapping_add(1);
        })
    }
}

fn run<V>(cfg: &CostConfig, value: impl Fn(u64) -> V, update: fn(&mut CowMap<u64, V>, u64)) -> CowCost
where
    V: Clone + serde::Serialize + Send + Sync + 'static,
{
    let mut m: CowMap<u64, V> = CowMap::new(KeyGroupRange::new(0, 128), 128);
    if let Some(at) = cfg.copy_shard_at {
        m.set_copy_shard_at(at);
    }
    m.track_changes(cfg.track_changes);
    for k in 0..cfg.keys {
        m.insert(k, value(k));
    }
    let alloc = || cfg.allocated_bytes.map(|f| f());
    let keys = cfg.keys;
    let n = if cfg.updates == 0 { keys } else { cfg.updates.min(keys) };
    let mut c = CowCost::default();
    let (mut idle_alloc, mut pass_alloc) = (0, 0);
    for _ in 0..cfg.rounds {
        let a0 = alloc();
        let t = Instant::now();
        for i in 0..n {
            update(&mut m, nth_key(i, keys));
        }
        c.idle_ns_per_update += t.elapsed().as_nanos() as f64 / n as f64;
        if let (Some(a0), Some(a1)) = (a0, alloc()) {
            idle_alloc += a1 - a0;
        }

        let a0 = alloc();
        let copied = m.copied_entries();
        let t = Instant::now();
        let snap = m.snapshot();
        c.snapshot_pause_us += t.elapsed().as_nanos() as f64 / 1e3;
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let done = done.clone();
            let release = cfg.release_written;
            std::thread::spawn(move || {
                let t = Instant::now();
                let w = if release {
                    write_snapshot_releasing(snap)
                } else {
                    let w = write_snapshot(&snap);
                    drop(snap);
                    w
                };
                let w = w.expect("encode snapshot");
                let took = t.elapsed();
                done.store(true, Ordering::Release);
                (took, w.bytes.len() as u64)
            })
        };
        let t = Instant::now();
        let mut in_flight: Option<(u64, Duration)> = None;
        for i in 0..n {
            if in_flight.is_none() && i % 1024 == 0 && done.load(Ordering::Acquire) {
                in_flight = Some((i, t.elapsed()));
            }
            update(&mut m, nth_key(i, keys));
        }
        let pass = t.elapsed();
        c.copied_entries += m.copied_entries() - copied;
        let (updates, took) = in_flight.unwrap_or((n, pass));
        if let (Some(a0), Some(a1)) = (a0, alloc()) {
            pass_alloc += a1 - a0;
        }
        let (write, bytes) = writer.join().expect("snapshot writer");
        c.in_flight_ns_per_update += if updates > 0 { took.as_nanos() as f64 / updates as f64 } else { 0.0 };
        c.pass_ns_per_update += pass.as_nanos() as f64 / n as f64;
        c.in_flight_fraction += updates as f64 / n as f64;
        c.write_ms += write.as_secs_f64() * 1e3;
        c.file_bytes = bytes;
    }
    let r = cfg.rounds as f64;
    for x in [
        &mut c.idle_ns_per_update,
        &mut c.in_flight_ns_per_update,
        &mut c.pass_ns_per_update,
        &mut c.in_flight_fraction,
        &mut c.snapshot_pause_us,
        &mut c.write_ms,
    ] {
        *x /= r;
    }
    c.copied_entries /= cfg.rounds as u64;
    if cfg.allocated_bytes.is_some() {
        c.idle_alloc_bytes = Some(idle_alloc / cfg.rounds as u64);
        c.pass_alloc_bytes = Some(pass_alloc / cfg.rounds as u64);
    }
    c
}

/// Main-thread ns per update of the keyed-sum pattern (`entry_or_default`, add to a
/// `(sum, count)`) with no snapshot alive: the hot path that copy-on-write must not slow down.
/// `updates` cycle over `keys` keys in a scattered order; best of `rounds` passes. `track`: with
/// change tracking on (the first pass marks every key, the later ones find them marked).
pub fn hot_path_ns(keys: u64, updates: u64, rounds: usize, track: bool) -> f64 {
    assert!(keys > 0 && updates > 0 && rounds > 0, "hot path cost: keys, updates and rounds must be positive");
    let mut m: CowMap<u64, (i64, u64)> = CowMap::new(KeyGroupRange::new(0, 128), 128);
    for k in 0..keys {
        *m.entry_or_default(k) = (0, 0);
    }
    m.track_changes(track);
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..updates {
            let e = m.entry_or_default(nth_key(i % keys, keys));
            e.0 += i as i64;
            e.1 += 1;
        }
        best = best.min(t.elapsed().as_nanos() as f64 / updates as f64);
    }
    std::hint::black_box(m.len());
    best
}

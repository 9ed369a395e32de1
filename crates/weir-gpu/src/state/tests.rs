//! The state store and resident K-means, on the host arena and on the device (lavapipe in CI;
//! `WEIR_REQUIRE_GPU=1` makes a missing adapter fail instead of testing the host path only).

use std::sync::Arc;

use super::kmeans::{step, KmeansShape};
use super::*;

use crate::test_device::gpu;

/// A host arena and, where there is a GPU, a device arena.
fn arenas(words: usize) -> Vec<StateArena> {
    let mut v = vec![StateArena::new(ArenaLayout::new(words), None, "test").unwrap()];
    if let Some(g) = gpu() {
        v.push(StateArena::new(ArenaLayout::new(words), Some(g), "test").unwrap());
    }
    v
}

fn models(arena: &mut StateArena, shape: KmeansShape, slots: &[u32], starts: &[u32], points: &[f32]) -> Vec<Vec<(u32, Vec<f32>)>> {
    let m = step(arena, shape, slots, starts, points).wait().unwrap();
    (0..m.keys()).map(|j| (0..shape.k).map(|c| { let (n, x) = m.centroid(j, c); (n, x.collect()) }).collect()).collect()
}

#[test]
fn kmeans_steps_match_hand_computed_values_on_every_path() {
    let shape = KmeansShape { k: 2, d: 1 };
    for mut a in arenas(shape.words()) {
        let s = a.alloc_slot(&shape.init_slot(&[0.0, 10.0])).unwrap();
        // 1 and 2 go to centre 0 (mean 1.5, rate 2/2), 9 to centre 1 (rate 1/1).
        assert_eq!(models(&mut a, shape, &[s], &[0, 3], &[1.0, 2.0, 9.0]), vec![vec![(2, vec![1.5]), (1, vec![9.0])]], "on device: {}", a.on_device());
        // 3 goes to centre 0: 1.5 + (3 − 1.5) · 1/3 = 2.
        assert_eq!(models(&mut a, shape, &[s], &[0, 1], &[3.0]), vec![vec![(3, vec![2.0]), (1, vec![9.0])]]);
    }
}

#[test]
fn several_keys_in_one_launch_update_only_their_own_models() {
    let shape = KmeansShape { k: 2, d: 2 };
    for mut a in arenas(shape.words()) {
        let x = a.alloc_slot(&shape.init_slot(&[0.0, 0.0, 10.0, 10.0])).unwrap();
        let y = a.alloc_slot(&shape.init_slot(&[100.0, 100.0, -100.0, -100.0])).unwrap();
        // Key y first in the batch: the order of keys in a launch is free.
        let got = models(&mut a, shape, &[y, x], &[0, 1, 3], &[-98.0, -98.0, 1.0, 1.0, 11.0, 9.0]);
        assert_eq!(got[0], vec![(0, vec![100.0, 100.0]), (1, vec![-98.0, -98.0])]);
        assert_eq!(got[1], vec![(1, vec![1.0, 1.0]), (1, vec![11.0, 9.0])]);
    }
}

#[test]
fn the_host_and_device_paths_agree_on_random_batches() {
    let Some(g) = gpu() else { return };
    let shape = KmeansShape { k: 4, d: 3 };
    let mut host = StateArena::new(ArenaLayout::new(shape.words()), None, "h").unwrap();
    let mut dev = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "d").unwrap();
    let mut x = 12345u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 2000) as f32 / 100.0
    };
    let keys = 150; // past the first growth of the arena
    for _ in 0..keys {
        let init: Vec<f32> = (0..12).map(|_| rnd()).collect();
        host.alloc_slot(&shape.init_slot(&init)).unwrap();
        dev.alloc_slot(&shape.init_slot(&init)).unwrap();
    }
    for _ in 0..3 {
        let slots: Vec<u32> = (0..keys as u32).rev().collect();
        let starts: Vec<u32> = (0..=keys as u32).map(|j| j * 5).collect();
        let points: Vec<f32> = (0..keys * 5 * 3).map(|_| rnd()).collect();
        let (h, d) = (models(&mut host, shape, &slots, &starts, &points), models(&mut dev, shape, &slots, &starts, &points));
        for (a, b) in h.iter().flatten().zip(d.iter().flatten()) {
            assert_eq!(a.0, b.0, "counts are exact");
            for (u, v) in a.1.iter().zip(&b.1) {
                assert!((u - v).abs() <= 1e-4 * u.abs().max(1.0), "{u} vs {v}");
            }
        }
    }
}

fn slot_words(chunks: &SnapshotChunks, slot: u32) -> Option<Vec<u32>> {
    chunks.entries.iter().find(|(s, _)| *s == slot).map(|(_, c)| c.iter().flat_map(|(_, w)| w.clone()).collect())
}

#[test]
fn snapshots_hold_exactly_the_state_at_the_barrier_and_only_dirty_slots() {
    let shape = KmeansShape { k: 1, d: 1 };
    for mut a in arenas(shape.words()) {
        let s0 = a.alloc_slot(&shape.init_slot(&[0.0])).unwrap();
        let s1 = a.alloc_slot(&shape.init_slot(&[0.0])).unwrap();
        let first = a.snapshot().unwrap();
        step(&mut a, shape, &[s1], &[0, 1], &[4.0]).wait().unwrap();
        let second = a.snapshot().unwrap();
        // A step submitted after the barrier, before the background reads the snapshot.
        let later = step(&mut a, shape, &[s1], &[0, 1], &[8.0]);
        let f = first.read(false).unwrap();
        assert_eq!(f.entries.len(), 2, "new slots are dirty");
        let d = second.read(false).unwrap();
        assert_eq!(d.entries.len(), 1, "only the slot the step wrote: {:?}", d.entries);
        assert_eq!(slot_words(&d, s1).unwrap(), shape.init_slot(&[4.0]).iter().enumerate().map(|(i, &w)| if i == 5 { 1 } else { w }).collect::<Vec<_>>());
        later.wait().unwrap();
        let full = a.snapshot().unwrap().read(true).unwrap();
        assert_eq!(full.entries.len(), 2);
        let (c, n) = shape.read_slot(&slot_words(&full, s1).unwrap()).unwrap();
        assert_eq!((c, n), (vec![6.0], vec![2]));
        assert_eq!(slot_words(&full, s0).unwrap(), shape.init_slot(&[0.0]));
    }
}

#[test]
fn large_slots_are_tracked_in_chunks() {
    let l = ArenaLayout::new(MAX_CHUNK_WORDS * 2 + 10);
    assert_eq!((l.chunk_words, l.chunks_per_slot()), (2734, 3), "three equal chunks");
    assert!(l.slot_words - l.state_words < 3, "padding below one word per chunk: {l:?}");
    let small = ArenaLayout::new(4116);
    assert_eq!((small.chunk_words, small.slot_words), (2058, 4116), "not padded to 2 × 4,096");
    let mut a = StateArena::new(l, None, "big").unwrap();
    let s = a.alloc_slot(&vec![7; l.state_words]).unwrap();
    a.snapshot().unwrap();
    let (words, dirty) = a.host_mut().unwrap();
    words[a_word(s, l) + MAX_CHUNK_WORDS + 1] = 9;
    dirty[(a_word(s, l) + MAX_CHUNK_WORDS + 1) / l.chunk_words] = 1;
    let d = a.snapshot().unwrap().read(false).unwrap();
    assert_eq!(d.entries.len(), 1);
    assert_eq!(d.entries[0].1.len(), 1, "one chunk of three");
    assert_eq!(d.entries[0].1[0].0, 1);
    let full = a.snapshot().unwrap().read(true).unwrap();
    let words: Vec<u32> = full.entries[0].1.iter().flat_map(|(_, w)| w.clone()).collect();
    assert_eq!(words.len(), l.state_words, "no padding is written");
}

fn a_word(slot: u32, l: ArenaLayout) -> usize {
    slot as usize * l.slot_words
}

#[test]
fn a_vram_snapshot_restores_by_a_device_copy() {
    let Some(g) = gpu() else { return };
    let shape = KmeansShape { k: 1, d: 2 };
    let mut a = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "a").unwrap();
    for i in 0..100 {
        a.alloc_slot(&shape.init_slot(&[i as f32, 1.0])).unwrap();
    }
    let snap = a.snapshot().unwrap();
    let vram = snap.vram().unwrap();
    step(&mut a, shape, &[7], &[0, 1], &[0.0, 0.0]).wait().unwrap();
    drop(a);
    let mut b = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "b").unwrap();
    b.restore_from_vram(&vram).unwrap();
    assert_eq!(b.slots(), 100);
    let full = b.snapshot().unwrap().read(true).unwrap();
    assert_eq!(slot_words(&full, 7).unwrap(), shape.init_slot(&[7.0, 1.0]), "the state at the snapshot, not after");
    assert_eq!(slot_words(&full, 99).unwrap(), shape.init_slot(&[99.0, 1.0]));
}

#[test]
fn state_beyond_the_budget_is_a_typed_error_naming_keys_and_bytes() {
    let Some(ctx) = crate::test_device::context(1 << 20, 1.0) else { return };
    let k = GpuKernels::new(ctx);
    let e = StateArena::new(ArenaLayout::new(4096), Some(&k), "pipeline[1]:kmeans").err().expect("64 keys × 16 KiB × 2 > 1 MiB");
    assert!(matches!(e, GpuError::StateTooLarge { keys: 64, slot_bytes: 16384, .. }), "{e}");
    assert!(e.to_string().contains("pipeline[1]:kmeans") && e.to_string().contains("64 keys"), "{e}");
    let mut ok = StateArena::new(ArenaLayout::new(256), Some(&k), "op").unwrap();
    let mut err = None;
    for i in 0..10_000 {
        if let Err(e) = ok.alloc_slot(&[i]) {
            err = Some(e);
            break;
        }
    }
    assert!(matches!(err, Some(GpuError::StateTooLarge { .. })), "growth past the budget is refused: {err:?}");
}

#[test]
fn the_paths_agree_over_many_large_batches_of_two_keys() {
    let Some(g) = gpu() else { return };
    let shape = KmeansShape { k: 8, d: 8 };
    let mut host = StateArena::new(ArenaLayout::new(shape.words()), None, "h").unwrap();
    let mut dev = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "d").unwrap();
    let mut x = 99u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 2000) as f32 / 100.0
    };
    for _ in 0..2 {
        let init: Vec<f32> = (0..64).map(|_| rnd()).collect();
        host.alloc_slot(&shape.init_slot(&init)).unwrap();
        dev.alloc_slot(&shape.init_slot(&init)).unwrap();
    }
    let mut pend = Vec::new();
    let mut hs = Vec::new();
    for i in 0..20 {
        // Batches that grow and shrink: the transfer ring's buffers grow with them.
        let n = [300, 4096, 1000, 9000, 16400][i % 5];
        let points: Vec<f32> = (0..n * 8).map(|_| rnd()).collect();
        let starts = [0, n as u32 / 3, n as u32];
        hs.push(models(&mut host, shape, &[1, 0], &starts, &points));
        pend.push(step(&mut dev, shape, &[1, 0], &starts, &points));
        if pend.len() > 2 {
            pend.remove(0).wait().unwrap();
        }
    }
    let last = pend.pop().unwrap().wait().unwrap();
    let h = hs.last().unwrap();
    for (j, hj) in h.iter().enumerate() {
        for (c, hc) in hj.iter().enumerate() {
            let (n, v) = last.centroid(j, c);
            assert_eq!(n, hc.0);
            for (a, b) in v.zip(&hc.1) {
                assert!((a - b).abs() < 1e-3, "{a} vs {b}");
            }
        }
    }
}

#[test]
fn one_large_launch_matches_the_host() {
    let Some(g) = gpu() else { return };
    let shape = KmeansShape { k: 8, d: 8 };
    let mut x = 7u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 2000) as f32 / 100.0
    };
    let staged = GpuKernels::with_transfer(Arc::clone(g.context()), crate::TransferMode::Staged, 2).unwrap();
    for (n, g) in [(20000usize, &staged), (9000, g), (20000, g), (70000, g)] {
        let mut host = StateArena::new(ArenaLayout::new(shape.words()), None, "h").unwrap();
        let mut dev = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "d").unwrap();
        for _ in 0..2 {
            let init: Vec<f32> = (0..64).map(|_| rnd()).collect();
            host.alloc_slot(&shape.init_slot(&init)).unwrap();
            dev.alloc_slot(&shape.init_slot(&init)).unwrap();
        }
        let points: Vec<f32> = (0..n * 8).map(|_| rnd()).collect();
        let starts = [0, n as u32 / 2, n as u32];
        let h = models(&mut host, shape, &[0, 1], &starts, &points);
        let d = models(&mut dev, shape, &[0, 1], &starts, &points);
        for (a, b) in h.iter().flatten().zip(d.iter().flatten()) {
            assert_eq!(a.0, b.0, "n = {n} direct {}: counts", g.direct());
            for (u, v) in a.1.iter().zip(&b.1) {
                assert!((u - v).abs() <= 1e-3, "n = {n} direct {}: {u} vs {v}: {:?} vs {:?}", g.direct(), a.1, b.1);
            }
        }
    }
}

#[test]
fn launches_beyond_the_largest_binding_are_split_by_keys() {
    let Some(g) = gpu() else { return };
    let limits = crate::transfer::Limits { max_binding: 4096, max_groups: 65_535 };
    let small = GpuKernels::with_limits(Arc::clone(g.context()), crate::TransferMode::Auto, 2, limits).unwrap();
    let shape = KmeansShape { k: 2, d: 2 };
    let mut host = StateArena::new(ArenaLayout::new(shape.words()), None, "h").unwrap();
    let mut dev = StateArena::new(ArenaLayout::new(shape.words()), Some(&small), "d").unwrap();
    for j in 0..3 {
        let init = [j as f32, 0.0, 10.0 + j as f32, 10.0];
        host.alloc_slot(&shape.init_slot(&init)).unwrap();
        dev.alloc_slot(&shape.init_slot(&init)).unwrap();
    }
    // 3 keys × 200 points × 2 dimensions: 4,800 bytes of points, more than one binding holds.
    let points: Vec<f32> = (0..1200).map(|i| ((i * 7919) % 1000) as f32 / 50.0).collect();
    let starts = [0, 200, 400, 600];
    assert_eq!(models(&mut dev, shape, &[0, 1, 2], &starts, &points), models(&mut host, shape, &[0, 1, 2], &starts, &points));
    // One key alone beyond the limit is refused, naming the setting to lower.
    let big: Vec<f32> = vec![1.0; 2 * 600];
    let e = step(&mut dev, shape, &[0], &[0, 600], &big).wait().unwrap_err();
    assert!(e.to_string().contains("weir.gpu.batch.max-records"), "{e}");
}

/// The partial sums of the device's step in workgroup memory (several chunks per workgroup, a
/// lane's invocations splitting the values, more values than invocations) and beyond it (the
/// fallback): the device's models equal the host twin's bit for bit, since both add in one order.
#[test]
fn partial_sums_in_workgroup_memory_and_beyond_match_the_host_exactly() {
    use super::kmeans::resident_lanes;
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    // (k, d, lanes): 10 chunks per workgroup; one lane of 64 invocations over 101 values; none.
    for (k, d, lanes) in [(3usize, 5usize, 10usize), (4, 100, 1), (64, 64, 0)] {
        assert_eq!(resident_lanes(k, d), lanes, "k = {k}, d = {d}");
        let shape = KmeansShape { k, d };
        let mut host = StateArena::new(ArenaLayout::new(shape.words()), None, "h").unwrap();
        let mut dev = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "d").unwrap();
        let mut x = (k * 1000 + d) as u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000) as f32 / 100.0 - 10.0
        };
        for _ in 0..3 {
            let init: Vec<f32> = (0..k * d).map(|_| rnd()).collect();
            host.alloc_slot(&shape.init_slot(&init)).unwrap();
            dev.alloc_slot(&shape.init_slot(&init)).unwrap();
        }
        // Keys of 700 (two full chunks and a partial one), 0 and 257 points.
        let starts = [0u32, 700, 700, 957];
        let points: Vec<f32> = (0..957 * d).map(|_| rnd()).collect();
        for round in 0..2 {
            let (h, v) = (models(&mut host, shape, &[2, 0, 1], &starts, &points), models(&mut dev, shape, &[2, 0, 1], &starts, &points));
            assert_eq!(v, h, "k = {k}, d = {d}, round {round}");
            assert_eq!(v.iter().flatten().map(|c| c.0 as usize).sum::<usize>(), 957 * (round + 1), "every point counted once per round");
        }
    }
}

/// The resident step near f32::MAX and beyond lavapipe's loop limit: the device picks the
/// host's centroid (it started its search below f32::MAX), and a launch whose loops would run
/// past the limit is refused, naming the setting to lower, instead of updating models wrong
/// (one key of 2 M points made each update invocation loop over 7,813 chunks × 9 values).
#[test]
fn resident_steps_agree_near_f32_max_and_refuse_work_past_the_loop_limit() {
    let Some(g) = gpu() else { return assert!(std::env::var("WEIR_REQUIRE_GPU").map_or(true, |v| v != "1")) };
    let shape = KmeansShape { k: 2, d: 1 };
    let mut host = StateArena::new(ArenaLayout::new(shape.words()), None, "h").unwrap();
    let mut dev = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "d").unwrap();
    host.alloc_slot(&shape.init_slot(&[-2e19, 1.8442e19])).unwrap();
    dev.alloc_slot(&shape.init_slot(&[-2e19, 1.8442e19])).unwrap();
    let h = models(&mut host, shape, &[0], &[0, 1], &[0.0]);
    assert_eq!(h[0][1], (1, vec![0.0]), "the host moves centroid 1 onto the point");
    assert_eq!(models(&mut dev, shape, &[0], &[0, 1], &[0.0]), h);
    // One key with 2 M points of 8 dimensions in one launch: each update invocation loops
    // over the key's 7,813 chunks twice (it looped over them 9 times, past the limit).
    let shape = KmeansShape { k: 2, d: 8 };
    let mut host = StateArena::new(ArenaLayout::new(shape.words()), None, "h2").unwrap();
    let mut dev = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "d2").unwrap();
    let init: Vec<f32> = (0..16).map(|i| i as f32).collect();
    host.alloc_slot(&shape.init_slot(&init)).unwrap();
    dev.alloc_slot(&shape.init_slot(&init)).unwrap();
    let n = 2_000_000u32;
    let points: Vec<f32> = (0..n as usize * 8).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
    let h = models(&mut host, shape, &[0], &[0, n], &points);
    assert_eq!(h[0].iter().map(|c| c.0).sum::<u32>(), n);
    assert_eq!(models(&mut dev, shape, &[0], &[0, n], &points), h, "2 M points of one key: device and host agree");
    // 8 M points of one key: 31,250 chunks, twice: past the budget on lavapipe.
    let shape = KmeansShape { k: 2, d: 1 };
    let mut dev = StateArena::new(ArenaLayout::new(shape.words()), Some(g), "d3").unwrap();
    dev.alloc_slot(&shape.init_slot(&[0.0, 5.0])).unwrap();
    let n = 8_000_000u32;
    let points = vec![1.0f32; n as usize];
    match step(&mut dev, shape, &[0], &[0, n], &points).wait() {
        Err(e) => {
            assert!(g.loops_capped(), "refused on a device without the limit: {e}");
            assert!(e.to_string().contains("weir.gpu.batch.max-records") && e.to_string().contains("65,535"), "{e}");
        }
        Ok(m) => {
            assert!(!g.loops_capped(), "lavapipe updated past its loop budget");
            assert_eq!(m.centroid(0, 0).0, n, "every point counted");
        }
    }
}

//! Streaming mini-batch K-means over device-resident models: assignment, per-centre sums and
//! the centre update run where the models live, for several keys per launch.
//!
//! A model's slot (32-bit words): `[d, k, 0, 0] | k × d centroids (f32) | k counts (u32)`.

use super::StateArena;
use crate::transfer::Bind;
use crate::{GpuError, Pending};

const SHADER: &str = include_str!("../shaders/kmeans_resident.wgsl");
const HEADER: usize = 4;

/// The shape of the models of one operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KmeansShape {
    /// Centroids.
    pub k: usize,
    /// Dimensions.
    pub d: usize,
}

impl KmeansShape {
    /// Words of one model.
    pub fn words(&self) -> usize {
        HEADER + self.k * self.d + self.k
    }

    /// A model's slot from its first centroids (`k × d`), with zero counts.
    pub fn init_slot(&self, centroids: &[f32]) -> Vec<u32> {
        let mut w = Vec::with_capacity(self.words());
        w.extend_from_slice(&[self.d as u32, self.k as u32, 0, 0]);
        w.extend(centroids.iter().map(|x| x.to_bits()));
        w.resize(self.words(), 0);
        w
    }

    /// Centroids (`k × d`) and counts of a slot's words, checked against this shape.
    pub fn read_slot(&self, words: &[u32]) -> Result<(Vec<f32>, Vec<u32>), GpuError> {
        if words.len() < self.words() || words[0] as usize != self.d || words[1] as usize != self.k {
            return Err(GpuError::Input(format!(
                "a K-means model of {} words (d = {}, k = {}) where d = {}, k = {} is expected",
                words.len(),
                words.first().copied().unwrap_or(0),
                words.get(1).copied().unwrap_or(0),
                self.d,
                self.k
            )));
        }
        let c = words[HEADER..HEADER + self.k * self.d].iter().map(|&b| f32::from_bits(b)).collect();
        Ok((c, words[HEADER + self.k * self.d..self.words()].to_vec()))
    }
}

/// The models after a step, per key of the batch (in batch order), per centroid: its count of
/// points so far and its coordinates.
#[derive(Clone, Debug, PartialEq)]
pub struct KmeansModels {
    shape: KmeansShape,
    words: Vec<u32>,
}

impl KmeansModels {
    /// Keys in the step.
    pub fn keys(&self) -> usize {
        self.words.len() / (self.shape.k * (self.shape.d + 1))
    }

    /// Key `j`'s centroid `c`: its count and coordinates.
    pub fn centroid(&self, j: usize, c: usize) -> (u32, impl Iterator<Item = f32> + '_) {
        let at = (j * self.shape.k + c) * (self.shape.d + 1);
        (self.words[at], self.words[at + 1..at + 1 + self.shape.d].iter().map(|&b| f32::from_bits(b)))
    }
}

/// One step over a batch: `slots[j]` is key `j`'s slot, its points are
/// `points[starts[j] * d .. starts[j + 1] * d]` (`starts` has one more entry than `slots`).
pub fn step(arena: &mut StateArena, shape: KmeansShape, slots: &[u32], starts: &[u32], points: &[f32]) -> Pending<KmeansModels> {
    let (k, d) = (shape.k, shape.d);
    let n = points.len() / d.max(1);
    if d == 0 || k == 0 || !points.len().is_multiple_of(d) || starts.len() != slots.len() + 1 || starts.last().copied() != Some(n as u32) {
        return Pending::ready(Err(GpuError::Input(format!("kmeans step: {} keys, {} point values, d = {d}", slots.len(), points.len()))));
    }
    if arena.layout().state_words < shape.words() {
        return Pending::ready(Err(GpuError::Input(format!("kmeans step: slots of {} words for models of {}", arena.layout().state_words, shape.words()))));
    }
    let chunk = arena.layout().chunk_words;
    let bases: Vec<u32> = slots.iter().map(|&s| arena.slot_word(s)).collect();
    if let Some((words, dirty)) = arena.host_mut() {
        return Pending::ready(Ok(cpu_step(words, dirty, chunk, shape, &bases, starts, points)));
    }
    let Some((kernels, _)) = arena.device() else { unreachable!("an arena is on the host or on the device") };
    // An invocation's loops: assign k·d, update twice the chunks of its key's points.
    let most_points = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    if let Err(e) = kernels.check_loops(crate::kernels::gpu::kmeans_assign_loops(k, d), || format!("kmeans: assigning a point to {k} centroids of {d} dimensions")) {
        return Pending::ready(Err(e));
    }
    if let Err(e) = kernels.check_loops(2 * most_points.div_ceil(POINT_CHUNK) as usize + 4, || "kmeans: one key's points in one batch (lower weir.gpu.batch.max-records)".into()) {
        return Pending::ready(Err(e));
    }
    // Keep every binding of a launch within the device's largest storage binding: split the
    // keys into launches (they run in submission order, like one).
    let max = kernels.engine.limits().max_binding;
    let bytes = |j: usize| -> [u64; 4] {
        let (len, q) = ((starts[j + 1] - starts[j]) as u64, (starts[j + 1] - starts[j]).div_ceil(POINT_CHUNK) as u64);
        let (k, d) = (k as u64, d as u64);
        [len * d * 4, (4 + len + 4 * q) * 4, (len + q * k * (d + 1)) * 4, k * (d + 1) * 4]
    };
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let (mut from, mut sum) = (0usize, [0u64; 4]);
    for j in 0..slots.len() {
        let b = bytes(j);
        if b.iter().any(|&x| x > max) {
            return Pending::ready(Err(GpuError::Input(format!(
                "kmeans step: key {j} of the batch has {} points of {d} dimensions: its launch needs a binding of {} bytes, beyond the device's largest storage binding ({max} bytes); lower weir.gpu.batch.max-records",
                starts[j + 1] - starts[j],
                b.iter().max().copied().unwrap_or(0)
            ))));
        }
        if j > from && sum.iter().zip(&b).any(|(s, x)| s + x > max) {
            groups.push((from, j));
            (from, sum) = (j, [0; 4]);
        }
        for (s, x) in sum.iter_mut().zip(&b) {
            *s += x;
        }
    }
    groups.push((from, slots.len()));
    if groups.len() == 1 {
        return launch(arena, shape, &bases, starts, points);
    }
    let parts: Vec<Pending<KmeansModels>> = groups
        .iter()
        .map(|&(a, b)| {
            let rebased: Vec<u32> = starts[a..=b].iter().map(|&x| x - starts[a]).collect();
            launch(arena, shape, &bases[a..b], &rebased, &points[starts[a] as usize * d..starts[b] as usize * d])
        })
        .collect();
    Pending::all(parts).map(move |ms: Vec<KmeansModels>| KmeansModels { shape, words: ms.into_iter().flat_map(|m| m.words).collect() })
}

/// The CPU path of [`step`] on a copy of `models` (the models of the keys of a step, e.g. its
/// result), the same points per key: what the step costs on the host, for the monitor's live
/// speedup. Nothing of the operator's state is touched.
pub fn cpu_twin(models: &KmeansModels, starts: &[u32], points: &[f32]) -> Result<KmeansModels, GpuError> {
    let shape = models.shape;
    let (k, d, keys) = (shape.k, shape.d, models.keys());
    if d == 0 || starts.len() != keys + 1 || starts.last().map(|&n| n as usize * d) != Some(points.len()) {
        return Err(GpuError::Input(format!("kmeans twin: {keys} keys, {} starts, {} point values, d = {d}", starts.len(), points.len())));
    }
    let words = shape.words();
    let mut arena = vec![0u32; keys * words];
    for (j, slot) in arena.chunks_mut(words).enumerate() {
        slot[..HEADER].copy_from_slice(&[d as u32, k as u32, 0, 0]);
        for c in 0..k {
            let at = (j * k + c) * (d + 1);
            slot[HEADER + c * d..HEADER + (c + 1) * d].copy_from_slice(&models.words[at + 1..at + 1 + d]);
            slot[HEADER + k * d + c] = models.words[at];
        }
    }
    let bases: Vec<u32> = (0..keys).map(|j| (j * words) as u32).collect();
    let mut dirty = vec![0u32; keys];
    Ok(cpu_step(&mut arena, &mut dirty, words, shape, &bases, starts, points))
}

/// One launch on the device for the keys at `bases` (slot words).
fn launch(arena: &StateArena, shape: KmeansShape, bases: &[u32], starts: &[u32], points: &[f32]) -> Pending<KmeansModels> {
    let (k, d) = (shape.k, shape.d);
    let n = points.len() / d;
    let chunk = arena.layout().chunk_words;
    let Some((kernels, places)) = arena.device() else { unreachable!("launch is for the device") };
    let keys = bases.len();
    let chunks = chunk_count(starts);
    let mut segs: Vec<u32> = Vec::with_capacity(keys * 4 + n + chunks * 4);
    let mut q = 0u32;
    for j in 0..keys {
        let len = starts[j + 1] - starts[j];
        segs.extend_from_slice(&[bases[j], starts[j], len, q]);
        q += len.div_ceil(POINT_CHUNK);
    }
    for j in 0..keys {
        segs.extend(std::iter::repeat_n(j as u32, (starts[j + 1] - starts[j]) as usize));
    }
    for j in 0..keys {
        let mut p = starts[j];
        while p < starts[j + 1] {
            let len = POINT_CHUNK.min(starts[j + 1] - p);
            segs.extend_from_slice(&[j as u32, p, len, 0]);
            p += len;
        }
    }
    let lanes = resident_lanes(k, d);
    let dims = [keys as u32, n as u32, k as u32, d as u32, chunk as u32, chunks as u32, lanes as u32, 0];
    let out_words = keys * k * (d + 1);
    let assign = kernels.pipeline("kmeans_resident_assign", SHADER, "assign", 7);
    let values = kernels.pipeline("kmeans_resident_update_values", SHADER, "update_values", 7);
    let counts = kernels.pipeline("kmeans_resident_update_counts", SHADER, "update_counts", 7);
    let (ax, ay) = crate::kernels::gpu::grid(n);
    // Chunks reduced in workgroup memory where a lane's sums fit; else an invocation per sum.
    let (partial, px, py) = if lanes > 0 {
        let groups = chunks.div_ceil(lanes);
        (kernels.pipeline("kmeans_resident_partial_tiled", SHADER, "partial_tiled", 7), groups.min(65535) as u32, groups.div_ceil(65535) as u32)
    } else {
        let (px, py) = crate::kernels::gpu::grid(chunks * k * (d + 1));
        (kernels.pipeline("kmeans_resident_partial", SHADER, "partial", 7), px, py)
    };
    let (vx, vy) = crate::kernels::gpu::grid(keys * k * d);
    let (ux, uy) = crate::kernels::gpu::grid(keys * k);
    kernels.engine.submit(
        &[
            Bind::In(bytemuck::cast_slice(points)),
            Bind::In(bytemuck::cast_slice(&segs)),
            Bind::Out(((n + chunks * k * (d + 1)) * 4) as u64),
            Bind::Resident(places.arena.0, places.arena.1, places.arena.2),
            Bind::Resident(places.dirty.0, places.dirty.1, places.dirty.2),
            Bind::Out((out_words * 4) as u64),
            Bind::In(bytemuck::cast_slice(&dims)),
        ],
        &[(assign, ax, ay), (partial, px, py), (values, vx, vy), (counts, ux, uy)],
        5,
        move |bytes| Ok(KmeansModels { shape, words: bytemuck::pod_collect_to_vec(&bytes[..out_words * 4]) }),
    )
}

/// Floats of workgroup memory of `partial_tiled` (`ACC` in kmeans_resident.wgsl).
const RESIDENT_ACC_FLOATS: usize = 4096;

/// Chunks per workgroup of `partial_tiled` for k centroids of d values: as many lanes of at least
/// d + 1 invocations (at most 64) as fit 64 invocations and whose sums fit workgroup memory; 0
/// when one lane's do not (the fallback pass).
pub(crate) fn resident_lanes(k: usize, d: usize) -> usize {
    (64 / (d + 1).min(64)).min(RESIDENT_ACC_FLOATS / (k * (d + 1)))
}

/// Points per partial sum: no kernel invocation loops over more (Mesa's llvmpipe stops a loop
/// after 65,535 iterations).
const POINT_CHUNK: u32 = 256;

fn chunk_count(starts: &[u32]) -> usize {
    starts.windows(2).map(|w| (w[1] - w[0]).div_ceil(POINT_CHUNK) as usize).sum()
}

/// The CPU twin of the three passes, on the host arena (same arithmetic, same order).
fn cpu_step(arena: &mut [u32], dirty: &mut [u32], chunk: usize, shape: KmeansShape, bases: &[u32], starts: &[u32], points: &[f32]) -> KmeansModels {
    let (k, d) = (shape.k, shape.d);
    let n = points.len() / d;
    let mut labels = vec![0u32; n];
    for (j, &base) in bases.iter().enumerate() {
        let (first, last) = (starts[j] as usize, starts[j + 1] as usize);
        let cents: Vec<f32> = arena[base as usize + HEADER..][..k * d].iter().map(|&w| f32::from_bits(w)).collect();
        let kt = crate::kernels::cpu::transpose(&cents, k, d);
        crate::kernels::cpu::assign(&points[first * d..last * d], &kt, k, d, &mut labels[first..last]);
    }
    let mut out = vec![0u32; bases.len() * k * (d + 1)];
    // Per centroid: d sums and a count, per chunk of points, then added over the chunks in
    // order: the GPU's order of additions, in one pass over the points.
    let mut partial = vec![0f32; k * (d + 1)];
    let mut sums = vec![0f32; k * (d + 1)];
    // A chunk's counts are exact in f32 (at most 256); their sum is kept in u32, as the
    // device adds them (f32 would round past 2^24 points).
    let mut counts = vec![0u32; k];
    for (j, &base) in bases.iter().enumerate() {
        let (first, last) = (starts[j] as usize, starts[j + 1] as usize);
        sums.fill(0.0);
        counts.fill(0);
        let mut p0 = first;
        while p0 < last {
            let p1 = (p0 + POINT_CHUNK as usize).min(last);
            partial.fill(0.0);
            for p in p0..p1 {
                let acc = &mut partial[labels[p] as usize * (d + 1)..][..d + 1];
                for (a, &x) in acc.iter_mut().zip(&points[p * d..(p + 1) * d]) {
                    *a += x;
                }
                acc[d] += 1.0;
            }
            for (s, v) in sums.iter_mut().zip(&partial) {
                *s += v;
            }
            for (c, n) in counts.iter_mut().enumerate() {
                *n += partial[c * (d + 1) + d] as u32;
            }
            p0 = p1;
        }
        for c in 0..k {
            let cent = base as usize + HEADER + c * d;
            let count_at = base as usize + HEADER + k * d + c;
            let o = (j * k + c) * (d + 1);
            let sums = &sums[c * (d + 1)..(c + 1) * (d + 1)];
            let cnt = counts[c];
            if cnt == 0 {
                out[o] = arena[count_at];
                out[o + 1..o + 1 + d].copy_from_slice(&arena[cent..cent + d]);
                continue;
            }
            let seen = arena[count_at] + cnt;
            let eta = cnt as f32 / seen as f32;
            for x in 0..d {
                let mean = sums[x] / cnt as f32;
                let old = f32::from_bits(arena[cent + x]);
                let v = old + eta * (mean - old);
                arena[cent + x] = v.to_bits();
                out[o + 1 + x] = v.to_bits();
                dirty[(cent + x) / chunk] = 1;
            }
            arena[count_at] = seen;
            out[o] = seen;
            dirty[count_at / chunk] = 1;
        }
    }
    KmeansModels { shape, words: out }
}

//! Streaming mini-batch K-means (Sculley 2010), one model per key, on the GPU path or the CPU
//! path of `weir-gpu`'s kernels.
//!
//! The models are device-resident keyed state ([`KeyedArena`]): assignment, per-centre sums and
//! the centre update run where the models live, one launch for every key of a batch; nothing of
//! a model is uploaded per batch. Only the updated centroids come back, as the operator's
//! output. A key's first points are held in host state until there are enough to seed its
//! model (k-means++ on the host), then its model gets a slot.

use std::collections::VecDeque;
use std::sync::Arc;

use weir_gpu::kernels::Kernels;
use weir_gpu::state::kmeans::{cpu_twin, step, KmeansModels, KmeansShape};
use weir_gpu::Pending;

use crate::ops::gpu_probe::{observe, GpuProbe};
use crate::ops::resident::KeyedArena;
use crate::row::{Row, Value};
use crate::state::{KeyedBatchFunction, KeyedContext, StateTables, ValueState};

/// The `kmeans` operator: input rows carry a vector field; after each batch it emits one row
/// `(key, centroid, count, vector)` per centroid of each key in the batch, `count` being the
/// points the centroid has absorbed so far.
///
/// A batch's launch is submitted and its output emitted when it comes back; up to
/// `max_in_flight` launches run at once. A key in two launches in flight needs no wait: the
/// device runs them in submission order, on the model where it lives.
pub struct StreamingKMeans {
    k: usize,
    field: usize,
    kernels: Arc<dyn Kernels>,
    seeds: Option<ValueState<Vec<f32>>>,
    models: KeyedArena<Value>,
    dim: Option<usize>,
    launch: Launch,
    in_flight: VecDeque<(u64, Vec<Value>, Pending<KmeansModels>)>,
    /// Launches waited for to make room (back-pressure), emitted at the next poll.
    done: VecDeque<(u64, Vec<Value>, KmeansModels)>,
    max_in_flight: usize,
    /// Where bad input and state beyond the GPU budget end the job without a restart (YAML
    /// jobs); without it they panic (and the restart strategy decides).
    fatal: Option<crate::stream::InputErrorHandle>,
    failed: bool,
    /// The monitor's figures (GPU path only), made at the first launch, once attached (named).
    probe: Option<GpuProbe>,
}

/// The keys and points gathered for one launch.
#[derive(Default)]
struct Launch {
    keys: Vec<Value>,
    slots: Vec<u32>,
    starts: Vec<u32>,
    points: Vec<f32>,
}

impl StreamingKMeans {
    /// `k` centroids over the vectors in field `field`, computed by `kernels`.
    pub fn new(k: usize, field: usize, kernels: Arc<dyn Kernels>) -> Self {
        let models = KeyedArena::new("kmeans-models", kernels.as_ref());
        Self {
            k,
            field,
            kernels,
            seeds: None,
            models,
            dim: None,
            launch: Launch::default(),
            in_flight: VecDeque::new(),
            done: VecDeque::new(),
            max_in_flight: 2,
            fatal: None,
            failed: false,
            probe: None,
        }
    }

    /// End the job through `handle` (no restart) on bad input or state beyond the budget: a
    /// restart would meet them again.
    pub(crate) fn fail_through(mut self, handle: crate::stream::InputErrorHandle) -> Self {
        self.fatal = Some(handle);
        self
    }

    /// Bad input or a state that cannot fit: deterministic, so a restart would not help.
    fn fail(&mut self, message: String) {
        match &self.fatal {
            Some(h) => {
                tracing::error!("{message}");
                h.fail(message);
                self.failed = true;
            }
            None => panic!("{message}"),
        }
    }

    /// Launches in flight at once (`weir.gpu.max-inflight-batches`).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    fn shape(&self, d: usize) -> KmeansShape {
        KmeansShape { k: self.k, d }
    }

    fn emit(&self, epoch: u64, keys: &[Value], m: &KmeansModels, out: &mut Vec<(u64, Row)>) {
        for (j, key) in keys.iter().enumerate() {
            for c in 0..self.k {
                let (count, x) = m.centroid(j, c);
                out.push((epoch, Row::new([key.clone(), Value::Int(c as i64), Value::Int(count as i64), Value::Vector(Arc::new(x.collect()))])));
            }
        }
    }
}

/// Points per centroid gathered before seeding: k-means++ over a handful of points is easily
/// misled into a local optimum that mini-batch updates never leave.
const SEED_POINTS_PER_CENTROID: usize = 32;

/// Greedy k-means++ seeding over `points` (deterministic for a seed): each step samples
/// `2 + ln k` candidates by D² and keeps the one that lowers the potential most.
fn seed_centroids(points: &[f32], d: usize, k: usize, seed: u64) -> Vec<f32> {
    let n = points.len() / d;
    let mut x = seed | 1;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let dist2 = |i: usize, c: &[f32]| -> f64 { points[i * d..(i + 1) * d].iter().zip(c).map(|(a, b)| ((a - b) as f64).powi(2)).sum() };
    let first = (rnd() * n as f64) as usize % n;
    let mut cents: Vec<f32> = points[first * d..(first + 1) * d].to_vec();
    let mut best: Vec<f64> = (0..n).map(|i| dist2(i, &cents)).collect();
    let tries = 2 + (k as f64).ln() as usize;
    for _ in 1..k {
        let total: f64 = best.iter().sum();
        let mut chosen: Option<(f64, usize, Vec<f64>)> = None;
        for _ in 0..tries {
            let mut target = rnd() * total;
            let mut pick = n - 1;
            for (i, di) in best.iter().enumerate() {
                target -= di;
                if target <= 0.0 {
                    pick = i;
                    break;
                }
            }
            let cand = &points[pick * d..(pick + 1) * d];
            let next: Vec<f64> = (0..n).map(|i| best[i].min(dist2(i, cand))).collect();
            let pot: f64 = next.iter().sum();
            if chosen.as_ref().is_none_or(|(p, _, _)| pot < *p) {
                chosen = Some((pot, pick, next));
            }
        }
        let (_, pick, next) = chosen.expect("at least one try");
        cents.extend_from_slice(&points[pick * d..(pick + 1) * d]);
        best = next;
    }
    cents
}

impl KeyedBatchFunction<Value, Row, Row> for StreamingKMeans {
    fn open(&mut self, states: &mut StateTables<Value>) {
        self.seeds = Some(states.value_state("kmeans-seed-points"));
        self.models.register(states);
        let k = self.k;
        self.models.validate_restored(move |w| match w {
            [d, kk, ..] if *kk as usize == k && w.len() == 4 + k * *d as usize + k => Ok(()),
            [d, kk, ..] => Err(format!("a model of k = {kk}, d = {d} in {} words where the job has k = {k}", w.len())),
            _ => Err(format!("a model of {} words", w.len())),
        });
    }

    fn process_batch(&mut self, ctx: &mut KeyedContext<'_, Value>, batch: &mut Vec<Row>, _out: &mut Vec<Row>) {
        if self.failed {
            return;
        }
        let key = ctx.key().clone();
        if self.dim.is_none() {
            // A restored arena knows its models' dimension: words = 4 + k·d + k.
            self.dim = self.models.state_words().map(|w| w.saturating_sub(4 + self.k) / self.k);
        }
        let start = self.launch.points.len();
        for r in batch.iter() {
            // Checked before anything changes: a bad row leaves no partial update.
            let bad = match r.get(self.field) {
                Value::Vector(v) if self.dim.is_none_or(|d| v.len() == d) => None,
                Value::Vector(v) => Some(format!("a {}-dimensional point for {}-dimensional models", v.len(), self.dim.unwrap_or(0))),
                other => Some(format!("field {} is a {}, not a vector", self.field, other.type_name())),
            };
            if let Some(why) = bad {
                self.launch.points.truncate(start);
                self.fail(format!("kmeans: key {key}: {why}"));
                return;
            }
            let Value::Vector(v) = r.get(self.field) else { unreachable!("checked") };
            self.dim.get_or_insert(v.len());
            self.launch.points.extend_from_slice(v);
        }
        let d = self.dim.expect("set by the first point");
        let slot = match self.models.slot(&key) {
            Some(s) => s,
            None => {
                // Not seeded yet: hold the points until there are enough for k-means++.
                let seeds = self.seeds.as_ref().expect("opened");
                let held = seeds.get_or_insert_with(ctx, Vec::new);
                held.extend_from_slice(&self.launch.points[start..]);
                self.launch.points.truncate(start);
                if held.len() / d < self.k * SEED_POINTS_PER_CENTROID {
                    return;
                }
                let held = std::mem::take(held);
                seeds.clear(ctx);
                let seed = weir_state::keygroup::StableHasher::hash_one(&key);
                let shape = self.shape(d);
                let init = shape.init_slot(&seed_centroids(&held, d, self.k, seed));
                let slot = match self.models.ensure(shape.words()).map(|_| ()).and_then(|()| self.models.insert(key.clone(), &init)) {
                    Ok(slot) => slot,
                    Err(e) => {
                        self.launch.points.truncate(start);
                        self.fail(format!("kmeans: key {key}: {e}"));
                        return;
                    }
                };
                self.launch.points.extend_from_slice(&held);
                slot
            }
        };
        let l = &mut self.launch;
        if l.starts.is_empty() {
            l.starts.push(0);
        }
        l.keys.push(key);
        l.slots.push(slot);
        l.starts.push((l.points.len() / d) as u32);
    }

    fn flush(&mut self, _tables: &mut StateTables<Value>, epoch: u64) {
        // Tests make a launch panic here (an operator failure that leaves the process and its
        // device alive) or slow the job down; nothing without the `failpoints` feature.
        fail::fail_point!("kmeans-flush");
        if self.launch.keys.is_empty() {
            self.launch.points.clear();
            return;
        }
        while self.in_flight.len() >= self.max_in_flight {
            let (e, keys, p) = self.in_flight.pop_front().expect("non-empty");
            let m = p.wait().unwrap_or_else(|err| panic!("kmeans on {}: {err}", self.kernels.name()));
            self.done.push_back((e, keys, m));
        }
        let shape = self.shape(self.dim.expect("points seen"));
        let l = std::mem::take(&mut self.launch);
        if self.probe.is_none() {
            self.probe = GpuProbe::new(self.models.operator_name(), self.kernels.as_ref());
        }
        let arena = self.models.arena().expect("a key has a slot");
        // The CPU twin steps a copy of the models after the launch: the same work as the CPU
        // path's step on the models before it.
        let twin = |_: &weir_gpu::kernels::cpu::CpuKernels, m: &KmeansModels| cpu_twin(m, &l.starts, &l.points);
        let pending = observe(&mut self.probe, || step(arena, shape, &l.slots, &l.starts, &l.points), twin);
        self.in_flight.push_back((epoch, l.keys, pending));
        // Keep the buffers' capacity for the next launch.
        self.launch = Launch { keys: Vec::new(), slots: l.slots, starts: l.starts, points: l.points };
        self.launch.slots.clear();
        self.launch.starts.clear();
        self.launch.points.clear();
    }

    fn poll(&mut self, _tables: &mut StateTables<Value>, out: &mut Vec<(u64, Row)>) -> Option<u64> {
        while let Some((e, keys, m)) = self.done.pop_front() {
            self.emit(e, &keys, &m, out);
        }
        while let Some(r) = self.in_flight.front_mut().and_then(|(_, _, p)| p.poll(false)) {
            let (e, keys, _) = self.in_flight.pop_front().expect("non-empty");
            let m = r.unwrap_or_else(|err| panic!("kmeans on {}: {err}", self.kernels.name()));
            self.emit(e, &keys, &m, out);
        }
        self.in_flight.front().map(|(e, _, _)| *e)
    }

    fn resident(&mut self) -> Option<&mut KeyedArena<Value>> {
        Some(&mut self.models)
    }
}

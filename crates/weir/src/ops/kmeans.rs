//! Streaming mini-batch K-means (Sculley 2010), one model per key, on the GPU path or the CPU
//! path of `weir-gpu`'s kernels. The model is keyed state: it is checkpointed (copied to the
//! host at the barrier: it lives on the host between batches) and restored at any parallelism.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weir_gpu::kernels::{apply_step, Kernels, KmeansStep};
use weir_gpu::Pending;

use crate::row::{Row, Value};
use crate::state::{KeyedBatchFunction, KeyedContext, StateTables, ValueState};

/// One key's model.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KMeansModel {
    /// Dimensions.
    pub dim: usize,
    /// `k × dim` centroids (empty until `k` points have been seen).
    pub centroids: Vec<f32>,
    /// Points assigned to each centroid so far.
    pub seen: Vec<u64>,
    /// Points held until there are `k` to seed the model with.
    pub pending: Vec<f32>,
}

/// The `kmeans` operator: input rows carry a vector field; after each batch it emits one row
/// `(key, centroid, vector)` per centroid.
///
/// A batch's step is submitted and applied when it comes back: batches of other keys are
/// gathered and uploaded meanwhile. A key's next batch waits for its previous step (it needs
/// the updated centres), and at most `max_in_flight` steps run at once.
pub struct StreamingKMeans {
    k: usize,
    field: usize,
    kernels: Arc<dyn Kernels>,
    state: Option<ValueState<KMeansModel>>,
    points: Vec<f32>,
    in_flight: VecDeque<(Value, Pending<KmeansStep>)>,
    max_in_flight: usize,
}

impl StreamingKMeans {
    /// `k` centroids over the vectors in field `field`, computed by `kernels`.
    pub fn new(k: usize, field: usize, kernels: Arc<dyn Kernels>) -> Self {
        Self { k, field, kernels, state: None, points: Vec::new(), in_flight: VecDeque::new(), max_in_flight: 2 }
    }

    /// Steps in flight at once (`weir.gpu.max-inflight-batches`; 1 = one at a time).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Apply the oldest step in flight (waiting for it if `block`); false if none was ready.
    fn complete_front(&mut self, tables: &mut StateTables<Value>, out: &mut Vec<Row>, block: bool) -> bool {
        let Some(r) = self.in_flight.front_mut().and_then(|(_, p)| p.poll(block)) else { return false };
        let (key, _) = self.in_flight.pop_front().expect("non-empty");
        let step = r.unwrap_or_else(|e| panic!("kmeans on {}: key {key}: {e}", self.kernels.name()));
        let mut ctx = KeyedContext::new(&key, tables);
        let model = self.state.as_ref().expect("opened").get_or_insert_with(&mut ctx, KMeansModel::default);
        let (k, d) = (self.k, model.dim);
        apply_step(&mut model.centroids, &mut model.seen, &step, d);
        for c in 0..k {
            out.push(Row::new([key.clone(), Value::Int(c as i64), Value::Vector(Arc::new(model.centroids[c * d..(c + 1) * d].to_vec()))]));
        }
        true
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
        self.state = Some(states.value_state("kmeans-model"));
    }

    fn process_batch(&mut self, ctx: &mut KeyedContext<'_, Value>, batch: &mut Vec<Row>, out: &mut Vec<Row>) {
        // This key's previous step first (its centres), and room in the window.
        if let Some(i) = self.in_flight.iter().position(|(k, _)| k == ctx.key()) {
            for _ in 0..=i {
                self.complete_front(ctx.tables, out, true);
            }
        }
        while self.in_flight.len() >= self.max_in_flight {
            self.complete_front(ctx.tables, out, true);
        }
        let key = ctx.key().clone();
        let state = self.state.as_ref().expect("opened");
        let k = self.k;
        let model = state.get_or_insert_with(ctx, KMeansModel::default);
        self.points.clear();
        for r in batch.iter() {
            let Value::Vector(v) = r.get(self.field) else {
                panic!("kmeans: key {key}: field {} is a {}, not a vector", self.field, r.get(self.field).type_name());
            };
            if model.dim == 0 {
                model.dim = v.len();
            }
            if v.len() != model.dim {
                panic!("kmeans: key {key}: a {}-dimensional point for a {}-dimensional model", v.len(), model.dim);
            }
            self.points.extend_from_slice(v);
        }
        let d = model.dim;
        if model.centroids.is_empty() {
            model.pending.extend_from_slice(&self.points);
            if model.pending.len() / d < k * SEED_POINTS_PER_CENTROID {
                return;
            }
            let seed = weir_state::keygroup::StableHasher::hash_one(&key);
            model.centroids = seed_centroids(&model.pending, d, k, seed);
            model.seen = vec![0; k];
            self.points = std::mem::take(&mut model.pending);
        }
        let step = self.kernels.kmeans_step_async(&self.points, &model.centroids, d);
        self.in_flight.push_back((key, step));
    }

    fn poll(&mut self, tables: &mut StateTables<Value>, out: &mut Vec<Row>, block: bool) -> bool {
        while self.complete_front(tables, out, block) {}
        !self.in_flight.is_empty()
    }
}

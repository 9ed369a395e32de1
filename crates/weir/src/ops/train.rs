//! Streaming training of the small CNN ([`weir_gpu::cnn::SmallCnn`]), one model per key: each
//! key's samples are gathered into mini-batches, and each mini-batch is one step of softmax
//! cross-entropy and Adam on the key's model where it lives (device memory on the GPU path).
//!
//! The models, their Adam moments and a running window of loss and accuracy are
//! device-resident keyed state ([`KeyedArena`], a *windowed* slot of [`weir_gpu::train`] per
//! key): nothing of a model crosses to the device per batch, and a checkpoint copies them on the
//! device after the epoch's steps. A key's samples that do not fill a mini-batch when an epoch
//! closes wait in host keyed state, so a checkpoint holds them too: every sample trains once.
//!
//! **Reports.** Every `report_every` samples of a key (rounded up to whole mini-batches), the
//! step that closes the window emits a row `(key, samples, loss, accuracy)`: the samples trained
//! on the key in all, and the window's mean loss and accuracy (of each batch before its update).
//! The window lives in the slot and is updated by the step itself, so a snapshot holds it
//! exactly as of the barrier although the step's result comes back later: the rows are exactly
//! once, with no gap and no duplicate in `samples` across failures.
//!
//! **Export.** With [`StreamingCnnTraining::export`], each key's model is written as safetensors
//! when a checkpoint completes, exactly once ([`ModelExport`]): staged from the snapshot's words
//! (the model as of that checkpoint, never newer) once the snapshot is durable, published on
//! the checkpoint's notification. A key is staged when its model changed since it was last
//! staged (its sample count tells).
//!
//! ```
//! use std::sync::Arc;
//! use weir::ops::train::StreamingCnnTraining;
//! use weir::{sink::CollectSink, source::VecSource, JobConfig, Row, StreamEnv, Value};
//! use weir_gpu::kernels::cpu::CpuKernels;
//! use weir_gpu::train::CnnShape;
//!
//! // Two classes of 4×4 images: bright top half or bright bottom half; one key.
//! let rows: Vec<Row> = (0..256)
//!     .map(|i| {
//!         let label = i % 2;
//!         let px: Vec<f32> = (0..16).map(|p| if (p < 8) == (label == 0) { 1.0 } else { 0.0 }).collect();
//!         Row::new([Value::text("tenant-a"), Value::Vector(Arc::new(px)), Value::Int(label)])
//!     })
//!     .collect();
//! let shape = CnnShape { in_c: 1, h: 4, w: 4, conv_c: 2, classes: 2 };
//! let out = CollectSink::new();
//! let sink = out.clone();
//! let env = StreamEnv::new("train-doc", JobConfig::from_pairs([("parallelism.default", "1")]).unwrap());
//! env.execute(move |job| {
//!     let train = StreamingCnnTraining::new(shape, 1, 2, Arc::new(CpuKernels::new(1))).batch_size(8).report_every(64);
//!     job.source("samples", VecSource::new(rows.clone()))
//!         .key_by(|r: &Row| r.get(0).clone())
//!         .process_batches("cnn_train", train)
//!         .sink("reports", sink.clone());
//! })
//! .unwrap();
//! let reports = out.take();
//! // (key, samples, loss, accuracy) every 64 samples.
//! let samples: Vec<i64> = reports.iter().map(|r| match r.get(1) { Value::Int(n) => *n, _ => 0 }).collect();
//! assert_eq!(samples, [64, 128, 192, 256]);
//! assert!(matches!(reports[3].get(3), Value::Float(a) if *a > 0.9), "{reports:?}");
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use weir_gpu::cnn::SmallCnn;
use weir_gpu::kernels::gpu::GpuKernels;
use weir_gpu::kernels::Kernels;
use weir_gpu::train::{train_step_windowed_cpu, Adam, CnnShape, WindowedStats, MAX_REPORT_EVERY};
use weir_gpu::{GpuError, Pending};

use crate::ops::export::ModelExport;
use crate::ops::gpu_probe::{observe, GpuProbe};
use crate::ops::resident::{KeyedArena, SlotsWritten};
use crate::row::{Row, Value};
use crate::runtime::JobCtx;
use crate::state::{KeyedBatchFunction, KeyedContext, StateTables, ValueState};
use crate::stream::InputErrorHandle;

/// A key's samples that do not fill a mini-batch yet (host keyed state, checkpointed).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Held {
    pixels: Vec<f32>,
    labels: Vec<u32>,
}

/// The mini-batches gathered for one flush, in order: mini-batch `j` is `pixels[j·batch·input
/// ..]` and `labels[j·batch..]` of key `steps[j]`.
#[derive(Default)]
struct Launch {
    steps: Vec<(Value, u32)>,
    pixels: Vec<f32>,
    labels: Vec<u32>,
}

/// Where the operator stands in a job, for messages and for the export.
#[derive(Clone)]
struct Described {
    /// The step as the job names it (`pipeline[3].cnn_train`, or `cnn_train`).
    what: String,
    /// The pixel and label fields' names.
    field: String,
    label: String,
}

/// The `cnn_train` operator: trains a [`SmallCnn`] of `shape` per key on rows holding an image
/// (a vector field of `in_c · h · w` values, NCHW) and its class (an integer field below
/// `classes`), emitting `(key, samples, loss, accuracy)` every `report_every` samples of a key.
/// See the module documentation.
pub struct StreamingCnnTraining {
    shape: CnnShape,
    opt: Adam,
    batch: usize,
    report_every: u32,
    field: usize,
    label: usize,
    /// A new key's windowed slot (words).
    init: Arc<Vec<u32>>,
    init_model: bool,
    export: Option<(String, String)>,
    /// The export once the operator started, and the file each key of this subtask claimed:
    /// a key whose file cannot be named, or would be another key's, is refused when it first
    /// appears (at a snapshot it would fail every checkpoint).
    exporter: Arc<std::sync::OnceLock<Arc<ModelExport>>>,
    export_files: HashMap<std::path::PathBuf, Value>,
    described: Described,
    kernels: Arc<dyn Kernels>,
    gpu: Option<GpuKernels>,
    held: Option<ValueState<Held>>,
    models: KeyedArena<Value>,
    launch: Launch,
    in_flight: VecDeque<(u64, Vec<Value>, Pending<Vec<WindowedStats>>)>,
    /// Steps done (CPU path) or waited for to make room, emitted at the next poll.
    done: VecDeque<(u64, Vec<Value>, Vec<WindowedStats>)>,
    max_in_flight: usize,
    /// The CPU path's copy of a slot as f32.
    host_slot: Vec<f32>,
    bad_input: Option<InputErrorHandle>,
    failed: bool,
    /// The monitor's figures (GPU path only), made at the first launch, once attached (named).
    probe: Option<GpuProbe>,
}

impl StreamingCnnTraining {
    /// Train a model of `shape` per key on the image in field `field` and the class in field
    /// `label`, with `kernels` (GPU or CPU path). Defaults: mini-batches of 32, Adam with learning
    /// rate 0.01 (β 0.9, 0.999, ε 1e-8), a report every 1,000 samples, new models from
    /// [`CnnShape::init_slot`] of seed 0.
    pub fn new(shape: CnnShape, field: usize, label: usize, kernels: Arc<dyn Kernels>) -> Self {
        let models = KeyedArena::new("cnn-train-models", kernels.as_ref());
        let mut t = Self {
            shape,
            opt: Adam::default(),
            batch: 32,
            report_every: 1000,
            field,
            label,
            init: Arc::new(Vec::new()),
            init_model: false,
            export: None,
            exporter: Arc::default(),
            export_files: HashMap::new(),
            described: Described { what: "cnn_train".into(), field: format!("field {field}"), label: format!("field {label}") },
            gpu: kernels.as_gpu().cloned(),
            kernels,
            held: None,
            models,
            launch: Launch::default(),
            in_flight: VecDeque::new(),
            done: VecDeque::new(),
            max_in_flight: 2,
            host_slot: Vec::new(),
            bad_input: None,
            failed: false,
            probe: None,
        };
        t.init = Arc::new(t.windowed(shape.init_slot(0)));
        t
    }

    /// Samples per mini-batch (one training step each; at least 1, at most 2^23).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch = n.clamp(1, MAX_REPORT_EVERY as usize);
        self
    }

    /// Adam's hyper-parameters.
    pub fn adam(mut self, opt: Adam) -> Self {
        self.opt = opt;
        self
    }

    /// Emit a key's report once its window holds `n` samples or more (at least 1, at most 2^23).
    pub fn report_every(mut self, n: u32) -> Self {
        self.report_every = n.clamp(1, MAX_REPORT_EVERY);
        self
    }

    /// New keys' models start from [`CnnShape::init_slot`] of `seed` (unless [`Self::init_model`]).
    pub fn seed(mut self, seed: u64) -> Self {
        if !self.init_model {
            self.init = Arc::new(self.windowed(self.shape.init_slot(seed)));
        }
        self
    }

    /// New keys' models start from `model` (fine-tuning), which must have the operator's shape.
    pub fn init_model(mut self, model: &SmallCnn) -> Result<Self, GpuError> {
        if CnnShape::of(model) != self.shape {
            return Err(GpuError::Input(format!("{}: the initial model is a {:?}, the operator trains a {:?}", self.described.what, CnnShape::of(model), self.shape)));
        }
        self.init = Arc::new(self.windowed(CnnShape::slot_from_model(model)));
        self.init_model = true;
        Ok(self)
    }

    /// Write each key's model to `template` (`dir/model-{key}.safetensors`) when a checkpoint
    /// completes, exactly once; `config_key` names the setting in errors. Needs checkpointing:
    /// models are staged by checkpoints.
    pub fn export(mut self, config_key: &str, template: &str) -> Self {
        self.export = Some((config_key.to_string(), template.to_string()));
        self
    }

    /// Flushes of mini-batches in flight at once (`weir.gpu.max-inflight-batches`).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Name the step and its fields in messages, and end the job on a row that is no sample or a
    /// state beyond the GPU budget (instead of panicking, which would restart it on the same row).
    pub(crate) fn in_job(mut self, what: &str, field: &str, label: &str, bad_input: InputErrorHandle) -> Self {
        self.described = Described { what: what.to_string(), field: field.to_string(), label: label.to_string() };
        self.bad_input = Some(bad_input);
        self
    }

    /// A model slot as a windowed slot's words (an empty window).
    fn windowed(&self, mut slot: Vec<f32>) -> Vec<u32> {
        slot.resize(self.shape.windowed_slot_words(), 0.0);
        slot.into_iter().map(f32::to_bits).collect()
    }

    /// Bad input, or a state beyond the GPU budget: deterministic, so a restart would meet it
    /// again. Ends the job (in a YAML job), or panics.
    fn fail(&mut self, message: String) {
        match &self.bad_input {
            Some(h) => {
                tracing::error!("{message}");
                h.fail(message);
                self.failed = true;
            }
            None => panic!("{message}"),
        }
    }

    fn emit(&self, epoch: u64, keys: &[Value], stats: &[WindowedStats], out: &mut Vec<(u64, Row)>) {
        for (key, st) in keys.iter().zip(stats) {
            if let Some(r) = st.report {
                let n = r.window.samples.max(1) as f64;
                out.push((
                    epoch,
                    Row::new([key.clone(), Value::Int(r.total as i64), Value::Float(r.window.loss_sum as f64 / n), Value::Float(r.window.correct as f64 / n)]),
                ));
            }
        }
    }

    fn fail_step(&self, e: GpuError) -> ! {
        panic!("{}: training on {}: {e}", self.described.what, self.kernels.name())
    }

    /// Why a new key's model could not be exported, if it could not: its file name cannot be
    /// made, or another key of this subtask has the same file (a template without `{key}`, or
    /// keys that print alike).
    fn export_refuses(&mut self, key: &Value) -> Option<String> {
        let export = self.exporter.get()?;
        let (config_key, _) = self.export.as_ref()?;
        let path = match export.final_path(key) {
            Ok(p) => p,
            Err(e) => return Some(e.to_string()),
        };
        if let Some(other) = self.export_files.get(&path).filter(|k| *k != key) {
            return Some(format!("{config_key}: its model would be published to {}, like key {other}'s", path.display()));
        }
        self.export_files.insert(path, key.clone());
        None
    }

    /// The export hook, made when the operator starts on a worker (see [`ModelExport::attach`]).
    fn export_hook(&self) -> Option<impl FnOnce(&JobCtx) -> Option<SlotsWritten<Value>> + 'static> {
        let (config_key, template) = self.export.clone()?;
        let (shape, what) = (self.shape, self.described.what.clone());
        let exporter = self.exporter.clone();
        Some(move |ctx: &JobCtx| {
            let export = ModelExport::attach(ctx, &what, &config_key, &template)?;
            let _ = exporter.set(export.clone());
            // The samples trained in all of each key's last staged model: a model changes with
            // every step, and so does that count.
            let staged: Mutex<HashMap<Value, u64>> = Mutex::default();
            let hook: SlotsWritten<Value> = Arc::new(move |checkpoint, slots: &[(Value, Vec<u32>)]| {
                for (key, words) in slots {
                    let slot: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
                    let Some((_, total)) = shape.window_of(&slot) else {
                        return Err(format!("{what}: key {key}: a state of {} words is no model of {shape:?}", words.len()));
                    };
                    if staged.lock().unwrap_or_else(|p| p.into_inner()).get(key) == Some(&total) {
                        continue;
                    }
                    let mut model = shape.model_from_slot(&slot).map_err(|e| format!("{what}: key {key}: {e}"))?;
                    model.metadata.insert("trained_samples".into(), total.to_string().into());
                    model.metadata.insert("checkpoint".into(), checkpoint.to_string().into());
                    export.stage(checkpoint, key, &model.to_safetensors()).map_err(|e| format!("{what}: {e}"))?;
                    staged.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), total);
                }
                Ok(())
            });
            Some(hook)
        })
    }

    /// Run the gathered mini-batches of `epoch`: on the device, submitted in order and collected
    /// by `poll`; on the host, now.
    fn train(&mut self, epoch: u64) {
        let l = std::mem::take(&mut self.launch);
        let (b, per) = (self.batch, self.batch * self.shape.input_len());
        let words = self.shape.windowed_slot_words();
        while self.gpu.is_some() && self.in_flight.len() >= self.max_in_flight {
            let (e, keys, p) = self.in_flight.pop_front().expect("non-empty");
            match p.wait() {
                Ok(st) => self.done.push_back((e, keys, st)),
                Err(err) => self.fail_step(err),
            }
        }
        if self.gpu.is_some() && self.probe.is_none() {
            self.probe = GpuProbe::new(self.models.operator_name(), self.kernels.as_ref());
        }
        let Some(arena) = self.models.arena() else { return };
        let chunk_words = arena.layout().chunk_words;
        let keys: Vec<Value> = l.steps.iter().map(|(k, _)| k.clone()).collect();
        match &self.gpu {
            Some(g) => {
                let Some((a, d)) = arena.device_places() else { panic!("{}: the arena of the GPU path is not on the device", self.described.what) };
                let (shape, opt, report_every) = (&self.shape, &self.opt, self.report_every);
                let submit = || {
                    let pending: Vec<_> = l
                        .steps
                        .iter()
                        .enumerate()
                        .map(|(j, (_, slot))| {
                            let (px, lb) = (&l.pixels[j * per..(j + 1) * per], &l.labels[j * b..(j + 1) * b]);
                            g.cnn_train_step_windowed_async(shape, opt, a, arena.slot_word(*slot), d, chunk_words as u32, px, lb, report_every)
                        })
                        .collect();
                    Pending::all(pending)
                };
                // The CPU twin trains a copy of a new key's model on each step's samples: the
                // CPU path's work (its cost does not depend on the weights).
                let init = &self.init;
                let twin = |_: &weir_gpu::kernels::cpu::CpuKernels, _: &Vec<WindowedStats>| {
                    let mut slot: Vec<f32> = Vec::with_capacity(init.len());
                    let stats: Vec<Result<WindowedStats, GpuError>> = (0..l.steps.len())
                        .map(|j| {
                            slot.clear();
                            slot.extend(init.iter().map(|&w| f32::from_bits(w)));
                            train_step_windowed_cpu(shape, opt, &mut slot, &l.pixels[j * per..(j + 1) * per], &l.labels[j * b..(j + 1) * b], report_every)
                        })
                        .collect();
                    stats
                };
                let pending = observe(&mut self.probe, submit, twin);
                self.in_flight.push_back((epoch, keys, pending));
            }
            None => {
                let mut stats = Vec::with_capacity(l.steps.len());
                for (j, (_, slot)) in l.steps.iter().enumerate() {
                    let at = arena.slot_word(*slot) as usize;
                    let Some((host, dirty)) = arena.host_mut() else { panic!("{}: the arena of the CPU path is not in host memory", self.described.what) };
                    self.host_slot.clear();
                    self.host_slot.extend(host[at..at + words].iter().map(|&w| f32::from_bits(w)));
                    let st = train_step_windowed_cpu(&self.shape, &self.opt, &mut self.host_slot, &l.pixels[j * per..(j + 1) * per], &l.labels[j * b..(j + 1) * b], self.report_every);
                    let st = st.unwrap_or_else(|e| panic!("{}: training on {}: {e}", self.described.what, self.kernels.name()));
                    for (w, f) in host[at..at + words].iter_mut().zip(&self.host_slot) {
                        *w = f.to_bits();
                    }
                    // A step writes every word of the slot (Adam every parameter and moment).
                    dirty[at / chunk_words..=(at + words - 1) / chunk_words].fill(1);
                    stats.push(st);
                }
                self.done.push_back((epoch, keys, stats));
            }
        }
        // Keep the buffers' capacity for the next flush.
        self.launch = Launch { steps: l.steps, pixels: l.pixels, labels: l.labels };
        self.launch.steps.clear();
        self.launch.pixels.clear();
        self.launch.labels.clear();
    }
}

impl KeyedBatchFunction<Value, Row, Row> for StreamingCnnTraining {
    fn open(&mut self, states: &mut StateTables<Value>) {
        self.held = Some(states.value_state("cnn-train-held-samples"));
        self.models.register(states);
        let (shape, what) = (self.shape, self.described.what.clone());
        self.models.validate_restored(move |w| {
            if w.len() == shape.windowed_slot_words() {
                Ok(())
            } else {
                Err(format!("{what}: a model of {} words where the job trains a {shape:?} ({} words)", w.len(), shape.windowed_slot_words()))
            }
        });
        if let Some(make) = self.export_hook() {
            self.models.on_slots_written_from_job(make);
        }
    }

    fn process_batch(&mut self, ctx: &mut KeyedContext<'_, Value>, batch: &mut Vec<Row>, _out: &mut Vec<Row>) {
        if self.failed {
            return;
        }
        let key = ctx.key().clone();
        let (input, classes) = (self.shape.input_len(), self.shape.classes as i64);
        let held_state = self.held.clone().expect("opened");
        let held = held_state.get_or_insert_with(ctx, Held::default);
        for r in batch.iter() {
            let bad = match (r.get(self.field), r.get(self.label)) {
                (Value::Vector(px), Value::Int(l)) if px.len() == input && (0..classes).contains(l) => {
                    held.pixels.extend_from_slice(px);
                    held.labels.push(*l as u32);
                    continue;
                }
                (Value::Vector(px), _) if px.len() != input => {
                    format!("{} holds {} values, the model takes {input} ({:?})", self.described.field, px.len(), self.shape)
                }
                (Value::Vector(_), Value::Int(l)) => format!("{} {l} is not a class of 0..{classes}", self.described.label),
                (Value::Vector(_), l) => format!("{} is a {}, not an integer class", self.described.label, l.type_name()),
                (px, _) => format!("{} is a {}, not a vector of pixels", self.described.field, px.type_name()),
            };
            self.fail(format!("{}: key {key}: {bad}", self.described.what));
            return;
        }
        let full = held.labels.len() / self.batch;
        if full == 0 {
            return;
        }
        if self.models.slot(&key).is_none() {
            if let Some(why) = self.export_refuses(&key) {
                self.fail(format!("{}: key {key}: {why}", self.described.what));
                return;
            }
        }
        let slot = match self.models.slot(&key) {
            Some(s) => s,
            None => match self.models.ensure(self.shape.windowed_slot_words()).map(|_| ()).and_then(|()| self.models.insert(key.clone(), &self.init)) {
                Ok(s) => s,
                Err(e) => {
                    self.fail(format!("{}: key {key}: {e}", self.described.what));
                    return;
                }
            },
        };
        let n = full * self.batch;
        self.launch.pixels.extend_from_slice(&held.pixels[..n * input]);
        self.launch.labels.extend_from_slice(&held.labels[..n]);
        held.pixels.drain(..n * input);
        held.labels.drain(..n);
        for _ in 0..full {
            self.launch.steps.push((key.clone(), slot));
        }
    }

    fn flush(&mut self, _tables: &mut StateTables<Value>, epoch: u64) {
        if !self.launch.steps.is_empty() {
            self.train(epoch);
        }
    }

    fn poll(&mut self, _tables: &mut StateTables<Value>, out: &mut Vec<(u64, Row)>) -> Option<u64> {
        while let Some((e, keys, st)) = self.done.pop_front() {
            self.emit(e, &keys, &st, out);
        }
        while let Some(r) = self.in_flight.front_mut().and_then(|(_, _, p)| p.poll(false)) {
            let (e, keys, _) = self.in_flight.pop_front().expect("non-empty");
            match r {
                Ok(st) => self.emit(e, &keys, &st, out),
                Err(err) => self.fail_step(err),
            }
        }
        self.in_flight.front().map(|(e, _, _)| *e)
    }

    fn resident(&mut self) -> Option<&mut KeyedArena<Value>> {
        Some(&mut self.models)
    }
}

#[cfg(test)]
mod tests;

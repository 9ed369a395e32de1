//! The checked plan of a job: `JobPlan::load` checks a spec against its schema and config and
//! turns it into plan steps; `JobPlan::build` adds them to a dataflow on each worker.

use std::path::Path;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::config::JobConfig;
use crate::row::{Row, Value};
use crate::sink::{BlackholeSink, FileSink};
use crate::source::{FileFormat, FileSource, GeneratorSource};
use crate::state::{KeyedContext, KeyedProcessFunction, StateTables, ValueState};
use crate::stream::{DataStream, Job};

use super::spec::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AggFn {
    Sum,
    Count,
    Min,
    Max,
}

#[derive(Debug, Clone)]
pub(super) enum PlanStep {
    Filter { idx: usize, op: CmpOp, value: Value },
    Map { idx: usize, op: MapOp, value: Value },
    Select(Vec<usize>),
    Tokenize { idx: usize, lowercase: bool },
    /// `at`: the pipeline index of the `aggregate` step; `calls`: its functions as written.
    KeyAgg { key: usize, aggs: Vec<(AggFn, usize)>, ints: bool, at: usize, calls: Vec<String>, uid: String },
    KeyKmeans { key: usize, field: usize, k: usize, uid: String },
    KeyCnnTrain { key: usize, train: Arc<CnnTrainPlan>, uid: String },
    Resize { idx: usize, width: usize, height: Option<usize> },
    Cnn { idx: usize, model: Arc<weir_gpu::cnn::SmallCnn> },
    Gemm { idx: usize, k: usize, n: usize, b: Arc<Vec<f32>> },
    Filter2d { idx: usize, kind: FilterKind, sigma: f32 },
}

/// A checked `cnn_train` step.
#[derive(Debug)]
pub(super) struct CnnTrainPlan {
    /// `pipeline[j].cnn_train`, for messages and config keys.
    at: String,
    shape: weir_gpu::train::CnnShape,
    field: (usize, String),
    label: (usize, String),
    batch: usize,
    learning_rate: f32,
    report_every: u32,
    seed: u64,
    init: Option<weir_gpu::cnn::SmallCnn>,
    export: Option<String>,
}

/// The largest `cnn_train.batch_size`.
const MAX_TRAIN_BATCH: usize = 65_536;

/// Check a `cnn_train` step at `pipeline[j]` over `schema` (`non_numeric`: what each field is
/// known to hold that is no number).
fn check_cnn_train(j: usize, t: &CnnTrainSpec, schema: &[String], non_numeric: &[Option<&'static str>], config: &JobConfig) -> Result<CnnTrainPlan, String> {
    let at = format!("pipeline[{j}].cnn_train");
    let field = |what: &str, name: &str| {
        schema.iter().position(|f| f == name).map(|i| (i, name.to_string())).ok_or_else(|| format!("{at}.{what}: no field '{name}' here (fields: {})", schema.join(", ")))
    };
    let (pixels, label) = (field("field", &t.field)?, field("label", &t.label)?);
    if pixels.0 == label.0 {
        return Err(format!("{at}.label: '{}' is the image field too", t.label));
    }
    if let Some(kind) = non_numeric[pixels.0].filter(|k| *k != "vector") {
        return Err(format!("{at}.field: '{}' holds a {kind}, the images must be vectors of numbers", t.field));
    }
    if let Some(kind) = non_numeric[label.0] {
        return Err(format!("{at}.label: '{}' holds a {kind}, a class is an integer", t.label));
    }
    for (name, v) in [("height", t.height), ("width", t.width)] {
        if v < 2 || v % 2 != 0 {
            return Err(format!("{at}.{name}: must be an even number of at least 2 (the model pools 2×2), not {v}"));
        }
    }
    for (name, v, min) in [("channels", t.channels, 1), ("filters", t.filters, 1), ("classes", t.classes, 2)] {
        if v < min {
            return Err(format!("{at}.{name}: must be at least {min}, not {v}"));
        }
    }
    if !(1..=MAX_TRAIN_BATCH).contains(&t.batch_size) {
        return Err(format!("{at}.batch_size: must be 1 to {MAX_TRAIN_BATCH}, not {}", t.batch_size));
    }
    // The GPU step indexes its scratch (batch × filters × pixels, twice) with 32-bit integers.
    let scratch = t.batch_size.checked_mul(t.filters).and_then(|x| x.checked_mul(t.height)).and_then(|x| x.checked_mul(t.width)).and_then(|x| x.checked_mul(2));
    if scratch.is_none_or(|x| x >= 1 << 31) {
        return Err(format!("{at}.batch_size: {} images of {}×{} through {} filters exceed the training step's 2^31 values; use a smaller batch", t.batch_size, t.height, t.width, t.filters));
    }
    if !(t.learning_rate.is_finite() && t.learning_rate > 0.0 && t.learning_rate <= 1.0) {
        return Err(format!("{at}.learning_rate: must be above 0 and at most 1, not {}", t.learning_rate));
    }
    let max_report = weir_gpu::train::MAX_REPORT_EVERY as u64;
    if !(1..=max_report).contains(&t.report_every) {
        return Err(format!("{at}.report_every: must be 1 to {max_report} samples, not {}", t.report_every));
    }
    let shape = weir_gpu::train::CnnShape { in_c: t.channels, h: t.height, w: t.width, conv_c: t.filters, classes: t.classes };
    let init = match &t.init {
        Some(path) => {
            let m = weir_gpu::cnn::SmallCnn::load(Path::new(path), t.height, t.width).map_err(|e| format!("{at}.init: {e}"))?;
            if weir_gpu::train::CnnShape::of(&m) != shape {
                return Err(format!(
                    "{at}.init: {path} has {} channel(s), {} filters and {} classes; the step says channels: {}, filters: {}, classes: {}",
                    m.in_c, m.conv_c, m.classes, t.channels, t.filters, t.classes
                ));
            }
            Some(m)
        }
        None => None,
    };
    if let Some(template) = &t.export {
        if config.checkpoint.interval.is_none() {
            return Err(format!("{at}.export: models are exported when a checkpoint completes; set execution.checkpointing.interval"));
        }
        let ctx = crate::ops::export::ExportContext { subtask: 0, parallelism: 1, max_parallelism: config.max_parallelism, newest_checkpoint: None };
        crate::ops::export::ModelExport::new(&format!("{at}.export"), template, ctx).map_err(|e| e.to_string())?;
    }
    Ok(CnnTrainPlan {
        at,
        shape,
        field: pixels,
        label,
        batch: t.batch_size,
        learning_rate: t.learning_rate as f32,
        report_every: t.report_every as u32,
        seed: t.seed,
        init,
        export: t.export.clone(),
    })
}

/// A checked job, ready to run on every worker.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// The job's name.
    pub name: String,
    /// The validated configuration.
    pub config: JobConfig,
    pub(super) source: SourceSpec,
    pub(super) steps: Vec<PlanStep>,
    pub(super) sink: SinkSpec,
    /// The uids of the source and the sink (those of stateful steps are in their `PlanStep`).
    pub(super) source_uid: String,
    pub(super) sink_uid: String,
    pub(super) sink_fields: Option<(usize, usize)>,
    /// Source fields that must be numbers, and why: the file source checks them, naming the
    /// file and line of a value that is not.
    pub(super) source_numbers: Vec<(usize, String)>,
    /// Field names of the rows that reach the sink.
    pub output_schema: Vec<String>,
}

impl JobPlan {
    /// Load, override and check a job file: `sets` are `--set path=value`, `defines` are
    /// `-D key=value` config overrides.
    pub fn load(path: &Path, sets: &[(String, String)], defines: &[(String, String)]) -> Result<JobPlan, SpecError> {
        let file = path.display().to_string();
        let err = |message: String| SpecError { file: file.clone(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut tree: serde_json::Value = serde_saphyr::from_str(&text).map_err(|e| err(e.to_string()))?;
        for (p, v) in sets {
            apply_set(&mut tree, p, v).map_err(err)?;
        }
        let spec: JobSpec = serde_path_to_error::deserialize(tree).map_err(|e| {
            let at = e.path().to_string();
            err(format!("{}{}", if at == "." { String::new() } else { format!("{at}: ") }, e.inner()))
        })?;
        Self::from_spec(spec, defines).map_err(err)
    }

    /// Check a parsed spec.
    pub fn from_spec(spec: JobSpec, defines: &[(String, String)]) -> Result<JobPlan, String> {
        let pairs = spec
            .config
            .iter()
            .map(|(k, v)| (k.clone(), scalar_to_string(v)))
            .chain(defines.iter().cloned());
        let config = JobConfig::from_pairs(pairs).map_err(|e| e.to_string())?;
        let mut uids = Uids::default();
        let source_uid = uids.claim("source".into(), spec.source.uid.as_deref(), spec.source.spec.kind())?;
        if let SourceSpec::File { repeat: 0, .. } = &spec.source.spec {
            return Err("source.repeat: must be at least 1 (the times the files are read)".into());
        }
        // Which fields are always integers: where the key and every aggregated field are, the
        // aggregate runs on typed state (i64 keys and accumulators: 32-byte entries instead of
        // 56, the difference between fitting the cache or not).
        let mut ints: Vec<bool> = match &spec.source.spec {
            SourceSpec::Generator { .. } => vec![true, true],
            SourceSpec::Blobs { .. } => vec![true, false],
            SourceSpec::File { format: FileFormatSpec::Lines, .. } => vec![false],
            SourceSpec::Images { .. } => vec![false, false],
            SourceSpec::File { fields, .. } => vec![false; fields.len()],
        };
        // The type of each field known not to hold numbers (so `sum` of it is refused here), and
        // the source field each field is an unchanged copy of, while every source row still
        // reaches the step: a sum of such a field is checked by the source, which names the
        // file and line of a value that is not a number.
        let mut non_numeric: Vec<Option<&'static str>> = match &spec.source.spec {
            SourceSpec::Generator { .. } => vec![None, None],
            SourceSpec::Blobs { .. } => vec![None, Some("vector")],
            SourceSpec::File { format: FileFormatSpec::Lines, .. } => vec![Some("string")],
            SourceSpec::Images { .. } => vec![Some("string"), Some("image")],
            SourceSpec::File { fields, .. } => vec![None; fields.len()],
        };
        let mut origin: Vec<Option<usize>> = match &spec.source.spec {
            SourceSpec::File { format: FileFormatSpec::Json, fields, .. } => (0..fields.len()).map(Some).collect(),
            _ => vec![None; ints.len()],
        };
        let mut source_numbers: Vec<(usize, String)> = Vec::new();
        let mut schema: Vec<String> = match &spec.source.spec {
            SourceSpec::Generator { keys, count, .. } => {
                if *keys == 0 {
                    return Err("source.keys: must be at least 1".into());
                }
                let _ = count;
                vec!["key".into(), "value".into()]
            }
            SourceSpec::Blobs { centers, dim, count, .. } => {
                if *centers == 0 || *dim == 0 {
                    return Err("source: blobs need centers >= 1 and dim >= 1".into());
                }
                let _ = count;
                vec!["key".into(), "point".into()]
            }
            SourceSpec::Images { .. } => vec!["name".into(), "image".into()],
            SourceSpec::File { format: FileFormatSpec::Lines, fields, .. } => {
                if !fields.is_empty() {
                    return Err("source.fields: only for format: json".into());
                }
                vec!["line".into()]
            }
            SourceSpec::File { format: FileFormatSpec::Json, fields, .. } => {
                if fields.is_empty() {
                    return Err("source.fields: format json needs the list of fields to read".into());
                }
                fields.clone()
            }
        };
        let mut steps = Vec::new();
        let mut it = spec.pipeline.iter().enumerate().peekable();
        while let Some((i, written)) = it.next() {
            let step = &written.spec;
            match step {
                Step::KeyBy(_) if written.uid.is_some() => {
                    return Err(format!("pipeline[{i}].uid: key_by is no operator of its own: give the uid to the step after it"))
                }
                // The step after it is claimed with it, below.
                Step::KeyBy(_) => {}
                // A stateless step's uid is only checked: it has no state to restore.
                _ => {
                    uids.claim(format!("pipeline[{i}]"), written.uid.as_deref(), step.kind())?;
                }
            }
            let field = |name: &str, schema: &[String]| {
                schema.iter().position(|f| f == name).ok_or_else(|| {
                    format!("pipeline[{i}]: no field '{name}' here (fields: {})", schema.join(", "))
                })
            };
            match step {
                Step::Filter { field: f, op, value } => {
                    steps.push(PlanStep::Filter { idx: field(f, &schema)?, op: *op, value: json_value(value) });
                    // A row it drops never reaches a sum: the source may not judge it.
                    origin.fill(None);
                }
                Step::Map { field: f, op, value } => {
                    let v = value.as_ref().map(json_value).unwrap_or_default();
                    if matches!(op, MapOp::Add | MapOp::Mul) && v.as_f64().is_none() {
                        return Err(format!("pipeline[{i}].map.value: {op:?} needs a number"));
                    }
                    let idx = field(f, &schema)?;
                    if matches!(op, MapOp::Add | MapOp::Mul) && !matches!(v, Value::Int(_)) {
                        ints[idx] = false;
                    }
                    if matches!(op, MapOp::Add | MapOp::Mul) {
                        // A number, or null where the field was not one.
                        non_numeric[idx] = None;
                        origin[idx] = None;
                    }
                    steps.push(PlanStep::Map { idx, op: *op, value: v })
                }
                Step::Select(fields) => {
                    let idx = fields.iter().map(|f| field(f, &schema)).collect::<Result<Vec<_>, _>>()?;
                    ints = idx.iter().map(|&i| ints[i]).collect();
                    non_numeric = idx.iter().map(|&i| non_numeric[i]).collect();
                    origin = idx.iter().map(|&i| origin[i]).collect();
                    steps.push(PlanStep::Select(idx));
                    schema = fields.clone();
                }
                Step::Tokenize { field: f, lowercase } => {
                    steps.push(PlanStep::Tokenize { idx: field(f, &schema)?, lowercase: *lowercase });
                    schema = vec!["word".into()];
                    ints = vec![false];
                    non_numeric = vec![Some("string")];
                    origin = vec![None];
                }
                Step::KeyBy(k) => {
                    let key = field(k, &schema)?;
                    let (list, uid) = match it.next() {
                        Some((j, WithUid { uid, spec: Step::Aggregate(list) })) => {
                            (list, uids.claim(format!("pipeline[{j}]"), uid.as_deref(), "aggregate")?)
                        }
                        Some((j, WithUid { uid, spec: Step::Kmeans { field: f, k: kk } })) => {
                            let uid = uids.claim(format!("pipeline[{j}]"), uid.as_deref(), "kmeans")?;
                            if *kk == 0 {
                                return Err(format!("pipeline[{j}].kmeans.k: must be at least 1"));
                            }
                            steps.push(PlanStep::KeyKmeans { key, field: field(f, &schema)?, k: *kk, uid });
                            schema = vec![schema[key].clone(), "centroid".into(), "count".into(), "vector".into()];
                            ints = vec![ints[key], true, false];
                            non_numeric = vec![non_numeric[key], None, Some("vector")];
                            origin = vec![None; 3];
                            continue;
                        }
                        Some((j, WithUid { uid, spec: Step::CnnTrain(t) })) => {
                            let uid = uids.claim(format!("pipeline[{j}]"), uid.as_deref(), "cnn_train")?;
                            let train = check_cnn_train(j, t, &schema, &non_numeric, &config)?;
                            steps.push(PlanStep::KeyCnnTrain { key, train: Arc::new(train), uid });
                            schema = vec![schema[key].clone(), "samples".into(), "loss".into(), "accuracy".into()];
                            ints = vec![ints[key], true, false, false];
                            non_numeric = vec![non_numeric[key], None, None, None];
                            origin = vec![None; 4];
                            continue;
                        }
                        _ => return Err(format!("pipeline[{i}]: key_by must be followed by aggregate, kmeans or cnn_train")),
                    };
                    let mut aggs = Vec::new();
                    let mut calls = Vec::new();
                    let mut out = vec![schema[key].clone()];
                    for a in list {
                        let a = a.trim();
                        let (f, arg) = match a.split_once('(') {
                            Some((f, rest)) => (f.trim(), Some(rest.trim_end_matches(')').trim())),
                            None => (a, None),
                        };
                        let agg = match f {
                            "sum" => AggFn::Sum,
                            "count" => AggFn::Count,
                            "min" => AggFn::Min,
                            "max" => AggFn::Max,
                            other => {
                                return Err(format!(
                                    "pipeline[{}].aggregate: unknown function '{other}' (sum, count, min, max)",
                                    i + 1
                                ))
                            }
                        };
                        let idx = match (agg, arg) {
                            (AggFn::Count, _) => 0,
                            (_, Some(arg)) => field(arg, &schema)?,
                            (_, None) => return Err(format!("pipeline[{}].aggregate: '{a}' needs a field", i + 1)),
                        };
                        if let (AggFn::Sum, Some(arg)) = (agg, arg) {
                            if let Some(t) = non_numeric[idx] {
                                return Err(format!("pipeline[{}].aggregate: {a}: field '{arg}' holds a {t}, sum needs numbers", i + 1));
                            }
                            if let Some(src) = origin[idx] {
                                source_numbers.push((src, format!("pipeline[{}].aggregate sums it ({a})", i + 1)));
                            }
                        }
                        out.push(match arg {
                            Some(arg) if agg != AggFn::Count => format!("{f}_{arg}"),
                            _ => f.to_string(),
                        });
                        aggs.push((agg, idx));
                        calls.push(a.to_string());
                    }
                    if aggs.is_empty() {
                        return Err(format!("pipeline[{}].aggregate: list at least one function", i + 1));
                    }
                    let typed = aggs.len() <= 4 && ints[key] && aggs.iter().all(|(f, idx)| *f == AggFn::Count || ints[*idx]);
                    ints = std::iter::once(ints[key]).chain(aggs.iter().map(|(f, idx)| *f == AggFn::Count || ints[*idx])).collect();
                    non_numeric = std::iter::once(non_numeric[key])
                        .chain(aggs.iter().map(|(f, idx)| if matches!(f, AggFn::Min | AggFn::Max) { non_numeric[*idx] } else { None }))
                        .collect();
                    origin = vec![None; aggs.len() + 1];
                    steps.push(PlanStep::KeyAgg { key, aggs, ints: typed, at: i + 1, calls, uid });
                    schema = out;
                }
                Step::ImageResize { field: f, width, height } => {
                    if *width == 0 || *height == Some(0) {
                        return Err(format!("pipeline[{i}].image_resize: width and height must be at least 1"));
                    }
                    steps.push(PlanStep::Resize { idx: field(f, &schema)?, width: *width, height: *height });
                }
                Step::ImageFilter { field: f, kind, sigma } => {
                    if sigma.is_nan() || *sigma <= 0.0 {
                        return Err(format!("pipeline[{i}].image_filter.sigma: must be positive"));
                    }
                    steps.push(PlanStep::Filter2d { idx: field(f, &schema)?, kind: *kind, sigma: *sigma });
                }
                Step::Gemm { field: f, input, output, seed } => {
                    if *input == 0 || *output == 0 {
                        return Err(format!("pipeline[{i}].gemm: input and output must be at least 1"));
                    }
                    let b = random_projection(*input, *output, *seed);
                    let idx = field(f, &schema)?;
                    non_numeric[idx] = Some("vector");
                    origin[idx] = None;
                    steps.push(PlanStep::Gemm { idx, k: *input, n: *output, b: Arc::new(b) });
                }
                Step::CnnInfer { field: f, model, height, width } => {
                    let m = weir_gpu::cnn::SmallCnn::load(Path::new(model), *height, *width)
                        .map_err(|e| format!("pipeline[{i}].cnn_infer.model: {e}"))?;
                    steps.push(PlanStep::Cnn { idx: field(f, &schema)?, model: Arc::new(m) });
                    schema.push("class".into());
                    ints.push(true);
                    non_numeric.push(None);
                    origin.push(None);
                }
                Step::Aggregate(_) => return Err(format!("pipeline[{i}]: aggregate needs a key_by before it")),
                Step::Kmeans { .. } => return Err(format!("pipeline[{i}]: kmeans needs a key_by before it")),
                Step::CnnTrain(_) => return Err(format!("pipeline[{i}]: cnn_train needs a key_by before it")),
            }
        }
        let sink_uid = uids.claim("sink".into(), spec.sink.uid.as_deref(), spec.sink.spec.kind())?;
        let sink_fields = match &spec.sink.spec {
            SinkSpec::Images { name, field: f, .. } => {
                let pos = |n: &str| schema.iter().position(|x| x == n).ok_or_else(|| format!("sink: no field '{n}' (fields: {})", schema.join(", ")));
                Some((pos(name)?, pos(f)?))
            }
            _ => None,
        };
        if steps.iter().any(|s| matches!(s, PlanStep::KeyKmeans { .. } | PlanStep::KeyCnnTrain { .. } | PlanStep::Resize { .. } | PlanStep::Filter2d { .. } | PlanStep::Cnn { .. } | PlanStep::Gemm { .. })) {
            // Open the device now: `weir.gpu.enabled: true` without a usable GPU is refused at
            // start, not discovered by a worker.
            weir_gpu::kernels::shared_kernels(&config.gpu).map_err(|e| e.to_string())?;
        }
        Ok(JobPlan {
            name: spec.name,
            config,
            source: spec.source.spec,
            steps,
            sink: spec.sink.spec,
            source_uid,
            sink_uid,
            sink_fields,
            source_numbers,
            output_schema: schema,
        })
    }

    /// The process's kernels for a GPU step (already opened at plan time).
    fn kernels(&self, job: &Job<'_>, step: usize) -> Option<Arc<dyn weir_gpu::kernels::Kernels>> {
        match weir_gpu::kernels::shared_kernels(&self.config.gpu) {
            Ok(k) => Some(k),
            Err(e) => {
                job.fail(format!("pipeline[{step}]: {e}"));
                None
            }
        }
    }

    /// Build this job on one worker.
    pub fn build(&self, job: &mut Job<'_>) {
        job.uid(&self.source_uid);
        let mut stream: DataStream<'_, Row> = match &self.source {
            SourceSpec::Generator { count, keys, seed, rate } => {
                job.source("generator", GeneratorSource { count: *count, keys: *keys, seed: *seed, rate: *rate })
            }
            SourceSpec::Blobs { count, centers, dim, sigma, keys, seed } => job.source(
                "blobs",
                crate::source::BlobSource { count: *count, centers: *centers, dim: *dim, sigma: *sigma, keys: *keys, seed: *seed },
            ),
            SourceSpec::Images { path } => job.source("images", crate::source::ImageSource::new(path)),
            SourceSpec::File { path, format, fields, repeat } => {
                let format = match format {
                    FileFormatSpec::Lines => FileFormat::Lines,
                    FileFormatSpec::Json => FileFormat::JsonLines(fields.clone()),
                };
                let source = FileSource::new(path, format).repeat(*repeat);
                let source = self.source_numbers.iter().fold(source, |s, (field, why)| s.require_number(*field, why));
                job.source("file", source)
            }
        };
        for (i, step) in self.steps.iter().cloned().enumerate() {
            stream = match step {
                PlanStep::Filter { idx, op, value } => stream.filter(move |r| compare(r.get(idx), op, &value)),
                PlanStep::Map { idx, op, value } => stream.map(move |mut r| {
                    if let Some(v) = r.0.get_mut(idx) {
                        *v = apply(v, op, &value);
                    }
                    r
                }),
                PlanStep::Select(idx) => stream.map(move |r| Row(idx.iter().map(|&i| r.get(i).clone()).collect())),
                PlanStep::Tokenize { idx, lowercase } => stream.flat_map(move |r| {
                    let text = match r.get(idx) {
                        Value::Str(s) => s.clone(),
                        _ => Arc::new(String::new()),
                    };
                    let words: Vec<Row> = text
                        .split(|c: char| !c.is_alphanumeric() && c != '\'')
                        .map(|w| w.trim_matches('\''))
                        .filter(|w| !w.is_empty())
                        .map(|w| {
                            Row::new([Value::text(if lowercase { w.to_lowercase() } else { w.to_string() })])
                        })
                        .collect();
                    words
                }),
                PlanStep::KeyAgg { key, aggs, ints: true, uid, .. } => {
                    let keyed = stream.uid(&uid).key_by(move |r: &Row| match r.get(key) {
                        Value::Int(k) => *k,
                        _ => unreachable!("the plan proved field {key} an integer"),
                    });
                    let name = format!("aggregate-{i}");
                    match aggs.len() {
                        1 => keyed.process(&name, IntAggregate::<1>::new(aggs)),
                        2 => keyed.process(&name, IntAggregate::<2>::new(aggs)),
                        3 => keyed.process(&name, IntAggregate::<3>::new(aggs)),
                        _ => keyed.process(&name, IntAggregate::<4>::new(aggs)),
                    }
                }
                PlanStep::KeyAgg { key, aggs, ints: false, at, calls, uid } => {
                    let aggregate = Aggregate { aggs, at, calls, state: None, input_error: job.input_error_handle(), failed: false };
                    stream.uid(&uid).key_by(move |r: &Row| r.get(key).clone()).process(&format!("aggregate-{i}"), aggregate)
                }
                PlanStep::Resize { idx, width, height } => {
                    let Some(kernels) = self.kernels(job, i) else { return };
                    crate::ops::image::image_kernel_batches(stream, &format!("image_resize-{i}"), idx, kernels, move |k, img| {
                        let h = height.unwrap_or(((img.h * width) as f64 / img.w as f64).round().max(1.0) as usize);
                        k.resize_bilinear_async(img, width, h)
                    })
                }
                PlanStep::Gemm { idx, k, n, b } => {
                    let Some(kernels) = self.kernels(job, i) else { return };
                    crate::ops::gemm::gemm_rows(stream, &format!("gemm-{i}"), kernels, idx, k, n, b)
                }
                PlanStep::Cnn { idx, model } => {
                    let Some(kernels) = self.kernels(job, i) else { return };
                    crate::ops::cnn::classify_rows(stream, &format!("cnn-{i}"), kernels, idx, model)
                }
                PlanStep::Filter2d { idx, kind, sigma } => {
                    let Some(kernels) = self.kernels(job, i) else { return };
                    crate::ops::image::image_kernel_batches(stream, &format!("image_filter-{i}"), idx, kernels, move |k, img| match kind {
                        FilterKind::Sobel => k.sobel_async(img),
                        FilterKind::Gaussian => k.gaussian_blur_async(img, sigma),
                    })
                }
                PlanStep::KeyKmeans { key, field, k, uid } => {
                    let kernels = match weir_gpu::kernels::shared_kernels(&self.config.gpu) {
                        Ok(k) => k,
                        Err(e) => {
                            job.fail(format!("pipeline[{i}] kmeans: {e}"));
                            return;
                        }
                    };
                    stream
                        .uid(&uid)
                        .key_by(move |r: &Row| r.get(key).clone())
                        .process_batches(
                            &format!("kmeans-{i}"),
                            crate::ops::kmeans::StreamingKMeans::new(k, field, kernels)
                                .max_in_flight(self.config.gpu_max_inflight)
                                .fail_through(job.input_error_handle()),
                        )
                }
                PlanStep::KeyCnnTrain { key, train: t, uid } => {
                    let Some(kernels) = self.kernels(job, i) else { return };
                    let op = crate::ops::train::StreamingCnnTraining::new(t.shape, t.field.0, t.label.0, kernels)
                        .batch_size(t.batch)
                        .adam(weir_gpu::train::Adam { lr: t.learning_rate, ..Default::default() })
                        .report_every(t.report_every)
                        .seed(t.seed)
                        .max_in_flight(self.config.gpu_max_inflight)
                        .in_job(&t.at, &format!("field '{}'", t.field.1), &format!("label '{}'", t.label.1), job.input_error_handle());
                    let op = match &t.init {
                        // Checked at plan time: the shapes match.
                        Some(m) => match op.init_model(m) {
                            Ok(op) => op,
                            Err(e) => {
                                job.fail(e.to_string());
                                return;
                            }
                        },
                        None => op,
                    };
                    let op = match &t.export {
                        Some(template) => op.export(&format!("{}.export", t.at), template),
                        None => op,
                    };
                    stream.uid(&uid).key_by(move |r: &Row| r.get(key).clone()).process_batches(&format!("cnn_train-{i}"), op)
                }
            };
        }
        let stream = stream.uid(&self.sink_uid);
        match &self.sink {
            SinkSpec::File { path } => stream.sink("file-sink", FileSink::csv(path)),
            SinkSpec::Blackhole {} => stream.sink("blackhole", BlackholeSink),
            SinkSpec::Images { path, .. } => {
                let (name, field) = self.sink_fields.expect("checked at plan");
                stream.sink("image-sink", crate::sink::ImageSink::new(path, name, field))
            }
        }
    }
}

/// A `k × n` matrix of N(0, 1/n) entries from `seed` (Box–Muller over splitmix64).
pub fn random_projection(k: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed ^ 0x005E_ED0F_9A55;
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let scale = 1.0 / (n as f64).sqrt();
    (0..k * n).map(|_| ((-2.0 * next().ln()).sqrt() * (std::f64::consts::TAU * next()).cos() * scale) as f32).collect()
}

pub(super) fn compare(v: &Value, op: CmpOp, c: &Value) -> bool {
    use std::cmp::Ordering::*;
    let ord = match (v, c) {
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        _ => match (v.as_f64(), c.as_f64()) {
            (Some(a), Some(b)) => a.partial_cmp(&b),
            _ => None,
        },
    };
    match (op, ord) {
        (CmpOp::Eq, o) => o == Some(Equal),
        (CmpOp::Ne, o) => o != Some(Equal),
        (CmpOp::Lt, Some(o)) => o == Less,
        (CmpOp::Le, Some(o)) => o != Greater,
        (CmpOp::Gt, Some(o)) => o == Greater,
        (CmpOp::Ge, Some(o)) => o != Less,
        _ => false,
    }
}

pub(super) fn apply(v: &Value, op: MapOp, c: &Value) -> Value {
    match (op, v, c) {
        (MapOp::Add, Value::Int(a), Value::Int(b)) => Value::Int(a.wrapping_add(*b)),
        (MapOp::Mul, Value::Int(a), Value::Int(b)) => Value::Int(a.wrapping_mul(*b)),
        (MapOp::Add, a, b) => a.as_f64().zip(b.as_f64()).map(|(a, b)| Value::Float(a + b)).unwrap_or(Value::Null),
        (MapOp::Mul, a, b) => a.as_f64().zip(b.as_f64()).map(|(a, b)| Value::Float(a * b)).unwrap_or(Value::Null),
        (MapOp::Lower, Value::Str(s), _) => Value::text(s.to_lowercase()),
        (MapOp::Upper, Value::Str(s), _) => Value::text(s.to_uppercase()),
        (_, v, _) => v.clone(),
    }
}

/// Running aggregates per key.
pub(super) struct Aggregate {
    pub(super) aggs: Vec<(AggFn, usize)>,
    /// The step's pipeline index and its functions as written, for messages.
    pub(super) at: usize,
    pub(super) calls: Vec<String>,
    pub(super) state: Option<ValueState<SmallVec<[Value; 2]>>>,
    /// A non-number given to `sum` fails the job: the same row fails every restart.
    pub(super) input_error: crate::stream::InputErrorHandle,
    pub(super) failed: bool,
}

pub(super) fn add(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Null, b) => b.clone(),
        (Value::Int(x), Value::Int(y)) => Value::Int(x.wrapping_add(*y)),
        (x, y) => Value::Float(x.as_f64().unwrap_or(0.0) + y.as_f64().unwrap_or(0.0)),
    }
}

pub(super) fn extreme(a: &Value, b: &Value, want: std::cmp::Ordering) -> Value {
    match (a, b) {
        (Value::Null, b) => b.clone(),
        (a, Value::Null) => a.clone(),
        (Value::Int(x), Value::Int(y)) => Value::Int(if y.cmp(x) == want { *y } else { *x }),
        (Value::Str(x), Value::Str(y)) => Value::Str(if y.cmp(x) == want { y.clone() } else { x.clone() }),
        (x, y) => match (x.as_f64(), y.as_f64()) {
            (Some(p), Some(q)) if q.partial_cmp(&p) == Some(want) => y.clone(),
            _ => x.clone(),
        },
    }
}

impl KeyedProcessFunction<Value, Row, Row> for Aggregate {
    fn open(&mut self, states: &mut StateTables<Value>) {
        self.state = Some(states.value_state("aggregates"));
    }

    fn process(&mut self, ctx: &mut KeyedContext<'_, Value>, row: Row, out: &mut Vec<Row>) {
        if self.failed {
            return; // the attempt is ending
        }
        let n = self.aggs.len();
        let key = ctx.key().clone();
        // Checked before the state changes: a failed row leaves no partial update.
        let bad = self.aggs.iter().position(|(f, idx)| *f == AggFn::Sum && !matches!(row.get(*idx), Value::Int(_) | Value::Float(_) | Value::Null));
        if let Some(j) = bad {
            let v = row.get(self.aggs[j].1);
            self.failed = true;
            self.input_error.fail(format!(
                "pipeline[{}].aggregate: {} of key {} got a {} ({}), not a number",
                self.at,
                self.calls[j],
                crate::source::abbreviate(&key.to_string()),
                v.type_name(),
                crate::source::abbreviate(&v.to_string())
            ));
            return;
        }
        let state = self.state.as_ref().expect("opened");
        let acc = state.get_or_insert_with(ctx, || SmallVec::from_elem(Value::Null, n));
        for ((f, idx), a) in self.aggs.iter().zip(acc.iter_mut()) {
            let v = row.get(*idx);
            *a = match f {
                // SQL's SUM: a null (a missing JSON field) leaves the sum as it is.
                AggFn::Sum if matches!(v, Value::Null) => a.clone(),
                AggFn::Sum => add(a, v),
                AggFn::Count => add(a, &Value::Int(1)),
                AggFn::Min => extreme(a, v, std::cmp::Ordering::Less),
                AggFn::Max => extreme(a, v, std::cmp::Ordering::Greater),
            };
        }
        let mut r: SmallVec<[Value; 3]> = SmallVec::with_capacity(n + 1);
        r.push(key);
        r.extend(acc.iter().cloned());
        out.push(Row(r));
    }
}

/// Running aggregates per key when the key and every aggregated field are integers; `N`
/// accumulators inline (an entry of `sum, count` state is 24 bytes).
pub(super) struct IntAggregate<const N: usize> {
    pub(super) aggs: Vec<(AggFn, usize)>,
    pub(super) state: Option<ValueState<[i64; N]>>,
}

impl<const N: usize> IntAggregate<N> {
    fn new(aggs: Vec<(AggFn, usize)>) -> Self {
        assert_eq!(aggs.len(), N);
        Self { aggs, state: None }
    }
}

impl<const N: usize> KeyedProcessFunction<i64, Row, Row> for IntAggregate<N>
where
    [i64; N]: crate::Data,
{
    fn open(&mut self, states: &mut StateTables<i64>) {
        self.state = Some(states.value_state("aggregates-int"));
    }

    fn process(&mut self, ctx: &mut KeyedContext<'_, i64>, row: Row, out: &mut Vec<Row>) {
        let key = *ctx.key();
        let aggs = &self.aggs;
        let acc = self.state.as_ref().expect("opened").get_or_insert_with(ctx, || {
            std::array::from_fn(|i| match aggs[i].0 {
                AggFn::Min => i64::MAX,
                AggFn::Max => i64::MIN,
                _ => 0,
            })
        });
        let mut r: SmallVec<[Value; 3]> = SmallVec::with_capacity(aggs.len() + 1);
        r.push(Value::Int(key));
        for ((f, idx), a) in aggs.iter().zip(acc.iter_mut()) {
            let v = match row.get(*idx) {
                Value::Int(v) => *v,
                _ => 0,
            };
            *a = match f {
                AggFn::Sum => a.wrapping_add(v),
                AggFn::Count => *a + 1,
                AggFn::Min => (*a).min(v),
                AggFn::Max => (*a).max(v),
            };
            r.push(Value::Int(*a));
        }
        out.push(Row(r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> Result<JobPlan, String> {
        let tree: serde_json::Value = serde_saphyr::from_str(yaml).unwrap();
        let spec: JobSpec = serde_path_to_error::deserialize(tree).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
        JobPlan::from_spec(spec, &[])
    }

    #[test]
    fn plans_keyed_sum() {
        let p = plan(
            "name: t\nsource: {type: generator, count: 10}\npipeline:\n  - key_by: key\n  - aggregate: [sum(value), count]\nsink: {type: blackhole}\n",
        )
        .unwrap();
        assert_eq!(p.output_schema, ["key", "sum_value", "count"]);
    }

    #[test]
    fn errors_name_the_place() {
        let e = plan("name: t\nsource: {type: generator, count: 10}\npipeline:\n  - key_by: nope\n  - aggregate: [count]\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("pipeline[0]: no field 'nope' here (fields: key, value)"), "{e}");
        let e = plan("name: t\nsource: {type: generator, count: 10, kees: 5}\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("kees"), "{e}");
        let e = plan("name: t\nsource: {type: generator, count: 10}\npipeline:\n  - key_by: key\n  - aggregate: [avg(value)]\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("pipeline[1].aggregate: unknown function 'avg'"), "{e}");
        let e = plan("name: t\nconfig: {execution.checkpointing.interval: soon}\nsource: {type: generator, count: 1}\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("config key 'execution.checkpointing.interval'"), "{e}");
    }

    #[test]
    fn typed_aggregate_only_where_fields_are_integers() {
        let typed = |yaml: &str| match &plan(yaml).unwrap().steps.last().unwrap() {
            PlanStep::KeyAgg { ints, .. } => *ints,
            _ => panic!("no aggregate"),
        };
        let gen = "name: t\nsource: {type: generator, count: 10}\nsink: {type: blackhole}\npipeline:\n";
        assert!(typed(&format!("{gen}  - key_by: key\n  - aggregate: [sum(value), count, max(value)]\n")));
        assert!(!typed(&format!("{gen}  - map: {{field: value, op: mul, value: 0.5}}\n  - key_by: key\n  - aggregate: [sum(value)]\n")));
        assert!(typed(&format!("{gen}  - map: {{field: value, op: mul, value: 2}}\n  - key_by: key\n  - aggregate: [min(value)]\n")));
    }

    #[test]
    fn set_path_overrides() {
        let mut t: serde_json::Value = serde_saphyr::from_str("source: {count: 1}\npipeline: [{key_by: a}]").unwrap();
        set_path(&mut t, "source.count", "2000000").unwrap();
        set_path(&mut t, "sink.type", "blackhole").unwrap();
        set_path(&mut t, "pipeline.0.key_by", "b").unwrap();
        assert_eq!(t["source"]["count"], 2_000_000);
        assert_eq!(t["sink"]["type"], "blackhole");
        assert_eq!(t["pipeline"][0]["key_by"], "b");
        assert!(set_path(&mut t, "pipeline.7.x", "1").is_err());
    }

    /// The names between backticks after `expected` in a serde error.
    fn expected_names(e: &str) -> Vec<String> {
        let Some((_, list)) = e.split_once("expected") else { return vec![] };
        list.split('`').skip(1).step_by(2).map(String::from).collect()
    }

    #[test]
    fn component_fields_match_the_specs() {
        let probe = |c: &str, v: serde_json::Value| -> String {
            match c {
                "source" => serde_json::from_value::<SourceSpec>(v).unwrap_err().to_string(),
                _ => serde_json::from_value::<SinkSpec>(v).unwrap_err().to_string(),
            }
        };
        for c in ["source", "sink"] {
            let mut types = expected_names(&probe(c, serde_json::json!({"type": "no-such-type"})));
            let mut listed: Vec<String> = COMPONENT_FIELDS.iter().filter(|(k, ..)| *k == c).map(|(_, t, _)| t.to_string()).collect();
            types.sort();
            listed.sort();
            assert_eq!(types, listed, "the {c} types of COMPONENT_FIELDS");
            for (_, t, fields) in COMPONENT_FIELDS.iter().filter(|(k, ..)| *k == c) {
                let e = probe(c, serde_json::json!({"type": t, "no_such_field": 0}));
                assert!(e.contains("unknown field `no_such_field`"), "{e}");
                let mut want = expected_names(&e);
                let mut have: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
                want.sort();
                have.sort();
                assert_eq!(have, want, "the fields of a {t} {c} in COMPONENT_FIELDS");
            }
        }
    }

    #[test]
    fn switching_a_type_drops_the_fields_it_lacks() {
        let mut t = parse_yaml("sink: {type: file, path: out}\nsource: {type: file, path: in, format: json, fields: [a]}").unwrap();
        apply_set(&mut t, "sink.type", "blackhole").unwrap();
        assert_eq!(t["sink"], serde_json::json!({"type": "blackhole"}));
        apply_set(&mut t, "sink.type", "images").unwrap();
        apply_set(&mut t, "sink.path", "pngs").unwrap();
        assert_eq!(t["sink"], serde_json::json!({"type": "images", "path": "pngs"}));
        apply_set(&mut t, "source.type", "images").unwrap();
        assert_eq!(t["source"], serde_json::json!({"type": "images", "path": "in"}));
        // Setting the same type drops nothing: a wrong field in the file stays an error.
        let mut t = parse_yaml("sink: {type: blackhole, path: out}").unwrap();
        apply_set(&mut t, "sink.type", "blackhole").unwrap();
        assert_eq!(t["sink"]["path"], "out");
        // An unknown type is left for the spec check to name.
        let mut t = parse_yaml("sink: {type: file, path: out}").unwrap();
        apply_set(&mut t, "sink.type", "kafka").unwrap();
        assert_eq!(t["sink"]["path"], "out");
    }

    /// The uids of a plan: source, stateful steps (by pipeline index), sink.
    fn uids(p: &JobPlan) -> Vec<String> {
        let steps = p.steps.iter().filter_map(|s| match s {
            PlanStep::KeyAgg { uid, .. } | PlanStep::KeyKmeans { uid, .. } | PlanStep::KeyCnnTrain { uid, .. } => Some(uid.clone()),
            _ => None,
        });
        std::iter::once(p.source_uid.clone()).chain(steps).chain([p.sink_uid.clone()]).collect()
    }

    #[test]
    fn default_uids_come_from_type_and_place() {
        let p = plan("name: t\nsource: {type: generator, count: 10}\npipeline:\n  - filter: {field: value, op: gt, value: 1}\n  - key_by: key\n  - aggregate: [count]\nsink: {type: file, path: o}\n").unwrap();
        assert_eq!(uids(&p), ["source:generator", "pipeline[2]:aggregate", "sink:file"]);
        let p = plan("name: t\nsource: {type: generator, count: 10}\npipeline:\n  - key_by: key\n  - aggregate: [count]\nsink: {type: blackhole}\n").unwrap();
        assert_eq!(uids(&p), ["source:generator", "pipeline[1]:aggregate", "sink:blackhole"]);
    }

    #[test]
    fn explicit_uids_beside_the_fields() {
        let yaml = "name: t\nsource: {type: generator, count: 10, uid: events}\npipeline:\n  - filter: {field: value, op: gt, value: 1}\n    uid: big\n  - key_by: key\n  - uid: totals\n    aggregate: [sum(value)]\nsink: {type: file, path: o, uid: out}\n";
        let p = plan(yaml).unwrap();
        assert_eq!(uids(&p), ["events", "totals", "out"]);
        // The fields beside a uid are checked as without it, with the same paths.
        let e = plan("name: t\nsource: {type: generator, count: 10, uid: e, kees: 5}\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("kees"), "{e}");
        let e = plan("name: t\nsource: {type: generator, count: 10}\npipeline:\n  - filter: {field: value, op: gtx, value: 1}\n    uid: f\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.starts_with("pipeline[0].filter.op: unknown variant `gtx`"), "{e}");
        let e = plan("name: t\nsource: {type: generator, count: 10}\npipeline:\n  - filter: {field: value, op: gt, value: 1}\n    uid: [a]\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.starts_with("pipeline[0].uid: invalid type"), "{e}");
        let e = plan("name: t\nsource: {type: generator, count: 10}\npipeline:\n  - filter: {field: value, op: gt, value: 1}\n    select: [key]\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("unexpected `select`: a step is one operation and an optional uid"), "{e}");
        let e = plan("name: t\nsource: {type: generator, count: 10}\npipeline:\n  - key_by: key\n    uid: k\n  - aggregate: [count]\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("pipeline[0].uid: key_by is no operator of its own"), "{e}");
        let e = plan("name: t\nsource: {type: generator, count: 10, uid: ''}\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("source.uid: must not be empty"), "{e}");
    }

    #[test]
    fn duplicate_uids_are_refused_naming_both_places() {
        let gen = "name: t\nsource: {type: generator, count: 10, uid: a}\nsink: {type: blackhole}\npipeline:\n";
        let e = plan(&format!("{gen}  - key_by: key\n  - aggregate: [count]\n    uid: a\n")).unwrap_err();
        assert!(e.contains("pipeline[1].uid: 'a' is also the uid of source; uids must be unique"), "{e}");
        // An explicit uid may not take another step's derived one.
        let e = plan(&format!("{gen}  - map: {{field: value, op: add, value: 1}}\n    uid: 'pipeline[2]:aggregate'\n  - key_by: key\n  - aggregate: [count]\n")).unwrap_err();
        assert!(e.contains("pipeline[2].uid: 'pipeline[2]:aggregate' is also the uid of pipeline[0]"), "{e}");
        let e = plan("name: t\nsource: {type: generator, count: 10}\nsink: {type: blackhole, uid: 'source:generator'}\n").unwrap_err();
        assert!(e.contains("sink.uid: 'source:generator' is also the uid of source"), "{e}");
    }

    #[test]
    fn switching_a_type_keeps_the_uid() {
        let mut t = parse_yaml("sink: {type: file, path: out, uid: results}").unwrap();
        apply_set(&mut t, "sink.type", "blackhole").unwrap();
        assert_eq!(t["sink"], serde_json::json!({"type": "blackhole", "uid": "results"}));
    }

    #[test]
    fn file_source_repeat() {
        let file = |extra: &str| plan(&format!("name: t\nsource: {{type: file, path: x{extra}}}\nsink: {{type: blackhole}}\n"));
        let repeat = |p: &JobPlan| match &p.source {
            SourceSpec::File { repeat, .. } => *repeat,
            other => panic!("not a file source: {other:?}"),
        };
        assert_eq!(repeat(&file("").unwrap()), 1);
        assert_eq!(repeat(&file(", repeat: 3").unwrap()), 3);
        for bad in ["0", "-2", "many", "5000000000"] {
            let e = file(&format!(", repeat: {bad}")).unwrap_err();
            assert!(e.starts_with("source: repeat: must be a whole number of at least 1") && e.contains(bad), "{e}");
        }
        // A spec built in code is checked too.
        let tree: serde_json::Value = serde_saphyr::from_str("name: t\nsource: {type: file, path: x}\nsink: {type: blackhole}\n").unwrap();
        let mut spec: JobSpec = serde_json::from_value(tree).unwrap();
        spec.source.spec = SourceSpec::File { path: "x".into(), format: FileFormatSpec::Lines, fields: vec![], repeat: 0 };
        let e = JobPlan::from_spec(spec, &[]).err().unwrap();
        assert!(e.starts_with("source.repeat: must be at least 1"), "{e}");
    }

    #[test]
    fn sum_needs_numbers() {
        let e = plan("name: t\nsource: {type: file, path: x}\npipeline:\n  - key_by: line\n  - aggregate: [sum(line)]\nsink: {type: blackhole}\n").unwrap_err();
        assert!(e.contains("pipeline[1].aggregate: sum(line): field 'line' holds a string, sum needs numbers"), "{e}");
        let json = "name: t\nsource: {type: file, path: x, format: json, fields: [k, v, w]}\nsink: {type: blackhole}\npipeline:\n";
        // Every row reaches the sum: the source checks `v` (field 1), naming file and line.
        let p = plan(&format!("{json}  - select: [w, v, k]\n  - key_by: k\n  - aggregate: [count, sum(v), min(w)]\n")).unwrap();
        assert_eq!(p.source_numbers, [(1, "pipeline[2].aggregate sums it (sum(v))".to_string())]);
        // A filter may drop the rows that would fail: only the aggregate can judge them.
        let p = plan(&format!("{json}  - filter: {{field: w, op: eq, value: 1}}\n  - key_by: k\n  - aggregate: [sum(v)]\n")).unwrap();
        assert!(p.source_numbers.is_empty());
        let p = plan(&format!("{json}  - map: {{field: v, op: add, value: 1}}\n  - key_by: k\n  - aggregate: [sum(v)]\n")).unwrap();
        assert!(p.source_numbers.is_empty());
    }

    #[test]
    fn cnn_train_is_checked_naming_the_config_key() {
        let job = |step: &str, config: &str| {
            plan(&format!(
                "name: t\nconfig: {{{config}}}\nsource: {{type: file, path: x, format: json, fields: [tenant, label, pixels]}}\npipeline:\n  - key_by: tenant\n  - cnn_train: {{{step}}}\nsink: {{type: blackhole}}\n"
            ))
        };
        let base = "field: pixels, label: label, height: 8, width: 8, classes: 10";
        let p = job(base, "").unwrap();
        assert_eq!(p.output_schema, ["tenant", "samples", "loss", "accuracy"]);
        let PlanStep::KeyCnnTrain { train, uid, .. } = &p.steps[0] else { panic!("{:?}", p.steps) };
        assert_eq!(uid, "pipeline[1]:cnn_train");
        assert_eq!((train.batch, train.report_every, train.learning_rate, train.shape.conv_c, train.shape.in_c), (32, 1000, 0.01, 8, 1));
        let with = |over: &str| format!("{base}, {over}").replacen("height: 8, ", "", over.contains("height") as usize);
        let checkpoints = "execution.checkpointing.interval: 1s";
        let model = "../../models/digits_cnn.safetensors";
        for (step, config, want) in [
            (with("height: 7"), "", "pipeline[1].cnn_train.height: must be an even number of at least 2"),
            (base.replace("width: 8", "width: 0"), "", "pipeline[1].cnn_train.width: must be an even number"),
            (base.replace("classes: 10", "classes: 1"), "", "pipeline[1].cnn_train.classes: must be at least 2, not 1"),
            (with("filters: 0"), "", "pipeline[1].cnn_train.filters: must be at least 1"),
            (with("batch_size: 0"), "", "pipeline[1].cnn_train.batch_size: must be 1 to 65536, not 0"),
            (with("batch_size: 65536, filters: 64, height: 64"), "", "pipeline[1].cnn_train.batch_size: 65536 images of 64×8 through 64 filters exceed"),
            (with("learning_rate: 0"), "", "pipeline[1].cnn_train.learning_rate: must be above 0"),
            (with("learning_rate: 2"), "", "pipeline[1].cnn_train.learning_rate: must be above 0 and at most 1, not 2"),
            (with("report_every: 0"), "", "pipeline[1].cnn_train.report_every: must be 1 to 8388608 samples, not 0"),
            (base.replace("field: pixels", "field: pics"), "", "pipeline[1].cnn_train.field: no field 'pics' here (fields: tenant, label, pixels)"),
            (base.replace("label: label", "label: pixels"), "", "pipeline[1].cnn_train.label: 'pixels' is the image field too"),
            (with("batch_size: many"), "", "pipeline[1].cnn_train.batch_size: invalid type"),
            (with("lr: 0.1"), "", "pipeline[1].cnn_train.lr: unknown field `lr`, expected one of `field`"),
            (with("export: 'out/m-{key}.safetensors'"), "", "pipeline[1].cnn_train.export: models are exported when a checkpoint completes"),
            (with("export: 'out/{key}/m.safetensors'"), checkpoints, "pipeline[1].cnn_train.export: out/{key}/m.safetensors: {key} may only stand in the file name"),
            (with("init: no/such.safetensors"), "", "pipeline[1].cnn_train.init: "),
            (format!("{base}, init: {model}").replace("classes: 10", "classes: 9"), "", "pipeline[1].cnn_train.init: ../../models/digits_cnn.safetensors has 1 channel(s), 8 filters and 10 classes; the step says channels: 1, filters: 8, classes: 9"),
        ] {
            let e = job(&step, config).err().unwrap_or_else(|| panic!("{step} is refused"));
            assert!(e.starts_with(want), "{step}: {e}\nwanted: {want}");
        }
        // What passes: an initial model of the step's shape, an export with checkpoints.
        let p = job(&format!("{base}, init: {model}, export: 'out/m-{{key}}.safetensors'"), checkpoints).unwrap();
        let PlanStep::KeyCnnTrain { train, .. } = &p.steps[0] else { panic!() };
        assert!(train.init.is_some() && train.export.as_deref() == Some("out/m-{key}.safetensors"));
        let e = plan("name: t\nsource: {type: file, path: x, format: json, fields: [l, p]}\npipeline:\n  - cnn_train: {field: p, label: l, height: 2, width: 2, classes: 2}\nsink: {type: blackhole}\n").unwrap_err();
        assert_eq!(e, "pipeline[0]: cnn_train needs a key_by before it");
    }
}

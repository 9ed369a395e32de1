//! Declarative YAML jobs of built-in operators, run by `weir run JOB.yaml`.
//!
//! ```yaml
//! name: keyed-sum
//! config:
//!   parallelism.default: 2
//!   execution.checkpointing.interval: 1s
//! source: {type: generator, count: 1000000, keys: 1000}
//! pipeline:
//!   - filter: {field: value, op: gt, value: 10}
//!   - key_by: key
//!   - aggregate: [sum(value), count]
//! sink: {type: file, path: out/keyed-sum}
//! ```
//!
//! A job is checked completely before it starts: unknown fields, unknown config keys, fields
//! that the schema at a step does not have, and ill-typed values are errors naming the place.
//!
//! The source, each step and the sink may carry a `uid:` beside their fields (Flink's `uid()`):
//! a restore gives each operator the state the checkpoint holds under its uid, so a job may
//! gain or lose steps between runs. Without one the uid is derived from the place
//! (`source:generator`, `pipeline[1]:aggregate`, `sink:file`), which inserting a step before a
//! stateful one changes: give stateful steps explicit uids before editing the job.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use serde::de::{DeserializeSeed, Error as _, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;
use smallvec::SmallVec;

use crate::config::JobConfig;
use crate::row::{Row, Value};
use crate::sink::{BlackholeSink, FileSink};
use crate::source::{FileFormat, FileSource, GeneratorSource};
use crate::state::{KeyedContext, KeyedProcessFunction, StateTables, ValueState};
use crate::stream::{DataStream, Job};

/// A job file that cannot be run; the message names the file and the place in it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct SpecError {
    /// The job file.
    pub file: String,
    /// What and where.
    pub message: String,
}

/// The job file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's name (its checkpoint directory is `<dir>/<name>`).
    pub name: String,
    /// Configuration (Flink key names).
    #[serde(default)]
    pub config: BTreeMap<String, serde_json::Value>,
    /// The source.
    pub source: WithUid<SourceSpec>,
    /// Transformations, in order.
    #[serde(default)]
    pub pipeline: Vec<WithUid<Step>>,
    /// The sink.
    pub sink: WithUid<SinkSpec>,
}

/// A source, pipeline step or sink as written, with the `uid:` that may stand beside its fields
/// (`- {aggregate: [count], uid: counts}`): the stable id its state is restored by.
#[derive(Debug, Clone)]
pub struct WithUid<T> {
    /// The uid, if the job gives one (otherwise it is derived from the place).
    pub uid: Option<String>,
    /// The source, step or sink.
    pub spec: T,
}

impl<T> WithUid<T> {
    /// `spec` without a uid.
    pub fn new(spec: T) -> Self {
        Self { uid: None, spec }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for WithUid<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = WithUid<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                // `T` reads the mapping through `SkipUid`, which takes `uid` aside: the fields
                // of `T` stay checked (and the error paths precise) as without a uid.
                let mut rest = SkipUid { map, uid: None };
                let spec = T::deserialize(serde::de::value::MapAccessDeserializer::new(&mut rest))?;
                // A step reads one entry: a second one is a second operation.
                if let Some(key) = rest.next_key::<String>()? {
                    return Err(A::Error::custom(format!("unexpected `{key}`: a step is one operation and an optional uid")));
                }
                Ok(WithUid { uid: rest.uid, spec })
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// The entries of a mapping but `uid`, whose value it keeps.
struct SkipUid<A> {
    map: A,
    uid: Option<String>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkipUid<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        while let Some(key) = self.map.next_key::<String>()? {
            if key != "uid" {
                return seed.deserialize(key.into_deserializer()).map(Some);
            }
            if self.uid.is_some() {
                return Err(A::Error::custom("duplicate field `uid`"));
            }
            self.uid = Some(self.map.next_value()?);
        }
        Ok(None)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

fn default_keys() -> u64 {
    1_000_000
}

/// A source of a YAML job.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceSpec {
    /// Seeded `(key, value)` rows.
    Generator {
        /// Records in all.
        count: u64,
        /// Distinct keys.
        #[serde(default = "default_keys")]
        keys: u64,
        /// Seed.
        #[serde(default)]
        seed: u64,
        /// Records per second (unlimited if absent).
        #[serde(default)]
        rate: Option<f64>,
    },
    /// Seeded Gaussian blobs: rows `(key, point)`.
    Blobs {
        /// Points in all.
        count: u64,
        /// Gaussians per key.
        centers: usize,
        /// Dimensions.
        dim: usize,
        /// Standard deviation.
        #[serde(default = "one")]
        sigma: f32,
        /// Independent streams (keys).
        #[serde(default = "one_u64")]
        keys: u64,
        /// Seed.
        #[serde(default)]
        seed: u64,
    },
    /// The PNG and JPEG images of a directory: rows `(name, image)`.
    Images {
        /// The directory.
        path: String,
    },
    /// Lines or JSON lines of a file or a directory of files.
    File {
        /// File or directory.
        path: String,
        /// `lines` (one field `line`) or `json` (the listed `fields`).
        #[serde(default)]
        format: FileFormatSpec,
        /// Fields of JSON objects.
        #[serde(default)]
        fields: Vec<String>,
    },
}

/// File formats.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileFormatSpec {
    /// Plain lines.
    #[default]
    Lines,
    /// JSON objects, one per line.
    Json,
}

/// A sink of a YAML job.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkSpec {
    /// Exactly-once CSV files in a directory.
    File {
        /// The directory.
        path: String,
    },
    /// Discard (for benchmarks).
    Blackhole {},
    /// One PNG per row, named after the `name` field, exactly once.
    Images {
        /// The directory.
        path: String,
        /// The field naming each file.
        #[serde(default = "name_field")]
        name: String,
        /// The image field.
        #[serde(default = "image_field")]
        field: String,
    },
}

/// Comparison of a filter.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// Operation of a map.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MapOp {
    /// Add a number.
    Add,
    /// Multiply by a number.
    Mul,
    /// Lower-case a string.
    Lower,
    /// Upper-case a string.
    Upper,
}

/// One transformation.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Keep rows where `field op value`.
    Filter {
        /// Field.
        field: String,
        /// Comparison.
        op: CmpOp,
        /// Constant.
        value: serde_json::Value,
    },
    /// Change a field in place.
    Map {
        /// Field.
        field: String,
        /// Operation.
        op: MapOp,
        /// Operand of add/mul.
        #[serde(default)]
        value: Option<serde_json::Value>,
    },
    /// Keep these fields, in this order.
    Select(Vec<String>),
    /// Split a text field into words: one row `(word)` per word.
    Tokenize {
        /// The text field.
        field: String,
        /// Lower-case the words.
        #[serde(default = "yes")]
        lowercase: bool,
    },
    /// Partition by a field; must be followed by `aggregate`.
    KeyBy(String),
    /// Bilinear resize of an image field (GPU or CPU path); `height` absent keeps the aspect.
    ImageResize {
        /// The image field.
        #[serde(default = "image_field")]
        field: String,
        /// New width.
        width: usize,
        /// New height.
        #[serde(default)]
        height: Option<usize>,
    },
    /// Filter an image field: `sobel`, or `gaussian` with `sigma`.
    ImageFilter {
        /// The image field.
        #[serde(default = "image_field")]
        field: String,
        /// Which filter.
        kind: FilterKind,
        /// Gaussian standard deviation.
        #[serde(default = "one")]
        sigma: f32,
    },
    /// Multiply a vector field (length `input`) by a seeded Gaussian `input × output` matrix
    /// scaled by 1/√output (a Johnson–Lindenstrauss random projection), in batches: one GEMM
    /// per batch, on the GPU or the CPU path.
    Gemm {
        /// The vector field.
        field: String,
        /// Its length.
        input: usize,
        /// The projected length.
        output: usize,
        /// Seed of the matrix.
        #[serde(default)]
        seed: u64,
    },
    /// Classify a vector field of `height × width` pixels with a small CNN (safetensors:
    /// conv 3×3 + ReLU → max-pool 2×2 → dense), in batches, on the GPU or the CPU path;
    /// appends the field `class`.
    CnnInfer {
        /// The pixel field.
        field: String,
        /// The safetensors file.
        model: String,
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
    },
    /// Streaming mini-batch K-means per key over a vector field (GPU, or the CPU path);
    /// must follow `key_by`. Emits `(key, centroid, vector)` per centroid after each batch.
    Kmeans {
        /// The vector field.
        field: String,
        /// Centroids.
        k: usize,
    },
    /// Per-key running aggregates: `sum(f)`, `count`, `min(f)`, `max(f)`; emits
    /// `(key, aggregates…)` on every update.
    Aggregate(Vec<String>),
}

impl SourceSpec {
    /// The `type:` as written.
    fn kind(&self) -> &'static str {
        match self {
            SourceSpec::Generator { .. } => "generator",
            SourceSpec::Blobs { .. } => "blobs",
            SourceSpec::Images { .. } => "images",
            SourceSpec::File { .. } => "file",
        }
    }
}

impl SinkSpec {
    /// The `type:` as written.
    fn kind(&self) -> &'static str {
        match self {
            SinkSpec::File { .. } => "file",
            SinkSpec::Blackhole {} => "blackhole",
            SinkSpec::Images { .. } => "images",
        }
    }
}

impl Step {
    /// The step's name as written.
    fn kind(&self) -> &'static str {
        match self {
            Step::Filter { .. } => "filter",
            Step::Map { .. } => "map",
            Step::Select(_) => "select",
            Step::Tokenize { .. } => "tokenize",
            Step::KeyBy(_) => "key_by",
            Step::ImageResize { .. } => "image_resize",
            Step::ImageFilter { .. } => "image_filter",
            Step::Gemm { .. } => "gemm",
            Step::CnnInfer { .. } => "cnn_infer",
            Step::Kmeans { .. } => "kmeans",
            Step::Aggregate(_) => "aggregate",
        }
    }
}

/// The uids of a job's operators, as the job is checked: each given or derived from its place
/// (`source:generator`, `pipeline[2]:aggregate`, `sink:file`), none twice.
#[derive(Default)]
struct Uids(Vec<(String, String)>);

impl Uids {
    /// The uid of the `kind` at `place` (`source`, `pipeline[2]`, `sink`): `given`, or derived.
    fn claim(&mut self, place: String, given: Option<&str>, kind: &str) -> Result<String, String> {
        let uid = match given {
            Some(u) if u.trim().is_empty() => return Err(format!("{place}.uid: must not be empty")),
            Some(u) => u.to_string(),
            None => format!("{place}:{kind}"),
        };
        if let Some((_, other)) = self.0.iter().find(|(u, _)| *u == uid) {
            return Err(format!("{place}.uid: '{uid}' is also the uid of {other}; uids must be unique in a job"));
        }
        self.0.push((uid.clone(), place));
        Ok(uid)
    }
}

fn name_field() -> String {
    "name".into()
}

fn image_field() -> String {
    "image".into()
}

/// Image filters.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FilterKind {
    /// Sobel gradient magnitude.
    Sobel,
    /// Gaussian blur (`sigma`).
    Gaussian,
}

fn one() -> f32 {
    1.0
}

fn one_u64() -> u64 {
    1
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AggFn {
    Sum,
    Count,
    Min,
    Max,
}

#[derive(Debug, Clone)]
enum PlanStep {
    Filter { idx: usize, op: CmpOp, value: Value },
    Map { idx: usize, op: MapOp, value: Value },
    Select(Vec<usize>),
    Tokenize { idx: usize, lowercase: bool },
    /// `at`: the pipeline index of the `aggregate` step; `calls`: its functions as written.
    KeyAgg { key: usize, aggs: Vec<(AggFn, usize)>, ints: bool, at: usize, calls: Vec<String>, uid: String },
    KeyKmeans { key: usize, field: usize, k: usize, uid: String },
    Resize { idx: usize, width: usize, height: Option<usize> },
    Cnn { idx: usize, model: Arc<weir_gpu::cnn::SmallCnn> },
    Gemm { idx: usize, k: usize, n: usize, b: Arc<Vec<f32>> },
    Filter2d { idx: usize, kind: FilterKind, sigma: f32 },
}

/// A checked job, ready to run on every worker.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// The job's name.
    pub name: String,
    /// The validated configuration.
    pub config: JobConfig,
    source: SourceSpec,
    steps: Vec<PlanStep>,
    sink: SinkSpec,
    /// The uids of the source and the sink (those of stateful steps are in their `PlanStep`).
    source_uid: String,
    sink_uid: String,
    sink_fields: Option<(usize, usize)>,
    /// Source fields that must be numbers, and why: the file source checks them, naming the
    /// file and line of a value that is not.
    source_numbers: Vec<(usize, String)>,
    /// Field names of the rows that reach the sink.
    pub output_schema: Vec<String>,
}

fn scalar_to_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "off".into(),
        other => other.to_string(),
    }
}

fn json_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Number(n) => n.as_i64().map(Value::Int).unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(0.0))),
        serde_json::Value::String(s) => Value::text(s.as_str()),
        serde_json::Value::Bool(b) => Value::Int(*b as i64),
        _ => Value::Null,
    }
}

/// Parse YAML text into a tree (for `--set` edits before checking).
pub fn parse_yaml(text: &str) -> Result<serde_json::Value, String> {
    serde_saphyr::from_str(text).map_err(|e| e.to_string())
}

/// The fields of each `type` of source and sink, for `--set source.type=…` and
/// `--set sink.type=…`: switching the type drops the fields the new type does not have
/// (`component_fields_match_the_specs` keeps this in step with [`SourceSpec`] and [`SinkSpec`]).
const COMPONENT_FIELDS: &[(&str, &str, &[&str])] = &[
    ("source", "generator", &["count", "keys", "seed", "rate"]),
    ("source", "blobs", &["count", "centers", "dim", "sigma", "keys", "seed"]),
    ("source", "images", &["path"]),
    ("source", "file", &["path", "format", "fields"]),
    ("sink", "file", &["path"]),
    ("sink", "blackhole", &[]),
    ("sink", "images", &["path", "name", "field"]),
];

/// Apply one `--set path=value` to a YAML tree. Switching a source's or sink's `type` drops the
/// fields the new type does not have, with a warning naming them: `--set sink.type=blackhole`
/// on a file sink drops its `path` instead of failing on it. The fields of the file itself are
/// still checked (only a switch drops anything).
pub fn apply_set(tree: &mut serde_json::Value, path: &str, value: &str) -> Result<(), String> {
    let component = path.strip_suffix(".type").filter(|c| matches!(*c, "source" | "sink"));
    let type_of = |tree: &serde_json::Value, c: &str| tree.get(c)?.get("type")?.as_str().map(str::to_string);
    let before = component.and_then(|c| type_of(tree, c));
    set_path(tree, path, value)?;
    let Some(c) = component else { return Ok(()) };
    let Some(after) = type_of(tree, c).filter(|t| before.as_ref() != Some(t)) else { return Ok(()) };
    // An unknown type is left for the spec check to name.
    let Some((_, _, fields)) = COMPONENT_FIELDS.iter().find(|(k, t, _)| *k == c && *t == after) else { return Ok(()) };
    let Some(obj) = tree.get_mut(c).and_then(|v| v.as_object_mut()) else { return Ok(()) };
    // A uid belongs to the place, not the type: it stays.
    let dropped: Vec<String> = obj.keys().filter(|k| !["type", "uid"].contains(&k.as_str()) && !fields.contains(&k.as_str())).cloned().collect();
    if !dropped.is_empty() {
        obj.retain(|k, _| !dropped.contains(k));
        tracing::warn!(
            "--set {path}={value}: dropped {} of the {c} (a {after} {c} has no such field)",
            dropped.iter().map(|k| format!("'{c}.{k}'")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// Set `path` (dots; list indices as numbers) in a YAML tree to `value` (parsed as YAML).
pub fn set_path(tree: &mut serde_json::Value, path: &str, value: &str) -> Result<(), String> {
    let parsed: serde_json::Value =
        serde_saphyr::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    let mut cur = tree;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        cur = match cur {
            serde_json::Value::Object(map) => {
                if last {
                    map.insert(part.to_string(), parsed);
                    return Ok(());
                }
                map.entry(part.to_string()).or_insert_with(|| serde_json::Value::Object(Default::default()))
            }
            serde_json::Value::Array(list) => {
                let idx: usize = part.parse().map_err(|_| format!("--set {path}: '{part}' is not a list index"))?;
                let len = list.len();
                let slot = list.get_mut(idx).ok_or_else(|| format!("--set {path}: index {idx} beyond {len} steps"))?;
                if last {
                    *slot = parsed;
                    return Ok(());
                }
                slot
            }
            _ => return Err(format!("--set {path}: '{}' is not a mapping", parts[..i].join("."))),
        };
    }
    Ok(())
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
                            schema = vec![schema[key].clone(), "centroid".into(), "vector".into()];
                            ints = vec![ints[key], true, false];
                            non_numeric = vec![non_numeric[key], None, Some("vector")];
                            origin = vec![None; 3];
                            continue;
                        }
                        _ => return Err(format!("pipeline[{i}]: key_by must be followed by aggregate or kmeans")),
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
        if steps.iter().any(|s| matches!(s, PlanStep::KeyKmeans { .. } | PlanStep::Resize { .. } | PlanStep::Filter2d { .. } | PlanStep::Cnn { .. } | PlanStep::Gemm { .. })) {
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
            SourceSpec::File { path, format, fields } => {
                let format = match format {
                    FileFormatSpec::Lines => FileFormat::Lines,
                    FileFormatSpec::Json => FileFormat::JsonLines(fields.clone()),
                };
                let source = self.source_numbers.iter().fold(FileSource::new(path, format), |s, (field, why)| s.require_number(*field, why));
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
                    image_batches(stream, &format!("image_resize-{i}"), idx, move |img| {
                        let h = height.unwrap_or(((img.h * width) as f64 / img.w as f64).round().max(1.0) as usize);
                        kernels.resize_bilinear_async(img, width, h)
                    })
                }
                PlanStep::Gemm { idx, k, n, b } => {
                    let Some(kernels) = self.kernels(job, i) else { return };
                    let mut a: Vec<f32> = Vec::new();
                    stream.map_batches_async(&format!("gemm-{i}"), move |batch: &mut Vec<Row>| {
                        a.clear();
                        for r in batch.iter() {
                            match r.get(idx) {
                                Value::Vector(v) if v.len() == k => a.extend_from_slice(v),
                                other => panic!("gemm: a {} where a vector of {k} values is expected", other.type_name()),
                            }
                        }
                        let rows = std::mem::take(batch);
                        kernels.gemm_async(&a, &b, rows.len(), n, k).map(move |c| {
                            rows.into_iter()
                                .zip(c.chunks(n))
                                .map(|(mut r, row)| {
                                    r.0[idx] = Value::Vector(Arc::new(row.to_vec()));
                                    r
                                })
                                .collect()
                        })
                    })
                }
                PlanStep::Cnn { idx, model } => {
                    let Some(kernels) = self.kernels(job, i) else { return };
                    let mut pixels: Vec<f32> = Vec::new();
                    stream.map_batches_async(&format!("cnn-{i}"), move |batch: &mut Vec<Row>| {
                        pixels.clear();
                        for r in batch.iter() {
                            match r.get(idx) {
                                Value::Vector(v) if v.len() == model.input_len() => pixels.extend_from_slice(v),
                                other => panic!("cnn_infer: a {} of {} values where {} pixels are expected", other.type_name(), match other { Value::Vector(v) => v.len(), _ => 0 }, model.input_len()),
                            }
                        }
                        let rows = std::mem::take(batch);
                        let classes = model.classes;
                        kernels.cnn_forward_async(&model, &pixels, rows.len()).map(move |logits| {
                            rows.into_iter()
                                .zip(weir_gpu::cnn::argmax(&logits, classes))
                                .map(|(mut r, c)| {
                                    r.0.push(Value::Int(c as i64));
                                    r
                                })
                                .collect()
                        })
                    })
                }
                PlanStep::Filter2d { idx, kind, sigma } => {
                    let Some(kernels) = self.kernels(job, i) else { return };
                    image_batches(stream, &format!("image_filter-{i}"), idx, move |img| match kind {
                        FilterKind::Sobel => kernels.sobel_async(img),
                        FilterKind::Gaussian => kernels.gaussian_blur_async(img, sigma),
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
                        .process_batches(&format!("kmeans-{i}"), crate::kmeans::StreamingKMeans::new(k, field, kernels).max_in_flight(self.config.gpu_max_inflight))
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

fn compare(v: &Value, op: CmpOp, c: &Value) -> bool {
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

fn apply(v: &Value, op: MapOp, c: &Value) -> Value {
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
struct Aggregate {
    aggs: Vec<(AggFn, usize)>,
    /// The step's pipeline index and its functions as written, for messages.
    at: usize,
    calls: Vec<String>,
    state: Option<ValueState<SmallVec<[Value; 2]>>>,
    /// A non-number given to `sum` fails the job: the same row fails every restart.
    input_error: crate::stream::InputErrorHandle,
    failed: bool,
}

fn add(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Null, b) => b.clone(),
        (Value::Int(x), Value::Int(y)) => Value::Int(x.wrapping_add(*y)),
        (x, y) => Value::Float(x.as_f64().unwrap_or(0.0) + y.as_f64().unwrap_or(0.0)),
    }
}

fn extreme(a: &Value, b: &Value, want: std::cmp::Ordering) -> Value {
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
struct IntAggregate<const N: usize> {
    aggs: Vec<(AggFn, usize)>,
    state: Option<ValueState<[i64; N]>>,
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

/// An image kernel over batches: one submission per image of field `idx` (rows without an
/// image there pass unchanged), all of a batch in flight together.
fn image_batches<'s>(
    stream: DataStream<'s, Row>,
    name: &str,
    idx: usize,
    kernel: impl Fn(&weir_gpu::kernels::Image) -> weir_gpu::Pending<weir_gpu::kernels::Image> + 'static,
) -> DataStream<'s, Row> {
    stream.map_batches_async(name, move |batch: &mut Vec<Row>| {
        let rows = std::mem::take(batch);
        let parts = rows
            .iter()
            .map(|r| match r.get(idx) {
                Value::Image(img) => kernel(img).map(Some),
                _ => weir_gpu::Pending::ready(Ok(None)),
            })
            .collect();
        weir_gpu::Pending::all(parts).map(move |imgs: Vec<Option<weir_gpu::kernels::Image>>| {
            rows.into_iter()
                .zip(imgs)
                .map(|(mut r, img)| {
                    if let Some(img) = img {
                        r.0[idx] = Value::Image(Arc::new(img));
                    }
                    r
                })
                .collect()
        })
    })
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
            PlanStep::KeyAgg { uid, .. } | PlanStep::KeyKmeans { uid, .. } => Some(uid.clone()),
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
}


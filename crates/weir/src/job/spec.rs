//! The job file as written: its schema (serde types with exact error paths), the `uid:`
//! wrapper, and `--set` overrides on the YAML tree. Nothing here builds a dataflow.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Error as _, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::row::Value;

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
pub(super) struct SkipUid<A> {
    pub(super) map: A,
    pub(super) uid: Option<String>,
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

pub(super) fn default_keys() -> u64 {
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
        /// Times the files are read, in order (a training set's epochs).
        #[serde(default = "one_u32", deserialize_with = "times")]
        repeat: u32,
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
    /// must follow `key_by`. Emits `(key, centroid, count, vector)` per centroid after each batch.
    Kmeans {
        /// The vector field.
        field: String,
        /// Centroids.
        k: usize,
    },
    /// Per-key running aggregates: `sum(f)`, `count`, `min(f)`, `max(f)`; emits
    /// `(key, aggregates…)` on every update.
    Aggregate(Vec<String>),
    /// Train a small CNN per key (see [`CnnTrainSpec`]); must follow `key_by`.
    CnnTrain(CnnTrainSpec),
}

/// `cnn_train`: a small CNN per key (conv 3×3 + ReLU → max-pool 2×2 → dense, the family of
/// `cnn_infer`'s models) trained on an image field and a class field in mini-batches, with
/// softmax cross-entropy and Adam, where the models live (GPU, or the CPU path). Emits
/// `(key, samples, loss, accuracy)` every `report_every` samples of a key; with `export`, writes
/// each key's model as safetensors when a checkpoint completes, exactly once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnTrainSpec {
    /// The image field: a vector of `channels × height × width` values (NCHW).
    pub field: String,
    /// The class field: an integer in `0..classes`.
    pub label: String,
    /// Image height (even: max-pool 2×2).
    pub height: usize,
    /// Image width (even).
    pub width: usize,
    /// Image channels.
    #[serde(default = "one_usize")]
    pub channels: usize,
    /// Convolution filters (output channels).
    #[serde(default = "eight")]
    pub filters: usize,
    /// Classes.
    pub classes: usize,
    /// Samples per mini-batch (one Adam step each).
    #[serde(default = "thirty_two")]
    pub batch_size: usize,
    /// Adam's learning rate.
    #[serde(default = "learning_rate")]
    pub learning_rate: f64,
    /// A report row every this many samples of a key (rounded up to whole mini-batches).
    #[serde(default = "thousand")]
    pub report_every: u64,
    /// Seed of new models' initial weights.
    #[serde(default)]
    pub seed: u64,
    /// A safetensors model that new keys start from (fine-tuning) instead of seeded weights.
    #[serde(default)]
    pub init: Option<String>,
    /// Where each key's model is written when a checkpoint completes: a path whose file name
    /// holds `{key}` (e.g. `models/digits-{key}.safetensors`; without it, one key only).
    #[serde(default)]
    pub export: Option<String>,
}

impl SourceSpec {
    /// The `type:` as written.
    pub(super) fn kind(&self) -> &'static str {
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
    pub(super) fn kind(&self) -> &'static str {
        match self {
            SinkSpec::File { .. } => "file",
            SinkSpec::Blackhole {} => "blackhole",
            SinkSpec::Images { .. } => "images",
        }
    }
}

impl Step {
    /// The step's name as written.
    pub(super) fn kind(&self) -> &'static str {
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
            Step::CnnTrain(_) => "cnn_train",
        }
    }
}

/// The uids of a job's operators, as the job is checked: each given or derived from its place
/// (`source:generator`, `pipeline[2]:aggregate`, `sink:file`), none twice.
#[derive(Default)]
pub(super) struct Uids(Vec<(String, String)>);

impl Uids {
    /// The uid of the `kind` at `place` (`source`, `pipeline[2]`, `sink`): `given`, or derived.
    pub(super) fn claim(&mut self, place: String, given: Option<&str>, kind: &str) -> Result<String, String> {
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

pub(super) fn name_field() -> String {
    "name".into()
}

pub(super) fn image_field() -> String {
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

pub(super) fn one() -> f32 {
    1.0
}

pub(super) fn one_u64() -> u64 {
    1
}

pub(super) fn one_u32() -> u32 {
    1
}

pub(super) fn one_usize() -> usize {
    1
}

pub(super) fn eight() -> usize {
    8
}

pub(super) fn thirty_two() -> usize {
    32
}

pub(super) fn learning_rate() -> f64 {
    0.01
}

pub(super) fn thousand() -> u64 {
    1000
}

/// A count of at least 1 (the file source's `repeat`). The tagged source enum loses the field's
/// path in errors, so the message names it.
fn times<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n >= 1)
        .ok_or_else(|| D::Error::custom(format!("repeat: must be a whole number of at least 1 (the times the files are read), not {v}")))
}

pub(super) fn yes() -> bool {
    true
}

pub(super) fn scalar_to_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "off".into(),
        other => other.to_string(),
    }
}

pub(super) fn json_value(v: &serde_json::Value) -> Value {
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
pub(super) const COMPONENT_FIELDS: &[(&str, &str, &[&str])] = &[
    ("source", "generator", &["count", "keys", "seed", "rate"]),
    ("source", "blobs", &["count", "centers", "dim", "sigma", "keys", "seed"]),
    ("source", "images", &["path"]),
    ("source", "file", &["path", "format", "fields", "repeat"]),
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

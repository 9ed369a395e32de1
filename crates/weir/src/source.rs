//! Replayable sources. A source is a set of splits, each with an offset that checkpoints record;
//! splits are spread over the workers (split `i` to worker `i mod parallelism`), so a source
//! restores at any parallelism. A file-per-split source's splits are matched to the restored
//! offsets by file path, so files added before a restore shift nothing.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use weir_checkpoint::SplitOffset;

use crate::row::{Row, Value};

/// What a poll produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// More records may follow at once.
    More,
    /// Nothing now (rate limit, waiting for input); poll again later.
    Idle,
    /// Every split is exhausted.
    Finished,
}

/// Whether a restart can fix a source error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input or the settings are wrong (malformed JSON, bad UTF-8, a line over
    /// `weir.source.max-line-bytes`, a bad setting): a restart reads the same bytes again, so
    /// the job fails at once.
    Deterministic,
    /// I/O that may succeed on a retry: the restart strategy applies.
    Transient,
}

/// A source failed; the message names the file and line, or the setting, at fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// Whether a restart can fix it.
    pub kind: ErrorKind,
    /// What and where.
    pub message: String,
}

impl SourceError {
    /// Bad input or settings: the job fails without restarting.
    pub fn deterministic(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Deterministic, message: message.into() }
    }

    /// An I/O failure: the job restarts per its restart strategy.
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, message: message.into() }
    }

    /// Whether a restart cannot fix it.
    pub fn is_deterministic(&self) -> bool {
        self.kind == ErrorKind::Deterministic
    }
}

/// Where a source instance runs.
#[derive(Debug, Clone, Copy)]
pub struct SourceContext {
    /// This instance.
    pub subtask: u32,
    /// Instances in all.
    pub parallelism: u32,
    /// The longest line a line-based source accepts (`weir.source.max-line-bytes`).
    pub max_line_bytes: u64,
}

/// A replayable source.
pub trait Source<T>: 'static {
    /// All splits at their start, in one order on every worker. A file-per-split source sets
    /// each split's `path` (relative to [`Source::root`]): restores match on it.
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError>;
    /// A reader over `splits`, each starting at its offset.
    fn open(&self, ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<T>>, SourceError>;
    /// The directory that split paths are relative to (for messages).
    fn root(&self) -> Option<&Path> {
        None
    }
}

/// Subtask `ctx.subtask`'s share of `source`'s splits (split `i` to subtask `i mod parallelism`),
/// each at its offset in `restored`: the restored checkpoint's offsets of this source, of every
/// subtask, so that a restore works at any parallelism.
///
/// Splits with a path match a restored offset with the same path; a file added since the
/// checkpoint has none and starts at 0. Checkpoints written before paths were recorded match by
/// id, as they always did. A restored path that the source no longer lists is a deterministic
/// error naming the file(s): skipping it would silently drop its unread rest, reading it again
/// would duplicate its read part. Every subtask checks, so none starts over a broken restore.
pub fn assign_splits<T, S: Source<T> + ?Sized>(source: &S, ctx: &SourceContext, restored: &[SplitOffset]) -> Result<Vec<SplitOffset>, SourceError> {
    let splits = source.splits()?;
    let mut by_path: HashMap<&str, u64> = HashMap::new();
    let mut by_id: HashMap<u64, u64> = HashMap::new();
    for r in restored {
        match &r.path {
            Some(p) => by_path.insert(p, r.offset),
            None => by_id.insert(r.split, r.offset),
        };
    }
    if !by_path.is_empty() {
        let listed: HashSet<&str> = splits.iter().filter_map(|s| s.path.as_deref()).collect();
        let mut gone: Vec<&str> = by_path.keys().copied().filter(|p| !listed.contains(p)).collect();
        if !gone.is_empty() {
            gone.sort_unstable();
            return Err(files_gone(source.root(), &gone));
        }
    }
    let (subtask, parallelism) = (ctx.subtask as usize, ctx.parallelism.max(1) as usize);
    Ok(splits
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % parallelism == subtask)
        .map(|(_, mut s)| {
            s.offset = s.path.as_deref().and_then(|p| by_path.get(p)).or_else(|| by_id.get(&s.split)).copied().unwrap_or(0);
            s
        })
        .collect())
}

/// One source instance's reader.
pub trait SourceReader<T> {
    /// Append at most `max` records to `out`.
    fn poll(&mut self, out: &mut Vec<T>, max: usize) -> Result<Poll, SourceError>;
    /// The current offsets of this reader's splits.
    fn offsets(&self) -> Vec<SplitOffset>;
}

/// Restored files that are no longer there: no restart brings them back.
fn files_gone(root: Option<&Path>, gone: &[&str]) -> SourceError {
    let root = root.unwrap_or(Path::new(""));
    let names: Vec<String> = gone.iter().map(|p| root.join(p).display().to_string()).collect();
    SourceError::deterministic(match names.as_slice() {
        [one] => format!("file {one} is gone, but the restored checkpoint holds its read position: put it back, or restore another checkpoint"),
        many => format!(
            "files {} are gone, but the restored checkpoint holds their read positions: put them back, or restore another checkpoint",
            many.join(", ")
        ),
    })
}

/// The splits of a file-per-split source over `files` (in name order): split `i` is file `i`,
/// keyed by its name. Two names alike once made UTF-8 would share one restored offset: refused.
fn file_splits(files: &[PathBuf]) -> Result<Vec<SplitOffset>, SourceError> {
    let mut seen = HashSet::with_capacity(files.len());
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let key = file_key(f);
            if !seen.insert(key.clone()) {
                return Err(SourceError::deterministic(format!("{}: another file has the same name once made UTF-8: rename one", f.display())));
            }
            Ok(SplitOffset { split: i as u64, offset: 0, path: Some(key) })
        })
        .collect()
}

/// A file's key in checkpoints: its name (the sources list one directory, not a tree).
fn file_key(file: &Path) -> String {
    file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The files of `splits` among `files`: by path where the split has one, else by position (a
/// split built without [`Source::splits`]).
fn files_of_splits(files: &[PathBuf], splits: Vec<SplitOffset>, root: Option<&Path>) -> Result<Vec<(SplitOffset, PathBuf)>, SourceError> {
    let by_key: HashMap<String, &PathBuf> = files.iter().map(|f| (file_key(f), f)).collect();
    splits
        .into_iter()
        .map(|s| {
            let file = match &s.path {
                // Gone since `splits` listed it: a restart lists again (and a restore then names
                // it as gone for good).
                Some(p) => by_key.get(p).map(|f| (*f).clone()).ok_or_else(|| {
                    SourceError::transient(format!("{}: gone since the directory was listed", root.unwrap_or(Path::new("")).join(p).display()))
                })?,
                None => file_of_split(files, s.split, root.unwrap_or(Path::new("")))?,
            };
            Ok((s, file))
        })
        .collect()
}

/// A source over a vector (one split): for tests and examples.
pub struct VecSource<T> {
    data: Arc<Vec<T>>,
}

impl<T> VecSource<T> {
    /// A source emitting `data` in order.
    pub fn new(data: Vec<T>) -> Self {
        Self { data: Arc::new(data) }
    }
}

struct VecReader<T> {
    data: Arc<Vec<T>>,
    pos: Option<usize>,
}

impl<T: Clone + 'static> Source<T> for VecSource<T> {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok(vec![SplitOffset::new(0, 0)])
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<T>>, SourceError> {
        Ok(Box::new(VecReader { data: self.data.clone(), pos: splits.first().map(|s| s.offset as usize) }))
    }
}

impl<T: Clone> SourceReader<T> for VecReader<T> {
    fn poll(&mut self, out: &mut Vec<T>, max: usize) -> Result<Poll, SourceError> {
        let Some(pos) = self.pos.as_mut() else { return Ok(Poll::Finished) };
        // Restored past the end (a shorter vector): nothing is left; the offset stays as it was.
        if *pos >= self.data.len() {
            return Ok(Poll::Finished);
        }
        let end = (*pos + max).min(self.data.len());
        out.extend_from_slice(&self.data[*pos..end]);
        *pos = end;
        Ok(if end == self.data.len() { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.pos.map(|p| SplitOffset::new(0, p as u64)).into_iter().collect()
    }
}

#[inline]
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The seeded generator: rows `(key, value)` with `key` uniform over `0..keys` and `value` in
/// `1..=100`. Record `i` of split `j` is a pure function of `(seed, j, i)`, so a restore seeks in
/// O(1). Each key belongs to one split, so each key's updates have one order in every run, at
/// every parallelism: the output of a keyed running aggregate is deterministic.
#[derive(Clone, Debug)]
pub struct GeneratorSource {
    /// Records in all.
    pub count: u64,
    /// Distinct keys.
    pub keys: u64,
    /// Seed.
    pub seed: u64,
    /// Records per second over all instances; `None` = as fast as possible.
    pub rate: Option<f64>,
}

impl GeneratorSource {
    fn num_splits(&self) -> u64 {
        self.keys.clamp(1, 128)
    }

    /// Records in split `j`.
    pub fn split_len(&self, j: u64) -> u64 {
        let s = self.num_splits();
        self.count / s + u64::from(j < self.count % s)
    }

    /// Record `i` of split `j`.
    #[inline]
    pub fn record(&self, j: u64, i: u64) -> (i64, i64) {
        let s = self.num_splits();
        let keys_j = (self.keys.max(1) - j).div_ceil(s);
        let h = splitmix64(self.seed.wrapping_mul(0xA24B_AED4_963E_E407) ^ (j << 40) ^ i);
        let key = j + s * (h % keys_j);
        let value = (splitmix64(h) % 100) as i64 + 1;
        (key as i64, value)
    }
}

struct GeneratorReader {
    gen: GeneratorSource,
    splits: Vec<(u64, u64, u64)>, // (split, offset, len)
    cur: usize,
    rate: Option<f64>,
    start: Instant,
    emitted: u64,
}

impl Source<Row> for GeneratorSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok((0..self.num_splits()).map(|j| SplitOffset::new(j, 0)).collect())
    }
    fn open(&self, ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        if self.keys == 0 {
            return Err(SourceError::deterministic("source.keys: must be at least 1"));
        }
        Ok(Box::new(GeneratorReader {
            splits: splits.iter().map(|s| (s.split, s.offset, self.split_len(s.split))).collect(),
            gen: self.clone(),
            cur: 0,
            rate: self.rate.map(|r| r / ctx.parallelism as f64),
            start: Instant::now(),
            emitted: 0,
        }))
    }
}

impl SourceReader<Row> for GeneratorReader {
    fn poll(&mut self, out: &mut Vec<Row>, mut max: usize) -> Result<Poll, SourceError> {
        if let Some(rate) = self.rate {
            let allowed = (self.start.elapsed().as_secs_f64() * rate) as u64;
            max = max.min(allowed.saturating_sub(self.emitted) as usize);
            if max == 0 {
                return Ok(Poll::Idle);
            }
        }
        let n = self.splits.len();
        let mut visited = 0;
        while max > 0 && visited < n {
            let (split, off, len) = &mut self.splits[self.cur];
            // A restore with a smaller `count` puts the offset past the end: nothing is left.
            let take = len.saturating_sub(*off).min(max as u64);
            for i in *off..*off + take {
                let (k, v) = self.gen.record(*split, i);
                out.push(Row::new([Value::Int(k), Value::Int(v)]));
            }
            *off += take;
            max -= take as usize;
            self.emitted += take;
            self.cur = (self.cur + 1) % n;
            visited = if take == 0 { visited + 1 } else { 0 };
        }
        let done = self.splits.iter().all(|(_, o, l)| o >= l);
        Ok(if done { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|&(split, offset, _)| SplitOffset::new(split, offset)).collect()
    }
}

/// How a file source reads lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// Each line is a row of one string field.
    Lines,
    /// Each line is a JSON object; the listed fields become the row.
    JsonLines(Vec<String>),
}

/// A replayable file source: one split per file (a file, or the files of a directory in name
/// order), identified in checkpoints by the file's name; the offset is the byte position after
/// the last line emitted. A restore resumes each file at its own offset and reads files added
/// since from their start; a restored file that is gone fails the job, naming it.
///
/// Malformed input (bad UTF-8, a line over `weir.source.max-line-bytes`, a line that is not a
/// JSON object, a non-number where [`FileSource::require_number`] asks for one) is a
/// deterministic error naming `file:line`; I/O errors are transient.
#[derive(Clone, Debug)]
pub struct FileSource {
    path: PathBuf,
    format: FileFormat,
    numbers: Vec<(usize, String)>,
}

impl FileSource {
    /// A source over `path` (a file or a directory).
    pub fn new(path: impl Into<PathBuf>, format: FileFormat) -> Self {
        Self { path: path.into(), format, numbers: Vec::new() }
    }

    /// Field `field` of every row must be a number or null: anything else fails the job at
    /// its `file:line`, the message ending with `why` (e.g. the step that sums the field).
    pub fn require_number(mut self, field: usize, why: impl Into<String>) -> Self {
        self.numbers.push((field, why.into()));
        self
    }

    fn files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let meta = std::fs::metadata(&self.path)
            .map_err(|e| SourceError::transient(format!("source.path {}: {e}", self.path.display())))?;
        if meta.is_file() {
            return Ok(vec![self.path.clone()]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .map_err(|e| SourceError::transient(format!("source.path {}: {e}", self.path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        files.sort();
        Ok(files)
    }
}

struct OpenSplit {
    split: u64,
    /// The split's key in checkpoints (the file's name).
    key: Option<String>,
    path: PathBuf,
    offset: u64,
    reader: Option<BufReader<File>>,
    done: bool,
}

impl OpenSplit {
    /// `file:line` of the line that starts at the current offset (counted only for a message).
    fn at(&self) -> String {
        format!("{}:{}", self.path.display(), line_number(&self.path, self.offset))
    }
}

struct FileReader {
    source: FileSource,
    splits: Vec<OpenSplit>,
    cur: usize,
    line: Vec<u8>,
    max_line_bytes: u64,
}

impl Source<Row> for FileSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        file_splits(&self.files()?)
    }
    fn open(&self, ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        let splits = files_of_splits(&self.files()?, splits, self.root())?
            .into_iter()
            .map(|(s, path)| OpenSplit { split: s.split, key: s.path, path, offset: s.offset, reader: None, done: false })
            .collect();
        Ok(Box::new(FileReader { source: self.clone(), splits, cur: 0, line: Vec::new(), max_line_bytes: ctx.max_line_bytes }))
    }
    fn root(&self) -> Option<&Path> {
        // A single file's key is its name: relative to its directory.
        if self.path.is_dir() { Some(&self.path) } else { self.path.parent() }
    }
}

/// The file of a split of a file-per-split source: a split restored from a checkpoint whose
/// file is gone is an error, not a silent skip.
fn file_of_split(files: &[PathBuf], split: u64, dir: &Path) -> Result<PathBuf, SourceError> {
    // A restart restores the same checkpoint: it cannot fix this.
    files
        .get(split as usize)
        .cloned()
        .ok_or_else(|| SourceError::deterministic(format!("split {split} has no file in {}", dir.display())))
}

/// The 1-based line number of the line that starts at `offset` in `path`.
fn line_number(path: &PathBuf, offset: u64) -> u64 {
    let mut n = 1;
    if let Ok(f) = File::open(path) {
        let mut buf = Vec::new();
        if f.take(offset).read_to_end(&mut buf).is_ok() {
            n += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    n
}

fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Int(*b as i64),
        serde_json::Value::Number(n) => n.as_i64().map(Value::Int).unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN))),
        serde_json::Value::String(s) => Value::text(s.as_str()),
        serde_json::Value::Array(a) if a.iter().all(|v| v.is_number()) => {
            Value::Vector(Arc::new(a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect()))
        }
        other => Value::text(other.to_string()),
    }
}

impl SourceReader<Row> for FileReader {
    fn poll(&mut self, out: &mut Vec<Row>, max: usize) -> Result<Poll, SourceError> {
        let mut produced = 0;
        while produced < max {
            let Some(idx) = (0..self.splits.len()).map(|i| (self.cur + i) % self.splits.len()).find(|&i| !self.splits[i].done)
            else {
                return Ok(Poll::Finished);
            };
            self.cur = idx;
            let s = &mut self.splits[idx];
            if s.reader.is_none() {
                let mut f = File::open(&s.path).map_err(|e| SourceError::transient(format!("{}: {e}", s.path.display())))?;
                f.seek(SeekFrom::Start(s.offset)).map_err(|e| SourceError::transient(format!("{}: {e}", s.path.display())))?;
                s.reader = Some(BufReader::with_capacity(1 << 16, f));
            }
            let reader = s.reader.as_mut().expect("opened");
            self.line.clear();
            // One byte over the limit tells a line of exactly the limit from a longer one,
            // without reading a runaway line into memory.
            let n = Read::take(&mut *reader, self.max_line_bytes.saturating_add(1))
                .read_until(b'\n', &mut self.line)
                .map_err(|e| SourceError::transient(format!("{}: {e}", s.at())))?;
            if n == 0 {
                s.done = true;
                s.reader = None;
                continue;
            }
            if self.line.last() != Some(&b'\n') && n as u64 > self.max_line_bytes {
                return Err(SourceError::deterministic(format!(
                    "{}: line longer than weir.source.max-line-bytes ({} bytes)",
                    s.at(),
                    self.max_line_bytes
                )));
            }
            let text = std::str::from_utf8(&self.line)
                .map_err(|e| SourceError::deterministic(format!("{}: not UTF-8 (at byte {} of the line)", s.at(), e.valid_up_to() + 1)))?
                .trim_end_matches(['\n', '\r']);
            let row = match &self.source.format {
                FileFormat::Lines => Row::new([Value::text(text)]),
                FileFormat::JsonLines(fields) => {
                    if text.trim().is_empty() {
                        s.offset += n as u64;
                        continue;
                    }
                    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                        .map_err(|e| SourceError::deterministic(format!("{}: not a JSON object: {e}", s.at())))?;
                    Row::new(fields.iter().map(|f| obj.get(f).map(json_to_value).unwrap_or(Value::Null)))
                }
            };
            for (field, why) in &self.source.numbers {
                let v = row.get(*field);
                if !matches!(v, Value::Int(_) | Value::Float(_) | Value::Null) {
                    let name = match &self.source.format {
                        FileFormat::JsonLines(fields) => fields.get(*field).map(String::as_str).unwrap_or("?"),
                        FileFormat::Lines => "line",
                    };
                    return Err(SourceError::deterministic(format!(
                        "{}: field '{name}' is a {} ({}), not a number: {why}",
                        s.at(),
                        v.type_name(),
                        abbreviate(&v.to_string())
                    )));
                }
            }
            out.push(row);
            s.offset += n as u64;
            produced += 1;
        }
        Ok(Poll::More)
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|s| SplitOffset { split: s.split, offset: s.offset, path: s.key.clone() }).collect()
    }
}

/// A value for an error message: quoted, at most 40 characters.
pub(crate) fn abbreviate(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((end, _)) => format!("{:?}…", &text[..end]),
        None => format!("{text:?}"),
    }
}

/// Seeded Gaussian blobs: rows `(key, point)` where `point` is a `dim`-vector drawn from one of
/// `centers` isotropic Gaussians (standard deviation `sigma`) whose centres are uniform in
/// `[-10, 10]^dim`; each key has its own centres. Record `i` of split `j` is a pure function of
/// `(seed, j, i)`, so restores seek in O(1).
#[derive(Clone, Debug)]
pub struct BlobSource {
    /// Points in all.
    pub count: u64,
    /// Gaussians per key.
    pub centers: usize,
    /// Dimensions.
    pub dim: usize,
    /// Standard deviation.
    pub sigma: f32,
    /// Independent streams (keys).
    pub keys: u64,
    /// Seed.
    pub seed: u64,
}

const BLOB_SPLITS: u64 = 16;

fn unit(h: u64) -> f32 {
    ((h >> 40) as f32 + 0.5) / (1u64 << 24) as f32
}

impl BlobSource {
    /// Centre `c` of key `key`.
    pub fn center(&self, key: u64, c: usize) -> Vec<f32> {
        (0..self.dim)
            .map(|j| unit(splitmix64(self.seed ^ 0xC3A5_C85C_97CB_3127 ^ (key << 32) ^ ((c as u64) << 16) ^ j as u64)) * 20.0 - 10.0)
            .collect()
    }

    fn split_len(&self, j: u64) -> u64 {
        self.count / BLOB_SPLITS + u64::from(j < self.count % BLOB_SPLITS)
    }

    fn record(&self, j: u64, i: u64) -> Row {
        let h = splitmix64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (j << 44) ^ i);
        let key = h % self.keys.max(1);
        let c = (splitmix64(h) % self.centers.max(1) as u64) as usize;
        let center = self.center(key, c);
        let mut x = h;
        let point: Vec<f32> = center
            .iter()
            .map(|m| {
                x = splitmix64(x);
                let (u1, u2) = (unit(x), unit(splitmix64(x ^ 0x5555)));
                // Box–Muller
                m + self.sigma * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        Row::new([Value::Int(key as i64), Value::Vector(Arc::new(point))])
    }
}

struct BlobReader {
    gen: BlobSource,
    splits: Vec<(u64, u64, u64)>,
    cur: usize,
}

impl Source<Row> for BlobSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok((0..BLOB_SPLITS).map(|j| SplitOffset::new(j, 0)).collect())
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        if self.dim == 0 || self.centers == 0 {
            return Err(SourceError::deterministic("source.dim and source.centers must be at least 1"));
        }
        Ok(Box::new(BlobReader {
            splits: splits.iter().map(|s| (s.split, s.offset, self.split_len(s.split))).collect(),
            gen: self.clone(),
            cur: 0,
        }))
    }
}

impl SourceReader<Row> for BlobReader {
    fn poll(&mut self, out: &mut Vec<Row>, mut max: usize) -> Result<Poll, SourceError> {
        let n = self.splits.len();
        let mut idle = 0;
        while max > 0 && idle < n {
            let (split, off, len) = &mut self.splits[self.cur];
            let take = len.saturating_sub(*off).min(max as u64);
            out.extend((*off..*off + take).map(|i| self.gen.record(*split, i)));
            *off += take;
            max -= take as usize;
            self.cur = (self.cur + 1) % n;
            idle = if take == 0 { idle + 1 } else { 0 };
        }
        Ok(if self.splits.iter().all(|(_, o, l)| o >= l) { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|&(split, offset, _)| SplitOffset::new(split, offset)).collect()
    }
}

/// Images (PNG, JPEG) of a directory, one row `(name, image)` each, in name order; one split per
/// file, identified by its name as in [`FileSource`], so a restore skips the images already read.
#[derive(Clone, Debug)]
pub struct ImageSource {
    dir: PathBuf,
}

impl ImageSource {
    /// The images in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| SourceError::transient(format!("source.path {}: {e}", self.dir.display())))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
            })
            .collect();
        files.sort();
        Ok(files)
    }
}

struct ImageReader {
    /// (split with its key, file, read); the split's offset is 1 once read.
    files: Vec<(SplitOffset, PathBuf, bool)>,
}

impl Source<Row> for ImageSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        file_splits(&self.files()?)
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        let files = files_of_splits(&self.files()?, splits, self.root())?.into_iter().map(|(s, f)| {
            let done = s.offset > 0;
            (s, f, done)
        });
        Ok(Box::new(ImageReader { files: files.collect() }))
    }
    fn root(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}

impl SourceReader<Row> for ImageReader {
    fn poll(&mut self, out: &mut Vec<Row>, max: usize) -> Result<Poll, SourceError> {
        // Images are large: one per poll keeps a batch's memory bounded.
        if let Some((_, path, done)) = self.files.iter_mut().find(|f| !f.2).filter(|_| max > 0) {
            let img = image::ImageReader::open(&*path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| SourceError::transient(format!("{}: {e}", path.display())))?
                .decode()
                .map_err(|e| match e {
                    image::ImageError::IoError(e) => SourceError::transient(format!("{}: {e}", path.display())),
                    e => SourceError::deterministic(format!("{}: not a readable image: {e}", path.display())),
                })?
                .to_rgb8();
            let (w, h) = (img.width() as usize, img.height() as usize);
            let img = weir_gpu::kernels::Image::from_rgb8(w, h, img.as_raw()).map_err(|e| SourceError::deterministic(format!("{}: {e}", path.display())))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(Row::new([Value::text(name), Value::Image(Arc::new(img))]));
            *done = true;
        }
        Ok(if self.files.iter().all(|f| f.2) { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.files.iter().map(|(s, _, done)| SplitOffset { offset: u64::from(*done), ..s.clone() }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: SourceContext = SourceContext { subtask: 0, parallelism: 1, max_line_bytes: 64 };

    fn drain(r: &mut dyn SourceReader<Row>) -> Result<Vec<Row>, SourceError> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            if r.poll(&mut out, 7)? == Poll::Finished {
                return Ok(out);
            }
        }
        panic!("no end after 1000 polls ({} rows)", out.len());
    }

    fn all_splits<S: Source<Row>>(s: &S, offset: u64) -> Vec<SplitOffset> {
        s.splits().unwrap().into_iter().map(|s| SplitOffset { offset, ..s }).collect()
    }

    /// Restored with a smaller `count` than it ran with: the offsets lie past the new bound,
    /// nothing is left, and the offsets stay where they were (a later restore with the larger
    /// count resumes there instead of replaying).
    #[test]
    fn bounded_sources_restored_past_their_bound_finish_at_once() {
        let gen = GeneratorSource { count: 100, keys: 10, seed: 1, rate: None };
        let mut r = gen.open(&CTX, all_splits(&gen, 50)).unwrap();
        assert!(drain(&mut *r).unwrap().is_empty());
        assert!(r.offsets().iter().all(|o| o.offset == 50));
        let blobs = BlobSource { count: 100, centers: 2, dim: 2, sigma: 1.0, keys: 2, seed: 1 };
        let mut r = blobs.open(&CTX, all_splits(&blobs, 50)).unwrap();
        assert!(drain(&mut *r).unwrap().is_empty());
        let v = VecSource::new(vec![Row::default(); 3]);
        let mut r = v.open(&CTX, all_splits(&v, 10)).unwrap();
        assert!(drain(&mut *r).unwrap().is_empty());
        // Partly consumed splits still yield the rest.
        let mut r = gen.open(&CTX, all_splits(&gen, 5)).unwrap();
        assert_eq!(drain(&mut *r).unwrap().len(), 50);
        // A file restored at or past its end (a shorter file) has nothing left.
        let path = std::env::temp_dir().join(format!("weir-source-bound-{}", std::process::id()));
        std::fs::write(&path, "a\nb\n").unwrap();
        let file = FileSource::new(&path, FileFormat::Lines);
        for offset in [4, 1000] {
            let mut r = file.open(&CTX, all_splits(&file, offset)).unwrap();
            assert!(drain(&mut *r).unwrap().is_empty());
        }
        std::fs::remove_file(&path).unwrap();
    }

    fn read_file(bytes: &[u8], format: FileFormat) -> Result<Vec<Row>, SourceError> {
        let dir = std::env::temp_dir().join(format!("weir-source-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.txt");
        std::fs::write(&path, bytes).unwrap();
        let src = FileSource::new(&path, format).require_number(1, "the sum needs it");
        let result = src.open(&CTX, all_splits(&src, 0)).and_then(|mut r| drain(&mut *r));
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    #[test]
    fn malformed_input_is_deterministic_and_names_file_and_line() {
        let json = || FileFormat::JsonLines(vec!["k".into(), "v".into()]);
        let cases: [(&[u8], &str); 4] = [
            (b"{\"k\": 1, \"v\": 2}\n{\"k\": 1, \"v\": \n", "in.txt:2: not a JSON object"),
            (b"{\"k\": 1, \"v\": 2}\n\n{\"k\": \"\xff\", \"v\": 2}\n", "in.txt:3: not UTF-8"),
            (b"{\"k\": 1, \"v\": \"7\"}\n", "in.txt:1: field 'v' is a string (\"7\"), not a number: the sum needs it"),
            (&[b'x'; 65], "in.txt:1: line longer than weir.source.max-line-bytes (64 bytes)"),
        ];
        for (bytes, want) in cases {
            let e = read_file(bytes, json()).unwrap_err();
            assert!(e.is_deterministic() && e.to_string().contains(want), "{e}");
        }
        // At the limit, with or without a newline, and null or missing numbers, are fine.
        let line = [b'x'; 64];
        assert_eq!(read_file(&[&line[..], b"\n", &line[..]].concat(), FileFormat::Lines).unwrap().len(), 2);
        let rows = read_file(b"{\"k\": 1, \"v\": null}\n{\"k\": 2}\n{\"k\": 3, \"v\": 1.5}", json()).unwrap();
        assert_eq!(rows.len(), 3);
    }

    /// A directory of files named `names`, each holding `lines` lines.
    fn dir_of(tag: &str, names: &[&str], lines: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-source-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in names {
            std::fs::write(dir.join(n), (0..lines).map(|i| format!("{n}:{i}\n")).collect::<String>()).unwrap();
        }
        dir
    }

    fn ctx(subtask: u32, parallelism: u32) -> SourceContext {
        SourceContext { subtask, parallelism, ..CTX }
    }

    /// Restored offsets follow the file, not its place in the listing: a file added in front
    /// starts at 0, at any parallelism, and every split goes to exactly one subtask.
    #[test]
    fn file_splits_are_matched_by_path() {
        let dir = dir_of("by-path", &["b", "c"], 3);
        let src = FileSource::new(&dir, FileFormat::Lines);
        let mut r = src.open(&CTX, assign_splits(&src, &CTX, &[]).unwrap()).unwrap();
        let mut out = Vec::new();
        r.poll(&mut out, 4).unwrap(); // b read, c one line in
        let restored = r.offsets();
        assert_eq!(restored.iter().map(|s| s.path.as_deref().unwrap()).collect::<Vec<_>>(), ["b", "c"]);
        // The checkpoint's JSON carries the path; a split without one carries none.
        let json = serde_json::to_string(&restored[1]).unwrap();
        assert_eq!(json, r#"{"split":1,"offset":4,"path":"c"}"#);
        assert_eq!(serde_json::to_string(&SplitOffset::new(3, 4)).unwrap(), r#"{"split":3,"offset":4,"path":null}"#);
        // Positional formats (timely's bincode between processes) read it back too.
        for s in [restored[1].clone(), SplitOffset::new(3, 4)] {
            assert_eq!(postcard::from_bytes::<SplitOffset>(&postcard::to_allocvec(&s).unwrap()).unwrap(), s);
        }
        std::fs::write(dir.join("a"), "a:0\n").unwrap();
        for parallelism in [1, 2, 3] {
            let mut mine: Vec<SplitOffset> =
                (0..parallelism).flat_map(|i| assign_splits(&src, &ctx(i, parallelism), &restored).unwrap()).collect();
            mine.sort_by(|x, y| x.path.cmp(&y.path));
            let got: Vec<(&str, u64)> = mine.iter().map(|s| (s.path.as_deref().unwrap(), s.offset)).collect();
            assert_eq!(got, [("a", 0), ("b", 12), ("c", 4)]);
        }
        let rest: Vec<String> = (0..2)
            .flat_map(|i| {
                let c = ctx(i, 2);
                let mut r = src.open(&c, assign_splits(&src, &c, &restored).unwrap()).unwrap();
                drain(&mut *r).unwrap()
            })
            .map(|row| row.get(0).to_string())
            .collect();
        assert_eq!(rest.len(), 3, "{rest:?}");
        for line in ["a:0", "c:1", "c:2"] {
            assert!(rest.iter().any(|l| l.contains(line)), "{line} not in {rest:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A restored file that is gone fails every subtask, deterministically, naming the file.
    #[test]
    fn a_restored_file_that_is_gone_is_a_deterministic_error() {
        let dir = dir_of("gone", &["b", "c", "d"], 1);
        let src = FileSource::new(&dir, FileFormat::Lines);
        let restored = all_splits(&src, 1);
        std::fs::remove_file(dir.join("c")).unwrap();
        for i in 0..2 {
            let e = assign_splits(&src, &ctx(i, 2), &restored).unwrap_err();
            assert!(e.is_deterministic(), "{e}");
            assert!(e.to_string().starts_with(&format!("file {} is gone", dir.join("c").display())), "{e}");
        }
        std::fs::remove_file(dir.join("d")).unwrap();
        let e = assign_splits(&src, &CTX, &restored).unwrap_err();
        assert!(e.to_string().contains(&format!("{}, {} are gone", dir.join("c").display(), dir.join("d").display())), "{e}");
        // Gone between listing and opening: a restart lists again.
        let e = src.open(&CTX, restored[1..2].to_vec()).err().unwrap();
        assert!(!e.is_deterministic() && e.to_string().contains("gone since the directory was listed"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The image source has one split per file too: an image added in front is read, the
    /// ones read before the checkpoint are not read again.
    #[test]
    fn image_splits_are_matched_by_path() {
        let dir = dir_of("images", &[], 0);
        for n in ["b.png", "c.png"] {
            image::RgbImage::new(2, 2).save(dir.join(n)).unwrap();
        }
        let src = ImageSource::new(&dir);
        let mut r = src.open(&CTX, assign_splits(&src, &CTX, &[]).unwrap()).unwrap();
        r.poll(&mut Vec::new(), 1).unwrap(); // b.png read
        let restored = r.offsets();
        image::RgbImage::new(2, 2).save(dir.join("a.png")).unwrap();
        let mut r = src.open(&CTX, assign_splits(&src, &CTX, &restored).unwrap()).unwrap();
        let names: Vec<String> = drain(&mut *r).unwrap().iter().map(|row| row.get(0).to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].contains("a.png") && names[1].contains("c.png"), "{names:?}");
        std::fs::remove_file(dir.join("b.png")).unwrap();
        let e = assign_splits(&src, &CTX, &restored).unwrap_err();
        assert!(e.is_deterministic() && e.to_string().contains(&format!("file {} is gone", dir.join("b.png").display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Checkpoints written before paths were recorded still restore by split id, as before.
    #[test]
    fn checkpoints_without_paths_restore_by_id() {
        let dir = dir_of("legacy", &["b", "c"], 2);
        let src = FileSource::new(&dir, FileFormat::Lines);
        let legacy: Vec<SplitOffset> = serde_json::from_str(r#"[{"split":0,"offset":4},{"split":1,"offset":2}]"#).unwrap();
        let mine = assign_splits(&src, &CTX, &legacy).unwrap();
        let got: Vec<(&str, u64)> = mine.iter().map(|s| (s.path.as_deref().unwrap(), s.offset)).collect();
        assert_eq!(got, [("b", 4), ("c", 2)]);
        // Non-file sources have no paths and match by id.
        let gen = GeneratorSource { count: 100, keys: 4, seed: 1, rate: None };
        let mine = assign_splits(&gen, &ctx(1, 2), &[SplitOffset::new(1, 7), SplitOffset::new(3, 9)]).unwrap();
        assert_eq!(mine, [SplitOffset::new(1, 7), SplitOffset::new(3, 9)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn io_errors_are_transient() {
        let src = FileSource::new("/nonexistent/weir-input", FileFormat::Lines);
        assert!(!src.splits().unwrap_err().is_deterministic());
    }
}

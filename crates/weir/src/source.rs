//! Replayable sources. A source is a set of splits, each with an offset that checkpoints record;
//! splits are spread over the workers (split `i` to worker `i mod parallelism`), so a source
//! restores at any parallelism.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
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

/// A source failed; the message names the file and line, or the setting, at fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Where a source instance runs.
#[derive(Debug, Clone, Copy)]
pub struct SourceContext {
    /// This instance.
    pub subtask: u32,
    /// Instances in all.
    pub parallelism: u32,
}

/// A replayable source.
pub trait Source<T>: 'static {
    /// All split ids (the same on every worker).
    fn splits(&self) -> Result<Vec<u64>, SourceError>;
    /// A reader over `splits`, each starting at its offset.
    fn open(&self, ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<T>>, SourceError>;
}

/// One source instance's reader.
pub trait SourceReader<T> {
    /// Append at most `max` records to `out`.
    fn poll(&mut self, out: &mut Vec<T>, max: usize) -> Result<Poll, SourceError>;
    /// The current offsets of this reader's splits.
    fn offsets(&self) -> Vec<SplitOffset>;
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
    fn splits(&self) -> Result<Vec<u64>, SourceError> {
        Ok(vec![0])
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<T>>, SourceError> {
        Ok(Box::new(VecReader { data: self.data.clone(), pos: splits.first().map(|s| s.offset as usize) }))
    }
}

impl<T: Clone> SourceReader<T> for VecReader<T> {
    fn poll(&mut self, out: &mut Vec<T>, max: usize) -> Result<Poll, SourceError> {
        let Some(pos) = self.pos.as_mut() else { return Ok(Poll::Finished) };
        let end = (*pos + max).min(self.data.len());
        out.extend_from_slice(&self.data[*pos..end]);
        *pos = end;
        Ok(if end == self.data.len() { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.pos.map(|p| SplitOffset { split: 0, offset: p as u64 }).into_iter().collect()
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
    fn splits(&self) -> Result<Vec<u64>, SourceError> {
        Ok((0..self.num_splits()).collect())
    }
    fn open(&self, ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        if self.keys == 0 {
            return Err(SourceError("source.keys: must be at least 1".into()));
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
            let take = (*len - *off).min(max as u64);
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
        let done = self.splits.iter().all(|(_, o, l)| o == l);
        Ok(if done { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|&(split, offset, _)| SplitOffset { split, offset }).collect()
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
/// order); the offset is the byte position after the last line emitted.
#[derive(Clone, Debug)]
pub struct FileSource {
    path: PathBuf,
    format: FileFormat,
}

impl FileSource {
    /// A source over `path` (a file or a directory).
    pub fn new(path: impl Into<PathBuf>, format: FileFormat) -> Self {
        Self { path: path.into(), format }
    }

    fn files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let meta = std::fs::metadata(&self.path)
            .map_err(|e| SourceError(format!("source.path {}: {e}", self.path.display())))?;
        if meta.is_file() {
            return Ok(vec![self.path.clone()]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .map_err(|e| SourceError(format!("source.path {}: {e}", self.path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        files.sort();
        Ok(files)
    }
}

struct OpenSplit {
    split: u64,
    path: PathBuf,
    offset: u64,
    reader: Option<BufReader<File>>,
    done: bool,
}

struct FileReader {
    format: FileFormat,
    splits: Vec<OpenSplit>,
    cur: usize,
    line: String,
}

impl Source<Row> for FileSource {
    fn splits(&self) -> Result<Vec<u64>, SourceError> {
        Ok((0..self.files()?.len() as u64).collect())
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        let files = self.files()?;
        let splits = splits
            .into_iter()
            .map(|s| {
                let path = file_of_split(&files, s.split, &self.path)?;
                Ok(OpenSplit { split: s.split, path, offset: s.offset, reader: None, done: false })
            })
            .collect::<Result<Vec<_>, SourceError>>()?;
        Ok(Box::new(FileReader { format: self.format.clone(), splits, cur: 0, line: String::new() }))
    }
}

/// The file of a split of a file-per-split source: a split restored from a checkpoint whose
/// file is gone is an error, not a silent skip.
fn file_of_split(files: &[PathBuf], split: u64, dir: &std::path::Path) -> Result<PathBuf, SourceError> {
    files.get(split as usize).cloned().ok_or_else(|| SourceError(format!("split {split} has no file in {}", dir.display())))
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
                let mut f = File::open(&s.path).map_err(|e| SourceError(format!("{}: {e}", s.path.display())))?;
                f.seek(SeekFrom::Start(s.offset)).map_err(|e| SourceError(format!("{}: {e}", s.path.display())))?;
                s.reader = Some(BufReader::with_capacity(1 << 16, f));
            }
            let reader = s.reader.as_mut().expect("opened");
            self.line.clear();
            let n = reader
                .read_line(&mut self.line)
                .map_err(|e| SourceError(format!("{} line {}: {e}", s.path.display(), line_number(&s.path, s.offset))))?;
            if n == 0 {
                s.done = true;
                s.reader = None;
                continue;
            }
            let text = self.line.trim_end_matches(['\n', '\r']);
            let row = match &self.format {
                FileFormat::Lines => Row::new([Value::text(text)]),
                FileFormat::JsonLines(fields) => {
                    if text.trim().is_empty() {
                        s.offset += n as u64;
                        continue;
                    }
                    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).map_err(|e| {
                        SourceError(format!(
                            "{} line {}: not a JSON object: {e}",
                            s.path.display(),
                            line_number(&s.path, s.offset)
                        ))
                    })?;
                    Row::new(fields.iter().map(|f| obj.get(f).map(json_to_value).unwrap_or(Value::Null)))
                }
            };
            out.push(row);
            s.offset += n as u64;
            produced += 1;
        }
        Ok(Poll::More)
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|s| SplitOffset { split: s.split, offset: s.offset }).collect()
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
    fn splits(&self) -> Result<Vec<u64>, SourceError> {
        Ok((0..BLOB_SPLITS).collect())
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        if self.dim == 0 || self.centers == 0 {
            return Err(SourceError("source.dim and source.centers must be at least 1".into()));
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
            let take = (*len - *off).min(max as u64);
            out.extend((*off..*off + take).map(|i| self.gen.record(*split, i)));
            *off += take;
            max -= take as usize;
            self.cur = (self.cur + 1) % n;
            idle = if take == 0 { idle + 1 } else { 0 };
        }
        Ok(if self.splits.iter().all(|(_, o, l)| o == l) { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|&(split, offset, _)| SplitOffset { split, offset }).collect()
    }
}

/// Images (PNG, JPEG) of a directory, one row `(name, image)` each, in name order; one split per
/// file, so a restore skips the images already read.
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
        let rd = std::fs::read_dir(&self.dir).map_err(|e| SourceError(format!("source.path {}: {e}", self.dir.display())))?;
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
    files: Vec<(u64, PathBuf, bool)>,
}

impl Source<Row> for ImageSource {
    fn splits(&self) -> Result<Vec<u64>, SourceError> {
        Ok((0..self.files()?.len() as u64).collect())
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        let all = self.files()?;
        let files = splits
            .iter()
            .map(|s| {
                Ok((s.split, file_of_split(&all, s.split, &self.dir)?, s.offset > 0))
            })
            .collect::<Result<_, SourceError>>()?;
        Ok(Box::new(ImageReader { files }))
    }
}

impl SourceReader<Row> for ImageReader {
    fn poll(&mut self, out: &mut Vec<Row>, max: usize) -> Result<Poll, SourceError> {
        // Images are large: one per poll keeps a batch's memory bounded.
        if let Some((_, path, done)) = self.files.iter_mut().find(|f| !f.2).filter(|_| max > 0) {
            let img = image::ImageReader::open(&*path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| SourceError(format!("{}: {e}", path.display())))?
                .decode()
                .map_err(|e| SourceError(format!("{}: not a readable image: {e}", path.display())))?
                .to_rgb8();
            let (w, h) = (img.width() as usize, img.height() as usize);
            let img = weir_gpu::kernels::Image::from_rgb8(w, h, img.as_raw()).map_err(|e| SourceError(e.to_string()))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(Row::new([Value::text(name), Value::Image(Arc::new(img))]));
            *done = true;
        }
        Ok(if self.files.iter().all(|f| f.2) { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.files.iter().map(|(split, _, done)| SplitOffset { split: *split, offset: u64::from(*done) }).collect()
    }
}

//! Files: the exactly-once file sink (two-phase commit over renames).
//! Also the replayable file source (lines, JSON lines), one split per file.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use weir_checkpoint::SplitOffset;

use crate::row::{Row, Value};
use crate::sink::{fsync_dir, io_err, refuse_fresh_start_into_used, Sink, SinkContext, SinkError, SinkWriter};
use crate::source::*;

/// Formats one record as bytes (a line, with its newline).
pub type Formatter<T> = Rc<dyn Fn(&T, &mut Vec<u8>)>;

/// An exactly-once file sink (two-phase commit over renames).
///
/// Instance `s` writes epoch `e` into `.part-<s>-<e>.inprogress`; when `e` closes it is flushed,
/// fsynced and renamed `.part-<s>-<e>.pending`; when the checkpoint that closes `e` completes it
/// is renamed `part-<s>-<e>`. Hidden files are never output. On restore from checkpoint `n`,
/// pending files of epochs `<= n` are committed and all other hidden files are deleted; part
/// files of epochs `> n` (committed by a newer checkpoint that was abandoned, e.g. a corrupt
/// one) are withdrawn to `.withdrawn/chk-<e>/`, since the replay produces them again. A fresh
/// start into a directory with committed part files is refused.
pub struct FileSink<T> {
    dir: PathBuf,
    format: Formatter<T>,
}

impl FileSink<Row> {
    /// Rows as CSV lines.
    pub fn csv(dir: impl Into<PathBuf>) -> Self {
        FileSink::new(dir, |r: &Row, out: &mut Vec<u8>| r.write_csv(out))
    }
}

impl<T> FileSink<T> {
    /// A sink into directory `dir`, formatting records with `format`.
    pub fn new(dir: impl Into<PathBuf>, format: impl Fn(&T, &mut Vec<u8>) + 'static) -> Self {
        Self { dir: dir.into(), format: Rc::new(format) }
    }
}

/// `(subtask, epoch, suffix)` of a hidden part file name.
fn parse_hidden(name: &str) -> Option<(u32, u64, &str)> {
    let rest = name.strip_prefix(".part-")?;
    let (stem, suffix) = rest.split_once('.')?;
    let (s, e) = stem.split_once('-')?;
    Some((s.parse().ok()?, e.parse().ok()?, suffix))
}

/// `(subtask, epoch)` of a committed part file name.
fn parse_committed(name: &str) -> Option<(u32, u64)> {
    let (s, e) = name.strip_prefix("part-")?.split_once('-')?;
    Some((s.parse().ok()?, e.parse().ok()?))
}

fn part_name(subtask: u32, epoch: u64) -> String {
    format!("part-{subtask:05}-{epoch:012}")
}

struct FileSinkWriter<T> {
    dir: PathBuf,
    subtask: u32,
    format: Formatter<T>,
    open: Option<(u64, BufWriter<File>, u64)>,
    pending: Vec<u64>,
    buf: Vec<u8>,
}

/// Where withdrawn committed output goes (hidden, so never read as output).
pub const WITHDRAWN: &str = ".withdrawn";

impl<T: 'static> Sink<T> for FileSink<T> {
    fn preflight(&self, ctx: &SinkContext) -> Result<(), SinkError> {
        refuse_fresh_start_into_used(&self.dir, ctx, |n| {
            parse_committed(n).is_some()
                || parse_hidden(n).is_some_and(|(_, e, suffix)| suffix == "pending" && ctx.newest_checkpoint.is_some_and(|c| e <= c))
        })
    }

    fn open(&self, ctx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("create", &self.dir, e))?;
        // Recover the transactions of every earlier instance this one inherits.
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_err("list", &self.dir, e))?;
        let mut withdrawn = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err("list", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((sub, epoch)) = parse_committed(&name) {
                // Output committed by a checkpoint newer than the one restored is produced again
                // by the replay: withdraw it, or it would appear twice. Committed output is never
                // deleted: it moves to .withdrawn/chk-<epoch>/.
                if sub % ctx.parallelism == ctx.subtask && ctx.restored.is_some_and(|n| epoch > n) {
                    let to_dir = self.dir.join(WITHDRAWN).join(format!("chk-{epoch}"));
                    std::fs::create_dir_all(&to_dir).map_err(|e| io_err("create", &to_dir, e))?;
                    // Never replace an earlier withdrawal of the same file.
                    let mut to = to_dir.join(&name);
                    let mut n = 1;
                    while to.exists() {
                        to = to_dir.join(format!("{name}.{n}"));
                        n += 1;
                    }
                    std::fs::rename(entry.path(), &to).map_err(|e| io_err("withdraw", &entry.path(), e))?;
                    fsync_dir(&to_dir)?;
                    fsync_dir(&self.dir.join(WITHDRAWN))?;
                    withdrawn.push(epoch);
                    crate::crash_point!("file-sink-rollback");
                }
                continue;
            }
            let Some((sub, epoch, suffix)) = parse_hidden(&name) else { continue };
            if sub % ctx.parallelism != ctx.subtask {
                continue;
            }
            let path = entry.path();
            if suffix == "pending" && ctx.restored.is_some_and(|n| epoch <= n) {
                let to = self.dir.join(part_name(sub, epoch));
                std::fs::rename(&path, &to).map_err(|e| io_err("commit", &path, e))?;
            } else {
                std::fs::remove_file(&path).map_err(|e| io_err("discard", &path, e))?;
            }
        }
        fsync_dir(&self.dir)?;
        if !withdrawn.is_empty() {
            withdrawn.sort_unstable();
            tracing::warn!(
                "file sink {}: withdrew {} committed file(s) of epochs {}..={} (newer than the restored checkpoint {}) to {}/chk-<epoch>/; the replay writes them again",
                self.dir.display(),
                withdrawn.len(),
                withdrawn[0],
                withdrawn[withdrawn.len() - 1],
                ctx.restored.unwrap_or(0),
                self.dir.join(WITHDRAWN).display()
            );
        }
        Ok(Box::new(FileSinkWriter {
            dir: self.dir.clone(),
            subtask: ctx.subtask,
            format: self.format.clone(),
            open: None,
            pending: Vec::new(),
            buf: Vec::with_capacity(1 << 16),
        }))
    }
}

impl<T> FileSinkWriter<T> {
    fn hidden(&self, epoch: u64, suffix: &str) -> PathBuf {
        self.dir.join(format!(".part-{:05}-{epoch:012}.{suffix}", self.subtask))
    }
}

impl<T> SinkWriter<T> for FileSinkWriter<T> {
    fn write(&mut self, epoch: u64, batch: &mut Vec<T>) -> Result<(), SinkError> {
        if self.open.as_ref().is_some_and(|(e, _, _)| *e != epoch) {
            return Err(SinkError(format!("file sink: epoch {epoch} written before the previous one closed")));
        }
        if self.open.is_none() {
            let path = self.hidden(epoch, "inprogress");
            let f = OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(|e| io_err("create", &path, e))?;
            self.open = Some((epoch, BufWriter::with_capacity(1 << 16, f), 0));
        }
        self.buf.clear();
        for r in batch.drain(..) {
            (self.format)(&r, &mut self.buf);
        }
        let (_, w, bytes) = self.open.as_mut().expect("open");
        w.write_all(&self.buf).map_err(|e| SinkError(format!("file sink: write {}: {e}", self.dir.display())))?;
        *bytes += self.buf.len() as u64;
        Ok(())
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<u64, SinkError> {
        let Some((e, w, bytes)) = self.open.take() else { return Ok(0) };
        debug_assert_eq!(e, epoch);
        let from = self.hidden(e, "inprogress");
        let f = w.into_inner().map_err(|e| io_err("flush", &from, e.into_error()))?;
        f.sync_data().map_err(|e| io_err("fsync", &from, e))?;
        let to = self.hidden(e, "pending");
        std::fs::rename(&from, &to).map_err(|err| io_err("rename", &from, err))?;
        fsync_dir(&self.dir)?;
        self.pending.push(e);
        Ok(bytes)
    }

    fn commit(&mut self, upto: u64) -> Result<(), SinkError> {
        let mut any = false;
        for &e in self.pending.iter().filter(|&&e| e <= upto) {
            // Pre-committed (renamed .pending) but not yet published.
            crate::crash_point!("file-sink-before-publish");
            let from = self.hidden(e, "pending");
            std::fs::rename(&from, self.dir.join(part_name(self.subtask, e))).map_err(|err| io_err("commit", &from, err))?;
            any = true;
        }
        self.pending.retain(|&e| e > upto);
        if any {
            fsync_dir(&self.dir)?;
        }
        Ok(())
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


/// The 1-based line number of the line that starts at `offset` in `path`.
pub(crate) fn line_number(path: &PathBuf, offset: u64) -> u64 {
    let mut n = 1;
    if let Ok(f) = File::open(path) {
        let mut buf = Vec::new();
        if f.take(offset).read_to_end(&mut buf).is_ok() {
            n += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    n
}

pub(crate) fn json_to_value(v: &serde_json::Value) -> Value {
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

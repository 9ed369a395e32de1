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
/// With [`FileSource::repeat`] the files are read `n` times (epochs of a training set): each
/// instance reads every file of its splits once, in order, then again. A split's offset then
/// says which pass it is in: `pass × 2^48 + byte position` ([`PASS_UNIT`]), so a restore in the
/// middle of pass 3 resumes there; a first pass's offset is the plain byte position, as before.
///
/// Malformed input (bad UTF-8, a line over `weir.source.max-line-bytes`, a line that is not a
/// JSON object, a non-number where [`FileSource::require_number`] asks for one) is a
/// deterministic error naming `file:line`; I/O errors are transient.
#[derive(Clone, Debug)]
pub struct FileSource {
    path: PathBuf,
    format: FileFormat,
    numbers: Vec<(usize, String)>,
    repeat: u32,
}

/// What one pass adds to a repeating file split's checkpointed offset: the byte position is
/// below it (files up to 256 TiB), the passes completed above it.
pub const PASS_UNIT: u64 = 1 << 48;

impl FileSource {
    /// A source over `path` (a file or a directory).
    pub fn new(path: impl Into<PathBuf>, format: FileFormat) -> Self {
        Self { path: path.into(), format, numbers: Vec::new(), repeat: 1 }
    }

    /// Read the files `n` times, in order (default 1). `n = 0` fails the job at start.
    pub fn repeat(mut self, n: u32) -> Self {
        self.repeat = n;
        self
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
    /// Passes over the file completed (with `repeat`).
    pass: u64,
    /// The byte position in the current pass.
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
    /// The split being read: the first of the lowest pass that is not done.
    cur: usize,
    line: Vec<u8>,
    max_line_bytes: u64,
}

impl Source<Row> for FileSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        file_splits(&self.files()?)
    }
    fn open(&self, ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        if self.repeat == 0 {
            return Err(SourceError::deterministic(format!("source.repeat: must be at least 1 (reading {})", self.path.display())));
        }
        let repeat = u64::from(self.repeat);
        let splits = files_of_splits(&self.files()?, splits, self.root())?
            .into_iter()
            .map(|(s, path)| {
                let pass = s.offset / PASS_UNIT;
                // Restored with fewer passes than it ran with: nothing is left of this file.
                OpenSplit { split: s.split, key: s.path, path, pass, offset: s.offset % PASS_UNIT, reader: None, done: pass >= repeat }
            })
            .collect();
        let mut reader = FileReader { source: self.clone(), splits, cur: 0, line: Vec::new(), max_line_bytes: ctx.max_line_bytes };
        reader.cur = reader.next_split().unwrap_or(0);
        Ok(Box::new(reader))
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

impl FileReader {
    /// The split to read next: the first one (in split order) of the lowest pass that is not
    /// done, so that every file is read once before any is read again, also after a restore
    /// that left the files in different passes. Looked up only when a file's pass ends.
    fn next_split(&self) -> Option<usize> {
        (0..self.splits.len()).filter(|&i| !self.splits[i].done).min_by_key(|&i| (self.splits[i].pass, i))
    }
}

impl SourceReader<Row> for FileReader {
    fn poll(&mut self, out: &mut Vec<Row>, max: usize) -> Result<Poll, SourceError> {
        let mut produced = 0;
        let repeat = u64::from(self.source.repeat);
        while produced < max {
            if self.splits.get(self.cur).is_none_or(|s| s.done) {
                match self.next_split() {
                    Some(i) => self.cur = i,
                    None => return Ok(Poll::Finished),
                }
            }
            let s = &mut self.splits[self.cur];
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
                s.reader = None;
                // The last pass ends at the file's end (offset as without `repeat`); another
                // pass starts at 0, after the other files of this pass.
                if s.pass + 1 >= repeat {
                    s.done = true;
                } else {
                    s.pass += 1;
                    s.offset = 0;
                    self.cur = self.next_split().unwrap_or(self.cur);
                }
                continue;
            }
            if s.offset + n as u64 >= PASS_UNIT {
                return Err(SourceError::deterministic(format!("{}: the file is larger than the file source reads (256 TiB)", s.path.display())));
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
        self.splits.iter().map(|s| SplitOffset { split: s.split, offset: s.pass * PASS_UNIT + s.offset, path: s.key.clone() }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(subtask: u32, parallelism: u32) -> SourceContext {
        SourceContext { subtask, parallelism, max_line_bytes: 1 << 10 }
    }

    /// A directory of files `a`, `b`, `c`, each with `lines` lines `<file>:<i>`.
    fn input(tag: &str, lines: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-file-repeat-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["a", "b", "c"] {
            std::fs::write(dir.join(f), (0..lines).map(|i| format!("{f}:{i}\n")).collect::<String>()).unwrap();
        }
        dir
    }

    fn text(rows: &[Row]) -> Vec<String> {
        rows.iter().map(|r| r.get(0).to_string()).collect()
    }

    /// Up to `n` rows (one per poll, so that the reader stops after any line); all with `None`.
    fn read(r: &mut dyn SourceReader<Row>, n: Option<usize>) -> Vec<Row> {
        let mut out = Vec::new();
        while n.is_none_or(|n| out.len() < n) {
            if r.poll(&mut out, 1).unwrap() == Poll::Finished {
                break;
            }
        }
        out
    }

    fn open(src: &FileSource, c: &SourceContext, restored: &[SplitOffset]) -> Box<dyn SourceReader<Row>> {
        src.open(c, crate::source::assign_splits(src, c, restored).unwrap()).unwrap()
    }

    /// Each pass reads every file once, in order, before the next pass begins.
    #[test]
    fn repeat_reads_the_files_n_times_in_order() {
        let dir = input("order", 2);
        let src = FileSource::new(&dir, FileFormat::Lines).repeat(3);
        let got = text(&read(&mut *open(&src, &ctx(0, 1), &[]), None));
        let pass = ["a:0", "a:1", "b:0", "b:1", "c:0", "c:1"];
        assert_eq!(got, [pass, pass, pass].concat());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Stopped after any line of any pass, a reader restored from its offsets reads exactly the
    /// rest: the offsets say which pass each file is in.
    #[test]
    fn a_restore_resumes_in_the_pass_it_stopped_in() {
        let dir = input("restore", 3);
        let src = FileSource::new(&dir, FileFormat::Lines).repeat(3);
        let all = text(&read(&mut *open(&src, &ctx(0, 1), &[]), None));
        assert_eq!(all.len(), 27);
        for cut in 0..=all.len() {
            let mut r = open(&src, &ctx(0, 1), &[]);
            let mut got = text(&read(&mut *r, Some(cut)));
            let restored = r.offsets();
            got.extend(text(&read(&mut *open(&src, &ctx(0, 1), &restored), None)));
            assert_eq!(got, all, "cut after {cut} lines, offsets {restored:?}");
        }
        // 13 lines in: a read twice (its third pass starts at 0), b once and one line more,
        // c once.
        let mut r = open(&src, &ctx(0, 1), &[]);
        read(&mut *r, Some(13));
        let offsets: Vec<u64> = r.offsets().iter().map(|s| s.offset).collect();
        assert_eq!(offsets, [2 * PASS_UNIT, PASS_UNIT + 4, PASS_UNIT]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Restored at another parallelism, each file resumes in its own pass: every line is read
    /// `repeat` times in all.
    #[test]
    fn a_restore_at_another_parallelism_reads_each_line_repeat_times() {
        let dir = input("rescale", 4);
        let src = FileSource::new(&dir, FileFormat::Lines).repeat(3);
        let mut r = open(&src, &ctx(0, 1), &[]);
        let mut got = text(&read(&mut *r, Some(17)));
        let restored = r.offsets();
        for i in 0..2 {
            got.extend(text(&read(&mut *open(&src, &ctx(i, 2), &restored), None)));
        }
        got.sort();
        let mut want: Vec<String> = ["a", "b", "c"].iter().flat_map(|f| (0..4).map(move |i| format!("{f}:{i}"))).flat_map(|l| [l.clone(), l.clone(), l]).collect();
        want.sort();
        assert_eq!(got, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Without `repeat` a finished file's offset is its length, as it always was; a checkpoint
    /// of more passes than the source now reads has nothing left; `repeat(0)` fails at start.
    #[test]
    fn offsets_without_repeat_are_byte_positions() {
        let dir = input("once", 2);
        let once = FileSource::new(&dir, FileFormat::Lines);
        let mut r = open(&once, &ctx(0, 1), &[]);
        assert_eq!(read(&mut *r, None).len(), 6);
        assert_eq!(r.offsets().iter().map(|s| s.offset).collect::<Vec<_>>(), [8, 8, 8]);
        let thrice = FileSource::new(&dir, FileFormat::Lines).repeat(3);
        let mut r = open(&thrice, &ctx(0, 1), &[]);
        read(&mut *r, Some(14));
        let restored = r.offsets();
        let mut r = open(&once, &ctx(0, 1), &restored);
        assert!(read(&mut *r, None).is_empty());
        assert_eq!(r.offsets(), restored);
        // A finished run restored with more passes reads the further passes.
        let mut r = open(&once, &ctx(0, 1), &[]);
        read(&mut *r, None);
        let twice = FileSource::new(&dir, FileFormat::Lines).repeat(2);
        assert_eq!(read(&mut *open(&twice, &ctx(0, 1), &r.offsets()), None).len(), 6);
        let e = FileSource::new(&dir, FileFormat::Lines).repeat(0).open(&ctx(0, 1), vec![]).err().unwrap();
        assert!(e.is_deterministic() && e.to_string().starts_with("source.repeat: must be at least 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

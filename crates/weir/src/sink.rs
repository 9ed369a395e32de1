//! Sinks. A sink writes each epoch as one transaction: pre-committed (made durable) when the
//! epoch closes at the sink, committed when the checkpoint that closes it completes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use crate::row::Row;

/// A sink failed; the message names the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where a sink instance runs.
#[derive(Debug, Clone, Copy)]
pub struct SinkContext {
    /// This instance.
    pub subtask: u32,
    /// Instances in all.
    pub parallelism: u32,
    /// The newest completed checkpoint in the job's checkpoint directory at start (of any
    /// lineage): on a fresh start, pending transactions of epochs up to it may belong to a
    /// completed checkpoint, so they count as committed output.
    pub newest_checkpoint: Option<u64>,
    /// The checkpoint the job restored from: pending transactions of epochs up to it commit,
    /// later ones are discarded.
    pub restored: Option<u64>,
}

/// A transactional sink.
pub trait Sink<T>: 'static {
    /// Checks that no restart can fix, made before [`Sink::open`] touches anything: a failure
    /// here ends the job at once. The file sinks refuse a fresh start (`ctx.restored` is
    /// `None`) into a directory that already holds committed output, which would be written
    /// a second time.
    fn preflight(&self, _ctx: &SinkContext) -> Result<(), SinkError> {
        Ok(())
    }
    /// Open instance `ctx.subtask`, recovering its predecessors' transactions.
    fn open(&self, ctx: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError>;
}

/// A fresh start into `dir` must not write over output that a restore would keep: refuse it
/// when `dir` holds a committed (visible) file, naming the way out.
fn refuse_fresh_start_into_used(dir: &Path, ctx: &SinkContext, is_output: impl Fn(&str) -> bool) -> Result<(), SinkError> {
    if ctx.restored.is_some() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) }; // created by open
    let mut committed = 0usize;
    let mut example = None;
    for entry in entries {
        let name = entry.map_err(|e| io_err("list", dir, e))?.file_name().to_string_lossy().into_owned();
        if is_output(&name) {
            committed += 1;
            example.get_or_insert(name);
        }
    }
    match example {
        None => Ok(()),
        Some(name) => Err(SinkError(format!(
            "{} already holds {committed} committed output file(s) of an earlier run (e.g. {name}); starting fresh would write \
             them again. Resume the job with `--restore latest`, or write into an empty directory",
            dir.display()
        ))),
    }
}

/// One sink instance.
pub trait SinkWriter<T> {
    /// Write records of `epoch` (drains `batch`).
    fn write(&mut self, epoch: u64, batch: &mut Vec<T>) -> Result<(), SinkError>;
    /// Epoch `epoch` is closed here: make it durable (phase one). Returns bytes written.
    fn pre_commit(&mut self, epoch: u64) -> Result<u64, SinkError>;
    /// Checkpoint `upto` completed: publish every pre-committed epoch `<= upto` (phase two).
    fn commit(&mut self, upto: u64) -> Result<(), SinkError>;
}

/// Discards everything (Flink's blackhole connector), for benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlackholeSink;

impl<T: 'static> Sink<T> for BlackholeSink {
    fn open(&self, _: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(BlackholeSink))
    }
}

impl<T> SinkWriter<T> for BlackholeSink {
    fn write(&mut self, _: u64, batch: &mut Vec<T>) -> Result<(), SinkError> {
        batch.clear();
        Ok(())
    }
    fn pre_commit(&mut self, _: u64) -> Result<u64, SinkError> {
        Ok(0)
    }
    fn commit(&mut self, _: u64) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Collects committed records in memory (tests and examples). Exactly once within a process.
pub struct CollectSink<T> {
    committed: Arc<Mutex<Vec<T>>>,
}

impl<T> Clone for CollectSink<T> {
    fn clone(&self) -> Self {
        Self { committed: self.committed.clone() }
    }
}

impl<T> Default for CollectSink<T> {
    fn default() -> Self {
        Self { committed: Arc::default() }
    }
}

impl<T> CollectSink<T> {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }
    /// Take what was committed so far.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.committed.lock().expect("collect sink"))
    }
}

struct CollectWriter<T> {
    committed: Arc<Mutex<Vec<T>>>,
    pending: BTreeMap<u64, Vec<T>>,
}

impl<T: 'static> Sink<T> for CollectSink<T> {
    fn open(&self, _: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(CollectWriter { committed: self.committed.clone(), pending: BTreeMap::new() }))
    }
}

impl<T> SinkWriter<T> for CollectWriter<T> {
    fn write(&mut self, epoch: u64, batch: &mut Vec<T>) -> Result<(), SinkError> {
        self.pending.entry(epoch).or_default().append(batch);
        Ok(())
    }
    fn pre_commit(&mut self, _: u64) -> Result<u64, SinkError> {
        Ok(0)
    }
    fn commit(&mut self, upto: u64) -> Result<(), SinkError> {
        let later = self.pending.split_off(&(upto + 1));
        let mut c = self.committed.lock().expect("collect sink");
        for (_, mut v) in std::mem::replace(&mut self.pending, later) {
            c.append(&mut v);
        }
        Ok(())
    }
}

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

fn io_err(what: &str, path: &Path, e: std::io::Error) -> SinkError {
    SinkError(format!("file sink: {what} {}: {e}", path.display()))
}

fn fsync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io_err("fsync", dir, e))
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

/// Writes each row's image (field `image_field`) as a PNG named after field `name_field`, exactly
/// once: epoch `e` of instance `s` is written into the hidden directory `.images-s-e.inprogress`,
/// renamed `.pending` (after fsync) when `e` closes, and its files moved into place when the
/// checkpoint completes. Replays rewrite the same names, so a commit is idempotent.
pub struct ImageSink {
    dir: PathBuf,
    name_field: usize,
    image_field: usize,
}

impl ImageSink {
    /// A sink into `dir`.
    pub fn new(dir: impl Into<PathBuf>, name_field: usize, image_field: usize) -> Self {
        Self { dir: dir.into(), name_field, image_field }
    }
}

struct ImageSinkWriter {
    dir: PathBuf,
    subtask: u32,
    name_field: usize,
    image_field: usize,
    open: Option<(u64, u64)>,
    pending: Vec<u64>,
}

fn parse_image_stage(name: &str) -> Option<(u32, u64, &str)> {
    let rest = name.strip_prefix(".images-")?;
    let (stem, suffix) = rest.split_once('.')?;
    let (s, e) = stem.split_once('-')?;
    Some((s.parse().ok()?, e.parse().ok()?, suffix))
}

impl ImageSinkWriter {
    fn stage(&self, epoch: u64, suffix: &str) -> PathBuf {
        self.dir.join(format!(".images-{:05}-{epoch:012}.{suffix}", self.subtask))
    }
}

fn publish(stage: &Path, dir: &Path) -> Result<(), SinkError> {
    for f in std::fs::read_dir(stage).map_err(|e| io_err("list", stage, e))? {
        let f = f.map_err(|e| io_err("list", stage, e))?;
        std::fs::rename(f.path(), dir.join(f.file_name())).map_err(|e| io_err("commit", &f.path(), e))?;
    }
    std::fs::remove_dir(stage).map_err(|e| io_err("remove", stage, e))?;
    fsync_dir(dir)
}

impl Sink<Row> for ImageSink {
    fn preflight(&self, ctx: &SinkContext) -> Result<(), SinkError> {
        refuse_fresh_start_into_used(&self.dir, ctx, |n| {
            parse_image_stage(n).map_or(!n.starts_with('.'), |(_, e, suffix)| {
                suffix == "pending" && ctx.newest_checkpoint.is_some_and(|c| e <= c)
            })
        })
    }

    fn open(&self, ctx: &SinkContext) -> Result<Box<dyn SinkWriter<Row>>, SinkError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("create", &self.dir, e))?;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io_err("list", &self.dir, e))? {
            let entry = entry.map_err(|e| io_err("list", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((sub, epoch, suffix)) = parse_image_stage(&name) else { continue };
            if sub % ctx.parallelism != ctx.subtask {
                continue;
            }
            if suffix == "pending" && ctx.restored.is_some_and(|n| epoch <= n) {
                publish(&entry.path(), &self.dir)?;
            } else {
                std::fs::remove_dir_all(entry.path()).map_err(|e| io_err("discard", &entry.path(), e))?;
            }
        }
        Ok(Box::new(ImageSinkWriter {
            dir: self.dir.clone(),
            subtask: ctx.subtask,
            name_field: self.name_field,
            image_field: self.image_field,
            open: None,
            pending: Vec::new(),
        }))
    }
}

impl SinkWriter<Row> for ImageSinkWriter {
    fn write(&mut self, epoch: u64, batch: &mut Vec<Row>) -> Result<(), SinkError> {
        let stage = self.stage(epoch, "inprogress");
        if self.open.is_none() {
            std::fs::create_dir_all(&stage).map_err(|e| io_err("create", &stage, e))?;
            self.open = Some((epoch, 0));
        }
        for row in batch.drain(..) {
            let crate::row::Value::Image(img) = row.get(self.image_field) else {
                return Err(SinkError(format!("image sink: field {} is a {}, not an image", self.image_field, row.get(self.image_field).type_name())));
            };
            let stem = row.get(self.name_field).to_string();
            let stem = Path::new(&stem).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or(stem);
            let path = stage.join(format!("{stem}.png"));
            let (c, rgb) = (img.c, img.to_rgb8());
            let buf = match c {
                3 => image::RgbImage::from_raw(img.w as u32, img.h as u32, rgb).map(image::DynamicImage::ImageRgb8),
                1 => image::GrayImage::from_raw(img.w as u32, img.h as u32, rgb).map(image::DynamicImage::ImageLuma8),
                _ => None,
            }
            .ok_or_else(|| SinkError(format!("image sink: {stem}: {c} channels cannot be a PNG")))?;
            buf.save_with_format(&path, image::ImageFormat::Png).map_err(|e| SinkError(format!("image sink: write {}: {e}", path.display())))?;
            File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io_err("fsync", &path, e))?;
            if let Some((_, n)) = self.open.as_mut() {
                *n += 1;
            }
        }
        Ok(())
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<u64, SinkError> {
        let Some((e, n)) = self.open.take() else { return Ok(0) };
        debug_assert_eq!(e, epoch);
        let (from, to) = (self.stage(e, "inprogress"), self.stage(e, "pending"));
        fsync_dir(&from)?;
        std::fs::rename(&from, &to).map_err(|err| io_err("rename", &from, err))?;
        fsync_dir(&self.dir)?;
        self.pending.push(e);
        Ok(n)
    }

    fn commit(&mut self, upto: u64) -> Result<(), SinkError> {
        for e in self.pending.iter().copied().filter(|&e| e <= upto).collect::<Vec<_>>() {
            publish(&self.stage(e, "pending"), &self.dir)?;
        }
        self.pending.retain(|&e| e > upto);
        Ok(())
    }
}

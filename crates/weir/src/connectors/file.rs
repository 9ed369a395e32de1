//! Files: the exactly-once file sink (two-phase commit over renames).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::rc::Rc;

use crate::row::Row;
use crate::sink::{fsync_dir, io_err, refuse_fresh_start_into_used, Sink, SinkContext, SinkError, SinkWriter};

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


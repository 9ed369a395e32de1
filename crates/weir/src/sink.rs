//! Sinks. A sink writes each epoch as one transaction: pre-committed (made durable) when the
//! epoch closes at the sink, committed when the checkpoint that closes it completes. This module
//! holds the sink interface; the connectors live in [`crate::connectors`] and are re-exported
//! here.

use std::fs::File;
use std::path::Path;

pub use crate::connectors::blackhole::BlackholeSink;
pub use crate::connectors::memory::CollectSink;
pub use crate::connectors::file::{FileSink, Formatter, WITHDRAWN};
pub use crate::connectors::images::ImageSink;

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
pub(crate) fn refuse_fresh_start_into_used(dir: &Path, ctx: &SinkContext, is_output: impl Fn(&str) -> bool) -> Result<(), SinkError> {
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

pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> SinkError {
    SinkError(format!("file sink: {what} {}: {e}", path.display()))
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io_err("fsync", dir, e))
}


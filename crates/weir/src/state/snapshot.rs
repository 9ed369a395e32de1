//! Snapshots and restores of an operator instance's host states, on either backend.
//!
//! - Heap, full checkpoints: each state's copy-on-write view is written as one canonical file
//!   under `chk-<n>/`.
//! - Heap, incremental (`execution.checkpointing.incremental`): a state's first snapshot, and
//!   any after a failed one or once the deltas outgrow `weir.state.incremental.max-delta-share`
//!   of the base, is a full file; the others are delta files of the keys changed or removed
//!   since the snapshot before (tombstones for removed keys). They live under `shared/`; a
//!   checkpoint lists the base and its deltas, in order, and a restore applies them in order.
//! - RocksDB: at the barrier the write-back caches are flushed and the database makes a native
//!   checkpoint (hard links). Incremental: the SST files not uploaded by the previous snapshot
//!   go to `shared/`, the rest of the checkpoint (MANIFEST, CURRENT, OPTIONS) to `chk-<n>/`;
//!   full: each column family is written in the canonical format, as the heap backend does.
//!
//! Any checkpoint restores on either backend and at any parallelism: canonical and delta files
//! are read block by block (this instance's key groups only); a RocksDB checkpoint of the same
//! instance is opened as the database (see [`super::rocks`]), one of other key groups is
//! scanned for this instance's key-group range.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use weir_checkpoint::{StateFileHandle, StateFileKind, SubtaskSnapshot, TaskId};
use weir_state::keygroup::KeyGroupRange;
use weir_storage::CheckpointStorage;

use super::chain::{Chain, Ticket, Turn};
use super::local::{LocalBackup, StateReader};
use super::rocks::RocksInstance;
use super::{Backend, HeapSnapshot, StateTables};
use crate::Key;

/// What the snapshot of an instance's host states wrote.
#[derive(Default)]
pub(crate) struct TablesWritten {
    /// The files the checkpoint lists for these states.
    pub files: Vec<StateFileHandle>,
    /// Bytes this checkpoint wrote (files of earlier checkpoints it lists not counted).
    pub bytes: u64,
}

/// The background part of a snapshot of an instance's host states.
pub(crate) type TablesJob = Box<dyn FnOnce(&CheckpointStorage) -> Result<TablesWritten, String> + Send>;

/// How a snapshot's files are named and whether it may be incremental.
#[derive(Clone)]
pub(crate) struct SnapshotSpec {
    pub epoch: u64,
    /// `op<N>-<operator name>`.
    pub prefix: String,
    pub subtask: u32,
    pub incremental: bool,
    pub max_delta_share: f64,
    /// Local recovery: where this subtask keeps copies of its snapshots.
    pub local: Option<Arc<LocalBackup>>,
    /// A savepoint: every state in full, in the canonical format, in this checkpoint's own
    /// directory (self-contained: it lists no file of another checkpoint).
    pub savepoint: bool,
}

impl SnapshotSpec {
    fn private(&self, state: &str) -> String {
        format!("chk-{}/{}-{}-{}.state", self.epoch, self.prefix, crate::stream::sanitize(state), self.subtask)
    }
    fn shared(&self, state: &str, kind: &str) -> String {
        format!("shared/chk{}-{}-{}-{}-{kind}.state", self.epoch, self.prefix, crate::stream::sanitize(state), self.subtask)
    }
}

/// A heap state's chain of files is at most this long (a full file and its deltas): a restore
/// reads at most this many files per state, however small the deltas are.
const MAX_HEAP_CHAIN: usize = 32;

struct HeapPart {
    name: String,
    view: Box<dyn HeapSnapshot>,
    /// Incremental: the state's place in its chain of files.
    ticket: Option<(Ticket, f64)>,
}

impl<K: Key> StateTables<K> {
    /// The synchronous part of a snapshot at the barrier of `spec.epoch`, after [`Self::flush`]:
    /// freeze every heap state (copy-on-write), or make RocksDB's native checkpoint. Returns the
    /// background part.
    pub(crate) fn snapshot(&mut self, spec: SnapshotSpec) -> Result<TablesJob, String> {
        match &self.backend {
            Backend::Heap { .. } => {
                let mut parts = Vec::with_capacity(self.tables.len());
                for (t, chain) in self.tables.iter_mut().zip(&self.chains) {
                    let view = t.heap_snapshot().expect("heap backend");
                    let ticket = spec.incremental.then(|| (chain.issue(), spec.max_delta_share));
                    parts.push(HeapPart { name: t.name().to_string(), view, ticket });
                }
                Ok(Box::new(move |storage: &CheckpointStorage| kept_locally(&spec, write_heap(storage, &spec, parts))))
            }
            Backend::Rocks(inst) => {
                // The caller flushed the write-back caches (`snapshot_tables`: an error there
                // fails the job rather than declining the checkpoint).
                let inst = inst.clone();
                let dir = inst.snapshots.join(format!("chk-{}", spec.epoch));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: removing {}: {e}", inst.owner, dir.display()))?;
                }
                let native = inst.db.checkpoint(&dir).map_err(|e| format!("{}: checkpoint {}: {e}", inst.owner, spec.epoch))?;
                let ticket = inst.chain.issue();
                let names: Vec<String> = self.tables.iter().map(|t| t.name().to_string()).collect();
                let range = self.range;
                Ok(Box::new(move |storage: &CheckpointStorage| {
                    let (chain, seq) = ticket.wait();
                    let mut turn = Turn { chain: &chain, seq, ok: false };
                    let written = if spec.incremental && !spec.savepoint {
                        upload_native(storage, &spec, &inst, &native)
                    } else {
                        // A savepoint lists none of the files uploaded before it, so once it
                        // completes retention may delete them: the next incremental checkpoint
                        // uploads everything again rather than list a file that may be gone.
                        inst.uploaded.lock().unwrap_or_else(|p| p.into_inner()).clear();
                        write_canonical(storage, &spec, &native.dir, &names, range)
                    };
                    if let Err(e) = std::fs::remove_dir_all(&native.dir) {
                        tracing::warn!("{}: removing the native checkpoint {}: {e}", inst.owner, native.dir.display());
                    }
                    turn.ok = written.is_ok();
                    kept_locally(&spec, written)
                }))
            }
        }
    }
}

/// Local recovery: the snapshot is written; older local copies go.
fn kept_locally(spec: &SnapshotSpec, written: Result<TablesWritten, String>) -> Result<TablesWritten, String> {
    match (&spec.local, &written) {
        (Some(local), Ok(w)) => local.snapshot_written(w.files.iter().map(|f| f.path.clone()).collect()),
        (Some(local), Err(_)) => local.snapshot_failed(),
        _ => {}
    }
    written
}

fn write_heap(storage: &CheckpointStorage, spec: &SnapshotSpec, parts: Vec<HeapPart>) -> Result<TablesWritten, String> {
    let mut out = TablesWritten::default();
    for part in parts {
        let HeapPart { name: state, view, ticket } = part;
        // A savepoint is written in full and does not join the chain (its ticket, dropped,
        // passes the turn on): a snapshot after it would be full.
        let Some((ticket, share)) = ticket.filter(|_| !spec.savepoint) else {
            let w = view.write_full().map_err(|e| e.to_string())?;
            let path = spec.private(&state);
            let size = w.bytes.len() as u64;
            if let Some(l) = &spec.local {
                l.keep(&path, &w.bytes);
            }
            storage.put(&path, w.bytes).map_err(|e| e.to_string())?;
            out.bytes += size;
            out.files.push(StateFileHandle { state, path, size, crc32c: w.crc32c, key_groups: w.index, kind: StateFileKind::Full });
            continue;
        };
        // Deltas of one state are written in checkpoint order, each on top of the one before.
        let (chain, seq): (Arc<Chain>, u64) = ticket.wait();
        let mut turn = Turn { chain: &chain, seq, ok: false };
        let full = {
            let c = chain.lock();
            c.must_be_full(seq, share) || c.files.len() >= MAX_HEAP_CHAIN
        };
        if !full && view.changed() == 0 {
            // Nothing changed: the checkpoint lists the chain as it is, and this snapshot joins it.
            out.files.extend(chain.lock().files.iter().cloned());
            turn.ok = true;
            continue;
        }
        let w = if full { view.write_full() } else { view.write_delta() }.map_err(|e| e.to_string())?;
        let path = spec.shared(&state, if full { "full" } else { "delta" });
        let size = w.bytes.len() as u64;
        if let Some(l) = &spec.local {
            l.keep(&path, &w.bytes);
        }
        storage.put(&path, w.bytes).map_err(|e| e.to_string())?;
        let kind = if full { StateFileKind::Full } else { StateFileKind::Delta };
        let handle = StateFileHandle { state, path, size, crc32c: w.crc32c, key_groups: w.index, kind };
        let mut c = chain.lock();
        c.push(handle, full);
        out.files.extend(c.files.iter().cloned());
        drop(c);
        out.bytes += size;
        turn.ok = true;
    }
    Ok(out)
}

/// Incremental RocksDB snapshot: list the SST files the previous snapshot uploaded, upload the
/// others and the checkpoint's private files.
fn upload_native(storage: &CheckpointStorage, spec: &SnapshotSpec, inst: &RocksInstance, native: &weir_state::rocks::NativeSnapshot) -> Result<TablesWritten, String> {
    let before = inst.uploaded.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut out = TablesWritten::default();
    let mut now = HashMap::new();
    for f in &native.files {
        // SST and OPTIONS files are immutable under their numbered names: list, don't upload
        // again, what the previous snapshot uploaded. (OPTIONS is 15 kB per database: at 1 %
        // changed keys it was a fifth of each checkpoint.)
        let shared = f.sst || f.name.starts_with("OPTIONS-");
        if shared {
            if let Some(h) = before.get(&f.name).filter(|h| h.size == f.size) {
                if let Some(l) = &spec.local {
                    l.keep_file(&h.path, &native.dir.join(&f.name));
                }
                now.insert(f.name.clone(), h.clone());
                out.files.push(h.clone());
                continue;
            }
        }
        let local = native.dir.join(&f.name);
        let path = if shared {
            format!("shared/chk{}-{}-{}-{}", spec.epoch, spec.prefix, spec.subtask, f.name)
        } else {
            format!("chk-{}/{}-{}-rocksdb/{}", spec.epoch, spec.prefix, spec.subtask, f.name)
        };
        let digest = storage.put_file(&path, &local).map_err(|e| e.to_string())?;
        let (size, crc) = (digest.size, digest.crc32c);
        if let Some(l) = &spec.local {
            l.keep_file(&path, &local);
        }
        out.bytes += size;
        let h = StateFileHandle { state: f.name.clone(), path, size, crc32c: crc, key_groups: vec![], kind: StateFileKind::RocksDb };
        if shared {
            now.insert(f.name.clone(), h.clone());
        }
        out.files.push(h);
    }
    *inst.uploaded.lock().unwrap_or_else(|p| p.into_inner()) = now;
    Ok(out)
}

/// Full RocksDB snapshot: every column family in the canonical format.
fn write_canonical(storage: &CheckpointStorage, spec: &SnapshotSpec, dir: &std::path::Path, names: &[String], range: KeyGroupRange) -> Result<TablesWritten, String> {
    let mut out = TablesWritten::default();
    for state in names {
        let w = weir_state::rocks::write_canonical(dir, state, range).map_err(|e| e.to_string())?;
        let path = spec.private(state);
        let size = w.bytes.len() as u64;
        if let Some(l) = &spec.local {
            l.keep(&path, &w.bytes);
        }
        storage.put(&path, w.bytes).map_err(|e| e.to_string())?;
        out.bytes += size;
        out.files.push(StateFileHandle { state: state.clone(), path, size, crc32c: w.crc32c, key_groups: w.index, kind: StateFileKind::Full });
    }
    Ok(out)
}

/// Where a restore reads from.
pub(crate) struct RestoreSource<'a> {
    pub reader: StateReader<'a>,
    /// The parallelism of the checkpoint (which key groups each of its subtasks held).
    pub parallelism: u32,
    /// The subtask whose RocksDB checkpoint was opened as this instance's database.
    pub native_restored: Option<u32>,
    /// Where RocksDB checkpoints of other key groups are downloaded to be scanned.
    pub scratch: PathBuf,
}

impl<K: Key> StateTables<K> {
    /// Load this instance's key groups from the snapshots of a checkpoint, in the order each
    /// lists its files (a base, then its deltas).
    pub(crate) fn restore<'a>(&mut self, src: &mut RestoreSource<'_>, subtasks: impl Iterator<Item = (TaskId, &'a SubtaskSnapshot)>) -> Result<(), String> {
        let range = self.range;
        let mp = self.max_parallelism;
        for (task, sub) in subtasks {
            src.reader.task(&sub.uid, task.subtask);
            let files = sub.state_files.iter().filter(|f| !self.resident.contains(&f.state));
            let (native, files): (Vec<&StateFileHandle>, Vec<&StateFileHandle>) = files.partition(|f| f.kind == StateFileKind::RocksDb);
            for f in files {
                let Some(table) = self.tables.iter_mut().find(|t| t.name() == f.state) else {
                    return Err(format!("checkpoint holds state '{}' that the operator does not register", f.state));
                };
                let delta = f.kind == StateFileKind::Delta;
                for b in f.key_groups.iter().filter(|b| range.contains(b.key_group)) {
                    let bytes = src.reader.read_range(f, b.offset..b.offset + b.len)?;
                    table.restore_block(&bytes, b, &src.reader.storage.display(&f.path), delta, mp).map_err(|e| e.to_string())?;
                }
            }
            let theirs = KeyGroupRange::for_operator(mp, src.parallelism.max(task.subtask + 1), task.subtask);
            let overlaps = theirs.start < range.end && range.start < theirs.end;
            if native.is_empty() || src.native_restored == Some(task.subtask) || !overlaps {
                continue;
            }
            self.scan_native(src, task, &native)?;
        }
        self.flush()
    }

    /// Download the RocksDB checkpoint of another instance and copy this instance's key groups
    /// of every state out of it.
    fn scan_native(&mut self, src: &mut RestoreSource<'_>, task: TaskId, files: &[&StateFileHandle]) -> Result<(), String> {
        let dir = src.scratch.join(format!("restore-op{}-{}", task.operator, task.subtask));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let result = (|| {
            for f in files {
                super::rocks::check_name(f)?;
                src.reader.fetch(f, &dir.join(&f.state))?;
            }
            let states = weir_state::rocks::native_states(&dir).map_err(|e| e.to_string())?;
            let range = self.range;
            for state in states {
                let Some(table) = self.tables.iter_mut().find(|t| t.name() == state) else {
                    return Err(format!("checkpoint holds state '{state}' that the operator does not register"));
                };
                let file = format!("{} (RocksDB checkpoint of subtask {})", src.reader.storage.display(&files[0].path), task.subtask);
                weir_state::rocks::scan_native(&dir, &state, range, |kg, k, v| table.restore_raw(kg, k, v, &file)).map_err(|e| e.to_string())?;
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

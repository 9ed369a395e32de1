//! Local recovery (Flink's task-local state): each subtask keeps a copy of its latest snapshots'
//! files on local disk (`execution.checkpointing.local-backup.enabled`), under
//! `<weir.state.local.dir>/<job>/<operator uid>-<subtask>/` at the same relative paths as in
//! checkpoint storage. A restore
//! (`execution.state-recovery.from-local`) reads a file from its local copy when the copy has the
//! size and checksum the checkpoint's metadata records, and from checkpoint storage otherwise: a
//! missing copy is normal (another host, a cleaned disk), a corrupt one is logged and never read.
//!
//! The copies are a cache, so they are not fsynced: whatever a crash leaves is verified first.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use weir_checkpoint::StateFileHandle;
use weir_storage::CheckpointStorage;

/// Snapshots whose local copies a subtask keeps: the newest may belong to a checkpoint that
/// never completes, so the one before stays too.
const KEEP_SNAPSHOTS: usize = 2;

/// The task-local copies of one subtask's snapshots.
pub(crate) struct LocalBackup {
    /// `<weir.state.local.dir>/<job>`: the copies of every subtask of the job on this host.
    job_root: PathBuf,
    /// This subtask's directory under it.
    root: PathBuf,
    /// The files of this subtask's latest snapshots (relative paths), oldest first.
    recent: Mutex<VecDeque<Vec<String>>>,
    /// Files kept for snapshots not yet written whole: removed if the snapshot fails.
    pending: Mutex<Vec<String>>,
}

impl LocalBackup {
    /// Copies of subtask `subtask` of operator `uid` of job `job` under `dir` (default: the temp dir).
    pub fn new(dir: Option<&str>, job: &str, uid: &str, subtask: u32) -> Self {
        let base = dir.map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("weir-local-state"));
        let job_root = base.join(crate::stream::sanitize(job));
        let root = job_root.join(task_dir(uid, subtask));
        Self { job_root, root, recent: Mutex::default(), pending: Mutex::default() }
    }

    /// The subtask starts (after its restore): copies its restored snapshot does not list are
    /// left-overs of earlier runs (a killed process never pruned them).
    pub fn start(&self, restored: &[String]) {
        let keep: std::collections::HashSet<PathBuf> = restored.iter().filter_map(|r| self.path(r)).collect();
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if !keep.contains(&p) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).push_back(restored.to_vec());
    }

    /// Where the copy of `rel` goes; `None` for a name that would leave the directory (the
    /// names come from checkpoint metadata, which is checksummed but not authenticated).
    fn path(&self, rel: &str) -> Option<PathBuf> {
        let p = Path::new(rel);
        let plain = p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        plain.then(|| self.root.join(p))
    }

    /// Keep a copy of `rel`'s bytes. Failing to is logged: the remote copy is what counts.
    pub fn keep(&self, rel: &str, bytes: &[u8]) {
        let Some(to) = self.path(rel) else { return };
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(rel.to_string());
        let tmp = to.with_extension("weir-tmp");
        let r = to.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&tmp, bytes)).and_then(|()| std::fs::rename(&tmp, &to));
        if let Err(e) = r {
            tracing::warn!("local recovery: keeping a copy of {rel} at {}: {e}", to.display());
        }
    }

    /// Keep a copy of a local file (a RocksDB checkpoint's): a hard link where possible.
    pub fn keep_file(&self, rel: &str, from: &Path) {
        let Some(to) = self.path(rel) else { return };
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(rel.to_string());
        if std::fs::metadata(&to).ok().zip(std::fs::metadata(from).ok()).is_some_and(|(a, b)| a.len() == b.len()) {
            return; // an SST file listed again by a later snapshot
        }
        let tmp = to.with_extension("weir-tmp");
        let _ = std::fs::remove_file(&tmp);
        let r = to
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::hard_link(from, &tmp).or_else(|_| std::fs::copy(from, &tmp).map(|_| ())))
            .and_then(|()| std::fs::rename(&tmp, &to));
        if let Err(e) = r {
            tracing::warn!("local recovery: keeping a copy of {rel} at {}: {e}", to.display());
        }
    }

    /// A snapshot of this subtask listing `files` is written: drop the copies that none of the
    /// latest snapshots lists any more.
    pub fn snapshot_written(&self, files: Vec<String>) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.push_back(files);
        while recent.len() > KEEP_SNAPSHOTS {
            let old = recent.pop_front().unwrap_or_default();
            for rel in old.iter().filter(|rel| !recent.iter().any(|r| r.contains(rel))) {
                if let Some(p) = self.path(rel) {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }

    /// A snapshot failed: the copies kept for it that no kept snapshot lists go.
    pub fn snapshot_failed(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for rel in pending.iter().filter(|rel| !recent.iter().any(|r| r.contains(rel))) {
            if let Some(p) = self.path(rel) {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// The local copy of `f`, written by the subtask whose directory is `task`, if it is there
    /// and has the recorded size and checksum.
    pub fn verified(&self, task: &str, f: &StateFileHandle) -> Option<PathBuf> {
        let plain = Path::new(&f.path).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return None;
        }
        let p = self.job_root.join(task).join(&f.path);
        let (size, crc) = match super::rocks::file_crc(&p) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("local recovery: reading {}: {e}; reading {} from checkpoint storage", p.display(), f.path);
                return None;
            }
        };
        if size != f.size || crc != f.crc32c {
            tracing::warn!(
                "local recovery: the local copy {} is corrupt ({size} bytes, checksum {crc:08x}; {} bytes, {:08x} expected): not loaded, reading {} from checkpoint storage",
                p.display(),
                f.size,
                f.crc32c,
                f.path
            );
            return None;
        }
        Some(p)
    }
}

/// Reads the files of a restored checkpoint: from verified local copies first (when local
/// recovery is on), else from checkpoint storage.
pub(crate) struct StateReader<'a> {
    pub storage: &'a CheckpointStorage,
    pub local: Option<&'a LocalBackup>,
    /// The directory of the subtask whose files are being read (see [`StateReader::task`]).
    task: String,
    checked: HashMap<(String, String), Option<PathBuf>>,
    /// Bytes read from local copies and from storage.
    pub read_local: u64,
    pub read_remote: u64,
}

impl<'a> StateReader<'a> {
    pub fn new(storage: &'a CheckpointStorage, local: Option<&'a LocalBackup>) -> Self {
        Self { storage, local, task: String::new(), checked: HashMap::new(), read_local: 0, read_remote: 0 }
    }

    /// The files read next were written by subtask `subtask` of operator `uid`: its local copies
    /// are in its own directory.
    pub fn task(&mut self, uid: &str, subtask: u32) {
        self.task = task_dir(uid, subtask);
    }

    fn local_copy(&mut self, f: &StateFileHandle) -> Option<PathBuf> {
        let local = self.local?;
        let task = self.task.clone();
        self.checked.entry((task.clone(), f.path.clone())).or_insert_with(|| local.verified(&task, f)).clone()
    }

    /// Bytes `range` of file `f`.
    pub fn read_range(&mut self, f: &StateFileHandle, range: Range<u64>) -> Result<Bytes, String> {
        if let Some(p) = self.local_copy(f) {
            use std::io::{Read, Seek, SeekFrom};
            let read = || -> std::io::Result<Vec<u8>> {
                let mut file = std::fs::File::open(&p)?;
                file.seek(SeekFrom::Start(range.start))?;
                let mut buf = vec![0; (range.end - range.start) as usize];
                file.read_exact(&mut buf)?;
                Ok(buf)
            };
            match read() {
                Ok(b) => {
                    self.read_local += b.len() as u64;
                    return Ok(Bytes::from(b));
                }
                Err(e) => tracing::warn!("local recovery: reading {}: {e}; reading {} from checkpoint storage", p.display(), f.path),
            }
        }
        let b = self.storage.read_range(&f.path, range).map_err(|e| e.to_string())?;
        self.read_remote += b.len() as u64;
        Ok(b)
    }

    /// Put file `f` at `to` (checking size and checksum), from its local copy when it verifies.
    pub fn fetch(&mut self, f: &StateFileHandle, to: &Path) -> Result<(), String> {
        if let Some(p) = self.local_copy(f) {
            let _ = std::fs::remove_file(to);
            // SST files are immutable: a link will do. RocksDB may append to the others.
            let linked = f.state.ends_with(".sst") && std::fs::hard_link(&p, to).is_ok();
            if linked || std::fs::copy(&p, to).is_ok() {
                self.read_local += f.size;
                return Ok(());
            }
        }
        super::rocks::download(self.storage, f, to)?;
        self.read_remote += f.size;
        Ok(())
    }
}

/// The directory of a subtask's copies.
pub(crate) fn task_dir(uid: &str, subtask: u32) -> String {
    format!("{}-{subtask}", crate::stream::sanitize(uid))
}

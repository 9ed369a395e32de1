//! Checkpoint storage for Weir.
//!
//! Layout: `<dir>/<job>/chk-<n>/<files>` and `<dir>/<job>/chk-<n>/_metadata`, written last and
//! atomically (temporary file, fsync, rename, fsync of the directory). A checkpoint without a
//! valid `_metadata` does not exist. All access goes through `object_store`, so the same code
//! serves a local directory (the default) and, later, S3-compatible stores.
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("weir-doc-{}", std::process::id()));
//! use weir_storage::CheckpointStorage;
//! let storage = CheckpointStorage::open(dir.to_str().unwrap(), "job").unwrap();
//! storage.put("chk-1/a.state", b"hello".to_vec()).unwrap();
//! assert_eq!(&storage.read("chk-1/a.state").unwrap()[..], b"hello");
//! assert!(storage.completed_checkpoints().unwrap().is_empty(), "no _metadata, no checkpoint");
//! # std::fs::remove_dir_all(dir).ok();
//! ```
#![forbid(unsafe_code)]

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::executor::block_on;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use weir_checkpoint::{CheckpointId, CheckpointMetadata, METADATA_VERSION};

/// Errors of checkpoint storage; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O error on a file.
    #[error("checkpoint storage: {op} {file}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        file: String,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file failed validation.
    #[error("corrupt checkpoint file {file}: {what}")]
    Corrupt {
        /// The file.
        file: String,
        /// What is wrong.
        what: String,
    },
    /// The configured location cannot be used.
    #[error("execution.checkpointing.dir: {0}")]
    Location(String),
    /// The checkpoint was aborted: nothing more is written into it.
    #[error("checkpoint {0} was aborted")]
    Aborted(CheckpointId),
}

impl StorageError {
    /// Whether this error proves the checkpoint corrupt (checksum mismatch, truncation, bad
    /// `_metadata`, a missing file), as opposed to a transient failure to read it (EIO, EMFILE,
    /// a timeout) after which the same checkpoint may well be readable. Only proven corruption
    /// may make a restore fall back to an older checkpoint.
    pub fn is_corruption(&self) -> bool {
        match self {
            StorageError::Corrupt { .. } => true,
            StorageError::Io { source, .. } => {
                matches!(source.downcast_ref::<object_store::Error>(), Some(object_store::Error::NotFound { .. }))
            }
            StorageError::Location(_) | StorageError::Aborted(_) => false,
        }
    }
}

/// Why no checkpoint could be restored although completed checkpoints exist.
#[derive(Debug)]
pub struct NoValidCheckpoint {
    /// The job directory.
    pub location: PathBuf,
    /// Each completed checkpoint, newest first, and what is wrong with it.
    pub rejected: Vec<(CheckpointId, StorageError)>,
}

impl std::fmt::Display for NoValidCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} holds {} completed checkpoint(s) and none can be restored:", self.location.display(), self.rejected.len())?;
        for (id, e) in &self.rejected {
            write!(f, "\n  chk-{id}: {e}")?;
        }
        Ok(())
    }
}

/// The outcome of looking for the newest restorable checkpoint.
#[derive(Debug)]
pub enum LatestValid {
    /// No completed checkpoint exists: a fresh start is correct.
    Empty,
    /// The newest checkpoint that verifies, and the newer ones proven corrupt.
    Found(CheckpointMetadata, Vec<(CheckpointId, StorageError)>),
    /// Completed checkpoints exist and every one is corrupt: never a fresh start.
    NoneValid(NoValidCheckpoint),
}

/// The name `_metadata` is moved to when its checkpoint leaves the lineage.
pub const ABANDONED_METADATA: &str = "_metadata.abandoned";

/// A job's checkpoint directory.
#[derive(Clone, Debug)]
pub struct CheckpointStorage {
    store: Arc<dyn ObjectStore>,
    /// Checkpoints aborted in this process (the newest few thousand), shared by every clone:
    /// a writer still running for one removes what it wrote instead of leaving it behind.
    aborted: Arc<std::sync::Mutex<std::collections::BTreeSet<CheckpointId>>>,
    /// The job directory on the local file system (for fsync and display).
    local: PathBuf,
}

fn io(op: &'static str, file: String) -> impl FnOnce(object_store::Error) -> StorageError {
    move |e| StorageError::Io { op, file, source: Box::new(e) }
}

fn std_io(op: &'static str, file: String) -> impl FnOnce(std::io::Error) -> StorageError {
    move |e| StorageError::Io { op, file, source: Box::new(e) }
}

const LINEAGE: &str = "_lineage";

/// Where a run of a job came from: recorded in `<job>/_lineage` at the start of each run.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lineage {
    /// The checkpoint the run restored (`None`: a fresh start).
    pub restored_from: Option<CheckpointId>,
    /// Where that checkpoint lives (its `chk-<n>` directory).
    pub restored_path: Option<String>,
    /// The first checkpoint id of the run; every id it uses is at least this.
    pub first_id: CheckpointId,
    /// Checkpoints the run took out of the lineage.
    pub abandoned: Vec<CheckpointId>,
    /// Wall-clock start of the run (ms since the Unix epoch), for humans.
    pub started_ms: u64,
}

/// The checkpoint a relative path belongs to (`chk-<n>/...`).
fn checkpoint_of(rel: &str) -> Option<CheckpointId> {
    rel.strip_prefix("chk-")?.split_once('/')?.0.parse().ok()
}

/// The directory name of checkpoint `id`.
pub fn checkpoint_dir_name(id: CheckpointId) -> String {
    format!("chk-{id}")
}

impl CheckpointStorage {
    /// Open (creating) `<dir>/<job>`. `dir` is a local path or a `file://` URL.
    pub fn open(dir: &str, job: &str) -> Result<Self, StorageError> {
        let base = match dir.split_once("://") {
            None => PathBuf::from(dir),
            Some(("file", rest)) => PathBuf::from(rest),
            Some((scheme, _)) => {
                return Err(StorageError::Location(format!(
                    "'{dir}': scheme '{scheme}://' is not built into this binary (supported: a local path, file://)"
                )))
            }
        };
        if job.is_empty() || job.contains('/') || job.starts_with('.') {
            return Err(StorageError::Location(format!("job name '{job}' cannot name a directory")));
        }
        let local = base.join(job);
        std::fs::create_dir_all(&local).map_err(std_io("create", local.display().to_string()))?;
        let local = std::fs::canonicalize(&local).map_err(std_io("resolve", local.display().to_string()))?;
        // with_fsync: data is fsynced before the rename that publishes it, so a crash never
        // leaves a published file with unwritten contents.
        let fs = LocalFileSystem::new_with_prefix(&local)
            .map_err(|e| StorageError::Location(format!("'{}': {e}", local.display())))?
            .with_fsync(true);
        Ok(Self { store: Arc::new(fs), aborted: Arc::default(), local })
    }

    /// Open the job directory that holds checkpoint directory `chk_dir` (`.../<job>/chk-<n>`),
    /// returning the storage and `n`.
    pub fn open_checkpoint_path(chk_dir: &str) -> Result<(Self, CheckpointId), StorageError> {
        let p = PathBuf::from(chk_dir.trim_end_matches('/'));
        // A mistyped path is an error, not a new empty job directory.
        if !p.is_dir() {
            return Err(StorageError::Location(format!("'{chk_dir}' is not a checkpoint directory (no such directory)")));
        }
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let id = name
            .strip_prefix("chk-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| StorageError::Location(format!("'{chk_dir}' is not a chk-<n> directory")))?;
        let job_dir = p.parent().ok_or_else(|| StorageError::Location(format!("'{chk_dir}' has no parent")))?;
        let job = job_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let base = job_dir.parent().map(|b| b.to_path_buf()).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        Ok((Self::open(base.to_str().unwrap_or("."), &job)?, id))
    }

    /// The job directory, for messages.
    pub fn location(&self) -> &std::path::Path {
        &self.local
    }

    /// The full name of a file, for messages.
    pub fn display(&self, rel: &str) -> String {
        self.local.join(rel).display().to_string()
    }

    /// Write a file durably: the local store writes a staging file, fsyncs it, renames it into
    /// place and fsyncs every directory it changed (a new `chk-<n>` and the job directory), so
    /// state files are durable before `_metadata` names them. A file of an aborted checkpoint
    /// is refused, or removed again if the abort came while it was being written.
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        let chk = checkpoint_of(rel);
        if let Some(id) = chk.filter(|&id| self.is_aborted(id)) {
            return Err(StorageError::Aborted(id));
        }
        block_on(self.store.put(&Path::from(rel), PutPayload::from(bytes))).map_err(io("write", self.display(rel)))?;
        // The abort's deletion may have listed the directory before this file was published.
        // (Only the checkpoint's own directory: shared files are the abort's to collect.)
        if let Some(id) = chk.filter(|&id| self.is_aborted(id)) {
            self.delete_checkpoint_dir(id)?;
            return Err(StorageError::Aborted(id));
        }
        Ok(())
    }

    /// The same storage with an empty set of aborted checkpoints, for a new attempt: the
    /// previous attempt's writers have all finished (its snapshot pool is joined), and the new
    /// attempt may reuse the id of a checkpoint that was aborted and removed.
    pub fn for_attempt(&self) -> Self {
        Self { aborted: Arc::default(), ..self.clone() }
    }

    fn is_aborted(&self, id: CheckpointId) -> bool {
        self.aborted.lock().map(|a| a.contains(&id)).unwrap_or(false)
    }

    /// Abort checkpoint `id`: remember it (so writers still running clean up after themselves)
    /// and delete what was written of it. Idempotent; cheap after the first call.
    pub fn abort(&self, id: CheckpointId) -> Result<(), StorageError> {
        {
            let Ok(mut a) = self.aborted.lock() else { return Ok(()) };
            if !a.insert(id) {
                return Ok(());
            }
            while a.len() > 4096 {
                a.pop_first();
            }
        }
        self.delete_checkpoint_dir(id)?;
        // Shared files written for an aborted checkpoint may still be listed by a later one (a
        // delta chain goes on across an abort): collect only what the newest completed
        // checkpoint has superseded.
        match self.completed_checkpoints()?.last() {
            Some(&newest) => self.collect_shared(newest.min(id)),
            None => Ok(()),
        }
    }

    /// Read a whole file.
    pub fn read(&self, rel: &str) -> Result<Bytes, StorageError> {
        let file = self.display(rel);
        block_on(async { self.store.get(&Path::from(rel)).await?.bytes().await }).map_err(io("read", file))
    }

    /// Read a byte range of a file.
    pub fn read_range(&self, rel: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        block_on(self.store.get_range(&Path::from(rel), range)).map_err(io("read", self.display(rel)))
    }

    /// Commit checkpoint `meta.id`: write its `_metadata` atomically. After this returns, the
    /// checkpoint exists.
    pub fn commit_metadata(&self, meta: &CheckpointMetadata) -> Result<u64, StorageError> {
        let rel = format!("{}/_metadata", checkpoint_dir_name(meta.id));
        let mut body = serde_json::to_vec_pretty(meta).map_err(|e| StorageError::Corrupt {
            file: self.display(&rel),
            what: format!("cannot encode: {e}"),
        })?;
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(format!("\ncrc32c:{crc:08x}\n").as_bytes());
        let n = body.len() as u64;
        self.put(&rel, body)?;
        Ok(n)
    }

    /// Load and check the `_metadata` of checkpoint `id`.
    pub fn load_metadata(&self, id: CheckpointId) -> Result<CheckpointMetadata, StorageError> {
        self.load_metadata_file(id, &format!("{}/_metadata", checkpoint_dir_name(id)))
    }

    fn load_metadata_file(&self, id: CheckpointId, rel: &str) -> Result<CheckpointMetadata, StorageError> {
        let file = self.display(rel);
        let bytes = self.read(rel)?;
        let corrupt = |what: String| StorageError::Corrupt { file: file.clone(), what };
        let text = &bytes[..];
        let split = text
            .windows(8)
            .rposition(|w| w == b"\ncrc32c:")
            .ok_or_else(|| corrupt("truncated: no checksum trailer".into()))?;
        let body = &text[..split];
        let trailer = std::str::from_utf8(&text[split + 8..]).map_err(|_| corrupt("bad checksum trailer".into()))?;
        let stored = u32::from_str_radix(trailer.trim(), 16).map_err(|_| corrupt("bad checksum trailer".into()))?;
        let actual = crc32c::crc32c(body);
        if stored != actual {
            return Err(corrupt(format!("checksum mismatch: stored {stored:08x}, computed {actual:08x}")));
        }
        let meta: CheckpointMetadata = serde_json::from_slice(body).map_err(|e| corrupt(format!("{e}")))?;
        if meta.version != METADATA_VERSION {
            return Err(corrupt(format!("version {}, this build reads {METADATA_VERSION}", meta.version)));
        }
        if meta.id != id {
            return Err(corrupt(format!("holds checkpoint {} where {id} was expected", meta.id)));
        }
        Ok(meta)
    }

    /// Check every state file of a checkpoint against the sizes and checksums in its metadata.
    pub fn verify(&self, meta: &CheckpointMetadata) -> Result<(), StorageError> {
        for (_, sub) in &meta.subtasks {
            for f in &sub.state_files {
                let bytes = self.read(&f.path)?;
                let crc = crc32c::crc32c(&bytes);
                if bytes.len() as u64 != f.size {
                    return Err(StorageError::Corrupt {
                        file: self.display(&f.path),
                        what: format!("truncated: {} bytes, {} expected", bytes.len(), f.size),
                    });
                }
                if crc != f.crc32c {
                    return Err(StorageError::Corrupt {
                        file: self.display(&f.path),
                        what: format!("checksum mismatch: expected {:08x}, computed {crc:08x}", f.crc32c),
                    });
                }
            }
        }
        Ok(())
    }

    /// Ids of checkpoints that have a `_metadata` file, ascending (not yet validated).
    pub fn completed_checkpoints(&self) -> Result<Vec<CheckpointId>, StorageError> {
        self.checkpoints_holding("_metadata")
    }

    /// Ids of `chk-<n>` directories that hold a file named `file`, ascending.
    fn checkpoints_holding(&self, file: &str) -> Result<Vec<CheckpointId>, StorageError> {
        let listing = block_on(self.store.list_with_delimiter(None)).map_err(io("list", self.display("")))?;
        let mut ids: Vec<_> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.as_ref().strip_prefix("chk-").and_then(|n| n.parse::<u64>().ok()))
            .filter(|id| self.local.join(format!("chk-{id}/{file}")).exists())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Ids of checkpoints with a `_metadata` file (ascending), and the highest id of any
    /// `chk-<n>` directory, complete or not (0 if none): new checkpoints must not reuse it.
    pub fn checkpoint_ids(&self) -> Result<(Vec<CheckpointId>, CheckpointId), StorageError> {
        let listing = block_on(self.store.list_with_delimiter(None)).map_err(io("list", self.display("")))?;
        let newest = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.as_ref().strip_prefix("chk-").and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0);
        Ok((self.completed_checkpoints()?, newest))
    }

    /// The newest checkpoint whose metadata and files all check out. A checkpoint is skipped
    /// (and reported) only when it is provably corrupt; any other error is returned, so that a
    /// transient failure fails the attempt instead of silently restoring an older checkpoint.
    /// Nothing corrupt is ever loaded.
    pub fn latest_valid(&self) -> Result<LatestValid, StorageError> {
        let mut rejected = Vec::new();
        for id in self.completed_checkpoints()?.into_iter().rev() {
            match self.load_metadata(id).and_then(|m| self.verify(&m).map(|()| m)) {
                Ok(m) => return Ok(LatestValid::Found(m, rejected)),
                Err(e) if e.is_corruption() => {
                    tracing::error!("checkpoint {id} is corrupt: {e}");
                    rejected.push((id, e));
                }
                Err(e) => return Err(e),
            }
        }
        if rejected.is_empty() {
            Ok(LatestValid::Empty)
        } else {
            Ok(LatestValid::NoneValid(NoValidCheckpoint { location: self.local.clone(), rejected }))
        }
    }

    /// Take checkpoint `id` out of the lineage: its `_metadata` is moved aside (and the move
    /// fsynced), so it is never restored again, while its files stay for inspection.
    pub fn abandon(&self, id: CheckpointId) -> Result<(), StorageError> {
        let dir = checkpoint_dir_name(id);
        let (from, to) = (format!("{dir}/_metadata"), format!("{dir}/{ABANDONED_METADATA}"));
        // The store fsyncs the directory after the rename (with_fsync).
        block_on(self.store.rename(&Path::from(from.as_str()), &Path::from(to.as_str()))).map_err(io("abandon", self.display(&from)))
    }

    /// Ids of abandoned checkpoints (left the lineage when an older one was restored), ascending.
    pub fn abandoned_checkpoints(&self) -> Result<Vec<CheckpointId>, StorageError> {
        self.checkpoints_holding(ABANDONED_METADATA)
    }

    /// Load the metadata of an abandoned checkpoint (for listing only: never restored).
    pub fn load_abandoned_metadata(&self, id: CheckpointId) -> Result<CheckpointMetadata, StorageError> {
        self.load_metadata_file(id, &format!("{}/{ABANDONED_METADATA}", checkpoint_dir_name(id)))
    }

    /// Record the lineage of a run durably: which checkpoint it restored (none for a fresh
    /// start) and the first id it uses. Written before any sink rolls anything back.
    pub fn record_lineage(&self, lineage: &Lineage) -> Result<(), StorageError> {
        let body = serde_json::to_vec_pretty(lineage).map_err(|e| StorageError::Corrupt { file: self.display(LINEAGE), what: e.to_string() })?;
        self.put(LINEAGE, body)
    }

    /// The lineage of the latest run, if one was recorded.
    pub fn lineage(&self) -> Result<Option<Lineage>, StorageError> {
        match block_on(async { self.store.get(&Path::from(LINEAGE)).await?.bytes().await }) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StorageError::Corrupt { file: self.display(LINEAGE), what: e.to_string() }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io("read", self.display(LINEAGE))(e)),
        }
    }

    /// Delete completed checkpoint `id` (it left retention): `_metadata` first, so a half-deleted
    /// checkpoint never looks valid; then the shared files no completed checkpoint lists any more.
    pub fn discard(&self, id: CheckpointId) -> Result<(), StorageError> {
        self.delete_checkpoint_dir(id)?;
        self.collect_shared(id)
    }

    fn delete_checkpoint_dir(&self, id: CheckpointId) -> Result<(), StorageError> {
        let dir = checkpoint_dir_name(id);
        let meta = Path::from(format!("{dir}/_metadata"));
        match block_on(self.store.delete(&meta)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(io("delete", self.display(&format!("{dir}/_metadata")))(e)),
        }
        let prefix = Path::from(dir.as_str());
        let files: Vec<_> =
            block_on(self.store.list(Some(&prefix)).try_collect::<Vec<_>>()).map_err(io("list", self.display(&dir)))?;
        for f in files {
            block_on(self.store.delete(&f.location)).map_err(io("delete", self.display(f.location.as_ref())))?;
        }
        std::fs::remove_dir_all(self.local.join(&dir)).ok();
        Ok(())
    }

    /// Delete the files under `shared/` that checkpoint `upto` or an older one wrote and that no
    /// completed checkpoint still lists (incremental state: a checkpoint lists files written by
    /// the checkpoints before it). Files of newer checkpoints are left alone: one still being
    /// written may list them. Their names start with `shared/chk<N>-`.
    pub fn collect_shared(&self, upto: CheckpointId) -> Result<(), StorageError> {
        let prefix = Path::from(SHARED_DIR);
        let files: Vec<_> = match block_on(self.store.list(Some(&prefix)).try_collect::<Vec<_>>()) {
            Ok(f) => f,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(io("list", self.display(SHARED_DIR))(e)),
        };
        let old: Vec<_> = files
            .into_iter()
            .filter(|f| shared_file_checkpoint(f.location.as_ref()).is_some_and(|n| n <= upto))
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        let mut listed = std::collections::HashSet::new();
        for id in self.completed_checkpoints()? {
            // A checkpoint that cannot be read lists nothing we could keep alive for it: it is
            // not restorable anyway. (A transient error stops the collection instead.)
            match self.load_metadata(id) {
                Ok(m) => listed.extend(m.subtasks.iter().flat_map(|(_, s)| s.state_files.iter().map(|f| f.path.clone()))),
                Err(e) if e.is_corruption() => {}
                Err(e) => return Err(e),
            }
        }
        for f in old.into_iter().filter(|f| !listed.contains(f.location.as_ref())) {
            match block_on(self.store.delete(&f.location)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(io("delete", self.display(f.location.as_ref()))(e)),
            }
        }
        Ok(())
    }
}

/// The directory of files that several checkpoints may list (incremental state).
pub const SHARED_DIR: &str = "shared";

/// The checkpoint that wrote a shared file: `shared/chk<N>-…`.
fn shared_file_checkpoint(path: &str) -> Option<CheckpointId> {
    let rest = path.strip_prefix(SHARED_DIR)?.strip_prefix("/chk")?;
    rest.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata of a completed checkpoint `id` whose one subtask lists `files`.
    fn meta(id: u64, files: &[&str]) -> CheckpointMetadata {
        let snapshot = weir_checkpoint::SubtaskSnapshot {
            operator_name: "op".into(),
            uid: "op".into(),
            state_files: files
                .iter()
                .map(|p| weir_checkpoint::StateFileHandle { state: "s".into(), path: p.to_string(), size: 1, crc32c: 0, key_groups: vec![], kind: Default::default() })
                .collect(),
            splits: vec![],
            stats: Default::default(),
        };
        let subtasks = if files.is_empty() { vec![] } else { vec![(weir_checkpoint::TaskId::new(0, 0), snapshot)] };
        CheckpointMetadata {
            version: METADATA_VERSION,
            job: "job".into(),
            id,
            triggered_ms: 0,
            completed_ms: 1,
            parallelism: 1,
            max_parallelism: 128,
            is_final: false,
            subtasks,
        }
    }

    fn storage(tag: &str) -> (CheckpointStorage, PathBuf) {
        let dir = std::env::temp_dir().join(format!("weir-storage-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (CheckpointStorage::open(dir.to_str().unwrap(), "job").unwrap(), dir)
    }

    #[test]
    fn shared_files_go_when_no_completed_checkpoint_lists_them() {
        let (s, dir) = storage("shared");
        for f in ["shared/chk1-op-s-0-full.state", "shared/chk2-op-s-0-delta.state", "shared/chk3-op-s-0-full.state", "shared/chk4-op-s-0-delta.state"] {
            s.put(f, vec![1]).unwrap();
        }
        s.commit_metadata(&meta(1, &["shared/chk1-op-s-0-full.state"])).unwrap();
        s.commit_metadata(&meta(2, &["shared/chk1-op-s-0-full.state", "shared/chk2-op-s-0-delta.state"])).unwrap();
        s.commit_metadata(&meta(3, &["shared/chk3-op-s-0-full.state"])).unwrap();
        // Checkpoint 1 leaves: its file is still listed by 2.
        s.discard(1).unwrap();
        assert!(dir.join("job/shared/chk1-op-s-0-full.state").exists(), "listed by checkpoint 2");
        // Checkpoint 2 leaves: 3 starts a new chain, so 1's and 2's files go; the file of
        // checkpoint 4 (not completed yet: it may still be listed) stays.
        s.discard(2).unwrap();
        assert!(!dir.join("job/shared/chk1-op-s-0-full.state").exists());
        assert!(!dir.join("job/shared/chk2-op-s-0-delta.state").exists());
        assert!(dir.join("job/shared/chk3-op-s-0-full.state").exists());
        assert!(dir.join("job/shared/chk4-op-s-0-delta.state").exists());
        // Checkpoint 4 is aborted, but a later checkpoint may list its delta (the chain goes on
        // across an abort): it stays until a completed checkpoint supersedes it.
        s.abort(4).unwrap();
        assert!(dir.join("job/shared/chk4-op-s-0-delta.state").exists(), "an abort collects nothing newer than the newest completed checkpoint");
        s.put("shared/chk5-op-s-0-delta.state", vec![1]).unwrap();
        s.commit_metadata(&meta(5, &["shared/chk3-op-s-0-full.state", "shared/chk4-op-s-0-delta.state", "shared/chk5-op-s-0-delta.state"])).unwrap();
        s.discard(3).unwrap();
        assert!(dir.join("job/shared/chk3-op-s-0-full.state").exists() && dir.join("job/shared/chk4-op-s-0-delta.state").exists(), "listed by 5");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_mistyped_restore_path_creates_nothing() {
        let dir = std::env::temp_dir().join(format!("weir-storage-typo-{}", std::process::id()));
        let typo = dir.join("job/chk-7");
        assert!(CheckpointStorage::open_checkpoint_path(typo.to_str().unwrap()).is_err());
        assert!(!dir.exists(), "nothing created for a path that does not exist");
    }

    #[test]
    fn a_writer_of_an_aborted_checkpoint_leaves_nothing_behind() {
        let (s, dir) = storage("abort");
        // Written before the abort: removed by it.
        s.put("chk-3/a.state", vec![1; 100]).unwrap();
        s.abort(3).unwrap();
        assert!(!dir.join("job/chk-3").exists(), "the aborted checkpoint's directory is removed");
        // A writer still running after the abort: refused, nothing appears.
        assert!(matches!(s.put("chk-3/b.state", vec![2; 100]), Err(StorageError::Aborted(3))));
        assert!(!dir.join("job/chk-3").exists());
        // Other checkpoints are unaffected, and a second abort is a no-op.
        s.put("chk-4/a.state", vec![3; 10]).unwrap();
        s.abort(3).unwrap();
        assert_eq!(&s.read("chk-4/a.state").unwrap()[..], &[3; 10]);
        // A new attempt may reuse the id of a checkpoint that was aborted and removed.
        s.for_attempt().put("chk-3/c.state", vec![4; 10]).unwrap();
        assert!(dir.join("job/chk-3/c.state").exists());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn abandoned_checkpoints_leave_the_lineage_and_transient_errors_are_not_corruption() {
        let (s, dir) = storage("abandon");
        for id in [1, 2] {
            s.commit_metadata(&meta(id, &[])).unwrap();
        }
        s.abandon(2).unwrap();
        assert_eq!(s.completed_checkpoints().unwrap(), vec![1]);
        assert_eq!(s.abandoned_checkpoints().unwrap(), vec![2]);
        assert_eq!(s.load_abandoned_metadata(2).unwrap().id, 2);
        assert!(matches!(s.latest_valid().unwrap(), LatestValid::Found(m, _) if m.id == 1));
        // A missing file proves corruption; an unreadable one (a symlink loop: ELOOP) does not.
        let missing = s.read("chk-1/nope").unwrap_err();
        assert!(missing.is_corruption(), "{missing}");
        std::os::unix::fs::symlink(dir.join("job/chk-1/loop"), dir.join("job/chk-1/loop")).unwrap();
        let eloop = s.read("chk-1/loop").unwrap_err();
        assert!(!eloop.is_corruption(), "{eloop}");
        std::fs::remove_dir_all(dir).ok();
    }
}

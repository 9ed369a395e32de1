//! Checkpoint storage for Weir: state files, the `_metadata` commit and discovery of the latest
//! valid checkpoint, on a local directory or an S3-compatible object store.
//!
//! Layout: `<dir>/<job>/chk-<n>/<files>`, `<dir>/<job>/shared/<files>` (files several
//! checkpoints list) and `<dir>/<job>/chk-<n>/_metadata`, written last and only if absent
//! (`PutMode::Create`: a checkpoint another writer committed is never overwritten). A checkpoint
//! without a valid `_metadata` does not exist.
//!
//! `dir` (`execution.checkpointing.dir`) is a local path, a `file://` URL or `s3://bucket/prefix`.
//! Locally every file is published atomically and durably (staging file, fsync, rename, fsync of
//! the directory). On S3 a put is atomic by itself; files above [`MULTIPART_THRESHOLD`] go up in
//! parts ([`CheckpointStorage::put_file`] streams them from disk). S3 settings come from the
//! standard AWS environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, …), overridden by Flink's keys passed
//! to [`CheckpointStorage::open_with`]: `s3.endpoint`, `s3.access-key`, `s3.secret-key`,
//! `s3.region`, `s3.path.style.access`. An `http://` endpoint is allowed as given.
//!
//! A store that cannot be reached gives [`StorageError::Io`], never corruption nor "no
//! checkpoints": a checkpoint is declined and the job goes on; a restore fails and is retried.
//!
//! Depends on `object_store` (with its S3 client: reqwest, rustls) and `weir-checkpoint`; the
//! engine (`weir`) depends on it, never the other way round.
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

mod location;

use std::io::{Read, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use weir_checkpoint::{CheckpointId, CheckpointMetadata, METADATA_VERSION};

use location::{Dir, Executor};
pub use location::STORAGE_OPTIONS;

/// Files larger than this are uploaded in parts of [`MULTIPART_PART_SIZE`] (S3 retries a part,
/// not the whole file; memory stays bounded for files streamed from disk).
pub const MULTIPART_THRESHOLD: u64 = MULTIPART_PART_SIZE as u64;

/// The size of each part of a multipart upload but the last (S3 requires at least 5 MiB).
pub const MULTIPART_PART_SIZE: usize = 16 << 20;

/// Parts of one upload in flight at once: with the part being read, at most three parts'
/// worth of memory per upload.
const PARTS_IN_FLIGHT: usize = 2;

/// Errors of checkpoint storage; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O error on a file, the store unreachable among them.
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
    /// A storage option (`s3.*`) cannot be used.
    #[error("{key}: {message}")]
    Config {
        /// The option's key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The checkpoint was aborted: nothing more is written into it.
    #[error("checkpoint {0} was aborted")]
    Aborted(CheckpointId),
    /// The checkpoint's `_metadata` exists already: another writer committed this id.
    #[error("{file} exists already: checkpoint {id} was committed by another writer; not overwritten")]
    AlreadyCommitted {
        /// The checkpoint.
        id: CheckpointId,
        /// Its `_metadata` file.
        file: String,
    },
}

impl StorageError {
    /// Whether this error proves the checkpoint corrupt (checksum mismatch, truncation, bad
    /// `_metadata`, a missing file), as opposed to a transient failure to read it (EIO, EMFILE,
    /// a timeout, the store unreachable) after which the same checkpoint may well be readable.
    /// Only proven corruption may make a restore fall back to an older checkpoint.
    pub fn is_corruption(&self) -> bool {
        match self {
            StorageError::Corrupt { .. } => true,
            StorageError::Io { source, .. } => match source.downcast_ref::<object_store::Error>() {
                // A missing bucket (S3 answers 404 for it too) says nothing about the checkpoint.
                Some(e @ object_store::Error::NotFound { .. }) => !mentions(e, "NoSuchBucket"),
                _ => false,
            },
            StorageError::Location(_) | StorageError::Config { .. } | StorageError::Aborted(_) | StorageError::AlreadyCommitted { .. } => {
                false
            }
        }
    }

    /// Whether the file was not there (deleted meanwhile, or never written).
    fn is_not_found(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if matches!(source.downcast_ref::<object_store::Error>(), Some(object_store::Error::NotFound { .. })))
    }
}

/// Whether `e` or one of its sources says `what`.
fn mentions(e: &(dyn std::error::Error + 'static), what: &str) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.to_string().contains(what) {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Why no checkpoint could be restored although completed checkpoints exist.
#[derive(Debug)]
pub struct NoValidCheckpoint {
    /// The job directory (for S3, its `s3://` URL as a path).
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

/// The size and CRC-32C of a file moved between the store and a local disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileDigest {
    /// Bytes.
    pub size: u64,
    /// CRC-32C (Castagnoli) of the whole file, as `StateFileHandle::crc32c` records it.
    pub crc32c: u32,
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
    /// Held while shared files are collected: one collection at a time per process.
    collecting: Arc<std::sync::Mutex<()>>,
    /// The job directory: a canonical local path, or the `s3://bucket/prefix/job` URL as a
    /// path (for comparison and messages).
    location: PathBuf,
    /// `s3://bucket/prefix/job` for S3; `None` for a local directory.
    url: Option<String>,
    exec: Executor,
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

fn valid_job_name(job: &str) -> Result<(), StorageError> {
    if job.is_empty() || job.contains('/') || job.starts_with('.') {
        return Err(StorageError::Location(format!("job name '{job}' cannot name a directory")));
    }
    Ok(())
}

impl CheckpointStorage {
    /// Open (creating) `<dir>/<job>` with no storage options: [`Self::open_with`].
    pub fn open(dir: &str, job: &str) -> Result<Self, StorageError> {
        Self::open_with(dir, job, &[])
    }

    /// Open `<dir>/<job>`. `dir` is a local path or `file://` URL (the directory is created) or
    /// `s3://bucket/prefix` (nothing is created nor contacted yet). `options` are Flink's
    /// `s3.*` keys ([`STORAGE_OPTIONS`]); they override the AWS environment variables and are
    /// ignored for a local directory.
    pub fn open_with(dir: &str, job: &str, options: &[(String, String)]) -> Result<Self, StorageError> {
        valid_job_name(job)?;
        match Dir::parse(dir)? {
            Dir::Local(base) => {
                let (store, local) = location::local_store(&base.join(job))?;
                Ok(Self { store, aborted: Arc::default(), collecting: Arc::default(), location: local, url: None, exec: Executor::Inline })
            }
            Dir::S3 { bucket, prefix } => {
                let key_prefix = if prefix.is_empty() { job.to_string() } else { format!("{prefix}/{job}") };
                let (store, exec) = location::s3_store(&bucket, &key_prefix, options)?;
                let url = Dir::s3_url(&bucket, &key_prefix);
                Ok(Self { store, aborted: Arc::default(), collecting: Arc::default(), location: PathBuf::from(&url), url: Some(url), exec })
            }
        }
    }

    /// Open the job directory that holds checkpoint directory `chk_dir` (`.../<job>/chk-<n>`),
    /// returning the storage and `n`: [`Self::open_checkpoint_path_with`] without options.
    pub fn open_checkpoint_path(chk_dir: &str) -> Result<(Self, CheckpointId), StorageError> {
        Self::open_checkpoint_path_with(chk_dir, &[])
    }

    /// Open the job directory that holds checkpoint directory `chk_dir` (`.../<job>/chk-<n>`,
    /// local or `s3://bucket/prefix/<job>/chk-<n>`), returning the storage and `n`. A path
    /// under which nothing is stored is an error, and creates nothing; an unreachable store is
    /// [`StorageError::Io`].
    pub fn open_checkpoint_path_with(chk_dir: &str, options: &[(String, String)]) -> Result<(Self, CheckpointId), StorageError> {
        let trimmed = chk_dir.trim_end_matches('/');
        let (job_dir, name) = trimmed.rsplit_once('/').unwrap_or((".", trimmed));
        let id = name
            .strip_prefix("chk-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| StorageError::Location(format!("'{chk_dir}' is not a chk-<n> directory")))?;
        if let Dir::Local(p) = Dir::parse(trimmed)? {
            // A mistyped path is an error, not a new empty job directory.
            if !p.is_dir() {
                return Err(StorageError::Location(format!("'{chk_dir}' is not a checkpoint directory (no such directory)")));
            }
        }
        let s = Self::open_job_dir_with(if job_dir.is_empty() { "/" } else { job_dir }, options)?;
        if s.url.is_some() && !s.holds_anything(Some(&checkpoint_dir_name(id)))? {
            return Err(StorageError::Location(format!("'{chk_dir}' is not a checkpoint directory (nothing stored under it)")));
        }
        Ok((s, id))
    }

    /// Open an existing job directory (`<dir>/<job>`, local or `s3://…/<job>`), for tools: a
    /// local path that is not a directory, or an S3 prefix under which nothing is stored, is
    /// an error.
    pub fn open_job_dir_with(job_dir: &str, options: &[(String, String)]) -> Result<Self, StorageError> {
        let trimmed = job_dir.trim_end_matches('/');
        let (base, job) = match Dir::parse(trimmed)? {
            Dir::Local(p) => {
                if !p.is_dir() {
                    return Err(StorageError::Location(format!("'{job_dir}' is not a job directory (no such directory)")));
                }
                let p = std::fs::canonicalize(&p).map_err(std_io("resolve", job_dir.to_string()))?;
                let job = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                let base = p.parent().map(|b| b.display().to_string()).unwrap_or_else(|| "/".into());
                (base, job)
            }
            Dir::S3 { bucket, prefix } => {
                let (base, job) = prefix.rsplit_once('/').unwrap_or(("", &prefix));
                if job.is_empty() {
                    return Err(StorageError::Location(format!("'{job_dir}' names a bucket, not a job directory (s3://bucket/prefix/<job>)")));
                }
                (Dir::s3_url(&bucket, base), job.to_string())
            }
        };
        let s = Self::open_with(&base, &job, options)?;
        if s.url.is_some() && !s.holds_anything(None)? {
            return Err(StorageError::Location(format!("'{job_dir}' is not a job directory (nothing stored under it)")));
        }
        Ok(s)
    }

    /// Whether anything is stored under `dir` (relative; `None`: the job directory).
    fn holds_anything(&self, dir: Option<&str>) -> Result<bool, StorageError> {
        let prefix = dir.map(Path::from);
        match self.exec.block_on(self.store.list_with_delimiter(prefix.as_ref())) {
            Ok(l) => Ok(!l.objects.is_empty() || !l.common_prefixes.is_empty()),
            Err(e) => Err(io("list", self.display(dir.unwrap_or("")))(e)),
        }
    }

    /// The job directory, for messages and comparison: a local path, or the job's
    /// `s3://bucket/prefix/job` URL as a path (`join` and `display` keep it a URL).
    pub fn location(&self) -> &std::path::Path {
        &self.location
    }

    /// Whether the job directory is on an object store (not a local directory).
    pub fn is_remote(&self) -> bool {
        self.url.is_some()
    }

    /// The full name of a file, for messages: a local path or `s3://bucket/prefix/job/rel`.
    pub fn display(&self, rel: &str) -> String {
        match &self.url {
            Some(url) => format!("{url}/{rel}"),
            None => self.location.join(rel).display().to_string(),
        }
    }

    /// Write a file durably: the local store writes a staging file, fsyncs it, renames it into
    /// place and fsyncs every directory it changed (a new `chk-<n>` and the job directory), so
    /// state files are durable before `_metadata` names them; S3 publishes a put atomically.
    /// Above [`MULTIPART_THRESHOLD`] the bytes go up in parts. A file of an aborted checkpoint
    /// is refused, or removed again if the abort came while it was being written.
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        let bytes = Bytes::from(bytes);
        self.put_guarded(rel, || {
            if bytes.len() as u64 <= MULTIPART_THRESHOLD {
                return self.exec.block_on(self.store.put(&Path::from(rel), PutPayload::from(bytes.clone()))).map(|_| ()).map_err(io("write", self.display(rel)));
            }
            let mut parts = bytes.chunks(MULTIPART_PART_SIZE).map(|c| bytes.slice_ref(c));
            self.put_parts(rel, || Ok(parts.next()))
        })
    }

    /// Upload local file `local_path` as `rel`, streaming it (parts of [`MULTIPART_PART_SIZE`]
    /// above [`MULTIPART_THRESHOLD`]: a file of many GB never sits in memory), with the same
    /// guarantees as [`Self::put`]. Returns its size and CRC-32C, computed on the way.
    pub fn put_file(&self, rel: &str, local_path: &std::path::Path) -> Result<FileDigest, StorageError> {
        let shown = local_path.display().to_string();
        let mut file = std::fs::File::open(local_path).map_err(std_io("open", shown.clone()))?;
        let size = file.metadata().map_err(std_io("stat", shown.clone()))?.len();
        let mut digest = FileDigest { size: 0, crc32c: 0 };
        self.put_guarded(rel, || {
            let mut next = || -> Result<Option<Bytes>, StorageError> {
                let mut buf = Vec::with_capacity(MULTIPART_PART_SIZE.min(size as usize));
                (&mut file).take(MULTIPART_PART_SIZE as u64).read_to_end(&mut buf).map_err(std_io("read", shown.clone()))?;
                if buf.is_empty() {
                    return Ok(None);
                }
                digest.size += buf.len() as u64;
                digest.crc32c = crc32c::crc32c_append(digest.crc32c, &buf);
                Ok(Some(Bytes::from(buf)))
            };
            if size <= MULTIPART_THRESHOLD {
                let body = next()?.unwrap_or_default();
                return self.exec.block_on(self.store.put(&Path::from(rel), PutPayload::from(body))).map(|_| ()).map_err(io("write", self.display(rel)));
            }
            self.put_parts(rel, next)
        })?;
        if digest.size != size {
            return Err(StorageError::Io {
                op: "upload",
                file: shown,
                source: format!("the file changed while it was uploaded ({size} bytes, then {})", digest.size).into(),
            });
        }
        Ok(digest)
    }

    /// Run `write` (which stores `rel`) unless `rel`'s checkpoint is aborted, and remove what
    /// it wrote if the abort came meanwhile.
    fn put_guarded(&self, rel: &str, write: impl FnOnce() -> Result<(), StorageError>) -> Result<(), StorageError> {
        let chk = checkpoint_of(rel);
        if let Some(id) = chk.filter(|&id| self.is_aborted(id)) {
            return Err(StorageError::Aborted(id));
        }
        write()?;
        // The abort's deletion may have listed the directory before this file was published.
        // (Only the checkpoint's own directory: shared files are the abort's to collect.)
        if let Some(id) = chk.filter(|&id| self.is_aborted(id)) {
            self.delete_checkpoint_dir(id)?;
            return Err(StorageError::Aborted(id));
        }
        Ok(())
    }

    /// A multipart upload of `rel` from the parts `next` yields, [`PARTS_IN_FLIGHT`] at a time;
    /// aborted (nothing published) on any error.
    fn put_parts(&self, rel: &str, mut next: impl FnMut() -> Result<Option<Bytes>, StorageError>) -> Result<(), StorageError> {
        let file = self.display(rel);
        let mut upload = self.exec.block_on(self.store.put_multipart(&Path::from(rel))).map_err(io("start upload of", file.clone()))?;
        let mut in_flight: std::collections::VecDeque<futures::future::BoxFuture<'static, Result<(), object_store::Error>>> =
            std::collections::VecDeque::new();
        let result = (|| {
            while let Some(part) = next()? {
                if in_flight.len() == PARTS_IN_FLIGHT {
                    let done = in_flight.pop_front().expect("full");
                    self.exec.block_on(done).map_err(io("upload a part of", file.clone()))?;
                }
                in_flight.push_back(self.exec.start(upload.put_part(PutPayload::from(part))));
            }
            for done in in_flight.drain(..) {
                self.exec.block_on(done).map_err(io("upload a part of", file.clone()))?;
            }
            self.exec.block_on(upload.complete()).map(|_| ()).map_err(io("complete upload of", file.clone()))
        })();
        if result.is_err() {
            // Parts still running fail or finish on their own; the abort discards them all.
            drop(in_flight);
            if let Err(e) = self.exec.block_on(upload.abort()) {
                tracing::warn!("aborting the upload of {file}: {e}");
            }
        }
        result
    }

    /// Download `rel` to local file `local_path`, streaming it (for restores of large files).
    /// The file appears under its name only once whole; returns its size and CRC-32C.
    pub fn get_to_file(&self, rel: &str, local_path: &std::path::Path) -> Result<FileDigest, StorageError> {
        let file = self.display(rel);
        let name = local_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let partial = local_path.with_file_name(format!(".{name}.download-{}", std::process::id()));
        let shown = partial.display().to_string();
        let result = self.exec.block_on(async {
            let got = self.store.get(&Path::from(rel)).await.map_err(io("read", file.clone()))?;
            let mut out = std::fs::File::create(&partial).map_err(std_io("create", shown.clone()))?;
            let mut digest = FileDigest { size: 0, crc32c: 0 };
            let mut chunks = got.into_stream();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(io("read", file.clone()))?;
                digest.size += chunk.len() as u64;
                digest.crc32c = crc32c::crc32c_append(digest.crc32c, &chunk);
                out.write_all(&chunk).map_err(std_io("write", shown.clone()))?;
            }
            out.flush().map_err(std_io("write", shown.clone()))?;
            Ok::<_, StorageError>(digest)
        });
        let result = result.and_then(|d| {
            std::fs::rename(&partial, local_path).map_err(std_io("rename", local_path.display().to_string()))?;
            Ok(d)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
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
        // Only the checkpoint's own directory. Shared files written for it may still be listed
        // by a later checkpoint (a delta chain or an SST goes on across an abort); the next
        // discard collects them. (An abort runs on every process, concurrently with the
        // coordinator's commits and discards: collecting here raced them and could delete files
        // the newest completed checkpoint lists.)
        self.delete_checkpoint_dir(id)
    }

    /// Read a whole file.
    pub fn read(&self, rel: &str) -> Result<Bytes, StorageError> {
        let file = self.display(rel);
        self.exec.block_on(async { self.store.get(&Path::from(rel)).await?.bytes().await }).map_err(io("read", file))
    }

    /// Read a byte range of a file.
    pub fn read_range(&self, rel: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        self.exec.block_on(self.store.get_range(&Path::from(rel), range)).map_err(io("read", self.display(rel)))
    }

    /// Commit checkpoint `meta.id`: write its `_metadata`, atomically and only if it does not
    /// exist ([`StorageError::AlreadyCommitted`] otherwise: a checkpoint another writer
    /// committed is never overwritten). After this returns, the checkpoint exists.
    pub fn commit_metadata(&self, meta: &CheckpointMetadata) -> Result<u64, StorageError> {
        let rel = format!("{}/_metadata", checkpoint_dir_name(meta.id));
        let mut body = serde_json::to_vec_pretty(meta).map_err(|e| StorageError::Corrupt {
            file: self.display(&rel),
            what: format!("cannot encode: {e}"),
        })?;
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(format!("\ncrc32c:{crc:08x}\n").as_bytes());
        let n = body.len() as u64;
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.put_guarded(&rel, || match self.exec.block_on(self.store.put_opts(&Path::from(rel.as_str()), PutPayload::from(body), opts)) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(StorageError::AlreadyCommitted { id: meta.id, file: self.display(&rel) }),
            Err(e) => Err(io("write", self.display(&rel))(e)),
        })?;
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
        if !(1..=METADATA_VERSION).contains(&meta.version) {
            return Err(corrupt(format!("version {}, this build reads {METADATA_VERSION}", meta.version)));
        }
        if meta.id != id {
            return Err(corrupt(format!("holds checkpoint {} where {id} was expected", meta.id)));
        }
        Ok(meta)
    }

    /// Check every state file of a checkpoint against the sizes and checksums in its metadata,
    /// streaming each file (a large one never sits in memory whole).
    pub fn verify(&self, meta: &CheckpointMetadata) -> Result<(), StorageError> {
        for (_, sub) in &meta.subtasks {
            for f in &sub.state_files {
                let file = self.display(&f.path);
                let digest = self
                    .exec
                    .block_on(async {
                        let mut chunks = self.store.get(&Path::from(f.path.as_str())).await?.into_stream();
                        let mut d = FileDigest { size: 0, crc32c: 0 };
                        while let Some(chunk) = chunks.try_next().await? {
                            d.size += chunk.len() as u64;
                            d.crc32c = crc32c::crc32c_append(d.crc32c, &chunk);
                        }
                        Ok::<_, object_store::Error>(d)
                    })
                    .map_err(io("read", file.clone()))?;
                if digest.size != f.size {
                    return Err(StorageError::Corrupt { file, what: format!("truncated: {} bytes, {} expected", digest.size, f.size) });
                }
                if digest.crc32c != f.crc32c {
                    return Err(StorageError::Corrupt {
                        file,
                        what: format!("checksum mismatch: expected {:08x}, computed {:08x}", f.crc32c, digest.crc32c),
                    });
                }
            }
        }
        Ok(())
    }

    /// Ids of checkpoints that have a `_metadata` file, ascending (not yet validated).
    pub fn completed_checkpoints(&self) -> Result<Vec<CheckpointId>, StorageError> {
        self.checkpoints_holding(&self.checkpoint_dirs()?, "_metadata")
    }

    /// Ids of the `chk-<n>` directories, ascending. An unreachable store is an error, never
    /// an empty job directory.
    fn checkpoint_dirs(&self) -> Result<Vec<CheckpointId>, StorageError> {
        let listing = self.exec.block_on(self.store.list_with_delimiter(None)).map_err(io("list", self.display("")))?;
        let mut ids: Vec<_> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.as_ref().strip_prefix("chk-").and_then(|n| n.parse::<u64>().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Those of checkpoint directories `dirs` that hold a file named `file`, ascending.
    fn checkpoints_holding(&self, dirs: &[CheckpointId], file: &str) -> Result<Vec<CheckpointId>, StorageError> {
        let heads = futures::stream::iter(dirs.iter().map(|&id| {
            let rel = format!("{}/{file}", checkpoint_dir_name(id));
            async move {
                match self.store.head(&Path::from(rel.as_str())).await {
                    Ok(_) => Ok(Some(id)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(io("stat", self.display(&rel))(e)),
                }
            }
        }))
        // Several requests at once: one round trip per directory adds up on S3.
        .buffered(16)
        .try_collect::<Vec<_>>();
        Ok(self.exec.block_on(heads)?.into_iter().flatten().collect())
    }

    /// Ids of checkpoints with a `_metadata` file (ascending), and the highest id of any
    /// `chk-<n>` directory, complete or not (0 if none): new checkpoints must not reuse it.
    pub fn checkpoint_ids(&self) -> Result<(Vec<CheckpointId>, CheckpointId), StorageError> {
        let dirs = self.checkpoint_dirs()?;
        let newest = dirs.last().copied().unwrap_or(0);
        Ok((self.checkpoints_holding(&dirs, "_metadata")?, newest))
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
            Ok(LatestValid::NoneValid(NoValidCheckpoint { location: self.location.clone(), rejected }))
        }
    }

    /// Take checkpoint `id` out of the lineage: its `_metadata` is moved aside (and the move
    /// fsynced locally), so it is never restored again, while its files stay for inspection.
    /// (On S3 the move is a copy and a delete: a crash between the two leaves both, and the
    /// next run abandons it again.)
    pub fn abandon(&self, id: CheckpointId) -> Result<(), StorageError> {
        let dir = checkpoint_dir_name(id);
        let (from, to) = (format!("{dir}/_metadata"), format!("{dir}/{ABANDONED_METADATA}"));
        // The local store fsyncs the directory after the rename (with_fsync).
        self.exec
            .block_on(self.store.rename(&Path::from(from.as_str()), &Path::from(to.as_str())))
            .map_err(io("abandon", self.display(&from)))
    }

    /// Ids of abandoned checkpoints (left the lineage when an older one was restored), ascending.
    pub fn abandoned_checkpoints(&self) -> Result<Vec<CheckpointId>, StorageError> {
        self.checkpoints_holding(&self.checkpoint_dirs()?, ABANDONED_METADATA)
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
        match self.exec.block_on(async { self.store.get(&Path::from(LINEAGE)).await?.bytes().await }) {
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

    /// Delete every file of `chk-<id>`, `_metadata` first (listed and deleted through the
    /// store: on S3 a directory is only a prefix), then the empty local directory.
    fn delete_checkpoint_dir(&self, id: CheckpointId) -> Result<(), StorageError> {
        let dir = checkpoint_dir_name(id);
        let meta = format!("{dir}/_metadata");
        match self.exec.block_on(self.store.delete(&Path::from(meta.as_str()))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(io("delete", self.display(&meta))(e)),
        }
        let files = self.list_files(&dir)?;
        self.delete_files(&dir, files)?;
        if self.url.is_none() {
            // Only the (now empty) directories are left; a stray staging file of a writer
            // killed mid-upload goes with them.
            std::fs::remove_dir_all(self.location.join(&dir)).ok();
        }
        Ok(())
    }

    /// The files under `dir` (relative; none if it does not exist).
    fn list_files(&self, dir: &str) -> Result<Vec<Path>, StorageError> {
        let prefix = Path::from(dir);
        match self.exec.block_on(self.store.list(Some(&prefix)).map_ok(|m| m.location).try_collect::<Vec<_>>()) {
            Ok(f) => Ok(f),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(io("list", self.display(dir))(e)),
        }
    }

    /// Delete `files` under `dir` (batched on S3); ones already gone are fine.
    fn delete_files(&self, dir: &str, files: Vec<Path>) -> Result<(), StorageError> {
        if files.is_empty() {
            return Ok(());
        }
        let results = self.exec.block_on(
            self.store.delete_stream(futures::stream::iter(files.into_iter().map(Ok)).boxed()).collect::<Vec<_>>(),
        );
        for r in results {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(io("delete files in", self.display(dir))(e)),
            }
        }
        Ok(())
    }

    /// Delete the files under `shared/` that checkpoint `upto` or an older one wrote and that no
    /// completed checkpoint still lists (incremental state: a checkpoint lists files written by
    /// the checkpoints before it). Files of newer checkpoints are left alone: one still being
    /// written may list them. Their names start with `shared/chk<N>-`.
    pub fn collect_shared(&self, upto: CheckpointId) -> Result<(), StorageError> {
        let old: Vec<_> = self
            .list_files(SHARED_DIR)?
            .into_iter()
            .filter(|f| shared_file_checkpoint(f.as_ref()).is_some_and(|n| n <= upto))
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        // One collection at a time in this process (discards run on a pool).
        let _one = self.collecting.lock().unwrap_or_else(|p| p.into_inner());
        // The shared-state registry of the retained checkpoints: a file goes when none lists it.
        let mut registry = weir_checkpoint::SharedStateRegistry::default();
        let listed = self.completed_checkpoints()?;
        for &id in &listed {
            match self.load_metadata(id) {
                Ok(m) => registry.register(m.subtasks.iter().flat_map(|(_, s)| s.state_files.iter().map(|f| f.path.as_str()))),
                // Listed a moment ago and gone now: another discard is running. What it lists
                // is unknown, so nothing is deleted this time (the next discard collects).
                Err(e) if e.is_not_found() => return Ok(()),
                // A checkpoint that cannot be read lists nothing we could keep alive for it: it
                // is not restorable anyway. (A transient error stops the collection instead.)
                Err(e) if e.is_corruption() => {}
                Err(e) => return Err(e),
            }
        }
        // A checkpoint committed meanwhile may list what the registry does not hold.
        if self.completed_checkpoints()? != listed {
            return Ok(());
        }
        self.delete_files(SHARED_DIR, old.into_iter().filter(|f| registry.references(f.as_ref()) == 0).collect())
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
        assert!(dir.join("job/shared/chk4-op-s-0-delta.state").exists(), "an abort collects no shared file");
        s.put("shared/chk5-op-s-0-delta.state", vec![1]).unwrap();
        s.commit_metadata(&meta(5, &["shared/chk3-op-s-0-full.state", "shared/chk4-op-s-0-delta.state", "shared/chk5-op-s-0-delta.state"])).unwrap();
        s.discard(3).unwrap();
        assert!(dir.join("job/shared/chk3-op-s-0-full.state").exists() && dir.join("job/shared/chk4-op-s-0-delta.state").exists(), "listed by 5");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn metadata_is_committed_once_locally() {
        let (s, dir) = storage("once");
        s.commit_metadata(&meta(3, &[])).unwrap();
        let mut second = meta(3, &[]);
        second.completed_ms = 99;
        let e = s.commit_metadata(&second).unwrap_err();
        assert!(matches!(e, StorageError::AlreadyCommitted { id: 3, .. }), "{e}");
        assert!(e.to_string().contains(&s.display("chk-3/_metadata")), "names the file: {e}");
        assert_eq!(s.load_metadata(3).unwrap().completed_ms, 1, "the first commit stands");
        let staged: Vec<_> = std::fs::read_dir(dir.join("job/chk-3")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(staged, vec![std::ffi::OsString::from("_metadata")], "no staging file left behind");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn large_local_files_stream_both_ways() {
        let (s, dir) = storage("big");
        assert_eq!(s.display("chk-1/x"), dir.canonicalize().unwrap().join("job/chk-1/x").display().to_string());
        assert!(!s.is_remote());
        let big: Vec<u8> = (0..2 * MULTIPART_PART_SIZE + 777).map(|i| (i * 31 % 251) as u8).collect();
        let src = dir.join("src.sst");
        std::fs::write(&src, &big).unwrap();
        let up = s.put_file("shared/chk1-a.sst", &src).unwrap();
        assert_eq!(up, FileDigest { size: big.len() as u64, crc32c: crc32c::crc32c(&big) });
        assert!(std::fs::read(dir.join("job/shared/chk1-a.sst")).unwrap() == big);
        let back = dir.join("back.sst");
        assert_eq!(s.get_to_file("shared/chk1-a.sst", &back).unwrap(), up);
        assert!(std::fs::read(&back).unwrap() == big);
        // Refused for an aborted checkpoint, and nothing appears.
        s.abort(2).unwrap();
        assert!(matches!(s.put_file("chk-2/a.sst", &src), Err(StorageError::Aborted(2))));
        assert!(!dir.join("job/chk-2").exists());
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

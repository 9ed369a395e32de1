//! An operator instance's RocksDB (`state.backend.type: rocksdb`): where its directory is, what
//! its snapshots uploaded (incremental checkpoints upload only SST files not already in
//! storage), and the fast restore that downloads a checkpoint's files and opens them as the
//! database (same parallelism, same key groups: Flink's restore without rescaling).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use weir_checkpoint::{StateFileHandle, StateFileKind, SubtaskSnapshot};
use weir_state::keygroup::KeyGroupRange;
use weir_state::rocks::{RocksBackend, RocksMap};
use weir_state::StateError;
use weir_storage::CheckpointStorage;

use super::chain::Chain;
use super::local::StateReader;
use crate::{Data, Key};

/// One operator instance's database and what its snapshots have uploaded.
pub(crate) struct RocksInstance {
    pub db: RocksBackend,
    /// Where native checkpoints are made (hard links: the same file system as the database).
    pub snapshots: PathBuf,
    /// The SST files of the last snapshot that joined the chain, by file name: an incremental
    /// snapshot lists these instead of uploading them again.
    pub uploaded: Mutex<HashMap<String, StateFileHandle>>,
    /// Snapshots are written in checkpoint order.
    pub chain: Arc<Chain>,
    /// Who this is, for messages.
    pub owner: String,
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

impl RocksInstance {
    /// A database for operator instance `owner` under `base` (`weir.state.rocksdb.dir`, else the
    /// temp dir), removed when the instance ends. `restore`: the snapshot of this very instance
    /// (same parallelism) in the checkpoint being restored; when it holds a RocksDB checkpoint,
    /// its files are downloaded (checksums checked) and opened as the database.
    /// `reuse`: the restored checkpoint is in this job's checkpoint directory, so its SST files
    /// may be listed by the next checkpoints instead of uploaded again (a checkpoint elsewhere
    /// is never listed: it could be deleted with its job, as Flink's NO_CLAIM restore mode).
    pub fn open(base: Option<&str>, owner_dir: &str, owner: &str, subtask: u32, restore: Option<(&mut StateReader<'_>, &SubtaskSnapshot)>, reuse: bool) -> Result<(Arc<Self>, bool), String> {
        let base = base.map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("weir-rocksdb"));
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            remove_stale(&base);
        }
        let root = base.join(format!("{}-{n}", std::process::id())).join(owner_dir);
        let (dir, snapshots) = (root.join("db"), root.join("snapshots"));
        let mkdir = |d: &Path| std::fs::create_dir_all(d).map_err(|e| format!("{owner}: weir.state.rocksdb.dir: creating {}: {e}", d.display()));
        mkdir(&snapshots)?;
        let files: Vec<&StateFileHandle> = restore.as_ref().map(|(_, s)| s.state_files.iter().filter(|f| f.kind == StateFileKind::RocksDb).collect()).unwrap_or_default();
        let (db, uploaded, restored) = match restore.filter(|_| !files.is_empty()) {
            Some((reader, sub)) => {
                reader.task(&sub.uid, subtask);
                mkdir(&dir)?;
                for f in &files {
                    check_name(f).and_then(|()| reader.fetch(f, &dir.join(&f.state))).map_err(|e| format!("{owner}: restoring RocksDB: {e}"))?;
                }
                let db = RocksBackend::open_restored(&dir, false).map_err(|e| format!("{owner}: {e}"))?;
                let ssts = files.iter().filter(|f| reuse && f.path.starts_with("shared/")).map(|f| (f.state.clone(), (*f).clone())).collect();
                (db, ssts, true)
            }
            None => (RocksBackend::open(&dir, false).map_err(|e| format!("{owner}: {e}"))?, HashMap::new(), false),
        };
        let inst = RocksInstance { db, snapshots, uploaded: Mutex::new(uploaded), chain: Arc::default(), owner: owner.to_string() };
        Ok((Arc::new(inst), restored))
    }

    /// A typed view of state `name` (its column family).
    pub fn map<K: Key, V: Data + Sync>(&self, name: &str, range: KeyGroupRange, max_parallelism: u32) -> Result<RocksMap<K, V>, StateError> {
        self.db.map::<K, V>(name, range, max_parallelism)
    }
}

impl Drop for RocksInstance {
    fn drop(&mut self) {
        // The database and its snapshots are a working copy: the checkpoints are the state.
        if let Some(root) = self.snapshots.parent() {
            if let Err(e) = std::fs::remove_dir_all(root) {
                tracing::warn!("{}: removing RocksDB's directory {}: {e}", self.owner, root.display());
            }
        }
    }
}

/// Working directories of processes that died without removing them (`<pid>-<n>`, and restore
/// scratch `restore-<pid>-…`): a killed process leaves its database behind.
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("restore-").unwrap_or(&name).split('-').next().and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() || !Path::new("/proc/self").exists();
        if !alive {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => tracing::info!("removed the RocksDB directory {} of process {pid}, which is gone", e.path().display()),
                Err(err) => tracing::warn!("removing the stale RocksDB directory {}: {err}", e.path().display()),
            }
        }
    }
}

/// Download one file of a checkpoint to `to`, checking its size and checksum.
pub(crate) fn download(storage: &CheckpointStorage, f: &StateFileHandle, to: &Path) -> Result<(), String> {
    let got = storage.get_to_file(&f.path, to).map_err(|e| e.to_string())?;
    if got.size != f.size || got.crc32c != f.crc32c {
        let _ = std::fs::remove_file(to);
        return Err(format!(
            "corrupt checkpoint file {}: {} bytes with checksum {:08x}, {} bytes with {:08x} expected",
            storage.display(&f.path),
            got.size,
            got.crc32c,
            f.size,
            f.crc32c
        ));
    }
    Ok(())
}

/// A RocksDB file's name becomes a path: metadata that names anything but a plain file is refused.
pub(crate) fn check_name(f: &StateFileHandle) -> Result<(), String> {
    if f.state.is_empty() || f.state.starts_with('.') || f.state.contains(['/', '\\']) {
        return Err(format!("corrupt checkpoint metadata: RocksDB file '{}' ({}) is not a plain file name", f.state, f.path));
    }
    Ok(())
}

/// The crc32c of a local file, read in pieces.
pub(crate) fn file_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((size, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
}

//! Savepoints: a full, self-contained snapshot in the canonical (backend-independent) format,
//! taken when a job finishes or is stopped with `--savepoint-on-stop`, kept outside the job's
//! checkpoint directory so retention never deletes it.
//!
//! The job's final checkpoint is written as a savepoint (every keyed state in full, in the
//! canonical format; device-resident state in full); then its `_metadata` and files are copied
//! to `<execution.checkpointing.savepoint-dir>/savepoint-<job>-<id>/chk-<id>/`, where the
//! metadata lists them by their new names. `--restore` takes that directory (or its `chk-<id>`)
//! like a checkpoint, on either state backend and at any parallelism.

use weir_checkpoint::{CheckpointMetadata, StateFileKind};
use weir_storage::{checkpoint_dir_name, CheckpointStorage, StorageError};

use crate::config::JobConfig;

/// Where savepoints of a job go: `execution.checkpointing.savepoint-dir`, else
/// `<execution.checkpointing.dir>/savepoints`.
pub(crate) fn savepoint_dir(config: &JobConfig) -> String {
    config.checkpoint.savepoint_dir.clone().unwrap_or_else(|| format!("{}/savepoints", config.checkpoint.dir.trim_end_matches('/')))
}

/// Copy completed checkpoint `meta` of `storage` into a new savepoint under `target` (default:
/// [`savepoint_dir`]); returns its `chk-<id>` directory. Refuses a checkpoint that is not
/// self-contained in the canonical format.
pub(crate) fn write_savepoint(config: &JobConfig, target: Option<&str>, job: &str, storage: &CheckpointStorage, meta: &CheckpointMetadata) -> Result<String, StorageError> {
    let chk = checkpoint_dir_name(meta.id);
    for (task, sub) in &meta.subtasks {
        if let Some(f) = sub.state_files.iter().find(|f| f.kind != StateFileKind::Full) {
            return Err(StorageError::Corrupt {
                file: storage.display(&f.path),
                what: format!("subtask {task} of checkpoint {} is not in the canonical format ({:?}): not a savepoint", meta.id, f.kind),
            });
        }
    }
    let dir = target.map(str::to_string).unwrap_or_else(|| savepoint_dir(config));
    // A new directory per savepoint: an existing one (the same job and id of an earlier run)
    // is never overwritten.
    let base = format!("savepoint-{}-{}", crate::stream::sanitize(job), meta.id);
    let mut name = base.clone();
    let mut n = 1;
    let sp = loop {
        let sp = CheckpointStorage::open_with(&dir, &name, &config.checkpoint.storage_options)?;
        if sp.completed_checkpoints()?.is_empty() {
            break sp;
        }
        n += 1;
        name = format!("{base}-{n}");
    };
    let mut m = meta.clone();
    // Files go through a local temporary file, streamed both ways: a state larger than memory
    // never sits in it.
    let tmp = std::env::temp_dir().join(format!("weir-savepoint-{}-{}-{}", std::process::id(), meta.id, crate::monitor::wall_ms()));
    let staged = tmp.join("file");
    let copy = |m: &mut CheckpointMetadata| -> Result<(), StorageError> {
        std::fs::create_dir_all(&tmp).map_err(|e| StorageError::Location(format!("{}: {e}", tmp.display())))?;
        for (_, sub) in &mut m.subtasks {
            for f in &mut sub.state_files {
                let to = format!("{chk}/{}", f.path.replace('/', "-"));
                storage.get_to_file(&f.path, &staged)?;
                let put = sp.put_file(&to, &staged)?;
                if put.size != f.size || put.crc32c != f.crc32c {
                    return Err(StorageError::Corrupt { file: storage.display(&f.path), what: "does not match its checkpoint's metadata".into() });
                }
                f.path = to;
            }
        }
        Ok(())
    };
    let copied = copy(&mut m);
    let _ = std::fs::remove_dir_all(&tmp);
    copied?;
    sp.commit_metadata(&m)?;
    Ok(sp.display(&chk))
}

/// A savepoint directory (`.../savepoint-<job>-<id>`) names its one `chk-<id>`; any other
/// path is returned as it is.
pub(crate) fn resolve(path: &str) -> String {
    let p = std::path::Path::new(path.trim_end_matches('/'));
    if !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("savepoint-")) {
        return path.to_string();
    }
    let chks: Vec<_> = std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("chk-") && e.path().join("_metadata").exists())
        .collect();
    match chks.as_slice() {
        [one] => one.path().display().to_string(),
        _ => path.to_string(),
    }
}

//! Model export: each key's model (e.g. a CNN trained in the stream) as one file, published
//! when a checkpoint completes, exactly once.
//!
//! A published file is always the model as of a completed checkpoint, never newer than the
//! newest one, and never half-written: a two-phase commit over renames, as the file sink's.
//!
//! 1. **Stage** ([`ModelExport::stage`], on the snapshot thread, after the checkpoint's state is
//!    written and before the subtask acks it): the bytes go to a temporary name, are fsynced,
//!    renamed `.<final-name>.chk-<id>.kg-<key group>.pending`, and the directory is fsynced.
//! 2. **Commit** ([`ModelExport::commit`], on the worker thread, when checkpoint `upto`
//!    completed): for each key, the older staged files of ids `<= upto` are removed, then the
//!    newest one replaces the final file (rename, fsync the directory). Staged files of ids
//!    `> upto` are left alone.
//! 3. **Recover** ([`ModelExport::recover`], at operator start) finishes what a crash
//!    interrupted: staged files of ids `<=` the restored checkpoint are committed as above,
//!    those of newer ids (a checkpoint that never completed, or an abandoned lineage) and
//!    temporary files are removed. A fresh start into a directory that holds model files is
//!    refused, like the file sink's: nothing is silently overwritten.
//!
//! **Several subtasks, one directory.** Each key's files carry its key group in the staged name,
//! so a subtask stages, commits and recovers only the files of its own key groups, at any
//! parallelism: after a rescale the new owner of a key group finishes its predecessor's files.
//! (Key groups, not subtask numbers, because a key's owner after a rescale is known only by key
//! group; the final file name keeps no key group, so it stays the name a reader expects.)
//!
//! **Which keys to stage.** A key's file is its newest staged model of an id `<=` the completed
//! checkpoint, so a key needs staging only at checkpoints where its model differs from what it
//! last staged: an unchanged model staged at an earlier (even aborted) checkpoint is the model
//! as of the newer one. A stage that arrives after a newer one of the same key was published
//! (a slow snapshot thread) is dropped, so a file never goes back in time within a run.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::fs::File;
use std::hash::Hash;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use weir_state::keygroup::{key_group, KeyGroupRange};

use crate::runtime::JobCtx;

/// What stands for the key in an export path template.
pub const KEY_PLACEHOLDER: &str = "{key}";

/// The longest final file name accepted (bytes): the staged name adds about 50 to it, and
/// file systems stop at 255.
const MAX_NAME_BYTES: usize = 200;

/// An export failed; the message names the config key, the key or the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The path template is unusable.
    #[error("{config_key}: {template}: {reason}")]
    Template {
        /// The config key that holds the template (e.g. `pipeline[2].cnn_train.export`).
        config_key: String,
        /// The template as written.
        template: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key has no usable file name under the template.
    #[error("{config_key}: key {key:?} has no usable file name: {reason}")]
    KeyName {
        /// The config key of the template.
        config_key: String,
        /// The key, as displayed.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The template has no `{key}`, and a second key came.
    #[error(
        "{config_key}: {template} has no {{key}}, so it holds one key's model, but keys {first} and {second} both export to it; \
         put {{key}} in the file name"
    )]
    SecondKey {
        /// The config key of the template.
        config_key: String,
        /// The template as written.
        template: String,
        /// The key that exported first (or where it lives).
        first: String,
        /// The key that came second.
        second: String,
    },
    /// A key was staged by a subtask that does not own its key group (a bug in the operator).
    #[error("{config_key}: key {key:?} (key group {key_group}) does not belong to subtask {subtask} of {parallelism}")]
    NotMine {
        /// The config key of the template.
        config_key: String,
        /// The key, as displayed.
        key: String,
        /// Its key group.
        key_group: u32,
        /// The subtask that staged it.
        subtask: u32,
        /// Subtasks in all.
        parallelism: u32,
    },
    /// A fresh start into a directory that already holds model files of an earlier run.
    #[error(
        "{config_key}: {} already holds {count} model file(s) of an earlier run (e.g. {example}); starting fresh would \
         overwrite them. Resume the job with `--restore latest`, or export to another path",
        dir.display()
    )]
    Used {
        /// The config key of the template.
        config_key: String,
        /// The export directory.
        dir: PathBuf,
        /// Model files found (published, or staged for a completed checkpoint).
        count: usize,
        /// One of them.
        example: String,
    },
    /// A file operation failed (a restart may succeed).
    #[error("export: {what} {}: {source}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl ExportError {
    /// Whether a restart cannot fix it (anything but I/O).
    pub fn is_deterministic(&self) -> bool {
        !matches!(self, ExportError::Io { .. })
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ExportError + 'a {
    move |source| ExportError::Io { what, path: path.to_path_buf(), source }
}

/// Where an export instance runs.
#[derive(Debug, Clone, Copy)]
pub struct ExportContext {
    /// This subtask.
    pub subtask: u32,
    /// Subtasks in all.
    pub parallelism: u32,
    /// Key groups in all (`pipeline.max-parallelism`).
    pub max_parallelism: u32,
    /// The newest completed checkpoint of the job directory at start (any lineage): on a fresh
    /// start, files staged for it or an older one may be a completed checkpoint's output, so
    /// they refuse the start; newer ones never completed and are removed.
    pub newest_checkpoint: Option<u64>,
}

/// What [`ModelExport::recover`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Staged models published (their checkpoint completed, the publish did not happen).
    pub published: usize,
    /// Staged or temporary files removed.
    pub removed: usize,
}

/// A key's staged models (by checkpoint id) and the id of the model this run published.
#[derive(Default)]
struct KeyFiles {
    key_group: u32,
    staged: Vec<u64>,
    published: Option<u64>,
}

#[derive(Default)]
struct Staging {
    /// By final file name.
    keys: BTreeMap<String, KeyFiles>,
    /// The first key exported, for a template without `{key}`.
    single: Option<String>,
}

/// Exports one model per key to `path/…{key}…` on each completed checkpoint (see the module
/// documentation for the protocol). Shared between the worker thread (commit) and the
/// snapshot threads (stage): put it in an [`Arc`].
pub struct ModelExport {
    config_key: String,
    template: String,
    dir: PathBuf,
    /// The file name before `{key}` (all of it without `{key}`).
    prefix: String,
    /// The file name after `{key}`; `None` without `{key}`.
    suffix: Option<String>,
    ctx: ExportContext,
    range: KeyGroupRange,
    state: Mutex<Staging>,
}

/// A staged (`.pending`) or temporary (`.tmp`) file's parts.
#[derive(Debug, PartialEq, Eq)]
struct Hidden<'a> {
    final_name: &'a str,
    checkpoint: u64,
    key_group: u32,
    pending: bool,
}

fn parse_hidden(name: &str) -> Option<Hidden<'_>> {
    let rest = name.strip_prefix('.')?;
    let (rest, pending) = match rest.strip_suffix(".pending") {
        Some(r) => (r, true),
        None => (rest.strip_suffix(".tmp")?, false),
    };
    let (rest, kg) = rest.rsplit_once(".kg-")?;
    let (final_name, id) = rest.rsplit_once(".chk-")?;
    Some(Hidden { final_name, checkpoint: id.parse().ok()?, key_group: kg.parse().ok()?, pending })
}

fn hidden_name(final_name: &str, checkpoint: u64, key_group: u32, pending: bool) -> String {
    format!(".{final_name}.chk-{checkpoint}.kg-{key_group}.{}", if pending { "pending" } else { "tmp" })
}

/// A key as a file name part, one to one: ASCII letters, digits, `-`, `_` and `.` (but not a
/// leading one, which would hide the file) stay, every other byte of the UTF-8 is `%XX`.
pub fn key_file_part(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for (i, c) in key.char_indices() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' || (c == '.' && i > 0) {
            out.push(c);
        } else {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

fn fsync_dir(dir: &Path) -> Result<(), ExportError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io("fsync", dir))
}

fn remove(path: &Path) -> Result<(), ExportError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

impl ModelExport {
    /// An export to `template` (`dir/model-{key}.safetensors`; without `{key}`, the job must
    /// have one key), configured at `config_key` (named in errors).
    pub fn new(config_key: &str, template: &str, ctx: ExportContext) -> Result<Self, ExportError> {
        let bad = |reason: &str| ExportError::Template { config_key: config_key.into(), template: template.into(), reason: reason.into() };
        if ctx.parallelism == 0 || ctx.subtask >= ctx.parallelism || ctx.parallelism > ctx.max_parallelism {
            return Err(bad(&format!(
                "subtask {} of {} with pipeline.max-parallelism {}",
                ctx.subtask, ctx.parallelism, ctx.max_parallelism
            )));
        }
        let path = Path::new(template);
        let name = match path.file_name().and_then(|n| n.to_str()) {
            Some(n) if !template.ends_with('/') => n,
            _ => return Err(bad("needs a file name, e.g. models/model-{key}.safetensors")),
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if dir.to_string_lossy().contains(KEY_PLACEHOLDER) {
            return Err(bad("{key} may only stand in the file name: every model goes to one directory"));
        }
        if name.starts_with('.') {
            return Err(bad("the file name must not start with '.': hidden names are the export's staged files"));
        }
        let (prefix, suffix) = match name.split_once(KEY_PLACEHOLDER) {
            Some((_, after)) if after.contains(KEY_PLACEHOLDER) => return Err(bad("{key} may stand once only")),
            Some((before, after)) => (before.to_string(), Some(after.to_string())),
            None => (name.to_string(), None),
        };
        if prefix.len() + suffix.as_ref().map_or(0, String::len) > MAX_NAME_BYTES {
            return Err(bad(&format!("the file name is longer than {MAX_NAME_BYTES} bytes")));
        }
        Ok(Self {
            config_key: config_key.into(),
            template: template.into(),
            dir,
            prefix,
            suffix,
            ctx,
            range: KeyGroupRange::for_operator(ctx.max_parallelism, ctx.parallelism, ctx.subtask),
            state: Mutex::new(Staging::default()),
        })
    }

    /// The export directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that `key`'s model is published to.
    pub fn final_path(&self, key: &(impl Display + ?Sized)) -> Result<PathBuf, ExportError> {
        Ok(self.dir.join(self.final_name(&key.to_string())?))
    }

    fn final_name(&self, key: &str) -> Result<String, ExportError> {
        let Some(suffix) = &self.suffix else { return Ok(self.prefix.clone()) };
        let part = key_file_part(key);
        let name = format!("{}{part}{suffix}", self.prefix);
        let reason = if part.is_empty() && self.prefix.is_empty() && suffix.is_empty() {
            "it is empty"
        } else if name.len() > MAX_NAME_BYTES {
            "the file name would be longer than 200 bytes"
        } else {
            return Ok(name);
        };
        Err(ExportError::KeyName { config_key: self.config_key.clone(), key: key.into(), reason: reason.into() })
    }

    /// Whether `name` is a final file name of this template.
    fn is_final(&self, name: &str) -> bool {
        match &self.suffix {
            None => name == self.prefix,
            Some(s) => name.len() >= self.prefix.len() + s.len() && name.starts_with(&self.prefix) && name.ends_with(s.as_str()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Staging> {
        // A panic while holding the lock left plain bookkeeping; the files decide anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// At operator start, before anything is staged: finish or undo what an earlier run left
    /// in the directory, for this subtask's key groups (see the module documentation).
    /// `restored` is the checkpoint the job restored from (`None`: a fresh start).
    pub fn recover(&self, restored: Option<u64>) -> Result<Recovered, ExportError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            // Created here, not before: a refused start leaves no directory behind.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
                return Ok(Recovered::default());
            }
            Err(e) => return Err(io("list", &self.dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            names.push(entry.map_err(io("list", &self.dir))?.file_name().to_string_lossy().into_owned());
        }
        names.sort_unstable();
        if restored.is_none() {
            // Every subtask checks the whole directory, so all of them refuse alike.
            let newest = self.ctx.newest_checkpoint;
            let used: Vec<&String> = names
                .iter()
                .filter(|n| match parse_hidden(n) {
                    Some(h) => h.pending && self.is_final(h.final_name) && newest.is_some_and(|c| h.checkpoint <= c),
                    None => !n.starts_with('.') && self.is_final(n),
                })
                .collect();
            if let Some(example) = used.first() {
                return Err(ExportError::Used {
                    config_key: self.config_key.clone(),
                    dir: self.dir.clone(),
                    count: used.len(),
                    example: example.to_string(),
                });
            }
        }
        // This subtask's staged files: publish the newest of a completed checkpoint per key,
        // remove the rest. Removals come first and are made durable before any publish, so a
        // staged file that survives a crash is always newer than the key's published one.
        let upto = restored.unwrap_or(0);
        let mut newest: BTreeMap<&str, (u64, &str)> = BTreeMap::new();
        let mut doomed: Vec<&str> = Vec::new();
        for name in &names {
            let Some(h) = parse_hidden(name) else { continue };
            if !self.is_final(h.final_name) || !self.range.contains(h.key_group) {
                continue;
            }
            if !h.pending || restored.is_none() || h.checkpoint > upto {
                doomed.push(name);
                continue;
            }
            match newest.get_mut(h.final_name) {
                Some(best) if best.0 > h.checkpoint => doomed.push(name),
                Some(best) => doomed.push(std::mem::replace(best, (h.checkpoint, name)).1),
                None => {
                    newest.insert(h.final_name, (h.checkpoint, name));
                }
            }
        }
        for name in &doomed {
            remove(&self.dir.join(name))?;
        }
        if !doomed.is_empty() {
            fsync_dir(&self.dir)?;
        }
        for (final_name, (_, staged)) in &newest {
            let from = self.dir.join(staged);
            std::fs::rename(&from, self.dir.join(final_name)).map_err(io("publish", &from))?;
        }
        if !newest.is_empty() {
            fsync_dir(&self.dir)?;
        }
        let done = Recovered { published: newest.len(), removed: doomed.len() };
        if done != Recovered::default() {
            tracing::info!(
                "{} {}: published {} model(s) of checkpoint(s) up to {upto} that completed before the last stop, removed {} unfinished file(s)",
                self.config_key,
                self.dir.display(),
                done.published,
                done.removed
            );
        }
        Ok(done)
    }

    /// Stage `key`'s model `bytes` for checkpoint `checkpoint` (phase one): durable, but not
    /// visible until [`ModelExport::commit`] of a checkpoint `>= checkpoint`. Call it after the
    /// checkpoint's state is written and before acking it; from any thread.
    pub fn stage<K: Hash + Display + ?Sized>(&self, checkpoint: u64, key: &K, bytes: &[u8]) -> Result<(), ExportError> {
        let shown = key.to_string();
        let final_name = self.final_name(&shown)?;
        let kg = key_group(key, self.ctx.max_parallelism);
        if !self.range.contains(kg) {
            return Err(ExportError::NotMine {
                config_key: self.config_key.clone(),
                key: shown,
                key_group: kg,
                subtask: self.ctx.subtask,
                parallelism: self.ctx.parallelism,
            });
        }
        if self.suffix.is_none() {
            self.check_single_key(&shown, &final_name, kg)?;
        }
        let tmp = self.dir.join(hidden_name(&final_name, checkpoint, kg, false));
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("write", &tmp)(e));
        }
        {
            // Under the lock: a commit decides on the staged ids and renames under it too.
            let mut state = self.lock();
            let files = state.keys.entry(final_name.clone()).or_default();
            if files.published.is_some_and(|p| p >= checkpoint) {
                drop(state);
                tracing::debug!("{}: key {shown:?}: checkpoint {checkpoint}'s model came after a newer one was published: dropped", self.config_key);
                return remove(&tmp);
            }
            let pending = self.dir.join(hidden_name(&final_name, checkpoint, kg, true));
            std::fs::rename(&tmp, &pending).map_err(io("stage", &tmp))?;
            files.key_group = kg;
            files.staged.push(checkpoint);
        }
        fsync_dir(&self.dir)
    }

    /// Without `{key}` one key may export: a second one (here, or staged by another subtask
    /// into the same directory) is an error.
    fn check_single_key(&self, shown: &str, final_name: &str, kg: u32) -> Result<(), ExportError> {
        let second = |first: String| ExportError::SecondKey {
            config_key: self.config_key.clone(),
            template: self.template.clone(),
            first,
            second: shown.to_string(),
        };
        let first = self.lock().single.get_or_insert_with(|| shown.to_string()).clone();
        if first != shown {
            return Err(second(format!("{first:?}")));
        }
        // Another subtask's key shows by its key group in a staged name (best effort: two
        // subtasks staging at the same moment may both pass).
        let entries = std::fs::read_dir(&self.dir).map_err(io("list", &self.dir))?;
        for entry in entries {
            let name = entry.map_err(io("list", &self.dir))?.file_name();
            if let Some(h) = parse_hidden(&name.to_string_lossy()).filter(|h| h.final_name == final_name && h.key_group != kg) {
                return Err(second(format!("of key group {} (another subtask)", h.key_group)));
            }
        }
        Ok(())
    }

    /// Checkpoint `upto` completed (phase two): each key's newest model staged for a checkpoint
    /// `<= upto` replaces its file; older staged ones are removed; newer ones wait.
    pub fn commit(&self, upto: u64) -> Result<(), ExportError> {
        let mut state = self.lock();
        let mut doomed: Vec<PathBuf> = Vec::new();
        let mut publish: Vec<(String, u64, u32)> = Vec::new();
        for (final_name, files) in &state.keys {
            let Some(newest) = files.staged.iter().copied().filter(|&id| id <= upto).max() else { continue };
            let superseded = files.published.is_some_and(|p| p >= newest);
            for &id in files.staged.iter().filter(|&&id| id <= upto && (id < newest || superseded)) {
                doomed.push(self.dir.join(hidden_name(final_name, id, files.key_group, true)));
            }
            if !superseded {
                publish.push((final_name.clone(), newest, files.key_group));
            }
        }
        // Removals durable before any publish: a staged file that survives a crash is newer
        // than its key's published file, so a recovery never publishes an older model.
        for path in &doomed {
            remove(path)?;
        }
        if !doomed.is_empty() {
            fsync_dir(&self.dir)?;
        }
        for (final_name, id, kg) in publish {
            let from = self.dir.join(hidden_name(&final_name, id, kg, true));
            std::fs::rename(&from, self.dir.join(&final_name)).map_err(io("publish", &from))?;
            if let Some(files) = state.keys.get_mut(&final_name) {
                files.published = Some(id);
            }
        }
        for files in state.keys.values_mut() {
            files.staged.retain(|&id| id > upto);
        }
        drop(state);
        fsync_dir(&self.dir)
    }

    /// For an operator being built on `ctx`'s worker: an export configured at `config_key`,
    /// recovered (the restored checkpoint is `ctx`'s), committed by the worker on every
    /// completed checkpoint. `None` when the attempt will not run: the failure is reported to
    /// the job (a template or a used directory ends it at once; I/O restarts it), and an
    /// attempt that failed already leaves the directory as it is.
    pub(crate) fn attach(ctx: &JobCtx, operator: &str, config_key: &str, template: &str) -> Option<Arc<ModelExport>> {
        if ctx.build_failed() {
            return None;
        }
        let ectx = ExportContext {
            subtask: ctx.index as u32,
            parallelism: ctx.peers as u32,
            max_parallelism: ctx.config.max_parallelism,
            newest_checkpoint: ctx.newest_completed,
        };
        let export = ModelExport::new(config_key, template, ectx).and_then(|e| {
            e.recover(ctx.restored.as_ref().map(|m| m.id))?;
            Ok(Arc::new(e))
        });
        let export = match export {
            Ok(e) => e,
            Err(e) if e.is_deterministic() => {
                ctx.fail_deterministic(format!("operator '{operator}': {e}"));
                return None;
            }
            Err(e) => {
                ctx.fail_build(format!("operator '{operator}': {e}"));
                return None;
            }
        };
        let committer = export.clone();
        let operator = operator.to_string();
        ctx.shared
            .borrow_mut()
            .committers
            .push(Box::new(move |upto| committer.commit(upto).map_err(|e| format!("operator '{operator}': {e}"))));
        Some(export)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "pipeline[1].cnn_train.export";

    /// A fresh, empty directory for one test.
    fn tmp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-export-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ctx(subtask: u32, parallelism: u32) -> ExportContext {
        ExportContext { subtask, parallelism, max_parallelism: 128, newest_checkpoint: None }
    }

    fn export(dir: &Path, c: ExportContext) -> ModelExport {
        ModelExport::new(KEY, &format!("{}/model-{{key}}.safetensors", dir.display()), c).unwrap()
    }

    /// Every file of `dir`, sorted, with its content.
    fn files(dir: &Path) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap())
            })
            .collect();
        v.sort();
        v
    }

    fn published(dir: &Path) -> Vec<(String, String)> {
        files(dir).into_iter().filter(|(n, _)| !n.starts_with('.')).collect()
    }

    fn staged(dir: &Path) -> Vec<String> {
        files(dir).into_iter().map(|(n, _)| n).filter(|n| n.starts_with('.')).collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn staged_models_appear_only_when_their_checkpoint_completes() {
        // Staged on snapshot threads, committed on the worker.
        fn shared<T: Send + Sync>() {}
        shared::<ModelExport>();
        let dir = tmp("basic");
        let e = export(&dir, ctx(0, 1));
        assert_eq!(e.recover(None).unwrap(), Recovered::default());
        e.stage(1, "a", b"a1").unwrap();
        e.stage(1, "b", b"b1").unwrap();
        assert!(published(&dir).is_empty(), "{:?}", files(&dir));
        assert_eq!(staged(&dir).len(), 2);
        e.commit(1).unwrap();
        assert_eq!(published(&dir), pairs(&[("model-a.safetensors", "a1"), ("model-b.safetensors", "b1")]));
        assert!(staged(&dir).is_empty());
        // The next checkpoint replaces a's file; b's stays.
        e.stage(2, "a", b"a2").unwrap();
        e.commit(2).unwrap();
        assert_eq!(published(&dir), pairs(&[("model-a.safetensors", "a2"), ("model-b.safetensors", "b1")]));
        assert_eq!(e.final_path("a").unwrap(), dir.join("model-a.safetensors"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two checkpoints staged before one notification: the newest of ids <= upto is published,
    /// the older removed, the newer one left for its own checkpoint.
    #[test]
    fn one_notification_publishes_the_newest_and_leaves_later_ones() {
        let dir = tmp("order");
        let e = export(&dir, ctx(0, 1));
        e.recover(None).unwrap();
        e.stage(3, "a", b"a3").unwrap();
        e.stage(4, "a", b"a4").unwrap();
        e.stage(3, "b", b"b3").unwrap();
        e.stage(5, "a", b"a5").unwrap();
        e.commit(4).unwrap();
        assert_eq!(published(&dir), pairs(&[("model-a.safetensors", "a4"), ("model-b.safetensors", "b3")]));
        assert_eq!(staged(&dir), [format!(".model-a.safetensors.chk-5.kg-{}.pending", key_group("a", 128))]);
        // A repeated or older notification changes nothing.
        e.commit(4).unwrap();
        e.commit(2).unwrap();
        assert_eq!(staged(&dir).len(), 1);
        e.commit(5).unwrap();
        assert_eq!(published(&dir), pairs(&[("model-a.safetensors", "a5"), ("model-b.safetensors", "b3")]));
        assert!(staged(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A slow snapshot thread stages checkpoint 5 after checkpoint 6 was published: dropped, so
    /// the file never goes back.
    #[test]
    fn a_stage_older_than_the_published_model_is_dropped() {
        let dir = tmp("late");
        let e = export(&dir, ctx(0, 1));
        e.recover(None).unwrap();
        e.stage(6, "a", b"a6").unwrap();
        e.commit(6).unwrap();
        e.stage(5, "a", b"a5").unwrap();
        e.commit(7).unwrap();
        assert_eq!(files(&dir), pairs(&[("model-a.safetensors", "a6")]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The process dies between stage and commit. Restored from that checkpoint (it completed),
    /// the staged model is published; restored from an older one, it is removed and the file
    /// keeps the older model.
    #[test]
    fn a_crash_between_stage_and_commit_is_finished_or_undone_by_the_restore() {
        for (restored, want) in [(5, "a5"), (4, "a4"), (6, "a5")] {
            let dir = tmp(&format!("crash-{restored}"));
            let e = export(&dir, ctx(0, 1));
            e.recover(None).unwrap();
            e.stage(4, "a", b"a4").unwrap();
            e.commit(4).unwrap();
            e.stage(5, "a", b"a5").unwrap();
            drop(e); // killed before the notification of 5
            let e = export(&dir, ctx(0, 1));
            let done = e.recover(Some(restored)).unwrap();
            assert_eq!(done, Recovered { published: usize::from(restored >= 5), removed: usize::from(restored < 5) });
            assert_eq!(files(&dir), pairs(&[("model-a.safetensors", want)]), "restored {restored}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// Killed in the middle of a commit, after the older staged files were removed: the restore
    /// publishes the newest; a key whose newest staged model is older than the restored
    /// checkpoint (unchanged since) is published too.
    #[test]
    fn recovery_publishes_the_newest_staged_model_of_a_completed_checkpoint() {
        let dir = tmp("newest");
        let e = export(&dir, ctx(0, 1));
        e.recover(None).unwrap();
        e.stage(2, "a", b"a2").unwrap();
        e.stage(3, "a", b"a3").unwrap();
        e.stage(2, "b", b"b2").unwrap();
        e.stage(4, "b", b"b4").unwrap();
        drop(e);
        let e = export(&dir, ctx(0, 1));
        assert_eq!(e.recover(Some(3)).unwrap(), Recovered { published: 2, removed: 2 });
        assert_eq!(files(&dir), pairs(&[("model-a.safetensors", "a3"), ("model-b.safetensors", "b2")]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A temporary file left by a crash during the write is never published, even for the
    /// restored checkpoint.
    #[test]
    fn a_partly_written_file_is_never_published() {
        let dir = tmp("partial");
        let e = export(&dir, ctx(0, 1));
        e.recover(None).unwrap();
        e.stage(1, "a", b"a1").unwrap();
        e.commit(1).unwrap();
        let kg = key_group("a", 128);
        std::fs::write(dir.join(hidden_name("model-a.safetensors", 2, kg, false)), b"a2-half").unwrap();
        drop(e);
        let e = export(&dir, ctx(0, 1));
        assert_eq!(e.recover(Some(2)).unwrap(), Recovered { published: 0, removed: 1 });
        assert_eq!(files(&dir), pairs(&[("model-a.safetensors", "a1")]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh start never overwrites: a published model, or one staged for a checkpoint that
    /// may have completed, refuses it, naming the directory and the way out. Files staged for a
    /// checkpoint that never completed (a restarted fresh attempt) are removed. A refused start
    /// into a missing directory creates nothing.
    #[test]
    fn a_fresh_start_into_a_used_directory_is_refused() {
        let dir = tmp("fresh");
        let e = export(&dir, ctx(0, 1));
        e.recover(None).unwrap();
        e.stage(3, "a", b"a3").unwrap();
        drop(e);
        let e = export(&dir, ExportContext { newest_checkpoint: Some(3), ..ctx(1, 2) });
        let err = e.recover(None).unwrap_err().to_string();
        assert!(err.contains(&format!("{KEY}: {} already holds 1 model file(s)", dir.display())), "{err}");
        assert!(err.contains("--restore latest") && err.contains(".model-a.safetensors.chk-3"), "{err}");
        // Checkpoint 3 never completed: its staged file goes.
        let e = export(&dir, ExportContext { newest_checkpoint: Some(2), ..ctx(0, 1) });
        assert_eq!(e.recover(None).unwrap(), Recovered { published: 0, removed: 1 });
        assert!(files(&dir).is_empty());
        std::fs::write(dir.join("model-z.safetensors"), b"z").unwrap();
        std::fs::write(dir.join("notes.txt"), b"not a model").unwrap();
        let err = export(&dir, ctx(0, 1)).recover(None).unwrap_err();
        assert!(err.is_deterministic() && err.to_string().contains("(e.g. model-z.safetensors)"), "{err}");
        // A restore keeps the file until the key is published again.
        export(&dir, ctx(0, 1)).recover(Some(1)).unwrap();
        assert_eq!(files(&dir).len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = dir.join("sub");
        export(&missing, ctx(0, 1)).recover(None).unwrap();
        assert!(missing.is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two keys of subtask `subtask` of 2 (by key group).
    fn keys_of(subtask: u32) -> Vec<String> {
        (0..).map(|i| format!("k{i}")).filter(|k| KeyGroupRange::for_operator(128, 2, subtask).contains(key_group(k, 128))).take(2).collect()
    }

    /// Two subtasks share the directory: each recovers only its key groups' files, and a restore
    /// at another parallelism recovers everyone's.
    #[test]
    fn subtasks_recover_only_their_key_groups_at_any_parallelism() {
        let dir = tmp("subtasks");
        let (k0, k1) = (keys_of(0), keys_of(1));
        let (e0, e1) = (export(&dir, ctx(0, 2)), export(&dir, ctx(1, 2)));
        e0.recover(None).unwrap();
        e1.recover(None).unwrap();
        for k in &k0 {
            e0.stage(1, k.as_str(), k.as_bytes()).unwrap();
        }
        for k in &k1 {
            e1.stage(1, k.as_str(), k.as_bytes()).unwrap();
        }
        let err = e0.stage(1, k1[0].as_str(), b"x").unwrap_err();
        assert!(matches!(err, ExportError::NotMine { subtask: 0, .. }), "{err}");
        drop((e0, e1));
        // Subtask 0 publishes its own; subtask 1's stay staged.
        let e0 = export(&dir, ctx(0, 2));
        assert_eq!(e0.recover(Some(1)).unwrap(), Recovered { published: 2, removed: 0 });
        let names: Vec<String> = published(&dir).into_iter().map(|(n, _)| n).collect();
        let mut want: Vec<String> = k0.iter().map(|k| format!("model-{k}.safetensors")).collect();
        want.sort();
        assert_eq!(names, want);
        assert_eq!(staged(&dir).len(), 2);
        // At parallelism 1 the one subtask owns every key group.
        let e = export(&dir, ctx(0, 1));
        assert_eq!(e.recover(Some(1)).unwrap(), Recovered { published: 2, removed: 0 });
        assert_eq!(published(&dir).len(), 4);
        assert!(staged(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Without `{key}` the file holds one key's model: a second key is an error naming both
    /// keys and the config key, in the same subtask or (by key group) from another one.
    #[test]
    fn a_template_without_key_takes_one_key() {
        let dir = tmp("single");
        let template = format!("{}/model.safetensors", dir.display());
        let e = ModelExport::new(KEY, &template, ctx(0, 1)).unwrap();
        e.recover(None).unwrap();
        e.stage(1, "first", b"1").unwrap();
        e.stage(2, "first", b"2").unwrap();
        let err = e.stage(2, "second", b"x").unwrap_err().to_string();
        assert!(err.contains(KEY) && err.contains("\"first\"") && err.contains("second") && err.contains("no {key}"), "{err}");
        e.commit(2).unwrap();
        assert_eq!(files(&dir), pairs(&[("model.safetensors", "2")]));
        let (k0, k1) = (keys_of(0), keys_of(1));
        let e0 = ModelExport::new(KEY, &template, ctx(0, 2)).unwrap();
        let e1 = ModelExport::new(KEY, &template, ctx(1, 2)).unwrap();
        e0.stage(3, k0[0].as_str(), b"3").unwrap();
        let err = e1.stage(3, k1[0].as_str(), b"3").unwrap_err().to_string();
        assert!(err.contains(&format!("of key group {}", key_group(k0[0].as_str(), 128))) && err.contains(&k1[0]), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_become_distinct_safe_file_names() {
        let keys = ["a/b", "a_b", "a%2Fb", ".x", "x.y", "..", "é", "", "a b"];
        let parts: Vec<String> = keys.iter().map(|k| key_file_part(k)).collect();
        assert_eq!(parts, ["a%2Fb", "a_b", "a%252Fb", "%2Ex", "x.y", "%2E.", "%C3%A9", "", "a%20b"]);
        let distinct: std::collections::HashSet<&String> = parts.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        let dir = tmp("names");
        let e = export(&dir, ctx(0, 1));
        e.recover(None).unwrap();
        e.stage(1, "a/b", b"1").unwrap();
        e.commit(1).unwrap();
        assert_eq!(files(&dir), pairs(&[("model-a%2Fb.safetensors", "1")]));
        let long = "x".repeat(300);
        assert!(matches!(e.stage(1, long.as_str(), b"1"), Err(ExportError::KeyName { .. })));
        let bare = ModelExport::new(KEY, &format!("{}/{{key}}", dir.display()), ctx(0, 1)).unwrap();
        let err = bare.stage(1, "", b"1").unwrap_err().to_string();
        assert!(err.starts_with(&format!("{KEY}: key \"\" has no usable file name")), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_templates_are_refused_naming_the_config_key() {
        for (template, why) in [
            ("models/{key}/model.safetensors", "may only stand in the file name"),
            ("models/.model-{key}", "must not start with '.'"),
            ("models/{key}-{key}", "may stand once only"),
            ("models/", "needs a file name"),
        ] {
            let err = ModelExport::new(KEY, template, ctx(0, 1)).err().unwrap();
            let text = err.to_string();
            assert!(err.is_deterministic() && text.starts_with(&format!("{KEY}: {template}: ")) && text.contains(why), "{text}");
        }
        let e = ModelExport::new(KEY, "model-{key}.bin", ctx(0, 1)).unwrap();
        assert_eq!(e.dir(), Path::new("."));
    }

    #[test]
    fn hidden_names_parse_back() {
        let name = hidden_name("model-a.chk-1.kg-2.safetensors", 17, 5, true);
        assert_eq!(
            parse_hidden(&name),
            Some(Hidden { final_name: "model-a.chk-1.kg-2.safetensors", checkpoint: 17, key_group: 5, pending: true })
        );
        assert_eq!(parse_hidden(&hidden_name("m", 1, 0, false)).map(|h| h.pending), Some(false));
        for other in [".part-00000-000000000001.pending", "model-a.safetensors", ".m.chk-x.kg-1.pending", ".withdrawn"] {
            assert_eq!(parse_hidden(other), None, "{other}");
        }
    }
}

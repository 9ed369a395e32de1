//! The GPU state store on the operator side: keys mapped to slots of a
//! [`StateArena`](weir_gpu::state::StateArena) that lives in device memory (GPU path) or host
//! memory (CPU path, same layout), snapshotted at every barrier without waiting for the device
//! and restored like host state.
//!
//! Snapshots are incremental: the barrier's device-side copy is read back on the snapshot
//! writer, which downloads only the chunks the kernels marked dirty since the last barrier and
//! writes them as a *delta* file; every `weir.gpu.state.full-every` checkpoints (or once the
//! deltas exceed `weir.gpu.state.max-delta-share` of the last full snapshot, or after a failed
//! write) it writes a full one. A checkpoint lists the last full file and its deltas, in order;
//! restore applies them in that order. The files live under `<dir>/<job>/shared/` because later
//! checkpoints refer to them; storage deletes one only once no retained checkpoint lists it.
//! Files use the host state's format (versioned, checksummed, key-group indexed), one entry per
//! key: `(key, [(word offset, words)])`, so a checkpoint of the GPU path restores on the CPU
//! path, at another parallelism, and the reverse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use weir_checkpoint::{StateFileHandle, StateFileKind};
use weir_gpu::kernels::gpu::GpuKernels;
use weir_gpu::kernels::Kernels;
use weir_gpu::state::{ArenaLayout, ArenaSnapshot, SnapshotChunks, StateArena, VramSnapshot, VramTier};
use weir_gpu::GpuError;
use weir_state::format::{corrupt_error, decode_block, write_entries};
use weir_state::keygroup::{key_group, KeyGroupRange};
use weir_storage::CheckpointStorage;

use crate::runtime::JobCtx;
use crate::state::chain::{Chain, Turn};
use crate::state::StateTables;
use crate::Key;

/// One key's entry in a snapshot file: `(word offset in the slot, words)` per written chunk.
type SlotChunks = Vec<(u32, Vec<u32>)>;

/// Told on the snapshot writer, once a snapshot's file is durable and before the checkpoint is
/// acknowledged, of the whole slots it wrote: `(checkpoint, [(key, the slot's words)])`. A delta
/// has the keys whose every chunk changed since the last snapshot (a slot written whole, as a
/// training step writes it); a full snapshot has every key. An error fails the snapshot, and
/// the next one is full. (Model export stages each key's model from it: the model as of the
/// checkpoint, never newer.)
pub type SlotsWritten<K> = Arc<dyn Fn(u64, &[(K, Vec<u32>)]) -> Result<(), String> + Send + Sync>;

/// Makes the [`SlotsWritten`] hook when the operator starts, from the job's context (`None`: no
/// hook, e.g. the attempt failed to build).
type HookOnAttach<K> = Box<dyn FnOnce(&JobCtx) -> Option<SlotsWritten<K>>>;

/// The background half of a snapshot: reads the device copy, writes the file, says what the
/// checkpoint holds of this state. Dropped without running (a failed write of the operator's
/// host state before it, a panic), it passes its turn on and makes the instance's next snapshot
/// a full one: the dirty map it took is lost with it.
pub(crate) struct ResidentJob {
    run: Option<Box<dyn FnOnce(&CheckpointStorage) -> Result<ResidentWritten, String> + Send>>,
    chain: Arc<Chain>,
    seq: u64,
}

impl ResidentJob {
    /// Run it (on the snapshot writer).
    pub(crate) fn run(mut self, storage: &CheckpointStorage) -> Result<ResidentWritten, String> {
        let f = self.run.take().expect("a job runs once");
        f(storage)
    }
}

impl Drop for ResidentJob {
    fn drop(&mut self) {
        if self.run.is_some() {
            self.chain.cancel(self.seq);
        }
    }
}

/// What a resident snapshot wrote.
pub(crate) struct ResidentWritten {
    /// The files the checkpoint lists for this state: the last full one, then its deltas.
    pub files: Vec<StateFileHandle>,
    /// Bytes written by this checkpoint.
    pub bytes: u64,
    /// Keys written by this checkpoint.
    pub entries: u64,
}

/// Settings from the job, set when the operator starts.
#[derive(Clone, Default)]
struct Attached {
    owner: String,
    file_prefix: String,
    subtask: u32,
    max_parallelism: u32,
    full_every: u32,
    max_delta_share: f64,
    /// The VRAM tier's name of this instance (`None`: tier `host`, or the CPU path).
    vram: Option<String>,
    /// `weir.gpu.state.snapshot-mode: blocking`: read the whole state back at the barrier.
    blocking: bool,
}

/// What the VRAM tier keeps beside a device copy: the key of each slot and the files that
/// checkpoint lists for this instance (a restore uses the copy only if they match exactly).
struct VramIndex<K> {
    keys: Vec<K>,
    files: Vec<StateFileHandle>,
}

/// Device-resident keyed state of one operator instance: a fixed-size slot per key.
pub struct KeyedArena<K: Key> {
    name: String,
    gpu: Option<GpuKernels>,
    arena: Option<StateArena>,
    index: HashMap<K, u32>,
    /// Slot → key, append-only: read by the snapshot writer.
    keys: Arc<Mutex<Vec<K>>>,
    chain: Arc<Chain>,
    attached: Attached,
    /// Checks each restored key's words (a model of another shape is refused at restore).
    validate: Option<Box<dyn Fn(&[u32]) -> Result<(), String>>>,
    /// Told of the whole slots of each durable snapshot.
    slots_written: Option<SlotsWritten<K>>,
    /// Makes `slots_written` at attach.
    hook_on_attach: Option<HookOnAttach<K>>,
}

impl<K: Key> KeyedArena<K> {
    /// A state named `name` on `kernels`' path (device memory on the GPU path). Register it in
    /// the operator's `open` with [`KeyedArena::register`].
    pub fn new(name: &str, kernels: &dyn Kernels) -> Self {
        KeyedArena {
            name: name.to_string(),
            gpu: kernels.as_gpu().cloned(),
            arena: None,
            index: HashMap::new(),
            keys: Arc::default(),
            chain: Arc::default(),
            attached: Attached { owner: name.to_string(), full_every: 10, max_delta_share: 0.5, ..Attached::default() },
            validate: None,
            slots_written: None,
            hook_on_attach: None,
        }
    }

    /// Tell `hook` of the whole slots of every durable snapshot (see [`SlotsWritten`]).
    pub fn on_slots_written(&mut self, hook: SlotsWritten<K>) {
        self.slots_written = Some(hook);
    }

    /// Make the [`SlotsWritten`] hook when the operator starts, with the job's context (an
    /// operator built before it knows where it runs, e.g. a model export).
    pub(crate) fn on_slots_written_from_job(&mut self, make: impl FnOnce(&JobCtx) -> Option<SlotsWritten<K>> + 'static) {
        self.hook_on_attach = Some(Box::new(make));
    }

    /// Check every key's restored words with `f` (an error names the key and fails the restore).
    pub fn validate_restored(&mut self, f: impl Fn(&[u32]) -> Result<(), String> + 'static) {
        self.validate = Some(Box::new(f));
    }

    /// Tell the operator's host states that `name` is restored here, not there.
    pub fn register(&self, tables: &mut StateTables<K>) {
        tables.resident.push(self.name.clone());
    }

    /// Whether the state lives in device memory.
    pub fn on_device(&self) -> bool {
        self.gpu.is_some()
    }

    /// Words per key, once known (after the first key or a restore).
    pub fn state_words(&self) -> Option<usize> {
        self.arena.as_ref().map(|a| a.layout().state_words)
    }

    /// The arena, created for `state_words` words per key on first use; a different size than
    /// the arena has (a restored model of another shape) is an error.
    pub fn ensure(&mut self, state_words: usize) -> Result<&mut StateArena, GpuError> {
        if let Some(w) = self.state_words() {
            if w != state_words {
                return Err(GpuError::Input(format!("{}: state of {state_words} words per key where the arena holds {w}", self.attached.owner)));
            }
        }
        if self.arena.is_none() {
            let mut arena = StateArena::new(ArenaLayout::new(state_words), self.gpu.as_ref(), &self.attached.owner)?;
            // The VRAM tier keeps the last two snapshots while the next one is taken.
            arena.set_snapshot_areas(if self.attached.vram.is_some() { 3 } else { 1 });
            self.arena = Some(arena);
        }
        Ok(self.arena.as_mut().expect("created"))
    }

    /// The arena, if a key or a restore created it.
    pub fn arena(&mut self) -> Option<&mut StateArena> {
        self.arena.as_mut()
    }

    /// The name of the operator the arena is attached to (the monitor's GPU panel lists GPU
    /// operators by name): the quoted name of its owner, `operator '<name>' (<uid>) subtask
    /// <i>`, else the whole owner (the arena's own name before it is attached).
    pub(crate) fn operator_name(&self) -> &str {
        let owner = &self.attached.owner;
        owner.strip_prefix("operator '").and_then(|rest| rest.split_once("' (")).map_or(owner.as_str(), |(name, _)| name)
    }

    /// The slot of `key`.
    pub fn slot(&self, key: &K) -> Option<u32> {
        self.index.get(key).copied()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// A slot for a new `key`, filled with `init` (call [`KeyedArena::ensure`] first).
    pub fn insert(&mut self, key: K, init: &[u32]) -> Result<u32, GpuError> {
        let arena = self.arena.as_mut().ok_or_else(|| GpuError::Input(format!("{}: no arena yet", self.attached.owner)))?;
        let slot = arena.alloc_slot(init)?;
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).push(key.clone());
        self.index.insert(key, slot);
        Ok(slot)
    }

    /// Take the job's settings (operator start).
    pub(crate) fn attach(&mut self, ctx: &JobCtx, op: u32, owner: &str, file_prefix: &str) {
        let c = &ctx.config;
        let vram = (c.gpu_state_vram_tier && self.gpu.is_some())
            .then(|| ctx.storage.as_ref().map(|s| vram_name(s, &ctx.uid_of(op), ctx.index, ctx.peers, &self.name)))
            .flatten();
        self.attached = Attached {
            owner: owner.to_string(),
            file_prefix: file_prefix.to_string(),
            subtask: ctx.index as u32,
            max_parallelism: c.max_parallelism,
            full_every: c.gpu_state_full_every.max(1),
            max_delta_share: c.gpu_state_max_delta_share,
            vram,
            blocking: false,
        };
        self.set_blocking(c.gpu_state_blocking_snapshots);
        if let Some(make) = self.hook_on_attach.take() {
            self.slots_written = make(ctx).or(self.slots_written.take());
        }
    }

    /// The naive baseline for benchmarks: every snapshot full, read back on the worker at the
    /// barrier (see [`KeyedArena::snapshot`]).
    fn set_blocking(&mut self, blocking: bool) {
        self.attached.blocking = blocking;
        if blocking {
            self.attached.full_every = 1;
        }
    }

    /// Restore this instance's key groups of the restored checkpoint: from the VRAM tier when it
    /// holds exactly that checkpoint's copy of this instance, else from storage (base, then
    /// deltas in order).
    pub(crate) fn restore(&mut self, ctx: &JobCtx, op: u32) -> Result<(), String> {
        let (Some(storage), Some(meta)) = (ctx.restore_storage.as_ref(), ctx.restored.as_ref()) else { return Ok(()) };
        let listed: Vec<StateFileHandle> = ctx.restored_subtasks(op).flat_map(|s| s.state_files.iter()).filter(|f| f.state == self.name).cloned().collect();
        if listed.is_empty() {
            return Ok(());
        }
        if self.gpu.is_some() && ctx.config.gpu_state_vram_tier {
            let name = vram_name(storage, &ctx.uid_of(op), ctx.index, ctx.peers, &self.name);
            if let Some((snap, index)) = VramTier::global().get(&name, meta.id) {
                // Only the copy this instance wrote for exactly the restored checkpoint: its own
                // files (same subtask, same parallelism) must be the ones the checkpoint lists.
                let own: Option<Vec<StateFileHandle>> = ctx
                    .restored_instance(op, ctx.index as u32)
                    .map(|s| s.state_files.iter().filter(|f| f.state == self.name).cloned().collect());
                if let (Ok(index), Some(own)) = (index.downcast::<VramIndex<K>>(), own) {
                    if index.files == own {
                        let arena = self.ensure(snap.layout().state_words).map_err(|e| e.to_string())?;
                        arena.restore_from_vram(&snap).map_err(|e| e.to_string())?;
                        for (slot, k) in index.keys.iter().enumerate() {
                            self.index.insert(k.clone(), slot as u32);
                        }
                        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = index.keys.clone();
                        tracing::info!("{}: restored {} keys of checkpoint {} from the VRAM tier", self.attached.owner, index.keys.len(), meta.id);
                        return Ok(());
                    }
                }
            }
        }
        let range = KeyGroupRange::for_operator(ctx.config.max_parallelism, ctx.peers as u32, ctx.index as u32);
        let mp = ctx.config.max_parallelism;
        let mut image: HashMap<K, Vec<u32>> = HashMap::new();
        let mut order: Vec<K> = Vec::new();
        for f in &listed {
            let file = storage.display(&f.path);
            for b in f.key_groups.iter().filter(|b| range.contains(b.key_group)) {
                let bytes = storage.read_range(&f.path, b.offset..b.offset + b.len).map_err(|e| e.to_string())?;
                decode_block(&bytes, b, &file, |k: K, chunks: SlotChunks| {
                    if key_group(&k, mp) != b.key_group {
                        return Err(corrupt_error(&file, format!("block of key group {} holds a key of another key group", b.key_group)));
                    }
                    let words = image.entry(k.clone()).or_insert_with(|| {
                        order.push(k);
                        Vec::new()
                    });
                    for (off, w) in chunks {
                        let end = off as usize + w.len();
                        if words.len() < end {
                            words.resize(end, 0);
                        }
                        words[off as usize..end].copy_from_slice(&w);
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
            }
        }
        if order.is_empty() {
            return Ok(());
        }
        if let Some(check) = &self.validate {
            for k in &order {
                check(&image[k]).map_err(|e| format!("restoring state '{}' of key {}: {e}", self.name, serde_json::to_string(k).unwrap_or_default()))?;
            }
        }
        let words = image.values().map(Vec::len).max().unwrap_or(0);
        let inits: Vec<&[u32]> = order.iter().map(|k| &image[k][..]).collect();
        let arena = self.ensure(words).map_err(|e| e.to_string())?;
        let first = arena.alloc_slots(&inits).map_err(|e| e.to_string())?;
        for (i, k) in order.iter().enumerate() {
            self.index.insert(k.clone(), first + i as u32);
        }
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).extend(order);
        tracing::info!("{}: restored {} keys of checkpoint {} from storage ({} files)", self.attached.owner, self.index.len(), meta.id, listed.len());
        Ok(())
    }

    /// The synchronous part of a snapshot at the barrier of `epoch`: enqueue the device-side
    /// copy and return the background part. Never waits for the device, except in the naive
    /// baseline (`weir.gpu.state.snapshot-mode: blocking`), which reads the whole copy back here.
    pub(crate) fn snapshot(&mut self, epoch: u64, force_full: bool) -> Result<ResidentJob, String> {
        let snap = self.arena.as_mut().map(|a| a.snapshot()).transpose().map_err(|e| e.to_string())?;
        let snap = match snap {
            Some(s) if self.attached.blocking => Some(Taken::read_now(s, &self.attached.owner, epoch)?),
            s => s.map(Taken::Copied),
        };
        let chain = self.chain.clone();
        let seq = {
            let mut c = chain.lock();
            c.issued += 1;
            c.issued - 1
        };
        let keys = self.keys.clone();
        let at = self.attached.clone();
        let name = self.name.clone();
        let chunk_words = self.arena.as_ref().map_or(1, |a| a.layout().chunk_words) as u32;
        let state_words = self.arena.as_ref().map_or(0, |a| a.layout().state_words);
        let hook = self.slots_written.clone();
        let job_chain = chain.clone();
        let run = Box::new(move |storage: &CheckpointStorage| {
            // Snapshots of one instance are written in checkpoint order: each delta follows the
            // file before it.
            chain.wait_turn(seq);
            let mut turn = Turn { chain: &chain, seq, ok: false };
            let Some(snap) = snap else {
                turn.ok = true;
                return Ok(ResidentWritten { files: Vec::new(), bytes: 0, entries: 0 });
            };
            let full = {
                let c = chain.lock();
                force_full || c.files.len() as u32 >= at.full_every || c.must_be_full(seq, at.max_delta_share)
            };
            let vram = at.vram.as_ref().and_then(|_| snap.vram());
            let written = (|| -> Result<(StateFileHandle, u64), String> {
                let chunks = snap.read(full).map_err(|e| format!("{}: reading the snapshot of checkpoint {epoch}: {e}", at.owner))?;
                let mut entries: Vec<(u32, K, SlotChunks)> = Vec::with_capacity(chunks.entries.len());
                {
                    let keys = keys.lock().unwrap_or_else(|p| p.into_inner());
                    for (slot, cs) in chunks.entries {
                        let k = keys[slot as usize].clone();
                        entries.push((key_group(&k, at.max_parallelism), k, cs.into_iter().map(|(c, w)| (c * chunk_words, w)).collect()));
                    }
                }
                entries.sort_by_key(|e| e.0);
                let w = write_entries(&entries).map_err(|e| e.to_string())?;
                let kind = if full { "full" } else { "delta" };
                let path = format!("shared/chk{epoch}-{}-{}-{}-{kind}.state", at.file_prefix, crate::stream::sanitize(&name), at.subtask);
                let size = w.bytes.len() as u64;
                storage.put(&path, w.bytes).map_err(|e| e.to_string())?;
                if let Some(hook) = &hook {
                    let whole: Vec<(K, Vec<u32>)> = entries.iter().filter_map(|(_, k, cs)| whole_slot(cs, state_words).map(|w| (k.clone(), w))).collect();
                    if !whole.is_empty() {
                        hook(epoch, &whole).map_err(|e| format!("{}: checkpoint {epoch}: {e}", at.owner))?;
                    }
                }
                Ok((StateFileHandle { state: name.clone(), path, size, crc32c: w.crc32c, key_groups: w.index, kind: if full { StateFileKind::Full } else { StateFileKind::Delta } }, w.entries))
            })();
            let mut c = chain.lock();
            let (handle, n) = match written {
                Ok(x) => x,
                // The next snapshot cannot be a delta on top of a file that was not written: this
                // one does not join the chain (`Turn`).
                Err(e) => return Err(e),
            };
            let size = handle.size;
            c.push(handle, full);
            let files = c.files.clone();
            drop(c);
            if let (Some(name), Some(v)) = (&at.vram, vram) {
                let keys = keys.lock().unwrap_or_else(|p| p.into_inner())[..v.slots()].to_vec();
                VramTier::global().keep(name, epoch, v, Arc::new(VramIndex { keys, files: files.clone() }));
            }
            turn.ok = true;
            Ok(ResidentWritten { files, bytes: size, entries: n })
        });
        Ok(ResidentJob { run: Some(run), chain: job_chain, seq })
    }
}

/// A snapshot as the background job gets it: the device copy to read, or (blocking mode) what
/// the worker already read of it.
enum Taken {
    Copied(ArenaSnapshot),
    Read(SnapshotChunks, Option<VramSnapshot>),
}

impl Taken {
    /// Every chunk of `snap`, read back now on the calling (worker) thread.
    fn read_now(snap: ArenaSnapshot, owner: &str, epoch: u64) -> Result<Taken, String> {
        let vram = snap.vram();
        let chunks = snap.read(true).map_err(|e| format!("{owner}: reading the snapshot of checkpoint {epoch} at the barrier: {e}"))?;
        Ok(Taken::Read(chunks, vram))
    }

    fn vram(&self) -> Option<VramSnapshot> {
        match self {
            Taken::Copied(s) => s.vram(),
            Taken::Read(_, v) => v.clone(),
        }
    }

    /// The chunks to write; a snapshot read at the barrier was read whole (and the chain makes
    /// every snapshot of a blocking instance full).
    fn read(self, full: bool) -> Result<SnapshotChunks, GpuError> {
        match self {
            Taken::Copied(s) => s.read(full),
            Taken::Read(c, _) => Ok(c),
        }
    }
}

/// The words of a slot whose chunks (in order) cover all its `words`; `None` for a part.
fn whole_slot(chunks: &SlotChunks, words: usize) -> Option<Vec<u32>> {
    let mut out = Vec::with_capacity(words);
    for (off, w) in chunks {
        if *off as usize != out.len() {
            return None;
        }
        out.extend_from_slice(w);
    }
    (out.len() == words).then_some(out)
}

/// The VRAM tier's name of an operator instance: job directory, uid, subtask of parallelism,
/// state (a copy is only ever restored by the same instance of the same job).
fn vram_name(storage: &CheckpointStorage, uid: &str, subtask: usize, peers: usize, state: &str) -> String {
    format!("{}|{uid}|{subtask}/{peers}|{state}", storage.display(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_gpu::kernels::cpu::CpuKernels;

    fn arena(keys: u64) -> KeyedArena<u64> {
        let mut a: KeyedArena<u64> = KeyedArena::new("s", &CpuKernels::new(1));
        a.attached.max_parallelism = 128;
        a.ensure(4).unwrap();
        for k in 0..keys {
            a.insert(k, &[k as u32; 4]).unwrap();
        }
        a
    }

    fn storage(tag: &str) -> (CheckpointStorage, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("weir-resident-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (CheckpointStorage::open(dir.to_str().unwrap(), "job").unwrap(), dir)
    }

    fn touch(a: &mut KeyedArena<u64>, key: u64, v: u32) {
        let slot = a.slot(&key).unwrap();
        let arena = a.arena().unwrap();
        let at = arena.slot_word(slot) as usize;
        let (words, dirty) = arena.host_mut().unwrap();
        words[at] = v;
        dirty[slot as usize] = 1;
    }

    #[test]
    fn deltas_hold_only_changed_keys_and_the_chain_restarts_after_a_dropped_snapshot() {
        let (st, dir) = storage("chain");
        let mut a = arena(10);
        let s1 = a.snapshot(1, false).unwrap();
        touch(&mut a, 3, 33);
        let s2 = a.snapshot(2, false).unwrap();
        touch(&mut a, 4, 44);
        let s3 = a.snapshot(3, false).unwrap();
        touch(&mut a, 5, 55);
        let s4 = a.snapshot(4, false).unwrap();
        // Snapshot 4 is run first, on another thread: it waits for its turn.
        let st4 = st.clone();
        let later = std::thread::spawn(move || s4.run(&st4));
        let w1 = s1.run(&st).unwrap();
        assert_eq!((w1.files.len(), w1.entries), (1, 10), "the first snapshot is full");
        let w2 = s2.run(&st).unwrap();
        assert_eq!((w2.files.len(), w2.entries), (2, 1), "a delta of the one changed key");
        assert!(w2.files[1].path.ends_with("-delta.state") && w2.bytes < w1.bytes, "{:?}", w2.files);
        // Snapshot 3 never runs (its host state failed to write): its changes (key 4) are only in
        // the arena, so snapshot 4 must not be a delta on top of snapshot 2.
        drop(s3);
        let w4 = later.join().unwrap().unwrap();
        assert_eq!((w4.files.len(), w4.entries), (1, 10), "full after a dropped snapshot: {:?}", w4.files);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_later_dropped_snapshot_does_not_hide_an_earlier_failure() {
        let (st, dir) = storage("late-drop");
        let mut a = arena(4);
        a.snapshot(1, false).unwrap().run(&st).unwrap();
        touch(&mut a, 1, 11);
        let s2 = a.snapshot(2, false).unwrap();
        touch(&mut a, 2, 22);
        let s3 = a.snapshot(3, false).unwrap();
        let s4 = a.snapshot(4, false).unwrap();
        let shared = dir.join("job/shared");
        std::fs::remove_dir_all(&shared).unwrap();
        std::fs::write(&shared, b"in the way").unwrap();
        assert!(s2.run(&st).is_err(), "snapshot 2 fails: key 1's change is only in the arena");
        std::fs::remove_file(&shared).unwrap();
        // Snapshot 4 is dropped before snapshot 3 runs (its checkpoint was aborted).
        drop(s4);
        let w3 = s3.run(&st).unwrap();
        assert_eq!((w3.files.len(), w3.entries), (1, 4), "full: a delta would miss key 1: {:?}", w3.files);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_failed_write_makes_the_next_snapshot_full() {
        let (st, dir) = storage("fail");
        let mut a = arena(4);
        a.snapshot(1, false).unwrap().run(&st).unwrap();
        touch(&mut a, 1, 11);
        let s2 = a.snapshot(2, false).unwrap();
        // The shared directory cannot be written (a file stands where it should be).
        let shared = dir.join("job/shared");
        std::fs::remove_dir_all(&shared).unwrap();
        std::fs::write(&shared, b"in the way").unwrap();
        assert!(s2.run(&st).is_err());
        std::fs::remove_file(&shared).unwrap();
        touch(&mut a, 2, 22);
        let w3 = a.snapshot(3, false).unwrap().run(&st).unwrap();
        assert_eq!((w3.files.len(), w3.entries), (1, 4), "{:?}", w3.files);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_savepoint_is_full_and_self_contained() {
        let (st, dir) = storage("savepoint");
        let mut a = arena(4);
        a.snapshot(1, false).unwrap().run(&st).unwrap();
        touch(&mut a, 1, 11);
        let w2 = a.snapshot(2, false).unwrap().run(&st).unwrap();
        assert_eq!(w2.files.iter().map(|f| f.kind).collect::<Vec<_>>(), [StateFileKind::Full, StateFileKind::Delta]);
        touch(&mut a, 2, 22);
        let w3 = a.snapshot(3, true).unwrap().run(&st).unwrap();
        assert_eq!((w3.files.len(), w3.entries, w3.files[0].kind), (1, 4, StateFileKind::Full), "{:?}", w3.files);
        std::fs::remove_dir_all(dir).ok();
    }
}

#[cfg(test)]
mod snapshot_mode_tests;

#[cfg(test)]
mod slots_written_tests;

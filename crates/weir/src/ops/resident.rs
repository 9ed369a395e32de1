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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use weir_checkpoint::StateFileHandle;
use weir_gpu::kernels::gpu::GpuKernels;
use weir_gpu::kernels::Kernels;
use weir_gpu::state::{ArenaLayout, StateArena, VramTier};
use weir_gpu::GpuError;
use weir_state::format::{corrupt_error, decode_block, write_entries};
use weir_state::keygroup::{key_group, KeyGroupRange};
use weir_storage::CheckpointStorage;

use crate::runtime::JobCtx;
use crate::state::StateTables;
use crate::Key;

/// One key's entry in a snapshot file: `(word offset in the slot, words)` per written chunk.
type SlotChunks = Vec<(u32, Vec<u32>)>;

/// The background half of a snapshot: reads the device copy, writes the file, says what the
/// checkpoint holds of this state.
pub(crate) type ResidentJob = Box<dyn FnOnce(&CheckpointStorage) -> Result<ResidentWritten, String> + Send>;

/// What a resident snapshot wrote.
pub(crate) struct ResidentWritten {
    /// The files the checkpoint lists for this state: the last full one, then its deltas.
    pub files: Vec<StateFileHandle>,
    /// Bytes written by this checkpoint.
    pub bytes: u64,
    /// Keys written by this checkpoint.
    pub entries: u64,
}

/// The chain of files of one operator instance's state, advanced by the snapshot writer in
/// checkpoint order.
#[derive(Default)]
struct ChainState {
    files: Vec<StateFileHandle>,
    base_bytes: u64,
    delta_bytes: u64,
    broken: bool,
    issued: u64,
    turn: u64,
}

#[derive(Default)]
struct Chain {
    state: Mutex<ChainState>,
    turn: Condvar,
}

impl Chain {
    fn lock(&self) -> MutexGuard<'_, ChainState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Passes the turn to the next snapshot when dropped (also on an error or a panic).
struct Turn<'a>(&'a Chain);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.lock().turn += 1;
        self.0.turn.notify_all();
    }
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
        }
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
            self.arena = Some(StateArena::new(ArenaLayout::new(state_words), self.gpu.as_ref(), &self.attached.owner)?);
        }
        Ok(self.arena.as_mut().expect("created"))
    }

    /// The arena, if a key or a restore created it.
    pub fn arena(&mut self) -> Option<&mut StateArena> {
        self.arena.as_mut()
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
        };
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
                if let Ok(index) = index.downcast::<VramIndex<K>>() {
                    if index.files == listed {
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
    /// copy and return the background part. Never waits for the device.
    pub(crate) fn snapshot(&mut self, epoch: u64) -> Result<ResidentJob, String> {
        let snap = self.arena.as_mut().map(|a| a.snapshot()).transpose().map_err(|e| e.to_string())?;
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
        Ok(Box::new(move |storage: &CheckpointStorage| {
            // Snapshots of one instance are written in checkpoint order: each delta follows the
            // file before it.
            let mut c = chain.lock();
            while c.turn < seq {
                c = chain.turn.wait(c).unwrap_or_else(|p| p.into_inner());
            }
            drop(c);
            let _turn = Turn(&chain);
            let Some(snap) = snap else {
                return Ok(ResidentWritten { files: Vec::new(), bytes: 0, entries: 0 });
            };
            let full = {
                let c = chain.lock();
                c.broken || c.files.is_empty() || c.files.len() as u32 >= at.full_every || c.delta_bytes as f64 > at.max_delta_share * c.base_bytes as f64
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
                Ok((StateFileHandle { state: name.clone(), path, size, crc32c: w.crc32c, key_groups: w.index }, w.entries))
            })();
            let mut c = chain.lock();
            let (handle, n) = match written {
                Ok(x) => x,
                Err(e) => {
                    // The next snapshot cannot be a delta on top of a file that was not written.
                    c.broken = true;
                    return Err(e);
                }
            };
            let size = handle.size;
            if full {
                c.files = vec![handle];
                (c.base_bytes, c.delta_bytes, c.broken) = (size, 0, false);
            } else {
                c.files.push(handle);
                c.delta_bytes += size;
            }
            let files = c.files.clone();
            drop(c);
            if let (Some(name), Some(v)) = (&at.vram, vram) {
                let keys = keys.lock().unwrap_or_else(|p| p.into_inner())[..v.slots()].to_vec();
                VramTier::global().keep(name, epoch, v, Arc::new(VramIndex { keys, files: files.clone() }));
            }
            Ok(ResidentWritten { files, bytes: size, entries: n })
        }))
    }
}

/// The VRAM tier's name of an operator instance: job directory, uid, subtask of parallelism,
/// state (a copy is only ever restored by the same instance of the same job).
fn vram_name(storage: &CheckpointStorage, uid: &str, subtask: usize, peers: usize, state: &str) -> String {
    format!("{}|{uid}|{subtask}/{peers}|{state}", storage.display(""))
}

//! Device-resident keyed state: one arena per operator instance, a fixed-size slot per key.
//!
//! The arena is a block of the device pool (counted against `taskmanager.gpu.memory` ×
//! `taskmanager.gpu.fraction`). Kernels bind it in place ([`Bind::Resident`]) and update a
//! key's slot where it lives; nothing of the state crosses PCIe per batch. Beside it lives a
//! *dirty map*, one `u32` per chunk of slot words: kernels set the chunks they write.
//!
//! A snapshot at the barrier of epoch `e` records, on the device's one queue after epoch `e`'s
//! kernels, a device-side copy of the arena into a snapshot area, a copy of the dirty map into
//! a small mappable buffer and a clear of the dirty map, and returns at once ([`StateArena::snapshot`]).
//! Queue order alone makes the copy hold exactly epochs ≤ `e`; epoch `e + 1`'s kernels are
//! submitted behind it without waiting. The background writer then calls
//! [`ArenaSnapshot::read`], which waits for the copy, and downloads only the dirty chunks (or
//! all of them for a full snapshot). The snapshot area stays in device memory after the read:
//! the VRAM tier keeps it for a restart inside the process.
//!
//! The CPU path keeps the same arena in host memory with the same layout, so the snapshot files
//! are the same and a checkpoint of one path restores on the other.

pub mod kmeans;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::device::GpuContext;
use crate::kernels::gpu::GpuKernels;
use crate::GpuError;

/// Largest dirty-tracking chunk (words): larger slots are tracked in chunks of this size.
pub const MAX_CHUNK_WORDS: usize = 4096;

/// The shape of an arena: words per slot and per dirty-tracking chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    /// Words a key's state needs.
    pub state_words: usize,
    /// Words per dirty-tracking chunk (the whole slot for small state).
    pub chunk_words: usize,
    /// Words per slot (`state_words` rounded up to whole chunks).
    pub slot_words: usize,
}

impl ArenaLayout {
    /// The layout for `state_words` words of state per key.
    pub fn new(state_words: usize) -> ArenaLayout {
        let state_words = state_words.max(1);
        // As few chunks as fit MAX_CHUNK_WORDS, of equal size: a slot is padded by fewer words
        // than it has chunks (4,116 words are 2 chunks of 2,058, not 2 of 4,096).
        let chunks = state_words.div_ceil(MAX_CHUNK_WORDS);
        let chunk_words = state_words.div_ceil(chunks);
        ArenaLayout { state_words, chunk_words, slot_words: chunk_words * chunks }
    }

    /// Chunks per slot.
    pub fn chunks_per_slot(&self) -> usize {
        self.slot_words / self.chunk_words
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> u64 {
        self.slot_words as u64 * 4
    }
}

/// A device buffer of its own (a copy between two blocks of one slab is not allowed), counted
/// against the pool's budget while it lives.
struct PoolBlock {
    ctx: Arc<GpuContext>,
    buffer: wgpu::Buffer,
    block: Placed,
}

/// Offset and size of a [`PoolBlock`] (offset 0: the buffer is its own).
#[derive(Clone, Copy)]
struct Placed {
    offset: u64,
    size: u64,
}

impl PoolBlock {
    fn alloc(ctx: &Arc<GpuContext>, bytes: u64) -> Result<PoolBlock, GpuError> {
        let size = bytes.max(4).next_multiple_of(crate::pool::MIN_BLOCK);
        ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).reserve_external(size, 0)?;
        let desc = wgpu::BufferDescriptor {
            label: Some("weir-state"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        };
        match crate::pool::create_buffer(&ctx.device, &desc, "a state buffer") {
            Ok(buffer) => Ok(PoolBlock { ctx: ctx.clone(), buffer, block: Placed { offset: 0, size } }),
            Err(e) => {
                ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).release_external(size);
                Err(e)
            }
        }
    }

    /// The block's buffer and offset (for a binding or a copy).
    fn place(&self) -> (wgpu::Buffer, u64) {
        (self.buffer.clone(), self.block.offset)
    }
}

impl Drop for PoolBlock {
    fn drop(&mut self) {
        let _ = self.ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).reserve_external(0, self.block.size);
    }
}

enum Backing {
    Host { words: Vec<u32>, dirty: Vec<u32> },
    Device { kernels: GpuKernels, arena: PoolBlock, dirty: PoolBlock, buffers: (wgpu::Buffer, wgpu::Buffer) },
}

/// The state of one operator instance: a slot per key, in device memory (GPU path) or host
/// memory (CPU path). Slots are handed out in order and never reused (keys are not removed).
pub struct StateArena {
    layout: ArenaLayout,
    slots: usize,
    capacity: usize,
    /// Arena-sized snapshot areas that may live beside the arena (1; 3 with the VRAM tier: its two kept snapshots and the next).
    snapshot_areas: u64,
    backing: Backing,
    /// Which operator, for error messages.
    owner: String,
}

/// Where a kernel finds the arena on the device: the buffers and byte ranges to bind with
/// [`Bind::Resident`](crate::transfer::Bind).
pub(crate) struct DevicePlaces<'a> {
    pub arena: (&'a wgpu::Buffer, u64, u64),
    pub dirty: (&'a wgpu::Buffer, u64, u64),
}

const INITIAL_SLOTS: usize = 64;

impl StateArena {
    /// An arena for `layout` on `kernels`' path: device memory when `gpu` is given, else host
    /// memory. `owner` names the operator in errors. The device arena and a snapshot area of the
    /// same size must fit the budget; a state that does not is a typed error naming keys × bytes.
    pub fn new(layout: ArenaLayout, gpu: Option<&GpuKernels>, owner: &str) -> Result<StateArena, GpuError> {
        let mut a = StateArena {
            layout,
            slots: 0,
            capacity: 0,
            snapshot_areas: 1,
            backing: Backing::Host { words: Vec::new(), dirty: Vec::new() },
            owner: owner.to_string(),
        };
        if let Some(k) = gpu {
            let (arena, dirty) = a.device_blocks(k.context(), INITIAL_SLOTS)?;
            let buffers = (arena.place().0, dirty.place().0);
            a.backing = Backing::Device { kernels: k.clone(), arena, dirty, buffers };
            a.capacity = INITIAL_SLOTS;
        }
        Ok(a)
    }

    /// The layout.
    pub fn layout(&self) -> ArenaLayout {
        self.layout
    }

    /// Arena-sized snapshot areas to admit beside the arena when it grows: 1, or 3 when the VRAM
    /// tier keeps the last two snapshots while the next one is taken.
    pub fn set_snapshot_areas(&mut self, n: u64) {
        self.snapshot_areas = n.max(1);
    }

    /// Slots in use (keys).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Whether the state lives in device memory.
    pub fn on_device(&self) -> bool {
        matches!(self.backing, Backing::Device { .. })
    }

    /// Bytes of the arena in use.
    pub fn used_bytes(&self) -> u64 {
        self.slots as u64 * self.layout.slot_bytes()
    }

    fn device_blocks(&self, ctx: &Arc<GpuContext>, capacity: usize) -> Result<(PoolBlock, PoolBlock), GpuError> {
        let bytes = capacity as u64 * self.layout.slot_bytes();
        let chunk_bytes = (capacity * self.layout.chunks_per_slot()) as u64 * 4;
        let budget = ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).budget();
        let max_binding = ctx.adapter.max_storage_binding;
        // The arena, its dirty map and its snapshot areas of the same size live side by side.
        let copies = 1 + self.snapshot_areas;
        // Also a read-back piece and the dirty map's read-back while a snapshot is read.
        let read_back = bytes.min(DOWNLOAD_PIECE) + chunk_bytes;
        if copies * (bytes + chunk_bytes) + read_back > budget || bytes > max_binding {
            return Err(GpuError::StateTooLarge {
                owner: self.owner.clone(),
                keys: capacity as u64,
                slot_bytes: self.layout.slot_bytes(),
                limit: (budget / copies).min(max_binding),
            });
        }
        let arena = PoolBlock::alloc(ctx, bytes).map_err(|e| self.too_large(capacity, e))?;
        let dirty = PoolBlock::alloc(ctx, chunk_bytes).map_err(|e| self.too_large(capacity, e))?;
        Ok((arena, dirty))
    }

    fn too_large(&self, keys: usize, e: GpuError) -> GpuError {
        match e {
            GpuError::OutOfMemory { budget, .. } => GpuError::StateTooLarge {
                owner: self.owner.clone(),
                keys: keys as u64,
                slot_bytes: self.layout.slot_bytes(),
                limit: budget / (1 + self.snapshot_areas),
            },
            e => e,
        }
    }

    /// Double the capacity (device: a new block, filled by a device-side copy on the queue).
    fn grow(&mut self, need: usize) -> Result<(), GpuError> {
        let mut cap = self.capacity.max(INITIAL_SLOTS);
        while cap < need {
            cap *= 2;
        }
        let (layout, slots) = (self.layout, self.slots);
        match &mut self.backing {
            Backing::Host { words, dirty } => {
                words.resize(cap * layout.slot_words, 0);
                dirty.resize(cap * layout.chunks_per_slot(), 0);
            }
            Backing::Device { .. } => {
                let Backing::Device { kernels, .. } = &self.backing else { unreachable!() };
                let ctx = kernels.context().clone();
                let (arena, dirty) = self.device_blocks(&ctx, cap)?;
                let Backing::Device { arena: old_a, dirty: old_d, buffers, .. } = &mut self.backing else { unreachable!() };
                let (na, nao) = arena.place();
                let (nd, ndo) = dirty.place();
                let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("weir-state-grow") });
                let used = slots as u64 * layout.slot_bytes();
                let used_chunks = (slots * layout.chunks_per_slot()) as u64 * 4;
                let tail = (cap * layout.chunks_per_slot()) as u64 * 4 - used_chunks;
                if used > 0 {
                    enc.copy_buffer_to_buffer(&buffers.0, old_a.block.offset, &na, nao, used);
                    enc.copy_buffer_to_buffer(&buffers.1, old_d.block.offset, &nd, ndo, used_chunks);
                }
                if tail > 0 {
                    enc.clear_buffer(&nd, ndo + used_chunks, Some(tail));
                }
                ctx.queue.submit([enc.finish()]);
                // The old blocks may be handed out again at once: any later use of them is
                // submitted after this copy, and queue order runs it after.
                *old_a = arena;
                *old_d = dirty;
                *buffers = (na, nd);
            }
        }
        self.capacity = cap;
        Ok(())
    }

    /// Take the next slot and fill it with `init` (at most `state_words` words; the rest zero).
    /// The new slot is dirty. Returns its index.
    pub fn alloc_slot(&mut self, init: &[u32]) -> Result<u32, GpuError> {
        if self.slots == self.capacity {
            self.grow(self.slots + 1)?;
        }
        let slot = self.slots;
        self.slots += 1;
        self.write_slots(slot, &[init])?;
        Ok(slot as u32)
    }

    /// Take `inits.len()` slots at once (a restore): one upload for all of them.
    pub fn alloc_slots(&mut self, inits: &[&[u32]]) -> Result<u32, GpuError> {
        if self.slots + inits.len() > self.capacity {
            self.grow(self.slots + inits.len())?;
        }
        let first = self.slots;
        self.slots += inits.len();
        self.write_slots(first, inits)?;
        Ok(first as u32)
    }

    fn write_slots(&mut self, first: usize, inits: &[&[u32]]) -> Result<(), GpuError> {
        let l = self.layout;
        if let Some(bad) = inits.iter().find(|i| i.len() > l.state_words) {
            return Err(GpuError::Input(format!("{}: {} words for a slot of {}", self.owner, bad.len(), l.state_words)));
        }
        match &mut self.backing {
            Backing::Host { words, dirty } => {
                for (i, init) in inits.iter().enumerate() {
                    let at = (first + i) * l.slot_words;
                    words[at..at + l.slot_words].fill(0);
                    words[at..at + init.len()].copy_from_slice(init);
                    let c = (first + i) * l.chunks_per_slot();
                    dirty[c..c + l.chunks_per_slot()].fill(1);
                }
            }
            Backing::Device { kernels, arena, dirty, buffers } => {
                let mut image = vec![0u32; inits.len() * l.slot_words];
                for (i, init) in inits.iter().enumerate() {
                    image[i * l.slot_words..i * l.slot_words + init.len()].copy_from_slice(init);
                }
                let q = &kernels.context().queue;
                // Ordered on the queue before any later submission (it runs at the next submit).
                q.write_buffer(&buffers.0, arena.block.offset + first as u64 * l.slot_bytes(), bytemuck::cast_slice(&image));
                let ones = vec![1u32; inits.len() * l.chunks_per_slot()];
                q.write_buffer(&buffers.1, dirty.block.offset + (first * l.chunks_per_slot()) as u64 * 4, bytemuck::cast_slice(&ones));
            }
        }
        Ok(())
    }

    /// The first word of `slot` in the arena.
    pub fn slot_word(&self, slot: u32) -> u32 {
        slot * self.layout.slot_words as u32
    }

    /// The host arena and its dirty map (CPU path); `None` on the device.
    pub fn host_mut(&mut self) -> Option<(&mut [u32], &mut [u32])> {
        match &mut self.backing {
            Backing::Host { words, dirty } => Some((&mut words[..], &mut dirty[..])),
            Backing::Device { .. } => None,
        }
    }

    /// The device kernels and where the arena is (GPU path).
    pub(crate) fn device(&self) -> Option<(&GpuKernels, DevicePlaces<'_>)> {
        match &self.backing {
            Backing::Device { kernels, arena, dirty, buffers } => Some((
                kernels,
                DevicePlaces {
                    arena: (&buffers.0, arena.block.offset, arena.block.size),
                    dirty: (&buffers.1, dirty.block.offset, dirty.block.size),
                },
            )),
            Backing::Host { .. } => None,
        }
    }

    /// Where the arena is on the device, for kernels of other modules: (arena buffer, offset,
    /// size) and (dirty map buffer, offset, size), to bind whole.
    pub fn device_places(&self) -> Option<((&wgpu::Buffer, u64, u64), (&wgpu::Buffer, u64, u64))> {
        self.device().map(|(_, p)| (p.arena, p.dirty))
    }

    /// The synchronous part of a snapshot: on the device, enqueue the arena's copy into a
    /// snapshot area, the dirty map's copy-out and its clear, and return at once (no wait for
    /// the device); on the host, copy the arena and the dirty map. Either way the dirty map
    /// starts empty for the next epoch.
    pub fn snapshot(&mut self) -> Result<ArenaSnapshot, GpuError> {
        let l = self.layout;
        let (slots, chunks) = (self.slots, self.slots * l.chunks_per_slot());
        let data = match &mut self.backing {
            Backing::Host { words, dirty } => {
                let copy = SnapshotData::Host { words: words[..slots * l.slot_words].to_vec(), dirty: dirty[..chunks].to_vec() };
                dirty[..chunks].fill(0);
                copy
            }
            Backing::Device { kernels, arena, dirty, buffers } => {
                let ctx = kernels.context().clone();
                let used = slots as u64 * l.slot_bytes();
                let area = PoolBlock::alloc(&ctx, used).map_err(|e| GpuError::Device(format!("{}: no room for the snapshot area: {e}", self.owner)))?;
                let (ab, ao) = area.place();
                let dirty_bytes = (chunks as u64 * 4).max(4);
                let flags = crate::pool::create_buffer(
                    &ctx.device,
                    &wgpu::BufferDescriptor {
                        label: Some("weir-state-dirty-readback"),
                        size: dirty_bytes.next_multiple_of(4),
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    },
                    "a dirty-map read-back buffer",
                )?;
                let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("weir-state-snapshot") });
                if used > 0 {
                    enc.copy_buffer_to_buffer(&buffers.0, arena.block.offset, &ab, ao, used);
                    enc.copy_buffer_to_buffer(&buffers.1, dirty.block.offset, &flags, 0, chunks as u64 * 4);
                    enc.clear_buffer(&buffers.1, dirty.block.offset, Some(chunks as u64 * 4));
                }
                let mapped = Arc::new(AtomicU8::new(0));
                let m = mapped.clone();
                enc.map_buffer_on_submit(&flags, wgpu::MapMode::Read, .., move |r| m.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release));
                let index = ctx.queue.submit([enc.finish()]);
                SnapshotData::Device { ctx, area: Arc::new(area), flags, mapped, index }
            }
        };
        Ok(ArenaSnapshot { layout: l, slots, data })
    }

    /// Restore from a snapshot kept in device memory (the VRAM tier): a device-side copy.
    pub fn restore_from_vram(&mut self, snap: &VramSnapshot) -> Result<(), GpuError> {
        if snap.layout != self.layout {
            return Err(GpuError::Input(format!("{}: the VRAM snapshot has another slot layout", self.owner)));
        }
        if snap.slots > self.capacity {
            self.grow(snap.slots)?;
        }
        let Backing::Device { kernels, arena, dirty, buffers } = &self.backing else {
            return Err(GpuError::Input(format!("{}: a VRAM snapshot restores only on the GPU path", self.owner)));
        };
        let ctx = kernels.context();
        let (sb, so) = snap.area.place();
        let used = snap.slots as u64 * self.layout.slot_bytes();
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("weir-state-vram-restore") });
        if used > 0 {
            enc.copy_buffer_to_buffer(&sb, so, &buffers.0, arena.block.offset, used);
            // Everything restored is dirty: the first snapshot after a restore is full anyway.
            enc.clear_buffer(&buffers.1, dirty.block.offset, Some(dirty.block.size));
        }
        ctx.queue.submit([enc.finish()]);
        self.slots = snap.slots;
        Ok(())
    }
}

enum SnapshotData {
    Host { words: Vec<u32>, dirty: Vec<u32> },
    Device { ctx: Arc<GpuContext>, area: Arc<PoolBlock>, flags: wgpu::Buffer, mapped: Arc<AtomicU8>, index: wgpu::SubmissionIndex },
}

/// A snapshot taken at a barrier, to be read on a background thread.
pub struct ArenaSnapshot {
    layout: ArenaLayout,
    slots: usize,
    data: SnapshotData,
}

/// What a snapshot read gives: for each slot with something to write, its index and its
/// chunks (chunk index in the slot, words).
pub struct SnapshotChunks {
    /// Slots of the snapshot (keys).
    pub slots: usize,
    /// Whether every chunk is included (a full snapshot).
    pub full: bool,
    /// Per slot with data: (slot, [(chunk in slot, words)]).
    pub entries: Vec<(u32, Vec<(u32, Vec<u32>)>)>,
    /// Bytes read back from the device (0 on the host path).
    pub bytes_down: u64,
}

/// A snapshot kept in device memory for a restart inside the process (the VRAM tier).
#[derive(Clone)]
pub struct VramSnapshot {
    layout: ArenaLayout,
    slots: usize,
    area: Arc<PoolBlock>,
}

impl VramSnapshot {
    /// The slot layout.
    pub fn layout(&self) -> ArenaLayout {
        self.layout
    }

    /// Slots (keys) in the copy.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes of device memory it holds.
    pub fn bytes(&self) -> u64 {
        self.area.block.size
    }
}

/// The largest read-back buffer of a snapshot.
const DOWNLOAD_PIECE: u64 = 32 << 20;

/// Copy `chunks` of the snapshot area (`ab` at `ao`) into a mappable buffer, wait, and hand each
/// chunk's words to `each` (in order).
fn read_piece(ctx: &GpuContext, ab: &wgpu::Buffer, ao: u64, chunks: &[usize], chunk_bytes: u64, mut each: impl FnMut(usize, &[u32])) -> Result<(), GpuError> {
    let len = chunks.len() as u64 * chunk_bytes;
    let down = crate::pool::create_buffer(
        &ctx.device,
        &wgpu::BufferDescriptor { label: Some("weir-state-readback"), size: len, usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false },
        "a snapshot read-back buffer",
    )?;
    let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("weir-state-download") });
    // Coalesce runs of consecutive chunks into one copy each.
    let mut at = 0u64;
    let mut i = 0;
    while i < chunks.len() {
        let n = (i + 1..chunks.len()).take_while(|&j| chunks[j] == chunks[j - 1] + 1).count() + 1;
        enc.copy_buffer_to_buffer(ab, ao + chunks[i] as u64 * chunk_bytes, &down, at, n as u64 * chunk_bytes);
        at += n as u64 * chunk_bytes;
        i += n;
    }
    let done = Arc::new(AtomicU8::new(0));
    let d = done.clone();
    enc.map_buffer_on_submit(&down, wgpu::MapMode::Read, .., move |r| d.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release));
    let index = ctx.queue.submit([enc.finish()]);
    wait_mapped(ctx, &index, &done)?;
    {
        let view = down.slice(..).get_mapped_range().map_err(|e| GpuError::Device(e.to_string()))?;
        let words: &[u32] = bytemuck::cast_slice(&view);
        let per = (chunk_bytes / 4) as usize;
        for i in 0..chunks.len() {
            each(i, &words[i * per..(i + 1) * per]);
        }
    }
    down.unmap();
    Ok(())
}

fn wait_mapped(ctx: &GpuContext, index: &wgpu::SubmissionIndex, mapped: &AtomicU8) -> Result<(), GpuError> {
    ctx.device.poll(wgpu::PollType::Wait { submission_index: Some(index.clone()), timeout: None }).map_err(|e| GpuError::Device(e.to_string()))?;
    // The map callback runs in a poll after the submission is done.
    while mapped.load(Ordering::Acquire) == 0 {
        ctx.device.poll(wgpu::PollType::Poll).map_err(|e| GpuError::Device(e.to_string()))?;
        std::thread::yield_now();
    }
    if mapped.load(Ordering::Acquire) == 2 {
        return Err(GpuError::Device("mapping a snapshot read-back failed (device lost?)".into()));
    }
    Ok(())
}

impl ArenaSnapshot {
    /// Slots (keys) in the snapshot.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The device copy, for the VRAM tier (GPU path only).
    pub fn vram(&self) -> Option<VramSnapshot> {
        match &self.data {
            SnapshotData::Device { area, .. } => Some(VramSnapshot { layout: self.layout, slots: self.slots, area: area.clone() }),
            SnapshotData::Host { .. } => None,
        }
    }

    /// Wait for the device copy (background thread) and read the dirty chunks, or every chunk
    /// when `full`. Only what is read crosses from the device.
    pub fn read(self, full: bool) -> Result<SnapshotChunks, GpuError> {
        let l = self.layout;
        let cps = l.chunks_per_slot();
        let pick = |dirty: &[u32]| -> Vec<usize> { (0..self.slots * cps).filter(|&c| full || dirty[c] != 0).collect() };
        let mut entries: Vec<(u32, Vec<(u32, Vec<u32>)>)> = Vec::new();
        let mut push = |c: usize, words: &[u32]| {
            let (slot, in_slot) = ((c / cps) as u32, (c % cps) as u32);
            match entries.last_mut() {
                Some((s, v)) if *s == slot => v.push((in_slot, words.to_vec())),
                _ => entries.push((slot, vec![(in_slot, words.to_vec())])),
            }
        };
        let chunk_len = |c: usize| -> usize {
            // The last chunk of a slot may hold padding past `state_words`: never written.
            let in_slot = (c % cps) * l.chunk_words;
            l.chunk_words.min(l.state_words - in_slot)
        };
        match self.data {
            SnapshotData::Host { words, dirty } => {
                for c in pick(&dirty) {
                    let at = c * l.chunk_words;
                    push(c, &words[at..at + chunk_len(c)]);
                }
                Ok(SnapshotChunks { slots: self.slots, full, entries, bytes_down: 0 })
            }
            SnapshotData::Device { ctx, area, flags, mapped, index } => {
                wait_mapped(&ctx, &index, &mapped)?;
                let chunks = self.slots * cps;
                let dirty: Vec<u32> = if chunks == 0 {
                    Vec::new()
                } else {
                    let view = flags.slice(0..chunks as u64 * 4).get_mapped_range().map_err(|e| GpuError::Device(e.to_string()))?;
                    bytemuck::pod_collect_to_vec(&view)
                };
                flags.unmap();
                let chosen = pick(&dirty);
                if chosen.is_empty() {
                    return Ok(SnapshotChunks { slots: self.slots, full, entries, bytes_down: chunks as u64 * 4 });
                }
                // Download in pieces of at most DOWNLOAD_PIECE bytes (counted against the budget
                // while they live), each a few copies of coalesced runs of chunks.
                let chunk_bytes = l.chunk_words as u64 * 4;
                let per_piece = (DOWNLOAD_PIECE / chunk_bytes).max(1) as usize;
                let (ab, ao) = area.place();
                let mut bytes = 0u64;
                for piece in chosen.chunks(per_piece) {
                    let len = piece.len() as u64 * chunk_bytes;
                    ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).reserve_external(len, 0)?;
                    let got = read_piece(&ctx, &ab, ao, piece, chunk_bytes, |i, words| push(piece[i], &words[..chunk_len(piece[i])]));
                    ctx.pool.lock().unwrap_or_else(|p| p.into_inner()).release_external(len);
                    got?;
                    bytes += len;
                }
                Ok(SnapshotChunks { slots: self.slots, full, entries, bytes_down: bytes + chunks as u64 * 4 })
            }
        }
    }
}

/// Snapshots kept in device memory, per operator instance, for restarts inside the process.
/// Keyed by a name the runtime chooses (job, operator uid, subtask, parallelism).
pub struct VramTier {
    kept: Mutex<Vec<(String, u64, VramSnapshot, Arc<dyn std::any::Any + Send + Sync>)>>,
}

impl VramTier {
    /// The process's tier.
    pub fn global() -> &'static VramTier {
        static TIER: VramTier = VramTier { kept: Mutex::new(Vec::new()) };
        &TIER
    }

    /// Keep `snap` (of checkpoint `id`) with its host-side index `index` under `name`.
    ///
    /// The two newest snapshots of a name are kept: the newest is written before its checkpoint
    /// completes, so a restart in between restores the one before.
    pub fn keep(&self, name: &str, id: u64, snap: VramSnapshot, index: Arc<dyn std::any::Any + Send + Sync>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(n, i, ..)| n != name || *i != id);
        kept.push((name.to_string(), id, snap, index));
        let mut ids: Vec<u64> = kept.iter().filter(|(n, ..)| n == name).map(|e| e.1).collect();
        if ids.len() > 2 {
            ids.sort_unstable();
            let oldest = ids[ids.len() - 3];
            kept.retain(|(n, i, ..)| n != name || *i > oldest);
        }
    }

    /// The snapshot of checkpoint `id` under `name`, if the tier holds exactly that one.
    pub fn get(&self, name: &str, id: u64) -> Option<(VramSnapshot, Arc<dyn std::any::Any + Send + Sync>)> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter().find(|(n, i, ..)| n == name && *i == id).map(|(_, _, s, x)| (s.clone(), x.clone()))
    }

    /// Drop everything kept under names starting with `prefix` (a job's end).
    pub fn forget(&self, prefix: &str) {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).retain(|(n, ..)| !n.starts_with(prefix));
    }
}

#[cfg(test)]
mod tests;

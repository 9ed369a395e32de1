//! Device memory pool: memory is taken from the device in large slabs and sub-allocated as a
//! buddy system of power-of-two size classes. Every block is aligned to its size within its slab,
//! so a block's buddy is at `offset ^ size`; a freed block merges with its free buddy, again and
//! again, so small blocks freed give back the large block they were split from. The hot path
//! creates no buffers, and a request beyond the budget is a typed error, never a panic or a driver
//! failure.

use std::collections::BTreeSet;

use crate::GpuError;

/// Smallest block (also the storage-binding offset alignment wgpu guarantees).
pub const MIN_BLOCK: u64 = 256;
const DEFAULT_SLAB: u64 = 64 << 20;

/// A sub-allocated block: bytes `offset..offset + size` of slab `slab`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// The slab.
    pub slab: usize,
    /// Offset in the slab (a multiple of `size`).
    pub offset: u64,
    /// Size (the size class).
    pub size: u64,
    class: u32,
}

/// Pool statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes taken from the device (slabs, and the transfer engine's staging buffers).
    pub reserved: u64,
    /// Bytes in blocks handed out (and staging buffers).
    pub in_use: u64,
    /// Peak of `in_use`.
    pub peak: u64,
    /// Block allocations served.
    pub allocations: u64,
    /// Slabs (device buffers) created: after warm-up this should not grow.
    pub slab_creations: u64,
}

impl PoolStats {
    /// Reserved bytes not in use, as a fraction of reserved.
    pub fn fragmentation(&self) -> f64 {
        if self.reserved == 0 {
            0.0
        } else {
            1.0 - self.in_use as f64 / self.reserved as f64
        }
    }
}

/// The pool's bookkeeping; device buffers live beside it, one per slab.
pub struct DevicePool {
    budget: u64,
    slab_size: u64,
    max_binding: u64,
    slabs: Vec<u64>,
    /// Per size class, the free blocks as (slab, offset): ordered, so allocation prefers low
    /// offsets of early slabs, and a buddy is found in O(log n).
    free: Vec<BTreeSet<(usize, u64)>>,
    stats: PoolStats,
    buffers: Vec<wgpu::Buffer>,
}

fn class_of(size: u64) -> u32 {
    size.max(MIN_BLOCK).next_power_of_two().trailing_zeros() - MIN_BLOCK.trailing_zeros()
}

/// Create a device buffer, turning wgpu's out-of-memory and validation errors into typed errors
/// (wgpu's default handler would panic). `what` names the buffer in the message.
pub(crate) fn create_buffer(device: &wgpu::Device, desc: &wgpu::BufferDescriptor<'_>, what: &str) -> Result<wgpu::Buffer, GpuError> {
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let buffer = device.create_buffer(desc);
    // Native wgpu reports errors synchronously: the futures are ready at once.
    let oom = pollster::block_on(oom.pop());
    let validation = pollster::block_on(validation.pop());
    match (oom, validation) {
        (None, None) => Ok(buffer),
        (Some(e), _) | (None, Some(e)) => Err(GpuError::Device(format!("creating {what} of {} bytes: {e}", desc.size))),
    }
}

impl DevicePool {
    /// A pool within `budget` bytes; no block may exceed `max_binding` bytes.
    pub fn new(budget: u64, max_binding: u64) -> Self {
        // Slabs of at most a quarter of the budget: staging buffers and resident state count
        // against the same budget and must fit beside the first slab.
        let slab_size = DEFAULT_SLAB.min(budget / 4).min(max_binding).max(MIN_BLOCK) / MIN_BLOCK * MIN_BLOCK;
        Self { budget, slab_size, max_binding, slabs: Vec::new(), free: Vec::new(), stats: PoolStats::default(), buffers: Vec::new() }
    }

    /// The budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Statistics.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Allocate at least `size` bytes; `device` creates a slab when none has room.
    pub fn alloc(&mut self, device: Option<&wgpu::Device>, size: u64) -> Result<Block, GpuError> {
        if size > self.max_binding {
            return Err(GpuError::Input(format!(
                "a device block of {size} bytes exceeds the device's largest storage binding ({} bytes)",
                self.max_binding
            )));
        }
        let class = class_of(size);
        let csize = MIN_BLOCK << class;
        let block = match self.take_free(class) {
            Some(b) => b,
            None => {
                let slab_bytes = csize.max(self.slab_size);
                if self.stats.reserved + slab_bytes > self.budget {
                    // A smaller last slab still serves this request if it fits the budget.
                    if self.stats.reserved + csize > self.budget {
                        return Err(GpuError::OutOfMemory { requested: size, in_use: self.stats.in_use, budget: self.budget });
                    }
                    self.new_slab(device, csize)?;
                } else {
                    self.new_slab(device, slab_bytes)?;
                }
                self.take_free(class).expect("a new slab holds a block of the class it was made for")
            }
        };
        self.stats.in_use += csize;
        self.stats.peak = self.stats.peak.max(self.stats.in_use);
        self.stats.allocations += 1;
        Ok(block)
    }

    fn new_slab(&mut self, device: Option<&wgpu::Device>, bytes: u64) -> Result<(), GpuError> {
        if let Some(d) = device {
            let desc = wgpu::BufferDescriptor {
                label: Some("weir-pool-slab"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            };
            self.buffers.push(create_buffer(d, &desc, "a pool slab")?);
        }
        let slab = self.slabs.len();
        self.slabs.push(bytes);
        self.stats.reserved += bytes;
        self.stats.slab_creations += 1;
        // The slab as the largest aligned power-of-two blocks, in decreasing sizes (so each
        // offset is a multiple of the block's size).
        let mut offset = 0;
        while bytes - offset >= MIN_BLOCK {
            let size = 1u64 << (bytes - offset).ilog2();
            self.push_free(Block { slab, offset, size, class: class_of(size) });
            offset += size;
        }
        Ok(())
    }

    fn push_free(&mut self, b: Block) {
        if self.free.len() <= b.class as usize {
            self.free.resize_with(b.class as usize + 1, BTreeSet::new);
        }
        self.free[b.class as usize].insert((b.slab, b.offset));
    }

    /// A free block of `class`, splitting the smallest larger free block in halves down to it
    /// (the upper halves go to the free lists of their classes).
    fn take_free(&mut self, class: u32) -> Option<Block> {
        let from = (class as usize..self.free.len()).find(|&c| !self.free[c].is_empty())?;
        let (slab, offset) = self.free[from].pop_first()?;
        let mut b = Block { slab, offset, size: MIN_BLOCK << from, class: from as u32 };
        while b.class > class {
            b.class -= 1;
            b.size /= 2;
            self.push_free(Block { offset: b.offset + b.size, ..b });
        }
        Some(b)
    }

    /// Return a block for reuse, merged with its free buddy as far as it goes.
    pub fn free(&mut self, b: Block) {
        self.stats.in_use -= b.size;
        let mut b = b;
        while let Some(set) = self.free.get_mut(b.class as usize) {
            let buddy = b.offset ^ b.size;
            if !set.remove(&(b.slab, buddy)) {
                break;
            }
            b = Block { slab: b.slab, offset: b.offset.min(buddy), size: b.size * 2, class: b.class + 1 };
        }
        self.push_free(b);
    }

    /// Account for `add` bytes of device memory held outside the slabs (the transfer engine's
    /// staging buffers), after `remove` bytes were given back: counted as reserved and in use,
    /// within the budget.
    pub fn reserve_external(&mut self, add: u64, remove: u64) -> Result<(), GpuError> {
        let (reserved, in_use) = (self.stats.reserved - remove, self.stats.in_use - remove);
        if reserved + add > self.budget {
            return Err(GpuError::OutOfMemory { requested: add, in_use, budget: self.budget });
        }
        self.stats.reserved = reserved + add;
        self.stats.in_use = in_use + add;
        self.stats.peak = self.stats.peak.max(self.stats.in_use);
        Ok(())
    }

    /// Give back `bytes` of device memory held outside the slabs (see
    /// [`DevicePool::reserve_external`]).
    pub fn release_external(&mut self, bytes: u64) {
        self.stats.reserved -= bytes;
        self.stats.in_use -= bytes;
    }

    /// The device buffer of a slab.
    pub fn buffer(&self, slab: usize) -> &wgpu::Buffer {
        &self.buffers[slab]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_freed_blocks_and_refuses_beyond_budget() {
        let mut p = DevicePool::new(1 << 20, 1 << 30);
        let a = p.alloc(None, 1000).unwrap();
        assert_eq!(a.size, 1024);
        p.free(a);
        let b = p.alloc(None, 900).unwrap();
        assert_eq!(a, b, "a freed block of the class is reused");
        assert_eq!(p.stats().slab_creations, 1);
        let err = p.alloc(None, 2 << 20).unwrap_err();
        assert!(matches!(err, GpuError::OutOfMemory { requested, .. } if requested == 2 << 20), "{err}");
        let mut blocks = Vec::new();
        while let Ok(b) = p.alloc(None, 4096) {
            blocks.push(b);
        }
        assert!(p.stats().reserved <= 1 << 20);
        assert!(p.stats().in_use > (1 << 20) - 8192);
        for b in blocks {
            p.free(b);
        }
        assert_eq!(p.stats().in_use, 1024);
    }

    fn lcg(x: &mut u64) -> u64 {
        *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *x >> 33
    }

    /// Small blocks freed merge back into whole slabs: after the budget was filled with small
    /// blocks and they were freed, slab-sized blocks fill it again without a new slab (before
    /// buddies merged, the first one was refused: out of budget).
    #[test]
    fn freed_buddies_merge_back_into_whole_slabs() {
        let budget = 4u64 << 20;
        let mut p = DevicePool::new(budget, 1 << 30);
        let mut seed = 7;
        let mut blocks = Vec::new();
        while let Ok(b) = p.alloc(None, 256 + lcg(&mut seed) % 3000) {
            blocks.push(b);
        }
        assert!(p.stats().in_use > budget / 2, "{:?}", p.stats());
        let slabs = p.stats().slab_creations;
        // Free in a scrambled order.
        while !blocks.is_empty() {
            let i = (lcg(&mut seed) as usize) % blocks.len();
            p.free(blocks.swap_remove(i));
        }
        assert_eq!(p.stats().in_use, 0);
        let whole: Vec<Block> = (0..budget / p.slab_size).map(|_| p.alloc(None, p.slab_size).unwrap()).collect();
        assert!(whole.iter().all(|b| b.offset == 0 && b.size == p.slab_size), "{whole:?}");
        assert_eq!(p.stats().slab_creations, slabs, "no new slab for the slab-sized blocks");
    }

    /// Random allocations and frees: live blocks never overlap, each is aligned to its size and
    /// lies inside its slab, and the accounting adds up.
    #[test]
    fn live_blocks_never_overlap() {
        let mut p = DevicePool::new(3 << 20, 1 << 30);
        let mut seed = 11;
        let mut live: Vec<Block> = Vec::new();
        for step in 0..4000 {
            if live.is_empty() || !lcg(&mut seed).is_multiple_of(3) {
                let size = 1 + lcg(&mut seed) % if step % 50 == 0 { 1 << 20 } else { 20_000 };
                if let Ok(b) = p.alloc(None, size) {
                    assert!(b.size >= size && b.offset % b.size == 0 && b.offset + b.size <= p.slabs[b.slab], "{b:?}");
                    live.push(b);
                }
            } else {
                let i = (lcg(&mut seed) as usize) % live.len();
                p.free(live.swap_remove(i));
            }
            assert_eq!(p.stats().in_use, live.iter().map(|b| b.size).sum::<u64>());
        }
        let mut spans: Vec<(usize, u64, u64)> = live.iter().map(|b| (b.slab, b.offset, b.offset + b.size)).collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].0 != w[1].0 || w[0].2 <= w[1].1, "overlap: {w:?}");
        }
        for b in live.drain(..) {
            p.free(b);
        }
        // Everything merged back: each slab is one free block per power of two of its size.
        let free_blocks: usize = p.free.iter().map(|s| s.len()).sum();
        let expected: u32 = p.slabs.iter().map(|s| (s / MIN_BLOCK).count_ones()).sum();
        assert_eq!(free_blocks, expected as usize);
    }

    #[test]
    fn a_block_beyond_the_largest_binding_is_refused() {
        let mut p = DevicePool::new(1 << 30, 1 << 20);
        let err = p.alloc(None, (1 << 20) + 1).unwrap_err();
        assert!(matches!(&err, GpuError::Input(m) if m.contains("1048577") && m.contains("1048576")), "{err}");
        assert_eq!(p.stats().slab_creations, 0);
    }
}

//! Device memory pool: memory is taken from the device in large slabs and sub-allocated in
//! power-of-two size classes; freed blocks are reused, so the hot path creates no buffers. A
//! request beyond the budget is a typed error, never a panic or a driver failure.

use crate::GpuError;

/// Smallest block (also the storage-binding offset alignment wgpu guarantees).
pub const MIN_BLOCK: u64 = 256;
const DEFAULT_SLAB: u64 = 64 << 20;

/// A sub-allocated block: bytes `offset..offset + size` of slab `slab`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// The slab.
    pub slab: usize,
    /// Offset in the slab.
    pub offset: u64,
    /// Size (the size class).
    pub size: u64,
    class: u32,
}

/// Pool statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes taken from the device (slabs).
    pub reserved: u64,
    /// Bytes in blocks handed out.
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
    slabs: Vec<(u64, u64)>, // (size, bump cursor)
    free: Vec<Vec<Block>>,
    stats: PoolStats,
    buffers: Vec<wgpu::Buffer>,
}

fn class_of(size: u64) -> u32 {
    size.max(MIN_BLOCK).next_power_of_two().trailing_zeros() - MIN_BLOCK.trailing_zeros()
}

impl DevicePool {
    /// A pool within `budget` bytes; no block may exceed `max_binding` bytes.
    pub fn new(budget: u64, max_binding: u64) -> Self {
        let slab_size = DEFAULT_SLAB.min(budget.max(MIN_BLOCK)).min(max_binding.max(MIN_BLOCK));
        Self { budget, slab_size, slabs: Vec::new(), free: Vec::new(), stats: PoolStats::default(), buffers: Vec::new() }
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
        let class = class_of(size);
        let csize = MIN_BLOCK << class;
        let oom = |s: &Self| GpuError::OutOfMemory { requested: size, in_use: s.stats.in_use, budget: s.budget };
        if self.free.len() <= class as usize {
            self.free.resize_with(class as usize + 1, Vec::new);
        }
        let block = if let Some(b) = self.free[class as usize].pop() {
            b
        } else if let Some(b) = self.split_larger(class) {
            b
        } else if let Some(slab) = self.slabs.iter().position(|(s, cur)| s - cur >= csize && csize <= self.slab_size) {
            let (_, cur) = &mut self.slabs[slab];
            let b = Block { slab, offset: *cur, size: csize, class };
            *cur += csize;
            b
        } else {
            let slab_bytes = csize.max(self.slab_size);
            if self.stats.reserved + slab_bytes > self.budget {
                // A smaller last slab still serves this request if it fits the budget.
                if self.stats.reserved + csize > self.budget {
                    return Err(oom(self));
                }
                self.new_slab(device, csize)?;
            } else {
                self.new_slab(device, slab_bytes)?;
            }
            let slab = self.slabs.len() - 1;
            self.slabs[slab].1 = csize;
            Block { slab, offset: 0, size: csize, class }
        };
        self.stats.in_use += csize;
        self.stats.peak = self.stats.peak.max(self.stats.in_use);
        self.stats.allocations += 1;
        Ok(block)
    }

    fn new_slab(&mut self, device: Option<&wgpu::Device>, bytes: u64) -> Result<(), GpuError> {
        if let Some(d) = device {
            self.buffers.push(d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("weir-pool-slab"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }));
        }
        self.slabs.push((bytes, 0));
        self.stats.reserved += bytes;
        self.stats.slab_creations += 1;
        Ok(())
    }

    /// Split a free block of a larger class down to `class` (buddy-style halving); the other
    /// halves go to the free lists of their classes.
    fn split_larger(&mut self, class: u32) -> Option<Block> {
        let larger = ((class + 1) as usize..self.free.len()).find(|&c| !self.free[c].is_empty())?;
        let mut b = self.free[larger].pop()?;
        while b.class > class {
            b.class -= 1;
            b.size /= 2;
            let buddy = Block { slab: b.slab, offset: b.offset + b.size, size: b.size, class: b.class };
            self.free[b.class as usize].push(buddy);
        }
        Some(b)
    }

    /// Return a block for reuse.
    pub fn free(&mut self, b: Block) {
        self.stats.in_use -= b.size;
        self.free[b.class as usize].push(b);
    }

    /// Account for `add` bytes of device memory held outside the slabs (the direct transfer
    /// path's mapped buffers), after `remove` bytes were given back: counted as reserved and in
    /// use, within the budget.
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
}

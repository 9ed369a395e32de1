//! Key groups: the unit of keyed state that moves when parallelism changes.

use std::hash::{BuildHasher, Hash, Hasher};

use serde::{Deserialize, Serialize};

/// Default number of key groups (Flink's `max_parallelism` for small jobs).
pub const DEFAULT_MAX_PARALLELISM: u32 = 128;

/// A contiguous range of key groups `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupRange {
    /// First key group.
    pub start: u32,
    /// One past the last key group.
    pub end: u32,
}

impl KeyGroupRange {
    /// `[start, end)`.
    pub fn new(start: u32, end: u32) -> Self {
        assert!(start <= end, "key group range {start}..{end} is reversed");
        Self { start, end }
    }

    /// The range owned by operator instance `index` of `parallelism` (Flink's formula).
    pub fn for_operator(max_parallelism: u32, parallelism: u32, index: u32) -> Self {
        assert!(parallelism > 0 && parallelism <= max_parallelism && index < parallelism);
        let mp = max_parallelism as u64;
        let p = parallelism as u64;
        let i = index as u64;
        let start = (i * mp).div_ceil(p);
        let end = ((i + 1) * mp).div_ceil(p);
        Self::new(start as u32, end as u32)
    }

    /// Number of key groups.
    pub fn len(&self) -> u32 {
        self.end - self.start
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether `kg` is inside.
    pub fn contains(&self, kg: u32) -> bool {
        kg >= self.start && kg < self.end
    }

    /// The key groups.
    pub fn iter(&self) -> std::ops::Range<u32> {
        self.start..self.end
    }
}

/// The operator instance that owns key group `kg` (inverse of [`KeyGroupRange::for_operator`]).
#[inline]
pub fn operator_for_key_group(max_parallelism: u32, parallelism: u32, kg: u32) -> u32 {
    ((kg as u64 * parallelism as u64) / max_parallelism as u64) as u32
}

/// The key group of a key hash.
#[inline]
pub fn key_group_of_hash(hash: u64, max_parallelism: u32) -> u32 {
    // Use the high bits: the shard index inside a key group uses the low ones.
    (((hash >> 32) * max_parallelism as u64) >> 32) as u32
}

/// The key group of a key.
#[inline]
pub fn key_group<K: Hash + ?Sized>(key: &K, max_parallelism: u32) -> u32 {
    key_group_of_hash(StableHasher::hash_one(key), max_parallelism)
}

/// A fast hash that is stable across processes, runs and builds, so that a key lands in the same
/// key group after a restore (std's hasher promises no such stability).
#[derive(Clone, Copy, Default, Debug)]
pub struct StableHasher {
    state: u64,
}

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl StableHasher {
    /// Hash one value.
    #[inline]
    pub fn hash_one<T: Hash + ?Sized>(v: &T) -> u64 {
        let mut h = StableHasher::default();
        v.hash(&mut h);
        h.finish()
    }

    #[inline]
    fn add(&mut self, w: u64) {
        self.state = (self.state.rotate_left(5) ^ w).wrapping_mul(K);
    }
}

impl Hasher for StableHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // murmur3's fmix64: spreads every input bit over the output.
        let mut h = self.state;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_i64(&mut self, i: i64) {
        self.add(i as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

/// [`BuildHasher`] for [`StableHasher`].
#[derive(Clone, Copy, Default, Debug)]
pub struct StableBuildHasher;

impl BuildHasher for StableBuildHasher {
    type Hasher = StableHasher;
    #[inline]
    fn build_hasher(&self) -> StableHasher {
        StableHasher::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_partition_key_groups() {
        for p in 1..=16 {
            let mut next = 0;
            for i in 0..p {
                let r = KeyGroupRange::for_operator(128, p, i);
                assert_eq!(r.start, next);
                for kg in r.iter() {
                    assert_eq!(operator_for_key_group(128, p, kg), i, "p={p} kg={kg}");
                }
                next = r.end;
            }
            assert_eq!(next, 128);
        }
    }

    #[test]
    fn hash_is_stable() {
        // Pinned values: a change here moves state between key groups and breaks restores.
        assert_eq!(key_group(&42u64, 128), key_group(&42u64, 128));
        assert_eq!(StableHasher::hash_one(&1u64), 11_286_133_854_226_296_554);
    }

    proptest! {
        #[test]
        fn key_groups_in_bounds(k in any::<u64>(), mp in 1u32..4096) {
            prop_assert!(key_group(&k, mp) < mp);
        }
    }
}

//! The heap backend's copy-on-write keyed map.
//!
//! The map is split into shards (a few per key group). A snapshot clones the shard `Arc`s: the
//! synchronous pause is O(shards), independent of the number of keys. The first write to a shard
//! that a snapshot still shares copies that shard alone (`Arc::make_mut`), so processing goes on
//! while a background thread serialises the snapshot.

use std::hash::Hash;
use std::sync::Arc;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use crate::keygroup::{key_group_of_hash, KeyGroupRange, StableHasher};

/// Shards per key group: the unit of copy-on-write.
pub const SHARDS_PER_KEY_GROUP: u32 = 8;

type Shard<K, V> = Arc<HashTable<(K, V)>>;

/// The hash a shard's table uses. The key's hash picks the key group (high bits) and the shard
/// (low bits), so within one shard those bits are alike; remix them so that the table's bucket
/// index (low bits) and tag (high bits) are spread again. One key hash per access.
#[inline]
fn table_hash(h: u64) -> u64 {
    (h ^ (h >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(26)
}

#[inline]
fn rehash<K: Hash, V>(e: &(K, V)) -> u64 {
    table_hash(StableHasher::hash_one(&e.0))
}

/// A keyed map over a key-group range, with O(shards) snapshots.
#[derive(Clone, Debug)]
pub struct CowMap<K, V> {
    range: KeyGroupRange,
    max_parallelism: u32,
    shards: Vec<Shard<K, V>>,
}

/// A frozen view of a [`CowMap`], cheap to take and safe to read from another thread.
#[derive(Clone, Debug)]
pub struct CowSnapshot<K, V> {
    range: KeyGroupRange,
    shards: Vec<Shard<K, V>>,
}

impl<K: Hash + Eq + Clone, V: Clone> CowMap<K, V> {
    /// An empty map for the key groups in `range` of `max_parallelism`.
    pub fn new(range: KeyGroupRange, max_parallelism: u32) -> Self {
        let n = (range.len() * SHARDS_PER_KEY_GROUP) as usize;
        Self { range, max_parallelism, shards: (0..n).map(|_| Arc::default()).collect() }
    }

    /// The key groups this map holds.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    #[inline]
    fn locate(&self, key: &K) -> (usize, u64) {
        let h = StableHasher::hash_one(key);
        let kg = key_group_of_hash(h, self.max_parallelism);
        assert!(
            self.range.contains(kg),
            "key of key group {kg} routed to the instance that owns {:?}",
            self.range
        );
        let i = ((kg - self.range.start) * SHARDS_PER_KEY_GROUP + (h as u32 % SHARDS_PER_KEY_GROUP)) as usize;
        (i, table_hash(h))
    }

    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: &K) -> Option<&V> {
        let (i, h) = self.locate(key);
        self.shards[i].find(h, |e| e.0 == *key).map(|e| &e.1)
    }

    /// The value of `key`, for update (copies its shard if a snapshot shares it).
    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let (i, h) = self.locate(key);
        Arc::make_mut(&mut self.shards[i]).find_mut(h, |e| e.0 == *key).map(|e| &mut e.1)
    }

    /// The value of `key`, inserting `init()` first if absent: one lookup, and the key is
    /// cloned only when inserted.
    #[inline]
    pub fn get_or_insert_with(&mut self, key: &K, init: impl FnOnce() -> V) -> &mut V {
        let (i, h) = self.locate(key);
        match Arc::make_mut(&mut self.shards[i]).entry(h, |e| e.0 == *key, rehash) {
            Entry::Occupied(o) => &mut o.into_mut().1,
            Entry::Vacant(v) => &mut v.insert((key.clone(), init())).into_mut().1,
        }
    }

    /// The value of `key`, inserting the default first if absent.
    #[inline]
    pub fn entry_or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        self.get_or_insert_with(&key, V::default)
    }

    /// Set `key` to `value`.
    #[inline]
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let (i, h) = self.locate(&key);
        match Arc::make_mut(&mut self.shards[i]).entry(h, |e| e.0 == key, rehash) {
            Entry::Occupied(mut o) => Some(std::mem::replace(&mut o.get_mut().1, value)),
            Entry::Vacant(v) => {
                v.insert((key, value));
                None
            }
        }
    }

    /// Remove `key`.
    #[inline]
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (i, h) = self.locate(key);
        self.shards[i].find(h, |e| e.0 == *key)?; // no copy for a no-op
        match Arc::make_mut(&mut self.shards[i]).find_entry(h, |e| e.0 == *key) {
            Ok(o) => Some(o.remove().0 .1),
            Err(_) => None,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    /// All entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter().map(|e| (&e.0, &e.1)))
    }

    /// Freeze the current contents (O(shards)).
    pub fn snapshot(&self) -> CowSnapshot<K, V> {
        CowSnapshot { range: self.range, shards: self.shards.clone() }
    }

    /// Insert an entry read from a snapshot, checking that it belongs here.
    pub fn insert_restored(&mut self, key: K, value: V) -> Result<(), u32> {
        let kg = key_group_of_hash(StableHasher::hash_one(&key), self.max_parallelism);
        if !self.range.contains(kg) {
            return Err(kg);
        }
        self.insert(key, value);
        Ok(())
    }
}

impl<K, V> CowSnapshot<K, V> {
    /// The key groups.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// The entries of key group `kg`.
    pub fn key_group(&self, kg: u32) -> impl Iterator<Item = (&K, &V)> {
        let first = ((kg - self.range.start) * SHARDS_PER_KEY_GROUP) as usize;
        self.shards[first..first + SHARDS_PER_KEY_GROUP as usize].iter().flat_map(|s| s.iter().map(|e| (&e.0, &e.1)))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn snapshot_is_isolated_from_later_writes() {
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 128), 128);
        for k in 0..10_000 {
            m.insert(k, k);
        }
        let snap = m.snapshot();
        for k in 0..10_000 {
            *m.get_mut(&k).unwrap() += 1;
        }
        m.remove(&3);
        let mut total_snap: u64 = 0;
        for kg in 0..128 {
            total_snap += snap.key_group(kg).map(|(_, v)| *v).sum::<u64>();
        }
        assert_eq!(total_snap, (0..10_000).sum::<u64>());
        assert_eq!(m.get(&5), Some(&6));
        assert_eq!(m.get(&3), None);
        assert_eq!(snap.len(), 10_000);
    }

    proptest! {
        #[test]
        fn behaves_like_a_hashmap(ops in proptest::collection::vec((0u8..3, 0u64..64, any::<i32>()), 0..300)) {
            let mut m: CowMap<u64, i32> = CowMap::new(KeyGroupRange::new(0, 16), 16);
            let mut model = std::collections::HashMap::new();
            let mut snaps = Vec::new();
            for (op, k, v) in ops {
                match op {
                    0 => { prop_assert_eq!(m.insert(k, v), model.insert(k, v)); }
                    1 => { prop_assert_eq!(m.remove(&k), model.remove(&k)); }
                    _ => { snaps.push((m.snapshot(), model.clone())); }
                }
            }
            prop_assert_eq!(m.len(), model.len());
            for (snap, model) in snaps {
                let mut got = std::collections::HashMap::new();
                for kg in 0..16 { got.extend(snap.key_group(kg).map(|(k, v)| (*k, *v))); }
                prop_assert_eq!(got, model);
            }
        }
    }
}

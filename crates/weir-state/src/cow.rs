//! The heap backend's copy-on-write keyed map.
//!
//! The map is split into shards (a few per key group). A snapshot freezes every shard's table
//! into an `Arc` that the snapshot shares: the synchronous pause is O(shards), independent of
//! the number of keys. While a snapshot still holds a shard, a write copies only the entry it
//! writes, into the shard's *overlay* (`None` marks a removal); reads look in the overlay first.
//! When the snapshot lets go (the writer is done), the next write to the shard takes the table
//! back and merges the overlay into it, O(entries in the overlay). A shard whose overlay grows
//! past an eighth of its table (a quarter for entries that own heap data) is copied whole
//! instead: past that point the per-entry copies (each a hash insert, then a merge) have cost
//! about one bulk copy.
//!
//! With no snapshot alive a shard is a plain owned table: the hot path is one hash lookup and
//! no atomic operation.
//!
//! [`CowMap::track_changes`] makes the map remember the keys written or removed between two
//! snapshots, for incremental (delta) checkpoints: [`CowSnapshot::changed_keys`]. They are kept
//! in a per-shard set of keys rather than as a stamp in every entry: the set costs nothing while
//! tracking is off (a stamp would grow every entry, e.g. a 24-byte `(u64, (i64, u64))` to 32
//! bytes, for every job), hands the writer each key once, and while on costs one probe per write
//! in a set that holds only this interval's changed keys (the key is cloned on its first change).

use std::hash::Hash;
use std::sync::Arc;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use crate::keygroup::{key_group_of_hash, KeyGroupRange, StableHasher};

pub mod bench;

/// Shards per key group: the unit of snapshotting.
pub const SHARDS_PER_KEY_GROUP: u32 = 8;

/// A shard whose overlay holds this share of its frozen table (overlay × this ≥ table) is
/// copied whole on the next write: the rent-or-buy point, where the per-entry copies made so far
/// cost about one bulk copy. An overlay copy costs a hash insert and, later, a merge (≈ 600 ns
/// on the development machine, 10 M keys); a bulk copy of a plain entry (no heap data: a sum, a
/// count) about a tenth of that, of an entry that owns heap data (a `Vec`, a `String`, a map)
/// about a quarter, since each clone allocates (`examples/cow_cost.rs`, docs/BENCHMARKS.md).
const COPY_SHARD_AT_PLAIN: usize = 8;
/// See [`COPY_SHARD_AT_PLAIN`]: for entries that own heap data.
const COPY_SHARD_AT_OWNING: usize = 4;

type Table<K, V> = HashTable<(K, V)>;

/// The hash a shard's table uses. The key's hash picks the key group (high bits) and the shard
/// (low bits), so within one shard those bits are alike; remix them so that the table's bucket
/// index (low bits) and tag (high bits) are spread again. One key hash per access.
#[inline]
fn table_hash(h: u64) -> u64 {
    (h ^ (h >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(26)
}

#[inline]
fn key_hash<K: Hash>(k: &K) -> u64 {
    table_hash(StableHasher::hash_one(k))
}

#[inline]
fn rehash<K: Hash, T>(e: &(K, T)) -> u64 {
    key_hash(&e.0)
}

/// One shard: owned and written in place, or frozen into a snapshot.
#[derive(Clone, Debug)]
enum Shard<K, V> {
    Owned(Table<K, V>),
    Frozen(Box<Frozen<K, V>>),
}

/// A shard whose table a snapshot may still hold.
#[derive(Clone, Debug)]
struct Frozen<K, V> {
    /// The table as of the last snapshot, shared with it.
    base: Arc<Table<K, V>>,
    /// Entries written since: `Some` = the value now, `None` = removed.
    overlay: HashTable<(K, Option<V>)>,
    /// Keys in the shard (base and overlay together).
    len: usize,
}

/// A keyed map over a key-group range, with O(shards) snapshots.
#[derive(Clone, Debug)]
pub struct CowMap<K, V> {
    range: KeyGroupRange,
    max_parallelism: u32,
    shards: Vec<Shard<K, V>>,
    /// Per shard, the keys written or removed since the last snapshot (while tracking).
    changes: Vec<HashTable<K>>,
    tracking: bool,
    /// Tracking has been on since the last snapshot (or since the map was new and empty).
    complete: bool,
    /// Snapshots taken (none yet: an empty map has no untracked past).
    snapshots: u64,
    /// Entries copied because a snapshot shared them.
    copied: u64,
    /// See [`COPY_SHARD_AT_PLAIN`] (changed by tests to force either path).
    copy_shard_at: usize,
}

/// A frozen view of a [`CowMap`], cheap to take and safe to read from another thread.
#[derive(Clone, Debug)]
pub struct CowSnapshot<K, V> {
    range: KeyGroupRange,
    max_parallelism: u32,
    /// `None`: released by [`CowSnapshot::release_key_group`].
    shards: Vec<Option<Arc<Table<K, V>>>>,
    /// Per shard, the keys changed since the previous snapshot (`None`: not tracked throughout).
    changes: Option<Arc<Vec<HashTable<K>>>>,
}

/// Remember `key` as changed in this interval: an allocation only on its first change.
#[inline]
fn mark<K: Hash + Eq + Clone>(set: &mut HashTable<K>, h: u64, key: &K) {
    if let Entry::Vacant(v) = set.entry(h, |k| k == key, key_hash) {
        v.insert(key.clone());
    }
}

/// Apply an overlay to a table.
fn merge<K: Hash + Eq, V>(table: &mut Table<K, V>, overlay: HashTable<(K, Option<V>)>) {
    for (k, v) in overlay {
        let h = key_hash(&k);
        match v {
            Some(v) => match table.entry(h, |e| e.0 == k, rehash) {
                Entry::Occupied(mut o) => o.get_mut().1 = v,
                Entry::Vacant(e) => {
                    e.insert((k, v));
                }
            },
            None => {
                if let Ok(o) = table.find_entry(h, |e| e.0 == k) {
                    o.remove();
                }
            }
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Shard<K, V> {
    /// Before a write: take back a table no snapshot holds any more, or copy a frozen one whose
    /// overlay has grown large. Free (one predictable branch) for an owned shard.
    #[inline]
    fn prepare(&mut self, copied: &mut u64, copy_at: usize) {
        if let Shard::Frozen(f) = self {
            if Arc::get_mut(&mut f.base).is_some() || f.overlay.len().saturating_mul(copy_at) >= f.base.len() {
                self.thaw(copied);
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn thaw(&mut self, copied: &mut u64) {
        let Shard::Frozen(f) = std::mem::replace(self, Shard::Owned(HashTable::new())) else { return };
        let Frozen { base, overlay, .. } = *f;
        let mut table = Arc::try_unwrap(base).unwrap_or_else(|shared| {
            *copied += shared.len() as u64;
            (*shared).clone()
        });
        merge(&mut table, overlay);
        *self = Shard::Owned(table);
    }

    /// Freeze for a snapshot and return the table it shares.
    fn freeze(&mut self, copied: &mut u64) -> Arc<Table<K, V>> {
        match self {
            Shard::Frozen(f) => {
                if !f.overlay.is_empty() {
                    let overlay = std::mem::take(&mut f.overlay);
                    match Arc::get_mut(&mut f.base) {
                        Some(table) => merge(table, overlay),
                        None => {
                            // An earlier snapshot still holds the base (its writer is slower than
                            // the checkpoint interval): this one gets a copy with the overlay applied.
                            let mut table = (*f.base).clone();
                            *copied += table.len() as u64;
                            merge(&mut table, overlay);
                            f.base = Arc::new(table);
                        }
                    }
                }
                f.base.clone()
            }
            Shard::Owned(t) => {
                let base = Arc::new(std::mem::take(t));
                let len = base.len();
                *self = Shard::Frozen(Box::new(Frozen { base: base.clone(), overlay: HashTable::new(), len }));
                base
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Shard::Owned(t) => t.len(),
            Shard::Frozen(f) => f.len,
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let (base, overlay) = match self {
            Shard::Owned(t) => (t, None),
            Shard::Frozen(f) => (&*f.base, Some(&f.overlay).filter(|o| !o.is_empty())),
        };
        let written = overlay.into_iter().flat_map(|o| o.iter().filter_map(|e| e.1.as_ref().map(|v| (&e.0, v))));
        let kept = base
            .iter()
            .filter(move |e| overlay.is_none_or(|o| o.find(key_hash(&e.0), |x| x.0 == e.0).is_none()))
            .map(|e| (&e.0, &e.1));
        written.chain(kept)
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Frozen<K, V> {
    #[inline]
    fn get(&self, h: u64, key: &K) -> Option<&V> {
        if !self.overlay.is_empty() {
            if let Some(e) = self.overlay.find(h, |e| e.0 == *key) {
                return e.1.as_ref();
            }
        }
        self.base.find(h, |e| e.0 == *key).map(|e| &e.1)
    }

    fn get_mut(&mut self, h: u64, key: &K, copied: &mut u64) -> Option<&mut V> {
        match self.overlay.entry(h, |e| e.0 == *key, rehash) {
            Entry::Occupied(o) => o.into_mut().1.as_mut(),
            Entry::Vacant(slot) => {
                let (k, v) = self.base.find(h, |e| e.0 == *key)?;
                *copied += 1;
                slot.insert((k.clone(), Some(v.clone()))).into_mut().1.as_mut()
            }
        }
    }

    fn get_or_insert_with(&mut self, h: u64, key: &K, init: impl FnOnce() -> V, copied: &mut u64) -> &mut V {
        let len = &mut self.len;
        match self.overlay.entry(h, |e| e.0 == *key, rehash) {
            Entry::Occupied(o) => o.into_mut().1.get_or_insert_with(|| {
                *len += 1;
                init()
            }),
            Entry::Vacant(slot) => {
                let v = match self.base.find(h, |e| e.0 == *key) {
                    Some(e) => {
                        *copied += 1;
                        e.1.clone()
                    }
                    None => {
                        *len += 1;
                        init()
                    }
                };
                slot.insert((key.clone(), Some(v))).into_mut().1.as_mut().expect("just inserted")
            }
        }
    }

    fn insert(&mut self, h: u64, key: K, value: V) -> Option<V> {
        let old = match self.overlay.entry(h, |e| e.0 == key, rehash) {
            Entry::Occupied(mut o) => o.get_mut().1.replace(value),
            Entry::Vacant(slot) => {
                let old = self.base.find(h, |e| e.0 == key).map(|e| e.1.clone());
                slot.insert((key, Some(value)));
                old
            }
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    fn remove(&mut self, h: u64, key: &K) -> Option<V> {
        let old = match self.overlay.entry(h, |e| e.0 == *key, rehash) {
            Entry::Occupied(mut o) => o.get_mut().1.take(),
            Entry::Vacant(slot) => {
                let (k, v) = self.base.find(h, |e| e.0 == *key)?;
                let old = v.clone();
                slot.insert((k.clone(), None));
                Some(old)
            }
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }
}

impl<K: Hash + Eq + Clone, V: Clone> CowMap<K, V> {
    /// An empty map for the key groups in `range` of `max_parallelism`.
    pub fn new(range: KeyGroupRange, max_parallelism: u32) -> Self {
        let n = (range.len() * SHARDS_PER_KEY_GROUP) as usize;
        Self {
            range,
            max_parallelism,
            shards: (0..n).map(|_| Shard::Owned(HashTable::new())).collect(),
            changes: (0..n).map(|_| HashTable::new()).collect(),
            tracking: false,
            complete: false,
            snapshots: 0,
            copied: 0,
            // Entries without drop glue own no heap data: their clone is a plain copy.
            copy_shard_at: if std::mem::needs_drop::<(K, V)>() { COPY_SHARD_AT_OWNING } else { COPY_SHARD_AT_PLAIN },
        }
    }

    /// The key groups this map holds.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// The number of key groups keys hash into.
    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
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
        match &self.shards[i] {
            Shard::Owned(t) => t.find(h, |e| e.0 == *key).map(|e| &e.1),
            Shard::Frozen(f) => f.get(h, key),
        }
    }

    /// The value of `key`, for update (copies that entry if a snapshot shares it).
    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let (i, h) = self.locate(key);
        let shard = &mut self.shards[i];
        shard.prepare(&mut self.copied, self.copy_shard_at);
        let v = match shard {
            Shard::Owned(t) => t.find_mut(h, |e| e.0 == *key).map(|e| &mut e.1),
            Shard::Frozen(f) => f.get_mut(h, key, &mut self.copied),
        };
        if self.tracking && v.is_some() {
            mark(&mut self.changes[i], h, key);
        }
        v
    }

    /// The value of `key`, inserting `init()` first if absent: one lookup, and the key is
    /// cloned only when inserted (or copied for a snapshot, or first marked as changed).
    #[inline]
    pub fn get_or_insert_with(&mut self, key: &K, init: impl FnOnce() -> V) -> &mut V {
        let (i, h) = self.locate(key);
        if self.tracking {
            mark(&mut self.changes[i], h, key);
        }
        let shard = &mut self.shards[i];
        shard.prepare(&mut self.copied, self.copy_shard_at);
        match shard {
            Shard::Owned(t) => match t.entry(h, |e| e.0 == *key, rehash) {
                Entry::Occupied(o) => &mut o.into_mut().1,
                Entry::Vacant(v) => &mut v.insert((key.clone(), init())).into_mut().1,
            },
            Shard::Frozen(f) => f.get_or_insert_with(h, key, init, &mut self.copied),
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

    /// Set `key` to `value`; returns the value it had.
    #[inline]
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.put(key, value, true)
    }

    #[inline]
    fn put(&mut self, key: K, value: V, track: bool) -> Option<V> {
        let (i, h) = self.locate(&key);
        if track && self.tracking {
            mark(&mut self.changes[i], h, &key);
        }
        let shard = &mut self.shards[i];
        shard.prepare(&mut self.copied, self.copy_shard_at);
        match shard {
            Shard::Owned(t) => match t.entry(h, |e| e.0 == key, rehash) {
                Entry::Occupied(mut o) => Some(std::mem::replace(&mut o.get_mut().1, value)),
                Entry::Vacant(v) => {
                    v.insert((key, value));
                    None
                }
            },
            Shard::Frozen(f) => f.insert(h, key, value),
        }
    }

    /// Remove `key`; returns the value it had.
    #[inline]
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.delete(key, true)
    }

    #[inline]
    fn delete(&mut self, key: &K, track: bool) -> Option<V> {
        let (i, h) = self.locate(key);
        let shard = &mut self.shards[i];
        shard.prepare(&mut self.copied, self.copy_shard_at);
        let old = match shard {
            Shard::Owned(t) => match t.find_entry(h, |e| e.0 == *key) {
                Ok(o) => Some(o.remove().0 .1),
                Err(_) => None,
            },
            Shard::Frozen(f) => f.remove(h, key),
        };
        if track && self.tracking && old.is_some() {
            mark(&mut self.changes[i], h, key);
        }
        old
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.len() == 0)
    }

    /// All entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// Freeze the current contents: O(shards) when no earlier snapshot is alive (a shard that
    /// one still holds and that was written since is copied). With change tracking on, the
    /// snapshot takes the keys changed since the previous snapshot and a new interval starts.
    pub fn snapshot(&mut self) -> CowSnapshot<K, V> {
        let copied = &mut self.copied;
        let shards = self.shards.iter_mut().map(|s| Some(s.freeze(copied))).collect();
        let changes = if self.tracking && self.complete {
            Some(Arc::new(self.changes.iter_mut().map(std::mem::take).collect()))
        } else {
            self.changes.iter_mut().for_each(|c| *c = HashTable::new());
            None
        };
        self.complete = self.tracking;
        self.snapshots += 1;
        CowSnapshot { range: self.range, max_parallelism: self.max_parallelism, shards, changes }
    }

    /// Remember the keys written or removed between snapshots (for delta checkpoints), or stop.
    ///
    /// The changes of an interval are complete, and the next snapshot carries them
    /// ([`CowSnapshot::tracks_changes`]), when tracking was on since the previous snapshot, or
    /// since the map was new and empty. Restored entries ([`CowMap::insert_restored`],
    /// [`CowMap::remove_restored`]) are not changes: turn tracking on before a restore to write
    /// the first checkpoint after it as a delta of the checkpoint restored.
    pub fn track_changes(&mut self, on: bool) {
        if on && !self.tracking {
            self.complete = self.snapshots == 0 && self.is_empty();
        }
        if !on {
            self.changes.iter_mut().for_each(|c| *c = HashTable::new());
            self.complete = false;
        }
        self.tracking = on;
    }

    /// Whether change tracking is on.
    pub fn tracks_changes(&self) -> bool {
        self.tracking
    }

    /// Entries copied since the map was made because a snapshot shared them (single entries
    /// written while a snapshot was alive, and whole shards).
    pub fn copied_entries(&self) -> u64 {
        self.copied
    }

    /// Insert an entry read from a snapshot, checking that it belongs here (`Err`: the key's
    /// key group). Not a change for [`CowMap::track_changes`].
    pub fn insert_restored(&mut self, key: K, value: V) -> Result<(), u32> {
        self.check_restored(&key)?;
        self.put(key, value, false);
        Ok(())
    }

    /// Remove a key a delta file removes, checking that it belongs here (`Err`: the key's key
    /// group). Not a change for [`CowMap::track_changes`].
    pub fn remove_restored(&mut self, key: &K) -> Result<Option<V>, u32> {
        self.check_restored(key)?;
        Ok(self.delete(key, false))
    }

    fn check_restored(&self, key: &K) -> Result<(), u32> {
        let kg = key_group_of_hash(StableHasher::hash_one(key), self.max_parallelism);
        if self.range.contains(kg) {
            Ok(())
        } else {
            Err(kg)
        }
    }

    /// Override [`COPY_SHARD_AT_PLAIN`] (tests force either path; [`bench`] compares
    /// thresholds).
    pub(crate) fn set_copy_shard_at(&mut self, share: usize) {
        self.copy_shard_at = share;
    }
}

impl<K, V> CowSnapshot<K, V> {
    /// The key groups.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    fn shards_of(&self, kg: u32) -> std::ops::Range<usize> {
        assert!(self.range.contains(kg), "key group {kg} is outside the snapshot's {:?}", self.range);
        let first = ((kg - self.range.start) * SHARDS_PER_KEY_GROUP) as usize;
        first..first + SHARDS_PER_KEY_GROUP as usize
    }

    /// The entries of key group `kg`.
    pub fn key_group(&self, kg: u32) -> impl Iterator<Item = (&K, &V)> {
        self.shards[self.shards_of(kg)].iter().flatten().flat_map(|s| s.iter().map(|e| (&e.0, &e.1)))
    }

    /// Number of keys (in the key groups not released).
    pub fn len(&self) -> usize {
        self.shards.iter().flatten().map(|s| s.len()).sum()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the snapshot knows every key changed since the previous snapshot of its map
    /// (change tracking was on throughout): then [`CowSnapshot::changed_keys`] is complete.
    pub fn tracks_changes(&self) -> bool {
        self.changes.is_some()
    }

    /// The keys of key group `kg` written or removed between the previous snapshot and this one,
    /// each once. Empty when the snapshot does not track changes.
    pub fn changed_keys(&self, kg: u32) -> impl Iterator<Item = &K> {
        let shards = self.shards_of(kg);
        self.changes.iter().flat_map(move |c| c[shards.clone()].iter().flat_map(|s| s.iter()))
    }

    /// Number of changed keys (see [`CowSnapshot::changed_keys`]).
    pub fn changed_len(&self) -> usize {
        self.changes.iter().flat_map(|c| c.iter()).map(|s| s.len()).sum()
    }

    /// Let go of key group `kg`'s entries (a writer done with them): the map's next write there
    /// goes in place instead of copying. Reads of `kg` see nothing after.
    pub fn release_key_group(&mut self, kg: u32) {
        for i in self.shards_of(kg) {
            self.shards[i] = None;
        }
    }
}

impl<K: Hash + Eq, V> CowSnapshot<K, V> {
    /// The value of `key` in the snapshot (`None` also outside its key groups).
    pub fn get(&self, key: &K) -> Option<&V> {
        let h = StableHasher::hash_one(key);
        let kg = key_group_of_hash(h, self.max_parallelism);
        if !self.range.contains(kg) {
            return None;
        }
        let i = ((kg - self.range.start) * SHARDS_PER_KEY_GROUP + (h as u32 % SHARDS_PER_KEY_GROUP)) as usize;
        self.shards[i].as_ref()?.find(table_hash(h), |e| e.0 == *key).map(|e| &e.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn contents<K: Clone + Eq + Hash, V: Clone>(snap: &CowSnapshot<K, V>) -> HashMap<K, V> {
        snap.range().iter().flat_map(|kg| snap.key_group(kg)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

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
        assert_eq!(snap.get(&3), Some(&3));
        assert_eq!(m.len(), 9_999);
    }

    #[test]
    fn a_write_under_a_live_snapshot_copies_one_entry() {
        // 80 000 keys over 1 key group: 8 shards of ~10 000 entries.
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 1), 1);
        for k in 0..80_000 {
            m.insert(k, k);
        }
        let snap = m.snapshot();
        for k in 0..100 {
            *m.get_mut(&k).unwrap() += 1;
        }
        m.remove(&200);
        m.insert(1_000_000, 7);
        *m.entry_or_default(300) += 1;
        *m.entry_or_default(2_000_000) += 1;
        // Copied: the 100 updated entries and the one of entry_or_default(300); the removal and
        // the new keys copy nothing.
        assert_eq!(m.copied_entries(), 101);
        assert_eq!((m.get(&5), m.get(&200), m.get(&1_000_000), m.get(&300), m.get(&2_000_000)), (Some(&6), None, Some(&7), Some(&301), Some(&1)));
        assert_eq!(m.len(), 80_000 - 1 + 2);
        assert_eq!(m.iter().count(), m.len());
        assert_eq!(m.iter().map(|(_, v)| *v).sum::<u64>(), (0..80_000u64).sum::<u64>() + 100 - 200 + 7 + 1 + 1);
        let want: HashMap<u64, u64> = (0..80_000).map(|k| (k, k)).collect();
        assert_eq!(contents(&snap), want);

        // The writer lets go: the next write to a shard merges its overlay, copying nothing.
        drop(snap);
        for k in 0..80_000 {
            if let Some(v) = m.get_mut(&k) {
                *v += 1;
            }
        }
        assert_eq!(m.copied_entries(), 101);
        assert_eq!((m.get(&5), m.get(&200), m.get(&300)), (Some(&7), None, Some(&302)));
        assert!(m.shards.iter().all(|s| matches!(s, Shard::Owned(_))));
    }

    #[test]
    fn a_heavily_written_shard_is_copied_whole() {
        // Plain entries: each shard is copied an eighth entry by entry, then whole.
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 1), 1);
        for k in 0..8_000 {
            m.insert(k, k);
        }
        let snap = m.snapshot();
        for k in 0..8_000 {
            *m.get_mut(&k).unwrap() += 1;
        }
        let copied = m.copied_entries();
        assert!((8_000 + 900..=8_000 + 1_100).contains(&copied), "{copied}");
        assert!(m.shards.iter().all(|s| matches!(s, Shard::Owned(_))));
        assert_eq!(contents(&snap), (0..8_000).map(|k| (k, k)).collect());
        assert_eq!(m.iter().map(|(_, v)| *v).sum::<u64>(), (1..=8_000u64).sum::<u64>());

        // Entries that own heap data (each clone allocates): a quarter, then whole.
        let mut m: CowMap<u64, String> = CowMap::new(KeyGroupRange::new(0, 1), 1);
        for k in 0..8_000 {
            m.insert(k, k.to_string());
        }
        let snap = m.snapshot();
        for k in 0..8_000 {
            m.get_mut(&k).unwrap().push('+');
        }
        let copied = m.copied_entries();
        assert!((8_000 + 1_800..=8_000 + 2_200).contains(&copied), "{copied}");
        assert_eq!(contents(&snap), (0..8_000).map(|k| (k, k.to_string())).collect());
        assert!(m.iter().all(|(k, v)| *v == format!("{k}+")));
    }

    #[test]
    fn snapshots_alive_together_each_keep_their_contents() {
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 2), 2);
        m.set_copy_shard_at(0);
        for k in 0..1_000 {
            m.insert(k, 0);
        }
        let mut snaps = Vec::new();
        for round in 1..=4u64 {
            for k in (0..1_000).step_by(round as usize) {
                m.insert(k, round);
            }
            m.remove(&(round * 10));
            snaps.push((m.snapshot(), m.iter().map(|(k, v)| (*k, *v)).collect::<HashMap<_, _>>()));
        }
        for (snap, want) in &snaps {
            assert_eq!(&contents(snap), want);
            assert_eq!(snap.len(), want.len());
        }
        // The later snapshots shared written shards with earlier ones: those were copied.
        assert!(m.copied_entries() > 0);
    }

    #[test]
    fn changes_are_tracked_between_snapshots() {
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 4), 4);
        m.track_changes(true);
        for k in 0..100 {
            m.insert(k, k);
        }
        let first = m.snapshot();
        assert!(first.tracks_changes());
        assert_eq!(first.changed_len(), 100);
        for _ in 0..3 {
            *m.get_mut(&1).unwrap() += 1;
            *m.entry_or_default(2) += 1;
        }
        m.remove(&3);
        m.remove(&1_000); // absent: no change
        assert!(m.get_mut(&1_001).is_none()); // absent: no change
        m.insert(500, 1);
        m.remove(&500); // added and removed in one interval: a change (a tombstone in a delta)
        let second = m.snapshot();
        let mut changed: Vec<u64> = second.range().iter().flat_map(|kg| second.changed_keys(kg).copied()).collect();
        changed.sort();
        assert_eq!(changed, [1, 2, 3, 500]);
        assert_eq!(second.changed_len(), 4);
        for kg in second.range().iter() {
            assert!(second.changed_keys(kg).all(|k| crate::keygroup::key_group(k, 4) == kg));
        }
        // The first snapshot's changes are its own.
        assert_eq!(first.changed_len(), 100);
        let third = m.snapshot();
        assert_eq!(third.changed_len(), 0);
        assert!(third.tracks_changes());

        // Turned on mid-interval: the next snapshot cannot tell all changes, the one after can.
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 4), 4);
        m.insert(1, 1);
        m.track_changes(true);
        m.insert(2, 2);
        assert!(!m.snapshot().tracks_changes());
        m.insert(3, 3);
        let s = m.snapshot();
        assert!(s.tracks_changes());
        assert_eq!(s.changed_len(), 1);
        m.track_changes(false);
        m.insert(4, 4);
        assert!(!m.snapshot().tracks_changes());

        // Restored entries are not changes.
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 4), 4);
        m.track_changes(true);
        m.insert_restored(1, 1).unwrap();
        m.insert_restored(2, 2).unwrap();
        m.remove_restored(&2).unwrap();
        m.insert(3, 3);
        let s = m.snapshot();
        assert_eq!(s.range().iter().flat_map(|kg| s.changed_keys(kg).copied()).collect::<Vec<_>>(), [3]);
        assert_eq!(contents(&s), HashMap::from([(1, 1), (3, 3)]));
    }

    #[test]
    fn restored_entries_are_checked_against_the_range() {
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 2), 4);
        let outside = (0..).find(|k| crate::keygroup::key_group(k, 4) >= 2).unwrap();
        let kg = crate::keygroup::key_group(&outside, 4);
        assert_eq!(m.insert_restored(outside, 1), Err(kg));
        assert_eq!(m.remove_restored(&outside), Err(kg));
        assert!(m.is_empty());
    }

    #[test]
    fn released_key_groups_stop_copying() {
        let mut m: CowMap<u64, u64> = CowMap::new(KeyGroupRange::new(0, 2), 2);
        m.set_copy_shard_at(0);
        for k in 0..1_000 {
            m.insert(k, k);
        }
        let mut snap = m.snapshot();
        snap.release_key_group(0);
        let in_kg1 = (0..1_000).filter(|k| crate::keygroup::key_group(k, 2) == 1).count() as u64;
        for k in 0..1_000 {
            *m.get_mut(&k).unwrap() += 1;
        }
        assert_eq!(m.copied_entries(), in_kg1);
        assert_eq!(snap.key_group(0).count(), 0);
        assert_eq!(snap.key_group(1).count() as u64, in_kg1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, i32),
        Remove(u64),
        Update(u64),
        GetOrInsert(u64, i32),
        Snapshot,
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..200, any::<i32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0u64..200).prop_map(Op::Remove),
            3 => (0u64..200).prop_map(Op::Update),
            2 => (0u64..200, any::<i32>()).prop_map(|(k, v)| Op::GetOrInsert(k, v)),
            1 => Just(Op::Snapshot),
            1 => any::<usize>().prop_map(Op::Release),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_hashmap(ops in proptest::collection::vec(op(), 0..400), copy_at in prop_oneof![Just(0usize), Just(1), Just(4)]) {
            // 4 key groups: 32 shards of a few keys each.
            let mut m: CowMap<u64, i32> = CowMap::new(KeyGroupRange::new(0, 4), 4);
            m.set_copy_shard_at(copy_at);
            let mut model = HashMap::new();
            let mut alive = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(m.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(m.remove(&k), model.remove(&k)),
                    Op::Update(k) => {
                        let got = m.get_mut(&k).map(|v| { *v = v.wrapping_add(1); *v });
                        let want = model.get_mut(&k).map(|v: &mut i32| { *v = v.wrapping_add(1); *v });
                        prop_assert_eq!(got, want);
                    }
                    Op::GetOrInsert(k, v) => prop_assert_eq!(*m.get_or_insert_with(&k, || v), *model.entry(k).or_insert(v)),
                    Op::Snapshot => alive.push((m.snapshot(), model.clone())),
                    Op::Release(i) => {
                        if !alive.is_empty() {
                            let (snap, want) = alive.remove(i % alive.len());
                            prop_assert_eq!(contents(&snap), want);
                        }
                    }
                }
                prop_assert_eq!(m.len(), model.len());
            }
            let all: HashMap<u64, i32> = m.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(&all, &model);
            for k in 0..200 {
                prop_assert_eq!(m.get(&k), model.get(&k));
            }
            for (snap, want) in alive {
                prop_assert_eq!(snap.len(), want.len());
                for k in 0..200 {
                    prop_assert_eq!(snap.get(&k), want.get(&k));
                }
                prop_assert_eq!(contents(&snap), want);
            }
        }
    }
}

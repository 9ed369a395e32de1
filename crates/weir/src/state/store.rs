//! One state's entries on the backend the job chose (`state.backend.type`): the heap's
//! copy-on-write map or a RocksDB column family behind a write-back cache. One `match` per
//! access, so the heap path stays a direct hash-table lookup.

use weir_state::cow::CowMap;
use weir_state::format::{corrupt_error, decode_checked, read_block, read_delta_block};
use weir_state::rocks::RocksMap;
use weir_state::StateError;
use weir_checkpoint::KeyGroupBlock;

use crate::{Data, Key};

/// The entries of one state.
pub(crate) enum Store<K, V> {
    Heap(CowMap<K, V>),
    Rocks(RocksMap<K, V>),
}

impl<K: Key, V: Data + Sync> Store<K, V> {
    #[inline]
    pub fn get(&mut self, key: &K) -> Option<&V> {
        match self {
            Store::Heap(m) => m.get(key),
            Store::Rocks(m) => m.get(key),
        }
    }

    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self {
            Store::Heap(m) => m.get_mut(key),
            Store::Rocks(m) => m.get_mut(key),
        }
    }

    #[inline]
    pub fn get_or_insert_with(&mut self, key: &K, init: impl FnOnce() -> V) -> &mut V {
        match self {
            Store::Heap(m) => m.get_or_insert_with(key, init),
            Store::Rocks(m) => m.get_or_insert_with(key, init),
        }
    }

    #[inline]
    pub fn insert(&mut self, key: K, value: V) {
        match self {
            Store::Heap(m) => {
                m.insert(key, value);
            }
            Store::Rocks(m) => m.insert(key, value),
        }
    }

    #[inline]
    pub fn remove(&mut self, key: &K) {
        match self {
            Store::Heap(m) => {
                m.remove(key);
            }
            Store::Rocks(m) => m.remove(key),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Store::Heap(m) => m.len(),
            Store::Rocks(m) => m.approximate_len(),
        }
    }

    /// Write what is cached back to the backend (RocksDB's write-back cache; nothing on the
    /// heap). Also reports the first error a read met since the last flush.
    pub fn flush(&mut self) -> Result<(), StateError> {
        match self {
            Store::Heap(_) => Ok(()),
            Store::Rocks(m) => m.flush(),
        }
    }

    fn insert_restored(&mut self, key: K, value: V) -> Result<(), u32> {
        match self {
            Store::Heap(m) => m.insert_restored(key, value),
            Store::Rocks(m) => m.insert_restored(key, value),
        }
    }

    /// Load one key-group block of a full file (`delta: false`) or apply one of a delta file
    /// (puts and tombstones), checking that every key belongs to the block's key group.
    pub fn restore_block(&mut self, bytes: &[u8], block: &KeyGroupBlock, file: &str, delta: bool, max_parallelism: u32) -> Result<(), StateError> {
        match self {
            Store::Heap(m) if delta => read_delta_block(m, bytes, block, file),
            Store::Heap(m) => read_block(m, bytes, block, file),
            Store::Rocks(m) => decode_checked(bytes, block, file, max_parallelism, delta, |k: K, v: Option<V>| match v {
                Some(v) => m.insert_restored(k, v).map_err(|kg| {
                    corrupt_error(file, format!("block of key group {} holds a key of key group {kg}, outside this instance", block.key_group))
                }),
                None => {
                    m.remove(&k);
                    Ok(())
                }
            }),
        }
    }

    /// Load one entry of a RocksDB snapshot, still encoded (`postcard(K)`, `postcard(V)`).
    pub fn restore_raw(&mut self, kg: u32, key: &[u8], value: &[u8], file: &str) -> Result<(), StateError> {
        let corrupt = |what: String| corrupt_error(file, format!("key group {kg}: {what}"));
        if let Store::Rocks(m) = self {
            return m.insert_raw(kg, key, value);
        }
        let k: K = postcard::from_bytes(key).map_err(|e| corrupt(format!("key: {e}")))?;
        let v: V = postcard::from_bytes(value).map_err(|e| corrupt(format!("value: {e}")))?;
        self.insert_restored(k, v).map_err(|actual| corrupt(format!("holds a key of key group {actual}")))
    }
}

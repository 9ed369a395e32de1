//! Keyed state for process functions: [`ValueState`], [`MapState`], [`ListState`].
//!
//! A keyed operator owns a [`StateTables`] holding one copy-on-write map per registered state.
//! A function registers its states in [`KeyedProcessFunction::open`] and reads or writes them for
//! the current key through a [`KeyedContext`].

use std::any::Any;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use weir_state::cow::{CowMap, CowSnapshot};
use weir_state::keygroup::KeyGroupRange;
use weir_state::StateError;
use weir_checkpoint::KeyGroupBlock;

use crate::{Data, Key};

pub(crate) mod chain;
pub(crate) mod local;
pub(crate) mod rocks;
pub(crate) mod snapshot;
mod store;

use store::Store;

/// Where local recovery keeps its copy of the file `rel` (a path as checkpoint metadata lists it)
/// of subtask `subtask` of the operator with uid `uid` of job `job`, under `weir.state.local.dir`
/// `dir`.
pub fn local_copy_path(dir: &std::path::Path, job: &str, uid: &str, subtask: u32, rel: &str) -> std::path::PathBuf {
    dir.join(crate::stream::sanitize(job)).join(local::task_dir(uid, subtask)).join(rel)
}

/// One registered state, type-erased.
pub(crate) trait StateTable<K>: Any {
    fn name(&self) -> &str;
    /// The heap backend's frozen view of the state for a snapshot (`None` on RocksDB, whose
    /// snapshot is the database's own checkpoint).
    fn heap_snapshot(&mut self) -> Option<Box<dyn HeapSnapshot>>;
    /// Write cached entries back (RocksDB); the first read error since the last flush.
    fn flush(&mut self) -> Result<(), StateError>;
    fn restore_block(&mut self, bytes: &[u8], block: &KeyGroupBlock, file: &str, delta: bool, max_parallelism: u32) -> Result<(), StateError>;
    fn restore_raw(&mut self, kg: u32, key: &[u8], value: &[u8], file: &str) -> Result<(), StateError>;
    fn len(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A heap state frozen at a barrier, serialised later on the snapshot writer. Writing lets go
/// of each key group as soon as it is written, so the processing thread's writes stop copying
/// entries of that key group.
pub(crate) trait HeapSnapshot: Send {
    /// Every entry, in the canonical format.
    fn write_full(self: Box<Self>) -> Result<weir_state::format::WrittenSnapshot, StateError>;
    /// The keys changed or removed since the previous snapshot (puts and tombstones).
    fn write_delta(self: Box<Self>) -> Result<weir_state::format::WrittenSnapshot, StateError>;
    /// How many keys changed since the previous snapshot (0: a delta would be empty).
    fn changed(&self) -> usize;
}

impl<K: Key, V: Data + Sync> HeapSnapshot for CowSnapshot<K, V> {
    fn write_full(self: Box<Self>) -> Result<weir_state::format::WrittenSnapshot, StateError> {
        weir_state::format::write_snapshot_releasing(*self)
    }
    fn write_delta(self: Box<Self>) -> Result<weir_state::format::WrittenSnapshot, StateError> {
        weir_state::format::write_delta_releasing(*self)
    }
    fn changed(&self) -> usize {
        self.changed_len()
    }
}

struct Table<K, V> {
    name: String,
    store: Store<K, V>,
}

impl<K: Key, V: Data + Sync> StateTable<K> for Table<K, V> {
    fn name(&self) -> &str {
        &self.name
    }
    fn heap_snapshot(&mut self) -> Option<Box<dyn HeapSnapshot>> {
        match &mut self.store {
            Store::Heap(m) => Some(Box::new(m.snapshot())),
            Store::Rocks(_) => None,
        }
    }
    fn flush(&mut self) -> Result<(), StateError> {
        self.store.flush()
    }
    fn restore_block(&mut self, bytes: &[u8], block: &KeyGroupBlock, file: &str, delta: bool, max_parallelism: u32) -> Result<(), StateError> {
        self.store.restore_block(bytes, block, file, delta, max_parallelism)
    }
    fn restore_raw(&mut self, kg: u32, key: &[u8], value: &[u8], file: &str) -> Result<(), StateError> {
        self.store.restore_raw(kg, key, value, file)
    }
    fn len(&self) -> usize {
        self.store.len()
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Where an operator instance's states live.
pub(crate) enum Backend {
    /// Heap maps; `track_changes`: incremental checkpoints are on (deltas need the changed keys).
    Heap { track_changes: bool },
    /// The instance's RocksDB.
    Rocks(Arc<rocks::RocksInstance>),
}

/// All states of one keyed operator instance.
pub struct StateTables<K> {
    range: KeyGroupRange,
    max_parallelism: u32,
    pub(crate) tables: Vec<Box<dyn StateTable<K>>>,
    /// Each heap state's chain of incremental snapshot files (parallel to `tables`).
    chains: Vec<Arc<chain::Chain>>,
    /// States of the operator that live elsewhere (device-resident state): a restore of the host
    /// tables leaves their files alone.
    pub(crate) resident: Vec<String>,
    pub(crate) backend: Backend,
    /// Local recovery: where this instance keeps copies of its snapshots.
    pub(crate) local: Option<Arc<local::LocalBackup>>,
    /// The first error registering a state (RocksDB could not create its column family): the
    /// operator fails to start with it.
    pub(crate) open_error: Option<String>,
}

impl<K: Key> StateTables<K> {
    /// Heap states over `range` (tests of operators outside a job).
    #[cfg(test)]
    pub(crate) fn new(range: KeyGroupRange, max_parallelism: u32) -> Self {
        Self::with_backend(range, max_parallelism, Backend::Heap { track_changes: false })
    }

    pub(crate) fn with_backend(range: KeyGroupRange, max_parallelism: u32, backend: Backend) -> Self {
        Self { range, max_parallelism, tables: Vec::new(), chains: Vec::new(), resident: Vec::new(), backend, local: None, open_error: None }
    }

    fn register<V: Data + Sync>(&mut self, name: &str) -> usize {
        assert!(
            self.tables.iter().all(|t| t.name() != name),
            "state '{name}' is registered twice in one operator"
        );
        let store = match &self.backend {
            Backend::Heap { track_changes } => {
                let mut m = CowMap::new(self.range, self.max_parallelism);
                m.track_changes(*track_changes);
                Store::Heap(m)
            }
            Backend::Rocks(db) => match db.map::<K, V>(name, self.range, self.max_parallelism) {
                Ok(m) => Store::Rocks(m),
                Err(e) => {
                    self.open_error.get_or_insert(format!("state '{name}': {e}"));
                    Store::Heap(CowMap::new(self.range, self.max_parallelism))
                }
            },
        };
        self.tables.push(Box::new(Table::<K, V> { name: name.to_string(), store }));
        self.chains.push(Arc::default());
        self.tables.len() - 1
    }

    /// Register a value per key.
    pub fn value_state<V: Data + Sync>(&mut self, name: &str) -> ValueState<V> {
        ValueState { idx: self.register::<V>(name), _v: PhantomData }
    }

    /// Register a map per key.
    pub fn map_state<UK: Key, UV: Data + Sync>(&mut self, name: &str) -> MapState<UK, UV> {
        MapState { idx: self.register::<HashMap<UK, UV>>(name), _v: PhantomData }
    }

    /// Register a list per key.
    pub fn list_state<V: Data + Sync>(&mut self, name: &str) -> ListState<V> {
        ListState { idx: self.register::<Vec<V>>(name), _v: PhantomData }
    }

    #[inline]
    fn map<V: 'static>(&mut self, idx: usize) -> &mut Store<K, V> {
        &mut self.tables[idx].as_any_mut().downcast_mut::<Table<K, V>>().expect("state handle of another type").store
    }

    /// Entries across all states (RocksDB: its estimate).
    pub fn entries(&self) -> usize {
        self.tables.iter().map(|t| t.len()).sum()
    }

    /// Write every state's cached entries back to its backend (RocksDB's write-back cache).
    pub(crate) fn flush(&mut self) -> Result<(), String> {
        for t in &mut self.tables {
            t.flush().map_err(|e| format!("state '{}': {e}", t.name()))?;
        }
        Ok(())
    }
}

/// The current key and its state, handed to [`KeyedProcessFunction::process`].
pub struct KeyedContext<'a, K> {
    pub(crate) key: &'a K,
    pub(crate) tables: &'a mut StateTables<K>,
    pub(crate) epoch: u64,
}

impl<'a, K: Key> KeyedContext<'a, K> {
    /// The context of `key` over `tables` (for a batch function completing a key's work in
    /// [`KeyedBatchFunction::poll`]).
    pub fn new(key: &'a K, tables: &'a mut StateTables<K>) -> Self {
        Self { key, tables, epoch: 0 }
    }

    /// The epoch of the records being processed (the checkpoint that will hold their effects).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The key of the record being processed.
    pub fn key(&self) -> &K {
        self.key
    }
}

/// A value per key.
pub struct ValueState<V> {
    idx: usize,
    _v: PhantomData<fn() -> V>,
}

impl<V> Clone for ValueState<V> {
    fn clone(&self) -> Self {
        Self { idx: self.idx, _v: PhantomData }
    }
}

impl<V: Data + Sync> ValueState<V> {
    /// The current key's value.
    #[inline]
    pub fn get<'c, K: Key>(&self, ctx: &'c mut KeyedContext<'_, K>) -> Option<&'c V> {
        let key = ctx.key;
        ctx.tables.map::<V>(self.idx).get(key)
    }

    /// The current key's value for update, inserting `init()` if absent.
    #[inline]
    pub fn get_or_insert_with<'c, K: Key>(&self, ctx: &'c mut KeyedContext<'_, K>, init: impl FnOnce() -> V) -> &'c mut V {
        let key = ctx.key;
        ctx.tables.map::<V>(self.idx).get_or_insert_with(key, init)
    }

    /// Set the current key's value.
    #[inline]
    pub fn set<K: Key>(&self, ctx: &mut KeyedContext<'_, K>, value: V) {
        let key = ctx.key.clone();
        ctx.tables.map::<V>(self.idx).insert(key, value);
    }

    /// Remove the current key's value.
    pub fn clear<K: Key>(&self, ctx: &mut KeyedContext<'_, K>) {
        let key = ctx.key;
        ctx.tables.map::<V>(self.idx).remove(key);
    }
}

/// A map per key.
pub struct MapState<UK, UV> {
    idx: usize,
    _v: PhantomData<fn() -> (UK, UV)>,
}

impl<UK: Key, UV: Data + Sync> MapState<UK, UV> {
    /// The current key's entry `uk`.
    pub fn get<'c, K: Key>(&self, ctx: &'c mut KeyedContext<'_, K>, uk: &UK) -> Option<&'c UV> {
        let key = ctx.key;
        ctx.tables.map::<HashMap<UK, UV>>(self.idx).get(key).and_then(|m| m.get(uk))
    }

    /// Put `uk -> uv` for the current key.
    pub fn put<K: Key>(&self, ctx: &mut KeyedContext<'_, K>, uk: UK, uv: UV) {
        let key = ctx.key;
        let map = ctx.tables.map::<HashMap<UK, UV>>(self.idx);
        match map.get_mut(key) {
            Some(m) => {
                m.insert(uk, uv);
            }
            None => {
                map.insert(key.clone(), HashMap::from([(uk, uv)]));
            }
        }
    }

    /// Remove `uk` for the current key.
    pub fn remove<K: Key>(&self, ctx: &mut KeyedContext<'_, K>, uk: &UK) -> Option<UV> {
        let key = ctx.key;
        ctx.tables.map::<HashMap<UK, UV>>(self.idx).get_mut(key).and_then(|m| m.remove(uk))
    }

    /// The current key's entries.
    pub fn entries<'c, K: Key>(&self, ctx: &'c mut KeyedContext<'_, K>) -> impl Iterator<Item = (&'c UK, &'c UV)> {
        let key = ctx.key;
        ctx.tables.map::<HashMap<UK, UV>>(self.idx).get(key).into_iter().flat_map(|m| m.iter())
    }
}

/// A list per key.
pub struct ListState<V> {
    idx: usize,
    _v: PhantomData<fn() -> V>,
}

impl<V: Data + Sync> ListState<V> {
    /// Append to the current key's list.
    pub fn add<K: Key>(&self, ctx: &mut KeyedContext<'_, K>, v: V) {
        let key = ctx.key;
        let map = ctx.tables.map::<Vec<V>>(self.idx);
        match map.get_mut(key) {
            Some(l) => l.push(v),
            None => {
                map.insert(key.clone(), vec![v]);
            }
        }
    }

    /// The current key's list.
    pub fn get<'c, K: Key>(&self, ctx: &'c mut KeyedContext<'_, K>) -> &'c [V] {
        let key = ctx.key;
        ctx.tables.map::<Vec<V>>(self.idx).get(key).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// Clear the current key's list.
    pub fn clear<K: Key>(&self, ctx: &mut KeyedContext<'_, K>) {
        let key = ctx.key;
        ctx.tables.map::<Vec<V>>(self.idx).remove(key);
    }
}

/// A keyed process function (Flink's `KeyedProcessFunction`): one instance per worker.
pub trait KeyedProcessFunction<K, I, O>: 'static {
    /// Register states (called once per instance, before any record).
    fn open(&mut self, states: &mut StateTables<K>);
    /// Process one record of the current key; emit into `out`.
    fn process(&mut self, ctx: &mut KeyedContext<'_, K>, value: I, out: &mut Vec<O>);
}

/// A keyed function over batches of records (for GPU operators): one call per key and batch.
///
/// Work may be submitted to the device and finished later: results are collected by `poll`,
/// which never waits, and emitted under the epoch the work belongs to. An epoch's close does not
/// wait for its work: device-resident state ([`KeyedBatchFunction::resident`]) is snapshotted by
/// a device-side copy ordered after the epoch's kernels.
pub trait KeyedBatchFunction<K: Key, I, O>: 'static {
    /// Register states (once per instance).
    fn open(&mut self, states: &mut StateTables<K>);

    /// Process a batch of the current key's records, of epoch `ctx.epoch()` (drain or leave it;
    /// it is cleared after). Output ready now goes to `out`; work submitted for later is
    /// finished in [`KeyedBatchFunction::poll`].
    fn process_batch(&mut self, ctx: &mut KeyedContext<'_, K>, batch: &mut Vec<I>, out: &mut Vec<O>);

    /// Called after every key of a handed-over batch went through `process_batch`: submit
    /// what was gathered (one launch for many keys).
    fn flush(&mut self, _tables: &mut StateTables<K>, _epoch: u64) {}

    /// Collect finished work without waiting: emit its output into `out`, tagged with its
    /// epoch. Returns the oldest epoch with work still in flight (`None`: idle).
    fn poll(&mut self, _tables: &mut StateTables<K>, _out: &mut Vec<(u64, O)>) -> Option<u64> {
        None
    }

    /// Device-resident state of this function, snapshotted at every barrier and restored at
    /// start by the operator.
    fn resident(&mut self) -> Option<&mut crate::ops::resident::KeyedArena<K>> {
        None
    }
}

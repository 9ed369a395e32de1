//! The RocksDB state backend: keyed state on local disk, for state larger than memory.
//!
//! Layout, as Flink's: one DB per operator instance, one column family per registered state. A
//! key is `key group (u16, big-endian) ++ postcard(K)` and a value `postcard(V)`, so the keys of
//! a key-group range are one contiguous scan. The WAL is off and values are lz4-compressed: a
//! checkpoint flushes the memtables, and recovery is from checkpoints only, never from the live
//! DB's own files.
//!
//! - [`RocksBackend`]: the DB of one operator instance ([`RocksBackend::open`],
//!   [`RocksBackend::open_restored`]) and its native checkpoints ([`RocksBackend::checkpoint`]:
//!   hard-linked SSTs, which successive checkpoints share, for incremental uploads).
//! - [`RocksMap`]: one state, with the heap map's access pattern through a bounded write-back
//!   cache; the runtime calls [`RocksMap::flush`] at every barrier.
//! - [`scan_native`], [`native_states`], [`write_canonical`]: read a native checkpoint elsewhere
//!   (rescaling, restoring into the heap backend, savepoints).
//!
//! ```
//! use weir_state::{keygroup::KeyGroupRange, rocks::RocksBackend};
//!
//! let dir = std::env::temp_dir().join(format!("weir-rocks-doc-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(dir.with_extension("chk-1"));
//! let backend = RocksBackend::open(&dir, true).unwrap();
//! let mut counts = backend.map::<u64, i64>("counts", KeyGroupRange::new(0, 128), 128).unwrap();
//! *counts.get_or_insert_with(&7, || 0) += 5;
//! counts.flush().unwrap();              // at the barrier: one WriteBatch
//! let snap = backend.checkpoint(&dir.with_extension("chk-1")).unwrap();
//! assert!(snap.files.iter().any(|f| f.sst));
//! let mut seen = Vec::new();
//! weir_state::rocks::scan_native(&snap.dir, "counts", KeyGroupRange::new(0, 128), |kg, k, v| {
//!     seen.push((kg, postcard::from_bytes::<u64>(k).unwrap(), postcard::from_bytes::<i64>(v).unwrap()));
//!     Ok(())
//! })
//! .unwrap();
//! assert_eq!(seen, [(weir_state::keygroup::key_group(&7u64, 128), 7, 5)]);
//! # std::fs::remove_dir_all(&snap.dir).unwrap();
//! ```

use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{
    properties, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, DBWithThreadMode, MultiThreaded, Options, ReadOptions,
    SingleThreaded, WriteBatch, WriteOptions, DEFAULT_COLUMN_FAMILY_NAME,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::format::{RawWriter, WrittenSnapshot};
use crate::keygroup::{key_group_of_hash, KeyGroupRange, StableHasher};
use crate::StateError;

/// Entries a [`RocksMap`]'s cache holds before it is written back (at the start of the next
/// access).
pub const DEFAULT_CACHE_LIMIT: usize = 16 * 1024;

/// Bytes of [`RocksMap::insert_raw`] entries gathered into one WriteBatch.
const RAW_BATCH_BYTES: usize = 4 << 20;

/// Key groups are stored as two bytes.
const MAX_KEY_GROUPS: u32 = 1 << 16;

/// The column families can be created through `&self` (no lock around the DB).
type Db = DBWithThreadMode<MultiThreaded>;

fn rocks_err(dir: &Path, what: impl fmt::Display) -> StateError {
    StateError::Rocks { dir: dir.display().to_string(), what: what.to_string() }
}

fn corrupt(dir: &Path, state: &str, what: impl Into<String>) -> StateError {
    StateError::Corrupt { file: format!("{} (RocksDB state '{state}')", dir.display()), what: what.into() }
}

/// Bytes of the block cache that the column families of one DB share.
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// Options of the DB and of every column family, over one shared block cache.
fn db_options(cache: &Cache) -> Options {
    // Rust's binding has no setter for this one. With the WAL off, RocksDB would otherwise
    // flush every memtable when the DB closes: wasted work, as the live DB is never reopened.
    let mut o = Options::default()
        .get_options_from_string("avoid_flush_during_shutdown=true")
        .expect("a valid RocksDB option string");
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // With the WAL off, a flush of all column families at once keeps a checkpoint consistent
    // across states.
    o.set_atomic_flush(true);
    o.set_compression_type(DBCompressionType::Lz4);
    o.set_keep_log_file_num(2);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // A cache miss on a new key (the first record of every key) then seldom reads an SST.
    table.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&table);
    o
}

/// The key-group prefix of a key (the caller checks `kg < 2^16`).
#[inline]
fn kg_prefix(kg: u32) -> [u8; 2] {
    (kg as u16).to_be_bytes()
}

/// `[lower, upper)` of a key-group range's keys; no upper bound when the range ends at 2^16.
fn range_bounds(range: KeyGroupRange) -> (Vec<u8>, Option<Vec<u8>>) {
    let upper = (range.end < MAX_KEY_GROUPS).then(|| kg_prefix(range.end).to_vec());
    (kg_prefix(range.start).to_vec(), upper)
}

/// Removes the DB's directory after the DB closed (it is declared after the DB in [`Shared`]).
struct DirGuard {
    path: PathBuf,
    remove: bool,
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.remove {
            // Nothing to report to: a leftover temp dir is harmless.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The DB, shared by the backend and its maps.
struct Shared {
    db: Db,
    /// The block cache of the DB's column families (new ones too).
    cache: Cache,
    /// States with a live [`RocksMap`]: two maps over one column family would each cache.
    open_states: Mutex<HashSet<String>>,
    dir: DirGuard,
}

/// The RocksDB state backend of one operator instance: one DB, a column family per state.
///
/// The DB stays open (and its directory, if `remove_on_drop`) until the backend and every
/// [`RocksMap`] it handed out are dropped.
pub struct RocksBackend {
    shared: Arc<Shared>,
}

impl fmt::Debug for RocksBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksBackend").field("dir", &self.shared.dir.path).finish()
    }
}

impl RocksBackend {
    /// A fresh DB in `dir`, which must be empty or absent: old files are never silently reused.
    /// `remove_on_drop` deletes `dir` when the backend and its maps are dropped.
    pub fn open(dir: &Path, remove_on_drop: bool) -> Result<RocksBackend, StateError> {
        match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(rocks_err(dir, "the directory is not empty; a fresh state backend needs an empty one"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| rocks_err(dir, format!("cannot create the directory: {e}")))?;
            }
            Err(e) => return Err(rocks_err(dir, format!("cannot read the directory: {e}"))),
        }
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let db = Db::open(&db_options(&cache), dir).map_err(|e| rocks_err(dir, format!("cannot open a new DB: {e}")))?;
        Ok(Self::wrap(db, cache, dir, remove_on_drop))
    }

    /// The DB whose files (a native checkpoint's, downloaded by the caller) are already in
    /// `dir`, with the column families it has. Later writes go to `dir`.
    pub fn open_restored(dir: &Path, remove_on_drop: bool) -> Result<RocksBackend, StateError> {
        if !dir.join("CURRENT").is_file() {
            return Err(rocks_err(dir, "not a RocksDB checkpoint (no CURRENT file)"));
        }
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let mut opts = db_options(&cache);
        opts.create_if_missing(false);
        let cfs = Db::list_cf(&opts, dir).map_err(|e| rocks_err(dir, format!("cannot list the states: {e}")))?;
        let descriptors = cfs.iter().map(|name| ColumnFamilyDescriptor::new(name, db_options(&cache)));
        let db = Db::open_cf_descriptors(&opts, dir, descriptors)
            .map_err(|e| rocks_err(dir, format!("cannot open the restored DB: {e}")))?;
        Ok(Self::wrap(db, cache, dir, remove_on_drop))
    }

    fn wrap(db: Db, cache: Cache, dir: &Path, remove: bool) -> RocksBackend {
        let dir = DirGuard { path: dir.to_path_buf(), remove };
        RocksBackend { shared: Arc::new(Shared { db, cache, open_states: Mutex::default(), dir }) }
    }

    /// The DB's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir.path
    }

    /// The states (column families) the DB has, created or restored.
    pub fn states(&self) -> Result<Vec<String>, StateError> {
        let dir = self.dir();
        let cfs = Db::list_cf(&Options::default(), dir).map_err(|e| rocks_err(dir, format!("cannot list the states: {e}")))?;
        Ok(cfs.into_iter().filter(|c| c != DEFAULT_COLUMN_FAMILY_NAME).collect())
    }

    /// The map of state `state` over the key groups `range` of `max_parallelism`: its column
    /// family is created, or opened if the DB has it (restored). One live map per state.
    pub fn map<K, V>(&self, state: &str, range: KeyGroupRange, max_parallelism: u32) -> Result<RocksMap<K, V>, StateError>
    where
        K: Hash + Eq + Clone + Serialize + DeserializeOwned,
        V: Clone + Serialize + DeserializeOwned,
    {
        let dir = self.dir();
        if max_parallelism == 0 || max_parallelism > MAX_KEY_GROUPS || range.end > max_parallelism {
            return Err(rocks_err(
                dir,
                format!("state '{state}': key groups {range:?} of max parallelism {max_parallelism} (at most {MAX_KEY_GROUPS})"),
            ));
        }
        if state == DEFAULT_COLUMN_FAMILY_NAME {
            return Err(rocks_err(dir, "'default' is RocksDB's own column family, not a state name"));
        }
        let mut open = self.shared.open_states.lock().expect("open_states poisoned");
        if open.contains(state) {
            return Err(rocks_err(dir, format!("state '{state}' already has a live map")));
        }
        let db = &self.shared.db;
        if db.cf_handle(state).is_none() {
            db.create_cf(state, &db_options(&self.shared.cache))
                .map_err(|e| rocks_err(dir, format!("cannot create the column family of state '{state}': {e}")))?;
        }
        open.insert(state.to_string());
        drop(open);
        let mut write = WriteOptions::default();
        write.disable_wal(true);
        Ok(RocksMap {
            cache: HashTable::new(),
            limit: DEFAULT_CACHE_LIMIT,
            io: MapIo {
                shared: self.shared.clone(),
                state: state.to_string(),
                range,
                max_parallelism,
                key_buf: Vec::with_capacity(64),
                arena: Vec::new(),
                spans: Vec::new(),
                read: ReadOptions::default(),
                write,
                raw: WriteBatch::default(),
                raw_bytes: 0,
                error: None,
            },
        })
    }

    /// A native checkpoint into `into` (absent; on the DB's filesystem, so that SSTs are
    /// hard-linked, not copied): flushes the memtables, then lists every file. The synchronous
    /// part of a snapshot: flush every [`RocksMap`] first, or their cached writes are missed.
    pub fn checkpoint(&self, into: &Path) -> Result<NativeSnapshot, StateError> {
        if into.exists() {
            return Err(rocks_err(into, "a checkpoint directory must not exist yet"));
        }
        if let Some(parent) = into.parent() {
            std::fs::create_dir_all(parent).map_err(|e| rocks_err(parent, format!("cannot create the directory: {e}")))?;
        }
        let cp = Checkpoint::new(&self.shared.db).map_err(|e| rocks_err(self.dir(), format!("checkpoint: {e}")))?;
        cp.create_checkpoint(into)
            .map_err(|e| rocks_err(into, format!("checkpoint of {}: {e}", self.dir().display())))?;
        let mut files = Vec::new();
        let entries = std::fs::read_dir(into).map_err(|e| rocks_err(into, format!("cannot list the checkpoint: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| rocks_err(into, format!("cannot list the checkpoint: {e}")))?;
            let meta = entry.metadata().map_err(|e| rocks_err(into, format!("{:?}: {e}", entry.file_name())))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|n| rocks_err(into, format!("file name {n:?} is not UTF-8")))?;
            files.push(NativeFile { sst: name.ends_with(".sst"), name, size: meta.len() });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(NativeSnapshot { dir: into.to_path_buf(), files })
    }
}

/// A native checkpoint: a directory RocksDB can open ([`RocksBackend::open_restored`],
/// [`scan_native`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeSnapshot {
    /// Where it is.
    pub dir: PathBuf,
    /// Every file in it, by name.
    pub files: Vec<NativeFile>,
}

/// One file of a [`NativeSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeFile {
    /// The file name (no directory).
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// An SST: immutable, and its name is not reused within one backend's life (file numbers
    /// only grow, and a restored backend numbers its new files after the restored ones), so an
    /// SST uploaded for an earlier checkpoint of this backend, or restored into it, need not be
    /// uploaded again. Two backends restored from one checkpoint (two restarts) may each make
    /// a different file of one name: storage names of new SSTs must be unique per backend
    /// (per attempt, or per checkpoint), not the bare file name. Other files (MANIFEST,
    /// CURRENT, OPTIONS, an empty WAL) belong to this checkpoint alone.
    pub sst: bool,
}

impl NativeSnapshot {
    /// Total bytes of its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A cached entry: `None` is a known absence (or a removal, when dirty).
struct Slot<V> {
    value: Option<V>,
    kg: u32,
    dirty: bool,
}

/// An encoded entry in [`MapIo::arena`]: key `start..key_end`, value `key_end..end`, or a
/// removal.
struct Span {
    start: usize,
    key_end: usize,
    end: usize,
    put: bool,
}

/// Everything of a [`RocksMap`] but its cache (borrowed apart from it).
struct MapIo {
    shared: Arc<Shared>,
    state: String,
    range: KeyGroupRange,
    max_parallelism: u32,
    key_buf: Vec<u8>,
    /// The encoded entries of a write-back, and where each is.
    arena: Vec<u8>,
    spans: Vec<Span>,
    read: ReadOptions,
    write: WriteOptions,
    /// [`RocksMap::insert_raw`]'s entries not yet written.
    raw: WriteBatch,
    raw_bytes: usize,
    /// The first failure since the last [`RocksMap::flush`].
    error: Option<StateError>,
}

/// The hash the cache's table uses: the key hash's high bits pick the key group, alike over a
/// small range, so remix them (bucket index: low bits, tag: high bits).
#[inline]
fn table_hash(h: u64) -> u64 {
    (h ^ (h >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(26)
}

#[inline]
fn rehash<K: Hash, V>(e: &(K, Slot<V>)) -> u64 {
    table_hash(StableHasher::hash_one(&e.0))
}

/// `key_buf = kg ++ postcard(key)`, reusing its allocation.
fn encode_key<K: Serialize>(buf: &mut Vec<u8>, kg: u32, key: &K) -> Result<(), StateError> {
    buf.clear();
    buf.extend_from_slice(&kg_prefix(kg));
    *buf = postcard::to_extend(key, std::mem::take(buf)).map_err(|e| StateError::Encode(format!("key of key group {kg}: {e}")))?;
    Ok(())
}

impl MapIo {
    fn dir(&self) -> &Path {
        &self.shared.dir.path
    }

    #[inline]
    fn fail(&mut self, e: StateError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// The value of the key encoded in `key_buf`.
    fn read<V: DeserializeOwned>(&self, kg: u32) -> Result<Option<V>, StateError> {
        let db = &self.shared.db;
        let cf = db.cf_handle(&self.state).ok_or_else(|| rocks_err(self.dir(), format!("column family of state '{}' is gone", self.state)))?;
        let bytes = db
            .get_pinned_cf_opt(&cf, &self.key_buf, &self.read)
            .map_err(|e| rocks_err(self.dir(), format!("state '{}': reading a key of key group {kg}: {e}", self.state)))?;
        match bytes {
            None => Ok(None),
            Some(b) => postcard::from_bytes(&b)
                .map(Some)
                .map_err(|e| corrupt(self.dir(), &self.state, format!("key group {kg}: a value does not decode: {e}"))),
        }
    }

    /// Read `key` from the DB; a failure is recorded and reads as absent.
    fn load<K: Serialize, V: DeserializeOwned>(&mut self, key: &K, kg: u32) -> Option<V> {
        if self.error.is_some() {
            return None;
        }
        let r = encode_key(&mut self.key_buf, kg, key).and_then(|()| self.read(kg));
        r.unwrap_or_else(|e| {
            self.fail(e);
            None
        })
    }

    fn write_raw(&mut self) -> Result<(), StateError> {
        if self.raw_bytes == 0 {
            return Ok(());
        }
        self.raw_bytes = 0;
        let batch = std::mem::take(&mut self.raw);
        self.shared
            .db
            .write_opt(batch, &self.write)
            .map_err(|e| rocks_err(self.dir(), format!("state '{}': writing restored entries: {e}", self.state)))
    }
}

/// One state in RocksDB, with the heap map's access pattern.
///
/// Reads and writes go through a write-back cache (`K → value or absence, dirty`): a key is
/// read from RocksDB once, then served from the cache until it is written back, by
/// [`RocksMap::flush`] (one WriteBatch of the dirty entries; the runtime calls it at every
/// barrier) or when the cache holds more than its limit ([`DEFAULT_CACHE_LIMIT`],
/// [`RocksMap::with_cache_limit`]), at the start of the next access, never while a returned
/// reference is alive. Both empty the cache.
///
/// Errors: the accessors do not return them. A failed read (an I/O error, a value that does not
/// decode) reads as absent and is recorded; once one is recorded nothing more is written, and
/// the next [`RocksMap::flush`] returns it (the runtime then fails the job, which restarts from
/// its last checkpoint). [`RocksMap::error`] shows it earlier.
///
/// Keys must encode canonically: equal keys give equal postcard bytes.
///
/// Dropping the map discards what was not flushed.
pub struct RocksMap<K, V> {
    cache: HashTable<(K, Slot<V>)>,
    limit: usize,
    io: MapIo,
}

impl<K, V> fmt::Debug for RocksMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksMap")
            .field("dir", &self.io.dir())
            .field("state", &self.io.state)
            .field("range", &self.io.range)
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl<K, V> Drop for RocksMap<K, V> {
    fn drop(&mut self) {
        if let Ok(mut open) = self.io.shared.open_states.lock() {
            open.remove(&self.io.state);
        }
    }
}

impl<K, V> RocksMap<K, V>
where
    K: Hash + Eq + Clone + Serialize + DeserializeOwned,
    V: Clone + Serialize + DeserializeOwned,
{
    /// The same map with a cache of at most about `limit` entries.
    pub fn with_cache_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The state's name (its column family).
    pub fn state(&self) -> &str {
        &self.io.state
    }

    /// The key groups this map holds.
    pub fn range(&self) -> KeyGroupRange {
        self.io.range
    }

    /// The first failure since the last flush, if any (also returned by [`RocksMap::flush`]).
    pub fn error(&self) -> Option<&StateError> {
        self.io.error.as_ref()
    }

    /// Write back when the cache is full or restored entries are pending, before an access.
    #[inline]
    fn before_access(&mut self) {
        if self.cache.len() > self.limit || self.io.raw_bytes > 0 {
            self.write_back();
        }
    }

    /// The key group and hash of `key` (no check).
    #[inline]
    fn key_hash(&self, key: &K) -> (u32, u64) {
        let h = StableHasher::hash_one(key);
        (key_group_of_hash(h, self.io.max_parallelism), table_hash(h))
    }

    #[inline]
    fn locate(&self, key: &K) -> (u32, u64) {
        let (kg, h) = self.key_hash(key);
        assert!(self.io.range.contains(kg), "key of key group {kg} routed to the instance that owns {:?}", self.io.range);
        (kg, h)
    }

    /// The cached slot of `key`, read from RocksDB on a miss.
    #[inline]
    fn slot(&mut self, key: &K) -> &mut Slot<V> {
        self.before_access();
        let (kg, h) = self.locate(key);
        let io = &mut self.io;
        match self.cache.entry(h, |e| e.0 == *key, rehash) {
            Entry::Occupied(o) => &mut o.into_mut().1,
            Entry::Vacant(v) => {
                let value = io.load(key, kg);
                &mut v.insert((key.clone(), Slot { value, kg, dirty: false })).into_mut().1
            }
        }
    }

    /// The value of `key` (read into the cache on a miss).
    #[inline]
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.slot(key).value.as_ref()
    }

    /// The value of `key`, for update: it is written back at the next flush.
    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let slot = self.slot(key);
        slot.dirty |= slot.value.is_some();
        slot.value.as_mut()
    }

    /// The value of `key`, inserting `init()` first if absent; written back at the next flush.
    #[inline]
    pub fn get_or_insert_with(&mut self, key: &K, init: impl FnOnce() -> V) -> &mut V {
        let slot = self.slot(key);
        slot.dirty = true;
        slot.value.get_or_insert_with(init)
    }

    /// Set `key` to `value`, without reading the old value.
    #[inline]
    pub fn insert(&mut self, key: K, value: V) {
        self.put(key, Some(value));
    }

    /// Remove `key`, without reading its value.
    #[inline]
    pub fn remove(&mut self, key: &K) {
        self.before_access();
        let (kg, h) = self.locate(key);
        match self.cache.entry(h, |e| e.0 == *key, rehash) {
            Entry::Occupied(o) => {
                let slot = &mut o.into_mut().1;
                // A clean absence is already absent in RocksDB.
                if slot.value.is_some() || slot.dirty {
                    slot.value = None;
                    slot.dirty = true;
                }
            }
            Entry::Vacant(v) => {
                v.insert((key.clone(), Slot { value: None, kg, dirty: true }));
            }
        }
    }

    #[inline]
    fn put(&mut self, key: K, value: Option<V>) {
        self.before_access();
        let (kg, h) = self.locate(&key);
        match self.cache.entry(h, |e| e.0 == key, rehash) {
            Entry::Occupied(o) => {
                let slot = &mut o.into_mut().1;
                slot.value = value;
                slot.dirty = true;
            }
            Entry::Vacant(v) => {
                v.insert((key, Slot { value, kg, dirty: true }));
            }
        }
    }

    /// Write the dirty entries back in one WriteBatch and empty the cache; returns the first
    /// failure since the last flush (then nothing was written since it, and the map should be
    /// dropped: the job restarts from its last checkpoint).
    pub fn flush(&mut self) -> Result<(), StateError> {
        self.write_back();
        match self.io.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// [`RocksMap::flush`], keeping a failure for the next flush to return.
    fn write_back(&mut self) {
        let io = &mut self.io;
        if io.error.is_some() {
            self.cache.clear();
            io.raw = WriteBatch::default();
            io.raw_bytes = 0;
            return;
        }
        if let Err(e) = io.write_raw() {
            io.fail(e);
            self.cache.clear();
            return;
        }
        let shared = io.shared.clone();
        let Some(cf) = shared.db.cf_handle(&io.state) else {
            io.fail(rocks_err(io.dir(), format!("column family of state '{}' is gone", io.state)));
            self.cache.clear();
            return;
        };
        // Encode the dirty entries into one buffer and write them in key order: RocksDB's
        // memtable inserts sorted keys several times faster than random ones.
        io.arena.clear();
        io.spans.clear();
        for (key, slot) in self.cache.drain() {
            if !slot.dirty {
                continue;
            }
            let start = io.arena.len();
            io.arena.extend_from_slice(&kg_prefix(slot.kg));
            let r = postcard::to_extend(&key, std::mem::take(&mut io.arena)).map_err(|e| format!("key of key group {}: {e}", slot.kg));
            let r = r.and_then(|arena| {
                let key_end = arena.len();
                match &slot.value {
                    Some(v) => postcard::to_extend(v, arena).map(|a| (a, key_end, true)).map_err(|e| format!("value of key group {}: {e}", slot.kg)),
                    None => Ok((arena, key_end, false)),
                }
            });
            match r {
                Ok((arena, key_end, put)) => {
                    io.spans.push(Span { start, key_end, end: arena.len(), put });
                    io.arena = arena;
                }
                Err(e) => {
                    io.fail(StateError::Encode(format!("state '{}': {e}", io.state)));
                    break;
                }
            }
        }
        if io.error.is_some() || io.spans.is_empty() {
            return;
        }
        let arena = &io.arena;
        io.spans.sort_unstable_by(|a, b| arena[a.start..a.key_end].cmp(&arena[b.start..b.key_end]));
        let mut batch = WriteBatch::with_capacity_bytes(arena.len() + io.spans.len() * 8 + 64);
        for s in &io.spans {
            let key = &arena[s.start..s.key_end];
            if s.put {
                batch.put_cf(&cf, key, &arena[s.key_end..s.end]);
            } else {
                batch.delete_cf(&cf, key);
            }
        }
        if let Err(e) = shared.db.write_opt(batch, &io.write) {
            io.fail(rocks_err(io.dir(), format!("state '{}': writing back the cache: {e}", io.state)));
        }
    }

    /// About how many keys the map holds: RocksDB's estimate (`rocksdb.estimate-num-keys`,
    /// which counts overwrites and deletions until compaction) plus the cache's dirty values.
    /// For metrics and logs only.
    pub fn approximate_len(&self) -> usize {
        let db = &self.io.shared.db;
        let stored = db
            .cf_handle(&self.io.state)
            .and_then(|cf| db.property_int_value_cf(&cf, properties::ESTIMATE_NUM_KEYS).ok().flatten())
            .unwrap_or(0);
        let cached = self.cache.iter().filter(|(_, s)| s.dirty && s.value.is_some()).count();
        stored as usize + cached
    }

    /// Insert an entry read from a snapshot, checking that it belongs here (`Err`: its key
    /// group).
    pub fn insert_restored(&mut self, key: K, value: V) -> Result<(), u32> {
        let (kg, _) = self.key_hash(&key);
        if !self.io.range.contains(kg) {
            return Err(kg);
        }
        self.insert(key, value);
        Ok(())
    }

    /// Insert an encoded entry (`postcard(K)`, `postcard(V)`) of key group `kg` (bulk restore
    /// from [`scan_native`] or a canonical file): gathered into WriteBatches of a few MB, the
    /// last one written at the next access or flush. The key's bytes are trusted to be of `kg`.
    pub fn insert_raw(&mut self, kg: u32, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        let io = &mut self.io;
        if !io.range.contains(kg) {
            return Err(corrupt(
                io.dir(),
                &io.state,
                format!("an entry of key group {kg} restored into the instance that owns {:?}", io.range),
            ));
        }
        if !self.cache.is_empty() {
            // Keep the order of writes: the cache's before these.
            self.write_back();
            if let Some(e) = self.io.error.take() {
                return Err(e);
            }
        }
        let io = &mut self.io;
        io.key_buf.clear();
        io.key_buf.extend_from_slice(&kg_prefix(kg));
        io.key_buf.extend_from_slice(key);
        let shared = io.shared.clone();
        let cf = shared
            .db
            .cf_handle(&io.state)
            .ok_or_else(|| rocks_err(io.dir(), format!("column family of state '{}' is gone", io.state)))?;
        io.raw.put_cf(&cf, &io.key_buf, value);
        io.raw_bytes += io.key_buf.len() + value.len();
        if io.raw_bytes >= RAW_BATCH_BYTES {
            io.write_raw()?;
        }
        Ok(())
    }
}

/// Open a native checkpoint read-only, with column family `state`.
fn open_read_only(dir: &Path, state: Option<&str>) -> Result<DBWithThreadMode<SingleThreaded>, StateError> {
    // RocksDB would create a missing directory.
    if !dir.join("CURRENT").is_file() {
        return Err(rocks_err(dir, "not a RocksDB checkpoint (no CURRENT file)"));
    }
    let opts = Options::default();
    let r = match state {
        Some(s) => DBWithThreadMode::<SingleThreaded>::open_cf_for_read_only(&opts, dir, [s], false),
        None => DBWithThreadMode::<SingleThreaded>::open_for_read_only(&opts, dir, false),
    };
    r.map_err(|e| rocks_err(dir, format!("cannot open read-only: {e}")))
}

/// The states of a native checkpoint (its column families but RocksDB's "default").
pub fn native_states(dir: &Path) -> Result<Vec<String>, StateError> {
    if !dir.join("CURRENT").is_file() {
        return Err(rocks_err(dir, "not a RocksDB checkpoint (no CURRENT file)"));
    }
    let cfs = Db::list_cf(&Options::default(), dir).map_err(|e| rocks_err(dir, format!("cannot list the states: {e}")))?;
    Ok(cfs.into_iter().filter(|c| c != DEFAULT_COLUMN_FAMILY_NAME).collect())
}

/// Call `f(key group, postcard(K), postcard(V))` for every entry of state `state` in the key
/// groups `range` of the native checkpoint in `dir`, in key-group order; reads only that range.
/// A state the checkpoint does not have is an error (see [`native_states`]).
pub fn scan_native(
    dir: &Path,
    state: &str,
    range: KeyGroupRange,
    mut f: impl FnMut(u32, &[u8], &[u8]) -> Result<(), StateError>,
) -> Result<(), StateError> {
    if range.end > MAX_KEY_GROUPS {
        return Err(rocks_err(dir, format!("state '{state}': key groups {range:?} beyond {MAX_KEY_GROUPS}")));
    }
    let states = native_states(dir)?;
    if !states.iter().any(|s| s == state) {
        return Err(rocks_err(dir, format!("the checkpoint has no state '{state}' (it has {states:?})")));
    }
    if range.is_empty() {
        return Ok(());
    }
    let db = open_read_only(dir, Some(state))?;
    let cf = db.cf_handle(state).ok_or_else(|| rocks_err(dir, format!("column family of state '{state}' did not open")))?;
    let (lower, upper) = range_bounds(range);
    let mut read = ReadOptions::default();
    // A one-pass scan: keep the block cache for others, read ahead.
    read.fill_cache(false);
    read.set_readahead_size(2 << 20);
    read.set_iterate_lower_bound(lower.clone());
    if let Some(u) = upper {
        read.set_iterate_upper_bound(u);
    }
    let mut it = db.raw_iterator_cf_opt(cf, read);
    it.seek(&lower);
    while let Some((k, v)) = it.item() {
        let Some((prefix, key)) = k.split_first_chunk::<2>() else {
            return Err(corrupt(dir, state, format!("a key of {} bytes has no key group", k.len())));
        };
        let kg = u16::from_be_bytes(*prefix) as u32;
        if !range.contains(kg) {
            return Err(corrupt(dir, state, format!("key group {kg} read in a scan of {range:?}")));
        }
        f(kg, key, v)?;
        it.next();
    }
    it.status().map_err(|e| rocks_err(dir, format!("state '{state}': reading key groups {range:?}: {e}")))
}

/// The canonical (backend-independent) snapshot file of state `state`, key groups `range`, of
/// the native checkpoint in `dir`: for savepoints, full checkpoints, and restores into the heap
/// backend ([`crate::format::restore`]).
pub fn write_canonical(dir: &Path, state: &str, range: KeyGroupRange) -> Result<WrittenSnapshot, StateError> {
    // Capacity hint: the file is about as large as the (lz4-compressed) SSTs of every state.
    let sst_bytes: u64 = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".sst"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let mut w = RawWriter::full((sst_bytes / 16) as usize);
    scan_native(dir, state, range, |kg, k, v| w.put(kg, k, v))?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygroup::key_group;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A unique directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
            let n = N.fetch_add(1, Ordering::Relaxed);
            TempDir(std::env::temp_dir().join(format!("weir-rocks-{tag}-{}-{n}-{nanos}", std::process::id())))
        }

        fn join(&self, p: &str) -> PathBuf {
            self.0.join(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const ALL: KeyGroupRange = KeyGroupRange { start: 0, end: 128 };

    fn ssts(s: &NativeSnapshot) -> HashSet<String> {
        s.files.iter().filter(|f| f.sst).map(|f| f.name.clone()).collect()
    }

    /// Every entry of `state` in the checkpoint, decoded.
    fn scan_all<K: DeserializeOwned + Hash + Eq, V: DeserializeOwned>(dir: &Path, state: &str, range: KeyGroupRange) -> Vec<(u32, K, V)> {
        let mut out = Vec::new();
        scan_native(dir, state, range, |kg, k, v| {
            out.push((kg, postcard::from_bytes(k).unwrap(), postcard::from_bytes(v).unwrap()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn maps_are_send() {
        fn send<T: Send>() {}
        send::<RocksMap<u64, String>>();
        send::<RocksBackend>();
    }

    #[test]
    fn open_refuses_a_non_empty_directory() {
        let t = TempDir::new("nonempty");
        std::fs::create_dir_all(&t.0).unwrap();
        std::fs::write(t.join("old.sst"), b"x").unwrap();
        let err = RocksBackend::open(&t.0, false).unwrap_err();
        assert!(err.to_string().contains(&t.0.display().to_string()), "{err}");
        assert!(err.to_string().contains("not empty"), "{err}");
        // An absent directory is created; remove_on_drop removes it.
        let fresh = t.join("db");
        let b = RocksBackend::open(&fresh, true).unwrap();
        let m = b.map::<u64, u64>("s", ALL, 128).unwrap();
        assert!(fresh.join("CURRENT").is_file());
        drop(b);
        assert!(fresh.exists(), "a live map keeps the DB");
        drop(m);
        assert!(!fresh.exists());
        let err = RocksBackend::open_restored(&t.join("nothing"), false).unwrap_err();
        assert!(err.to_string().contains("nothing"), "{err}");
    }

    #[test]
    fn one_live_map_per_state() {
        let t = TempDir::new("twice");
        let b = RocksBackend::open(&t.0, false).unwrap();
        let m = b.map::<u64, u64>("s", ALL, 128).unwrap();
        let err = b.map::<u64, u64>("s", ALL, 128).unwrap_err();
        assert!(err.to_string().contains("'s'"), "{err}");
        drop(m);
        b.map::<u64, u64>("s", ALL, 128).unwrap();
        assert!(b.map::<u64, u64>("default", ALL, 128).is_err());
        assert!(b.map::<u64, u64>("big", KeyGroupRange::new(0, 1 << 17), 1 << 17).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Get(u64),
        Insert(u64, i32),
        Remove(u64),
        GetMut(u64),
        GetOrInsert(u64, i32),
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..48).prop_map(Op::Get),
            3 => (0u64..48, any::<i32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0u64..48).prop_map(Op::Remove),
            2 => (0u64..48).prop_map(Op::GetMut),
            2 => (0u64..48, any::<i32>()).prop_map(|(k, v)| Op::GetOrInsert(k, v)),
            1 => Just(Op::Flush),
        ]
    }

    #[test]
    fn behaves_like_a_hashmap() {
        let t = TempDir::new("model");
        let backend = RocksBackend::open(&t.0, false).unwrap();
        let case = AtomicU32::new(0);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() });
        let strategy = (proptest::collection::vec(op(), 0..200), 0usize..6);
        runner
            .run(&strategy, |(ops, limit)| {
                let n = case.fetch_add(1, Ordering::Relaxed);
                let range = KeyGroupRange::new(0, 8);
                let mut m = backend.map::<u64, i32>(&format!("case{n}"), range, 8)?.with_cache_limit(limit);
                let mut model: HashMap<u64, i32> = HashMap::new();
                for op in ops {
                    match op {
                        Op::Get(k) => prop_assert_eq!(m.get(&k), model.get(&k)),
                        Op::Insert(k, v) => {
                            m.insert(k, v);
                            model.insert(k, v);
                        }
                        Op::Remove(k) => {
                            m.remove(&k);
                            model.remove(&k);
                        }
                        Op::GetMut(k) => {
                            let got = m.get_mut(&k).map(|v| {
                                *v = v.wrapping_add(1);
                                *v
                            });
                            let want = model.get_mut(&k).map(|v| {
                                *v = v.wrapping_add(1);
                                *v
                            });
                            prop_assert_eq!(got, want);
                        }
                        Op::GetOrInsert(k, v) => {
                            let got = *m.get_or_insert_with(&k, || v);
                            prop_assert_eq!(got, *model.entry(k).or_insert(v));
                        }
                        Op::Flush => m.flush()?,
                    }
                }
                m.flush()?;
                for k in 0..48 {
                    prop_assert_eq!(m.get(&k), model.get(&k), "key {}", k);
                }
                prop_assert!(m.error().is_none());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn values_survive_a_checkpoint_and_a_restore() {
        let t = TempDir::new("restore");
        let backend = RocksBackend::open(&t.join("db"), true).unwrap();
        let mut a = backend.map::<String, (i64, Vec<u8>)>("a", ALL, 128).unwrap().with_cache_limit(100);
        let mut b = backend.map::<u64, u64>("b", ALL, 128).unwrap();
        for i in 0..5000u64 {
            a.insert(format!("k{i}"), (i as i64, vec![i as u8; (i % 7) as usize]));
            *b.get_or_insert_with(&(i % 10), || 0) += i;
        }
        a.remove(&"k3".to_string());
        a.flush().unwrap();
        b.flush().unwrap();
        let snap = backend.checkpoint(&t.join("chk-1")).unwrap();
        assert!(snap.files.iter().any(|f| f.name == "CURRENT" && !f.sst));
        assert!(snap.files.iter().any(|f| f.sst && f.size > 0));
        assert_eq!(snap.bytes(), snap.files.iter().map(|f| f.size).sum::<u64>());
        assert!(backend.checkpoint(&t.join("chk-1")).is_err(), "an existing checkpoint directory is refused");
        // Writes after the checkpoint are not in it.
        a.insert("late".into(), (0, vec![]));
        a.flush().unwrap();
        drop((a, b, backend));
        assert!(!t.join("db").exists());

        // As a restore does: the files are copied (downloaded) into a fresh directory.
        let restored = t.join("restored");
        std::fs::create_dir_all(&restored).unwrap();
        for f in &snap.files {
            std::fs::copy(snap.dir.join(&f.name), restored.join(&f.name)).unwrap();
        }
        assert_eq!(native_states(&restored).unwrap(), ["a", "b"]);
        let backend = RocksBackend::open_restored(&restored, false).unwrap();
        assert_eq!(backend.states().unwrap(), ["a", "b"]);
        let mut a = backend.map::<String, (i64, Vec<u8>)>("a", ALL, 128).unwrap();
        let mut b = backend.map::<u64, u64>("b", ALL, 128).unwrap();
        assert_eq!(a.get(&"k4999".to_string()), Some(&(4999, vec![4999u64 as u8; 1])));
        assert_eq!(a.get(&"k3".to_string()), None);
        assert_eq!(a.get(&"late".to_string()), None);
        let want: u64 = (0..5000u64).filter(|i| i % 10 == 4).sum();
        assert_eq!(b.get(&4), Some(&want));
        let n = a.approximate_len();
        assert!((4000..=6000).contains(&n), "{n}");
        // The restored DB takes new writes, and its new SSTs do not reuse the restored names.
        for i in 0..100u64 {
            *b.get_mut(&(i % 10)).unwrap() += 1;
        }
        b.flush().unwrap();
        a.flush().unwrap();
        let snap2 = backend.checkpoint(&t.join("chk-2")).unwrap();
        assert!(!ssts(&snap2).is_subset(&ssts(&snap)), "the new writes are in a new SST");
        for name in ssts(&snap2).intersection(&ssts(&snap)) {
            let (old, new) = (std::fs::read(snap.dir.join(name)).unwrap(), std::fs::read(snap2.dir.join(name)).unwrap());
            assert!(old == new, "{name}: an SST name was reused for other contents");
        }
        let got: HashMap<u64, u64> = scan_all::<u64, u64>(&snap2.dir, "b", ALL).into_iter().map(|(_, k, v)| (k, v)).collect();
        assert_eq!(got[&4], want + 10);
    }

    #[test]
    fn scan_of_a_sub_range_reads_exactly_its_key_groups_in_order() {
        let t = TempDir::new("scan");
        let backend = RocksBackend::open(&t.join("db"), false).unwrap();
        let mut m = backend.map::<u64, u64>("s", ALL, 128).unwrap().with_cache_limit(1000);
        for k in 0..20_000u64 {
            m.insert(k, k * 2);
        }
        m.flush().unwrap();
        let snap = backend.checkpoint(&t.join("chk")).unwrap();
        let files_before = std::fs::read_dir(&snap.dir).unwrap().count();
        for range in [KeyGroupRange::new(10, 20), KeyGroupRange::new(0, 1), KeyGroupRange::new(100, 128), KeyGroupRange::new(5, 5)] {
            let got = scan_all::<u64, u64>(&snap.dir, "s", range);
            let want: HashSet<u64> = (0..20_000u64).filter(|k| range.contains(key_group(k, 128))).collect();
            assert_eq!(got.len(), want.len());
            assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "key-group order");
            for (kg, k, v) in &got {
                assert_eq!(*kg, key_group(k, 128));
                assert!(want.contains(k));
                assert_eq!(*v, k * 2);
            }
        }
        assert_eq!(std::fs::read_dir(&snap.dir).unwrap().count(), files_before, "a scan leaves the checkpoint's files alone");
        let err = scan_native(&snap.dir, "nope", ALL, |_, _, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = scan_native(&t.join("absent"), "s", ALL, |_, _, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
        assert!(!t.join("absent").exists());

        // Bulk restore of a sub-range into another backend, through insert_raw.
        let other = RocksBackend::open(&t.join("other"), false).unwrap();
        let range = KeyGroupRange::new(10, 20);
        let mut r = other.map::<u64, u64>("s", range, 128).unwrap();
        scan_native(&snap.dir, "s", range, |kg, k, v| r.insert_raw(kg, k, v)).unwrap();
        let err = r.insert_raw(3, &postcard::to_allocvec(&1u64).unwrap(), &[0]).unwrap_err();
        assert!(err.to_string().contains("key group 3"), "{err}");
        for k in (0..20_000u64).filter(|k| range.contains(key_group(k, 128))) {
            assert_eq!(r.get(&k), Some(&(k * 2)));
        }
        let outside = (0..).find(|k| !range.contains(key_group(k, 128))).unwrap();
        assert_eq!(r.insert_restored(outside, 1), Err(key_group(&outside, 128)));
        let inside = (0..).find(|k| range.contains(key_group(k, 128))).unwrap();
        assert_eq!(r.insert_restored(inside, 7), Ok(()));
        r.flush().unwrap();
        assert_eq!(r.get(&inside), Some(&7));
    }

    #[test]
    fn a_canonical_file_restores_into_the_heap_backend() {
        let t = TempDir::new("canonical");
        let backend = RocksBackend::open(&t.join("db"), false).unwrap();
        let mut m = backend.map::<String, (i64, Vec<u16>)>("s", ALL, 128).unwrap().with_cache_limit(500);
        let mut other = backend.map::<u64, u64>("other", ALL, 128).unwrap();
        let mut model = HashMap::new();
        for i in 0..3000i64 {
            let v = (i * 3, (0..(i % 5) as u16).collect::<Vec<_>>());
            m.insert(format!("key{i}"), v.clone());
            model.insert(format!("key{i}"), v);
            other.insert(i as u64, 1);
        }
        m.remove(&"key17".to_string());
        model.remove("key17");
        m.flush().unwrap();
        other.flush().unwrap();
        let snap = backend.checkpoint(&t.join("chk")).unwrap();
        let file = write_canonical(&snap.dir, "s", ALL).unwrap();
        assert_eq!(file.entries, model.len() as u64);
        // Restored at another parallelism: two heap maps split the key groups.
        let mut got = HashMap::new();
        for range in [KeyGroupRange::new(0, 50), KeyGroupRange::new(50, 128)] {
            let heap: crate::cow::CowMap<String, (i64, Vec<u16>)> = crate::format::restore(&file.bytes, range, 128, "s.state").unwrap();
            assert!(heap.len() > 500);
            got.extend(heap.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        assert_eq!(got, model);
        // A sub-range writes only its key groups.
        let part = write_canonical(&snap.dir, "s", KeyGroupRange::new(0, 50)).unwrap();
        assert!(part.index.iter().all(|b| b.key_group < 50));
        assert_eq!(part.entries, model.keys().filter(|k| key_group(*k, 128) < 50).count() as u64);
        assert!(write_canonical(&snap.dir, "absent", ALL).is_err());
    }

    #[test]
    fn consecutive_checkpoints_share_unchanged_ssts() {
        let t = TempDir::new("incr");
        let backend = RocksBackend::open(&t.join("db"), false).unwrap();
        let mut m = backend.map::<u64, u64>("s", ALL, 128).unwrap();
        for k in 0..100_000u64 {
            m.insert(k, k);
        }
        m.flush().unwrap();
        let one = backend.checkpoint(&t.join("chk-1")).unwrap();
        for k in 100_000..101_000u64 {
            m.insert(k, k);
        }
        m.flush().unwrap();
        let two = backend.checkpoint(&t.join("chk-2")).unwrap();
        let (s1, s2) = (ssts(&one), ssts(&two));
        assert!(!s1.is_empty());
        assert!(s1.is_subset(&s2), "{s1:?} not in {s2:?}");
        assert!(s2.len() > s1.len());
        let new_bytes: u64 = two.files.iter().filter(|f| f.sst && !s1.contains(&f.name)).map(|f| f.size).sum();
        let old_bytes: u64 = one.files.iter().filter(|f| f.sst).map(|f| f.size).sum();
        assert!(new_bytes * 10 < old_bytes, "the second checkpoint adds {new_bytes} bytes of SSTs to {old_bytes}");
        assert_eq!(scan_all::<u64, u64>(&two.dir, "s", ALL).len(), 101_000);
    }

    #[test]
    fn a_corrupt_value_is_a_typed_error_naming_the_state() {
        let t = TempDir::new("corrupt");
        let backend = RocksBackend::open(&t.0, false).unwrap();
        let mut m = backend.map::<u64, String>("names", ALL, 128).unwrap();
        let kg = key_group(&9u64, 128);
        // A string of length 200 with 1 byte of data.
        m.insert_raw(kg, &postcard::to_allocvec(&9u64).unwrap(), &[0xc8, 0x01, b'x']).unwrap();
        m.insert(10, "ten".into());
        assert_eq!(m.get(&9), None);
        assert!(m.error().is_some());
        // Nothing is written after a failure: the job restarts from its checkpoint.
        let err = m.flush().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("'names'") && msg.contains(&format!("key group {kg}")), "{msg}");
        assert_eq!(m.get(&10), None);
        m.flush().unwrap();
    }

    #[test]
    fn a_checkpoint_of_a_million_keys() {
        let t = TempDir::new("million");
        let backend = RocksBackend::open(&t.join("db"), false).unwrap();
        let mut m = backend.map::<u64, (u64, u64)>("s", ALL, 128).unwrap();
        let start = std::time::Instant::now();
        for k in 0..1_000_000u64 {
            m.insert(k, (k, k ^ 0x5555));
        }
        m.flush().unwrap();
        let written = start.elapsed();
        let start = std::time::Instant::now();
        let snap = backend.checkpoint(&t.join("chk")).unwrap();
        let took = start.elapsed();
        let start = std::time::Instant::now();
        let mut n = 0u64;
        scan_native(&snap.dir, "s", ALL, |_, _, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        let scanned = start.elapsed();
        assert_eq!(n, 1_000_000);
        // The steady state of incremental checkpoints: a few changes since the last one.
        for k in 0..1000u64 {
            *m.get_mut(&(k * 997)).unwrap() = (0, 0);
        }
        m.flush().unwrap();
        let start = std::time::Instant::now();
        let snap2 = backend.checkpoint(&t.join("chk-2")).unwrap();
        let took2 = start.elapsed();
        let new_bytes: u64 = snap2.files.iter().filter(|f| f.sst && !ssts(&snap).contains(&f.name)).map(|f| f.size).sum();
        assert!(ssts(&snap).is_subset(&ssts(&snap2)));
        eprintln!(
            "1 M keys: written through the map in {written:?}; checkpoint {took:?} ({} files, {} bytes); \
             full scan {scanned:?}; after 1 k updates, checkpoint {took2:?} ({new_bytes} new SST bytes)",
            snap.files.len(),
            snap.bytes()
        );
    }
}

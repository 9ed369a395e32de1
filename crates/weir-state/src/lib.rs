//! Keyed state for Weir.
//!
//! - [`keygroup`]: keys hash into key groups (`max_parallelism`, default 128); each worker owns a
//!   contiguous range, as in Flink, so state restores at another parallelism.
//! - [`cow`]: the heap backend's copy-on-write map. A snapshot freezes a few hundred shard tables
//!   (the synchronous pause); while it is written, a write copies only the entry it writes. It
//!   can track the keys changed between snapshots, for incremental checkpoints.
//! - [`format`]: the versioned, checksummed snapshot file with a key-group index, full or delta.
//!
//! ```
//! use weir_state::{cow::CowMap, keygroup::KeyGroupRange};
//!
//! let mut m: CowMap<u64, i64> = CowMap::new(KeyGroupRange::new(0, 128), 128);
//! m.track_changes(true);
//! *m.entry_or_default(7) += 5;
//! *m.entry_or_default(8) += 1;
//! let snap = m.snapshot();          // O(shards), no copy of entries
//! *m.entry_or_default(7) += 1;      // copies only the entry of key 7
//! let full = weir_state::format::write_snapshot(&snap).unwrap();
//! drop(snap);
//! m.remove(&8);
//! let delta = weir_state::format::write_delta(&m.snapshot()).unwrap(); // keys 7 and 8 only
//! let range = KeyGroupRange::new(0, 128);
//! let mut restored: CowMap<u64, i64> = weir_state::format::restore(&full.bytes, range, 128, "t").unwrap();
//! assert_eq!(restored.get(&7), Some(&5));
//! weir_state::format::restore_delta_into(&mut restored, &delta.bytes, "t+1").unwrap();
//! assert_eq!((restored.get(&7), restored.get(&8)), (Some(&6), None));
//! ```
#![forbid(unsafe_code)]

pub mod cow;
pub mod format;
pub mod keygroup;
pub mod rocks;

/// Errors reading or writing state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A snapshot file failed its checks.
    #[error("corrupt state file {file}: {what}")]
    Corrupt {
        /// The file (as named by the caller).
        file: String,
        /// What was wrong.
        what: String,
    },
    /// Encoding a key or value failed.
    #[error("encoding state failed: {0}")]
    Encode(String),
    /// The RocksDB backend failed: opening, reading or writing its files.
    #[error("RocksDB state in {dir}: {what}")]
    Rocks {
        /// The DB's (or native checkpoint's) directory.
        dir: String,
        /// What failed.
        what: String,
    },
}

//! Keyed state for Weir.
//!
//! - [`keygroup`]: keys hash into key groups (`max_parallelism`, default 128); each worker owns a
//!   contiguous range, as in Flink, so state restores at another parallelism.
//! - [`cow`]: the heap backend's copy-on-write map. A snapshot clones a few hundred `Arc`s (the
//!   synchronous pause); a shard is copied only when first written after a snapshot.
//! - [`format`]: the versioned, checksummed snapshot file with a key-group index.
//!
//! ```
//! use weir_state::{cow::CowMap, keygroup::KeyGroupRange};
//!
//! let mut m: CowMap<u64, i64> = CowMap::new(KeyGroupRange::new(0, 128), 128);
//! *m.entry_or_default(7) += 5;
//! let snap = m.snapshot();          // O(shards), no copy of entries
//! *m.entry_or_default(7) += 1;      // copies only the shard that holds key 7
//! let bytes = weir_state::format::write_snapshot(&snap).unwrap();
//! let restored: CowMap<u64, i64> = weir_state::format::restore(&bytes.bytes, KeyGroupRange::new(0, 128), 128, "t").unwrap();
//! assert_eq!(restored.get(&7), Some(&5));
//! assert_eq!(m.get(&7), Some(&6));
//! ```
#![forbid(unsafe_code)]

pub mod cow;
pub mod format;
pub mod keygroup;

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
}

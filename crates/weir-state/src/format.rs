//! The snapshot file: versioned, checksummed, indexed by key group.
//!
//! ```text
//! "WEIRSTAT" | version u32 | flags u32            header (16 bytes)
//! block*                                          one per non-empty key group:
//!                                                 entries u64 | postcard (key, value)*
//! index                                           postcard Vec<KeyGroupBlock>
//! index_offset u64 | index_len u64 | index_crc u32 | file_crc u32 | "WEIRIDX1"   footer (32 bytes)
//! ```
//! `file_crc` is the crc32c of every byte before it; each block has its own crc32c in the index,
//! so a restore at another parallelism reads and checks only its own key groups.

use std::hash::Hash;

use serde::{de::DeserializeOwned, Serialize};
use weir_checkpoint::KeyGroupBlock;

use crate::cow::{CowMap, CowSnapshot};
use crate::keygroup::KeyGroupRange;
use crate::StateError;

const MAGIC: &[u8; 8] = b"WEIRSTAT";
const FOOTER_MAGIC: &[u8; 8] = b"WEIRIDX1";
/// The format version this build writes.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 16;
const FOOTER_LEN: usize = 32;

/// A serialised snapshot.
#[derive(Debug)]
pub struct WrittenSnapshot {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// The key-group index.
    pub index: Vec<KeyGroupBlock>,
    /// crc32c of the whole file.
    pub crc32c: u32,
    /// Entries written.
    pub entries: u64,
}

/// Serialise a snapshot (runs on a background thread).
pub fn write_snapshot<K: Serialize, V: Serialize>(snap: &CowSnapshot<K, V>) -> Result<WrittenSnapshot, StateError> {
    let mut w = Writer::new(snap.len());
    for kg in snap.range().iter() {
        w.block(kg, snap.key_group(kg))?;
    }
    w.finish()
}

/// Serialise `(key group, key, value)` entries sorted by key group: state that does not live
/// in a [`CowMap`] (device-resident state read back from the GPU) in the same format.
pub fn write_entries<K: Serialize, V: Serialize>(entries: &[(u32, K, V)]) -> Result<WrittenSnapshot, StateError> {
    let mut w = Writer::new(entries.len());
    let mut rest = entries;
    while let Some(&(kg, _, _)) = rest.first() {
        let n = rest.iter().take_while(|e| e.0 == kg).count();
        w.block(kg, rest[..n].iter().map(|(_, k, v)| (k, v)))?;
        rest = &rest[n..];
    }
    w.finish()
}

struct Writer {
    bytes: Vec<u8>,
    index: Vec<KeyGroupBlock>,
    entries: u64,
}

impl Writer {
    fn new(entries: usize) -> Writer {
        let mut bytes = Vec::with_capacity(HEADER_LEN + entries * 16);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        Writer { bytes, index: Vec::new(), entries: 0 }
    }

    fn block<'a, K: Serialize + 'a, V: Serialize + 'a>(&mut self, kg: u32, entries: impl Iterator<Item = (&'a K, &'a V)>) -> Result<(), StateError> {
        let start = self.bytes.len();
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let mut n = 0u64;
        for (k, v) in entries {
            bytes = postcard::to_extend(&(k, v), bytes).map_err(|e| StateError::Encode(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            bytes.truncate(start);
        } else {
            bytes[start..start + 8].copy_from_slice(&n.to_le_bytes());
            self.entries += n;
            let len = (bytes.len() - start) as u64;
            self.index.push(KeyGroupBlock { key_group: kg, offset: start as u64, len, crc32c: crc32c::crc32c(&bytes[start..]) });
        }
        self.bytes = bytes;
        Ok(())
    }

    fn finish(self) -> Result<WrittenSnapshot, StateError> {
        let Writer { mut bytes, index, entries } = self;
        let index_offset = bytes.len() as u64;
        bytes = postcard::to_extend(&index, bytes).map_err(|e| StateError::Encode(e.to_string()))?;
        let index_len = bytes.len() as u64 - index_offset;
        let index_crc = crc32c::crc32c(&bytes[index_offset as usize..]);
        bytes.extend_from_slice(&index_offset.to_le_bytes());
        bytes.extend_from_slice(&index_len.to_le_bytes());
        bytes.extend_from_slice(&index_crc.to_le_bytes());
        let file_crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&file_crc.to_le_bytes());
        bytes.extend_from_slice(FOOTER_MAGIC);
        let crc = crc32c::crc32c(&bytes);
        Ok(WrittenSnapshot { bytes, index, crc32c: crc, entries })
    }
}

fn corrupt(file: &str, what: impl Into<String>) -> StateError {
    StateError::Corrupt { file: file.to_string(), what: what.into() }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Check a whole file (header, footer, file checksum) and return its key-group index.
pub fn verify(bytes: &[u8], file: &str) -> Result<Vec<KeyGroupBlock>, StateError> {
    if bytes.len() < HEADER_LEN + FOOTER_LEN {
        return Err(corrupt(file, format!("truncated: {} bytes", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt(file, "not a Weir state file (bad magic)"));
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(corrupt(file, format!("format version {version}, this build reads {FORMAT_VERSION}")));
    }
    let f = bytes.len() - FOOTER_LEN;
    if &bytes[f + 24..] != FOOTER_MAGIC {
        return Err(corrupt(file, "truncated (footer missing)"));
    }
    let file_crc = u32_at(bytes, f + 20);
    let actual = crc32c::crc32c(&bytes[..f + 20]);
    if file_crc != actual {
        return Err(corrupt(file, format!("checksum mismatch: stored {file_crc:08x}, computed {actual:08x}")));
    }
    let (io, il) = (u64_at(bytes, f) as usize, u64_at(bytes, f + 8) as usize);
    if io.checked_add(il) != Some(f) {
        return Err(corrupt(file, "index out of bounds"));
    }
    postcard::from_bytes(&bytes[io..f]).map_err(|e| corrupt(file, format!("index: {e}")))
}

/// Decode one key-group block (its bytes exactly) into `map`, checking its crc and key groups.
pub fn read_block<K, V>(
    map: &mut CowMap<K, V>,
    block_bytes: &[u8],
    block: &KeyGroupBlock,
    file: &str,
) -> Result<(), StateError>
where
    K: Hash + Eq + Clone + DeserializeOwned,
    V: Clone + DeserializeOwned,
{
    decode_block(block_bytes, block, file, |k, v| {
        map.insert_restored(k, v).map_err(|kg| corrupt(file, format!("block of key group {} holds a key of key group {kg}", block.key_group)))
    })
}

/// Decode one key-group block (its bytes exactly), checking its crc, and hand each entry to `f`.
pub fn decode_block<K, V>(
    block_bytes: &[u8],
    block: &KeyGroupBlock,
    file: &str,
    mut f: impl FnMut(K, V) -> Result<(), StateError>,
) -> Result<(), StateError>
where
    K: DeserializeOwned,
    V: DeserializeOwned,
{
    if block_bytes.len() as u64 != block.len || block_bytes.len() < 8 || crc32c::crc32c(block_bytes) != block.crc32c {
        return Err(corrupt(file, format!("key group {} fails its checksum", block.key_group)));
    }
    let n = u64_at(block_bytes, 0);
    let mut rest = &block_bytes[8..];
    for i in 0..n {
        let ((k, v), r): ((K, V), &[u8]) = postcard::take_from_bytes(rest)
            .map_err(|e| corrupt(file, format!("key group {} entry {i}: {e}", block.key_group)))?;
        rest = r;
        f(k, v)?;
    }
    Ok(())
}

/// A corruption error naming `file`.
pub fn corrupt_error(file: &str, what: impl Into<String>) -> StateError {
    corrupt(file, what)
}

/// Read the key groups of `map`'s range from a whole, verified file.
pub fn restore_into<K, V>(map: &mut CowMap<K, V>, bytes: &[u8], file: &str) -> Result<u64, StateError>
where
    K: Hash + Eq + Clone + DeserializeOwned,
    V: Clone + DeserializeOwned,
{
    let index = verify(bytes, file)?;
    let mut read = 0;
    let range = map.range();
    for b in index.iter().filter(|b| range.contains(b.key_group)) {
        let end = b.offset.checked_add(b.len).filter(|&e| e as usize <= bytes.len());
        let Some(end) = end else { return Err(corrupt(file, "block out of bounds")) };
        read_block(map, &bytes[b.offset as usize..end as usize], b, file)?;
        read += b.len;
    }
    Ok(read)
}

/// A new map over `range` restored from one file.
pub fn restore<K, V>(bytes: &[u8], range: KeyGroupRange, max_parallelism: u32, file: &str) -> Result<CowMap<K, V>, StateError>
where
    K: Hash + Eq + Clone + DeserializeOwned,
    V: Clone + DeserializeOwned,
{
    let mut m = CowMap::new(range, max_parallelism);
    restore_into(&mut m, bytes, file)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WrittenSnapshot {
        let mut m: CowMap<String, (i64, u64)> = CowMap::new(KeyGroupRange::new(0, 128), 128);
        for i in 0..5000 {
            m.insert(format!("key{i}"), (i, 1));
        }
        write_snapshot(&m.snapshot()).unwrap()
    }

    #[test]
    fn round_trip_and_split_by_range() {
        let w = sample();
        assert_eq!(w.entries, 5000);
        let lo: CowMap<String, (i64, u64)> = restore(&w.bytes, KeyGroupRange::new(0, 64), 128, "f").unwrap();
        let hi: CowMap<String, (i64, u64)> = restore(&w.bytes, KeyGroupRange::new(64, 128), 128, "f").unwrap();
        assert_eq!(lo.len() + hi.len(), 5000);
        assert!(lo.len() > 1000 && hi.len() > 1000);
        let found: Vec<_> = lo.iter().chain(hi.iter()).filter(|(k, _)| k.as_str() == "key7").collect();
        assert_eq!(found, [(&"key7".to_string(), &(7, 1))]);
    }

    #[test]
    fn every_single_bit_flip_and_truncation_is_detected() {
        let w = sample();
        let step = (w.bytes.len() / 97).max(1);
        for at in (0..w.bytes.len()).step_by(step) {
            let mut b = w.bytes.clone();
            b[at] ^= 0x10;
            let err = restore::<String, (i64, u64)>(&b, KeyGroupRange::new(0, 128), 128, "chk-3/x.state").unwrap_err();
            assert!(err.to_string().contains("chk-3/x.state"), "{err}");
        }
        for len in [0, 10, w.bytes.len() / 2, w.bytes.len() - 1] {
            assert!(restore::<String, (i64, u64)>(&w.bytes[..len], KeyGroupRange::new(0, 128), 128, "f").is_err());
        }
    }
}

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
//!
//! Flags bit 0 marks a *delta* file (an incremental checkpoint): its entries are
//! `postcard (key, Option<value>)`, the keys changed since the previous snapshot, `None` for a
//! key removed; only key groups with changes have a block. It is applied on top of the files
//! before it ([`read_delta_block`], [`restore_delta_into`]). Other flag bits are refused.

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
/// Bytes of the header (magic, version, flags): what [`is_delta`] reads.
pub const HEADER_LEN: usize = 16;
const FOOTER_LEN: usize = 32;
/// Flags bit 0: a delta file.
const FLAG_DELTA: u32 = 1;

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

/// Serialise a snapshot, every entry (runs on a background thread).
pub fn write_snapshot<K: Serialize, V: Serialize>(snap: &CowSnapshot<K, V>) -> Result<WrittenSnapshot, StateError> {
    let mut w = Writer::new(snap.len(), 0);
    for kg in snap.range().iter() {
        w.block(kg, snap.key_group(kg))?;
    }
    w.finish()
}

/// [`write_snapshot`], letting go of each key group as soon as it is written
/// ([`CowSnapshot::release_key_group`]): the processing thread's writes there stop copying
/// entries while the rest is written.
pub fn write_snapshot_releasing<K: Serialize, V: Serialize>(mut snap: CowSnapshot<K, V>) -> Result<WrittenSnapshot, StateError> {
    let mut w = Writer::new(snap.len(), 0);
    for kg in snap.range().iter() {
        w.block(kg, snap.key_group(kg))?;
        snap.release_key_group(kg);
    }
    w.finish()
}

/// Serialise the keys a snapshot changed since the previous one of its map, as a delta file:
/// each changed key with its value in the snapshot, or a tombstone when it has none.
///
/// # Panics
/// When the snapshot does not track changes ([`CowSnapshot::tracks_changes`]): its map's
/// change tracking was off during part of the interval, and a delta would lose writes.
pub fn write_delta<K: Serialize + Hash + Eq, V: Serialize>(snap: &CowSnapshot<K, V>) -> Result<WrittenSnapshot, StateError> {
    assert!(snap.tracks_changes(), "write_delta: the snapshot has no complete change set (CowMap::track_changes was off during its interval)");
    let mut w = Writer::new(snap.changed_len(), FLAG_DELTA);
    for kg in snap.range().iter() {
        w.block(kg, snap.changed_keys(kg).map(|k| (k, snap.get(k))))?;
    }
    w.finish()
}

/// [`write_delta`], letting go of each key group as soon as it is written (see
/// [`write_snapshot_releasing`]).
pub fn write_delta_releasing<K: Serialize + Hash + Eq, V: Serialize>(mut snap: CowSnapshot<K, V>) -> Result<WrittenSnapshot, StateError> {
    assert!(snap.tracks_changes(), "write_delta: the snapshot has no complete change set (CowMap::track_changes was off during its interval)");
    let mut w = Writer::new(snap.changed_len(), FLAG_DELTA);
    for kg in snap.range().iter() {
        w.block(kg, snap.changed_keys(kg).map(|k| (k, snap.get(k))))?;
        snap.release_key_group(kg);
    }
    w.finish()
}

/// Serialise `(key group, key, value)` entries sorted by key group: state that does not live
/// in a [`CowMap`] (device-resident state read back from the GPU) in the same format.
pub fn write_entries<K: Serialize, V: Serialize>(entries: &[(u32, K, V)]) -> Result<WrittenSnapshot, StateError> {
    let mut w = Writer::new(entries.len(), 0);
    let mut rest = entries;
    while let Some(&(kg, _, _)) = rest.first() {
        let n = rest.iter().take_while(|e| e.0 == kg).count();
        w.block(kg, rest[..n].iter().map(|(_, k, v)| (k, v)))?;
        rest = &rest[n..];
    }
    w.finish()
}

/// Builds a file from entries already encoded (`postcard(K)`, `postcard(V)`), given in key-group
/// order: a backend that keeps its entries encoded (RocksDB) writes canonical files without
/// decoding them. The bytes are not checked: an entry that is not a valid encoding makes a file
/// that fails when read.
pub struct RawWriter {
    w: Writer,
    delta: bool,
}

impl RawWriter {
    /// A full file (every entry of the state); `entries`: a capacity hint.
    pub fn full(entries: usize) -> RawWriter {
        RawWriter { w: Writer::new(entries, 0), delta: false }
    }

    /// A delta file (keys changed since the previous checkpoint, removals as tombstones).
    pub fn delta(entries: usize) -> RawWriter {
        RawWriter { w: Writer::new(entries, FLAG_DELTA), delta: true }
    }

    fn entry(&mut self, kg: u32, parts: &[&[u8]]) -> Result<(), StateError> {
        match self.w.open {
            Some((open, _, _)) if open == kg => {}
            Some((open, _, _)) if open > kg => {
                return Err(StateError::Encode(format!("raw entries out of key-group order: key group {kg} after {open}")));
            }
            _ => self.w.open_block(kg),
        }
        for p in parts {
            self.w.bytes.extend_from_slice(p);
        }
        if let Some((_, _, n)) = &mut self.w.open {
            *n += 1;
        }
        Ok(())
    }

    /// Add `key` of key group `kg` with `value` (each one postcard encoding).
    pub fn put(&mut self, kg: u32, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        if self.delta {
            // postcard's `Some(v)`: tag 1, then `v`.
            self.entry(kg, &[key, &[1], value])
        } else {
            self.entry(kg, &[key, value])
        }
    }

    /// Add a tombstone for `key` of key group `kg` (a delta file only).
    pub fn tombstone(&mut self, kg: u32, key: &[u8]) -> Result<(), StateError> {
        if !self.delta {
            return Err(StateError::Encode("a tombstone in a full state file".into()));
        }
        // postcard's `None`: tag 0.
        self.entry(kg, &[key, &[0]])
    }

    /// The file.
    pub fn finish(self) -> Result<WrittenSnapshot, StateError> {
        self.w.finish()
    }
}

/// postcard output appended to the file in place: `to_extend` moves the `Vec` in and out of
/// every call and pushes byte by byte (about half the writer's time at 10 M small entries).
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    #[inline]
    fn try_push(&mut self, b: u8) -> postcard::Result<()> {
        self.0.push(b);
        Ok(())
    }

    #[inline]
    fn try_extend(&mut self, b: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(b);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

struct Writer {
    bytes: Vec<u8>,
    index: Vec<KeyGroupBlock>,
    entries: u64,
    /// The block being written: key group, offset, entries.
    open: Option<(u32, usize, u64)>,
}

impl Writer {
    fn new(entries: usize, flags: u32) -> Writer {
        let mut bytes = Vec::with_capacity(HEADER_LEN + entries * 16);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        Writer { bytes, index: Vec::new(), entries: 0, open: None }
    }

    fn open_block(&mut self, kg: u32) {
        self.close_block();
        self.open = Some((kg, self.bytes.len(), 0));
        self.bytes.extend_from_slice(&0u64.to_le_bytes());
    }

    /// Finish the open block: its count and index entry, or nothing for an empty one.
    fn close_block(&mut self) {
        let Some((kg, start, n)) = self.open.take() else { return };
        let bytes = &mut self.bytes;
        if n == 0 {
            bytes.truncate(start);
        } else {
            bytes[start..start + 8].copy_from_slice(&n.to_le_bytes());
            self.entries += n;
            let len = (bytes.len() - start) as u64;
            self.index.push(KeyGroupBlock { key_group: kg, offset: start as u64, len, crc32c: crc32c::crc32c(&bytes[start..]) });
        }
    }

    fn block<T: Serialize>(&mut self, kg: u32, entries: impl Iterator<Item = T>) -> Result<(), StateError> {
        self.open_block(kg);
        let mut n = 0u64;
        for e in entries {
            postcard::serialize_with_flavor(&e, Append(&mut self.bytes)).map_err(|e| StateError::Encode(e.to_string()))?;
            n += 1;
        }
        if let Some(open) = &mut self.open {
            open.2 = n;
        }
        self.close_block();
        Ok(())
    }

    fn finish(mut self) -> Result<WrittenSnapshot, StateError> {
        self.close_block();
        let Writer { mut bytes, index, entries, .. } = self;
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

/// Check a file's header (its first [`HEADER_LEN`] bytes or more): magic, version and flags.
/// Returns whether it is a delta file.
pub fn is_delta(header: &[u8], file: &str) -> Result<bool, StateError> {
    if header.len() < HEADER_LEN {
        return Err(corrupt(file, format!("truncated: {} bytes", header.len())));
    }
    if &header[..8] != MAGIC {
        return Err(corrupt(file, "not a Weir state file (bad magic)"));
    }
    let version = u32_at(header, 8);
    if version != FORMAT_VERSION {
        return Err(corrupt(file, format!("format version {version}, this build reads {FORMAT_VERSION}")));
    }
    let flags = u32_at(header, 12);
    if flags & !FLAG_DELTA != 0 {
        return Err(corrupt(file, format!("unknown flags {flags:#x}")));
    }
    Ok(flags & FLAG_DELTA != 0)
}

/// Check a whole file (header, footer, file checksum) and return its key-group index.
/// [`is_delta`] on its header tells a delta file from a full one.
pub fn verify(bytes: &[u8], file: &str) -> Result<Vec<KeyGroupBlock>, StateError> {
    if bytes.len() < HEADER_LEN + FOOTER_LEN {
        return Err(corrupt(file, format!("truncated: {} bytes", bytes.len())));
    }
    is_delta(bytes, file)?;
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

/// Decode one key-group block of a full file (its bytes exactly) into `map`, checking its crc
/// and key groups.
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
    let mp = map.max_parallelism();
    decode_block(block_bytes, block, file, |k, v| {
        in_block(&k, mp, block, file)?;
        map.insert_restored(k, v).map_err(|kg| misplaced(file, block, kg))
    })
}

/// Apply one key-group block of a delta file (its bytes exactly) to `map`: its puts and
/// removals, checking its crc and key groups.
pub fn read_delta_block<K, V>(
    map: &mut CowMap<K, V>,
    block_bytes: &[u8],
    block: &KeyGroupBlock,
    file: &str,
) -> Result<(), StateError>
where
    K: Hash + Eq + Clone + DeserializeOwned,
    V: Clone + DeserializeOwned,
{
    let mp = map.max_parallelism();
    decode_checked(block_bytes, block, file, mp, true, |k, v: Option<V>| {
        match v {
            Some(v) => map.insert_restored(k, v),
            None => map.remove_restored(&k).map(drop),
        }
        .map_err(|kg| misplaced(file, block, kg))
    })
}

/// Decode one key-group block (its bytes exactly) of a full file (`delta: false`) or a delta
/// file, checking its crc and that every key is of the block's key group: `f` gets each put as
/// `Some(value)` and each tombstone as `None`. For maps other than [`CowMap`] (RocksDB).
pub fn decode_checked<K, V>(
    block_bytes: &[u8],
    block: &KeyGroupBlock,
    file: &str,
    max_parallelism: u32,
    delta: bool,
    mut f: impl FnMut(K, Option<V>) -> Result<(), StateError>,
) -> Result<(), StateError>
where
    K: Hash + DeserializeOwned,
    V: DeserializeOwned,
{
    if delta {
        decode_block(block_bytes, block, file, |k: K, v: Option<V>| {
            in_block(&k, max_parallelism, block, file)?;
            f(k, v)
        })
    } else {
        decode_block(block_bytes, block, file, |k: K, v: V| {
            in_block(&k, max_parallelism, block, file)?;
            f(k, Some(v))
        })
    }
}

/// A key must be of its block's key group: a misplaced one would be missed by a restore at
/// another parallelism.
fn in_block<K: Hash>(key: &K, max_parallelism: u32, block: &KeyGroupBlock, file: &str) -> Result<(), StateError> {
    let kg = crate::keygroup::key_group(key, max_parallelism);
    if kg == block.key_group {
        Ok(())
    } else {
        Err(misplaced(file, block, kg))
    }
}

fn misplaced(file: &str, block: &KeyGroupBlock, kg: u32) -> StateError {
    corrupt(file, format!("block of key group {} holds a key of key group {kg}", block.key_group))
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

/// Read the key groups of `map`'s range from a whole full file (checked).
pub fn restore_into<K, V>(map: &mut CowMap<K, V>, bytes: &[u8], file: &str) -> Result<u64, StateError>
where
    K: Hash + Eq + Clone + DeserializeOwned,
    V: Clone + DeserializeOwned,
{
    restore_file(map, bytes, file, false)
}

/// Apply the key groups of `map`'s range of a whole delta file (checked) to `map`, which holds
/// the state of the checkpoint before it.
pub fn restore_delta_into<K, V>(map: &mut CowMap<K, V>, bytes: &[u8], file: &str) -> Result<u64, StateError>
where
    K: Hash + Eq + Clone + DeserializeOwned,
    V: Clone + DeserializeOwned,
{
    restore_file(map, bytes, file, true)
}

fn restore_file<K, V>(map: &mut CowMap<K, V>, bytes: &[u8], file: &str, delta: bool) -> Result<u64, StateError>
where
    K: Hash + Eq + Clone + DeserializeOwned,
    V: Clone + DeserializeOwned,
{
    let index = verify(bytes, file)?;
    if is_delta(bytes, file)? != delta {
        let (is, want) = if delta { ("full", "delta") } else { ("delta", "full") };
        return Err(corrupt(file, format!("is a {is} state file where a {want} one was expected")));
    }
    let mut read = 0;
    let range = map.range();
    for b in index.iter().filter(|b| range.contains(b.key_group)) {
        let end = b.offset.checked_add(b.len).filter(|&e| e as usize <= bytes.len());
        let Some(end) = end else { return Err(corrupt(file, "block out of bounds")) };
        let block = &bytes[b.offset as usize..end as usize];
        if delta {
            read_delta_block(map, block, b, file)?;
        } else {
            read_block(map, block, b, file)?;
        }
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

    use std::collections::HashMap;

    use proptest::prelude::*;

    fn contents(m: &CowMap<u64, String>) -> HashMap<u64, String> {
        m.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// A map with tracked changes, a full file of its first snapshot, and a delta after some
    /// updates, re-inserts and removals.
    fn base_and_delta() -> (WrittenSnapshot, WrittenSnapshot, HashMap<u64, String>) {
        let mut m: CowMap<u64, String> = CowMap::new(KeyGroupRange::new(0, 128), 128);
        m.track_changes(true);
        for k in 0..5000 {
            m.insert(k, format!("v{k}"));
        }
        let full = write_snapshot(&m.snapshot()).unwrap();
        for k in (0..5000).step_by(7) {
            m.get_mut(&k).unwrap().push('+');
        }
        for k in (0..5000).step_by(11) {
            m.remove(&k);
        }
        m.insert(22, "back".into());
        m.insert(9000, "new".into());
        let delta = write_delta(&m.snapshot()).unwrap();
        (full, delta, contents(&m))
    }

    #[test]
    fn a_delta_applies_puts_and_tombstones_at_any_parallelism() {
        let (full, delta, want) = base_and_delta();
        assert!(!is_delta(&full.bytes, "f").unwrap());
        assert!(is_delta(&delta.bytes[..HEADER_LEN], "d").unwrap());
        // 715 updated, 455 removed (65 of them updated too), 22 re-inserted, 9000 new.
        assert_eq!(delta.entries, 715 + 455 - 65 + 1);
        assert!(delta.bytes.len() < full.bytes.len() / 3);
        let mut got = HashMap::new();
        for range in [KeyGroupRange::new(0, 50), KeyGroupRange::new(50, 128)] {
            let mut m: CowMap<u64, String> = restore(&full.bytes, range, 128, "f").unwrap();
            restore_delta_into(&mut m, &delta.bytes, "d").unwrap();
            got.extend(contents(&m));
        }
        assert_eq!(got, want);
        assert_eq!(got.get(&22).map(String::as_str), Some("back"));
        assert_eq!(got.get(&7).map(String::as_str), Some("v7+"));
        assert!(!got.contains_key(&11));
    }

    #[test]
    fn a_snapshot_is_written_on_another_thread_while_the_map_changes() {
        let mut m: CowMap<u64, String> = CowMap::new(KeyGroupRange::new(0, 128), 128);
        m.track_changes(true);
        for k in 0..20_000 {
            m.insert(k, k.to_string());
        }
        let want = contents(&m);
        let writer = std::thread::spawn({
            let snap = m.snapshot();
            move || write_snapshot_releasing(snap).unwrap()
        });
        for k in 0..20_000 {
            m.get_mut(&k).unwrap().push('+');
            if k % 3 == 0 {
                m.remove(&k);
            }
        }
        let full = writer.join().unwrap();
        let restored: CowMap<u64, String> = restore(&full.bytes, KeyGroupRange::new(0, 128), 128, "f").unwrap();
        assert_eq!(contents(&restored), want);
        let now = contents(&m);
        let delta = std::thread::spawn({
            let snap = m.snapshot();
            move || write_delta(&snap).unwrap()
        })
        .join()
        .unwrap();
        let mut restored = restored;
        restore_delta_into(&mut restored, &delta.bytes, "d").unwrap();
        assert_eq!(contents(&restored), now);
    }

    #[test]
    fn full_and_delta_files_are_not_mistaken_for_each_other() {
        let (full, delta, _) = base_and_delta();
        let err = restore::<u64, String>(&delta.bytes, KeyGroupRange::new(0, 128), 128, "chk-9/d.state").unwrap_err().to_string();
        assert!(err.contains("chk-9/d.state") && err.contains("is a delta state file"), "{err}");
        let mut m: CowMap<u64, String> = CowMap::new(KeyGroupRange::new(0, 128), 128);
        let err = restore_delta_into(&mut m, &full.bytes, "chk-8/f.state").unwrap_err().to_string();
        assert!(err.contains("chk-8/f.state") && err.contains("is a full state file"), "{err}");
        let mut odd = full.bytes[..HEADER_LEN].to_vec();
        odd[12] = 2;
        assert!(is_delta(&odd, "x").unwrap_err().to_string().contains("unknown flags 0x2"));
    }

    #[test]
    fn every_single_bit_flip_and_truncation_of_a_delta_is_detected() {
        let (full, delta, _) = base_and_delta();
        let base: CowMap<u64, String> = restore(&full.bytes, KeyGroupRange::new(0, 128), 128, "f").unwrap();
        let step = (delta.bytes.len() / 97).max(1);
        for at in (0..delta.bytes.len()).step_by(step) {
            let mut b = delta.bytes.clone();
            b[at] ^= 0x10;
            let mut m = base.clone();
            let err = restore_delta_into(&mut m, &b, "chk-4/d.state").unwrap_err();
            assert!(err.to_string().contains("chk-4/d.state"), "{err}");
        }
        for len in [0, 10, delta.bytes.len() / 2, delta.bytes.len() - 1] {
            let mut m = base.clone();
            assert!(restore_delta_into(&mut m, &delta.bytes[..len], "d").is_err());
        }
    }

    #[test]
    fn a_delta_block_with_a_key_of_another_key_group_is_refused() {
        let k = 5u64;
        let kg = crate::keygroup::key_group(&k, 128);
        let other = (kg + 1) % 128;
        let mut w = RawWriter::delta(1);
        w.tombstone(other, &postcard::to_allocvec(&k).unwrap()).unwrap();
        let file = w.finish().unwrap();
        let mut m: CowMap<u64, String> = CowMap::new(KeyGroupRange::new(0, 128), 128);
        m.insert(k, "x".into());
        let err = restore_delta_into(&mut m, &file.bytes, "d").unwrap_err().to_string();
        assert!(err.contains(&format!("block of key group {other} holds a key of key group {kg}")), "{err}");
    }

    #[test]
    fn raw_writer_makes_the_same_files_as_the_typed_writers() {
        let mut m: CowMap<String, (i64, u64)> = CowMap::new(KeyGroupRange::new(0, 128), 128);
        m.track_changes(true);
        for i in 0..3000 {
            m.insert(format!("key{i}"), (i, 1));
        }
        let snap = m.snapshot();
        let mut raw = RawWriter::full(snap.len());
        for kg in snap.range().iter() {
            for (k, v) in snap.key_group(kg) {
                raw.put(kg, &postcard::to_allocvec(k).unwrap(), &postcard::to_allocvec(v).unwrap()).unwrap();
            }
        }
        let raw = raw.finish().unwrap();
        let typed = write_snapshot(&snap).unwrap();
        assert_eq!(raw.bytes, typed.bytes);
        assert_eq!((raw.index, raw.entries, raw.crc32c), (typed.index, typed.entries, typed.crc32c));

        for i in (0..3000).step_by(3) {
            m.remove(&format!("key{i}"));
        }
        m.insert("key1".into(), (-1, 2));
        let snap = m.snapshot();
        let mut raw = RawWriter::delta(snap.changed_len());
        for kg in snap.range().iter() {
            for k in snap.changed_keys(kg) {
                let key = postcard::to_allocvec(k).unwrap();
                match snap.get(k) {
                    Some(v) => raw.put(kg, &key, &postcard::to_allocvec(v).unwrap()).unwrap(),
                    None => raw.tombstone(kg, &key).unwrap(),
                }
            }
        }
        assert_eq!(raw.finish().unwrap().bytes, write_delta(&snap).unwrap().bytes);
    }

    #[test]
    fn raw_writer_refuses_disorder_and_tombstones_in_full_files() {
        let mut w = RawWriter::full(2);
        w.put(3, &[1], &[2]).unwrap();
        w.put(3, &[2], &[2]).unwrap();
        let err = w.put(2, &[3], &[2]).unwrap_err().to_string();
        assert!(err.contains("key group 2 after 3"), "{err}");
        assert!(RawWriter::full(1).tombstone(0, &[1]).is_err());
        // Empty: a valid file with no block.
        let empty = RawWriter::full(0).finish().unwrap();
        assert_eq!(verify(&empty.bytes, "e").unwrap(), []);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u16),
        Remove(u64),
        Append(u64),
        GetOrInsert(u64),
        Snapshot,
        Write(usize, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..300, any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0u64..300).prop_map(Op::Remove),
            3 => (0u64..300).prop_map(Op::Append),
            2 => (0u64..300).prop_map(Op::GetOrInsert),
            1 => Just(Op::Snapshot),
            1 => (any::<usize>(), any::<bool>()).prop_map(|(i, r)| Op::Write(i, r)),
        ]
    }

    proptest! {
        /// Snapshots taken at random points, written (full for the first, deltas after) while
        /// others are alive or after they are released: each equals the model at its time, and
        /// the first file plus the deltas in order rebuild every later snapshot exactly.
        #[test]
        fn deltas_rebuild_every_snapshot(ops in proptest::collection::vec(op(), 0..400), copy_at in prop_oneof![Just(0usize), Just(1), Just(4)]) {
            let mut m: CowMap<u64, String> = CowMap::new(KeyGroupRange::new(0, 4), 4);
            m.set_copy_shard_at(copy_at);
            m.track_changes(true);
            let mut model: HashMap<u64, String> = HashMap::new();
            let mut alive: Vec<(usize, CowSnapshot<u64, String>)> = Vec::new();
            let mut models = Vec::new();
            let mut files: Vec<Option<Vec<u8>>> = Vec::new();
            let write = |seq: usize, snap: CowSnapshot<u64, String>, releasing: bool, want: &HashMap<u64, String>| -> Result<Vec<u8>, TestCaseError> {
                prop_assert!(snap.tracks_changes());
                let got: HashMap<u64, String> = snap.range().iter().flat_map(|kg| snap.key_group(kg)).map(|(k, v)| (*k, v.clone())).collect();
                prop_assert_eq!(&got, want);
                let w = match (seq, releasing) {
                    (0, false) => write_snapshot(&snap),
                    (0, true) => write_snapshot_releasing(snap),
                    (_, false) => write_delta(&snap),
                    (_, true) => write_delta_releasing(snap),
                };
                Ok(w.unwrap().bytes)
            };
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(m.insert(k, v.to_string()), model.insert(k, v.to_string())),
                    Op::Remove(k) => prop_assert_eq!(m.remove(&k), model.remove(&k)),
                    Op::Append(k) => {
                        if let Some(v) = m.get_mut(&k) {
                            v.push('a');
                        }
                        if let Some(v) = model.get_mut(&k) {
                            v.push('a');
                        }
                    }
                    Op::GetOrInsert(k) => {
                        m.get_or_insert_with(&k, String::new).push('g');
                        model.entry(k).or_default().push('g');
                    }
                    Op::Snapshot => {
                        alive.push((files.len(), m.snapshot()));
                        models.push(model.clone());
                        files.push(None);
                    }
                    Op::Write(i, releasing) => {
                        if !alive.is_empty() {
                            let (seq, snap) = alive.remove(i % alive.len());
                            files[seq] = Some(write(seq, snap, releasing, &models[seq])?);
                        }
                    }
                }
                prop_assert_eq!(m.len(), model.len());
            }
            for (seq, snap) in alive {
                files[seq] = Some(write(seq, snap, false, &models[seq])?);
            }
            let Some(first) = files.first() else { return Ok(()) };
            let mut restored: CowMap<u64, String> = restore(first.as_ref().unwrap(), KeyGroupRange::new(0, 4), 4, "0").unwrap();
            prop_assert_eq!(&contents(&restored), &models[0]);
            for (seq, file) in files.iter().enumerate().skip(1) {
                restore_delta_into(&mut restored, file.as_ref().unwrap(), "delta").unwrap();
                prop_assert_eq!(&contents(&restored), &models[seq], "after delta {}", seq);
            }
        }
    }
}

//! The [`SlotsWritten`] hook: told of whole slots only, after the file is durable, with the
//! words as of the snapshot; its error fails the snapshot and makes the next one full.

use std::sync::{Arc, Mutex};

use weir_gpu::kernels::cpu::CpuKernels;

use super::*;

/// Words per key: more than one dirty-tracking chunk, so a slot can be written in part.
const WORDS: usize = weir_gpu::state::MAX_CHUNK_WORDS + 8;

type Seen = Arc<Mutex<Vec<(u64, Vec<(u64, Vec<u32>)>)>>>;

fn arena(keys: u64, fail_at: Option<u64>) -> (KeyedArena<u64>, Seen) {
    let mut a: KeyedArena<u64> = KeyedArena::new("s", &CpuKernels::new(1));
    a.attached.max_parallelism = 128;
    // Deltas as large as the full file stay deltas here: the test is about the hook.
    a.attached.max_delta_share = 1.0;
    a.ensure(WORDS).unwrap();
    for k in 0..keys {
        a.insert(k, &vec![k as u32; WORDS]).unwrap();
    }
    let seen: Seen = Arc::default();
    let s = seen.clone();
    a.on_slots_written(Arc::new(move |epoch, slots: &[(u64, Vec<u32>)]| {
        if fail_at == Some(epoch) {
            return Err("the hook failed".into());
        }
        s.lock().unwrap().push((epoch, slots.to_vec()));
        Ok(())
    }));
    (a, seen)
}

fn storage(tag: &str) -> (CheckpointStorage, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("weir-slots-written-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    (CheckpointStorage::open(dir.to_str().unwrap(), "job").unwrap(), dir)
}

/// Write `v` to every word of `key`'s slot in `chunks` (chunk indices in the slot), marking them.
fn write(a: &mut KeyedArena<u64>, key: u64, chunks: &[usize], v: u32) {
    let slot = a.slot(&key).unwrap();
    let arena = a.arena().unwrap();
    let (at, l) = (arena.slot_word(slot) as usize, arena.layout());
    let (words, dirty) = arena.host_mut().unwrap();
    for &c in chunks {
        let from = c * l.chunk_words;
        let to = ((c + 1) * l.chunk_words).min(l.state_words);
        words[at + from..at + to].fill(v);
        dirty[(at + from) / l.chunk_words] = 1;
    }
}

#[test]
fn the_hook_gets_whole_slots_as_of_the_snapshot() {
    let (st, dir) = storage("whole");
    let (mut a, seen) = arena(3, None);
    let s1 = a.snapshot(1, false).unwrap();
    // Written after the barrier: not in snapshot 1.
    write(&mut a, 2, &[0, 1], 22);
    s1.run(&st).unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, 1);
        let keys: Vec<u64> = seen[0].1.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys.len(), 3, "a full snapshot: every key");
        for (k, w) in &seen[0].1 {
            assert_eq!(w, &vec![*k as u32; WORDS], "key {k} as of the snapshot");
        }
    }
    // Key 1 written in part (one chunk), key 2 whole (before snapshot 2).
    write(&mut a, 1, &[1], 11);
    let w2 = a.snapshot(2, false).unwrap().run(&st).unwrap();
    assert!(w2.files.len() == 2 && w2.entries == 2, "a delta of keys 1 and 2: {:?}", w2.files);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1], (2, vec![(2, vec![22; WORDS])]), "only the whole slot");
    }
    // Nothing whole written: no call.
    write(&mut a, 0, &[0], 5);
    a.snapshot(3, false).unwrap().run(&st).unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_failing_hook_fails_the_snapshot_and_the_next_one_is_full() {
    let (st, dir) = storage("fail");
    let (mut a, seen) = arena(2, Some(2));
    a.snapshot(1, false).unwrap().run(&st).unwrap();
    write(&mut a, 0, &[0, 1], 7);
    let e = a.snapshot(2, false).unwrap().run(&st).err().expect("the hook's error fails the snapshot");
    assert!(e.contains("checkpoint 2: the hook failed"), "{e}");
    let w3 = a.snapshot(3, false).unwrap().run(&st).unwrap();
    assert_eq!((w3.files.len(), w3.entries), (1, 2), "full after a failed hook");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.iter().map(|(e, s)| (*e, s.len())).collect::<Vec<_>>(), [(1, 2), (3, 2)]);
    std::fs::remove_dir_all(dir).ok();
}

//! Shared files are collected while other threads (or processes) abort checkpoints: an abort
//! never deletes a file the newest completed checkpoint lists.
use weir_checkpoint::{CheckpointMetadata, StateFileHandle, SubtaskSnapshot, TaskId, METADATA_VERSION};
use weir_storage::CheckpointStorage;

fn meta(id: u64, files: &[String]) -> CheckpointMetadata {
    let snapshot = SubtaskSnapshot {
        operator_name: "op".into(),
        uid: "op".into(),
        state_files: files.iter().map(|p| StateFileHandle { state: "s".into(), path: p.clone(), size: 1, crc32c: 0, key_groups: vec![], kind: Default::default() }).collect(),
        splits: vec![],
        stats: Default::default(),
    };
    CheckpointMetadata { version: METADATA_VERSION, job: "job".into(), id, triggered_ms: 0, completed_ms: 1, parallelism: 1, max_parallelism: 128, is_final: false, subtasks: vec![(TaskId::new(0, 0), snapshot)] }
}

#[test]
fn aborts_racing_commits_and_discards_never_delete_a_file_the_newest_checkpoint_lists() {
    let dir = std::env::temp_dir().join(format!("review-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = CheckpointStorage::open(dir.to_str().unwrap(), "job").unwrap();
    let base = "shared/chk1-op-s-0-full.state".to_string();
    s.put(&base, vec![1]).unwrap();
    s.commit_metadata(&meta(1, &[base.clone()])).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = s.clone();
    let stop2 = stop.clone();
    // Another thread (the snapshot executor, or another process) cleaning up aborted checkpoints.
    let aborter = std::thread::spawn(move || {
        let mut k = 1_000_000u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = s2.abort(k);
            k += 1;
        }
    });
    let mut lost_at = None;
    for i in 2..3000u64 {
        let d = format!("shared/chk{i}-op-s-0-delta.state");
        s.put(&d, vec![1]).unwrap();
        // Checkpoint i lists the base and its own delta; retention 1 discards i-1.
        s.commit_metadata(&meta(i, &[base.clone(), d])).unwrap();
        s.discard(i - 1).unwrap();
        if !dir.join("job").join(&base).exists() {
            lost_at = Some(i);
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    aborter.join().unwrap();
    assert_eq!(lost_at, None, "{base} (listed by the newest completed checkpoint) was deleted");
}

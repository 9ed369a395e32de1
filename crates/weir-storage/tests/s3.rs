//! Checkpoint storage on a real S3-compatible server (moto on loopback): every operation the
//! engine uses, multipart uploads, the conditional `_metadata` commit, and outages (an
//! unreachable store is an I/O error, never corruption nor an empty job directory).

#[path = "common/moto.rs"]
mod moto;

use moto::Moto;
use weir_checkpoint::{CheckpointMetadata, StateFileHandle, SubtaskSnapshot, TaskId, METADATA_VERSION};
use weir_storage::{CheckpointStorage, LatestValid, Lineage, StorageError, MULTIPART_PART_SIZE};

/// The metadata of checkpoint `id` whose one subtask lists `files` as (path, contents).
fn meta(id: u64, files: &[(&str, &[u8])]) -> CheckpointMetadata {
    let snapshot = SubtaskSnapshot {
        operator_name: "op".into(),
        uid: "op".into(),
        state_files: files
            .iter()
            .map(|(p, b)| StateFileHandle {
                state: "s".into(),
                path: p.to_string(),
                size: b.len() as u64,
                crc32c: crc32c::crc32c(b),
                key_groups: vec![],
                kind: Default::default(),
            })
            .collect(),
        splits: vec![],
        stats: Default::default(),
    };
    CheckpointMetadata {
        version: METADATA_VERSION,
        job: "job".into(),
        id,
        triggered_ms: 0,
        completed_ms: 1,
        parallelism: 1,
        max_parallelism: 128,
        is_final: false,
        subtasks: vec![(TaskId::new(0, 0), snapshot)],
    }
}

fn open(m: &Moto, prefix: &str) -> CheckpointStorage {
    CheckpointStorage::open_with(&m.url(prefix), "job", &m.options()).unwrap()
}

/// Bytes that differ from part to part (a misplaced part changes the checksum).
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn files_checkpoints_and_lineage_round_trip() {
    let m = Moto::start("weir-ck");
    let s = open(&m, "ck/a");
    assert!(s.is_remote());
    assert_eq!(s.display("chk-1/a.state"), "s3://weir-ck/ck/a/job/chk-1/a.state");
    assert_eq!(s.location().join("chk-1").display().to_string(), "s3://weir-ck/ck/a/job/chk-1");
    assert!(s.completed_checkpoints().unwrap().is_empty(), "an empty prefix holds no checkpoint");
    assert!(matches!(s.latest_valid().unwrap(), LatestValid::Empty));
    assert_eq!(s.lineage().unwrap(), None);

    s.put("chk-1/a.state", b"hello world".to_vec()).unwrap();
    assert_eq!(&s.read("chk-1/a.state").unwrap()[..], b"hello world");
    assert_eq!(&s.read_range("chk-1/a.state", 6..11).unwrap()[..], b"world");
    assert!(s.completed_checkpoints().unwrap().is_empty(), "no _metadata, no checkpoint");
    let missing = s.read("chk-1/nope").unwrap_err();
    assert!(missing.is_corruption(), "a missing file proves corruption: {missing}");
    assert!(missing.to_string().contains("s3://weir-ck/ck/a/job/chk-1/nope"), "{missing}");

    s.commit_metadata(&meta(1, &[("chk-1/a.state", b"hello world")])).unwrap();
    s.put("chk-2/a.state", b"two".to_vec()).unwrap();
    s.commit_metadata(&meta(2, &[("chk-2/a.state", b"two")])).unwrap();
    s.put("chk-3/a.state", b"three, unfinished".to_vec()).unwrap();
    assert_eq!(s.completed_checkpoints().unwrap(), vec![1, 2]);
    assert_eq!(s.checkpoint_ids().unwrap(), (vec![1, 2], 3), "the unfinished chk-3 is not reused");
    assert!(matches!(s.latest_valid().unwrap(), LatestValid::Found(m, skipped) if m.id == 2 && skipped.is_empty()));

    // A corrupt newest checkpoint is skipped, naming its file; an older one is restored.
    s.put("chk-2/a.state", b"tw0".to_vec()).unwrap();
    match s.latest_valid().unwrap() {
        LatestValid::Found(m, skipped) => {
            assert_eq!(m.id, 1);
            assert_eq!(skipped.len(), 1);
            assert!(skipped[0].1.to_string().contains("s3://weir-ck/ck/a/job/chk-2/a.state"), "{}", skipped[0].1);
        }
        other => panic!("{other:?}"),
    }

    // Abandon: the checkpoint leaves the lineage, its metadata stays readable.
    s.abandon(2).unwrap();
    assert_eq!(s.completed_checkpoints().unwrap(), vec![1]);
    assert_eq!(s.abandoned_checkpoints().unwrap(), vec![2]);
    assert_eq!(s.load_abandoned_metadata(2).unwrap().id, 2);

    let lineage = Lineage { restored_from: Some(1), restored_path: Some(s.display("chk-1")), first_id: 4, abandoned: vec![2], started_ms: 7 };
    s.record_lineage(&lineage).unwrap();
    assert_eq!(s.lineage().unwrap(), Some(lineage));

    // Discard removes every object of the checkpoint (a directory is only a prefix).
    s.discard(1).unwrap();
    assert!(s.completed_checkpoints().unwrap().is_empty());
    assert!(s.read("chk-1/a.state").unwrap_err().is_corruption(), "deleted");
    assert_eq!(s.checkpoint_ids().unwrap().1, 3, "chk-2 (abandoned) and chk-3 remain");

    // Another job under the same prefix sees none of it.
    let other = CheckpointStorage::open_with(&m.url("ck/a"), "other", &m.options()).unwrap();
    assert_eq!(other.checkpoint_ids().unwrap(), (vec![], 0));
}

#[test]
fn restore_paths_open_the_job_directory() {
    let m = Moto::start("weir-restore");
    let s = open(&m, "deep/prefix");
    s.put("chk-5/a.state", b"x".to_vec()).unwrap();
    s.commit_metadata(&meta(5, &[("chk-5/a.state", b"x")])).unwrap();
    let path = s.location().join("chk-5").display().to_string();
    let (r, id) = CheckpointStorage::open_checkpoint_path_with(&path, &m.options()).unwrap();
    assert_eq!((r.location(), id), (s.location(), 5), "the same job directory as the configured one");
    assert_eq!(r.load_metadata(5).unwrap().id, 5);
    let (_, id) = CheckpointStorage::open_checkpoint_path_with(&format!("{path}/"), &m.options()).unwrap();
    assert_eq!(id, 5);
    // A mistyped path is an error naming it, not an empty checkpoint.
    let typo = format!("{}/chk-6", s.location().display());
    let e = CheckpointStorage::open_checkpoint_path_with(&typo, &m.options()).err().unwrap();
    assert!(matches!(e, StorageError::Location(_)) && e.to_string().contains(&typo), "{e}");
    let e = CheckpointStorage::open_checkpoint_path_with(&m.url("deep/prefix/job/chk-x"), &m.options()).err().unwrap();
    assert!(e.to_string().contains("not a chk-<n> directory"), "{e}");
    // The job directory (weir checkpoints list).
    let j = CheckpointStorage::open_job_dir_with(&s.location().display().to_string(), &m.options()).unwrap();
    assert_eq!(j.completed_checkpoints().unwrap(), vec![5]);
    assert!(CheckpointStorage::open_job_dir_with(&m.url("deep/prefix/nojob"), &m.options()).is_err());
}

#[test]
fn metadata_is_committed_once() {
    let m = Moto::start("weir-once");
    let s = open(&m, "ck");
    let first = meta(3, &[]);
    s.commit_metadata(&first).unwrap();
    let mut second = meta(3, &[]);
    second.completed_ms = 99;
    let e = s.commit_metadata(&second).unwrap_err();
    assert!(matches!(e, StorageError::AlreadyCommitted { id: 3, .. }), "{e}");
    assert!(e.to_string().contains("s3://weir-once/ck/job/chk-3/_metadata"), "names the file: {e}");
    assert!(!e.is_corruption());
    assert_eq!(s.load_metadata(3).unwrap().completed_ms, 1, "the first commit stands");
    // A second writer (another process: its own storage object) is refused the same way.
    let other = open(&m, "ck");
    assert!(matches!(other.commit_metadata(&second), Err(StorageError::AlreadyCommitted { .. })));
}

#[test]
fn large_files_go_up_in_parts_and_come_down_whole() {
    let m = Moto::start("weir-big");
    let s = open(&m, "ck");
    let dir = std::env::temp_dir().join(format!("weir-s3-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Two full parts and a short one.
    let big = pattern(2 * MULTIPART_PART_SIZE + 12_345, 1);
    let src = dir.join("000042.sst");
    std::fs::write(&src, &big).unwrap();
    let up = s.put_file("shared/chk1-op-s-0-000042.sst", &src).unwrap();
    assert_eq!((up.size, up.crc32c), (big.len() as u64, crc32c::crc32c(&big)));
    let log = m.log();
    let parts = log.lines().filter(|l| l.contains("PUT /weir-big/ck/job/shared/chk1-op-s-0-000042.sst?") && l.contains("partNumber=")).count();
    assert_eq!(parts, 3, "uploaded in three parts:\n{log}");
    assert_eq!(log.matches("000042.sst?uploads").count(), 1, "one multipart upload:\n{log}");
    let back = dir.join("restored.sst");
    let down = s.get_to_file("shared/chk1-op-s-0-000042.sst", &back).unwrap();
    assert_eq!(down, up);
    assert!(std::fs::read(&back).unwrap() == big, "the downloaded file equals the uploaded one");
    let mid = MULTIPART_PART_SIZE as u64 - 3;
    assert_eq!(&s.read_range("shared/chk1-op-s-0-000042.sst", mid..mid + 6).unwrap()[..], &big[mid as usize..mid as usize + 6], "across a part boundary");

    // put of bytes above the threshold takes the same path.
    let bytes = pattern(MULTIPART_PART_SIZE + 1, 2);
    s.put("chk-1/big.state", bytes.clone()).unwrap();
    assert!(s.read("chk-1/big.state").unwrap() == bytes);
    s.commit_metadata(&meta(1, &[("chk-1/big.state", &bytes)])).unwrap();
    assert!(matches!(s.latest_valid().unwrap(), LatestValid::Found(m, _) if m.id == 1), "a multipart file verifies");

    // A small file is a single put; an empty one too.
    let small = dir.join("small");
    std::fs::write(&small, b"tiny").unwrap();
    assert_eq!(s.put_file("chk-1/small", &small).unwrap().size, 4);
    std::fs::write(&small, b"").unwrap();
    assert_eq!(s.put_file("chk-1/empty", &small).unwrap(), weir_storage::FileDigest { size: 0, crc32c: 0 });
    assert_eq!(s.read("chk-1/empty").unwrap().len(), 0);

    // A missing object leaves no partial local file behind.
    let e = s.get_to_file("chk-1/absent", &dir.join("absent")).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.contains("absent")), "{left:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shared_files_and_aborts() {
    let m = Moto::start("weir-shared");
    let s = open(&m, "ck");
    let f1 = "shared/chk1-op-s-0-full.state";
    let f2 = "shared/chk2-op-s-0-delta.state";
    let f3 = "shared/chk3-op-s-0-full.state";
    let f4 = "shared/chk4-op-s-0-delta.state";
    for f in [f1, f2, f3, f4] {
        s.put(f, vec![1]).unwrap();
    }
    let one: &[u8] = &[1];
    s.commit_metadata(&meta(1, &[(f1, one)])).unwrap();
    s.commit_metadata(&meta(2, &[(f1, one), (f2, one)])).unwrap();
    s.commit_metadata(&meta(3, &[(f3, one)])).unwrap();
    let exists = |f: &str| s.read(f).is_ok();
    s.discard(1).unwrap();
    assert!(exists(f1), "listed by checkpoint 2");
    s.discard(2).unwrap();
    assert!(!exists(f1) && !exists(f2), "no completed checkpoint lists them");
    assert!(exists(f3) && exists(f4));
    s.collect_shared(3).unwrap();
    assert!(exists(f3), "listed by 3");

    // An aborted checkpoint: what was written goes, later writers are refused.
    s.put("chk-4/a.state", vec![1; 100]).unwrap();
    s.put("chk-4/b.state", vec![2; 100]).unwrap();
    s.abort(4).unwrap();
    assert!(!exists("chk-4/a.state") && !exists("chk-4/b.state"));
    assert!(matches!(s.put("chk-4/c.state", vec![3]), Err(StorageError::Aborted(4))));
    assert!(!exists("chk-4/c.state"));
    assert!(exists(f4), "a later checkpoint may still list an aborted one's delta");
    assert_eq!(s.checkpoint_ids().unwrap(), (vec![3], 3), "no chk-4 prefix is left");
    s.for_attempt().put("chk-4/c.state", vec![4]).unwrap();
    assert!(exists("chk-4/c.state"), "a new attempt may reuse the id");
}

#[test]
fn an_unreachable_store_is_an_io_error_never_corruption_nor_empty() {
    let mut m = Moto::start("weir-outage");
    let s = open(&m, "ck");
    s.put("chk-1/a.state", b"x".to_vec()).unwrap();
    s.commit_metadata(&meta(1, &[("chk-1/a.state", b"x")])).unwrap();
    m.stop();
    let started = std::time::Instant::now();
    let transient = |e: StorageError| {
        assert!(matches!(e, StorageError::Io { .. }) && !e.is_corruption(), "{e}");
    };
    transient(s.put("chk-2/a.state", b"y".to_vec()).unwrap_err());
    transient(s.commit_metadata(&meta(2, &[])).unwrap_err());
    transient(s.read("chk-1/a.state").unwrap_err());
    transient(s.completed_checkpoints().unwrap_err());
    transient(s.checkpoint_ids().unwrap_err());
    transient(s.latest_valid().unwrap_err());
    transient(s.lineage().unwrap_err());
    transient(s.discard(1).unwrap_err());
    let path = s.location().join("chk-1").display().to_string();
    transient(CheckpointStorage::open_checkpoint_path_with(&path, &m.options()).err().unwrap());
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "an outage fails fast: {:?}", started.elapsed());

    // Back (empty: moto keeps nothing): the storage works again.
    m.restart();
    assert!(matches!(s.latest_valid().unwrap(), LatestValid::Empty));
    s.put("chk-2/a.state", b"y".to_vec()).unwrap();
    s.commit_metadata(&meta(2, &[("chk-2/a.state", b"y")])).unwrap();
    assert!(matches!(s.latest_valid().unwrap(), LatestValid::Found(m, _) if m.id == 2));

    // A bucket that does not exist is not corruption either, nor an empty job directory.
    let nob = CheckpointStorage::open_with("s3://no-such-bucket/ck", "job", &m.options()).unwrap();
    let e = nob.read("chk-1/_metadata").unwrap_err();
    assert!(!e.is_corruption(), "{e}");
    assert!(nob.completed_checkpoints().is_err());
}

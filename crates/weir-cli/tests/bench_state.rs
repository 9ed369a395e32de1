//! `weir bench state` smoke run: both backends measured, the ratio lines printed, the bench's
//! directories removed.

mod common;

use common::{weir, TempDir};

/// The percentage of a `<backend>: incremental/full bytes (1% changed): X%` line.
fn ratio(stdout: &str, backend: &str) -> f64 {
    let prefix = format!("{backend}: incremental/full bytes (1% changed): ");
    let line = stdout.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no '{prefix}' line:\n{stdout}"));
    line[prefix.len()..].trim_end_matches('%').parse().unwrap_or_else(|e| panic!("'{line}': {e}"))
}

#[test]
fn bench_state_quick_measures_both_backends_and_cleans_up() {
    let tmp = TempDir::new("bench-state");
    let out = weir().args(["bench", "state", "--keys", "20000", "--quick", "--dir"]).arg(&tmp.0).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    // Heap deltas hold the 1 % of keys changed; RocksDB uploads new SST files only.
    let (heap, rocks) = (ratio(&stdout, "hashmap"), ratio(&stdout, "rocksdb"));
    assert!(heap > 0.0 && heap < 10.0, "hashmap: {heap}%\n{stdout}");
    assert!(rocks > 0.0 && rocks < 100.0, "rocksdb: {rocks}%\n{stdout}");
    for backend in ["hashmap", "rocksdb"] {
        for want in [format!("{backend}: throughput with 200ms checkpoints / off: "), format!("{backend}: restore of 20000 keys: from local copy ")] {
            assert!(stdout.contains(&want), "no '{want}':\n{stdout}");
        }
    }
    // The restores read the task-local copies, then checkpoint storage.
    for from in ["bytes from local copies, 0 from checkpoint storage", "(0 bytes from local copies"] {
        assert!(stderr.contains(from), "no restore log with '{from}':\n{stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(&tmp.0).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

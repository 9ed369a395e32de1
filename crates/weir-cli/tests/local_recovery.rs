//! Local recovery: with `execution.checkpointing.local-backup.enabled` each subtask keeps a copy
//! of its latest snapshots on local disk, and `execution.state-recovery.from-local` restores
//! from it. Killed jobs restore from the local copy; a corrupt local copy is logged and never
//! loaded (checkpoint storage is read instead); a missing one falls back silently. Every time
//! the output is exactly once. On both backends.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn job(out: &Path, ck: &Path, local: &Path, backend: &str, extra: &[&str]) -> Command {
    let mut c = keyed_sum_cmd(out, ck, 1_000_000, 50_000, "200ms", &["--set", "source.rate=400000"]);
    for d in [
        format!("state.backend.type={backend}"),
        "execution.checkpointing.incremental=true".into(),
        "execution.checkpointing.local-backup.enabled=true".into(),
        "execution.state-recovery.from-local=true".into(),
        format!("weir.state.local.dir={}", local.display()),
    ] {
        c.arg("-D").arg(d);
    }
    c.args(extra);
    c
}

/// Kill the job after its second new checkpoint; returns the stderr of a restore run of it.
fn kill_and_restore(out: &Path, ck: &Path, local: &Path, backend: &str, damage: impl FnOnce(&Path)) -> String {
    let job_dir = ck.join("keyed-sum");
    let before = latest_checkpoint(&job_dir);
    let mut child = spawn(&mut job(out, ck, local, backend, if before > 0 { &["--restore", "latest"] } else { &[] }));
    assert!(wait_for_checkpoint_after(&mut child, &job_dir, before + 2, Duration::from_secs(60)), "no checkpoints");
    kill9(&mut child);
    damage(local);
    let mut child = spawn(&mut job(out, ck, local, backend, &["--restore", "latest"]));
    let have = latest_checkpoint(&job_dir);
    assert!(wait_for_checkpoint_after(&mut child, &job_dir, have, Duration::from_secs(60)), "no progress after restore");
    kill9(&mut child);
    let mut s = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// (bytes read from local copies, bytes read from checkpoint storage) over the restore log lines.
fn restored_bytes(log: &str) -> (u64, u64) {
    let mut total = (0, 0);
    for l in log.lines().filter(|l| l.contains("bytes from local copies")) {
        let nums: Vec<u64> = l.split(['(', ' ']).filter_map(|w| w.parse().ok()).collect();
        // "... restored E entries in T ms (L bytes from local copies, R from checkpoint storage)"
        let n = nums.len();
        total.0 += nums[n - 2];
        total.1 += nums[n - 1];
    }
    total
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return v };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(files(&p));
        } else {
            v.push(p);
        }
    }
    v
}

fn local_recovery(backend: &str) {
    let tmp = TempDir::new(&format!("local-{backend}"));
    let out_ref = tmp.join("ref-out");
    run_ok(&mut keyed_sum_cmd(&out_ref, &tmp.join("ref-ck"), 1_000_000, 50_000, "200ms", &[]));
    let expected = committed_lines(&out_ref);
    let (out, ck, local) = (tmp.join("out"), tmp.join("ck"), tmp.join("local"));

    // 1. A verified local copy is what the restore reads.
    let log = kill_and_restore(&out, &ck, &local, backend, |_| {});
    let (l, r) = restored_bytes(&log);
    assert!(l > 0 && r == 0, "{backend}: restored {l} bytes locally, {r} remotely:\n{log}");

    // 2. Corrupt local copies are logged, never loaded: storage is read instead. (A byte is
    // appended, not flipped: the copies of two snapshots may be links to one file.)
    let log = kill_and_restore(&out, &ck, &local, backend, |local| {
        for f in files(local) {
            let mut b = std::fs::read(&f).unwrap();
            b.push(b'!');
            std::fs::write(&f, b).unwrap();
        }
    });
    assert!(log.contains("is corrupt") && log.contains("not loaded"), "{backend}: corruption is logged:\n{log}");
    let (l, r) = restored_bytes(&log);
    assert!(l == 0 && r > 0, "{backend}: restored {l} bytes locally, {r} remotely:\n{log}");

    // 3. No local copy at all (another host): storage, quietly.
    let log = kill_and_restore(&out, &ck, &local, backend, |local| std::fs::remove_dir_all(local).unwrap());
    let (l, r) = restored_bytes(&log);
    assert!(l == 0 && r > 0, "{backend}: restored {l} bytes locally, {r} remotely:\n{log}");

    let mut cmd = job(&out, &ck, &local, backend, &["--restore", "latest"]);
    run_ok(&mut cmd);
    assert_exactly_once(&expected, &committed_lines(&out));
}

#[test]
fn local_recovery_on_the_heap() {
    local_recovery("hashmap");
}

#[test]
fn local_recovery_on_rocksdb() {
    local_recovery("rocksdb");
}

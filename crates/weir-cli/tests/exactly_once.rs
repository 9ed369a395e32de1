//! End-to-end exactly-once: kill the `weir` process, corrupt checkpoints, change parallelism;
//! every time, the committed output must equal a failure-free run's (no loss, no duplicate).
//! The first four run on every state backend: the heap and RocksDB, each with full and with
//! incremental checkpoints (one module per test, one test per backend).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// The command: keyed sum of 2 M records over 100 k keys, 200 ms checkpoints.
fn keyed_sum(out: &Path, ck: &Path, extra: &[&str]) -> Command {
    keyed_sum_cmd(out, ck, 2_000_000, 100_000, "200ms", extra)
}

/// The keyed sum on state backend `backend` (`-D` pairs).
fn keyed_sum_on(backend: &[&str], out: &Path, ck: &Path, extra: &[&str]) -> Command {
    let mut c = keyed_sum(out, ck, extra);
    for d in backend {
        c.args(["-D", d]);
    }
    c
}

/// Run `$test(backend)` on every state backend.
macro_rules! on_every_backend {
    ($($test:ident),*) => {$(
        mod $test {
            #[test]
            fn hashmap() {
                super::$test(&["state.backend.type=hashmap"]);
            }
            #[test]
            fn hashmap_incremental() {
                super::$test(&["state.backend.type=hashmap", "execution.checkpointing.incremental=true"]);
            }
            #[test]
            fn rocksdb() {
                super::$test(&["state.backend.type=rocksdb"]);
            }
            #[test]
            fn rocksdb_incremental() {
                super::$test(&["state.backend.type=rocksdb", "execution.checkpointing.incremental=true"]);
            }
        }
    )*};
}

on_every_backend!(sigkill_at_twenty_random_moments_then_restore_latest, corrupt_latest_checkpoint_falls_back_to_previous, rescale_one_to_two_and_two_to_one, two_processes_one_killed);

fn reference(tmp: &TempDir) -> std::collections::BTreeMap<String, usize> {
    let out = tmp.join("ref-out");
    run_ok(&mut keyed_sum(&out, &tmp.join("ref-ck"), &[]));
    let lines = committed_lines(&out);
    assert_eq!(lines.values().sum::<usize>(), 2_000_000, "one line per record");
    lines
}

fn sigkill_at_twenty_random_moments_then_restore_latest(backend: &[&str]) {
    let tmp = TempDir::new(&format!("kill-{}", backend.join("-")));
    let keyed_sum = |out: &Path, ck: &Path, extra: &[&str]| keyed_sum_on(backend, out, ck, extra);
    let expected = reference(&tmp);
    let mut rng = Rng::from_env("sigkill");
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    // Slow the source so that 20 kills land mid-run, across many checkpoints.
    let rate = ["--set", "source.rate=300000"];
    for round in 0..20 {
        let mut cmd = keyed_sum(&out, &ck, &rate);
        if round > 0 {
            cmd.args(["--restore", "latest"]);
        }
        let mut child = spawn(&mut cmd);
        std::thread::sleep(Duration::from_millis(rng.range(50, 700)));
        kill9(&mut child);
    }
    let mut cmd = keyed_sum(&out, &ck, &["--restore", "latest"]);
    run_ok(&mut cmd);
    assert_exactly_once(&expected, &committed_lines(&out));
    let hidden = std::fs::read_dir(&out).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count();
    assert_eq!(hidden, 0, "a finished job leaves no pending transaction");
}

fn corrupt_latest_checkpoint_falls_back_to_previous(backend: &[&str]) {
    let tmp = TempDir::new(&format!("corrupt-{}", backend.join("-")));
    let keyed_sum = |out: &Path, ck: &Path, extra: &[&str]| keyed_sum_on(backend, out, ck, extra);
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let job_dir = ck.join("keyed-sum");
    for (round, damage) in ["flip", "truncate"].into_iter().enumerate() {
        let mut cmd = keyed_sum(&out, &ck, &["--set", "source.rate=1000000"]);
        if round > 0 {
            cmd.args(["--restore", "latest"]);
        }
        let mut child = spawn(&mut cmd);
        // Two new checkpoints, so that the one before the corrupt one is also of this round.
        let before = latest_checkpoint(&job_dir);
        assert!(wait_for_checkpoint_after(&mut child, &job_dir, before + 1, Duration::from_secs(60)), "no checkpoints");
        kill9(&mut child);
        let ids = completed_checkpoints(&job_dir);
        let latest = *ids.last().unwrap();
        // Its largest own file (a RocksDB checkpoint also holds empty ones).
        let state = written_by(&job_dir, latest).iter().map(|p| job_dir.join(p)).max_by_key(|p| std::fs::metadata(p).unwrap().len()).expect("the checkpoint wrote a state file");
        let mut bytes = std::fs::read(&state).unwrap();
        match damage {
            "flip" => {
                let at = bytes.len() / 2;
                bytes[at] ^= 0x04;
            }
            _ => bytes.truncate(bytes.len() - 100),
        }
        std::fs::write(&state, bytes).unwrap();
        let mut child = spawn(&mut keyed_sum(&out, &ck, &["--restore", "latest", "--set", "source.rate=1000000"]));
        assert!(wait_for_checkpoint_after(&mut child, &job_dir, latest, Duration::from_secs(60)), "no progress after restore");
        kill9(&mut child);
        let stderr = {
            use std::io::Read;
            let mut s = String::new();
            child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
            s
        };
        let name = state.file_name().unwrap().to_string_lossy().into_owned();
        assert!(stderr.contains(&name), "the error names the corrupt file {name}:\n{stderr}");
        assert!(
            stderr.contains(&format!("restoring keyed-sum from checkpoint {}", ids[ids.len() - 2])),
            "restores the previous checkpoint:\n{stderr}"
        );
    }
    run_ok(&mut keyed_sum(&out, &ck, &["--restore", "latest"]));
    assert_exactly_once(&expected, &committed_lines(&out));
}

fn rescale_one_to_two_and_two_to_one(backend: &[&str]) {
    let tmp = TempDir::new(&format!("rescale-{}", backend.join("-")));
    let keyed_sum = |out: &Path, ck: &Path, extra: &[&str]| keyed_sum_on(backend, out, ck, extra);
    let expected = reference(&tmp);
    for (from, to) in [(1, 2), (2, 1)] {
        let out = tmp.join(&format!("out-{from}-{to}"));
        let ck = tmp.join(&format!("ck-{from}-{to}"));
        let par = |p: u32| format!("parallelism.default={p}");
        let mut child = spawn(&mut keyed_sum(&out, &ck, &["-D", &par(from), "--set", "source.rate=1000000"]));
        assert!(wait_for_checkpoint_after(&mut child, &ck.join("keyed-sum"), 1, Duration::from_secs(60)));
        kill9(&mut child);
        let out_run = run_ok(&mut keyed_sum(&out, &ck, &["-D", &par(to), "--restore", "latest"]));
        let log = String::from_utf8_lossy(&out_run.stderr);
        assert!(log.contains(&format!("(parallelism {from} → {to})")), "{log}");
        assert_exactly_once(&expected, &committed_lines(&out));
    }
}

fn two_processes_one_killed(backend: &[&str]) {
    let tmp = TempDir::new(&format!("cluster-{}", backend.join("-")));
    let keyed_sum = |out: &Path, ck: &Path, extra: &[&str]| keyed_sum_on(backend, out, ck, extra);
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let mut rng = Rng::from_env("cluster");
    let job_dir = ck.join("keyed-sum");
    let cluster = |restore: bool| {
        spawn_cluster(&tmp.0, 2, |_| {
            let mut c = keyed_sum(&out, &ck, &["-D", "restart-strategy.type=none", "--set", "source.rate=1000000"]);
            if restore {
                c.args(["--restore", "latest"]);
            }
            c
        })
    };
    for round in 0..2 {
        let mut procs = cluster(round > 0);
        let have = latest_checkpoint(&job_dir);
        assert!(wait_for_checkpoint_after(&mut procs[0], &job_dir, have, Duration::from_secs(60)), "cluster checkpoints");
        std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
        let victim = rng.range(0, 2) as usize;
        kill9(&mut procs[victim]);
        let other = 1 - victim;
        // The survivor fails fast (no partial failover in timely); never let it hang the test.
        let ok = wait_success(&mut procs[other], Duration::from_secs(20));
        assert!(!ok, "the surviving process must fail when its peer dies");
    }
    let mut procs = cluster(true);
    for p in procs.iter_mut() {
        assert!(wait_success(p, Duration::from_secs(120)), "restored cluster run failed");
    }
    assert_exactly_once(&expected, &committed_lines(&out));
}

/// The state files checkpoint `id` wrote itself (not those of earlier checkpoints it lists),
/// relative to the job directory, from its `_metadata`.
fn written_by(job_dir: &Path, id: u64) -> Vec<String> {
    let text = std::fs::read_to_string(job_dir.join(format!("chk-{id}/_metadata"))).unwrap();
    let body = &text[..text.rfind("\ncrc32c:").expect("checksum trailer")];
    let meta: serde_json::Value = serde_json::from_str(body).unwrap();
    let mut files = Vec::new();
    for sub in meta["subtasks"].as_array().unwrap() {
        for f in sub[1]["state_files"].as_array().unwrap() {
            let path = f["path"].as_str().unwrap();
            if path.starts_with(&format!("chk-{id}/")) || path.starts_with(&format!("shared/chk{id}-")) {
                files.push(path.to_string());
            }
        }
    }
    files
}

fn sigterm(child: &std::process::Child) {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM");
}

#[test]
fn cancel_retains_or_deletes_checkpoints_per_policy() {
    let tmp = TempDir::new("cancel");
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let job_dir = ck.join("keyed-sum");
    // RETAIN_ON_CANCELLATION (the default): the checkpoints stay and the job resumes from them.
    let mut child = spawn(&mut keyed_sum(&out, &ck, &["--set", "source.rate=1000000"]));
    assert!(wait_for_checkpoint_after(&mut child, &job_dir, 1, Duration::from_secs(60)));
    sigterm(&child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "a cancelled job exits with 130");
    assert!(!completed_checkpoints(&job_dir).is_empty(), "checkpoints retained on cancel");
    let log = run_ok(&mut keyed_sum(&out, &ck, &["--restore", "latest"]));
    assert!(String::from_utf8_lossy(&log.stderr).contains("restoring keyed-sum from checkpoint"));
    assert_exactly_once(&expected, &committed_lines(&out));

    // DELETE_ON_CANCELLATION: nothing is left to restore.
    let (out2, ck2) = (tmp.join("out2"), tmp.join("ck2"));
    let job_dir2 = ck2.join("keyed-sum");
    let policy = "execution.checkpointing.externalized-checkpoint-retention=DELETE_ON_CANCELLATION";
    let mut child = spawn(&mut keyed_sum(&out2, &ck2, &["--set", "source.rate=1000000", "-D", policy]));
    assert!(wait_for_checkpoint_after(&mut child, &job_dir2, 1, Duration::from_secs(60)));
    sigterm(&child);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(completed_checkpoints(&job_dir2).is_empty(), "checkpoints deleted on cancel");
}

/// A GPU operator with batches in flight when the process dies: blobs → `gemm` (asynchronous,
/// up to 3 batches in flight through a ring of 2 slots) → 2PC file sink. SIGKILL after two
/// checkpoints, restore: the output equals a failure-free run's.
#[test]
fn sigkill_with_gpu_batches_in_flight() {
    let tmp = TempDir::new("gpu-kill");
    let job = tmp.join("project.yaml");
    std::fs::write(
        &job,
        "name: gpu-project\n\
         config: {parallelism.default: 2, weir.gpu.batch.max-records: 256, weir.gpu.max-inflight-batches: 3, weir.gpu.transfer.ring-size: 2}\n\
         source: {type: blobs, count: 600000, centers: 4, dim: 16, sigma: 1.0, keys: 4, seed: 9}\n\
         pipeline:\n  - gemm: {field: point, input: 16, output: 4, seed: 2}\n\
         sink: {type: file, path: unused}\n",
    )
    .unwrap();
    let run = |out: &Path, ck: &Path, extra: &[&str]| {
        let mut c = weir();
        c.arg("run").arg(&job).arg("--set").arg(format!("sink.path={}", out.display()));
        c.arg("-D").arg(format!("execution.checkpointing.dir={}", ck.display()));
        c.args(["-D", "execution.checkpointing.interval=100ms"]).args(extra);
        c
    };
    run_ok(&mut run(&tmp.join("ref-out"), &tmp.join("ref-ck"), &[]));
    let expected = committed_lines(&tmp.join("ref-out"));
    assert_eq!(expected.values().sum::<usize>(), 600_000, "one line per point");
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let job_dir = ck.join("gpu-project");
    let mut child = spawn(&mut run(&out, &ck, &[]));
    let killed_mid_run = wait_for_checkpoint_after(&mut child, &job_dir, 2, Duration::from_secs(60));
    kill9(&mut child);
    assert!(killed_mid_run, "the job ended before its third checkpoint: nothing was in flight to lose");
    let partial = committed_lines(&out).values().sum::<usize>();
    eprintln!("killed with {partial} of 600000 lines committed");
    assert!(partial < 600_000, "killed mid-run: {partial} lines committed");
    run_ok(&mut run(&out, &ck, &["--restore", "latest"]));
    assert_exactly_once(&expected, &committed_lines(&out));
}

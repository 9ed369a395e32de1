//! Recovery of the `kmeans` operator's device-resident models, end to end: SIGKILL on the GPU
//! path, a checkpoint of one path restored on the other, a restore at another parallelism, the
//! incremental chain of full and delta files (and a corrupt delta), and an operator panic that
//! restores from the VRAM tier inside the process.
//!
//! The oracle needs no reference run: every output row is `key, centroid, count, vector`, and
//! after every batch a key's `k` rows count the points its model absorbed so far. So, reading the
//! committed files in epoch order, each key's totals must strictly grow (an update applied twice
//! or output committed twice would repeat or lower a total), and the last one must equal the
//! key's number of points in the source (an update lost or doubled would miss it).

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use common::*;
use weir::source::{Poll, Source, SourceContext};
use weir_storage::CheckpointStorage;

/// Job name of `examples/kmeans.yaml`: its checkpoints live in `<ck>/kmeans`.
const JOB: &str = "kmeans";
/// Blob points in all: a few seconds of work on lavapipe with 512-record source batches.
const POINTS: u64 = 3_000_000;
const KEYS: u64 = 3;
const SEED: u64 = 42;
/// Centroids per model (the example's `k`).
const K: usize = 16;

/// Which path of the kernels runs the models.
#[derive(Clone, Copy, Debug)]
enum KernelPath {
    Gpu,
    Cpu,
}

impl KernelPath {
    fn flag(self) -> &'static str {
        match self {
            KernelPath::Gpu => "weir.gpu.enabled=true",
            KernelPath::Cpu => "weir.gpu.enabled=false",
        }
    }
}

/// `weir run examples/kmeans.yaml` over [`POINTS`] blob points of [`KEYS`] keys into `out`,
/// checkpoints in `ck` every 250 ms; `extra` arguments come last (they win).
fn kmeans(out: &Path, ck: &Path, path: KernelPath, extra: &[&str]) -> Command {
    let mut c = weir();
    c.args(["run", "examples/kmeans.yaml"]);
    for set in [format!("source.count={POINTS}"), format!("source.keys={KEYS}"), format!("source.seed={SEED}"), format!("sink.path={}", out.display())] {
        c.arg("--set").arg(set);
    }
    c.arg("-D").arg(format!("execution.checkpointing.dir={}", ck.display()));
    c.args([
        "-D",
        "execution.checkpointing.interval=250ms",
        "-D",
        "weir.source.batch-size=512",
        "-D",
        "restart-strategy.fixed-delay.delay=100ms",
        "-D",
        path.flag(),
    ]);
    c.args(extra);
    c
}

/// The blob source's splits (`BLOB_SPLITS` in crates/weir/src/connectors/blobs.rs).
const BLOB_SPLITS: u64 = 16;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Points per key of `BlobSource { count, keys, seed }`: record `i` of split `j` belongs to key
/// `splitmix64(seed · φ ^ j << 44 ^ i) mod keys` (crates/weir/src/connectors/blobs.rs), computed
/// here without generating the vectors.
fn blob_points_per_key(count: u64, keys: u64, seed: u64) -> BTreeMap<i64, u64> {
    let mut per_key = BTreeMap::new();
    for j in 0..BLOB_SPLITS {
        let len = count / BLOB_SPLITS + u64::from(j < count % BLOB_SPLITS);
        for i in 0..len {
            let h = splitmix64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (j << 44) ^ i);
            *per_key.entry((h % keys) as i64).or_insert(0) += 1;
        }
    }
    per_key
}

fn expected_counts() -> BTreeMap<i64, u64> {
    blob_points_per_key(POINTS, KEYS, SEED)
}

/// The oracle above agrees with the source itself (read through weir's public `Source` API).
#[test]
fn points_per_key_oracle_matches_the_blob_source() {
    let (count, keys, seed) = (20_000, 5, SEED);
    let blobs = weir::source::BlobSource { count, centers: 4, dim: 2, sigma: 1.0, keys, seed };
    let ctx = SourceContext { subtask: 0, parallelism: 1, max_line_bytes: 1 << 20 };
    let mut reader = blobs.open(&ctx, blobs.splits().unwrap()).unwrap();
    let mut rows = Vec::new();
    while reader.poll(&mut rows, 4096).unwrap() != Poll::Finished {}
    let mut read: BTreeMap<i64, u64> = BTreeMap::new();
    for r in &rows {
        let weir::Value::Int(k) = r.get(0) else { panic!("blob key is not an int: {r:?}") };
        *read.entry(*k).or_insert(0) += 1;
    }
    assert_eq!(rows.len() as u64, count);
    assert_eq!(read, blob_points_per_key(count, keys, seed));
}

/// Read a sink directory's committed models in commit order (epoch, then subtask; lines in file
/// order) and check them: rows come in whole models (centroids `0..k` in order, one file), a key
/// appears in one subtask's file per epoch, and each key's total strictly grows. Returns each
/// key's last total.
fn committed_totals(out: &Path, k: usize) -> BTreeMap<i64, u64> {
    let mut files: Vec<(u64, u32, PathBuf)> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let (s, ep) = name.strip_prefix("part-")?.split_once('-')?;
            Some((ep.parse().ok()?, s.parse().ok()?, e.path()))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no committed output in {}", out.display());
    // Per key: last total, the (epoch, subtask) of its last model, the model being read.
    let mut keys: BTreeMap<i64, (u64, (u64, u32), Vec<u64>)> = BTreeMap::new();
    for (epoch, sub, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let at = format!("{}:{}", path.display(), n + 1);
            let mut f = line.splitn(4, ',');
            let mut num = |what: &str| -> u64 {
                f.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{at}: no {what} in {line:?}"))
            };
            let (key, c, count) = (num("key") as i64, num("centroid") as usize, num("count"));
            let (total, file, model) = keys.entry(key).or_insert((0, (0, 0), Vec::new()));
            assert_eq!(c, model.len(), "{at}: centroid {c} of key {key} out of order");
            if c == 0 {
                assert!(file.0 < *epoch || *file == (*epoch, *sub), "{at}: key {key} in two subtasks' files of epoch {epoch}");
                *file = (*epoch, *sub);
            }
            model.push(count);
            if model.len() == k {
                let t: u64 = model.drain(..).sum();
                assert!(
                    t > *total,
                    "{at}: key {key}'s model counts {t} points after one that counted {total}: an update applied twice, output committed twice, or state restored older than the output"
                );
                *total = t;
            }
        }
        for (key, (_, _, model)) in &keys {
            assert!(model.is_empty(), "{}: key {key}'s last model is cut off after {} centroid(s)", path.display(), model.len());
        }
    }
    keys.into_iter().map(|(key, (total, ..))| (key, total)).collect()
}

/// The output check itself catches an epoch committed twice and a lost update.
#[test]
fn the_output_check_catches_replayed_output_and_lost_updates() {
    let tmp = TempDir::new("gpu-state-oracle");
    let model = |key: u64, counts: [u64; 2]| -> String { counts.iter().enumerate().map(|(c, n)| format!("{key},{c},{n},\"0.5,1\"\n")).collect() };
    let write = |dir: &Path, files: &[(&str, String)]| {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    };
    let good = tmp.join("good");
    write(&good, &[("part-00000-000000000001", model(7, [3, 4]) + &model(7, [5, 6])), ("part-00001-000000000002", model(7, [8, 9]))]);
    assert_eq!(committed_totals(&good, 2), BTreeMap::from([(7, 17)]));
    // Epoch 1's output again under a later epoch: the totals go back.
    let replayed = tmp.join("replayed");
    write(&replayed, &[("part-00000-000000000001", model(7, [3, 4])), ("part-00000-000000000002", model(7, [3, 4]))]);
    assert!(std::panic::catch_unwind(|| committed_totals(&replayed, 2)).is_err(), "a replayed epoch passes the check");
    // A model cut off, or a key in two subtasks' files of one epoch.
    let cut = tmp.join("cut");
    write(&cut, &[("part-00000-000000000001", model(7, [3, 4])[..12].to_string())]);
    assert!(std::panic::catch_unwind(|| committed_totals(&cut, 2)).is_err(), "a cut-off model passes the check");
    let split = tmp.join("split");
    write(&split, &[("part-00000-000000000001", model(7, [3, 4])), ("part-00001-000000000001", model(7, [5, 6]))]);
    assert!(std::panic::catch_unwind(|| committed_totals(&split, 2)).is_err(), "a key in two subtasks of one epoch passes the check");
    // A lost update: the last model counts fewer points than the source has.
    assert!(std::panic::catch_unwind(|| assert_exact_counts(&good, &BTreeMap::from([(7, 18)]), 2)).is_err());
}

/// The job ended exactly once: every key's last committed model counts exactly its points, and
/// no transaction is left pending.
fn assert_exact_counts(out: &Path, expected: &BTreeMap<i64, u64>, k: usize) {
    let got = committed_totals(out, k);
    assert_eq!(&got, expected, "each key's last committed model must count exactly that key's points (left: committed, right: source)");
    let hidden: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".part-"))
        .collect();
    assert!(hidden.is_empty(), "a finished job leaves no pending transaction: {hidden:?}");
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut s).unwrap();
    }
    s
}

fn log_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether checkpoint `id` lists, for every subtask holding models, a full file and deltas.
fn lists_deltas(job_dir: &Path, id: u64) -> bool {
    let chains = listed_state_files(job_dir, id);
    !chains.is_empty() && chains.values().all(|files| files.len() >= 2)
}

/// Run `cmd(restore)` (fresh first, then restoring `latest`) until the latest completed
/// checkpoint lists a full file and deltas, then SIGKILL, so that the next restore must apply
/// deltas. A restart writes a full file first, so this takes one run or a few. Returns the id.
fn kill_when_the_latest_lists_deltas(job_dir: &Path, mut cmd: impl FnMut(bool) -> Command) -> u64 {
    for run in 0..5 {
        let mut child = spawn(&mut cmd(run > 0));
        while wait_for_checkpoint_after(&mut child, job_dir, latest_checkpoint(job_dir), Duration::from_secs(60)) {
            if lists_deltas(job_dir, latest_checkpoint(job_dir)) {
                break;
            }
        }
        let running = child.try_wait().unwrap().is_none();
        kill9(&mut child);
        assert!(running, "the job ended before a checkpoint listed deltas:\n{}", stderr_of(&mut child));
        let latest = latest_checkpoint(job_dir);
        if lists_deltas(job_dir, latest) {
            return latest;
        }
    }
    panic!("no checkpoint of {} listed deltas in 5 runs", job_dir.display());
}

/// 1. SIGKILL at eight random moments of a GPU-path run, each restart restoring `latest`, then
///    run to the end.
#[test]
fn sigkill_on_the_gpu_path_at_eight_random_moments() {
    let tmp = TempDir::new("gpu-state-kill");
    let expected = expected_counts();
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let mut rng = Rng::from_env("gpu_state_kill");
    let mut cut_mid_run = 0;
    for round in 0..8 {
        let mut cmd = kmeans(&out, &ck, KernelPath::Gpu, &[]);
        if round > 0 {
            cmd.args(["--restore", "latest"]);
        }
        let mut child = spawn(&mut cmd);
        std::thread::sleep(Duration::from_millis(rng.range(300, 1000)));
        cut_mid_run += usize::from(child.try_wait().unwrap().is_none());
        kill9(&mut child);
    }
    assert!(latest_checkpoint(&ck.join(JOB)) > 0, "no checkpoint completed before the kills");
    assert!(cut_mid_run >= 4, "only {cut_mid_run} of 8 kills hit a running job");
    let done = run_ok(&mut kmeans(&out, &ck, KernelPath::Gpu, &["--restore", "latest"]));
    assert!(log_of(&done).contains("restoring kmeans from checkpoint"), "{}", log_of(&done));
    assert_exact_counts(&out, &expected, K);
}

/// 2. A checkpoint of the GPU path (a full file and deltas) restored on the CPU path, and the
///    reverse.
#[test]
fn a_checkpoint_of_one_path_restores_on_the_other() {
    let tmp = TempDir::new("gpu-state-cross");
    let expected = expected_counts();
    for (first, then) in [(KernelPath::Gpu, KernelPath::Cpu), (KernelPath::Cpu, KernelPath::Gpu)] {
        let (out, ck) = (tmp.join(&format!("out-{first:?}")), tmp.join(&format!("ck-{first:?}")));
        let latest = kill_when_the_latest_lists_deltas(&ck.join(JOB), |restore| {
            let mut c = kmeans(&out, &ck, first, &[]);
            if restore {
                c.args(["--restore", "latest"]);
            }
            c
        });
        let done = run_ok(&mut kmeans(&out, &ck, then, &["--restore", "latest"]));
        let log = log_of(&done);
        assert!(log.contains(&format!("restoring kmeans from checkpoint {latest} ")), "{first:?} → {then:?}: {log}");
        assert!(log.contains("from storage ("), "{first:?} → {then:?}: the models are read from the files:\n{log}");
        assert_exact_counts(&out, &expected, K);
    }
}

/// 3. Killed at parallelism 2 on the GPU path (the latest checkpoint lists deltas), restored
///    at parallelism 3.
#[test]
fn rescale_from_two_to_three_on_the_gpu_path() {
    let tmp = TempDir::new("gpu-state-rescale");
    let expected = expected_counts();
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let latest = kill_when_the_latest_lists_deltas(&ck.join(JOB), |restore| {
        let mut c = kmeans(&out, &ck, KernelPath::Gpu, &["-D", "parallelism.default=2"]);
        if restore {
            c.args(["--restore", "latest"]);
        }
        c
    });
    let done = run_ok(&mut kmeans(&out, &ck, KernelPath::Gpu, &["-D", "parallelism.default=3", "--restore", "latest"]));
    let log = log_of(&done);
    assert!(log.contains(&format!("restoring kmeans from checkpoint {latest} (parallelism 2 → 3)")), "{log}");
    assert!(log.contains("from storage ("), "{log}");
    assert_exact_counts(&out, &expected, K);
}

/// The files a checkpoint lists for the kmeans models, per subtask, in chain order.
fn listed_state_files(job_dir: &Path, id: u64) -> BTreeMap<String, Vec<(String, u64)>> {
    let base = job_dir.parent().unwrap().to_str().unwrap();
    let storage = CheckpointStorage::open(base, JOB).unwrap();
    let meta = storage.load_metadata(id).unwrap();
    let mut per_task = BTreeMap::new();
    for (task, sub) in &meta.subtasks {
        let files: Vec<(String, u64)> = sub.state_files.iter().filter(|f| f.state == "kmeans-models").map(|f| (f.path.clone(), f.size)).collect();
        if !files.is_empty() {
            per_task.insert(task.to_string(), files);
        }
    }
    per_task
}

/// JSON lines of `n` points of key `key` in 2 dimensions around `(key, -key)`.
fn json_points(key: u64, n: u64, rng: &mut Rng) -> String {
    (0..n)
        .map(|_| {
            let x = key as f64 + (rng.range(0, 2000) as f64 - 1000.0) / 500.0;
            let y = -(key as f64) + (rng.range(0, 2000) as f64 - 1000.0) / 500.0;
            format!("{{\"key\": {key}, \"point\": [{x}, {y}]}}\n")
        })
        .collect()
}

/// 4. The incremental chain: the latest checkpoint lists a full file and deltas, and while only
///    one key changes the deltas are much smaller than the full file. A corrupt delta of the
///    latest checkpoint is never loaded: the restore falls back to the checkpoint before it, and
///    the output stays exactly once with exact counts.
#[test]
fn incremental_chain_and_a_corrupt_delta() {
    let tmp = TempDir::new("gpu-state-chain");
    let mut rng = Rng::from_env("gpu_state_chain");
    let (input, out, ck) = (tmp.join("in"), tmp.join("out"), tmp.join("ck"));
    let job_dir = ck.join(JOB);
    std::fs::create_dir_all(&input).unwrap();
    let job = tmp.join("kmeans-file.yaml");
    std::fs::write(
        &job,
        format!(
            "name: {JOB}\n\
             config: {{parallelism.default: 2, weir.gpu.enabled: true, execution.checkpointing.interval: 100ms, \
             execution.checkpointing.num-retained: 10, weir.gpu.state.full-every: 4, weir.source.batch-size: 256, \
             weir.source.max-inflight-batches: 1}}\n\
             source: {{type: file, path: {}, format: json, fields: [key, point]}}\n\
             pipeline:\n  - key_by: key\n  - kmeans: {{field: point, k: 4}}\n\
             sink: {{type: file, path: {}}}\n",
            input.display(),
            out.display()
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut c = weir();
        c.arg("run").arg(&job).arg("-D").arg(format!("execution.checkpointing.dir={}", ck.display())).args(extra);
        // Each launch waits a little, so that the second run spans many checkpoints.
        c.env("FAILPOINTS", "kmeans-flush=sleep(4)");
        c
    };
    // First run: 24 keys, enough points each to seed their models (4 · 32), to the end.
    let mut expected: BTreeMap<i64, u64> = (0..24).map(|key| (key, 200)).collect();
    let seeding: String = (0..24u64).map(|key| json_points(key, 200, &mut rng)).collect();
    std::fs::write(input.join("a-all-keys.jsonl"), seeding).unwrap();
    run_ok(&mut run(&[]));
    // Second run, restored: a new file of key 0 alone, so every later snapshot has one dirty key.
    const TAIL: u64 = 60_000;
    std::fs::write(input.join("b-key-0.jsonl"), json_points(0, TAIL, &mut rng)).unwrap();
    *expected.get_mut(&0).unwrap() += TAIL;
    // Kill once the latest checkpoint lists deltas (a restart writes a full file first).
    let latest = kill_when_the_latest_lists_deltas(&job_dir, |_| run(&["--restore", "latest"]));
    let chains = listed_state_files(&job_dir, latest);
    assert_eq!(chains.len(), 2, "both subtasks hold models: {chains:?}");
    for (task, files) in &chains {
        let (full, deltas) = files.split_first().unwrap();
        assert!(full.0.starts_with("shared/") && full.0.ends_with("-full.state"), "{task}: the chain starts with a full file: {files:?}");
        for d in deltas {
            assert!(d.0.starts_with("shared/") && d.0.ends_with("-delta.state"), "{task}: then deltas: {files:?}");
            assert!(d.1 * 2 < full.1, "{task}: a delta of one dirty key ({} bytes) is much smaller than the full file ({} bytes)", d.1, full.1);
        }
        for (path, size) in files {
            assert_eq!(std::fs::metadata(job_dir.join(path)).unwrap().len(), *size, "{path}");
        }
    }
    // Flip a byte of the delta the latest checkpoint wrote (listed by no older checkpoint).
    let (_, files) = chains.iter().next().unwrap();
    let delta = job_dir.join(&files.last().unwrap().0);
    let mut bytes = std::fs::read(&delta).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&delta, bytes).unwrap();
    let older = completed_checkpoints(&job_dir).into_iter().filter(|&i| i < latest).max().expect("a checkpoint before the latest");
    let done = run_ok(&mut run(&["--restore", "latest"]));
    let log = log_of(&done);
    let name = delta.file_name().unwrap().to_string_lossy().into_owned();
    assert!(log.contains(&name), "the corrupt delta {name} is named:\n{log}");
    assert!(log.contains(&format!("restoring {JOB} from checkpoint {older} ")), "falls back to checkpoint {older}:\n{log}");
    assert_exact_counts(&out, &expected, 4);
}

/// 5. An operator panic (the 41st launch) under the fixed-delay restart strategy: the job
///    recovers inside the process, from the VRAM tier by default and from storage with
///    `snapshot-tier: host`; the counts are exact either way.
#[test]
fn an_operator_panic_restores_from_the_vram_tier() {
    let tmp = TempDir::new("gpu-state-vram");
    let expected = expected_counts();
    for tier in ["vram", "host"] {
        let (out, ck) = (tmp.join(&format!("out-{tier}")), tmp.join(&format!("ck-{tier}")));
        let tier_flag = format!("weir.gpu.state.snapshot-tier={tier}");
        let done = kmeans(&out, &ck, KernelPath::Gpu, &["-D", &tier_flag, "-D", "restart-strategy.type=fixed-delay"])
            .env("FAILPOINTS", "kmeans-flush=40*off->1*panic")
            .output()
            .unwrap();
        let log = log_of(&done);
        assert!(done.status.success(), "{tier}: {log}");
        assert!(log.contains("restart 1"), "{tier}: the operator panicked and the job restarted:\n{log}");
        if tier == "vram" {
            assert!(log.contains("from the VRAM tier"), "{tier}:\n{log}");
        } else {
            assert!(log.contains("from storage ("), "{tier}:\n{log}");
            assert!(!log.contains("VRAM tier"), "{tier}:\n{log}");
        }
        assert_exact_counts(&out, &expected, K);
    }
}

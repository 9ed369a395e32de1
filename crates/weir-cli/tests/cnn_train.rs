//! `cnn_train` end to end (examples/digits_train.yaml): the exported model classifies the
//! held-out digits with cnn_infer at 95 % or better on both paths; killed at random moments and
//! restored each time, the job never leaves a half-written model, its report rows are exactly
//! once and the same as an undisturbed run's, and so is its model; bad settings are refused
//! before the job starts, a bad row ends it naming the key.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use weir_gpu::cnn::SmallCnn;
use weir_gpu::kernels::cpu::CpuKernels;
use weir_gpu::kernels::Kernels;

const JOB: &str = "digits_train";
/// Samples a window closes at (`report_every: 1440`, 45 mini-batches of 32).
const WINDOW: u64 = 1440;
/// Samples trained in a run of the example: every full mini-batch of 10 passes over 1,438 digits.
const TRAINED: u64 = 1438 * 10 / 32 * 32;

/// `weir run examples/digits_train.yaml` on the path `gpu` with everything under `dir`.
fn train_cmd(dir: &Path, gpu: &str) -> Command {
    let mut c = weir();
    c.args(["run", "examples/digits_train.yaml", "-D", &format!("weir.gpu.enabled={gpu}")])
        .arg("-D")
        .arg(format!("execution.checkpointing.dir={}", dir.join("ck").display()))
        .arg("--set")
        .arg(format!("sink.path={}", dir.join("out").display()))
        .arg("--set")
        .arg(format!("pipeline.1.cnn_train.export={}", dir.join("models/digits-{key}.safetensors").display()));
    c
}

fn model_path(dir: &Path) -> PathBuf {
    dir.join("models/digits-acme.safetensors")
}

/// Held-out accuracy of the model at `model`, classified by the `cnn_infer` job
/// (examples/digits.yaml) on the path `gpu`.
fn cnn_infer_accuracy(model: &Path, gpu: &str, dir: &Path) -> f64 {
    let out = dir.join(format!("infer-{gpu}"));
    run_ok(weir()
        .args(["run", "examples/digits.yaml", "-D", &format!("weir.gpu.enabled={gpu}")])
        .arg("-D")
        .arg(format!("execution.checkpointing.dir={}", dir.join("ck-infer").display()))
        .arg("--set")
        .arg(format!("sink.path={}", out.display()))
        .arg("--set")
        .arg(format!("pipeline.0.cnn_infer.model={}", model.display())));
    let lines = committed_lines(&out);
    let total: usize = lines.values().sum();
    let right: usize = lines.iter().filter(|(l, _)| l.split_once(',').is_some_and(|(a, b)| a == b)).map(|(_, n)| n).sum();
    assert_eq!(total, 359, "every held-out image classified once");
    right as f64 / total as f64
}

/// Held-out accuracy of `model` by SmallCnn inference on the CPU.
fn accuracy(model: &SmallCnn) -> f64 {
    let text = std::fs::read_to_string(repo_root().join("models/digits_test.jsonl")).unwrap();
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        labels.push(v["label"].as_u64().unwrap() as usize);
        pixels.extend(v["pixels"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32));
    }
    let logits = CpuKernels::new(1).cnn_forward(model, &pixels, labels.len()).unwrap();
    let hits = weir_gpu::cnn::argmax(&logits, 10).iter().zip(&labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len() as f64
}

/// The safetensors header's metadata.
fn metadata(path: &Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_value(header["__metadata__"].clone()).unwrap()
}

/// The committed report rows `(key, samples, loss, accuracy)`, by key and samples (a duplicate
/// stays).
fn reports(out: &Path) -> Vec<(String, u64, String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    let mut rows = Vec::new();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let v: Vec<&str> = line.split(',').collect();
            assert_eq!(v.len(), 4, "{}: {line}", f.display());
            rows.push((v[0].to_string(), v[1].parse().unwrap(), v[2].to_string(), v[3].to_string()));
        }
    }
    rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    rows
}

#[test]
fn the_exported_model_classifies_held_out_digits_on_both_paths() {
    let tmp = TempDir::new("cnn-train-example");
    for gpu in ["false", "true"] {
        let dir = tmp.join(gpu);
        run_ok(&mut train_cmd(&dir, gpu));
        let rows = reports(&dir.join("out"));
        let samples: Vec<u64> = rows.iter().map(|r| r.1).collect();
        assert_eq!(samples, (1..=TRAINED / WINDOW).map(|k| k * WINDOW).collect::<Vec<_>>(), "gpu={gpu}: a report every {WINDOW} samples");
        let meta = metadata(&model_path(&dir));
        assert_eq!(meta["trained_samples"], TRAINED.to_string(), "gpu={gpu}: the model of the final checkpoint: {meta:?}");
        // Scored on both paths: the file is a model cnn_infer loads like the offline one.
        for infer in ["false", "true"] {
            let acc = cnn_infer_accuracy(&model_path(&dir), infer, &dir);
            assert!(acc >= 0.95, "trained with weir.gpu.enabled={gpu}, classified with {infer}: held-out accuracy {acc}");
        }
    }
}

/// Start `cmd` with its log in `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap()).spawn().unwrap()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// After a kill: the model file is absent, or a whole model of a completed checkpoint.
fn check_model_after_kill(dir: &Path, round: usize) {
    let path = model_path(dir);
    if !path.exists() {
        return;
    }
    let model = SmallCnn::load(&path, 8, 8).unwrap_or_else(|e| panic!("after kill {round}: {} is no whole model: {e}", path.display()));
    assert_eq!((model.conv_c, model.classes), (8, 10));
    let checkpoint: u64 = metadata(&path)["checkpoint"].parse().unwrap();
    let latest = latest_checkpoint(&dir.join("ck").join(JOB));
    assert!(checkpoint <= latest, "after kill {round}: the model of checkpoint {checkpoint}, newer than the latest completed one, {latest}");
}

#[test]
fn killed_at_random_moments_the_model_file_is_whole_and_the_reports_exactly_once() {
    let tmp = TempDir::new("cnn-train-kill");
    let mut rng = Rng::from_env("cnn_train kill");
    for gpu in ["false", "true"] {
        // The same job undisturbed: mini-batches do not depend on how the source batches rows
        // (the rest of a key's samples waits in its state), so neither do the steps.
        let clean = tmp.join(&format!("clean-{gpu}"));
        run_ok(&mut train_cmd(&clean, gpu));
        let want = reports(&clean.join("out"));

        // Slowed down: a source batch of 512 rows per 100 ms checkpoint (about 3 s a run).
        let dir = tmp.join(&format!("killed-{gpu}"));
        let slow = |restore: bool| {
            let mut c = train_cmd(&dir, gpu);
            c.args(["-D", "execution.checkpointing.interval=100ms", "-D", "weir.source.batch-size=512", "-D", "weir.source.max-inflight-batches=1"]);
            if restore {
                c.args(["--restore", "latest"]);
            }
            c
        };
        let job_dir = dir.join("ck").join(JOB);
        let mut kills = 0;
        for round in 0..5 {
            let log = dir.join(format!("run-{round}.log"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut child = spawn_logged(&mut slow(round > 0), &log);
            let before = latest_checkpoint(&job_dir);
            // Progress first (a new checkpoint), then a random moment within the next ones.
            if !wait_for_checkpoint_after(&mut child, &job_dir, before, Duration::from_secs(60)) {
                assert!(wait_success(&mut child, Duration::from_secs(60)), "gpu={gpu} round {round}:\n{}", log_tail(&log));
                break;
            }
            std::thread::sleep(Duration::from_millis(rng.range(0, 250)));
            kill9(&mut child);
            kills += 1;
            check_model_after_kill(&dir, round);
        }
        assert!(kills >= 3, "gpu={gpu}: the job ended before it was killed 3 times");
        eprintln!("gpu={gpu}: killed {kills} times, restored from checkpoint {} the last time", latest_checkpoint(&job_dir));
        let log = dir.join("final.log");
        let mut child = spawn_logged(&mut slow(true), &log);
        assert!(wait_success(&mut child, Duration::from_secs(120)), "gpu={gpu}: the restored job failed:\n{}", log_tail(&log));

        let got = reports(&dir.join("out"));
        let samples: Vec<u64> = got.iter().map(|r| r.1).collect();
        assert_eq!(samples, (1..=TRAINED / WINDOW).map(|k| k * WINDOW).collect::<Vec<_>>(), "gpu={gpu}: no duplicate, no gap ({kills} kills)");
        assert_eq!(got, want, "gpu={gpu}: the same steps as without the kills");
        let (killed, undisturbed) = (SmallCnn::load(&model_path(&dir), 8, 8).unwrap(), SmallCnn::load(&model_path(&clean), 8, 8).unwrap());
        assert_eq!(metadata(&model_path(&dir))["trained_samples"], TRAINED.to_string());
        assert_eq!((&killed.conv_w, &killed.conv_b, &killed.dense_w, &killed.dense_b), (&undisturbed.conv_w, &undisturbed.conv_b, &undisturbed.dense_w, &undisturbed.dense_b), "gpu={gpu}: the model");
        let acc = accuracy(&killed);
        assert!(acc >= 0.95, "gpu={gpu}: held-out accuracy {acc}");
        let hidden: Vec<String> = std::fs::read_dir(dir.join("models")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
        assert!(hidden.is_empty(), "gpu={gpu}: staged files left behind: {hidden:?}");
    }
}

/// `weir run` that must fail before (or as) the job starts; its stderr.
fn refused(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the job ran");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_settings_are_refused_and_a_bad_row_ends_the_job_naming_it() {
    let tmp = TempDir::new("cnn-train-bad");
    for (set, want) in [
        ("pipeline.1.cnn_train.batch_size=0", "pipeline[1].cnn_train.batch_size: must be 1 to 65536, not 0"),
        ("pipeline.1.cnn_train.height=7", "pipeline[1].cnn_train.height: must be an even number of at least 2"),
        ("pipeline.1.cnn_train.learning_rate=-0.1", "pipeline[1].cnn_train.learning_rate: must be above 0"),
        ("pipeline.1.cnn_train.report_every=0", "pipeline[1].cnn_train.report_every: must be 1 to"),
        ("pipeline.1.cnn_train.field=pics", "pipeline[1].cnn_train.field: no field 'pics' here (fields: tenant, label, pixels)"),
        ("pipeline.1.cnn_train.init=models/digits_test.jsonl", "pipeline[1].cnn_train.init: "),
        ("pipeline.1.cnn_train.optimizer=sgd", "pipeline[1].cnn_train.optimizer: unknown field `optimizer`"),
    ] {
        let err = refused(train_cmd(&tmp.0, "false").args(["--set", set]));
        assert!(err.contains(want), "--set {set}: {err}");
    }
    let err = refused(train_cmd(&tmp.0, "false").args(["-D", "execution.checkpointing.interval=off"]));
    assert!(err.contains("pipeline[1].cnn_train.export: models are exported when a checkpoint completes"), "{err}");
    assert!(!tmp.join("out").exists() && !tmp.join("models").exists(), "nothing ran");

    // A label beyond the classes, in the middle of the data: the job ends (no restart loop).
    let data = tmp.join("bad.jsonl");
    let text = std::fs::read_to_string(repo_root().join("examples/data/digits_train.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().take(100).map(str::to_string).collect();
    lines[70] = lines[70].replacen("\"label\": ", "\"label\": 1", 1);
    assert!(lines[70].contains("\"label\": 1"));
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let bad_label: u64 = serde_json::from_str::<serde_json::Value>(&lines[70]).unwrap()["label"].as_u64().unwrap();
    assert!(bad_label >= 10);
    let err = refused(train_cmd(&tmp.join("run"), "false").args(["--set", &format!("source.path={}", data.display()), "-D", "restart-strategy.type=fixed-delay"]));
    assert!(err.contains(&format!("pipeline[1].cnn_train: key acme: label 'label' {bad_label} is not a class of 0..10")), "{err}");

    // Two tenants under an export template without `{key}`: the second is refused when it first
    // appears, naming both (at a snapshot it would fail every checkpoint, restart after restart).
    let two = tmp.join("two.jsonl");
    let lines: Vec<String> = text.lines().take(200).enumerate().map(|(i, l)| if i % 2 == 1 { l.replacen("\"acme\"", "\"zeta\"", 1) } else { l.to_string() }).collect();
    assert!(lines[1].contains("zeta"));
    std::fs::write(&two, lines.join("\n") + "\n").unwrap();
    let one_file = tmp.join("one/model.safetensors");
    let err = refused(train_cmd(&tmp.join("run2"), "false").args([
        "--set",
        &format!("source.path={}", two.display()),
        "--set",
        &format!("pipeline.1.cnn_train.export={}", one_file.display()),
        "-D",
        "parallelism.default=1",
        "-D",
        "restart-strategy.type=fixed-delay",
    ]));
    assert!(err.contains("would be published to") && err.contains("model.safetensors"), "{err}");
}

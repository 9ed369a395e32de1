//! The digits CNN in a streaming job: the held-out accuracy equals the training script's own
//! evaluation (stored in the model's metadata) and is at least 95 %, on both paths.

mod common;

use common::*;

fn accuracy(gpu: &str, tmp: &TempDir) -> f64 {
    let out = tmp.join(&format!("out-{gpu}"));
    run_ok(weir()
        .args(["run", "examples/digits.yaml", "-D", &format!("weir.gpu.enabled={gpu}"), "-D", "weir.gpu.batch.max-records=64"])
        .arg("-D")
        .arg(format!("execution.checkpointing.dir={}", tmp.join("ck").display()))
        .arg("--set")
        .arg(format!("sink.path={}", out.display())));
    let lines = committed_lines(&out);
    let total: usize = lines.values().sum();
    let right: usize = lines.iter().filter(|(l, _)| l.split_once(',').is_some_and(|(a, b)| a == b)).map(|(_, n)| n).sum();
    assert_eq!(total, 359, "every held-out image classified once");
    right as f64 / total as f64
}

fn script_accuracy() -> f64 {
    let bytes = std::fs::read(repo_root().join("models/digits_cnn.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"]["held_out_accuracy"].as_str().unwrap().parse().unwrap()
}

#[test]
fn digits_cnn_reaches_the_scripts_accuracy_on_both_paths() {
    let tmp = TempDir::new("cnn");
    let want = script_accuracy();
    assert!(want >= 0.95, "the trained model itself: {want}");
    for gpu in ["false", "true"] {
        let got = accuracy(gpu, &tmp);
        assert!((got - want).abs() < 1e-4, "weir.gpu.enabled={gpu}: accuracy {got}, the script measured {want}");
    }
}

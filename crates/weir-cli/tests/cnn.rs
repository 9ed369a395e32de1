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

/// Random projection (one GEMM per batch) then K-means: every true centre, projected by the
/// same matrix, has a learned centroid within 0.15 σ, on both paths.
#[test]
fn projected_kmeans_recovers_projected_centres_on_both_paths() {
    let tmp = TempDir::new("proj");
    let blobs = weir::source::BlobSource { count: 1_000_000, centers: 8, dim: 32, sigma: 1.0, keys: 2, seed: 3 };
    let b = weir::job::random_projection(32, 8, 1);
    for gpu in ["false", "true"] {
        let out = tmp.join(&format!("out-{gpu}"));
        run_ok(weir()
            .args(["run", "examples/projected_kmeans.yaml", "-D", &format!("weir.gpu.enabled={gpu}")])
            .arg("-D")
            .arg(format!("execution.checkpointing.dir={}", tmp.join("ck").display()))
            .arg("--set")
            .arg(format!("sink.path={}", out.display())));
        let mut files: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let mut model = std::collections::HashMap::new();
        for f in files {
            for line in std::fs::read_to_string(f).unwrap().lines() {
                // `key,centroid,count,"x1,x2,…"`: the vector is one quoted CSV field.
                let v: Vec<f64> = line.split(',').map(|x| x.trim_matches('"').parse().unwrap()).collect();
                model.insert((v[0] as u64, v[1] as u64), (v[2] as u64, v[3..].iter().map(|&x| x as f32).collect::<Vec<f32>>()));
            }
        }
        assert_eq!(model.len(), 16);
        let absorbed: u64 = model.values().map(|(n, _)| n).sum();
        assert_eq!(absorbed, blobs.count, "gpu={gpu}: the last models' counts add up to every point, once");
        for key in 0..2u64 {
            for c in 0..8 {
                let centre = blobs.center(key, c);
                let projected: Vec<f32> = (0..8).map(|j| (0..32).map(|i| centre[i] * b[i * 8 + j]).sum()).collect();
                let best = (0..8u64)
                    .map(|m| model[&(key, m)].1.iter().zip(&projected).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt())
                    .fold(f32::MAX, f32::min);
                assert!(best <= 0.15, "gpu={gpu} key {key} centre {c}: nearest centroid {best} away");
            }
        }
    }
}

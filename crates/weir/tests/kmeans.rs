//! Streaming K-means recovers every true centre of seeded Gaussian blobs (each within 0.1 σ of
//! a learned centroid), on the CPU path and on the GPU path, with checkpoints on.

use std::collections::HashMap;

use weir::sink::CollectSink;
use weir::source::BlobSource;
use weir::{JobConfig, Row, StreamEnv, Value};

fn learned(gpu: &str) -> (HashMap<(i64, i64), (i64, Vec<f32>)>, BlobSource) {
    let blobs = BlobSource { count: 200_000, centers: 8, dim: 8, sigma: 1.0, keys: 2, seed: 11 };
    let dir = std::env::temp_dir().join(format!("weir-kmeans-{gpu}-{}", std::process::id()));
    let config = JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("execution.checkpointing.interval", "100ms".into()),
        ("execution.checkpointing.dir", dir.display().to_string()),
        ("weir.gpu.enabled", gpu.into()),
        ("weir.gpu.batch.max-records", "4096".into()),
    ])
    .unwrap();
    let sink = CollectSink::new();
    let (s2, b2) = (sink.clone(), blobs.clone());
    let kernels = weir_gpu::kernels::shared_kernels(&config.gpu).unwrap();
    eprintln!("path for weir.gpu.enabled={gpu}: {}", kernels.name());
    if gpu == "true" {
        assert!(kernels.name().starts_with("gpu"), "{}", kernels.name());
    }
    StreamEnv::new("kmeans", config)
        .execute(move |job| {
            job.source("blobs", b2.clone())
                .key_by(|r: &Row| r.get(0).clone())
                .process_batches("kmeans", weir::ops::kmeans::StreamingKMeans::new(8, 1, kernels.clone()))
                .sink("collect", s2.clone());
        })
        .unwrap();
    std::fs::remove_dir_all(dir).ok();
    let mut last = HashMap::new();
    for r in sink.take() {
        let (Value::Int(k), Value::Int(c), Value::Int(n), Value::Vector(v)) = (r.get(0), r.get(1), r.get(2), r.get(3)) else { panic!("{r:?}") };
        last.insert((*k, *c), (*n, v.to_vec()));
    }
    (last, blobs)
}

fn check(gpu: &str) {
    let (model, blobs) = learned(gpu);
    assert_eq!(model.len(), 16, "8 centroids for each of 2 keys");
    let absorbed: i64 = model.values().map(|(n, _)| n).sum();
    assert_eq!(absorbed, blobs.count as i64, "the final models' counts add up to every point, once (path {gpu})");
    for key in 0..2u64 {
        for c in 0..8 {
            let truth = blobs.center(key, c);
            let best = (0..8)
                .map(|j| {
                    let m = &model[&(key as i64, j)].1;
                    m.iter().zip(&truth).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()
                })
                .fold(f32::MAX, f32::min);
            assert!(best <= 0.1 * blobs.sigma, "key {key} centre {c}: nearest centroid {best} away (path {gpu})");
        }
    }
}

#[test]
fn recovers_centres_on_the_cpu_path() {
    check("false");
}

#[test]
fn recovers_centres_on_the_gpu_path() {
    // CI sets WEIR_REQUIRE_GPU=1 and runs this on lavapipe; elsewhere `true` needs a GPU too.
    check("true");
}

/// A checkpoint of models with another k is refused at restore, naming the state and the shapes
/// (the words of a slot would otherwise be read with the wrong layout).
#[test]
fn a_restore_with_another_k_is_refused() {
    let dir = std::env::temp_dir().join(format!("weir-kmeans-k-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |k: usize, restore: weir::Restore| {
        let config = JobConfig::from_pairs([
            ("parallelism.default", "1".to_string()),
            ("execution.checkpointing.interval", "1h".into()),
            ("execution.checkpointing.dir", dir.display().to_string()),
            ("weir.gpu.enabled", "false".into()),
            ("restart-strategy.type", "none".into()),
        ])
        .unwrap();
        let kernels = weir_gpu::kernels::shared_kernels(&config.gpu).unwrap();
        let blobs = BlobSource { count: 5_000, centers: 4, dim: 2, sigma: 1.0, keys: 1, seed: 5 };
        StreamEnv::new("kmeans-k", config).restore(restore).execute(move |job| {
            job.source("blobs", blobs.clone())
                .key_by(|r: &Row| r.get(0).clone())
                .process_batches("kmeans", weir::ops::kmeans::StreamingKMeans::new(k, 1, kernels.clone()))
                .sink("collect", CollectSink::new());
        })
    };
    run(4, weir::Restore::None).unwrap();
    let err = run(3, weir::Restore::Latest).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(err.contains("kmeans-models") && err.contains("k = 4") && err.contains("k = 3"), "{err}");
}

//! The naive baseline `weir.gpu.state.snapshot-mode: blocking` (for `weir bench gpu-state`)
//! runs the kmeans job to the same end as the default: the batches it drains at each barrier
//! still reach the sink, and every checkpoint lists one full file of the models.

use std::collections::HashMap;

use weir::sink::CollectSink;
use weir::source::BlobSource;
use weir::{JobConfig, Row, StreamEnv, Value};

#[test]
fn blocking_snapshots_lose_no_output_and_write_full_files() {
    let blobs = BlobSource { count: 1_000_000, centers: 4, dim: 4, sigma: 1.0, keys: 2000, seed: 5 };
    let dir = std::env::temp_dir().join(format!("weir-kmeans-blocking-{}", std::process::id()));
    let config = JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("execution.checkpointing.interval", "50ms".into()),
        ("execution.checkpointing.dir", dir.display().to_string()),
        ("weir.gpu.batch.max-records", "8192".into()),
        ("weir.gpu.state.snapshot-mode", "blocking".into()),
    ])
    .unwrap();
    assert!(config.gpu_state_blocking_snapshots);
    // CI sets WEIR_REQUIRE_GPU=1: the GPU path (lavapipe); elsewhere whichever path is found.
    let kernels = weir_gpu::kernels::shared_kernels(&config.gpu).unwrap();
    eprintln!("path: {}", kernels.name());
    let sink = CollectSink::new();
    let (s2, b2) = (sink.clone(), blobs.clone());
    let result = StreamEnv::new("kmeans-blocking", config)
        .execute(move |job| {
            job.source("blobs", b2.clone())
                .key_by(|r: &Row| r.get(0).clone())
                .process_batches("kmeans", weir::ops::kmeans::StreamingKMeans::new(4, 1, kernels.clone()))
                .sink("collect", s2.clone());
        })
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let mut last: HashMap<(i64, i64), i64> = HashMap::new();
    for r in sink.take() {
        let (Value::Int(k), Value::Int(c), Value::Int(n)) = (r.get(0), r.get(1), r.get(2)) else { panic!("{r:?}") };
        let e = last.entry((*k, *c)).or_default();
        *e = (*e).max(*n);
    }
    assert_eq!(last.len(), 2000 * 4, "4 centroids for each of 2000 keys");
    assert_eq!(last.values().sum::<i64>(), blobs.count as i64, "the models' last rows count every point once");
    eprintln!("{} checkpoints ({} periodic)", result.checkpoints.len(), result.checkpoints.iter().filter(|m| !m.is_final).count());
    let mut listed = 0;
    for m in &result.checkpoints {
        for (_, s) in m.subtasks.iter().filter(|(_, s)| s.operator_name == "kmeans") {
            let models: Vec<_> = s.state_files.iter().filter(|f| f.state == "kmeans-models").collect();
            assert!(models.len() <= 1 && models.iter().all(|f| f.path.ends_with("-full.state")), "checkpoint {}: {models:?}", m.id);
            listed += models.len();
        }
    }
    // At least the final checkpoint holds both instances' models.
    assert!(listed >= 2, "{listed} model files in {} checkpoints", result.checkpoints.len());
}

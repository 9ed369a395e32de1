//! Cut checkpoint storage mid-run: checkpoints fail (within the tolerated number), processing
//! goes on, checkpoints resume when storage is back, and the output is exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use weir::sink::FileSink;
use weir::source::GeneratorSource;
use weir::{JobConfig, Row, StreamEnv};

fn run(dir: &std::path::Path) -> weir::JobResult {
    let config = JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("execution.checkpointing.interval", "40ms".into()),
        ("execution.checkpointing.tolerable-failed-checkpoints", "1000".into()),
        ("execution.checkpointing.dir", dir.join("ck").display().to_string()),
    ])
    .unwrap();
    let out = dir.join("out");
    StreamEnv::new("outage", config)
        .execute(move |job| {
            job.source("gen", GeneratorSource { count: 400_000, keys: 5_000, seed: 5, rate: Some(400_000.0) })
                .key_by(|r: &Row| r.get(0).clone())
                .sum(|r: &Row| r.get(1).as_f64().unwrap_or(0.0) as i64)
                .sink("out", FileSink::new(&out, |x: &(weir::Value, i64), b: &mut Vec<u8>| {
                    b.extend_from_slice(format!("{},{}\n", x.0, x.1).as_bytes());
                }));
        })
        .unwrap()
}

fn lines(dir: &std::path::Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if !e.file_name().to_string_lossy().starts_with('.') {
            for l in std::fs::read_to_string(e.path()).unwrap().lines() {
                *m.entry(l.to_string()).or_insert(0) += 1;
            }
        }
    }
    m
}

#[test]
fn checkpoints_fail_while_storage_is_cut_and_output_stays_exactly_once() {
    let base = std::env::temp_dir().join(format!("weir-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (clean, cut) = (base.join("clean"), base.join("cut"));
    run(&clean);
    let expected = lines(&clean.join("out"));
    assert_eq!(expected.values().sum::<usize>(), 400_000);

    let job_dir = cut.join("ck").join("outage");
    let saboteur = {
        let job_dir = job_dir.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            // Replace the job's checkpoint directory by a file: every write fails.
            let aside = job_dir.with_extension("aside");
            std::fs::rename(&job_dir, &aside).unwrap();
            std::fs::write(&job_dir, b"storage is gone").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            std::fs::remove_file(&job_dir).unwrap();
            std::fs::rename(&aside, &job_dir).unwrap();
        })
    };
    let result = run(&cut);
    saboteur.join().unwrap();
    let ids: Vec<u64> = result.checkpoints.iter().map(|m| m.id).collect();
    let gaps = ids.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(gaps >= 1, "some checkpoints failed during the outage: completed {ids:?}");
    assert!(ids.iter().any(|&i| i > ids[0] + 5), "checkpoints resumed after the outage: {ids:?}");
    let got = lines(&cut.join("out"));
    assert!(got == expected, "output must be exactly once after a storage outage");
    std::fs::remove_dir_all(&base).ok();
}

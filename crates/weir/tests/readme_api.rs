//! The README's Rust API example, compiled and run.

use weir::{sink::FileSink, source::GeneratorSource, JobConfig, Row, StreamEnv, Value};

#[test]
fn readme_example_runs_and_sums_every_record() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("weir-readme-{}", std::process::id()));
    let out = dir.join("out");
    let config = JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("execution.checkpointing.interval", "1s".into()),
        ("execution.checkpointing.dir", dir.join("ck").display().to_string()),
    ])?;
    let out2 = out.clone();
    StreamEnv::new("sums", config).execute(move |job| {
        job.source("gen", GeneratorSource { count: 100_000, keys: 1000, seed: 1, rate: None })
            .key_by(|r: &Row| r.get(0).clone())
            .sum(|r: &Row| r.get(1).as_f64().unwrap_or(0.0) as i64)
            .map(|(k, s): (Value, i64)| format!("{k},{s}"))
            .sink("out", FileSink::new(&out2, |s: &String, b: &mut Vec<u8>| {
                b.extend_from_slice(s.as_bytes());
                b.push(b'\n');
            }));
    })?;
    // The last line per key is its total; the totals add up to the sum of all values.
    let gen = GeneratorSource { count: 100_000, keys: 1000, seed: 1, rate: None };
    let expected: i64 = (0..128).flat_map(|s| (0..gen.split_len(s)).map(move |i| (s, i))).map(|(s, i)| gen.record(s, i).1).sum();
    let mut totals = std::collections::HashMap::<String, i64>::new();
    let mut lines = 0;
    for e in std::fs::read_dir(&out)? {
        for l in std::fs::read_to_string(e?.path())?.lines() {
            let (k, s) = l.split_once(',').unwrap();
            let t = totals.entry(k.to_string()).or_default();
            *t = (*t).max(s.parse()?);
            lines += 1;
        }
    }
    assert_eq!(lines, 100_000);
    assert_eq!(totals.len(), 1000);
    assert_eq!(totals.values().sum::<i64>(), expected);
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

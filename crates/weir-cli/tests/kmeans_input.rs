//! Bad input to `kmeans` fails the job at once, naming the key and what is wrong, instead of
//! panicking through every attempt of the restart strategy.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_point_of_another_dimension_fails_at_once_naming_the_key() {
    let tmp = TempDir::new("kmeans-dim");
    let mut lines = String::new();
    for i in 0..300 {
        lines.push_str(&format!("{{\"key\": \"k\", \"point\": [{}.0, {}.5]}}\n", i % 7, i % 5));
    }
    lines.push_str("{\"key\": \"k\", \"point\": [1.0, 2.0, 3.0]}\n");
    let input = tmp.join("points.json");
    std::fs::write(&input, lines).unwrap();
    let job = tmp.join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "name: kmeans-input\nconfig:\n  execution.checkpointing.interval: 1s\n  execution.checkpointing.dir: {}\n  \
             restart-strategy.type: fixed-delay\n  restart-strategy.fixed-delay.attempts: 3\n  restart-strategy.fixed-delay.delay: 5s\n  \
             weir.gpu.enabled: 'false'\nsource:\n  type: file\n  path: {}\n  format: json\n  fields: [key, point]\n\
             pipeline:\n  - key_by: key\n  - kmeans: {{field: point, k: 2}}\nsink:\n  type: file\n  path: {}\n",
            tmp.join("ck").display(),
            input.display(),
            tmp.join("out").display()
        ),
    )
    .unwrap();
    let start = Instant::now();
    let out = weir().arg("run").arg(&job).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(!log.contains("restart 1"), "restarted:\n{log}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(log.contains("kmeans: key \"k\": a 3-dimensional point for 2-dimensional models") || log.contains("kmeans: key k: a 3-dimensional point for 2-dimensional models"), "{log}");
}

//! The file source's `repeat`: the files are read `n` times, and a restore in a later pass
//! resumes in that pass, so every line comes out exactly `n` times.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use weir::sink::FileSink;
use weir::source::{FileFormat, FileSource};
use weir::{JobConfig, Restore, Row, StreamEnv};

const FILES: [&str; 3] = ["a.txt", "b.txt", "c.txt"];
const LINES: usize = 2_000;
const REPEAT: usize = 3;

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("weir-file-repeat-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(p.join("in")).unwrap();
    for f in FILES {
        let stem = f.trim_end_matches(".txt");
        std::fs::write(p.join("in").join(f), (0..LINES).map(|i| format!("{stem}-{i:05}\n")).collect::<String>()).unwrap();
    }
    p
}

/// Committed output lines (hidden files are not output), as a multiset.
fn lines(dir: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        for l in std::fs::read_to_string(e.path()).unwrap().lines() {
            *m.entry(l.to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// Every input line `REPEAT` times, and nothing else.
fn assert_every_line_repeat_times(got: &BTreeMap<String, usize>) {
    assert_eq!(got.len(), FILES.len() * LINES, "distinct lines");
    let wrong: Vec<(&String, &usize)> = got.iter().filter(|(_, &n)| n != REPEAT).take(5).collect();
    assert!(wrong.is_empty(), "lines not seen {REPEAT} times (line, times): {wrong:?}");
}

/// Small batches, one in flight, frequent checkpoints: several checkpoints per pass. The map
/// panics once, at record `panic_at` (counted over attempts), if given.
fn run(dir: &Path, panic_at: Option<u64>) -> weir::JobResult {
    let config = JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("execution.checkpointing.interval", "20ms".into()),
        ("execution.checkpointing.dir", dir.join("ck").display().to_string()),
        ("restart-strategy.type", "fixed-delay".into()),
        ("restart-strategy.fixed-delay.attempts", "3".into()),
        ("restart-strategy.fixed-delay.delay", "10ms".into()),
        ("weir.source.batch-size", "32".into()),
        ("weir.source.max-inflight-batches", "1".into()),
    ])
    .unwrap();
    let (input, out) = (dir.join("in"), dir.join("out"));
    let seen = Arc::new(AtomicU64::new(0));
    let fired = Arc::new(AtomicBool::new(false));
    StreamEnv::new("file-repeat", config)
        .restore(Restore::Latest)
        .execute(move |job| {
            let (seen, fired) = (seen.clone(), fired.clone());
            job.source("file", FileSource::new(&input, FileFormat::Lines).repeat(REPEAT as u32))
                .map(move |r: Row| {
                    let n = seen.fetch_add(1, Ordering::Relaxed);
                    if panic_at == Some(n) && !fired.swap(true, Ordering::Relaxed) {
                        panic!("injected failure at record {n}");
                    }
                    r.get(0).to_string()
                })
                .sink("out", FileSink::new(&out, |s: &String, b: &mut Vec<u8>| {
                    b.extend_from_slice(s.as_bytes());
                    b.push(b'\n');
                }));
        })
        .unwrap()
}

#[test]
fn a_bounded_run_with_repeat_3_outputs_every_line_3_times() {
    let dir = tmp("bounded");
    let r = run(&dir, None);
    assert_eq!(r.restarts, 0);
    assert_every_line_repeat_times(&lines(&dir.join("out")));
    std::fs::remove_dir_all(&dir).ok();
}

/// A failure in the second pass: the restart restores the latest checkpoint, which holds
/// positions in the second pass, and no line is lost or read once too often.
#[test]
fn a_failure_in_the_second_pass_restores_in_that_pass() {
    let dir = tmp("restart");
    let r = run(&dir, Some((FILES.len() * LINES * 3 / 2) as u64));
    assert_eq!(r.restarts, 1);
    assert_every_line_repeat_times(&lines(&dir.join("out")));
    std::fs::remove_dir_all(&dir).ok();
}

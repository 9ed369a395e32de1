//! Operator uids in the DataStream API: `.uid()` before an operator names its state, so a
//! restore finds it wherever the operator now stands; a uid given twice is refused at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use weir::sink::{BlackholeSink, FileSink};
use weir::source::GeneratorSource;
use weir::{JobConfig, JobError, Restore, Row, StreamEnv, Value};

fn tmp(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let p = std::env::temp_dir().join(format!("weir-api-uid-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn config(dir: &Path) -> JobConfig {
    JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("execution.checkpointing.interval", "1s".into()),
        ("execution.checkpointing.dir", dir.join("ck").display().to_string()),
        ("restart-strategy.type", "fixed-delay".into()),
        ("restart-strategy.fixed-delay.delay", "10ms".into()),
    ])
    .unwrap()
}

fn generator(count: u64) -> GeneratorSource {
    GeneratorSource { count, keys: 1000, seed: 3, rate: None }
}

/// The largest `sum` per key in a sink directory of `key,sum` lines: each key's total.
fn totals(out: &Path) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(out).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        for l in std::fs::read_to_string(e.path()).unwrap().lines() {
            let (k, s) = l.split_once(',').unwrap();
            let t = m.entry(k.to_string()).or_insert(i64::MIN);
            *t = (*t).max(s.parse().unwrap());
        }
    }
    m
}

/// A stateful operator inserted before `sum` moves it to another position; its uid brings its
/// state along (by position, the inserted `reduce` would be handed the sums and refuse them).
#[test]
fn state_follows_the_uid_when_an_operator_is_inserted_before_it() {
    let dir = tmp("insert");
    let sink = |out: &Path| {
        let out = out.to_path_buf();
        FileSink::new(out, |s: &String, b: &mut Vec<u8>| {
            b.extend_from_slice(s.as_bytes());
            b.push(b'\n');
        })
    };
    // Run 1: 10 000 records; the bounded job ends with a final checkpoint.
    let out1 = dir.join("out1");
    StreamEnv::new("api-uid", config(&dir))
        .execute(move |job| {
            job.uid("events")
                .source("gen", generator(10_000))
                .key_by(|r: &Row| r.get(0).clone())
                .uid("sums")
                .sum(|r: &Row| r.get(1).as_f64().unwrap() as i64)
                .map(|(k, s): (Value, i64)| format!("{k},{s}"))
                .sink("out", sink(&out1));
        })
        .unwrap();

    // Run 2 restores it with a larger bound and a stateful (identity) reduce before the sum.
    let out2 = dir.join("out2");
    let out = out2.clone();
    let result = StreamEnv::new("api-uid", config(&dir))
        .restore(Restore::Latest)
        .execute(move |job| {
            job.uid("events")
                .source("gen", generator(20_000))
                .key_by(|r: &Row| r.get(0).clone())
                .uid("latest")
                .reduce(|_: &Row, r: &Row| r.clone())
                .key_by(|r: &Row| r.get(0).clone())
                .uid("sums")
                .sum(|r: &Row| r.get(1).as_f64().unwrap() as i64)
                .map(|(k, s): (Value, i64)| format!("{k},{s}"))
                .sink("out", sink(&out));
        })
        .unwrap();
    assert!(result.restored_from.is_some(), "run 2 restored run 1's final checkpoint");

    // The sums of run 2 went on from run 1's: each key's total over all 20 000 records.
    let gen = generator(20_000);
    let mut expected = BTreeMap::new();
    for s in 0..128 {
        for i in 0..gen.split_len(s) {
            let (k, v) = gen.record(s, i);
            *expected.entry(k.to_string()).or_insert(0) += v;
        }
    }
    let got = totals(&out2);
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_uid_given_twice_fails_the_job_at_start_naming_both() {
    let dir = tmp("dup");
    let err = StreamEnv::new("api-uid-dup", config(&dir))
        .execute(|job| {
            job.uid("x")
                .source("gen", generator(100))
                .key_by(|r: &Row| r.get(0).clone())
                .uid("x")
                .sum(|_: &Row| 1i64)
                .sink("out", BlackholeSink);
        })
        .unwrap_err();
    let JobError::Failed { restarts, message } = err else { panic!("{err}") };
    assert!(message.contains("operator[1] 'sum': uid 'x' is also the uid of operator[0] 'gen'"), "{message}");
    assert_eq!(restarts, 0, "no restart can make a uid unique");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn operators_without_a_uid_get_one_from_position_and_name() {
    let dir = tmp("default");
    // Two `sum`s without uids do not collide: the default holds the position.
    StreamEnv::new("api-uid-default", config(&dir))
        .execute(|job| {
            job.source("gen", generator(100))
                .key_by(|r: &Row| r.get(0).clone())
                .sum(|_: &Row| 1i64)
                .key_by(|(k, _): &(Value, i64)| k.clone())
                .sum(|(_, n): &(Value, i64)| *n)
                .sink("out", BlackholeSink);
        })
        .unwrap();
    let chk = std::fs::read_dir(dir.join("ck/api-uid-default")).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("_metadata").exists());
    let meta = std::fs::read_to_string(chk.expect("a retained checkpoint").join("_metadata")).unwrap();
    for uid in ["operator[0]:gen", "operator[1]:sum", "operator[2]:sum", "operator[3]:out"] {
        assert!(meta.contains(&format!("\"uid\": \"{uid}\"")), "{uid} in\n{meta}");
    }
    std::fs::remove_dir_all(dir).ok();
}

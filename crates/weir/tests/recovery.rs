//! Operator panics: the restart strategy restores the latest checkpoint and the output is
//! exactly once, for a process function that uses value, map and list state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use weir::sink::FileSink;
use weir::source::GeneratorSource;
use weir::state::{KeyedContext, KeyedProcessFunction, ListState, MapState, StateTables, ValueState};
use weir::{JobConfig, Restore, Row, StreamEnv, Value};

/// Per key: count (value state), occurrences of each value bucket (map state), the last three
/// values (list state). Emits `key,count,bucket_count,last3_sum`.
#[derive(Default)]
struct Stats {
    count: Option<ValueState<u64>>,
    buckets: Option<MapState<i64, u64>>,
    last: Option<ListState<i64>>,
}

impl KeyedProcessFunction<i64, Row, String> for Stats {
    fn open(&mut self, s: &mut StateTables<i64>) {
        self.count = Some(s.value_state("count"));
        self.buckets = Some(s.map_state("buckets"));
        self.last = Some(s.list_state("last"));
    }

    fn process(&mut self, ctx: &mut KeyedContext<'_, i64>, row: Row, out: &mut Vec<String>) {
        let Value::Int(v) = row.get(1).clone() else { panic!("value is an int") };
        let count = self.count.as_ref().unwrap();
        let c = count.get(ctx).copied().unwrap_or(0) + 1;
        count.set(ctx, c);
        let buckets = self.buckets.as_ref().unwrap();
        let b = buckets.get(ctx, &(v / 10)).copied().unwrap_or(0) + 1;
        buckets.put(ctx, v / 10, b);
        let last = self.last.as_ref().unwrap();
        last.add(ctx, v);
        if last.get(ctx).len() > 3 {
            let keep: Vec<i64> = last.get(ctx)[1..].to_vec();
            last.clear(ctx);
            for x in keep {
                last.add(ctx, x);
            }
        }
        let s: i64 = last.get(ctx).iter().sum();
        out.push(format!("{},{c},{b},{s}", ctx.key()));
    }
}

fn run(dir: &std::path::Path, panic_at: Arc<Mutex<Vec<u64>>>, seen: Arc<AtomicU64>) -> weir::JobResult {
    let config = JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("execution.checkpointing.interval", "30ms".into()),
        ("execution.checkpointing.dir", dir.join("ck").display().to_string()),
        ("restart-strategy.type", "fixed-delay".into()),
        ("restart-strategy.fixed-delay.attempts", "10".into()),
        ("restart-strategy.fixed-delay.delay", "10ms".into()),
        ("weir.source.batch-size", "512".into()),
    ])
    .unwrap();
    let out = dir.join("out");
    StreamEnv::new("recovery", config)
        .restore(Restore::Latest)
        .execute(move |job| {
            let (panic_at, seen) = (panic_at.clone(), seen.clone());
            job.source("gen", GeneratorSource { count: 300_000, keys: 2_000, seed: 3, rate: Some(400_000.0) })
                .map(move |r: Row| {
                    // Panic once at each chosen position of the records seen (replays included).
                    let n = seen.fetch_add(1, Ordering::Relaxed);
                    let mut p = panic_at.lock().unwrap();
                    if let Some(i) = p.iter().position(|&x| x == n) {
                        p.remove(i);
                        drop(p);
                        panic!("injected failure at record {n}");
                    }
                    r
                })
                .key_by(|r: &Row| match r.get(0) {
                    Value::Int(k) => *k,
                    _ => unreachable!(),
                })
                .process("stats", Stats::default())
                .sink("out", FileSink::new(&out, |s: &String, b: &mut Vec<u8>| {
                    b.extend_from_slice(s.as_bytes());
                    b.push(b'\n');
                }));
        })
        .unwrap()
}

fn lines(dir: &std::path::Path) -> BTreeMap<String, usize> {
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

fn tmp(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("weir-recovery-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn operator_panics_at_five_random_records_and_the_restart_strategy_recovers() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG")).with_test_writer().try_init();
    let clean = tmp("clean");
    let r = run(&clean, Arc::default(), Arc::default());
    assert_eq!(r.restarts, 0);
    let expected = lines(&clean.join("out"));
    assert_eq!(expected.values().sum::<usize>(), 300_000);

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("panic positions from seed {seed}");
    let mut x = seed;
    let positions: Vec<u64> = (0..5)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % 280_000
        })
        .collect();
    let broken = tmp("broken");
    let panic_at = Arc::new(Mutex::new(positions.clone()));
    let r = run(&broken, panic_at.clone(), Arc::default());
    assert!(panic_at.lock().unwrap().is_empty(), "every injected panic fired: {positions:?}");
    assert!(r.restarts >= 1 && r.restarts <= 5, "restarts: {}", r.restarts);
    let got = lines(&broken.join("out"));
    let lost: usize = expected.iter().map(|(k, n)| n.saturating_sub(*got.get(k).unwrap_or(&0))).sum();
    let extra: usize = got.iter().map(|(k, n)| n.saturating_sub(*expected.get(k).unwrap_or(&0))).sum();
    assert_eq!((lost, extra), (0, 0), "output must be exactly once");
    std::fs::remove_dir_all(clean).ok();
    std::fs::remove_dir_all(broken).ok();
}

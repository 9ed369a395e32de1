//! One state-backend suite, run on every backend: the heap (`hashmap`) and RocksDB, each with
//! full and with incremental checkpoints. Value, map and list state (and removals, which
//! incremental checkpoints write as tombstones) under operator panics, restores across
//! backends and parallelisms, and the typed YAML aggregates.
//!
//! Every record of key `k` that is the key's `c`-th makes the operator emit
//! `k,c,parity,list_len,map_total`, where parity is a value state set for odd `c` and cleared
//! for even `c`, the list keeps the last three values and the map counts values per bucket, so
//! that a correct state gives `k,c,c%2,min(c,3),c` whatever the order of the key's records.
//! Exactly once: for every key the counts seen are exactly 1..=n, each once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use weir::sink::FileSink;
use weir::source::GeneratorSource;
use weir::state::{KeyedContext, KeyedProcessFunction, ListState, MapState, StateTables, ValueState};
use weir::{JobConfig, Restore, Row, StreamEnv, Value};

#[derive(Default)]
struct Counts {
    count: Option<ValueState<u64>>,
    parity: Option<ValueState<u8>>,
    buckets: Option<MapState<i64, u64>>,
    last: Option<ListState<i64>>,
}

impl KeyedProcessFunction<i64, Row, String> for Counts {
    fn open(&mut self, s: &mut StateTables<i64>) {
        self.count = Some(s.value_state("count"));
        self.parity = Some(s.value_state("parity"));
        self.buckets = Some(s.map_state("buckets"));
        self.last = Some(s.list_state("last"));
    }

    fn process(&mut self, ctx: &mut KeyedContext<'_, i64>, row: Row, out: &mut Vec<String>) {
        let Value::Int(v) = row.get(1).clone() else { panic!("value is an int") };
        let count = self.count.as_ref().unwrap();
        let c = count.get(ctx).copied().unwrap_or(0) + 1;
        count.set(ctx, c);
        let parity = self.parity.as_ref().unwrap();
        if c % 2 == 1 {
            parity.set(ctx, 1);
        } else {
            parity.clear(ctx);
        }
        let buckets = self.buckets.as_ref().unwrap();
        let b = buckets.get(ctx, &(v % 7)).copied().unwrap_or(0) + 1;
        buckets.put(ctx, v % 7, b);
        let map_total: u64 = buckets.entries(ctx).map(|(_, n)| *n).sum();
        let last = self.last.as_ref().unwrap();
        last.add(ctx, v);
        if last.get(ctx).len() > 3 {
            let keep: Vec<i64> = last.get(ctx)[1..].to_vec();
            last.clear(ctx);
            for x in keep {
                last.add(ctx, x);
            }
        }
        let list_len = last.get(ctx).len();
        let p = parity.get(ctx).copied().unwrap_or(0);
        out.push(format!("{},{c},{p},{list_len},{map_total}", ctx.key()));
    }
}

/// The backends of the suite: `state.backend.type`, incremental checkpoints.
const BACKENDS: [(&str, bool); 4] = [("hashmap", false), ("hashmap", true), ("rocksdb", false), ("rocksdb", true)];

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("weir-backends-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn config(dir: &Path, backend: &str, incremental: bool, parallelism: u32, extra: &[(&str, &str)]) -> JobConfig {
    let mut pairs: Vec<(String, String)> = vec![
        ("parallelism.default".into(), parallelism.to_string()),
        ("execution.checkpointing.interval".into(), "20ms".into()),
        ("execution.checkpointing.dir".into(), dir.join("ck").display().to_string()),
        ("execution.checkpointing.num-retained".into(), "2".into()),
        ("state.backend.type".into(), backend.into()),
        ("execution.checkpointing.incremental".into(), incremental.to_string()),
        ("weir.state.rocksdb.dir".into(), dir.join("rocksdb").display().to_string()),
        ("restart-strategy.type".into(), "fixed-delay".into()),
        ("restart-strategy.fixed-delay.attempts".into(), "10".into()),
        ("restart-strategy.fixed-delay.delay".into(), "10ms".into()),
        ("weir.source.batch-size".into(), "256".into()),
    ];
    pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    JobConfig::from_pairs(pairs).unwrap()
}

/// The counting job over `gen` (source uid `source`), panicking once at each record index in
/// `panic_at` (replays counted).
fn counting(job: &mut weir::Job<'_>, source: &str, gen: &GeneratorSource, out: &Path, panic_at: &Arc<Mutex<Vec<u64>>>, seen: &Arc<AtomicU64>) {
    let (panic_at, seen) = (panic_at.clone(), seen.clone());
    job.uid(source)
        .source("gen", gen.clone())
        .map(move |r: Row| {
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
        .uid("counts")
        .process("counts", Counts::default())
        .sink("out", FileSink::new(out, |s: &String, b: &mut Vec<u8>| {
            b.extend_from_slice(s.as_bytes());
            b.push(b'\n');
        }));
}

/// Run the counting job (see [`counting`]).
fn run(name: &str, config: JobConfig, restore: Restore, source: &str, gen: GeneratorSource, out: &Path, panic_at: Vec<u64>) -> weir::JobResult {
    let out = out.to_path_buf();
    let panic_at = Arc::new(Mutex::new(panic_at));
    let seen = Arc::new(AtomicU64::new(0));
    let source = source.to_string();
    StreamEnv::new(name, config)
        .restore(restore)
        .allow_non_restored_state(true)
        .execute(move |job| counting(job, &source, &gen, &out, &panic_at, &seen))
        .unwrap()
}

/// Every output line of the job directories `dirs`.
fn lines(dirs: &[&Path]) -> Vec<String> {
    let mut v = Vec::new();
    for dir in dirs {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            v.extend(std::fs::read_to_string(e.path()).unwrap().lines().map(str::to_string));
        }
    }
    v
}

/// Checks the lines against the state model; returns records per key.
fn check(lines: &[String], records: usize, what: &str) -> BTreeMap<i64, u64> {
    assert_eq!(lines.len(), records, "{what}: {} lines for {records} records (loss or duplicates)", lines.len());
    let mut seen: BTreeMap<i64, BTreeSet<u64>> = BTreeMap::new();
    for l in lines {
        let f: Vec<u64> = l.split(',').skip(1).map(|x| x.parse().unwrap()).collect();
        let k: i64 = l.split(',').next().unwrap().parse().unwrap();
        let c = f[0];
        assert_eq!(f[1..], [c % 2, c.min(3), c], "{what}: line '{l}': state of key {k} is wrong after its {c}-th record");
        assert!(seen.entry(k).or_default().insert(c), "{what}: duplicate '{l}'");
    }
    seen.into_iter()
        .map(|(k, cs)| {
            let n = cs.len() as u64;
            assert_eq!(cs.last().copied(), Some(n), "{what}: key {k} has counts {cs:?}: a record was lost");
            (k, n)
        })
        .collect()
}

fn gen(count: u64, keys: u64, seed: u64) -> GeneratorSource {
    GeneratorSource { count, keys, seed, rate: Some(300_000.0) }
}

fn latest_checkpoint(dir: &Path, job: &str) -> PathBuf {
    let job_dir = dir.join("ck").join(job);
    let id = std::fs::read_dir(&job_dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_string_lossy().strip_prefix("chk-").and_then(|n| n.parse::<u64>().ok()))
        .filter(|id| job_dir.join(format!("chk-{id}/_metadata")).exists())
        .max()
        .expect("a completed checkpoint");
    job_dir.join(format!("chk-{id}"))
}

#[test]
fn every_backend_recovers_value_map_and_list_state_exactly_once_after_panics() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG")).with_test_writer().try_init();
    for (backend, incremental) in BACKENDS {
        let what = format!("{backend}, incremental {incremental}");
        let dir = tmp(&format!("panics-{backend}-{incremental}"));
        let out = dir.join("out");
        let r = run("panics", config(&dir, backend, incremental, 2, &[]), Restore::Latest, "gen", gen(60_000, 700, 5), &out, vec![9_000, 27_000, 41_000]);
        assert_eq!(r.restarts, 3, "{what}");
        check(&lines(&[&out]), 60_000, &what);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_checkpoint_of_each_backend_restores_on_every_backend_at_another_parallelism() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG")).with_test_writer().try_init();
    for (from, from_incremental) in BACKENDS {
        for (to, to_incremental) in [("hashmap", false), ("rocksdb", true)] {
            let what = format!("{from} (incremental {from_incremental}) → {to} (incremental {to_incremental})");
            let dir = tmp(&format!("cross-{from}-{from_incremental}-{to}"));
            let (out1, out2) = (dir.join("out1"), dir.join("out2"));
            run("first", config(&dir, from, from_incremental, 2, &[]), Restore::None, "gen-a", gen(30_000, 500, 1), &out1, vec![]);
            let chk = latest_checkpoint(&dir, "first");
            let restore = Restore::Path(chk.display().to_string());
            run("second", config(&dir, to, to_incremental, 3, &[]), restore, "gen-b", gen(30_000, 500, 2), &out2, vec![]);
            check(&lines(&[&out1, &out2]), 60_000, &what);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Run the counting job with `--savepoint-on-stop`; `stop_after`: stop it (as Ctrl-C does) after
/// this long instead of letting the source end.
fn run_with_savepoint(name: &str, config: JobConfig, gen: GeneratorSource, out: &Path, stop_after: Option<std::time::Duration>) -> weir::JobResult {
    let out = out.to_path_buf();
    let env = StreamEnv::new(name, config).savepoint_on_stop(true);
    if let Some(after) = stop_after {
        let flag = env.cancel_flag();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            flag.store(true, Ordering::SeqCst);
        });
    }
    let (panic_at, seen) = (Arc::default(), Arc::default());
    env.execute(move |job| counting(job, "gen-a", &gen, &out, &panic_at, &seen)).unwrap()
}

#[test]
fn a_savepoint_is_self_contained_and_restores_across_backends_at_another_parallelism() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG")).with_test_writer().try_init();
    for ((from, inc), to) in [(("hashmap", true), "rocksdb"), (("rocksdb", true), "hashmap"), (("rocksdb", false), "rocksdb")] {
        let what = format!("savepoint on {from} (incremental {inc}) → {to}");
        let dir = tmp(&format!("savepoint-{from}-{inc}-{to}"));
        let (out1, out2) = (dir.join("out1"), dir.join("out2"));
        let sp_dir = dir.join("savepoints");
        let extra = [("execution.checkpointing.savepoint-dir", sp_dir.to_str().unwrap())];
        let r = run_with_savepoint("first", config(&dir, from, inc, 2, &extra), gen(30_000, 500, 1), &out1, None);
        let sp = PathBuf::from(r.savepoint.expect("a savepoint"));
        assert!(sp.starts_with(&sp_dir), "{what}: {}", sp.display());
        // Self-contained: the job's checkpoints (and their shared files) are gone.
        std::fs::remove_dir_all(dir.join("ck")).unwrap();
        let meta = std::fs::read_to_string(sp.join("_metadata")).unwrap();
        assert!(!meta.contains("\"Delta\"") && !meta.contains("\"RocksDb\""), "{what}: canonical files only:\n{meta}");
        let restore = Restore::Path(sp.parent().unwrap().display().to_string());
        run("second", config(&dir, to, true, 3, &extra), restore, "gen-b", gen(30_000, 500, 2), &out2, vec![]);
        check(&lines(&[&out1, &out2]), 60_000, &what);
        assert!(sp.join("_metadata").exists(), "{what}: retention never deletes a savepoint");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn stop_with_savepoint_ends_the_job_and_the_savepoint_resumes_it_exactly_once() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG")).with_test_writer().try_init();
    let dir = tmp("stop");
    let (out1, out2) = (dir.join("out1"), dir.join("out2"));
    let slow = GeneratorSource { count: 200_000, keys: 300, seed: 4, rate: Some(100_000.0) };
    let r = run_with_savepoint("stopped", config(&dir, "hashmap", true, 2, &[]), slow.clone(), &out1, Some(std::time::Duration::from_millis(600)));
    let sp = PathBuf::from(r.savepoint.expect("a savepoint on stop"));
    let before = lines(&[&out1]).len();
    assert!(before > 0 && before < 200_000, "stopped mid-input: {before} records");
    // The same source (uid gen-a) resumes where the savepoint left it.
    let env = config(&dir, "rocksdb", true, 2, &[]);
    run("resumed", env, Restore::Path(sp.display().to_string()), "gen-a", slow, &out2, vec![]);
    check(&lines(&[&out1, &out2]), 200_000, "stop with savepoint, then resume");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Wait (up to 60 s) until `cond` holds for the monitor's view.
fn wait_for(m: &weir::monitor::JobMonitor, what: &str, cond: impl Fn(&weir::monitor::JobView) -> bool) -> weir::monitor::JobView {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = m.view();
        if cond(&v) {
            return v;
        }
        assert!(!v.state.is_terminal(), "{what}: the job ended ({:?}, {:?}) first", v.state, v.failure);
        assert!(std::time::Instant::now() < deadline, "{what}: not within 60 s; view: {v:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Poll a command until it is done; returns its location.
fn wait_trigger(m: &weir::monitor::JobMonitor, trigger: &str) -> String {
    use weir::monitor::TriggerStatus;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match m.trigger_status(trigger).expect("a known trigger") {
            TriggerStatus::InProgress => assert!(std::time::Instant::now() < deadline, "trigger {trigger} not done within 60 s"),
            TriggerStatus::Completed { location, .. } => return location.expect("a location"),
            TriggerStatus::Failed { message } => panic!("trigger {trigger} failed: {message}; view: {:?}", m.view()),
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn completed(v: &weir::monitor::JobView) -> u64 {
    v.checkpoints.counts.completed
}

/// A savepoint of a running job (through its monitor, as the REST API asks for one) is full and
/// self-contained, and the incremental checkpoints after it stay restorable, although retention
/// (one checkpoint) then deletes everything the checkpoints before it wrote.
#[test]
fn a_savepoint_of_a_running_job_leaves_the_incremental_checkpoints_after_it_restorable() {
    use weir::monitor::JobCommand;
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG")).with_test_writer().try_init();
    for (backend, incremental) in BACKENDS {
        let what = format!("{backend}, incremental {incremental}");
        let dir = tmp(&format!("running-savepoint-{backend}-{incremental}"));
        let out = dir.join("out");
        let sp_dir = dir.join("savepoints");
        let cfg = config(&dir, backend, incremental, 2, &[("execution.checkpointing.num-retained", "1")]);
        let slow = GeneratorSource { count: 400_000, keys: 300, seed: 7, rate: Some(100_000.0) };
        let env = StreamEnv::new("running", cfg.clone());
        let m = env.monitor();
        let (g, o) = (slow.clone(), out.clone());
        let job = std::thread::spawn(move || {
            let (panic_at, seen) = (Arc::default(), Arc::default());
            env.execute(move |job| counting(job, "gen", &g, &o, &panic_at, &seen))
        });
        wait_for(&m, &what, |v| completed(v) >= 2);
        let t = m.submit(JobCommand::Savepoint { target: Some(sp_dir.display().to_string()) }).unwrap();
        let sp = PathBuf::from(wait_trigger(&m, &t));
        assert!(sp.starts_with(&sp_dir) && sp.join("_metadata").exists(), "{what}: {}", sp.display());
        let meta = std::fs::read_to_string(sp.join("_metadata")).unwrap();
        assert!(!meta.contains("\"Delta\"") && !meta.contains("\"RocksDb\""), "{what}: a savepoint has canonical files only:\n{meta}");
        let after = completed(&m.view());
        assert!(m.view().checkpoints.latest_savepoint.is_some_and(|s| s.is_savepoint), "{what}: latest savepoint reported");
        wait_for(&m, &what, |v| completed(v) >= after + 3);
        let cancel = m.submit(JobCommand::Cancel).unwrap();
        assert!(matches!(job.join().unwrap(), Err(weir::JobError::Cancelled)), "{what}: cancelled");
        assert!(matches!(m.trigger_status(&cancel), Some(weir::monitor::TriggerStatus::Completed { .. })));
        assert_eq!(m.view().state, weir::monitor::JobState::Canceled, "{what}");
        let before = lines(&[&out]).len();
        assert!(before < 400_000, "{what}: cancelled mid-input ({before} records)");
        // Resume from the latest (incremental) checkpoint, taken after the savepoint.
        run("running", cfg, Restore::Latest, "gen", slow, &out, vec![]);
        check(&lines(&[&out]), 400_000, &what);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// What the monitor shows of a running job (vertices, records, latency, checkpoints), and stop
/// with a savepoint asked through it: the job finishes, and the savepoint resumes it exactly once.
#[test]
fn the_monitor_shows_the_job_and_stops_it_with_a_savepoint() {
    use weir::monitor::{JobCommand, JobState, VertexKind};
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG")).with_test_writer().try_init();
    let dir = tmp("monitor-stop");
    let (out1, out2) = (dir.join("out1"), dir.join("out2"));
    let sp_dir = dir.join("stop-savepoints");
    let cfg = config(&dir, "hashmap", true, 2, &[("metrics.reporter.interval", "50ms"), ("metrics.latency.interval", "1 s")]);
    let slow = GeneratorSource { count: 300_000, keys: 300, seed: 9, rate: Some(100_000.0) };
    let env = StreamEnv::new("monitored", cfg.clone());
    let m = env.monitor();
    assert_eq!(m.view().state, JobState::Created);
    let (g, o) = (slow.clone(), out1.clone());
    let job = std::thread::spawn(move || {
        let (panic_at, seen) = (Arc::default(), Arc::default());
        env.execute(move |job| counting(job, "gen", &g, &o, &panic_at, &seen))
    });
    let v = wait_for(&m, "metrics", |v| {
        completed(v) >= 2 && v.vertices.iter().all(|x| x.subtasks.len() == 2 && x.subtasks.iter().all(|s| s.records_in + s.records_out > 0))
    });
    assert_eq!(v.state, JobState::Running);
    let kinds: Vec<(&str, VertexKind)> = v.vertices.iter().map(|x| (x.name.as_str(), x.kind)).collect();
    assert_eq!(kinds, [("gen", VertexKind::Source), ("counts", VertexKind::Keyed), ("out", VertexKind::Sink)]);
    assert_eq!((v.vertices[1].inputs.clone(), v.vertices[2].inputs.clone()), (vec![0], vec![1]), "the graph's edges");
    // Records out of the source reach the keyed operator (in flight aside), which emits one line per record.
    // (Workers report at their own moments: the counts are of slightly different times.)
    let src_out: u64 = v.vertices[0].subtasks.iter().map(|s| s.records_out).sum();
    let keyed_in: u64 = v.vertices[1].subtasks.iter().map(|s| s.records_in).sum();
    assert!(keyed_in > 0 && src_out > 0 && v.vertices[0].subtasks.iter().all(|s| s.records_in == 0), "records: source out {src_out}, keyed in {keyed_in}");
    let sink_latency = wait_for(&m, "latency", |v| v.vertices[2].subtasks.iter().any(|s| s.latency.is_some_and(|l| l.count > 0)));
    let l = sink_latency.vertices[2].subtasks.iter().find_map(|s| s.latency).unwrap();
    assert!(l.p50 <= l.p99 && l.p99 <= l.max && l.max < 60_000.0, "a sane latency: {l:?}");
    let c = v.checkpoints.history.iter().find(|c| c.status == weir::monitor::CheckpointStatus::Completed).expect("a completed checkpoint");
    // Every stateful subtask acknowledged: source, keyed operator and sink, two subtasks each.
    assert_eq!((c.num_subtasks, c.num_acknowledged_subtasks), (6, 6), "{c:?}");
    assert!(c.tasks.iter().any(|t| t.vertex == 1 && t.subtasks.len() == 2), "{c:?}");
    assert!(c.external_path.as_deref().is_some_and(|p| p.ends_with(&format!("chk-{}", c.id))), "{c:?}");

    let t = m.submit(JobCommand::StopWithSavepoint { target: Some(sp_dir.display().to_string()) }).unwrap();
    assert_eq!(m.submit(JobCommand::Cancel), Err(weir::monitor::CommandError::AlreadyStopping));
    let r = job.join().unwrap().unwrap();
    let sp = r.savepoint.expect("stop with a savepoint");
    assert_eq!(wait_trigger(&m, &t), sp);
    assert!(PathBuf::from(&sp).starts_with(&sp_dir), "{sp}");
    assert_eq!(m.view().state, JobState::Finished);
    assert!(matches!(m.submit(JobCommand::Checkpoint), Err(weir::monitor::CommandError::NotRunning(JobState::Finished))));
    let before = lines(&[&out1]).len();
    assert!(before > 0 && before < 300_000, "stopped mid-input: {before} records");
    run("resumed", cfg, Restore::Path(sp), "gen", slow, &out2, vec![]);
    check(&lines(&[&out1, &out2]), 300_000, "stop with a savepoint through the monitor, then resume");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stop with a savepoint takes effect at once, not at the next periodic checkpoint: here there
/// is none for ten minutes.
#[test]
fn stop_with_a_savepoint_does_not_wait_for_the_next_periodic_checkpoint() {
    use weir::monitor::JobCommand;
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG")).with_test_writer().try_init();
    let dir = tmp("stop-long-interval");
    let out = dir.join("out");
    let cfg = config(&dir, "hashmap", false, 2, &[("execution.checkpointing.interval", "10 min")]);
    let slow = GeneratorSource { count: 10_000_000, keys: 300, seed: 3, rate: Some(50_000.0) };
    let env = StreamEnv::new("long", cfg);
    let m = env.monitor();
    let o = out.clone();
    let job = std::thread::spawn(move || {
        let (panic_at, seen) = (Arc::default(), Arc::default());
        env.execute(move |job| counting(job, "gen", &slow, &o, &panic_at, &seen))
    });
    wait_for(&m, "running with records", |v| v.records_read() > 0);
    let t = m.submit(JobCommand::StopWithSavepoint { target: Some(dir.join("sp").display().to_string()) }).unwrap();
    let sp = wait_trigger(&m, &t);
    let r = job.join().unwrap().unwrap();
    assert_eq!(r.savepoint.as_deref(), Some(sp.as_str()));
    assert_eq!(r.checkpoints.len(), 1, "only the final checkpoint, the savepoint");
    let _ = std::fs::remove_dir_all(&dir);
}

//! An incremental RocksDB checkpoint restored into another job directory at the same parallelism
//! (the native fast path): the new job's checkpoints list only files of its own directory, so
//! they restore after the first job's directory is gone.
use std::path::Path;
use weir::sink::FileSink;
use weir::source::GeneratorSource;
use weir::state::{KeyedContext, KeyedProcessFunction, StateTables, ValueState};
use weir::{JobConfig, Restore, Row, StreamEnv, Value};

#[derive(Default)]
struct Count(Option<ValueState<u64>>);
impl KeyedProcessFunction<i64, Row, String> for Count {
    fn open(&mut self, s: &mut StateTables<i64>) { self.0 = Some(s.value_state("count")); }
    fn process(&mut self, ctx: &mut KeyedContext<'_, i64>, _row: Row, out: &mut Vec<String>) {
        let st = self.0.as_ref().unwrap();
        let c = st.get(ctx).copied().unwrap_or(0) + 1;
        st.set(ctx, c);
        out.push(format!("{},{c}", ctx.key()));
    }
}

fn config(dir: &Path, ck: &str) -> JobConfig {
    JobConfig::from_pairs([
        ("parallelism.default", "2".to_string()),
        ("execution.checkpointing.interval", "20ms".into()),
        ("execution.checkpointing.dir", dir.join(ck).display().to_string()),
        ("execution.checkpointing.num-retained", "2".into()),
        ("state.backend.type", "rocksdb".into()),
        ("execution.checkpointing.incremental", "true".into()),
        ("weir.state.rocksdb.dir", dir.join("rocksdb").display().to_string()),
        ("weir.source.batch-size", "256".into()),
    ]).unwrap()
}

fn run(name: &str, c: JobConfig, restore: Restore, source: &str, out: &Path, seed: u64, count: u64) {
    let out = out.to_path_buf();
    let source = source.to_string();
    StreamEnv::new(name, c).restore(restore).allow_non_restored_state(true).execute(move |job| {
        job.uid(&source).source("gen", GeneratorSource { count, keys: 200_000, seed, rate: Some(300_000.0) })
            .key_by(|r: &Row| match r.get(0) { Value::Int(k) => *k, _ => unreachable!() })
            .uid("counts").process("counts", Count::default())
            .sink("out", FileSink::new(&out, |s: &String, b: &mut Vec<u8>| { b.extend_from_slice(s.as_bytes()); b.push(b'\n'); }));
    }).unwrap();
}

#[test]
fn a_rocksdb_incremental_restore_from_another_directory_writes_restorable_checkpoints() {
    let dir = std::env::temp_dir().join(format!("review-cross-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run("first", config(&dir, "ck1"), Restore::None, "gen-a", &dir.join("out1"), 1, 400_000);
    let s1 = weir_storage::CheckpointStorage::open(dir.join("ck1").to_str().unwrap(), "first").unwrap();
    let id = *s1.completed_checkpoints().unwrap().last().unwrap();
    let chk = dir.join("ck1").join("first").join(format!("chk-{id}"));
    // Same parallelism (the native fast path), another checkpoint directory.
    run("second", config(&dir, "ck2"), Restore::Path(chk.display().to_string()), "gen-b", &dir.join("out2"), 2, 3_000);
    std::fs::remove_dir_all(dir.join("ck1")).unwrap();
    let s2 = weir_storage::CheckpointStorage::open(dir.join("ck2").to_str().unwrap(), "second").unwrap();
    match s2.latest_valid().unwrap() {
        weir_storage::LatestValid::Found(m, rejected) => assert!(rejected.is_empty(), "checkpoint {} valid but newer ones rejected: {:?}", m.id, rejected.iter().map(|(i, e)| format!("{i}: {e}")).collect::<Vec<_>>()),
        weir_storage::LatestValid::Empty => panic!("no checkpoint"),
        weir_storage::LatestValid::NoneValid(e) => panic!("{e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

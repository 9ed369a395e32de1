//! `weir bench state`: the keyed state backends (`hashmap`, `rocksdb`) on one keyed job (a
//! running sum in a `ValueState<i64>` per key), both in one run, so that the ratios compare
//! measurements of the same moment of the machine:
//!
//! 1. bytes a checkpoint writes with 1 % of the keys changed since the previous one,
//!    incremental against full: the keys are populated, then rounds of 1 % of them are updated,
//!    one round per checkpoint (a round starts only after the source saw a barrier);
//! 2. checkpoint duration (p50) and the worker's synchronous pause (max) of those runs and of
//!    the throughput runs;
//! 3. throughput with 1 s incremental checkpoints against checkpointing off;
//! 4. restore of N keys from the final checkpoint of a bounded job, from the task-local copy
//!    against checkpoint storage.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use weir::sink::BlackholeSink;
use weir::source::{GeneratorSource, Poll, Source, SourceContext, SourceError, SourceReader};
use weir::state::{KeyedContext, KeyedProcessFunction, StateTables, ValueState};
use weir::{JobConfig, JobResult, Restore, Row, StreamEnv, Value};
use weir_checkpoint::{CheckpointMetadata, SplitOffset, StateFileHandle, StateFileKind};

use super::{percentile, BenchArgs};

/// The backends compared (`state.backend.type`).
const BACKENDS: [&str; 2] = ["hashmap", "rocksdb"];

/// Splits of [`RoundsSource`]: enough to spread over any parallelism the bench is run at.
const SPLITS: u64 = 16;

/// A round updates the keys whose index within their split is `r mod ROUND_STRIDE`: 1 %.
const ROUND_STRIDE: u64 = 100;

/// Emits each of `keys` keys once (populate), then `rounds` rounds that each update 1 % of the
/// keys (distinct keys within a round, other keys in the next), with value 1. A round is
/// released only once the instance's source has passed a checkpoint barrier since it emitted
/// everything released before, so that each checkpoint after populate holds one round.
#[derive(Clone, Debug)]
struct RoundsSource {
    keys: u64,
    rounds: u64,
}

impl RoundsSource {
    /// Keys of split `j` (key `m * SPLITS + j` is its `m`-th).
    fn populate_len(&self, j: u64) -> u64 {
        self.keys / SPLITS + u64::from(j < self.keys % SPLITS)
    }

    /// Records of round `r` in split `j`.
    fn round_len(&self, j: u64, r: u64) -> u64 {
        self.populate_len(j).saturating_sub(r % ROUND_STRIDE).div_ceil(ROUND_STRIDE)
    }

    /// Where split `j`'s input ends once `level` rounds are released.
    fn end(&self, j: u64, level: u64) -> u64 {
        self.populate_len(j) + (0..level).map(|r| self.round_len(j, r)).sum::<u64>()
    }

    /// Keys updated by one round over all splits.
    fn keys_per_round(&self) -> u64 {
        (0..SPLITS).map(|j| self.round_len(j, 0)).sum()
    }

    /// The key of record `p` of split `j`.
    fn key_at(&self, j: u64, mut p: u64) -> i64 {
        let n = self.populate_len(j);
        let m = if p < n {
            p
        } else {
            p -= n;
            let mut r = 0;
            while p >= self.round_len(j, r) {
                p -= self.round_len(j, r);
                r += 1;
            }
            r % ROUND_STRIDE + ROUND_STRIDE * p
        };
        (m * SPLITS + j) as i64
    }
}

struct RoundsReader {
    src: RoundsSource,
    /// (split, records emitted).
    splits: Vec<(u64, u64)>,
    /// Rounds released.
    level: u64,
    /// Barriers seen when everything released was emitted: the next round waits for one more.
    mark: Option<u64>,
    /// Barriers seen (the runtime reads the offsets at each barrier, and only then).
    barriers: Cell<u64>,
}

impl Source<Row> for RoundsSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok((0..SPLITS).map(|j| SplitOffset::new(j, 0)).collect())
    }

    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        let splits: Vec<(u64, u64)> = splits.iter().map(|s| (s.split, s.offset)).collect();
        // Restored mid-input: release whatever the restored positions are part of.
        let mut level = 0;
        while level < self.rounds && splits.iter().any(|&(j, p)| p > self.end(j, level)) {
            level += 1;
        }
        Ok(Box::new(RoundsReader { src: self.clone(), splits, level, mark: None, barriers: Cell::new(0) }))
    }
}

impl SourceReader<Row> for RoundsReader {
    fn poll(&mut self, out: &mut Vec<Row>, mut max: usize) -> Result<Poll, SourceError> {
        loop {
            for (j, pos) in &mut self.splits {
                let end = self.src.end(*j, self.level);
                while *pos < end && max > 0 {
                    out.push(Row::new([Value::Int(self.src.key_at(*j, *pos)), Value::Int(1)]));
                    *pos += 1;
                    max -= 1;
                }
            }
            if max == 0 {
                return Ok(Poll::More);
            }
            if self.level >= self.src.rounds {
                return Ok(Poll::Finished);
            }
            match self.mark {
                Some(m) if self.barriers.get() > m => {
                    self.level += 1;
                    self.mark = None;
                }
                Some(_) => return Ok(Poll::Idle),
                None => {
                    self.mark = Some(self.barriers.get());
                    return Ok(Poll::Idle);
                }
            }
        }
    }

    fn offsets(&self) -> Vec<SplitOffset> {
        self.barriers.set(self.barriers.get() + 1);
        self.splits.iter().map(|&(j, p)| SplitOffset::new(j, p)).collect()
    }
}

/// The keyed operator: a running sum per key in a value state.
#[derive(Default)]
struct RunningSum {
    sum: Option<ValueState<i64>>,
}

impl KeyedProcessFunction<i64, Row, ()> for RunningSum {
    fn open(&mut self, states: &mut StateTables<i64>) {
        self.sum = Some(states.value_state("sum"));
    }

    fn process(&mut self, ctx: &mut KeyedContext<'_, i64>, row: Row, _: &mut Vec<()>) {
        let v = match row.get(1) {
            Value::Int(v) => *v,
            _ => 0,
        };
        if let Some(sum) = &self.sum {
            *sum.get_or_insert_with(ctx, || 0) += v;
        }
    }
}

/// One job run.
struct JobRun {
    result: JobResult,
    /// Wall time of the whole job.
    secs: f64,
    /// The slowest worker's build of the keyed operator: opening its backend and restoring its
    /// state.
    setup_secs: f64,
}

/// The bench's directories (all under `--dir`, removed when it ends) and job names.
struct Bench<'a> {
    args: &'a BenchArgs,
    root: PathBuf,
    runs: Cell<usize>,
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Bench<'_> {
    fn checkpoint_dir(&self) -> PathBuf {
        self.root.join("ck")
    }

    fn local_dir(&self) -> PathBuf {
        self.root.join("local")
    }

    /// A job name of its own.
    fn job_name(&self, tag: &str) -> String {
        let n = self.runs.get();
        self.runs.set(n + 1);
        format!("bench-state-{}-{n}-{tag}", std::process::id())
    }

    fn config(&self, backend: &str, interval: Option<&str>, incremental: bool, extra: &[(&str, String)]) -> Result<JobConfig> {
        let mut pairs = vec![
            ("parallelism.default".to_string(), self.args.parallelism.to_string()),
            ("execution.checkpointing.dir".to_string(), self.checkpoint_dir().display().to_string()),
            ("state.backend.type".to_string(), backend.to_string()),
            ("execution.checkpointing.incremental".to_string(), incremental.to_string()),
            ("weir.state.rocksdb.dir".to_string(), self.root.join("rocksdb").display().to_string()),
            // A failure fails the bench instead of hiding in a restart's time.
            ("restart-strategy.type".to_string(), "none".to_string()),
        ];
        if let Some(i) = interval {
            pairs.push(("execution.checkpointing.interval".into(), i.to_string()));
        }
        pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        Ok(JobConfig::from_pairs(pairs)?)
    }

    /// Run source (uid `source_uid`) → key_by → the running sum (uid `sums`) → blackhole.
    fn run<S>(&self, name: &str, config: JobConfig, restore: Restore, source: S, source_uid: &str) -> Result<JobRun>
    where
        S: Source<Row> + Clone + Send + Sync,
    {
        let setup_us = Arc::new(AtomicU64::new(0));
        let (setup, uid) = (setup_us.clone(), source_uid.to_string());
        let env = StreamEnv::new(name, config).restore(restore).allow_non_restored_state(true);
        let start = Instant::now();
        let result = env
            .execute(move |job| {
                let keyed = job.uid(&uid).source("input", source.clone()).key_by(|r: &Row| match r.get(0) {
                    Value::Int(k) => *k,
                    _ => 0,
                });
                // The keyed operator opens its backend and restores its state as it is built.
                let t = Instant::now();
                let sums = keyed.uid("sums").process("sums", RunningSum::default());
                setup.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                sums.sink("blackhole", BlackholeSink);
            })
            .with_context(|| format!("job {name}"))?;
        let secs = start.elapsed().as_secs_f64();
        Ok(JobRun { result, secs, setup_secs: setup_us.load(Ordering::Relaxed) as f64 / 1e6 })
    }

    fn remove_job(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.checkpoint_dir().join(name));
        let _ = std::fs::remove_dir_all(self.local_dir().join(name));
    }
}

/// Figures of a set of checkpoints.
struct Figures {
    /// Bytes written: median, min, max.
    bytes: (u64, u64, u64),
    /// Trigger → completion, p50 (ms).
    duration_p50: u64,
    /// The largest synchronous pause of a subtask per checkpoint: p50 and max (µs).
    sync: (u64, u64),
}

impl Figures {
    fn of(cps: &[&CheckpointMetadata]) -> Self {
        let mut bytes: Vec<u64> = cps.iter().map(|m| m.bytes()).collect();
        let mut dur: Vec<u64> = cps.iter().map(|m| m.duration_ms()).collect();
        let mut sync: Vec<u64> = cps.iter().map(|m| m.max_costs().1).collect();
        Figures {
            bytes: (percentile(&mut bytes, 0.5), percentile(&mut bytes, 0.0), percentile(&mut bytes, 1.0)),
            duration_p50: percentile(&mut dur, 0.5),
            sync: (percentile(&mut sync, 0.5), percentile(&mut sync, 1.0)),
        }
    }

    fn sync(&self) -> String {
        format!("{}/{}", self.sync.0, self.sync.1)
    }
}

/// The checkpoints that each hold one round: the last `rounds` ones (the final checkpoint holds
/// the last round) less the final one.
fn round_checkpoints(r: &JobResult, rounds: u64) -> Vec<&CheckpointMetadata> {
    let mut cps: Vec<&CheckpointMetadata> = r.checkpoints.iter().collect();
    cps.sort_by_key(|m| m.id);
    let from = cps.len().saturating_sub(rounds as usize);
    cps[from..].iter().copied().filter(|m| !m.is_final).collect()
}

/// Whether checkpoint `m` wrote file `path` (`chk-<id>/…` or `shared/chk<id>-…`), rather than
/// listing one of an earlier checkpoint.
fn written_by(m: &CheckpointMetadata, path: &str) -> bool {
    let id = m.id.to_string();
    path.strip_prefix("chk-").or_else(|| path.strip_prefix("shared/chk")).and_then(|rest| rest.strip_prefix(id.as_str())).is_some_and(|rest| rest.starts_with(['/', '-']))
}

/// RocksDB's incremental checkpoints: (median bytes of new SST files, median bytes of the
/// other files written, median bytes of the SST files listed).
fn sst_split(cps: &[&CheckpointMetadata]) -> (u64, u64, u64) {
    let (mut sst, mut other, mut listed) = (Vec::new(), Vec::new(), Vec::new());
    for m in cps {
        let files: Vec<_> = m.subtasks.iter().flat_map(|(_, s)| s.state_files.iter()).collect();
        let is_sst = |f: &&&StateFileHandle| f.kind == StateFileKind::RocksDb && f.state.ends_with(".sst");
        sst.push(files.iter().filter(is_sst).filter(|f| written_by(m, &f.path)).map(|f| f.size).sum());
        other.push(files.iter().filter(|f| !is_sst(f)).filter(|f| written_by(m, &f.path)).map(|f| f.size).sum());
        listed.push(files.iter().filter(is_sst).map(|f| f.size).sum());
    }
    (percentile(&mut sst, 0.5), percentile(&mut other, 0.5), percentile(&mut listed, 0.5))
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()));
    match model {
        Some(m) => format!("{cores} cores ({m})"),
        None => format!("{cores} cores"),
    }
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let keys = args.keys.max(1);
    let rounds: u64 = if args.quick { 3 } else { 8 };
    let interval = if args.quick { "200ms" } else { "1s" };
    let records = if args.quick { args.records.min(keys * 10) } else { args.records };
    let restore_keys: Vec<u64> = match &args.restore_keys {
        Some(v) => v.clone(),
        None if args.quick => vec![keys],
        None => vec![1_000_000, 10_000_000],
    };
    let repeat = args.repeat.unwrap_or(1).max(1);
    // Restores are short next to their populate job: a median of 3 costs little.
    let restore_repeat = args.repeat.unwrap_or(3).max(1);
    let b = Bench { args, root: PathBuf::from(&args.dir).join(format!("state-{}", std::process::id())), runs: Cell::new(0) };
    let _ = std::fs::remove_dir_all(&b.root);
    std::fs::create_dir_all(&b.root).with_context(|| format!("creating {}", b.root.display()))?;
    let src = RoundsSource { keys, rounds };
    let per_round = src.keys_per_round();

    println!("weir bench state: state backends {} in one run", BACKENDS.join(" and "));
    println!(
        "job: source → key_by → running sum (one ValueState<i64> per key, KeyedProcessFunction) → blackhole sink, parallelism {}",
        args.parallelism
    );
    let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().map(str::to_string)).unwrap_or_else(|| "-".into());
    println!("machine: {}, load average {load} at start; checkpoint storage and local copies on the local disk ({})", machine(), b.root.display());
    println!(
        "1. checkpoint bytes: {keys} keys populated, then {rounds} rounds each updating {per_round} distinct keys ({:.1} %), one round per {interval} checkpoint; full (incremental off) vs incremental",
        100.0 * per_round as f64 / keys as f64
    );
    println!("2. checkpoint duration (p50) and the largest synchronous pause of a subtask (max), of those checkpoints and of the throughput runs");
    println!(
        "3. throughput: {records} records over {keys} keys (more where that takes under {} s), {interval} incremental checkpoints vs checkpointing off (median of {repeat})",
        if args.quick { 1 } else { 10 }
    );
    println!(
        "4. restore of {} keys from a bounded job's final (incremental) checkpoint: task-local copy vs checkpoint storage (median of {restore_repeat})",
        restore_keys.iter().map(u64::to_string).collect::<Vec<_>>().join(" and ")
    );

    // 1 and 2: full and incremental checkpoints under 1 % changes.
    println!();
    println!(
        "{:<9} {:<12} {:>5} {:>8} {:>14} {:>22} {:>10} {:>18}",
        "backend", "checkpoints", "keys", "chk", "MB/chk median", "MB/chk min..max", "p50 ms", "sync µs p50/max"
    );
    let mut ratios = Vec::new();
    let mut incremental_figures = Vec::new();
    let mut sst_lines = Vec::new();
    for backend in BACKENDS {
        let mut medians = [0u64; 2];
        for (i, incremental) in [false, true].into_iter().enumerate() {
            let name = b.job_name(&format!("bytes-{backend}-{}", if incremental { "incremental" } else { "full" }));
            let run = b.run(&name, b.config(backend, Some(interval), incremental, &[])?, Restore::None, src.clone(), "input")?;
            b.remove_job(&name);
            let cps = round_checkpoints(&run.result, rounds);
            if cps.is_empty() {
                bail!("{backend}: no checkpoint after the populate phase (checkpoints: {})", run.result.checkpoints.len());
            }
            let standalone = cps.iter().filter(|m| !m.is_incremental()).count();
            if incremental && standalone > 0 {
                tracing::warn!(
                    "{backend}: {standalone} of {} incremental checkpoints after populate list no file of an earlier one (a new heap base, or a RocksDB compaction that rewrote every SST file)",
                    cps.len()
                );
            }
            let f = Figures::of(&cps);
            let (med, min, max) = f.bytes;
            medians[i] = med;
            let label = if incremental { "incremental" } else { "full" };
            println!(
                "{backend:<9} {label:<12} {:>5} {:>8} {:>14.3} {:>22} {:>10} {:>18}",
                format!("{}k", keys / 1000),
                cps.len(),
                mb(med),
                format!("{:.3}..{:.3}", mb(min), mb(max)),
                f.duration_p50,
                f.sync()
            );
            if incremental {
                incremental_figures.push((backend, f.duration_p50, f.sync));
                if backend == "rocksdb" {
                    sst_lines.push(sst_split(&cps));
                }
            }
        }
        ratios.push((backend, medians[1] as f64 / medians[0].max(1) as f64, medians[0], medians[1]));
    }
    println!();
    for (backend, ratio, full, inc) in &ratios {
        println!(
            "{backend}: full checkpoint {:.2} MB, incremental {:.3} MB per checkpoint (median)",
            mb(*full),
            mb(*inc)
        );
        println!("{backend}: incremental/full bytes (1% changed): {:.2}%", 100.0 * ratio);
    }
    for (sst, other, listed) in &sst_lines {
        println!(
            "rocksdb incremental, per checkpoint (median): {:.3} MB of new SST files, {:.3} MB of other files (MANIFEST, OPTIONS, ...); it lists {:.2} MB of SST files in all ({:.2}% of them written)",
            mb(*sst),
            mb(*other),
            mb(*listed),
            100.0 * (*sst + *other) as f64 / (*listed).max(1) as f64
        );
    }
    println!("(target ≤ 2 %; for comparison, Flink's RocksDB backend writes about a third of a full checkpoint here: not measured by this command)");

    // 3 (and 2): throughput with checkpoints vs off.
    println!();
    println!(
        "{:<9} {:<28} {:>10} {:>8} {:>5} {:>10} {:>18} {:>12}",
        "backend", "run", "M rec/s", "vs off", "chk", "p50 ms", "sync µs p50/max", "MB/chk med"
    );
    let mut throughput = Vec::new();
    // Enough input for several checkpoints: a backend that goes through `records` in less than
    // the target time gets proportionally more.
    let target_secs = if args.quick { 1.0 } else { 10.0 };
    for backend in BACKENDS {
        let mut records = records;
        let mut probe_run = None;
        // The run that is long enough is the first run with checkpointing off; a short one's
        // time is mostly the job's start, hence a few tries.
        for tries in 1.. {
            let probe = b.job_name(&format!("throughput-probe-{backend}"));
            let gen = GeneratorSource { count: records, keys, seed: 1, rate: None };
            let secs = b.run(&probe, b.config(backend, None, true, &[])?, Restore::None, gen, "gen")?.secs;
            b.remove_job(&probe);
            if secs >= 0.8 * target_secs || tries == 4 {
                probe_run = Some(secs);
                break;
            }
            records = (records as f64 * (target_secs / secs.max(1e-3)).min(20.0)).ceil() as u64;
        }
        let gen = GeneratorSource { count: records, keys, seed: 1, rate: None };
        let mut secs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut cps: Vec<CheckpointMetadata> = Vec::new();
        // Interleaved, so that a slow moment of the machine hits both.
        for _ in 0..repeat {
            for (i, iv) in [None, Some(interval)].into_iter().enumerate() {
                if let Some(s) = probe_run.take().filter(|_| i == 0) {
                    secs[0].push(s);
                    continue;
                }
                let name = b.job_name(&format!("throughput-{backend}"));
                let run = b.run(&name, b.config(backend, iv, true, &[])?, Restore::None, gen.clone(), "gen")?;
                b.remove_job(&name);
                secs[i].push(run.secs);
                cps.extend(run.result.checkpoints.into_iter().filter(|m| !m.is_final));
            }
        }
        let off = records as f64 / median(&mut secs[0]);
        let on = records as f64 / median(&mut secs[1]);
        println!(
            "{backend:<9} {:<28} {:>10.3} {:>8} {:>5} {:>10} {:>18} {:>12}",
            format!("checkpointing off ({:.1}M rec)", records as f64 / 1e6),
            off / 1e6,
            "100.0%",
            "-",
            "-",
            "-",
            "-"
        );
        let refs: Vec<&CheckpointMetadata> = cps.iter().collect();
        let f = Figures::of(&refs);
        let show = |v: String| if refs.is_empty() { "-".to_string() } else { v };
        println!(
            "{backend:<9} {:<28} {:>10.3} {:>7.1}% {:>5} {:>10} {:>18} {:>12}",
            format!("{interval} incremental checkpoints"),
            on / 1e6,
            100.0 * on / off,
            refs.len(),
            show(f.duration_p50.to_string()),
            show(f.sync()),
            show(format!("{:.2}", mb(f.bytes.0)))
        );
        throughput.push((backend, on / off));
    }

    // 4: restore from the local copy vs from checkpoint storage.
    println!();
    println!(
        "{:<9} {:>6} {:>10} {:>12} {:>15} {:>14} {:>14} {:>20}",
        "backend", "keys", "chk MB", "local MB", "local copies", "from local s", "from storage s", "job wall − empty s"
    );
    let mut restore_lines = Vec::new();
    for backend in BACKENDS {
        for &n in &restore_keys {
            let name = b.job_name(&format!("restore-{backend}"));
            let local = [
                ("execution.checkpointing.local-backup.enabled", "true".to_string()),
                ("weir.state.local.dir", b.local_dir().display().to_string()),
            ];
            // A long interval: the final checkpoint is the only one.
            let populate = b.run(&name, b.config(backend, Some("1h"), true, &local)?, Restore::None, RoundsSource { keys: n, rounds: 0 }, "input")?;
            let Some(last) = populate.result.checkpoints.iter().filter(|m| m.is_final).max_by_key(|m| m.id) else {
                bail!("{backend}, {n} keys: the bounded job wrote no final checkpoint");
            };
            let chk = b.checkpoint_dir().join(&name).join(format!("chk-{}", last.id));
            // Which of the checkpoint's files have a local copy of the same size.
            // (`<local dir>/<job>/<operator uid>-<subtask>/<path>`.)
            let files: Vec<_> = last.subtasks.iter().flat_map(|(t, s)| s.state_files.iter().map(move |f| (t, s, f))).collect();
            let copied = files
                .iter()
                .filter(|(t, s, f)| {
                    let copy = weir::state::local_copy_path(&b.local_dir(), &name, &s.uid, t.subtask, &f.path);
                    std::fs::metadata(copy).is_ok_and(|m| m.len() == f.size)
                })
                .count();
            let restore_config = |from_local: bool| {
                b.config(backend, None, false, &[
                    ("weir.state.local.dir", b.local_dir().display().to_string()),
                    ("execution.state-recovery.from-local", from_local.to_string()),
                ])
            };
            let empty = RoundsSource { keys: 0, rounds: 0 };
            let (mut base, mut from_local, mut from_storage) = (Vec::new(), Vec::new(), Vec::new());
            let (mut wall_local, mut wall_storage) = (Vec::new(), Vec::new());
            for rep in 0..restore_repeat {
                // The same name: the task-local copies are found under the job's name.
                let e = b.run(&name, restore_config(true)?, Restore::None, empty.clone(), "empty")?;
                base.push(e.secs);
                let mut order = [(true, &mut from_local, &mut wall_local), (false, &mut from_storage, &mut wall_storage)];
                // Alternated: neither gets the other's warm page cache every time.
                if rep % 2 == 1 {
                    order.reverse();
                }
                for (local, setup, wall) in order {
                    let r = b.run(&name, restore_config(local)?, Restore::Path(chk.display().to_string()), empty.clone(), "empty")?;
                    if r.result.restored_from != Some(last.id) {
                        bail!("{backend}, {n} keys: the job restored {:?}, not checkpoint {}", r.result.restored_from, last.id);
                    }
                    setup.push(r.setup_secs);
                    wall.push(r.secs - e.secs);
                }
            }
            let (l, s, empty_wall) = (median(&mut from_local), median(&mut from_storage), median(&mut base));
            let (wl, ws) = (median(&mut wall_local), median(&mut wall_storage));
            println!(
                "{backend:<9} {:>6} {:>10.1} {:>12.1} {:>15} {l:>14.3} {s:>14.3} {:>20}",
                if n >= 1_000_000 { format!("{}M", n / 1_000_000) } else { format!("{}k", n / 1000) },
                mb(last.referenced_bytes()),
                mb(dir_bytes(&b.local_dir().join(&name))),
                format!("{copied} of {}", files.len()),
                format!("{wl:.3} / {ws:.3}")
            );
            restore_lines.push((backend, n, l, s, empty_wall));
            b.remove_job(&name);
        }
    }
    println!("(from local / from storage: the slowest subtask's build of the keyed operator, which opens the backend and restores its key groups;");
    println!(" job wall − empty: the restoring job's wall time less an empty job's ({}), local / storage)", {
        let mut e: Vec<String> = restore_lines.iter().map(|(bk, n, _, _, w)| format!("{bk} {n}: {w:.3} s")).collect();
        e.dedup();
        e.join(", ")
    });

    println!();
    for (backend, ratio, _, _) in &ratios {
        println!("{backend}: incremental/full bytes (1% changed): {:.2}%", 100.0 * ratio);
    }
    for (backend, p50, (sync_p50, sync_max)) in &incremental_figures {
        println!("{backend}: incremental checkpoint duration p50 {p50} ms, sync pause p50 {sync_p50} µs, max {sync_max} µs");
    }
    for (backend, r) in &throughput {
        println!("{backend}: throughput with {interval} checkpoints / off: {:.1}%", 100.0 * r);
    }
    for (backend, n, l, s, _) in &restore_lines {
        println!("{backend}: restore of {n} keys: from local copy {l:.3} s, from storage {s:.3} s ({:.2}x)", s / l.max(1e-6));
    }
    Ok(())
}

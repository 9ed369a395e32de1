//! `weir bench latency`: event-to-sink latency of the keyed-sum job at a fixed source rate, with
//! checkpointing off, every 1 s and every 200 ms, in one run.
//!
//! Every record carries its *scheduled* time: when the rate schedule says it was due, not when
//! the source got round to emitting it. A source that falls behind (a busy worker, flow control,
//! a checkpoint pause) therefore shows the delay in every record it owes, instead of emitting
//! them late with fresh times (coordinated omission). The sink measures `now - scheduled` per
//! record; the engine's own per-operator latency (batch emit time → operator, see
//! `weir::runtime::metrics`) is printed beside it as a cross-check.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{bail, Result};
use weir::monitor::{wall_ms, LatencyHistogram, VertexKind};
use weir::sink::{Sink, SinkContext, SinkError, SinkWriter};
use weir::source::{GeneratorSource, Poll, Source, SourceContext, SourceError, SourceReader};
use weir::state::{KeyedContext, KeyedProcessFunction, StateTables, ValueState};
use weir::{JobConfig, StreamEnv};
use weir_checkpoint::{CheckpointMetadata, SplitOffset};

use super::{keyed_costs, percentile, BenchArgs};

/// A record: key, value, scheduled time (µs since the run's schedule started).
type Event = (i64, i64, u64);

/// The unthrottled run that finds the maximum rate lasts about this long (its size is set
/// from a first, short probe of [`PROBE_RECORDS`]).
const CALIBRATION_SECS: f64 = 3.0;
const PROBE_RECORDS: u64 = 2_000_000;

/// Width of the timeline slots in which the worst latency is kept (to line spikes up with
/// checkpoints).
const SLOT_US: u64 = 100_000;

/// The shared clock of one run: the schedule starts at the first poll of any source instance,
/// so that every instance's record `n` is due at the same moment.
#[derive(Clone, Default)]
struct Clock(Arc<OnceLock<Instant>>);

impl Clock {
    fn start(&self) -> Instant {
        *self.0.get_or_init(Instant::now)
    }

    /// µs since the start.
    fn now_us(&self) -> u64 {
        self.start().elapsed().as_micros() as u64
    }
}

/// How a [`PacedSource`] emits.
#[derive(Clone, Copy)]
enum Pace {
    /// `rate` records a second over all instances, for `secs` seconds.
    Fixed { rate: f64, secs: f64 },
    /// `count` records over all instances, as fast as the job takes them.
    Unthrottled { count: u64 },
}

/// The generator's keys and values on one schedule for all instances: global record `n` is due
/// at `(n + 1) / rate`, and each poll claims what is due and unclaimed. One shared schedule
/// (rather than a share per instance) makes the instances end together. That matters: a
/// finished source keeps its capability at its last batch's time until the final barrier, and
/// the flow-control window of the others waits on the probe it holds back, so an instance with
/// more than a window of batches still to emit when another finishes is never polled again
/// (see docs/BENCHMARKS.md, "Latency (issue 10)").
#[derive(Clone)]
struct PacedSource {
    gen: GeneratorSource,
    pace: Pace,
    clock: Clock,
    /// Global records claimed so far.
    claimed: Arc<AtomicU64>,
}

struct PacedReader {
    src: PacedSource,
    /// (split, offset): the generator's record `offset` of `split` comes next.
    splits: Vec<(u64, u64)>,
    cur: usize,
}

impl PacedSource {
    fn total(&self) -> u64 {
        match self.pace {
            Pace::Fixed { rate, secs } => (rate * secs) as u64,
            Pace::Unthrottled { count } => count,
        }
    }
}

impl Source<Event> for PacedSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok((0..self.gen.keys.clamp(1, 128)).map(|j| SplitOffset::new(j, 0)).collect())
    }

    /// The offsets give the keys and values; the schedule is not part of them (a restore would
    /// start a new one: the bench never restores).
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Event>>, SourceError> {
        if splits.is_empty() {
            return Err(SourceError::deterministic("paced source: fewer keys than instances"));
        }
        Ok(Box::new(PacedReader { src: self.clone(), splits: splits.iter().map(|s| (s.split, s.offset)).collect(), cur: 0 }))
    }
}

impl SourceReader<Event> for PacedReader {
    /// Emits everything that is due now (up to `max`), never waiting for a full batch: at a low
    /// rate a batch is what fell due since the last poll.
    fn poll(&mut self, out: &mut Vec<Event>, max: usize) -> Result<Poll, SourceError> {
        let now = self.src.clock.now_us();
        let total = self.src.total();
        let due = match self.src.pace {
            Pace::Fixed { rate, .. } => ((now as f64 / 1e6 * rate) as u64).min(total),
            Pace::Unthrottled { .. } => total,
        };
        let mut from = self.src.claimed.load(Ordering::Acquire);
        let n = loop {
            let n = due.saturating_sub(from).min(max as u64);
            if n == 0 {
                break 0;
            }
            match self.src.claimed.compare_exchange_weak(from, from + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break n,
                Err(now_claimed) => from = now_claimed,
            }
        };
        for i in from..from + n {
            let sched = match self.src.pace {
                Pace::Fixed { rate, .. } => ((i + 1) as f64 * 1e6 / rate) as u64,
                Pace::Unthrottled { .. } => now,
            };
            let (split, off) = &mut self.splits[self.cur];
            let (k, v) = self.src.gen.record(*split, *off);
            out.push((k, v, sched));
            *off += 1;
            self.cur = (self.cur + 1) % self.splits.len();
        }
        Ok(if from + n >= total {
            Poll::Finished
        } else if n == max as u64 {
            Poll::More
        } else {
            Poll::Idle
        })
    }

    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|&(s, o)| SplitOffset::new(s, o)).collect()
    }
}

/// The running sum per key, carrying the scheduled time of the record that updated it last.
#[derive(Default)]
struct RunningSum {
    sum: Option<ValueState<i64>>,
}

impl KeyedProcessFunction<i64, Event, Event> for RunningSum {
    fn open(&mut self, states: &mut StateTables<i64>) {
        self.sum = Some(states.value_state("sum"));
    }

    fn process(&mut self, ctx: &mut KeyedContext<'_, i64>, (k, v, sched): Event, out: &mut Vec<Event>) {
        let sum = self.sum.as_ref().expect("opened").get_or_insert_with(ctx, || 0);
        *sum += v;
        out.push((k, *sum, sched));
    }
}

/// What one sink instance saw.
#[derive(Default)]
struct SinkStats {
    /// `now - scheduled` of the records scheduled after the warm-up.
    latency: LatencyHistogram,
    /// Records and batches received (warm-up included).
    records: u64,
    batches: u64,
    /// First and last receive time, µs since the start.
    first_us: Option<u64>,
    last_us: u64,
    /// The worst latency (µs) per [`SLOT_US`] of scheduled time.
    worst: Vec<u64>,
}

impl SinkStats {
    fn merge(&mut self, o: &SinkStats) {
        self.latency.merge(&o.latency);
        self.records += o.records;
        self.batches += o.batches;
        self.first_us = match (self.first_us, o.first_us) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_us = self.last_us.max(o.last_us);
        if o.worst.len() > self.worst.len() {
            self.worst.resize(o.worst.len(), 0);
        }
        for (a, b) in self.worst.iter_mut().zip(&o.worst) {
            *a = (*a).max(*b);
        }
    }
}

/// A sink that measures latency; each instance registers its statistics with the bench.
#[derive(Clone)]
struct LatencySink {
    clock: Clock,
    warmup_us: u64,
    instances: Arc<Mutex<Vec<Arc<Mutex<SinkStats>>>>>,
}

struct LatencyWriter {
    clock: Clock,
    warmup_us: u64,
    stats: Arc<Mutex<SinkStats>>,
}

impl Sink<Event> for LatencySink {
    fn open(&self, _: &SinkContext) -> Result<Box<dyn SinkWriter<Event>>, SinkError> {
        let stats = Arc::new(Mutex::new(SinkStats::default()));
        self.instances.lock().map_err(|_| SinkError("latency sink: poisoned".into()))?.push(stats.clone());
        Ok(Box::new(LatencyWriter { clock: self.clock.clone(), warmup_us: self.warmup_us, stats }))
    }
}

impl SinkWriter<Event> for LatencyWriter {
    fn write(&mut self, _epoch: u64, batch: &mut Vec<Event>) -> Result<(), SinkError> {
        // One clock read and one lock per batch: its records arrived together.
        let now = self.clock.now_us();
        let mut s = self.stats.lock().map_err(|_| SinkError("latency sink: poisoned".into()))?;
        s.records += batch.len() as u64;
        s.batches += 1;
        s.first_us.get_or_insert(now);
        s.last_us = now;
        for (_, _, sched) in batch.drain(..) {
            if sched < self.warmup_us {
                continue;
            }
            let us = now.saturating_sub(sched);
            s.latency.record(us, 1);
            let slot = (sched / SLOT_US) as usize;
            if slot >= s.worst.len() {
                s.worst.resize(slot + 1, 0);
            }
            s.worst[slot] = s.worst[slot].max(us);
        }
        Ok(())
    }

    fn pre_commit(&mut self, _epoch: u64) -> Result<u64, SinkError> {
        Ok(0)
    }

    fn commit(&mut self, _upto: u64) -> Result<(), SinkError> {
        Ok(())
    }
}

/// One configuration's outcome.
struct LatencyRun {
    label: String,
    stats: SinkStats,
    checkpoints: Vec<CheckpointMetadata>,
    /// Trigger times of the checkpoints, ms since the schedule started.
    triggers_ms: Vec<i64>,
    /// The engine's p99 (ms) at the sink and at the keyed operator (worst subtask, over the
    /// monitor's last windows).
    engine_sink_p99: Option<f64>,
    engine_keyed_p99: Option<f64>,
}

impl LatencyRun {
    /// Records a second at the sink, first to last receive.
    fn achieved_rate(&self) -> f64 {
        let span = self.stats.last_us.saturating_sub(self.stats.first_us.unwrap_or(0)) as f64 / 1e6;
        if span > 0.0 {
            self.stats.records as f64 / span
        } else {
            0.0
        }
    }
}

fn run_once(args: &BenchArgs, dir: &Path, pace: Pace, interval: Option<&str>, warmup: f64) -> Result<LatencyRun> {
    let mut pairs = vec![
        ("parallelism.default".to_string(), args.parallelism.to_string()),
        ("state.backend.type".to_string(), "hashmap".to_string()),
        ("execution.checkpointing.dir".to_string(), dir.display().to_string()),
        // The engine's own latency, printed beside the per-record figure.
        ("metrics.latency.interval".to_string(), "1 s".to_string()),
    ];
    if let Some(i) = interval {
        pairs.push(("execution.checkpointing.interval".into(), i.to_string()));
    }
    let config = JobConfig::from_pairs(pairs)?;
    let clock = Clock::default();
    let instances: Arc<Mutex<Vec<Arc<Mutex<SinkStats>>>>> = Arc::default();
    let source = PacedSource {
        gen: GeneratorSource { count: u64::MAX, keys: args.keys, seed: 1, rate: None },
        pace,
        clock: clock.clone(),
        claimed: Arc::default(),
    };
    let sink = LatencySink { clock: clock.clone(), warmup_us: (warmup * 1e6) as u64, instances: instances.clone() };
    let name = format!("bench-latency-{}", std::process::id());
    let env = StreamEnv::new(&name, config);
    let monitor = env.monitor();
    let result = env.execute(move |job| {
        job.source("paced", source.clone()).key_by(|e: &Event| e.0).process("sum", RunningSum::default()).sink("latency", sink.clone());
    })?;
    let view = monitor.view();
    let engine_p99 = |kind: VertexKind| {
        let subtasks = view.vertices.iter().filter(|v| v.kind == kind).flat_map(|v| v.subtasks.iter());
        subtasks.filter_map(|s| s.latency.map(|l| l.p99)).reduce(f64::max)
    };
    let mut stats = SinkStats::default();
    for s in instances.lock().map_err(|_| anyhow::anyhow!("latency sink: poisoned"))?.iter() {
        stats.merge(&*s.lock().map_err(|_| anyhow::anyhow!("latency sink: poisoned"))?);
    }
    // Trigger times on the schedule's clock: the wall clock at the start is the schedule's zero.
    let start_wall_ms = wall_ms() as i64 - clock.start().elapsed().as_millis() as i64;
    let triggers_ms = result.checkpoints.iter().map(|m| m.triggered_ms as i64 - start_wall_ms).collect();
    Ok(LatencyRun {
        label: interval.map(|i| format!("interval {i}")).unwrap_or_else(|| "checkpointing off".into()),
        stats,
        checkpoints: result.checkpoints,
        triggers_ms,
        engine_sink_p99: engine_p99(VertexKind::Sink),
        engine_keyed_p99: engine_p99(VertexKind::Keyed),
    })
}

/// Removes the bench's checkpoint directories when it ends.
struct Dirs(PathBuf);

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let secs = args.seconds;
    let warmup = args.warmup.min(secs / 2.0);
    if secs <= 0.0 {
        bail!("--seconds: must be positive");
    }
    let root = Dirs(Path::new(&args.dir).join(format!("latency-{}", std::process::id())));
    let unthrottled = |count: u64, i: usize| -> Result<f64> {
        Ok(run_once(args, &root.0.join(format!("calibrate-{i}")), Pace::Unthrottled { count }, None, 0.0)?.achieved_rate())
    };
    let (rate, how) = match args.rate {
        Some(r) => (r, "given".to_string()),
        None => {
            let probe = unthrottled(PROBE_RECORDS, 0)?;
            let max = unthrottled(((probe * CALIBRATION_SECS) as u64).max(PROBE_RECORDS), 1)?;
            (max / 2.0, format!("half of {:.2} M rec/s unthrottled (about {CALIBRATION_SECS} s, checkpointing off)", max / 1e6))
        }
    };
    println!(
        "keyed sum, event-to-sink latency from each record's scheduled time: {} keys, parallelism {}, heap state backend; \
         fixed rate {:.2} M rec/s ({how}); {secs} s per run, first {warmup} s not measured",
        args.keys,
        args.parallelism,
        rate / 1e6,
    );
    let configs = [None, Some("1s"), Some("200ms")];
    let mut runs = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        runs.push(run_once(args, &root.0.join(format!("run-{i}")), Pace::Fixed { rate, secs }, *c, warmup)?);
    }
    println!();
    println!(
        "{:<18} {:>7} {:>7} {:>7} {:>7} {:>10} {:>7} {:>9} {:>4} {:>13} {:>10} {:>11} {:>10}",
        "run", "p50 ms", "p95 ms", "p99 ms", "max ms", "records", "rec/bat", "M rec/s", "chk", "engine p99 ms", "chk dur ms", "barrier µs", "sync µs"
    );
    for r in &runs {
        let l = r.stats.latency.summary();
        let keyed = |f: fn(&weir_checkpoint::SubtaskStats) -> u64| keyed_costs(&r.checkpoints, f);
        let mut dur: Vec<u64> = r.checkpoints.iter().map(|m| m.duration_ms()).collect();
        let engine = |p: Option<f64>| p.map(|p| format!("{p:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<18} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>10} {:>7.0} {:>9.2} {:>4} {:>13} {:>10} {:>11} {:>10}",
            r.label,
            l.p50,
            l.p95,
            l.p99,
            l.max,
            l.count,
            r.stats.records as f64 / r.stats.batches.max(1) as f64,
            r.achieved_rate() / 1e6,
            r.checkpoints.len(),
            format!("{} / {}", engine(r.engine_keyed_p99), engine(r.engine_sink_p99)),
            if dur.is_empty() { "-".into() } else { format!("{}/{}", percentile(&mut dur, 0.5), percentile(&mut dur, 1.0)) },
            format!("{}/{}", percentile(&mut keyed(|s| s.barrier_us), 0.5), percentile(&mut keyed(|s| s.barrier_us), 1.0)),
            format!("{}/{}", percentile(&mut keyed(|s| s.sync_us), 0.5), percentile(&mut keyed(|s| s.sync_us), 1.0)),
        );
    }
    println!();
    println!("engine p99: the monitor's source → operator latency (batch emit time, last 10 report windows), keyed / sink, worst subtask");
    println!("rec/bat: records per batch at the sink; records: those measured (after the warm-up)");
    println!("chk dur, barrier, sync: median/max over the run's checkpoints (barrier and sync of the keyed operator's slowest subtask)");
    println!();
    // Where the slow records were: the 100 ms slots (of scheduled time) whose worst record took
    // over 10 ms, and how many of them began within 300 ms after a checkpoint's trigger.
    for r in &runs {
        let slow: Vec<usize> = r.stats.worst.iter().enumerate().filter(|(_, &w)| w > 10_000).map(|(i, _)| i).collect();
        let near = slow
            .iter()
            .filter(|&&i| {
                let t = (i as u64 * SLOT_US / 1000) as i64;
                r.triggers_ms.iter().any(|&c| t + (SLOT_US / 1000) as i64 > c && t < c + 300)
            })
            .count();
        let measured = r.stats.worst.iter().filter(|&&w| w > 0).count();
        println!(
            "{:<18} 100 ms slots with a record over 10 ms: {} of {measured}, {near} of them within 300 ms of a checkpoint trigger",
            r.label,
            slow.len()
        );
    }
    if args.timeline {
        println!();
        println!("worst latency (ms) per 100 ms of scheduled time, a line per second; * = a checkpoint was triggered in that slot");
        for r in &runs {
            println!("{}:", r.label);
            let first = (warmup * 10.0).ceil() as usize;
            for (sec, chunk) in r.stats.worst.chunks(10).enumerate().skip(first / 10) {
                let cells: Vec<String> = chunk
                    .iter()
                    .enumerate()
                    .map(|(j, &w)| {
                        let slot = (sec * 10 + j) as i64 * (SLOT_US / 1000) as i64;
                        let mark = if r.triggers_ms.iter().any(|&c| c >= slot && c < slot + (SLOT_US / 1000) as i64) { "*" } else { " " };
                        format!("{:>7.1}{mark}", w as f64 / 1e3)
                    })
                    .collect();
                println!("  {sec:>3} s {}", cells.join(""));
            }
        }
    }
    println!();
    let p99 = |i: usize| runs[i].stats.latency.summary().p99;
    println!("p99 latency ms (off / 1s / 200ms): {:.2} / {:.2} / {:.2}", p99(0), p99(1), p99(2));
    Ok(())
}

//! `weir bench`: the keyed-sum job (generator → key_by → running SUM/COUNT → blackhole) with
//! checkpointing off and at several intervals, in one run, plus a bare timely loop doing the
//! same hash-map update with no state backend, sink or checkpoints, for the engine's overhead.
//! `weir bench latency` measures the same job's event-to-sink latency at a fixed rate, `weir
//! bench rest` the cost of its REST API, metrics scraping and latency tracking.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::Operator;
use weir::job::JobPlan;
use weir::source::GeneratorSource;
use weir::StreamEnv;
use weir_checkpoint::CheckpointMetadata;

mod gpu_state;
mod latency;
mod rest;
mod state;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to benchmark: `engine` (the keyed-sum job), `gpu` (the kernels), `gpu-state`
    /// (device-resident state: the naive blocking barrier against asynchronous incremental
    /// snapshots) or `state` (the `hashmap` and `rocksdb` backends: incremental against full
    /// checkpoint bytes, checkpoint cost, throughput, restore from local copies), `latency`
    /// (event-to-sink latency of the keyed sum at a fixed rate, with checkpointing off, every 1 s
    /// and every 200 ms) or `rest` (throughput with the REST API scraped and latency tracking on,
    /// against neither).
    #[arg(default_value = "engine", value_parser = ["engine", "gpu", "gpu-state", "state", "latency", "rest"])]
    what: String,
    /// GPU to benchmark (`weir.gpu.device`: index or name substring).
    #[arg(long)]
    device: Option<String>,
    /// `gpu`: the sizes to time, comma-separated; presets and `KIND:SIZE` tokens mix freely.
    /// `gemm:N` (an N×N GEMM), `kmeans:N` (N points, k=64 d=32), `image:WxH` (RGB: resize,
    /// gaussian, sobel), `cnn:N` (a batch of N digits); SIZE may end in k or M (10M =
    /// 10,000,000). Presets: `quick` (a smoke run of seconds), `default` (the default), `full`
    /// (GEMM up to 4096, K-means up to 10M points, images up to 3840x2160, CNN up to 65536).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = crate::gpu::parse_sizes_token)]
    sizes: Vec<crate::gpu::Sizes>,
    /// Records per run.
    #[arg(long, default_value_t = 10_000_000)]
    records: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Parallelism (worker threads).
    #[arg(long, default_value_t = 2)]
    parallelism: u32,
    /// Checkpoint intervals to compare with checkpointing off.
    #[arg(long, value_delimiter = ',', default_value = "2s,1s,200ms")]
    intervals: Vec<String>,
    /// Runs of each configuration; the median run (by throughput) is reported (default 3;
    /// `gpu-state` and `state`: 1, `state`'s restores: 3).
    #[arg(long)]
    repeat: Option<usize>,
    /// Checkpoint directory (each run uses a fresh job directory inside it).
    #[arg(long, default_value = "target/weir-bench")]
    dir: String,
    /// `gpu-state`: points per run of the kmeans job.
    #[arg(long, default_value_t = 8_000_000)]
    points: u64,
    /// `gpu-state`: keys (models) of the kmeans job; a key gets its model after 32 × k points.
    #[arg(long, default_value_t = 10_000)]
    model_keys: u64,
    /// `gpu-state`: keys of the bare state arena (bytes per checkpoint, restore times).
    #[arg(long, default_value_t = 100_000)]
    state_keys: u64,
    /// `gpu-state`: centroids per model.
    #[arg(long, default_value_t = 8)]
    k: usize,
    /// `gpu-state`: dimensions.
    #[arg(long, default_value_t = 8)]
    dim: usize,
    /// `gpu-state`: device memory for the process (`taskmanager.gpu.memory`; half of it is the
    /// budget). Raise it with the keys on a real GPU.
    #[arg(long, default_value = "8 gb")]
    gpu_memory: String,
    /// `state`: keys of the bounded jobs whose final checkpoints are restored (default
    /// 1000000,10000000; with `--quick`: `--keys`).
    #[arg(long, value_delimiter = ',')]
    restore_keys: Option<Vec<u64>>,
    /// `latency`: records per second over all source instances (default: half the rate of an
    /// unthrottled run of the same job, measured first).
    #[arg(long)]
    rate: Option<f64>,
    /// `latency`: seconds per configuration.
    #[arg(long, default_value_t = 12.0)]
    seconds: f64,
    /// `latency`: seconds at the start of each run whose records are not measured (start-up).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// `latency`: also print the worst latency per 100 ms of each run, with the checkpoints.
    #[arg(long)]
    timeline: bool,
    /// `state`: a smoke run: 3 rounds, 200 ms checkpoints, throughput runs of about 1 s,
    /// restores of `--keys` keys.
    #[arg(long)]
    quick: bool,
}

struct Run {
    label: String,
    secs: f64,
    checkpoints: Vec<CheckpointMetadata>,
}

/// Per checkpoint, the largest value of `f` over the subtasks that hold state (the keyed
/// operator's: sources and sinks write none).
fn keyed_costs(checkpoints: &[CheckpointMetadata], f: fn(&weir_checkpoint::SubtaskStats) -> u64) -> Vec<u64> {
    checkpoints
        .iter()
        .map(|m| m.subtasks.iter().filter(|(_, s)| !s.state_files.is_empty()).map(|(_, s)| f(&s.stats)).max().unwrap_or(0))
        .collect()
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn run_job(args: &BenchArgs, interval: Option<&str>, run: usize) -> Result<Run> {
    let job = format!("bench-{}-{run}", std::process::id());
    let yaml = format!(
        "name: {job}\nsource: {{type: generator, count: {}, keys: {}, seed: 1}}\npipeline:\n  - key_by: key\n  - aggregate: [sum(value), count]\nsink: {{type: blackhole}}\n",
        args.records, args.keys
    );
    let spec = serde_json::from_value(weir::job::parse_yaml(&yaml).map_err(anyhow::Error::msg)?)?;
    let mut defines = vec![
        ("parallelism.default".to_string(), args.parallelism.to_string()),
        ("execution.checkpointing.dir".to_string(), args.dir.clone()),
    ];
    if let Some(i) = interval {
        defines.push(("execution.checkpointing.interval".into(), i.to_string()));
    }
    let plan = JobPlan::from_spec(spec, &defines).map_err(anyhow::Error::msg)?;
    let env = StreamEnv::new(&plan.name, plan.config.clone());
    let start = Instant::now();
    let p2 = plan.clone();
    let result = env.execute(move |j| p2.build(j))?;
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(std::path::Path::new(&args.dir).join(&job));
    Ok(Run { label: interval.map(|i| format!("interval {i}")).unwrap_or_else(|| "checkpointing off".into()), secs, checkpoints: result.checkpoints })
}

/// The same work as the keyed-sum job on bare timely: generate, exchange by key, update a
/// hash map. No epochs, state backend, sink, flow control or checkpoints.
fn bare_timely(args: &BenchArgs) -> f64 {
    let gen = GeneratorSource { count: args.records, keys: args.keys, seed: 1, rate: None };
    let splits = args.keys.clamp(1, 128);
    let workers = args.parallelism as usize;
    let start = Instant::now();
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index() as u64, worker.peers() as u64);
        let gen = gen.clone();
        worker.dataflow::<u64, _, _>(|scope| {
            source::<_, timely::container::CapacityContainerBuilder<Vec<(i64, i64)>>, _, _>(scope, "gen", |cap, info| {
                let act = scope.activator_for(info.address);
                let mut cap = Some(cap);
                let mine: Vec<u64> = (0..splits).filter(|s| s % peers == index).collect();
                let mut pos = vec![0u64; mine.len()];
                let mut round = 0u64;
                move |out| {
                    let Some(c) = cap.as_mut() else { return };
                    let mut any = false;
                    let mut session = out.session(&*c);
                    for (i, &s) in mine.iter().enumerate() {
                        let end = (pos[i] + 4096 / mine.len().max(1) as u64 + 1).min(gen.split_len(s));
                        for r in pos[i]..end {
                            session.give(gen.record(s, r));
                        }
                        any |= end > pos[i];
                        pos[i] = end;
                    }
                    drop(session);
                    round += 1;
                    if any {
                        c.downgrade(&round);
                        act.activate();
                    } else {
                        cap = None;
                    }
                }
            })
            .sink(Exchange::new(|x: &(i64, i64)| (x.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32), "sum", {
                let mut map: HashMap<i64, (i64, u64)> = HashMap::new();
                move |(input, _)| {
                    input.for_each(|_, data| {
                        for (k, v) in data.drain(..) {
                            let e = map.entry(k).or_default();
                            e.0 += v;
                            e.1 += 1;
                        }
                    })
                }
            });
        });
    })
    .expect("timely")
    .join();
    start.elapsed().as_secs_f64()
}

pub fn main(args: BenchArgs) -> Result<()> {
    if args.what == "gpu" {
        return crate::gpu::bench(args.device.clone(), &args.sizes);
    }
    if args.what == "gpu-state" {
        return gpu_state::bench(&args);
    }
    if args.what == "state" {
        return state::bench(&args);
    }
    if args.what == "latency" {
        return latency::bench(&args);
    }
    if args.what == "rest" {
        return rest::bench(&args);
    }
    let repeat = args.repeat.unwrap_or(3).max(1);
    println!(
        "keyed sum: {} records, {} keys, parallelism {}, blackhole sink, heap state backend; median of {} runs each",
        args.records,
        args.keys,
        args.parallelism,
        repeat
    );
    let bare = bare_timely(&args);
    let bare_rate = args.records as f64 / bare;
    println!("{:<22} {:>10.2} M records/s  ({:.2} s)", "bare timely loop", bare_rate / 1e6, bare);
    // Interleave the configurations so that a slow moment of the machine hits all of them.
    let configs: Vec<Option<&str>> = std::iter::once(None).chain(args.intervals.iter().map(|s| Some(s.as_str()))).collect();
    let mut all: Vec<Vec<Run>> = configs.iter().map(|_| Vec::new()).collect();
    for rep in 0..repeat {
        for (i, c) in configs.iter().enumerate() {
            all[i].push(run_job(&args, *c, rep * configs.len() + i)?);
        }
    }
    let runs: Vec<Run> = all
        .into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
            v.swap_remove(v.len() / 2)
        })
        .collect();
    let off = args.records as f64 / runs[0].secs;
    println!();
    println!(
        "{:<22} {:>9} {:>8} {:>6} {:>22} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "run", "M rec/s", "vs off", "chk", "duration ms min/med/max", "state MB", "barrier µs", "sync µs", "async ms", "entries"
    );
    for r in &runs {
        let rate = args.records as f64 / r.secs;
        // The cost split of the keyed operator (sources and sinks have their own rows in
        // `weir checkpoints inspect`): the largest subtask value per checkpoint, then the median.
        let keyed = |f: fn(&weir_checkpoint::SubtaskStats) -> u64| keyed_costs(&r.checkpoints, f);
        let mut dur: Vec<u64> = r.checkpoints.iter().map(|m| m.duration_ms()).collect();
        let (dmin, dmed, dmax) = (percentile(&mut dur, 0.0), percentile(&mut dur, 0.5), percentile(&mut dur, 1.0));
        let mut bytes: Vec<u64> = r.checkpoints.iter().map(|m| m.bytes()).collect();
        let mut entries: Vec<u64> = r.checkpoints.iter().map(|m| m.state_entries()).collect();
        println!(
            "{:<22} {:>9.2} {:>7.1}% {:>6} {:>22} {:>10.1} {:>12} {:>12} {:>12.1} {:>12}",
            r.label,
            rate / 1e6,
            100.0 * rate / off,
            r.checkpoints.len(),
            if dur.is_empty() { "-".to_string() } else { format!("{dmin}/{dmed}/{dmax}") },
            percentile(&mut bytes, 1.0) as f64 / 1e6,
            percentile(&mut keyed(|s| s.barrier_us), 0.5),
            percentile(&mut keyed(|s| s.sync_us), 0.5),
            percentile(&mut keyed(|s| s.async_us), 0.5) as f64 / 1e3,
            percentile(&mut entries, 1.0),
        );
    }
    println!();
    println!("engine vs bare timely (checkpointing off): {:.1}%", 100.0 * off / bare_rate);
    Ok(())
}

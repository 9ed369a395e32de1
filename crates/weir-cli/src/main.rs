//! `weir`: run YAML jobs, inspect checkpoints, benchmark the engine.

mod bench;
mod checkpoints;
mod gpu;
mod http;
mod jobs;
mod progress;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use weir::config::RestSettings;
use weir::job::JobPlan;
use weir::monitor::JobMonitor;
use weir::{ClusterConfig, Restore, StreamEnv};
use weir_rest::RestServer;

#[derive(Parser)]
#[command(name = "weir", version, about = "Weir: stream processing with exactly-once checkpoints")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a YAML job.
    #[command(after_help = "Examples:
  weir run examples/keyed_sum.yaml
  weir run examples/keyed_sum.yaml -D execution.checkpointing.interval=10s --set source.count=1000000
  weir run examples/keyed_sum.yaml --rest-port 0            # the REST API on any free port
  weir run examples/keyed_sum.yaml --restore latest         # resume from the latest checkpoint
  weir run examples/keyed_sum.yaml --restore /savepoints/savepoint-keyed-sum-12")]
    Run(RunArgs),
    /// The jobs served at a REST address: id, name, state, uptime, checkpoints.
    #[command(after_help = "Examples:
  weir list
  weir list --address http://127.0.0.1:8082")]
    List(jobs::ListArgs),
    /// Take a savepoint of a running job; the job goes on. Prints `savepoint: PATH`.
    #[command(after_help = "Examples:
  weir savepoint http://127.0.0.1:8081 /data/savepoints
  weir savepoint http://127.0.0.1:8081/jobs/5f0c1e...   # to execution.checkpointing.savepoint-dir
  weir savepoint keyed-sum /data/savepoints --address http://127.0.0.1:8082 --token-file ~/.weir/rest-8082.token")]
    Savepoint(jobs::SavepointArgs),
    /// Stop a running job with a savepoint (Flink's `flink stop`). Prints `savepoint: PATH`.
    #[command(after_help = "Examples:
  weir stop --savepoint /data/savepoints http://127.0.0.1:8081
  weir stop keyed-sum                                   # to execution.checkpointing.savepoint-dir
  weir run examples/keyed_sum.yaml --restore /data/savepoints/savepoint-keyed-sum-12   # resume it")]
    Stop(jobs::StopArgs),
    /// Cancel a running job now, without a savepoint (checkpoints are kept or deleted per
    /// execution.checkpointing.externalized-checkpoint-retention).
    #[command(after_help = "Examples:
  weir cancel http://127.0.0.1:8081
  weir cancel keyed-sum --address http://127.0.0.1:8082")]
    Cancel(jobs::CancelArgs),
    /// List or inspect checkpoints.
    #[command(after_help = "Examples:
  weir checkpoints list target/weir-checkpoints/keyed-sum
  weir checkpoints inspect target/weir-checkpoints/keyed-sum/chk-12
  weir checkpoints list s3://bucket/ck/keyed-sum -D s3.endpoint=http://127.0.0.1:9000")]
    Checkpoints {
        #[command(subcommand)]
        cmd: checkpoints::CheckpointCmd,
    },
    /// Benchmark: `weir bench` (the engine: keyed sum with checkpointing off and on),
    /// `weir bench gpu` (every kernel on the GPU against the CPU path) or `weir bench gpu-state`
    /// (device-resident state: the naive blocking barrier against asynchronous snapshots).
    #[command(after_help = "Examples:
  weir bench
  weir bench gpu
  weir bench gpu-state")]
    Bench(bench::BenchArgs),
    /// GPU devices: the adapters found, and tuning the kernels to one.
    #[command(after_help = "Examples:
  weir gpu info
  weir gpu tune
  weir gpu tune --device 'H100' --sizes 128,256,512,1024,2048")]
    Gpu {
        #[command(subcommand)]
        cmd: GpuCmd,
    },
    /// Print the configuration keys this build knows, with their types and defaults.
    #[command(after_help = "Examples:
  weir config
  weir config | grep '^rest\\.'")]
    Config,
}

#[derive(Subcommand)]
enum GpuCmd {
    /// The Vulkan adapters found, and the one `weir.gpu.enabled: auto` selects.
    Info,
    /// Measure the kernels whose variant is chosen per adapter (from which size the 128×128-tile
    /// GEMM beats the 64×64 one, and its K step; whether the Gaussian and Sobel gain from tiling)
    /// and cache the result for that adapter and driver in `weir.gpu.tuning.file`, where every
    /// job opening the adapter later reads it.
    Tune(gpu::TuneArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The job file.
    job: PathBuf,
    /// Override a config key: -D execution.checkpointing.interval=1s
    #[arg(short = 'D', value_name = "KEY=VALUE")]
    define: Vec<String>,
    /// Override a field of the job file: --set source.count=1000
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
    /// Start from a checkpoint: `latest` (of the job's checkpoint directory) or a chk-<n> path.
    #[arg(long)]
    restore: Option<String>,
    /// Restore even where the checkpoint holds state of a uid that no operator of the job has
    /// (a step removed, or its uid changed): that state is dropped, with a warning. Without it
    /// such a restore fails (Flink's --allowNonRestoredState).
    #[arg(long)]
    allow_non_restored_state: bool,
    /// Take a savepoint when the job finishes or is stopped (Ctrl-C, SIGTERM): the final
    /// checkpoint in full, in the canonical format, copied to
    /// execution.checkpointing.savepoint-dir (Flink's stop-with-savepoint).
    #[arg(long)]
    savepoint_on_stop: bool,
    /// This process's index in a multi-process job.
    #[arg(long, default_value_t = 0)]
    process: usize,
    /// A file with one host:port per line, one line per process.
    #[arg(long)]
    hostfile: Option<PathBuf>,
    /// Serve the REST API and dashboard on this port (rest.port; 0: any free port).
    #[arg(long, value_name = "N")]
    rest_port: Option<u16>,
    /// Serve the REST API and dashboard on this address (rest.address).
    #[arg(long, value_name = "ADDR")]
    rest_address: Option<String>,
    /// No REST API or dashboard (rest.enabled=false).
    #[arg(long)]
    no_rest: bool,
}

fn split_pair(s: &str, flag: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
        None => bail!("{flag} {s}: expected KEY=VALUE"),
    }
}

fn run(args: RunArgs) -> Result<()> {
    let mut defines = args.define.iter().map(|d| split_pair(d, "-D")).collect::<Result<Vec<_>>>()?;
    let port_given = args.rest_port.is_some() || defines.iter().any(|(k, _)| k == "rest.port");
    // The flags come after -D, so they win; the config's checks name the key they set.
    defines.extend(args.rest_port.map(|p| ("rest.port".to_string(), p.to_string())));
    defines.extend(args.rest_address.clone().map(|a| ("rest.address".to_string(), a)));
    if args.no_rest {
        defines.push(("rest.enabled".to_string(), "false".to_string()));
    }
    let sets = args.set.iter().map(|d| split_pair(d, "--set")).collect::<Result<Vec<_>>>()?;
    let plan = JobPlan::load(&args.job, &sets, &defines)?;
    let mut cluster = ClusterConfig { process: args.process, hosts: vec![] };
    if let Some(h) = &args.hostfile {
        let text = std::fs::read_to_string(h).with_context(|| format!("--hostfile {}", h.display()))?;
        cluster.hosts = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
        if args.process >= cluster.processes() {
            bail!("--process {} but {} lists {} processes", args.process, h.display(), cluster.processes());
        }
    }
    // A missing, empty or unreadable cluster secret is refused before anything starts.
    weir::runtime::cluster::resolve_secret(&plan.config, &cluster)?;
    let restore = match args.restore.as_deref() {
        None => Restore::None,
        Some("latest") => Restore::Latest,
        Some(p) => Restore::Path(p.to_string()),
    };
    let allow = args.allow_non_restored_state || plan.config.allow_non_restored_state;
    let env = StreamEnv::new(&plan.name, plan.config.clone())
        .cluster(cluster)
        .restore(restore)
        .allow_non_restored_state(allow)
        .savepoint_on_stop(args.savepoint_on_stop);
    // Ctrl-C / SIGTERM cancel the job (Flink's cancel): checkpoints are kept or deleted per
    // execution.checkpointing.externalized-checkpoint-retention. With --savepoint-on-stop they
    // stop it with a savepoint instead.
    let cancel = env.cancel_flag();
    let savepoint = args.savepoint_on_stop;
    ctrlc::set_handler(move || {
        // A second signal while stopping with a savepoint gives up on the savepoint: the process
        // ends at once, as a crash would (checkpoints stay; `--restore latest` resumes).
        if cancel.swap(true, std::sync::atomic::Ordering::SeqCst) && savepoint {
            eprintln!("weir: second signal: stopping now, without the savepoint");
            std::process::exit(130);
        }
    })
    .context("installing the signal handler")?;
    // Process 0 runs the coordinator: the monitor has the job's figures there only.
    let monitor = env.monitor();
    let rest = match args.process == 0 && env.config().rest.enabled {
        true => Some(start_rest(monitor.clone(), &env.config().rest, port_given)?),
        false => None,
    };
    let progress = (args.process == 0).then(|| progress::Progress::start(monitor.clone()));
    let started = std::time::Instant::now();
    let plan2 = plan.clone();
    let result = env.execute(move |job| plan2.build(job));
    if let Some(p) = progress {
        p.finish();
    }
    if let Some(server) = rest {
        if result.as_ref().is_ok_and(|r| r.savepoint.is_some()) {
            // A `weir stop` polls for the savepoint's location: keep answering a moment, so that
            // the job's end does not race the client's last poll.
            std::thread::sleep(STOP_GRACE);
        }
        server.shutdown();
    }
    let result = result?;
    tracing::info!(
        "job {} finished in {:.2} s: {} checkpoint(s){}{}",
        plan.name,
        started.elapsed().as_secs_f64(),
        result.checkpoints.len(),
        result.restored_from.map(|c| format!(", restored from checkpoint {c}")).unwrap_or_default(),
        if result.restarts > 0 { format!(", {} restart(s)", result.restarts) } else { String::new() },
    );
    if let Some(p) = &result.savepoint {
        println!("savepoint: {p}");
    }
    Ok(())
}

/// `rest.port`'s default (Flink's).
const DEFAULT_REST_PORT: u16 = 8081;

/// How long the REST API outlives a job stopped with a savepoint (a client polls every 100 ms).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(1000);

/// Serve the REST API and dashboard for `monitor`'s job, per `rest.*`. A taken port fails, except
/// the default one when nobody asked for it (`port_given`): a second job on the machine serves on
/// a free port instead of failing for want of the first one's.
fn start_rest(monitor: Arc<JobMonitor>, settings: &RestSettings, port_given: bool) -> Result<RestServer> {
    let context = |s: &RestSettings| format!("starting the REST API at {}:{} (rest.address, rest.port; or --no-rest)", s.address, s.port);
    let server = match weir_rest::start(monitor.clone(), settings) {
        Err(weir_rest::RestError::Bind { address, source }) if !port_given && settings.port == DEFAULT_REST_PORT => {
            tracing::warn!("rest.port: {address} is taken ({source}); serving on a free port instead (set --rest-port to choose one)");
            let any = RestSettings { port: 0, ..settings.clone() };
            weir_rest::start(monitor, &any).with_context(|| context(&any))?
        }
        r => r.with_context(|| context(settings))?,
    };
    eprintln!("REST API and dashboard at {} (token in {})", server.url(), server.token_file().display());
    Ok(server)
}

/// Output piped into a command that stops reading early (`weir checkpoints list DIR | head`)
/// ends the process quietly, as a Unix tool does, instead of with a panic and a backtrace: Rust
/// ignores SIGPIPE, so `println!` panics on the broken pipe.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied()).unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            // 128 + SIGPIPE: what a shell reports for a process ended by a closed pipe.
            std::process::exit(141);
        }
        default(info)
    }));
}

fn main() {
    // Vulkan loaders complain without a runtime directory; nothing else needs one.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    tracing_subscriber::fmt()
        .with_writer(progress::stderr_log)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Crash points of the commit protocol exist only in test builds (feature `failpoints`).
    let _crash_points = weir::crash::setup();
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::List(a) => jobs::list(a),
        Cmd::Savepoint(a) => jobs::savepoint(a),
        Cmd::Stop(a) => jobs::stop(a),
        Cmd::Cancel(a) => jobs::cancel(a),
        Cmd::Checkpoints { cmd } => checkpoints::main(cmd),
        Cmd::Bench(a) => bench::main(a),
        Cmd::Gpu { cmd: GpuCmd::Info } => gpu::info(),
        Cmd::Gpu { cmd: GpuCmd::Tune(args) } => gpu::tune(args),
        Cmd::Config => {
            println!("{:<60} {:<45} default", "key", "type");
            for (k, t, d) in weir::config::known_keys() {
                println!("{k:<60} {t:<45} {d}");
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        let cancelled = e.downcast_ref::<weir::JobError>().is_some_and(|e| matches!(e, weir::JobError::Cancelled));
        std::process::exit(if cancelled { 130 } else { 1 });
    }
}

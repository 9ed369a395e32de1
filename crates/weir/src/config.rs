//! Job configuration with Flink 2.x key names.
//!
//! Every key is known and typed: an unknown key or an ill-typed value is refused at start, with
//! the key and the expected type in the message. Flink 1.x names are accepted with a warning.

use std::collections::BTreeMap;
use std::time::Duration;

use weir_checkpoint::{CoordinatorConfig, RetentionPolicy};

/// A configuration error: names the key and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key '{key}': {message}")]
pub struct ConfigError {
    /// The key at fault.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// The restart strategy after a failure (Flink's `restart-strategy.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartStrategy {
    /// Fail the job on the first failure.
    None,
    /// Restart from the latest checkpoint up to `attempts` times, `delay` apart.
    FixedDelay {
        /// Restarts allowed.
        attempts: u32,
        /// Wait before each restart.
        delay: Duration,
    },
}

/// Checkpointing settings (`execution.checkpointing.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSettings {
    /// Periodic interval; `None` = checkpointing off.
    pub interval: Option<Duration>,
    /// Abort a checkpoint not complete after this long.
    pub timeout: Duration,
    /// Least pause between one checkpoint's completion and the next trigger.
    pub min_pause: Duration,
    /// Checkpoints pending at once.
    pub max_concurrent: u32,
    /// Consecutive failed checkpoints tolerated.
    pub tolerable_failed: u32,
    /// Completed checkpoints retained.
    pub num_retained: u32,
    /// Checkpoint directory (a local path or file:// URL).
    pub dir: String,
    /// What happens to checkpoints on cancel.
    pub retention: RetentionPolicy,
    /// Incremental checkpoints (`execution.checkpointing.incremental`): RocksDB uploads only new
    /// SST files, the heap backend writes deltas of changed keys.
    pub incremental: bool,
    /// Heap backend: a new base once the deltas since the last one exceed this share of it
    /// (`weir.state.incremental.max-delta-share`).
    pub max_delta_share: f64,
    /// Keep a task-local copy of each subtask's latest snapshot
    /// (`execution.checkpointing.local-backup.enabled`).
    pub local_backup: bool,
    /// Restore from the task-local copy when it verifies (`execution.state-recovery.from-local`).
    pub local_recovery: bool,
    /// Where task-local copies live (`weir.state.local.dir`; default: under the temp dir).
    pub local_dir: Option<String>,
    /// Where savepoints go (`execution.checkpointing.savepoint-dir`; default: `<dir>/savepoints`).
    pub savepoint_dir: Option<String>,
    /// Object-store settings given as Flink keys (`s3.endpoint`, `s3.access-key`,
    /// `s3.secret-key`, `s3.path.style.access`, `s3.region`), set ones only; the standard AWS
    /// environment variables fill in the rest.
    pub storage_options: Vec<(String, String)>,
}

impl CheckpointSettings {
    /// The coordinator's view of these settings.
    pub fn coordinator(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            interval_ms: self.interval.map(|d| d.as_millis() as u64),
            timeout_ms: self.timeout.as_millis() as u64,
            min_pause_ms: self.min_pause.as_millis() as u64,
            max_concurrent: self.max_concurrent as usize,
            tolerable_failed: self.tolerable_failed,
            num_retained: self.num_retained as usize,
        }
    }
}

/// Where keyed state lives (`state.backend.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateBackendKind {
    /// Objects on the heap, copy-on-write snapshots (`hashmap`, Flink's default).
    Heap,
    /// An embedded RocksDB per operator instance: state larger than memory (`rocksdb`).
    RocksDb,
}

/// A validated job configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    /// Total parallelism (worker threads × processes).
    pub parallelism: u32,
    /// Key groups.
    pub max_parallelism: u32,
    /// Checkpointing.
    pub checkpoint: CheckpointSettings,
    /// Restart strategy.
    pub restart: RestartStrategy,
    /// Where keyed state lives.
    pub state_backend: StateBackendKind,
    /// RocksDB's working directory (`weir.state.rocksdb.dir`; default: under the temp dir,
    /// removed when the job ends).
    pub rocksdb_dir: Option<String>,
    /// Records a source emits per batch.
    pub source_batch: usize,
    /// Batches a source may have in flight (not yet through every sink): the flow-control window.
    pub max_inflight_batches: usize,
    /// The longest line a file source reads; a longer one fails the job (malformed input).
    pub max_line_bytes: u64,
    /// GPU selection and budget.
    pub gpu: weir_gpu::GpuConfig,
    /// Batches one GPU operator instance keeps in flight (submitted, result not yet back).
    pub gpu_max_inflight: usize,
    /// Records a GPU operator collects before a kernel launch.
    pub gpu_batch_records: usize,
    /// The longest a record waits in a GPU operator's batch.
    pub gpu_batch_latency: Duration,
    /// Device-resident state: a full snapshot every this many checkpoints
    /// (`weir.gpu.state.full-every`; 1 = always full), deltas of dirty chunks in between.
    pub gpu_state_full_every: u32,
    /// A full snapshot also once the deltas since the last one exceed this share of it
    /// (`weir.gpu.state.max-delta-share`).
    pub gpu_state_max_delta_share: f64,
    /// Keep the latest snapshot of device-resident state in device memory for a restart inside
    /// the process (`weir.gpu.state.snapshot-tier: vram`), or not (`host`).
    pub gpu_state_vram_tier: bool,
    /// The naive baseline for benchmarks (`weir.gpu.state.snapshot-mode: blocking`): at a
    /// barrier the operator drains its batches in flight, then reads its whole device state back
    /// on the worker thread before going on; only the file write is left to the background.
    /// The default (`async`) copies the state on the device and reads back dirty chunks later.
    pub gpu_state_blocking_snapshots: bool,
    /// A file holding the cluster's shared secret (`cluster.secret-file`); see `runtime::cluster`.
    pub cluster_secret_file: Option<String>,
    /// Restore even where the checkpoint holds state that no operator of the job claims by its
    /// uid, dropping that state (`execution.state-recovery.ignore-unclaimed-state`, the CLI's
    /// `--allow-non-restored-state`); otherwise such a restore fails at start.
    pub allow_non_restored_state: bool,
    /// Take a savepoint when the job finishes or is stopped (the CLI's `--savepoint-on-stop`,
    /// [`crate::StreamEnv::savepoint_on_stop`]): the final checkpoint is written in full, in the
    /// canonical format, and copied to `execution.checkpointing.savepoint-dir`.
    pub savepoint_on_stop: bool,
    /// The REST API and dashboard (`rest.*`), served by process 0.
    pub rest: RestSettings,
    /// How often workers report their operators' metrics to process 0
    /// (`metrics.reporter.interval`).
    pub metrics_interval: Duration,
    /// Latency tracking (`metrics.latency.interval`, Flink's key): sources stamp every batch with
    /// its emit time and every operator records source → operator latency; `None` (`0`/`off`)
    /// turns it off.
    pub latency_interval: Option<Duration>,
    /// Checkpoints kept in the REST API's history (`web.checkpoints.history`).
    pub web_checkpoints_history: usize,
}

/// The REST API's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestSettings {
    /// Serve it at all (`rest.enabled`; the CLI's `--no-rest`).
    pub enabled: bool,
    /// Address to bind (`rest.address`; also `rest.bind-address`).
    pub address: String,
    /// Port (`rest.port`; 0 picks a free one, which the log prints).
    pub port: u16,
    /// A file holding the bearer token for mutating calls (`rest.token-file`); without it a
    /// token is generated at start and written to a file only the user can read.
    pub token_file: Option<String>,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig::from_pairs(std::iter::empty::<(String, String)>()).expect("defaults are valid")
    }
}

#[derive(Clone, Copy)]
enum Kind {
    DurationOrOff,
    Duration,
    Int { min: u64, max: u64 },
    Str,
    Enum(&'static [&'static str]),
    Fraction,
    Bytes,
}

/// Parse a Flink memory size: `512 mb`, `2g`, `1024` (bytes).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "b" | "bytes" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    Some((n * mult as f64) as u64)
}

impl Kind {
    fn describe(&self) -> String {
        match self {
            Kind::DurationOrOff => "a duration (e.g. 200ms, 10 s, 1 min) or 'off'".into(),
            Kind::Duration => "a duration (e.g. 200ms, 10 s, 1 min)".into(),
            Kind::Int { min, max } => format!("an integer in {min}..={max}"),
            Kind::Str => "a string".into(),
            Kind::Enum(v) => format!("one of {}", v.join(", ")),
            Kind::Fraction => "a number in (0, 1]".into(),
            Kind::Bytes => "a memory size (e.g. 512 mb, 2 gb)".into(),
        }
    }
}

const KEYS: &[(&str, Kind, &str)] = &[
    ("execution.checkpointing.interval", Kind::DurationOrOff, "off"),
    ("execution.checkpointing.timeout", Kind::Duration, "10 min"),
    ("execution.checkpointing.min-pause", Kind::Duration, "0 ms"),
    ("execution.checkpointing.max-concurrent-checkpoints", Kind::Int { min: 1, max: 64 }, "1"),
    ("execution.checkpointing.tolerable-failed-checkpoints", Kind::Int { min: 0, max: u32::MAX as u64 }, "0"),
    ("execution.checkpointing.num-retained", Kind::Int { min: 1, max: 1000 }, "1"),
    ("execution.checkpointing.dir", Kind::Str, "weir-checkpoints"),
    (
        "execution.checkpointing.externalized-checkpoint-retention",
        Kind::Enum(&["RETAIN_ON_CANCELLATION", "DELETE_ON_CANCELLATION", "NO_EXTERNALIZED_CHECKPOINTS"]),
        "RETAIN_ON_CANCELLATION",
    ),
    ("state.backend.type", Kind::Enum(&["hashmap", "heap", "rocksdb"]), "hashmap"),
    ("weir.state.rocksdb.dir", Kind::Str, ""),
    ("execution.checkpointing.incremental", Kind::Enum(&["true", "false"]), "false"),
    // Heap backend: a new base once the deltas since the last one exceed this share of it.
    ("weir.state.incremental.max-delta-share", Kind::Fraction, "0.5"),
    ("execution.checkpointing.local-backup.enabled", Kind::Enum(&["true", "false"]), "false"),
    ("execution.state-recovery.from-local", Kind::Enum(&["true", "false"]), "false"),
    ("weir.state.local.dir", Kind::Str, ""),
    ("execution.checkpointing.savepoint-dir", Kind::Str, ""),
    ("s3.endpoint", Kind::Str, ""),
    ("s3.access-key", Kind::Str, ""),
    ("s3.secret-key", Kind::Str, ""),
    ("s3.path.style.access", Kind::Enum(&["true", "false"]), ""),
    ("s3.region", Kind::Str, ""),
    ("parallelism.default", Kind::Int { min: 1, max: 32768 }, "1"),
    ("pipeline.max-parallelism", Kind::Int { min: 1, max: 32768 }, "128"),
    ("restart-strategy.type", Kind::Enum(&["none", "off", "disable", "fixed-delay", "fixeddelay"]), ""),
    ("restart-strategy.fixed-delay.attempts", Kind::Int { min: 0, max: u32::MAX as u64 }, "10"),
    ("restart-strategy.fixed-delay.delay", Kind::Duration, "1 s"),
    ("weir.source.batch-size", Kind::Int { min: 1, max: 1 << 20 }, "4096"),
    ("weir.source.max-inflight-batches", Kind::Int { min: 1, max: 1 << 16 }, "16"),
    ("weir.source.max-line-bytes", Kind::Bytes, "16 mb"),
    ("weir.gpu.enabled", Kind::Enum(&["auto", "true", "false"]), "auto"),
    ("weir.gpu.device", Kind::Str, ""),
    ("weir.gpu.batch.max-records", Kind::Int { min: 1, max: 1 << 24 }, "8192"),
    ("weir.gpu.batch.max-latency", Kind::Duration, "100 ms"),
    ("weir.gpu.max-inflight-batches", Kind::Int { min: 1, max: 64 }, "2"),
    ("weir.gpu.transfer.mode", Kind::Enum(&["auto", "staged", "direct"]), "auto"),
    ("weir.gpu.transfer.ring-size", Kind::Int { min: 1, max: 64 }, "4"),
    ("weir.gpu.tuning.file", Kind::Str, ""),
    ("weir.gpu.state.full-every", Kind::Int { min: 1, max: 1 << 20 }, "10"),
    ("weir.gpu.state.max-delta-share", Kind::Fraction, "0.5"),
    ("weir.gpu.state.snapshot-tier", Kind::Enum(&["vram", "host"]), "vram"),
    // `blocking`: the naive baseline for benchmarks (drain, then a full read-back on the worker).
    ("weir.gpu.state.snapshot-mode", Kind::Enum(&["async", "blocking"]), "async"),
    ("taskmanager.gpu.fraction", Kind::Fraction, "0.5"),
    ("taskmanager.gpu.memory", Kind::Bytes, "1 gb"),
    ("external-resource.gpu.amount", Kind::Int { min: 0, max: 64 }, "1"),
    ("cluster.secret-file", Kind::Str, ""),
    ("execution.state-recovery.ignore-unclaimed-state", Kind::Enum(&["true", "false"]), "false"),
    ("rest.enabled", Kind::Enum(&["true", "false"]), "true"),
    ("rest.address", Kind::Str, "127.0.0.1"),
    ("rest.port", Kind::Int { min: 0, max: 65535 }, "8081"),
    ("rest.token-file", Kind::Str, ""),
    ("metrics.reporter.interval", Kind::Duration, "1 s"),
    // Flink's key and Flink's default (off): on, it costs throughput (docs/BENCHMARKS.md).
    ("metrics.latency.interval", Kind::DurationOrOff, "off"),
    ("web.checkpoints.history", Kind::Int { min: 1, max: 10_000 }, "10"),
];

/// Flink 1.x names and the keys that replace them.
const DEPRECATED: &[(&str, &str)] = &[
    ("state.checkpoints.dir", "execution.checkpointing.dir"),
    ("state.checkpoints.num-retained", "execution.checkpointing.num-retained"),
    ("state.backend", "state.backend.type"),
    ("restart-strategy", "restart-strategy.type"),
    ("execution.checkpointing.externalized-checkpoint-retention.mode", "execution.checkpointing.externalized-checkpoint-retention"),
    ("execution.savepoint.ignore-unclaimed-state", "execution.state-recovery.ignore-unclaimed-state"),
    ("state.backend.incremental", "execution.checkpointing.incremental"),
    ("state.backend.local-recovery", "execution.state-recovery.from-local"),
    ("state.backend.rocksdb.localdir", "weir.state.rocksdb.dir"),
    ("state.savepoints.dir", "execution.checkpointing.savepoint-dir"),
    ("taskmanager.state.local.root-dirs", "weir.state.local.dir"),
    ("rest.bind-address", "rest.address"),
];

/// The keys this build knows, with their defaults (for documentation and `weir config`).
pub fn known_keys() -> impl Iterator<Item = (&'static str, String, &'static str)> {
    KEYS.iter().map(|(k, kind, d)| (*k, kind.describe(), *d))
}

/// Parse a Flink-style duration: `500ms`, `10 s`, `1min`, `2 h`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let ms = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => 1.0,
        "s" | "sec" | "secs" | "second" | "seconds" => 1e3,
        "m" | "min" | "mins" | "minute" | "minutes" => 60e3,
        "h" | "hour" | "hours" => 3600e3,
        "d" | "day" | "days" => 86_400e3,
        "us" | "µs" | "micro" | "micros" => 1e-3,
        _ => return None,
    };
    Some(Duration::from_micros((n * ms * 1e3) as u64))
}

impl JobConfig {
    /// Validate `key = value` pairs (later pairs override earlier ones).
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, ConfigError> {
        let mut map: BTreeMap<&'static str, String> = BTreeMap::new();
        for (k, v) in pairs {
            let (k, v) = (k.as_ref().trim(), v.as_ref().trim());
            let key = match DEPRECATED.iter().find(|(old, _)| *old == k) {
                Some((old, new)) => {
                    tracing::warn!("config key '{old}' is deprecated: use '{new}'");
                    *new
                }
                None => k,
            };
            let Some((name, kind, _)) = KEYS.iter().find(|(n, _, _)| *n == key) else {
                let hint = KEYS
                    .iter()
                    .map(|(n, _, _)| *n)
                    .find(|n| n.rsplit('.').next() == key.rsplit('.').next())
                    .map(|n| format!(" (did you mean '{n}'?)"))
                    .unwrap_or_default();
                return Err(ConfigError { key: k.to_string(), message: format!("unknown key{hint}") });
            };
            check(name, *kind, v)?;
            map.insert(name, v.to_string());
        }
        let get = |k: &str| -> String {
            map.get(k).cloned().unwrap_or_else(|| KEYS.iter().find(|(n, _, _)| *n == k).expect("known").2.to_string())
        };
        let dur = |k: &str| parse_duration(&get(k)).expect("checked");
        let int = |k: &str| get(k).parse::<u64>().expect("checked");
        let interval = match get("execution.checkpointing.interval").as_str() {
            "off" | "" | "none" => None,
            v => Some(parse_duration(v).expect("checked")).filter(|d| !d.is_zero()),
        };
        let retention = match get("execution.checkpointing.externalized-checkpoint-retention").as_str() {
            "DELETE_ON_CANCELLATION" => RetentionPolicy::DeleteOnCancellation,
            "NO_EXTERNALIZED_CHECKPOINTS" => RetentionPolicy::NoExternalizedCheckpoints,
            _ => RetentionPolicy::RetainOnCancellation,
        };
        let restart = match get("restart-strategy.type").as_str() {
            "none" | "off" | "disable" => RestartStrategy::None,
            "" if interval.is_none() => RestartStrategy::None,
            _ => RestartStrategy::FixedDelay {
                attempts: int("restart-strategy.fixed-delay.attempts") as u32,
                delay: dur("restart-strategy.fixed-delay.delay"),
            },
        };
        if get("execution.state-recovery.from-local") == "true" && get("execution.checkpointing.local-backup.enabled") != "true" {
            tracing::warn!(
                "execution.state-recovery.from-local is on but execution.checkpointing.local-backup.enabled is off: only copies an earlier run kept are used"
            );
        }
        let parallelism = int("parallelism.default") as u32;
        let max_parallelism = int("pipeline.max-parallelism") as u32;
        if parallelism > max_parallelism {
            return Err(ConfigError {
                key: "parallelism.default".into(),
                message: format!("{parallelism} exceeds pipeline.max-parallelism {max_parallelism}"),
            });
        }
        Ok(JobConfig {
            parallelism,
            max_parallelism,
            checkpoint: CheckpointSettings {
                interval,
                timeout: dur("execution.checkpointing.timeout"),
                min_pause: dur("execution.checkpointing.min-pause"),
                max_concurrent: int("execution.checkpointing.max-concurrent-checkpoints") as u32,
                tolerable_failed: int("execution.checkpointing.tolerable-failed-checkpoints") as u32,
                num_retained: int("execution.checkpointing.num-retained") as u32,
                dir: get("execution.checkpointing.dir"),
                retention,
                incremental: get("execution.checkpointing.incremental") == "true",
                max_delta_share: get("weir.state.incremental.max-delta-share").parse().expect("checked"),
                local_backup: get("execution.checkpointing.local-backup.enabled") == "true",
                local_recovery: get("execution.state-recovery.from-local") == "true",
                local_dir: Some(get("weir.state.local.dir")).filter(|d| !d.is_empty()),
                savepoint_dir: Some(get("execution.checkpointing.savepoint-dir")).filter(|d| !d.is_empty()),
                storage_options: ["s3.endpoint", "s3.access-key", "s3.secret-key", "s3.path.style.access", "s3.region"]
                    .iter()
                    .filter_map(|k| map.get(k).map(|v| (k.to_string(), v.clone())))
                    .collect(),
            },
            restart,
            state_backend: match get("state.backend.type").as_str() {
                "rocksdb" => StateBackendKind::RocksDb,
                _ => StateBackendKind::Heap,
            },
            rocksdb_dir: Some(get("weir.state.rocksdb.dir")).filter(|d| !d.is_empty()),
            source_batch: int("weir.source.batch-size") as usize,
            max_inflight_batches: int("weir.source.max-inflight-batches") as usize,
            max_line_bytes: parse_bytes(&get("weir.source.max-line-bytes")).expect("checked"),
            gpu: weir_gpu::GpuConfig {
                mode: match get("weir.gpu.enabled").as_str() {
                    "true" => weir_gpu::GpuMode::On,
                    "false" => weir_gpu::GpuMode::Off,
                    // CI sets WEIR_REQUIRE_GPU=1: a missing adapter must fail, not fall back.
                    _ if std::env::var("WEIR_REQUIRE_GPU").is_ok_and(|v| v == "1") => weir_gpu::GpuMode::On,
                    _ => weir_gpu::GpuMode::Auto,
                },
                device: Some(get("weir.gpu.device")).filter(|d| !d.is_empty()),
                fraction: get("taskmanager.gpu.fraction").parse().expect("checked"),
                memory: parse_bytes(&get("taskmanager.gpu.memory")).expect("checked"),
                amount: int("external-resource.gpu.amount") as u32,
                transfer: match get("weir.gpu.transfer.mode").as_str() {
                    "staged" => weir_gpu::TransferMode::Staged,
                    "direct" => weir_gpu::TransferMode::Direct,
                    _ => weir_gpu::TransferMode::Auto,
                },
                ring_size: int("weir.gpu.transfer.ring-size") as usize,
                // Empty: the default cache file; `none`: the built-in values.
                tuning_file: match get("weir.gpu.tuning.file").as_str() {
                    "" => weir_gpu::kernels::tune::default_tuning_file(),
                    "none" => None,
                    f => Some(f.into()),
                },
            },
            gpu_max_inflight: int("weir.gpu.max-inflight-batches") as usize,
            gpu_batch_records: int("weir.gpu.batch.max-records") as usize,
            gpu_batch_latency: dur("weir.gpu.batch.max-latency"),
            gpu_state_full_every: int("weir.gpu.state.full-every") as u32,
            gpu_state_max_delta_share: get("weir.gpu.state.max-delta-share").parse().expect("checked"),
            gpu_state_vram_tier: get("weir.gpu.state.snapshot-tier") == "vram",
            gpu_state_blocking_snapshots: get("weir.gpu.state.snapshot-mode") == "blocking",
            cluster_secret_file: Some(get("cluster.secret-file")).filter(|f| !f.is_empty()),
            allow_non_restored_state: get("execution.state-recovery.ignore-unclaimed-state") == "true",
            savepoint_on_stop: false,
            rest: RestSettings {
                enabled: get("rest.enabled") == "true",
                address: get("rest.address"),
                port: int("rest.port") as u16,
                token_file: Some(get("rest.token-file")).filter(|f| !f.is_empty()),
            },
            metrics_interval: dur("metrics.reporter.interval").max(Duration::from_millis(10)),
            latency_interval: match get("metrics.latency.interval").as_str() {
                "off" | "none" => None,
                v => parse_duration(v).filter(|d| !d.is_zero()),
            },
            web_checkpoints_history: int("web.checkpoints.history") as usize,
        })
    }
}

fn check(key: &str, kind: Kind, v: &str) -> Result<(), ConfigError> {
    let ok = match kind {
        Kind::DurationOrOff => matches!(v, "off" | "none") || parse_duration(v).is_some(),
        Kind::Duration => parse_duration(v).is_some(),
        Kind::Int { min, max } => v.parse::<u64>().is_ok_and(|n| n >= min && n <= max),
        Kind::Str => !v.is_empty(),
        Kind::Fraction => v.parse::<f64>().is_ok_and(|f| f > 0.0 && f <= 1.0),
        Kind::Bytes => parse_bytes(v).is_some_and(|b| b > 0),
        Kind::Enum(values) => values.contains(&v),
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError { key: key.to_string(), message: format!("expected {}, got '{v}'", kind.describe()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Some(Duration::from_millis(200)));
        assert_eq!(parse_duration("10 s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1 min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("1500"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("ten"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }

    #[test]
    fn defaults_and_overrides() {
        let c = JobConfig::default();
        assert_eq!(c.checkpoint.interval, None);
        assert_eq!(c.restart, RestartStrategy::None);
        let c = JobConfig::from_pairs([
            ("execution.checkpointing.interval", "1s"),
            ("parallelism.default", "2"),
            ("state.checkpoints.dir", "/tmp/x"),
            ("execution.checkpointing.interval", "200ms"),
        ])
        .unwrap();
        assert_eq!(c.checkpoint.interval, Some(Duration::from_millis(200)));
        assert_eq!(c.checkpoint.dir, "/tmp/x");
        assert_eq!(c.parallelism, 2);
        assert!(matches!(c.restart, RestartStrategy::FixedDelay { attempts: 10, .. }));
    }

    #[test]
    fn bad_config_names_key_and_type() {
        let e = JobConfig::from_pairs([("execution.checkpointing.interval", "soon")]).unwrap_err();
        assert_eq!(e.key, "execution.checkpointing.interval");
        assert!(e.to_string().contains("expected a duration"), "{e}");
        let e = JobConfig::from_pairs([("parallelism.default", "-1")]).unwrap_err();
        assert!(e.to_string().contains("an integer in 1..=32768"), "{e}");
        let e = JobConfig::from_pairs([("execution.checkpoint.interval", "1s")]).unwrap_err();
        assert!(e.to_string().contains("unknown key (did you mean 'execution.checkpointing.interval'?)"), "{e}");
        let e = JobConfig::from_pairs([("state.backend.type", "rocks")]).unwrap_err();
        assert!(e.message.contains("rocksdb"), "{e}");
        let c = JobConfig::from_pairs([("state.backend", "rocksdb"), ("state.backend.incremental", "true"), ("s3.endpoint", "http://127.0.0.1:9")]).unwrap();
        assert_eq!((c.state_backend, c.checkpoint.incremental), (StateBackendKind::RocksDb, true));
        assert_eq!(c.checkpoint.storage_options, vec![("s3.endpoint".to_string(), "http://127.0.0.1:9".to_string())]);
        assert!(e.to_string().contains("one of hashmap, heap"), "{e}");
        let e = JobConfig::from_pairs([("weir.gpu.transfer.mode", "fast")]).unwrap_err();
        assert!(e.to_string().contains("one of auto, staged, direct"), "{e}");
        let e = JobConfig::from_pairs([("weir.gpu.transfer.ring-size", "0")]).unwrap_err();
        assert_eq!(e.key, "weir.gpu.transfer.ring-size");
    }

    #[test]
    fn max_line_bytes() {
        assert_eq!(JobConfig::default().max_line_bytes, 16 << 20);
        let c = JobConfig::from_pairs([("weir.source.max-line-bytes", "64 kb")]).unwrap();
        assert_eq!(c.max_line_bytes, 64 << 10);
        let e = JobConfig::from_pairs([("weir.source.max-line-bytes", "0")]).unwrap_err();
        assert_eq!(e.key, "weir.source.max-line-bytes");
    }

    #[test]
    fn ignore_unclaimed_state() {
        assert!(!JobConfig::default().allow_non_restored_state);
        let c = JobConfig::from_pairs([("execution.state-recovery.ignore-unclaimed-state", "true")]).unwrap();
        assert!(c.allow_non_restored_state);
        // Flink 1.x's name.
        let c = JobConfig::from_pairs([("execution.savepoint.ignore-unclaimed-state", "true")]).unwrap();
        assert!(c.allow_non_restored_state);
    }

    #[test]
    fn gpu_transfer_keys() {
        let c = JobConfig::from_pairs([("weir.gpu.transfer.mode", "staged"), ("weir.gpu.transfer.ring-size", "8"), ("weir.gpu.max-inflight-batches", "3")]).unwrap();
        assert_eq!((c.gpu.transfer, c.gpu.ring_size, c.gpu_max_inflight), (weir_gpu::TransferMode::Staged, 8, 3));
        let d = JobConfig::default();
        assert_eq!((d.gpu.transfer, d.gpu.ring_size, d.gpu_max_inflight), (weir_gpu::TransferMode::Auto, 4, 2));
    }
}

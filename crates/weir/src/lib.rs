//! Weir: a stream processing engine with Flink's checkpoint semantics, on timely-dataflow.
//!
//! A job is a dataflow of sources, transformations, keyed stateful operators and sinks. Every
//! record carries the epoch its source was in; a checkpoint `n` is the barrier between epoch `n`
//! and `n + 1`. Stateful operators snapshot their state when their input frontier passes `n`
//! (copy-on-write: the pause is O(shards)), write it on a background thread, and acknowledge
//! the coordinator on worker 0, which commits `chk-n/_metadata` atomically. Sinks write each
//! epoch into a hidden file and commit it when the checkpoint that closes it completes: the
//! output is exactly once across crashes.
//!
//! ```
//! use weir::{JobConfig, StreamEnv, sink::CollectSink, source::VecSource};
//!
//! let out = CollectSink::new();
//! let sink = out.clone();
//! let env = StreamEnv::new("doc", JobConfig::from_pairs([("parallelism.default", "2")]).unwrap());
//! env.execute(move |job| {
//!     job.source("numbers", VecSource::new((1..=100u64).collect()))
//!         .filter(|x| x % 2 == 0)
//!         .key_by(|x| x % 3)
//!         .sum(|x| *x)
//!         .sink("collect", sink.clone());
//! }).unwrap();
//! let mut finals = std::collections::BTreeMap::new();
//! for (k, s) in out.take() { let e = finals.entry(k).or_insert(0); *e = (*e).max(s); }
//! assert_eq!(finals.values().sum::<u64>(), (1..=100u64).filter(|x| x % 2 == 0).sum::<u64>());
//! ```
#![forbid(unsafe_code)]

/// A crash point of the commit protocol: with the `failpoints` feature (tests only) and
/// `FAILPOINTS=<name>=return` (or `<n>*off->return` to pass `n` times first), the process
/// aborts here, as a power cut or SIGKILL would stop it; without the feature it is nothing.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| $crate::crash::abort_at($name))
    };
}
pub(crate) use crash_point;

pub mod config;
pub mod connectors;
pub mod epoch;
pub mod job;
pub mod monitor;
pub mod ops;
pub mod row;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod state;
pub mod stream;

/// Crash points for tests of the commit protocol (see the `failpoints` feature).
pub mod crash {
    /// Configure the crash points from the `FAILPOINTS` environment variable; keep the guard
    /// for the life of the process. Without the `failpoints` feature no crash point exists.
    pub fn setup() -> fail::FailScenario<'static> {
        fail::FailScenario::setup()
    }

    /// Abort the process at crash point `name` (no unwinding, no cleanup).
    pub fn abort_at<T>(name: &str) -> T {
        tracing::error!("crash point {name}: aborting the process");
        std::process::abort()
    }
}

pub use config::{ConfigError, JobConfig, RestartStrategy, StateBackendKind};
pub use row::{Row, Value};
pub use runtime::{ClusterConfig, JobError, JobResult, Restore};
pub use stream::{DataStream, Job, KeyedStream, StreamEnv};

/// What flows between operators: owned, sendable between workers and processes.
pub trait Data: Clone + Send + serde::Serialize + serde::de::DeserializeOwned + 'static {}
impl<T: Clone + Send + serde::Serialize + serde::de::DeserializeOwned + 'static> Data for T {}

/// A key: data that hashes stably into key groups.
pub trait Key: Data + std::hash::Hash + Eq + Sync {}
impl<T: Data + std::hash::Hash + Eq + Sync> Key for T {}

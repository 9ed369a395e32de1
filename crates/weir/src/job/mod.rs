//! Declarative YAML jobs of built-in operators, run by `weir run JOB.yaml`.
//!
//! ```yaml
//! name: keyed-sum
//! config:
//!   parallelism.default: 2
//!   execution.checkpointing.interval: 1s
//! source: {type: generator, count: 1000000, keys: 1000}
//! pipeline:
//!   - filter: {field: value, op: gt, value: 10}
//!   - key_by: key
//!   - aggregate: [sum(value), count]
//! sink: {type: file, path: out/keyed-sum}
//! ```
//!
//! A job is checked completely before it starts: unknown fields, unknown config keys, fields
//! that the schema at a step does not have, and ill-typed values are errors naming the place.
//!
//! The source, each step and the sink may carry a `uid:` beside their fields (Flink's `uid()`):
//! a restore gives each operator the state the checkpoint holds under its uid, so a job may
//! gain or lose steps between runs. Without one the uid is derived from the place
//! (`source:generator`, `pipeline[1]:aggregate`, `sink:file`), which inserting a step before a
//! stateful one changes: give stateful steps explicit uids before editing the job.

mod plan;
mod spec;

pub use plan::*;
pub use spec::*;

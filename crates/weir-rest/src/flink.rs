//! The JSON shapes of Flink's REST API, built from a [`JobView`]: pure functions, no I/O, so
//! the field names are tested without a server.
//!
//! Flink's `accumulated-*-time` fields are totals since the job started (ms): per subtask, and
//! the largest subtask's for a vertex, as the Flink UI's "busy (max)".

use serde_json::{json, Map, Value};
use weir::config::{JobConfig, StateBackendKind};
use weir::monitor::{
    CheckpointStats, CheckpointStatus, JobState, JobView, SubtaskCheckpointStats, SubtaskMetrics, TriggerStatus, VertexKind, VertexView,
};
use weir_checkpoint::RetentionPolicy;

/// Flink's execution states of a task, in Flink's order.
const TASK_STATES: [&str; 10] =
    ["CREATED", "SCHEDULED", "DEPLOYING", "RUNNING", "FINISHED", "CANCELING", "CANCELED", "FAILED", "RECONCILING", "INITIALIZING"];

/// Flink's job states, all listed in `timestamps` (0 where never entered), as Flink does.
const JOB_STATES: [&str; 11] =
    ["INITIALIZING", "CREATED", "RUNNING", "FAILING", "CANCELLING", "CANCELED", "FINISHED", "RESTARTING", "SUSPENDED", "RECONCILING", "FAILED"];

/// "weir <version>", where Flink reports its own version.
pub fn version() -> String {
    format!("weir {}", env!("CARGO_PKG_VERSION"))
}

/// The state every task of the job is in: Weir's subtasks live and die together.
fn task_state(s: JobState) -> &'static str {
    match s {
        JobState::Created => "CREATED",
        JobState::Running => "RUNNING",
        // Tasks of a restarting job are being redeployed from the latest checkpoint.
        JobState::Restarting => "INITIALIZING",
        JobState::Cancelling => "CANCELING",
        JobState::Canceled => "CANCELED",
        JobState::Finished => "FINISHED",
        JobState::Failed => "FAILED",
    }
}

fn end_time(v: &JobView) -> i64 {
    v.end_time.map_or(-1, |t| t as i64)
}

fn duration(v: &JobView, now: u64) -> u64 {
    v.end_time.unwrap_or(now).saturating_sub(v.start_time)
}

/// µs → ms, rounded (Flink reports integer milliseconds).
fn ms(us: u64) -> u64 {
    (us + 500) / 1000
}

/// GET /config.
pub fn config() -> Value {
    json!({
        "refresh-interval": 1000,
        "timezone-name": "UTC",
        "timezone-offset": 0,
        "flink-version": version(),
        "flink-revision": "",
        "features": {"web-submit": false, "web-cancel": true},
    })
}

/// GET /overview.
pub fn overview(v: &JobView) -> Value {
    let is = |s: JobState| u32::from(v.state == s);
    json!({
        "taskmanagers": v.processes,
        "slots-total": v.parallelism,
        "slots-available": 0,
        // Flink counts every state that is not terminal as running.
        "jobs-running": u32::from(!v.state.is_terminal()),
        "jobs-finished": is(JobState::Finished),
        "jobs-cancelled": is(JobState::Canceled),
        "jobs-failed": is(JobState::Failed),
        "flink-version": version(),
        "flink-commit": "",
    })
}

/// GET /jobs.
pub fn jobs(v: &JobView) -> Value {
    json!({"jobs": [{"id": v.job_id, "status": v.state.name()}]})
}

fn subtasks_total(v: &JobView) -> u64 {
    v.vertices.iter().map(|x| x.parallelism as u64).sum()
}

/// GET /jobs/overview.
pub fn jobs_overview(v: &JobView, now: u64) -> Value {
    let mut tasks = Map::new();
    for s in TASK_STATES {
        tasks.insert(s.to_ascii_lowercase(), json!(0));
    }
    let total = subtasks_total(v);
    tasks.insert(task_state(v.state).to_ascii_lowercase(), json!(total));
    tasks.insert("total".into(), json!(total));
    let last_modification = v.timestamps.values().copied().max().unwrap_or(v.start_time);
    json!({"jobs": [{
        "jid": v.job_id,
        "name": v.name,
        "state": v.state.name(),
        "start-time": v.start_time,
        "end-time": end_time(v),
        "duration": duration(v, now),
        "last-modification": last_modification,
        "tasks": tasks,
    }]})
}

fn state_counts(n: u64, state: &str) -> Map<String, Value> {
    let mut m: Map<String, Value> = TASK_STATES.iter().map(|s| (s.to_string(), json!(0))).collect();
    m.insert(state.to_string(), json!(n));
    m
}

/// Flink's I/O metrics of some subtasks (a vertex's, or one's).
fn io_metrics<'a>(subtasks: impl Iterator<Item = &'a SubtaskMetrics>) -> Value {
    let (mut read, mut write, mut busy, mut bp, mut idle) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for s in subtasks {
        read += s.records_in;
        write += s.records_out;
        busy = busy.max(s.busy_ms_total);
        bp = bp.max(s.backpressured_ms_total);
        idle = idle.max(s.idle_ms_total);
    }
    json!({
        "read-records": read,
        "read-records-complete": true,
        "write-records": write,
        "write-records-complete": true,
        "read-bytes": 0,
        "read-bytes-complete": true,
        "write-bytes": 0,
        "write-bytes-complete": true,
        "accumulated-backpressured-time": bp,
        "accumulated-idle-time": idle,
        "accumulated-busy-time": busy,
    })
}

fn idle_ms(s: &SubtaskMetrics) -> f64 {
    (1000.0 - s.busy_ms_per_second - s.backpressured_ms_per_second).max(0.0)
}

/// GET /jobs/:jid.
pub fn job_detail(v: &JobView, cfg: &JobConfig, now: u64) -> Value {
    let mut timestamps: Map<String, Value> = JOB_STATES.iter().map(|s| (s.to_string(), json!(0))).collect();
    for (k, t) in &v.timestamps {
        timestamps.insert(k.clone(), json!(t));
    }
    let status = task_state(v.state);
    let vertices: Vec<Value> = v
        .vertices
        .iter()
        .map(|x| {
            json!({
                "id": x.id,
                "name": x.name,
                "parallelism": x.parallelism,
                "maxParallelism": cfg.max_parallelism,
                "status": status,
                "start-time": v.start_time,
                "end-time": end_time(v),
                "duration": duration(v, now),
                "tasks": state_counts(x.parallelism as u64, status),
                "metrics": io_metrics(x.subtasks.iter()),
            })
        })
        .collect();
    json!({
        "jid": v.job_id,
        "name": v.name,
        "isStoppable": true,
        "state": v.state.name(),
        "start-time": v.start_time,
        "end-time": end_time(v),
        "duration": duration(v, now),
        "now": now,
        "maxParallelism": cfg.max_parallelism,
        "timestamps": timestamps,
        "vertices": vertices,
        "status-counts": state_counts(v.vertices.len() as u64, status),
        "plan": plan(v),
        "weir": {
            "restarts": v.restarts,
            "records-read": v.records_read(),
            "records-total": v.records_total,
            "failure": v.failure,
        },
    })
}

fn plan(v: &JobView) -> Value {
    let nodes: Vec<Value> = v
        .vertices
        .iter()
        .map(|x| {
            // A keyed operator reads its inputs repartitioned by key; the others read in place.
            let ship = if x.kind == VertexKind::Keyed { "HASH" } else { "FORWARD" };
            let inputs: Vec<Value> = x
                .inputs
                .iter()
                .enumerate()
                .filter_map(|(num, &i)| v.vertices.get(i).map(|input| (num, input)))
                .map(|(num, input)| json!({"num": num, "id": input.id, "ship_strategy": ship, "exchange": "pipelined_bounded"}))
                .collect();
            json!({
                "id": x.id,
                "parallelism": x.parallelism,
                "operator": "",
                "operator_strategy": "",
                "description": x.name,
                "inputs": inputs,
                "optimizer_properties": {},
            })
        })
        .collect();
    json!({"jid": v.job_id, "name": v.name, "type": "STREAMING", "nodes": nodes})
}

/// Flink's `StatsSummaryDto` of some samples (zeros when there are none).
fn summary(mut xs: Vec<u64>) -> Value {
    if xs.is_empty() {
        return json!({"min": 0, "max": 0, "avg": 0, "p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0, "p999": 0.0});
    }
    xs.sort_unstable();
    let n = xs.len();
    // Nearest rank: the smallest sample with at least q of the samples at or below it.
    let q = |q: f64| xs[((q * n as f64).ceil() as usize).clamp(1, n) - 1] as f64;
    json!({
        "min": xs[0],
        "max": xs[n - 1],
        "avg": xs.iter().sum::<u64>() / n as u64,
        "p50": q(0.5),
        "p90": q(0.9),
        "p95": q(0.95),
        "p99": q(0.99),
        "p999": q(0.999),
    })
}

/// GET /jobs/:jid/checkpoints.
pub fn checkpoints(v: &JobView) -> Value {
    let c = &v.checkpoints;
    let samples = &c.completed_samples;
    let zeros = summary(Vec::new());
    let entry_or_null = |x: &Option<CheckpointStats>| x.as_ref().map_or(Value::Null, |x| checkpoint_entry(v, x));
    json!({
        "counts": {
            "restored": c.counts.restored,
            "total": c.counts.total,
            "in_progress": c.counts.in_progress,
            "completed": c.counts.completed,
            "failed": c.counts.failed,
        },
        "summary": {
            "checkpointed_size": summary(samples.iter().map(|s| s.2).collect()),
            "state_size": summary(samples.iter().map(|s| s.1).collect()),
            "end_to_end_duration": summary(samples.iter().map(|s| s.0).collect()),
            "alignment_buffered": zeros,
            "processed_data": zeros,
            "persisted_data": zeros,
        },
        "latest": {
            "completed": entry_or_null(&c.latest_completed),
            "savepoint": entry_or_null(&c.latest_savepoint),
            "failed": entry_or_null(&c.latest_failed),
            "restored": c.restored.as_ref().map(|r| json!({
                "id": r.id,
                "restore_timestamp": r.restore_timestamp,
                "is_savepoint": r.is_savepoint,
                "external_path": r.external_path,
            })),
        },
        "history": c.history.iter().map(|x| checkpoint_entry(v, x)).collect::<Vec<_>>(),
    })
}

/// A checkpoint of the history by id (the latest ones too, should the history have moved on).
pub fn find_checkpoint(v: &JobView, id: u64) -> Option<&CheckpointStats> {
    let c = &v.checkpoints;
    let latest = [&c.latest_completed, &c.latest_savepoint, &c.latest_failed];
    c.history.iter().chain(latest.into_iter().flatten()).find(|x| x.id == id)
}

fn status_name(s: CheckpointStatus) -> &'static str {
    match s {
        CheckpointStatus::InProgress => "IN_PROGRESS",
        CheckpointStatus::Completed => "COMPLETED",
        CheckpointStatus::Failed => "FAILED",
    }
}

/// One subtask's acknowledgement as Flink's `SubtaskCheckpointStatistics` (completed).
///
/// `start_delay` is trigger → the first record of a later epoch at the input (the barrier's
/// first sight); `alignment.duration` from there to the epoch's close.
fn subtask_entry(c: &CheckpointStats, s: &SubtaskCheckpointStats) -> Value {
    json!({
        "index": s.subtask,
        "status": "completed",
        "ack_timestamp": s.ack_timestamp,
        "end_to_end_duration": s.ack_timestamp.saturating_sub(c.trigger_timestamp),
        "state_size": s.state_size,
        "checkpointed_size": s.checkpointed_size,
        "checkpoint": {"sync": ms(s.sync_us), "async": ms(s.async_us)},
        "alignment": {"duration": ms(s.alignment_us), "buffered": 0, "processed": 0, "persisted": 0},
        "start_delay": ms(s.barrier_us.saturating_sub(s.alignment_us)),
        "unaligned_checkpoint": false,
        "aborted": false,
    })
}

/// One operator's part of checkpoint `c` (Flink's `TaskCheckpointStatistics`), and its
/// acknowledged subtasks in subtask order.
fn task_entry<'a>(c: &'a CheckpointStats, x: &VertexView) -> (Map<String, Value>, Vec<&'a SubtaskCheckpointStats>) {
    let mut acks: Vec<&SubtaskCheckpointStats> =
        c.tasks.iter().filter(|t| t.vertex == x.index).flat_map(|t| t.subtasks.iter()).collect();
    acks.sort_by_key(|s| s.subtask);
    let latest_ack = acks.iter().map(|s| s.ack_timestamp).max();
    let mut m = Map::new();
    m.insert("id".into(), json!(x.id));
    m.insert("status".into(), json!(status_name(c.status)));
    m.insert("latest_ack_timestamp".into(), json!(latest_ack.map_or(-1, |t| t as i64)));
    m.insert("checkpointed_size".into(), json!(acks.iter().map(|s| s.checkpointed_size).sum::<u64>()));
    m.insert("state_size".into(), json!(acks.iter().map(|s| s.state_size).sum::<u64>()));
    m.insert("end_to_end_duration".into(), json!(latest_ack.map_or(0, |t| t.saturating_sub(c.trigger_timestamp))));
    m.insert("alignment_buffered".into(), json!(0));
    m.insert("processed_data".into(), json!(0));
    m.insert("persisted_data".into(), json!(0));
    m.insert("num_subtasks".into(), json!(x.parallelism));
    m.insert("num_acknowledged_subtasks".into(), json!(acks.len()));
    (m, acks)
}

/// A checkpoint of the history as Flink's `CheckpointStatistics` (plus the `tasks` details and
/// Weir's own figures).
pub fn checkpoint_entry(v: &JobView, c: &CheckpointStats) -> Value {
    let class = match c.status {
        CheckpointStatus::InProgress => ".PendingCheckpointStatistics",
        CheckpointStatus::Completed => ".CompletedCheckpointStatistics",
        CheckpointStatus::Failed => ".FailedCheckpointStatistics",
    };
    let mut tasks = Map::new();
    for x in &v.vertices {
        let (mut t, acks) = task_entry(c, x);
        t.insert("subtasks".into(), acks.iter().map(|s| subtask_entry(c, s)).collect());
        tasks.insert(x.id.clone(), Value::Object(t));
    }
    let (barrier, sync, asynch) = c.max_costs();
    let mut m = Map::new();
    m.insert("className".into(), json!(class));
    m.insert("id".into(), json!(c.id));
    m.insert("status".into(), json!(status_name(c.status)));
    m.insert("is_savepoint".into(), json!(c.is_savepoint));
    m.insert("savepointFormat".into(), if c.is_savepoint { json!("CANONICAL") } else { Value::Null });
    m.insert("trigger_timestamp".into(), json!(c.trigger_timestamp));
    m.insert("latest_ack_timestamp".into(), json!(c.latest_ack_timestamp));
    m.insert("checkpointed_size".into(), json!(c.checkpointed_size));
    m.insert("state_size".into(), json!(c.state_size));
    m.insert("end_to_end_duration".into(), json!(c.end_to_end_duration));
    m.insert("alignment_buffered".into(), json!(0));
    m.insert("processed_data".into(), json!(0));
    m.insert("persisted_data".into(), json!(0));
    m.insert("num_subtasks".into(), json!(c.num_subtasks));
    m.insert("num_acknowledged_subtasks".into(), json!(c.num_acknowledged_subtasks));
    m.insert("checkpoint_type".into(), json!(if c.is_savepoint { "SAVEPOINT" } else { "CHECKPOINT" }));
    match c.status {
        CheckpointStatus::Completed => {
            m.insert("external_path".into(), json!(c.external_path));
            m.insert("discarded".into(), json!(false));
        }
        CheckpointStatus::Failed => {
            m.insert("failure_timestamp".into(), json!(c.failure_timestamp));
            m.insert("failure_message".into(), json!(c.failure_message));
        }
        CheckpointStatus::InProgress => {}
    }
    m.insert("tasks".into(), Value::Object(tasks));
    m.insert(
        "weir".into(),
        json!({"incremental": c.is_incremental, "is_final": c.is_final, "barrier_ms": ms(barrier), "sync_ms": ms(sync), "async_ms": ms(asynch)}),
    );
    Value::Object(m)
}

/// GET /jobs/:jid/checkpoints/details/:cid/subtasks/:vid (Flink's
/// `TaskCheckpointStatisticsWithSubtaskDetails`): subtasks that have not acknowledged are listed
/// as `pending_or_failed`, as Flink does.
pub fn checkpoint_task(c: &CheckpointStats, x: &VertexView) -> Value {
    let (mut m, acks) = task_entry(c, x);
    let sum = |f: &dyn Fn(&SubtaskCheckpointStats) -> u64| summary(acks.iter().map(|s| f(s)).collect());
    m.insert(
        "summary".into(),
        json!({
            "checkpointed_size": sum(&|s| s.checkpointed_size),
            "state_size": sum(&|s| s.state_size),
            "end_to_end_duration": sum(&|s| s.ack_timestamp.saturating_sub(c.trigger_timestamp)),
            "checkpoint_duration": {"sync": sum(&|s| ms(s.sync_us)), "async": sum(&|s| ms(s.async_us))},
            "alignment": {"buffered": summary(Vec::new()), "processed": summary(Vec::new()), "persisted": summary(Vec::new()),
                          "duration": sum(&|s| ms(s.alignment_us))},
            "start_delay": sum(&|s| ms(s.barrier_us.saturating_sub(s.alignment_us))),
        }),
    );
    let subtasks: Vec<Value> = (0..x.parallelism)
        .map(|i| match acks.iter().find(|s| s.subtask == i) {
            Some(s) => subtask_entry(c, s),
            None => json!({"index": i, "status": "pending_or_failed"}),
        })
        .collect();
    m.insert("subtasks".into(), Value::Array(subtasks));
    Value::Object(m)
}

/// GET /jobs/:jid/checkpoints/config.
pub fn checkpoint_config(cfg: &JobConfig) -> Value {
    let c = &cfg.checkpoint;
    let savepoint_dir = c.savepoint_dir.clone().or_else(|| (!c.dir.is_empty()).then(|| format!("{}/savepoints", c.dir.trim_end_matches('/'))));
    json!({
        "mode": "exactly_once",
        // Flink's "never" for checkpointing off.
        "interval": c.interval.map_or(i64::MAX, |d| d.as_millis() as i64),
        "timeout": c.timeout.as_millis() as u64,
        "min_pause": c.min_pause.as_millis() as u64,
        "max_concurrent": c.max_concurrent,
        "externalization": {
            "enabled": c.retention != RetentionPolicy::NoExternalizedCheckpoints,
            "delete_on_cancellation": c.retention == RetentionPolicy::DeleteOnCancellation,
        },
        "state_backend": match cfg.state_backend {
            StateBackendKind::Heap => "HashMapStateBackend",
            StateBackendKind::RocksDb => "EmbeddedRocksDBStateBackend",
        },
        "checkpoint_storage": "FileSystemCheckpointStorage",
        "unaligned_checkpoints": false,
        "tolerable_failed_checkpoints": c.tolerable_failed,
        "aligned_checkpoint_timeout": 0,
        "checkpoints_after_tasks_finish": true,
        "state_changelog_enabled": false,
        "changelog_periodic_materialization_interval": -1,
        "changelog_storage": "memory",
        "weir": {"incremental": c.incremental, "local_backup": c.local_backup, "dir": c.dir, "savepoint_dir": savepoint_dir},
    })
}

/// A vertex's subtasks 0..parallelism with what each reported (zeros where nothing yet).
fn subtask_metrics(x: &VertexView) -> impl Iterator<Item = SubtaskMetrics> + '_ {
    (0..x.parallelism).map(move |i| x.subtasks.iter().find(|s| s.subtask == i).cloned().unwrap_or(SubtaskMetrics { subtask: i, ..Default::default() }))
}

/// GET /jobs/:jid/vertices/:vid.
pub fn vertex_detail(v: &JobView, cfg: &JobConfig, x: &VertexView, now: u64) -> Value {
    let subtasks: Vec<Value> = subtask_metrics(x)
        .map(|s| {
            let endpoint = format!("process-{}", s.process);
            json!({
                "subtask": s.subtask,
                "status": task_state(v.state),
                "attempt": v.restarts,
                "endpoint": endpoint,
                "start-time": v.start_time,
                "end-time": end_time(v),
                "duration": duration(v, now),
                "metrics": io_metrics(std::iter::once(&s)),
                "taskmanager-id": endpoint,
                "weir": {
                    "records-in-per-second": s.records_in_per_second,
                    "records-out-per-second": s.records_out_per_second,
                    "busy-ms-per-second": s.busy_ms_per_second,
                    "backpressured-ms-per-second": s.backpressured_ms_per_second,
                    "latency": s.latency.map(|l| latency(&l)),
                },
            })
        })
        .collect();
    json!({
        "id": x.id,
        "name": x.name,
        "parallelism": x.parallelism,
        "maxParallelism": cfg.max_parallelism,
        "now": now,
        "subtasks": subtasks,
    })
}

fn latency(l: &weir::monitor::LatencySummary) -> Value {
    json!({"p50": l.p50, "p95": l.p95, "p99": l.p99, "max": l.max, "count": l.count})
}

fn backpressure_level(ratio: f64) -> &'static str {
    if ratio < 0.10 {
        "ok"
    } else if ratio < 0.5 {
        "low"
    } else {
        "high"
    }
}

/// GET /jobs/:jid/vertices/:vid/backpressure.
pub fn backpressure(v: &JobView, x: &VertexView, now: u64) -> Value {
    let mut worst = 0f64;
    let subtasks: Vec<Value> = subtask_metrics(x)
        .map(|s| {
            let ratio = s.backpressured_ms_per_second / 1000.0;
            worst = worst.max(ratio);
            json!({
                "subtask": s.subtask,
                "attempt-number": v.restarts,
                "backpressure-level": backpressure_level(ratio),
                "ratio": ratio,
                "idleRatio": idle_ms(&s) / 1000.0,
                "busyRatio": s.busy_ms_per_second / 1000.0,
            })
        })
        .collect();
    json!({"status": "ok", "backpressure-level": backpressure_level(worst), "end-timestamp": now, "subtasks": subtasks})
}

/// GET /jobs/:jid/latency (Weir's).
pub fn latencies(v: &JobView, cfg: &JobConfig) -> Value {
    let vertices: Vec<Value> = v
        .vertices
        .iter()
        .map(|x| {
            let subtasks: Vec<Value> = x
                .subtasks
                .iter()
                .filter_map(|s| s.latency.map(|l| (s.subtask, l)))
                .map(|(i, l)| {
                    let mut o = latency(&l);
                    o["subtask"] = json!(i);
                    o
                })
                .collect();
            json!({"id": x.id, "name": x.name, "subtasks": subtasks})
        })
        .collect();
    json!({"interval_ms": cfg.latency_interval.map(|d| d.as_millis() as u64), "vertices": vertices})
}

/// GET /jobs/:jid/gpu (Weir's).
pub fn gpu(v: &JobView) -> Value {
    match v.gpu.as_ref().and_then(|g| serde_json::to_value(g).ok()) {
        Some(Value::Object(mut m)) => {
            m.insert("available".into(), json!(true));
            Value::Object(m)
        }
        _ => json!({"available": false}),
    }
}

/// Which endpoint polls a trigger: the savepoint one reports a location, the checkpoint one an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerKind {
    /// GET /jobs/:jid/savepoints/:triggerid (savepoints, stop).
    Savepoint,
    /// GET /jobs/:jid/checkpoints/:triggerid.
    Checkpoint,
}

/// Flink's asynchronous operation result: a failure is COMPLETED with a `failure-cause`.
pub fn trigger(status: &TriggerStatus, kind: TriggerKind) -> Value {
    let (id, operation) = match status {
        TriggerStatus::InProgress => ("IN_PROGRESS", Value::Null),
        TriggerStatus::Completed { location, checkpoint } => (
            "COMPLETED",
            match kind {
                TriggerKind::Savepoint => json!({"location": location}),
                TriggerKind::Checkpoint => json!({"checkpointId": checkpoint}),
            },
        ),
        TriggerStatus::Failed { message } => {
            let class = match kind {
                TriggerKind::Savepoint => "weir.SavepointFailure",
                TriggerKind::Checkpoint => "weir.CheckpointFailure",
            };
            ("COMPLETED", json!({"failure-cause": {"class": class, "stack-trace": message, "serialized-throwable": null}}))
        }
    };
    json!({"status": {"id": id}, "operation": operation})
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir::monitor::{JobMonitor, TaskCheckpointStats};

    fn vertex(index: usize, kind: VertexKind, inputs: Vec<usize>) -> VertexView {
        VertexView { index, id: format!("{index:032x}"), name: format!("op{index}"), kind, inputs, parallelism: 2, subtasks: Vec::new() }
    }

    /// Flink's `CheckpointStatistics` fields (of every kind), its task and subtask fields.
    const ENTRY_KEYS: &[&str] = &[
        "className", "id", "status", "is_savepoint", "savepointFormat", "trigger_timestamp", "latest_ack_timestamp", "checkpointed_size",
        "state_size", "end_to_end_duration", "alignment_buffered", "processed_data", "persisted_data", "num_subtasks",
        "num_acknowledged_subtasks", "checkpoint_type", "tasks",
    ];
    const COMPLETED_KEYS: &[&str] = &["external_path", "discarded"];
    const FAILED_KEYS: &[&str] = &["failure_timestamp", "failure_message"];
    const TASK_KEYS: &[&str] = &[
        "id", "status", "latest_ack_timestamp", "checkpointed_size", "state_size", "end_to_end_duration", "num_subtasks",
        "num_acknowledged_subtasks", "subtasks",
    ];
    const SUBTASK_KEYS: &[&str] =
        &["index", "ack_timestamp", "end_to_end_duration", "state_size", "checkpointed_size", "checkpoint", "alignment", "start_delay"];

    fn has_keys(v: &Value, keys: &[&str], what: &str) {
        for k in keys {
            assert!(v.get(*k).is_some(), "{what} lacks Flink's '{k}': {v}");
        }
    }

    #[test]
    fn every_checkpoint_entry_has_flinks_fields() {
        let cfg = JobConfig::from_pairs([("execution.checkpointing.dir", "/tmp/x")]).unwrap();
        let m = JobMonitor::new("j", &cfg);
        m.set_graph(vec![vertex(0, VertexKind::Source, vec![]), vertex(1, VertexKind::Keyed, vec![0])], 1, None);
        m.set_state(JobState::Running, None);
        let ack = |s| SubtaskCheckpointStats { subtask: s, ack_timestamp: 1_050, barrier_us: 2_000, sync_us: 1_000, async_us: 9_000, ..Default::default() };
        for id in 1..=3 {
            m.on_trigger(id, 1_000, id == 2, false, 4);
            m.on_ack(id, 0, ack(0));
            m.on_ack(id, 1, ack(1));
        }
        m.on_complete(1, 1_100, false, Some("/tmp/x/chk-1".into()));
        m.on_complete(2, 1_200, false, Some("/tmp/x/chk-2".into()));
        m.on_savepoint(2, "/tmp/x/savepoints/sp-2");
        m.on_failed(3, "declined".into());
        m.on_trigger(4, 2_000, false, false, 4);
        let v = m.view();
        let all = checkpoints(&v);
        let latest = ["completed", "savepoint", "failed"].map(|k| all["latest"][k].clone());
        let entries: Vec<Value> = all["history"].as_array().unwrap().iter().cloned().chain(latest).collect();
        assert_eq!(entries.len(), 7);
        for e in &entries {
            has_keys(e, ENTRY_KEYS, "checkpoint");
            match e["status"].as_str().unwrap() {
                "COMPLETED" => has_keys(e, COMPLETED_KEYS, "completed checkpoint"),
                "FAILED" => has_keys(e, FAILED_KEYS, "failed checkpoint"),
                s => assert_eq!(s, "IN_PROGRESS"),
            }
            let tasks = e["tasks"].as_object().unwrap();
            assert_eq!(tasks.len(), 2, "every vertex is listed");
            for t in tasks.values() {
                has_keys(t, TASK_KEYS, "task");
                for s in t["subtasks"].as_array().unwrap() {
                    has_keys(s, SUBTASK_KEYS, "subtask");
                }
            }
            let detail = checkpoint_task(find_checkpoint(&v, e["id"].as_u64().unwrap()).unwrap(), &v.vertices[1]);
            has_keys(&detail, TASK_KEYS, "task detail");
            has_keys(&detail, &["summary"], "task detail");
        }
        assert_eq!(all["latest"]["savepoint"]["savepointFormat"], "CANONICAL");
        assert_eq!(all["latest"]["savepoint"]["checkpoint_type"], "SAVEPOINT");
        assert_eq!(all["history"][0]["className"], ".PendingCheckpointStatistics");
    }

    #[test]
    fn summaries_are_nearest_rank() {
        let s = summary((1..=100).collect());
        assert_eq!((s["min"].as_u64(), s["max"].as_u64(), s["avg"].as_u64()), (Some(1), Some(100), Some(50)));
        assert_eq!((s["p50"].as_f64(), s["p90"].as_f64(), s["p999"].as_f64()), (Some(50.0), Some(90.0), Some(100.0)));
        assert_eq!(summary(Vec::new())["p99"].as_f64(), Some(0.0));
    }

    #[test]
    fn a_task_without_acks_says_so() {
        let c = CheckpointStats {
            id: 1,
            status: CheckpointStatus::InProgress,
            is_savepoint: false,
            is_final: false,
            is_incremental: false,
            trigger_timestamp: 10,
            latest_ack_timestamp: 10,
            state_size: 0,
            checkpointed_size: 0,
            end_to_end_duration: 0,
            num_subtasks: 2,
            num_acknowledged_subtasks: 1,
            external_path: None,
            failure_message: None,
            failure_timestamp: None,
            tasks: vec![TaskCheckpointStats { vertex: 0, subtasks: vec![SubtaskCheckpointStats { subtask: 1, ack_timestamp: 30, ..Default::default() }] }],
        };
        let t = checkpoint_task(&c, &vertex(0, VertexKind::Source, vec![]));
        assert_eq!(t["subtasks"][0]["status"], "pending_or_failed");
        assert_eq!(t["subtasks"][1]["end_to_end_duration"], 20);
        assert_eq!(t["num_acknowledged_subtasks"], 1);
        let other = checkpoint_task(&c, &vertex(1, VertexKind::Sink, vec![0]));
        assert_eq!(other["latest_ack_timestamp"], -1);
    }
}

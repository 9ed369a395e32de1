//! What a running job shows of itself, and what it can be asked to do.
//!
//! [`JobMonitor`] is the one model that the REST API, the web dashboard, the Prometheus metrics
//! and the progress bar read (`weir-rest` serves it; nothing here does I/O). The runtime writes
//! into it from process 0's coordinator: checkpoint history from the coordinator's actions, and
//! per-operator metrics that every worker of every process reports over the job's control
//! channel about once a second (`metrics.reporter.interval`). Readers take a copy
//! ([`JobMonitor::view`]); the hot path never touches it: operators count into per-worker cells.
//!
//! Commands (a checkpoint or savepoint now, stop with a savepoint, cancel) are queued here by
//! [`JobMonitor::submit`] and carried out by the coordinator's loop; each gets a trigger id whose
//! outcome [`JobMonitor::trigger_status`] reports, as Flink's asynchronous operations do.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::JobConfig;

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A job's life, with Flink's state names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Built, not yet running (restoring, connecting processes).
    Created,
    /// Running.
    Running,
    /// Failed; restarting from the latest checkpoint per the restart strategy.
    Restarting,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Canceled,
    /// Ended without error (bounded input, or stopped with a savepoint).
    Finished,
    /// Failed for good.
    Failed,
}

impl JobState {
    /// Flink's name of the state (`RUNNING`, `CANCELED`, ...).
    pub fn name(self) -> &'static str {
        match self {
            JobState::Created => "CREATED",
            JobState::Running => "RUNNING",
            JobState::Restarting => "RESTARTING",
            JobState::Cancelling => "CANCELLING",
            JobState::Canceled => "CANCELED",
            JobState::Finished => "FINISHED",
            JobState::Failed => "FAILED",
        }
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Canceled | JobState::Finished | JobState::Failed)
    }
}

/// A checkpoint's outcome, with Flink's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CheckpointStatus {
    /// Triggered, not all tasks acknowledged (or `_metadata` not yet written).
    InProgress,
    /// `_metadata` written.
    Completed,
    /// Aborted, declined or expired.
    Failed,
}

/// One subtask's part of one checkpoint (Flink's per-subtask checkpoint statistics).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SubtaskCheckpointStats {
    /// The subtask index.
    pub subtask: u32,
    /// When its acknowledgement reached the coordinator (ms since the Unix epoch).
    pub ack_timestamp: u64,
    /// Trigger → the barrier passed this subtask's input (start delay and alignment), µs.
    pub barrier_us: u64,
    /// The alignment part of `barrier_us` (first record of a later epoch → close), µs; the
    /// rest is Flink's start delay.
    pub alignment_us: u64,
    /// The synchronous part of the snapshot, µs.
    pub sync_us: u64,
    /// The asynchronous write, µs.
    pub async_us: u64,
    /// Bytes written to checkpoint storage by this checkpoint.
    pub checkpointed_size: u64,
    /// Bytes of state the checkpoint references (its own and shared files).
    pub state_size: u64,
}

/// One operator's part of one checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskCheckpointStats {
    /// The vertex ([`VertexView::index`]) this operator is.
    pub vertex: usize,
    /// Acknowledged subtasks.
    pub subtasks: Vec<SubtaskCheckpointStats>,
}

/// One checkpoint in the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointStats {
    /// The checkpoint id (= the epoch it closes).
    pub id: u64,
    /// Its outcome so far.
    pub status: CheckpointStatus,
    /// Taken as a savepoint (full, canonical format).
    pub is_savepoint: bool,
    /// The final checkpoint of a bounded or stopped job.
    pub is_final: bool,
    /// Incremental (lists files of earlier checkpoints).
    pub is_incremental: bool,
    /// Trigger time, ms since the Unix epoch.
    pub trigger_timestamp: u64,
    /// The latest acknowledgement so far, ms since the Unix epoch.
    pub latest_ack_timestamp: u64,
    /// Bytes of state the checkpoint references.
    pub state_size: u64,
    /// Bytes this checkpoint wrote.
    pub checkpointed_size: u64,
    /// Trigger → completion (or → now, while in progress; → failure), ms.
    pub end_to_end_duration: u64,
    /// Subtasks that take part.
    pub num_subtasks: u32,
    /// Subtasks that acknowledged.
    pub num_acknowledged_subtasks: u32,
    /// Where the checkpoint (or the savepoint copy) lives, once completed.
    pub external_path: Option<String>,
    /// Why it failed.
    pub failure_message: Option<String>,
    /// When it failed, ms since the Unix epoch.
    pub failure_timestamp: Option<u64>,
    /// Per operator, per subtask.
    pub tasks: Vec<TaskCheckpointStats>,
}

impl CheckpointStats {
    /// The largest barrier/alignment, sync and async times of its subtasks, µs.
    pub fn max_costs(&self) -> (u64, u64, u64) {
        let all = self.tasks.iter().flat_map(|t| t.subtasks.iter());
        all.fold((0, 0, 0), |(b, s, a), x| (b.max(x.barrier_us), s.max(x.sync_us), a.max(x.async_us)))
    }
}

/// Checkpoint counts since the job started (Flink's `counts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCounts {
    /// Restores (restarts from a checkpoint, and the restore at start).
    pub restored: u64,
    /// Triggered.
    pub total: u64,
    /// Pending now.
    pub in_progress: u64,
    /// Completed.
    pub completed: u64,
    /// Failed.
    pub failed: u64,
}

/// The checkpoint the job (last) restored from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredCheckpoint {
    /// Its id.
    pub id: u64,
    /// When the restore happened, ms since the Unix epoch.
    pub restore_timestamp: u64,
    /// A savepoint (given with `--restore`).
    pub is_savepoint: bool,
    /// Its location.
    pub external_path: String,
}

/// Checkpoints of the job: counts, the history (newest first) and the latest of each kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointsView {
    /// Counts since the job started.
    pub counts: CheckpointCounts,
    /// Newest first, at most `web.checkpoints.history` entries.
    pub history: VecDeque<CheckpointStats>,
    /// The latest completed checkpoint (savepoints included).
    pub latest_completed: Option<CheckpointStats>,
    /// The latest completed savepoint.
    pub latest_savepoint: Option<CheckpointStats>,
    /// The latest failed checkpoint.
    pub latest_failed: Option<CheckpointStats>,
    /// The restore this attempt started from.
    pub restored: Option<RestoredCheckpoint>,
    /// Duration (ms), state size and checkpointed size of every completed checkpoint since the
    /// job started, for the summary's min/avg/max and percentiles (at most the latest 1,000).
    pub completed_samples: VecDeque<(u64, u64, u64)>,
}

/// Latency quantiles of a window, ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Records measured.
    pub count: u64,
}

/// What one subtask of an operator reported last.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SubtaskMetrics {
    /// The subtask index (= the worker).
    pub subtask: u32,
    /// The process that runs it.
    pub process: u32,
    /// Records received, in total.
    pub records_in: u64,
    /// Records emitted, in total.
    pub records_out: u64,
    /// Over the last report interval.
    pub records_in_per_second: f64,
    /// Over the last report interval.
    pub records_out_per_second: f64,
    /// Time spent working, per second of the last interval (Flink's `busyTimeMsPerSecond`).
    pub busy_ms_per_second: f64,
    /// Time held back by flow control, per second (Flink's `backPressuredTimeMsPerSecond`).
    pub backpressured_ms_per_second: f64,
    /// Busy time since the job started, ms (Flink's `accumulated-busy-time`).
    pub busy_ms_total: u64,
    /// Back-pressured time since the job started, ms.
    pub backpressured_ms_total: u64,
    /// Idle time since the job started (neither busy nor back-pressured), ms.
    pub idle_ms_total: u64,
    /// Source → this operator, over the last `LATENCY_WINDOWS` report intervals.
    pub latency: Option<LatencySummary>,
    /// When it reported, ms since the Unix epoch.
    pub updated_ms: u64,
}

/// What kind of operator a vertex is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VertexKind {
    /// A replayable source.
    Source,
    /// A batching (GPU) operator without keyed state.
    Batch,
    /// A keyed stateful operator.
    Keyed,
    /// A transactional sink.
    Sink,
}

/// One operator of the job graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VertexView {
    /// Its position among the job's vertices.
    pub index: usize,
    /// A stable 32-hex-digit id (from its uid, or name and position), like Flink's vertex ids.
    pub id: String,
    /// The operator's name.
    pub name: String,
    /// Its kind.
    pub kind: VertexKind,
    /// The vertices whose output it reads.
    pub inputs: Vec<usize>,
    /// Subtasks.
    pub parallelism: u32,
    /// Per subtask, as last reported (ordered by subtask).
    pub subtasks: Vec<SubtaskMetrics>,
}

/// One GPU operator's live figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuOperatorView {
    /// The operator's name.
    pub name: String,
    /// Batches run on the device.
    pub batches: u64,
    /// Device (kernel) time, ms, in total.
    pub kernel_ms: f64,
    /// Host ↔ device transfer time, ms, in total.
    pub transfer_ms: f64,
    /// S = T_cpu / T_gpu, measured live (the CPU path timed on sampled batches), if measured.
    pub speedup: Option<f64>,
}

/// The GPU of the job's process 0 (and of every process that reported one).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuView {
    /// Adapter name.
    pub adapter: String,
    /// Backend (Vulkan, Metal, ...).
    pub backend: String,
    /// Device type (DiscreteGpu, Cpu, ...).
    pub device_type: String,
    /// The memory pool's budget, bytes.
    pub pool_budget_bytes: u64,
    /// Bytes taken from the device.
    pub pool_reserved_bytes: u64,
    /// Bytes handed out now.
    pub pool_in_use_bytes: u64,
    /// Peak of in use.
    pub pool_peak_bytes: u64,
    /// Batches in flight on the transfer ring now.
    pub batches_in_flight: u64,
    /// Batches submitted, in total.
    pub batches: u64,
    /// Bytes uploaded, in total.
    pub bytes_up: u64,
    /// Bytes read back, in total.
    pub bytes_down: u64,
    /// Per GPU operator.
    pub operators: Vec<GpuOperatorView>,
}

/// A copy of everything the monitor knows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobView {
    /// 32 hex digits, fixed for the life of the monitor (Flink's job id).
    pub job_id: String,
    /// The job's name (the name its checkpoints are stored under).
    pub name: String,
    /// Its state.
    pub state: JobState,
    /// When it started, ms since the Unix epoch.
    pub start_time: u64,
    /// When it ended.
    pub end_time: Option<u64>,
    /// When each state was entered (ms since the Unix epoch), Flink's `timestamps`.
    pub timestamps: BTreeMap<String, u64>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Restarts so far.
    pub restarts: u32,
    /// Processes of the cluster.
    pub processes: u32,
    /// Workers in all (the parallelism).
    pub parallelism: u32,
    /// Operators, in the order the job built them.
    pub vertices: Vec<VertexView>,
    /// Checkpoints.
    pub checkpoints: CheckpointsView,
    /// The GPU, if the job uses one.
    pub gpu: Option<GpuView>,
    /// Records the job's sources will read in all, where they know it (bounded files).
    pub records_total: Option<u64>,
}

impl JobView {
    /// Records read by all sources so far.
    pub fn records_read(&self) -> u64 {
        let sources = self.vertices.iter().filter(|v| v.kind == VertexKind::Source);
        sources.flat_map(|v| v.subtasks.iter()).map(|s| s.records_out).sum()
    }
}

/// What the job can be asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobCommand {
    /// Take a checkpoint now (besides the periodic ones).
    Checkpoint,
    /// Take a savepoint now and go on; `target` overrides `execution.checkpointing.savepoint-dir`.
    Savepoint {
        /// Where the savepoint goes.
        target: Option<String>,
    },
    /// Stop with a savepoint (Flink's `stop`): sources end, the final checkpoint is a savepoint.
    StopWithSavepoint {
        /// Where the savepoint goes.
        target: Option<String>,
    },
    /// Cancel: stop now without a savepoint.
    Cancel,
}

/// The outcome of a command, polled by its trigger id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerStatus {
    /// Queued or running.
    InProgress,
    /// Done: for a checkpoint or savepoint, where it lives.
    Completed {
        /// Its location (a savepoint's directory, a checkpoint's `chk-<id>`), if any.
        location: Option<String>,
        /// The checkpoint id it became, if any.
        checkpoint: Option<u64>,
    },
    /// It failed, and why.
    Failed {
        /// Why.
        message: String,
    },
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The job is not running (created, restarting or ended).
    #[error("job is {0:?}, not RUNNING")]
    NotRunning(JobState),
    /// A savepoint needs checkpoint storage (`execution.checkpointing.dir`).
    #[error("{0}")]
    Unsupported(String),
    /// Another stop or cancel was already asked for.
    #[error("the job is already being stopped")]
    AlreadyStopping,
    /// Too many commands are waiting already.
    #[error("{0} commands are waiting already; try again when they are done")]
    Busy(usize),
}

/// Commands queued or running at once, at most (each asked-for checkpoint waits for the ones
/// before it): a flood of requests is refused rather than queued without end.
pub const MAX_OPEN_COMMANDS: usize = 16;
/// Outcomes of commands kept for polling, at most; the oldest finished ones go first.
const MAX_TRIGGERS: usize = 1000;

/// Report intervals a latency summary spans.
pub const LATENCY_WINDOWS: usize = 10;

/// The monitor of one job (shared by its restarts).
pub struct JobMonitor {
    job_id: String,
    config: Arc<JobConfig>,
    view: Mutex<JobView>,
    commands: Mutex<VecDeque<(String, JobCommand)>>,
    triggers: Mutex<BTreeMap<String, TriggerStatus>>,
    next_trigger: AtomicU64,
    /// Per (vertex, subtask): the latency histograms of the last report intervals.
    latency: Mutex<BTreeMap<(usize, u32), VecDeque<LatencyHistogram>>>,
    history_size: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A reader that panicked leaves consistent data: every update is a plain assignment.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobMonitor {
    /// A monitor for job `name` run with `config`.
    pub fn new(name: &str, config: &JobConfig) -> Arc<Self> {
        let mut id = [0u8; 16];
        if getrandom::fill(&mut id).is_err() {
            id[..8].copy_from_slice(&wall_ms().to_le_bytes());
        }
        let job_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let now = wall_ms();
        let view = JobView {
            job_id: job_id.clone(),
            name: name.to_string(),
            state: JobState::Created,
            start_time: now,
            end_time: None,
            timestamps: BTreeMap::from([(JobState::Created.name().to_string(), now)]),
            failure: None,
            restarts: 0,
            processes: 1,
            parallelism: config.parallelism,
            vertices: Vec::new(),
            checkpoints: CheckpointsView::default(),
            gpu: None,
            records_total: None,
        };
        Arc::new(Self {
            job_id,
            config: Arc::new(config.clone()),
            view: Mutex::new(view),
            commands: Mutex::new(VecDeque::new()),
            triggers: Mutex::new(BTreeMap::new()),
            next_trigger: AtomicU64::new(1),
            latency: Mutex::new(BTreeMap::new()),
            history_size: config.web_checkpoints_history.max(1),
        })
    }

    /// The job's id (32 hex digits).
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The job's configuration.
    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    /// A copy of the model now.
    pub fn view(&self) -> JobView {
        let mut v = lock(&self.view).clone();
        let now = wall_ms();
        for c in v.checkpoints.history.iter_mut().filter(|c| c.status == CheckpointStatus::InProgress) {
            c.end_to_end_duration = now.saturating_sub(c.trigger_timestamp);
        }
        v
    }

    /// Queue a command; returns its trigger id. Refused when the job is not running, or when a
    /// stop or cancel is already under way.
    pub fn submit(&self, cmd: JobCommand) -> Result<String, CommandError> {
        let state = lock(&self.view).state;
        if state != JobState::Running {
            return Err(CommandError::NotRunning(state));
        }
        if matches!(cmd, JobCommand::Savepoint { .. } | JobCommand::StopWithSavepoint { .. } | JobCommand::Checkpoint) && self.config.checkpoint.dir.is_empty() {
            return Err(CommandError::Unsupported("savepoints need execution.checkpointing.dir".into()));
        }
        let mut q = lock(&self.commands);
        let stopping = q.iter().any(|(_, c)| matches!(c, JobCommand::StopWithSavepoint { .. } | JobCommand::Cancel));
        if stopping && matches!(cmd, JobCommand::StopWithSavepoint { .. } | JobCommand::Cancel) {
            return Err(CommandError::AlreadyStopping);
        }
        let mut triggers = lock(&self.triggers);
        let open = triggers.values().filter(|s| **s == TriggerStatus::InProgress).count();
        if open >= MAX_OPEN_COMMANDS {
            return Err(CommandError::Busy(open));
        }
        if triggers.len() >= MAX_TRIGGERS {
            // Ids count up: the smallest finished ones are the oldest.
            let done: Vec<String> = triggers.iter().filter(|(_, s)| **s != TriggerStatus::InProgress).map(|(k, _)| k.clone()).take(triggers.len() + 1 - MAX_TRIGGERS).collect();
            for k in done {
                triggers.remove(&k);
            }
        }
        let n = self.next_trigger.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{:016x}", &self.job_id[..16], n);
        triggers.insert(id.clone(), TriggerStatus::InProgress);
        drop(triggers);
        q.push_back((id.clone(), cmd));
        Ok(id)
    }

    /// The outcome of command `trigger`, if the id is known.
    pub fn trigger_status(&self, trigger: &str) -> Option<TriggerStatus> {
        lock(&self.triggers).get(trigger).cloned()
    }

    // ---- the runtime's side (public for tests of readers, such as weir-rest's) -----------

    #[doc(hidden)]
    pub fn take_commands(&self) -> Vec<(String, JobCommand)> {
        lock(&self.commands).drain(..).collect()
    }

    #[doc(hidden)]
    pub fn resolve_trigger(&self, trigger: &str, status: TriggerStatus) {
        lock(&self.triggers).insert(trigger.to_string(), status);
    }

    /// Every command still queued or running fails with `message` (the job ended or restarts).
    #[doc(hidden)]
    pub fn fail_open_triggers(&self, message: &str) {
        lock(&self.commands).clear();
        for s in lock(&self.triggers).values_mut().filter(|s| **s == TriggerStatus::InProgress) {
            *s = TriggerStatus::Failed { message: message.to_string() };
        }
    }

    #[doc(hidden)]
    pub fn set_state(&self, state: JobState, failure: Option<String>) {
        let mut v = lock(&self.view);
        let now = wall_ms();
        if state == JobState::Restarting {
            v.restarts += 1;
        }
        v.state = state;
        v.timestamps.insert(state.name().to_string(), now);
        if let Some(f) = failure {
            v.failure = Some(f);
        }
        if state.is_terminal() {
            v.end_time = Some(now);
        }
        drop(v);
        if state != JobState::Running {
            // In-progress checkpoints of a failed attempt never complete.
            let mut v = lock(&self.view);
            v.checkpoints.counts.in_progress = 0;
            for c in v.checkpoints.history.iter_mut().filter(|c| c.status == CheckpointStatus::InProgress) {
                c.status = CheckpointStatus::Failed;
                c.failure_message = Some("the job stopped while it was pending".into());
                c.failure_timestamp = Some(now);
            }
        }
    }

    /// The vertices of the job as built (the same at every restart), and the cluster's shape.
    #[doc(hidden)]
    pub fn set_graph(&self, vertices: Vec<VertexView>, processes: u32, records_total: Option<u64>) {
        let mut v = lock(&self.view);
        if v.vertices.len() == vertices.len() && v.vertices.iter().zip(&vertices).all(|(a, b)| a.id == b.id) {
            return; // a restart: keep the counts
        }
        v.vertices = vertices;
        v.processes = processes;
        v.records_total = records_total;
    }

    #[doc(hidden)]
    pub fn on_restored(&self, restored: RestoredCheckpoint) {
        let mut v = lock(&self.view);
        v.checkpoints.counts.restored += 1;
        v.checkpoints.restored = Some(restored);
    }

    #[doc(hidden)]
    pub fn on_trigger(&self, id: u64, trigger_ms: u64, is_savepoint: bool, is_final: bool, num_subtasks: u32) {
        let mut v = lock(&self.view);
        v.checkpoints.counts.total += 1;
        v.checkpoints.counts.in_progress += 1;
        let stats = CheckpointStats {
            id,
            status: CheckpointStatus::InProgress,
            is_savepoint,
            is_final,
            is_incremental: false,
            trigger_timestamp: trigger_ms,
            latest_ack_timestamp: trigger_ms,
            state_size: 0,
            checkpointed_size: 0,
            end_to_end_duration: 0,
            num_subtasks,
            num_acknowledged_subtasks: 0,
            external_path: None,
            failure_message: None,
            failure_timestamp: None,
            tasks: Vec::new(),
        };
        v.checkpoints.history.push_front(stats);
        v.checkpoints.history.truncate(self.history_size);
    }

    #[doc(hidden)]
    pub fn on_ack(&self, id: u64, vertex: usize, stats: SubtaskCheckpointStats) {
        let mut v = lock(&self.view);
        let Some(c) = v.checkpoints.history.iter_mut().find(|c| c.id == id) else { return };
        c.num_acknowledged_subtasks += 1;
        c.latest_ack_timestamp = c.latest_ack_timestamp.max(stats.ack_timestamp);
        c.state_size += stats.state_size;
        c.checkpointed_size += stats.checkpointed_size;
        match c.tasks.iter_mut().find(|t| t.vertex == vertex) {
            Some(t) => t.subtasks.push(stats),
            None => c.tasks.push(TaskCheckpointStats { vertex, subtasks: vec![stats] }),
        }
    }

    #[doc(hidden)]
    pub fn on_complete(&self, id: u64, completed_ms: u64, is_incremental: bool, external_path: Option<String>) {
        let mut v = lock(&self.view);
        let cps = &mut v.checkpoints;
        cps.counts.in_progress = cps.counts.in_progress.saturating_sub(1);
        cps.counts.completed += 1;
        let Some(c) = cps.history.iter_mut().find(|c| c.id == id) else { return };
        c.status = CheckpointStatus::Completed;
        c.is_incremental = is_incremental;
        c.end_to_end_duration = completed_ms.saturating_sub(c.trigger_timestamp);
        c.external_path = external_path;
        let c = c.clone();
        cps.completed_samples.push_back((c.end_to_end_duration, c.state_size, c.checkpointed_size));
        if cps.completed_samples.len() > 1000 {
            cps.completed_samples.pop_front();
        }
        cps.latest_completed = Some(c);
    }

    /// A savepoint's copy is in place: it is the latest savepoint, at `location`.
    #[doc(hidden)]
    pub fn on_savepoint(&self, id: u64, location: &str) {
        let mut v = lock(&self.view);
        let cps = &mut v.checkpoints;
        let Some(c) = cps.history.iter_mut().find(|c| c.id == id) else { return };
        c.is_savepoint = true;
        c.external_path = Some(location.to_string());
        cps.latest_savepoint = Some(c.clone());
    }

    #[doc(hidden)]
    pub fn on_failed(&self, id: u64, message: String) {
        let mut v = lock(&self.view);
        let cps = &mut v.checkpoints;
        let now = wall_ms();
        let Some(c) = cps.history.iter_mut().find(|c| c.id == id) else { return };
        if c.status != CheckpointStatus::InProgress {
            return;
        }
        cps.counts.in_progress = cps.counts.in_progress.saturating_sub(1);
        cps.counts.failed += 1;
        c.status = CheckpointStatus::Failed;
        c.end_to_end_duration = now.saturating_sub(c.trigger_timestamp);
        c.failure_message = Some(message);
        c.failure_timestamp = Some(now);
        cps.latest_failed = Some(c.clone());
    }

    /// A worker's report: its subtasks' counters and the latency histograms of the interval.
    #[doc(hidden)]
    pub fn on_metrics(&self, process: u32, report: &MetricsReport) {
        let now = wall_ms();
        let mut lat = lock(&self.latency);
        let mut v = lock(&self.view);
        for s in &report.ops {
            let Some(vertex) = v.vertices.get_mut(s.vertex as usize) else { continue };
            let subtask = report.worker;
            let summary = if s.latency.count() > 0 || lat.contains_key(&(s.vertex as usize, subtask)) {
                let ring = lat.entry((s.vertex as usize, subtask)).or_default();
                ring.push_back(s.latency.clone());
                if ring.len() > LATENCY_WINDOWS {
                    ring.pop_front();
                }
                let mut all = LatencyHistogram::default();
                for h in ring.iter() {
                    all.merge(h);
                }
                (all.count() > 0).then(|| all.summary())
            } else {
                None
            };
            let pos = vertex.subtasks.iter().position(|m| m.subtask == subtask);
            let m = match pos {
                Some(i) => &mut vertex.subtasks[i],
                None => {
                    vertex.subtasks.push(SubtaskMetrics { subtask, ..Default::default() });
                    vertex.subtasks.sort_by_key(|m| m.subtask);
                    let i = vertex.subtasks.iter().position(|m| m.subtask == subtask).expect("just pushed");
                    &mut vertex.subtasks[i]
                }
            };
            let secs = (report.interval_us as f64 / 1e6).max(1e-3);
            m.process = process;
            m.records_in_per_second = s.records_in.saturating_sub(m.records_in) as f64 / secs;
            m.records_out_per_second = s.records_out.saturating_sub(m.records_out) as f64 / secs;
            m.records_in = s.records_in;
            m.records_out = s.records_out;
            m.busy_ms_per_second = (s.busy_us_delta as f64 / 1e3 / secs).min(1000.0);
            m.backpressured_ms_per_second = (s.backpressured_us_delta as f64 / 1e3 / secs).min(1000.0);
            let (busy, bp) = (s.busy_us_delta.min(report.interval_us), s.backpressured_us_delta.min(report.interval_us));
            m.busy_ms_total += busy / 1000;
            m.backpressured_ms_total += bp / 1000;
            m.idle_ms_total += report.interval_us.saturating_sub(busy + bp) / 1000;
            m.latency = summary;
            m.updated_ms = now;
        }
    }

    #[doc(hidden)]
    pub fn set_gpu(&self, gpu: Option<GpuView>) {
        lock(&self.view).gpu = gpu;
    }
}

/// One worker's periodic report of its operators (sent to the coordinator over the control
/// channel, so processes other than 0 need no connection of their own).
#[doc(hidden)]
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetricsReport {
    /// The reporting worker (= the subtask index of its operators).
    pub worker: u32,
    /// Time since the worker's previous report, µs.
    pub interval_us: u64,
    /// Its operators.
    pub ops: Vec<OpSample>,
}

/// One operator instance's counters.
#[doc(hidden)]
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpSample {
    /// The vertex index.
    pub vertex: u32,
    /// Records in, in total.
    pub records_in: u64,
    /// Records out, in total.
    pub records_out: u64,
    /// Busy time since the previous report, µs.
    pub busy_us_delta: u64,
    /// Back-pressured time since the previous report, µs.
    pub backpressured_us_delta: u64,
    /// Latency of the records received over the interval.
    pub latency: LatencyHistogram,
}

/// A log-linear histogram of latencies in µs (8 buckets per power of two: ±6 %), sparse when
/// shipped. Recording is an index computation and an add: no allocation after the first use of
/// a bucket range.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    max_us: u64,
}

impl LatencyHistogram {
    const SUB: u32 = 3; // 2^3 buckets per power of two

    fn bucket(us: u64) -> usize {
        if us < 16 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros(); // >= 4
        let sub = (us >> (e - Self::SUB)) & ((1 << Self::SUB) - 1);
        (16 + (e - 4) * (1 << Self::SUB)) as usize + sub as usize
    }

    /// The upper bound (µs) of bucket `i`'s values.
    fn upper(i: usize) -> u64 {
        if i < 16 {
            return i as u64;
        }
        let k = (i - 16) as u32;
        let e = 4 + k / (1 << Self::SUB);
        let sub = (k % (1 << Self::SUB)) as u64;
        let base = 1u64 << e;
        let step = base >> Self::SUB;
        base + (sub + 1) * step - 1
    }

    /// Record `n` records that took `us` µs.
    #[inline]
    pub fn record(&mut self, us: u64, n: u64) {
        let b = Self::bucket(us);
        if b >= self.buckets.len() {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += n;
        self.max_us = self.max_us.max(us);
    }

    /// Records measured.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Add another histogram's counts.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        if other.buckets.len() > self.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.max_us = self.max_us.max(other.max_us);
    }

    /// Forget everything (keeps the allocation).
    pub fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = 0);
        self.max_us = 0;
    }

    /// The value (µs) at quantile `q` (0..=1): the upper bound of its bucket, at most the max.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper(i).min(self.max_us);
            }
        }
        self.max_us
    }

    /// p50/p95/p99/max in ms.
    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1e3;
        LatencySummary {
            p50: ms(self.quantile_us(0.5)),
            p95: ms(self.quantile_us(0.95)),
            p99: ms(self.quantile_us(0.99)),
            max: ms(self.max_us),
            count: self.count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_a_bucket_of_the_truth() {
        let mut h = LatencyHistogram::default();
        for us in 1..=10_000u64 {
            h.record(us, 1);
        }
        for (q, truth) in [(0.5, 5_000.0), (0.95, 9_500.0), (0.99, 9_900.0)] {
            let got = h.quantile_us(q) as f64;
            assert!((got - truth).abs() / truth < 0.13, "q{q}: {got} vs {truth}");
            assert!(got >= truth, "a quantile is an upper bound: q{q}: {got} < {truth}");
        }
        assert_eq!(h.summary().max, 10.0);
        assert_eq!(h.count(), 10_000);
    }

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        let mut last = 0;
        for us in 0..100_000u64 {
            let b = LatencyHistogram::bucket(us);
            assert!(b == last || b == last + 1, "{us}: {b} after {last}");
            assert!(LatencyHistogram::upper(b) >= us, "{us} above its bucket's bound");
            last = b;
        }
    }

    #[test]
    fn weights_count_records_and_merge_adds() {
        let mut a = LatencyHistogram::default();
        a.record(100, 99);
        let mut b = LatencyHistogram::default();
        b.record(50_000, 1);
        a.merge(&b);
        assert_eq!(a.count(), 100);
        assert!(a.quantile_us(0.99) <= 110);
        assert!(a.quantile_us(1.0) >= 50_000);
    }

    #[test]
    fn commands_need_a_running_job_and_one_stop() {
        let cfg = JobConfig::from_pairs([("execution.checkpointing.dir", "/tmp/x")]).unwrap();
        let m = JobMonitor::new("j", &cfg);
        assert_eq!(m.submit(JobCommand::Cancel), Err(CommandError::NotRunning(JobState::Created)));
        m.set_state(JobState::Running, None);
        let t = m.submit(JobCommand::StopWithSavepoint { target: None }).unwrap();
        assert_eq!(m.trigger_status(&t), Some(TriggerStatus::InProgress));
        assert_eq!(m.submit(JobCommand::Cancel), Err(CommandError::AlreadyStopping));
        assert_eq!(m.take_commands().len(), 1);
        m.fail_open_triggers("ended");
        assert!(matches!(m.trigger_status(&t), Some(TriggerStatus::Failed { .. })));
    }

    #[test]
    fn a_flood_of_commands_is_refused_and_old_outcomes_go() {
        let cfg = JobConfig::from_pairs([("execution.checkpointing.dir", "/tmp/x")]).unwrap();
        let m = JobMonitor::new("j", &cfg);
        m.set_state(JobState::Running, None);
        let first: Vec<String> = (0..MAX_OPEN_COMMANDS).map(|_| m.submit(JobCommand::Checkpoint).unwrap()).collect();
        assert_eq!(m.submit(JobCommand::Checkpoint), Err(CommandError::Busy(MAX_OPEN_COMMANDS)));
        for t in &first {
            m.resolve_trigger(t, TriggerStatus::Completed { location: None, checkpoint: Some(1) });
        }
        for _ in 0..MAX_TRIGGERS {
            let t = m.submit(JobCommand::Checkpoint).unwrap();
            m.resolve_trigger(&t, TriggerStatus::Completed { location: None, checkpoint: Some(2) });
        }
        assert!(lock(&m.triggers).len() <= MAX_TRIGGERS, "bounded");
        assert_eq!(m.trigger_status(&first[0]), None, "the oldest outcomes go first");
    }
}

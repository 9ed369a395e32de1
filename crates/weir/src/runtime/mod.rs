//! Execution on timely-dataflow: attempts, restarts, the worker loop and the coordinator driver.
//!
//! Each worker builds three dataflows: the control broadcast from worker 0, the acks exchanged
//! to worker 0, and the job itself. Worker 0 drives the pure [`CheckpointCoordinator`] with
//! monotonic time and the acks it receives, and carries out its actions: broadcast triggers and
//! notifications, commit `_metadata`, discard old checkpoints.

pub mod cluster;
pub(crate) mod control;
pub(crate) mod commands;
pub(crate) mod executor;
pub(crate) mod gpu_view;
pub(crate) mod metrics;
mod operator_uid;
mod savepoint;

use crate::monitor::{JobMonitor, JobState};
use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Exchange, Inspect};
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;
use weir_checkpoint::{Action, CheckpointCoordinator, CheckpointId, RetentionPolicy, CheckpointMetadata, SubtaskSnapshot, TaskId, METADATA_VERSION};
use weir_storage::{checkpoint_dir_name, CheckpointStorage, LatestValid, Lineage, StorageError};

use crate::config::{ConfigError, JobConfig, RestartStrategy};
use crate::epoch::Time;
use crate::stream::Job;
use control::{AckMsg, Control, RestoreIdentity, WorkerShared};
use executor::SnapshotExecutor;

/// Where the processes of a job run (timely's cluster mode).
#[derive(Clone, Debug, Default)]
pub struct ClusterConfig {
    /// This process's index.
    pub process: usize,
    /// `host:port` of every process, in process order; empty or one entry = single process.
    pub hosts: Vec<String>,
}

impl ClusterConfig {
    /// Number of processes.
    pub fn processes(&self) -> usize {
        self.hosts.len().max(1)
    }
}

/// Which checkpoint a run starts from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Restore {
    /// A fresh start.
    #[default]
    None,
    /// The newest valid checkpoint in the job's checkpoint directory (fresh if there is none).
    Latest,
    /// A checkpoint directory `.../<job>/chk-<n>`.
    Path(String),
}

/// How a job ended.
#[derive(Debug, Clone, Default)]
pub struct JobResult {
    /// The checkpoint the last attempt restored from.
    pub restored_from: Option<u64>,
    /// Restarts after failures.
    pub restarts: u32,
    /// Metadata of checkpoints completed by this process's coordinator (process 0 only).
    pub checkpoints: Vec<CheckpointMetadata>,
    /// The savepoint taken at the end (`--savepoint-on-stop`; process 0 only): its directory.
    pub savepoint: Option<String>,
}

/// Why a job did not finish.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad configuration, refused at start.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Checkpoint storage.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The requested checkpoint cannot be restored.
    #[error("restore: {0}")]
    Restore(String),
    /// The job was cancelled; checkpoints were kept or deleted per
    /// `execution.checkpointing.externalized-checkpoint-retention`.
    #[error("job cancelled")]
    Cancelled,
    /// The job failed and the restart strategy gave up.
    #[error("job failed after {restarts} restart(s): {message}")]
    Failed {
        /// Restarts made.
        restarts: u32,
        /// The last failure.
        message: String,
    },
}

/// Per-worker context for building and running the job's operators.
pub(crate) struct JobCtx {
    /// The job's name.
    pub job: String,
    pub index: usize,
    pub peers: usize,
    pub config: Arc<JobConfig>,
    pub shared: Rc<RefCell<WorkerShared>>,
    pub probe: ProbeHandle<Time>,
    /// Where snapshots go; `None` when checkpointing is off.
    pub storage: Option<CheckpointStorage>,
    pub restore_storage: Option<CheckpointStorage>,
    pub restored: Option<Arc<CheckpointMetadata>>,
    pub first_epoch: u64,
    /// The newest completed checkpoint of the job directory at the start (any lineage).
    pub newest_completed: Option<u64>,
    pub executor: SnapshotExecutor,
    pub ack_tx: Sender<AckMsg>,
    next_op: Cell<u32>,
    pub tasks: RefCell<Vec<(u32, bool)>>,
    /// Each registered operator's uid and name, by id: what restored state is matched by.
    uids: RefCell<Vec<(String, String)>>,
    build_error: RefCell<Option<String>>,
    /// Set by a failure that no restart can fix; the job then ends without restarting.
    deterministic: Arc<AtomicBool>,
    /// The job graph's vertices as this worker built them, with their metrics.
    pub vertices: RefCell<Vec<metrics::VertexInfo>>,
    /// Vertex of each registered (checkpointed) operator, by operator id.
    pub op_vertex: RefCell<Vec<(u32, usize)>>,
}

impl JobCtx {
    /// Register a stateful operator; its id is its position (for this run's acks), its `uid`
    /// (`None`: derived from `name` and the position) what a restore matches its state by.
    pub(crate) fn register(&self, uid: Option<String>, name: &str, is_source: bool) -> u32 {
        let id = self.next_op.get();
        self.next_op.set(id + 1);
        self.tasks.borrow_mut().push((id, is_source));
        self.claim_uid(id, uid, name);
        id
    }

    /// Add a vertex to the job graph (for metrics and the REST API): `op` is its checkpointed
    /// operator, if it has one; `inputs` the vertices it reads.
    pub(crate) fn vertex(&self, name: &str, op: Option<u32>, kind: crate::monitor::VertexKind, inputs: Vec<usize>) -> (usize, Rc<metrics::OpMetrics>) {
        let mut v = self.vertices.borrow_mut();
        let index = v.len();
        let uid = match op {
            Some(op) => {
                self.op_vertex.borrow_mut().push((op, index));
                self.uid_of(op)
            }
            None => format!("{name}#{index}"),
        };
        let m = Rc::new(metrics::OpMetrics::default());
        v.push(metrics::VertexInfo { name: name.to_string(), uid, kind, inputs, metrics: m.clone() });
        (index, m)
    }

    /// A failure while building: the attempt fails with this message.
    pub(crate) fn fail_build(&self, message: String) {
        self.build_error.borrow_mut().get_or_insert(message);
    }

    /// Whether building has failed already (the attempt will not run).
    pub(crate) fn build_failed(&self) -> bool {
        self.build_error.borrow().is_some()
    }

    /// A failure that a restart cannot fix (malformed input, a sink directory that holds another
    /// run's output): the job fails at once with `message` instead of restarting. Works while
    /// building and while running.
    pub(crate) fn fail_deterministic(&self, message: String) {
        self.deterministic.store(true, Ordering::SeqCst);
        self.fail_build(message.clone());
        self.shared.borrow_mut().set_fail(message);
    }

    /// The snapshots of operator `op` in the restored checkpoint: those with its uid (by
    /// position in a checkpoint written before uids).
    pub(crate) fn restored_subtasks(&self, op: u32) -> impl Iterator<Item = &SubtaskSnapshot> {
        self.restored_tasks(op).map(|(_, s)| s)
    }

    /// The snapshots of operator `op` in the restored checkpoint, with the task that took each.
    pub(crate) fn restored_tasks(&self, op: u32) -> impl Iterator<Item = (TaskId, &SubtaskSnapshot)> {
        let uid = self.uid_of(op);
        self.restored
            .iter()
            .flat_map(|m| m.subtasks.iter())
            .filter(move |(t, s)| operator_uid::claims(op, &uid, t, s))
            .map(|(t, s)| (*t, s))
    }

    /// The snapshot of operator `op`'s subtask `subtask` in the restored checkpoint, if it was
    /// taken at the current parallelism (the same instance).
    pub(crate) fn restored_instance(&self, op: u32, subtask: u32) -> Option<&SubtaskSnapshot> {
        let uid = self.uid_of(op);
        let m = self.restored.as_ref().filter(|m| m.parallelism == self.peers as u32)?;
        m.subtasks.iter().find(|(t, s)| t.subtask == subtask && operator_uid::claims(op, &uid, t, s)).map(|(_, s)| s)
    }
}

pub(crate) fn now_us() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
    // Tests step the wall clock back (FAILPOINTS=wall-clock-jump-back-ms=N*off->return(MS)).
    fail::fail_point!("wall-clock-jump-back-ms", |ms: Option<String>| {
        now.saturating_sub(ms.and_then(|m| m.parse::<u64>().ok()).unwrap_or(0) * 1000)
    });
    now
}

/// The coordinator's time: monotonic milliseconds since the attempt started, so that a
/// wall-clock jump (an NTP step, a resumed VM) neither stalls checkpoints nor expires them.
/// Wall time only stamps metadata for humans: the wall time at start plus monotonic time.
pub(crate) struct CoordinatorClock {
    start: Instant,
    wall_at_start_ms: u64,
}

impl CoordinatorClock {
    pub(crate) fn new() -> Self {
        Self { start: Instant::now(), wall_at_start_ms: now_us() / 1000 }
    }
    /// Monotonic ms, for every timing decision.
    pub(crate) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    /// The wall-clock stamp (ms since the Unix epoch) of monotonic instant `mono_ms`.
    pub(crate) fn wall_ms(&self, mono_ms: u64) -> u64 {
        self.wall_at_start_ms + mono_ms
    }
}

type BuildFn = dyn Fn(&mut Job<'_>) + Send + Sync;

struct AttemptEnv {
    job: String,
    config: Arc<JobConfig>,
    storage: Option<CheckpointStorage>,
    restore_storage: Option<CheckpointStorage>,
    restored: Option<Arc<CheckpointMetadata>>,
    /// The job's checkpoint directory, opened whether or not checkpointing is on.
    job_storage: Option<CheckpointStorage>,
    /// The restore point was named by path (`--restore DIR/chk-N`), not `latest`.
    explicit_restore: bool,
    first_epoch: u64,
    newest_completed: Option<CheckpointId>,
    retained: Vec<u64>,
    /// Process 0 only: what fixing the lineage does.
    lineage: Option<LineageFix>,
    lineage_fixed: AtomicBool,
    failed: AtomicBool,
    deterministic: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
    executor: Mutex<SnapshotExecutor>,
    build: Arc<BuildFn>,
    monitor: Arc<JobMonitor>,
    /// Stop with a savepoint asked for through the monitor: its trigger and target directory
    /// (kept across restarts: a restarted attempt stops again).
    stop_request: Arc<Mutex<Option<(String, Option<String>)>>>,
    processes: u32,
}

/// Run a job to completion, restarting per the restart strategy.
/// Drops the VRAM tier's snapshots of a job directory when the run ends.
struct ForgetVram(String);

impl Drop for ForgetVram {
    fn drop(&mut self) {
        weir_gpu::state::VramTier::global().forget(&self.0);
    }
}

pub(crate) fn run_job(
    job: &str,
    config: JobConfig,
    cluster: &ClusterConfig,
    restore: &Restore,
    cancel: Arc<AtomicBool>,
    monitor: Arc<JobMonitor>,
    build: Arc<BuildFn>,
) -> Result<JobResult, JobError> {
    let processes = cluster.processes() as u32;
    if !config.parallelism.is_multiple_of(processes) {
        return Err(ConfigError {
            key: "parallelism.default".into(),
            message: format!("{} is not a multiple of the {processes} processes", config.parallelism),
        }
        .into());
    }
    let workers = (config.parallelism / processes) as usize;
    let config = Arc::new(config);
    // A savepoint at the end needs checkpoint storage even without periodic checkpoints.
    let checkpointing = config.checkpoint.interval.is_some() || config.savepoint_on_stop;
    let storage = if checkpointing || *restore == Restore::Latest {
        Some(CheckpointStorage::open_with(&config.checkpoint.dir, job, &config.checkpoint.storage_options)?)
    } else {
        None
    };
    // Snapshots kept in device memory serve restarts of this run only.
    let _vram = storage.as_ref().map(|s| ForgetVram(format!("{}|", s.display(""))));
    let mut restarts = 0;
    // What a restart restores: the run's own restore point until its lineage is fixed (then
    // `latest` of the job directory can only find the restore point or the run's own
    // checkpoints) or, for a restore point elsewhere or a fresh start, until the run completes
    // a checkpoint of its own.
    let mut restore = restore.clone();
    let mut run_first_id: Option<CheckpointId> = None;
    let stop_request: Arc<Mutex<Option<(String, Option<String>)>>> = Arc::default();
    let ended = |state: JobState, failure: Option<String>| {
        monitor.set_state(state, failure.clone());
        monitor.fail_open_triggers(&failure.unwrap_or_else(|| format!("the job is {state:?}")));
    };
    let mut in_storage = false;
    loop {
        let prepared = prepare_attempt(&restore, storage.as_ref(), cluster.process == 0, run_first_id, &config.checkpoint.storage_options);
        let Prepared { restore_storage, restored, first_epoch, newest_completed, retained, lineage } = match prepared {
            Ok(p) => p,
            Err(AttemptError::Final(e)) => {
                ended(JobState::Failed, Some(e.to_string()));
                return Err(e);
            }
            Err(AttemptError::Retry(message)) => {
                monitor.set_state(JobState::Restarting, Some(message.clone()));
                restarts = next_restart(&config, job, restarts, message).inspect_err(|e| ended(JobState::Failed, Some(e.to_string())))?;
                continue;
            }
        };
        let restored_id = restored.as_ref().map(|m| m.id).unwrap_or(0);
        if run_first_id.is_none() {
            run_first_id = Some(first_epoch);
            in_storage = match (&restore_storage, &storage) {
                (Some(r), Some(s)) => r.location() == s.location(),
                _ => false,
            };
            if !in_storage {
                restore = match (&restored, &restore_storage) {
                    (Some(m), Some(r)) => Restore::Path(r.location().join(checkpoint_dir_name(m.id)).display().to_string()),
                    _ => Restore::None,
                };
            }
        }
        if let Some(m) = &restored {
            tracing::info!("restoring {job} from checkpoint {} (parallelism {} → {})", m.id, m.parallelism, config.parallelism);
        }
        let (exec, exec_guard) = SnapshotExecutor::start(workers);
        let env = Arc::new(AttemptEnv {
            job: job.to_string(),
            config: config.clone(),
            storage: storage.as_ref().filter(|_| checkpointing).map(CheckpointStorage::for_attempt),
            restore_storage,
            restored: restored.map(Arc::new),
            job_storage: storage.clone(),
            explicit_restore: matches!(restore, Restore::Path(_)),
            first_epoch,
            newest_completed,
            retained,
            lineage,
            lineage_fixed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            deterministic: Arc::default(),
            cancel: cancel.clone(),
            executor: Mutex::new(exec),
            build: build.clone(),
            monitor: monitor.clone(),
            stop_request: stop_request.clone(),
            processes,
        });
        if let (Some(m), Some(r), 0) = (&env.restored, &env.restore_storage, cluster.process) {
            monitor.on_restored(crate::monitor::RestoredCheckpoint {
                id: m.id,
                restore_timestamp: crate::monitor::wall_ms(),
                is_savepoint: !in_storage,
                external_path: r.display(&checkpoint_dir_name(m.id)),
            });
        }
        let outcome = run_attempt(env.clone(), workers, cluster);
        let deterministic = env.deterministic.load(Ordering::SeqCst);
        let lineage_fixed = env.lineage_fixed.load(Ordering::SeqCst);
        drop(env);
        drop(exec_guard);
        let ends = outcome.is_ok() || cancel.load(Ordering::SeqCst) || deterministic || !restart_allowed(&config, restarts);
        // Only the checkpoints of this run, and only once it ran: a run refused at start must not
        // delete what an earlier run left to resume from.
        if ends && lineage_fixed && config.checkpoint.retention == RetentionPolicy::NoExternalizedCheckpoints && cluster.process == 0 {
            if let (Some(s), Some(first)) = (storage.as_ref().filter(|_| checkpointing), run_first_id) {
                delete_own_checkpoints(job, s, first);
            }
        }
        match outcome {
            Ok(checkpoints) => {
                let mut savepoint = None;
                let stop = stop_request.lock().unwrap_or_else(|p| p.into_inner()).take();
                let wanted = config.savepoint_on_stop || stop.is_some();
                if let (true, Some(s), Some(last)) = (wanted && cluster.process == 0, storage.as_ref(), checkpoints.last().filter(|m| m.is_final)) {
                    let target = stop.as_ref().and_then(|(_, t)| t.as_deref());
                    let path = match savepoint::write_savepoint(&config, target, job, s, last) {
                        Ok(p) => p,
                        Err(e) => {
                            ended(JobState::Failed, Some(format!("writing the savepoint: {e}")));
                            return Err(e.into());
                        }
                    };
                    tracing::info!("job {job}: savepoint of checkpoint {} written to {path}", last.id);
                    monitor.on_savepoint(last.id, &path);
                    if let Some((trigger, _)) = &stop {
                        let status = crate::monitor::TriggerStatus::Completed { location: Some(path.clone()), checkpoint: Some(last.id) };
                        monitor.resolve_trigger(trigger, status);
                    }
                    savepoint = Some(path);
                }
                ended(JobState::Finished, None);
                return Ok(JobResult { restored_from: (restored_id > 0).then_some(restored_id), restarts, checkpoints, savepoint });
            }
            Err(_) if cancel.load(Ordering::SeqCst) => {
                ended(JobState::Canceled, None);
                return Err(JobError::Cancelled);
            }
            Err(message) if deterministic => {
                tracing::error!("job {job} failed: {message} (not restarted: a restart cannot fix this)");
                ended(JobState::Failed, Some(message.clone()));
                return Err(JobError::Failed { restarts, message });
            }
            Err(message) => {
                monitor.set_state(JobState::Restarting, Some(message.clone()));
                restarts = next_restart(&config, job, restarts, message).inspect_err(|e| ended(JobState::Failed, Some(e.to_string())))?;
                if in_storage && lineage_fixed {
                    restore = Restore::Latest;
                } else if let (Some(s), Some(first)) = (&storage, run_first_id) {
                    // A listing error keeps the restore point; the next attempt's own listing
                    // then fails and is retried.
                    if s.completed_checkpoints().is_ok_and(|ids| ids.iter().any(|&id| id >= first)) {
                        restore = Restore::Latest;
                    }
                }
            }
        }
    }
}

/// Why an attempt could not start.
enum AttemptError {
    /// A restart may fix it (a transient storage error).
    Retry(String),
    /// No restart can (no valid checkpoint, a corrupt or abandoned checkpoint named explicitly).
    Final(JobError),
}

fn restart_allowed(config: &JobConfig, restarts: u32) -> bool {
    match config.restart {
        RestartStrategy::None => false,
        RestartStrategy::FixedDelay { attempts, .. } => restarts < attempts,
    }
}

/// `NO_EXTERNALIZED_CHECKPOINTS`: the job ended, the checkpoints of this run go with it.
fn delete_own_checkpoints(job: &str, s: &CheckpointStorage, first: CheckpointId) {
    let ids: Vec<_> = s.checkpoint_ids().map(|(valid, _)| valid).unwrap_or_default().into_iter().filter(|&id| id >= first).collect();
    for id in &ids {
        if let Err(e) = s.discard(*id) {
            tracing::warn!("{job}: deleting checkpoint {id}: {e}");
        }
    }
    tracing::info!("{job}: {} checkpoint(s) deleted (NO_EXTERNALIZED_CHECKPOINTS)", ids.len());
}

impl AttemptEnv {
    fn fix_lineage(&self) -> Result<(), StorageError> {
        if let Some(fix) = &self.lineage {
            fix_lineage(&self.job, self.restored.as_ref().map(|m| m.id), fix)?;
            self.lineage_fixed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Count a restart and wait its delay, or give up per the restart strategy.
fn next_restart(config: &JobConfig, job: &str, restarts: u32, message: String) -> Result<u32, JobError> {
    let allowed = match config.restart {
        RestartStrategy::None => None,
        RestartStrategy::FixedDelay { attempts, delay } => (restarts < attempts).then_some(delay),
    };
    let Some(delay) = allowed else { return Err(JobError::Failed { restarts, message }) };
    tracing::warn!("job {job} failed ({message}); restart {} in {delay:?}", restarts + 1);
    std::thread::sleep(delay);
    Ok(restarts + 1)
}

/// What an attempt starts from.
struct Prepared {
    restore_storage: Option<CheckpointStorage>,
    restored: Option<CheckpointMetadata>,
    first_epoch: CheckpointId,
    /// The newest completed checkpoint of the job directory (any lineage) at the start.
    newest_completed: Option<CheckpointId>,
    retained: Vec<CheckpointId>,
    /// The lineage the leader fixes: at the restore-point agreement when restoring (before any
    /// sink rolls back), after the build on a fresh start (once the sinks accepted it).
    lineage: Option<LineageFix>,
}

/// Checkpoints to abandon, and the run's record.
struct LineageFix {
    /// Completed checkpoints newer than the restore point, per directory holding them.
    abandon: Vec<(CheckpointStorage, Vec<CheckpointId>)>,
    /// Where `_lineage` is written (the job's checkpoint directory), and what.
    record: Option<(CheckpointStorage, Lineage)>,
}

/// Epochs live in the high half of a timestamp (`epoch << 32`).
const MAX_CHECKPOINT_ID: CheckpointId = u32::MAX as u64 - 1;

/// Choose the restore point of an attempt and what its lineage abandons: every completed
/// checkpoint newer than the restore point, in the job directory (all of them on a fresh start
/// or a restore from elsewhere) and in the directory holding the restore point. New ids stay
/// above every existing `chk-<n>`. Nothing is changed here; only process 0 changes anything,
/// later (see [`LineageFix`]).
fn prepare_attempt(
    restore: &Restore,
    storage: Option<&CheckpointStorage>,
    leader: bool,
    run_first_id: Option<CheckpointId>,
    storage_options: &[(String, String)],
) -> Result<Prepared, AttemptError> {
    let transient = |e: StorageError| AttemptError::Retry(format!("restore: {e}"));
    let (restore_storage, restored) = choose_checkpoint(restore, storage, storage_options)?;
    let restored_id = restored.as_ref().map(|m| m.id).unwrap_or(0);
    let mut first_epoch = restored_id + 1;
    if let Some(first) = run_first_id {
        first_epoch = first_epoch.max(first);
    }
    let mut retained = Vec::new();
    let mut newest_completed = None;
    let mut fix = LineageFix { abandon: Vec::new(), record: None };
    let mut dirs: Vec<&CheckpointStorage> = storage.into_iter().collect();
    if let Some(r) = restore_storage.as_ref().filter(|r| storage.is_none_or(|s| s.location() != r.location())) {
        dirs.push(r);
    }
    for (i, s) in dirs.into_iter().enumerate() {
        let holds_restore_point = restore_storage.as_ref().is_some_and(|r| r.location() == s.location());
        let keep_upto = if holds_restore_point { restored_id } else { 0 };
        let (valid, newest) = s.checkpoint_ids().map_err(transient)?;
        if newest >= MAX_CHECKPOINT_ID {
            return Err(AttemptError::Final(JobError::Restore(format!(
                "{}: chk-{newest}: checkpoint ids must stay below {MAX_CHECKPOINT_ID}; move that directory away",
                s.location().display()
            ))));
        }
        first_epoch = first_epoch.max(newest + 1);
        let (kept, newer): (Vec<_>, Vec<_>) = valid.iter().copied().partition(|&id| id <= keep_upto);
        if i == 0 && storage.is_some() {
            newest_completed = valid.last().copied();
            retained = kept;
        }
        if !newer.is_empty() {
            fix.abandon.push((s.clone(), newer));
        }
    }
    if let Some(s) = storage {
        let mut lineage = Lineage {
            restored_from: restored.as_ref().map(|m| m.id),
            restored_path: restored
                .as_ref()
                .zip(restore_storage.as_ref())
                .map(|(m, r)| r.location().join(checkpoint_dir_name(m.id)).display().to_string()),
            first_id: first_epoch,
            abandoned: fix.abandon.iter().flat_map(|(_, ids)| ids.iter().copied()).collect(),
            started_ms: now_us() / 1000,
        };
        // A restart of the same run keeps what the run abandoned before.
        if let Ok(Some(earlier)) = s.lineage() {
            if run_first_id == Some(earlier.first_id) {
                lineage.abandoned.splice(0..0, earlier.abandoned);
                lineage.first_id = earlier.first_id;
                lineage.started_ms = earlier.started_ms;
            }
        }
        fix.record = Some((s.clone(), lineage));
    }
    Ok(Prepared { restore_storage, restored, first_epoch, newest_completed, retained, lineage: leader.then_some(fix) })
}

/// Abandon the checkpoints a run leaves behind and record its lineage, durably.
fn fix_lineage(job: &str, restored: Option<CheckpointId>, fix: &LineageFix) -> Result<(), StorageError> {
    for (s, ids) in &fix.abandon {
        for &id in ids {
            s.abandon(id)?;
        }
        let list = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        match restored {
            Some(r) => tracing::warn!(
                "{job}: checkpoint(s) {list} in {} are newer than the restored checkpoint {r}: abandoned, never to be restored",
                s.location().display()
            ),
            None => tracing::warn!(
                "{job}: fresh start: checkpoint(s) {list} of an earlier run in {} abandoned, never to be restored",
                s.location().display()
            ),
        }
    }
    match &fix.record {
        Some((s, lineage)) => s.record_lineage(lineage),
        None => Ok(()),
    }
}

fn choose_checkpoint(
    restore: &Restore,
    storage: Option<&CheckpointStorage>,
    storage_options: &[(String, String)],
) -> Result<(Option<CheckpointStorage>, Option<CheckpointMetadata>), AttemptError> {
    let classify = |e: StorageError| {
        if e.is_corruption() {
            AttemptError::Final(JobError::Restore(e.to_string()))
        } else {
            AttemptError::Retry(format!("restore: {e}"))
        }
    };
    match restore {
        Restore::None => Ok((None, None)),
        Restore::Latest => {
            let s = storage.expect("storage is open when restoring latest");
            match s.latest_valid().map_err(|e| AttemptError::Retry(format!("restore: {e}")))? {
                LatestValid::Empty => {
                    tracing::info!("no checkpoint in {}: starting fresh", s.location().display());
                    Ok((None, None))
                }
                LatestValid::Found(m, skipped) => {
                    for (id, e) in &skipped {
                        tracing::error!("not restoring checkpoint {id}: {e}");
                    }
                    Ok((Some(s.clone()), Some(m)))
                }
                LatestValid::NoneValid(e) => Err(AttemptError::Final(JobError::Restore(e.to_string()))),
            }
        }
        Restore::Path(p) => {
            let p = &savepoint::resolve(p);
            let (s, id) = CheckpointStorage::open_checkpoint_path_with(p, storage_options).map_err(|e| match e {
                // An unreachable store is retried like any transient restore failure.
                StorageError::Io { .. } if !e.is_corruption() => AttemptError::Retry(format!("restore: {e}")),
                e => AttemptError::Final(e.into()),
            })?;
            if s.abandoned_checkpoints().map_err(classify)?.contains(&id) {
                return Err(AttemptError::Final(JobError::Restore(format!(
                    "{p} was abandoned when an older checkpoint was restored: it is outside the job's lineage and is never restored"
                ))));
            }
            let meta = s.load_metadata(id).map_err(classify)?;
            s.verify(&meta).map_err(classify)?;
            Ok((Some(s), Some(meta)))
        }
    }
}

fn run_attempt(env: Arc<AttemptEnv>, workers: usize, cluster: &ClusterConfig) -> Result<Vec<CheckpointMetadata>, String> {
    // Weir connects and authenticates the cluster's sockets itself (see `cluster`).
    let (builders, comms) = self::cluster::communication(workers, cluster, &env.config, &env.cancel).map_err(|e| {
        if e.is_config() {
            // A missing or unreadable secret: no restart can fix it.
            env.deterministic.store(true, Ordering::SeqCst);
        }
        e.to_string()
    })?;
    let env2 = env.clone();
    let guards = timely::execute::execute_from(builders, comms, timely::WorkerConfig::default(), move |worker| {
        let env = &env2;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| worker_main(worker, env)));
        if !matches!(result, Ok(Ok(_))) {
            // timely steps a worker until its dataflows complete; a failed attempt's never do.
            for id in worker.installed_dataflows() {
                worker.drop_dataflow(id);
            }
        }
        match result {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => {
                env.failed.store(true, Ordering::SeqCst);
                Err(e)
            }
            Err(panic) => {
                env.failed.store(true, Ordering::SeqCst);
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                Err(format!("worker {} panicked: {msg}", worker.index()))
            }
        }
    })
    .map_err(|e| format!("starting workers: {e}"))?;
    let mut checkpoints = Vec::new();
    let mut first_error: Option<String> = None;
    for r in guards.join() {
        match r {
            Ok(Ok(c)) => checkpoints.extend(c),
            Ok(Err(e)) | Err(e) => {
                // Prefer the root cause over "another worker failed".
                if first_error.as_ref().is_none_or(|f| f.starts_with("stopped:")) {
                    first_error = Some(e);
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(checkpoints),
    }
}

fn worker_main(worker: &mut Worker, env: &AttemptEnv) -> Result<Vec<CheckpointMetadata>, String> {
    let index = worker.index();
    let peers = worker.peers();
    let shared = Rc::new(RefCell::new(WorkerShared { latency_on: env.config.latency_interval.is_some(), ..Default::default() }));
    let (ack_tx, ack_rx) = channel::<AckMsg>();
    let mut ctl_in: InputHandle<Time, CapacityContainerBuilder<Vec<Control>>> = InputHandle::new();
    let mut ack_in: InputHandle<Time, CapacityContainerBuilder<Vec<AckMsg>>> = InputHandle::new();
    let inbox: Rc<RefCell<Vec<AckMsg>>> = Rc::default();

    worker.dataflow::<Time, _, _>(|scope| {
        let sh = shared.clone();
        ctl_in.to_stream(scope).broadcast().inspect(move |c: &Control| sh.borrow_mut().on_control(c));
    });
    worker.dataflow::<Time, _, _>(|scope| {
        let ib = inbox.clone();
        ack_in
            .to_stream(scope)
            .exchange(|_: &AckMsg| 0)
            .inspect(move |a: &AckMsg| ib.borrow_mut().push(a.clone()));
    });
    let (first_epoch, restored, restore_storage) = agree_on_restore_point(worker, &shared, &inbox, &mut ctl_in, &mut ack_in, env)?;

    let ctx = Rc::new(JobCtx {
        job: env.job.clone(),
        index,
        peers,
        config: env.config.clone(),
        shared: shared.clone(),
        probe: ProbeHandle::new(),
        storage: env.storage.clone(),
        restore_storage,
        restored,
        first_epoch,
        newest_completed: env.newest_completed,
        executor: env.executor.lock().expect("executor").clone(),
        ack_tx,
        next_op: Cell::new(0),
        tasks: RefCell::new(Vec::new()),
        uids: RefCell::new(Vec::new()),
        build_error: RefCell::new(None),
        deterministic: env.deterministic.clone(),
        vertices: RefCell::new(Vec::new()),
        op_vertex: RefCell::new(Vec::new()),
    });
    worker.dataflow::<Time, _, _>(|scope| {
        let mut job = Job::new(scope, ctx.clone());
        (env.build)(&mut job);
    });
    ctx.check_restored_state();
    if let Some(e) = ctx.build_error.borrow_mut().take() {
        return Err(e);
    }
    if index == 0 && env.restored.is_none() {
        // A fresh start's sinks accepted it: fix the lineage before the first trigger, so no
        // output of this run commits outside it.
        env.fix_lineage().map_err(|e| e.to_string())?;
    }

    let mut coord = (index == 0).then(|| {
        let ops = ctx.tasks.borrow();
        let all = |only_sources: bool| {
            ops.iter()
                .filter(move |(_, s)| !only_sources || *s)
                .flat_map(|(op, _)| (0..peers as u32).map(move |w| TaskId::new(*op, w)))
                .collect::<Vec<_>>()
        };
        CheckpointCoordinator::<SubtaskSnapshot>::new(
            env.config.checkpoint.coordinator(),
            all(false),
            all(true),
            env.first_epoch,
            env.retained.clone(),
            0,
        )
    });
    let clock = CoordinatorClock::new();
    let mut cmds = coord.as_ref().map(|_| {
        publish_graph(&ctx, env);
        env.monitor.set_state(JobState::Running, None);
        let earlier_stop = env.stop_request.lock().unwrap_or_else(|p| p.into_inner()).clone();
        commands::Commands::new(env.monitor.clone(), &ctx.op_vertex.borrow(), earlier_stop)
    });
    // A restarted attempt of a job asked to stop stops again, once.
    let mut stop_again = cmds.as_ref().is_some_and(|c| c.stop.is_some());
    let mut next_report = Instant::now() + env.config.metrics_interval;
    let mut last_report = Instant::now();
    let mut ctl_in = (index == 0).then_some(ctl_in);
    let mut ctl_time: Time = 2; // 0 and 1 carried the restore point and the verdict
    let mut ack_time: Time = 1; // 0 carried the restore point check
    let mut committed_upto = 0;
    let mut cancel_sent = false;
    let mut completed = Vec::new();
    let stopped = || format!("stopped: job {} failed on another worker", env.job);

    loop {
        if env.failed.load(Ordering::Relaxed) {
            return Err(stopped());
        }
        worker.step_or_park(Some(Duration::from_millis(1)));
        while let Ok(m) = ack_rx.try_recv() {
            shared.borrow_mut().outbox.push(m);
        }
        let out = std::mem::take(&mut shared.borrow_mut().outbox);
        if !out.is_empty() {
            for m in out {
                ack_in.send(m);
            }
            ack_time += 1;
            ack_in.advance_to(ack_time);
        }
        if coord.is_none() && !cancel_sent && env.cancel.load(Ordering::Relaxed) {
            // A signal to this process cancels the whole job: ask the coordinator.
            cancel_sent = true;
            shared.borrow_mut().outbox.push(AckMsg::CancelRequest);
        }
        if Instant::now() >= next_report {
            // Every worker reports its operators to the coordinator over the ack channel.
            let now = Instant::now();
            let report = metrics::report(index as u32, &ctx.vertices.borrow(), now.duration_since(last_report).as_micros() as u64);
            shared.borrow_mut().outbox.push(AckMsg::Metrics(report));
            if index == 0 {
                env.monitor.set_gpu(gpu_view::snapshot());
            }
            (last_report, next_report) = (now, now + env.config.metrics_interval);
        }
        if let (Some(c), Some(ctl), Some(cmds)) = (coord.as_mut(), ctl_in.as_mut(), cmds.as_mut()) {
            let requested = inbox.borrow().iter().any(|m| matches!(m, AckMsg::CancelRequest));
            match cmds.poll(c, env.storage.is_some()) {
                Some(commands::Intent::Stop) if !cancel_sent => {
                    *env.stop_request.lock().unwrap_or_else(|p| p.into_inner()) = cmds.stop.clone();
                    cancel_sent = true;
                    tracing::warn!("job {}: stopping with a savepoint (asked through the REST API)", env.job);
                    ctl.send(Control::Stop);
                    // Flush it now: an input handle holds a message until its time advances.
                    ctl_time += 1;
                    ctl.advance_to(ctl_time);
                }
                Some(commands::Intent::Cancel) if !cancel_sent => {
                    cancel_sent = true;
                    tracing::warn!("job {}: cancelled through the REST API", env.job);
                    env.cancel.store(true, Ordering::SeqCst);
                    cancel_job(c, ctl, env, cmds);
                    ctl_time += 1;
                    ctl.advance_to(ctl_time);
                }
                _ => {}
            }
            if std::mem::take(&mut stop_again) && !cancel_sent {
                cancel_sent = true;
                ctl.send(Control::Stop);
                ctl_time += 1;
                ctl.advance_to(ctl_time);
            }
            if (requested || env.cancel.load(Ordering::Relaxed)) && !cancel_sent && env.config.savepoint_on_stop {
                // Stop with a savepoint: the sources end, the final checkpoint is the savepoint.
                cancel_sent = true;
                tracing::warn!("job {}: stopping with a savepoint", env.job);
                ctl.send(Control::Stop);
                ctl_time += 1;
                ctl.advance_to(ctl_time);
            } else if (requested || env.cancel.load(Ordering::Relaxed)) && !cancel_sent {
                cancel_sent = true;
                cancel_job(c, ctl, env, cmds);
                ctl_time += 1;
                ctl.advance_to(ctl_time);
            }
            let sent = drive_coordinator(c, ctl, &inbox, env, &clock, &mut completed, cmds)?;
            if sent {
                ctl_time += 1;
                ctl.advance_to(ctl_time);
            }
        }
        let aborted = std::mem::take(&mut shared.borrow_mut().aborted);
        if let Some(s) = env.storage.as_ref().filter(|_| !aborted.is_empty()) {
            let s = s.clone();
            // Once per process: `abort` is idempotent across the process's workers.
            ctx.executor.submit(move || {
                for id in aborted {
                    if let Err(e) = s.abort(id) {
                        tracing::warn!("removing aborted checkpoint {id}: {e}");
                    }
                }
            });
        }
        // Commit sinks in the worker loop, after the notification and before any stop.
        let notified = shared.borrow().notified;
        if notified > committed_upto {
            let mut committers = std::mem::take(&mut shared.borrow_mut().committers);
            let mut res = Ok(());
            for c in committers.iter_mut() {
                res = res.and_then(|()| c(notified));
                crate::crash_point!("between-sink-commits");
            }
            shared.borrow_mut().committers = committers;
            res?;
            committed_upto = notified;
        }
        let sh = shared.borrow();
        if let Some(f) = &sh.fail {
            if sh.cancelled {
                env.cancel.store(true, Ordering::SeqCst);
            }
            return Err(f.clone());
        }
        if sh.finish {
            break;
        }
    }
    drop(ctl_in);
    drop(ack_in);
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.step_or_park(Some(Duration::from_millis(1))) {
        if env.failed.load(Ordering::Relaxed) {
            return Err(stopped());
        }
        if Instant::now() > deadline {
            return Err("job did not drain within 30 s of its final checkpoint".into());
        }
    }
    Ok(completed)
}

/// One restore point for all processes: worker 0 (process 0) sends the checkpoint it restores
/// and the first epoch; every worker reports whether its process chose (and verified) the same
/// checkpoint; worker 0 then fixes the lineage (abandons newer checkpoints) and sends the
/// verdict. All of it runs before the job is built, so no sink has rolled anything back when
/// the processes disagree, and every worker of every process then fails together (a lone
/// failing process would leave its peers waiting). A disagreement is final: no restart.
fn agree_on_restore_point(
    worker: &mut Worker,
    shared: &Rc<RefCell<WorkerShared>>,
    inbox: &RefCell<Vec<AckMsg>>,
    ctl_in: &mut InputHandle<Time, CapacityContainerBuilder<Vec<Control>>>,
    ack_in: &mut InputHandle<Time, CapacityContainerBuilder<Vec<AckMsg>>>,
    env: &AttemptEnv,
) -> Result<(u64, Option<Arc<CheckpointMetadata>>, Option<CheckpointStorage>), String> {
    // The same checkpoint, even where processes mount its directory at different paths.
    let identity = |m: &CheckpointMetadata| RestoreIdentity { id: m.id, triggered_ms: m.triggered_ms, completed_ms: m.completed_ms };
    let mine = env.restored.as_deref().map(identity);
    let (index, peers) = (worker.index(), worker.peers());
    if index == 0 {
        ctl_in.send(Control::RestorePoint { restored: mine, first_epoch: env.first_epoch, base_us: now_us() });
    }
    ctl_in.advance_to(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let step = |worker: &mut Worker| {
        if env.failed.load(Ordering::Relaxed) {
            return Err(format!("stopped: job {} failed on another worker", env.job));
        }
        if Instant::now() > deadline {
            return Err("no agreement on the restore point within 60 s".to_string());
        }
        worker.step_or_park(Some(Duration::from_millis(1)));
        Ok(())
    };
    let (leader, first_epoch) = loop {
        if let Some(p) = shared.borrow().restore_point {
            break p;
        }
        step(worker)?;
    };
    // A process asked for `latest` has no choice of its own: it takes process 0's, if it can
    // read and verify it (it may have listed the directory a moment before or after process 0).
    // A process given a path keeps it, and a different one is a final disagreement.
    let (mut restored, mut restore_storage) = (env.restored.clone(), env.restore_storage.clone());
    if leader != mine && !env.explicit_restore {
        match (leader, &env.job_storage) {
            (None, _) => (restored, restore_storage) = (None, None),
            (Some(l), Some(s)) => match s.load_metadata(l.id).and_then(|m| s.verify(&m).map(|()| m)) {
                Ok(m) if identity(&m) == l => {
                    tracing::info!("{}: taking process 0's restore point, checkpoint {}", env.job, l.id);
                    (restored, restore_storage) = (Some(Arc::new(m)), Some(s.clone()));
                }
                Ok(_) => tracing::warn!("{}: checkpoint {} differs from process 0's", env.job, l.id),
                Err(e) => tracing::warn!("{}: cannot read process 0's restore point: {e}", env.job),
            },
            (Some(_), None) => {}
        }
    }
    let now = restored.as_deref().map(identity);
    ack_in.send(AckMsg::RestoreCheck { worker: index as u32, restored: now, explicit: env.explicit_restore });
    ack_in.advance_to(1);
    if index == 0 {
        let mut checks = Vec::with_capacity(peers);
        while checks.len() < peers {
            checks.extend(inbox.borrow_mut().drain(..).filter_map(|m| match m {
                AckMsg::RestoreCheck { worker, restored, explicit } => Some((worker, restored, explicit)),
                _ => None,
            }));
            if checks.len() < peers {
                step(worker)?;
            }
        }
        let name = |c: Option<RestoreIdentity>| {
            c.map(|r| format!("checkpoint {} (completed at {} ms)", r.id, r.completed_ms)).unwrap_or_else(|| "a fresh start".into())
        };
        let verdict = match checks.iter().find(|(_, r, _)| *r != leader) {
            // Conflicting `--restore` paths are final; a process that could not read process
            // 0's checkpoint may after a restart.
            Some((w, r, explicit)) => Some((
                format!(
                    "restore point disagreement: process 0 chose {}, worker {w}'s process {} {}; not running with a mixed state",
                    name(leader),
                    if *explicit { "was given" } else { "can only use" },
                    name(*r)
                ),
                *explicit || env.explicit_restore,
            )),
            // Agreed: abandon what the restore point leaves behind before any sink rolls back.
            None if restored.is_some() => env.fix_lineage().err().map(|e| (format!("fixing the lineage: {e}"), false)),
            None => None,
        };
        ctl_in.send(Control::RestoreVerdict { failure: verdict });
    }
    ctl_in.advance_to(2);
    let verdict = loop {
        if let Some(v) = shared.borrow_mut().restore_verdict.take() {
            break v;
        }
        step(worker)?;
    };
    match verdict {
        Some((message, is_final)) => {
            if is_final {
                env.deterministic.store(true, Ordering::SeqCst);
            }
            Err(message)
        }
        None => Ok((first_epoch, restored, restore_storage)),
    }
}

/// Tell the monitor what the job graph is (worker 0's view: every worker builds the same).
fn publish_graph(ctx: &JobCtx, env: &AttemptEnv) {
    let vertices = ctx.vertices.borrow();
    let views = vertices
        .iter()
        .enumerate()
        .map(|(index, v)| crate::monitor::VertexView {
            index,
            id: metrics::vertex_id(&v.uid),
            name: v.name.clone(),
            kind: v.kind,
            inputs: v.inputs.clone(),
            parallelism: ctx.peers as u32,
            subtasks: Vec::new(),
        })
        .collect();
    env.monitor.set_graph(views, env.processes, None);
}

/// Cancel: drop pending checkpoints, keep or delete completed ones per the retention policy,
/// and stop every worker.
fn cancel_job(
    c: &mut CheckpointCoordinator<SubtaskSnapshot>,
    ctl: &mut InputHandle<Time, CapacityContainerBuilder<Vec<Control>>>,
    env: &AttemptEnv,
    cmds: &commands::Commands,
) {
    let retain = env.config.checkpoint.retention == RetentionPolicy::RetainOnCancellation;
    for a in c.on_cancel(retain) {
        if let Action::Discard { id } = a {
            if cmds.defer_discard(id) {
                continue; // its savepoint copy discards it when done
            }
        }
        if let (Action::Discard { id } | Action::Abort { id, .. }, Some(s)) = (a, &env.storage) {
            if let Err(e) = s.discard(id) {
                tracing::warn!("cancel: discarding checkpoint {id}: {e}");
            }
        }
    }
    tracing::warn!(
        "job {} cancelled; completed checkpoints {}",
        env.job,
        if retain { "retained (RETAIN_ON_CANCELLATION)" } else { "deleted" }
    );
    ctl.send(Control::Cancel);
}

/// Feed the coordinator time and acks; carry out its actions. Returns whether a control
/// message was sent.
fn drive_coordinator(
    c: &mut CheckpointCoordinator<SubtaskSnapshot>,
    ctl: &mut InputHandle<Time, CapacityContainerBuilder<Vec<Control>>>,
    inbox: &RefCell<Vec<AckMsg>>,
    env: &AttemptEnv,
    clock: &CoordinatorClock,
    completed: &mut Vec<CheckpointMetadata>,
    cmds: &mut commands::Commands,
) -> Result<bool, String> {
    let now = || clock.now_ms();
    let mut actions = c.tick(now());
    for msg in inbox.borrow_mut().drain(..) {
        actions.extend(match msg {
            AckMsg::Ack { id, task, snapshot } => {
                cmds.on_ack(id, task, &snapshot);
                c.ack(id, task, snapshot, now())
            }
            AckMsg::Decline { id, task, reason } => c.decline(id, task, reason, now()),
            AckMsg::SourceFinished { task } => c.source_finished(task, now()),
            AckMsg::Metrics(report) => {
                let workers_per_process = (env.config.parallelism / env.processes.max(1)).max(1);
                cmds.monitor.on_metrics(report.worker / workers_per_process, &report);
                Vec::new()
            }
            AckMsg::RestoreCheck { .. } | AckMsg::CancelRequest => Vec::new(),
        });
    }
    let mut sent = false;
    let mut queue: std::collections::VecDeque<_> = actions.into();
    while let Some(a) = queue.pop_front() {
        match a {
            Action::Trigger { id, is_final, requested, .. } => {
                if requested {
                    cmds.requested_trigger(id);
                }
                let savepoint = cmds.is_savepoint(id, is_final, env.config.savepoint_on_stop);
                tracing::debug!("trigger checkpoint {id}{}{}", if is_final { " (final)" } else { "" }, if savepoint { " (savepoint)" } else { "" });
                cmds.on_trigger(id, savepoint, is_final, c.task_count() as u32);
                ctl.send(Control::Trigger { id, at_us: now_us(), is_final, savepoint });
                sent = true;
            }
            Action::Complete { id, triggered_ms, acks, is_final } => {
                let meta = CheckpointMetadata {
                    version: METADATA_VERSION,
                    job: env.job.clone(),
                    id,
                    triggered_ms: clock.wall_ms(triggered_ms),
                    completed_ms: clock.wall_ms(now()),
                    parallelism: env.config.parallelism,
                    max_parallelism: env.config.max_parallelism,
                    is_final,
                    subtasks: acks,
                };
                crate::crash_point!("checkpoint-before-metadata");
                let result = match &env.storage {
                    Some(s) => s.commit_metadata(&meta).map(|_| ()),
                    None => Ok(()),
                };
                match result {
                    Ok(()) => {
                        if env.storage.is_some() {
                            let (b, s, w) = meta.max_costs();
                            tracing::info!(
                                "checkpoint {id} complete in {} ms: {} bytes written ({} referenced{}), barrier {b} µs, sync {s} µs, async {w} µs",
                                meta.duration_ms(),
                                meta.bytes(),
                                meta.referenced_bytes(),
                                if meta.is_incremental() { ", incremental" } else { "" }
                            );
                            cmds.on_complete(&meta, env.storage.as_ref().map(|s| s.display(&checkpoint_dir_name(id))), &env.config, env.storage.as_ref());
                            completed.push(meta);
                        }
                        crate::crash_point!("checkpoint-before-notify");
                        queue.extend(c.committed(id, now()));
                    }
                    Err(e) => {
                        tracing::error!("checkpoint {id}: {e}");
                        cmds.on_failed(id, format!("writing _metadata failed: {e}"));
                        queue.extend(c.commit_failed(id, e.to_string(), now()));
                    }
                }
            }
            Action::Abort { id, reason } => {
                tracing::warn!("checkpoint {id} aborted: {reason}");
                cmds.on_failed(id, reason.to_string());
                // Every process removes what it wrote of it (it has no _metadata, so it never
                // existed), including files its writers are still producing.
                ctl.send(Control::Abort { id });
                sent = true;
            }
            Action::Notify { id } => {
                ctl.send(Control::Notify { id });
                sent = true;
            }
            Action::Discard { id } if cmds.defer_discard(id) => {
                tracing::debug!("checkpoint {id}: discarded once its savepoint copy is done");
            }
            Action::Discard { id } => {
                if let Some(s) = env.storage.clone() {
                    env.executor.lock().expect("executor").submit(move || {
                        if let Err(e) = s.discard(id) {
                            tracing::warn!("discarding checkpoint {id}: {e}");
                        }
                    });
                }
            }
            Action::FailJob { reason } => {
                let reason = match reason {
                    weir_checkpoint::FailureReason::FinalCheckpoint { .. } => reason.to_string(),
                    r => format!("too many failed checkpoints: {r}"),
                };
                ctl.send(Control::Fail { reason });
                sent = true;
            }
            Action::Finished => {
                ctl.send(Control::Finish);
                sent = true;
            }
        }
    }
    cmds.check_finishing(c);
    Ok(sent)
}

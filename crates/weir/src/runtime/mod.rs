//! Execution on timely-dataflow: attempts, restarts, the worker loop and the coordinator driver.
//!
//! Each worker builds three dataflows: the control broadcast from worker 0, the acks exchanged
//! to worker 0, and the job itself. Worker 0 drives the pure [`CheckpointCoordinator`] with
//! wall-clock time and the acks it receives, and carries out its actions: broadcast triggers and
//! notifications, commit `_metadata`, discard old checkpoints.

pub(crate) mod control;
pub(crate) mod executor;

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
use weir_checkpoint::{Action, CheckpointCoordinator, CheckpointMetadata, SubtaskSnapshot, TaskId, METADATA_VERSION};
use weir_storage::{CheckpointStorage, StorageError};

use crate::config::{ConfigError, JobConfig, RestartStrategy};
use crate::epoch::Time;
use crate::stream::Job;
use control::{AckMsg, Control, WorkerShared};
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
    pub executor: SnapshotExecutor,
    pub ack_tx: Sender<AckMsg>,
    next_op: Cell<u32>,
    pub tasks: RefCell<Vec<(u32, bool)>>,
    build_error: RefCell<Option<String>>,
}

impl JobCtx {
    /// Register a stateful operator; its id is its position, stable for the same job graph.
    pub(crate) fn register(&self, is_source: bool) -> u32 {
        let id = self.next_op.get();
        self.next_op.set(id + 1);
        self.tasks.borrow_mut().push((id, is_source));
        id
    }

    /// A failure while building: the attempt fails with this message.
    pub(crate) fn fail_build(&self, message: String) {
        self.build_error.borrow_mut().get_or_insert(message);
    }

    /// The snapshots of operator `op` in the restored checkpoint.
    pub(crate) fn restored_subtasks(&self, op: u32) -> impl Iterator<Item = &SubtaskSnapshot> {
        self.restored
            .iter()
            .flat_map(move |m| m.subtasks.iter().filter(move |(t, _)| t.operator == op).map(|(_, s)| s))
    }
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

type BuildFn = dyn Fn(&mut Job<'_>) + Send + Sync;

struct AttemptEnv {
    job: String,
    config: Arc<JobConfig>,
    storage: Option<CheckpointStorage>,
    restore_storage: Option<CheckpointStorage>,
    restored: Option<Arc<CheckpointMetadata>>,
    first_epoch: u64,
    retained: Vec<u64>,
    failed: AtomicBool,
    cancel: Arc<AtomicBool>,
    executor: Mutex<SnapshotExecutor>,
    build: Arc<BuildFn>,
}

/// Run a job to completion, restarting per the restart strategy.
pub(crate) fn run_job(
    job: &str,
    config: JobConfig,
    cluster: &ClusterConfig,
    restore: &Restore,
    cancel: Arc<AtomicBool>,
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
    let checkpointing = config.checkpoint.interval.is_some();
    let storage = if checkpointing || *restore == Restore::Latest {
        Some(CheckpointStorage::open(&config.checkpoint.dir, job)?)
    } else {
        None
    };
    let mut restarts = 0;
    let mut restore = restore.clone();
    loop {
        let (restore_storage, restored) = choose_checkpoint(&restore, storage.as_ref())?;
        let restored_id = restored.as_ref().map(|m| m.id).unwrap_or(0);
        let mut first_epoch = restored_id + 1;
        let mut retained = Vec::new();
        if let Some(s) = &storage {
            let (valid, newest) = s.checkpoint_ids()?;
            first_epoch = first_epoch.max(newest + 1);
            retained = valid.into_iter().filter(|&id| id <= restored_id).collect();
        }
        if let Some(m) = &restored {
            tracing::info!("restoring {job} from checkpoint {} (parallelism {} → {})", m.id, m.parallelism, config.parallelism);
        }
        let (exec, exec_guard) = SnapshotExecutor::start(workers);
        let env = Arc::new(AttemptEnv {
            job: job.to_string(),
            config: config.clone(),
            storage: storage.clone().filter(|_| checkpointing),
            restore_storage,
            restored: restored.map(Arc::new),
            first_epoch,
            retained,
            failed: AtomicBool::new(false),
            cancel: cancel.clone(),
            executor: Mutex::new(exec),
            build: build.clone(),
        });
        let outcome = run_attempt(env.clone(), workers, cluster);
        drop(env);
        drop(exec_guard);
        match outcome {
            Ok(checkpoints) => {
                return Ok(JobResult { restored_from: (restored_id > 0).then_some(restored_id), restarts, checkpoints })
            }
            Err(_) if cancel.load(Ordering::SeqCst) => return Err(JobError::Cancelled),
            Err(message) => {
                let allowed = match config.restart {
                    RestartStrategy::None => None,
                    RestartStrategy::FixedDelay { attempts, delay } => (restarts < attempts).then_some(delay),
                };
                let Some(delay) = allowed else { return Err(JobError::Failed { restarts, message }) };
                restarts += 1;
                tracing::warn!("job {job} failed ({message}); restart {restarts} in {delay:?} from the latest checkpoint");
                std::thread::sleep(delay);
                restore = if storage.is_some() { Restore::Latest } else { Restore::None };
            }
        }
    }
}

fn choose_checkpoint(
    restore: &Restore,
    storage: Option<&CheckpointStorage>,
) -> Result<(Option<CheckpointStorage>, Option<CheckpointMetadata>), JobError> {
    match restore {
        Restore::None => Ok((None, None)),
        Restore::Latest => {
            let s = storage.expect("storage is open when restoring latest");
            let (meta, skipped) = s.latest_valid()?;
            for e in &skipped {
                tracing::error!("not restoring a corrupt checkpoint: {e}");
            }
            if meta.is_none() {
                tracing::info!("no valid checkpoint in {}: starting fresh", s.location().display());
            }
            Ok((meta.as_ref().map(|_| s.clone()), meta))
        }
        Restore::Path(p) => {
            let (s, id) = CheckpointStorage::open_checkpoint_path(p)?;
            let meta = s.load_metadata(id).map_err(|e| JobError::Restore(e.to_string()))?;
            s.verify(&meta).map_err(|e| JobError::Restore(e.to_string()))?;
            Ok((Some(s), Some(meta)))
        }
    }
}

fn run_attempt(env: Arc<AttemptEnv>, workers: usize, cluster: &ClusterConfig) -> Result<Vec<CheckpointMetadata>, String> {
    use timely::communication::Config as Comm;
    let communication = if cluster.processes() > 1 {
        Comm::Cluster {
            threads: workers,
            process: cluster.process,
            addresses: cluster.hosts.clone(),
            report: false,
            zerocopy: false,
        }
    } else {
        Comm::Process(workers)
    };
    let config = timely::Config { communication, worker: timely::WorkerConfig::default() };
    let env2 = env.clone();
    let guards = timely::execute(config, move |worker| {
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
    let shared = Rc::new(RefCell::new(WorkerShared::default()));
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

    let ctx = Rc::new(JobCtx {
        index,
        peers,
        config: env.config.clone(),
        shared: shared.clone(),
        probe: ProbeHandle::new(),
        storage: env.storage.clone(),
        restore_storage: env.restore_storage.clone(),
        restored: env.restored.clone(),
        first_epoch: env.first_epoch,
        executor: env.executor.lock().expect("executor").clone(),
        ack_tx,
        next_op: Cell::new(0),
        tasks: RefCell::new(Vec::new()),
        build_error: RefCell::new(None),
    });
    worker.dataflow::<Time, _, _>(|scope| {
        let mut job = Job::new(scope, ctx.clone());
        (env.build)(&mut job);
    });
    if let Some(e) = ctx.build_error.borrow_mut().take() {
        return Err(e);
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
            now_us() / 1000,
        )
    });
    let mut ctl_in = (index == 0).then_some(ctl_in);
    let mut ctl_time: Time = 0;
    let mut ack_time: Time = 0;
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
        if let (Some(c), Some(ctl)) = (coord.as_mut(), ctl_in.as_mut()) {
            if env.cancel.load(Ordering::Relaxed) && !cancel_sent {
                cancel_sent = true;
                cancel_job(c, ctl, env);
                ctl_time += 1;
                ctl.advance_to(ctl_time);
            }
            let sent = drive_coordinator(c, ctl, &inbox, env, &mut completed)?;
            if sent {
                ctl_time += 1;
                ctl.advance_to(ctl_time);
            }
        }
        // Commit sinks in the worker loop, after the notification and before any stop.
        let notified = shared.borrow().notified;
        if notified > committed_upto {
            let mut committers = std::mem::take(&mut shared.borrow_mut().committers);
            let mut res = Ok(());
            for c in committers.iter_mut() {
                res = res.and_then(|()| c(notified));
            }
            shared.borrow_mut().committers = committers;
            res?;
            committed_upto = notified;
        }
        let sh = shared.borrow();
        if let Some(f) = &sh.fail {
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

/// Cancel: drop pending checkpoints, keep or delete completed ones per the retention policy,
/// and stop every worker.
fn cancel_job(c: &mut CheckpointCoordinator<SubtaskSnapshot>, ctl: &mut InputHandle<Time, CapacityContainerBuilder<Vec<Control>>>, env: &AttemptEnv) {
    let retain = env.config.checkpoint.retention == weir_checkpoint::RetentionPolicy::RetainOnCancellation;
    for a in c.on_cancel(retain) {
        if let (Action::Discard { id } | Action::Abort { id, .. }, Some(s)) = (a, &env.storage) {
            if let Err(e) = s.discard(id) {
                tracing::warn!("cancel: discarding checkpoint {id}: {e}");
            }
        }
    }
    tracing::warn!(
        "job {} cancelled; completed checkpoints {}",
        env.job,
        if retain { "retained (RETAIN_ON_CANCELLATION)" } else { "deleted (DELETE_ON_CANCELLATION)" }
    );
    ctl.send(Control::Fail { reason: "cancelled".into() });
}

/// Feed the coordinator time and acks; carry out its actions. Returns whether a control
/// message was sent.
fn drive_coordinator(
    c: &mut CheckpointCoordinator<SubtaskSnapshot>,
    ctl: &mut InputHandle<Time, CapacityContainerBuilder<Vec<Control>>>,
    inbox: &RefCell<Vec<AckMsg>>,
    env: &AttemptEnv,
    completed: &mut Vec<CheckpointMetadata>,
) -> Result<bool, String> {
    let now = || now_us() / 1000;
    let mut actions = c.tick(now());
    for msg in inbox.borrow_mut().drain(..) {
        actions.extend(match msg {
            AckMsg::Ack { id, task, snapshot } => c.ack(id, task, snapshot, now()),
            AckMsg::Decline { id, task, reason } => c.decline(id, task, reason, now()),
            AckMsg::SourceFinished { task } => c.source_finished(task, now()),
        });
    }
    let mut sent = false;
    let mut queue: std::collections::VecDeque<_> = actions.into();
    while let Some(a) = queue.pop_front() {
        match a {
            Action::Trigger { id, is_final, .. } => {
                tracing::debug!("trigger checkpoint {id}{}", if is_final { " (final)" } else { "" });
                ctl.send(Control::Trigger { id, at_us: now_us(), is_final });
                sent = true;
            }
            Action::Complete { id, triggered_ms, acks, is_final } => {
                let meta = CheckpointMetadata {
                    version: METADATA_VERSION,
                    job: env.job.clone(),
                    id,
                    triggered_ms,
                    completed_ms: now(),
                    parallelism: env.config.parallelism,
                    max_parallelism: env.config.max_parallelism,
                    is_final,
                    subtasks: acks,
                };
                let result = match &env.storage {
                    Some(s) => s.commit_metadata(&meta).map(|_| ()),
                    None => Ok(()),
                };
                match result {
                    Ok(()) => {
                        if env.storage.is_some() {
                            let (b, s, w) = meta.max_costs();
                            tracing::info!(
                                "checkpoint {id} complete in {} ms: {} bytes, barrier {b} µs, sync {s} µs, async {w} µs",
                                meta.duration_ms(),
                                meta.bytes()
                            );
                            completed.push(meta);
                        }
                        queue.extend(c.committed(id, now()));
                    }
                    Err(e) => {
                        tracing::error!("checkpoint {id}: {e}");
                        queue.extend(c.commit_failed(id, e.to_string(), now()));
                    }
                }
            }
            Action::Abort { id, reason } => {
                tracing::warn!("checkpoint {id} aborted: {reason}");
                // Remove what was written of it (it has no _metadata, so it never existed).
                if let Some(s) = env.storage.clone() {
                    env.executor.lock().expect("executor").submit(move || {
                        let _ = s.discard(id);
                    });
                }
            }
            Action::Notify { id } => {
                ctl.send(Control::Notify { id });
                sent = true;
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
                let reason = format!("too many failed checkpoints: {reason}");
                ctl.send(Control::Fail { reason });
                sent = true;
            }
            Action::Finished => {
                ctl.send(Control::Finish);
                sent = true;
            }
        }
    }
    Ok(sent)
}

//! What the coordinator does for the job's monitor: commands from the REST API (a checkpoint or
//! savepoint now, stop with a savepoint, cancel) and the checkpoint history it reports.
//!
//! Runs on worker 0 of process 0, in the coordinator's loop. A savepoint of a running job is a
//! checkpoint written in full in the canonical format, then copied, off the worker thread, into
//! its own directory; the checkpoint is not discarded by retention until the copy is done.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use weir_checkpoint::{CheckpointCoordinator, CheckpointId, CheckpointMetadata, SubtaskSnapshot, TaskId};
use weir_storage::CheckpointStorage;

use crate::config::JobConfig;
use crate::monitor::{wall_ms, JobCommand, JobMonitor, SubtaskCheckpointStats, TriggerStatus};

/// What the job's loop must do for a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Stop with a savepoint (sources end; the final checkpoint is a savepoint).
    Stop,
    /// Cancel now.
    Cancel,
}

enum Request {
    Checkpoint,
    Savepoint(Option<String>),
}

/// Checkpoints pinned while their savepoint copy runs, and discards put off until it ends.
#[derive(Default)]
struct Pins {
    copying: BTreeSet<CheckpointId>,
    discard_after: BTreeSet<CheckpointId>,
}

/// The coordinator's side of the monitor.
pub(crate) struct Commands {
    pub monitor: Arc<JobMonitor>,
    waiting: VecDeque<(String, Request)>,
    running: BTreeMap<CheckpointId, (String, Request)>,
    /// Stop with a savepoint was asked for: its trigger and target.
    pub stop: Option<(String, Option<String>)>,
    /// Vertex of each operator id (for the per-task checkpoint statistics).
    op_vertex: BTreeMap<u32, usize>,
    pins: Arc<Mutex<Pins>>,
    copies: Vec<JoinHandle<()>>,
    /// Stop or cancel was sent: later ones are refused.
    stopping: bool,
}

impl Commands {
    /// `stop`: the stop with a savepoint asked for before this attempt, if any (a restarted
    /// attempt stops again, and refuses another stop).
    pub(crate) fn new(monitor: Arc<JobMonitor>, op_vertex: &[(u32, usize)], stop: Option<(String, Option<String>)>) -> Self {
        Self {
            monitor,
            waiting: VecDeque::new(),
            running: BTreeMap::new(),
            stopping: stop.is_some(),
            stop,
            op_vertex: op_vertex.iter().copied().collect(),
            pins: Arc::default(),
            copies: Vec::new(),
        }
    }

    /// Take the monitor's new commands; returns what the loop must do at once.
    pub(crate) fn poll(&mut self, c: &mut CheckpointCoordinator<SubtaskSnapshot>, checkpointing: bool) -> Option<Intent> {
        let mut intent = None;
        for (trigger, cmd) in self.monitor.take_commands() {
            let refuse = |why: &str| self.monitor.resolve_trigger(&trigger, TriggerStatus::Failed { message: why.to_string() });
            match cmd {
                JobCommand::Checkpoint | JobCommand::Savepoint { .. } if !checkpointing => {
                    refuse("checkpoint storage is off: set execution.checkpointing.interval, or run with --savepoint-on-stop")
                }
                JobCommand::Checkpoint => {
                    c.request();
                    self.waiting.push_back((trigger, Request::Checkpoint));
                }
                JobCommand::Savepoint { target } => {
                    c.request();
                    self.waiting.push_back((trigger, Request::Savepoint(target)));
                }
                JobCommand::StopWithSavepoint { .. } | JobCommand::Cancel if self.stopping => refuse("the job is already being stopped"),
                // Its final checkpoint is under way as an ordinary checkpoint: too late for it to
                // become a savepoint.
                JobCommand::StopWithSavepoint { .. } if c.is_finishing() => refuse("the job is finishing: its final checkpoint is under way"),
                JobCommand::StopWithSavepoint { .. } if !checkpointing => {
                    refuse("checkpoint storage is off: set execution.checkpointing.interval, or run with --savepoint-on-stop")
                }
                JobCommand::StopWithSavepoint { target } => {
                    self.stopping = true;
                    self.stop = Some((trigger, target));
                    intent = Some(Intent::Stop);
                }
                JobCommand::Cancel => {
                    self.stopping = true;
                    self.monitor.resolve_trigger(&trigger, TriggerStatus::Completed { location: None, checkpoint: None });
                    intent = Some(Intent::Cancel);
                }
            }
        }
        intent
    }

    /// The coordinator triggered checkpoint `id` for the oldest request.
    pub(crate) fn requested_trigger(&mut self, id: CheckpointId) {
        if let Some(r) = self.waiting.pop_front() {
            self.running.insert(id, r);
        }
    }

    /// Requests that can no longer be served (the job finishes) fail.
    pub(crate) fn check_finishing(&mut self, c: &CheckpointCoordinator<SubtaskSnapshot>) {
        if c.is_finishing() {
            for (trigger, _) in self.waiting.drain(..) {
                let message = "the job is finishing: its final checkpoint is under way".to_string();
                self.monitor.resolve_trigger(&trigger, TriggerStatus::Failed { message });
            }
        }
    }

    /// Whether checkpoint `id` is written as a savepoint.
    pub(crate) fn is_savepoint(&self, id: CheckpointId, is_final: bool, savepoint_on_stop: bool) -> bool {
        matches!(self.running.get(&id), Some((_, Request::Savepoint(_)))) || (is_final && (savepoint_on_stop || self.stop.is_some()))
    }

    pub(crate) fn on_trigger(&self, id: CheckpointId, is_savepoint: bool, is_final: bool, tasks: u32) {
        self.monitor.on_trigger(id, wall_ms(), is_savepoint, is_final, tasks);
    }

    pub(crate) fn on_ack(&self, id: CheckpointId, task: TaskId, s: &SubtaskSnapshot) {
        let Some(&vertex) = self.op_vertex.get(&task.operator) else { return };
        let stats = SubtaskCheckpointStats {
            subtask: task.subtask,
            ack_timestamp: wall_ms(),
            barrier_us: s.stats.barrier_us,
            alignment_us: s.stats.alignment_us,
            sync_us: s.stats.sync_us,
            async_us: s.stats.async_us,
            checkpointed_size: s.stats.bytes,
            state_size: s.state_files.iter().map(|f| f.size).sum(),
        };
        self.monitor.on_ack(id, vertex, stats);
    }

    /// Checkpoint `meta` is committed (at `location`, if it is stored): report it, and start
    /// the savepoint copy if it was asked for.
    pub(crate) fn on_complete(&mut self, meta: &CheckpointMetadata, location: Option<String>, config: &Arc<JobConfig>, storage: Option<&CheckpointStorage>) {
        self.monitor.on_complete(meta.id, meta.completed_ms, meta.is_incremental(), location.clone());
        match self.running.remove(&meta.id) {
            Some((trigger, Request::Checkpoint)) => {
                self.monitor.resolve_trigger(&trigger, TriggerStatus::Completed { location, checkpoint: Some(meta.id) });
            }
            Some((trigger, Request::Savepoint(target))) => {
                let Some(storage) = storage.cloned() else { return };
                let (monitor, config, meta, pins) = (self.monitor.clone(), config.clone(), meta.clone(), self.pins.clone());
                let id = meta.id;
                pins.lock().unwrap_or_else(|p| p.into_inner()).copying.insert(id);
                let job = meta.job.clone();
                let trigger2 = trigger.clone();
                let copy = std::thread::Builder::new().name(format!("weir-savepoint-{id}")).spawn(move || {
                    let status = match super::savepoint::write_savepoint(&config, target.as_deref(), &job, &storage, &meta) {
                        Ok(path) => {
                            tracing::info!("job {job}: savepoint of checkpoint {} written to {path}", meta.id);
                            monitor.on_savepoint(meta.id, &path);
                            TriggerStatus::Completed { location: Some(path), checkpoint: Some(meta.id) }
                        }
                        Err(e) => {
                            tracing::error!("job {job}: savepoint of checkpoint {}: {e}", meta.id);
                            TriggerStatus::Failed { message: format!("writing the savepoint of checkpoint {}: {e}", meta.id) }
                        }
                    };
                    let discard = {
                        let mut p = pins.lock().unwrap_or_else(|p| p.into_inner());
                        p.copying.remove(&meta.id);
                        p.discard_after.remove(&meta.id)
                    };
                    if discard {
                        if let Err(e) = storage.discard(meta.id) {
                            tracing::warn!("discarding checkpoint {}: {e}", meta.id);
                        }
                    }
                    monitor.resolve_trigger(&trigger2, status);
                });
                match copy {
                    Ok(h) => self.copies.push(h),
                    Err(e) => {
                        self.pins.lock().unwrap_or_else(|p| p.into_inner()).copying.remove(&id);
                        self.monitor.resolve_trigger(&trigger, TriggerStatus::Failed { message: format!("starting the savepoint copy: {e}") });
                    }
                }
            }
            None => {}
        }
    }

    /// Whether discarding checkpoint `id` must wait for its savepoint copy (which then does it).
    pub(crate) fn defer_discard(&self, id: CheckpointId) -> bool {
        let mut p = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        p.copying.contains(&id) && p.discard_after.insert(id)
    }

    pub(crate) fn on_failed(&mut self, id: CheckpointId, reason: String) {
        if let Some((trigger, _)) = self.running.remove(&id) {
            self.monitor.resolve_trigger(&trigger, TriggerStatus::Failed { message: format!("checkpoint {id} failed: {reason}") });
        }
        self.monitor.on_failed(id, reason);
    }

    /// The attempt ends: wait for savepoint copies, fail what is left.
    pub(crate) fn finish(&mut self, why: &str) {
        for h in self.copies.drain(..) {
            let _ = h.join();
        }
        for (trigger, _) in self.waiting.drain(..).chain(std::mem::take(&mut self.running).into_values()) {
            self.monitor.resolve_trigger(&trigger, TriggerStatus::Failed { message: why.to_string() });
        }
    }
}

impl Drop for Commands {
    fn drop(&mut self) {
        self.finish("the job stopped before it was done");
    }
}

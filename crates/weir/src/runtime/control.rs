//! The control plane: messages between the coordinator (worker 0) and every worker, and each
//! worker's view of them.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use timely::scheduling::Activator;
use weir_checkpoint::{CheckpointId, SubtaskSnapshot, TaskId};

/// Coordinator → every worker (broadcast).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Control {
    /// The restore point process 0 chose: the checkpoint (none: a fresh start) and first epoch.
    /// `base_us`: the wall time the first epoch opens at (what sources' latency stamps count from).
    RestorePoint { restored: Option<RestoreIdentity>, first_epoch: u64, base_us: u64 },
    /// Whether the attempt goes on (`Some`: why not, and whether that is final; it then fails
    /// everywhere).
    RestoreVerdict { failure: Option<(String, bool)> },
    /// Inject barrier `id` at the sources.
    /// `savepoint`: write it as a savepoint (every state in full, in the canonical format).
    Trigger { id: CheckpointId, at_us: u64, is_final: bool, savepoint: bool },
    /// Checkpoint `id` was aborted: remove what this process wrote of it.
    Abort { id: CheckpointId },
    /// Checkpoint `id` is committed: sinks commit epochs `<= id`.
    Notify { id: CheckpointId },
    /// The final checkpoint is committed: stop.
    Finish,
    /// The job is cancelled (a signal to any of its processes): stop everywhere, no restart.
    Cancel,
    /// Stop with a savepoint: sources stop reading as if their input ended, so the final
    /// checkpoint (a savepoint) is taken and committed, then the job finishes.
    Stop,
    /// The job failed: stop and restart per strategy.
    Fail { reason: String },
}

/// Which checkpoint a process restores, comparable across processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RestoreIdentity {
    pub id: CheckpointId,
    pub triggered_ms: u64,
    pub completed_ms: u64,
}

/// Every worker → coordinator (exchanged to worker 0).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum AckMsg {
    Ack { id: CheckpointId, task: TaskId, snapshot: SubtaskSnapshot },
    Decline { id: CheckpointId, task: TaskId, reason: String },
    SourceFinished { task: TaskId },
    /// The checkpoint this worker's process chose, checked against process 0's.
    RestoreCheck { worker: u32, restored: Option<RestoreIdentity>, explicit: bool },
    /// A process other than 0 was asked to cancel the job (SIGINT/SIGTERM).
    CancelRequest,
    /// A worker's periodic report of its operators' metrics.
    Metrics(crate::monitor::MetricsReport),
}

/// A barrier for one source.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Trigger {
    pub id: CheckpointId,
    pub is_final: bool,
}

type Committer = Box<dyn FnMut(CheckpointId) -> Result<(), String>>;

/// What one worker knows of the control plane; shared by its operators (single-threaded).
#[derive(Default)]
pub(crate) struct WorkerShared {
    pub source_triggers: Vec<VecDeque<Trigger>>,
    pub activators: Vec<Activator>,
    /// When each checkpoint was triggered (µs since the Unix epoch); epoch `n + 1` opens at
    /// checkpoint `n`'s trigger (and the first epoch at the attempt's start, under its id - 1).
    pub trigger_us: BTreeMap<CheckpointId, u64>,
    /// Checkpoints to write as savepoints.
    pub savepoints: std::collections::BTreeSet<CheckpointId>,
    /// Sources stamp batches with their emit time (`metrics.latency.interval`).
    pub latency_on: bool,
    pub notified: CheckpointId,
    pub final_id: Option<CheckpointId>,
    pub outbox: Vec<AckMsg>,
    pub finish: bool,
    pub fail: Option<String>,
    pub cancelled: bool,
    /// Stop with a savepoint was requested: sources finish at once.
    pub stop_sources: bool,
    pub aborted: Vec<CheckpointId>,
    pub restore_point: Option<(Option<RestoreIdentity>, u64)>,
    pub restore_verdict: Option<Option<(String, bool)>>,
    pub committers: Vec<Committer>,
}

impl WorkerShared {
    pub(crate) fn on_control(&mut self, c: &Control) {
        match c {
            Control::Trigger { id, at_us, is_final, savepoint } => {
                self.trigger_us.insert(*id, *at_us);
                if *savepoint {
                    self.savepoints.insert(*id);
                }
                if *is_final {
                    self.final_id = Some(*id);
                }
                for q in &mut self.source_triggers {
                    q.push_back(Trigger { id: *id, is_final: *is_final });
                }
                for a in &self.activators {
                    a.activate();
                }
            }
            Control::Notify { id } => {
                self.notified = self.notified.max(*id);
                // Trigger times of committed checkpoints are no longer needed, except the
                // latest: it is when the epoch after it opened (latency stamps count from it).
                self.trigger_us = self.trigger_us.split_off(id);
                self.savepoints = self.savepoints.split_off(&(*id + 1));
            }
            Control::RestorePoint { restored, first_epoch, base_us } => {
                self.restore_point = Some((*restored, *first_epoch));
                self.trigger_us.insert(first_epoch.saturating_sub(1), *base_us);
            }
            Control::RestoreVerdict { failure } => self.restore_verdict = Some(failure.clone()),
            Control::Abort { id } => self.aborted.push(*id),
            Control::Finish => self.finish = true,
            Control::Stop => {
                self.stop_sources = true;
                for a in &self.activators {
                    a.activate();
                }
            }
            Control::Cancel => {
                self.cancelled = true;
                self.set_fail("job cancelled".into());
            }
            Control::Fail { reason } => {
                if self.fail.is_none() {
                    self.fail = Some(reason.clone());
                }
            }
        }
    }

    /// Whether checkpoint `id` is written as a savepoint.
    pub(crate) fn is_savepoint(&self, id: CheckpointId) -> bool {
        self.savepoints.contains(&id)
    }

    /// Record a failure of this worker (the first one wins).
    pub(crate) fn set_fail(&mut self, reason: String) {
        if self.fail.is_none() {
            self.fail = Some(reason);
        }
    }
}

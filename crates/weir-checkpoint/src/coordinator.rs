//! The checkpoint coordinator: Flink's checkpoint semantics as a state machine.
//!
//! Driven by the runtime on worker 0: [`CheckpointCoordinator::tick`] on every turn of its loop,
//! [`CheckpointCoordinator::ack`] / [`CheckpointCoordinator::decline`] when a task answers, and
//! [`CheckpointCoordinator::committed`] once the runtime has durably written `_metadata`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::{CheckpointId, TaskId};

/// The coordinator's settings, in milliseconds (Flink's `execution.checkpointing.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Periodic trigger interval; `None` disables periodic checkpoints (a bounded job still takes
    /// its final checkpoint so that sinks commit).
    pub interval_ms: Option<u64>,
    /// A checkpoint still pending this long after its trigger is aborted.
    pub timeout_ms: u64,
    /// The least time between the completion of one checkpoint and the trigger of the next.
    pub min_pause_ms: u64,
    /// At most this many checkpoints pending at once.
    pub max_concurrent: usize,
    /// Consecutive failed checkpoints tolerated before the job fails.
    pub tolerable_failed: u32,
    /// Completed checkpoints retained; older ones are discarded.
    pub num_retained: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            interval_ms: None,
            timeout_ms: 10 * 60 * 1000,
            min_pause_ms: 0,
            max_concurrent: 1,
            tolerable_failed: 0,
            num_retained: 1,
        }
    }
}

/// Why a checkpoint failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// It was still pending when its timeout expired.
    Timeout,
    /// A task declined it (its snapshot failed), with the task's message.
    Declined(TaskId, String),
    /// Writing its `_metadata` failed, with the storage's message.
    CommitFailed(String),
    /// The job failed while it was pending (its tasks are going away).
    JobFailed,
    /// The final checkpoint of a bounded job failed for `cause`. Its sources have stopped, so no
    /// later checkpoint can replace it: the job fails whatever the tolerated failures.
    FinalCheckpoint {
        /// The final checkpoint's id.
        id: CheckpointId,
        /// Why it failed.
        cause: Box<FailureReason>,
    },
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureReason::Timeout => write!(f, "checkpoint expired before completing"),
            FailureReason::Declined(t, m) => write!(f, "declined by {t}: {m}"),
            FailureReason::CommitFailed(m) => write!(f, "writing _metadata failed: {m}"),
            FailureReason::JobFailed => write!(f, "the job failed"),
            FailureReason::FinalCheckpoint { id, cause } => write!(f, "final checkpoint {id} failed: {cause}"),
        }
    }
}

/// What the runtime must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<A> {
    /// Inject barrier `id` at every source (advance sources from epoch `id` to `id + 1`).
    Trigger {
        /// The checkpoint id (= the epoch it closes).
        id: CheckpointId,
        /// Trigger time, as given to the coordinator.
        at_ms: u64,
        /// The job's final checkpoint: sources stop after it.
        is_final: bool,
        /// Asked for with [`CheckpointCoordinator::request`] (a savepoint, or a checkpoint
        /// asked for through the REST API), not due to the interval.
        requested: bool,
    },
    /// Every task acked: write `_metadata` from `acks`, then call `committed` (or `commit_failed`).
    Complete {
        /// The checkpoint id.
        id: CheckpointId,
        /// Trigger time.
        triggered_ms: u64,
        /// The acks, in task order.
        acks: Vec<(TaskId, A)>,
        /// The final checkpoint of a bounded job.
        is_final: bool,
    },
    /// Tell every task to drop checkpoint `id`.
    Abort {
        /// The checkpoint id.
        id: CheckpointId,
        /// Why.
        reason: FailureReason,
    },
    /// Checkpoint `id` was committed: tell sinks to commit epochs `<= id`.
    Notify {
        /// The checkpoint id.
        id: CheckpointId,
    },
    /// Completed checkpoint `id` fell out of retention: delete its files.
    Discard {
        /// The checkpoint id.
        id: CheckpointId,
    },
    /// Too many consecutive checkpoint failures, or a failed final checkpoint
    /// ([`FailureReason::FinalCheckpoint`]): fail the job (and restart it per strategy). Pending
    /// checkpoints are aborted with it, except one being committed, which `committed` or
    /// `commit_failed` still resolves. Emitted at most once.
    FailJob {
        /// The last failure.
        reason: FailureReason,
    },
    /// The final checkpoint is committed: the bounded job is done.
    Finished,
}

struct Pending<A> {
    triggered_ms: u64,
    awaiting: BTreeSet<TaskId>,
    acks: Vec<(TaskId, A)>,
    is_final: bool,
}

/// The checkpoint coordinator (one per job, on worker 0).
pub struct CheckpointCoordinator<A> {
    cfg: CoordinatorConfig,
    tasks: BTreeSet<TaskId>,
    sources: BTreeSet<TaskId>,
    finished_sources: BTreeSet<TaskId>,
    next_id: CheckpointId,
    pending: BTreeMap<CheckpointId, Pending<A>>,
    committing: Option<CheckpointId>,
    retained: VecDeque<CheckpointId>,
    started_ms: u64,
    last_trigger_ms: Option<u64>,
    last_completion_ms: Option<u64>,
    consecutive_failures: u32,
    final_id: Option<CheckpointId>,
    failed: bool,
    /// Checkpoints asked for and not yet triggered.
    requested: usize,
}

impl<A> CheckpointCoordinator<A> {
    /// A coordinator for a job whose stateful tasks are `tasks` (of which `sources` are sources),
    /// whose next checkpoint is `first_id`, with `retained` completed checkpoints already on
    /// storage (oldest first), started at `now_ms`.
    pub fn new(
        cfg: CoordinatorConfig,
        tasks: impl IntoIterator<Item = TaskId>,
        sources: impl IntoIterator<Item = TaskId>,
        first_id: CheckpointId,
        retained: Vec<CheckpointId>,
        now_ms: u64,
    ) -> Self {
        assert!(first_id > 0, "checkpoint ids start at 1");
        Self {
            cfg,
            tasks: tasks.into_iter().collect(),
            sources: sources.into_iter().collect(),
            finished_sources: BTreeSet::new(),
            next_id: first_id,
            pending: BTreeMap::new(),
            committing: None,
            retained: retained.into(),
            started_ms: now_ms,
            last_trigger_ms: None,
            last_completion_ms: None,
            consecutive_failures: 0,
            final_id: None,
            failed: false,
            requested: 0,
        }
    }

    /// The checkpoint ids pending now.
    pub fn pending(&self) -> Vec<CheckpointId> {
        self.pending.keys().copied().collect()
    }

    /// The completed checkpoints retained on storage, oldest first.
    pub fn retained(&self) -> Vec<CheckpointId> {
        self.retained.iter().copied().collect()
    }

    /// The tasks that acknowledge every checkpoint.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Consecutive failures so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Advance time: expire timed-out checkpoints and trigger the next one when due.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action<A>> {
        let mut out = Vec::new();
        if self.failed {
            return out;
        }
        // A fully acked checkpoint (committing, or waiting for older ones) waits on no task, so
        // it does not expire: it completes once the older ones are resolved.
        let expired: Vec<CheckpointId> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.awaiting.is_empty() && now_ms.saturating_sub(p.triggered_ms) >= self.cfg.timeout_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.abort(id, FailureReason::Timeout, &mut out);
        }
        out.extend(self.commit_next());
        if self.failed || self.committing.is_some() {
            return out;
        }
        if self.final_id.is_none() && !self.sources.is_empty() && self.finished_sources == self.sources {
            if self.pending.is_empty() {
                out.push(self.trigger(now_ms, true));
            }
            return out;
        }
        if self.final_id.is_some() {
            return out;
        }
        if self.pending.len() >= self.cfg.max_concurrent.max(1) {
            return out;
        }
        if self.requested > 0 {
            self.requested -= 1;
            let mut t = self.trigger(now_ms, false);
            if let Action::Trigger { requested, .. } = &mut t {
                *requested = true;
            }
            out.push(t);
            return out;
        }
        let Some(interval) = self.cfg.interval_ms else { return out };
        let due = self.last_trigger_ms.unwrap_or(self.started_ms) + interval;
        let paused = self.last_completion_ms.is_none_or(|c| now_ms >= c + self.cfg.min_pause_ms);
        if now_ms >= due && paused {
            out.push(self.trigger(now_ms, false));
        }
        out
    }

    /// Ask for a checkpoint outside the periodic schedule (a savepoint, or a checkpoint asked
    /// for through the REST API): it is the next one triggered, as soon as fewer than
    /// `max_concurrent` are pending, whatever the interval and the minimum pause. Its trigger
    /// says `requested`. None is triggered once the job fails or finishes
    /// ([`CheckpointCoordinator::is_finishing`]).
    pub fn request(&mut self) {
        self.requested += 1;
    }

    /// Whether the job's final checkpoint was triggered (or the job failed): no checkpoint
    /// asked for is triggered any more.
    pub fn is_finishing(&self) -> bool {
        self.failed || self.final_id.is_some()
    }

    fn trigger(&mut self, now_ms: u64, is_final: bool) -> Action<A> {
        let id = self.next_id;
        self.next_id += 1;
        self.last_trigger_ms = Some(now_ms);
        if is_final {
            self.final_id = Some(id);
        }
        self.pending.insert(
            id,
            Pending { triggered_ms: now_ms, awaiting: self.tasks.clone(), acks: Vec::new(), is_final },
        );
        Action::Trigger { id, at_ms: now_ms, is_final, requested: false }
    }

    /// A source task has read all of its input; when all have, the final checkpoint is triggered.
    pub fn source_finished(&mut self, task: TaskId, now_ms: u64) -> Vec<Action<A>> {
        if self.sources.contains(&task) {
            self.finished_sources.insert(task);
        }
        self.tick(now_ms)
    }

    /// Task `task` acknowledged checkpoint `id` with its snapshot `ack`.
    pub fn ack(&mut self, id: CheckpointId, task: TaskId, ack: A, _now_ms: u64) -> Vec<Action<A>> {
        let mut out = Vec::new();
        let Some(p) = self.pending.get_mut(&id) else { return out }; // late ack of an aborted one
        if !p.awaiting.remove(&task) {
            return out; // duplicate or unknown task
        }
        p.acks.push((task, ack));
        out.extend(self.commit_next());
        out
    }

    /// Start committing the oldest pending checkpoint if every task has acked it and no commit is
    /// under way. Completion follows id order, so a newer acked checkpoint waits here until
    /// every older one has completed or been aborted.
    fn commit_next(&mut self) -> Option<Action<A>> {
        if self.failed || self.committing.is_some() {
            return None;
        }
        let (&id, p) = self.pending.iter_mut().next()?;
        if !p.awaiting.is_empty() {
            return None;
        }
        let mut acks = std::mem::take(&mut p.acks);
        acks.sort_by_key(|(t, _)| *t);
        self.committing = Some(id);
        Some(Action::Complete { id, triggered_ms: p.triggered_ms, acks, is_final: p.is_final })
    }

    /// Task `task` declined checkpoint `id`: abort it.
    pub fn decline(&mut self, id: CheckpointId, task: TaskId, message: String, now_ms: u64) -> Vec<Action<A>> {
        let mut out = Vec::new();
        let declinable = self.committing != Some(id)
            && self.pending.get(&id).is_some_and(|p| p.awaiting.contains(&task));
        if declinable {
            self.abort(id, FailureReason::Declined(task, message), &mut out);
        }
        out.extend(self.tick(now_ms));
        out
    }

    /// The runtime durably wrote `_metadata` of checkpoint `id`.
    pub fn committed(&mut self, id: CheckpointId, now_ms: u64) -> Vec<Action<A>> {
        let mut out = Vec::new();
        if self.committing != Some(id) {
            return out;
        }
        self.committing = None;
        let p = self.pending.remove(&id).expect("committing checkpoint is pending");
        debug_assert!(self.pending.range(..id).next().is_none(), "only the oldest pending one commits");
        self.consecutive_failures = 0;
        self.last_completion_ms = Some(now_ms);
        self.retained.push_back(id);
        while self.retained.len() > self.cfg.num_retained.max(1) {
            let old = self.retained.pop_front().expect("non-empty");
            out.push(Action::Discard { id: old });
        }
        out.push(Action::Notify { id });
        if p.is_final {
            out.push(Action::Finished);
            return out;
        }
        out.extend(self.tick(now_ms));
        out
    }

    /// Writing `_metadata` of checkpoint `id` failed.
    pub fn commit_failed(&mut self, id: CheckpointId, message: String, now_ms: u64) -> Vec<Action<A>> {
        let mut out = Vec::new();
        if self.committing != Some(id) {
            return out;
        }
        self.committing = None;
        self.abort(id, FailureReason::CommitFailed(message), &mut out);
        out.extend(self.tick(now_ms));
        out
    }

    /// Abort pending checkpoint `id` as a failure, and fail the job when it was the final
    /// checkpoint or one failure too many.
    fn abort(&mut self, id: CheckpointId, reason: FailureReason, out: &mut Vec<Action<A>>) {
        let Some(p) = self.pending.remove(&id) else { return };
        out.push(Action::Abort { id, reason: reason.clone() });
        if self.failed {
            return; // already failing: one FailJob is enough
        }
        self.consecutive_failures += 1;
        let reason = if p.is_final {
            // Its sources have stopped and will inject no other barrier: no retry can succeed.
            FailureReason::FinalCheckpoint { id, cause: Box::new(reason) }
        } else if self.consecutive_failures > self.cfg.tolerable_failed {
            reason
        } else {
            return;
        };
        self.failed = true;
        out.push(Action::FailJob { reason });
        // The failing job's tasks will ack nothing more. The checkpoint being committed is left
        // to `committed` / `commit_failed`, since the runtime may be writing its `_metadata`.
        let orphans: Vec<CheckpointId> =
            self.pending.keys().copied().filter(|&o| Some(o) != self.committing).collect();
        for o in orphans {
            self.pending.remove(&o);
            out.push(Action::Abort { id: o, reason: FailureReason::JobFailed });
        }
    }

    /// The job is cancelled: the checkpoints to delete under `retain_on_cancel = false`.
    pub fn on_cancel(&mut self, retain_on_cancel: bool) -> Vec<Action<A>> {
        self.failed = true;
        let mut out: Vec<Action<A>> =
            self.pending.keys().map(|&id| Action::Abort { id, reason: FailureReason::Timeout }).collect();
        self.pending.clear();
        if !retain_on_cancel {
            out.extend(self.retained.drain(..).map(|id| Action::Discard { id }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tasks(n: u32) -> Vec<TaskId> {
        (0..n).map(|s| TaskId::new(0, s)).collect()
    }

    fn coord(cfg: CoordinatorConfig, n: u32) -> CheckpointCoordinator<u32> {
        CheckpointCoordinator::new(cfg, tasks(n), vec![TaskId::new(0, 0)], 1, vec![], 0)
    }

    fn cfg(interval: u64) -> CoordinatorConfig {
        CoordinatorConfig { interval_ms: Some(interval), ..CoordinatorConfig::default() }
    }

    fn ids(actions: &[Action<u32>]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Trigger { id, is_final, .. } => format!("trigger{id}{}", if *is_final { "F" } else { "" }),
                Action::Complete { id, .. } => format!("complete{id}"),
                Action::Abort { id, .. } => format!("abort{id}"),
                Action::Notify { id } => format!("notify{id}"),
                Action::Discard { id } => format!("discard{id}"),
                Action::FailJob { .. } => "fail".into(),
                Action::Finished => "finished".into(),
            })
            .collect()
    }

    #[test]
    fn periodic_trigger_complete_and_retention() {
        let mut c = coord(cfg(100), 2);
        assert!(c.tick(50).is_empty());
        assert_eq!(ids(&c.tick(100)), ["trigger1"]);
        assert!(c.tick(150).is_empty(), "max concurrent 1");
        assert!(c.ack(1, TaskId::new(0, 0), 7, 160).is_empty());
        let a = c.ack(1, TaskId::new(0, 1), 8, 170);
        match &a[0] {
            Action::Complete { id: 1, acks, .. } => assert_eq!(acks.iter().map(|x| x.1).collect::<Vec<_>>(), [7, 8]),
            other => panic!("{other:?}"),
        }
        assert_eq!(ids(&c.committed(1, 180)), ["notify1"]);
        assert_eq!(ids(&c.tick(200)), ["trigger2"]);
        c.ack(2, TaskId::new(0, 0), 0, 210);
        c.ack(2, TaskId::new(0, 1), 0, 210);
        assert_eq!(ids(&c.committed(2, 220)), ["discard1", "notify2"]);
        assert_eq!(c.retained(), [2]);
    }

    fn requested(actions: &[Action<u32>]) -> Vec<bool> {
        actions.iter().filter_map(|a| if let Action::Trigger { requested, .. } = a { Some(*requested) } else { None }).collect()
    }

    #[test]
    fn a_requested_checkpoint_is_the_next_one_whatever_the_schedule() {
        // No periodic checkpoints: only asked-for ones.
        let mut c = coord(CoordinatorConfig { min_pause_ms: 1000, ..CoordinatorConfig::default() }, 1);
        assert!(c.tick(10).is_empty());
        c.request();
        c.request();
        let a = c.tick(20);
        assert_eq!((ids(&a), requested(&a)), (vec!["trigger1".to_string()], vec![true]));
        assert!(c.tick(30).is_empty(), "max concurrent 1: one pending");
        c.ack(1, TaskId::new(0, 0), 0, 40);
        let a = c.committed(1, 50);
        assert_eq!(ids(&a), ["notify1", "trigger2"], "the second request, despite the minimum pause");
        assert_eq!(requested(&a), [true]);
        c.ack(2, TaskId::new(0, 0), 0, 60);
        assert_eq!(ids(&c.committed(2, 70)), ["discard1", "notify2"]);
        assert!(c.tick(80).is_empty(), "asked-for checkpoints do not start a schedule");

        // With an interval shorter than a checkpoint, a request still goes first.
        let mut c = coord(cfg(10), 1);
        assert_eq!(ids(&c.tick(10)), ["trigger1"]);
        c.request();
        c.ack(1, TaskId::new(0, 0), 0, 100);
        let a = c.committed(1, 100);
        assert_eq!((ids(&a), requested(&a)), (vec!["notify1".to_string(), "trigger2".to_string()], vec![true]));

        // The source finished: the final checkpoint is next, and no request is triggered after it.
        let mut c = coord(CoordinatorConfig::default(), 1);
        assert_eq!(ids(&c.source_finished(TaskId::new(0, 0), 100)), ["trigger1F"]);
        c.request();
        assert!(c.tick(110).is_empty());
        assert!(c.is_finishing());
    }

    #[test]
    fn min_pause_delays_next_trigger() {
        let mut c = coord(CoordinatorConfig { min_pause_ms: 500, ..cfg(100) }, 1);
        assert_eq!(ids(&c.tick(100)), ["trigger1"]);
        c.ack(1, TaskId::new(0, 0), 0, 300);
        c.committed(1, 300);
        assert!(c.tick(799).is_empty());
        assert_eq!(ids(&c.tick(800)), ["trigger2"]);
    }

    #[test]
    fn timeout_aborts_and_fails_job_beyond_tolerance() {
        let mut c = coord(CoordinatorConfig { timeout_ms: 50, tolerable_failed: 1, ..cfg(100) }, 1);
        assert_eq!(ids(&c.tick(100)), ["trigger1"]);
        assert_eq!(ids(&c.tick(150)), ["abort1"]);
        assert_eq!(ids(&c.tick(200)), ["trigger2"]);
        let a = c.tick(250);
        assert_eq!(ids(&a), ["abort2", "fail"]);
        assert!(c.tick(1000).is_empty(), "a failed job triggers nothing");
    }

    #[test]
    fn success_resets_failure_count() {
        let mut c = coord(CoordinatorConfig { timeout_ms: 50, tolerable_failed: 1, ..cfg(100) }, 1);
        c.tick(100);
        assert_eq!(ids(&c.tick(150)), ["abort1"]);
        c.tick(200);
        c.ack(2, TaskId::new(0, 0), 0, 210);
        c.committed(2, 210);
        assert_eq!(c.consecutive_failures(), 0);
        c.tick(300);
        assert_eq!(ids(&c.tick(350)), ["abort3"], "one failure is tolerated again");
    }

    #[test]
    fn decline_aborts() {
        let mut c = coord(cfg(100), 2);
        c.tick(100);
        let a = c.decline(1, TaskId::new(0, 1), "disk full".into(), 120);
        assert_eq!(ids(&a), ["abort1", "fail"]);
        match &a[0] {
            Action::Abort { reason: FailureReason::Declined(t, m), .. } => {
                assert_eq!((*t, m.as_str()), (TaskId::new(0, 1), "disk full"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn late_and_duplicate_acks_are_ignored() {
        let mut c = coord(CoordinatorConfig { timeout_ms: 50, tolerable_failed: 5, ..cfg(100) }, 1);
        c.tick(100);
        c.tick(160);
        assert!(c.ack(1, TaskId::new(0, 0), 0, 170).is_empty());
        c.tick(260);
        assert_eq!(ids(&c.ack(2, TaskId::new(0, 0), 0, 270)), ["complete2"]);
        assert!(c.ack(2, TaskId::new(0, 0), 0, 270).is_empty());
    }

    #[test]
    fn final_checkpoint_after_all_sources_finish() {
        let mut c: CheckpointCoordinator<u32> = CheckpointCoordinator::new(
            CoordinatorConfig::default(),
            tasks(2),
            tasks(2),
            5,
            vec![4],
            0,
        );
        assert!(c.source_finished(TaskId::new(0, 0), 10).is_empty());
        assert_eq!(ids(&c.source_finished(TaskId::new(0, 1), 20)), ["trigger5F"]);
        c.ack(5, TaskId::new(0, 0), 0, 30);
        c.ack(5, TaskId::new(0, 1), 0, 30);
        assert_eq!(ids(&c.committed(5, 40)), ["discard4", "notify5", "finished"]);
    }

    #[test]
    fn concurrent_checkpoints_complete_in_order() {
        let mut c = coord(CoordinatorConfig { max_concurrent: 2, ..cfg(100) }, 1);
        c.tick(100);
        c.tick(200);
        assert_eq!(c.pending(), [1, 2]);
        assert!(c.ack(2, TaskId::new(0, 0), 0, 210).is_empty(), "2 waits for 1");
        assert_eq!(ids(&c.ack(1, TaskId::new(0, 0), 0, 220)), ["complete1"]);
        assert_eq!(ids(&c.committed(1, 230)), ["notify1", "complete2"]);
    }

    /// Two concurrent checkpoints, 1 and 2, with 2 fully acked while 1 is still pending.
    fn acked_behind_pending(timeout_ms: u64) -> CheckpointCoordinator<u32> {
        let cfg = CoordinatorConfig { max_concurrent: 2, timeout_ms, tolerable_failed: 10, ..cfg(100) };
        let mut c = coord(cfg, 2);
        assert_eq!(ids(&c.tick(100)), ["trigger1"]);
        assert_eq!(ids(&c.tick(200)), ["trigger2"]);
        c.ack(1, TaskId::new(0, 0), 0, 205);
        c.ack(2, TaskId::new(0, 0), 0, 210);
        assert!(c.ack(2, TaskId::new(0, 1), 0, 210).is_empty(), "2 waits for 1");
        c
    }

    #[test]
    fn acked_checkpoint_completes_when_older_one_expires() {
        let mut c = acked_behind_pending(250);
        assert_eq!(ids(&c.tick(350)), ["abort1", "complete2"]);
        assert_eq!(ids(&c.committed(2, 360)), ["notify2", "trigger3"]);
        // Expiring in the same tick as the older one: fully acked, it is no longer waiting on tasks.
        let mut c = acked_behind_pending(150);
        assert_eq!(ids(&c.tick(400)), ["abort1", "complete2"]);
    }

    #[test]
    fn acked_checkpoint_completes_when_older_one_is_declined() {
        let mut c = acked_behind_pending(10_000);
        assert_eq!(ids(&c.decline(1, TaskId::new(0, 1), "disk full".into(), 220)), ["abort1", "complete2"]);
        assert_eq!(ids(&c.committed(2, 230)), ["notify2"]);
    }

    #[test]
    fn acked_checkpoint_completes_when_older_commit_fails() {
        let mut c = acked_behind_pending(10_000);
        assert_eq!(ids(&c.ack(1, TaskId::new(0, 1), 0, 220)), ["complete1"]);
        assert_eq!(ids(&c.commit_failed(1, "store down".into(), 230)), ["abort1", "complete2"]);
        assert_eq!(ids(&c.committed(2, 240)), ["notify2"]);
        assert_eq!(c.consecutive_failures(), 0);
    }

    #[test]
    fn no_completion_once_the_job_fails() {
        let mut c = acked_behind_pending(250);
        c.cfg.tolerable_failed = 0;
        assert_eq!(ids(&c.tick(350)), ["abort1", "fail", "abort2"]);
        assert!(c.pending().is_empty());
        assert!(c.tick(10_000).is_empty());
    }

    /// A bounded job with two tasks (both sources) whose final checkpoint 5 is pending.
    fn final_pending() -> CheckpointCoordinator<u32> {
        let cfg = CoordinatorConfig { timeout_ms: 100, tolerable_failed: 10, ..CoordinatorConfig::default() };
        let mut c = CheckpointCoordinator::new(cfg, tasks(2), tasks(2), 5, vec![4], 0);
        c.source_finished(TaskId::new(0, 0), 10);
        assert_eq!(ids(&c.source_finished(TaskId::new(0, 1), 20)), ["trigger5F"]);
        c
    }

    fn assert_final_failure(actions: &[Action<u32>], cause: FailureReason) {
        assert_eq!(ids(actions), ["abort5", "fail"]);
        assert_eq!(actions[0], Action::Abort { id: 5, reason: cause.clone() });
        let expected = FailureReason::FinalCheckpoint { id: 5, cause: Box::new(cause) };
        assert_eq!(actions[1], Action::FailJob { reason: expected.clone() });
        assert!(expected.to_string().contains("final checkpoint 5"), "{expected}");
    }

    #[test]
    fn declined_final_checkpoint_fails_the_job() {
        let mut c = final_pending();
        let a = c.decline(5, TaskId::new(0, 1), "disk full".into(), 30);
        assert_final_failure(&a, FailureReason::Declined(TaskId::new(0, 1), "disk full".into()));
        assert!(c.pending().is_empty());
        assert!(c.tick(10_000).is_empty(), "never retried");
    }

    #[test]
    fn expired_final_checkpoint_fails_the_job() {
        let mut c = final_pending();
        c.ack(5, TaskId::new(0, 0), 0, 30);
        assert!(c.tick(119).is_empty());
        assert_final_failure(&c.tick(120), FailureReason::Timeout);
        assert!(c.tick(10_000).is_empty(), "never retried");
        assert!(c.ack(5, TaskId::new(0, 1), 0, 10_000).is_empty());
    }

    #[test]
    fn final_checkpoint_whose_commit_fails_fails_the_job() {
        let mut c = final_pending();
        c.ack(5, TaskId::new(0, 0), 0, 30);
        assert_eq!(ids(&c.ack(5, TaskId::new(0, 1), 0, 30)), ["complete5"]);
        let a = c.commit_failed(5, "store down".into(), 40);
        assert_final_failure(&a, FailureReason::CommitFailed("store down".into()));
        assert!(c.tick(10_000).is_empty(), "never retried");
    }

    #[test]
    fn cancel_discards_unless_retained() {
        let mut c = coord(cfg(100), 1);
        c.tick(100);
        c.ack(1, TaskId::new(0, 0), 0, 110);
        c.committed(1, 110);
        assert!(c.on_cancel(true).is_empty());
        let mut c = coord(cfg(100), 1);
        c.tick(100);
        c.ack(1, TaskId::new(0, 0), 0, 110);
        c.committed(1, 110);
        assert_eq!(ids(&c.on_cancel(false)), ["discard1"]);
    }

    /// What a property test saw of one coordinator, checked action by action.
    #[derive(Default)]
    struct Observed {
        /// Triggered ids, with whether each is final.
        triggered: BTreeMap<CheckpointId, bool>,
        /// Tasks that acked each id.
        acked: BTreeMap<CheckpointId, BTreeSet<TaskId>>,
        /// The checkpoint whose `Complete` awaits `committed` / `commit_failed`.
        completing: Option<CheckpointId>,
        last_complete: Option<CheckpointId>,
        notified: BTreeSet<CheckpointId>,
        aborted: BTreeSet<CheckpointId>,
        failed: bool,
        finished: bool,
    }

    impl Observed {
        /// Check one call's actions against the protocol's safety rules.
        fn check(&mut self, actions: &[Action<u32>], tasks: usize) -> Result<(), TestCaseError> {
            for a in actions {
                match a {
                    Action::Trigger { id, is_final, .. } => {
                        prop_assert!(!self.failed && !self.finished, "trigger {} after the end", id);
                        prop_assert!(self.triggered.keys().next_back().is_none_or(|last| id > last));
                        self.triggered.insert(*id, *is_final);
                    }
                    Action::Complete { id, acks, is_final, .. } => {
                        prop_assert!(!self.failed, "complete {} after FailJob", id);
                        prop_assert_eq!(self.completing, None, "one commit at a time");
                        prop_assert!(self.last_complete.is_none_or(|l| *id > l), "complete {} out of order", id);
                        prop_assert!(!self.aborted.contains(id), "complete {} after its abort", id);
                        prop_assert_eq!(acks.len(), tasks);
                        prop_assert_eq!(Some(is_final), self.triggered.get(id));
                        self.completing = Some(*id);
                        self.last_complete = Some(*id);
                    }
                    Action::Abort { id, reason } => {
                        prop_assert!(self.triggered.contains_key(id), "abort of untriggered {}", id);
                        prop_assert!(!self.notified.contains(id), "{} both completed and aborted", id);
                        prop_assert!(self.aborted.insert(*id), "{} aborted twice", id);
                        let fully_acked = self.acked.get(id).is_some_and(|a| a.len() == tasks);
                        prop_assert!(!(fully_acked && *reason == FailureReason::Timeout), "fully acked {} expired", id);
                        if self.completing == Some(*id) {
                            prop_assert!(matches!(reason, FailureReason::CommitFailed(_)));
                            self.completing = None;
                        }
                        if self.triggered[id] {
                            // A failed final checkpoint fails the job in the same call, naming it.
                            let expected = FailureReason::FinalCheckpoint { id: *id, cause: Box::new(reason.clone()) };
                            prop_assert!(
                                actions.contains(&Action::FailJob { reason: expected }),
                                "final {} aborted without FailJob: {:?}", id, actions
                            );
                        }
                    }
                    Action::Notify { id } => {
                        prop_assert_eq!(self.completing, Some(*id), "notify of a checkpoint not committing");
                        prop_assert!(!self.aborted.contains(id), "{} both completed and aborted", id);
                        prop_assert!(self.notified.iter().next_back().is_none_or(|l| id > l));
                        self.notified.insert(*id);
                        self.completing = None;
                    }
                    Action::Discard { id } => prop_assert!(self.notified.contains(id)),
                    Action::FailJob { .. } => {
                        prop_assert!(!self.failed, "FailJob twice");
                        self.failed = true;
                    }
                    Action::Finished => {
                        let last = self.notified.iter().next_back();
                        prop_assert!(last.is_some_and(|l| self.triggered[l]), "finished before the final checkpoint");
                        self.finished = true;
                    }
                }
            }
            Ok(())
        }

        /// Check the coordinator's state after a call: completion is never held up, so unless a
        /// commit is under way the oldest pending checkpoint still awaits a task.
        fn check_state(&self, c: &CheckpointCoordinator<u32>, tasks: usize) -> Result<(), TestCaseError> {
            let pending = c.pending();
            if self.failed {
                prop_assert!(pending.iter().all(|id| Some(*id) == self.completing), "pending after FailJob: {:?}", pending);
            }
            if let Some(id) = self.completing {
                prop_assert_eq!(pending.first(), Some(&id), "the committing checkpoint is the oldest");
            } else if let Some(oldest) = pending.first() {
                let acked = self.acked.get(oldest).map_or(0, |a| a.len());
                prop_assert!(self.failed || acked < tasks, "{} fully acked but not completing", oldest);
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Under any interleaving of time, acks, declines, commits, failed commits and the end of
        /// input: completions come in id order, nothing is both completed and aborted, a failed
        /// final checkpoint fails the job, and once time passes the timeout with no other event,
        /// every checkpoint triggered so far has completed or been aborted.
        #[test]
        fn liveness(events in proptest::collection::vec((0u8..11, prop_oneof![9 => 0u64..30, 1 => 100u64..400],
                                                         0usize..6, 0u32..3), 1..200),
                    max_concurrent in 1usize..4, timeout_ms in prop::sample::select(vec![80u64, 300]),
                    tolerable_failed in prop::sample::select(vec![0u32, 1, 3, 1000]), min_pause_ms in 0u64..20) {
            const TASKS: u32 = 3;
            let cfg = CoordinatorConfig { interval_ms: Some(50), timeout_ms, min_pause_ms, max_concurrent,
                tolerable_failed, num_retained: 2 };
            let mut c = coord(cfg, TASKS);
            let mut seen = Observed::default();
            let mut now = 0;
            for (kind, dt, pick, task) in events {
                now += dt;
                let task = TaskId::new(0, task);
                let pending = c.pending();
                let triggered: Vec<CheckpointId> = seen.triggered.keys().copied().collect();
                // Mostly the newest pending checkpoint, so that newer ones are often fully acked
                // behind older ones; sometimes any, for late and stray messages.
                let target = match pick {
                    0 => pending.first().copied(),
                    1..=3 => pending.last().copied(),
                    _ => triggered.get(pick % triggered.len().max(1)).copied(),
                };
                let actions = match (kind, target) {
                    (0..=2, _) => c.tick(now),
                    (3..=6, Some(id)) => {
                        if pending.contains(&id) {
                            seen.acked.entry(id).or_default().insert(task);
                        }
                        c.ack(id, task, 0, now)
                    }
                    (7, _) => seen.completing.map_or_else(Vec::new, |id| c.committed(id, now)),
                    (8, Some(id)) => c.decline(id, task, "x".into(), now),
                    (9, _) => seen.completing.map_or_else(Vec::new, |id| c.commit_failed(id, "x".into(), now)),
                    (10, _) => c.source_finished(TaskId::new(0, 0), now),
                    _ => vec![],
                };
                seen.check(&actions, TASKS as usize)?;
                seen.check_state(&c, TASKS as usize)?;
            }
            // No more events: the runtime answers commits, and time passes the timeout.
            let before = seen.triggered.keys().next_back().copied().unwrap_or(0);
            let mut actions = c.tick(now + timeout_ms);
            loop {
                seen.check(&actions, TASKS as usize)?;
                seen.check_state(&c, TASKS as usize)?;
                let Some(id) = seen.completing else { break };
                actions = c.committed(id, now + timeout_ms);
            }
            for (id, _) in seen.triggered.range(..=before) {
                prop_assert!(seen.notified.contains(id) || seen.aborted.contains(id), "{} still unresolved", id);
            }
            prop_assert!(c.pending().iter().all(|&id| id > before), "still pending: {:?}", c.pending());
        }
    }

    proptest! {
        /// Whatever happens, ids are triggered in increasing order, at most `max_concurrent` are
        /// pending, never fewer than interval apart, and retention never exceeds `num_retained`.
        #[test]
        fn invariants_hold(events in proptest::collection::vec((0u8..4, 0u64..80, 0u32..3), 1..200),
                           max_concurrent in 1usize..3, retained in 1usize..4) {
            let cfg = CoordinatorConfig { interval_ms: Some(50), timeout_ms: 200, min_pause_ms: 10,
                max_concurrent, tolerable_failed: 1000, num_retained: retained };
            let mut c = coord(cfg, 3);
            let mut now = 0;
            let mut last_trigger: Option<(u64, u64)> = None;
            let mut committing = None;
            for (kind, dt, task) in events {
                now += dt;
                let actions = match kind {
                    0 => c.tick(now),
                    1 => match c.pending().first() { Some(&id) => c.ack(id, TaskId::new(0, task), 0, now), None => vec![] },
                    2 => match committing.take() { Some(id) => c.committed(id, now), None => vec![] },
                    _ => match c.pending().last() { Some(&id) => c.decline(id, TaskId::new(0, task), "x".into(), now), None => vec![] },
                };
                for a in &actions {
                    match a {
                        Action::Trigger { id, at_ms, .. } => {
                            if let Some((lid, lat)) = last_trigger { prop_assert!(*id > lid); prop_assert!(*at_ms >= lat + 50); }
                            last_trigger = Some((*id, *at_ms));
                        }
                        Action::Complete { id, acks, .. } => { prop_assert_eq!(acks.len(), 3); committing = Some(*id); }
                        _ => {}
                    }
                }
                prop_assert!(c.pending().len() <= max_concurrent);
                prop_assert!(c.retained().len() <= retained);
            }
        }
    }
}

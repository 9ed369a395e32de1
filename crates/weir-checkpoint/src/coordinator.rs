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
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureReason::Timeout => write!(f, "checkpoint expired before completing"),
            FailureReason::Declined(t, m) => write!(f, "declined by {t}: {m}"),
            FailureReason::CommitFailed(m) => write!(f, "writing _metadata failed: {m}"),
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
    /// Too many consecutive checkpoint failures: fail the job (and restart it per strategy).
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
        let expired: Vec<CheckpointId> = self
            .pending
            .iter()
            .filter(|(id, p)| {
                Some(**id) != self.committing && now_ms.saturating_sub(p.triggered_ms) >= self.cfg.timeout_ms
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let p = self.pending.remove(&id).expect("pending");
            if p.is_final {
                // The final checkpoint cannot be skipped: retry it with a new id.
                self.final_id = None;
            }
            self.fail(id, FailureReason::Timeout, &mut out);
        }
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
        let Some(interval) = self.cfg.interval_ms else { return out };
        if self.pending.len() >= self.cfg.max_concurrent.max(1) {
            return out;
        }
        let due = self.last_trigger_ms.unwrap_or(self.started_ms) + interval;
        let paused = self.last_completion_ms.is_none_or(|c| now_ms >= c + self.cfg.min_pause_ms);
        if now_ms >= due && paused {
            out.push(self.trigger(now_ms, false));
        }
        out
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
        Action::Trigger { id, at_ms: now_ms, is_final }
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
        if p.awaiting.is_empty() && self.committing.is_none() && self.first_pending() == Some(id) {
            out.extend(self.start_commit(id));
        }
        out
    }

    fn first_pending(&self) -> Option<CheckpointId> {
        self.pending.keys().next().copied()
    }

    fn start_commit(&mut self, id: CheckpointId) -> Option<Action<A>> {
        let p = self.pending.get_mut(&id)?;
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
        if let Some(p) = declinable.then(|| self.pending.remove(&id)).flatten() {
            if p.is_final {
                self.final_id = None;
            }
            self.fail(id, FailureReason::Declined(task, message), &mut out);
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
        // Older pending checkpoints are subsumed by this one.
        let older: Vec<CheckpointId> = self.pending.range(..id).map(|(k, _)| *k).collect();
        for o in older {
            self.pending.remove(&o);
            out.push(Action::Abort { id: o, reason: FailureReason::Timeout });
        }
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
        if let Some(next) = self.first_pending() {
            if self.pending[&next].awaiting.is_empty() {
                out.extend(self.start_commit(next));
            }
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
        if let Some(p) = self.pending.remove(&id) {
            if p.is_final {
                self.final_id = None;
            }
        }
        self.fail(id, FailureReason::CommitFailed(message), &mut out);
        out.extend(self.tick(now_ms));
        out
    }

    fn fail(&mut self, id: CheckpointId, reason: FailureReason, out: &mut Vec<Action<A>>) {
        self.consecutive_failures += 1;
        out.push(Action::Abort { id, reason: reason.clone() });
        if self.consecutive_failures > self.cfg.tolerable_failed {
            self.failed = true;
            out.push(Action::FailJob { reason });
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

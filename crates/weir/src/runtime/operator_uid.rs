//! Operator uids (Flink's `uid()`): the stable id a restore matches an operator's state by, so
//! that a job edited between runs (a step inserted, operators reordered) gets its state back,
//! and state that no operator claims fails the restore instead of vanishing silently.

use std::collections::BTreeMap;

use weir_checkpoint::{CheckpointMetadata, SubtaskSnapshot, TaskId};

use super::JobCtx;

/// The uid of an operator registered without one: its position and name. YAML jobs never use
/// it: they derive every uid from the step's place (see `job`).
pub(crate) fn default_uid(id: u32, name: &str) -> String {
    format!("operator[{id}]:{name}")
}

/// Whether the restored subtask `s` of task `t` is the state of operator `op` with `uid`: by
/// uid, or by position where the checkpoint was written before uids existed.
pub(crate) fn claims(op: u32, uid: &str, t: &TaskId, s: &SubtaskSnapshot) -> bool {
    if s.uid.is_empty() {
        t.operator == op
    } else {
        s.uid == uid
    }
}

/// The state in `meta` that no operator claims (`uids`: the job's operators' uids, by id),
/// as uid → operator name. Only subtasks holding state count (state files or source
/// positions): a sink's part or a stateless one has nothing to lose.
pub(crate) fn unclaimed(meta: &CheckpointMetadata, uids: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (t, s) in &meta.subtasks {
        if s.state_files.is_empty() && s.splits.is_empty() {
            continue;
        }
        if !uids.iter().enumerate().any(|(op, uid)| claims(op as u32, uid, t, s)) {
            let id = if s.uid.is_empty() { format!("operator[{}] (a checkpoint without uids)", t.operator) } else { s.uid.clone() };
            out.entry(id).or_insert_with(|| s.operator_name.clone());
        }
    }
    out
}

impl JobCtx {
    /// Record operator `id`'s uid (`None`: [`default_uid`]). A uid already taken fails the job
    /// at start, naming both operators: no restart can make it unique.
    pub(super) fn claim_uid(&self, id: u32, uid: Option<String>, name: &str) {
        let uid = uid.unwrap_or_else(|| default_uid(id, name));
        let taken = self.uids.borrow().iter().position(|(u, _)| *u == uid);
        if let Some(other) = taken {
            let other_name = self.uids.borrow()[other].1.clone();
            self.fail_deterministic(format!(
                "operator[{id}] '{name}': uid '{uid}' is also the uid of operator[{other}] '{other_name}'; uids must be unique in a job"
            ));
        }
        self.uids.borrow_mut().push((uid, name.to_string()));
    }

    /// The uid of registered operator `op`.
    pub(crate) fn uid_of(&self, op: u32) -> String {
        self.uids.borrow()[op as usize].0.clone()
    }

    /// Once the job is built: state in the restored checkpoint that no operator claims by its
    /// uid fails the restore (deterministically: every attempt would drop it the same way),
    /// unless `execution.state-recovery.ignore-unclaimed-state` (`--allow-non-restored-state`)
    /// says to drop it, as Flink's `--allowNonRestoredState` does.
    pub(super) fn check_restored_state(&self) {
        let Some(meta) = &self.restored else { return };
        let uids: Vec<String> = self.uids.borrow().iter().map(|(u, _)| u.clone()).collect();
        let unclaimed = unclaimed(meta, &uids);
        if unclaimed.is_empty() {
            return;
        }
        let list = unclaimed.iter().map(|(uid, name)| format!("'{uid}' (operator '{name}')")).collect::<Vec<_>>().join(", ");
        if self.config.allow_non_restored_state {
            // Every worker finds the same; one line is enough.
            if self.index == 0 {
                tracing::warn!(
                    "checkpoint {}: dropping the state of uid(s) {list}: no operator of this job has that uid (--allow-non-restored-state)",
                    meta.id
                );
            }
        } else {
            self.fail_deterministic(format!(
                "checkpoint {} holds state of uid(s) {list} that no operator of this job has (state is restored by uid: \
                 give the operator its old uid, or restore with --allow-non-restored-state, \
                 execution.state-recovery.ignore-unclaimed-state: true, to drop that state)",
                meta.id
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_checkpoint::{SplitOffset, StateFileHandle, SubtaskStats, METADATA_VERSION};

    fn snapshot(name: &str, uid: &str, state: bool, splits: bool) -> SubtaskSnapshot {
        SubtaskSnapshot {
            operator_name: name.into(),
            uid: uid.into(),
            state_files: if state {
                vec![StateFileHandle { state: "s".into(), path: "chk-1/x".into(), size: 0, crc32c: 0, key_groups: vec![], kind: Default::default() }]
            } else {
                vec![]
            },
            // Through serde: the same with and without fields added to `SplitOffset` later.
            splits: if splits { vec![serde_json::from_str::<SplitOffset>(r#"{"split":0,"offset":5}"#).unwrap()] } else { vec![] },
            stats: SubtaskStats::default(),
        }
    }

    fn meta(subtasks: Vec<(TaskId, SubtaskSnapshot)>) -> CheckpointMetadata {
        CheckpointMetadata {
            version: METADATA_VERSION,
            job: "j".into(),
            id: 1,
            triggered_ms: 0,
            completed_ms: 0,
            parallelism: 1,
            max_parallelism: 128,
            is_final: false,
            subtasks,
        }
    }

    #[test]
    fn state_is_matched_by_uid_not_position() {
        let s = snapshot("aggregate-1", "totals", true, false);
        let t = TaskId::new(1, 0);
        assert!(claims(2, "totals", &t, &s), "moved to another position, same uid");
        assert!(!claims(1, "pipeline[1]:aggregate", &t, &s), "same position, other uid");
        let m = meta(vec![(TaskId::new(0, 0), snapshot("generator", "events", false, true)), (t, s)]);
        assert!(unclaimed(&m, &["events".into(), "filter".into(), "totals".into()]).is_empty());
        let missing = unclaimed(&m, &["events".into(), "pipeline[1]:aggregate".into()]);
        assert_eq!(missing.into_iter().collect::<Vec<_>>(), [("totals".to_string(), "aggregate-1".to_string())]);
    }

    #[test]
    fn only_state_counts_as_unclaimed() {
        // A sink's part holds neither state files nor splits: renaming it loses nothing.
        let m = meta(vec![(TaskId::new(2, 0), snapshot("file-sink", "sink:file", false, false))]);
        assert!(unclaimed(&m, &["sink:other".into()]).is_empty());
    }

    #[test]
    fn checkpoints_without_uids_match_by_position() {
        // `_metadata` written before uids existed: no `uid` field.
        let legacy = r#"{"operator_name":"aggregate-1","state_files":[],"splits":[{"split":3,"offset":9}],
            "stats":{"barrier_us":0,"sync_us":0,"async_us":0,"bytes":0,"state_entries":0}}"#;
        let s: SubtaskSnapshot = serde_json::from_str(legacy).unwrap();
        assert_eq!(s.uid, "");
        let t = TaskId::new(1, 0);
        assert!(claims(1, "anything", &t, &s));
        assert!(!claims(0, "anything", &t, &s));
        let m = meta(vec![(t, s)]);
        assert!(unclaimed(&m, &["a".into(), "b".into()]).is_empty());
        let missing = unclaimed(&m, &["a".into()]);
        assert_eq!(missing.keys().collect::<Vec<_>>(), ["operator[1] (a checkpoint without uids)"]);
    }

    #[test]
    fn default_uid_is_position_and_name() {
        assert_eq!(default_uid(2, "sum"), "operator[2]:sum");
    }
}

//! The metadata model of a completed checkpoint: what `chk-<n>/_metadata` holds.

use serde::{Deserialize, Serialize};

use crate::{CheckpointId, TaskId};

/// The version of the `_metadata` format this build writes. Version 2 added what each state
/// file holds ([`StateFileKind`]: deltas, RocksDB files), which a version-1 reader would take
/// for full files; this build reads 1 and 2.
pub const METADATA_VERSION: u32 = 2;

/// What Flink calls externalized checkpoint retention: what happens to checkpoints when the job
/// ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RetentionPolicy {
    /// Keep retained checkpoints when the job is cancelled (Flink's `RETAIN_ON_CANCELLATION`).
    #[default]
    RetainOnCancellation,
    /// Delete them on cancel (Flink's `DELETE_ON_CANCELLATION`).
    DeleteOnCancellation,
    /// Checkpoints are not externalized: deleted on any end of the job, finished, failed or
    /// cancelled (Flink's `NO_EXTERNALIZED_CHECKPOINTS`).
    NoExternalizedCheckpoints,
}

/// One key group's block inside a state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupBlock {
    /// The key group.
    pub key_group: u32,
    /// Byte offset of the block in the file.
    pub offset: u64,
    /// Length of the block in bytes.
    pub len: u64,
    /// crc32c of the block.
    pub crc32c: u32,
}

/// What a state file holds, and so how a restore reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateFileKind {
    /// Every entry of one state, key-group indexed (the canonical, backend-independent format).
    #[default]
    Full,
    /// The changes of one state since the file listed before it (heap incremental checkpoints):
    /// key-group indexed puts and tombstones.
    Delta,
    /// A file of a RocksDB native checkpoint (SST, MANIFEST, ...) of the subtask's database:
    /// `state` is the file's name in the database directory.
    RocksDb,
}

/// A state file written by one subtask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFileHandle {
    /// The state's name (as registered by the operator).
    pub state: String,
    /// Path relative to the job's checkpoint directory (e.g. `chk-7/op1-0.state`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// crc32c of the whole file.
    pub crc32c: u32,
    /// The key-group index: which bytes hold which key group.
    pub key_groups: Vec<KeyGroupBlock>,
    /// What the file holds (older metadata: `Full`).
    #[serde(default)]
    pub kind: StateFileKind,
}

/// A replayable source split's position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitOffset {
    /// The split's id (stable across parallelism changes).
    pub split: u64,
    /// Records (or bytes, per source) consumed.
    pub offset: u64,
    /// A file split's file, relative to the source's directory: a restore matches file splits
    /// on it, since `split` (the file's place in the listing) shifts when files are added.
    /// `None` for other sources and in checkpoints written before paths were recorded.
    /// (Always serialized: snapshots also travel between processes in bincode, which is
    /// positional.)
    #[serde(default)]
    pub path: Option<String>,
}

impl SplitOffset {
    /// Split `split` at `offset`, not a file.
    pub fn new(split: u64, offset: u64) -> Self {
        Self { split, offset, path: None }
    }
}

/// The cost split of one subtask's part of a checkpoint (Flink's cost model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtaskStats {
    /// Trigger → the subtask's input frontier passed the epoch (µs): Flink's start delay plus
    /// alignment.
    pub barrier_us: u64,
    /// The alignment part of `barrier_us`: from the first record of a later epoch at the
    /// subtask's input (the first barrier, in Flink's terms) to the epoch's close (µs).
    #[serde(default)]
    pub alignment_us: u64,
    /// The synchronous pause of the snapshot (µs).
    pub sync_us: u64,
    /// The asynchronous write to checkpoint storage (µs).
    pub async_us: u64,
    /// Bytes written to checkpoint storage.
    pub bytes: u64,
    /// Entries in the subtask's state.
    pub state_entries: u64,
}

/// What one subtask contributed to a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtaskSnapshot {
    /// The operator's name (for humans; the uid is what restores).
    pub operator_name: String,
    /// The operator's stable id (Flink's `uid`): a restore gives this state to the operator of
    /// the new job with the same uid. Empty in checkpoints written before uids existed; those
    /// match operators by position (`TaskId::operator`).
    #[serde(default)]
    pub uid: String,
    /// Keyed state files.
    pub state_files: Vec<StateFileHandle>,
    /// Source positions.
    pub splits: Vec<SplitOffset>,
    /// Cost split.
    pub stats: SubtaskStats,
}

/// The `_metadata` of a completed checkpoint: it exists if and only if the checkpoint does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// Format version ([`METADATA_VERSION`]).
    pub version: u32,
    /// The job's name.
    pub job: String,
    /// The checkpoint id (= last epoch included).
    pub id: CheckpointId,
    /// Trigger time, ms since the Unix epoch.
    pub triggered_ms: u64,
    /// Completion time, ms since the Unix epoch.
    pub completed_ms: u64,
    /// Parallelism of the job when it was taken.
    pub parallelism: u32,
    /// Key groups (the upper bound of parallelism).
    pub max_parallelism: u32,
    /// Whether it is the final checkpoint of a bounded job.
    pub is_final: bool,
    /// One entry per stateful subtask.
    pub subtasks: Vec<(TaskId, SubtaskSnapshot)>,
}

impl CheckpointMetadata {
    /// Bytes of state this checkpoint wrote to checkpoint storage (sinks' own output not
    /// included; files of earlier checkpoints that an incremental one lists not included).
    pub fn bytes(&self) -> u64 {
        self.files().filter(|f| written_by(&f.path).is_none_or(|id| id == self.id)).map(|f| f.size).sum()
    }

    /// Bytes of state the checkpoint lists: what a restore reads (its own files and, for
    /// incremental state, the earlier files it builds on).
    pub fn referenced_bytes(&self) -> u64 {
        self.files().map(|f| f.size).sum()
    }

    /// Whether the checkpoint builds on files of earlier checkpoints (incremental state).
    pub fn is_incremental(&self) -> bool {
        self.files().any(|f| written_by(&f.path).is_some_and(|id| id != self.id))
    }

    fn files(&self) -> impl Iterator<Item = &StateFileHandle> {
        self.subtasks.iter().flat_map(|(_, s)| s.state_files.iter())
    }

    /// Total state entries.
    pub fn state_entries(&self) -> u64 {
        self.subtasks.iter().map(|(_, s)| s.stats.state_entries).sum()
    }

    /// Trigger → completion.
    pub fn duration_ms(&self) -> u64 {
        self.completed_ms.saturating_sub(self.triggered_ms)
    }

    /// The largest of each cost component across subtasks (µs): (barrier, sync, async).
    pub fn max_costs(&self) -> (u64, u64, u64) {
        self.subtasks.iter().fold((0, 0, 0), |(b, s, a), (_, t)| {
            (b.max(t.stats.barrier_us), s.max(t.stats.sync_us), a.max(t.stats.async_us))
        })
    }
}

/// The checkpoint that wrote a state file, from its path: `chk-<n>/…` or `shared/chk<n>-…`.
pub fn written_by(path: &str) -> Option<u64> {
    let digits = |rest: &str| rest.split(|c: char| !c.is_ascii_digit()).next().and_then(|d| d.parse().ok());
    if let Some(rest) = path.strip_prefix("chk-") {
        return digits(rest);
    }
    path.strip_prefix("shared/chk").and_then(digits)
}

#[cfg(test)]
mod written_by_tests {
    use super::*;

    fn file(path: &str, size: u64) -> StateFileHandle {
        StateFileHandle { state: "s".into(), path: path.into(), size, crc32c: 0, key_groups: vec![], kind: Default::default() }
    }

    #[test]
    fn written_and_referenced_bytes_of_an_incremental_checkpoint() {
        assert_eq!(written_by("chk-12/op1-x-0.state"), Some(12));
        assert_eq!(written_by("shared/chk7-op1-kmeans-0-s-1-delta.state"), Some(7));
        assert_eq!(written_by("elsewhere/x"), None);
        let snapshot = SubtaskSnapshot {
            operator_name: "op".into(),
            uid: "op".into(),
            state_files: vec![file("chk-9/host.state", 10), file("shared/chk7-full.state", 1000), file("shared/chk9-delta.state", 30)],
            splits: vec![],
            stats: SubtaskStats::default(),
        };
        let m = CheckpointMetadata {
            version: 1,
            job: "j".into(),
            id: 9,
            triggered_ms: 0,
            completed_ms: 0,
            parallelism: 1,
            max_parallelism: 128,
            is_final: false,
            subtasks: vec![(crate::TaskId::new(0, 0), snapshot)],
        };
        assert_eq!((m.bytes(), m.referenced_bytes(), m.is_incremental()), (40, 1040, true));
    }
}

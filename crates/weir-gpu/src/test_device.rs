//! The device the crate's tests run on. With `WEIR_REQUIRE_GPU=1` (CI and `scripts/test.sh`, on
//! Mesa's lavapipe) a missing adapter fails the test; without it a test prints that it ran on
//! nothing and returns, so `cargo test` still works on a machine with no Vulkan driver.

use std::sync::{Arc, OnceLock};

use crate::device::{GpuConfig, GpuContext, GpuMode};
use crate::kernels::gpu::GpuKernels;

/// A device of its own with a budget of `memory` × `fraction` bytes and the built-in tuning (no
/// cached tuning of the machine's adapter), or `None` without an adapter (a failure when
/// `WEIR_REQUIRE_GPU=1`).
pub(crate) fn context(memory: u64, fraction: f64) -> Option<Arc<GpuContext>> {
    let required = std::env::var("WEIR_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let cfg = GpuConfig { mode: if required { GpuMode::On } else { GpuMode::Auto }, memory, fraction, tuning_file: None, ..GpuConfig::default() };
    let ctx = GpuContext::select(&cfg).expect("WEIR_REQUIRE_GPU=1 but no GPU adapter (install mesa-vulkan-drivers)");
    if ctx.is_none() {
        eprintln!("NO GPU ADAPTER: a GPU test ran on nothing (set WEIR_REQUIRE_GPU=1 to fail)");
    }
    ctx
}

/// The GPU path's kernels on the default budget, one device per test process.
pub(crate) fn gpu() -> Option<&'static GpuKernels> {
    static GPU: OnceLock<Option<GpuKernels>> = OnceLock::new();
    GPU.get_or_init(|| {
        let d = GpuConfig::default();
        context(d.memory, d.fraction).map(GpuKernels::new)
    })
    .as_ref()
}

//! The device the crate's tests run on: one per test process, shared by every suite.

use std::sync::OnceLock;

use crate::device::{GpuConfig, GpuContext, GpuMode};
use crate::kernels::gpu::GpuKernels;

/// The GPU path's kernels, or `None` without an adapter. With `WEIR_REQUIRE_GPU=1` (CI, on
/// Mesa's lavapipe) a missing adapter fails the test instead: GPU tests never skip silently.
pub(crate) fn gpu() -> Option<&'static GpuKernels> {
    static GPU: OnceLock<Option<GpuKernels>> = OnceLock::new();
    GPU.get_or_init(|| {
        let required = std::env::var("WEIR_REQUIRE_GPU").is_ok_and(|v| v == "1");
        let cfg = GpuConfig { mode: if required { GpuMode::On } else { GpuMode::Auto }, ..GpuConfig::default() };
        let ctx = GpuContext::select(&cfg).expect("WEIR_REQUIRE_GPU=1 but no GPU adapter (install mesa-vulkan-drivers)");
        if ctx.is_none() {
            eprintln!("NO GPU ADAPTER: the GPU half of the tests ran on nothing (set WEIR_REQUIRE_GPU=1 to fail)");
        }
        ctx.map(GpuKernels::new)
    })
    .as_ref()
}

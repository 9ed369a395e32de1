//! Weir's GPU runtime on wgpu (Vulkan first: AMD, NVIDIA, Intel; Mesa lavapipe in CI).
//!
//! - [`device`]: adapter discovery, selection by configuration, the per-worker memory budget.
//! - [`pool`]: device memory taken in slabs and sub-allocated by size class; typed out-of-memory.
//! - [`transfer`]: the ring of mapped staging slots and the shared submission queue; kernels
//!   return a [`Pending`] result, so uploads, compute and downloads of successive batches overlap.
//! - [`kernels`]: WGSL kernels, each with a CPU implementation behind the same trait, so one test
//!   suite runs every kernel on both paths.
//!
//! ```
//! use weir_gpu::kernels::{cpu::CpuKernels, Kernels};
//! let cpu = CpuKernels::new(1);
//! // [1 2; 3 4] × [1; 1]
//! assert_eq!(cpu.gemm(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0], 2, 1, 2).unwrap(), vec![3.0, 7.0]);
//! ```
// Denied, not forbidden: the CPU GEMM calls matrixmultiply's sgemm (raw pointers), in one
// function whose bounds are checked before (kernels/cpu.rs).
#![deny(unsafe_code)]

pub mod cnn;
pub mod device;
pub mod kernels;
pub mod pool;
pub mod state;
#[cfg(test)]
mod test_device;
pub mod train;
pub mod transfer;

pub use device::{AdapterDesc, GpuConfig, GpuContext, GpuMode};
pub use transfer::{Pending, TransferMode, TransferStats};

/// Errors of the GPU runtime.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// A request beyond the memory budget.
    #[error("GPU out of memory: {requested} bytes requested, {in_use} of {budget} bytes in use")]
    OutOfMemory {
        /// Bytes requested.
        requested: u64,
        /// Bytes in use.
        in_use: u64,
        /// The budget.
        budget: u64,
    },
    /// No usable adapter where one was required.
    #[error("no usable GPU: {0}")]
    NoDevice(String),
    /// Bad GPU configuration.
    #[error("config key '{key}': {message}")]
    Config {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The device failed (lost, validation, mapping).
    #[error("GPU device error: {0}")]
    Device(String),
    /// Keyed state beyond the device memory budget.
    #[error("{owner}: {keys} keys × {slot_bytes} bytes of GPU state (with a snapshot area of the same size) exceed {limit} bytes (taskmanager.gpu.memory × taskmanager.gpu.fraction / 2, or the adapter's largest storage binding)")]
    StateTooLarge {
        /// The operator.
        owner: String,
        /// Keys.
        keys: u64,
        /// Bytes per key.
        slot_bytes: u64,
        /// The limit for the arena.
        limit: u64,
    },
    /// Bad kernel input.
    #[error("kernel input: {0}")]
    Input(String),
}

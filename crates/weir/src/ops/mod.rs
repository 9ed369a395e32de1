//! Weir's GPU operators, in one place: each runs its kernels on the GPU path or the CPU path of
//! `weir-gpu` (chosen per process by `weir.gpu.enabled`), in batches of records.
//!
//! - [`kmeans`]: streaming mini-batch K-means, one model per key (keyed state).
//! - [`gemm`]: rows × a fixed matrix.
//! - [`cnn`]: CNN inference.
//! - [`train`]: CNN training, one model per key (device-resident state, exactly-once export).
//! - [`image`]: image resize and filters.
//! - [`resident`]: the GPU state store (device-resident keyed state, incremental snapshots).

pub mod cnn;
pub mod gemm;
pub(crate) mod gpu_probe;
pub mod image;
pub mod kmeans;
pub mod resident;
pub mod export;
pub mod train;

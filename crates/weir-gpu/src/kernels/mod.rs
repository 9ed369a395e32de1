//! Kernels: one trait, a CPU implementation and a GPU (WGSL) implementation of each.

pub mod cpu;
pub mod gpu;

use crate::GpuError;

/// The result of one mini-batch K-means step over a batch of points.
#[derive(Clone, Debug, PartialEq)]
pub struct KmeansStep {
    /// Per centroid, the sum of its points' coordinates (k × d).
    pub sums: Vec<f32>,
    /// Per centroid, its number of points.
    pub counts: Vec<u32>,
}

/// The kernels of Weir, on one path.
pub trait Kernels: Send + Sync {
    /// The path's name ("cpu" or the adapter's name).
    fn name(&self) -> String;

    /// `C[m×n] = A[m×k] · B[k×n]`, row-major f32.
    fn gemm(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Vec<f32>, GpuError>;

    /// Assign each of `points` (n × d) to its nearest of `centroids` (k × d) and sum per centroid.
    fn kmeans_step(&self, points: &[f32], centroids: &[f32], d: usize) -> Result<KmeansStep, GpuError>;
}

pub(crate) fn check_gemm(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<(), GpuError> {
    if a.len() != m * k || b.len() != k * n {
        return Err(GpuError::Input(format!("gemm: A has {} values for {m}×{k}, B {} for {k}×{n}", a.len(), b.len())));
    }
    Ok(())
}

pub(crate) fn check_kmeans(points: &[f32], centroids: &[f32], d: usize) -> Result<(usize, usize), GpuError> {
    if d == 0 || !points.len().is_multiple_of(d) || !centroids.len().is_multiple_of(d) || centroids.is_empty() {
        return Err(GpuError::Input(format!(
            "kmeans: {} point values and {} centroid values are not multiples of d = {d}",
            points.len(),
            centroids.len()
        )));
    }
    Ok((points.len() / d, centroids.len() / d))
}

/// Apply a mini-batch step to a model (Sculley's per-centre learning rate): each centre moves
/// toward the mean of its batch points by `batch / (seen + batch)`.
pub fn apply_step(centroids: &mut [f32], seen: &mut [u64], step: &KmeansStep, d: usize) {
    for (c, &cnt) in step.counts.iter().enumerate() {
        if cnt == 0 {
            continue;
        }
        seen[c] += cnt as u64;
        let eta = cnt as f32 / seen[c] as f32;
        for j in 0..d {
            let mean = step.sums[c * d + j] / cnt as f32;
            let x = &mut centroids[c * d + j];
            *x += eta * (mean - *x);
        }
    }
}

#[cfg(test)]
mod tests;

/// The kernels for `cfg` in this process: one device context (and one submission queue) is
/// shared by every operator and worker; without a usable adapter under `auto`, the CPU path
/// (one thread per caller: the workers are the parallelism).
pub fn shared_kernels(cfg: &crate::GpuConfig) -> Result<std::sync::Arc<dyn Kernels>, GpuError> {
    use std::sync::{Arc, Mutex};
    type Cache = Mutex<Vec<(crate::GpuConfig, Arc<dyn Kernels>)>>;
    static CACHE: Cache = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().map_err(|_| GpuError::Device("kernel cache poisoned".into()))?;
    if let Some((_, k)) = cache.iter().find(|(c, _)| c == cfg) {
        return Ok(k.clone());
    }
    let k: Arc<dyn Kernels> = match crate::GpuContext::select(cfg)? {
        Some(ctx) => Arc::new(gpu::GpuKernels::new(ctx)),
        None => Arc::new(cpu::CpuKernels::new(1)),
    };
    cache.push((cfg.clone(), k.clone()));
    Ok(k)
}

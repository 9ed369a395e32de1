//! The CPU path of every kernel (multi-threaded with scoped threads).

use super::{check_gemm, check_kmeans, Kernels, KmeansStep};
use crate::GpuError;

/// Kernels on the CPU.
#[derive(Clone, Debug)]
pub struct CpuKernels {
    threads: usize,
}

impl CpuKernels {
    /// `threads` worker threads (1 = one core).
    pub fn new(threads: usize) -> Self {
        Self { threads: threads.max(1) }
    }

    /// All cores.
    pub fn all_cores() -> Self {
        Self::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }
}

fn gemm_rows(a: &[f32], b: &[f32], c: &mut [f32], n: usize, k: usize) {
    // i-k-j order: streams rows of B and C, vectorises the inner loop.
    for (i, row) in c.chunks_mut(n).enumerate() {
        for p in 0..k {
            let av = a[i * k + p];
            let brow = &b[p * n..(p + 1) * n];
            for (x, &bv) in row.iter_mut().zip(brow) {
                *x = av.mul_add(bv, *x);
            }
        }
    }
}

impl Kernels for CpuKernels {
    fn name(&self) -> String {
        format!("cpu ({} thread{})", self.threads, if self.threads == 1 { "" } else { "s" })
    }

    fn gemm(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Vec<f32>, GpuError> {
        check_gemm(a, b, m, n, k)?;
        let mut c = vec![0f32; m * n];
        if n == 0 || m == 0 {
            return Ok(c);
        }
        let rows_per = m.div_ceil(self.threads);
        std::thread::scope(|s| {
            for (t, chunk) in c.chunks_mut(rows_per * n).enumerate() {
                let a = &a[t * rows_per * k..(t * rows_per * k + chunk.len() / n * k)];
                s.spawn(move || gemm_rows(a, b, chunk, n, k));
            }
        });
        Ok(c)
    }

    fn kmeans_step(&self, points: &[f32], centroids: &[f32], d: usize) -> Result<KmeansStep, GpuError> {
        let (n, k) = check_kmeans(points, centroids, d)?;
        let mut labels = vec![0u32; n];
        let per = n.div_ceil(self.threads).max(1);
        std::thread::scope(|s| {
            for (t, out) in labels.chunks_mut(per).enumerate() {
                s.spawn(move || {
                    for (i, l) in out.iter_mut().enumerate() {
                        let p = &points[(t * per + i) * d..(t * per + i + 1) * d];
                        let mut best = (f32::MAX, 0u32);
                        for c in 0..k {
                            let q = &centroids[c * d..(c + 1) * d];
                            let dist = p.iter().zip(q).fold(0f32, |acc, (x, y)| (x - y).mul_add(x - y, acc));
                            if dist < best.0 {
                                best = (dist, c as u32);
                            }
                        }
                        *l = best.1;
                    }
                });
            }
        });
        let mut sums = vec![0f32; k * d];
        let mut counts = vec![0u32; k];
        for (i, &l) in labels.iter().enumerate() {
            counts[l as usize] += 1;
            for j in 0..d {
                sums[l as usize * d + j] += points[i * d + j];
            }
        }
        Ok(KmeansStep { sums, counts })
    }
}

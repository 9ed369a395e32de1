//! Kernels: one trait, a CPU implementation and a GPU (WGSL) implementation of each.

pub mod cpu;
pub mod gpu;
pub mod tune;

use crate::{GpuError, Pending};

/// The result of one mini-batch K-means step over a batch of points.
#[derive(Clone, Debug, PartialEq)]
pub struct KmeansStep {
    /// Per centroid, the sum of its points' coordinates (k × d).
    pub sums: Vec<f32>,
    /// Per centroid, its number of points.
    pub counts: Vec<u32>,
}

/// The kernels of Weir, on one path. Each kernel is submitted as one batch and returns a
/// [`Pending`] result (ready at once on the CPU path); the plain methods wait for it.
pub trait Kernels: Send + Sync {
    /// The path's name ("cpu" or the adapter's name).
    fn name(&self) -> String;

    /// The GPU path's kernels (for device-resident state); `None` on the CPU path.
    fn as_gpu(&self) -> Option<&gpu::GpuKernels> {
        None
    }

    /// `C[m×n] = A[m×k] · B[k×n]`, row-major f32.
    fn gemm_async(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Pending<Vec<f32>>;

    /// Assign each of `points` (n × d) to its nearest of `centroids` (k × d) and sum per centroid.
    fn kmeans_step_async(&self, points: &[f32], centroids: &[f32], d: usize) -> Pending<KmeansStep>;

    /// Bilinear resize of an image (`w × h × c`, interleaved) to `nw × nh` (pixel centres aligned).
    fn resize_bilinear_async(&self, img: &Image, nw: usize, nh: usize) -> Pending<Image>;

    /// Gaussian blur with standard deviation `sigma` (separable, radius ⌈3σ⌉, clamp-to-edge).
    fn gaussian_blur_async(&self, img: &Image, sigma: f32) -> Pending<Image>;

    /// Sobel gradient magnitude per channel (clamp-to-edge).
    fn sobel_async(&self, img: &Image) -> Pending<Image>;

    /// Logits of `cnn` for a batch of `n` images (`n × in_c × h × w`, NCHW).
    fn cnn_forward_async(&self, cnn: &crate::cnn::SmallCnn, images: &[f32], n: usize) -> Pending<Vec<f32>>;

    /// [`Kernels::gemm_async`], waited for.
    fn gemm(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Vec<f32>, GpuError> {
        self.gemm_async(a, b, m, n, k).wait()
    }

    /// [`Kernels::kmeans_step_async`], waited for.
    fn kmeans_step(&self, points: &[f32], centroids: &[f32], d: usize) -> Result<KmeansStep, GpuError> {
        self.kmeans_step_async(points, centroids, d).wait()
    }

    /// [`Kernels::resize_bilinear_async`], waited for.
    fn resize_bilinear(&self, img: &Image, nw: usize, nh: usize) -> Result<Image, GpuError> {
        self.resize_bilinear_async(img, nw, nh).wait()
    }

    /// [`Kernels::gaussian_blur_async`], waited for.
    fn gaussian_blur(&self, img: &Image, sigma: f32) -> Result<Image, GpuError> {
        self.gaussian_blur_async(img, sigma).wait()
    }

    /// [`Kernels::sobel_async`], waited for.
    fn sobel(&self, img: &Image) -> Result<Image, GpuError> {
        self.sobel_async(img).wait()
    }

    /// [`Kernels::cnn_forward_async`], waited for.
    fn cnn_forward(&self, cnn: &crate::cnn::SmallCnn, images: &[f32], n: usize) -> Result<Vec<f32>, GpuError> {
        self.cnn_forward_async(cnn, images, n).wait()
    }
}

pub(crate) fn check_cnn(cnn: &crate::cnn::SmallCnn, images: &[f32], n: usize) -> Result<(), GpuError> {
    if images.len() != n * cnn.input_len() {
        return Err(GpuError::Input(format!("cnn: {} values for {n} images of {}", images.len(), cnn.input_len())));
    }
    Ok(())
}

/// An f32 image, row-major, channels interleaved (`h × w × c`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Image {
    /// Width.
    pub w: usize,
    /// Height.
    pub h: usize,
    /// Channels (1 grey, 3 RGB).
    pub c: usize,
    /// `h × w × c` values.
    pub data: Vec<f32>,
}

impl Image {
    /// An image from RGB8 bytes (values 0–255 as f32).
    pub fn from_rgb8(w: usize, h: usize, rgb: &[u8]) -> Result<Image, GpuError> {
        if rgb.len() != w * h * 3 {
            return Err(GpuError::Input(format!("rgb8 image {w}×{h} needs {} bytes, got {}", w * h * 3, rgb.len())));
        }
        Ok(Image { w, h, c: 3, data: rgb.iter().map(|&b| b as f32).collect() })
    }

    /// RGB8 bytes (rounded, clamped to 0–255).
    pub fn to_rgb8(&self) -> Vec<u8> {
        self.data.iter().map(|&v| v.round().clamp(0.0, 255.0) as u8).collect()
    }

    pub(crate) fn check(&self) -> Result<(), GpuError> {
        if self.w == 0 || self.h == 0 || self.c == 0 || self.data.len() != self.w * self.h * self.c {
            return Err(GpuError::Input(format!("image {}×{}×{} with {} values", self.w, self.h, self.c, self.data.len())));
        }
        Ok(())
    }
}

/// The normalised 1-D Gaussian of standard deviation `sigma`, radius ⌈3σ⌉.
pub fn gaussian_weights(sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil().max(0.0) as i32;
    let w: Vec<f32> = (-r..=r).map(|k| (-((k * k) as f32) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = w.iter().sum();
    w.into_iter().map(|x| x / total).collect()
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

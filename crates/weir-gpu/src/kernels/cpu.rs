//! The CPU path of every kernel (multi-threaded with scoped threads).

use super::{check_cnn, check_gemm, check_kmeans, gaussian_weights, Image, Kernels, KmeansStep};
use crate::{GpuError, Pending};

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

/// `C = A · B` for row-major `a` (m × k), `b` (k × n) and `c` (m × n, m = c.len() / n) by
/// matrixmultiply's sgemm (packed, cache-blocked SIMD kernels): the CPU side of the GPU-vs-CPU
/// comparison is a good GEMM, not a plain loop.
#[allow(unsafe_code)]
fn gemm_rows(a: &[f32], b: &[f32], c: &mut [f32], n: usize, k: usize) {
    let m = c.len() / n;
    assert!(c.len() == m * n && a.len() == m * k && b.len() == k * n, "gemm_rows: A {} B {} C {} values for {m}×{n}×{k}", a.len(), b.len(), c.len());
    // SAFETY: sgemm reads m × k values of `a` (row stride k, column stride 1), k × n of `b` (row
    // stride n) and writes m × n of `c` (row stride n): the assert above bounds each access to its
    // slice, and `c` is borrowed mutably, so it overlaps neither input. β = 0: C is only written.
    unsafe {
        matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, 0.0, c.as_mut_ptr(), n as isize, 1);
    }
}

/// `centroids` (k × d) transposed to d × k: one dimension of every centroid is contiguous.
pub(crate) fn transpose(centroids: &[f32], k: usize, d: usize) -> Vec<f32> {
    (0..d * k).map(|i| centroids[(i % k) * d + i / k]).collect()
}

/// The nearest centroid of each of `points` (squared Euclidean distance accumulated in dimension
/// order with fused multiply-adds, lowest index on ties: the GPU kernel's arithmetic), against
/// `kt`, the centroids transposed (d × k), so that the inner loop runs over centroids and
/// vectorises. Where the CPU has AVX2 and FMA it runs compiled for them (8 lanes, a hardware FMA);
/// elsewhere `mul_add` is the C library's `fmaf`, slower, same results.
pub(crate) fn assign(points: &[f32], kt: &[f32], k: usize, d: usize, labels: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the function only needs AVX2 and FMA, detected on this CPU just above.
        unsafe {
            return assign_avx2_fma(points, kt, k, d, labels);
        }
    }
    assign_portable(points, kt, k, d, labels)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn assign_avx2_fma(points: &[f32], kt: &[f32], k: usize, d: usize, labels: &mut [u32]) {
    assign_portable(points, kt, k, d, labels)
}

#[inline(always)]
fn assign_portable(points: &[f32], kt: &[f32], k: usize, d: usize, labels: &mut [u32]) {
    let mut dist = vec![0f32; k];
    for (p, l) in points.chunks_exact(d).zip(labels.iter_mut()) {
        dist.fill(0.0);
        for (&x, row) in p.iter().zip(kt.chunks_exact(k)) {
            for (acc, &c) in dist.iter_mut().zip(row) {
                let t = x - c;
                *acc = t.mul_add(t, *acc);
            }
        }
        let mut best = (f32::MAX, 0u32);
        for (c, &v) in dist.iter().enumerate() {
            if v < best.0 {
                best = (v, c as u32);
            }
        }
        *l = best.1;
    }
}

#[inline]
fn px(img: &Image, x: i64, y: i64, ch: usize) -> f32 {
    let x = x.clamp(0, img.w as i64 - 1) as usize;
    let y = y.clamp(0, img.h as i64 - 1) as usize;
    img.data[(y * img.w + x) * img.c + ch]
}

/// Apply `f(x, y, ch)` to every output value of a `w × h × c` image, rows split over threads.
fn per_pixel(threads: usize, w: usize, h: usize, c: usize, f: impl Fn(usize, usize, usize) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; w * h * c];
    let rows = h.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(rows * w * c).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, v) in chunk.iter_mut().enumerate() {
                    let (ch, x, y) = (i % c, (i / c) % w, t * rows + i / (c * w));
                    *v = f(x, y, ch);
                }
            });
        }
    });
    out
}

/// The CNN on the images of `imgs`, logits into `logits` (one thread's share of a batch).
fn cnn_rows(m: &crate::cnn::SmallCnn, imgs: &[f32], logits: &mut [f32]) {
    let (h, w, ph, pw) = (m.h, m.w, m.h / 2, m.w / 2);
    let features = m.conv_c * ph * pw;
    let mut conv = vec![0f32; m.conv_c * h * w];
    let mut pooled = vec![0f32; features];
    for (img, out) in imgs.chunks(m.input_len()).zip(logits.chunks_mut(m.classes)) {
        for c in 0..m.conv_c {
            for y in 0..h {
                for x in 0..w {
                    let mut s = m.conv_b[c];
                    for k in 0..m.in_c {
                        for dy in 0..3 {
                            for dx in 0..3 {
                                let (yy, xx) = ((y + dy) as i64 - 1, (x + dx) as i64 - 1);
                                if yy >= 0 && yy < h as i64 && xx >= 0 && xx < w as i64 {
                                    let wv = m.conv_w[((c * m.in_c + k) * 3 + dy) * 3 + dx];
                                    s = wv.mul_add(img[(k * h + yy as usize) * w + xx as usize], s);
                                }
                            }
                        }
                    }
                    conv[(c * h + y) * w + x] = s.max(0.0);
                }
            }
        }
        for c in 0..m.conv_c {
            for y in 0..ph {
                for x in 0..pw {
                    let base = (c * h + 2 * y) * w + 2 * x;
                    pooled[(c * ph + y) * pw + x] = conv[base].max(conv[base + 1]).max(conv[base + w].max(conv[base + w + 1]));
                }
            }
        }
        for (k, o) in out.iter_mut().enumerate() {
            let row = &m.dense_w[k * features..(k + 1) * features];
            *o = row.iter().zip(&pooled).fold(m.dense_b[k], |s, (a, p)| a.mul_add(*p, s));
        }
    }
}

impl CpuKernels {
    fn cpu_name(&self) -> String {
        format!("cpu ({} thread{})", self.threads, if self.threads == 1 { "" } else { "s" })
    }

    fn run_gemm(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Vec<f32>, GpuError> {
        check_gemm(a, b, m, n, k)?;
        let mut c = vec![0f32; m * n];
        if n == 0 || m == 0 {
            return Ok(c);
        }
        let rows_per = m.div_ceil(self.threads);
        if rows_per == m {
            // One share: no thread to spawn.
            gemm_rows(a, b, &mut c, n, k);
            return Ok(c);
        }
        std::thread::scope(|s| {
            for (t, chunk) in c.chunks_mut(rows_per * n).enumerate() {
                let a = &a[t * rows_per * k..(t * rows_per * k + chunk.len() / n * k)];
                s.spawn(move || gemm_rows(a, b, chunk, n, k));
            }
        });
        Ok(c)
    }

    fn run_kmeans_step(&self, points: &[f32], centroids: &[f32], d: usize) -> Result<KmeansStep, GpuError> {
        let (n, k) = check_kmeans(points, centroids, d)?;
        let mut labels = vec![0u32; n];
        let per = n.div_ceil(self.threads).max(1);
        let kt = transpose(centroids, k, d);
        std::thread::scope(|s| {
            for (t, out) in labels.chunks_mut(per).enumerate() {
                let (pts, kt) = (&points[t * per * d..(t * per + out.len()) * d], &kt);
                s.spawn(move || assign(pts, kt, k, d, out));
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

    fn run_resize_bilinear(&self, img: &Image, nw: usize, nh: usize) -> Result<Image, GpuError> {
        img.check()?;
        let (w, h) = (img.w as f32, img.h as f32);
        let data = per_pixel(self.threads, nw, nh, img.c, |x, y, ch| {
            let sx = ((x as f32 + 0.5) * w / nw as f32 - 0.5).clamp(0.0, w - 1.0);
            let sy = ((y as f32 + 0.5) * h / nh as f32 - 0.5).clamp(0.0, h - 1.0);
            let (x0, y0) = (sx.floor() as i64, sy.floor() as i64);
            let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
            let top = px(img, x0, y0, ch) * (1.0 - fx) + px(img, x0 + 1, y0, ch) * fx;
            let bot = px(img, x0, y0 + 1, ch) * (1.0 - fx) + px(img, x0 + 1, y0 + 1, ch) * fx;
            top * (1.0 - fy) + bot * fy
        });
        Ok(Image { w: nw, h: nh, c: img.c, data })
    }

    fn run_gaussian_blur(&self, img: &Image, sigma: f32) -> Result<Image, GpuError> {
        img.check()?;
        let wts = gaussian_weights(sigma);
        let r = (wts.len() / 2) as i64;
        let tmp = Image {
            data: per_pixel(self.threads, img.w, img.h, img.c, |x, y, ch| {
                (-r..=r).map(|k| wts[(k + r) as usize] * px(img, x as i64 + k, y as i64, ch)).sum()
            }),
            ..img.clone()
        };
        let data = per_pixel(self.threads, img.w, img.h, img.c, |x, y, ch| {
            (-r..=r).map(|k| wts[(k + r) as usize] * px(&tmp, x as i64, y as i64 + k, ch)).sum()
        });
        Ok(Image { data, ..tmp })
    }

    fn run_cnn_forward(&self, m: &crate::cnn::SmallCnn, images: &[f32], n: usize) -> Result<Vec<f32>, GpuError> {
        check_cnn(m, images, n)?;
        let mut logits = vec![0f32; n * m.classes];
        let per = n.div_ceil(self.threads).max(1);
        std::thread::scope(|s| {
            for (t, out) in logits.chunks_mut(per * m.classes).enumerate() {
                let imgs = &images[t * per * m.input_len()..][..out.len() / m.classes * m.input_len()];
                s.spawn(move || cnn_rows(m, imgs, out));
            }
        });
        Ok(logits)
    }

    fn run_sobel(&self, img: &Image) -> Result<Image, GpuError> {
        img.check()?;
        let data = per_pixel(self.threads, img.w, img.h, img.c, |x, y, ch| {
            let p = |dx: i64, dy: i64| px(img, x as i64 + dx, y as i64 + dy, ch);
            let gx = (p(1, -1) + 2.0 * p(1, 0) + p(1, 1)) - (p(-1, -1) + 2.0 * p(-1, 0) + p(-1, 1));
            let gy = (p(-1, 1) + 2.0 * p(0, 1) + p(1, 1)) - (p(-1, -1) + 2.0 * p(0, -1) + p(1, -1));
            (gx * gx + gy * gy).sqrt()
        });
        Ok(Image { data, ..img.clone() })
    }
}

impl Kernels for CpuKernels {
    fn name(&self) -> String {
        self.cpu_name()
    }

    fn gemm_async(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Pending<Vec<f32>> {
        Pending::ready(self.run_gemm(a, b, m, n, k))
    }

    fn kmeans_step_async(&self, points: &[f32], centroids: &[f32], d: usize) -> Pending<KmeansStep> {
        Pending::ready(self.run_kmeans_step(points, centroids, d))
    }

    fn resize_bilinear_async(&self, img: &Image, nw: usize, nh: usize) -> Pending<Image> {
        Pending::ready(self.run_resize_bilinear(img, nw, nh))
    }

    fn gaussian_blur_async(&self, img: &Image, sigma: f32) -> Pending<Image> {
        Pending::ready(self.run_gaussian_blur(img, sigma))
    }

    fn sobel_async(&self, img: &Image) -> Pending<Image> {
        Pending::ready(self.run_sobel(img))
    }

    fn cnn_forward_async(&self, m: &crate::cnn::SmallCnn, images: &[f32], n: usize) -> Pending<Vec<f32>> {
        Pending::ready(self.run_cnn_forward(m, images, n))
    }
}

#[cfg(test)]
mod tests {
    /// The vectorised assignment (AVX2 + FMA where the CPU has them) and the portable one give
    /// the labels of the plain per-centroid loop over the untransposed centroids, bit for bit
    /// (same fused arithmetic in the same order), on shapes with k not a multiple of the lanes.
    #[test]
    fn vectorised_assignment_equals_the_plain_loop() {
        let mut x = 99u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 20_000) as f32 / 1000.0 - 10.0
        };
        for (n, k, d) in [(1000usize, 64usize, 32usize), (333, 7, 3), (50, 1, 5), (200, 13, 1)] {
            let points: Vec<f32> = (0..n * d).map(|_| rnd()).collect();
            let cents: Vec<f32> = (0..k * d).map(|_| rnd()).collect();
            let plain: Vec<u32> = points
                .chunks_exact(d)
                .map(|p| {
                    let mut best = (f32::MAX, 0u32);
                    for (c, q) in cents.chunks_exact(d).enumerate() {
                        let dist = p.iter().zip(q).fold(0f32, |acc, (a, b)| (a - b).mul_add(a - b, acc));
                        if dist < best.0 {
                            best = (dist, c as u32);
                        }
                    }
                    best.1
                })
                .collect();
            let kt = super::transpose(&cents, k, d);
            let (mut fast, mut portable) = (vec![0u32; n], vec![0u32; n]);
            super::assign(&points, &kt, k, d, &mut fast);
            super::assign_portable(&points, &kt, k, d, &mut portable);
            assert_eq!(fast, plain, "n = {n}, k = {k}, d = {d}");
            assert_eq!(portable, plain, "n = {n}, k = {k}, d = {d}");
        }
    }
}

//! Training the small CNN ([`SmallCnn`]) on a stream: one mini-batch step of softmax
//! cross-entropy and Adam on a model *slot*, on the CPU ([`train_step_cpu`]) or where the slot
//! lives in device memory ([`GpuKernels::cnn_train_step_async`]), so that per-key models train
//! inside the operator's state with nothing but the batch crossing to the device.
//!
//! A slot is a flat run of 32-bit words (see [`CnnShape`]): the parameters in the order and
//! shapes of `models/digits_cnn.safetensors`, then Adam's first and second moments, then the step
//! count. Both paths compute the same step: forward (conv 3×3 padding 1 + bias + ReLU → max-pool
//! 2×2 → dense + bias), the summed loss and hits of the batch before the update, the gradient of
//! the batch's *mean* loss (max-pool backward goes to the first maximum of each window, as the
//! forward argmax), then one Adam update of every parameter.
//!
//! A *windowed* slot ([`CnnShape::windowed_slot_words`]) keeps [`WINDOW_WORDS`] more words after
//! the model: a running window of the steps' statistics and the samples trained in all. Its steps
//! ([`train_step_windowed_cpu`], [`GpuKernels::cnn_train_step_windowed_async`]) add each batch
//! to the window and, once it holds `report_every` samples or more, return its totals and empty
//! it, in the same queue-ordered update as the model. A device-side snapshot of the slot thus
//! holds the window exactly as of its place in the queue: a stream's running reports are
//! exactly-once with the model, although their results come back after the barrier.
//!
//! ```
//! use weir_gpu::train::{train_step_cpu, Adam, CnnShape};
//! let shape = CnnShape { in_c: 1, h: 4, w: 4, conv_c: 2, classes: 3 };
//! let mut slot = shape.init_slot(7);
//! let images = vec![0.5; 2 * 16];
//! let first = train_step_cpu(&shape, &Adam::default(), &mut slot, &images, &[1, 1]).unwrap();
//! let second = train_step_cpu(&shape, &Adam::default(), &mut slot, &images, &[1, 1]).unwrap();
//! assert!(second.loss_sum < first.loss_sum);
//! assert_eq!(slot[shape.step_word()], 2.0);
//! ```

use crate::cnn::SmallCnn;
use crate::kernels::gpu::{grid, GpuKernels};
use crate::transfer::Bind;
use crate::{GpuError, Pending};

const SHADER: &str = include_str!("shaders/cnn_train.wgsl");

/// Adam's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
}

impl Default for Adam {
    /// The values of `scripts/train_digits_cnn.py`: 0.01, 0.9, 0.999, 1e-8.
    fn default() -> Self {
        Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// What a step saw of its batch, from the forward pass before the update.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrainStats {
    /// Images in the batch.
    pub samples: u32,
    /// Sum over the batch of the cross-entropy loss (natural log).
    pub loss_sum: f32,
    /// Images whose first largest logit is their label.
    pub correct: u32,
}

/// Words after a model slot that hold its window (a windowed slot): the window's loss sum, hits
/// and samples, then the samples trained in all as `lo + hi · 2^20` in two words. Every word is an
/// f32 holding an exact integer (but the loss sum): an f32 counts exactly only up to 2^24.
pub const WINDOW_WORDS: usize = 5;

/// The largest `report_every` and batch of a windowed step: the window's sample count stays an
/// exact f32 integer (below 2^24).
pub const MAX_REPORT_EVERY: u32 = 1 << 23;

/// The unit of the high word of the samples trained in all.
const TOTAL_UNIT: f32 = (1u32 << 20) as f32;

/// A closed window: its statistics, and the samples trained in all when it closed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WindowReport {
    /// The window's samples, summed loss and hits (`samples >= report_every`).
    pub window: TrainStats,
    /// Samples trained on this slot in all, this window's included.
    pub total: u64,
}

/// What a windowed step saw: its batch, the window it closed (if it did), and the samples trained
/// in all after it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WindowedStats {
    /// The batch's statistics, before the update.
    pub batch: TrainStats,
    /// The window this step closed.
    pub report: Option<WindowReport>,
    /// Samples trained on this slot in all, this batch's included.
    pub total: u64,
}

/// The trainable CNN's shape (the family of [`SmallCnn`]) and the layout of a model slot in
/// 32-bit words: the parameters `[conv_w | conv_b | dense_w | dense_b]` (`conv.weight
/// [conv_c, in_c, 3, 3]`, `conv.bias [conv_c]`, `dense.weight [classes, conv_c · h/2 · w/2]`,
/// `dense.bias [classes]`, as in `models/digits_cnn.safetensors`), then Adam's `m` and `v` (as
/// long each), then the step count `t` (as f32), padded with zeros to a multiple of 4 words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CnnShape {
    /// Input channels.
    pub in_c: usize,
    /// Input height (even).
    pub h: usize,
    /// Input width (even).
    pub w: usize,
    /// Convolution output channels.
    pub conv_c: usize,
    /// Classes.
    pub classes: usize,
}

fn input(what: impl std::fmt::Display) -> GpuError {
    GpuError::Input(format!("cnn training: {what}"))
}

impl CnnShape {
    /// The shape of `m`.
    pub fn of(m: &SmallCnn) -> CnnShape {
        CnnShape { in_c: m.in_c, h: m.h, w: m.w, conv_c: m.conv_c, classes: m.classes }
    }

    /// Values per input image.
    pub fn input_len(&self) -> usize {
        self.in_c * self.h * self.w
    }

    /// Inputs of the dense layer (`conv_c · h/2 · w/2`).
    pub fn features(&self) -> usize {
        self.conv_c * (self.h / 2) * (self.w / 2)
    }

    /// Trainable parameters (words of the first part of a slot).
    pub fn param_len(&self) -> usize {
        self.conv_w_len() + self.conv_c + self.classes * self.features() + self.classes
    }

    /// Words of a slot: parameters, `m`, `v`, `t`, padded to a multiple of 4.
    pub fn slot_words(&self) -> usize {
        (3 * self.param_len() + 1).next_multiple_of(4)
    }

    /// The word of a slot that holds the step count `t`.
    pub fn step_word(&self) -> usize {
        3 * self.param_len()
    }

    /// Words of a windowed slot: the slot, then its [`WINDOW_WORDS`] (zero in a fresh one).
    pub fn windowed_slot_words(&self) -> usize {
        self.slot_words() + WINDOW_WORDS
    }

    /// The window of a windowed `slot` as it stands (an open window) and the samples trained in
    /// all; `None` if `slot` is not a windowed slot of this shape.
    pub fn window_of(&self, slot: &[f32]) -> Option<(TrainStats, u64)> {
        let w = slot.get(self.slot_words()..).filter(|w| w.len() == WINDOW_WORDS)?;
        Some((TrainStats { samples: w[2] as u32, loss_sum: w[0], correct: w[1] as u32 }, total_of(w[3], w[4])))
    }

    fn conv_w_len(&self) -> usize {
        self.conv_c * self.in_c * 9
    }

    /// Where each tensor starts among the parameters: conv bias, dense weight, dense bias (the
    /// conv weight starts at 0).
    fn offsets(&self) -> (usize, usize, usize) {
        let cb = self.conv_w_len();
        let dw = cb + self.conv_c;
        (cb, dw, dw + self.classes * self.features())
    }

    fn check(&self) -> Result<(), GpuError> {
        if self.in_c == 0 || self.conv_c == 0 || self.classes == 0 || self.h < 2 || self.w < 2 || !self.h.is_multiple_of(2) || !self.w.is_multiple_of(2) {
            return Err(input(format!("shape {self:?}: every size ≥ 1 and h, w even and ≥ 2 expected")));
        }
        Ok(())
    }

    /// A fresh slot: He-normal conv weights (std √(2 / (in_c · 9))), Glorot-normal dense weights
    /// (std √(2 / (features + classes))), zero biases, zero moments, `t` 0. The same `seed`
    /// gives the same slot on every machine.
    pub fn init_slot(&self, seed: u64) -> Vec<f32> {
        let mut rng = Normal::new(seed);
        let mut slot = vec![0.0; self.slot_words()];
        let (cb, dw, db) = self.offsets();
        let conv_std = (2.0 / (self.in_c * 9) as f64).sqrt();
        let dense_std = (2.0 / (self.features() + self.classes) as f64).sqrt();
        for x in &mut slot[..cb] {
            *x = (rng.next() * conv_std) as f32;
        }
        for x in &mut slot[dw..db] {
            *x = (rng.next() * dense_std) as f32;
        }
        slot
    }

    /// A slot holding `m`'s weights, with zero moments and `t` 0 (to go on training a model).
    pub fn slot_from_model(m: &SmallCnn) -> Vec<f32> {
        let shape = CnnShape::of(m);
        let mut slot = Vec::with_capacity(shape.slot_words());
        for part in [&m.conv_w, &m.conv_b, &m.dense_w, &m.dense_b] {
            slot.extend_from_slice(part);
        }
        slot.resize(shape.slot_words(), 0.0);
        slot
    }

    /// The model in `slot`, for export ([`SmallCnn::to_safetensors`]) or inference. Its
    /// metadata records the step count (`adam_steps`).
    pub fn model_from_slot(&self, slot: &[f32]) -> Result<SmallCnn, GpuError> {
        self.check()?;
        if slot.len() < self.slot_words() {
            return Err(input(format!("slot of {} words for {self:?} ({} expected)", slot.len(), self.slot_words())));
        }
        let (cb, dw, db) = self.offsets();
        let mut metadata = serde_json::Map::new();
        metadata.insert("adam_steps".into(), format!("{}", slot[self.step_word()]).into());
        Ok(SmallCnn {
            in_c: self.in_c,
            h: self.h,
            w: self.w,
            conv_c: self.conv_c,
            classes: self.classes,
            conv_w: slot[..cb].to_vec(),
            conv_b: slot[cb..dw].to_vec(),
            dense_w: slot[dw..db].to_vec(),
            dense_b: slot[db..self.param_len()].to_vec(),
            metadata,
        })
    }

    /// The batch size, after checking the shape, the slot's length, the images and the labels.
    fn check_batch(&self, slot_len: usize, images: &[f32], labels: &[u32]) -> Result<usize, GpuError> {
        self.check()?;
        let n = labels.len();
        if n == 0 {
            return Err(input("empty batch"));
        }
        if images.len() != n * self.input_len() {
            return Err(input(format!("{} image values for {n} labels of {} values each", images.len(), self.input_len())));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= self.classes) {
            return Err(input(format!("label {l} of image {i} is not below {} classes", self.classes)));
        }
        if slot_len != self.slot_words() {
            return Err(input(format!("slot of {slot_len} words for {self:?} ({} expected)", self.slot_words())));
        }
        Ok(n)
    }
}

/// Standard normal draws from a seed: SplitMix64 and Box–Muller (no dependency, the same on
/// every platform).
struct Normal(u64);

impl Normal {
    fn new(seed: u64) -> Self {
        Normal(seed)
    }

    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // (0, 1]: the logarithm below never sees 0.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// One mini-batch step on `slot` in place (the CPU twin of
/// [`GpuKernels::cnn_train_step_async`]): `images` are `labels.len()` NCHW images of
/// `shape`. Returns the batch's loss and hits before the update.
pub fn train_step_cpu(shape: &CnnShape, opt: &Adam, slot: &mut [f32], images: &[f32], labels: &[u32]) -> Result<TrainStats, GpuError> {
    let mut grads = vec![0.0; shape.param_len()];
    let stats = batch_gradients_cpu(shape, slot, images, labels, &mut grads)?;
    let p = shape.param_len();
    let t = slot[shape.step_word()] + 1.0;
    let (bc1, bc2) = (1.0 - opt.beta1.powf(t), 1.0 - opt.beta2.powf(t));
    let (params, rest) = slot.split_at_mut(p);
    let (m, rest) = rest.split_at_mut(p);
    let (v, rest) = rest.split_at_mut(p);
    for i in 0..p {
        let g = grads[i];
        m[i] = opt.beta1 * m[i] + (1.0 - opt.beta1) * g;
        v[i] = opt.beta2 * v[i] + (1.0 - opt.beta2) * g * g;
        params[i] -= opt.lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + opt.eps);
    }
    rest[0] = t;
    Ok(stats)
}

/// One mini-batch step on a windowed slot (`shape.windowed_slot_words()` words) in place: the
/// step of [`train_step_cpu`] on the model, then the batch added to the window, which is
/// returned and emptied once it holds `report_every` samples or more (the CPU twin of
/// [`GpuKernels::cnn_train_step_windowed_async`]).
pub fn train_step_windowed_cpu(shape: &CnnShape, opt: &Adam, slot: &mut [f32], images: &[f32], labels: &[u32], report_every: u32) -> Result<WindowedStats, GpuError> {
    check_window(labels.len(), report_every)?;
    if slot.len() != shape.windowed_slot_words() {
        return Err(input(format!("windowed slot of {} words for {shape:?} ({} expected)", slot.len(), shape.windowed_slot_words())));
    }
    let (model, window) = slot.split_at_mut(shape.slot_words());
    let batch = train_step_cpu(shape, opt, model, images, labels)?;
    Ok(add_to_window(window, batch, report_every))
}

fn check_window(n: usize, report_every: u32) -> Result<(), GpuError> {
    if report_every == 0 || report_every > MAX_REPORT_EVERY || n > MAX_REPORT_EVERY as usize {
        return Err(input(format!("report every {report_every} samples with batches of {n}: both must be 1 to {MAX_REPORT_EVERY}")));
    }
    Ok(())
}

fn total_of(lo: f32, hi: f32) -> u64 {
    hi as u64 * TOTAL_UNIT as u64 + lo as u64
}

/// The window update of the shader's `batch_stats`, in the same f32 operations.
fn add_to_window(w: &mut [f32], batch: TrainStats, report_every: u32) -> WindowedStats {
    let n = batch.samples as f32;
    let (mut loss, mut correct, mut samples) = (w[0] + batch.loss_sum, w[1] + batch.correct as f32, w[2] + n);
    let (mut lo, mut hi) = (w[3] + n, w[4]);
    if lo >= TOTAL_UNIT {
        let k = (lo / TOTAL_UNIT).floor();
        lo -= k * TOTAL_UNIT;
        hi += k;
    }
    let total = total_of(lo, hi);
    let mut report = None;
    if samples >= report_every as f32 {
        report = Some(WindowReport { window: TrainStats { samples: samples as u32, loss_sum: loss, correct: correct as u32 }, total });
        (loss, correct, samples) = (0.0, 0.0, 0.0);
    }
    w.copy_from_slice(&[loss, correct, samples, lo, hi]);
    WindowedStats { batch, report, total }
}

/// The gradient of the batch's mean loss with respect to every parameter of `slot`, written to
/// `grads` (`shape.param_len()` words, the slot's parameter layout), and the batch's loss and
/// hits. The slot is not changed.
pub fn batch_gradients_cpu(shape: &CnnShape, slot: &[f32], images: &[f32], labels: &[u32], grads: &mut [f32]) -> Result<TrainStats, GpuError> {
    let n = shape.check_batch(slot.len(), images, labels)?;
    if grads.len() != shape.param_len() {
        return Err(input(format!("{} gradient words for {} parameters", grads.len(), shape.param_len())));
    }
    let CnnShape { in_c, h, w, conv_c, classes } = *shape;
    let (ph, pw, f) = (h / 2, w / 2, shape.features());
    let (cb_at, dw_at, db_at) = shape.offsets();
    let (conv_w, conv_b) = (&slot[..cb_at], &slot[cb_at..dw_at]);
    let (dense_w, dense_b) = (&slot[dw_at..db_at], &slot[db_at..shape.param_len()]);
    let img = |b: usize, k: usize, y: isize, x: isize| -> Option<f32> {
        (y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w).then(|| images[((b * in_c + k) * h + y as usize) * w + x as usize])
    };

    // Forward: conv + ReLU, max-pool (value and window position of the first maximum), logits.
    let mut conv = vec![0.0f32; n * conv_c * h * w];
    for b in 0..n {
        for c in 0..conv_c {
            for y in 0..h {
                for x in 0..w {
                    let mut s = conv_b[c];
                    for k in 0..in_c {
                        for dy in 0..3 {
                            for dx in 0..3 {
                                if let Some(v) = img(b, k, (y + dy) as isize - 1, (x + dx) as isize - 1) {
                                    s += conv_w[((c * in_c + k) * 3 + dy) * 3 + dx] * v;
                                }
                            }
                        }
                    }
                    conv[((b * conv_c + c) * h + y) * w + x] = s.max(0.0);
                }
            }
        }
    }
    let mut pool = vec![0.0f32; n * f];
    let mut arg = vec![0usize; n * f];
    for (i, (p, a)) in pool.iter_mut().zip(&mut arg).enumerate() {
        let (x, y, cb) = (i % pw, (i / pw) % ph, i / (pw * ph));
        let base = (cb * h + 2 * y) * w + 2 * x;
        let window = [conv[base], conv[base + 1], conv[base + w], conv[base + w + 1]];
        (*a, *p) = (0, window[0]);
        for (j, &v) in window.iter().enumerate().skip(1) {
            if v > *p {
                (*a, *p) = (j, v);
            }
        }
    }
    // Softmax cross-entropy; `g` becomes the gradient of the mean loss w.r.t. the logits.
    let mut g = vec![0.0f32; n * classes];
    let mut stats = TrainStats { samples: n as u32, ..TrainStats::default() };
    for b in 0..n {
        let row = &mut g[b * classes..(b + 1) * classes];
        for (k, l) in row.iter_mut().enumerate() {
            *l = dense_b[k] + dense_w[k * f..(k + 1) * f].iter().zip(&pool[b * f..(b + 1) * f]).map(|(a, x)| a * x).sum::<f32>();
        }
        let (mut top, mut m) = (0, row[0]);
        for (k, &l) in row.iter().enumerate().skip(1) {
            if l > m {
                (top, m) = (k, l);
            }
        }
        let sum: f32 = row.iter().map(|l| (l - m).exp()).sum();
        let label = labels[b] as usize;
        stats.loss_sum += m + sum.ln() - row[label];
        stats.correct += (top == label) as u32;
        for (k, l) in row.iter_mut().enumerate() {
            *l = ((*l - m).exp() / sum - if k == label { 1.0 } else { 0.0 }) / n as f32;
        }
    }

    // Backward: dense, then to the pooled features, through max-pool and ReLU, then conv.
    grads.fill(0.0);
    let (gconv_w, rest) = grads.split_at_mut(cb_at);
    let (gconv_b, rest) = rest.split_at_mut(conv_c);
    let (gdense_w, gdense_b) = rest.split_at_mut(classes * f);
    let mut gpool = vec![0.0f32; n * f];
    for b in 0..n {
        for k in 0..classes {
            let gk = g[b * classes + k];
            gdense_b[k] += gk;
            for j in 0..f {
                gdense_w[k * f + j] += gk * pool[b * f + j];
                gpool[b * f + j] += gk * dense_w[k * f + j];
            }
        }
    }
    for (i, (&gp, &a)) in gpool.iter().zip(&arg).enumerate() {
        let (x, y, cb) = (i % pw, (i / pw) % ph, i / (pw * ph));
        let (b, c) = (cb / conv_c, cb % conv_c);
        let (yy, xx) = (2 * y + a / 2, 2 * x + a % 2);
        // A window whose maximum is 0 came from ReLU's flat side: no gradient.
        if conv[(cb * h + yy) * w + xx] <= 0.0 {
            continue;
        }
        gconv_b[c] += gp;
        for k in 0..in_c {
            for dy in 0..3 {
                for dx in 0..3 {
                    if let Some(v) = img(b, k, (yy + dy) as isize - 1, (xx + dx) as isize - 1) {
                        gconv_w[((c * in_c + k) * 3 + dy) * 3 + dx] += gp * v;
                    }
                }
            }
        }
    }
    Ok(stats)
}

/// Offsets (words) of the parts of a step's scratch binding, and its length: conv (ReLU
/// output), pool, arg, logits, g, loss, correct, gpool, gconv, grad, t.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scratch {
    pub(crate) conv: usize,
    pub(crate) pool: usize,
    pub(crate) arg: usize,
    pub(crate) logits: usize,
    pub(crate) g: usize,
    pub(crate) loss: usize,
    pub(crate) correct: usize,
    pub(crate) gpool: usize,
    pub(crate) gconv: usize,
    pub(crate) grad: usize,
    pub(crate) t: usize,
    pub(crate) len: usize,
}

impl Scratch {
    pub(crate) fn new(shape: &CnnShape, n: usize) -> Scratch {
        let conv_len = n * shape.conv_c * shape.h * shape.w;
        let nf = n * shape.features();
        let nk = n * shape.classes;
        let mut at = 0;
        let mut take = |len: usize| {
            let start = at;
            at += len;
            start
        };
        let s = Scratch {
            conv: take(conv_len),
            pool: take(nf),
            arg: take(nf),
            logits: take(nk),
            g: take(nk),
            loss: take(n),
            correct: take(n),
            gpool: take(nf),
            gconv: take(conv_len),
            grad: take(shape.param_len()),
            t: take(1),
            len: 0,
        };
        Scratch { len: at, ..s }
    }
}

/// What a GPU step reads back: the batch's statistics, or (tests) its whole scratch.
enum Readback {
    Stats,
    // Only the tests read the scratch back.
    #[cfg_attr(not(test), allow(dead_code))]
    Scratch,
}

/// The shader's entry points in the order of a step, with their pipeline-cache keys (shared by
/// every shader of the device).
const PASSES: [(&str, &str); 10] = [
    ("conv_relu", "cnn_train_conv_relu"),
    ("max_pool", "cnn_train_max_pool"),
    ("logits", "cnn_train_logits"),
    ("softmax", "cnn_train_softmax"),
    ("batch_stats", "cnn_train_batch_stats"),
    ("grad_dense", "cnn_train_grad_dense"),
    ("grad_pool", "cnn_train_grad_pool"),
    ("grad_conv_out", "cnn_train_grad_conv_out"),
    ("grad_conv_params", "cnn_train_grad_conv_params"),
    ("adam", "cnn_train_adam"),
];

impl GpuKernels {
    /// One mini-batch step on a slot in device memory, in one submission (the GPU twin of
    /// [`train_step_cpu`]). `arena` `(buffer, offset, len)` is bound in place (offset aligned
    /// to 256) and the slot starts at its 32-bit word `slot_word`; `dirty` `(buffer, offset,
    /// len)` is a `u32` per chunk of `chunk_words` words of the arena binding, also bound in
    /// place: the step stores `1` at `dirty[(slot_word + i) / chunk_words]` for every word `i` of
    /// the slot that it writes (parameters, moments, step count). Only the batch is uploaded and
    /// only the statistics are read back: the batch's loss and hits before the update. Steps on
    /// the same slot run in submission order (the device's one queue).
    pub fn cnn_train_step_async(
        &self,
        shape: &CnnShape,
        opt: &Adam,
        arena: (&wgpu::Buffer, u64, u64),
        slot_word: u32,
        dirty: (&wgpu::Buffer, u64, u64),
        chunk_words: u32,
        images: &[f32],
        labels: &[u32],
    ) -> Pending<TrainStats> {
        self.train_submit(shape, opt, arena, slot_word, dirty, chunk_words, images, labels, 0, Readback::Stats).map(|bytes| stats_of(&bytes).batch)
    }

    /// [`GpuKernels::cnn_train_step_async`] on a windowed slot (`shape.windowed_slot_words()`
    /// words at `slot_word`; the GPU twin of [`train_step_windowed_cpu`]): the same submission
    /// also adds the batch to the slot's window and, once it holds `report_every` samples or
    /// more, copies the window to the read-back and empties it; its words are marked dirty too.
    /// A step queued behind another on the same slot sees the window that one left.
    pub fn cnn_train_step_windowed_async(
        &self,
        shape: &CnnShape,
        opt: &Adam,
        arena: (&wgpu::Buffer, u64, u64),
        slot_word: u32,
        dirty: (&wgpu::Buffer, u64, u64),
        chunk_words: u32,
        images: &[f32],
        labels: &[u32],
        report_every: u32,
    ) -> Pending<WindowedStats> {
        if let Err(e) = check_window(labels.len(), report_every) {
            return Pending::ready(Err(e));
        }
        self.train_submit(shape, opt, arena, slot_word, dirty, chunk_words, images, labels, report_every, Readback::Stats).map(|bytes| stats_of(&bytes))
    }

    /// [`GpuKernels::cnn_train_step_async`] reading back its scratch ([`Scratch`]) instead of
    /// the statistics: tests check the forward values and gradients with it.
    #[cfg(test)]
    pub(crate) fn cnn_train_step_scratch(
        &self,
        shape: &CnnShape,
        opt: &Adam,
        arena: (&wgpu::Buffer, u64, u64),
        slot_word: u32,
        dirty: (&wgpu::Buffer, u64, u64),
        chunk_words: u32,
        images: &[f32],
        labels: &[u32],
    ) -> Result<Vec<f32>, GpuError> {
        let bytes = self.train_submit(shape, opt, arena, slot_word, dirty, chunk_words, images, labels, 0, Readback::Scratch).wait()?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn train_submit(
        &self,
        shape: &CnnShape,
        opt: &Adam,
        arena: (&wgpu::Buffer, u64, u64),
        slot_word: u32,
        dirty: (&wgpu::Buffer, u64, u64),
        chunk_words: u32,
        images: &[f32],
        labels: &[u32],
        report_every: u32,
        readback: Readback,
    ) -> Pending<Vec<u8>> {
        // `report_every` 0: a plain slot, no window.
        let words = if report_every == 0 { shape.slot_words() } else { shape.windowed_slot_words() };
        let n = match shape.check_batch(shape.slot_words(), images, labels).and_then(|n| check_resident(shape, n, words, arena, slot_word, dirty, chunk_words)) {
            Ok(n) => n,
            Err(e) => return Pending::ready(Err(e)),
        };
        // The longest loops of an invocation (a loop of N iterations costs N + 1 on lavapipe):
        // a conv weight's gradient over the batch's pixels, a logit over the features, a dense
        // weight's gradient over the batch.
        let (h, w) = (shape.h, shape.w);
        let most = (n * (h * (w + 2) + 2) + 2).max(shape.features() + 2).max(2 * (n + 1)).max(4 * (shape.classes + 1));
        if let Err(e) = self.check_loops(most, || format!("cnn training: a batch of {n} images of {h}×{w}")) {
            return Pending::ready(Err(e));
        }
        let s = Scratch::new(shape, n);
        let (cb, dw, db) = shape.offsets();
        let u = |x: usize| x as u32;
        let mut dims = [0u32; 32];
        dims[..30].copy_from_slice(&[
            u(n),
            u(shape.in_c),
            u(shape.h),
            u(shape.w),
            u(shape.conv_c),
            u(shape.classes),
            slot_word,
            chunk_words,
            opt.lr.to_bits(),
            opt.beta1.to_bits(),
            opt.beta2.to_bits(),
            opt.eps.to_bits(),
            u(s.conv),
            u(s.pool),
            u(s.arg),
            u(s.logits),
            u(s.g),
            u(s.loss),
            u(s.correct),
            u(s.gpool),
            u(s.gconv),
            u(s.grad),
            u(s.t),
            u(cb),
            u(dw),
            u(db),
            u(shape.param_len()),
            u(shape.features()),
            report_every,
            u(shape.slot_words()),
        ]);
        let conv_len = n * shape.conv_c * shape.h * shape.w;
        let nf = n * shape.features();
        let items = [
            conv_len,
            nf,
            n * shape.classes,
            n,
            1,
            shape.classes * shape.features() + shape.classes,
            nf,
            conv_len,
            shape.conv_w_len() + shape.conv_c,
            shape.param_len() + 1,
        ];
        let passes: Vec<_> = PASSES
            .iter()
            .zip(items)
            .map(|(&(entry, key), len)| {
                let (gx, gy) = grid(len);
                (self.pipeline(key, SHADER, entry, 7), gx, gy)
            })
            .collect();
        let (read, read_len) = match readback {
            Readback::Stats => (5, STATS_BYTES),
            Readback::Scratch => (4, s.len * 4),
        };
        self.engine.submit(
            &[
                Bind::Resident(arena.0, arena.1, arena.2),
                Bind::Resident(dirty.0, dirty.1, dirty.2),
                Bind::In(bytemuck::cast_slice(images)),
                Bind::In(bytemuck::cast_slice(labels)),
                Bind::Out((s.len * 4) as u64),
                Bind::Out(STATS_BYTES as u64),
                Bind::In(bytemuck::cast_slice(&dims)),
            ],
            &passes,
            read,
            move |bytes| Ok(bytes[..read_len].to_vec()),
        )
    }
}

/// Bytes of a step's statistics: the batch's samples, loss and hits; whether it closed the window,
/// then the window's samples, loss and hits; the samples in all (low, high word); padding.
const STATS_BYTES: usize = 48;

/// A step's read-back statistics.
fn stats_of(bytes: &[u8]) -> WindowedStats {
    let s: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[..STATS_BYTES]);
    let batch = TrainStats { samples: s[0] as u32, loss_sum: s[1], correct: s[2] as u32 };
    let total = total_of(s[7], s[8]);
    let report = (s[3] != 0.0).then(|| WindowReport { window: TrainStats { samples: s[4] as u32, loss_sum: s[5], correct: s[6] as u32 }, total });
    WindowedStats { batch, report, total }
}

/// The batch size `n` once the resident bindings hold the slot (`words` words) and its dirty
/// chunks, and every index of the step fits the shader's 32-bit arithmetic.
fn check_resident(shape: &CnnShape, n: usize, words: usize, arena: (&wgpu::Buffer, u64, u64), slot_word: u32, dirty: (&wgpu::Buffer, u64, u64), chunk_words: u32) -> Result<usize, GpuError> {
    for (name, (buf, off, len)) in [("arena", arena), ("dirty map", dirty)] {
        if !off.is_multiple_of(256) || off.checked_add(len).is_none_or(|end| end > buf.size()) {
            return Err(input(format!("{name} binding {off}+{len} bytes: offset not aligned to 256 or beyond its {}-byte buffer", buf.size())));
        }
    }
    let end = slot_word as u64 + words as u64;
    if end * 4 > arena.2 {
        return Err(input(format!("slot at word {slot_word} of {words} words is beyond the {}-byte arena binding", arena.2)));
    }
    if chunk_words == 0 || (end - 1) / chunk_words as u64 * 4 + 4 > dirty.2 {
        return Err(input(format!(
            "dirty map of {} bytes has no entry for word {} in chunks of {chunk_words} words",
            dirty.2,
            end - 1
        )));
    }
    let largest = [n * shape.conv_c * shape.h * shape.w, n * shape.input_len(), Scratch::new(shape, n).len, end as usize];
    if largest.iter().any(|&x| x >= 1 << 31) {
        return Err(input(format!("batch of {n} images of {shape:?} needs indices beyond 2^31")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests;

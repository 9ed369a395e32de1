//! The training step on both paths: against the float64 reference of
//! `scripts/cnn_train_reference.py`, a hand-checked max-pool tie, each other on a random batch,
//! and held-out accuracy after training on the digits. On the GPU path a missing adapter fails
//! the tests when `WEIR_REQUIRE_GPU=1` (CI, on Mesa's lavapipe); it never skips silently.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::*;
use crate::kernels::cpu::CpuKernels;
use crate::kernels::Kernels;

use crate::test_device::gpu;

/// The GPU's default transfer path and, where that is direct (lavapipe), the staged one too:
/// resident bindings must work on both.
fn gpu_paths() -> Vec<&'static GpuKernels> {
    static STAGED: OnceLock<Option<GpuKernels>> = OnceLock::new();
    let Some(g) = gpu() else { return Vec::new() };
    let mut v = vec![g];
    if g.direct() {
        let staged = STAGED.get_or_init(|| GpuKernels::with_transfer(Arc::clone(g.context()), crate::TransferMode::Staged, 3).ok());
        v.push(staged.as_ref().expect("staged path"));
    }
    v
}

fn repo() -> PathBuf {
    // Cargo sets CARGO_MANIFEST_DIR when it runs a test too: prefer that to the compile-time
    // path (CI's shared target directory may hold a binary built in another clone).
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    dir.join("../..")
}

/// A model slot in device memory, as the state store holds it: an arena of `words` words and a
/// dirty map of one `u32` per chunk of `chunk_words` words.
struct OnDevice {
    arena: wgpu::Buffer,
    dirty: wgpu::Buffer,
    chunk_words: u32,
}

impl OnDevice {
    fn new(g: &GpuKernels, arena: &[f32], chunk_words: u32) -> OnDevice {
        let ctx = g.context();
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let buffer = |len: usize, label| ctx.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: (len as u64 * 4).next_multiple_of(256), usage, mapped_at_creation: false });
        let d = OnDevice { arena: buffer(arena.len(), "test-arena"), dirty: buffer(arena.len().div_ceil(chunk_words as usize), "test-dirty"), chunk_words };
        ctx.queue.write_buffer(&d.arena, 0, bytemuck::cast_slice(arena));
        ctx.queue.write_buffer(&d.dirty, 0, &vec![0u8; d.dirty.size() as usize]);
        d
    }

    fn step(&self, g: &GpuKernels, shape: &CnnShape, opt: &Adam, slot_word: u32, images: &[f32], labels: &[u32]) -> Pending<TrainStats> {
        g.cnn_train_step_async(shape, opt, self.bindings().0, slot_word, self.bindings().1, self.chunk_words, images, labels)
    }

    fn step_scratch(&self, g: &GpuKernels, shape: &CnnShape, opt: &Adam, slot_word: u32, images: &[f32], labels: &[u32]) -> Vec<f32> {
        let (arena, dirty) = self.bindings();
        g.cnn_train_step_scratch(shape, opt, arena, slot_word, dirty, self.chunk_words, images, labels).unwrap()
    }

    fn bindings(&self) -> ((&wgpu::Buffer, u64, u64), (&wgpu::Buffer, u64, u64)) {
        ((&self.arena, 0, self.arena.size()), (&self.dirty, 0, self.dirty.size()))
    }

    fn arena(&self, g: &GpuKernels) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(&read(g, &self.arena))
    }

    fn dirty(&self, g: &GpuKernels) -> Vec<u32> {
        bytemuck::pod_collect_to_vec(&read(g, &self.dirty))
    }
}

/// A device buffer's bytes, after everything submitted so far.
fn read(g: &GpuKernels, buf: &wgpu::Buffer) -> Vec<u8> {
    let ctx = g.context();
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test-readback"),
        size: buf.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
    enc.map_buffer_on_submit(&staging, wgpu::MapMode::Read, .., |r| r.expect("map the readback"));
    let index = ctx.queue.submit([enc.finish()]);
    ctx.device.poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None }).unwrap();
    let bytes = staging.get_mapped_range(..).unwrap().to_vec();
    staging.unmap();
    bytes
}

/// `got` is within `rtol · |want| + atol` of `want`, element by element.
fn assert_close(got: &[f32], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= rtol * w.abs() + atol, "{what}[{i}]: {g} but {w} expected (±{})", rtol * w.abs() + atol);
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

struct Reference {
    shape: CnnShape,
    adam: Adam,
    images: Vec<f32>,
    labels: Vec<u32>,
    /// The slot before, after one and after two steps.
    slots: Vec<Vec<f64>>,
    /// Per step: logits, loss_sum, correct, gradients.
    steps: Vec<(Vec<f64>, f64, u32, Vec<f64>)>,
}

fn reference() -> Reference {
    let path = repo().join("crates/weir-gpu/tests/data/cnn_train_reference.json");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let us = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let fs = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>();
    let s = &j["shape"];
    let a = &j["adam"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
    Reference {
        shape: CnnShape { in_c: us(&s["in_c"]), h: us(&s["h"]), w: us(&s["w"]), conv_c: us(&s["conv_c"]), classes: us(&s["classes"]) },
        adam: Adam { lr: f(&a["lr"]), beta1: f(&a["beta1"]), beta2: f(&a["beta2"]), eps: f(&a["eps"]) },
        images: fs(&j["images"]).iter().map(|&x| x as f32).collect(),
        labels: j["labels"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
        slots: j["slots"].as_array().unwrap().iter().map(fs).collect(),
        steps: j["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|st| (fs(&st["logits"]), st["loss_sum"].as_f64().unwrap(), st["correct"].as_u64().unwrap() as u32, fs(&st["grads"])))
            .collect(),
    }
}

// Tolerances against the float64 reference: float32 sums of a few dozen terms.
const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-6;

#[test]
fn reference_step_on_the_cpu() {
    let r = reference();
    assert_eq!(r.slots[0].len(), r.shape.slot_words(), "the script's slot layout is CnnShape's");
    let mut slot: Vec<f32> = r.slots[0].iter().map(|&x| x as f32).collect();
    for (k, (_, loss, correct, grads)) in r.steps.iter().enumerate() {
        let mut g = vec![0.0; r.shape.param_len()];
        let before = slot.clone();
        let st = batch_gradients_cpu(&r.shape, &slot, &r.images, &r.labels, &mut g).unwrap();
        assert_eq!(slot, before, "gradients leave the slot alone");
        assert_close(&g, grads, RTOL, ATOL, &format!("cpu gradients of step {}", k + 1));
        let st2 = train_step_cpu(&r.shape, &r.adam, &mut slot, &r.images, &r.labels).unwrap();
        assert_eq!(st, st2);
        assert_eq!((st.samples, st.correct), (3, *correct));
        assert_close(&[st.loss_sum], &[*loss], RTOL, ATOL, "cpu loss_sum");
        assert_close(&slot, &r.slots[k + 1], RTOL, ATOL, &format!("cpu slot after step {}", k + 1));
    }
}

#[test]
fn reference_step_on_the_gpu_in_place_with_dirty_chunks() {
    let r = reference();
    let words = r.shape.slot_words();
    for g in gpu_paths() {
        // The slot sits at an odd word between other words, which must stay as they are; its
        // step count starts a chunk of its own, so that only marking t marks that chunk.
        let chunk_words = 16;
        let slot_word = words + 1;
        assert_eq!((slot_word + r.shape.step_word()) % chunk_words as usize, 0);
        let mut arena: Vec<f32> = (0..3 * words + 8).map(|i| -(i as f32)).collect();
        for (a, &x) in arena[slot_word..slot_word + words].iter_mut().zip(&r.slots[0]) {
            *a = x as f32;
        }
        let dev = OnDevice::new(g, &arena, chunk_words);
        let s = Scratch::new(&r.shape, 3);
        let scratch = dev.step_scratch(g, &r.shape, &r.adam, slot_word as u32, &r.images, &r.labels);
        let (logits, loss, correct, grads) = &r.steps[0];
        assert_close(&scratch[s.logits..s.logits + 12], logits, RTOL, ATOL, "gpu logits");
        assert_close(&scratch[s.grad..s.grad + r.shape.param_len()], grads, RTOL, ATOL, "gpu gradients of step 1");
        assert_close(&[scratch[s.loss..s.loss + 3].iter().sum::<f32>()], &[*loss], RTOL, ATOL, "gpu loss_sum of step 1");
        assert_eq!(scratch[s.correct..s.correct + 3].iter().sum::<f32>(), *correct as f32);
        let after = dev.arena(g);
        assert_close(&after[slot_word..slot_word + words], &r.slots[1], RTOL, ATOL, "gpu slot after step 1");
        assert_eq!(after[..slot_word], arena[..slot_word], "words before the slot");
        assert_eq!(after[slot_word + words..arena.len()], arena[slot_word + words..], "words after the slot");

        let st = dev.step(g, &r.shape, &r.adam, slot_word as u32, &r.images, &r.labels).wait().unwrap();
        let (_, loss, correct, _) = &r.steps[1];
        assert_eq!((st.samples, st.correct), (3, *correct));
        assert_close(&[st.loss_sum], &[*loss], RTOL, ATOL, "gpu loss_sum of step 2");
        let after = dev.arena(g);
        assert_close(&after[slot_word..slot_word + words], &r.slots[2], RTOL, ATOL, "gpu slot after step 2");
        assert_eq!(after[slot_word + words..arena.len()], arena[slot_word + words..], "words after the slot");

        // Marked: exactly the chunks holding the words written (parameters, m, v, t).
        let dirty = dev.dirty(g);
        let cw = chunk_words as usize;
        let first = slot_word / cw;
        let last = (slot_word + r.shape.step_word()) / cw;
        for (c, &d) in dirty.iter().enumerate() {
            assert_eq!(d, (first..=last).contains(&c) as u32, "dirty[{c}] (slot chunks {first}..={last})");
        }
    }
}

/// Max-pool backward, checked by hand. One channel, 2×2 images, a conv that copies the pixel
/// (centre weight 1, bias 0), one pooled feature, dense weights [1, −1], label 0. Both images'
/// windows tie: A = [0.5 0.5; 0.2 0.5] at positions 0, 1, 3; B = [0.1 0.5; 0.2 0.5] at 1 and 3.
/// The gradient goes to the first maximum only: A's (0,0), B's (0,1).
///
/// Both images pool 0.5, so the logits are [0.5, −0.5], p0 = 1/(1+e⁻¹) and, for the mean loss of
/// 2 images, dL/dlogits = [p0−1, 1−p0]/2 per image; the pooled feature's gradient is
/// q = (p0−1)/2·1 + (1−p0)/2·(−1) = p0−1 per image. A conv weight (dy, dx) gets q times the
/// pixel at (y+dy−1, x+dx−1) from the chosen (y, x) of each image:
///   A at (0,0): (1,1) 0.5, (1,2) 0.5, (2,1) 0.2, (2,2) 0.5
///   B at (0,1): (1,0) 0.1, (1,1) 0.5, (2,0) 0.2, (2,1) 0.5
/// so conv_w' = q·[0 0 0; 0.1 1.0 0.5; 0.2 0.7 0.5] and conv_b' = 2q. (Were ties split, or the last
/// maximum taken, (1,0), (1,2) or (2,2) would differ.)
#[test]
fn max_pool_backward_sends_a_tie_to_the_first_maximum() {
    let shape = CnnShape { in_c: 1, h: 2, w: 2, conv_c: 1, classes: 2 };
    let mut slot = vec![0.0; shape.slot_words()];
    slot[4] = 1.0; // conv centre
    slot[10..12].copy_from_slice(&[1.0, -1.0]); // dense.weight [2, 1]
    let images = [0.5, 0.5, 0.2, 0.5, 0.1, 0.5, 0.2, 0.5];
    let labels = [0, 0];
    let p0 = 1.0 / (1.0 + (-1.0f64).exp());
    let q = p0 - 1.0;
    let mut want = [0.0, 0.0, 0.0, 0.1, 1.0, 0.5, 0.2, 0.7, 0.5, 2.0].map(|x| x * q).to_vec();
    want.extend([(p0 - 1.0) / 2.0 * 0.5 * 2.0, (1.0 - p0) / 2.0 * 0.5 * 2.0, p0 - 1.0, 1.0 - p0]); // dense w, b
    let mut g = vec![0.0; shape.param_len()];
    let st = batch_gradients_cpu(&shape, &slot, &images, &labels, &mut g).unwrap();
    assert_close(&g, &want, 1e-6, 1e-7, "cpu gradients");
    assert_eq!(st.correct, 2);
    for gk in gpu_paths() {
        let dev = OnDevice::new(gk, &slot, 4);
        let scratch = dev.step_scratch(gk, &shape, &Adam::default(), 0, &images, &labels);
        let s = Scratch::new(&shape, 2);
        assert_eq!(scratch[s.arg..s.arg + 2], [0.0, 1.0], "gpu window argmax");
        assert_close(&scratch[s.grad..s.grad + shape.param_len()], &want, 1e-6, 1e-7, "gpu gradients");
    }
}

/// Deterministic values in [0, 1).
fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

#[test]
fn both_paths_agree_on_random_batches() {
    let shape = CnnShape { in_c: 2, h: 8, w: 6, conv_c: 5, classes: 7 };
    let n = 40;
    let opt = Adam { lr: 0.003, ..Adam::default() };
    // The same batch three times: the loss must fall.
    let batch = (lcg(1, n * shape.input_len()), lcg(100, n).iter().map(|&x| (x * shape.classes as f32) as u32).collect::<Vec<u32>>());
    let batches = vec![batch.clone(), batch.clone(), batch];
    let mut cpu = vec![shape.init_slot(11)];
    let mut cpu_stats = Vec::new();
    let mut cpu_grads = vec![0.0; shape.param_len()];
    batch_gradients_cpu(&shape, &cpu[0], &batches[0].0, &batches[0].1, &mut cpu_grads).unwrap();
    for (images, labels) in &batches {
        let mut slot = cpu.last().unwrap().clone();
        cpu_stats.push(train_step_cpu(&shape, &opt, &mut slot, images, labels).unwrap());
        cpu.push(slot);
    }
    assert!(cpu_stats[2].loss_sum < cpu_stats[0].loss_sum, "training lowers the loss: {cpu_stats:?}");
    for g in gpu_paths() {
        let slot_word = 4;
        let mut arena = vec![0.0; slot_word + shape.slot_words()];
        arena[slot_word..].copy_from_slice(&cpu[0]);
        let dev = OnDevice::new(g, &arena, 64);
        let (images, labels) = &batches[0];
        let scratch = dev.step_scratch(g, &shape, &opt, slot_word as u32, images, labels);
        let s = Scratch::new(&shape, n);
        assert_close(&scratch[s.grad..s.grad + shape.param_len()], &f64s(&cpu_grads), 1e-4, 1e-6, "gpu gradients vs cpu");
        // Two more steps queued behind each other, waited for together.
        let pending: Vec<_> = batches[1..].iter().map(|(images, labels)| dev.step(g, &shape, &opt, slot_word as u32, images, labels)).collect();
        let stats = Pending::all(pending).wait().unwrap();
        for (k, (got, want)) in stats.iter().zip(&cpu_stats[1..]).enumerate() {
            assert_eq!((got.samples, got.correct), (want.samples, want.correct), "stats of step {}", k + 2);
            assert_close(&[got.loss_sum], &[want.loss_sum as f64], 1e-5, 0.0, "loss_sum");
        }
        assert_close(&dev.arena(g)[slot_word..slot_word + shape.slot_words()], &f64s(&cpu[3]), 1e-4, 1e-6, "gpu slot vs cpu after 3 steps");
    }
}

#[test]
fn bad_batches_and_bindings_are_refused_with_what_is_wrong() {
    let shape = CnnShape { in_c: 1, h: 4, w: 4, conv_c: 2, classes: 3 };
    let mut slot = shape.init_slot(1);
    let opt = Adam::default();
    let err = |r: Result<TrainStats, GpuError>| r.unwrap_err().to_string();
    assert!(err(train_step_cpu(&shape, &opt, &mut slot, &[0.0; 16], &[3])).contains("label 3 of image 0"));
    assert!(err(train_step_cpu(&shape, &opt, &mut slot, &[0.0; 15], &[0])).contains("15 image values"));
    assert!(err(train_step_cpu(&shape, &opt, &mut slot[1..], &[0.0; 16], &[0])).contains("slot of"));
    assert!(err(train_step_cpu(&CnnShape { h: 3, ..shape }, &opt, &mut slot, &[0.0; 12], &[0])).contains("even"));
    assert!(err(train_step_cpu(&shape, &opt, &mut slot, &[], &[])).contains("empty batch"));
    assert!(shape.model_from_slot(&slot[1..]).is_err());
    for g in gpu_paths() {
        let dev = OnDevice::new(g, &slot, 8);
        let (arena, dirty) = dev.bindings();
        let words = shape.slot_words() as u32;
        let step = |arena, slot_word, dirty, chunk| err(g.cnn_train_step_async(&shape, &opt, arena, slot_word, dirty, chunk, &[0.0; 16], &[0]).wait());
        let past = (arena.2 / 4) as u32 - words + 1;
        assert!(step(arena, past, dirty, 8).contains("beyond the"), "slot past the arena binding");
        assert!(step((arena.0, 4, arena.2 - 4), 0, dirty, 8).contains("aligned to 256"));
        assert!(step(arena, 0, (dirty.0, 0, 4), 8).contains("dirty map"));
        assert!(step(arena, 0, dirty, 0).contains("dirty map"));
        // Refused before anything ran: the slot is as it was.
        assert_eq!(dev.arena(g)[..words as usize], slot[..]);
    }
}

#[test]
fn slots_and_models_round_trip_through_safetensors() {
    let path = repo().join("models/digits_cnn.safetensors");
    let trained = crate::cnn::SmallCnn::load(&path, 8, 8).unwrap();
    let shape = CnnShape::of(&trained);
    let slot = CnnShape::slot_from_model(&trained);
    assert_eq!(slot.len(), shape.slot_words());
    assert!(slot[shape.param_len()..].iter().all(|&x| x == 0.0), "fresh moments and step count");
    let back = shape.model_from_slot(&slot).unwrap();
    assert_eq!((back.conv_w.as_slice(), back.conv_b.as_slice()), (trained.conv_w.as_slice(), trained.conv_b.as_slice()));
    assert_eq!((back.dense_w.as_slice(), back.dense_b.as_slice()), (trained.dense_w.as_slice(), trained.dense_b.as_slice()));

    let dir = std::env::temp_dir().join(format!("weir-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let odd = CnnShape { in_c: 3, h: 6, w: 4, conv_c: 2, classes: 5 };
    let mut fresh = odd.init_slot(9);
    fresh[odd.step_word()] = 17.0;
    let fresh = odd.model_from_slot(&fresh).unwrap();
    assert_eq!(fresh.metadata["adam_steps"], "17");
    for (name, model) in [("trained", trained.clone()), ("fresh", fresh)] {
        let file = dir.join(format!("{name}.safetensors"));
        std::fs::write(&file, model.to_safetensors()).unwrap();
        let loaded = crate::cnn::SmallCnn::load(&file, model.h, model.w).unwrap();
        assert_eq!(loaded, model, "{name} round trip, metadata included");
    }
    assert_eq!(trained.metadata["test_images"], "359", "the script's metadata survives");
    std::fs::remove_dir_all(&dir).unwrap();

    // init_slot: deterministic per seed, zero biases and moments, sensible scale.
    let s = CnnShape { in_c: 1, h: 8, w: 8, conv_c: 8, classes: 10 };
    assert_eq!(s.init_slot(5), s.init_slot(5));
    assert_ne!(s.init_slot(5), s.init_slot(6));
    let slot = s.init_slot(5);
    let (cb, dw, db) = s.offsets();
    assert!(slot[cb..dw].iter().chain(&slot[db..]).all(|&x| x == 0.0));
    let std = |xs: &[f32]| (xs.iter().map(|&x| (x * x) as f64).sum::<f64>() / xs.len() as f64).sqrt();
    assert!((std(&slot[..cb]) - (2.0f64 / 9.0).sqrt()).abs() < 0.15, "conv std {}", std(&slot[..cb]));
    assert!((std(&slot[dw..db]) - (2.0f64 / 138.0).sqrt()).abs() < 0.02, "dense std {}", std(&slot[dw..db]));
}

/// `{"label", "pixels"}` lines of a JSONL file.
fn digits(rel: &str) -> (Vec<f32>, Vec<u32>) {
    let text = std::fs::read_to_string(repo().join(rel)).unwrap();
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        labels.push(v["label"].as_u64().unwrap() as u32);
        let p = v["pixels"].as_array().unwrap();
        assert_eq!(p.len(), 64, "{rel}: 8×8 pixels");
        pixels.extend(p.iter().map(|x| x.as_f64().unwrap() as f32));
    }
    (pixels, labels)
}

const DIGITS: CnnShape = CnnShape { in_c: 1, h: 8, w: 8, conv_c: 8, classes: 10 };
const BATCH: usize = 32;
const EPOCHS: usize = 10;

/// Mini-batches of 32 over the training split, in a fresh deterministic order per epoch.
fn epoch_batches(train: &(Vec<f32>, Vec<u32>), epoch: usize) -> Vec<(Vec<f32>, Vec<u32>)> {
    let n = train.1.len();
    let keys = lcg(1000 + epoch as u64, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
    order
        .chunks(BATCH)
        .map(|idx| (idx.iter().flat_map(|&i| train.0[i * 64..(i + 1) * 64].iter().copied()).collect(), idx.iter().map(|&i| train.1[i]).collect()))
        .collect()
}

/// Held-out accuracy of the model in `slot`, by `SmallCnn` inference.
fn held_out_accuracy(slot: &[f32]) -> f64 {
    let (pixels, labels) = digits("models/digits_test.jsonl");
    let model = DIGITS.model_from_slot(slot).unwrap();
    let logits = CpuKernels::new(1).cnn_forward(&model, &pixels, labels.len()).unwrap();
    let hits = crate::cnn::argmax(&logits, 10).iter().zip(&labels).filter(|(p, &l)| **p == l as usize).count();
    hits as f64 / labels.len() as f64
}

#[test]
fn cpu_twin_learns_the_digits() {
    let train = digits("examples/data/digits_train.jsonl");
    assert_eq!(train.1.len(), 1438);
    let mut slot = DIGITS.init_slot(42);
    assert!(held_out_accuracy(&slot) < 0.5, "an untrained model does not pass by chance");
    let mut first = None;
    let mut last = TrainStats::default();
    for epoch in 0..EPOCHS {
        let mut sum = TrainStats::default();
        for (images, labels) in epoch_batches(&train, epoch) {
            let st = train_step_cpu(&DIGITS, &Adam::default(), &mut slot, &images, &labels).unwrap();
            (sum.samples, sum.loss_sum, sum.correct) = (sum.samples + st.samples, sum.loss_sum + st.loss_sum, sum.correct + st.correct);
        }
        assert_eq!(sum.samples, 1438);
        first.get_or_insert(sum);
        last = sum;
    }
    let first = first.unwrap();
    assert!(last.loss_sum < first.loss_sum / 3.0 && last.correct > first.correct, "epoch 1 {first:?}, last {last:?}");
    assert_eq!(slot[DIGITS.step_word()], (EPOCHS * 1438usize.div_ceil(BATCH)) as f32);
    let acc = held_out_accuracy(&slot);
    assert!(acc >= 0.95, "held-out accuracy {acc}");
}

#[test]
fn gpu_path_learns_the_digits_and_tracks_the_cpu_twin() {
    let train = digits("examples/data/digits_train.jsonl");
    let Some(g) = gpu() else { return };
    let opt = Adam::default();
    let mut cpu = DIGITS.init_slot(42);
    let dev = OnDevice::new(g, &cpu, 256);
    let p = DIGITS.param_len();
    for epoch in 0..EPOCHS {
        let batches = epoch_batches(&train, epoch);
        let (lockstep, rest) = batches.split_at(if epoch == 0 { 10 } else { 0 });
        for (k, (images, labels)) in lockstep.iter().enumerate() {
            let want = train_step_cpu(&DIGITS, &opt, &mut cpu, images, labels).unwrap();
            let got = dev.step(g, &DIGITS, &opt, 0, images, labels).wait().unwrap();
            assert_eq!((got.samples, got.correct), (want.samples, want.correct), "step {}", k + 1);
            assert_close(&[got.loss_sum], &[want.loss_sum as f64], 1e-5, 0.0, &format!("loss_sum of step {}", k + 1));
        }
        if epoch == 0 {
            // The same model after the same steps. (Later, float32 sums in another order drift
            // apart: a gradient near 0 flips an Adam step now and then, and momentum carries it.)
            let got = dev.arena(g);
            assert_close(&got[..p], &f64s(&cpu[..p]), 1e-4, 1e-4, "gpu parameters vs cpu after 10 steps");
            assert_eq!(got[DIGITS.step_word()], 10.0);
        }
        // Steps queue behind each other on the device; the ring bounds how many are in flight.
        let pending: Vec<_> = rest.iter().map(|(images, labels)| dev.step(g, &DIGITS, &opt, 0, images, labels)).collect();
        let stats = Pending::all(pending).wait().unwrap();
        assert_eq!(stats.iter().map(|s| s.samples as usize).sum::<usize>(), rest.iter().map(|b| b.1.len()).sum::<usize>());
    }
    let slot = dev.arena(g);
    assert_eq!(slot[DIGITS.step_word()], (EPOCHS * 45) as f32);
    let acc = held_out_accuracy(&slot[..DIGITS.slot_words()]);
    assert!(acc >= 0.95, "held-out accuracy {acc}");
}

/// The window of a windowed slot: batches add up in it; the step that brings it to
/// `report_every` samples or more returns its totals and empties it; the samples in all carry
/// over 2^20 exactly; the model trains as a plain slot does. The GPU step does the same in the
/// same submission, on a slot in place (its window words marked dirty).
#[test]
fn windowed_steps_report_and_empty_the_window_on_both_paths() {
    let shape = CnnShape { in_c: 1, h: 4, w: 4, conv_c: 3, classes: 4 };
    let opt = Adam::default();
    let batches: Vec<(Vec<f32>, Vec<u32>)> = (0..7)
        .map(|k| (lcg(10 + k, 32 * 16), lcg(50 + k, 32).iter().map(|&x| (x * 4.0) as u32).collect()))
        .collect();
    let every = 70; // three batches of 32 close a window: 96 samples
    let mut plain = shape.init_slot(3);
    let mut slot = plain.clone();
    slot.resize(shape.windowed_slot_words(), 0.0);
    let mut cpu = Vec::new();
    let (mut open_loss, mut open_correct) = (0.0f32, 0u32);
    for (k, (images, labels)) in batches.iter().enumerate() {
        let want = train_step_cpu(&shape, &opt, &mut plain, images, labels).unwrap();
        let got = train_step_windowed_cpu(&shape, &opt, &mut slot, images, labels, every).unwrap();
        assert_eq!(got.batch, want, "step {k}: the batch's statistics");
        assert_eq!(slot[..shape.slot_words()], plain[..], "step {k}: the model trains as a plain slot");
        assert_eq!(got.total, 32 * (k as u64 + 1));
        open_loss += want.loss_sum;
        open_correct += want.correct;
        if k % 3 == 2 {
            let r = got.report.unwrap_or_else(|| panic!("step {k} closes a window"));
            assert_eq!(r, WindowReport { window: TrainStats { samples: 96, loss_sum: open_loss, correct: open_correct }, total: got.total });
            (open_loss, open_correct) = (0.0, 0);
            assert_eq!(shape.window_of(&slot).unwrap(), (TrainStats::default(), got.total), "emptied");
        } else {
            assert_eq!(got.report, None, "step {k}");
            assert_eq!(shape.window_of(&slot).unwrap().0.samples, 32 * (k as u32 % 3 + 1));
        }
        cpu.push(got);
    }
    // The samples in all cross 2^20 exactly (a single f32 word would stop counting at 2^24).
    let mut high = slot.clone();
    high[shape.slot_words() + 3] = (1 << 20) as f32 - 10.0;
    high[shape.slot_words() + 4] = 5.0;
    let got = train_step_windowed_cpu(&shape, &opt, &mut high, &batches[0].0, &batches[0].1, every).unwrap();
    assert_eq!(got.total, 6 * (1 << 20) + 22);
    assert_eq!(shape.window_of(&high).unwrap().1, 6 * (1 << 20) + 22);
    // Refused: no window size, one beyond exact counting, a plain slot.
    let err = |r: Result<WindowedStats, GpuError>| r.unwrap_err().to_string();
    assert!(err(train_step_windowed_cpu(&shape, &opt, &mut slot.clone(), &batches[0].0, &batches[0].1, 0)).contains("report every 0"));
    assert!(err(train_step_windowed_cpu(&shape, &opt, &mut slot.clone(), &batches[0].0, &batches[0].1, MAX_REPORT_EVERY + 1)).contains("report every"));
    assert!(err(train_step_windowed_cpu(&shape, &opt, &mut shape.init_slot(3), &batches[0].0, &batches[0].1, every)).contains("windowed slot of"));

    for g in gpu_paths() {
        // The window's words start a chunk of their own: only marking them marks it.
        let chunk_words = 8u32;
        let slot_word = 8usize;
        assert_eq!((slot_word + shape.slot_words()) % chunk_words as usize, 0);
        let window_chunk = (slot_word + shape.slot_words()) / chunk_words as usize;
        let mut arena = vec![-1.0f32; slot_word + shape.windowed_slot_words() + 6];
        let mut fresh = shape.init_slot(3);
        fresh.resize(shape.windowed_slot_words(), 0.0);
        arena[slot_word..slot_word + fresh.len()].copy_from_slice(&fresh);
        let dev = OnDevice::new(g, &arena, chunk_words);
        let (a, d) = dev.bindings();
        let pending: Vec<_> = batches.iter().map(|(images, labels)| g.cnn_train_step_windowed_async(&shape, &opt, a, slot_word as u32, d, chunk_words, images, labels, every)).collect();
        let got = Pending::all(pending).wait().unwrap();
        for (k, (got, want)) in got.iter().zip(&cpu).enumerate() {
            assert_eq!((got.batch.samples, got.batch.correct, got.total), (want.batch.samples, want.batch.correct, want.total), "gpu step {k}");
            assert_eq!(got.report.map(|r| (r.window.samples, r.window.correct, r.total)), want.report.map(|r| (r.window.samples, r.window.correct, r.total)), "gpu step {k}");
            if let (Some(gr), Some(wr)) = (got.report, want.report) {
                assert_close(&[gr.window.loss_sum], &[wr.window.loss_sum as f64], 1e-5, 0.0, "window loss");
            }
        }
        let after = dev.arena(g);
        let window = shape.window_of(&after[slot_word..slot_word + shape.windowed_slot_words()]).unwrap();
        assert_eq!((window.0.samples, window.0.correct, window.1), (32, cpu[6].batch.correct, 7 * 32), "the open window on the device");
        assert_eq!(after[slot_word + shape.windowed_slot_words()..arena.len()], arena[slot_word + shape.windowed_slot_words()..], "words after the windowed slot");
        for (c, &dirty) in dev.dirty(g).iter().enumerate() {
            assert_eq!(dirty, (1..=window_chunk).contains(&c) as u32, "dirty[{c}] (the slot's chunks 1..={window_chunk})");
        }
        assert!(g.cnn_train_step_windowed_async(&shape, &opt, a, slot_word as u32, d, chunk_words, &batches[0].0, &batches[0].1, 0).wait().is_err());
        // A windowed slot must fit the binding: the last word one past it is refused.
        let past = (a.2 / 4) as u32 - shape.windowed_slot_words() as u32 + 1;
        assert!(g.cnn_train_step_windowed_async(&shape, &opt, a, past, d, chunk_words, &batches[0].0, &batches[0].1, every).wait().unwrap_err().to_string().contains("beyond the"));
    }
}

/// A training step whose conv-gradient invocations loop over the batch's pixels past
/// lavapipe's loop limit (128 images of 28 × 28: about 108 k iterations) is refused there, never
/// computed wrong; elsewhere it runs.
#[test]
fn a_step_past_the_loop_limit_is_refused_where_loops_are_capped() {
    let shape = CnnShape { in_c: 1, h: 28, w: 28, conv_c: 2, classes: 3 };
    let n = 128;
    let opt = Adam::default();
    let images = lcg(7, n * shape.input_len());
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
    for g in gpu_paths() {
        let slot_word = 4;
        let mut arena = vec![0.0; slot_word + shape.slot_words()];
        arena[slot_word..].copy_from_slice(&shape.init_slot(3));
        let dev = OnDevice::new(g, &arena, 64);
        match dev.step(g, &shape, &opt, slot_word as u32, &images, &labels).wait() {
            Err(e) => assert!(g.loops_capped() && e.to_string().contains("65,535"), "{e}"),
            Ok(stats) => {
                assert!(!g.loops_capped(), "lavapipe trained past its loop limit");
                assert_eq!(stats.samples, n as u32);
            }
        }
    }
}

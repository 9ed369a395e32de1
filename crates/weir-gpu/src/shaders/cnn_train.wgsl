// One mini-batch training step of the small CNN (conv 3x3 padding 1 + bias + ReLU -> max-pool
// 2x2 -> dense + bias; softmax cross-entropy; Adam) on a model slot that lives in device memory.
// The passes run in this order, one invocation per output value (weight gradients: one per
// weight, looping over the batch): conv_relu, max_pool, logits, softmax, batch_stats,
// grad_dense, grad_pool, grad_conv_out, grad_conv_params, adam. Only `adam` writes the model, so
// every earlier pass sees the parameters of before the step (`batch_stats` writes the window
// words after the model, which no pass reads).
//
// Slot (32-bit words from arena[dims[6]]): params [conv_w | conv_b | dense_w | dense_b] (P
// words), Adam m (P), Adam v (P), step count t (f32), padding; a windowed slot then has, from
// word dims[29], the window's loss sum, hits and samples and the samples in all (lo + hi * 2^20),
// all f32. See crates/weir-gpu/src/train.rs.
//
// dims: 0 n, 1 in_c, 2 h, 3 w, 4 conv_c, 5 classes, 6 slot_word, 7 chunk_words,
//       8..11 lr, beta1, beta2, eps (f32 bits),
//       12..22 scratch offsets: conv, pool, arg, logits, g, loss, correct, gpool, gconv, grad, t,
//       23 conv_b offset in params, 24 dense_w offset, 25 dense_b offset, 26 P, 27 features,
//       28 report_every (0: no window), 29 the window's first word in the slot.
//
// stats: 0 n, 1 loss sum, 2 hits; 3 1.0 if this step closed the window, then 4..6 the window's
//        samples, loss sum and hits; 7, 8 the samples in all (lo, hi).

@group(0) @binding(0) var<storage, read_write> arena: array<f32>;
// Atomic only so that invocations marking the same chunk do not race (they all store 1).
@group(0) @binding(1) var<storage, read_write> dirty: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read_write> images: array<f32>;
@group(0) @binding(3) var<storage, read_write> labels: array<u32>;
@group(0) @binding(4) var<storage, read_write> scratch: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
@group(0) @binding(6) var<storage, read_write> dims: array<u32, 32>;
// Every binding is read_write: the pool sub-allocates all of them from the same slab.

fn item(gid: vec3<u32>) -> u32 { return gid.x + gid.y * 65535u * 64u; }
fn param(i: u32) -> f32 { return arena[dims[6] + i]; }

@compute @workgroup_size(64)
fn conv_relu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let ic = dims[1]; let h = dims[2]; let w = dims[3]; let oc = dims[4];
    let i = item(gid);
    if (i >= n * oc * h * w) { return; }
    let x = i % w; let y = (i / w) % h; let c = (i / (w * h)) % oc; let b = i / (w * h * oc);
    var s = param(dims[23] + c);
    for (var k = 0u; k < ic; k++) {
        for (var dy = 0u; dy < 3u; dy++) {
            for (var dx = 0u; dx < 3u; dx++) {
                let yy = i32(y + dy) - 1; let xx = i32(x + dx) - 1;
                if (yy >= 0 && yy < i32(h) && xx >= 0 && xx < i32(w)) {
                    s = fma(param(((c * ic + k) * 3u + dy) * 3u + dx), images[((b * ic + k) * h + u32(yy)) * w + u32(xx)], s);
                }
            }
        }
    }
    scratch[dims[12] + i] = max(s, 0.0);
}

// The window's maximum and where it is (0..3, row-major; the first maximum wins a tie, as the
// forward argmax): backward sends the window's whole gradient there.
@compute @workgroup_size(64)
fn max_pool(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let h = dims[2]; let w = dims[3]; let oc = dims[4];
    let ph = h / 2u; let pw = w / 2u;
    let i = item(gid);
    if (i >= n * oc * ph * pw) { return; }
    let x = i % pw; let y = (i / pw) % ph; let cb = i / (pw * ph);
    let base = dims[12] + (cb * h + 2u * y) * w + 2u * x;
    var best = scratch[base];
    var at = 0u;
    let v1 = scratch[base + 1u];
    if (v1 > best) { best = v1; at = 1u; }
    let v2 = scratch[base + w];
    if (v2 > best) { best = v2; at = 2u; }
    let v3 = scratch[base + w + 1u];
    if (v3 > best) { best = v3; at = 3u; }
    scratch[dims[13] + i] = best;
    scratch[dims[14] + i] = f32(at);
}

@compute @workgroup_size(64)
fn logits(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let classes = dims[5]; let f = dims[27];
    let i = item(gid);
    if (i >= n * classes) { return; }
    let k = i % classes; let b = i / classes;
    var s = param(dims[25] + k);
    for (var j = 0u; j < f; j++) { s = fma(param(dims[24] + k * f + j), scratch[dims[13] + b * f + j], s); }
    scratch[dims[15] + i] = s;
}

// Per image: the loss, whether the first largest logit is the label, and the gradient of the
// batch's mean loss with respect to the logits, (softmax - one-hot) / n.
@compute @workgroup_size(64)
fn softmax(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let classes = dims[5];
    let b = item(gid);
    if (b >= n) { return; }
    let row = dims[15] + b * classes;
    var m = scratch[row];
    var top = 0u;
    for (var k = 1u; k < classes; k++) {
        if (scratch[row + k] > m) { m = scratch[row + k]; top = k; }
    }
    var sum = 0.0;
    for (var k = 0u; k < classes; k++) { sum += exp(scratch[row + k] - m); }
    let label = labels[b];
    scratch[dims[17] + b] = m + log(sum) - scratch[row + label];
    scratch[dims[18] + b] = select(0.0, 1.0, top == label);
    for (var k = 0u; k < classes; k++) {
        let p = exp(scratch[row + k] - m) / sum;
        scratch[dims[16] + b * classes + k] = (p - select(0.0, 1.0, k == label)) / f32(n);
    }
}

// One invocation: the batch's totals, the window (a windowed slot), and the step count after
// this step (read here, before `adam` runs, so that no invocation of `adam` reads t while another
// writes it). The window's f32 operations are those of `add_to_window` in train.rs.
@compute @workgroup_size(64)
fn batch_stats(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (item(gid) != 0u) { return; }
    let n = dims[0];
    var loss = 0.0;
    var correct = 0.0;
    for (var b = 0u; b < n; b++) { loss += scratch[dims[17] + b]; correct += scratch[dims[18] + b]; }
    stats[0] = f32(n);
    stats[1] = loss;
    stats[2] = correct;
    for (var i = 3u; i < 9u; i++) { stats[i] = 0.0; }
    scratch[dims[22]] = param(3u * dims[26]) + 1.0;
    let every = dims[28];
    if (every == 0u) { return; }
    let wb = dims[6] + dims[29];
    var wl = arena[wb] + loss;
    var wc = arena[wb + 1u] + correct;
    var ws = arena[wb + 2u] + f32(n);
    var lo = arena[wb + 3u] + f32(n);
    var hi = arena[wb + 4u];
    let unit = 1048576.0;
    if (lo >= unit) {
        let k = floor(lo / unit);
        lo -= k * unit;
        hi += k;
    }
    stats[7] = lo;
    stats[8] = hi;
    if (ws >= f32(every)) {
        stats[3] = 1.0;
        stats[4] = ws;
        stats[5] = wl;
        stats[6] = wc;
        wl = 0.0;
        wc = 0.0;
        ws = 0.0;
    }
    arena[wb] = wl;
    arena[wb + 1u] = wc;
    arena[wb + 2u] = ws;
    arena[wb + 3u] = lo;
    arena[wb + 4u] = hi;
    for (var i = 0u; i < 5u; i++) { mark(dims[29] + i); }
}

@compute @workgroup_size(64)
fn grad_dense(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let classes = dims[5]; let f = dims[27];
    let i = item(gid);
    if (i >= classes * f + classes) { return; }
    var s = 0.0;
    if (i < classes * f) {
        let k = i / f; let j = i % f;
        for (var b = 0u; b < n; b++) { s = fma(scratch[dims[16] + b * classes + k], scratch[dims[13] + b * f + j], s); }
        scratch[dims[21] + dims[24] + i] = s;
    } else {
        let k = i - classes * f;
        for (var b = 0u; b < n; b++) { s += scratch[dims[16] + b * classes + k]; }
        scratch[dims[21] + dims[25] + k] = s;
    }
}

@compute @workgroup_size(64)
fn grad_pool(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let classes = dims[5]; let f = dims[27];
    let i = item(gid);
    if (i >= n * f) { return; }
    let b = i / f; let j = i % f;
    var s = 0.0;
    for (var k = 0u; k < classes; k++) { s = fma(scratch[dims[16] + b * classes + k], param(dims[24] + k * f + j), s); }
    scratch[dims[19] + i] = s;
}

// Through max-pool (to the window's argmax) and ReLU (where the output is positive).
@compute @workgroup_size(64)
fn grad_conv_out(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let h = dims[2]; let w = dims[3]; let oc = dims[4];
    let i = item(gid);
    if (i >= n * oc * h * w) { return; }
    let x = i % w; let y = (i / w) % h; let cb = i / (w * h);
    let p = (cb * (h / 2u) + y / 2u) * (w / 2u) + x / 2u;
    let here = (y % 2u) * 2u + x % 2u;
    var g = 0.0;
    if (scratch[dims[12] + i] > 0.0 && u32(scratch[dims[14] + p]) == here) { g = scratch[dims[19] + p]; }
    scratch[dims[20] + i] = g;
}

@compute @workgroup_size(64)
fn grad_conv_params(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let ic = dims[1]; let h = dims[2]; let w = dims[3]; let oc = dims[4];
    let i = item(gid);
    let nw = oc * ic * 9u;
    if (i >= nw + oc) { return; }
    var s = 0.0;
    if (i < nw) {
        let dx = i % 3u; let dy = (i / 3u) % 3u; let k = (i / 9u) % ic; let c = i / (9u * ic);
        for (var b = 0u; b < n; b++) {
            let go = dims[20] + (b * oc + c) * h * w;
            let im = (b * ic + k) * h * w;
            for (var y = 0u; y < h; y++) {
                let yy = i32(y + dy) - 1;
                if (yy < 0 || yy >= i32(h)) { continue; }
                for (var x = 0u; x < w; x++) {
                    let xx = i32(x + dx) - 1;
                    if (xx < 0 || xx >= i32(w)) { continue; }
                    s = fma(scratch[go + y * w + x], images[im + u32(yy) * w + u32(xx)], s);
                }
            }
        }
        scratch[dims[21] + i] = s;
    } else {
        let c = i - nw;
        for (var b = 0u; b < n; b++) {
            let go = dims[20] + (b * oc + c) * h * w;
            for (var j = 0u; j < h * w; j++) { s += scratch[go + j]; }
        }
        scratch[dims[21] + dims[23] + c] = s;
    }
}

fn mark(word: u32) {
    atomicStore(&dirty[(dims[6] + word) / dims[7]], 1u);
}

// The only pass that writes the slot: parameter i, its moments, and (invocation P) the step count.
@compute @workgroup_size(64)
fn adam(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = dims[26];
    let i = item(gid);
    if (i > p) { return; }
    let t = scratch[dims[22]];
    let sw = dims[6];
    if (i == p) {
        arena[sw + 3u * p] = t;
        mark(3u * p);
        return;
    }
    let lr = bitcast<f32>(dims[8]); let b1 = bitcast<f32>(dims[9]); let b2 = bitcast<f32>(dims[10]); let eps = bitcast<f32>(dims[11]);
    let g = scratch[dims[21] + i];
    let m = b1 * arena[sw + p + i] + (1.0 - b1) * g;
    let v = b2 * arena[sw + 2u * p + i] + (1.0 - b2) * g * g;
    let m_hat = m / (1.0 - pow(b1, t));
    let v_hat = v / (1.0 - pow(b2, t));
    arena[sw + i] = arena[sw + i] - lr * m_hat / (sqrt(v_hat) + eps);
    arena[sw + p + i] = m;
    arena[sw + 2u * p + i] = v;
    mark(i);
    mark(p + i);
    mark(2u * p + i);
}

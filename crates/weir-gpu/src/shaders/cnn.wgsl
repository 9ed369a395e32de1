// A small CNN, layer by layer, one invocation per output value (NCHW):
// conv 3x3 (padding 1) + bias + ReLU -> max-pool 2x2 -> dense + bias.
// dims: n, in_c, h, w, out_c, classes.

@group(0) @binding(0) var<storage, read_write> images: array<f32>;
@group(0) @binding(1) var<storage, read_write> conv_w: array<f32>;
@group(0) @binding(2) var<storage, read_write> conv_b: array<f32>;
@group(0) @binding(3) var<storage, read_write> conv_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> pool_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> dense_w: array<f32>;
@group(0) @binding(6) var<storage, read_write> dense_b: array<f32>;
@group(0) @binding(7) var<storage, read_write> logits: array<f32>;
@group(0) @binding(8) var<storage, read_write> dims: array<u32, 8>;
// Every binding is read_write: the pool sub-allocates all of them from the same slab.

@compute @workgroup_size(64)
fn conv_relu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let ic = dims[1]; let h = dims[2]; let w = dims[3]; let oc = dims[4];
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= n * oc * h * w) { return; }
    let x = i % w; let y = (i / w) % h; let c = (i / (w * h)) % oc; let b = i / (w * h * oc);
    var s = conv_b[c];
    for (var k = 0u; k < ic; k++) {
        for (var dy = 0u; dy < 3u; dy++) {
            for (var dx = 0u; dx < 3u; dx++) {
                let yy = i32(y + dy) - 1; let xx = i32(x + dx) - 1;
                if (yy >= 0 && yy < i32(h) && xx >= 0 && xx < i32(w)) {
                    s = fma(conv_w[((c * ic + k) * 3u + dy) * 3u + dx], images[((b * ic + k) * h + u32(yy)) * w + u32(xx)], s);
                }
            }
        }
    }
    conv_out[i] = max(s, 0.0);
}

@compute @workgroup_size(64)
fn max_pool(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let h = dims[2]; let w = dims[3]; let oc = dims[4];
    let ph = h / 2u; let pw = w / 2u;
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= n * oc * ph * pw) { return; }
    let x = i % pw; let y = (i / pw) % ph; let cb = i / (pw * ph);
    let base = (cb * h + 2u * y) * w + 2u * x;
    pool_out[i] = max(max(conv_out[base], conv_out[base + 1u]), max(conv_out[base + w], conv_out[base + w + 1u]));
}

@compute @workgroup_size(64)
fn dense(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0]; let h = dims[2]; let w = dims[3]; let oc = dims[4]; let classes = dims[5];
    let f = oc * (h / 2u) * (w / 2u);
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= n * classes) { return; }
    let k = i % classes; let b = i / classes;
    var s = dense_b[k];
    for (var j = 0u; j < f; j++) { s = fma(dense_w[k * f + j], pool_out[b * f + j], s); }
    logits[i] = s;
}

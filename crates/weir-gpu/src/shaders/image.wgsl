// Image kernels on f32 images, interleaved channels (row-major H × W × C), clamp-to-edge.
// dims: w, h, c, nw, nh, radius. One invocation per output value.

@group(0) @binding(0) var<storage, read_write> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> tmp: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> dims: array<u32, 8>;
// Every binding is read_write: the pool sub-allocates all of them from the same slab.

fn at(img_x: i32, img_y: i32, ch: u32, w: u32, h: u32, c: u32) -> u32 {
    let x = u32(clamp(img_x, 0, i32(w) - 1));
    let y = u32(clamp(img_y, 0, i32(h) - 1));
    return (y * w + x) * c + ch;
}

// Bilinear resize, pixel centres aligned (align_corners = false).
@compute @workgroup_size(64)
fn resize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = dims[0]; let h = dims[1]; let c = dims[2]; let nw = dims[3]; let nh = dims[4];
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= nw * nh * c) { return; }
    let ch = i % c;
    let x = (i / c) % nw;
    let y = i / (c * nw);
    let sx = clamp((f32(x) + 0.5) * f32(w) / f32(nw) - 0.5, 0.0, f32(w - 1u));
    let sy = clamp((f32(y) + 0.5) * f32(h) / f32(nh) - 0.5, 0.0, f32(h - 1u));
    let x0 = u32(floor(sx)); let y0 = u32(floor(sy));
    let x1 = min(x0 + 1u, w - 1u); let y1 = min(y0 + 1u, h - 1u);
    let fx = sx - f32(x0); let fy = sy - f32(y0);
    let top = src[(y0 * w + x0) * c + ch] * (1.0 - fx) + src[(y0 * w + x1) * c + ch] * fx;
    let bot = src[(y1 * w + x0) * c + ch] * (1.0 - fx) + src[(y1 * w + x1) * c + ch] * fx;
    dst[i] = top * (1.0 - fy) + bot * fy;
}

// Separable Gaussian: horizontal pass src → tmp, vertical pass tmp → dst.
@compute @workgroup_size(64)
fn blur_h(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = dims[0]; let h = dims[1]; let c = dims[2]; let r = i32(dims[5]);
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= w * h * c) { return; }
    let ch = i % c; let x = i32((i / c) % w); let y = i32(i / (c * w));
    var s = 0.0;
    for (var k = -r; k <= r; k++) { s += weights[u32(k + r)] * src[at(x + k, y, ch, w, h, c)]; }
    tmp[i] = s;
}

@compute @workgroup_size(64)
fn blur_v(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = dims[0]; let h = dims[1]; let c = dims[2]; let r = i32(dims[5]);
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= w * h * c) { return; }
    let ch = i % c; let x = i32((i / c) % w); let y = i32(i / (c * w));
    var s = 0.0;
    for (var k = -r; k <= r; k++) { s += weights[u32(k + r)] * tmp[at(x, y + k, ch, w, h, c)]; }
    dst[i] = s;
}

// Sobel gradient magnitude per channel.
@compute @workgroup_size(64)
fn sobel(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = dims[0]; let h = dims[1]; let c = dims[2];
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= w * h * c) { return; }
    let ch = i % c; let x = i32((i / c) % w); let y = i32(i / (c * w));
    let p00 = src[at(x - 1, y - 1, ch, w, h, c)]; let p10 = src[at(x, y - 1, ch, w, h, c)]; let p20 = src[at(x + 1, y - 1, ch, w, h, c)];
    let p01 = src[at(x - 1, y, ch, w, h, c)];                                                 let p21 = src[at(x + 1, y, ch, w, h, c)];
    let p02 = src[at(x - 1, y + 1, ch, w, h, c)]; let p12 = src[at(x, y + 1, ch, w, h, c)]; let p22 = src[at(x + 1, y + 1, ch, w, h, c)];
    let gx = (p20 + 2.0 * p21 + p22) - (p00 + 2.0 * p01 + p02);
    let gy = (p02 + 2.0 * p12 + p22) - (p00 + 2.0 * p10 + p20);
    dst[i] = sqrt(gx * gx + gy * gy);
}

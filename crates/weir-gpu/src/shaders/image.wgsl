// Image kernels on f32 images, interleaved channels (row-major H × W × C), clamp-to-edge.
// dims: w, h, c, nw, nh, radius, rows of output per blur_v_tiled workgroup.
// Resize runs one invocation per output pixel (resize_px, pixel centres aligned: align_corners =
// false), per value beyond 64 channels (resize). The tiled entry points (blur_h_tiled, blur_v_tiled, sobel_tiled) are the ones used; the
// per-value ones below them are the fallbacks for shapes whose tile exceeds workgroup memory
// (a radius over 24, more than 81 channels) or the dispatch limits.

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

// Workgroup memory of the tiled passes: 16 KiB, the least every WebGPU device offers.
var<workgroup> tile: array<f32, 4096>;

// Value `ch` of pixel `x` of row `row`, where `f` = x·c + ch is a flat index within the row that
// may lie outside it (clamp-to-edge: the pixel is clamped, the channel kept).
fn row_value(f: i32, row: u32, w: u32, c: u32) -> f32 {
    let ci = i32(c);
    let ch = ((f % ci) + ci) % ci;
    let x = clamp((f - ch) / ci, 0, i32(w) - 1);
    return src[(row * w + u32(x)) * c + u32(ch)];
}

// Bilinear resize, one invocation per output pixel: the source coordinates and weights are
// computed once for all channels, and each tap's channels are consecutive loads.
@compute @workgroup_size(64)
fn resize_px(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = dims[0]; let h = dims[1]; let c = dims[2]; let nw = dims[3]; let nh = dims[4];
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= nw * nh) { return; }
    let x = i % nw;
    let y = i / nw;
    let sx = clamp((f32(x) + 0.5) * f32(w) / f32(nw) - 0.5, 0.0, f32(w - 1u));
    let sy = clamp((f32(y) + 0.5) * f32(h) / f32(nh) - 0.5, 0.0, f32(h - 1u));
    let x0 = u32(floor(sx)); let y0 = u32(floor(sy));
    let x1 = min(x0 + 1u, w - 1u); let y1 = min(y0 + 1u, h - 1u);
    let fx = sx - f32(x0); let fy = sy - f32(y0);
    let p00 = (y0 * w + x0) * c; let p10 = (y0 * w + x1) * c;
    let p01 = (y1 * w + x0) * c; let p11 = (y1 * w + x1) * c;
    for (var ch = 0u; ch < c; ch++) {
        let top = src[p00 + ch] * (1.0 - fx) + src[p10 + ch] * fx;
        let bot = src[p01 + ch] * (1.0 - fx) + src[p11 + ch] * fx;
        dst[i * c + ch] = top * (1.0 - fy) + bot * fy;
    }
}

// Horizontal Gaussian pass src → tmp, tiled: a workgroup computes 256 consecutive values of one
// row (workgroup_id.y) and first loads them with r pixels either side into workgroup memory, so
// each input value is read from storage once per tile, not 2r + 1 times. 256 + 2·r·c ≤ 4096.
@compute @workgroup_size(256)
fn blur_h_tiled(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let w = dims[0]; let c = dims[2]; let r = dims[5];
    let row = wid.y;
    let start = wid.x * 256u;
    let halo = r * c;
    let span = 256u + 2u * halo;
    let base = i32(start) - i32(halo);
    for (var j = li; j < span; j += 256u) {
        tile[j] = row_value(base + i32(j), row, w, c);
    }
    workgroupBarrier();
    let f = start + li;
    if (f >= w * c) { return; }
    var s = 0.0;
    for (var k = 0u; k <= 2u * r; k++) { s += weights[k] * tile[li + k * c]; }
    tmp[row * w * c + f] = s;
}

// Vertical Gaussian pass tmp → dst, tiled: a 64 × 4 workgroup computes 64 consecutive values of
// `th` = 64 − 2r rows (dims[6]) from 64 rows of them in workgroup memory (r ≤ 24).
@compute @workgroup_size(64, 4)
fn blur_v_tiled(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let w = dims[0]; let h = dims[1]; let c = dims[2]; let r = dims[5]; let th = dims[6];
    let wc = w * c;
    let f = wid.x * 64u + lid.x;
    let fc = min(f, wc - 1u); // columns past the row load a real value that no output uses
    let y0 = i32(wid.y * th) - i32(r);
    let rows = th + 2u * r;
    for (var j = lid.y; j < rows; j += 4u) {
        let y = u32(clamp(y0 + i32(j), 0, i32(h) - 1));
        tile[j * 64u + lid.x] = tmp[y * wc + fc];
    }
    workgroupBarrier();
    if (f >= wc) { return; }
    for (var t = lid.y; t < th; t += 4u) {
        let y = wid.y * th + t;
        if (y >= h) { break; }
        var s = 0.0;
        for (var k = 0u; k <= 2u * r; k++) { s += weights[k] * tile[(t + k) * 64u + lid.x]; }
        dst[y * wc + f] = s;
    }
}

// Sobel, tiled: a 64 × 4 workgroup computes 64 consecutive values of 16 rows from 18 rows of
// 64 + 2c values in workgroup memory (18 · (64 + 2c) ≤ 4096: c ≤ 81).
@compute @workgroup_size(64, 4)
fn sobel_tiled(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let w = dims[0]; let h = dims[1]; let c = dims[2];
    let wc = w * c;
    let stride = 64u + 2u * c;
    let f0 = i32(wid.x * 64u) - i32(c);
    let y0 = i32(wid.y * 16u) - 1;
    for (var j = lid.y; j < 18u; j += 4u) {
        let y = u32(clamp(y0 + i32(j), 0, i32(h) - 1));
        for (var i = lid.x; i < stride; i += 64u) {
            tile[j * stride + i] = row_value(f0 + i32(i), y, w, c);
        }
    }
    workgroupBarrier();
    let f = wid.x * 64u + lid.x;
    if (f >= wc) { return; }
    for (var t = lid.y; t < 16u; t += 4u) {
        let y = wid.y * 16u + t;
        if (y >= h) { break; }
        let o = (t + 1u) * stride + c + lid.x; // this value's centre in the tile
        let p00 = tile[o - stride - c]; let p10 = tile[o - stride]; let p20 = tile[o - stride + c];
        let p01 = tile[o - c];                                      let p21 = tile[o + c];
        let p02 = tile[o + stride - c]; let p12 = tile[o + stride]; let p22 = tile[o + stride + c];
        let gx = (p20 + 2.0 * p21 + p22) - (p00 + 2.0 * p01 + p02);
        let gy = (p02 + 2.0 * p12 + p22) - (p00 + 2.0 * p10 + p20);
        dst[y * wc + f] = sqrt(gx * gx + gy * gy);
    }
}

// Bilinear resize, one invocation per output value (images of more than 64 channels).
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

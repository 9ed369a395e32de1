// Scalar bindings and loads of gemm_tiled.wgsl: any m, n, k.

// Every binding is read_write: the pool sub-allocates inputs and outputs from the same slab,
// and wgpu forbids one buffer being bound read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read_write> dims: array<u32, 4>; // m, n, k

// A[row][col..col+4], zeros outside A unless `inside` says the whole vector is in bounds.
fn load_a(row: u32, col: u32, m: u32, k: u32, inside: bool) -> vec4<f32> {
    if (inside) {
        let i = row * k + col;
        return vec4<f32>(a[i], a[i + 1u], a[i + 2u], a[i + 3u]);
    }
    var v = vec4<f32>(0.0);
    if (row < m) {
        let i = row * k + col;
        if (col < k) { v.x = a[i]; }
        if (col + 1u < k) { v.y = a[i + 1u]; }
        if (col + 2u < k) { v.z = a[i + 2u]; }
        if (col + 3u < k) { v.w = a[i + 3u]; }
    }
    return v;
}

// B[row][col..col+4], zeros outside B unless `inside` says the whole vector is in bounds.
fn load_b(row: u32, col: u32, k: u32, n: u32, inside: bool) -> vec4<f32> {
    if (inside) {
        let i = row * n + col;
        return vec4<f32>(b[i], b[i + 1u], b[i + 2u], b[i + 3u]);
    }
    var v = vec4<f32>(0.0);
    if (row < k) {
        let i = row * n + col;
        if (col < n) { v.x = b[i]; }
        if (col + 1u < n) { v.y = b[i + 1u]; }
        if (col + 2u < n) { v.z = b[i + 2u]; }
        if (col + 3u < n) { v.w = b[i + 3u]; }
    }
    return v;
}

// C[r][col..col+4] = v, the columns past n dropped unless `interior`.
fn store_c(r: u32, col: u32, m: u32, n: u32, v: vec4<f32>, interior: bool) {
    let o = r * n + col;
    if (interior) {
        c[o] = v.x;
        c[o + 1u] = v.y;
        c[o + 2u] = v.z;
        c[o + 3u] = v.w;
    } else if (r < m) {
        if (col < n) { c[o] = v.x; }
        if (col + 1u < n) { c[o + 1u] = v.y; }
        if (col + 2u < n) { c[o + 2u] = v.z; }
        if (col + 3u < n) { c[o + 3u] = v.w; }
    }
}


// vec4 bindings and loads of gemm_tiled.wgsl, for k and n multiples of 4: every vector of A, B and
// C starts at a multiple of 4 values, so it lies wholly inside or wholly outside its matrix.

// Every binding is read_write: the pool sub-allocates inputs and outputs from the same slab,
// and wgpu forbids one buffer being bound read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> a: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> b: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dims: array<u32, 4>; // m, n, k

// A[row][col..col+4] (col a multiple of 4), zeros outside A.
fn load_a(row: u32, col: u32, m: u32, k: u32, inside: bool) -> vec4<f32> {
    if (inside || (row < m && col < k)) { return a[(row * k + col) / 4u]; }
    return vec4<f32>(0.0);
}

// B[row][col..col+4] (col a multiple of 4), zeros outside B.
fn load_b(row: u32, col: u32, k: u32, n: u32, inside: bool) -> vec4<f32> {
    if (inside || (row < k && col < n)) { return b[(row * n + col) / 4u]; }
    return vec4<f32>(0.0);
}

// C[r][col..col+4] = v where the vector is inside C.
fn store_c(r: u32, col: u32, m: u32, n: u32, v: vec4<f32>, interior: bool) {
    if (interior || (r < m && col < n)) { c[(r * n + col) / 4u] = v; }
}


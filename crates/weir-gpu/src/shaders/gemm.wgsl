// Tiled f32 GEMM: C[m×n] = A[m×k] · B[k×n], row-major. A 16×16 workgroup computes a 64×64 tile
// of C, 4×4 outputs per invocation, staging 64×16 of A and 16×64 of B in workgroup memory.
// Sizes need not be multiples of the tile: loads outside A or B read 0, stores outside C are skipped.

// Every binding is read_write: the pool sub-allocates inputs and outputs from the same slab,
// and wgpu forbids one buffer being bound read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read_write> dims: array<u32, 4>; // m, n, k

const TS: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // TS × TK
var<workgroup> Bs: array<f32, 1024>; // TK × TS

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let m = dims[0];
    let n = dims[1];
    let k = dims[2];
    let tid = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }
    for (var t = 0u; t < k; t += TK) {
        for (var i = 0u; i < 4u; i++) {
            let e = tid * 4u + i;
            let ar = wid.y * TS + e / TK;
            let ac = t + e % TK;
            var av = 0.0;
            if (ar < m && ac < k) { av = a[ar * k + ac]; }
            As[e] = av;
            let br = t + e / TS;
            let bc = wid.x * TS + e % TS;
            var bv = 0.0;
            if (br < k && bc < n) { bv = b[br * n + bc]; }
            Bs[e] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a0 = As[(lid.y * 4u + 0u) * TK + kk];
            let a1 = As[(lid.y * 4u + 1u) * TK + kk];
            let a2 = As[(lid.y * 4u + 2u) * TK + kk];
            let a3 = As[(lid.y * 4u + 3u) * TK + kk];
            let bv = vec4<f32>(Bs[kk * TS + lid.x * 4u], Bs[kk * TS + lid.x * 4u + 1u],
                               Bs[kk * TS + lid.x * 4u + 2u], Bs[kk * TS + lid.x * 4u + 3u]);
            for (var j = 0u; j < 4u; j++) {
                acc[j] = fma(a0, bv[j], acc[j]);
                acc[4u + j] = fma(a1, bv[j], acc[4u + j]);
                acc[8u + j] = fma(a2, bv[j], acc[8u + j]);
                acc[12u + j] = fma(a3, bv[j], acc[12u + j]);
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = wid.y * TS + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let col = wid.x * TS + lid.x * 4u + j;
            if (r < m && col < n) { c[r * n + col] = acc[i * 4u + j]; }
        }
    }
}

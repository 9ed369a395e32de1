// Block-tiled f32 GEMM for shapes that fill a GPU: C[m×n] = A[m×k] · B[k×n], row-major.
// A 16×16 workgroup computes a 128×128 tile of C in K steps of TK; each invocation keeps 8×8
// outputs in registers (rows ty*4..+4 and 64+ty*4..+4, the same split for columns, so that the
// 16 invocations of a row read 16 consecutive vec4s of workgroup memory, not strided ones).
// The A tile is stored transposed (k-major) so that an invocation reads its 4 rows at one k as a
// vec4. Two buffers per operand: step s computes on one while the next step's global loads,
// issued before the compute, are stored into the other, so one barrier per step suffices.
// Workgroup memory: 2 operands × 2 buffers × TK × 128 × 4 bytes: 16 KiB (wgpu's default limit)
// with TK = 8, 32 KiB with TK = 16 (half the barriers; on adapters that offer it, where the
// tuning pass finds it faster).
// Interior tiles load without bounds checks (a uniform test per tile and step); edge tiles read 0
// outside A or B and skip stores outside C.
// The bindings and the global loads and stores (load_a, load_b, store_c) come from one of two
// preludes, prepended by gpu.rs: gemm_tiled_vec4.wgsl binds A, B and C as vec4 arrays (one 16-byte
// load per 4 values; k and n multiples of 4, so that a vector is wholly inside or outside its
// matrix), gemm_tiled_scalar.wgsl as f32 arrays (any shape; 4 scalar loads, coalesced across the
// invocations). Binding offsets are 256-byte aligned (transfer.rs), as vec4 arrays need.
// `const TK: u32` (8 or 16, K per step) is prepended by gpu.rs as well.

const TM: u32 = 128u; // tile rows and columns
const V: u32 = 32u; // vec4s per tile row: TM / 4
const BUF: u32 = TK * V; // vec4s per buffer
const LOADS: u32 = TK / 8u; // vec4s of A and of B each invocation loads per step

var<workgroup> As: array<vec4<f32>, 2u * TK * V>; // 2 buffers × TK × V, A transposed: As[kk*V + r/4][r%4]
var<workgroup> Bs: array<vec4<f32>, 2u * TK * V>; // 2 buffers × TK × V: Bs[kk*V + c/4][c%4]

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let m = dims[0];
    let n = dims[1];
    let k = dims[2];
    let tid = lid.y * 16u + lid.x;
    let row0 = wid.y * TM;
    let col0 = wid.x * TM;
    let interior = row0 + TM <= m && col0 + TM <= n;
    // This invocation's share of a step's loads, LOADS times 8 k apart: 4 consecutive k of one A
    // row (two invocations per row), 4 consecutive columns of one B row (32 invocations per row).
    let ar = tid / 2u;
    let ak = (tid % 2u) * 4u;
    let br = tid / V;
    let bc = tid % V;
    let steps = (k + TK - 1u) / TK;

    var acc: array<vec4<f32>, 16>; // acc[i*2 + h]: output row i (of 8), column half h
    for (var i = 0u; i < 16u; i++) { acc[i] = vec4<f32>(0.0); }

    var pa: array<vec4<f32>, LOADS>;
    var pb: array<vec4<f32>, LOADS>;
    for (var j = 0u; j < LOADS; j++) {
        pa[j] = load_a(row0 + ar, ak + j * 8u, m, k, interior && TK <= k);
        pb[j] = load_b(br + j * 8u, col0 + bc * 4u, k, n, interior && TK <= k);
    }
    for (var j = 0u; j < LOADS; j++) {
        let kk = ak + j * 8u;
        As[(kk + 0u) * V + ar / 4u][ar % 4u] = pa[j].x;
        As[(kk + 1u) * V + ar / 4u][ar % 4u] = pa[j].y;
        As[(kk + 2u) * V + ar / 4u][ar % 4u] = pa[j].z;
        As[(kk + 3u) * V + ar / 4u][ar % 4u] = pa[j].w;
        Bs[(br + j * 8u) * V + bc] = pb[j];
    }
    workgroupBarrier();

    for (var s = 0u; s < steps; s++) {
        let cur = (s % 2u) * BUF;
        let more = s + 1u < steps;
        // The next step's global loads go out before this step's arithmetic, to overlap with it.
        if (more) {
            let t = (s + 1u) * TK;
            let inside = interior && t + TK <= k;
            for (var j = 0u; j < LOADS; j++) {
                pa[j] = load_a(row0 + ar, t + ak + j * 8u, m, k, inside);
                pb[j] = load_b(t + br + j * 8u, col0 + bc * 4u, k, n, inside);
            }
        }
        for (var kk = 0u; kk < TK; kk++) {
            let o = cur + kk * V;
            let a0 = As[o + lid.y];
            let a1 = As[o + 16u + lid.y];
            let b0 = Bs[o + lid.x];
            let b1 = Bs[o + 16u + lid.x];
            acc[0] = fma(vec4<f32>(a0.x), b0, acc[0]);
            acc[1] = fma(vec4<f32>(a0.x), b1, acc[1]);
            acc[2] = fma(vec4<f32>(a0.y), b0, acc[2]);
            acc[3] = fma(vec4<f32>(a0.y), b1, acc[3]);
            acc[4] = fma(vec4<f32>(a0.z), b0, acc[4]);
            acc[5] = fma(vec4<f32>(a0.z), b1, acc[5]);
            acc[6] = fma(vec4<f32>(a0.w), b0, acc[6]);
            acc[7] = fma(vec4<f32>(a0.w), b1, acc[7]);
            acc[8] = fma(vec4<f32>(a1.x), b0, acc[8]);
            acc[9] = fma(vec4<f32>(a1.x), b1, acc[9]);
            acc[10] = fma(vec4<f32>(a1.y), b0, acc[10]);
            acc[11] = fma(vec4<f32>(a1.y), b1, acc[11]);
            acc[12] = fma(vec4<f32>(a1.z), b0, acc[12]);
            acc[13] = fma(vec4<f32>(a1.z), b1, acc[13]);
            acc[14] = fma(vec4<f32>(a1.w), b0, acc[14]);
            acc[15] = fma(vec4<f32>(a1.w), b1, acc[15]);
        }
        // The other buffer was last read in step s-1, before every invocation passed that
        // step's barrier: writing it now races with no one.
        if (more) {
            let nxt = BUF - cur;
            for (var j = 0u; j < LOADS; j++) {
                let kk = ak + j * 8u;
                As[nxt + (kk + 0u) * V + ar / 4u][ar % 4u] = pa[j].x;
                As[nxt + (kk + 1u) * V + ar / 4u][ar % 4u] = pa[j].y;
                As[nxt + (kk + 2u) * V + ar / 4u][ar % 4u] = pa[j].z;
                As[nxt + (kk + 3u) * V + ar / 4u][ar % 4u] = pa[j].w;
                Bs[nxt + (br + j * 8u) * V + bc] = pb[j];
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 8u; i++) {
        let r = row0 + (i / 4u) * 64u + lid.y * 4u + i % 4u;
        for (var h = 0u; h < 2u; h++) {
            let col = col0 + h * 64u + lid.x * 4u;
            let v = acc[i * 2u + h];
            store_c(r, col, m, n, v, interior);
        }
    }
}

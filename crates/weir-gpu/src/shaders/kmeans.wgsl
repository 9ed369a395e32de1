// Mini-batch K-means step. `assign`: one invocation per point finds its nearest centroid
// (squared Euclidean distance, lowest index on ties). `update`: one invocation per
// (centroid, dimension) and segment of SEG points sums the coordinates of its points in the
// segment (dimension 0 also counts them) into `partials`; `reduce`: one invocation per output
// adds the segments' partials. Segments keep every loop short: llvmpipe (lavapipe) stops a loop
// after 65,535 iterations, and short loops spread a large batch over many invocations.

// Every binding is read_write: the pool sub-allocates inputs and outputs from the same slab,
// and wgpu forbids one buffer being bound read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> points: array<f32>;     // n × d
@group(0) @binding(1) var<storage, read_write> centroids: array<f32>;  // k × d
@group(0) @binding(2) var<storage, read_write> labels: array<u32>; // n
@group(0) @binding(3) var<storage, read_write> sums: array<f32>; // k × d, then k counts (as f32)
@group(0) @binding(4) var<storage, read_write> dims: array<u32, 4>;    // n, k, d
@group(0) @binding(5) var<storage, read_write> partials: array<f32>; // per segment, as `sums`

// Points per segment (must match SEGMENT in kernels/gpu.rs).
const SEG: u32 = 4096u;

@compute @workgroup_size(64)
fn assign(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0];
    let k = dims[1];
    let d = dims[2];
    let p = gid.x;
    if (p >= n) { return; }
    var best = 0u;
    var best_dist = 3.4e38;
    for (var c = 0u; c < k; c++) {
        var dist = 0.0;
        for (var j = 0u; j < d; j++) {
            let diff = points[p * d + j] - centroids[c * d + j];
            dist = fma(diff, diff, dist);
        }
        if (dist < best_dist) { best_dist = dist; best = c; }
    }
    labels[p] = best;
}

// x: (centroid, dimension); y: segment.
@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0];
    let k = dims[1];
    let d = dims[2];
    let id = gid.x;
    let seg = gid.y;
    if (id >= k * d || seg * SEG >= n) { return; }
    let c = id / d;
    let j = id % d;
    let end = min(n, (seg + 1u) * SEG);
    var s = 0.0;
    var count = 0u;
    for (var p = seg * SEG; p < end; p++) {
        if (labels[p] == c) {
            s += points[p * d + j];
            count += 1u;
        }
    }
    let out = seg * (k * d + k);
    partials[out + id] = s;
    if (j == 0u) { partials[out + k * d + c] = f32(count); }
}

@compute @workgroup_size(64)
fn reduce(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0];
    let k = dims[1];
    let d = dims[2];
    let id = gid.x;
    let width = k * d + k;
    if (id >= width) { return; }
    let segments = (n + SEG - 1u) / SEG;
    var s = 0.0;
    for (var seg = 0u; seg < segments; seg++) { s += partials[seg * width + id]; }
    sums[id] = s;
}

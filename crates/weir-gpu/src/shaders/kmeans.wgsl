// Mini-batch K-means step. `assign`: one invocation per point finds its nearest centroid
// (squared Euclidean distance, lowest index on ties). `update`: one invocation per
// (centroid, dimension) sums the coordinates of its points; dimension 0 also counts them.

// Every binding is read_write: the pool sub-allocates inputs and outputs from the same slab,
// and wgpu forbids one buffer being bound read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> points: array<f32>;     // n × d
@group(0) @binding(1) var<storage, read_write> centroids: array<f32>;  // k × d
@group(0) @binding(2) var<storage, read_write> labels: array<u32>; // n
@group(0) @binding(3) var<storage, read_write> sums: array<f32>; // k × d, then k counts (as f32)
@group(0) @binding(4) var<storage, read_write> dims: array<u32, 4>;    // n, k, d

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

@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0];
    let k = dims[1];
    let d = dims[2];
    let id = gid.x;
    if (id >= k * d) { return; }
    let c = id / d;
    let j = id % d;
    var s = 0.0;
    var count = 0u;
    for (var p = 0u; p < n; p++) {
        if (labels[p] == c) {
            s += points[p * d + j];
            count += 1u;
        }
    }
    sums[id] = s;
    if (j == 0u) { sums[k * d + c] = f32(count); }
}

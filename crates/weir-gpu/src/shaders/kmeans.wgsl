// K-means step over a batch of points: assignment, the update as a two-pass reduction, and the
// new centres (Lloyd) on the device.
// - `assign_tiled` (k × d <= CENTRES): one invocation per point finds its nearest centroid
//   (squared Euclidean distance, lowest index on ties) against centres its workgroup copied into
//   workgroup memory once; `assign` reads them from storage (centres beyond workgroup memory).
// - Pass 1, `partial` ((k × d + k) <= ACC): each workgroup reduces its block of `slice` points
//   into per-block partial sums and counts; every coordinate is read once, by one invocation.
//   `update` is the fallback beyond workgroup memory: one invocation per (centroid, dimension)
//   and block scans the block's points.
// - Pass 2, `reduce`: one invocation per output adds the blocks' partials and writes the new
//   centre (the mean of its points; the old centre where none was assigned).
// Blocks keep every loop short: llvmpipe (lavapipe) stops a loop after 65,535 iterations.

// Every binding is read_write: the pool sub-allocates inputs and outputs from the same slab,
// and wgpu forbids one buffer being bound read-only and read-write in one dispatch.
@group(0) @binding(0) var<storage, read_write> points: array<f32>;     // n × d
@group(0) @binding(1) var<storage, read_write> centroids: array<f32>;  // k × d
@group(0) @binding(2) var<storage, read_write> labels: array<u32>; // n
// k × d sums, k counts (as f32: exact, a submission holds fewer than 2^24 points), k × d centres.
@group(0) @binding(3) var<storage, read_write> sums: array<f32>;
// n, k, d, lanes of `partial`, blocks, points per block.
@group(0) @binding(4) var<storage, read_write> dims: array<u32, 8>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>; // per block, k × d sums then k counts

// Floats of workgroup memory per entry point: 16 KiB, the least every WebGPU device offers
// (must match KMEANS_WORKGROUP_FLOATS in kernels/gpu.rs).
const CENTRES: u32 = 4096u;
const ACC: u32 = 4096u;
var<workgroup> centres: array<f32, CENTRES>;
var<workgroup> acc: array<f32, ACC>;

// The dispatches are 2-D beyond 65,535 workgroups: 64 invocations per workgroup, row-major.
@compute @workgroup_size(64)
fn assign(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = dims[0];
    let k = dims[1];
    let d = dims[2];
    let p = gid.y * groups.x * 64u + gid.x;
    if (p >= n) { return; }
    var best = 0u;
    var best_dist = bitcast<f32>(0x7f7fffffu); // f32::MAX, as the CPU path starts
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
fn assign_tiled(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = dims[0];
    let k = dims[1];
    let d = dims[2];
    for (var i = t; i < k * d; i += 64u) { centres[i] = centroids[i]; }
    workgroupBarrier();
    let p = gid.y * groups.x * 64u + gid.x;
    // No return before the barrier: it must be reached by the whole workgroup.
    if (p < n) {
        var best = 0u;
        var best_dist = bitcast<f32>(0x7f7fffffu); // f32::MAX, as the CPU path starts
        for (var c = 0u; c < k; c++) {
            var dist = 0.0;
            for (var j = 0u; j < d; j++) {
                let diff = points[p * d + j] - centres[c * d + j];
                dist = fma(diff, diff, dist);
            }
            if (dist < best_dist) { best_dist = dist; best = c; }
        }
        labels[p] = best;
    }
}

// One workgroup per block. Its 64 invocations form `lanes` lanes of 64 / lanes invocations; a
// lane takes every lanes-th point of the block, and its invocations split the point's
// dimensions, so no two invocations add into one accumulator (no atomics: WGSL has no float
// atomics). Each lane has its own k × d + k accumulators; the lanes are added at the end.
@compute @workgroup_size(64)
fn partial(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = dims[0];
    let k = dims[1];
    let d = dims[2];
    let lanes = dims[3];
    let slice = dims[5];
    let w = k * d + k;
    let block = wg.y * groups.x + wg.x;
    for (var i = t; i < lanes * w; i += 64u) { acc[i] = 0.0; }
    workgroupBarrier();
    let width = 64u / lanes;
    let lane = t / width;
    let col = t % width;
    let start = block * slice;
    let end = min(n, start + slice);
    if (lane < lanes) {
        let base = lane * w;
        for (var p = start + lane; p < end; p += lanes) {
            let c = labels[p];
            for (var j = col; j < d; j += width) {
                acc[base + c * d + j] += points[p * d + j];
            }
            if (col == 0u) { acc[base + k * d + c] += 1.0; }
        }
    }
    workgroupBarrier();
    if (start < n) {
        for (var i = t; i < w; i += 64u) {
            var s = 0.0;
            for (var l = 0u; l < lanes; l++) { s += acc[l * w + i]; }
            partials[block * w + i] = s;
        }
    }
}

// x: (centroid, dimension); y: block.
@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[0];
    let k = dims[1];
    let d = dims[2];
    let slice = dims[5];
    let id = gid.x;
    let block = gid.y;
    if (id >= k * d || block * slice >= n) { return; }
    let c = id / d;
    let j = id % d;
    let end = min(n, (block + 1u) * slice);
    var s = 0.0;
    var count = 0u;
    for (var p = block * slice; p < end; p++) {
        if (labels[p] == c) {
            s += points[p * d + j];
            count += 1u;
        }
    }
    let out = block * (k * d + k);
    partials[out + id] = s;
    if (j == 0u) { partials[out + k * d + c] = f32(count); }
}

@compute @workgroup_size(64)
fn reduce(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = dims[1];
    let d = dims[2];
    let blocks = dims[4];
    let id = gid.x;
    let width = k * d + k;
    if (id >= width) { return; }
    var s = 0.0;
    for (var b = 0u; b < blocks; b++) { s += partials[b * width + id]; }
    sums[id] = s;
    if (id < k * d) {
        let c = id / d;
        var count = 0.0;
        for (var b = 0u; b < blocks; b++) { count += partials[b * width + k * d + c]; }
        // An empty cluster keeps its centre, as the CPU path's update does.
        sums[width + id] = select(centroids[id], s / count, count > 0.0);
    }
}

// Mini-batch K-means over device-resident models, several keys per launch.
// A key's model lives in its slot of the state arena (32-bit words):
//   [d, k, 0, 0] | k × d centroids (f32 bits) | k counts (u32)
// `assign`: one invocation per point finds the nearest centroid of its key's model
// (squared Euclidean distance, lowest index on ties).
// `partial_tiled` (k × (d + 1) <= ACC): a workgroup reduces `lanes` chunks of at most 256 points
// of one key each, a lane of 64 / lanes invocations per chunk, the invocations splitting the
// values (value d counts the points), with the lane's k × (d + 1) sums in workgroup memory:
// every coordinate is read once, by one invocation, and added in the CPU twin's order.
// `partial` is the fallback beyond workgroup memory: one invocation per (chunk, centroid, value)
// scans the chunk.
// `update_values`: one invocation per (key, centroid, value) adds up its chunks' partial sums and
// moves the value toward their mean by count / (seen + count) (Sculley's per-centre rate), in
// place; `update_counts`, one invocation per (key, centroid), then adds the count. Both mark the
// chunks of the arena they write in the dirty map and copy what they wrote to `out`.
// Mesa's llvmpipe (lavapipe) silently ends an invocation's loops after 65,535 iterations in all:
// an invocation loops over at most a chunk of points (assign: k·d; update: twice the key's
// chunks), and state/kmeans.rs refuses launches beyond that on such a device.

@group(0) @binding(0) var<storage, read_write> points: array<f32>;   // n × d, grouped by key
@group(0) @binding(1) var<storage, read_write> segs: array<u32>;     // per key: slot word, first point, points, first chunk; per point: its key; per chunk: key, first point, points, 0
@group(0) @binding(2) var<storage, read_write> scratch: array<u32>;  // n labels, then chunks × k × (d + 1) partial sums (f32 bits)
@group(0) @binding(3) var<storage, read_write> arena: array<u32>;    // the state arena (resident)
@group(0) @binding(4) var<storage, read_write> dirty: array<u32>;    // one word per chunk of the arena (resident)
@group(0) @binding(5) var<storage, read_write> out: array<u32>;      // per key, per centroid: count, d values
@group(0) @binding(6) var<storage, read_write> dims: array<u32, 8>;  // keys, n, k, d, arena chunk words, point chunks, lanes of partial_tiled

// Floats of workgroup memory of partial_tiled: 16 KiB, the least every WebGPU device offers
// (RESIDENT_ACC_FLOATS in state/kmeans.rs).
const ACC: u32 = 4096u;
var<workgroup> acc: array<f32, ACC>;

const CHUNK: u32 = 256u;

fn flat(gid: vec3<u32>) -> u32 { return gid.x + gid.y * 65535u * 64u; }

@compute @workgroup_size(64)
fn assign(@builtin(global_invocation_id) gid: vec3<u32>) {
    let keys = dims[0]; let n = dims[1]; let k = dims[2]; let d = dims[3];
    let p = flat(gid);
    if (p >= n) { return; }
    let j = segs[keys * 4u + p];
    let cents = segs[j * 4u] + 4u;
    var best = 0u;
    var best_dist = bitcast<f32>(0x7f7fffffu); // f32::MAX, as the CPU path starts
    for (var c = 0u; c < k; c++) {
        var dist = 0.0;
        for (var x = 0u; x < d; x++) {
            let diff = points[p * d + x] - bitcast<f32>(arena[cents + c * d + x]);
            dist = fma(diff, diff, dist);
        }
        if (dist < best_dist) { best_dist = dist; best = c; }
    }
    scratch[p] = best;
}

@compute @workgroup_size(64)
fn partial(@builtin(global_invocation_id) gid: vec3<u32>) {
    let keys = dims[0]; let n = dims[1]; let k = dims[2]; let d = dims[3]; let chunks = dims[5];
    let id = flat(gid);
    if (id >= chunks * k * (d + 1u)) { return; }
    let q = id / (k * (d + 1u)); let c = (id / (d + 1u)) % k; let x = id % (d + 1u);
    let at = keys * 4u + n + q * 4u;
    let first = segs[at + 1u]; let len = segs[at + 2u];
    var s = 0.0;
    for (var p = first; p < first + len; p++) {
        if (scratch[p] == c) {
            if (x == d) { s += 1.0; } else { s += points[p * d + x]; }
        }
    }
    scratch[n + id] = bitcast<u32>(s);
}

// Workgroups in a 2-D grid beyond 65,535, row-major.
@compute @workgroup_size(64)
fn partial_tiled(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let keys = dims[0]; let n = dims[1]; let k = dims[2]; let d = dims[3]; let chunks = dims[5]; let lanes = dims[6];
    let w = k * (d + 1u);
    for (var i = t; i < lanes * w; i += 64u) { acc[i] = 0.0; }
    workgroupBarrier();
    let width = 64u / lanes;
    let lane = t / width;
    let x0 = t % width;
    let q0 = (wg.y * groups.x + wg.x) * lanes;
    let q = q0 + lane;
    if (lane < lanes && q < chunks) {
        let at = keys * 4u + n + q * 4u;
        let first = segs[at + 1u]; let len = segs[at + 2u];
        let base = lane * w;
        for (var p = first; p < first + len; p++) {
            let o = base + scratch[p] * (d + 1u);
            for (var x = x0; x <= d; x += width) {
                if (x == d) { acc[o + d] += 1.0; } else { acc[o + x] += points[p * d + x]; }
            }
        }
    }
    workgroupBarrier();
    for (var i = t; i < lanes * w; i += 64u) {
        if (q0 + i / w < chunks) { scratch[n + q0 * w + i] = bitcast<u32>(acc[i]); }
    }
}

// The points of key `j` assigned to centroid `c` in this launch: its chunks' counts added in
// chunk order (each exact in f32, at most 256), as u32.
fn key_count(j: u32, c: u32) -> u32 {
    let n = dims[1]; let k = dims[2]; let d = dims[3];
    let q0 = segs[j * 4u + 3u];
    let qn = (segs[j * 4u + 2u] + CHUNK - 1u) / CHUNK;
    var cnt = 0u;
    for (var q = q0; q < q0 + qn; q++) {
        cnt += u32(bitcast<f32>(scratch[n + (q * k + c) * (d + 1u) + d]));
    }
    return cnt;
}

// `update_values` runs before `update_counts` (a later dispatch): it reads the counts that
// `update_counts` then overwrites.
@compute @workgroup_size(64)
fn update_values(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = dims[1]; let k = dims[2]; let d = dims[3]; let chunk = dims[4];
    let id = flat(gid);
    if (id >= dims[0] * k * d) { return; }
    let x = id % d; let jc = id / d; let j = jc / k; let c = jc % k;
    let cent = segs[j * 4u] + 4u + c * d;
    let o = jc * (d + 1u);
    let cnt = key_count(j, c);
    if (cnt == 0u) {
        out[o + 1u + x] = arena[cent + x];
        return;
    }
    let seen = arena[segs[j * 4u] + 4u + k * d + c] + cnt;
    let eta = f32(cnt) / f32(seen);
    let q0 = segs[j * 4u + 3u];
    let qn = (segs[j * 4u + 2u] + CHUNK - 1u) / CHUNK;
    var s = 0.0;
    for (var q = q0; q < q0 + qn; q++) {
        s += bitcast<f32>(scratch[n + (q * k + c) * (d + 1u) + x]);
    }
    let mean = s / f32(cnt);
    let old = bitcast<f32>(arena[cent + x]);
    let v = old + eta * (mean - old);
    arena[cent + x] = bitcast<u32>(v);
    out[o + 1u + x] = bitcast<u32>(v);
    dirty[(cent + x) / chunk] = 1u;
}

@compute @workgroup_size(64)
fn update_counts(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = dims[2]; let d = dims[3]; let chunk = dims[4];
    let id = flat(gid);
    if (id >= dims[0] * k) { return; }
    let j = id / k; let c = id % k;
    let count_at = segs[j * 4u] + 4u + k * d + c;
    let o = id * (d + 1u);
    let cnt = key_count(j, c);
    if (cnt == 0u) {
        out[o] = arena[count_at];
        return;
    }
    let seen = arena[count_at] + cnt;
    arena[count_at] = seen;
    out[o] = seen;
    dirty[count_at / chunk] = 1u;
}

// Mini-batch K-means over device-resident models, several keys per launch.
// A key's model lives in its slot of the state arena (32-bit words):
//   [d, k, 0, 0] | k × d centroids (f32 bits) | k counts (u32)
// `assign`: one invocation per point finds the nearest centroid of its key's model
// (squared Euclidean distance, lowest index on ties).
// `update`: one invocation per (key, centroid) counts and sums its points and moves the centroid
// toward their mean by count / (seen + count) (Sculley's per-centre rate), in place; it marks the
// chunks it writes in the dirty map and copies the updated centroid and count to `out`.

@group(0) @binding(0) var<storage, read_write> points: array<f32>;   // n × d, grouped by key
@group(0) @binding(1) var<storage, read_write> segs: array<u32>;     // per key: slot word, first point, points, 0; then per point: its key
@group(0) @binding(2) var<storage, read_write> labels: array<u32>;   // n
@group(0) @binding(3) var<storage, read_write> arena: array<u32>;    // the state arena (resident)
@group(0) @binding(4) var<storage, read_write> dirty: array<u32>;    // one word per chunk (resident)
@group(0) @binding(5) var<storage, read_write> out: array<u32>;      // per key, per centroid: count, d values
@group(0) @binding(6) var<storage, read_write> dims: array<u32, 8>;  // keys, n, k, d, chunk words

fn flat(gid: vec3<u32>) -> u32 { return gid.x + gid.y * 65535u * 64u; }

@compute @workgroup_size(64)
fn assign(@builtin(global_invocation_id) gid: vec3<u32>) {
    let keys = dims[0]; let n = dims[1]; let k = dims[2]; let d = dims[3];
    let p = flat(gid);
    if (p >= n) { return; }
    let j = segs[keys * 4u + p];
    let cents = segs[j * 4u] + 4u;
    var best = 0u;
    var best_dist = 3.4e38;
    for (var c = 0u; c < k; c++) {
        var dist = 0.0;
        for (var x = 0u; x < d; x++) {
            let diff = points[p * d + x] - bitcast<f32>(arena[cents + c * d + x]);
            dist = fma(diff, diff, dist);
        }
        if (dist < best_dist) { best_dist = dist; best = c; }
    }
    labels[p] = best;
}

@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) gid: vec3<u32>) {
    let keys = dims[0]; let k = dims[2]; let d = dims[3]; let chunk = dims[4];
    let id = flat(gid);
    if (id >= keys * k) { return; }
    let j = id / k; let c = id % k;
    let base = segs[j * 4u]; let first = segs[j * 4u + 1u]; let len = segs[j * 4u + 2u];
    let cent = base + 4u + c * d;
    let count_at = base + 4u + k * d + c;
    let o = id * (d + 1u);
    var cnt = 0u;
    for (var p = first; p < first + len; p++) {
        if (labels[p] == c) { cnt += 1u; }
    }
    if (cnt == 0u) {
        out[o] = arena[count_at];
        for (var x = 0u; x < d; x++) { out[o + 1u + x] = arena[cent + x]; }
        return;
    }
    let seen = arena[count_at] + cnt;
    let eta = f32(cnt) / f32(seen);
    for (var x = 0u; x < d; x++) {
        var s = 0.0;
        for (var p = first; p < first + len; p++) {
            if (labels[p] == c) { s += points[p * d + x]; }
        }
        let mean = s / f32(cnt);
        let old = bitcast<f32>(arena[cent + x]);
        let v = old + eta * (mean - old);
        arena[cent + x] = bitcast<u32>(v);
        out[o + 1u + x] = bitcast<u32>(v);
        dirty[(cent + x) / chunk] = 1u;
    }
    arena[count_at] = seen;
    out[o] = seen;
    dirty[count_at / chunk] = 1u;
}

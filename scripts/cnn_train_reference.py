#!/usr/bin/env python3
"""Reference values for Weir's CNN training kernels (crates/weir-gpu/src/train.rs), in float64.

Written independently of the Rust code: plain loops over NCHW indices, no im2col. For a small
fixed case (3 images of 2 channels, 4 x 6 pixels, 3 conv channels, 4 classes) it computes the
forward pass, the summed softmax cross-entropy, every gradient of the mean loss (checked against
central differences), and the model slot after one and after two Adam steps on the same batch,
and writes
crates/weir-gpu/tests/data/cnn_train_reference.json.

Slot layout (32-bit words): [conv_w | conv_b | dense_w | dense_b] = params (P words), Adam m
(P), Adam v (P), step count t, zero padding to a multiple of 4.

Max-pool backward sends a window's gradient to its first maximum in row-major order (as the
forward argmax). The weights are drawn until no pre-activation lies near 0, no positive window
maximum is near a tie and no gradient is near 0 without being 0, so float32 on the Rust side
cannot take another branch (or flip an Adam step's sign) than float64 takes here.

    python3 scripts/cnn_train_reference.py
"""
import json, math
import numpy as np

N, I, H, W, C, K = 3, 2, 4, 6, 3, 4
LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-8
PH, PW = H // 2, W // 2
F = C * PH * PW


def forward(cw, cb, dw, db, x):
    pre = np.zeros((N, C, H, W))
    for b in range(N):
        for c in range(C):
            for y in range(H):
                for xx in range(W):
                    s = cb[c]
                    for k in range(I):
                        for dy in range(3):
                            for dx in range(3):
                                yy, xs = y + dy - 1, xx + dx - 1
                                if 0 <= yy < H and 0 <= xs < W:
                                    s += cw[c, k, dy, dx] * x[b, k, yy, xs]
                    pre[b, c, y, xx] = s
    relu = np.maximum(pre, 0.0)
    pool = np.zeros((N, C, PH, PW))
    arg = np.zeros((N, C, PH, PW, 2), dtype=int)
    for b in range(N):
        for c in range(C):
            for py in range(PH):
                for px in range(PW):
                    best, at = -math.inf, None
                    for wy in range(2):
                        for wx in range(2):
                            v = relu[b, c, 2 * py + wy, 2 * px + wx]
                            if v > best:  # strict: the first maximum wins a tie
                                best, at = v, (2 * py + wy, 2 * px + wx)
                    pool[b, c, py, px] = best
                    arg[b, c, py, px] = at
    flat = pool.reshape(N, F)
    logits = np.array([[db[k] + sum(dw[k, j] * flat[b, j] for j in range(F)) for k in range(K)] for b in range(N)])
    return pre, relu, pool, arg, flat, logits


def step(params, x, labels):
    cw, cb, dw, db = params
    pre, relu, pool, arg, flat, logits = forward(cw, cb, dw, db, x)
    loss_sum, correct = 0.0, 0
    g = np.zeros((N, K))
    for b in range(N):
        m = logits[b].max()
        lse = m + math.log(sum(math.exp(l - m) for l in logits[b]))
        loss_sum += lse - logits[b, labels[b]]
        correct += int(np.argmax(logits[b]) == labels[b])  # np.argmax: first maximum
        for k in range(K):
            g[b, k] = (math.exp(logits[b, k] - lse) - (k == labels[b])) / N
    gdw = np.zeros((K, F))
    gdb = np.zeros(K)
    for b in range(N):
        for k in range(K):
            gdb[k] += g[b, k]
            for j in range(F):
                gdw[k, j] += g[b, k] * flat[b, j]
    gflat = np.array([[sum(g[b, k] * dw[k, j] for k in range(K)) for j in range(F)] for b in range(N)])
    gpool = gflat.reshape(N, C, PH, PW)
    gpre = np.zeros((N, C, H, W))
    for b in range(N):
        for c in range(C):
            for py in range(PH):
                for px in range(PW):
                    y, xx = arg[b, c, py, px]
                    if pre[b, c, y, xx] > 0:
                        gpre[b, c, y, xx] = gpool[b, c, py, px]
    gcw = np.zeros((C, I, 3, 3))
    gcb = np.zeros(C)
    for b in range(N):
        for c in range(C):
            for y in range(H):
                for xx in range(W):
                    gcb[c] += gpre[b, c, y, xx]
                    for k in range(I):
                        for dy in range(3):
                            for dx in range(3):
                                yy, xs = y + dy - 1, xx + dx - 1
                                if 0 <= yy < H and 0 <= xs < W:
                                    gcw[c, k, dy, dx] += gpre[b, c, y, xx] * x[b, k, yy, xs]
    return dict(pre=pre, pool=pool, logits=logits, loss_sum=loss_sum, correct=correct, grads=[gcw, gcb, gdw, gdb])


def adam(params, m, v, t, grads):
    t += 1
    out = []
    for i, gr in enumerate(grads):
        m[i] = B1 * m[i] + (1 - B1) * gr
        v[i] = B2 * v[i] + (1 - B2) * gr * gr
        out.append(params[i] - LR * (m[i] / (1 - B1 ** t)) / (np.sqrt(v[i] / (1 - B2 ** t)) + EPS))
    return out, m, v, t


def slot(params, m, v, t):
    flat = lambda xs: [float(a) for p in xs for a in p.ravel()]
    s = flat(params) + flat(m) + flat(v) + [float(t)]
    return s + [0.0] * (-len(s) % 4)


def well_conditioned(r):
    pre, pool = r["pre"], r["pool"]
    if np.abs(pre).min() < 1e-3:
        return False
    relu = np.maximum(pre, 0)
    for b in range(N):
        for c in range(C):
            for py in range(PH):
                for px in range(PW):
                    w = np.sort(relu[b, c, 2 * py:2 * py + 2, 2 * px:2 * px + 2].ravel())
                    if w[-1] > 0 and w[-1] - w[-2] < 1e-3:
                        return False
    g = np.concatenate([a.ravel() for a in r["grads"]])
    nz = np.abs(g[g != 0])
    return nz.size > 0.8 * g.size and nz.min() > 1e-4


def check_by_finite_differences(params, x, labels, grads):
    """The analytic gradients of the mean loss against central differences (the reference
    checks itself before anything is compared with it)."""
    def mean_loss(ps):
        return step(ps, x, labels)["loss_sum"] / N
    h = 1e-6
    for i, p in enumerate(params):
        for j in range(p.size):
            up = [q.copy() for q in params]
            dn = [q.copy() for q in params]
            up[i].ravel()[j] += h
            dn[i].ravel()[j] -= h
            num = (mean_loss(up) - mean_loss(dn)) / (2 * h)
            assert abs(num - grads[i].ravel()[j]) < 1e-6, (i, j, num, grads[i].ravel()[j])


def main():
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 1, (N, I, H, W)).round(3)
        labels = rng.integers(0, K, N)
        params = [rng.normal(0, 0.5, (C, I, 3, 3)), rng.normal(0, 0.2, C), rng.normal(0, 0.3, (K, F)), rng.normal(0, 0.1, K)]
        params = [p.astype(np.float32).astype(np.float64) for p in params]  # exact in the f32 slot
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        slots, results, p, t = [slot(params, m, v, 0)], [], params, 0
        for _ in range(2):
            r = step(p, x, labels)
            results.append(r)
            p, m, v, t = adam(p, m, v, t, r["grads"])
            slots.append(slot(p, m, v, t))
        if all(well_conditioned(r) for r in results):
            break
    else:
        raise SystemExit("no well-conditioned case in 1000 seeds")
    check_by_finite_differences(params, x, labels, results[0]["grads"])
    out = {
        "about": "scripts/cnn_train_reference.py: float64 reference for crates/weir-gpu/src/train.rs",
        "seed": seed,
        "shape": {"n": N, "in_c": I, "h": H, "w": W, "conv_c": C, "classes": K},
        "adam": {"lr": LR, "beta1": B1, "beta2": B2, "eps": EPS},
        "images": [float(a) for a in x.ravel()],
        "labels": [int(a) for a in labels],
        "slots": slots,
        "steps": [
            {
                "logits": [float(a) for a in r["logits"].ravel()],
                "loss_sum": r["loss_sum"],
                "correct": r["correct"],
                "grads": [float(a) for g in r["grads"] for a in g.ravel()],
            }
            for r in results
        ],
    }
    path = "crates/weir-gpu/tests/data/cnn_train_reference.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"seed {seed}: loss {results[0]['loss_sum']:.6f} then {results[1]['loss_sum']:.6f}; wrote {path}")


if __name__ == "__main__":
    main()

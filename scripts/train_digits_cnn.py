#!/usr/bin/env python3
"""Train Weir's small digits CNN offline (NumPy only) and save it as safetensors.

Data: the 1,797 8x8 handwritten digits that ship inside scikit-learn's wheel
(sklearn/datasets/data/digits.csv.gz). Pass the wheel or the extracted CSV:

    pip download --no-deps scikit-learn -d /tmp/skl
    python3 scripts/train_digits_cnn.py /tmp/skl/scikit_learn-*.whl

Model (NCHW): conv 3x3, 1 -> 8 channels, padding 1, ReLU -> max-pool 2x2 -> dense 128 -> 10.
Writes models/digits_cnn.safetensors (conv.weight [8,1,3,3], conv.bias [8], dense.weight
[10,128], dense.bias [10]; f32 little-endian) and models/digits_test.jsonl (the held-out 20 %:
{"label": int, "pixels": [64 floats in 0..1]} per line), and prints the held-out accuracy that
the streaming job must reproduce.
"""
import gzip, io, json, struct, sys, zipfile
import numpy as np

def load(path):
    if path.endswith(".whl"):
        raw = zipfile.ZipFile(path).read("sklearn/datasets/data/digits.csv.gz")
    else:
        raw = open(path, "rb").read()
    data = np.loadtxt(io.BytesIO(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw), delimiter=",")
    return data[:, :64].astype(np.float32) / 16.0, data[:, 64].astype(np.int64)

def im2col(x):  # x: (N, 8, 8) -> (N, 64, 9)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    return np.stack([p[:, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)], axis=-1).reshape(len(x), 64, 9)

def forward(params, x):
    cw, cb, dw, db = params
    cols = im2col(x.reshape(-1, 8, 8))
    conv = cols @ cw.reshape(8, 9).T + cb              # (N, 64, 8): position-major
    relu = np.maximum(conv, 0).transpose(0, 2, 1).reshape(-1, 8, 8, 8)  # (N, C, H, W)
    win = relu.reshape(-1, 8, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(-1, 8, 4, 4, 4)
    pooled = win.max(axis=-1)                          # (N, 8, 4, 4)
    flat = pooled.reshape(-1, 128)
    logits = flat @ dw.T + db
    return logits, (cols, conv, win, pooled, flat)

def main():
    x, y = load(sys.argv[1])
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    n_test = len(x) // 5
    test, train = idx[:n_test], idx[n_test:]
    params = [rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), np.zeros(8, np.float32),
              rng.normal(0, 0.1, (10, 128)).astype(np.float32), np.zeros(10, np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    step, lr = 0, 0.01
    for epoch in range(40):
        order = rng.permutation(train)
        for b in range(0, len(order), 32):
            bi = order[b:b + 32]
            logits, (cols, conv, win, pooled, flat) = forward(params, x[bi])
            p = np.exp(logits - logits.max(axis=1, keepdims=True)); p /= p.sum(axis=1, keepdims=True)
            g = p; g[np.arange(len(bi)), y[bi]] -= 1; g /= len(bi)
            gdw, gdb = g.T @ flat, g.sum(0)
            gflat = (g @ params[2]).reshape(-1, 8, 4, 4)
            mask = (win == pooled[..., None])
            mask = mask / mask.sum(axis=-1, keepdims=True)
            gwin = mask * gflat[..., None]                                    # (N, 8, 4, 4, 4)
            grelu = gwin.reshape(-1, 8, 4, 4, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(-1, 8, 64)
            gconv = grelu.transpose(0, 2, 1) * (conv > 0)                    # (N, 64, 8)
            gcw = np.einsum("npc,npk->ck", gconv, cols).reshape(8, 1, 3, 3)
            gcb = gconv.sum(axis=(0, 1))
            step += 1
            for i, gr in enumerate([gcw, gcb, gdw, gdb]):
                m[i] = 0.9 * m[i] + 0.1 * gr
                v[i] = 0.999 * v[i] + 0.001 * gr * gr
                params[i] -= lr * (m[i] / (1 - 0.9 ** step)) / (np.sqrt(v[i] / (1 - 0.999 ** step)) + 1e-8)
    logits, _ = forward(params, x[test])
    acc = float((logits.argmax(1) == y[test]).mean())
    names = ["conv.weight", "conv.bias", "dense.weight", "dense.bias"]
    header, blobs, off = {}, [], 0
    for n, p in zip(names, params):
        b = p.astype("<f4").tobytes()
        header[n] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b); off += len(b)
    header["__metadata__"] = {"held_out_accuracy": f"{acc:.6f}", "test_images": str(n_test)}
    h = json.dumps(header).encode(); h += b" " * (-len(h) % 8)
    with open("models/digits_cnn.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    with open("models/digits_test.jsonl", "w") as f:
        for i in test:
            f.write(json.dumps({"label": int(y[i]), "pixels": [round(float(v), 4) for v in x[i]]}) + "\n")
    print(f"held-out accuracy {acc:.4f} on {n_test} images")

if __name__ == "__main__":
    main()

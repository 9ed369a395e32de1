#!/usr/bin/env python3
"""Write the training split of scripts/train_digits_cnn.py as examples/data/digits_train.jsonl.

Each training row carries a constant `"tenant": "acme"` first: examples/digits_train.yaml keys the
stream by it (one model per tenant; the held-out file has no such field).

The split is the one train_digits_cnn.py makes (NumPy default_rng(0), one permutation of the
1,797 digits, the first 20 % held out), so the streaming trainer learns from exactly the rows that
the offline model learned from and is scored on models/digits_test.jsonl, which it never sees.

    pip download --no-deps scikit-learn -d /tmp/skl
    python3 scripts/write_digits_train.py /tmp/skl/scikit_learn-*.whl

Before writing, the script rebuilds the held-out split and checks it equals
models/digits_test.jsonl line for line (same seed, same permutation); afterwards it checks the two
files are disjoint by row index and together hold every digit once.
"""
import json, os, sys
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits_cnn import load  # noqa: E402  (the same CSV reader as the offline trainer)


def row(x, y):
    # The same rounding as models/digits_test.jsonl.
    return json.dumps({"label": int(y), "pixels": [round(float(v), 4) for v in x]})


def train_row(x, y):
    return json.dumps({"tenant": "acme", "label": int(y), "pixels": [round(float(v), 4) for v in x]})


def main():
    x, y = load(sys.argv[1])
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    n_test = len(x) // 5
    test, train = idx[:n_test], idx[n_test:]
    with open("models/digits_test.jsonl") as f:
        existing = f.read().splitlines()
    rebuilt = [row(x[i], y[i]) for i in test]
    if existing != rebuilt:
        sys.exit("models/digits_test.jsonl is not the held-out split of this seed and data: not writing")
    assert not set(test) & set(train) and len(set(test) | set(train)) == len(x) == 1797
    with open("examples/data/digits_train.jsonl", "w") as f:
        for i in train:
            f.write(train_row(x[i], y[i]) + "\n")
    print(f"wrote {len(train)} training rows; held-out split matches ({len(test)} rows); {len(x)} in all")


if __name__ == "__main__":
    main()

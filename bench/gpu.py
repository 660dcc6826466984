#!/usr/bin/env python3
"""GPU benchmark: `dit bench --device cuda` against the PyTorch reference on the same GPU.

Both sides in bf16. PyTorch with its best eager settings: weights in bf16, fused SDPA attention
(flash / memory-efficient kernels), TF32 matmuls allowed; training as the reference train.py
(hybrid loss, AdamW lr 1e-4, EMA 0.9999) under bf16 autocast with f32 master weights. The torch
DiT is the functional reference of tools/make_fixtures.py (the ops of the reference models.py).

Prints, per model: forward images/s, sampling images/s (a guided DDIM loop, batch doubled by
classifier-free guidance, as `dit sample`), training steps/s; ours / torch ratios (> 1: we are
faster) and model FLOPs utilisation (MFU: achieved model flops / the GPU's dense bf16 peak).

    source tools/setup-cuda.sh && cargo build --release --features cuda -p dit-cli
    python bench/gpu.py --exe target/cuda/release/dit        # on the GPU machine
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import make_fixtures as mf  # noqa: E402
from compare import SIZES  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks


def gpu_peak():
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None), name


def model_cfg(name, image_size):
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = SIZES[size]
    return dict(depth=depth, hidden=hidden, heads=heads, patch=int(patch), in_channels=4, out_channels=8,
                classes=1000, latent=image_size // 8)


def forward_flops(cfg, batch):
    """2 x multiply-accumulates of the forward pass (the paper's Gflops are MACs)."""
    d, t = cfg["hidden"], (cfg["latent"] // cfg["patch"]) ** 2
    per_block = t * (3 * d * d + d * d + 8 * d * d) + 2 * t * t * d + 6 * d * d
    return 2 * batch * cfg["depth"] * per_block


DEVICE, DTYPE = "cuda", "bf16"


def weights(cfg, dtype):
    with torch.device("cpu"):
        w = mf.random_weights(cfg, torch.Generator().manual_seed(0))
    return {k: v.to(DEVICE, dtype) for k, v in w.items()}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(f, iters):
    f()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        f()
    sync()
    return (time.perf_counter() - start) / iters


def torch_forward(cfg, batch, iters):
    w = weights(cfg, torch.bfloat16)
    x = torch.randn(batch, 4, cfg["latent"], cfg["latent"], dtype=torch.bfloat16)
    t = torch.tensor([(i * 97) % 1000 for i in range(batch)], dtype=torch.float32)
    y = torch.tensor([(i * 131) % 1000 for i in range(batch)])
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        return timed(lambda: mf.dit_forward(w, cfg, x, t, y), iters)


def torch_sample(cfg, batch, steps, iters):
    w = weights(cfg, torch.bfloat16)
    y = torch.tensor([(i * 131) % 1000 for i in range(batch)])
    noise = torch.randn(batch, 4, cfg["latent"], cfg["latent"])
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        return timed(lambda: mf.ddim_sample(w, cfg, noise, y, steps, 4.0), iters)


def torch_train(cfg, batch, iters):
    w = {k: v.float() for k, v in weights(cfg, torch.float32).items()}
    params = {k: v.clone().requires_grad_(k != "pos_embed") for k, v in w.items()}
    ema = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.AdamW([v for k, v in params.items() if k != "pos_embed"], lr=1e-4, weight_decay=0,
                            fused=DEVICE == "cuda")
    d = mf.Diffusion(1000)
    x0 = torch.randn(batch, 4, cfg["latent"], cfg["latent"])
    y = torch.tensor([(i * 131) % 1000 for i in range(batch)])

    def step():
        t = np.random.randint(0, 1000, batch).tolist()
        noise = torch.randn_like(x0)
        xt = mf.q_sample(d, x0, t, noise)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = mf.dit_forward(params, cfg, xt, torch.tensor(t, dtype=torch.float32), y)
        mse, vb = mf.hybrid_loss_terms(d, x0, xt, noise, t, out.float())
        loss = (mse + vb).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            e, p = list(ema.values()), [v.detach() for v in params.values()]
            torch._foreach_lerp_(e, p, 1 - 0.9999)

    with torch.enable_grad():
        return timed(step, iters)


def ours(exe, args):
    out = subprocess.run([exe, "--device", DEVICE, "bench", "--dtype", DTYPE] + args,
                         check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", default=os.path.join(ROOT, "target", "cuda", "release", "dit"))
    ap.add_argument("--models", default="DiT-XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64, help="forward and sampling batch")
    ap.add_argument("--train-batch", type=int, default=32, help="per-GPU batch of the paper (256 / 8)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma list of forward,sample,train to skip")
    ap.add_argument("--ours-only", action="store_true", help="time our side only")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test of this script
    a = ap.parse_args()
    global DEVICE, DTYPE
    DEVICE = a.device
    DTYPE = "bf16" if DEVICE == "cuda" else "f32"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_default_device(DEVICE)
    peak, gpu = gpu_peak() if DEVICE == "cuda" else (None, "cpu")
    skip = set(a.skip.split(","))
    print(f"{gpu}, torch {torch.__version__}, bf16, image {a.image_size}")
    print(f"{'what':<34}{'ours':>10}{'torch':>10}{'ratio':>8}{'MFU ours':>10}{'MFU torch':>10}")

    def row(label, unit, mine, theirs, flops):
        if theirs is None:
            mfu = f"{flops * mine / peak:10.1%}" if peak else ""
            print(f"{label + ' (' + unit + ')':<34}{mine:>10.3f}{'-':>10}{'-':>8}{mfu}", flush=True)
            return
        mfu = (lambda rate: f"{flops * rate / peak:10.1%}") if peak else (lambda rate: f"{'-':>10}")
        print(f"{label + ' (' + unit + ')':<34}{mine:>10.3f}{theirs:>10.3f}{mine / theirs:>8.2f}"
              f"{mfu(mine)}{mfu(theirs)}", flush=True)

    for name in a.models.split(","):
        cfg = model_cfg(name, a.image_size)
        common = ["--models", name, "--image-size", str(a.image_size), "--iters", str(a.iters)]
        if "forward" not in skip:
            r = ours(a.exe, common + ["--batch-size", str(a.batch_size)])[0]
            s = None if a.ours_only else torch_forward(cfg, a.batch_size, a.iters)
            row(f"{name} forward b{a.batch_size}", "img/s", r["images_per_s"], s and a.batch_size / s,
                forward_flops(cfg, 1))
        if "sample" not in skip:
            it = max(1, a.iters // 5)
            r = ours(a.exe, common[:-1] + [str(it), "--batch-size", str(a.batch_size), "--sample-steps",
                                           str(a.steps)])[0]
            s = None if a.ours_only else torch_sample(cfg, a.batch_size, a.steps, it)
            row(f"{name} sample {a.steps} st cfg b{a.batch_size}", "img/s", r["images_per_s"],
                s and a.batch_size / s, forward_flops(cfg, 2 * a.steps))
        if "train" not in skip:
            r = ours(a.exe, common + ["--train", "--batch-size", str(a.train_batch)])[0]
            s = None if a.ours_only else torch_train(cfg, a.train_batch, a.iters)
            row(f"{name} train b{a.train_batch}", "steps/s", r["steps_per_s"], s and 1 / s,
                3 * forward_flops(cfg, a.train_batch))
            print(f"  ours: forward + backward {r['forward_backward_seconds'] * 1e3:.1f} ms of "
                  f"{r['seconds'] * 1e3:.1f} ms per step", flush=True)


if __name__ == "__main__":
    main()

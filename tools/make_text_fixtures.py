#!/usr/bin/env python3
"""Writes tests/fixtures/minilm.safetensors: all-MiniLM-L6-v2 (tools/fetch-minilm.sh) run by
Hugging Face `transformers` and `tokenizers` on a few prompts padded to 16 tokens: token ids,
mask, last hidden states (N, 16, 384) and the sentence-transformers embedding (mean over real
tokens, L2-normalised), for the text encoder tests.

Run:  /opt/pyref/bin/python tools/make_text_fixtures.py --model ~/.cache/dit/all-MiniLM-L6-v2
      (needs torch, transformers, tokenizers, safetensors)
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import BertModel

PROMPTS = ["a red circle in the top left on a blue background", "", "Two GREEN squares!",
           "a very long prompt that goes on and on well past the sixteen tokens it may keep"]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                   "minilm.safetensors")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    tok.enable_padding(length=16)
    tok.enable_truncation(max_length=16)
    enc = tok.encode_batch(PROMPTS)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    model = BertModel.from_pretrained(a.model).eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    save_file({"ids": ids.to(torch.int64), "mask": mask.to(torch.int64), "tokens": hidden.contiguous(),
               "pooled": pooled.contiguous()}, OUT)
    os.chmod(OUT, 0o644)
    print("wrote", os.path.abspath(OUT), tuple(hidden.shape))


if __name__ == "__main__":
    main()

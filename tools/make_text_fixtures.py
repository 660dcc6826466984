#!/usr/bin/env python3
"""Writes the text encoder fixtures, from Hugging Face `transformers` and `tokenizers`:

tests/fixtures/minilm.safetensors: all-MiniLM-L6-v2 (tools/fetch-minilm.sh) on a few prompts
padded to 16 tokens: token ids, mask, last hidden states (N, 16, 384) and the
sentence-transformers embedding (mean over real tokens, L2-normalised).

tests/fixtures/tiny_clip/: a tiny random CLIPTextModel (2 layers, width 32, quick_gelu) saved by
`save_pretrained`, with a byte-level BPE tokenizer in CLIP's layout (trained here on a few
captions: no download), and tests/fixtures/tiny_clip_io.safetensors: its ids, mask,
last_hidden_state and pooler_output for the prompts padded to 12 tokens.

tests/fixtures/tiny_t5/ and tiny_t5_io.safetensors: the same for a tiny random T5EncoderModel
(gated-GELU as Flan-T5) with a Unigram tokenizer in T5's layout (Metaspace, </s> appended):
ids, mask, last_hidden_state under the attention mask, and the mean over real tokens.

The tiny tokenizers are trained afresh on each run and `tokenizers`' trainers are not
deterministic, so a rerun may write another vocabulary; each tokenizer.json and its _io file are
written together and stay consistent, which is all the tests rely on.

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
FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(FIX, "minilm.safetensors")


def padded_ids(tok, length, pad_id=0, pad_token="[PAD]"):
    """Token ids and attention mask of PROMPTS, padded or cut to `length`."""
    tok.enable_padding(length=length, pad_id=pad_id, pad_token=pad_token)
    tok.enable_truncation(max_length=length)
    enc = tok.encode_batch(PROMPTS)
    return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


def clip_tokenizer():
    """A byte-level BPE tokenizer with CLIP's pieces: NFC + whitespace + lowercase, CLIP's split
    pattern, </w> word ends, <|startoftext|> ... <|endoftext|>."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    split = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 10, trainer)
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", 1), ("<|startoftext|>", 0),
                                                      add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel
    out_dir = os.path.join(FIX, "tiny_clip")
    os.makedirs(out_dir, exist_ok=True)
    tok = clip_tokenizer()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12,
                         hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         projection_dim=32)
    model = CLIPTextModel(cfg).eval()
    model.save_pretrained(out_dir)
    ids, mask = padded_ids(tok, 12, pad_id=1, pad_token="<|endoftext|>")
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask)
    save_file({"ids": ids.to(torch.int64), "mask": mask.to(torch.int64),
               "tokens": o.last_hidden_state.contiguous(), "pooled": o.pooler_output.contiguous()},
              os.path.join(FIX, "tiny_clip_io.safetensors"))
    print("wrote", out_dir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    ids, mask = padded_ids(tok, 16)
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
    tiny_clip()
    tiny_t5()


def tiny_t5():
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Config, T5EncoderModel
    out_dir = os.path.join(FIX, "tiny_t5")
    os.makedirs(out_dir, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(PROMPTS * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(cfg).eval()
    model.save_pretrained(out_dir)
    ids, mask = padded_ids(tok, 12, pad_id=0, pad_token="<pad>")
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1)
    save_file({"ids": ids.to(torch.int64), "mask": mask.to(torch.int64), "tokens": h.contiguous(),
               "pooled": pooled.contiguous()}, os.path.join(FIX, "tiny_t5_io.safetensors"))
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)
    print("wrote", out_dir)


if __name__ == "__main__":
    main()

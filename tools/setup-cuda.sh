#!/usr/bin/env bash
# Sets up a CUDA 13.0 toolchain from PyPI (nvcc, runtime headers, cuBLAS, cuRAND, NVRTC, NCCL) in
# a Python venv, so that `cargo build --features cuda` works on a machine with no CUDA install and
# no GPU (CI compiles the CUDA build this way).
#
# CUDA 13.0 on purpose: the PTX that nvcc writes must not be newer than the driver's CUDA
# (driver 580 = CUDA 13.0), or the driver refuses to load candle's kernels.
#
# candle links the CUDA libraries at build time; PyPI ships no `libcuda.so` (it comes with the
# driver), so the link step gets a stub: a library defining the driver API's names, as the
# toolkit's own lib64/stubs/libcuda.so does. At run time the driver's real libcuda.so.1 is loaded.
#
# Usage:  source tools/setup-cuda.sh            (compiler and libraries: build and link)
#         cargo build --release --features cuda
#         DIT_CUDA_LIBS=0 source tools/setup-cuda.sh   (compiler only: enough for check / clippy)
set -eo pipefail
VENV=${DIT_CUDA_VENV:-$HOME/.cache/dit-cuda}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if [ ! -e "$VENV/nvcc-ok" ]; then
  "$VENV/bin/pip" install -q 'nvidia-cuda-nvcc==13.0.88' 'nvidia-nvvm==13.0.88' \
    'nvidia-cuda-crt==13.0.88' 'nvidia-cuda-runtime==13.0.96' 'nvidia-cuda-cccl==13.0.85'
  touch "$VENV/nvcc-ok"
fi
if [ "${DIT_CUDA_LIBS:-1}" != 0 ] && [ ! -e "$VENV/libs-ok" ]; then
  "$VENV/bin/pip" install -q 'nvidia-cublas==13.1.0.3' 'nvidia-curand==10.4.0.35' \
    'nvidia-cuda-nvrtc==13.0.88' 'nvidia-nccl-cu13==2.30.7'
  touch "$VENV/libs-ok"
fi
SITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
NV="$SITE/nvidia"
LINK="$VENV/link"
if [ "${DIT_CUDA_LIBS:-1}" != 0 ] && [ ! -e "$LINK/libcuda.so" ]; then
  mkdir -p "$LINK"
  # Unversioned names for the linker (-lcublas etc.).
  for lib in "$NV"/cu13/lib/lib*.so.* "$NV"/nccl/lib/lib*.so.*; do
    base=$(basename "$lib"); ln -sf "$lib" "$LINK/${base%%.so.*}.so"
  done
  # The driver stub: every cu* entry point that cudarc declares.
  cargo fetch -q
  SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$SYS" | sed 's/pub unsafe fn //' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$LINK/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
fi
export CUDA_ROOT="$NV/cu13"
export PATH="$NV/cu13/bin:$PATH"
export LIBRARY_PATH="$LINK${LIBRARY_PATH:+:$LIBRARY_PATH}"
export NCCL_INCLUDE_DIR="$NV/nccl/include"
# No GPU here to ask: build for Hopper (sm_90, H100/H200) unless told otherwise. PTX for 9.0
# also runs on newer GPUs through the driver's JIT.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
echo "CUDA toolchain: $(nvcc --version | tail -2 | head -1); compute cap $CUDA_COMPUTE_CAP"
set +eo pipefail

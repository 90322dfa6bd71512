#!/usr/bin/env bash
# Builds the CUDA kernel library (deno task build:cuda).
#
#   bash scripts/build-cuda.sh [--arch sm_90|native|all] [--src DIR] [--out FILE] [-v]
#
# Default: build/liblayerwise_cuda.so for every supported architecture. --arch sm_XX builds one
# (quick iteration), `native` the GPUs of this machine. --src names a folder holding kernels.cu,
# layerwise.h and lw_numeric.h (default: cuda/ beside this script); the cached build of
# src/backend/cuda/cuda_ffi.ts uses it. -v passes -Xptxas -v (registers, spills).
#
# Flags that the bit-exact contract depends on: -fmad=false (no FMA contraction), no fast-math
# (IEEE division, denormals kept). The CUDA runtime is linked statically so only the driver
# (libcuda.so.1) is needed at run time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../cuda"
out="$here/../build/liblayerwise_cuda.so"
arch=all
verbose=()
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --src) src="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -v) verbose=(-Xptxas -v); shift ;;
    *) echo "build-cuda.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; else
    echo "build-cuda.sh: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 1
  fi
fi

case "$arch" in
  all)
    # nvcc 13 dropped everything below sm_75; sm_80..sm_100 are all still supported. PTX for
    # compute_100 lets newer GPUs (sm_103, sm_110, sm_120...) JIT-compile the kernels.
    gencode=(
      -gencode arch=compute_80,code=sm_80
      -gencode arch=compute_86,code=sm_86
      -gencode arch=compute_89,code=sm_89
      -gencode arch=compute_90,code=sm_90
      -gencode arch=compute_100,code=sm_100
      -gencode arch=compute_100,code=compute_100
    ) ;;
  native) gencode=(-arch=native) ;;
  sm_*) gencode=(-gencode "arch=compute_${arch#sm_},code=$arch") ;;
  *) echo "build-cuda.sh: --arch takes sm_XX, native or all" >&2; exit 2 ;;
esac

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
"$nvcc" -O3 -std=c++17 -shared -Xcompiler -fPIC -Xcompiler -fvisibility=hidden \
  -cudart static -fmad=false -prec-div=true -prec-sqrt=true -ftz=false \
  "${gencode[@]}" "${verbose[@]}" \
  -I "$src" -o "$tmp" "$src/kernels.cu"
# Rename into place so a concurrent loader never sees a half-written library.
mv -f "$tmp" "$out"
trap - EXIT
echo "built $out"

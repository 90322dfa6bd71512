#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds the CUDA library, runs the whole test suite (CUDA tests
# included, LAYERWISE_BACKEND unset), times the kernels with CUDA events against a
# device-to-device copy, then runs the package bench. Logs go to $OUT (or build/gpu-check/).
#
#   bash scripts/gpu-check.sh [--arch sm_90|all|native]     (default sm_90: quick to build)
#
# Exits non-zero when the build or a test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
arch=sm_90
[ "${1:-}" = "--arch" ] && arch="${2:?--arch needs a value}"
log="${OUT:-build/gpu-check}"
mkdir -p "$log" build
unset LAYERWISE_BACKEND

{ date -u +%FT%TZ; nvidia-smi; deno --version; nvcc --version | tail -2; } > "$log/env.txt" 2>&1

echo "== build ($arch)"
if ! bash scripts/build-cuda.sh --arch "$arch" -v > "$log/build.txt" 2>&1; then
  tail -30 "$log/build.txt"
  exit 1
fi
grep -c "[1-9][0-9]* bytes spill" "$log/build.txt" | sed 's/^/kernels with spills: /'

echo "== tests"
deno test -A tests/ > "$log/test.txt" 2>&1
test_rc=$?
grep -E "^(ok|FAILED)|passed|failed" "$log/test.txt" | tail -5
[ $test_rc -ne 0 ] && grep -E "FAILED|=> |error" "$log/test.txt" | head -40

echo "== kernel bandwidth (CUDA events)"
cat > build/gpu_bandwidth.ts <<'TS'
import { CudaDevice } from "../src/backend/cuda/device.ts";

const dev = CudaDevice.open(0);
const s = dev.symbols;
const ctx = dev.createContext();
const n = 2 ** 28, cols = 4096, rows = n / cols;
const BF16 = 2, F32 = 0;
const x = dev.malloc(2 * n + 64), y = dev.malloc(2 * n + 64), xf = dev.malloc(4 * n + 64);
const q = dev.malloc(n + 64), sc = dev.malloc(4 * rows + 64);
// random bf16 in [-2, 2), made on the host in 32 MiB pieces
const piece = new Uint16Array(2 ** 24);
let seed = 12345;
const f = new Float32Array(1), u = new Uint32Array(f.buffer);
for (let i = 0; i < piece.length; i++) {
  seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
  f[0] = ((seed >>> 8) / 16777216) * 4 - 2;
  piece[i] = u[0] >>> 16;
}
const bytes = new Uint8Array(piece.buffer);
for (let off = 0; off < 2 * n; off += bytes.length) dev.writeSync(ctx, x + off, bytes);
dev.check("cast", s.lw_cast(ctx, xf, F32, 0, x, BF16, 0, 1, n));
const e0 = dev.createEvent(), e1 = dev.createEvent();
function time(fn: () => number, reps = 20): number {
  dev.check("warm-up", fn());
  dev.sync(ctx);
  dev.record(e0, ctx);
  for (let r = 0; r < reps; r++) fn();
  dev.record(e1, ctx);
  dev.eventSync(e1);
  return dev.elapsedMs(e0, e1) / reps / 1000;
}
const cases: [string, number, () => number][] = [
  ["copy d2d (bf16 bytes)", 4 * n, () => s.lw_copy(ctx, y, x, 2 * n)],
  ["fp8 tensor dynamic", 5 * n, () => s.lw_quant_fp8(ctx, q, sc, x, BF16, rows, cols, 0, 1)],
  ["fp8 tensor dynamic, +1 elem views", 5 * n, () =>
    s.lw_quant_fp8(ctx, q + 1, sc, x + 2, BF16, 1, n - 1, 0, 1)],
  ["fp8 tensor given scale", 3 * n, () => s.lw_quant_fp8(ctx, q, sc, x, BF16, rows, cols, 0, 0)],
  ["fp8 row dynamic", 5 * n, () => s.lw_quant_fp8(ctx, q, sc, x, BF16, rows, cols, 1, 1)],
  ["fp8 block128 dynamic", 5 * n, () => s.lw_quant_fp8(ctx, q, sc, x, BF16, rows, cols, 2, 1)],
  ["int8 row", 5 * n, () => s.lw_quant_int8_row(ctx, q, sc, x, BF16, rows, cols)],
  ["fp8 tensor dynamic (f32 in)", 9 * n, () =>
    s.lw_quant_fp8(ctx, q, sc, xf, F32, rows, cols, 0, 1)],
  ["absmax bf16", 2 * n, () => s.lw_absmax(ctx, sc, x, BF16, n)],
  ["count non-finite bf16", 2 * n, () => s.lw_count_nonfinite(ctx, sc, x, BF16, n)],
  ["cast bf16 -> f32", 6 * n, () => s.lw_cast(ctx, xf, F32, 0, x, BF16, 0, 1, n)],
  ["cast f32 -> bf16", 6 * n, () => s.lw_cast(ctx, y, BF16, 0, xf, F32, 0, 1, n)],
  ["dequant fp8 tensor -> bf16", 3 * n, () => s.lw_dequant_fp8(ctx, y, BF16, q, sc, rows, cols, 0)],
  ["fill bf16", 2 * n, () => s.lw_fill(ctx, y, n, 2, 0x3f80, 0)],
];
console.log(`${dev.name}, ${n} bf16 elements; GB/s = bytes a call must move / time`);
let copyRate = 0;
for (const [name, b, fn] of cases) {
  const t = time(fn);
  const rate = b / t;
  if (!copyRate) copyRate = rate;
  console.log(
    `${name.padEnd(36)} ${(t * 1e3).toFixed(3).padStart(8)} ms ${
      (rate / 1e9).toFixed(0).padStart(6)
    } GB/s  ${(rate / copyRate).toFixed(3)} x copy`,
  );
}
TS
deno run -A build/gpu_bandwidth.ts 2>&1 | tee "$log/bandwidth.txt"
echo "== the same with the software e4m3 conversion (LAYERWISE_CUDA_SOFT_FP8=1)"
LAYERWISE_CUDA_SOFT_FP8=1 deno run -A build/gpu_bandwidth.ts 2>&1 | tee "$log/bandwidth_soft.txt"

echo "== package bench"
if [ -f scripts/bench.ts ]; then
  deno run -A scripts/bench.ts --backend cuda --json "$log/bench.json" > "$log/bench.txt" 2>&1
  tail -20 "$log/bench.txt"
fi
exit $test_rc

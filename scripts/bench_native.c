/*
 * Native reference for the WebAssembly kernel bench: the same wasm/kernels.c compiled by the
 * host C compiler with -O3, timed on the same inputs as scripts/bench.ts times the WASM build.
 *
 *   cc -O3 -o bench_native scripts/bench_native.c -lm
 *   ./bench_native <kernel> <elements> <reps>   ->  prints seconds per call
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../wasm/kernels.c"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s <kernel> <elements> <reps>\n", argv[0]);
    return 2;
  }
  const char *k = argv[1];
  size_t n = strtoull(argv[2], NULL, 10);
  int reps = atoi(argv[3]);
  size_t cols = 4096, rows = n / cols;
  uint16_t *x = malloc(n * 2);
  float *xf = malloc(n * 4);
  uint8_t *q = malloc(n * 4);
  size_t nscale = (rows + 1) * (cols / 128 + 1) + 16;
  float *scale = malloc(nscale * 4);
  for (size_t i = 0; i < nscale; i++) scale[i] = 1.0f;
  uint64_t *cnt = malloc(8);
  /* The same generator as the TypeScript side is not needed: timings do not depend on values,
   * only on them being ordinary finite numbers, so fill with a simple LCG in [-2, 2). */
  uint32_t s = 12345;
  for (size_t i = 0; i < n; i++) {
    s = s * 1664525u + 1013904223u;
    xf[i] = ((s >> 8) / 16777216.0f) * 4.0f - 2.0f;
    x[i] = lw_bf16_from_f32(xf[i]);
  }
  double best = 1e30;
  for (int r = -1; r < reps; r++) {
    double t0 = now();
    int st = 0;
    if (!strcmp(k, "copy")) st = lw_copy(0, q, x, n * 2);
    else if (!strcmp(k, "cast_bf16_f32")) st = lw_cast(0, xf, LW_F32, n, x, LW_BF16, n, 1, n);
    else if (!strcmp(k, "cast_f32_bf16")) st = lw_cast(0, q, LW_BF16, n, xf, LW_F32, n, 1, n);
    else if (!strcmp(k, "absmax")) st = lw_absmax(0, scale, x, LW_BF16, n);
    else if (!strcmp(k, "count_nonfinite")) st = lw_count_nonfinite(0, cnt, x, LW_BF16, n);
    else if (!strcmp(k, "fp8_tensor")) st = lw_quant_fp8(0, q, scale, x, LW_BF16, rows, cols, LW_PER_TENSOR, 1);
    else if (!strcmp(k, "fp8_row")) st = lw_quant_fp8(0, q, scale, x, LW_BF16, rows, cols, LW_PER_ROW, 1);
    else if (!strcmp(k, "fp8_block128")) st = lw_quant_fp8(0, q, scale, x, LW_BF16, rows, cols, LW_PER_BLOCK128, 1);
    else if (!strcmp(k, "int8_row")) st = lw_quant_int8_row(0, (int8_t *)q, scale, x, LW_BF16, rows, cols);
    else if (!strcmp(k, "dequant_fp8")) st = lw_dequant_fp8(0, xf, LW_BF16, q, scale, rows, cols, LW_PER_TENSOR);
    else {
      fprintf(stderr, "unknown kernel %s\n", k);
      return 2;
    }
    double t = now() - t0;
    if (st != 0) {
      fprintf(stderr, "%s failed with status %d\n", k, st);
      return 1;
    }
    if (r >= 0 && t < best) best = t;
  }
  printf("%.9f\n", best);
  return 0;
}

/*
 * Native reference for the WebAssembly kernel bench: the same wasm/kernels.c compiled by the
 * host C compiler with -O3, timed on the same inputs as scripts/bench.ts times the WASM build.
 * With T threads (OpenMP) each call is cut into T parts exactly as src/backend/wasm_split.ts cuts
 * it for T WebAssembly threads (element ranges, rows, 128-row bands; per-tensor fp8: absmax
 * partials, then one scale, then the parts quantized), so both sides do the same work.
 * `fp8_lookup` is no WebAssembly kernel: per-tensor fp8's table lookup alone, a measure of how far
 * the host's cores scale that kernel's main loop.
 *
 *   cc -O3 -fopenmp [-msse4.1 on x86-64] -o bench_native scripts/bench_native.c -lm
 *   ./bench_native <kernel> <elements> <reps> [threads]   ->  prints seconds per call
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../wasm/kernels.c"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* part p of T of [0, n) in units of `unit` (as splitRange in src/backend/wasm_split.ts) */
static void part(size_t n, int p, int T, size_t unit, size_t *a, size_t *b) {
  size_t units = (n + unit - 1) / unit;
  *a = units * p / T * unit;
  *b = units * (p + 1) / T * unit;
  if (*a > n) *a = n;
  if (*b > n) *b = n;
}

/* runs kernel k on T threads; 0 when every part succeeded */
static int run(const char *k, int T, uint16_t *x, float *xf, uint8_t *q, float *scale,
               uint64_t *cnt, float *partial, uint64_t *cpart, size_t rows, size_t cols) {
  size_t n = rows * cols, nb = cols / 128;
  int bad = 0;
  if (!strcmp(k, "fp8_lookup")) {
    /* Per-tensor fp8's main loop alone: every thread looks up its share in a table filled before
     * the first call, with no absmax and no table phase ahead of it. How this scales from 1 to T
     * threads is what the host's cores allow that kernel at best. */
    static uint8_t table[65536];
    static struct lw_rows rows;
    static int filled;
    if (!filled) {
      float s = lw_fp8_scale(2.0f); /* the inputs' absmax is just under 2 */
      fill_table(table, LW_BF16, s, 0, 65536);
      table_rows(&rows, table, LW_BF16, s);
      filled = 1;
    }
#pragma omp parallel for num_threads(T)
    for (int p = 0; p < T; p++) {
      size_t a, b;
      part(n, p, T, 64, &a, &b);
      lookup_rows(q + a, table, &rows, x + a, b - a);
    }
    return 0;
  }
  if (!strcmp(k, "fp8_tensor") && T > 1) {
#pragma omp parallel for num_threads(T) reduction(| : bad)
    for (int p = 0; p < T; p++) {
      size_t a, b;
      part(n, p, T, 64, &a, &b);
      bad |= lw_absmax(0, &partial[p], x + a, LW_BF16, b - a);
    }
    uint32_t m = 0;
    for (int p = 0; p < T; p++) m = lw_bits(partial[p]) > m ? lw_bits(partial[p]) : m;
    float mf = lw_float(m);
    uint8_t one;
    bad |= lw_quant_fp8(0, &one, scale, &mf, LW_F32, 1, 1, LW_PER_TENSOR, 1);
  }
#pragma omp parallel for num_threads(T) reduction(| : bad)
  for (int p = 0; p < T; p++) {
    size_t a, b, ra, rb, ba, bb;
    part(n, p, T, 64, &a, &b);
    part(rows, p, T, 1, &ra, &rb);
    part(rows, p, T, 128, &ba, &bb);
    int st = 0;
    if (!strcmp(k, "copy")) st = lw_copy(0, q + 2 * a, x + a, 2 * (b - a));
    else if (!strcmp(k, "cast_bf16_f32"))
      st = lw_cast(0, xf + a, LW_F32, b - a, x + a, LW_BF16, b - a, 1, b - a);
    else if (!strcmp(k, "cast_f32_bf16"))
      st = lw_cast(0, q + 2 * a, LW_BF16, b - a, xf + a, LW_F32, b - a, 1, b - a);
    else if (!strcmp(k, "absmax")) st = lw_absmax(0, &partial[p], x + a, LW_BF16, b - a);
    else if (!strcmp(k, "count_nonfinite"))
      st = lw_count_nonfinite(0, &cpart[p], x + a, LW_BF16, b - a);
    else if (!strcmp(k, "fp8_tensor"))
      st = lw_quant_fp8(0, q + a, scale, x + a, LW_BF16, 1, b - a, LW_PER_TENSOR, T == 1);
    else if (!strcmp(k, "fp8_row"))
      st = lw_quant_fp8(0, q + ra * cols, scale + ra, x + ra * cols, LW_BF16, rb - ra, cols,
                        LW_PER_ROW, 1);
    else if (!strcmp(k, "fp8_block128"))
      st = lw_quant_fp8(0, q + ba * cols, scale + ba / 128 * nb, x + ba * cols, LW_BF16, bb - ba,
                        cols, LW_PER_BLOCK128, 1);
    else if (!strcmp(k, "int8_row"))
      st = lw_quant_int8_row(0, (int8_t *)q + ra * cols, scale + ra, x + ra * cols, LW_BF16,
                             rb - ra, cols);
    else if (!strcmp(k, "dequant_fp8"))
      st = lw_dequant_fp8(0, (uint16_t *)xf + a, LW_BF16, q + a, scale, 1, b - a, LW_PER_TENSOR);
    else st = 1;
    bad |= st != 0;
  }
  if (!strcmp(k, "absmax")) {
    uint32_t m = 0;
    for (int p = 0; p < T; p++) m = lw_bits(partial[p]) > m ? lw_bits(partial[p]) : m;
    scale[0] = lw_float(m);
  } else if (!strcmp(k, "count_nonfinite")) {
    *cnt = 0;
    for (int p = 0; p < T; p++) *cnt += cpart[p];
  }
  return bad;
}

static const char *KERNELS[] = {"copy",       "cast_bf16_f32", "cast_f32_bf16", "absmax",
                                "count_nonfinite", "fp8_tensor", "fp8_row", "fp8_block128",
                                "int8_row",   "dequant_fp8", "fp8_lookup"};

int main(int argc, char **argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s <kernel> <elements> <reps> [threads]\n", argv[0]);
    return 2;
  }
  const char *k = argv[1];
  size_t n = strtoull(argv[2], NULL, 10);
  int reps = atoi(argv[3]);
  int T = argc == 5 ? atoi(argv[4]) : 1;
  if (T < 1 || T > 256) {
    fprintf(stderr, "threads must be 1..256\n");
    return 2;
  }
  int known = 0;
  for (size_t i = 0; i < sizeof KERNELS / sizeof *KERNELS; i++) known |= !strcmp(k, KERNELS[i]);
  if (!known) {
    fprintf(stderr, "unknown kernel %s\n", k);
    return 2;
  }
  size_t cols = 4096, rows = n / cols;
  n = rows * cols;
  uint16_t *x = malloc(n * 2);
  float *xf = malloc(n * 4);
  uint8_t *q = malloc(n * 4);
  size_t nscale = (rows + 1) * (cols / 128 + 1) + 16;
  float *scale = malloc(nscale * 4);
  for (size_t i = 0; i < nscale; i++) scale[i] = 1.0f;
  uint64_t cnt = 0;
  float partial[256];
  uint64_t cpart[256];
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
    int bad = run(k, T, x, xf, q, scale, &cnt, partial, cpart, rows, cols);
    double t = now() - t0;
    if (bad) {
      fprintf(stderr, "%s failed\n", k);
      return 1;
    }
    if (r >= 0 && t < best) best = t;
  }
  printf("%.9f\n", best);
  return 0;
}

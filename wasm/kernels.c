/*
 * The kernel ABI of cuda/layerwise.h on WebAssembly memory (pointers are memory offsets, ctx is
 * ignored). Every rounding rule comes from cuda/lw_numeric.h, shared with the CUDA kernels.
 *
 * Speed comes from the compiler: each (dtype, operation) pair gets its own tight loop over
 * contiguous elements with branch-free bodies, which clang turns into simd128 code. No loop
 * body switches on a dtype.
 */
#include "../cuda/layerwise.h"
#include "../cuda/lw_numeric.h"

/* Eight lanes per step: two v128 registers of f32/i32, so narrowing to 16 or 8 bits is one
 * two-input shuffle instead of one per register (clang only; other compilers ignore it). */
#if defined(__clang__)
#define LW_VEC8 _Pragma("clang loop vectorize_width(8) interleave_count(1)")
#define LW_VEC16 _Pragma("clang loop vectorize_width(16) interleave_count(1)")
#else
#define LW_VEC8
#define LW_VEC16
#endif

/* ------------------------------------------------------------------------------- errors */

static const char *last_error = "";

/* The text of the last refused call (the WebAssembly counterpart of lw_last_error). */
LW_API const char *lw_wasm_last_error(void) { return last_error; }

static lw_status refuse(const char *why) {
  last_error = why;
  return LW_EINVAL;
}

/* ------------------------------------------------------------------------------- copies */

LW_API lw_status lw_copy(void *ctx, void *dst, const void *src, size_t n) {
  (void)ctx;
  if (n) __builtin_memcpy(dst, src, n);
  return LW_OK;
}

LW_API lw_status lw_copy2d(void *ctx, void *dst, size_t dst_pitch, const void *src,
                           size_t src_pitch, size_t width, size_t rows) {
  (void)ctx;
  if (dst_pitch == width && src_pitch == width) {
    if (width != 0 && rows != 0) __builtin_memcpy(dst, src, width * rows);
    return LW_OK;
  }
  for (size_t r = 0; r < rows; r++) {
    __builtin_memcpy((uint8_t *)dst + r * dst_pitch, (const uint8_t *)src + r * src_pitch, width);
  }
  return LW_OK;
}

LW_API lw_status lw_fill(void *ctx, void *dst, size_t n, int32_t elem_size, uint32_t lo,
                         uint32_t hi) {
  (void)ctx;
  switch (elem_size) {
  case 1:
    __builtin_memset(dst, (int)(lo & 0xFFu), n);
    return LW_OK;
  case 2: {
    uint16_t *p = (uint16_t *)dst, v = (uint16_t)lo;
    for (size_t i = 0; i < n; i++) p[i] = v;
    return LW_OK;
  }
  case 4: {
    uint32_t *p = (uint32_t *)dst;
    for (size_t i = 0; i < n; i++) p[i] = lo;
    return LW_OK;
  }
  case 8: {
    uint64_t *p = (uint64_t *)dst, v = ((uint64_t)hi << 32) | lo;
    for (size_t i = 0; i < n; i++) p[i] = v;
    return LW_OK;
  }
  default:
    return refuse("lw_fill: element size must be 1, 2, 4 or 8 bytes");
  }
}

/* --------------------------------------------------------------------------------- casts */

static inline float ld_f32(float v) { return v; }
static inline float st_f32(float v) { return v; }

typedef void (*cast_fn)(void *dst, size_t dp, const void *src, size_t sp, size_t rows,
                        size_t cols);

/* One function per (source, destination) pair; rows are contiguous runs `pitch` elements apart. */
#define CAST(NAME, ST, LOAD, DT, STORE)                                                          \
  static void NAME(void *dst, size_t dp, const void *src, size_t sp, size_t rows, size_t cols) { \
    for (size_t r = 0; r < rows; r++) {                                                          \
      const ST *s = (const ST *)src + r * sp;                                                    \
      DT *d = (DT *)dst + r * dp;                                                                \
      LW_VEC8 for (size_t c = 0; c < cols; c++) d[c] = STORE(LOAD(s[c]));                       \
    }                                                                                            \
  }

#define CAST_FROM(SN, ST, LOAD)                                                                  \
  CAST(cast_##SN##_f32, ST, LOAD, float, st_f32)                                                 \
  CAST(cast_##SN##_f16, ST, LOAD, uint16_t, lw_f16_from_f32)                                     \
  CAST(cast_##SN##_bf16, ST, LOAD, uint16_t, lw_bf16_from_f32)                                   \
  CAST(cast_##SN##_e4m3, ST, LOAD, uint8_t, lw_e4m3_from_f32_sat)                                \
  CAST(cast_##SN##_e5m2, ST, LOAD, uint8_t, lw_e5m2_from_f32_sat)

CAST_FROM(f32, float, ld_f32)
CAST_FROM(f16, uint16_t, lw_f32_from_f16)
CAST_FROM(bf16, uint16_t, lw_f32_from_bf16)
CAST_FROM(e4m3, uint8_t, lw_f32_from_e4m3)
CAST_FROM(e5m2, uint8_t, lw_f32_from_e5m2)

#define CAST_ROW(SN)                                                                             \
  { cast_##SN##_f32, cast_##SN##_f16, cast_##SN##_bf16, cast_##SN##_e4m3, cast_##SN##_e5m2 }

/* [source][destination], indexed by dtype code; the diagonal is never used (plain copy) */
static const cast_fn CASTS[5][5] = {CAST_ROW(f32), CAST_ROW(f16), CAST_ROW(bf16), CAST_ROW(e4m3),
                                    CAST_ROW(e5m2)};

LW_API lw_status lw_cast(void *ctx, void *dst, int32_t dst_dtype, size_t dst_pitch,
                         const void *src, int32_t src_dtype, size_t src_pitch, size_t rows,
                         size_t cols) {
  (void)ctx;
  if (dst_dtype < 0 || dst_dtype > LW_BOOL || src_dtype < 0 || src_dtype > LW_BOOL) {
    return refuse("lw_cast: unknown dtype code");
  }
  if (dst_dtype == src_dtype) {
    size_t e = lw_dtype_size(dst_dtype);
    return lw_copy2d(ctx, dst, dst_pitch * e, src, src_pitch * e, cols * e, rows);
  }
  if (!lw_dtype_is_float(dst_dtype) || !lw_dtype_is_float(src_dtype)) {
    return refuse("lw_cast: conversions exist between floating dtypes only");
  }
  if (rows == 0 || cols == 0) return LW_OK;
  if ((dst_pitch == cols && src_pitch == cols) || rows == 1) {
    /* one long run: the inner loop sees every element at once */
    cols *= rows;
    rows = 1;
  }
  CASTS[src_dtype][dst_dtype](dst, dst_pitch, src, src_pitch, rows, cols);
  return LW_OK;
}

/* ------------------------------------------------------------------------------- absmax */

/* max |x| over the bits with the sign cleared: for IEEE formats the order of the magnitudes
 * is the order of those bits, and NaN magnitudes sort above Inf, so NaN detection is free.
 * These loops and the counts below ask clang for four interleaved vector chains: with one, V8's
 * code for the loop is bound by its own instructions, not memory (absmax and the NaN/Inf count
 * ran 1.7 x faster on one thread with four; BENCHMARKS.md, 2026-12-02, third session). */
static uint32_t max_abs32(const uint32_t *p, size_t n) {
  uint32_t m = 0;
#pragma clang loop interleave_count(4)
  for (size_t i = 0; i < n; i++) {
    uint32_t a = p[i] & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  return m;
}

static uint16_t max_abs16(const uint16_t *p, size_t n) {
  uint16_t m = 0;
#pragma clang loop interleave_count(4)
  for (size_t i = 0; i < n; i++) {
    uint16_t a = p[i] & 0x7FFFu;
    m = a > m ? a : m;
  }
  return m;
}

static uint8_t max_abs8(const uint8_t *p, size_t n) {
  uint8_t m = 0;
#pragma clang loop interleave_count(4)
  for (size_t i = 0; i < n; i++) {
    uint8_t a = p[i] & 0x7Fu;
    m = a > m ? a : m;
  }
  return m;
}

/* absmax of n contiguous elements of a floating dtype (checked by the caller) */
static float absmax_of(const void *src, int32_t dt, size_t n) {
  const float nan = lw_float(LW_F32_CANONICAL_NAN);
  switch (dt) {
  case LW_F32: {
    uint32_t m = max_abs32((const uint32_t *)src, n);
    return m > LW_F32_INF_BITS ? nan : lw_float(m);
  }
  case LW_F16: {
    uint16_t m = max_abs16((const uint16_t *)src, n);
    return m > 0x7C00u ? nan : lw_f32_from_f16(m);
  }
  case LW_BF16: {
    uint16_t m = max_abs16((const uint16_t *)src, n);
    return m > 0x7F80u ? nan : lw_f32_from_bf16(m);
  }
  case LW_F8_E4M3FN: {
    uint8_t m = max_abs8((const uint8_t *)src, n);
    return m == 0x7Fu ? nan : lw_f32_from_e4m3(m);
  }
  default: {
    uint8_t m = max_abs8((const uint8_t *)src, n);
    return m > 0x7Cu ? nan : lw_f32_from_e5m2(m);
  }
  }
}

LW_API lw_status lw_absmax(void *ctx, float *out, const void *src, int32_t dtype, size_t n) {
  (void)ctx;
  if (!lw_dtype_is_float(dtype)) return refuse("lw_absmax: the dtype must be floating");
  *out = absmax_of(src, dtype, n);
  return LW_OK;
}

/* ------------------------------------------------------------------------- non-finite */

/* Counts run in blocks small enough for narrow lane counters (16-bit lanes for 16-bit data,
 * 8-bit for bytes), which keeps the compare-and-add loop one vector wide. */
static size_t count_ge32(const uint32_t *p, size_t n, uint32_t lim) {
  size_t k = 0;
#pragma clang loop interleave_count(4)
  for (size_t i = 0; i < n; i++) k += (p[i] & 0x7FFFFFFFu) >= lim;
  return k;
}

static size_t count_ge16(const uint16_t *p, size_t n, uint16_t lim) {
  size_t k = 0;
  for (size_t i0 = 0; i0 < n; i0 += 65535) {
    size_t i1 = n - i0 < 65535 ? n : i0 + 65535;
    uint16_t c = 0;
#pragma clang loop interleave_count(4)
    for (size_t i = i0; i < i1; i++) c += (uint16_t)(p[i] & 0x7FFFu) >= lim;
    k += c;
  }
  return k;
}

static size_t count_ge8(const uint8_t *p, size_t n, uint8_t lim) {
  size_t k = 0;
  for (size_t i0 = 0; i0 < n; i0 += 255) {
    size_t i1 = n - i0 < 255 ? n : i0 + 255;
    uint8_t c = 0;
#pragma clang loop interleave_count(4)
    for (size_t i = i0; i < i1; i++) c += (uint8_t)(p[i] & 0x7Fu) >= lim;
    k += c;
  }
  return k;
}

LW_API lw_status lw_count_nonfinite(void *ctx, uint64_t *out, const void *src, int32_t dtype,
                                    size_t n) {
  (void)ctx;
  if (dtype < 0 || dtype > LW_BOOL) return refuse("lw_count_nonfinite: unknown dtype code");
  size_t k = 0;
  switch (dtype) {
  case LW_F32:
    k = count_ge32((const uint32_t *)src, n, LW_F32_INF_BITS);
    break;
  case LW_F16:
    k = count_ge16((const uint16_t *)src, n, 0x7C00u);
    break;
  case LW_BF16:
    k = count_ge16((const uint16_t *)src, n, 0x7F80u);
    break;
  case LW_F8_E4M3FN:
    k = count_ge8((const uint8_t *)src, n, 0x7Fu);
    break;
  case LW_F8_E5M2:
    k = count_ge8((const uint8_t *)src, n, 0x7Cu);
    break;
  default:
    break; /* integers are always finite */
  }
  *out = (uint64_t)k;
  return LW_OK;
}

/* ------------------------------------------------------------------------- quantization */

/* q[i] = e4m3(x[i] / s) for n contiguous elements, one loop per input dtype */
static void q8_f32(uint8_t *q, const float *x, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) q[i] = lw_e4m3_quant(x[i], s);
}
static void q8_f16(uint8_t *q, const uint16_t *x, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) q[i] = lw_e4m3_quant(lw_f32_from_f16(x[i]), s);
}
static void q8_bf16(uint8_t *q, const uint16_t *x, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) q[i] = lw_e4m3_quant(lw_f32_from_bf16(x[i]), s);
}

/* element i of a quantization input: x + i elements */
static const void *at(const void *x, int32_t dt, size_t i) {
  return (const uint8_t *)x + i * lw_dtype_size(dt);
}

/* Runs of 16-bit input at least this long go through a table: the byte of each of the 65536
 * input bit patterns, computed by the same lw_e4m3_quant as the plain loop (so the bytes are
 * identical by construction), then one lookup per element. Filling the table costs as much as
 * about 30000 elements of the plain loop; each lookup is about a third of an element's cost. */
#define LW_QUANT_TABLE_MIN ((size_t)1 << 17)

/* Entries [a, b) of the table of 16-bit dtype dt (f16, else bf16) at scale s. */
static void fill_table(uint8_t *t, int32_t dt, float s, uint32_t a, uint32_t b) {
  if (dt == LW_F16) {
    LW_VEC16 for (uint32_t i = a; i < b; i++) t[i] = lw_e4m3_quant(lw_f32_from_f16((uint16_t)i), s);
  } else {
    LW_VEC16 for (uint32_t i = a; i < b; i++) t[i] = lw_e4m3_quant(lw_f32_from_bf16((uint16_t)i), s);
  }
}

/* q[i] = t[x[i]]. Eight inputs are loaded as two 64-bit words and eight codes stored as one:
 * in WebAssembly every load and store is bounds-checked, so one of each per element left the
 * loop at half the native rate (BENCHMARKS.md, 2026-12-02, third session). Little-endian, as
 * WebAssembly and every host the native reference runs on. */
static void lookup16(uint8_t *restrict q, const uint8_t *restrict t, const uint16_t *restrict x,
                     size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t a, b;
    __builtin_memcpy(&a, x + i, 8);
    __builtin_memcpy(&b, x + i + 4, 8);
    uint64_t v = (uint64_t)t[a & 0xFFFF] | (uint64_t)t[(a >> 16) & 0xFFFF] << 8 |
                 (uint64_t)t[(a >> 32) & 0xFFFF] << 16 | (uint64_t)t[a >> 48] << 24 |
                 (uint64_t)t[b & 0xFFFF] << 32 | (uint64_t)t[(b >> 16) & 0xFFFF] << 40 |
                 (uint64_t)t[(b >> 32) & 0xFFFF] << 48 | (uint64_t)t[b >> 48] << 56;
    __builtin_memcpy(q + i, &v, 8);
  }
  for (; i < n; i++) q[i] = t[x[i]];
}

/* A bf16 table's rows, in vectors. For a positive normal scale, the quotient of a bf16 by it
 * has the same significand, rounded alike, for every exponent of the bf16 whose quotient lands
 * in e4m3's normal range; so there a row of the table (the 128 codes of one sign and exponent e)
 * is one row shifted by 8 codes per exponent: t[e|m] = T[m] + 8e (mod 256). Above that range the
 * same sum, capped at the table's largest code, is the saturated code; and a negative input's
 * code is its magnitude's with 0x80. T rises by at most one code within each aligned 8 of m, so
 * T[m] = base[m >> 3] + ((m & 7) >= step[m >> 3]): two 16-byte swizzles give 16 codes at once
 * (sign, exponent and mantissa parts taken in 16-bit lanes, then narrowed to bytes).
 * None of this is assumed: table_rows derives the rule from the table itself and keeps only the
 * rows (exponents lo..lo+span) it reproduces exactly, both signs; other inputs are looked up.
 * So the codes are the table's, which are lw_e4m3_quant's. The exponents outside (subnormal
 * codes, NaN, the rows past the wrap of the sum) are rare in weights: there each 16 inputs with
 * one such element are looked up one by one. */
typedef uint8_t lw_u8x16 __attribute__((vector_size(16)));
typedef int8_t lw_i8x16 __attribute__((vector_size(16)));
typedef uint16_t lw_u16x8 __attribute__((vector_size(16)));
typedef int16_t lw_i16x8 __attribute__((vector_size(16)));

/* Steps the vector extensions do not spell: a 16-byte table lookup (WebAssembly's swizzle;
 * SSSE3's pshufb, which gcc emits for __builtin_shuffle), any lane set, unsigned minimum,
 * saturating subtraction and narrowing 16-bit lanes under 256 (lanes of a, then of b): one
 * instruction each in WebAssembly, compare-and-select forms for gcc. A compiler with neither
 * keeps the entry-by-entry lookup. */
#if defined(__wasm_simd128__)
#define LW_ROWS 1
static inline lw_u8x16 swizzle16(lw_u8x16 t, lw_u8x16 i) {
  return (lw_u8x16)__builtin_wasm_swizzle_i8x16((lw_i8x16)t, (lw_i8x16)i);
}
static inline int any16(lw_u8x16 v) { return __builtin_wasm_any_true_v128((lw_i8x16)v); }
static inline lw_u8x16 min16(lw_u8x16 a, lw_u8x16 b) { return __builtin_elementwise_min(a, b); }
static inline lw_u16x8 subs16(lw_u16x8 a, lw_u16x8 b) { return __builtin_elementwise_sub_sat(a, b); }
static inline lw_u8x16 narrow16(lw_u16x8 a, lw_u16x8 b) {
  return (lw_u8x16)__builtin_wasm_narrow_u_i8x16_i16x8((lw_i16x8)a, (lw_i16x8)b);
}
#elif defined(__GNUC__) && !defined(__clang__) && (defined(__SSSE3__) || defined(__aarch64__))
#define LW_ROWS 1
static inline lw_u8x16 swizzle16(lw_u8x16 t, lw_u8x16 i) { return __builtin_shuffle(t, i); }
static inline int any16(lw_u8x16 v) {
  uint64_t w[2];
  __builtin_memcpy(w, &v, 16);
  return (w[0] | w[1]) != 0;
}
static inline lw_u8x16 min16(lw_u8x16 a, lw_u8x16 b) {
  lw_u8x16 over = (lw_u8x16)(a > b);
  return (a & ~over) | (b & over);
}
static inline lw_u16x8 subs16(lw_u16x8 a, lw_u16x8 b) { return (a - b) & (lw_u16x8)(a > b); }
static inline lw_u8x16 narrow16(lw_u16x8 a, lw_u16x8 b) {
  return __builtin_shuffle((lw_u8x16)a, (lw_u8x16)b,
                           (lw_u8x16){0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
}
#else
#define LW_ROWS 0
#endif

struct lw_rows {
  uint8_t valid, lo, span, sat;
  uint8_t pad[12];
  lw_u8x16 base, step;
};

/* Whether both rows of exponent e (either sign) of bf16 table t follow the rule of T and sat. */
static int row_ok(const uint8_t *t, const uint8_t *T, uint8_t sat, uint32_t e) {
  for (uint32_t m = 0; m < 128; m++) {
    uint8_t c = (uint8_t)(T[m] + 8 * e);
    if (c > sat) c = sat;
    if (t[e << 7 | m] != c || t[0x8000 | e << 7 | m] != (c | 0x80)) return 0;
  }
  return 1;
}

/* The code rule of the rows of table t of dtype dt at scale s (see above) into r; r->valid = 0
 * for an f16 table (its 1024 mantissas a row do not fit two swizzles), when the scale is not a
 * positive normal number, or when the table does not follow the rule. */
static void table_rows(struct lw_rows *r, const uint8_t *t, int32_t dt, float s) {
  r->valid = 0;
  uint32_t ef = lw_bits(s) >> 23; /* the sign bit too: a negative scale has no rows */
  if (!LW_ROWS || dt != LW_BF16 || ef == 0 || ef >= 254) return;
  /* The exponent whose quotients lie in (1, 4): in e4m3's normal range whatever the scale. */
  uint32_t ref = ef + 1;
  uint8_t T[128], base[16], step[16];
  for (uint32_t m = 0; m < 128; m++) T[m] = (uint8_t)(t[ref << 7 | m] - 8 * ref);
  for (uint32_t b = 0; b < 16; b++) {
    uint32_t j = 1;
    while (j < 8 && T[8 * b + j] == T[8 * b]) j++;
    base[b] = T[8 * b];
    step[b] = (uint8_t)j;
    for (j = 0; j < 8; j++) {
      if (T[8 * b + j] != (uint8_t)(base[b] + (j >= step[b]))) return;
    }
  }
  uint8_t sat = t[0x7F7F]; /* the code of the largest finite bf16 */
  if (!row_ok(t, T, sat, ref)) return;
  uint32_t lo = ref, hi = ref;
  while (lo > 0 && row_ok(t, T, sat, lo - 1)) lo--;
  while (hi < 255 && row_ok(t, T, sat, hi + 1)) hi++;
  for (uint32_t b = 0; b < 16; b++) r->base[b] = base[b], r->step[b] = step[b];
  r->lo = (uint8_t)lo;
  r->span = (uint8_t)(hi - lo);
  r->sat = sat;
  r->valid = 1;
}

/* lookup16, 16 at a time by the table's rule (bf16) where every one of the 16 is in its rows. */
static void lookup_rows(uint8_t *restrict q, const uint8_t *restrict t, const struct lw_rows *r,
                        const uint16_t *restrict x, size_t n) {
  if (!LW_ROWS || !r->valid) {
    lookup16(q, t, x, n);
    return;
  }
#if LW_ROWS
  const lw_u16x8 lo = (lw_u16x8){0} + r->lo, span = (lw_u16x8){0} + r->span;
  const lw_u8x16 base = r->base, step = r->step, sat = (lw_u8x16){0} + r->sat;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    lw_u16x8 a, b;
    __builtin_memcpy(&a, x + i, 16);
    __builtin_memcpy(&b, x + i + 8, 16);
    /* Exponents; (e - lo) past span, as a saturating subtraction, is non-zero outside the rows. */
    lw_u16x8 ea = (a >> 7) & 0xFF, eb = (b >> 7) & 0xFF;
    if (any16((lw_u8x16)(subs16(ea - lo, span) | subs16(eb - lo, span)))) {
      lookup16(q + i, t, x + i, 16);
      continue;
    }
    lw_u8x16 e = narrow16(ea, eb), k = narrow16((a & 0x7F) >> 3, (b & 0x7F) >> 3);
    lw_u8x16 j = narrow16(a & 7, b & 7), h = narrow16(a >> 8, b >> 8);
    lw_u8x16 c = swizzle16(base, k) - (lw_u8x16)(j >= swizzle16(step, k)) + (e << 3);
    c = min16(c, sat) | (h & 0x80);
    __builtin_memcpy(q + i, &c, 16);
  }
  lookup16(q + i, t, x + i, n - i);
#endif
}

/* The table lives on the calling thread's stack (each thread has its own; the build gives
 * every stack room for it). */
static void quant_by_table(uint8_t *q, const uint16_t *x, int32_t dt, size_t n, float s) {
  uint8_t t[65536];
  struct lw_rows r;
  fill_table(t, dt, s, 0, 65536);
  table_rows(&r, t, dt, s);
  lookup_rows(q, t, &r, x, n);
}

/* A per-tensor fp8 quantization of bf16 or f16 split across threads, in one call of every
 * thread: the absmax in parts, then the scale (lw_fp8_scale of the parts' largest absmax,
 * compared as bits, as on one thread), then one table for the call filled in parts instead of
 * one per thread, then its rows' rule, then the lookups in parts. Each step's parts are taken
 * from a counter; the thread finishing the last part of a step does the serial work that
 * follows it (the scale, the rule) and raises a flag that the others wait on. A thread waits
 * only once every part of the step is taken, by threads that are running it, so the call
 * finishes whichever threads come and when (the caller alone, if no other comes). One call of
 * the pool instead of three: each costs a wake and a wait for its slowest part
 * (ARCHITECTURE.md, "WebAssembly threads").
 *
 * `table` holds lw_wasm_fp8_tensor_bytes(): the 65536 codes, their rule, then the control
 * words, which lw_wasm_fp8_tensor_reset zeroes before each call. WebAssembly only
 * (src/backend/wasm_split.ts). */
#if defined(__wasm__)
enum {
  /* control words, each on a 64-byte line of its own: step counters, done counts, flags */
  LW_T_ABS_NEXT = 0, LW_T_ABS_DONE = 16, LW_T_MAX = 32, LW_T_SCALED = 48, LW_T_TAB_NEXT = 64,
  LW_T_TAB_DONE = 80, LW_T_RULED = 96, LW_T_LOOK_NEXT = 112, LW_T_WORDS = 128,
  LW_T_TAB_PARTS = 16
};
#define LW_TENSOR_TABLE_BYTES (65536 + 64 + 4 * LW_T_WORDS)

static uint32_t take(uint32_t *w) { return __atomic_fetch_add(w, 1u, __ATOMIC_SEQ_CST); }

/* Waits for flag *w, polling `spins` times before sleeping in memory.atomic.wait32; 0 once it
 * is raised. A step's parts are all taken by running threads, so only a thread that trapped in
 * its part (a bug) leaves a flag down: after a minute of waits, LW_EINVAL rather than a hang. */
static lw_status await_flag(uint32_t *w, uint32_t spins) {
  for (uint32_t i = 0; i < spins; i++) {
    if (__atomic_load_n(w, __ATOMIC_SEQ_CST)) return LW_OK;
  }
  for (uint32_t ms = 0; !__atomic_load_n(w, __ATOMIC_SEQ_CST); ms++) {
    if (ms == 60000) return refuse("lw_wasm_fp8_tensor: a thread of the call stopped in its part");
    __builtin_wasm_memory_atomic_wait32((int32_t *)w, 0, 1000000);
  }
  return LW_OK;
}

static void raise_flag(uint32_t *w) {
  __atomic_store_n(w, 1u, __ATOMIC_SEQ_CST);
  __builtin_wasm_memory_atomic_notify((int32_t *)w, 0xFFFFFFFFu);
}

/* [a, b): part p of `parts` of n elements, starting on multiples of 64 */
static void tensor_part(size_t n, uint32_t p, uint32_t parts, size_t *a, size_t *b) {
  size_t units = (n + 63) / 64;
  *a = units * p / parts * 64;
  *b = units * (p + 1) / parts * 64;
  if (*a > n) *a = n;
  if (*b > n) *b = n;
}

LW_API lw_status lw_wasm_fp8_tensor(void *ctx, uint8_t *q, float *scale, uint8_t *table,
                                    const uint16_t *x, int32_t dtype, size_t n, uint32_t parts,
                                    int32_t dynamic, uint32_t spins) {
  (void)ctx;
  if (dtype != LW_BF16 && dtype != LW_F16) return refuse("lw_wasm_fp8_tensor: bf16 or f16 only");
  if (parts == 0) return refuse("lw_wasm_fp8_tensor: no parts");
  uint32_t *w = (uint32_t *)(table + 65536 + 64);
  struct lw_rows *rule = (struct lw_rows *)(table + 65536);
  size_t a, b;
  if (dynamic) {
    for (uint32_t p; (p = take(&w[LW_T_ABS_NEXT])) < parts;) {
      tensor_part(n, p, parts, &a, &b);
      uint32_t m = lw_bits(absmax_of(x + a, dtype, b - a));
      uint32_t old = __atomic_load_n(&w[LW_T_MAX], __ATOMIC_SEQ_CST);
      while (m > old && !__atomic_compare_exchange_n(&w[LW_T_MAX], &old, m, 0, __ATOMIC_SEQ_CST,
                                                     __ATOMIC_SEQ_CST)) {
      }
      if (take(&w[LW_T_ABS_DONE]) + 1 == parts) {
        scale[0] = lw_fp8_scale(lw_float(__atomic_load_n(&w[LW_T_MAX], __ATOMIC_SEQ_CST)));
        raise_flag(&w[LW_T_SCALED]);
      }
    }
    lw_status st = await_flag(&w[LW_T_SCALED], spins);
    if (st != LW_OK) return st;
  }
  const float s = scale[0];
  for (uint32_t p; (p = take(&w[LW_T_TAB_NEXT])) < LW_T_TAB_PARTS;) {
    fill_table(table, dtype, s, p * (65536 / LW_T_TAB_PARTS), (p + 1) * (65536 / LW_T_TAB_PARTS));
    if (take(&w[LW_T_TAB_DONE]) + 1 == LW_T_TAB_PARTS) {
      table_rows(rule, table, dtype, s);
      raise_flag(&w[LW_T_RULED]);
    }
  }
  lw_status st = await_flag(&w[LW_T_RULED], spins);
  if (st != LW_OK) return st;
  for (uint32_t p; (p = take(&w[LW_T_LOOK_NEXT])) < parts;) {
    tensor_part(n, p, parts, &a, &b);
    lookup_rows(q + a, table, rule, x + a, b - a);
  }
  return LW_OK;
}

/* Bytes lw_wasm_fp8_tensor's table takes (codes, rule, control words). */
LW_API size_t lw_wasm_fp8_tensor_bytes(void) { return LW_TENSOR_TABLE_BYTES; }

/* Zeroes the control words of lw_wasm_fp8_tensor's table: before each call, no thread in it. */
LW_API lw_status lw_wasm_fp8_tensor_reset(void *ctx, uint8_t *table) {
  (void)ctx;
  __builtin_memset(table + 65536 + 64, 0, 4 * LW_T_WORDS);
  return LW_OK;
}
#endif

static void quant_run(uint8_t *q, const void *x, int32_t dt, size_t n, float s) {
  if (dt != LW_F32 && n >= LW_QUANT_TABLE_MIN) {
    quant_by_table(q, (const uint16_t *)x, dt, n, s);
    return;
  }
  if (dt == LW_F32) {
    q8_f32(q, (const float *)x, n, s);
  } else if (dt == LW_F16) {
    q8_f16(q, (const uint16_t *)x, n, s);
  } else {
    q8_bf16(q, (const uint16_t *)x, n, s);
  }
}

static void quant_fp8_block128(uint8_t *q, float *scale, const void *src, int32_t dt,
                               size_t rows, size_t cols, int32_t dynamic) {
  size_t nb = (cols + 127) / 128;
  for (size_t r0 = 0; r0 < rows; r0 += 128) {
    size_t r1 = r0 + 128 < rows ? r0 + 128 : rows;
    for (size_t b = 0; b < nb; b++) {
      size_t c0 = b * 128, w = cols - c0 < 128 ? cols - c0 : 128;
      float *sp = scale + (r0 / 128) * nb + b;
      if (dynamic) {
        /* absmax composes: max over rows of each row's absmax (NaN dominates as in absmax_of) */
        float m = 0.0f;
        int nan = 0;
        for (size_t r = r0; r < r1; r++) {
          float a = absmax_of(at(src, dt, r * cols + c0), dt, w);
          nan |= lw_isnan(a);
          m = a > m ? a : m;
        }
        *sp = lw_fp8_scale(nan ? lw_float(LW_F32_CANONICAL_NAN) : m);
      }
      float s = *sp;
      for (size_t r = r0; r < r1; r++) quant_run(q + r * cols + c0, at(src, dt, r * cols + c0), dt, w, s);
    }
  }
}

LW_API lw_status lw_quant_fp8(void *ctx, uint8_t *q, float *scale, const void *src,
                              int32_t src_dtype, size_t rows, size_t cols, int32_t granularity,
                              int32_t dynamic) {
  (void)ctx;
  if (!lw_dtype_is_quant_input(src_dtype)) return refuse("lw_quant_fp8: the input must be f32, f16 or bf16");
  if (granularity < LW_PER_TENSOR || granularity > LW_PER_BLOCK128) {
    return refuse("lw_quant_fp8: unknown granularity");
  }
  if (rows == 0 || cols == 0) return LW_OK;
  if (granularity == LW_PER_TENSOR) {
    if (dynamic) scale[0] = lw_fp8_scale(absmax_of(src, src_dtype, rows * cols));
    quant_run(q, src, src_dtype, rows * cols, scale[0]);
  } else if (granularity == LW_PER_ROW) {
    for (size_t r = 0; r < rows; r++) {
      const void *x = at(src, src_dtype, r * cols);
      if (dynamic) scale[r] = lw_fp8_scale(absmax_of(x, src_dtype, cols));
      quant_run(q + r * cols, x, src_dtype, cols, scale[r]);
    }
  } else {
    quant_fp8_block128(q, scale, src, src_dtype, rows, cols, dynamic);
  }
  return LW_OK;
}

static void qi8_f32(int8_t *q, const float *x, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) q[i] = lw_int8_quant(x[i], s);
}
static void qi8_f16(int8_t *q, const uint16_t *x, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) q[i] = lw_int8_quant(lw_f32_from_f16(x[i]), s);
}
static void qi8_bf16(int8_t *q, const uint16_t *x, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) q[i] = lw_int8_quant(lw_f32_from_bf16(x[i]), s);
}

LW_API lw_status lw_quant_int8_row(void *ctx, int8_t *q, float *scale, const void *src,
                                   int32_t src_dtype, size_t rows, size_t cols) {
  (void)ctx;
  if (!lw_dtype_is_quant_input(src_dtype)) {
    return refuse("lw_quant_int8_row: the input must be f32, f16 or bf16");
  }
  for (size_t r = 0; r < rows && cols; r++) {
    const void *x = at(src, src_dtype, r * cols);
    float s = lw_int8_scale(absmax_of(x, src_dtype, cols));
    scale[r] = s;
    if (src_dtype == LW_F32) {
      qi8_f32(q + r * cols, (const float *)x, cols, s);
    } else if (src_dtype == LW_F16) {
      qi8_f16(q + r * cols, (const uint16_t *)x, cols, s);
    } else {
      qi8_bf16(q + r * cols, (const uint16_t *)x, cols, s);
    }
  }
  return LW_OK;
}

/* --------------------------------------------------------------------------- dequantization */

static void dq_f32(float *d, const uint8_t *q, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) d[i] = lw_mul(lw_f32_from_e4m3(q[i]), s);
}
static void dq_f16(uint16_t *d, const uint8_t *q, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) d[i] = lw_f16_from_f32(lw_mul(lw_f32_from_e4m3(q[i]), s));
}
static void dq_bf16(uint16_t *d, const uint8_t *q, size_t n, float s) {
  LW_VEC16 for (size_t i = 0; i < n; i++) d[i] = lw_bf16_from_f32(lw_mul(lw_f32_from_e4m3(q[i]), s));
}

static void dequant_run(void *dst, int32_t dt, size_t i, const uint8_t *q, size_t n, float s) {
  if (dt == LW_F32) {
    dq_f32((float *)dst + i, q + i, n, s);
  } else if (dt == LW_F16) {
    dq_f16((uint16_t *)dst + i, q + i, n, s);
  } else {
    dq_bf16((uint16_t *)dst + i, q + i, n, s);
  }
}

LW_API lw_status lw_dequant_fp8(void *ctx, void *dst, int32_t dst_dtype, const uint8_t *q,
                                const float *scale, size_t rows, size_t cols,
                                int32_t granularity) {
  (void)ctx;
  if (!lw_dtype_is_quant_input(dst_dtype)) {
    return refuse("lw_dequant_fp8: the output must be f32, f16 or bf16");
  }
  if (granularity < LW_PER_TENSOR || granularity > LW_PER_BLOCK128) {
    return refuse("lw_dequant_fp8: unknown granularity");
  }
  if (rows == 0 || cols == 0) return LW_OK;
  if (granularity == LW_PER_TENSOR) {
    dequant_run(dst, dst_dtype, 0, q, rows * cols, scale[0]);
  } else if (granularity == LW_PER_ROW) {
    for (size_t r = 0; r < rows; r++) dequant_run(dst, dst_dtype, r * cols, q, cols, scale[r]);
  } else {
    size_t nb = (cols + 127) / 128;
    for (size_t r = 0; r < rows; r++) {
      for (size_t b = 0; b < nb; b++) {
        size_t c0 = b * 128, w = cols - c0 < 128 ? cols - c0 : 128;
        dequant_run(dst, dst_dtype, r * cols + c0, q, w, scale[(r / 128) * nb + b]);
      }
    }
  }
  return LW_OK;
}

/* --------------------------------------------------------------- multi-tensor kernels
 * The reference semantics of the tables in cuda/layerwise.h, one item after another. Absmax is
 * the maximum of the magnitude bits (as absmax_of), so per-piece maxima compose exactly. */

#define MT_PTR(a) ((uint8_t *)(uintptr_t)(a))

/* magnitude bits of the largest element of n contiguous elements of a quantization input */
static uint32_t absbits_of(const void *src, int32_t dt, size_t n) {
  if (dt == LW_F32) return max_abs32((const uint32_t *)src, n);
  return max_abs16((const uint16_t *)src, n);
}

/* the f32 absmax of magnitude bits of dtype dt, NaN canonical (as absmax_of) */
static float absbits_value(int32_t dt, uint32_t m) {
  const float nan = lw_float(LW_F32_CANONICAL_NAN);
  if (dt == LW_F32) return m > LW_F32_INF_BITS ? nan : lw_float(m);
  if (dt == LW_F16) return m > 0x7C00u ? nan : lw_f32_from_f16((uint16_t)m);
  return m > 0x7F80u ? nan : lw_f32_from_bf16((uint16_t)m);
}

/* address of row r, column c of target t, from its pieces */
static const uint8_t *mt_src(const uint64_t *t, const uint64_t *pieces, const uint64_t *bases,
                             size_t r, size_t c, size_t esz) {
  const uint64_t *p = pieces + t[5] * LW_MT_PIECE_FIELDS;
  for (uint64_t k = 0; k < t[6]; k++, p += LW_MT_PIECE_FIELDS) {
    if (r >= p[3] && r < p[3] + p[4]) {
      return MT_PTR(bases[p[0]] + p[1]) + ((r - p[3]) * p[2] + c) * esz;
    }
  }
  return NULL; /* the plan covers every row; unreachable */
}

/* scale[0] of target t from the partials of all its items */
static void mt_fold_scale(const uint64_t *t, int32_t dt, const uint32_t *partials) {
  uint32_t all = 0;
  for (uint64_t k = t[7]; k < t[7] + t[8]; k++) all = partials[k] > all ? partials[k] : all;
  *(float *)MT_PTR(t[1]) = lw_fp8_scale(absbits_value(dt, all));
}

LW_API lw_status lw_mt_absmax(void *ctx, const uint64_t *targets, const uint64_t *pieces,
                              const uint64_t *items, size_t first, size_t n,
                              const uint64_t *bases, int32_t src_dtype, uint32_t *partials,
                              uint32_t *counters) {
  (void)ctx;
  if (!lw_dtype_is_quant_input(src_dtype)) return refuse("lw_mt_absmax: the input must be f32, f16 or bf16");
  size_t esz = lw_dtype_size(src_dtype);
  for (size_t i = first; i < first + n; i++) {
    const uint64_t *it = items + i * LW_MT_ITEM_FIELDS;
    const uint64_t *t = targets + it[0] * LW_MT_TARGET_FIELDS;
    uint32_t m = 0;
    for (uint64_t r = it[1]; r < it[1] + it[2]; r++) {
      const uint8_t *x = mt_src(t, pieces, bases, r, it[3], esz);
      if (x) {
        uint32_t a = absbits_of(x, src_dtype, it[4]);
        m = a > m ? a : m;
      }
    }
    partials[i] = m;
    /* the target's last item: every partial is in (counters NULL: a scan, partials only) */
    if (counters && i == t[7] + t[8] - 1) mt_fold_scale(t, src_dtype, partials);
  }
  return LW_OK;
}

LW_API lw_status lw_mt_absmax_fold(void *ctx, const uint64_t *targets, const uint64_t *items,
                                   size_t first, size_t n, int32_t src_dtype,
                                   const uint32_t *partials) {
  (void)ctx;
  if (!lw_dtype_is_quant_input(src_dtype)) return refuse("lw_mt_absmax_fold: the input must be f32, f16 or bf16");
  for (size_t i = first; i < first + n; i++) {
    const uint64_t *t = targets + items[i * LW_MT_ITEM_FIELDS] * LW_MT_TARGET_FIELDS;
    if (t[7] == i) mt_fold_scale(t, src_dtype, partials);
  }
  return LW_OK;
}

static void qi8_run(int8_t *q, const void *x, int32_t dt, size_t n, float s) {
  if (dt == LW_F32) {
    qi8_f32(q, (const float *)x, n, s);
  } else if (dt == LW_F16) {
    qi8_f16(q, (const uint16_t *)x, n, s);
  } else {
    qi8_bf16(q, (const uint16_t *)x, n, s);
  }
}

LW_API lw_status lw_mt_quant(void *ctx, int32_t kind, const uint64_t *targets,
                             const uint64_t *pieces, const uint64_t *items, size_t first,
                             size_t n, const uint64_t *bases, int32_t src_dtype) {
  (void)ctx;
  if (!lw_dtype_is_quant_input(src_dtype)) return refuse("lw_mt_quant: the input must be f32, f16 or bf16");
  if (kind < LW_MT_FP8_TENSOR || kind > LW_MT_INT8_ROW) return refuse("lw_mt_quant: unknown kind");
  size_t esz = lw_dtype_size(src_dtype);
  for (size_t i = first; i < first + n; i++) {
    const uint64_t *it = items + i * LW_MT_ITEM_FIELDS;
    const uint64_t *t = targets + it[0] * LW_MT_TARGET_FIELDS;
    uint8_t *q = MT_PTR(t[0]);
    float *scale = (float *)MT_PTR(t[1]);
    size_t cols = t[4], r0 = it[1], r1 = it[1] + it[2], c0 = it[3], w = it[4];
    if (kind == LW_MT_FP8_BLOCK128) {
      uint32_t m = 0;
      for (size_t r = r0; r < r1; r++) {
        const uint8_t *x = mt_src(t, pieces, bases, r, c0, esz);
        uint32_t a = x ? absbits_of(x, src_dtype, w) : 0;
        m = a > m ? a : m;
      }
      float s = lw_fp8_scale(absbits_value(src_dtype, m));
      scale[(r0 / 128) * ((cols + 127) / 128) + c0 / 128] = s;
      for (size_t r = r0; r < r1; r++) {
        const uint8_t *x = mt_src(t, pieces, bases, r, c0, esz);
        if (x) quant_run(q + r * cols + c0, x, src_dtype, w, s);
      }
      continue;
    }
    for (size_t r = r0; r < r1; r++) {
      const uint8_t *x = mt_src(t, pieces, bases, r, c0, esz);
      if (!x) continue;
      if (kind == LW_MT_FP8_TENSOR) {
        quant_run(q + r * cols + c0, x, src_dtype, w, scale[0]);
      } else if (kind == LW_MT_FP8_ROW) {
        float s = lw_fp8_scale(absbits_value(src_dtype, absbits_of(x, src_dtype, w)));
        scale[r] = s;
        quant_run(q + r * cols + c0, x, src_dtype, w, s);
      } else {
        float s = lw_int8_scale(absbits_value(src_dtype, absbits_of(x, src_dtype, w)));
        scale[r] = s;
        qi8_run((int8_t *)q + r * cols + c0, x, src_dtype, w, s);
      }
    }
  }
  return LW_OK;
}

LW_API lw_status lw_mt_copy(void *ctx, const uint64_t *targets, const uint64_t *pieces,
                            const uint64_t *items, size_t first, size_t n, const uint64_t *bases,
                            int32_t src_dtype, int32_t dst_dtype) {
  if (src_dtype < 0 || src_dtype > LW_BOOL || dst_dtype < 0 || dst_dtype > LW_BOOL) {
    return refuse("lw_mt_copy: unknown dtype code");
  }
  if (src_dtype != dst_dtype && !(lw_dtype_is_float(src_dtype) && lw_dtype_is_float(dst_dtype))) {
    return refuse("lw_mt_copy: conversions exist between floating dtypes only");
  }
  size_t se = lw_dtype_size(src_dtype), de = lw_dtype_size(dst_dtype);
  for (size_t i = first; i < first + n; i++) {
    const uint64_t *it = items + i * LW_MT_ITEM_FIELDS;
    const uint64_t *t = targets + it[0] * LW_MT_TARGET_FIELDS;
    for (uint64_t r = it[1]; r < it[1] + it[2]; r++) {
      const uint8_t *x = mt_src(t, pieces, bases, r, it[3], se);
      if (!x) continue;
      lw_status s = lw_cast(ctx, MT_PTR(t[0]) + (r * t[2] + it[3]) * de, dst_dtype, it[4], x,
                            src_dtype, it[4], 1, it[4]);
      if (s != LW_OK) return s;
    }
  }
  return LW_OK;
}

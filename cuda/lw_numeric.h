/*
 * layerwise scalar numerics: every rounding rule of the kernels, defined once and compiled into
 * both cuda/kernels.cu and wasm/kernels.c so the two produce bit-identical bytes.
 *
 * Rules (checked against fixtures/vectors, written by PyTorch on an x86 CPU):
 * - all arithmetic is float32; each operation below is exact or a single IEEE operation, so the
 *   result does not depend on FMA contraction (CUDA builds use -fmad=false, no fast-math);
 * - f32 -> bf16/f16/fp8 round to nearest even;
 * - NaN results never depend on the hardware's NaN propagation (WebAssembly leaves the sign of a
 *   NaN result unspecified; CUDA returns a canonical NaN): every NaN case is decided here,
 *   following what PyTorch's vectorized x86 CPU code produces:
 *     f32 NaN -> bf16 0xFFFF; f32 NaN -> f16 quiet NaN keeping sign and top payload bits (F16C);
 *     f16 NaN -> f32 quiet NaN (F16C); e4m3fn NaN -> f32 0x7FF00000 | sign;
 *     f32 NaN/+-Inf -> e4m3fn 0x7F | sign; f32 NaN -> e5m2 0x7F | sign, +-Inf stays +-Inf;
 *     a NaN made by an invalid operation (Inf/Inf, 0/0, 0*Inf) is x86's default NaN 0xFFC00000.
 *
 * Plain C99 that also compiles as CUDA C++.
 */
#ifndef LW_NUMERIC_H
#define LW_NUMERIC_H

#include <stddef.h>
#include <stdint.h>

#include "layerwise.h"

#ifdef __CUDACC__
#define LW_HD __host__ __device__ __forceinline__
#else
#define LW_HD static inline
#endif

/* --------------------------------------------------------------------------- bit access */

LW_HD uint32_t lw_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  union {
    float f;
    uint32_t u;
  } v;
  v.f = f;
  return v.u;
#endif
}

LW_HD float lw_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  union {
    float f;
    uint32_t u;
  } v;
  v.u = u;
  return v.f;
#endif
}

/* bits of |x| above this are NaN; equal is Inf */
#define LW_F32_INF_BITS 0x7F800000u
/* x86's default NaN: what an invalid operation (Inf/Inf, 0/0, 0*Inf) yields on the reference */
#define LW_F32_DEFAULT_NAN 0xFFC00000u
/* the NaN returned by reductions (absmax) over data that holds a NaN */
#define LW_F32_CANONICAL_NAN 0x7FC00000u

/* x != x is one instruction where a bit test is several (no fast-math anywhere) */
LW_HD int lw_isnan(float x) { return x != x; }

/* |x| by clearing the sign bit (exact; keeps NaN payloads). Range tests below compare |x| as a
 * float: one SIMD instruction, where unsigned integer compares are several. */
LW_HD float lw_fabs(float x) { return lw_float(lw_bits(x) & 0x7FFFFFFFu); }

/* ---------------------------------------------------------------------------- bfloat16 */

LW_HD float lw_f32_from_bf16(uint16_t h) { return lw_float((uint32_t)h << 16); }

LW_HD uint16_t lw_bf16_from_f32(float f) {
  uint32_t u = lw_bits(f);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  /* PyTorch's AVX2/AVX-512 conversion blends every NaN to all ones */
  return lw_isnan(f) ? (uint16_t)0xFFFFu : (uint16_t)r;
}

/* ------------------------------------------------------------------------------ float16 */

LW_HD float lw_f32_from_f16(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t a = (uint32_t)h & 0x7FFFu;
  uint32_t m = a & 0x3FFu;
  uint32_t normal = (a << 13) + 0x38000000u; /* rebias 15 -> 127 */
  /* subnormal: m * 2^-24, exact in f32 (integer conversion and a power-of-two product) */
  uint32_t sub = lw_bits((float)(int32_t)m * 5.9604644775390625e-8f);
  uint32_t special = LW_F32_INF_BITS | (m << 13) | (m ? 0x00400000u : 0u); /* F16C quiets */
  uint32_t r = a >= 0x7C00u ? special : (a < 0x0400u ? sub : normal);
  return lw_float(sign | r);
}

LW_HD uint16_t lw_f16_from_f32(float f) {
  uint32_t u = lw_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  float af = lw_fabs(f);
  uint32_t a = lw_bits(af);
  /* below 2^-14: adding 0.5 (ulp 2^-24) rounds |f| to a multiple of the f16 subnormal step */
  uint32_t sub = lw_bits(af + 0.5f) - 0x3F000000u;
  uint32_t normal = ((a + 0xFFFu + ((a >> 13) & 1u)) >> 13) - (112u << 10);
  uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  uint32_t r = lw_isnan(f)         ? nan
               : af >= 65536.0f    ? 0x7C00u /* rounding reaches Inf from 65520 up */
               : af < 6.103515625e-5f ? sub  /* 2^-14 */
                                   : normal;
  return (uint16_t)(sign | r);
}

/* ------------------------------------------------------------------------------ e4m3fn */

LW_HD float lw_f32_from_e4m3(uint8_t b) {
  uint32_t sign = ((uint32_t)b & 0x80u) << 24;
  uint32_t a = (uint32_t)b & 0x7Fu;
  uint32_t normal = (a << 20) + (120u << 23); /* rebias 7 -> 127 */
  uint32_t sub = lw_bits((float)(int32_t)a * 0.001953125f); /* m * 2^-9 */
  uint32_t r = a == 0x7Fu ? 0x7FF00000u : (a < 0x08u ? sub : normal);
  return lw_float(sign | r);
}

/* e4m3fn magnitude bits of af = |f| (not NaN): 0x7E (448) from 448 up, else rounded */
LW_HD uint32_t lw_e4m3_mag(float af) {
  uint32_t a = lw_bits(af);
  /* below 2^-6: adding 2^14 (ulp 2^-9) rounds to a multiple of the e4m3 subnormal step */
  uint32_t sub = lw_bits(af + 16384.0f) - 0x46800000u;
  uint32_t normal = ((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  return af >= 448.0f ? 0x7Eu : af < 0.015625f ? sub : normal;
}

/* saturating: finite |f| >= 448 -> 0x7E | sign; NaN and +-Inf -> 0x7F | sign (no Inf in e4m3fn) */
LW_HD uint8_t lw_e4m3_from_f32_sat(float f) {
  uint32_t sign = (lw_bits(f) >> 24) & 0x80u;
  float af = lw_fabs(f);
  /* af > FLT_MAX is +Inf; NaN fails every compare and is caught first */
  uint32_t r = lw_isnan(f) || af > 3.4028234663852886e38f ? 0x7Fu : lw_e4m3_mag(af);
  return (uint8_t)(sign | r);
}

/* -------------------------------------------------------------------------------- e5m2 */

LW_HD float lw_f32_from_e5m2(uint8_t b) {
  /* e5m2 is the top byte of an f16; NaN payloads are kept as-is (PyTorch's scalar path) */
  uint32_t sign = ((uint32_t)b & 0x80u) << 24;
  uint32_t a = (uint32_t)b & 0x7Fu;
  uint32_t normal = (a << 21) + (112u << 23);
  uint32_t sub = lw_bits((float)(int32_t)a * 1.52587890625e-5f); /* m * 2^-16 */
  uint32_t special = LW_F32_INF_BITS | ((a & 3u) << 21);
  uint32_t r = a >= 0x7Cu ? special : (a < 0x04u ? sub : normal);
  return lw_float(sign | r);
}

/* saturating: finite |f| >= 57344 -> 0x7B | sign; +-Inf -> 0x7C | sign; NaN -> 0x7F | sign */
LW_HD uint8_t lw_e5m2_from_f32_sat(float f) {
  uint32_t sign = (lw_bits(f) >> 24) & 0x80u;
  float af = lw_fabs(f);
  uint32_t a = lw_bits(af);
  /* below 2^-14: adding 2^7 (ulp 2^-16) rounds to a multiple of the e5m2 subnormal step */
  uint32_t sub = lw_bits(af + 128.0f) - 0x43000000u;
  uint32_t normal = ((a + 0xFFFFFu + ((a >> 21) & 1u)) >> 21) - (112u << 2);
  uint32_t r = lw_isnan(f)                     ? 0x7Fu
               : af > 3.4028234663852886e38f   ? 0x7Cu /* Inf */
               : af >= 57344.0f                ? 0x7Bu
               : af < 6.103515625e-5f          ? sub /* 2^-14 */
                                               : normal;
  return (uint8_t)(sign | r);
}

/* ------------------------------------------------------------------------ quantization */

/* x / scale with the reference's NaN rules: a NaN operand is returned quieted (x first),
 * an invalid division (Inf/Inf, 0/0) gives the default NaN */
LW_HD float lw_div(float x, float scale) {
  float y = x / scale;
  uint32_t r = lw_isnan(x)       ? lw_bits(x) | 0x00400000u
               : lw_isnan(scale) ? lw_bits(scale) | 0x00400000u
               : lw_isnan(y)     ? LW_F32_DEFAULT_NAN
                                 : lw_bits(y);
  return lw_float(r);
}

/* a * b with the same NaN rules as lw_div */
LW_HD float lw_mul(float a, float b) {
  float y = a * b;
  uint32_t r = lw_isnan(a)   ? lw_bits(a) | 0x00400000u
               : lw_isnan(b) ? lw_bits(b) | 0x00400000u
               : lw_isnan(y) ? LW_F32_DEFAULT_NAN
                             : lw_bits(y);
  return lw_float(r);
}

/* dynamic fp8 scale: max(absmax / 448, 1/(448*512)); NaN absmax gives NaN (torch.clamp keeps
 * NaN), returned as the canonical quiet NaN */
LW_HD float lw_fp8_scale(float absmax) {
  const float min_scale = (float)(1.0 / 229376.0);
  float s = absmax / 448.0f;
  return lw_isnan(absmax) ? lw_float(LW_F32_CANONICAL_NAN) : (s < min_scale ? min_scale : s);
}

/* e4m3fn(clamp(x / scale, -448, 448)); a NaN quotient keeps its sign (torch.clamp keeps NaN) */
LW_HD uint8_t lw_e4m3_quant(float x, float scale) {
  float y = lw_div(x, scale);
  uint32_t sign = (lw_bits(y) >> 24) & 0x80u;
  /* clamping to +-448 first gives the same byte as saturating (Inf included) */
  uint32_t r = lw_isnan(y) ? 0x7Fu : lw_e4m3_mag(lw_fabs(y));
  return (uint8_t)(sign | r);
}

/* int8 per-row scale: max(absmax / 127, 1e-10); NaN absmax gives the canonical NaN */
LW_HD float lw_int8_scale(float absmax) {
  const float min_scale = (float)1e-10;
  float s = absmax / 127.0f;
  return lw_isnan(absmax) ? lw_float(LW_F32_CANONICAL_NAN) : (s < min_scale ? min_scale : s);
}

/* round half to even of a finite float with |y| <= 2^23 handled exactly (larger is integral) */
LW_HD float lw_rint(float y) {
#if defined(__CUDA_ARCH__)
  return rintf(y);
#else
  return __builtin_rintf(y);
#endif
}

/* clamp(round_half_even(x / scale), -128, 127); NaN quotients (no int8 NaN) become 0 */
LW_HD int8_t lw_int8_quant(float x, float scale) {
  float y = lw_div(x, scale);
  /* NaN is replaced before the conversion: converting it is undefined (a trap in WebAssembly) */
  float c = lw_isnan(y) ? 0.0f : y < -128.0f ? -128.0f : (y > 127.0f ? 127.0f : y);
  return (int8_t)(int32_t)lw_rint(c);
}

/* ------------------------------------------------------------------ dtype dispatch helpers */

/* Whether a dtype code is floating point (f32, f16, bf16, fp8): what casts, absmax and
 * non-finite counts accept. */
LW_HD int lw_dtype_is_float(int32_t dtype) { return dtype >= LW_F32 && dtype <= LW_F8_E5M2; }

/* Whether a dtype code is a quantization input (f32, f16, bf16). */
LW_HD int lw_dtype_is_quant_input(int32_t dtype) {
  return dtype == LW_F32 || dtype == LW_F16 || dtype == LW_BF16;
}

/* Bytes per element of a dtype code; 0 for a code the ABI does not know. */
LW_HD size_t lw_dtype_size(int32_t dtype) {
  switch (dtype) {
  case LW_F32:
  case LW_I32:
    return 4;
  case LW_F16:
  case LW_BF16:
    return 2;
  case LW_I64:
    return 8;
  case LW_F8_E4M3FN:
  case LW_F8_E5M2:
  case LW_I8:
  case LW_U8:
  case LW_BOOL:
    return 1;
  default:
    return 0;
  }
}

/* Floating dtypes only; other codes read as 0 and are not written. */
LW_HD float lw_load_f32(const void *p, int dtype, size_t i) {
  switch (dtype) {
  case LW_F32:
    return ((const float *)p)[i];
  case LW_F16:
    return lw_f32_from_f16(((const uint16_t *)p)[i]);
  case LW_BF16:
    return lw_f32_from_bf16(((const uint16_t *)p)[i]);
  case LW_F8_E4M3FN:
    return lw_f32_from_e4m3(((const uint8_t *)p)[i]);
  case LW_F8_E5M2:
    return lw_f32_from_e5m2(((const uint8_t *)p)[i]);
  default:
    return 0.0f;
  }
}

LW_HD void lw_store_f32(void *p, int dtype, size_t i, float v) {
  switch (dtype) {
  case LW_F32:
    ((float *)p)[i] = v;
    break;
  case LW_F16:
    ((uint16_t *)p)[i] = lw_f16_from_f32(v);
    break;
  case LW_BF16:
    ((uint16_t *)p)[i] = lw_bf16_from_f32(v);
    break;
  case LW_F8_E4M3FN:
    ((uint8_t *)p)[i] = lw_e4m3_from_f32_sat(v);
    break;
  case LW_F8_E5M2:
    ((uint8_t *)p)[i] = lw_e5m2_from_f32_sat(v);
    break;
  default:
    break;
  }
}

#endif

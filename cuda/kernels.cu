/*
 * layerwise kernels on CUDA device pointers: the implementation of cuda/layerwise.h.
 *
 * Numerics: every scalar conversion and rounding rule comes from lw_numeric.h, which wasm/kernels.c
 * compiles too, so the two backends agree bit for bit by construction. The build uses -fmad=false
 * and no fast-math so that nvcc cannot contract or approximate what lw_numeric.h spells out.
 *
 * Contexts: an lw_ctx is a device ordinal and a non-blocking stream. ctx == NULL means the default
 * context of device 0 (created on first use, never destroyed), so simple callers need no context.
 * Every entry point sets the device itself because FFI calls may come from any thread.
 *
 * Errors: every CUDA call is checked; the text of the last failure is kept per thread
 * (lw_last_error). Argument errors return LW_EINVAL before anything is launched, so nothing is
 * written.
 *
 * NaN in reductions: absolute values are compared as raw bit patterns (sign cleared), where every
 * NaN orders above +Inf, so a NaN anywhere makes the maximum a NaN without any float compare.
 * The resulting f32 is canonicalised to LW_F32_CANONICAL_NAN (lw_numeric.h), as wasm/kernels.c does.
 *
 * Memory access: 16-byte (8-byte for fp8) vector loads and stores where the pointer is aligned,
 * after a scalar head of at most 7 elements (views can start at any element), with a scalar tail.
 * Grids are sized to the multiprocessor count and loop (grid-stride); reductions combine per block
 * and do one atomic per block.
 */
#include <cuda_runtime.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mutex>
#include <string>
#include <type_traits>

#include "layerwise.h"
#include "lw_numeric.h"

struct lw_ctx {
  int device;
  cudaStream_t stream;
  int sms;
  bool hw_e4m3; /* the hardware e4m3 conversion agrees with lw_numeric.h on this device */
  int smem_optin; /* most shared memory one block may opt in to, bytes */
};

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr uint32_t kCanonicalNaN = LW_F32_CANONICAL_NAN;

// ------------------------------------------------------------------ errors

thread_local std::string t_error;

lw_status fail(lw_status status, const std::string &text) {
  t_error = text;
  return status;
}

lw_status cuda_fail(cudaError_t e, const char *what) {
  // The runtime also keeps the error as this thread's last error: a failed call here (a
  // cudaMalloc past the free memory) must not be reported again by the next launch check.
  cudaGetLastError();
  t_error = std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  return e == cudaErrorMemoryAllocation ? LW_ENOMEM : LW_ECUDA;
}

#define CK(call)                                        \
  do {                                                  \
    cudaError_t e_ = (call);                            \
    if (e_ != cudaSuccess) return cuda_fail(e_, #call); \
  } while (0)

// A launch reports configuration errors at once and faults later (at a sync).
#define CK_LAUNCH(what)                                          \
  do {                                                           \
    cudaError_t e_ = cudaGetLastError();                         \
    if (e_ != cudaSuccess) return cuda_fail(e_, "launch " what); \
  } while (0)

// ------------------------------------------------------------------ contexts

lw_status check_hw_e4m3(int device, cudaStream_t stream, int sms, bool *ok);

lw_status ctx_init(lw_ctx *c, int device) {
  CK(cudaSetDevice(device));
  CK(cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, device));
  CK(cudaDeviceGetAttribute(&c->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  CK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  c->device = device;
  lw_status s = check_hw_e4m3(device, c->stream, c->sms, &c->hw_e4m3);
  if (s != LW_OK) cudaStreamDestroy(c->stream);
  return s;
}

std::mutex g_default_mutex;
lw_ctx *g_default = nullptr;

/* Resolves ctx (NULL: device 0's default context) and makes its device current on this thread. */
lw_status enter(void *ctx, lw_ctx **out) {
  lw_ctx *c = static_cast<lw_ctx *>(ctx);
  if (c == nullptr) {
    std::lock_guard<std::mutex> lock(g_default_mutex);
    if (g_default == nullptr) {
      lw_ctx *d = new lw_ctx();
      lw_status s = ctx_init(d, 0);
      if (s != LW_OK) {
        delete d;
        return s;
      }
      g_default = d;
    }
    c = g_default;
  }
  CK(cudaSetDevice(c->device));
  *out = c;
  return LW_OK;
}

#define ENTER(ctx)                          \
  lw_ctx *c_;                               \
  do {                                      \
    lw_status s_ = enter((ctx), &c_);       \
    if (s_ != LW_OK) return s_;             \
  } while (0)

/* Blocks of kernel K (with SMEM bytes of dynamic shared memory each) that fit on one
 * multiprocessor at once (queried once per kernel). */
template <auto K, size_t SMEM = 0, int THREADS = kThreads>
int resident_per_sm() {
  static const int per_sm = [] {
    int b = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, K, THREADS, SMEM) != cudaSuccess) {
      cudaGetLastError();
      b = 0;
    }
    return b < 1 ? 1 : b;
  }();
  return per_sm;
}

/* A grid of one resident wave at most: grid-stride loops then never leave a partial second
 * wave behind, and small inputs get only the blocks they need. */
template <auto K, size_t SMEM = 0, int THREADS = kThreads>
unsigned grid(const lw_ctx *c, size_t blocks) {
  size_t cap = (size_t)c->sms * resident_per_sm<K, SMEM, THREADS>();
  if (blocks < 1) blocks = 1;
  return (unsigned)(blocks < cap ? blocks : cap);
}

/* Blocks that n elements need at 8 elements per vector and kUnroll vectors per thread. */
size_t vec_blocks(size_t n) {
  size_t per_block = (size_t)kThreads * kUnroll * 8;
  return (n + per_block - 1) / per_block;
}

// ------------------------------------------------------------------ dtype traits
// Raw storage types and the conversions from lw_numeric.h. `abits` clears the sign: comparing
// those as unsigned integers orders values by magnitude with every NaN above +Inf.

template <int DT>
struct Ty;
template <>
struct Ty<LW_F32> {
  using T = uint32_t;
  static __device__ __forceinline__ float to(T v) { return __uint_as_float(v); }
  static __device__ __forceinline__ T from(float f) { return __float_as_uint(f); }
  static __device__ __forceinline__ uint32_t abits(T v) { return v & 0x7FFFFFFFu; }
  static __device__ __forceinline__ bool nonfinite(T v) {
    return (v & 0x7F800000u) == 0x7F800000u;
  }
};
template <>
struct Ty<LW_F16> {
  using T = uint16_t;
  static __device__ __forceinline__ float to(T v) { return lw_f32_from_f16(v); }
  static __device__ __forceinline__ T from(float f) { return lw_f16_from_f32(f); }
  static __device__ __forceinline__ uint32_t abits(T v) { return v & 0x7FFFu; }
  static __device__ __forceinline__ bool nonfinite(T v) { return (v & 0x7C00u) == 0x7C00u; }
};
template <>
struct Ty<LW_BF16> {
  using T = uint16_t;
  static __device__ __forceinline__ float to(T v) { return lw_f32_from_bf16(v); }
  static __device__ __forceinline__ T from(float f) { return lw_bf16_from_f32(f); }
  static __device__ __forceinline__ uint32_t abits(T v) { return v & 0x7FFFu; }
  static __device__ __forceinline__ bool nonfinite(T v) { return (v & 0x7F80u) == 0x7F80u; }
};
template <>
struct Ty<LW_F8_E4M3FN> {
  using T = uint8_t;
  static __device__ __forceinline__ float to(T v) { return lw_f32_from_e4m3(v); }
  static __device__ __forceinline__ T from(float f) { return lw_e4m3_from_f32_sat(f); }
  static __device__ __forceinline__ uint32_t abits(T v) { return v & 0x7Fu; }
  static __device__ __forceinline__ bool nonfinite(T v) { return (v & 0x7Fu) == 0x7Fu; }
};
template <>
struct Ty<LW_F8_E5M2> {
  using T = uint8_t;
  static __device__ __forceinline__ float to(T v) { return lw_f32_from_e5m2(v); }
  static __device__ __forceinline__ T from(float f) { return lw_e5m2_from_f32_sat(f); }
  static __device__ __forceinline__ uint32_t abits(T v) { return v & 0x7Fu; }
  static __device__ __forceinline__ bool nonfinite(T v) { return (v & 0x7Cu) == 0x7Cu; }
};

/* The f32 value of the largest magnitude bits of dtype DT, NaN canonicalised. */
template <int DT>
__device__ __forceinline__ float absmax_value(uint32_t bits) {
  float f = Ty<DT>::to((typename Ty<DT>::T)bits);
  return lw_isnan(f) ? __uint_as_float(kCanonicalNaN) : f;
}

// ------------------------------------------------------------------ vector access
// A thread moves E elements per access, E chosen so the wider side is one 16-byte access: then
// each warp-wide load or store instruction covers one contiguous run of memory (no half-written
// sectors when a 2-byte source becomes a 4-byte destination).

template <int BYTES>
struct VecOf;
template <>
struct VecOf<4> {
  using V = unsigned int;
};
template <>
struct VecOf<8> {
  using V = uint2;
};
template <>
struct VecOf<16> {
  using V = uint4;
};

template <int E, typename T>
__device__ __forceinline__ void loadv(const T *p, T (&v)[E]) {
  using V = typename VecOf<E * sizeof(T)>::V;
  V u = __ldg(reinterpret_cast<const V *>(p));
  memcpy(v, &u, sizeof(V));
}

template <int E, typename T>
__device__ __forceinline__ void storev(T *p, const T (&v)[E]) {
  using V = typename VecOf<E * sizeof(T)>::V;
  V u;
  memcpy(&u, v, sizeof(V));
  *reinterpret_cast<V *>(p) = u;
}

/* Elements before p reaches the alignment of E elements (fewer than E), capped at n. */
template <int E, typename T>
__device__ __forceinline__ size_t head_of(const T *p, size_t n) {
  constexpr size_t a = E * sizeof(T);
  size_t mis = (size_t)p % a;
  size_t h = mis == 0 ? 0 : (a - mis) / sizeof(T);
  return h < n ? h : n;
}

template <int E, typename T>
__device__ __forceinline__ bool aligned_for(const T *p) {
  return (size_t)p % (E * sizeof(T)) == 0;
}

/*
 * dst[i] = exact(src[i], i) for i < n, by threads tid = 0..nth-1 of some group (a grid, a block
 * or part of one). The vector body calls fast(src[i], i, slow) instead, which may set `slow` for
 * inputs it cannot handle exactly; such a vector is then redone with `exact` in a loop that is
 * not unrolled, so the rare path costs little code. Vector loads of src after its scalar head;
 * vector stores when dst is aligned at the same element too, scalar stores otherwise.
 */
template <typename S, typename D, typename Fast, typename Exact>
__device__ __forceinline__ void map_span2(const S *src, D *dst, size_t n, size_t tid, size_t nth,
                                          Fast fast, Exact exact) {
  constexpr int E = 16 / (sizeof(S) > sizeof(D) ? sizeof(S) : sizeof(D));
  size_t h = head_of<E>(src, n);
  size_t nvec = (n - h) / E;
  size_t t0 = h + nvec * E;
  if (tid < h) dst[tid] = exact(src[tid], tid);
  if (tid < n - t0) dst[t0 + tid] = exact(src[t0 + tid], t0 + tid);
  const S *vs = src + h;
  D *vd = dst + h;
  bool dvec = aligned_for<E>(vd);
  for (size_t base = tid; base < nvec; base += nth * kUnroll) {
    S in[kUnroll][E];
#pragma unroll
    for (int u = 0; u < kUnroll; u++) {
      size_t i = base + u * nth;
      if (i < nvec) loadv<E>(vs + i * E, in[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; u++) {
      size_t i = base + u * nth;
      if (i < nvec) {
        D out[E];
        bool slow = false;
#pragma unroll
        for (int k = 0; k < E; k++) out[k] = fast(in[u][k], h + i * E + k, slow);
        if (slow) {
#pragma unroll 1
          for (int k = 0; k < E; k++) vd[i * E + k] = exact(vs[i * E + k], h + i * E + k);
        } else if (dvec) {
          storev<E>(vd + i * E, out);
        } else {
#pragma unroll
          for (int k = 0; k < E; k++) vd[i * E + k] = out[k];
        }
      }
    }
  }
}

/* dst[i] = op(src[i], i) for i < n (map_span2 with one exact function). */
template <typename S, typename D, typename Op>
__device__ __forceinline__ void map_span(const S *src, D *dst, size_t n, size_t tid, size_t nth,
                                         Op op) {
  map_span2(
      src, dst, n, tid, nth, [op](S x, size_t i, bool &) { return op(x, i); }, op);
}

/* acc = f(acc, src[i]) over i < n for this thread's share (see map_span). */
template <typename S, typename Acc, typename F>
__device__ __forceinline__ Acc fold_span(const S *src, size_t n, size_t tid, size_t nth, Acc acc,
                                         F f) {
  constexpr int E = 16 / sizeof(S);
  size_t h = head_of<E>(src, n);
  size_t nvec = (n - h) / E;
  size_t t0 = h + nvec * E;
  if (tid < h) acc = f(acc, src[tid]);
  if (tid < n - t0) acc = f(acc, src[t0 + tid]);
  const S *vs = src + h;
  for (size_t base = tid; base < nvec; base += nth * kUnroll) {
    S in[kUnroll][E];
#pragma unroll
    for (int u = 0; u < kUnroll; u++) {
      size_t i = base + u * nth;
      if (i < nvec) loadv<E>(vs + i * E, in[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; u++) {
      size_t i = base + u * nth;
      if (i < nvec) {
#pragma unroll
        for (int k = 0; k < E; k++) acc = f(acc, in[u][k]);
      }
    }
  }
  return acc;
}

// ------------------------------------------------------------------ fast quantization
// x / s is the one costly step of quantization (an IEEE division per element). With r = RN(1/s)
// computed once, y = RN(x * r) is within one ulp of x / s, and Markstein's correction
// q = RN(y + RN(x - y * s) * r) (two FMAs, the residual exact) is exactly RN(x / s) whenever
// nothing overflows or underflows: |s| in [2^-60, 2^60] and |y| in [2^-12, 2^64). Below 2^-12
// both quantizers give a signed zero whatever the last bits; everything else (NaN, Inf, huge
// quotients, odd scales) takes the exact lw_numeric.h path. So results equal lw_e4m3_quant and
// lw_int8_quant bit for bit; tests compare against the WebAssembly build on random data.

struct Divisor {
  float s, r;
  bool fast;
};

__device__ __forceinline__ Divisor divisor_of(float s) {
  uint32_t a = __float_as_uint(s) & 0x7FFFFFFFu;
  return {s, __fdiv_rn(1.0f, s), a >= 0x21800000u && a <= 0x5D800000u};
}

/* RN(x / d.s) in *q when d.fast and the quotient is in range; otherwise sets `slow`. A quotient
 * below 2^-12 is returned as RN(x * r), which has the right sign and quantizes to zero. */
__device__ __forceinline__ float fast_quotient(float x, const Divisor &d, bool &slow) {
  float y = __fmul_rn(x, d.r);
  uint32_t ay = __float_as_uint(y) & 0x7FFFFFFFu;
  slow |= !d.fast || ay >= 0x5F800000u;
  float q = __fmaf_rn(__fmaf_rn(-y, d.s, x), d.r, y);
  return ay < 0x39800000u ? y : q;
}

/* e4m3fn of a finite f32 by the hardware conversion (sm_89+), saturating to +-448 */
__device__ __forceinline__ uint8_t hw_e4m3(float q) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(q));
  return (uint8_t)(r & 0xFF);
#else
  return lw_e4m3_from_f32_sat(q);
#endif
}

/* The exact paths, out of line: they run only for rare inputs, and inlined into every element
 * of an unrolled loop they would make the kernels too large for the instruction cache. */
__device__ __noinline__ uint8_t exact_e4m3(float x, float s) { return lw_e4m3_quant(x, s); }
__device__ __noinline__ int8_t exact_int8(float x, float s) { return lw_int8_quant(x, s); }

/* lw_e4m3_quant(x, d.s) unless `slow` is set */
template <bool HW>
__device__ __forceinline__ uint8_t quant_e4m3(float x, const Divisor &d, bool &slow) {
  float q = fast_quotient(x, d, slow);
  if constexpr (HW) {
    return hw_e4m3(q);  // tiny quotients: RN to a signed zero, as the software path
  } else {
    uint32_t u = __float_as_uint(q), a = u & 0x7FFFFFFFu;
    return (uint8_t)(((u >> 24) & 0x80u) | (a >= 0x43E00000u ? 0x7Eu : lw_e4m3_mag(a)));
  }
}

/* lw_int8_quant(x, d.s) unless `slow` is set. The rounding to an integer is an add: 1.5 * 2^23
 * has an ulp of 1, so RN(c + 1.5 * 2^23) rounds c (in [-128, 127]) half to even, and its low
 * byte is the code in two's complement. rintf and the float-to-int conversion would be two
 * conversion instructions per element, which run at a quarter of the rate of an add and were
 * what bounded the int8 kernels (ARCHITECTURE.md, "Kernel ABI"). */
__device__ __forceinline__ int8_t quant_int8(float x, const Divisor &d, bool &slow) {
  float q = fast_quotient(x, d, slow);
  float c = fminf(fmaxf(q, -128.0f), 127.0f);  // q is not NaN unless `slow`
  return (int8_t)(uint8_t)__float_as_uint(__fadd_rn(c, 12582912.0f));
}

/* quant_e4m3 of two elements; with HW, one conversion instruction for both */
template <bool HW>
__device__ __forceinline__ void quant_e4m3x2(float x0, float x1, const Divisor &d, uint8_t &o0,
                                             uint8_t &o1, bool &slow0, bool &slow1) {
  if constexpr (HW) {
    float q0 = fast_quotient(x0, d, slow0), q1 = fast_quotient(x1, d, slow1);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(q1), "f"(q0));
    o0 = (uint8_t)(r & 0xFF);
    o1 = (uint8_t)(r >> 8);
#else
    o0 = lw_e4m3_from_f32_sat(q0);
    o1 = lw_e4m3_from_f32_sat(q1);
#endif
  } else {
    o0 = quant_e4m3<false>(x0, d, slow0);
    o1 = quant_e4m3<false>(x1, d, slow1);
  }
}

/* Sets *bad when the hardware e4m3 conversion differs from lw_e4m3_from_f32_sat for some finite
 * f32; every finite pattern is tried. */
__global__ void k_check_hw_e4m3(unsigned *bad) {
  size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t nth = (size_t)gridDim.x * blockDim.x;
  unsigned diff = 0;
  for (uint64_t u = tid; u < (1ull << 32); u += nth) {
    uint32_t b = (uint32_t)u;
    if ((b & 0x7F800000u) == 0x7F800000u) continue;
    float f = __uint_as_float(b);
    diff |= hw_e4m3(f) != lw_e4m3_from_f32_sat(f);
  }
  if (diff) atomicOr(bad, 1u);
}

// ------------------------------------------------------------------ block reductions

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

/* Max over the block, returned to every thread. Uses a 32-word shared buffer. */
__device__ __forceinline__ uint32_t block_max(uint32_t v) {
  __shared__ uint32_t part[32];
  __shared__ uint32_t result;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();  // part/result may still be read from a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < (int)(blockDim.x >> 5) ? part[lane] : 0u;
    w = warp_max(w);
    if (lane == 0) result = w;
  }
  __syncthreads();
  return result;
}

/* The scale of a row whose elements the block's threads folded into `m` (largest magnitude
 * bits, per thread): every thread gets it, thread 0 stores it at `out`. */
template <int DT, bool INT8>
__device__ __forceinline__ float block_scale(uint32_t m, float *out) {
  float amax = absmax_value<DT>(block_max(m));
  float s = INT8 ? lw_int8_scale(amax) : lw_fp8_scale(amax);
  if (threadIdx.x == 0) *out = s;
  return s;
}

__device__ __forceinline__ unsigned long long block_sum(unsigned long long v) {
  __shared__ unsigned long long part[32];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  unsigned long long r = 0;
  if (warp == 0) {
    r = lane < (int)(blockDim.x >> 5) ? part[lane] : 0ull;
    r = warp_sum(r);
  }
  return r;  // valid in thread 0
}

// ------------------------------------------------------------------ kernels: casts and fills

template <int SD, int DD>
__global__ void __launch_bounds__(kThreads) k_cast_flat(typename Ty<DD>::T *dst,
                                                        const typename Ty<SD>::T *src, size_t n) {
  size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t nth = (size_t)gridDim.x * blockDim.x;
  map_span(src, dst, n, tid, nth,
           [](typename Ty<SD>::T x, size_t) { return Ty<DD>::from(Ty<SD>::to(x)); });
}

template <int SD, int DD>
__global__ void __launch_bounds__(kThreads)
    k_cast_2d(typename Ty<DD>::T *dst, size_t dpitch, const typename Ty<SD>::T *src,
              size_t spitch, size_t rows, size_t cols) {
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    map_span(src + r * spitch, dst + r * dpitch, cols, threadIdx.x, blockDim.x,
             [](typename Ty<SD>::T x, size_t) { return Ty<DD>::from(Ty<SD>::to(x)); });
  }
}

/* Bytes [0, head) and [tail, n) one by one, 16-byte pattern stores in between. */
__global__ void __launch_bounds__(kThreads) k_fill(uint8_t *dst, size_t n, size_t head,
                                                   size_t nvec, uint4 pattern, int elem,
                                                   uint32_t lo, uint32_t hi) {
  size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t nth = (size_t)gridDim.x * blockDim.x;
  size_t tail = head + nvec * 16;
  auto byte_at = [&](size_t i) -> uint8_t {
    int k = (int)(i % (size_t)elem);
    return (uint8_t)(k < 4 ? lo >> (8 * k) : hi >> (8 * (k - 4)));
  };
  if (tid < head) dst[tid] = byte_at(tid);
  if (tid < n - tail) dst[tail + tid] = byte_at(tail + tid);
  uint4 *v = reinterpret_cast<uint4 *>(dst + head);
  for (size_t i = tid; i < nvec; i += nth) v[i] = pattern;
}

// ------------------------------------------------------------------ kernels: reductions

/* atomicMax of the magnitude bits into *out_bits, one atomic per block. */
template <int DT>
__global__ void __launch_bounds__(kThreads) k_absmax_bits(uint32_t *out_bits,
                                                          const typename Ty<DT>::T *src,
                                                          size_t n) {
  size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t nth = (size_t)gridDim.x * blockDim.x;
  uint32_t m = fold_span(src, n, tid, nth, 0u, [](uint32_t a, typename Ty<DT>::T x) {
    return max(a, Ty<DT>::abits(x));
  });
  m = block_max(m);
  if (threadIdx.x == 0 && m != 0) atomicMax(out_bits, m);
}

/* In place: the magnitude bits at *p become the f32 absmax (NaN canonical). */
template <int DT>
__global__ void k_absmax_finish(uint32_t *p) {
  *p = __float_as_uint(absmax_value<DT>(*p));
}

/* In place: the magnitude bits at *p become the dynamic fp8 scale. */
template <int DT>
__global__ void k_fp8_scale_finish(float *p) {
  uint32_t bits = *reinterpret_cast<uint32_t *>(p);
  *p = lw_fp8_scale(absmax_value<DT>(bits));
}

template <int DT>
__global__ void __launch_bounds__(kThreads) k_count_nonfinite(unsigned long long *out,
                                                              const typename Ty<DT>::T *src,
                                                              size_t n) {
  size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t nth = (size_t)gridDim.x * blockDim.x;
  unsigned long long k = fold_span(
      src, n, tid, nth, 0ull, [](unsigned long long a, typename Ty<DT>::T x) {
        return a + (Ty<DT>::nonfinite(x) ? 1ull : 0ull);
      });
  k = block_sum(k);
  // A grid of one block writes its count: no zeroing of `out` before the launch, which is a
  // call of its own and, for the small tensors most counts are of (scales), cost as much.
  if (threadIdx.x == 0) {
    if (gridDim.x == 1) {
      *out = k;
    } else if (k != 0) {
      atomicAdd(out, k);
    }
  }
}

// ------------------------------------------------------------------ kernels: quantization

/* Per tensor: q = e4m3(x / scale[0]) over n elements, the scale already in place. */
template <int DT, bool HW>
__global__ void __launch_bounds__(kThreads) k_quant_fp8_tensor(uint8_t *q, const float *scale,
                                                               const typename Ty<DT>::T *src,
                                                               size_t n) {
  size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t nth = (size_t)gridDim.x * blockDim.x;
  Divisor d = divisor_of(*scale);
  map_span2(
      src, q, n, tid, nth,
      [d](typename Ty<DT>::T x, size_t, bool &slow) {
        return quant_e4m3<HW>(Ty<DT>::to(x), d, slow);
      },
      [d](typename Ty<DT>::T x, size_t) { return exact_e4m3(Ty<DT>::to(x), d.s); });
}

/* Asks L2 for the 128-byte lines of [p, p + bytes), shared by threads tid = 0..nth-1. */
__device__ __forceinline__ void prefetch_l2(const void *p, size_t bytes, size_t tid, size_t nth) {
  const char *c = static_cast<const char *>(p);
  for (size_t off = tid * 128; off < bytes; off += nth * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
  }
}

/*
 * Quantizes E elements held in registers with divisor d (fp8 e4m3 or int8 codes) and stores
 * them at o, as one vector where o is aligned for it. Inputs the fast division cannot take go
 * through the exact path, element by element.
 */
template <int DT, bool INT8, bool HW, int E>
__device__ __forceinline__ void quant_store(const typename Ty<DT>::T (&in)[E], uint8_t *o,
                                            const Divisor &d) {
  static_assert(E % 2 == 0, "elements come in pairs");
  uint8_t out[E];
#pragma unroll
  for (int e = 0; e < E; e += 2) {
    float x0 = Ty<DT>::to(in[e]), x1 = Ty<DT>::to(in[e + 1]);
    bool slow0 = false, slow1 = false;
    if constexpr (INT8) {
      int8_t f0 = quant_int8(x0, d, slow0), f1 = quant_int8(x1, d, slow1);
      out[e] = (uint8_t)(slow0 ? exact_int8(x0, d.s) : f0);
      out[e + 1] = (uint8_t)(slow1 ? exact_int8(x1, d.s) : f1);
    } else {
      uint8_t f0, f1;
      quant_e4m3x2<HW>(x0, x1, d, f0, f1, slow0, slow1);
      out[e] = slow0 ? exact_e4m3(x0, d.s) : f0;
      out[e + 1] = slow1 ? exact_e4m3(x1, d.s) : f1;
    }
  }
  if (aligned_for<E>(o)) {
    storev<E>(o, out);
  } else {
#pragma unroll
    for (int e = 0; e < E; e++) o[e] = out[e];
  }
}

/*
 * Per row (fp8 or int8), one block per row: absmax, scale, quantize. A row of up to H vectors
 * per thread whose source is 16-byte aligned is held in registers, so it is read once; others
 * are read twice (the second time from L2). The block's next row is fetched into L2 meanwhile.
 */
#ifndef LW_ROW_THREADS
#define LW_ROW_THREADS 128
#endif
// Threads of a per-row block, and the vectors per thread k_quant_row holds in registers.
constexpr int kRowThreads = LW_ROW_THREADS, kRowHeld = 4;

template <int DT, bool INT8, bool HW>
__global__ void __launch_bounds__(kRowThreads) k_quant_row(uint8_t *q, float *scale,
                                                        const typename Ty<DT>::T *src,
                                                        size_t rows, size_t cols, int dynamic) {
  using T = typename Ty<DT>::T;
  constexpr int E = 16 / sizeof(T), H = kRowHeld;
  const auto absbits = [](uint32_t a, T x) { return max(a, Ty<DT>::abits(x)); };
  const size_t nvec = cols / E;
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *row = src + r * cols;
    uint8_t *dst = q + r * cols;
    if (r + gridDim.x < rows) {
      prefetch_l2(row + (size_t)gridDim.x * cols, cols * sizeof(T), threadIdx.x, blockDim.x);
    }
    const bool held = cols % E == 0 && nvec <= (size_t)H * blockDim.x && aligned_for<E>(row);
    T in[H][E];
    if (held) {
#pragma unroll
      for (int h = 0; h < H; h++) {
        size_t v = threadIdx.x + (size_t)h * blockDim.x;
        if (v < nvec) loadv<E>(row + v * E, in[h]);
      }
    }
    float s;
    if (dynamic) {
      uint32_t m = 0;
      if (held) {
#pragma unroll
        for (int h = 0; h < H; h++) {
          if (threadIdx.x + (size_t)h * blockDim.x < nvec) {
#pragma unroll
            for (int e = 0; e < E; e++) m = absbits(m, in[h][e]);
          }
        }
      } else {
        m = fold_span(row, cols, threadIdx.x, blockDim.x, 0u, absbits);
      }
      s = block_scale<DT, INT8>(m, &scale[r]);
    } else {
      s = scale[r];
    }
    Divisor d = divisor_of(s);
    if (held) {
#pragma unroll
      for (int h = 0; h < H; h++) {
        size_t v = threadIdx.x + (size_t)h * blockDim.x;
        if (v < nvec) quant_store<DT, INT8, HW, E>(in[h], dst + v * E, d);
      }
    } else if constexpr (INT8) {
      map_span2(
          row, reinterpret_cast<int8_t *>(dst), cols, threadIdx.x, blockDim.x,
          [d](T x, size_t, bool &slow) { return quant_int8(Ty<DT>::to(x), d, slow); },
          [d](T x, size_t) { return exact_int8(Ty<DT>::to(x), d.s); });
    } else {
      map_span2(
          row, dst, cols, threadIdx.x, blockDim.x,
          [d](T x, size_t, bool &slow) { return quant_e4m3<HW>(Ty<DT>::to(x), d, slow); },
          [d](T x, size_t) { return exact_e4m3(Ty<DT>::to(x), d.s); });
    }
  }
}

/* 16 bytes global -> shared without registers where the device copies asynchronously (sm_80+);
 * the thread that copies is the one that reads them back, after cp_async_wait. */
__device__ __forceinline__ void cp_async16(uint4 *dst, const void *src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#else
  *dst = __ldg(reinterpret_cast<const uint4 *>(src));
#endif
}

/* Closes this thread's group of copies issued since the last commit. */
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

/* Waits until at most N of this thread's committed groups are still in flight. */
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

/*
 * Per row (fp8 or int8), for rows longer than k_quant_row holds in registers (a down
 * projection's 14336 columns), which that kernel reads twice: rows staged in shared memory,
 * read once, and while a block works one row the next row it will take is already on its way
 * by asynchronous copies, as k_block_tiles does with tiles. Each thread copies and reads back
 * the same vectors, so the stage needs no barrier of its own. `stages` is 2 (the next row in
 * flight) or 1 (one row, for tests of a smaller device's path). Rows are whole vectors, 16-byte
 * aligned (the launcher checks).
 */
template <int DT, bool INT8, bool HW>
__global__ void __launch_bounds__(kThreads)
    k_quant_row_staged(uint8_t *q, float *scale, const typename Ty<DT>::T *src, size_t rows,
                       size_t cols, int dynamic, int stages) {
  using T = typename Ty<DT>::T;
  constexpr int E = 16 / sizeof(T);
  extern __shared__ uint4 stage[];
  const size_t nvec = cols / E;
  const auto start = [&](size_t r, int b) {
    const T *row = src + r * cols;
    for (size_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      cp_async16(&stage[b * nvec + v], row + v * E);
    }
  };
  size_t r = blockIdx.x;
  if (stages == 2 && r < rows) start(r, 0);
  cp_async_commit();
  for (int b = 0; r < rows; r += gridDim.x) {
    if (stages == 2) {
      if (r + gridDim.x < rows) start(r + gridDim.x, b ^ 1);
      cp_async_commit();
      cp_async_wait<1>();  // this thread's copies of row r are in
    } else {
      start(r, 0);
      cp_async_commit();
      cp_async_wait<0>();
    }
    const uint4 *cur = stage + b * nvec;
    float s;
    if (dynamic) {
      uint32_t m = 0;
      for (size_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        T x[E];
        memcpy(x, &cur[v], sizeof(x));
#pragma unroll
        for (int e = 0; e < E; e++) m = max(m, Ty<DT>::abits(x[e]));
      }
      s = block_scale<DT, INT8>(m, &scale[r]);
    } else {
      s = scale[r];
    }
    Divisor d = divisor_of(s);
    uint8_t *dst = q + r * cols;
    for (size_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      T x[E];
      memcpy(x, &cur[v], sizeof(x));
      quant_store<DT, INT8, HW, E>(x, dst + v * E, d);
    }
    if (stages == 2) b ^= 1;
  }
}

/* Launches the per-row quantization: staged rows where the rows are whole aligned vectors and two
 * of them fit the shared memory a block may have (one, or none, on smaller devices, or as
 * LAYERWISE_CUDA_TILE_STAGES forces for tests), else k_quant_row. */
template <int DT, bool INT8, bool HW>
void launch_quant_row(const lw_ctx *c, uint8_t *q, float *scale, const typename Ty<DT>::T *src,
                      size_t rows, size_t cols, int dynamic) {
  using T = typename Ty<DT>::T;
  constexpr size_t E = 16 / sizeof(T), fixed = 4096;
  const size_t row = cols * sizeof(T);
  static const char *forced = getenv("LAYERWISE_CUDA_TILE_STAGES");
  const bool whole = cols % E == 0 && (uintptr_t)src % 16 == 0;
  // Rows a block holds in registers (k_quant_row) are read once already, and that kernel at
  // kRowThreads measured faster than staging them; longer rows are staged, at kThreads, which
  // measured faster than at kRowThreads for them (BENCHMARKS.md, 2026-12-02 second session).
  const bool held = whole && cols / E <= (size_t)kRowHeld * kRowThreads;
  int most = !whole || held                          ? 0
             : 2 * row + fixed <= (size_t)c->smem_optin ? 2
                                                        : row + fixed <= (size_t)c->smem_optin;
  int st = forced != nullptr && forced[0] >= '0' && forced[0] < '0' + most ? forced[0] - '0' : most;
  if (st == 0) {
    unsigned g = grid<k_quant_row<DT, INT8, HW>, 0, kRowThreads>(c, rows);
    k_quant_row<DT, INT8, HW><<<g, kRowThreads, 0, c->stream>>>(q, scale, src, rows, cols, dynamic);
    return;
  }
  auto k = k_quant_row_staged<DT, INT8, HW>;
  size_t smem = st * row;
  if (smem > 48 * 1024) {
    // Over 48 KiB needs the opt-in; if it is refused, so is the launch, which the caller reports.
    (void)cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  }
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kThreads, smem) != cudaSuccess) {
    cudaGetLastError();
  }
  size_t cap = (size_t)c->sms * (per_sm < 1 ? 1 : per_sm);
  unsigned g = (unsigned)(rows < cap ? rows : cap);
  k<<<g, kThreads, smem, c->stream>>>(q, scale, src, rows, cols, dynamic, st);
}

/* One 128x128 (or edge) tile of an fp8 per-block quantization: rows r0.. r0+h, columns c0.. c0+w
 * of a kernel tensor with `cols` columns; its codes at q, its scale at scale[index]. */
struct Tile {
  uint8_t *q;
  float *scale;
  size_t index, cols, r0, h, c0, w;
  const uint64_t *target;  // multi-tensor tiles: the target row, for source lookups
};

/* The tiles of one contiguous rows x cols source (lw_quant_fp8 per block). */
template <typename T>
struct FlatTiles {
  const T *src;
  uint8_t *q;
  float *scale;
  size_t rows, cols;
  bool given;  // scales given, not computed
  __device__ size_t count() const { return ((rows + 127) / 128) * ((cols + 127) / 128); }
  __device__ Tile tile(size_t k) const {
    size_t tc = (cols + 127) / 128, r0 = (k / tc) * 128, c0 = (k % tc) * 128;
    return {q, scale, k, cols, r0, rows - r0 < 128 ? rows - r0 : 128,
            c0, cols - c0 < 128 ? cols - c0 : 128, nullptr};
  }
  template <typename U>
  __device__ const U *row(const Tile &d, size_t r) const {
    return reinterpret_cast<const U *>(src + (d.r0 + r) * cols + d.c0);
  }
};

/* Shared bytes of one staged tile of k_block_tiles. */
template <int DT>
constexpr size_t kTileBytes = 128 * 128 * sizeof(typename Ty<DT>::T);

/*
 * fp8 per 128x128 block. Groups of 16 threads take one tile row each; with the block's 16
 * groups, each group has 8 of the tile's 128 rows. A full-width row whose source is 16-byte
 * aligned is staged in shared memory by asynchronous copies (no registers hold it) and
 * quantized from there; other rows are read twice from global memory, element-exact at any
 * alignment. Tiles are pipelined: the copies of a block's next tile are in flight while it
 * works the current one, so the memory system never waits for the arithmetic. Each thread reads
 * back only what it copied itself, so the staged bytes need no barrier; the row addresses,
 * looked up once per tile by one thread per row, do.
 */
template <int DT, bool HW, typename Tiles>
__global__ void __launch_bounds__(kThreads, 3) k_block_tiles(Tiles tiles, int stages) {
  // stages: tiles staged in shared memory at once (2, 1 or 0; see launch_block_tiles), the same
  // for every thread, so its branches never diverge.
  using T = typename Ty<DT>::T;
  extern __shared__ uint4 stage[];
  __shared__ const T *rows[2][128];
  constexpr int kGroup = 16, kRows = 128 / (kThreads / kGroup);
  constexpr int E = 16 / sizeof(T);                      // elements per 16-byte vector
  constexpr int V = 128 * (int)sizeof(T) / (16 * kGroup);  // vectors per lane per row
  constexpr int RV = V * kGroup;                         // vectors per staged row
  constexpr int TV = 128 * RV;                           // vectors per staged tile
  static_assert(kRows * (kThreads / kGroup) == 128, "a block covers a tile's rows");
  const int g = threadIdx.x / kGroup, lane = threadIdx.x % kGroup, ng = kThreads / kGroup;
  const auto absbits = [](uint32_t a, T v) { return max(a, Ty<DT>::abits(v)); };
  const size_t n = tiles.count();
  // Finds tile d's rows (rows[b]), then, after the barrier, starts copying the held ones into
  // stage b; returns the held mask (bit j: row g + j * ng is staged). The tile right of `prev`
  // (same rows, the next 128 columns) has its rows 128 elements on: no lookup.
  auto start = [&](int b, const Tile &d, const Tile *prev) -> unsigned {
    if (threadIdx.x < 128) {
      const T *x = nullptr;
      if (threadIdx.x < d.h) {
        const T *left = prev != nullptr && prev->target == d.target && prev->q == d.q &&
                                prev->r0 == d.r0 && prev->c0 + 128 == d.c0
                            ? rows[b ^ 1][threadIdx.x]
                            : nullptr;
        x = left != nullptr ? left + 128 : tiles.template row<T>(d, threadIdx.x);
      }
      rows[b][threadIdx.x] = x;
    }
    __syncthreads();
    unsigned held = 0;
    if (stages == 0) return held;
    uint4 *buf = stage + (stages == 2 ? b : 0) * TV;
#pragma unroll
    for (int j = 0; j < kRows; j++) {
      const T *x = rows[b][g + j * ng];
      if (x != nullptr && d.w == 128 && aligned_for<E>(x)) {
        held |= 1u << j;
#pragma unroll
        for (int v = 0; v < V; v++) {
          cp_async16(buf + (g + j * ng) * RV + v * kGroup + lane, x + (v * kGroup + lane) * E);
        }
      }
    }
    cp_async_commit();
    return held;
  };
  // Contiguous runs of tiles per block: neighbours share their rows' lookups.
  const size_t per = (n + gridDim.x - 1) / gridDim.x;
  size_t k = blockIdx.x * per;
  const size_t end = k + per < n ? k + per : n;
  if (k >= end) return;
  Tile cur = tiles.tile(k);
  unsigned held = start(0, cur, nullptr);
  for (int b = 0; k < end; k++, b ^= 1) {
    Tile nd{};
    unsigned nheld = 0;
    if (stages == 2 && k + 1 < end) {
      nd = tiles.tile(k + 1);
      __syncthreads();  // every reader of rows[b ^ 1] (the tile before this one) is done
      nheld = start(b ^ 1, nd, &cur);
      cp_async_wait<1>();  // this tile's copies landed; the next tile's may still fly
    } else {
      cp_async_wait<0>();
    }
    const uint4 *st = stage + (stages == 2 ? b : 0) * TV;
    const T *const *rw = rows[b];
    float s;
    if (tiles.given) {
      s = cur.scale[cur.index];
    } else {
      uint32_t m = 0;
#pragma unroll
      for (int j = 0; j < kRows; j++) {
        if (held >> j & 1) {
#pragma unroll
          for (int v = 0; v < V; v++) {
            T in[E];
            memcpy(in, st + (g + j * ng) * RV + v * kGroup + lane, 16);
#pragma unroll
            for (int e = 0; e < E; e++) m = absbits(m, in[e]);
          }
        } else if (rw[g + j * ng] != nullptr) {
          m = fold_span(rw[g + j * ng], cur.w, lane, kGroup, m, absbits);
        }
      }
      m = block_max(m);
      s = lw_fp8_scale(absmax_value<DT>(m));
      if (threadIdx.x == 0) cur.scale[cur.index] = s;
    }
    Divisor d = divisor_of(s);
#pragma unroll
    for (int j = 0; j < kRows; j++) {
      uint8_t *dst = cur.q + (cur.r0 + g + (size_t)j * ng) * cur.cols + cur.c0;
      if (held >> j & 1) {
#pragma unroll
        for (int v = 0; v < V; v++) {
          T in[E];
          memcpy(in, st + (g + j * ng) * RV + v * kGroup + lane, 16);
          quant_store<DT, false, HW, E>(in, dst + (v * kGroup + lane) * E, d);
        }
      } else if (rw[g + j * ng] != nullptr) {
        map_span2(
            rw[g + j * ng], dst, cur.w, lane, kGroup,
            [d](T v, size_t, bool &slow) { return quant_e4m3<HW>(Ty<DT>::to(v), d, slow); },
            [d](T v, size_t) { return exact_e4m3(Ty<DT>::to(v), d.s); });
      }
    }
    if (stages != 2 && k + 1 < end) {
      // One stage or none: the next tile starts once this one is done with it.
      nd = tiles.tile(k + 1);
      __syncthreads();  // every reader of rows[b ^ 1] is done
      nheld = start(b ^ 1, nd, &cur);
    }
    cur = nd;
    held = nheld;
  }
}

/* Launches k_block_tiles over `tiles` on the context's stream (the caller checks the launch),
 * with two tiles staged where the device lets a block have the shared memory (sm_80 and newer
 * for bf16), one where one fits, else none (every row read twice from global memory). */
template <int DT, bool HW, typename Tiles>
void launch_block_tiles(const lw_ctx *c, const Tiles &tiles, size_t count) {
  constexpr size_t tile = kTileBytes<DT>, fixed = 4096;  // static shared memory and some margin
  // LAYERWISE_CUDA_TILE_STAGES=0 or 1 takes a smaller device's path (for tests).
  static const char *forced = getenv("LAYERWISE_CUDA_TILE_STAGES");
  int most = 2 * tile + fixed <= (size_t)c->smem_optin ? 2 : tile + fixed <= (size_t)c->smem_optin;
  int s = forced != nullptr && forced[0] >= '0' && forced[0] < '0' + most ? forced[0] - '0' : most;
  size_t smem = s * tile;
  auto k = k_block_tiles<DT, HW, Tiles>;
  if (smem > 48 * 1024) {
    // Over 48 KiB needs the opt-in; if it is refused, so is the launch, which the caller reports.
    (void)cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  }
  // The grid is sized for the most shared memory a block takes (two tiles): one wave at most.
  k<<<grid<k_block_tiles<DT, HW, Tiles>, 2 * tile>(c, count), kThreads, smem, c->stream>>>(tiles,
                                                                                        s);
}

// ------------------------------------------------------------------ kernels: dequantization

template <int DD>
__global__ void __launch_bounds__(kThreads) k_dequant_tensor(typename Ty<DD>::T *dst,
                                                             const uint8_t *q, const float *scale,
                                                             size_t n) {
  size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t nth = (size_t)gridDim.x * blockDim.x;
  float s = *scale;
  map_span(q, dst, n, tid, nth,
           [s](uint8_t x, size_t) { return Ty<DD>::from(lw_mul(lw_f32_from_e4m3(x), s)); });
}

/* Row and block128 scales, one block per row. */
template <int DD>
__global__ void __launch_bounds__(kThreads)
    k_dequant_rows(typename Ty<DD>::T *dst, const uint8_t *q, const float *scale, size_t rows,
                   size_t cols, int granularity) {
  size_t tc = (cols + 127) / 128;
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (granularity == LW_PER_ROW) {
      float s = scale[r];
      map_span(q + r * cols, dst + r * cols, cols, threadIdx.x, blockDim.x,
               [s](uint8_t x, size_t) { return Ty<DD>::from(lw_mul(lw_f32_from_e4m3(x), s)); });
    } else {
      const float *srow = scale + (r / 128) * tc;
      map_span(q + r * cols, dst + r * cols, cols, threadIdx.x, blockDim.x,
               [srow](uint8_t x, size_t c) {
                 return Ty<DD>::from(lw_mul(lw_f32_from_e4m3(x), srow[c / 128]));
               });
    }
  }
}

// ------------------------------------------------------------------ dispatch helpers

/* Calls f(std::integral_constant<int, D>) for a floating dtype code D. */
template <typename F>
void with_float(int32_t d, F f) {
  switch (d) {
    case LW_F32:
      f(std::integral_constant<int, LW_F32>());
      break;
    case LW_F16:
      f(std::integral_constant<int, LW_F16>());
      break;
    case LW_BF16:
      f(std::integral_constant<int, LW_BF16>());
      break;
    case LW_F8_E4M3FN:
      f(std::integral_constant<int, LW_F8_E4M3FN>());
      break;
    case LW_F8_E5M2:
      f(std::integral_constant<int, LW_F8_E5M2>());
      break;
  }
}

template <typename F>
void with_quant_input(int32_t d, F f) {
  switch (d) {
    case LW_F32:
      f(std::integral_constant<int, LW_F32>());
      break;
    case LW_F16:
      f(std::integral_constant<int, LW_F16>());
      break;
    case LW_BF16:
      f(std::integral_constant<int, LW_BF16>());
      break;
  }
}

template <typename F>
void with_bool(bool b, F f) {
  if (b) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

std::mutex g_hw_mutex;
signed char g_hw_state[256]; /* per device: 0 unknown, 1 agrees, -1 does not */

/*
 * Whether quantization may use the hardware e4m3 conversion on this device: compute capability
 * 8.9 or newer, and the conversion equal to lw_e4m3_from_f32_sat on every finite f32, tried once
 * per device and process (a few milliseconds). LAYERWISE_CUDA_SOFT_FP8=1 turns it off.
 */
lw_status check_hw_e4m3(int device, cudaStream_t stream, int sms, bool *ok) {
  std::lock_guard<std::mutex> lock(g_hw_mutex);
  *ok = false;
  const char *soft = getenv("LAYERWISE_CUDA_SOFT_FP8");
  if (soft != nullptr && soft[0] != '\0' && soft[0] != '0') return LW_OK;
  if (device < 0 || device >= 256) return LW_OK;
  if (g_hw_state[device] != 0) {
    *ok = g_hw_state[device] > 0;
    return LW_OK;
  }
  int major = 0, minor = 0;
  CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major * 10 + minor < 89) {
    g_hw_state[device] = -1;
    return LW_OK;
  }
  unsigned *bad = nullptr;
  unsigned host_bad = 1;
  CK(cudaMalloc(&bad, sizeof(unsigned)));
  cudaError_t e = cudaMemsetAsync(bad, 0, sizeof(unsigned), stream);
  if (e == cudaSuccess) {
    k_check_hw_e4m3<<<sms * 4, kThreads, 0, stream>>>(bad);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) {
    e = cudaMemcpyAsync(&host_bad, bad, sizeof(unsigned), cudaMemcpyDeviceToHost, stream);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  cudaFree(bad);
  if (e != cudaSuccess) return cuda_fail(e, "checking the hardware e4m3 conversion");
  g_hw_state[device] = host_bad == 0 ? 1 : -1;
  *ok = host_bad == 0;
  return LW_OK;
}

lw_status einval(const char *what) { return fail(LW_EINVAL, what); }

}  // namespace

// ================================================================== kernel ABI

extern "C" {

LW_API lw_status lw_cast(void *ctx, void *dst, int32_t dst_dtype, size_t dst_pitch,
                         const void *src, int32_t src_dtype, size_t src_pitch, size_t rows,
                         size_t cols) {
  size_t ds = lw_dtype_size(dst_dtype), ss = lw_dtype_size(src_dtype);
  if (ds == 0 || ss == 0) return einval("lw_cast: unknown dtype code");
  if (dst_dtype != src_dtype && !(lw_dtype_is_float(dst_dtype) && lw_dtype_is_float(src_dtype))) {
    return einval("lw_cast: conversions exist between floating dtypes only");
  }
  if (rows > 1 && (dst_pitch < cols || src_pitch < cols)) {
    return einval("lw_cast: a pitch is smaller than the row length");
  }
  ENTER(ctx);
  if (rows == 0 || cols == 0) return LW_OK;
  bool flat = rows == 1 || (dst_pitch == cols && src_pitch == cols);
  if (dst_dtype == src_dtype) {
    if (flat) {
      CK(cudaMemcpyAsync(dst, src, rows * cols * ds, cudaMemcpyDeviceToDevice, c_->stream));
    } else {
      CK(cudaMemcpy2DAsync(dst, dst_pitch * ds, src, src_pitch * ss, cols * ds, rows,
                           cudaMemcpyDeviceToDevice, c_->stream));
    }
    return LW_OK;
  }
  size_t n = rows * cols;
  with_float(src_dtype, [&](auto sd) {
    with_float(dst_dtype, [&](auto dd) {
      constexpr int SD = decltype(sd)::value, DD = decltype(dd)::value;
      using ST = typename Ty<SD>::T;
      using DT = typename Ty<DD>::T;
      if constexpr (SD == DD) {
        return;  // handled above as a copy
      } else if (flat) {
        k_cast_flat<SD, DD><<<grid<k_cast_flat<SD, DD>>(c_, vec_blocks(n)), kThreads, 0, c_->stream>>>(
            static_cast<DT *>(dst), static_cast<const ST *>(src), n);
      } else {
        unsigned g = grid<k_cast_2d<SD, DD>>(c_, rows);
        k_cast_2d<SD, DD><<<g, kThreads, 0, c_->stream>>>(
            static_cast<DT *>(dst), dst_pitch, static_cast<const ST *>(src), src_pitch, rows,
            cols);
      }
    });
  });
  CK_LAUNCH("lw_cast");
  return LW_OK;
}

LW_API lw_status lw_copy(void *ctx, void *dst, const void *src, size_t n) {
  ENTER(ctx);
  if (n == 0) return LW_OK;
  CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, c_->stream));
  return LW_OK;
}

LW_API lw_status lw_copy2d(void *ctx, void *dst, size_t dst_pitch, const void *src,
                           size_t src_pitch, size_t width, size_t rows) {
  if (rows > 1 && (dst_pitch < width || src_pitch < width)) {
    return einval("lw_copy2d: a pitch is smaller than the width");
  }
  ENTER(ctx);
  if (rows == 0 || width == 0) return LW_OK;
  if (rows == 1) {
    CK(cudaMemcpyAsync(dst, src, width, cudaMemcpyDeviceToDevice, c_->stream));
  } else {
    CK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDeviceToDevice,
                         c_->stream));
  }
  return LW_OK;
}

LW_API lw_status lw_fill(void *ctx, void *dst, size_t n, int32_t elem_size, uint32_t lo,
                         uint32_t hi) {
  if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8) {
    return einval("lw_fill: element size must be 1, 2, 4 or 8");
  }
  ENTER(ctx);
  size_t bytes = n * (size_t)elem_size;
  if (bytes == 0) return LW_OK;
  size_t mis = (size_t)dst % 16;
  size_t head = mis == 0 ? 0 : 16 - mis;
  if (head > bytes) head = bytes;
  size_t nvec = (bytes - head) / 16;
  // The vector at byte offset head (+16k) starts at pattern byte head % elem_size.
  uint8_t pat[16];
  for (int i = 0; i < 16; i++) {
    int k = (int)((head + i) % (size_t)elem_size);
    pat[i] = (uint8_t)(k < 4 ? lo >> (8 * k) : hi >> (8 * (k - 4)));
  }
  uint4 pattern;
  memcpy(&pattern, pat, 16);
  unsigned g = grid<k_fill>(c_, nvec / kThreads + 1);
  k_fill<<<g, kThreads, 0, c_->stream>>>(static_cast<uint8_t *>(dst), bytes, head, nvec,
                                         pattern, elem_size, lo, hi);
  CK_LAUNCH("lw_fill");
  return LW_OK;
}

LW_API lw_status lw_absmax(void *ctx, float *out, const void *src, int32_t dtype, size_t n) {
  if (!lw_dtype_is_float(dtype)) return einval("lw_absmax: dtype must be floating");
  ENTER(ctx);
  CK(cudaMemsetAsync(out, 0, sizeof(float), c_->stream));
  if (n == 0) return LW_OK;
  with_float(dtype, [&](auto d) {
    constexpr int DT = decltype(d)::value;
    using T = typename Ty<DT>::T;
    k_absmax_bits<DT><<<grid<k_absmax_bits<DT>>(c_, vec_blocks(n)), kThreads, 0, c_->stream>>>(
        reinterpret_cast<uint32_t *>(out), static_cast<const T *>(src), n);
    k_absmax_finish<DT><<<1, 1, 0, c_->stream>>>(reinterpret_cast<uint32_t *>(out));
  });
  CK_LAUNCH("lw_absmax");
  return LW_OK;
}

LW_API lw_status lw_count_nonfinite(void *ctx, uint64_t *out, const void *src, int32_t dtype,
                                    size_t n) {
  if (lw_dtype_size(dtype) == 0) return einval("lw_count_nonfinite: unknown dtype code");
  ENTER(ctx);
  if (n == 0 || !lw_dtype_is_float(dtype)) {
    CK(cudaMemsetAsync(out, 0, sizeof(uint64_t), c_->stream));
    return LW_OK;
  }
  cudaError_t zeroed = cudaSuccess;
  with_float(dtype, [&](auto d) {
    constexpr int DT = decltype(d)::value;
    using T = typename Ty<DT>::T;
    unsigned g = grid<k_count_nonfinite<DT>>(c_, vec_blocks(n));
    if (g > 1) zeroed = cudaMemsetAsync(out, 0, sizeof(uint64_t), c_->stream);
    if (zeroed != cudaSuccess) return;
    k_count_nonfinite<DT><<<g, kThreads, 0, c_->stream>>>(
        reinterpret_cast<unsigned long long *>(out), static_cast<const T *>(src), n);
  });
  CK(zeroed);
  CK_LAUNCH("lw_count_nonfinite");
  return LW_OK;
}

LW_API lw_status lw_quant_fp8(void *ctx, uint8_t *q, float *scale, const void *src,
                              int32_t src_dtype, size_t rows, size_t cols, int32_t granularity,
                              int32_t dynamic) {
  if (!lw_dtype_is_quant_input(src_dtype)) return einval("lw_quant_fp8: source must be f32, f16 or bf16");
  if (granularity != LW_PER_TENSOR && granularity != LW_PER_ROW &&
      granularity != LW_PER_BLOCK128) {
    return einval("lw_quant_fp8: unknown granularity");
  }
  ENTER(ctx);
  size_t n = rows * cols;
  if (n == 0) return LW_OK;
  if (granularity == LW_PER_TENSOR && dynamic) {
    // scale[0] holds the magnitude bits first, then the scale.
    CK(cudaMemsetAsync(scale, 0, sizeof(float), c_->stream));
  }
  with_quant_input(src_dtype, [&](auto d) {
    constexpr int DT = decltype(d)::value;
    using T = typename Ty<DT>::T;
    const T *s = static_cast<const T *>(src);
    if (granularity == LW_PER_TENSOR) {
      if (dynamic) {
        k_absmax_bits<DT><<<grid<k_absmax_bits<DT>>(c_, vec_blocks(n)), kThreads, 0,
                            c_->stream>>>(reinterpret_cast<uint32_t *>(scale), s, n);
        k_fp8_scale_finish<DT><<<1, 1, 0, c_->stream>>>(scale);
      }
      with_bool(c_->hw_e4m3, [&](auto hw) {
        constexpr bool HW = decltype(hw)::value;
        k_quant_fp8_tensor<DT, HW><<<grid<k_quant_fp8_tensor<DT, HW>>(c_, vec_blocks(n)),
                                     kThreads, 0, c_->stream>>>(q, scale, s, n);
      });
    } else if (granularity == LW_PER_ROW) {
      with_bool(c_->hw_e4m3, [&](auto hw) {
        constexpr bool HW = decltype(hw)::value;
        launch_quant_row<DT, false, HW>(c_, q, scale, s, rows, cols, dynamic);
      });
    } else {
      size_t tiles = ((rows + 127) / 128) * ((cols + 127) / 128);
      with_bool(c_->hw_e4m3, [&](auto hw) {
        constexpr bool HW = decltype(hw)::value;
        launch_block_tiles<DT, HW>(c_, FlatTiles<T>{s, q, scale, rows, cols, dynamic == 0},
                                   tiles);
      });
    }
  });
  CK_LAUNCH("lw_quant_fp8");
  return LW_OK;
}

LW_API lw_status lw_quant_int8_row(void *ctx, int8_t *q, float *scale, const void *src,
                                   int32_t src_dtype, size_t rows, size_t cols) {
  if (!lw_dtype_is_quant_input(src_dtype)) {
    return einval("lw_quant_int8_row: source must be f32, f16 or bf16");
  }
  ENTER(ctx);
  if (rows * cols == 0) return LW_OK;
  with_quant_input(src_dtype, [&](auto d) {
    constexpr int DT = decltype(d)::value;
    using T = typename Ty<DT>::T;
    launch_quant_row<DT, true, false>(c_, reinterpret_cast<uint8_t *>(q), scale,
                                      static_cast<const T *>(src), rows, cols, 1);
  });
  CK_LAUNCH("lw_quant_int8_row");
  return LW_OK;
}

LW_API lw_status lw_dequant_fp8(void *ctx, void *dst, int32_t dst_dtype, const uint8_t *q,
                                const float *scale, size_t rows, size_t cols,
                                int32_t granularity) {
  if (!lw_dtype_is_quant_input(dst_dtype)) {
    return einval("lw_dequant_fp8: destination must be f32, f16 or bf16");
  }
  if (granularity != LW_PER_TENSOR && granularity != LW_PER_ROW &&
      granularity != LW_PER_BLOCK128) {
    return einval("lw_dequant_fp8: unknown granularity");
  }
  ENTER(ctx);
  size_t n = rows * cols;
  if (n == 0) return LW_OK;
  with_quant_input(dst_dtype, [&](auto d) {
    constexpr int DD = decltype(d)::value;
    using T = typename Ty<DD>::T;
    if (granularity == LW_PER_TENSOR) {
      k_dequant_tensor<DD><<<grid<k_dequant_tensor<DD>>(c_, vec_blocks(n)), kThreads, 0, c_->stream>>>(
          static_cast<T *>(dst), q, scale, n);
    } else {
      unsigned g = grid<k_dequant_rows<DD>>(c_, rows);
      k_dequant_rows<DD><<<g, kThreads, 0, c_->stream>>>(static_cast<T *>(dst), q, scale, rows,
                                                         cols, granularity);
    }
  });
  CK_LAUNCH("lw_dequant_fp8");
  return LW_OK;
}

// ================================================================== CUDA only

LW_API size_t lw_last_error(char *buf, size_t len) {
  size_t n = t_error.size();
  if (buf != nullptr && len > 0) {
    size_t k = n < len - 1 ? n : len - 1;
    memcpy(buf, t_error.data(), k);
    buf[k] = '\0';
  }
  return n;
}

LW_API lw_status lw_device_count(int32_t *out) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice) {
    cudaGetLastError();
    *out = 0;
    return LW_OK;
  }
  if (e != cudaSuccess) return cuda_fail(e, "cudaGetDeviceCount");
  *out = n;
  return LW_OK;
}

LW_API lw_status lw_device_info(int32_t device, char *name, size_t name_len, uint64_t *total,
                                uint64_t *free_bytes) {
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, device));
  if (name != nullptr && name_len > 0) {
    size_t k = strnlen(p.name, sizeof(p.name));
    if (k > name_len - 1) k = name_len - 1;
    memcpy(name, p.name, k);
    name[k] = '\0';
  }
  CK(cudaSetDevice(device));
  size_t f = 0, t = 0;
  CK(cudaMemGetInfo(&f, &t));
  if (total) *total = t;
  if (free_bytes) *free_bytes = f;
  return LW_OK;
}

LW_API lw_status lw_malloc(int32_t device, uint64_t *out_ptr, size_t bytes) {
  CK(cudaSetDevice(device));
  void *p = nullptr;
  CK(cudaMalloc(&p, bytes));
  *out_ptr = (uint64_t)(uintptr_t)p;
  return LW_OK;
}

LW_API lw_status lw_free(int32_t device, uint64_t ptr) {
  CK(cudaSetDevice(device));
  CK(cudaFree((void *)(uintptr_t)ptr));
  return LW_OK;
}

/* CUDA IPC: maps another process's allocation (a 64-byte cudaIpcMemHandle_t) into this one and
 * reports the allocation's size, so that a caller can refuse reads past its end before any kernel
 * runs (a fault there would poison the context). The mapping stays valid until lw_ipc_close; the
 * other process must keep the allocation alive. The size comes from the driver's
 * cuMemGetAddressRange, reached through the runtime's entry-point query (no link to libcuda). */
typedef int (*lw_mem_range_fn)(unsigned long long *base, size_t *size, unsigned long long ptr);

static lw_mem_range_fn mem_range_fn() {
  static lw_mem_range_fn fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void *p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &p, 12000, cudaEnableDefault, &q) ==
            cudaSuccess &&
        q == cudaDriverEntryPointSuccess) {
      fn = (lw_mem_range_fn)p;
    }
  });
  return fn;
}

LW_API lw_status lw_ipc_open(int32_t device, const uint8_t *handle, uint64_t *out_ptr,
                             uint64_t *out_bytes) {
  CK(cudaSetDevice(device));
  cudaIpcMemHandle_t h;
  static_assert(sizeof(h) == 64, "cudaIpcMemHandle_t is 64 bytes");
  memcpy(&h, handle, sizeof(h));
  void *p = nullptr;
  CK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
  lw_mem_range_fn range = mem_range_fn();
  unsigned long long base = 0;
  size_t size = 0;
  if (range == nullptr || range(&base, &size, (unsigned long long)(uintptr_t)p) != 0) {
    cudaIpcCloseMemHandle(p);
    return fail(LW_ECUDA,
                "lw_ipc_open: cuMemGetAddressRange is unavailable or failed on the mapped handle");
  }
  *out_ptr = (uint64_t)(uintptr_t)p;
  /* Bytes from the mapped address to the end of its allocation. */
  *out_bytes = (uint64_t)(base + size - (unsigned long long)(uintptr_t)p);
  return LW_OK;
}

LW_API lw_status lw_ipc_close(int32_t device, uint64_t ptr) {
  CK(cudaSetDevice(device));
  CK(cudaIpcCloseMemHandle((void *)(uintptr_t)ptr));
  return LW_OK;
}

LW_API lw_status lw_host_alloc(uint64_t *out_ptr, size_t bytes) {
  void *p = nullptr;
  // Portable: usable by every device and context; pinned for full-speed asynchronous copies.
  CK(cudaHostAlloc(&p, bytes, cudaHostAllocPortable));
  *out_ptr = (uint64_t)(uintptr_t)p;
  return LW_OK;
}

LW_API lw_status lw_host_free(uint64_t ptr) {
  CK(cudaFreeHost((void *)(uintptr_t)ptr));
  return LW_OK;
}

LW_API lw_status lw_ctx_create(int32_t device, uint64_t *out_ctx) {
  lw_ctx *c = new lw_ctx();
  lw_status s = ctx_init(c, device);
  if (s != LW_OK) {
    delete c;
    return s;
  }
  *out_ctx = (uint64_t)(uintptr_t)c;
  return LW_OK;
}

LW_API lw_status lw_ctx_destroy(void *ctx) {
  lw_ctx *c = static_cast<lw_ctx *>(ctx);
  if (c == nullptr || c == g_default) return LW_OK;  // the default context lives on
  CK(cudaSetDevice(c->device));
  CK(cudaStreamSynchronize(c->stream));
  CK(cudaStreamDestroy(c->stream));
  delete c;
  return LW_OK;
}

LW_API lw_status lw_ctx_sync(void *ctx) {
  ENTER(ctx);
  CK(cudaStreamSynchronize(c_->stream));
  return LW_OK;
}

LW_API lw_status lw_memcpy_h2d(void *ctx, void *dst, const void *src, size_t n) {
  ENTER(ctx);
  if (n == 0) return LW_OK;
  CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, c_->stream));
  return LW_OK;
}

LW_API lw_status lw_memcpy_d2h(void *ctx, void *dst, const void *src, size_t n) {
  ENTER(ctx);
  if (n == 0) return LW_OK;
  CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, c_->stream));
  return LW_OK;
}

LW_API lw_status lw_event_create(int32_t device, uint64_t *out_event) {
  CK(cudaSetDevice(device));
  cudaEvent_t e;
  CK(cudaEventCreate(&e));
  *out_event = (uint64_t)(uintptr_t)e;
  return LW_OK;
}

LW_API lw_status lw_event_destroy(void *event) {
  CK(cudaEventDestroy(static_cast<cudaEvent_t>(event)));
  return LW_OK;
}

LW_API lw_status lw_event_record(void *event, void *ctx) {
  ENTER(ctx);
  CK(cudaEventRecord(static_cast<cudaEvent_t>(event), c_->stream));
  return LW_OK;
}

LW_API lw_status lw_event_wait(void *ctx, void *event) {
  ENTER(ctx);
  CK(cudaStreamWaitEvent(c_->stream, static_cast<cudaEvent_t>(event), 0));
  return LW_OK;
}

LW_API lw_status lw_event_sync(void *event) {
  CK(cudaEventSynchronize(static_cast<cudaEvent_t>(event)));
  return LW_OK;
}

LW_API lw_status lw_event_elapsed(float *out_ms, void *start, void *end) {
  CK(cudaEventElapsedTime(out_ms, static_cast<cudaEvent_t>(start),
                          static_cast<cudaEvent_t>(end)));
  return LW_OK;
}

LW_API lw_status lw_pread(int32_t fd, void *dst, size_t n, uint64_t offset) {
  uint8_t *p = static_cast<uint8_t *>(dst);
  size_t done = 0;
  while (done < n) {
    // Linux moves at most about 2 GiB per call; short reads simply continue.
    size_t want = n - done;
    if (want > ((size_t)1 << 30)) want = (size_t)1 << 30;
    ssize_t r = pread(fd, p + done, want, (off_t)(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return fail(LW_EIO, std::string("pread: ") + strerror(errno));
    }
    if (r == 0) {
      return fail(LW_EIO, "pread: the file ends at byte " + std::to_string(offset + done) +
                              ", " + std::to_string(n - done) + " bytes short");
    }
    done += (size_t)r;
  }
  return LW_OK;
}

/* ---------------------------------------------------------------- staged reads */

// Waiting on a default event spins a CPU core; the staging pipeline waits on several at once
// while file reads need every core, so its events sleep instead (and skip timing).
LW_API lw_status lw_event_create_blocking(int32_t device, uint64_t *out_event) {
  CK(cudaSetDevice(device));
  cudaEvent_t e;
  CK(cudaEventCreateWithFlags(&e, cudaEventBlockingSync | cudaEventDisableTiming));
  *out_event = (uint64_t)(uintptr_t)e;
  return LW_OK;
}

}  // extern "C"

// ================================================================== graphs (cuda/graph.cu)
#include "graph.cu"

// ================================================================== staging (cuda/stager.cu)
#include "stager.cu"

// ================================================================== multi-tensor kernels
// The tables of cuda/layerwise.h ("multi-tensor kernels"); wasm/kernels.c is the reference.
// One CUDA block per work item (grid-stride over items). A row's source address comes from the
// target's pieces (a short scan: a fused module has two or three). Rows of one piece that are
// contiguous in both source and destination are worked as one span, so 16-byte vector access
// covers whole row runs. Per-tensor absmax: each item writes a partial (no shared atomic on
// the data path); the last item of a target to finish, counted by one atomic per item, folds the
// target's partials into its scale and resets the counter, so the launch can be replayed.

namespace {

/* Source address of row r, column c of target t, and the rows left in its piece from r. */
__device__ __forceinline__ const uint8_t *mt_src(const uint64_t *t, const uint64_t *pieces,
                                                 const uint64_t *bases, size_t r, size_t c,
                                                 size_t esz, size_t *left, size_t *pitch) {
  const uint64_t *p = pieces + t[5] * LW_MT_PIECE_FIELDS;
  for (uint64_t k = 0; k < t[6]; k++, p += LW_MT_PIECE_FIELDS) {
    uint64_t r0 = __ldg(p + 3), nr = __ldg(p + 4);
    if (r >= r0 && r < r0 + nr) {
      *left = r0 + nr - r;
      *pitch = __ldg(p + 2);
      return reinterpret_cast<const uint8_t *>(__ldg(bases + __ldg(p)) + __ldg(p + 1)) +
             ((r - r0) * *pitch + c) * esz;
    }
  }
  *left = 0;
  return nullptr;
}

/* Calls f(src, dst_row_index, elements) for runs of the item's rows: several rows at once when
 * they are contiguous in the source and the item spans every column of a packed target. */
template <int DT, typename F>
__device__ __forceinline__ void mt_runs(const uint64_t *t, const uint64_t *pieces,
                                        const uint64_t *bases, const uint64_t *it, F f) {
  using T = typename Ty<DT>::T;
  size_t r = it[1], r1 = it[1] + it[2], c0 = it[3], w = it[4], cols = t[4];
  bool whole = c0 == 0 && w == cols && t[2] == cols;
  while (r < r1) {
    size_t left, pitch;
    const uint8_t *x = mt_src(t, pieces, bases, r, c0, sizeof(T), &left, &pitch);
    if (x == nullptr) return;
    size_t k = left < r1 - r ? left : r1 - r;
    if (!(whole && pitch == cols)) k = 1;
    f(reinterpret_cast<const T *>(x), r, k * w);
    r += k;
  }
}

/* scale[0] of target t from the partials of its items (the whole block takes part). */
template <int DT>
__device__ __forceinline__ void fold_scale(const uint64_t *t, const uint32_t *partials) {
  uint32_t all = 0;
  for (size_t k = t[7] + threadIdx.x; k < t[7] + t[8]; k += blockDim.x) {
    all = max(all, __ldcg(partials + k));
  }
  all = block_max(all);
  if (threadIdx.x == 0) *reinterpret_cast<float *>(t[1]) = lw_fp8_scale(absmax_value<DT>(all));
}

template <int DT>
__global__ void __launch_bounds__(kThreads)
    k_mt_absmax(const uint64_t *targets, const uint64_t *pieces, const uint64_t *items,
                size_t first, size_t n, const uint64_t *bases, uint32_t *partials,
                uint32_t *counters) {
  using T = typename Ty<DT>::T;
  __shared__ bool last;
  for (size_t i = first + blockIdx.x; i < first + n; i += gridDim.x) {
    const uint64_t *it = items + i * LW_MT_ITEM_FIELDS;
    const uint64_t *t = targets + it[0] * LW_MT_TARGET_FIELDS;
    uint32_t m = 0;
    mt_runs<DT>(t, pieces, bases, it, [&](const T *x, size_t, size_t len) {
      m = fold_span(x, len, threadIdx.x, blockDim.x, m,
                    [](uint32_t a, T v) { return max(a, Ty<DT>::abits(v)); });
    });
    m = block_max(m);
    if (threadIdx.x == 0) {
      partials[i] = m;
      last = false;
      if (counters != nullptr) {  // NULL: a scan, partials only
        __threadfence();
        unsigned done = atomicAdd(reinterpret_cast<unsigned *>(counters + it[0]), 1u);
        last = done + 1 == t[8];
      }
    }
    __syncthreads();
    if (last) {
      __threadfence();
      fold_scale<DT>(t, partials);
      if (threadIdx.x == 0) counters[it[0]] = 0;
    }
    __syncthreads();
  }
}

/* One block per item of the range; the block of a target's first item folds its partials. */
template <int DT>
__global__ void __launch_bounds__(kThreads)
    k_mt_absmax_fold(const uint64_t *targets, const uint64_t *items, size_t first, size_t n,
                     const uint32_t *partials) {
  for (size_t i = first + blockIdx.x; i < first + n; i += gridDim.x) {
    const uint64_t *t = targets + items[i * LW_MT_ITEM_FIELDS] * LW_MT_TARGET_FIELDS;
    if (t[7] == i) fold_scale<DT>(t, partials);  // uniform in the block
  }
}

template <int DT, int KIND, bool HW>
__global__ void __launch_bounds__(kThreads)
    k_mt_quant(const uint64_t *targets, const uint64_t *pieces, const uint64_t *items,
               size_t first, size_t n, const uint64_t *bases) {
  static_assert(KIND != LW_MT_FP8_BLOCK128, "tiles have k_block_tiles");
  using T = typename Ty<DT>::T;
  for (size_t i = first + blockIdx.x; i < first + n; i += gridDim.x) {
    const uint64_t *it = items + i * LW_MT_ITEM_FIELDS;
    const uint64_t *t = targets + it[0] * LW_MT_TARGET_FIELDS;
    uint8_t *q = reinterpret_cast<uint8_t *>(t[0]);
    float *scale = reinterpret_cast<float *>(t[1]);
    size_t cols = t[4], c0 = it[3], w = it[4];
    auto quant = [&](const T *x, uint8_t *dst, size_t len, size_t tid, size_t nth, float s) {
      Divisor d = divisor_of(s);
      if constexpr (KIND == LW_MT_INT8_ROW) {
        map_span2(
            x, reinterpret_cast<int8_t *>(dst), len, tid, nth,
            [d](T v, size_t, bool &slow) { return quant_int8(Ty<DT>::to(v), d, slow); },
            [d](T v, size_t) { return exact_int8(Ty<DT>::to(v), d.s); });
      } else {
        map_span2(
            x, dst, len, tid, nth,
            [d](T v, size_t, bool &slow) { return quant_e4m3<HW>(Ty<DT>::to(v), d, slow); },
            [d](T v, size_t) { return exact_e4m3(Ty<DT>::to(v), d.s); });
      }
    };
    if constexpr (KIND == LW_MT_FP8_TENSOR) {
      float s = *scale;
      mt_runs<DT>(t, pieces, bases, it, [&](const T *x, size_t r, size_t len) {
        quant(x, q + r * cols + c0, len, threadIdx.x, blockDim.x, s);
      });
    } else {
      // Per row (fp8 or int8): one warp per row, so rows need no block-wide barrier and eight
      // rows of a block are in flight at once; the second read of a row comes from L1/L2.
      // (Fetching each warp's next row into L2 meanwhile, which speeds up the one-tensor row
      // kernel, made this one slower on an H200: 7.0 -> 10.1 ms for the 8B model.)
      int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
      for (size_t r = it[1] + warp; r < it[1] + it[2]; r += nw) {
        size_t left, pitch;
        const T *x = reinterpret_cast<const T *>(
            mt_src(t, pieces, bases, r, c0, sizeof(T), &left, &pitch));
        if (x == nullptr) continue;
        uint32_t m = fold_span(x, w, lane, 32, 0u,
                               [](uint32_t a, T v) { return max(a, Ty<DT>::abits(v)); });
        m = warp_max(m);
        float amax = absmax_value<DT>(m);
        float s = KIND == LW_MT_INT8_ROW ? lw_int8_scale(amax) : lw_fp8_scale(amax);
        if (lane == 0) scale[r] = s;
        quant(x, q + r * cols + c0, w, lane, 32, s);
      }
    }
  }
}

/* The tiles of a multi-tensor launch (items [first, first + n) of the tables). */
struct TableTiles {
  const uint64_t *targets, *pieces, *items, *bases;
  size_t first, n;
  static constexpr bool given = false;  // scales are always computed
  __device__ size_t count() const { return n; }
  __device__ Tile tile(size_t k) const {
    const uint64_t *it = items + (first + k) * LW_MT_ITEM_FIELDS;
    const uint64_t *t = targets + it[0] * LW_MT_TARGET_FIELDS;
    size_t cols = t[4], r0 = it[1], c0 = it[3];
    return {reinterpret_cast<uint8_t *>(t[0]),
            reinterpret_cast<float *>(t[1]),
            (r0 / 128) * ((cols + 127) / 128) + c0 / 128,
            cols,
            r0,
            it[2],
            c0,
            it[4],
            t};
  }
  template <typename T>
  __device__ const T *row(const Tile &d, size_t r) const {
    size_t left, pitch;
    return reinterpret_cast<const T *>(
        mt_src(d.target, pieces, bases, d.r0 + r, d.c0, sizeof(T), &left, &pitch));
  }
};

/* Copies and casts; equal dtypes move bytes (SD == DD == -1: bytes of width esz). */
template <int SD, int DD>
__global__ void __launch_bounds__(kThreads)
    k_mt_cast(const uint64_t *targets, const uint64_t *pieces, const uint64_t *items,
              size_t first, size_t n, const uint64_t *bases) {
  using ST = typename Ty<SD>::T;
  using DT = typename Ty<DD>::T;
  for (size_t i = first + blockIdx.x; i < first + n; i += gridDim.x) {
    const uint64_t *it = items + i * LW_MT_ITEM_FIELDS;
    const uint64_t *t = targets + it[0] * LW_MT_TARGET_FIELDS;
    DT *dst = reinterpret_cast<DT *>(t[0]);
    mt_runs<SD>(t, pieces, bases, it, [&](const ST *x, size_t r, size_t len) {
      map_span(x, dst + r * t[2] + it[3], len, threadIdx.x, blockDim.x,
               [](ST v, size_t) { return Ty<DD>::from(Ty<SD>::to(v)); });
    });
  }
}

/* Equal dtypes: bytes, esz per element. */
__global__ void __launch_bounds__(kThreads)
    k_mt_bytes(const uint64_t *targets, const uint64_t *pieces, const uint64_t *items,
               size_t first, size_t n, const uint64_t *bases, size_t esz) {
  for (size_t i = first + blockIdx.x; i < first + n; i += gridDim.x) {
    const uint64_t *it = items + i * LW_MT_ITEM_FIELDS;
    const uint64_t *t = targets + it[0] * LW_MT_TARGET_FIELDS;
    size_t r = it[1], r1 = it[1] + it[2], c0 = it[3], w = it[4], cols = t[4];
    bool whole = c0 == 0 && w == cols && t[2] == cols;
    while (r < r1) {
      size_t left, pitch;
      const uint8_t *x = mt_src(t, pieces, bases, r, c0, esz, &left, &pitch);
      if (x == nullptr) break;
      size_t k = left < r1 - r ? left : r1 - r;
      if (!(whole && pitch == cols)) k = 1;
      uint8_t *d = reinterpret_cast<uint8_t *>(t[0]) + (r * t[2] + c0) * esz;
      map_span(x, d, k * w * esz, threadIdx.x, blockDim.x, [](uint8_t v, size_t) { return v; });
      r += k;
    }
  }
}

}  // namespace

extern "C" {

LW_API lw_status lw_mt_absmax(void *ctx, const uint64_t *targets, const uint64_t *pieces,
                              const uint64_t *items, size_t first, size_t n,
                              const uint64_t *bases, int32_t src_dtype, uint32_t *partials,
                              uint32_t *counters) {
  if (!lw_dtype_is_quant_input(src_dtype)) return einval("lw_mt_absmax: source must be f32, f16 or bf16");
  ENTER(ctx);
  if (n == 0) return LW_OK;
  with_quant_input(src_dtype, [&](auto d) {
    constexpr int DT = decltype(d)::value;
    k_mt_absmax<DT><<<grid<k_mt_absmax<DT>>(c_, n), kThreads, 0, c_->stream>>>(
        targets, pieces, items, first, n, bases, partials, counters);
  });
  CK_LAUNCH("lw_mt_absmax");
  return LW_OK;
}

LW_API lw_status lw_mt_absmax_fold(void *ctx, const uint64_t *targets, const uint64_t *items,
                                   size_t first, size_t n, int32_t src_dtype,
                                   const uint32_t *partials) {
  if (!lw_dtype_is_quant_input(src_dtype)) return einval("lw_mt_absmax_fold: source must be f32, f16 or bf16");
  ENTER(ctx);
  if (n == 0) return LW_OK;
  with_quant_input(src_dtype, [&](auto d) {
    constexpr int DT = decltype(d)::value;
    k_mt_absmax_fold<DT><<<grid<k_mt_absmax_fold<DT>>(c_, n), kThreads, 0, c_->stream>>>(
        targets, items, first, n, partials);
  });
  CK_LAUNCH("lw_mt_absmax_fold");
  return LW_OK;
}

LW_API lw_status lw_mt_quant(void *ctx, int32_t kind, const uint64_t *targets,
                             const uint64_t *pieces, const uint64_t *items, size_t first,
                             size_t n, const uint64_t *bases, int32_t src_dtype) {
  if (!lw_dtype_is_quant_input(src_dtype)) return einval("lw_mt_quant: source must be f32, f16 or bf16");
  if (kind < LW_MT_FP8_TENSOR || kind > LW_MT_INT8_ROW) return einval("lw_mt_quant: unknown kind");
  ENTER(ctx);
  if (n == 0) return LW_OK;
  with_quant_input(src_dtype, [&](auto d) {
    constexpr int DT = decltype(d)::value;
    with_bool(c_->hw_e4m3, [&](auto hw) {
      constexpr bool HW = decltype(hw)::value;
      auto go = [&](auto k) {
        constexpr int K = decltype(k)::value;
        if constexpr (K == LW_MT_FP8_BLOCK128) {
          launch_block_tiles<DT, HW>(c_, TableTiles{targets, pieces, items, bases, first, n}, n);
        } else {
          k_mt_quant<DT, K, HW><<<grid<k_mt_quant<DT, K, HW>>(c_, n), kThreads, 0,
                                  c_->stream>>>(targets, pieces, items, first, n, bases);
        }
      };
      switch (kind) {
      case LW_MT_FP8_TENSOR:
        go(std::integral_constant<int, LW_MT_FP8_TENSOR>());
        break;
      case LW_MT_FP8_ROW:
        go(std::integral_constant<int, LW_MT_FP8_ROW>());
        break;
      case LW_MT_FP8_BLOCK128:
        go(std::integral_constant<int, LW_MT_FP8_BLOCK128>());
        break;
      default:
        go(std::integral_constant<int, LW_MT_INT8_ROW>());
        break;
      }
    });
  });
  CK_LAUNCH("lw_mt_quant");
  return LW_OK;
}

LW_API lw_status lw_mt_copy(void *ctx, const uint64_t *targets, const uint64_t *pieces,
                            const uint64_t *items, size_t first, size_t n, const uint64_t *bases,
                            int32_t src_dtype, int32_t dst_dtype) {
  size_t ds = lw_dtype_size(dst_dtype), ss = lw_dtype_size(src_dtype);
  if (ds == 0 || ss == 0) return einval("lw_mt_copy: unknown dtype code");
  if (dst_dtype != src_dtype && !(lw_dtype_is_float(dst_dtype) && lw_dtype_is_float(src_dtype))) {
    return einval("lw_mt_copy: conversions exist between floating dtypes only");
  }
  ENTER(ctx);
  if (n == 0) return LW_OK;
  if (dst_dtype == src_dtype) {
    k_mt_bytes<<<grid<k_mt_bytes>(c_, n), kThreads, 0, c_->stream>>>(targets, pieces, items,
                                                                       first, n, bases, ss);
  } else {
    with_float(src_dtype, [&](auto sd) {
      with_float(dst_dtype, [&](auto dd) {
        constexpr int SD = decltype(sd)::value, DD = decltype(dd)::value;
        if constexpr (SD != DD) {
          k_mt_cast<SD, DD><<<grid<k_mt_cast<SD, DD>>(c_, n), kThreads, 0, c_->stream>>>(
              targets, pieces, items, first, n, bases);
        }
      });
    });
  }
  CK_LAUNCH("lw_mt_copy");
  return LW_OK;
}

}  // extern "C"

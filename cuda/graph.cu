/*
 * CUDA graphs, stream access and the fp8 weight-sum probe (CUDA only; included at the end of
 * kernels.cu, so it shares its contexts, error text and ENTER/CK macros).
 *
 * Why: a reload writes kernel tensors in place so that anything holding their device pointers,
 * CUDA graphs above all, stays valid. tests/cuda_graph_test.ts proves it: it captures ONE graph
 * of lw_fp8_tensor_sums over every fp8 weight of a model, reloads new weights, replays the same
 * graph and checks that the sums follow the new weights.
 *
 * The probe is exact, so its result can be compared bit for bit with the host: every finite
 * e4m3fn value is an integer multiple of 2^-9 of magnitude at most 448 * 2^9 = 229376 units, so
 * a sum of fewer than 2^35 elements in 64-bit integer units is exact whatever the order of the
 * additions (integer atomics included). NaN codes (0x7f, 0xff) count as 0.
 */

namespace {

/* e4m3fn code -> value in units of 2^-9 (exact). */
__device__ __forceinline__ int32_t e4m3_units(uint8_t b) {
  const int32_t e = (b >> 3) & 15, m = b & 7;
  int32_t u;
  if (e == 15 && m == 7) {
    u = 0;  // NaN
  } else if (e == 0) {
    u = m;  // subnormal: m * 2^-9
  } else {
    u = (8 + m) << (e - 1);  // (8 + m) * 2^(e - 10) = (8 + m) * 2^(e - 1) units
  }
  return (b & 0x80) ? -u : u;
}

struct SumEntry {
  uint64_t q;      // device address of the fp8 elements
  uint64_t numel;  // element count
  uint64_t scale;  // device address of one f32 scale, or 0
};

/* grid (x: chunks, y: tensor); each block adds its partial sum with one 64-bit integer atomic */
__global__ void __launch_bounds__(kThreads)
    k_fp8_units_sum(const SumEntry *table, unsigned long long *sums) {
  const SumEntry t = table[blockIdx.y];
  const uint8_t *q = reinterpret_cast<const uint8_t *>(t.q);
  long long acc = 0;
  for (size_t i = (size_t)blockIdx.x * kThreads + threadIdx.x; i < t.numel;
       i += (size_t)gridDim.x * kThreads) {
    acc += e4m3_units(q[i]);
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  __shared__ long long warp[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long s = 0;
    for (int w = 0; w < kThreads / 32; w++) s += warp[w];
    if (s != 0) atomicAdd(&sums[blockIdx.y], (unsigned long long)s);  // two's complement
  }
}

__global__ void k_fp8_sum_finish(const SumEntry *table, const long long *sums, double *dequant,
                                 size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float *scale = reinterpret_cast<const float *>(table[i].scale);
  const double v = (double)sums[i] * 0x1p-9;  // exact: |sums| < 2^53
  dequant[i] = scale != nullptr ? v * (double)scale[0] : v;
}

}  // namespace

extern "C" {

LW_API lw_status lw_ctx_stream(void *ctx, uint64_t *out_stream) {
  ENTER(ctx);
  *out_stream = (uint64_t)(uintptr_t)c_->stream;
  return LW_OK;
}

LW_API lw_status lw_graph_begin(void *ctx) {
  ENTER(ctx);
  // Thread-local mode: other threads' (FFI worker) CUDA calls stay legal during the capture.
  CK(cudaStreamBeginCapture(c_->stream, cudaStreamCaptureModeThreadLocal));
  return LW_OK;
}

LW_API lw_status lw_graph_end(void *ctx, uint64_t *out_exec) {
  ENTER(ctx);
  cudaGraph_t g = nullptr;
  CK(cudaStreamEndCapture(c_->stream, &g));
  cudaGraphExec_t exec = nullptr;
  cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
  cudaGraphDestroy(g);
  if (e != cudaSuccess) return cuda_fail(e, "cudaGraphInstantiate");
  *out_exec = (uint64_t)(uintptr_t)exec;
  return LW_OK;
}

LW_API lw_status lw_graph_launch(void *ctx, void *exec) {
  ENTER(ctx);
  CK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), c_->stream));
  return LW_OK;
}

LW_API lw_status lw_graph_destroy(void *exec) {
  CK(cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec)));
  return LW_OK;
}

LW_API lw_status lw_fp8_tensor_sums(void *ctx, const uint64_t *table, size_t n, size_t max_numel,
                                    int64_t *sums, double *dequant) {
  if (n == 0) return LW_OK;
  if (n > 65535) return fail(LW_EINVAL, "lw_fp8_tensor_sums: at most 65535 tensors");
  ENTER(ctx);
  const SumEntry *t = reinterpret_cast<const SumEntry *>(table);
  // Everything goes on the stream (no host-side sizing from device data), so it can be captured.
  CK(cudaMemsetAsync(sums, 0, n * sizeof(int64_t), c_->stream));
  size_t chunks = (max_numel + (size_t)kThreads * 16 - 1) / ((size_t)kThreads * 16);
  size_t cap = ((size_t)c_->sms * 4 + n - 1) / n;
  if (chunks > cap) chunks = cap;
  if (chunks < 1) chunks = 1;
  k_fp8_units_sum<<<dim3((unsigned)chunks, (unsigned)n), kThreads, 0, c_->stream>>>(
      t, reinterpret_cast<unsigned long long *>(sums));
  CK_LAUNCH("lw_fp8_tensor_sums");
  k_fp8_sum_finish<<<(unsigned)((n + 255) / 256), 256, 0, c_->stream>>>(
      t, reinterpret_cast<const long long *>(sums), dequant, n);
  CK_LAUNCH("lw_fp8_tensor_sums finish");
  return LW_OK;
}

}  // extern "C"

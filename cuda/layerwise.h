/*
 * layerwise kernel ABI: one header, two implementations.
 *
 *   cuda/kernels.cu  pointers are CUDA device pointers, `ctx` is an lw_ctx* (device + stream)
 *   wasm/kernels.c   pointers are offsets into the WebAssembly memory, `ctx` is ignored (pass 0)
 *
 * Both implementations must produce bit-identical bytes for the same inputs; scalar numerics
 * live in lw_numeric.h, compiled into both, so there is one definition of every rounding rule.
 *
 * Every entry point returns an lw_status. Arguments are validated by the TypeScript caller
 * (src/backend/kernels.ts) before the call; the C side re-checks only what would otherwise
 * be undefined behaviour (unknown dtype codes, unsupported combinations) and writes nothing
 * when it returns an error.
 *
 * Sizes are size_t: 64-bit on both (the WebAssembly module is built for wasm64, memory64).
 */
#ifndef LAYERWISE_H
#define LAYERWISE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__wasm__)
#define LW_API __attribute__((used, visibility("default")))
#else
#define LW_API __attribute__((visibility("default")))
#endif

/* dtype codes: keep in sync with src/tensor/dtype.ts */
enum {
  LW_F32 = 0,
  LW_F16 = 1,
  LW_BF16 = 2,
  LW_F8_E4M3FN = 3,
  LW_F8_E5M2 = 4,
  LW_I8 = 5,
  LW_U8 = 6,
  LW_I32 = 7,
  LW_I64 = 8,
  LW_BOOL = 9
};

/* status codes */
typedef int32_t lw_status;
enum {
  LW_OK = 0,
  LW_EINVAL = 1,  /* bad dtype, combination or size */
  LW_ECUDA = 2,   /* a CUDA runtime error; lw_last_error() has the text */
  LW_ENOMEM = 3,  /* allocation failed */
  LW_EIO = 4      /* a file read failed or came short */
};

/* quantization granularity */
enum { LW_PER_TENSOR = 0, LW_PER_ROW = 1, LW_PER_BLOCK128 = 2 };

/* ---------------------------------------------------------------- kernels (both backends) */

/* dst[r*dst_pitch + c] = convert(src[r*src_pitch + c]) for r < rows, c < cols; pitches in
 * elements. Floating dtypes f32/f16/bf16/e4m3fn/e5m2 in any combination, through f32 with one
 * rounding (round-to-nearest-even); fp8 destinations saturate finite values (see lw_numeric.h).
 * Equal dtypes of any kind: a plain strided copy. */
LW_API lw_status lw_cast(void *ctx, void *dst, int32_t dst_dtype, size_t dst_pitch,
                         const void *src, int32_t src_dtype, size_t src_pitch, size_t rows,
                         size_t cols);

/* bytewise copy of n bytes (device to device; regions do not overlap) */
LW_API lw_status lw_copy(void *ctx, void *dst, const void *src, size_t n);

/* rows x width bytes, pitches in bytes */
LW_API lw_status lw_copy2d(void *ctx, void *dst, size_t dst_pitch, const void *src,
                           size_t src_pitch, size_t width, size_t rows);

/* n elements of elem_size (1, 2, 4 or 8) bytes, each set to the little-endian pattern hi:lo */
LW_API lw_status lw_fill(void *ctx, void *dst, size_t n, int32_t elem_size, uint32_t lo,
                         uint32_t hi);

/* out[0] = max |x| over n elements of a floating dtype, as f32; NaN if any element is NaN */
LW_API lw_status lw_absmax(void *ctx, float *out, const void *src, int32_t dtype, size_t n);

/* out[0] = number of NaN or +-Inf among n elements of a floating dtype (0 for integer dtypes) */
LW_API lw_status lw_count_nonfinite(void *ctx, uint64_t *out, const void *src, int32_t dtype,
                                    size_t n);

/* fp8 e4m3fn quantization of a contiguous rows x cols matrix of f32/f16/bf16.
 * granularity LW_PER_TENSOR: scale[1]; LW_PER_ROW: scale[rows];
 * LW_PER_BLOCK128: scale[ceil(rows/128) * ceil(cols/128)] row-major.
 * dynamic != 0: scale = max(absmax / 448, 1/(448*512)) is computed and written;
 * dynamic == 0: scale is read (given). q = e4m3fn(clamp(x / scale, -448, 448)). */
LW_API lw_status lw_quant_fp8(void *ctx, uint8_t *q, float *scale, const void *src,
                              int32_t src_dtype, size_t rows, size_t cols, int32_t granularity,
                              int32_t dynamic);

/* int8 per-row quantization: scale[r] = max(absmax_row / 127, 1e-10);
 * q = clamp(round_half_even(x / scale), -128, 127) */
LW_API lw_status lw_quant_int8_row(void *ctx, int8_t *q, float *scale, const void *src,
                                   int32_t src_dtype, size_t rows, size_t cols);

/* dst = convert(f32(q) * scale) for an e4m3fn rows x cols matrix, scales as in lw_quant_fp8;
 * dst dtype f32/f16/bf16 */
LW_API lw_status lw_dequant_fp8(void *ctx, void *dst, int32_t dst_dtype, const uint8_t *q,
                                const float *scale, size_t rows, size_t cols,
                                int32_t granularity);

/* ---------------------------------------------------------------- CUDA only (cuda/kernels.cu) */
#ifndef __wasm__
/* text of the last error on this thread (empty when none); returns the full length */
LW_API size_t lw_last_error(char *buf, size_t len);
LW_API lw_status lw_device_count(int32_t *out);
/* name into buf, total and free bytes */
LW_API lw_status lw_device_info(int32_t device, char *name, size_t name_len, uint64_t *total,
                                uint64_t *free_bytes);
LW_API lw_status lw_malloc(int32_t device, uint64_t *out_ptr, size_t bytes);
LW_API lw_status lw_free(int32_t device, uint64_t ptr);
/* CUDA IPC: open a 64-byte cudaIpcMemHandle_t of another process on `device` (the mapped address
 * and the bytes from it to the end of the allocation); close the mapping */
LW_API lw_status lw_ipc_open(int32_t device, const uint8_t *handle, uint64_t *out_ptr,
                             uint64_t *out_bytes);
LW_API lw_status lw_ipc_close(int32_t device, uint64_t ptr);
/* pinned (page-locked) host memory */
LW_API lw_status lw_host_alloc(uint64_t *out_ptr, size_t bytes);
LW_API lw_status lw_host_free(uint64_t ptr);
/* an execution context: a device ordinal and a non-blocking stream on it */
LW_API lw_status lw_ctx_create(int32_t device, uint64_t *out_ctx);
LW_API lw_status lw_ctx_destroy(void *ctx);
LW_API lw_status lw_ctx_sync(void *ctx);
/* asynchronous on ctx's stream; host pointers should be pinned for overlap */
LW_API lw_status lw_memcpy_h2d(void *ctx, void *dst, const void *src, size_t n);
LW_API lw_status lw_memcpy_d2h(void *ctx, void *dst, const void *src, size_t n);
/* events, for timing and for ordering work between contexts */
LW_API lw_status lw_event_create(int32_t device, uint64_t *out_event);
LW_API lw_status lw_event_destroy(void *event);
LW_API lw_status lw_event_record(void *event, void *ctx);
LW_API lw_status lw_event_wait(void *ctx, void *event);
LW_API lw_status lw_event_sync(void *event);
LW_API lw_status lw_event_elapsed(float *out_ms, void *start, void *end);
/* pread n bytes at offset of fd into (pinned) host memory; fails with LW_EIO when short */
LW_API lw_status lw_pread(int32_t fd, void *dst, size_t n, uint64_t offset);
/* staged reads: an event whose host waits sleep instead of spinning, without timing */
LW_API lw_status lw_event_create_blocking(int32_t device, uint64_t *out_event);
#endif

/* ---------------------------------------------------------------- CUDA graphs, streams, probe
 * (CUDA only; cuda/graph.cu). Capture on a ctx's stream: lw_graph_begin, then any entry points
 * on that ctx, then lw_graph_end gives an executable graph to launch any number of times. */
#ifndef __wasm__
/* the cudaStream_t of ctx (NULL: device 0's default context), for libraries such as NCCL */
LW_API lw_status lw_ctx_stream(void *ctx, uint64_t *out_stream);
LW_API lw_status lw_graph_begin(void *ctx);
/* ends the capture and instantiates it; on error the capture is discarded */
LW_API lw_status lw_graph_end(void *ctx, uint64_t *out_exec);
LW_API lw_status lw_graph_launch(void *ctx, void *exec);
LW_API lw_status lw_graph_destroy(void *exec);
/* For n tensors described by the device table {q, numel, scale}[n] (uint64 each; scale: one f32
 * or 0): sums[i] = sum of the e4m3fn elements of q in units of 2^-9 (exact; NaN counts 0) and
 * dequant[i] = sums[i] * 2^-9 * scale (f64). max_numel only sizes the grid. Stream-only work,
 * so it can be captured in a graph. */
LW_API lw_status lw_fp8_tensor_sums(void *ctx, const uint64_t *table, size_t n, size_t max_numel,
                                    int64_t *sums, double *dequant);

/* ---------------------------------------------------------------- native staging
 * (CUDA only; cuda/stager.cu). Threads of the library pread file ranges into a pinned ring of
 * `slots` x `slot_bytes` at `pinned` and copy them to device addresses on copy_ctx's stream.
 * The plan, all uint64: reads[nreads][5] = {file, offset, slot_at, bytes, block}, ordered by
 * block; pieces[npieces][6] = {item, slot_at, bytes, device dst, block, flags (1: the item's
 * first piece, 2: its last)}, ordered by block and item; wait_for[nitems]: item i's first copy
 * waits until items [0, wait_for[i]) are done (their device bytes are overwritten).
 * The consumer takes items in order: lw_stager_next(i) waits until item i is copied-to-be and
 * makes consumer_ctx's stream wait for it; lw_stager_done(i) says the stream is done with it.
 * lw_stager_ready says whether next would return at once. On a failed read, next returns
 * LW_EIO; lw_stager_error gives {file, offset, bytes} of the read and the text.
 * lw_stager_finish stops the threads, waits for queued copies and frees the stager. */
LW_API lw_status lw_stager_start(void *copy_ctx, void *consumer_ctx, const int32_t *fds,
                                 uint32_t nfiles, const uint64_t *reads, size_t nreads,
                                 const uint64_t *pieces, size_t npieces,
                                 const uint64_t *wait_for, size_t nitems, uint64_t pinned,
                                 uint64_t slot_bytes, uint32_t slots, uint32_t readers,
                                 uint64_t *out_handle);
LW_API int32_t lw_stager_ready(void *stager, uint64_t item);
LW_API lw_status lw_stager_next(void *stager, uint64_t item);
LW_API lw_status lw_stager_done(void *stager, uint64_t item);
LW_API lw_status lw_stager_error(void *stager, uint64_t *out_where, char *text, size_t len);
/* out[0]: seconds the copy thread waited for reads; out[1]: for the consumer */
LW_API lw_status lw_stager_stats(void *stager, double *out);
LW_API lw_status lw_stager_finish(void *stager);
#endif

/* ---------------------------------------------------------------- multi-tensor kernels
 * (both backends; the device-source reload, src/reload/device_plan.ts). One launch covers many
 * kernel tensors. The work is described by tables in backend memory, every field a uint64:
 *   targets[t][LW_MT_TARGET_FIELDS] = {dst, scale, dst_pitch, rows, cols, piece0, npieces,
 *       item0, nitems, 0}: a rows x cols matrix at dst (dst_pitch elements between rows), its
 *       f32 scales at scale (0 for copies), filled row-wise by pieces [piece0, piece0+npieces)
 *       and worked on by items [item0, item0+nitems);
 *   pieces[p][LW_MT_PIECE_FIELDS] = {source, offset, pitch, row0, rows}: rows [row0, row0+rows)
 *       of its target come from bases[source] + offset bytes, pitch elements between rows,
 *       every column;
 *   items[i][LW_MT_ITEM_FIELDS] = {target, row0, rows, col0, cols}: one block of work.
 * bases[] holds the source addresses, so a plan serves any buffers of the same layout. The
 * pieces of a target cover each of its rows exactly once and share one source dtype. A launch
 * takes items [first, first+n) of the table (all items of each target it touches).
 * lw_mt_absmax: for per-tensor fp8, scale[0] of each target = max(absmax/448, 1/(448*512)),
 *   the absmax over all its pieces; partials[item] and counters[target] are work space (uint32;
 *   counters zero before and after each launch). With counters NULL it is a scan: only
 *   partials[item] is written, the largest magnitude bits of the item's source elements in the
 *   source dtype (at or above the dtype's infinity bits: the item holds a NaN or infinity), and
 *   no scale.
 * lw_mt_absmax_fold: scale[0] of each target whose first item is in [first, first+n), as
 *   lw_mt_absmax, from the partials a scan left of all its items.
 * lw_mt_quant: kind LW_MT_FP8_TENSOR reads scale[0]; LW_MT_FP8_ROW, LW_MT_INT8_ROW and
 *   LW_MT_FP8_BLOCK128 (items are 128x128 tiles) compute and write their scales as lw_quant_fp8
 *   and lw_quant_int8_row do; the quantized values go to dst (rows x cols, dst_pitch = cols).
 * lw_mt_copy: dst rows = convert(source rows) as lw_cast. The same bytes as the one-tensor
 * kernels on the same values. */
enum { LW_MT_TARGET_FIELDS = 10, LW_MT_PIECE_FIELDS = 5, LW_MT_ITEM_FIELDS = 5 };
enum { LW_MT_FP8_TENSOR = 0, LW_MT_FP8_ROW = 1, LW_MT_FP8_BLOCK128 = 2, LW_MT_INT8_ROW = 3 };
LW_API lw_status lw_mt_absmax(void *ctx, const uint64_t *targets, const uint64_t *pieces,
                              const uint64_t *items, size_t first, size_t n,
                              const uint64_t *bases, int32_t src_dtype, uint32_t *partials,
                              uint32_t *counters);
LW_API lw_status lw_mt_absmax_fold(void *ctx, const uint64_t *targets, const uint64_t *items,
                                   size_t first, size_t n, int32_t src_dtype,
                                   const uint32_t *partials);
LW_API lw_status lw_mt_quant(void *ctx, int32_t kind, const uint64_t *targets,
                             const uint64_t *pieces, const uint64_t *items, size_t first,
                             size_t n, const uint64_t *bases, int32_t src_dtype);
LW_API lw_status lw_mt_copy(void *ctx, const uint64_t *targets, const uint64_t *pieces,
                            const uint64_t *items, size_t first, size_t n, const uint64_t *bases,
                            int32_t src_dtype, int32_t dst_dtype);

#ifdef __cplusplus
}
#endif
#endif

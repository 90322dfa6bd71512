/**
 * The raw device layer, for callers that batch their own device calls: the FFI symbol tables
 * of the CUDA kernel library (cuda/layerwise.h) and of NCCL, their loaders, and
 * {@link CudaDevice}, which wraps one GPU (memory, pinned host buffers, streams, events,
 * asynchronous copies, the file stager), and CUDA IPC mappings ({@link cudaIpcMapper}).
 * Everything here is CUDA-only.
 *
 * @example Open the kernel library where a GPU is present
 * ```ts
 * import { CUDA_SYMBOLS, CudaDevice } from "@layerwise/reload/ffi";
 *
 * console.log(`${Object.keys(CUDA_SYMBOLS).length} symbols in the CUDA library`);
 * try {
 *   const gpu = CudaDevice.open(0);
 *   console.log(`${gpu.name}: ${gpu.totalBytes} bytes`);
 * } catch (e) {
 *   console.log(`no GPU here: ${(e as Error).message}`);
 * }
 * ```
 * @module
 */

export {
  CudaDevice,
  type PinnedBuffer,
  type StagerFailure,
  type StagerPlan,
} from "./src/backend/cuda/device.ts";
export {
  CUDA_SYMBOLS,
  type CudaLibrary,
  type CudaSymbols,
  loadCudaLibrary,
} from "./src/backend/cuda/cuda_ffi.ts";
export {
  loadNcclLibrary,
  NCCL_SYMBOLS,
  type NcclLibrary,
  type NcclSymbols,
} from "./src/backend/cuda/nccl_ffi.ts";
export type { Wide, WideFn, WideSymbols } from "./src/backend/cuda/ffi_types.ts";
// CUDA IPC: another process's device memory, as the weight-update server maps it
export { IPC_HANDLE_BYTES, type IpcMapper, type IpcMapping } from "./src/backend/ipc.ts";
export { cudaIpcMapper } from "./src/backend/cuda/ipc.ts";

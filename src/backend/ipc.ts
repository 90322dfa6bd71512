/**
 * A backend capability: mapping device memory of another process (CUDA IPC) and copying from
 * it into backend tensors, device to device. The server's IPC updates reach device memory only
 * through this interface, so tests can give it memory of their own.
 * @module
 */

import type { Tensor } from "../tensor/tensor.ts";

/** Bytes of a CUDA IPC memory handle (`cudaIpcMemHandle_t`). */
export const IPC_HANDLE_BYTES = 64;

/** Opens other processes' device memory on one backend; see the module doc. */
export interface IpcMapper {
  /** Maps the allocation behind a {@link IPC_HANDLE_BYTES}-byte handle; returns its address. */
  open(handle: Uint8Array): number;
  /** Unmaps an address {@link IpcMapper.open} returned. */
  close(address: number): void;
  /** Copies `dst.nbytes` bytes from `address` into the contiguous backend tensor `dst`. */
  copyIn(dst: Tensor, address: number): void;
  /** Returns once every copy queued so far has finished reading mapped memory. */
  synchronize(): void;
}

/**
 * A backend capability: mapping device memory of another process (CUDA IPC), which the
 * device-source reload then reads in place. The server's IPC updates reach device memory only
 * through this interface, so tests can give it memory of their own.
 * @module
 */

/** Bytes of a CUDA IPC memory handle (`cudaIpcMemHandle_t`). */
export const IPC_HANDLE_BYTES = 64;

/** A mapped allocation of another process. */
export interface IpcMapping {
  /** Its address in this process (a device pointer; a WebAssembly offset in tests). */
  readonly address: number;
  /** Bytes from `address` to the end of the allocation. */
  readonly bytes: number;
}

/** Opens other processes' device memory on one backend; see the module doc. */
export interface IpcMapper {
  /**
   * Maps the allocation behind a {@link IPC_HANDLE_BYTES}-byte handle; returns its address and
   * the bytes from it to the end of the allocation (reads past them must never be issued).
   */
  open(handle: Uint8Array): IpcMapping;
  /** Unmaps an address {@link IpcMapper.open} returned. */
  close(address: number): void;
  /** Returns once every copy queued so far has finished reading mapped memory. */
  synchronize(): void;
}

/**
 * The {@link IpcMapper} of a CUDA backend: `lw_ipc_open` / `lw_ipc_close` around
 * cudaIpcOpenMemHandle / cudaIpcCloseMemHandle; the device-source reload then reads the mapped
 * memory in place, so weights go from the trainer's memory into the model with no host copy.
 * @module
 */

import type { Backend } from "../backend.ts";
import { cudaHandle } from "./device.ts";
import { IPC_HANDLE_BYTES, type IpcMapper, type IpcMapping } from "../ipc.ts";
import { BackendError } from "../../errors.ts";

/** The IPC mapper of a backend from `openCudaBackend`; undefined for any other backend. */
export function cudaIpcMapper(backend: Backend): IpcMapper | undefined {
  const h = cudaHandle(backend);
  if (h === undefined) return undefined;
  const { device } = h;
  const s = device.symbols;
  const out = new BigUint64Array(1);
  const size = new BigUint64Array(1);
  return {
    open(handle: Uint8Array): IpcMapping {
      if (handle.byteLength !== IPC_HANDLE_BYTES) {
        throw new BackendError(
          "BAD_SIZE",
          `cudaIpcOpenMemHandle: a handle has ${IPC_HANDLE_BYTES} bytes, got ${handle.byteLength}`,
        );
      }
      device.check("cudaIpcOpenMemHandle", s.lw_ipc_open(device.device, handle, out, size));
      return { address: Number(out[0]), bytes: Number(size[0]) };
    },
    close(address: number): void {
      device.check("cudaIpcCloseMemHandle", s.lw_ipc_close(device.device, BigInt(address)));
    },
    synchronize(): void {
      backend.synchronize();
    },
  };
}

/**
 * A CUDA-IPC stand-in for tests on WebAssembly: "buckets" are byte arrays registered under
 * made-up 64-byte handles; opening a handle copies its bucket into WebAssembly memory outside
 * the backend's tensors (as a mapping of another process's memory would be), and copies out of
 * it go through the same IpcMapper interface the server uses on CUDA.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { IPC_HANDLE_BYTES, type IpcMapper } from "../backend/ipc.ts";
import { wasmView } from "../backend/wasm.ts";
import { DTYPES } from "../tensor/dtype.ts";
import { type Storage, Tensor } from "../tensor/tensor.ts";

/** A test IPC mapper plus what it did. */
export interface FakeIpc {
  /** The mapper to hand to the server. */
  readonly mapper: IpcMapper;
  /** Registers a bucket; returns its base64 handle. */
  addBucket(bytes: Uint8Array): string;
  /** Handles opened so far (with repeats), and closed. */
  readonly opened: string[];
  /** Handles closed so far. */
  readonly closed: string[];
  /** Mappings open now. */
  openCount(): number;
}

function b64(bytes: Uint8Array): string {
  return btoa(String.fromCharCode(...bytes));
}

/** A fake IPC mapper over `backend` (a WebAssembly backend). */
export function fakeIpc(backend: Backend): FakeIpc {
  const buckets = new Map<string, Uint8Array>();
  const live = new Map<number, { handle: string; storage: Storage }>();
  const opened: string[] = [];
  const closed: string[] = [];
  let next = 1;
  const mapper: IpcMapper = {
    open(handle) {
      if (handle.byteLength !== IPC_HANDLE_BYTES) throw new Error("fake ipc: bad handle length");
      const key = b64(handle);
      const data = buckets.get(key);
      if (data === undefined) throw new Error("fake ipc: invalid resource handle");
      const storage = backend.alloc(data.byteLength);
      wasmView(backend, new Tensor([data.byteLength], DTYPES.u8, storage)).set(data);
      live.set(storage.ptr, { handle: key, storage });
      opened.push(key);
      return { address: storage.ptr, bytes: data.byteLength };
    },
    close(address) {
      const m = live.get(address);
      if (m === undefined) throw new Error("fake ipc: close of an address not open");
      live.delete(address);
      closed.push(m.handle);
      backend.free(m.storage);
    },
    synchronize() {},
  };
  return {
    mapper,
    opened,
    closed,
    openCount: () => live.size,
    addBucket(bytes) {
      const handle = new Uint8Array(IPC_HANDLE_BYTES);
      new DataView(handle.buffer).setUint32(0, next++, true);
      handle.set(new TextEncoder().encode("fake-ipc"), 8);
      const key = b64(handle);
      buckets.set(key, bytes);
      return key;
    },
  };
}

/**
 * An NCCL stand-in for tests on WebAssembly: the "trainer" queues the bytes of the buckets it
 * would broadcast, and the server's receiver writes each into WebAssembly memory at the address
 * it receives into, through the same NcclJoiner / NcclReceiver interfaces the server uses on
 * CUDA. Receiving when nothing was queued fails (where NCCL would wait forever).
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import { NCCL_UNIQUE_ID_BYTES, type NcclJoiner } from "../backend/nccl_receiver.ts";
import { wasmView } from "../backend/wasm.ts";
import { DTYPES } from "../tensor/dtype.ts";
import { Tensor } from "../tensor/tensor.ts";

/** One receive the server queued. */
export interface FakeReceive {
  /** Bytes received. */
  readonly bytes: number;
  /** The root rank it was received from. */
  readonly root: number;
}

/** A test NCCL plus what it did. */
export interface FakeNccl {
  /** The joiner to hand to the server. */
  readonly joiner: NcclJoiner;
  /** A new unique id (base64) the joiner accepts. */
  uniqueId(): string;
  /** Queues the bytes of the next bucket the trainer broadcasts. */
  broadcast(bucket: Uint8Array): void;
  /** Buckets queued and not yet received. */
  pending(): number;
  /** Receives so far. */
  readonly received: FakeReceive[];
  /** Joins so far (rank, world size). */
  readonly joins: { rank: number; worldSize: number }[];
  /** Receivers closed so far. */
  closed(): number;
}

function b64(bytes: Uint8Array): string {
  return btoa(String.fromCharCode(...bytes));
}

/** A fake NCCL over `backend` (a WebAssembly backend). */
export function fakeNccl(backend: Backend): FakeNccl {
  const ids = new Set<string>();
  const queue: Uint8Array[] = [];
  const received: FakeReceive[] = [];
  const joins: { rank: number; worldSize: number }[] = [];
  let closed = 0;
  let next = 1;
  const joiner: NcclJoiner = {
    join(uniqueId, worldSize, rank) {
      if (uniqueId.byteLength !== NCCL_UNIQUE_ID_BYTES || !ids.has(b64(uniqueId))) {
        return Promise.reject(new Error("fake nccl: invalid unique id"));
      }
      joins.push({ rank, worldSize });
      let open = true;
      return Promise.resolve({
        rank,
        worldSize,
        receive(dst: number, bytes: number, root: number): number {
          if (!open) throw new Error("fake nccl: the communicator is closed");
          const data = queue.shift();
          if (data === undefined) throw new Error("fake nccl: nothing was broadcast");
          if (data.byteLength !== bytes) {
            throw new Error(`fake nccl: ${data.byteLength} bytes broadcast, ${bytes} received`);
          }
          if (bytes > 0) {
            const storage = backend.borrow(dst, bytes);
            try {
              wasmView(backend, new Tensor([bytes], DTYPES.u8, storage)).set(data);
            } finally {
              backend.free(storage);
            }
          }
          received.push({ bytes, root });
          return received.length - 1;
        },
        waitFor() {},
        synchronize() {},
        close() {
          if (open) closed++;
          open = false;
        },
      });
    },
  };
  return {
    joiner,
    received,
    joins,
    closed: () => closed,
    pending: () => queue.length,
    broadcast: (bucket) => void queue.push(bucket),
    uniqueId() {
      const id = new Uint8Array(NCCL_UNIQUE_ID_BYTES);
      new DataView(id.buffer).setUint32(0, next++, true);
      id.set(new TextEncoder().encode("fake-nccl"), 8);
      const s = b64(id);
      ids.add(s);
      return s;
    },
  };
}

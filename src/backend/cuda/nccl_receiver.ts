/**
 * The CUDA {@link NcclJoiner}: this process's rank joins a trainer's communicator
 * (`ncclCommInitRank`) on the GPU of a CUDA backend and receives broadcasts on a stream of its
 * own. Streams order through events: a receive starts once the backend's stream is done with
 * the work queued before it (the bucket it overwrites may still be read), and the backend's
 * stream waits for an arrival only where {@link NcclReceiver.waitFor} says, so receiving the
 * next bucket overlaps the reload of the last (ARCHITECTURE.md, device reloads).
 * @module
 */

import type { Backend } from "../backend.ts";
import { BackendError } from "../../errors.ts";
import { NCCL_UNIQUE_ID_BYTES, type NcclJoiner, type NcclReceiver } from "../nccl_receiver.ts";
import { type CudaDevice, cudaHandle } from "./device.ts";
import { errorString } from "./nccl.ts";
import { loadNcclLibrary, NCCL_UINT8, type NcclSymbols } from "./nccl_ffi.ts";

/** The joiner of a CUDA backend; undefined for other backends. */
export function cudaNcclJoiner(backend: Backend): NcclJoiner | undefined {
  const h = cudaHandle(backend);
  if (h === undefined) return undefined;
  return {
    join(uniqueId, worldSize, rank) {
      try {
        if (uniqueId.byteLength !== NCCL_UNIQUE_ID_BYTES) {
          throw new BackendError("NCCL", `an ncclUniqueId has ${NCCL_UNIQUE_ID_BYTES} bytes`);
        }
        const s = loadNcclLibrary().symbols;
        const dev = h.device;
        // Creating the stream makes the backend's GPU current on this thread, where
        // ncclCommInitRank (which blocks until every rank joined) binds the communicator.
        const ctx = dev.createContext();
        const out = new BigUint64Array(1);
        const st = s.ncclCommInitRank(out, worldSize, uniqueId.slice(), rank);
        if (st !== 0) {
          dev.destroyContext(ctx);
          throw new BackendError(
            "NCCL",
            `ncclCommInitRank(rank ${rank} of ${worldSize}): ${errorString(s, st, 0)}`,
          );
        }
        return Promise.resolve(
          new CudaNcclReceiver(s, Number(out[0]), dev, h.ctx, ctx, rank, worldSize),
        );
      } catch (e) {
        return Promise.reject(e);
      }
    },
  };
}

class CudaNcclReceiver implements NcclReceiver {
  readonly rank: number;
  readonly worldSize: number;
  readonly #s: NcclSymbols;
  readonly #dev: CudaDevice;
  readonly #modelCtx: number;
  readonly #ctx: number;
  #comm: number;
  #events: number[] = [];
  #arrivals: number[] = [];

  constructor(
    s: NcclSymbols,
    comm: number,
    dev: CudaDevice,
    modelCtx: number,
    ctx: number,
    rank: number,
    worldSize: number,
  ) {
    this.#s = s;
    this.#comm = comm;
    this.#dev = dev;
    this.#modelCtx = modelCtx;
    this.#ctx = ctx;
    this.rank = rank;
    this.worldSize = worldSize;
  }

  #event(): number {
    const e = this.#dev.createSyncEvent();
    this.#events.push(e);
    return e;
  }

  receive(dst: number, bytes: number, root: number): number {
    if (this.#comm === 0) throw new BackendError("NCCL", "the communicator is closed");
    const before = this.#event();
    this.#dev.record(before, this.#modelCtx);
    this.#dev.wait(this.#ctx, before);
    if (bytes > 0) {
      const st = this.#s.ncclBroadcast(
        dst,
        dst,
        bytes,
        NCCL_UINT8,
        root,
        this.#comm,
        this.#dev.stream(this.#ctx),
      );
      if (st !== 0) {
        throw new BackendError(
          "NCCL",
          `ncclBroadcast (root ${root}): ${errorString(this.#s, st, this.#comm)}`,
        );
      }
    }
    const after = this.#event();
    this.#dev.record(after, this.#ctx);
    this.#arrivals.push(after);
    return this.#arrivals.length - 1;
  }

  waitFor(id: number): void {
    this.#dev.wait(this.#modelCtx, this.#arrivals[id]);
  }

  synchronize(): void {
    try {
      this.#dev.sync(this.#ctx);
      const out = new Int32Array(1);
      const st = this.#s.ncclCommGetAsyncError(this.#comm, out);
      if (st !== 0 || out[0] !== 0) {
        throw new BackendError(
          "NCCL",
          `communicator: ${errorString(this.#s, st || out[0], this.#comm)}`,
        );
      }
    } finally {
      for (const e of this.#events) this.#dev.destroyEvent(e);
      this.#events = [];
      this.#arrivals = [];
    }
  }

  close(): void {
    const comm = this.#comm;
    if (comm === 0) return;
    this.#comm = 0;
    // Abort rather than destroy, and before waiting for the stream: a receive whose peer is
    // gone must not hang the server's stop.
    const st = this.#s.ncclCommAbort(comm);
    try {
      this.#dev.sync(this.#ctx);
    } finally {
      for (const e of this.#events) this.#dev.destroyEvent(e);
      this.#events = [];
      this.#arrivals = [];
      this.#dev.destroyContext(this.#ctx);
    }
    if (st !== 0) throw new BackendError("NCCL", `ncclCommAbort: ${errorString(this.#s, st, 0)}`);
  }
}

/**
 * NCCL communicators for one process that drives every GPU of the host: `ncclCommInitAll`
 * gives one communicator per device (rank r = `devices[r]`), and collectives for all ranks are
 * issued from this thread inside one NCCL group. Work goes on CUDA streams of layerwise
 * contexts (`CudaDevice.stream(ctx)`).
 *
 * NVLink SHARP / multicast (NVLS) is not used by layerwise; on machines whose rules forbid it,
 * run with `NCCL_NVLS_ENABLE=0` in the environment.
 * @module
 */

import { BackendError } from "../../errors.ts";
import {
  loadNcclLibrary,
  NCCL_UINT8,
  type NcclLibrary,
  type NcclSymbols,
  ncclVersionString,
} from "./nccl_ffi.ts";

/** One broadcast of a rank: its buffer and the stream to queue on. */
export interface BroadcastPart {
  /** Device address: the source on the root rank, the destination on the others. */
  readonly ptr: number;
  /** The `cudaStream_t` to queue on (see `CudaDevice.stream`). */
  readonly stream: number;
}

/** Communicators for the local GPUs, one per rank, from `ncclCommInitAll`. */
export class NcclComms {
  /** Device ordinal of each rank. */
  readonly devices: readonly number[];
  /** The library in use. */
  readonly library: NcclLibrary;
  readonly #s: NcclSymbols;
  #comms: number[];

  private constructor(lib: NcclLibrary, devices: readonly number[], comms: number[]) {
    this.library = lib;
    this.#s = lib.symbols;
    this.devices = Object.freeze([...devices]);
    this.#comms = comms;
  }

  /**
   * Creates one communicator per device of `devices` (rank r on `devices[r]`), all in this
   * process. Throws BackendError `NCCL_UNAVAILABLE` when NCCL does not load, `NCCL` when it
   * fails (e.g. the same device twice).
   */
  static initAll(devices: readonly number[]): NcclComms {
    if (devices.length === 0 || devices.some((d) => !Number.isInteger(d) || d < 0)) {
      throw new BackendError("BAD_DEVICE", `invalid device list [${devices.join(", ")}]`);
    }
    const lib = loadNcclLibrary();
    const out = new BigUint64Array(devices.length);
    const list = new Int32Array(devices);
    const st = lib.symbols.ncclCommInitAll(out, devices.length, list);
    if (st !== 0) {
      throw new BackendError(
        "NCCL",
        `ncclCommInitAll([${devices.join(", ")}]): ${errorString(lib.symbols, st, 0)}`,
      );
    }
    return new NcclComms(lib, devices, [...out].map(Number));
  }

  /** Number of ranks. */
  get size(): number {
    return this.devices.length;
  }

  /** NCCL's version, e.g. `2.27.7`. */
  get version(): string {
    return ncclVersionString(this.library.version);
  }

  #check(op: string, st: number, comm = 0): void {
    if (st !== 0) {
      throw new BackendError("NCCL", `${op}: ${errorString(this.#s, st, comm)}`);
    }
  }

  #open(): void {
    if (this.#comms.length === 0) throw new BackendError("NCCL", "the communicators are destroyed");
  }

  /**
   * Queues a broadcast of `bytes` from rank `root` to every rank, one part per rank (rank r's
   * buffer and stream), inside one NCCL group. In place on the root (its buffer is the source).
   * Returns once queued; each rank's stream orders the rest.
   */
  broadcast(parts: readonly BroadcastPart[], bytes: number, root: number): void {
    this.#open();
    if (parts.length !== this.size) {
      throw new BackendError("NCCL", `broadcast: ${parts.length} parts for ${this.size} ranks`);
    }
    if (!Number.isInteger(root) || root < 0 || root >= this.size) {
      throw new BackendError("NCCL", `broadcast: root ${root} is not a rank`);
    }
    if (bytes === 0) return;
    this.#check("ncclGroupStart", this.#s.ncclGroupStart());
    let first: unknown;
    for (let r = 0; r < this.size; r++) {
      const p = parts[r];
      // Non-root ranks ignore sendbuff; their own buffer keeps NCCL's pointer checks quiet.
      const send = p.ptr;
      const st = this.#s.ncclBroadcast(
        send,
        p.ptr,
        bytes,
        NCCL_UINT8,
        root,
        this.#comms[r],
        p.stream,
      );
      if (st !== 0 && first === undefined) {
        first = new BackendError(
          "NCCL",
          `ncclBroadcast (rank ${r}): ${errorString(this.#s, st, this.#comms[r])}`,
        );
      }
    }
    const end = this.#s.ncclGroupEnd();
    if (first) throw first;
    this.#check("ncclGroupEnd", end);
  }

  /** Throws when a communicator reports an asynchronous error (e.g. a failed peer). */
  checkAsync(): void {
    this.#open();
    const out = new Int32Array(1);
    for (let r = 0; r < this.size; r++) {
      this.#check("ncclCommGetAsyncError", this.#s.ncclCommGetAsyncError(this.#comms[r], out));
      this.#check(`rank ${r}`, out[0], this.#comms[r]);
    }
  }

  /** Destroys the communicators (after their work is done). Idempotent. */
  destroy(): void {
    const comms = this.#comms;
    this.#comms = [];
    let first: unknown;
    for (const c of comms) {
      const st = this.#s.ncclCommDestroy(c);
      if (st !== 0 && first === undefined) {
        first = new BackendError("NCCL", `ncclCommDestroy: ${errorString(this.#s, st, 0)}`);
      }
    }
    if (first) throw first;
  }
}

function cString(p: Deno.PointerValue): string {
  return p === null ? "" : Deno.UnsafePointerView.getCString(p);
}

function errorString(s: NcclSymbols, status: number, comm: number): string {
  const base = `${cString(s.ncclGetErrorString(status))} (ncclResult ${status})`;
  const last = s.ncclGetLastError ? cString(s.ncclGetLastError(comm)) : "";
  return last ? `${base}: ${last}` : base;
}

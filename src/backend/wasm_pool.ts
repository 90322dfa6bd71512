/**
 * The threads of the WebAssembly backend: N - 1 workers, each with its own instance of the
 * kernels module on the one shared memory, plus the calling thread. A call hands each worker
 * its arguments through a slot of a small shared control block, wakes it, runs the caller's own
 * part, then waits for every worker: the Backend API stays synchronous (ARCHITECTURE.md,
 * "WebAssembly threads").
 *
 * Workers come from `node:worker_threads` because its workers can be unref'd: one parked in
 * `Atomics.wait` then never keeps the process alive, so a backend that is never closed does not
 * hang the program at exit.
 * @module
 */

import { Worker } from "node:worker_threads";
import { BackendError } from "../errors.ts";
import type { NumberFn, WasmSignature } from "./wasm_abi.ts";
import type { ThreadRunner } from "./wasm_split.ts";

/** Layout of one worker's slot in the control block, in 32-bit words. */
export const SLOT = {
  /** Words per slot. */
  INTS: 64,
  /** Raised by the caller to start a call (-1: stop). */
  SEQ: 0,
  /** Set to SEQ by the worker when the call is done. */
  DONE: 1,
  /** The kernel's status. */
  STATUS: 2,
  /** Index of the kernel in the name list. */
  FN: 3,
  /** Number of arguments. */
  ARGC: 4,
  /** Arguments, as f64 (offsets and sizes are below 2^53), from this word. */
  ARGS: 8,
  /** Most arguments of one call. */
  MAX_ARGS: 12,
  /** A trap's text, from this word. */
  TEXT: 32,
  /** Bytes of trap text. */
  TEXT_BYTES: 128,
  /** Status of a call that trapped. */
  TRAPPED: -1,
  /**
   * Word 0 of slot 0 (the caller's, otherwise unused): polls of a word before a thread parks in
   * Atomics.wait for it, the worker between calls and the caller for the workers' parts of a
   * call (see {@link spinPolls}).
   */
  SPINS: 0,
} as const;

/** What a worker is started with (structured-cloned into it). */
export interface WorkerInit {
  /** The compiled kernels module. */
  module: WebAssembly.Module;
  /** The backend's shared memory. */
  memory: WebAssembly.Memory;
  /** Export signatures of the module. */
  signatures: Map<string, WasmSignature>;
  /** Kernel names; a call names its kernel by index in this list. */
  names: string[];
  /** The control block. */
  control: SharedArrayBuffer;
  /** This worker's slot (1..N-1; 0 is the caller's and unused). */
  index: number;
  /** The top of this worker's stack in the shared memory. */
  stackTop: number;
}

/**
 * Bytes of stack each worker gets in the shared memory: as much as the calling thread's (the
 * build's `-z stack-size`), which the fp8 quantization table (64 KiB) needs.
 */
export const WORKER_STACK_BYTES = 256 * 1024;

/** The pool: the calling thread's kernels plus N - 1 workers. */
export class WasmPool implements ThreadRunner {
  readonly #ctl: Int32Array;
  readonly #args: Float64Array;
  readonly #workers: Worker[];
  readonly #names: Map<string, number>;
  readonly #local: Record<string, NumberFn>;
  readonly #memory: WebAssembly.Memory;
  #seq = 0;
  #closed = false;

  private constructor(
    local: Record<string, NumberFn>,
    memory: WebAssembly.Memory,
    control: SharedArrayBuffer,
    workers: Worker[],
    names: string[],
    readonly partials: number,
  ) {
    this.#local = local;
    this.#memory = memory;
    this.#ctl = new Int32Array(control);
    this.#args = new Float64Array(control);
    this.#workers = workers;
    this.#names = new Map(names.map((n, i) => [n, i]));
  }

  /**
   * Starts `threads - 1` workers on `memory`. `stacks[i]` is worker i+1's stack top; `partials`
   * is 16 bytes per thread, plus 16, of scratch for reductions.
   */
  static async start(
    threads: number,
    init: Omit<WorkerInit, "control" | "index" | "stackTop" | "names">,
    local: Record<string, NumberFn>,
    stacks: number[],
    partials: number,
  ): Promise<WasmPool> {
    const names = [...init.signatures.keys()].sort();
    const control = new SharedArrayBuffer(threads * SLOT.INTS * 4);
    new Int32Array(control)[SLOT.SPINS] = spinPolls();
    const workers: Worker[] = [];
    try {
      // Started together: each compiles nothing (the module is shared) but loads its script.
      const ready: Promise<void>[] = [];
      for (let i = 1; i < threads; i++) {
        const data: WorkerInit = { ...init, names, control, index: i, stackTop: stacks[i - 1] };
        const w = new Worker(new URL("./wasm_worker.ts", import.meta.url), { workerData: data });
        workers.push(w);
        ready.push(
          new Promise<void>((resolve, reject) => {
            w.once("message", () => resolve());
            w.once("error", reject);
            w.once("exit", (code) => reject(new Error(`exited with code ${code}`)));
          }),
        );
      }
      await Promise.all(ready);
      for (const w of workers) {
        w.removeAllListeners();
        w.unref();
      }
    } catch (e) {
      stop(new Int32Array(control), workers);
      throw new BackendError(
        "WASM_THREADS",
        `wasm: could not start ${threads - 1} worker threads: ${
          e instanceof Error ? e.message : String(e)
        }`,
      );
    }
    return new WasmPool(local, init.memory, control, workers, names, partials);
  }

  /** Threads, the caller's included. */
  get threads(): number {
    return this.#workers.length + 1;
  }

  call(fn: string, args: number[]): number {
    return this.#local[fn](...args);
  }

  view(): DataView {
    return new DataView(this.#memory.buffer);
  }

  run(fn: string, calls: number[][]): number {
    if (this.#closed) throw new BackendError("CLOSED", "the wasm backend is closed");
    if (calls.length > this.threads) {
      throw new RangeError(`${calls.length} calls for ${this.threads} threads`);
    }
    const index = this.#names.get(fn)!;
    const seq = ++this.#seq;
    const ctl = this.#ctl;
    for (let w = 1; w < calls.length; w++) {
      const base = w * SLOT.INTS;
      const args = calls[w];
      ctl[base + SLOT.FN] = index;
      ctl[base + SLOT.ARGC] = args.length;
      this.#args.set(args, (base + SLOT.ARGS) / 2);
      Atomics.store(ctl, base + SLOT.SEQ, seq);
      Atomics.notify(ctl, base + SLOT.SEQ);
    }
    let status = this.#local[fn](...calls[0]);
    for (let w = 1; w < calls.length; w++) {
      const base = w * SLOT.INTS;
      const spins = ctl[SLOT.SPINS];
      for (let i = 0; i < spins && Atomics.load(ctl, base + SLOT.DONE) !== seq; i++);
      for (;;) {
        const done = Atomics.load(ctl, base + SLOT.DONE);
        if (done === seq) break;
        Atomics.wait(ctl, base + SLOT.DONE, done);
      }
      const st = ctl[base + SLOT.STATUS];
      if (st === SLOT.TRAPPED) {
        const t = (base + SLOT.TEXT) * 4;
        const bytes = new Uint8Array(ctl.buffer).slice(t, t + SLOT.TEXT_BYTES);
        const end = bytes.indexOf(0);
        const text = new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end));
        throw new BackendError("WASM_TRAP", `wasm ${fn} on worker thread ${w}: ${text}`);
      }
      if (status === 0) status = st;
    }
    return status;
  }

  /** Stops the workers (they leave their wait and end). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    stop(this.#ctl, this.#workers);
  }
}

/**
 * Polls before parking: waking a parked thread costs tens of microseconds per call, which
 * bounds how well short kernels scale on many cores; but a polling thread holds a core, which
 * on a small machine the other threads (readers, the caller) need: a 512 KiB copy on 2 threads
 * of a loaded 2-core machine went from 31 us to 300 us with polling. So 20000 polls (tens of
 * microseconds) from 8 cores up, none below; `LAYERWISE_WASM_SPINS` overrides.
 */
export function spinPolls(): number {
  let v: string | undefined;
  try {
    v = Deno.env.get("LAYERWISE_WASM_SPINS");
  } catch {
    // No env permission: the cores decide.
  }
  const n = Number(v);
  if (v !== undefined && v !== "" && Number.isInteger(n) && n >= 0) return Math.min(n, 1e7);
  return (navigator.hardwareConcurrency || 1) >= 8 ? 20000 : 0;
}

function stop(ctl: Int32Array, workers: Worker[]): void {
  for (let w = 1; w <= workers.length; w++) {
    Atomics.store(ctl, w * SLOT.INTS + SLOT.SEQ, -1);
    Atomics.notify(ctl, w * SLOT.INTS + SLOT.SEQ);
  }
}

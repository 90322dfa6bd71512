/**
 * The threads of the WebAssembly backend: N - 1 workers, each with its own instance of the
 * kernels module on the one shared memory, plus the calling thread. A call writes its parts'
 * arguments into a small shared control block and wakes the workers; every thread, the caller
 * included, takes parts until none is left, and the caller returns when all are done: the
 * Backend API stays synchronous (ARCHITECTURE.md, "WebAssembly threads").
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

/**
 * Layout of the control block, in 32-bit words: one call at a time, its parts in a table that
 * every thread takes parts from (the caller too), so a thread that is slow to wake or loses its
 * core to another (a reader thread, another process) holds up only the part it took.
 *
 * The words every thread writes once per part (NEXT, DONE) sit 64 bytes from each other and from
 * the words that waiting threads poll (SEQ) and that a call only sets up (the first 16): on one
 * cache line, every part's compare-exchange would take the line from the threads polling it. On
 * 16 cores the difference was within the noise (BENCHMARKS.md, 2026-12-02, third session).
 */
export const CONTROL = {
  /** Raised by the caller to wake the workers (-1: stop). */
  SEQ: 0,
  /** The call's generation << 16 | its number of parts. */
  PARTS: 1,
  /** The first non-zero status of a part (TRAPPED for a trap). */
  STATUS: 4,
  /** Index of the kernel in the name list. */
  FN: 5,
  /** Number of arguments of each part. */
  ARGC: 6,
  /** Raised by the thread whose trap text is kept (the first). */
  TRAP: 7,
  /**
   * Polls of a word before a thread parks in Atomics.wait for it: a worker between calls, the
   * caller for the other threads' parts of a call (see {@link spinPolls}).
   */
  SPINS: 12,
  /** A trap's text, from this word. */
  TEXT: 16,
  /** Bytes of trap text. */
  TEXT_BYTES: 128,
  /** The call's generation << 16 | index of the next part to take (compare-exchanged). */
  NEXT: 48,
  /** Parts finished. */
  DONE: 64,
  /** Words before the argument table (the table is f64, so this is even). */
  HEAD: 80,
  /** Arguments per part, as f64 (offsets and sizes are below 2^53). */
  MAX_ARGS: 12,
  /** Status of a part that trapped. */
  TRAPPED: -1,
} as const;

/** Parts one call may have, per thread: calls are cut finer than one part per thread. */
export const PARTS_PER_THREAD = 4;

/**
 * Takes the parts of the current call one at a time and runs each with `call(fn, args)`, until
 * none is left; what every thread of the pool runs when woken (the caller too, during a call).
 * A trap is caught and recorded (status TRAPPED, the first trap's text in the block), so every
 * part is counted done and the caller never returns while a part still runs.
 */
export function runParts(
  ctl: Int32Array,
  args: Float64Array,
  call: (fn: number, args: number[]) => number,
): void {
  for (;;) {
    const w = Atomics.load(ctl, CONTROL.NEXT);
    const p = Atomics.load(ctl, CONTROL.PARTS);
    // Another generation: the caller is writing the next call's table, or this thread woke late
    // for a call that is over. Either way nothing here is ours to take.
    if (w >>> 16 !== p >>> 16) return;
    if ((w & 0xFFFF) >= (p & 0xFFFF)) return;
    if (Atomics.compareExchange(ctl, CONTROL.NEXT, w, w + 1) !== w) continue;
    // Read again now that a part is held (the call cannot end before it is done): a thread
    // that slept between its loads and its exchange while the generation came round (2^15 calls)
    // could hold an index past this call's parts; it then has nothing to run.
    const k = w & 0xFFFF, now = Atomics.load(ctl, CONTROL.PARTS);
    if (now >>> 16 !== w >>> 16 || k >= (now & 0xFFFF)) continue;
    const parts = now & 0xFFFF;
    let status: number;
    try {
      const argc = ctl[CONTROL.ARGC];
      const at = CONTROL.HEAD / 2 + k * CONTROL.MAX_ARGS;
      const a: number[] = new Array(argc);
      for (let i = 0; i < argc; i++) a[i] = args[at + i];
      status = call(ctl[CONTROL.FN], a);
    } catch (e) {
      // A trap: the first thread's text goes through the block, the caller throws it.
      if (Atomics.compareExchange(ctl, CONTROL.TRAP, 0, 1) === 0) {
        const msg = new TextEncoder().encode(String(e).slice(0, CONTROL.TEXT_BYTES - 1));
        const text = new Uint8Array(ctl.buffer, CONTROL.TEXT * 4, CONTROL.TEXT_BYTES);
        text.fill(0);
        text.set(msg);
      }
      status = CONTROL.TRAPPED;
    }
    if (status !== 0) Atomics.compareExchange(ctl, CONTROL.STATUS, 0, status);
    if (Atomics.add(ctl, CONTROL.DONE, 1) + 1 === parts) Atomics.notify(ctl, CONTROL.DONE);
  }
}

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
  /** The control block (see {@link CONTROL}). */
  control: SharedArrayBuffer;
  /** This worker's number (1..N-1; 0 is the caller). */
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
  readonly #byIndex: NumberFn[];
  readonly #local: Record<string, NumberFn>;
  readonly #memory: WebAssembly.Memory;
  /** Most parts of one call. */
  readonly maxParts: number;
  #seq = 0;
  #generation = 0;
  #closed = false;

  private constructor(
    local: Record<string, NumberFn>,
    memory: WebAssembly.Memory,
    control: SharedArrayBuffer,
    workers: Worker[],
    names: string[],
    readonly partials: number,
    readonly table: number,
  ) {
    this.#local = local;
    this.#memory = memory;
    this.#ctl = new Int32Array(control);
    this.#args = new Float64Array(control);
    this.#workers = workers;
    this.#names = new Map(names.map((n, i) => [n, i]));
    this.#byIndex = names.map((n) => local[n]);
    this.maxParts = maxParts(workers.length + 1);
  }

  /**
   * Starts `threads - 1` workers on `memory`. `stacks[i]` is worker i+1's stack top; `partials`
   * is 16 bytes per part ({@link maxParts}), plus 16, of scratch for reductions; `table` is
   * lw_wasm_fp8_tensor_bytes() bytes (64-byte aligned) for a split per-tensor quantization.
   */
  static async start(
    threads: number,
    init: Omit<WorkerInit, "control" | "index" | "stackTop" | "names">,
    local: Record<string, NumberFn>,
    stacks: number[],
    partials: number,
    table: number,
  ): Promise<WasmPool> {
    const names = [...init.signatures.keys()].sort();
    const control = new SharedArrayBuffer(
      4 * CONTROL.HEAD + 8 * CONTROL.MAX_ARGS * maxParts(threads),
    );
    new Int32Array(control)[CONTROL.SPINS] = spinPolls();
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
      stop(new Int32Array(control));
      throw new BackendError(
        "WASM_THREADS",
        `wasm: could not start ${threads - 1} worker threads: ${
          e instanceof Error ? e.message : String(e)
        }`,
      );
    }
    return new WasmPool(local, init.memory, control, workers, names, partials, table);
  }

  /** Polls of a word before a thread parks (see {@link spinPolls}). */
  get spins(): number {
    return this.#ctl[CONTROL.SPINS];
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
    const n = calls.length;
    if (n > this.maxParts) throw new RangeError(`${n} parts, at most ${this.maxParts}`);
    if (n === 0) return 0;
    const ctl = this.#ctl;
    const gen = this.#generation = (this.#generation + 1) & 0x7FFF;
    ctl[CONTROL.FN] = this.#names.get(fn)!;
    ctl[CONTROL.ARGC] = calls[0].length;
    for (let k = 0; k < n; k++) {
      this.#args.set(calls[k], CONTROL.HEAD / 2 + k * CONTROL.MAX_ARGS);
    }
    Atomics.store(ctl, CONTROL.DONE, 0);
    Atomics.store(ctl, CONTROL.STATUS, 0);
    Atomics.store(ctl, CONTROL.TRAP, 0);
    Atomics.store(ctl, CONTROL.PARTS, (gen << 16) | n);
    // Last: a thread takes parts only once NEXT and PARTS name the same generation.
    Atomics.store(ctl, CONTROL.NEXT, gen << 16);
    const woken = Math.min(this.#workers.length, n - 1);
    if (woken > 0) {
      Atomics.store(ctl, CONTROL.SEQ, ++this.#seq);
      Atomics.notify(ctl, CONTROL.SEQ, woken);
    }
    runParts(ctl, this.#args, (f, a) => this.#byIndex[f](...a));
    const spins = ctl[CONTROL.SPINS];
    for (let i = 0; i < spins && Atomics.load(ctl, CONTROL.DONE) !== n; i++);
    for (;;) {
      const done = Atomics.load(ctl, CONTROL.DONE);
      if (done === n) break;
      Atomics.wait(ctl, CONTROL.DONE, done);
    }
    const status = ctl[CONTROL.STATUS];
    if (status === CONTROL.TRAPPED) {
      const bytes = new Uint8Array(ctl.buffer).slice(
        CONTROL.TEXT * 4,
        CONTROL.TEXT * 4 + CONTROL.TEXT_BYTES,
      );
      const end = bytes.indexOf(0);
      const text = new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end));
      throw new BackendError("WASM_TRAP", `wasm ${fn} on ${this.threads} threads: ${text}`);
    }
    return status;
  }

  /** Stops the workers (they leave their wait and end). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    stop(this.#ctl);
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

/** Parts one call may have on `threads` threads. */
export function maxParts(threads: number): number {
  return threads * PARTS_PER_THREAD;
}

function stop(ctl: Int32Array): void {
  Atomics.store(ctl, CONTROL.SEQ, -1);
  Atomics.notify(ctl, CONTROL.SEQ);
}

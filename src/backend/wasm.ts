/**
 * The WebAssembly backend: tensors live in one shared 64-bit memory (memory64, up to 16 GiB)
 * that the kernels module (wasm/kernels.c, embedded in wasm/kernels_wasm.ts) is instantiated on
 * by the calling thread and by N - 1 worker threads, so the package runs anywhere Deno runs,
 * with no build step and no native library, and a kernel runs on every core. A pointer is an
 * offset into that memory, stable across growth; being shared, the memory's buffer is never
 * detached by growth either: a view made before growth keeps its bytes and length.
 *
 * Threads: `threads` option, else `LAYERWISE_WASM_THREADS`, else the cores Deno reports; 1
 * runs everything on the calling thread. Calls on small tensors stay on the calling thread.
 * Results are bit-identical whatever the thread count (src/backend/wasm_split.ts).
 *
 * ```ts
 * import { openWasmBackend } from "./wasm.ts";
 * import { DTYPES } from "../tensor/dtype.ts";
 * const b = await openWasmBackend({ threads: 2 });
 * const t = b.empty([2], DTYPES.f32);
 * b.upload(t, new Uint8Array(new Float32Array([1, -3]).buffer));
 * console.log(b.absmax(t)); // 3
 * b.close();
 * ```
 * @module
 */

import { BackendError } from "../errors.ts";
import { quoteName } from "../messages.ts";
import type { Tensor } from "../tensor/tensor.ts";
import { kernelsWasmBytes } from "../../wasm/kernels_wasm.ts";
import type { Backend } from "./backend.ts";
import { type KernelAbi, KernelBackend, type MultiTensorAbi, type RawDevice } from "./kernels.ts";
import {
  growMemory64,
  instantiateKernels,
  numberExports,
  type NumberFn,
  readModuleInfo,
  sharedMemory64,
  wasmGlobals,
  type WasmModuleInfo,
} from "./wasm_abi.ts";
import { WasmHeap } from "./wasm_heap.ts";
import { maxParts, PARTS_PER_THREAD, WasmPool, WORKER_STACK_BYTES } from "./wasm_pool.ts";
import { splitKernels, splitMultiTensor } from "./wasm_split.ts";

/** The most memory V8 lets a memory64 hold (the module is built with this maximum). */
export const WASM_MAX_MEMORY_BYTES: number = 16 * 1024 ** 3;

/** A call is split across threads only into parts of at least this many input bytes. */
export const WASM_MIN_BYTES_PER_THREAD: number = 256 * 1024;

/** Options of {@link openWasmBackend}. */
export interface WasmBackendOptions {
  /**
   * Threads that run kernels, the caller's included (default: `LAYERWISE_WASM_THREADS`, else
   * `navigator.hardwareConcurrency`). 1 runs every kernel on the calling thread.
   */
  threads?: number;
  /**
   * The memory maximum in bytes (default: the host's memory, at most
   * {@link WASM_MAX_MEMORY_BYTES}). Allocations past it are `OUT_OF_MEMORY`.
   */
  maxMemoryBytes?: number;
  /** Split calls only into parts of at least this many bytes (default {@link WASM_MIN_BYTES_PER_THREAD}). */
  minBytesPerThread?: number;
}

let compiled: Promise<{ module: WebAssembly.Module; info: WasmModuleInfo }> | undefined;

function compileKernels(): Promise<{ module: WebAssembly.Module; info: WasmModuleInfo }> {
  // Compile once per process; each backend gets its own memory and instances.
  compiled ??= (async () => {
    const bytes = kernelsWasmBytes();
    return { module: await WebAssembly.compile(bytes), info: readModuleInfo(bytes) };
  })();
  return compiled;
}

function gib(bytes: number): string {
  return `${(bytes / 1024 ** 3).toFixed(2)} GiB`;
}

/** Threads from the option, else the environment, else the cores. */
export function wasmThreads(option?: number): number {
  let v: number | string | undefined = option;
  let from = "the threads option";
  if (v === undefined) {
    try {
      v = Deno.env.get("LAYERWISE_WASM_THREADS");
      from = "LAYERWISE_WASM_THREADS";
    } catch {
      // No env permission: the cores decide.
    }
  }
  if (v === undefined || v === "") return Math.max(1, navigator.hardwareConcurrency || 1);
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 256) {
    throw new BackendError(
      "BAD_OPTION",
      `${from} must be a whole number of threads from 1 to 256, not ${quoteName(String(v), 40)}`,
    );
  }
  return n;
}

function hostMemoryBytes(): number {
  try {
    return Deno.systemMemoryInfo().total;
  } catch {
    // No sys permission: V8's limit stands.
    return WASM_MAX_MEMORY_BYTES;
  }
}

/** The RawDevice over one shared memory and its threads. */
class WasmDevice implements RawDevice {
  readonly kind = "wasm" as const;
  readonly description: string;
  /** Threads, the caller's included. */
  readonly threads: number;
  readonly #memory: WebAssembly.Memory;
  readonly #heap: WasmHeap;
  readonly #local: Record<string, NumberFn>;
  #pool: WasmPool | null;
  #kernels: KernelAbi & MultiTensorAbi;
  #closed = false;

  constructor(
    memory: WebAssembly.Memory,
    heap: WasmHeap,
    local: Record<string, NumberFn>,
    pool: WasmPool,
    minBytesPerThread: number,
  ) {
    this.#memory = memory;
    this.#heap = heap;
    this.#local = local;
    this.#pool = pool;
    this.threads = pool.threads;
    this.description = `wasm (simd128, memory64, ${pool.threads} thread${
      pool.threads > 1 ? "s" : ""
    })`;
    // Kernels the pool does not split (added to the ABI later) run on the calling thread.
    this.#kernels = {
      ...local,
      ...splitKernels(pool, { minBytesPerThread, partsPerThread: PARTS_PER_THREAD }),
      ...splitMultiTensor(pool, { minBytesPerThread }, new Set(Object.keys(local))),
    } as unknown as KernelAbi & MultiTensorAbi;
  }

  /** The current buffer of the memory (a new object after each growth; old ones stay valid). */
  get buffer(): SharedArrayBuffer {
    this.#open();
    return this.#memory.buffer as unknown as SharedArrayBuffer;
  }

  #open(): void {
    if (this.#closed) throw new BackendError("CLOSED", "the wasm backend is closed");
  }

  malloc(bytes: number): number {
    this.#open();
    const ptr = this.#heap.alloc(bytes);
    if (ptr === 0) {
      const h = this.#heap;
      throw new BackendError(
        "OUT_OF_MEMORY",
        `wasm: cannot allocate ${bytes} bytes (${gib(bytes)}): the WebAssembly memory maximum ` +
          `is ${h.limit} bytes (${gib(h.limit)}) and ${h.inUse} bytes (${gib(h.inUse)}) are in ` +
          `use by this backend (memory size ${gib(h.memoryBytes)})`,
      );
    }
    return ptr;
  }

  free(ptr: number): void {
    this.#open();
    if (this.#heap.sizeOf(ptr) === undefined) {
      throw new BackendError("BAD_FREE", `wasm: free of ${ptr}, which is not a live allocation`);
    }
    this.#heap.free(ptr);
  }

  #span(op: string, ptr: number, n: number): void {
    const size = this.buffer.byteLength;
    if (!Number.isSafeInteger(ptr) || ptr < 0 || n < 0 || ptr + n > size) {
      throw new BackendError(
        "OUT_OF_RANGE",
        `wasm ${op}: bytes [${ptr}, ${ptr + n}) are outside the memory of ${size} bytes`,
      );
    }
  }

  write(ptr: number, src: Uint8Array): void {
    this.#span("write", ptr, src.byteLength);
    new Uint8Array(this.buffer, ptr, src.byteLength).set(src);
  }

  read(ptr: number, dst: Uint8Array): void {
    this.#span("read", ptr, dst.byteLength);
    dst.set(new Uint8Array(this.buffer, ptr, dst.byteLength));
  }

  /** The kernels, split across the threads where that pays; the context argument is 0. */
  get kernels(): KernelAbi & MultiTensorAbi {
    return this.#kernels;
  }

  checkRange(op: string, ptr: number, n: number): void {
    this.#span(op, ptr, n);
  }

  /** WebAssembly kernels are synchronous calls (the pool waits for its workers): no context. */
  readonly ctx = 0;

  sync(): void {
    // Every kernel call returns when all its threads are done: nothing is ever queued.
  }

  errorText(status: number): string {
    if (status === 3) return "out of WebAssembly memory";
    if (status !== 1) return `kernel status ${status}`;
    const ptr = this.#local.lw_wasm_last_error();
    const bytes = new Uint8Array(this.buffer);
    let end = ptr;
    while (end < bytes.length && bytes[end] !== 0) end++;
    return new TextDecoder().decode(bytes.slice(ptr, end)) || "invalid argument";
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#pool?.close();
    this.#pool = null;
    this.#heap.clear();
    // Dropping the memory and the instances lets the engine reclaim them.
    this.#kernels = {} as KernelAbi & MultiTensorAbi;
  }
}

const devices = new WeakMap<Backend, WasmDevice>();

/**
 * Opens a WebAssembly backend: a fresh shared memory, the kernels module instantiated on it by
 * the calling thread and by `threads - 1` workers. Throws BackendError `BAD_OPTION` for a bad
 * thread count or memory maximum.
 */
export async function openWasmBackend(options: WasmBackendOptions = {}): Promise<Backend> {
  const threads = wasmThreads(options.threads);
  const max = options.maxMemoryBytes ??
    Math.min(WASM_MAX_MEMORY_BYTES, Math.floor(hostMemoryBytes() / 65536) * 65536);
  if (!Number.isSafeInteger(max) || max < 2 ** 24 || max > WASM_MAX_MEMORY_BYTES) {
    throw new BackendError(
      "BAD_OPTION",
      `maxMemoryBytes must be from 16 MiB to ${WASM_MAX_MEMORY_BYTES} bytes (16 GiB), not ${max}`,
    );
  }
  const minBytes = options.minBytesPerThread ?? WASM_MIN_BYTES_PER_THREAD;
  if (!(minBytes >= 0)) {
    throw new BackendError("BAD_OPTION", `minBytesPerThread must be >= 0, not ${minBytes}`);
  }
  const { module, info } = await compileKernels();
  const memory = sharedMemory64(Math.max(info.memoryMinBytes, 65536), max);
  const instance = instantiateKernels(module, memory);
  const local = numberExports(instance, info.signatures);
  const heap = new WasmHeap(
    wasmGlobals(instance).heapBase,
    max,
    memory.buffer.byteLength,
    (bytes) => growMemory64(memory, bytes - memory.buffer.byteLength),
  );
  const stacks: number[] = [];
  for (let i = 1; i < threads; i++) {
    stacks.push(heap.alloc(WORKER_STACK_BYTES) + WORKER_STACK_BYTES);
  }
  const partials = heap.alloc(16 * (maxParts(threads) + 2));
  const pool = await WasmPool.start(
    threads,
    { module, memory, signatures: info.signatures },
    local,
    stacks,
    partials,
    heap.alloc(local.lw_wasm_fp8_tensor_bytes()),
  );
  const dev = new WasmDevice(memory, heap, local, pool, minBytes);
  const backend = new KernelBackend(dev, (self) => ({ hostView: (t) => wasmView(self, t) }));
  devices.set(backend, dev);
  return backend;
}

/** Threads a WebAssembly backend runs kernels on (the caller's included). */
export function wasmThreadCount(backend: Backend): number {
  const dev = devices.get(backend);
  if (!dev) {
    throw new BackendError(
      "NOT_WASM",
      `wasmThreadCount: the ${backend.kind} backend is not a wasm one`,
    );
  }
  return dev.threads;
}

/**
 * A view of a contiguous tensor's bytes inside the WebAssembly memory of the backend that owns
 * it, so that file reads and uploads can go straight into place without an extra copy.
 *
 * The memory is shared, so growth never detaches the view: it stays a window onto the tensor's
 * bytes (for example across the awaits of a file read) until the tensor is freed.
 */
export function wasmView(backend: Backend, tensor: Tensor): Uint8Array {
  const dev = devices.get(backend);
  if (!dev) {
    throw new BackendError("NOT_WASM", `wasmView: the ${backend.kind} backend is not a wasm one`);
  }
  const s = tensor.storage;
  if (!s) throw new BackendError("META_TENSOR", `wasmView: ${tensor} has no storage`);
  if (s.freed) throw new BackendError("FREED", `wasmView: ${tensor} uses freed storage`);
  if (s.backend !== backend) {
    throw new BackendError("FOREIGN", `wasmView: ${tensor} lives on another backend`);
  }
  if (!tensor.isContiguous) {
    throw new BackendError("NOT_CONTIGUOUS", `wasmView: ${tensor} must be contiguous`);
  }
  return new Uint8Array(dev.buffer, tensor.ptr, tensor.nbytes);
}

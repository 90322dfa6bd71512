/**
 * The WebAssembly backend: tensors live in the memory of one instance of the kernels module
 * (wasm/kernels.c, embedded in wasm/kernels_wasm.ts), so the package runs anywhere Deno runs,
 * with no build step and no native library. A pointer is an offset into that memory; it stays
 * valid when the memory grows, but every `ArrayBuffer` view of it does not, so views are made
 * afresh for each access.
 * @module
 */

import { BackendError } from "../errors.ts";
import type { Tensor } from "../tensor/tensor.ts";
import { kernelsWasmBytes } from "../../wasm/kernels_wasm.ts";
import type { Backend } from "./backend.ts";
import { type KernelAbi, KernelBackend, type RawDevice } from "./kernels.ts";

/** The most memory a wasm32 instance can address (the module is built with this maximum). */
export const WASM_MAX_MEMORY_BYTES: number = 4 * 1024 ** 3;

/** The largest single allocation: Emscripten's sbrk takes a signed 32-bit increment. */
export const WASM_MAX_ALLOCATION_BYTES: number = 2 * 1024 ** 3;

/** What the kernels module exports (see scripts/build-wasm.sh); pointers and sizes are i32. */
interface KernelExports extends KernelAbi {
  memory: WebAssembly.Memory;
  _initialize?: () => void;
  malloc(bytes: number): number;
  free(ptr: number): void;
  lw_wasm_last_error(): number;
}

let compiled: Promise<WebAssembly.Module> | undefined;

function compileKernels(): Promise<WebAssembly.Module> {
  // Compile once per process; each backend gets its own instance (and memory).
  compiled ??= WebAssembly.compile(kernelsWasmBytes());
  return compiled;
}

/**
 * Imports for the standalone module. It only asks to be told about memory growth, which needs
 * no action because views are re-made on every access; anything else it might import in a
 * later build fails loudly when called instead of at instantiation.
 */
function importsFor(module: WebAssembly.Module): WebAssembly.Imports {
  const imports: Record<string, Record<string, WebAssembly.ImportValue>> = {};
  for (const imp of WebAssembly.Module.imports(module)) {
    if (imp.kind !== "function") {
      throw new BackendError(
        "WASM_IMPORT",
        `the kernels module imports ${imp.kind} ${imp.module}.${imp.name}, which is not provided`,
      );
    }
    const known = imp.module === "env" && imp.name === "emscripten_notify_memory_growth";
    (imports[imp.module] ??= {})[imp.name] = known ? () => {} : () => {
      throw new BackendError(
        "WASM_IMPORT",
        `the kernels module called ${imp.module}.${imp.name}, which this host does not provide`,
      );
    };
  }
  return imports;
}

function gib(bytes: number): string {
  return `${(bytes / 1024 ** 3).toFixed(2)} GiB`;
}

/** The RawDevice over one instance of the kernels module. */
class WasmDevice implements RawDevice {
  readonly kind = "wasm" as const;
  readonly description = "wasm (simd128)";
  #x: KernelExports | null;
  /** Size of each live allocation, so a bad free is refused instead of corrupting the heap. */
  readonly #sizes = new Map<number, number>();
  #inUse = 0;

  constructor(exports: KernelExports) {
    this.#x = exports;
  }

  get exports(): KernelExports {
    if (!this.#x) throw new BackendError("CLOSED", "the wasm backend is closed");
    return this.#x;
  }

  /** The current buffer of the instance memory (a new object after each growth). */
  get buffer(): ArrayBuffer {
    return this.exports.memory.buffer as ArrayBuffer;
  }

  malloc(bytes: number): number {
    // wasm32 sizes are 32 bits: a larger request must not wrap around into a small one.
    const ptr = bytes < WASM_MAX_MEMORY_BYTES ? this.exports.malloc(bytes) >>> 0 : 0;
    if (ptr === 0) {
      const single = bytes > WASM_MAX_ALLOCATION_BYTES
        ? "; one allocation is limited to 2 GiB"
        : "";
      throw new BackendError(
        "OUT_OF_MEMORY",
        `wasm: cannot allocate ${bytes} bytes (${gib(bytes)}): WebAssembly memory is limited to ` +
          `4 GiB and ${this.#inUse} bytes (${gib(this.#inUse)}) are in use by this backend ` +
          `(memory size ${gib(this.buffer.byteLength)})${single}`,
      );
    }
    this.#sizes.set(ptr, bytes);
    this.#inUse += bytes;
    return ptr;
  }

  free(ptr: number): void {
    const bytes = this.#sizes.get(ptr);
    if (bytes === undefined) {
      throw new BackendError("BAD_FREE", `wasm: free of ${ptr}, which is not a live allocation`);
    }
    this.#sizes.delete(ptr);
    this.#inUse -= bytes;
    this.exports.free(ptr);
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

  /** The module's kernel exports; the context argument is ignored (always 0). */
  get kernels(): KernelAbi {
    return this.exports;
  }

  /** WebAssembly kernels run synchronously on the caller's thread: no context. */
  readonly ctx = 0;

  sync(): void {
    // Kernels run synchronously on the calling thread: nothing is ever queued.
  }

  errorText(status: number): string {
    if (status === 3) return "out of WebAssembly memory";
    if (status !== 1) return `kernel status ${status}`;
    const ptr = this.exports.lw_wasm_last_error() >>> 0;
    const bytes = new Uint8Array(this.buffer);
    let end = ptr;
    while (end < bytes.length && bytes[end] !== 0) end++;
    return new TextDecoder().decode(bytes.subarray(ptr, end)) || "invalid argument";
  }

  close(): void {
    // Dropping the instance lets the engine reclaim its memory.
    this.#x = null;
    this.#sizes.clear();
    this.#inUse = 0;
  }
}

const devices = new WeakMap<Backend, WasmDevice>();

/** Opens a WebAssembly backend: a fresh instance of the kernels module with its own memory. */
export async function openWasmBackend(): Promise<Backend> {
  const module = await compileKernels();
  const instance = await WebAssembly.instantiate(module, importsFor(module));
  const exports = instance.exports as unknown as KernelExports;
  exports._initialize?.();
  const dev = new WasmDevice(exports);
  const backend = new KernelBackend(dev, (self) => ({ hostView: (t) => wasmView(self, t) }));
  devices.set(backend, dev);
  return backend;
}

/**
 * A view of a contiguous tensor's bytes inside the WebAssembly memory of the backend that owns
 * it, so that file reads and uploads can go straight into place without an extra copy.
 *
 * The view is invalidated (detached, length 0) as soon as the memory grows, which any
 * allocation on that backend may do: use it at once and do not keep it across `alloc`/`empty`.
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

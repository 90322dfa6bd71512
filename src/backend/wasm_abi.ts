/**
 * The kernels module's symbol table: its exported functions with the types of their parameters
 * read from the module's own bytes, and wrappers that let callers pass plain numbers.
 *
 * The module is built for wasm64, so every pointer and `size_t` is an i64, which JavaScript
 * passes as a BigInt. Reading the types from the binary (instead of a hand-written table) keeps
 * every kernel callable with numbers, including kernels added to wasm/kernels.c later. Offsets
 * stay below 2^53 (the memory is at most 16 GiB), so numbers hold them exactly.
 * @module
 */

import { BackendError } from "../errors.ts";

/** Value types of WebAssembly function parameters and results. */
type ValType = "i32" | "i64" | "f32" | "f64" | "other";

/** Parameter and result types of one function. */
export interface WasmSignature {
  /** Parameter types, in order. */
  readonly params: readonly ValType[];
  /** Result types (zero or one here). */
  readonly results: readonly ValType[];
}

const VALTYPES: Readonly<Record<number, ValType>> = {
  0x7f: "i32",
  0x7e: "i64",
  0x7d: "f32",
  0x7c: "f64",
};

/** What the host needs to know of the kernels module before instantiating it. */
export interface WasmModuleInfo {
  /** Signatures of the exported functions, by name. */
  readonly signatures: Map<string, WasmSignature>;
  /** The smallest memory the module accepts, in bytes (its data and main stack). */
  readonly memoryMinBytes: number;
}

/** Reads the signatures of a module's exported functions, and its memory minimum, from its bytes. */
export function readModuleInfo(bytes: Uint8Array): WasmModuleInfo {
  let at = 8;
  const byte = () => {
    if (at >= bytes.length) {
      throw new BackendError("WASM_IMPORT", "the kernels module is truncated");
    }
    return bytes[at++];
  };
  const uleb = () => {
    let v = 0, mul = 1, b;
    do {
      b = byte();
      v += (b & 0x7f) * mul;
      mul *= 128;
    } while (b & 0x80);
    return v;
  };
  const name = () => {
    const n = uleb();
    at += n;
    return new TextDecoder().decode(bytes.subarray(at - n, at));
  };
  const limits = () => {
    const flags = byte();
    const min = uleb();
    if (flags & 1) uleb();
    return min;
  };
  let memoryPages = 0;
  const types: WasmSignature[] = [];
  const funcTypes: number[] = [];
  const out = new Map<string, WasmSignature>();
  while (at < bytes.length) {
    const id = byte();
    const size = uleb();
    const end = at + size;
    if (id === 1) {
      for (let n = uleb(); n > 0; n--) {
        byte(); // 0x60: a function type
        const params = Array.from({ length: uleb() }, () => VALTYPES[byte()] ?? "other");
        const results = Array.from({ length: uleb() }, () => VALTYPES[byte()] ?? "other");
        types.push({ params, results });
      }
    } else if (id === 2) {
      for (let n = uleb(); n > 0; n--) {
        name();
        name();
        const kind = byte();
        if (kind === 0) funcTypes.push(uleb());
        else if (kind === 1) (byte(), limits());
        else if (kind === 2) memoryPages = limits();
        else (byte(), byte());
      }
    } else if (id === 3) {
      for (let n = uleb(); n > 0; n--) funcTypes.push(uleb());
    } else if (id === 7) {
      for (let n = uleb(); n > 0; n--) {
        const field = name();
        const kind = byte();
        const index = uleb();
        if (kind === 0) out.set(field, types[funcTypes[index]]);
      }
    }
    at = end;
  }
  return { signatures: out, memoryMinBytes: memoryPages * WASM_PAGE_BYTES };
}

/** A kernel export called with numbers: i64 arguments become BigInts, i64 results numbers. */
export type NumberFn = (...args: number[]) => number;

/** Wraps `fn` of signature `sig` so that it takes and returns numbers. */
export function numberCall(fn: (...args: never[]) => unknown, sig: WasmSignature): NumberFn {
  const wide = sig.params.map((t) => t === "i64");
  const f = fn as unknown as (...args: (number | bigint)[]) => number | bigint | undefined;
  const wideResult = sig.results[0] === "i64";
  return (...args: number[]): number => {
    const a: (number | bigint)[] = args;
    for (let i = 0; i < a.length; i++) if (wide[i]) a[i] = BigInt(a[i]);
    const r = f(...a);
    return wideResult ? Number(r) : (r as number);
  };
}

/**
 * Every exported function of an instance, wrapped by {@link numberCall}, by name.
 * `signatures` comes from {@link readModuleInfo} on the same module's bytes.
 */
export function numberExports(
  instance: WebAssembly.Instance,
  signatures: ReadonlyMap<string, WasmSignature>,
): Record<string, NumberFn> {
  const out: Record<string, NumberFn> = {};
  for (const [name, sig] of signatures) {
    const fn = instance.exports[name];
    if (typeof fn === "function") out[name] = numberCall(fn as (...args: never[]) => unknown, sig);
  }
  return out;
}

/** The module's data and shadow-stack globals (i64 values on wasm64). */
export interface WasmGlobals {
  /** Where the module's static data ends: the host's heap starts here. */
  heapBase: number;
  /** Sets this instance's stack pointer (each thread has its own stack in the shared memory). */
  setStackPointer(top: number): void;
}

/** Reads `__heap_base` and wraps `__stack_pointer` of a kernels instance. */
export function wasmGlobals(instance: WebAssembly.Instance): WasmGlobals {
  const heap = instance.exports.__heap_base as WebAssembly.Global | undefined;
  const sp = instance.exports.__stack_pointer as WebAssembly.Global | undefined;
  if (!heap || !sp) {
    throw new BackendError(
      "WASM_IMPORT",
      "the kernels module does not export __heap_base and __stack_pointer (rebuild it with " +
        "scripts/build-wasm.sh)",
    );
  }
  return {
    heapBase: Number(heap.value),
    setStackPointer: (top: number) => {
      sp.value = BigInt(top);
    },
  };
}

/** The bytes of the memory64 page size. */
export const WASM_PAGE_BYTES = 65536;

/** A shared 64-bit memory of `initialBytes` that can grow to `maximumBytes` (whole pages). */
export function sharedMemory64(initialBytes: number, maximumBytes: number): WebAssembly.Memory {
  const pages = (b: number) => BigInt(Math.ceil(b / WASM_PAGE_BYTES));
  // The memory64 JS API takes page counts as BigInts; lib.dom's descriptor type predates it.
  const descriptor = {
    initial: pages(initialBytes),
    maximum: pages(maximumBytes),
    shared: true,
    address: "i64",
  } as unknown as WebAssembly.MemoryDescriptor;
  return new WebAssembly.Memory(descriptor);
}

/** Grows `memory` by `bytes` (whole pages). */
export function growMemory64(memory: WebAssembly.Memory, bytes: number): void {
  const grow = memory.grow as unknown as (delta: bigint) => bigint;
  grow.call(memory, BigInt(Math.ceil(bytes / WASM_PAGE_BYTES)));
}

/** Instantiates the kernels module on `memory` (the only import it has). */
export function instantiateKernels(
  module: WebAssembly.Module,
  memory: WebAssembly.Memory,
): WebAssembly.Instance {
  for (const imp of WebAssembly.Module.imports(module)) {
    if (!(imp.module === "env" && imp.name === "memory" && imp.kind === "memory")) {
      throw new BackendError(
        "WASM_IMPORT",
        `the kernels module imports ${imp.kind} ${imp.module}.${imp.name}, which is not provided`,
      );
    }
  }
  return new WebAssembly.Instance(module, { env: { memory } });
}

/**
 * NCCL's FFI symbol table and the loader that finds the library.
 *
 * Location, in order: the `LAYERWISE_NCCL_LIB` environment variable (a path), else the system's
 * `libnccl.so.2` through the dynamic loader's search path. NCCL also ships inside the Python
 * package `nvidia-nccl-cu13` (or `-cu12`): `<site-packages>/nvidia/nccl/lib/libnccl.so.2`; point
 * `LAYERWISE_NCCL_LIB` at it. Communicators, streams and device buffers are `usize` numbers.
 * @module
 */

import type { WideSymbols } from "./ffi_types.ts";
import { BackendError } from "../../errors.ts";

/** NCCL's symbols that layerwise uses (nccl.h, NCCL 2.x). */
export const NCCL_SYMBOLS = {
  ncclGetVersion: { parameters: ["buffer"], result: "i32" },
  ncclGetErrorString: { parameters: ["i32"], result: "pointer" },
  // Since NCCL 2.13: optional so that older libraries still load.
  ncclGetLastError: { parameters: ["usize"], result: "pointer", optional: true },
  ncclCommInitAll: { parameters: ["buffer", "i32", "buffer"], result: "i32" },
  ncclCommDestroy: { parameters: ["usize"], result: "i32" },
  ncclCommGetAsyncError: { parameters: ["usize", "buffer"], result: "i32" },
  ncclGroupStart: { parameters: [], result: "i32" },
  ncclGroupEnd: { parameters: [], result: "i32" },
  /** (sendbuff, recvbuff, count, datatype, root, comm, stream) */
  ncclBroadcast: {
    parameters: ["usize", "usize", "usize", "i32", "i32", "usize", "usize"],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

/** ncclUint8: counts are bytes. */
export const NCCL_UINT8 = 1;

/** The loaded library's functions; pointers, handles and sizes may be passed as JS numbers. */
export type NcclSymbols = WideSymbols<typeof NCCL_SYMBOLS>;

/** A loaded NCCL and where it came from. */
export interface NcclLibrary {
  /** The functions. */
  readonly symbols: NcclSymbols;
  /** What was passed to dlopen. */
  readonly path: string;
  /** NCCL's version code, e.g. 22704 for 2.27.4. */
  readonly version: number;
}

let loaded: NcclLibrary | undefined;

function envPath(): string | undefined {
  try {
    return Deno.env.get("LAYERWISE_NCCL_LIB") || undefined;
  } catch {
    return undefined; // no --allow-env
  }
}

/**
 * Loads NCCL once per process. Throws BackendError `NCCL_UNAVAILABLE` saying what is missing
 * and how to point layerwise at a copy.
 */
export function loadNcclLibrary(): NcclLibrary {
  if (loaded) return loaded;
  const path = envPath() ?? "libnccl.so.2";
  let lib: Deno.DynamicLibrary<typeof NCCL_SYMBOLS>;
  try {
    lib = Deno.dlopen(path, NCCL_SYMBOLS);
  } catch (e) {
    if (e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied) {
      throw new BackendError("NCCL_UNAVAILABLE", "NCCL unavailable: loading it needs --allow-ffi");
    }
    throw new BackendError(
      "NCCL_UNAVAILABLE",
      `NCCL unavailable: ${path} could not be loaded (${
        (e as Error).message.replace(/^(Could not open library: )+/, "")
      }); set LAYERWISE_NCCL_LIB to a libnccl.so.2, e.g. the one of the Python package ` +
        `nvidia-nccl-cu13 in <site-packages>/nvidia/nccl/lib/`,
    );
  }
  const v = new Int32Array(1);
  const st = lib.symbols.ncclGetVersion(v);
  if (st !== 0) {
    lib.close();
    throw new BackendError("NCCL_UNAVAILABLE", `NCCL unavailable: ncclGetVersion failed (${st})`);
  }
  loaded = { symbols: lib.symbols as unknown as NcclSymbols, path, version: v[0] };
  return loaded;
}

/** `major.minor.patch` of a version code (codes >= 10000 are major*10000 + minor*100 + patch). */
export function ncclVersionString(code: number): string {
  if (code >= 10000) {
    return `${Math.floor(code / 10000)}.${Math.floor(code / 100) % 100}.${code % 100}`;
  }
  return `${Math.floor(code / 1000)}.${Math.floor(code / 100) % 10}.${code % 100}`;
}

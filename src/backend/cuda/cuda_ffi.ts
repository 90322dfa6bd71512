/**
 * The CUDA library's FFI symbol table (cuda/layerwise.h) and the loader that finds the library.
 *
 * Device pointers, contexts and events are `usize` JS numbers (device addresses fit in 53 bits);
 * host memory is a `buffer` (a typed array, valid for the call) or, when pinned, a `usize`.
 * Calls that wait (stream/event sync, the stager's next) also have `nonblocking` variants, which run on
 * Deno's FFI thread and return promises, so that waiting overlaps other work. The library sets
 * the device on every entry point, so any thread may call it.
 *
 * Library location, in order: the `LAYERWISE_CUDA_LIB` environment variable; the build next to
 * this module (`build/liblayerwise_cuda.so` at the repository root, `deno task build:cuda`); a
 * cached build under `$XDG_CACHE_HOME/layerwise/<hash>/` (or `~/.cache/...`), compiled on first use
 * when nvcc is present, keyed by a hash of the kernel sources and the build script.
 * @module
 */

import type { WideSymbols } from "./ffi_types.ts";
import { createHash } from "node:crypto";
import { BackendError } from "../../errors.ts";

const PTR = "usize" as const;
const STATUS = "i32" as const;

/**
 * The two symbols of the NVIDIA driver (libcuda.so.1) the backend calls itself, before loading
 * the kernel library, to tell a missing driver from a missing device.
 */
export const DRIVER_SYMBOLS = {
  cuInit: { parameters: ["u32"], result: "i32" },
  cuDeviceGetCount: { parameters: ["buffer"], result: "i32" },
} as const;

/** The symbols of liblayerwise_cuda.so. */
export const CUDA_SYMBOLS = {
  lw_cast: {
    parameters: [PTR, PTR, "i32", "usize", PTR, "i32", "usize", "usize", "usize"],
    result: STATUS,
  },
  lw_copy: { parameters: [PTR, PTR, PTR, "usize"], result: STATUS },
  lw_copy2d: { parameters: [PTR, PTR, "usize", PTR, "usize", "usize", "usize"], result: STATUS },
  lw_fill: { parameters: [PTR, PTR, "usize", "i32", "u32", "u32"], result: STATUS },
  lw_absmax: { parameters: [PTR, PTR, PTR, "i32", "usize"], result: STATUS },
  lw_count_nonfinite: { parameters: [PTR, PTR, PTR, "i32", "usize"], result: STATUS },
  lw_quant_fp8: {
    parameters: [PTR, PTR, PTR, PTR, "i32", "usize", "usize", "i32", "i32"],
    result: STATUS,
  },
  lw_quant_int8_row: { parameters: [PTR, PTR, PTR, PTR, "i32", "usize", "usize"], result: STATUS },
  lw_dequant_fp8: {
    parameters: [PTR, PTR, "i32", PTR, PTR, "usize", "usize", "i32"],
    result: STATUS,
  },
  lw_mt_absmax: {
    parameters: [PTR, PTR, PTR, PTR, "usize", "usize", PTR, "i32", PTR, PTR],
    result: STATUS,
  },
  lw_mt_absmax_fold: {
    parameters: [PTR, PTR, PTR, "usize", "usize", "i32", PTR],
    result: STATUS,
  },
  lw_mt_quant: {
    parameters: [PTR, "i32", PTR, PTR, PTR, "usize", "usize", PTR, "i32"],
    result: STATUS,
  },
  lw_mt_copy: {
    parameters: [PTR, PTR, PTR, PTR, "usize", "usize", PTR, "i32", "i32"],
    result: STATUS,
  },

  lw_last_error: { parameters: ["buffer", "usize"], result: "usize" },
  lw_device_count: { parameters: ["buffer"], result: STATUS },
  lw_device_info: { parameters: ["i32", "buffer", "usize", "buffer", "buffer"], result: STATUS },
  lw_malloc: { parameters: ["i32", "buffer", "usize"], result: STATUS },
  lw_free: { parameters: ["i32", "u64"], result: STATUS },
  /** CUDA IPC (server): a 64-byte handle in; the mapped address and the allocation's bytes out */
  lw_ipc_open: { parameters: ["i32", "buffer", "buffer", "buffer"], result: STATUS },
  lw_ipc_close: { parameters: ["i32", "u64"], result: STATUS },
  lw_host_alloc: { parameters: ["buffer", "usize"], result: STATUS },
  lw_host_free: { parameters: ["u64"], result: STATUS },
  lw_ctx_create: { parameters: ["i32", "buffer"], result: STATUS },
  lw_ctx_destroy: { parameters: [PTR], result: STATUS },
  lw_ctx_sync: { parameters: [PTR], result: STATUS },
  lw_ctx_sync_nb: { name: "lw_ctx_sync", parameters: [PTR], result: STATUS, nonblocking: true },
  /** host pointer as a pinned address */
  lw_memcpy_h2d: { parameters: [PTR, PTR, PTR, "usize"], result: STATUS },
  /** host memory as a typed array: the caller syncs before the array may change */
  lw_memcpy_h2d_buf: {
    name: "lw_memcpy_h2d",
    parameters: [PTR, PTR, "buffer", "usize"],
    result: STATUS,
  },
  lw_memcpy_d2h: { parameters: [PTR, PTR, PTR, "usize"], result: STATUS },
  lw_memcpy_d2h_buf: {
    name: "lw_memcpy_d2h",
    parameters: [PTR, "buffer", PTR, "usize"],
    result: STATUS,
  },
  lw_event_create: { parameters: ["i32", "buffer"], result: STATUS },
  lw_event_destroy: { parameters: [PTR], result: STATUS },
  lw_event_record: { parameters: [PTR, PTR], result: STATUS },
  lw_event_wait: { parameters: [PTR, PTR], result: STATUS },
  lw_event_sync: { parameters: [PTR], result: STATUS },
  lw_event_sync_nb: { name: "lw_event_sync", parameters: [PTR], result: STATUS, nonblocking: true },
  lw_event_elapsed: { parameters: ["buffer", PTR, PTR], result: STATUS },
  lw_pread: { parameters: ["i32", PTR, "usize", "u64"], result: STATUS },

  // -------------------------------------------------- graphs, streams, fp8 probe (cuda/graph.cu)
  lw_ctx_stream: { parameters: [PTR, "buffer"], result: STATUS },
  lw_graph_begin: { parameters: [PTR], result: STATUS },
  lw_graph_end: { parameters: [PTR, "buffer"], result: STATUS },
  lw_graph_launch: { parameters: [PTR, PTR], result: STATUS },
  lw_graph_destroy: { parameters: [PTR], result: STATUS },
  lw_fp8_tensor_sums: {
    parameters: [PTR, PTR, "usize", "usize", PTR, PTR],
    result: STATUS,
  },

  // staged reads (ARCHITECTURE.md, "Read paths")
  lw_event_create_blocking: { parameters: ["i32", "buffer"], result: STATUS },

  // -------------------------------------------------- native staging (cuda/stager.cu)
  lw_stager_start: {
    parameters: [
      PTR,
      PTR,
      "buffer",
      "u32",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "buffer",
      "usize",
      "u64",
      "u64",
      "u32",
      "u32",
      "buffer",
    ],
    result: STATUS,
  },
  lw_stager_ready: { parameters: [PTR, "u64"], result: "i32" },
  lw_stager_next: { parameters: [PTR, "u64"], result: STATUS },
  lw_stager_next_nb: {
    name: "lw_stager_next",
    parameters: [PTR, "u64"],
    result: STATUS,
    nonblocking: true,
  },
  lw_stager_done: { parameters: [PTR, "u64"], result: STATUS },
  lw_stager_error: { parameters: [PTR, "buffer", "buffer", "usize"], result: STATUS },
  lw_stager_stats: { parameters: [PTR, "buffer"], result: STATUS },
  lw_stager_finish: { parameters: [PTR], result: STATUS },
} as const satisfies Deno.ForeignLibraryInterface;

/** The loaded library's functions; pointers, handles and sizes may be passed as JS numbers. */
export type CudaSymbols = WideSymbols<typeof CUDA_SYMBOLS>;

/** A loaded library and where it came from. */
export interface CudaLibrary {
  /** The functions. */
  readonly symbols: CudaSymbols;
  /** The file that was loaded. */
  readonly path: string;
}

/** Files the cached build is compiled from, relative to the repository root. */
const SOURCES = [
  "cuda/kernels.cu",
  "cuda/layerwise.h",
  "cuda/lw_numeric.h",
  "cuda/graph.cu",
  "cuda/stager.cu",
] as const;
const BUILD_SCRIPT = "scripts/build-cuda.sh";
const ROOT = new URL("../../../", import.meta.url);

let loaded: CudaLibrary | undefined;

function unavailable(message: string): BackendError {
  return new BackendError("CUDA_UNAVAILABLE", `CUDA backend unavailable: ${message}`);
}

function env(name: string): string | undefined {
  try {
    return Deno.env.get(name) || undefined;
  } catch {
    return undefined; // no --allow-env
  }
}

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

function open(path: string): CudaLibrary {
  try {
    const lib = Deno.dlopen(path, CUDA_SYMBOLS);
    return { symbols: lib.symbols as unknown as CudaSymbols, path };
  } catch (e) {
    if (e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied) {
      throw unavailable(`loading ${path} needs --allow-ffi`);
    }
    throw unavailable(`${path} could not be loaded: ${(e as Error).message}`);
  }
}

/** Finds nvcc on PATH or in /usr/local/cuda; undefined when absent. */
export function findNvcc(): string | undefined {
  const dirs = (env("PATH") ?? "").split(":").filter((d) => d !== "");
  dirs.push("/usr/local/cuda/bin");
  for (const d of dirs) {
    if (isFile(`${d}/nvcc`)) return `${d}/nvcc`;
  }
  return undefined;
}

/** The kernel sources and build script as text, read from disk or fetched for remote modules. */
function readSources(): Map<string, string> {
  const files = [...SOURCES, BUILD_SCRIPT];
  const out = new Map<string, string>();
  if (ROOT.protocol === "file:") {
    for (const f of files) out.set(f, Deno.readTextFileSync(new URL(f, ROOT)));
    return out;
  }
  // Module loaded from a registry: fetch synchronously through a child Deno (one-time, first use).
  const script = `const r=${JSON.stringify(ROOT.href)};const o={};for(const f of ${
    JSON.stringify(files)
  }){const x=await fetch(new URL(f,r));if(!x.ok)throw new Error(f+": HTTP "+x.status);o[f]=await x.text();}console.log(JSON.stringify(o));`;
  const res = new Deno.Command(Deno.execPath(), {
    args: ["eval", "--quiet", `--allow-net=${ROOT.host}`, script],
    stdout: "piped",
    stderr: "piped",
  }).outputSync();
  if (!res.success) {
    throw unavailable(
      `could not fetch the kernel sources from ${ROOT.href}: ${
        new TextDecoder().decode(res.stderr).trim()
      }`,
    );
  }
  const obj = JSON.parse(new TextDecoder().decode(res.stdout)) as Record<string, string>;
  for (const f of files) out.set(f, obj[f]);
  return out;
}

function cacheRoot(): string | undefined {
  const xdg = env("XDG_CACHE_HOME");
  if (xdg) return `${xdg}/layerwise`;
  const home = env("HOME");
  return home ? `${home}/.cache/layerwise` : undefined;
}

/** The cached build: found by hash, or compiled now when nvcc is present. */
function cachedBuild(): string | undefined {
  const root = cacheRoot();
  if (!root) return undefined;
  const sources = readSources();
  const hash = createHash("sha256");
  for (const [name, text] of sources) hash.update(`${name}\0${text}\0`);
  const dir = `${root}/${hash.digest("hex").slice(0, 16)}`;
  const lib = `${dir}/liblayerwise_cuda.so`;
  if (isFile(lib)) return lib;
  const nvcc = findNvcc();
  if (!nvcc) return undefined;
  Deno.mkdirSync(`${dir}/src`, { recursive: true });
  for (const [name, text] of sources) {
    Deno.writeTextFileSync(`${dir}/src/${name.slice(name.lastIndexOf("/") + 1)}`, text);
  }
  console.error(`layerwise: compiling the CUDA kernels into ${lib} (first use, about a minute)`);
  let res: Deno.CommandOutput;
  try {
    res = new Deno.Command("bash", {
      args: [`${dir}/src/build-cuda.sh`, "--arch", "native", "--src", `${dir}/src`, "--out", lib],
      env: { NVCC: nvcc },
      stdout: "piped",
      stderr: "piped",
    }).outputSync();
  } catch (e) {
    throw unavailable(`compiling the CUDA kernels needs --allow-run: ${(e as Error).message}`);
  }
  if (!res.success || !isFile(lib)) {
    const err = new TextDecoder().decode(res.stderr).trim().split("\n").slice(-3).join(" | ");
    throw unavailable(`compiling the CUDA kernels with ${nvcc} failed: ${err}`);
  }
  return lib;
}

/**
 * Loads the CUDA kernel library once per process (see the module doc for the search order).
 * Throws BackendError `CUDA_UNAVAILABLE` saying what is missing.
 */
export function loadCudaLibrary(): CudaLibrary {
  if (loaded) return loaded;
  const fromEnv = env("LAYERWISE_CUDA_LIB");
  if (fromEnv) {
    if (!isFile(fromEnv)) throw unavailable(`LAYERWISE_CUDA_LIB=${fromEnv} is not a file`);
    return loaded = open(fromEnv);
  }
  if (ROOT.protocol === "file:") {
    const local = new URL("build/liblayerwise_cuda.so", ROOT).pathname;
    if (isFile(local)) return loaded = open(local);
  }
  const cached = cachedBuild();
  if (cached) return loaded = open(cached);
  throw unavailable(
    "no CUDA library found (LAYERWISE_CUDA_LIB unset, no build/liblayerwise_cuda.so, " +
      "no cached build) and no nvcc to compile one",
  );
}

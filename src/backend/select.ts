/**
 * Backend selection: `auto` takes CUDA when it is usable and WebAssembly otherwise;
 * `LAYERWISE_BACKEND=cuda|wasm` (or the `backend` option) forces one.
 * @module
 */

import { BackendError } from "../errors.ts";
import type { Backend } from "./backend.ts";
import { openCudaBackend } from "./cuda/device.ts";
import { openWasmBackend } from "./wasm.ts";

/** What to ask for: a specific backend, or the best available. */
export type BackendChoice = "auto" | "cuda" | "wasm";

/** Options for {@link openBackend}. */
export interface OpenBackendOptions {
  /** Which backend; default: the `LAYERWISE_BACKEND` environment variable, else `auto`. */
  backend?: BackendChoice;
  /** CUDA device ordinal (default 0). */
  device?: number;
}

function envChoice(): BackendChoice | undefined {
  let v: string | undefined;
  try {
    v = Deno.env.get("LAYERWISE_BACKEND");
  } catch {
    return undefined; // no --allow-env: behave as if unset
  }
  if (v === undefined || v === "") return undefined;
  if (v !== "auto" && v !== "cuda" && v !== "wasm") {
    throw new BackendError(
      "BAD_BACKEND",
      `LAYERWISE_BACKEND=${v} is not one of auto, cuda, wasm`,
    );
  }
  return v;
}

/**
 * Opens a backend. With `auto`, a CUDA failure (no library, driver or GPU) falls back to
 * WebAssembly; with `cuda` it is an error whose message says what is missing.
 */
export async function openBackend(options: OpenBackendOptions = {}): Promise<Backend> {
  const choice = options.backend ?? envChoice() ?? "auto";
  if (choice === "wasm") return await openWasmBackend();
  if (choice === "cuda") return openCudaBackend({ device: options.device });
  try {
    return openCudaBackend({ device: options.device });
  } catch (e) {
    if (!(e instanceof BackendError)) throw e;
    return await openWasmBackend();
  }
}

/**
 * `deno task bench`: kernel throughput on the chosen backend, then the reload bench
 * (scripts/bench_reload.ts: a synthetic Llama-shaped checkpoint reloaded into fp8), each
 * figure printed beside the limit it is measured against, as a ratio from the same run.
 * `--only serve` runs the weight-update server's bench (scripts/bench_serve.ts) instead.
 *
 * `--only device` runs the device-source reload bench instead (scripts/bench_device.ts).
 *
 *   deno task bench [--backend auto|cuda|wasm] [--only kernels|reload|serve|device] [--elements N]
 *       [--reps N] [--json FILE] [--shape 8b|small] [--runs N] [--dir DIR] [--keep] [--simple]
 *       [--slot-mb N] [--slots N] [--chunk-mb N] [--readers N] [--ring-mb N] [--sweep RxSxC,...]
 * @module
 */

import { parseArgs } from "node:util";
import { openBackend } from "../src/backend/select.ts";
import { benchDevice } from "./bench_device.ts";
import { benchKernels, kernelTable } from "./bench_kernels.ts";
import { benchReload, RELOAD_BENCH_ARGS, reloadOptions } from "./bench_reload.ts";
import { benchServe } from "./bench_serve.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    backend: { type: "string", default: "auto" },
    elements: { type: "string" },
    reps: { type: "string", default: "10" },
    json: { type: "string" },
    help: { type: "boolean", short: "h" },
    only: { type: "string" },
    ...RELOAD_BENCH_ARGS,
  },
});

if (values.help) {
  console.log(
    "usage: deno task bench [--backend auto|cuda|wasm] [--only kernels|reload|serve|device] " +
      "[--elements N] " +
      "[--reps N] [--json FILE] [--shape 8b|small] [--runs N] [--dir DIR] [--keep] [--simple] " +
      "[--slot-mb N] [--slots N] [--chunk-mb N] [--readers N] [--ring-mb N] [--sweep RxSxC,...]",
  );
  Deno.exit(0);
}

const only = values.only;
if (
  only !== undefined && only !== "kernels" && only !== "reload" && only !== "serve" &&
  only !== "device"
) {
  console.error(`bench: --only takes kernels, reload, serve or device, not ${only}`);
  Deno.exit(2);
}

if (only === "serve") {
  // The server opens (and closes) its own backend.
  const out = await benchServe({
    backend: values.backend as "auto" | "cuda" | "wasm",
    runs: values.runs === undefined ? undefined : Number(values.runs),
    dir: values.dir,
  });
  if (values.json) await Deno.writeTextFile(values.json, JSON.stringify(out, null, 2));
  Deno.exit(0);
}

const backend = await openBackend({ backend: values.backend as "auto" | "cuda" | "wasm" });
try {
  const out: Record<string, unknown> = { backend: backend.description };
  if (only === "device") {
    out.device = await benchDevice(backend, {
      shape: values.shape as "8b" | "small" | undefined,
      runs: values.runs === undefined ? undefined : Number(values.runs),
    });
  } else if (only !== "reload") {
    const elements = Number(values.elements ?? (backend.kind === "cuda" ? 2 ** 28 : 2 ** 24));
    const results = await benchKernels(backend, elements, Number(values.reps));
    console.log(kernelTable(backend, results));
    out.kernels = results;
  }
  if (only !== "kernels" && only !== "device") {
    out.reload = await benchReload(backend, reloadOptions(values));
  }
  if (values.json) await Deno.writeTextFile(values.json, JSON.stringify(out, null, 2));
} finally {
  backend.close();
}

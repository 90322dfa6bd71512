/**
 * `deno task bench`: kernel throughput on the chosen backend, then the reload bench
 * (scripts/bench_reload.ts: a synthetic Llama-shaped checkpoint reloaded into fp8), each
 * figure printed beside the limit it is measured against, as a ratio from the same run.
 * Instead: `--only block-fp8` the block-fp8 reload bench (scripts/bench_block_fp8.ts), `--only
 * serve` the weight-update server's bench (scripts/bench_serve.ts),
 * `--only device` the device-source reload bench (scripts/bench_device.ts).
 *
 *   deno task bench [--backend auto|cuda|wasm] [--only kernels|reload|block-fp8|serve|device]
 *       [--elements N] [--reps N] [--json FILE] [--shape 8b|small] [--runs N] [--dir DIR] [--keep]
 *       [--simple]
 *       [--slot-mb N] [--slots N] [--chunk-mb N] [--readers N] [--ring-mb N] [--sweep RxSxC,...]
 * @module
 */

import { parseArgs } from "node:util";
import { openBackend } from "../src/backend/select.ts";
import { benchBlockFp8 } from "./bench_block_fp8.ts";
import { benchDevice } from "./bench_device.ts";
import { benchKernels, kernelTable } from "./bench_kernels.ts";
import {
  benchReload,
  RELOAD_BENCH_ARGS,
  reloadOptions,
  SHAPE_8B,
  SHAPE_SMALL,
} from "./bench_reload.ts";
import { benchServe } from "./bench_serve.ts";
import type { QuantName } from "../src/models/quant_names.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    backend: { type: "string", default: "auto" },
    elements: { type: "string" },
    reps: { type: "string", default: "10" },
    json: { type: "string" },
    help: { type: "boolean", short: "h" },
    only: { type: "string" },
    quants: { type: "string" },
    "peer-log": { type: "string" },
    ...RELOAD_BENCH_ARGS,
  },
});

if (values.help) {
  console.log(
    "usage: deno task bench [--backend auto|cuda|wasm] " +
      "[--only kernels|reload|block-fp8|serve|device] " +
      "[--elements N] [--quants fp8,fp8-channel,fp8-block,int8,none (device)] " +
      "[--peer-log FILE (device: peer_torch.py's output, for the ratio)] " +
      "[--reps N] [--json FILE] [--shape 8b|small] [--runs N] [--dir DIR] [--keep] [--simple] " +
      "[--slot-mb N] [--slots N] [--chunk-mb N] [--readers N] [--ring-mb N] [--sweep RxSxC,...]",
  );
  Deno.exit(0);
}

const only = values.only;
if (only !== undefined && !["kernels", "reload", "block-fp8", "serve", "device"].includes(only)) {
  console.error(`bench: --only takes kernels, reload, block-fp8, serve or device, not ${only}`);
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
  if (only === "block-fp8") {
    const o = reloadOptions(values);
    const shape = (o.shape ?? (backend.kind === "cuda" ? "8b" : "small")) === "8b"
      ? SHAPE_8B
      : SHAPE_SMALL;
    out.blockFp8 = await benchBlockFp8(backend, { ...o, shape, runs: o.runs ?? 3 });
  }
  if (only === "device") {
    out.device = await benchDevice(backend, {
      shape: values.shape as "8b" | "small" | undefined,
      runs: values.runs === undefined ? undefined : Number(values.runs),
      quants: values.quants?.split(",") as QuantName[] | undefined,
      peerLog: values["peer-log"] === undefined
        ? undefined
        : await Deno.readTextFile(values["peer-log"]),
    });
  }
  if (only === undefined || only === "kernels") {
    const elements = Number(values.elements ?? (backend.kind === "cuda" ? 2 ** 28 : 2 ** 24));
    const results = await benchKernels(backend, elements, Number(values.reps));
    console.log(kernelTable(backend, results));
    out.kernels = results;
  }
  if (only === undefined || only === "reload") {
    out.reload = await benchReload(backend, reloadOptions(values));
  }
  if (values.json) await Deno.writeTextFile(values.json, JSON.stringify(out, null, 2));
} finally {
  backend.close();
}

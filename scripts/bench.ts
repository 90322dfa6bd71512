/**
 * `deno task bench`: kernel throughput on the chosen backend, each figure printed beside the
 * limit it is measured against, as a ratio from the same run.
 *
 *   deno task bench [--backend auto|cuda|wasm] [--elements N] [--reps N] [--json FILE]
 * @module
 */

import { parseArgs } from "node:util";
import { openBackend } from "../src/backend/select.ts";
import { benchKernels, kernelTable } from "./bench_kernels.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    backend: { type: "string", default: "auto" },
    elements: { type: "string" },
    reps: { type: "string", default: "10" },
    json: { type: "string" },
    help: { type: "boolean", short: "h" },
  },
});

if (values.help) {
  console.log(
    "usage: deno task bench [--backend auto|cuda|wasm] [--elements N] [--reps N] [--json FILE]",
  );
  Deno.exit(0);
}

const backend = await openBackend({ backend: values.backend as "auto" | "cuda" | "wasm" });
try {
  const elements = Number(values.elements ?? (backend.kind === "cuda" ? 2 ** 28 : 2 ** 24));
  const results = await benchKernels(backend, elements, Number(values.reps));
  console.log(kernelTable(backend, results));
  if (values.json) {
    await Deno.writeTextFile(
      values.json,
      JSON.stringify({ backend: backend.description, kernels: results }, null, 2),
    );
  }
} finally {
  backend.close();
}

/**
 * Peak extra backend memory of a reload (ARCHITECTURE.md, "Memory"), measured on any
 * backend by counting its allocations: a synthetic Llama-shaped bf16 model is first-loaded,
 * then reloaded from another checkpoint (a) from files, through the same stream as the CLI
 * (model layer order, one tensor in flight), (b) from tensors already on the backend, in
 * layer order, and (c) the same, shuffled. For (b) and (c) the incoming tensors are part of
 * the baseline, so the figure is what the engine itself holds. Prints each beside the largest
 * module's and one decoder layer's model-format bytes.
 *
 *   deno run -A scripts/reload_memory.ts [--backend wasm|cuda|auto] [--quant fp8|none|...]
 *       [--layers N] [--hidden N] [--intermediate N] [--vocab N] [--json FILE]
 * @module
 */

import { parseArgs } from "node:util";
import type { Backend } from "../src/backend/backend.ts";
import { openBackend } from "../src/backend/select.ts";
import {
  modelFormatBytes,
  type SynthShape,
  synthTensors,
  trackPeak,
  writeSynthCheckpoint,
} from "../testing.ts";
import { loadModel, reloadWeights } from "../src/models/load.ts";
import type { QuantName } from "../src/models/quant_names.ts";
import { reloadLayerwise as engineReload } from "../src/reload/load.ts";
import type { Tensor } from "../src/tensor/tensor.ts";

function shuffled<T>(items: T[], seed: number): T[] {
  let s = seed >>> 0;
  const next = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32;
  const out = [...items];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/** One measured reload. */
export interface MemoryRun {
  /** `files (layer order)`, `tensors (layer order)` or `tensors (shuffled)`. */
  readonly what: string;
  /** Peak allocated bytes above the allocation before the reload. */
  readonly peakExtraBytes: number;
  /** The engine's report: peak buffered and scratch bytes. */
  readonly peakBufferedBytes: number;
  /** See {@link MemoryRun.peakBufferedBytes}. */
  readonly peakScratchBytes: number;
}

/** Measures the three reloads of a model of `shape` quantized with `quant` on `inner`. */
export async function measureReloadMemory(
  inner: Backend,
  shape: SynthShape,
  quant: QuantName,
): Promise<{ module: number; layer: number; runs: MemoryRun[] }> {
  const b = inner;
  const t = trackPeak(b);
  const root = await Deno.makeTempDir({ prefix: "layerwise-memory-" });
  try {
    const tensorsB = synthTensors(shape, 2);
    await Deno.mkdir(`${root}/a`);
    await Deno.mkdir(`${root}/b`);
    await writeSynthCheckpoint(`${root}/a`, shape, synthTensors(shape, 1));
    await writeSynthCheckpoint(`${root}/b`, shape, tensorsB);
    const model = await loadModel(`${root}/a`, { backend: b, quant });
    const runs: MemoryRun[] = [];
    try {
      t.resetPeak();
      let base = b.allocatedBytes();
      const r = await reloadWeights(model, `${root}/b`);
      runs.push({
        what: "files (layer order)",
        peakExtraBytes: t.peak - base,
        peakBufferedBytes: r.peakBufferedBytes,
        peakScratchBytes: r.peakScratchBytes,
      });
      const order = [...tensorsB.keys()].sort((x, y) => model.readOrder(x) - model.readOrder(y));
      const uploaded: [string, Tensor][] = order.map((name) => {
        const h = tensorsB.get(name)!;
        const x = b.empty(h.shape, h.dtype);
        b.upload(x, h.data);
        return [name, x];
      });
      try {
        for (const [what, ws] of [["layer order", uploaded], ["shuffled", shuffled(uploaded, 7)]]) {
          t.resetPeak();
          base = b.allocatedBytes();
          const r = await engineReload(model, ws as [string, Tensor][]);
          runs.push({
            what: `tensors (${what})`,
            peakExtraBytes: t.peak - base,
            peakBufferedBytes: r.peakBufferedBytes,
            peakScratchBytes: r.peakScratchBytes,
          });
        }
      } finally {
        for (const [, x] of uploaded) b.free(x.storage!);
      }
      return { ...modelFormatBytes(model), runs };
    } finally {
      for (const [, slot] of model.namedTensors()) {
        const s = slot.tensor.storage;
        if (s && !s.freed) b.free(s);
      }
    }
  } finally {
    t.stop();
    await Deno.remove(root, { recursive: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      backend: { type: "string", default: "wasm" },
      quant: { type: "string", default: "fp8" },
      layers: { type: "string", default: "8" },
      hidden: { type: "string", default: "1024" },
      intermediate: { type: "string", default: "3584" },
      vocab: { type: "string", default: "32000" },
      json: { type: "string" },
    },
  });
  const shape: SynthShape = {
    hiddenSize: Number(values.hidden),
    intermediateSize: Number(values.intermediate),
    numLayers: Number(values.layers),
    numHeads: 16,
    numKvHeads: 4,
    vocabSize: Number(values.vocab),
    tieWordEmbeddings: false,
  };
  const backend = await openBackend({ backend: values.backend as "wasm" | "cuda" | "auto" });
  const MiB = 1 << 20;
  const mib = (n: number) => (n / MiB).toFixed(1).padStart(8);
  const m = await measureReloadMemory(backend, shape, values.quant as QuantName);
  console.log(
    `${backend.description}, quant ${values.quant}, ${shape.numLayers} layers, hidden ${shape.hiddenSize}, intermediate ${shape.intermediateSize}, vocab ${shape.vocabSize}`,
  );
  console.log(
    `largest module in model format ${mib(m.module)} MiB; one decoder layer ${mib(m.layer)} MiB`,
  );
  console.log(`${"reload from".padEnd(22)} peak extra MiB  buffered MiB  scratch MiB`);
  for (const r of m.runs) {
    console.log(
      `${r.what.padEnd(22)} ${mib(r.peakExtraBytes)}       ${mib(r.peakBufferedBytes)}     ${
        mib(r.peakScratchBytes)
      }`,
    );
  }
  if (values.json) {
    await Deno.writeTextFile(values.json, JSON.stringify({ shape, quant: values.quant, ...m }));
  }
  backend.close();
}

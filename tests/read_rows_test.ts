/**
 * Row-range reads of weight sources (`readRowsInto`) and the simple read path's row chunks
 * (`readChunkBytes`): file and memory sources give exactly the rows' bytes and refuse bad
 * ranges; a load or reload that reads big tensors as row chunks writes the same kernel bytes as
 * one reading whole tensors, and its extra backend memory is one layer plus one chunk where
 * whole reads need the whole embedding. Runs on WebAssembly (and on CUDA where present, with
 * staging off).
 */
import assert from "node:assert/strict";
import { openCudaBackend } from "../src/backend/cuda/device.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import type { Backend } from "../src/backend/backend.ts";
import { openCheckpoint } from "../src/checkpoint/sharded.ts";
import { fileSource, memorySource, type WeightSource } from "../src/checkpoint/source.ts";
import { type SynthShape, synthTensors, writeSynthCheckpoint } from "../testing.ts";
import { downloadKernelTensors } from "../src/models/export.ts";
import { loadModel, reloadWeights } from "../src/models/load.ts";
import { modelFormatBytes, trackPeak } from "../testing.ts";

/** An embedding (and LM head) of 1.5 MB, five times a decoder layer in model format. */
const SHAPE: SynthShape = {
  hiddenSize: 128,
  intermediateSize: 256,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  vocabSize: 6000,
  tieWordEmbeddings: false,
};
const CHUNK = 64 * 1024;

async function withCheckpoint<T>(seed: number, f: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "layerwise-rows-" });
  try {
    await writeSynthCheckpoint(dir, SHAPE, synthTensors(SHAPE, seed), 2);
    return await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function sources(dir: string): Promise<[string, WeightSource][]> {
  const file = await fileSource(dir);
  const pairs: [string, { dtype: string; shape: number[]; data: Uint8Array }][] = [];
  for await (const { name, tensor } of file) {
    pairs.push([name, { dtype: tensor.dtype.name, shape: tensor.shape, data: tensor.data }]);
  }
  return [["file", file], ["memory", memorySource(pairs)]];
}

Deno.test("readRowsInto: file and memory sources give exactly the rows' bytes", async () => {
  await withCheckpoint(1, async (dir) => {
    for (const [kind, src] of await sources(dir)) {
      try {
        for (const name of ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"]) {
          const info = src.tensors.get(name)!;
          const whole = new Uint8Array(info.bytes);
          await src.readInto(name, whole);
          const rows = info.shape[0], rb = info.bytes / rows;
          for (const [a, b] of [[0, 1], [0, rows], [rows - 1, rows], [3, 17], [5, 5]]) {
            const dst = new Uint8Array((b - a) * rb).fill(0xee);
            await src.readRowsInto!(name, a, b, dst);
            assert.ok(
              Buffer.from(dst).equals(Buffer.from(whole.subarray(a * rb, b * rb))),
              `${kind} ${name} rows [${a}, ${b})`,
            );
          }
        }
      } finally {
        src.close();
      }
    }
  });
});

Deno.test("readRowsInto: bad ranges are BAD_ROWS, wrong destinations BAD_DESTINATION", async () => {
  await withCheckpoint(2, async (dir) => {
    for (const [kind, src] of await sources(dir)) {
      try {
        const name = "model.embed_tokens.weight";
        const rows = SHAPE.vocabSize, rb = 2 * SHAPE.hiddenSize;
        for (const [a, b] of [[-1, 2], [4, 3], [0, rows + 1], [0.5, 2], [NaN, 1]]) {
          await assert.rejects(
            () => src.readRowsInto!(name, a, b, new Uint8Array(rb)),
            (e: Error & { code?: string }) =>
              e.code === "BAD_ROWS" && e.message.includes(name) &&
              e.message.includes(`[${a}, ${b})`),
            `${kind} rows [${a}, ${b})`,
          );
        }
        await assert.rejects(
          () => src.readRowsInto!(name, 0, 2, new Uint8Array(rb)),
          (e: Error & { code?: string }) =>
            e.code === "BAD_DESTINATION" && e.message.includes(`${2 * rb} bytes`),
        );
        await assert.rejects(
          () => src.readRowsInto!("no.such.tensor", 0, 1, new Uint8Array(rb)),
          (e: Error & { code?: string }) => e.code === "UNKNOWN_TENSOR",
        );
      } finally {
        src.close();
      }
    }
  });
});

Deno.test("readRowsInto: a file that shrank is TRUNCATED, naming the rows' byte range", async () => {
  await withCheckpoint(3, async (dir) => {
    const src = await fileSource(dir);
    try {
      const name = "lm_head.weight";
      const info = src.tensors.get(name)!;
      const file = info.origin;
      const entry = (await openCheckpoint(dir)).tensors.get(name)!;
      await Deno.truncate(file, entry.end - 100);
      const rows = info.shape[0], rb = info.bytes / rows;
      // The tensor's last row is cut short; its first is still there.
      const head = new Uint8Array(rb);
      await src.readRowsInto!(name, 0, 1, head);
      await assert.rejects(
        () => src.readRowsInto!(name, rows - 1, rows, new Uint8Array(rb)),
        (e: Error & { code?: string }) =>
          e.code === "TRUNCATED" && e.message.includes(file) && e.message.includes(name) &&
          e.message.includes(`[${entry.end - rb}, ${entry.end})`),
      );
    } finally {
      src.close();
    }
  });
});

const BACKENDS: [string, () => Promise<Backend> | Backend][] = [["wasm", openWasmBackend]];
try {
  openCudaBackend().close();
  BACKENDS.push(["cuda", () => openCudaBackend()]);
} catch { /* no GPU here */ }

for (const [kind, open] of BACKENDS) {
  Deno.test(`${kind}: row-chunked reads load and reload the same kernel bytes in one layer plus one chunk`, async () => {
    await withCheckpoint(4, async (a) => {
      await withCheckpoint(5, async (b) => {
        const backend = await open();
        try {
          const opts = { backend, quant: "fp8" as const, staging: false as const };
          const whole = await loadModel(a, { ...opts, readChunkBytes: Infinity });
          const chunked = await loadModel(a, { ...opts, readChunkBytes: CHUNK });
          assert.deepEqual(downloadKernelTensors(chunked), downloadKernelTensors(whole), "load");
          const peaks: number[] = [];
          for (const [model, readChunkBytes] of [[whole, Infinity], [chunked, CHUNK]] as const) {
            const base = backend.allocatedBytes();
            const t = trackPeak(backend);
            try {
              await reloadWeights(model, b, { staging: false, readChunkBytes });
            } finally {
              t.stop();
            }
            peaks.push(t.peak - base);
          }
          assert.deepEqual(downloadKernelTensors(chunked), downloadKernelTensors(whole), "reload");
          const layer = modelFormatBytes(whole).layer;
          const embedding = 2 * SHAPE.vocabSize * SHAPE.hiddenSize;
          assert.ok(peaks[0] >= embedding, `whole reads hold the embedding: ${peaks[0]}`);
          assert.ok(
            peaks[1] <= layer + CHUNK,
            `chunked: peak extra ${peaks[1]} <= one layer ${layer} + one chunk ${CHUNK}`,
          );
        } finally {
          backend.close();
        }
      });
    });
  });
}

Deno.test("readChunkBytes that is not a positive number is refused before anything is written", async () => {
  await withCheckpoint(6, async (a) => {
    const backend = await openWasmBackend();
    try {
      const model = await loadModel(a, { backend, staging: false });
      const before = downloadKernelTensors(model);
      for (const bad of [0, -5, NaN]) {
        await assert.rejects(
          () => reloadWeights(model, a, { readChunkBytes: bad }),
          (e: Error & { code?: string }) =>
            e.code === "BAD_OPTION" && e.message.includes("readChunkBytes"),
        );
      }
      assert.deepEqual(downloadKernelTensors(model), before);
      const r = await reloadWeights(model, a, { staging: false });
      assert.ok(r.storageKept, "the model still reloads");
    } finally {
      backend.close();
    }
  });
});

/**
 * Reads placed in the layer's scratch (ARCHITECTURE.md, "Read paths"): on WebAssembly a reload
 * from files reads each tensor that a layer's loader would copy unchanged straight into its
 * range of the layer's model-format scratch, and the loader's copy then moves nothing. Checked
 * here: the copies skipped are exactly those tensors' bytes, whole or as row chunks, for every
 * quantization; the kernel tensors are byte for byte those of the same reload without
 * placement; a read that fails after landing in scratch leaves the model as without placement
 * (restored with `atomic`, untouched layers unwritten without it) and frees everything.
 */
import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import { openWeightSource, type WeightSource } from "../src/checkpoint/source.ts";
import { kernelTensors, loadModel, reloadWeights } from "../src/models/load.ts";
import type { CausalLM } from "../src/models/causal_lm.ts";
import type { QuantName } from "../src/models/quant_names.ts";
import { placeInScratch, streamWeights, validateWeights } from "../src/models/weights.ts";
import { isInconsistent } from "../src/reload/layerwise.ts";
import { reloadLayerwise } from "../src/reload/load.ts";
import { copyInto } from "../src/nn/slots.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { faultyBackend } from "./_faulty_backend.ts";
import { equalBytes, type SynthShape, synthTensors, writeSynthCheckpoint } from "../testing.ts";

const SHAPE: SynthShape = {
  hiddenSize: 256,
  intermediateSize: 512,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  vocabSize: 512,
  tieWordEmbeddings: false,
};
const QUANTS: QuantName[] = ["none", "fp8", "fp8-channel", "fp8-block", "int8"];
const LINEAR = /\.(q|k|v|o|gate|up|down)_proj\.weight$/;

/** A backend that adds up the bytes its `copy` writes. */
function countingCopies(inner: Backend): Backend & { copied: number } {
  const counter = { copied: 0 };
  return new Proxy(inner, {
    get(target, prop) {
      if (prop === "copied") return counter.copied;
      const v = Reflect.get(target, prop, target);
      if (typeof v !== "function") return v;
      return (...args: unknown[]) => {
        if (prop === "copy") counter.copied += (args[0] as Tensor).nbytes;
        return v.apply(target, args);
      };
    },
  }) as Backend & { copied: number };
}

function kernelBytes(b: Backend, model: CausalLM): Map<string, Uint8Array> {
  return new Map(kernelTensors(model).map(([n, t]) => [n, b.download(t)]));
}

function assertSameBytes(a: Map<string, Uint8Array>, b: Map<string, Uint8Array>, what: string) {
  assert.deepEqual([...a.keys()], [...b.keys()], what);
  for (const [n, x] of a) assert.ok(equalBytes(x, b.get(n)!), `${what}: ${n} differs`);
}

async function withCheckpoints(fn: (a: string, b: string) => Promise<void>): Promise<void> {
  const root = await Deno.makeTempDir({ prefix: "layerwise-placement-" });
  try {
    for (const [dir, seed] of [["a", 1], ["b", 2]] as const) {
      await Deno.mkdir(`${root}/${dir}`);
      await writeSynthCheckpoint(`${root}/${dir}`, SHAPE, synthTensors(SHAPE, seed));
    }
    await fn(`${root}/a`, `${root}/b`);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

async function withWasm(fn: (b: Backend) => Promise<void> | void): Promise<void> {
  const b = await openWasmBackend({ threads: 1 });
  try {
    await fn(b);
  } finally {
    b.close();
  }
}

Deno.test("copyInto: a source that is its destination (same storage, offset, layout) copies nothing", async () => {
  await withWasm((inner) => {
    const b = countingCopies(inner);
    const t = b.empty([4, 8], DTYPES.bf16);
    try {
      copyInto(b, t, t);
      copyInto(b, t.narrow(0, 1, 2), t.narrow(0, 1, 2));
      assert.equal(b.copied, 0);
      // Same storage but another offset, or the same bytes seen with other strides: copied.
      copyInto(b, t.narrow(0, 0, 2), t.narrow(0, 2, 2));
      assert.equal(b.copied, 2 * 8 * 2);
    } finally {
      b.free(t.storage!);
    }
  });
});

for (const chunked of [false, true]) {
  Deno.test(`reload from files${chunked ? " in row chunks" : ""}: every plain copy into scratch is skipped, kernel bytes as without placement`, async () => {
    await withCheckpoints(async (dirA, dirB) => {
      await withWasm(async (inner) => {
        const b = countingCopies(inner);
        // 64 KiB chunks: the 256 KiB MLP weights come in four row chunks.
        const readChunkBytes = chunked ? 64 * 1024 : undefined;
        for (const quant of QUANTS) {
          const placed = await loadModel(dirA, { backend: b, quant });
          const plain = await loadModel(dirA, { backend: b, quant });
          const source = await openWeightSource(dirB);
          try {
            const linear = [...source.tensors.values()]
              .filter((t) => LINEAR.test(t.name))
              .reduce((a, t) => a + t.bytes, 0);
            const base = inner.allocatedBytes();
            const c0 = b.copied;
            await reloadWeights(placed, dirB, { readChunkBytes, staging: false });
            const withPlacement = b.copied - c0;
            assert.equal(inner.allocatedBytes(), base, `${quant}: everything freed`);
            const plan = validateWeights(plain, source);
            const c1 = b.copied;
            await reloadLayerwise(
              plain,
              streamWeights(b, source, plan, plain.readOrder, { readChunkBytes }),
            );
            const without = b.copied - c1;
            // Unquantized linears load straight into their kernel tensors: nothing to place.
            const skipped = quant === "none" ? 0 : linear;
            assert.ok(linear > 0);
            assert.equal(without - withPlacement, skipped, `${quant}: bytes not copied`);
            assertSameBytes(kernelBytes(b, placed), kernelBytes(b, plain), quant);
          } finally {
            source.close();
            for (const m of [placed, plain]) freeModel(inner, m);
          }
        }
      });
    });
  });
}

function freeModel(b: Backend, model: CausalLM): void {
  const seen = new Set<unknown>();
  for (const [, t] of kernelTensors(model)) {
    if (t.storage && !t.storage.freed && !seen.has(t.storage)) {
      seen.add(t.storage);
      b.free(t.storage);
    }
  }
}

/** `inner` with a read of `bad` that fills its destination with 0xff, then fails. */
function failingRead(inner: WeightSource, bad: string): WeightSource {
  const fail = (dst: Uint8Array): never => {
    dst.fill(0xff);
    throw new Error(`${bad}: disk gone`);
  };
  const failing = (dst: Uint8Array) => Promise.resolve().then(() => fail(dst));
  return {
    ...inner,
    readInto: (name, dst) => name === bad ? failing(dst) : inner.readInto(name, dst),
    readRowsInto: (name, s, e, dst) =>
      name === bad ? failing(dst) : inner.readRowsInto!(name, s, e, dst),
  };
}

for (const atomic of [true, false]) {
  Deno.test(`a read that fails after landing in scratch: ${atomic ? "atomic restores every kernel byte" : "layers after it keep their weights, the model is marked inconsistent"}, everything is freed`, async () => {
    await withCheckpoints(async (dirA, dirB) => {
      await withWasm(async (b) => {
        const model = await loadModel(dirA, { backend: b, quant: "fp8" });
        const inner = await openWeightSource(dirB);
        // A tensor that is read into its layer's scratch (checked by the test above).
        const bad = "model.layers.1.mlp.down_proj.weight";
        const source = failingRead(inner, bad);
        try {
          const before = kernelBytes(b, model);
          const base = b.allocatedBytes();
          const plan = validateWeights(model, source);
          const place = placeInScratch(model);
          await assert.rejects(
            reloadLayerwise(model, streamWeights(b, source, plan, model.readOrder, { place }), {
              atomic,
            }),
            /disk gone/,
          );
          assert.equal(b.allocatedBytes(), base, "scratch and reads freed");
          const after = kernelBytes(b, model);
          const changed = [...before].filter(([n, x]) => !equalBytes(x, after.get(n)!))
            .map(([n]) => n);
          if (atomic) {
            assert.deepEqual(changed, []);
            assert.equal(isInconsistent(model), false);
          } else {
            assert.equal(isInconsistent(model), true);
            // Nothing from the failed layer on, in read order, was written.
            for (const n of changed) {
              assert.ok(!/layers\.1\.mlp\.down_proj|lm_head|model\.norm/.test(n), n);
            }
            assert.ok(changed.length > 0);
          }
          // A reload that succeeds afterwards gives the bytes a fresh model gets.
          await reloadWeights(model, dirB, { staging: false });
          const fresh = await loadModel(dirB, { backend: b, quant: "fp8" });
          assertSameBytes(kernelBytes(b, model), kernelBytes(b, fresh), "after the failure");
          freeModel(b, fresh);
        } finally {
          inner.close();
          freeModel(b, model);
        }
      });
    });
  });
}

Deno.test("a load that fails while later reads are placed ahead: they land before the abort frees their scratch; atomic restores every kernel byte", async () => {
  await withCheckpoints(async (dirA, dirB) => {
    await withWasm(async (inner) => {
      const b = faultyBackend(inner);
      const model = await loadModel(dirA, { backend: b, quant: "fp8" });
      try {
        const before = kernelBytes(b, model);
        const base = b.allocatedBytes();
        // The 4th copy is the second layer's input norm (loaded straight into its kernel
        // tensor), when reads of that layer's linears are placed ahead in their scratch.
        b.arm("copy", 4);
        await assert.rejects(
          reloadWeights(model, dirB, { atomic: true, staging: false }),
          /injected failure of copy/,
        );
        assert.ok(b.fired);
        assert.equal(b.allocatedBytes(), base, "scratch and reads freed");
        assertSameBytes(kernelBytes(b, model), before, "restored");
      } finally {
        freeModel(inner, model);
      }
    });
  });
});

Deno.test("under maxBufferedBytes reads begin no layer ahead: a bound that an in-order reload without placement meets is met", async () => {
  await withCheckpoints(async (dirA, dirB) => {
    await withWasm(async (b) => {
      const placed = await loadModel(dirA, { backend: b, quant: "fp8" });
      const plain = await loadModel(dirA, { backend: b, quant: "fp8" });
      const source = await openWeightSource(dirB);
      try {
        const plan = validateWeights(plain, source);
        const r = await reloadLayerwise(plain, streamWeights(b, source, plan, plain.readOrder));
        const bound = r.peakBufferedBytes;
        assert.ok(bound > 0);
        const p = await reloadWeights(placed, dirB, { maxBufferedBytes: bound, staging: false });
        assert.ok(p.peakBufferedBytes <= bound, `${p.peakBufferedBytes} <= ${bound}`);
        assertSameBytes(kernelBytes(b, placed), kernelBytes(b, plain), "bounded");
        // Unbounded, reads begin the next layer ahead: more scratch at once, fewer buffers.
        const u = await reloadWeights(placed, dirB, { staging: false });
        assert.ok(u.peakBufferedBytes > bound, `${u.peakBufferedBytes} > ${bound}`);
      } finally {
        source.close();
        for (const m of [placed, plain]) freeModel(b, m);
      }
    });
  });
});

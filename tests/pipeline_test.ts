/**
 * The staged read path (ARCHITECTURE.md, "Read paths"): the block plan, the device ring and the cut
 * of big tensors into row chunks on any machine; on a GPU, kernel bytes identical to the simple
 * path for every fixture checkpoint and for synthetic ones (sharded, shuffled across shards,
 * tiny slots so tensors span several slots and the device ring wraps, a ring so small that big
 * tensors travel as row chunks), memory given back, and a file that shrank after validation
 * refused as TRUNCATED. Without a GPU the CUDA tests are registered as ignored.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import type { Backend } from "../src/backend/backend.ts";
import { cudaHandle, openCudaBackend } from "../src/backend/cuda/device.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import type { HostTensor } from "../src/checkpoint/safetensors.ts";
import { fileSource } from "../src/checkpoint/source.ts";
import {
  DeviceRing,
  emptyStagingStats,
  planBlocks,
  splitRows,
  type StagedTensor,
  type StagingOptions,
  type StagingStats,
} from "../src/backend/cuda/staging_plan.ts";
import { canStage, releaseStaging, stageTensors } from "../src/checkpoint/staging.ts";
import { rng, type SynthShape, synthTensors, writeSynthCheckpoint } from "../testing.ts";
import { downloadKernelTensors } from "../src/models/export.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { loadModel, reloadWeights } from "../src/models/load.ts";

const FIXTURES = new URL("../../shared/fixtures/ckpt/", import.meta.url);
const NAMES = ["llama-tiny", "llama-tiny-sharded", "qwen2-tiny", "mixtral-tiny"];

/** Tiny slots: tensors span several slots, reads split into chunks, the device ring wraps. */
const TINY: StagingOptions = {
  slotBytes: 64 * 1024,
  slots: 3,
  chunkBytes: 8 * 1024,
  readers: 4,
  deviceRingBytes: 512 * 1024,
};

const SHAPE: SynthShape = {
  hiddenSize: 256,
  intermediateSize: 640,
  numLayers: 3,
  numHeads: 4,
  numKvHeads: 2,
  vocabSize: 1100,
  tieWordEmbeddings: false,
};

// ------------------------------------------------------------------ plan (any machine)

/** Runs a plan against in-memory "files": reads into slots, pieces out to tensors. */
function replay(
  files: Uint8Array[],
  tensors: StagedTensor[],
  slotBytes: number,
  chunkBytes: number,
): Uint8Array[] {
  const out = tensors.map((t) => new Uint8Array(t.bytes).fill(0xee));
  const written = tensors.map(() => 0);
  for (const b of planBlocks(tensors, slotBytes, chunkBytes)) {
    const slot = new Uint8Array(slotBytes).fill(0xdd);
    for (const r of b.reads) {
      assert.ok(r.bytes > 0 && r.bytes <= chunkBytes, "read size within a chunk");
      assert.ok(r.slotAt >= 0 && r.slotAt + r.bytes <= slotBytes, "read inside the slot");
      slot.set(files[r.file].subarray(r.offset, r.offset + r.bytes), r.slotAt);
    }
    for (const p of b.pieces) {
      assert.ok(p.slotAt + p.bytes <= slotBytes, "piece inside the slot");
      assert.equal(p.at, written[p.tensor], "pieces of a tensor come in order, without gaps");
      out[p.tensor].set(slot.subarray(p.slotAt, p.slotAt + p.bytes), p.at);
      written[p.tensor] += p.bytes;
    }
  }
  assert.deepEqual(written, tensors.map((t) => t.bytes), "every byte of every tensor placed");
  return out;
}

Deno.test("staging plan: reads and pieces rebuild every tensor exactly (random layouts)", () => {
  fc.assert(
    fc.property(
      fc.array(fc.array(fc.integer({ min: 0, max: 300 }), { minLength: 1, maxLength: 8 }), {
        minLength: 1,
        maxLength: 3,
      }),
      fc.integer({ min: 1, max: 256 }),
      fc.integer({ min: 1, max: 64 }),
      fc.integer({ min: 0, max: 1000 }),
      (sizes, slotBytes, chunkBytes, seed) => {
        // Files of back-to-back tensors (some with gaps), read in a shuffled order.
        const files: Uint8Array[] = [];
        const tensors: StagedTensor[] = [];
        sizes.forEach((list, f) => {
          let at = 8;
          for (const [k, n] of list.entries()) {
            tensors.push({ name: `f${f}t${k}`, file: f, offset: at, bytes: n });
            at += n + (k % 3 === 2 ? 5 : 0);
          }
          const data = new Uint8Array(at + 3);
          for (let i = 0; i < data.length; i++) data[i] = (i * 31 + f * 7 + seed) & 0xff;
          files.push(data);
        });
        let s = seed;
        for (let i = tensors.length - 1; i > 0; i--) {
          s = (s * 1103515245 + 12345) & 0x7fffffff;
          const j = s % (i + 1);
          [tensors[i], tensors[j]] = [tensors[j], tensors[i]];
        }
        const got = replay(files, tensors, slotBytes, chunkBytes);
        tensors.forEach((t, i) => {
          const want = files[t.file].subarray(t.offset, t.offset + t.bytes);
          assert.deepEqual(got[i], want, `${t.name} bytes`);
        });
      },
    ),
    { numRuns: 300 },
  );
});

Deno.test("staging plan: neighbours in one file are read with one call per chunk", () => {
  const tensors: StagedTensor[] = [
    { name: "a", file: 0, offset: 100, bytes: 10 },
    { name: "b", file: 0, offset: 110, bytes: 20 },
    { name: "c", file: 1, offset: 0, bytes: 5 },
    { name: "d", file: 0, offset: 200, bytes: 5 },
  ];
  const blocks = planBlocks(tensors, 1000, 1000);
  assert.equal(blocks.length, 1);
  assert.deepEqual(blocks[0].reads.map((r) => [r.file, r.offset, r.bytes]), [
    [0, 100, 30],
    [1, 0, 5],
    [0, 200, 5],
  ]);
  assert.throws(() => planBlocks(tensors, 0, 10), /positive/);
});

Deno.test("device ring: a place never overlaps one still held, and overwrites are reported", () => {
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: 0, max: 600 }), { minLength: 1, maxLength: 60 }),
      (sizes) => {
        const cap = 1024;
        const ring = new DeviceRing(cap);
        const held = new Map<number, [number, number]>();
        sizes.forEach((n, i) => {
          if (!ring.fits(n)) {
            assert.ok(n > cap / 2);
            return;
          }
          const { offset, overwrites } = ring.place(n, i);
          assert.equal(offset % 256, 0, "aligned");
          assert.ok(offset + n <= cap, "inside the ring");
          for (const w of overwrites) held.delete(w);
          for (const [o, [b, e]] of held) {
            assert.ok(!(b < offset + n && offset < e), `place of ${i} overlaps ${o} still held`);
          }
          held.set(i, [offset, offset + Math.max(n, 1)]);
        });
      },
    ),
    { numRuns: 300 },
  );
});

Deno.test("staging rows: big tensors become consecutive row chunks that rebuild them exactly", () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.tuple(
          fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 3 }),
          fc.constantFrom(1, 2, 4),
        ),
        { minLength: 1, maxLength: 6 },
      ),
      fc.integer({ min: 1, max: 600 }),
      (specs, maxBytes) => {
        const shapes = new Map<string, number[]>();
        let at = 16;
        const tensors: StagedTensor[] = specs.map(([shape, size], i) => {
          const bytes = shape.reduce((a, d) => a * d, size);
          shapes.set(`t${i}`, shape);
          const t = { name: `t${i}`, file: i % 2, offset: at, bytes };
          at += bytes;
          return t;
        });
        const out = splitRows(tensors, (n) => shapes.get(n)!, maxBytes);
        for (const t of tensors) {
          const parts = out.filter((p) => p.name === t.name);
          const shape = shapes.get(t.name)!;
          const rowBytes = t.bytes / shape[0];
          if (shape.length < 2 || t.bytes <= maxBytes || rowBytes > maxBytes) {
            assert.deepEqual(parts, [t], `${t.name} stays whole`);
            continue;
          }
          let row = 0, offset = t.offset;
          for (const p of parts) {
            assert.equal(p.file, t.file);
            assert.equal(p.rows!.start, row, "consecutive rows");
            assert.equal(p.offset, offset, "consecutive bytes");
            assert.equal(p.bytes, (p.rows!.end - p.rows!.start) * rowBytes);
            assert.ok(p.bytes <= maxBytes && p.bytes > 0, "within the bound");
            row = p.rows!.end;
            offset += p.bytes;
          }
          assert.equal(row, shape[0], "every row");
        }
        // The read order is kept: chunks of a tensor take its place.
        assert.deepEqual([...new Set(out.map((p) => p.name))], tensors.map((t) => t.name));
      },
    ),
    { numRuns: 300 },
  );
  assert.throws(() => splitRows([], () => [], 0), /positive/);
});

Deno.test("staging: the WebAssembly backend takes the simple path with the same bytes", async () => {
  const wasm = await openWasmBackend();
  try {
    assert.equal(canStage(wasm), false);
    const dir = new URL("llama-tiny-sharded/", FIXTURES).pathname;
    const a = await loadModel(dir, { backend: wasm, staging: false });
    const b = await loadModel(dir, { backend: wasm, staging: TINY });
    assertSameKernels(downloadKernelTensors(a), downloadKernelTensors(b), "wasm");
  } finally {
    wasm.close();
  }
});

// ------------------------------------------------------------------ CUDA

function assertSameKernels(
  want: Map<string, HostTensor>,
  got: Map<string, HostTensor>,
  label: string,
): void {
  assert.ok(want.size > 0);
  assert.deepEqual([...got.keys()], [...want.keys()], `${label}: kernel tensor names`);
  for (const [name, w] of want) {
    const g = got.get(name)!;
    assert.equal(g.dtype.name, w.dtype.name, `${label}: ${name} dtype`);
    assert.deepEqual(g.shape, w.shape, `${label}: ${name} shape`);
    assert.ok(Buffer.from(g.data).equals(Buffer.from(w.data)), `${label}: ${name} bytes differ`);
  }
}

let cuda: Backend | undefined;
try {
  cuda = openCudaBackend();
} catch {
  cuda = undefined;
}

function gpuTest(name: string, fn: (c: Backend) => Promise<void>): void {
  Deno.test({
    name: `cuda staging: ${name}`,
    ignore: cuda === undefined,
    sanitizeResources: false,
    fn: () => fn(cuda!),
  });
}

async function withTemp<T>(f: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "layerwise-pipeline-" });
  try {
    return await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** A synthetic checkpoint; `shuffle` scatters the tensors across the shards. */
async function synth(dir: string, seed: number, shards: number, shuffle: boolean): Promise<void> {
  const t = synthTensors(SHAPE, seed);
  const entries = [...t];
  if (shuffle) {
    let s = seed;
    for (let i = entries.length - 1; i > 0; i--) {
      s = (s * 1103515245 + 12345) & 0x7fffffff;
      const j = s % (i + 1);
      [entries[i], entries[j]] = [entries[j], entries[i]];
    }
  }
  await Deno.mkdir(dir, { recursive: true });
  await writeSynthCheckpoint(dir, SHAPE, new Map(entries), shards);
}

gpuTest("first load of every fixture: same kernel bytes as the simple path", async (c) => {
  for (const name of NAMES) {
    const dir = new URL(`${name}/`, FIXTURES).pathname;
    for (const opts of [TINY, {}]) {
      const a = await loadModel(dir, { backend: c, staging: false });
      const b = await loadModel(dir, { backend: c, staging: opts });
      assertSameKernels(downloadKernelTensors(a), downloadKernelTensors(b), name);
    }
  }
});

gpuTest(
  "reloads of synthetic checkpoints (sharded, shuffled): same bytes as the simple path",
  async (c) => {
    await withTemp(async (tmp) => {
      await synth(`${tmp}/a`, 1, 1, false);
      await synth(`${tmp}/b`, 2, 3, false);
      await synth(`${tmp}/c`, 3, 4, true);
      for (const quant of ["fp8", "fp8-block", "int8"] as const) {
        for (const opts of [TINY, {}]) {
          const simple = await loadModel(`${tmp}/a`, { backend: c, quant, staging: false });
          const staged = await loadModel(`${tmp}/a`, { backend: c, quant, staging: opts });
          const h = cudaHandle(c)!;
          for (const src of ["b", "c"]) {
            const before = c.allocatedBytes();
            await reloadWeights(simple, `${tmp}/${src}`, { staging: false });
            const r = await reloadWeights(staged, `${tmp}/${src}`, { staging: opts });
            assert.ok(r.storageKept);
            assertSameKernels(
              downloadKernelTensors(simple),
              downloadKernelTensors(staged),
              `${quant} ${src}`,
            );
            assert.equal(c.allocatedBytes(), before, "device memory given back");
            assert.equal(h.pool.cachedBytes, 0, "no block left in the reuse cache");
          }
        }
      }
    });
  },
);

/**
 * Streams `dir` with `opts` and checks each tensor (or row chunk) against the file's bytes:
 * the whole shape, chunks in row order, every row of every tensor; `each` sees every handout
 * with its downloaded bytes. Returns the stats and the names streamed.
 */
async function streamMatchesFiles(
  c: Backend,
  dir: string,
  opts: StagingOptions,
  label: string,
  each?: (name: string, t: Tensor, got: Uint8Array) => void,
): Promise<{ stats: StagingStats; names: string[] }> {
  const source = await fileSource(dir);
  try {
    const stats = emptyStagingStats();
    const names = source.plan();
    const rowsSeen = new Map<string, number>();
    let total = 0, seen = 0;
    for await (const [name, t] of stageTensors(c, source, names, opts, stats)) {
      const info = source.tensors.get(name)!;
      assert.deepEqual(t.shape, info.shape, `${label}: ${name}: the whole shape`);
      const want = new Uint8Array(info.bytes);
      await source.readInto(name, want);
      const { start, end } = t.rowRange;
      const rows = info.shape.length === 0 ? 1 : info.shape[0];
      const rb = info.bytes / rows;
      assert.equal(start, rowsSeen.get(name) ?? 0, `${label}: ${name}: chunks in row order`);
      rowsSeen.set(name, end);
      const got = c.download(t.windowRows());
      assert.ok(
        Buffer.from(got).equals(Buffer.from(want.subarray(start * rb, end * rb))),
        `${label}: ${name} rows [${start}, ${end})`,
      );
      each?.(name, t, got);
      if (end === rows) seen++;
      total += got.length;
    }
    for (const n of names) {
      const shape = source.tensors.get(n)!.shape;
      assert.equal(rowsSeen.get(n), shape.length === 0 ? 1 : shape[0], `${label}: ${n}: every row`);
    }
    assert.equal(seen, names.length, `${label}: every tensor`);
    assert.equal(stats.bytes, total, `${label}: stats.bytes counts what was handed out`);
    assert.ok(stats.copyWaitReadsSeconds! >= 0 && stats.copyWaitConsumerSeconds! >= 0);
    return { stats, names };
  } finally {
    source.close();
  }
}

/** A ring so small that the embedding, lm_head and MLP weights travel as row chunks. */
const CHUNKED: StagingOptions = { ...TINY, deviceRingBytes: 256 * 1024, maxChunkBytes: 40 * 1024 };

gpuTest(
  "big tensors travel as row chunks: no dedicated block, each chunk holds its rows' bytes, same kernels",
  async (c) => {
    await withTemp(async (tmp) => {
      await synth(`${tmp}/a`, 1, 1, false);
      await synth(`${tmp}/b`, 2, 3, true);
      const before = c.allocatedBytes();
      const { stats, names } = await streamMatchesFiles(
        c,
        `${tmp}/b`,
        CHUNKED,
        "chunked",
        (name, t, got) => {
          if (t.window) assert.ok(got.length <= 40 * 1024, `${name}: chunk within maxChunkBytes`);
        },
      );
      assert.equal(stats.dedicated, 0, "no tensor got a device block of its own");
      assert.ok((stats.chunks ?? 0) > names.length, `${stats.chunks} chunks`);
      assert.ok(stats.deviceRingBytes <= 256 * 1024);
      assert.equal(c.allocatedBytes(), before, "device memory given back");
      for (const quant of ["fp8", "fp8-block", "int8"] as const) {
        const simple = await loadModel(`${tmp}/a`, { backend: c, quant, staging: false });
        const staged = await loadModel(`${tmp}/a`, { backend: c, quant, staging: CHUNKED });
        assertSameKernels(
          downloadKernelTensors(simple),
          downloadKernelTensors(staged),
          `${quant} first load`,
        );
        await reloadWeights(simple, `${tmp}/b`, { staging: false });
        const r = await reloadWeights(staged, `${tmp}/b`, { staging: CHUNKED });
        assert.ok(r.storageKept);
        assertSameKernels(
          downloadKernelTensors(simple),
          downloadKernelTensors(staged),
          `${quant} reload`,
        );
      }
    });
  },
);

gpuTest(
  "a shard that shrank after validation is refused as TRUNCATED; the next reload works",
  async (c) => {
    await withTemp(async (tmp) => {
      await synth(`${tmp}/a`, 1, 2, false);
      await synth(`${tmp}/b`, 2, 2, false);
      const model = await loadModel(`${tmp}/a`, { backend: c });
      const source = await fileSource(`${tmp}/b`);
      try {
        const shard = `${tmp}/b/model-00002-of-00002.safetensors`;
        const size = (await Deno.stat(shard)).size;
        await Deno.truncate(shard, size - 1000);
        await assert.rejects(
          () => reloadWeights(model, source, { staging: TINY }),
          (e: Error & { code?: string }) => e.code === "TRUNCATED",
        );
      } finally {
        source.close();
      }
      await reloadWeights(model, `${tmp}/a`, { staging: TINY });
      const ref = await loadModel(`${tmp}/a`, { backend: c, staging: false });
      assertSameKernels(downloadKernelTensors(ref), downloadKernelTensors(model), "after failure");
    });
  },
);

gpuTest(
  "the library's threads on odd ring shapes (1-4 slots, slots not a multiple of the pread size, 1-9 readers): every byte as in the files",
  async (c) => {
    await withTemp(async (tmp) => {
      await synth(`${tmp}/b`, 5, 3, true);
      const next = rng(7);
      const pick = (lo: number, hi: number) => lo + Math.floor(next() * (hi - lo + 1));
      for (let k = 0; k < 8; k++) {
        const opts: StagingOptions = {
          slots: pick(1, 4),
          slotBytes: pick(1000, 200_000),
          chunkBytes: pick(512, 70_000),
          readers: pick(1, 9),
          deviceRingBytes: pick(300, 2000) * 1024,
          maxChunkBytes: pick(8, 200) * 1024,
        };
        const before = c.allocatedBytes();
        await streamMatchesFiles(c, `${tmp}/b`, opts, JSON.stringify(opts));
        assert.equal(c.allocatedBytes(), before, "device memory given back");
      }
    });
  },
);

gpuTest(
  "a consumer that stops early: the threads stop, memory is given back, the next stream is whole",
  async (c) => {
    await withTemp(async (tmp) => {
      await synth(`${tmp}/b`, 6, 2, false);
      const source = await fileSource(`${tmp}/b`);
      try {
        const before = c.allocatedBytes();
        for (const stopAt of [0, 1, 7]) {
          let n = 0;
          for await (const _ of stageTensors(c, source, source.plan(), TINY)) {
            if (n++ === stopAt) break;
          }
          assert.equal(c.allocatedBytes(), before, `stopped after ${stopAt + 1}: memory back`);
        }
        // A consumer that throws mid-stream, too.
        await assert.rejects(async () => {
          let n = 0;
          for await (const _ of stageTensors(c, source, source.plan(), TINY)) {
            if (n++ === 3) throw new Error("consumer failed");
          }
        }, /consumer failed/);
        assert.equal(c.allocatedBytes(), before, "after a throwing consumer: memory back");
      } finally {
        source.close();
      }
      await streamMatchesFiles(c, `${tmp}/b`, TINY, "after early stops");
    });
  },
);

gpuTest("staging sizes that are not positive integers are refused as BAD_OPTION", async (c) => {
  await withTemp(async (tmp) => {
    await synth(`${tmp}/b`, 6, 1, false);
    const source = await fileSource(`${tmp}/b`);
    try {
      for (const bad of [{ readers: 0 }, { slots: 1.5 }, { slotBytes: -1 }, { chunkBytes: NaN }]) {
        await assert.rejects(
          async () => {
            for await (const _ of stageTensors(c, source, source.plan(), bad)) { /* none */ }
          },
          (e: Error & { code?: string }) =>
            e.code === "BAD_OPTION" && e.message.includes(Object.keys(bad)[0]),
          JSON.stringify(bad),
        );
      }
    } finally {
      source.close();
    }
  });
});

if (cuda) {
  Deno.test({
    name: "cuda staging: release the backend",
    sanitizeResources: false,
    fn: () => {
      releaseStaging(cuda!);
      cuda!.close();
    },
  });
}

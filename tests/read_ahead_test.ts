/**
 * The simple read path on WebAssembly reads ahead: the next units are read into the backend's
 * memory while the consumer holds the current one, never more than one read chunk ahead; the
 * bytes are the source's; a failed read surfaces at its turn and frees what was read ahead.
 */
import assert from "node:assert/strict";
import type { Backend } from "../src/backend/backend.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import { memorySource, type WeightSource } from "../src/checkpoint/source.ts";
import { streamWeights, type ValidatedWeights } from "../src/models/weights.ts";
import type { Tensor } from "../src/tensor/tensor.ts";

const CHUNK = 8192;
// Four 4 KiB tensors, then one of 32 KiB that travels as 8 KiB row chunks, then one more.
const SHAPES: [string, number[]][] = [
  ["a", [32, 64]],
  ["b", [32, 64]],
  ["c", [32, 64]],
  ["d", [32, 64]],
  ["big", [256, 64]],
  ["e", [32, 64]],
];

function bytesOf(name: string, shape: number[]): Uint8Array {
  const n = shape.reduce((x, y) => x * y, 1) * 2;
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 31 + name.charCodeAt(0)) & 0xff;
  return out;
}

/** The source, with each read's start logged (and made to finish a task later). */
function loggedSource(log: string[], failOn?: string): WeightSource {
  const inner = memorySource(
    SHAPES.map(([n, s]) => [n, { dtype: "bf16", shape: s, data: bytesOf(n, s) }] as const),
  );
  const later = () => new Promise((r) => setTimeout(r, 1));
  return {
    ...inner,
    readInto: async (name, dst) => {
      log.push(`read ${name}`);
      await later();
      if (name === failOn) throw new Error(`cannot read ${name}`);
      await inner.readInto(name, dst);
    },
    readRowsInto: async (name, a, b, dst) => {
      log.push(`read ${name}[${a}:${b}]`);
      await later();
      await inner.readRowsInto!(name, a, b, dst);
    },
  };
}

function plan(): ValidatedWeights {
  const names = SHAPES.map(([n]) => n);
  const bytes = SHAPES.reduce((x, [n, s]) => x + bytesOf(n, s).byteLength, 0);
  return { names, skipped: [], unexpected: [], missing: [], bytes, layers: new Map([[0, 6]]) };
}

/** Asserts that a streamed unit holds the source's bytes of its rows; returns its first row. */
function assertSourceBytes(b: Backend, name: string, t: Tensor): number {
  const w = t.windowRows();
  const start = t.window ? t.window.start : 0;
  const rowBytes = 64 * 2;
  const want = bytesOf(name, SHAPES.find(([n]) => n === name)![1])
    .subarray(start * rowBytes, start * rowBytes + w.nbytes);
  assert.deepEqual(b.download(w), want, `bytes of ${name} from row ${start}`);
  return start;
}

async function withWasm(fn: (b: Backend) => Promise<void>): Promise<void> {
  const b = await openWasmBackend({ threads: 1 });
  try {
    await fn(b);
  } finally {
    b.close();
  }
}

Deno.test("read-ahead: the next units are read while the current one is used, at most a chunk ahead", async () => {
  await withWasm(async (b) => {
    const log: string[] = [];
    const base = b.allocatedBytes();
    const stream = streamWeights(b, loggedSource(log), plan(), () => 0, {
      readChunkBytes: CHUNK,
      staging: false,
    });
    for await (const [name, t] of stream) {
      const w = t.windowRows();
      const start = assertSourceBytes(b, name, t);
      // Held now: the unit given plus what is read ahead, at most one chunk of it.
      assert.ok(b.allocatedBytes() - base <= w.nbytes + CHUNK, `memory at ${name}`);
      log.push(`use ${name}${t.window ? `@${start}` : ""}`);
    }
    assert.equal(b.allocatedBytes(), base, "everything freed");
    assert.deepEqual(log.slice(0, 5), ["read a", "read b", "read c", "use a", "read d"]);
    // Every unit's read started before the previous unit was used.
    const uses = log.filter((l) => l.startsWith("use"));
    const reads = log.filter((l) => l.startsWith("read"));
    assert.equal(uses.length, reads.length);
    for (let i = 1; i < reads.length; i++) {
      assert.ok(
        log.indexOf(reads[i]) < log.indexOf(uses[i - 1]),
        `${reads[i]} before ${uses[i - 1]}`,
      );
    }
  });
});

Deno.test("read-ahead: a failed read surfaces at its turn, and what was read ahead is freed", async () => {
  await withWasm(async (b) => {
    const log: string[] = [];
    const base = b.allocatedBytes();
    const used: string[] = [];
    await assert.rejects(async () => {
      const stream = streamWeights(b, loggedSource(log, "c"), plan(), () => 0, {
        readChunkBytes: CHUNK,
        staging: false,
      });
      for await (const [name] of stream) used.push(name);
    }, /cannot read c/);
    assert.deepEqual(used, ["a", "b"], "the units before the failed one were given");
    assert.equal(b.allocatedBytes(), base, "no tensor left allocated");
  });
});

/**
 * The backend without its host view (as CUDA is): reads go through one host buffer, so they
 * must not overlap. Methods are bound to the real backend, whose private state they use.
 */
function withoutHostView(b: Backend): Backend {
  const out: Record<string, unknown> = {};
  for (let o: object | null = b; o && o !== Object.prototype; o = Object.getPrototypeOf(o)) {
    for (const key of Object.getOwnPropertyNames(o)) {
      if (key in out || key === "constructor" || key === "hostView") continue;
      const v = (b as unknown as Record<string, unknown>)[key];
      out[key] = typeof v === "function" ? v.bind(b) : v;
    }
  }
  return out as unknown as Backend;
}

Deno.test("read path without a host view: one read at a time through the host buffer, every byte the source's", async () => {
  await withWasm(async (real) => {
    const b = withoutHostView(real);
    assert.equal(b.hostView, undefined);
    const log: string[] = [];
    const base = b.allocatedBytes();
    const stream = streamWeights(b, loggedSource(log), plan(), () => 0, {
      readChunkBytes: CHUNK,
      staging: false,
    });
    for await (const [name, t] of stream) {
      const start = assertSourceBytes(b, name, t);
      log.push(`use ${name}${t.window ? `@${start}` : ""}`);
    }
    assert.equal(b.allocatedBytes(), base, "everything freed");
    // Reads and uses alternate: no read starts while another is unfinished.
    log.forEach((l, i) => assert.equal(l.startsWith("read"), i % 2 === 0, `${i}: ${l}`));
  });
});

/**
 * NCCL updates over real HTTP on WebAssembly, through the fake NCCL of the testing entry point
 * (the trainer's broadcasts are byte arrays written where the server receives): NCCL = disk
 * bytes, every refusal before any receive with the model untouched, failures after the first
 * receive that still receive every bucket, the communicator's life (init, close, stop), and the
 * bucket plan equal to the Python client's `pack_buckets` for arbitrary sizes.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { type HostTensor, parseSafetensorsHeader } from "../src/checkpoint/safetensors.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import type { Backend } from "../src/backend/backend.ts";
import { planBuckets } from "../src/parallel/broadcast.ts";
import { startServer, type WeightServer } from "../src/server/server.ts";
import { commandSucceeds, equalBytes, fakeNccl, fetchExport } from "../testing.ts";
import type { FakeNccl } from "../testing.ts";

const FIXTURES = new URL("../../shared/fixtures/", import.meta.url).pathname;
const LLAMA = `${FIXTURES}ckpt/llama-tiny`;
const LLAMA_FILE = `${LLAMA}/model.safetensors`;
const CLIENT_DIR = new URL("../clients/python/", import.meta.url).pathname;

async function call(
  s: WeightServer,
  method: string,
  path: string,
  body?: unknown,
): Promise<{ status: number; json: Record<string, unknown> }> {
  const r = await fetch(`${s.url}${path}`, {
    method,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, json: text === "" ? {} : JSON.parse(text) };
}

function codeOf(r: { json: Record<string, unknown> }): string {
  return (r.json.error as { code: string }).code;
}

/** The server's /v1/export, parsed. */
const exported = (s: WeightServer) => fetchExport(s.url);

function assertSame(a: Map<string, HostTensor>, b: Map<string, HostTensor>, what: string) {
  assert.deepEqual([...a.keys()].sort(), [...b.keys()].sort(), `${what}: names`);
  for (const [name, t] of a) assert.ok(equalBytes(t.data, b.get(name)!.data), `${what}: ${name}`);
}

/** The fixture with every bf16 value multiplied by `factor` (exact for powers of two). */
async function scaled(factor: number): Promise<Uint8Array<ArrayBuffer>> {
  const bytes = await Deno.readFile(LLAMA_FILE);
  const h = parseSafetensorsHeader(bytes, bytes.byteLength, LLAMA_FILE);
  const view = new DataView(bytes.buffer);
  for (const e of h.tensors.values()) {
    if (e.dtype.name !== "bf16") continue;
    for (let at = e.begin; at < e.end; at += 2) {
      const f = new Float32Array(new Uint32Array([view.getUint16(at, true) << 16]).buffer)[0];
      view.setUint16(at, new Uint32Array(new Float32Array([f * factor]).buffer)[0] >>> 16, true);
    }
  }
  return bytes;
}

interface Entry {
  name: string;
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

/** A checkpoint file's tensors as a trainer lists them (reversed: order is the trainer's). */
function entries(file: Uint8Array): Entry[] {
  const h = parseSafetensorsHeader(file, file.byteLength, "trainer");
  return [...h.tensors.values()].reverse().map((e) => ({
    name: e.name,
    dtype: e.dtype.safetensors,
    shape: [...e.shape],
    data: file.slice(e.begin, e.end),
  }));
}

/** What the trainer broadcasts for `list`: the packed buckets, queued on the fake. */
function broadcastAll(nccl: FakeNccl, list: Entry[], bucketBytes: number): number {
  const byName = new Map(list.map((e) => [e.name, e.data]));
  const plan = planBuckets(list.map((e) => e.name), (n) => byName.get(n)!.byteLength, bucketBytes);
  for (const b of plan.buckets) {
    const bytes = new Uint8Array(b.bytes);
    b.names.forEach((n, k) => bytes.set(byName.get(n)!, b.offsets[k]));
    nccl.broadcast(bytes);
  }
  return plan.buckets.length;
}

function table(list: Entry[], bucketBytes: number, extra: Record<string, unknown> = {}) {
  return {
    tensors: list.map(({ name, dtype, shape }) => ({ name, dtype, shape })),
    bucket_bytes: bucketBytes,
    ...extra,
  };
}

async function withNccl(
  f: (s: WeightServer, nccl: FakeNccl, backend: Backend) => Promise<void>,
  dir?: string,
): Promise<FakeNccl> {
  const backend = await openWasmBackend();
  const nccl = fakeNccl(backend);
  const s = await startServer({
    model: LLAMA,
    backend,
    port: 0,
    allowPaths: dir === undefined ? [LLAMA] : [LLAMA, dir],
    ncclJoiner: () => nccl.joiner,
  });
  await s.ready;
  try {
    await f(s, nccl, backend);
  } finally {
    await s.stop();
  }
  return nccl;
}

async function join(s: WeightServer, nccl: FakeNccl): Promise<void> {
  const r = await call(s, "POST", "/v1/update/nccl/init", {
    unique_id: nccl.uniqueId(),
    world_size: 2,
    rank_offset: 1,
  });
  assert.equal(r.status, 200, JSON.stringify(r.json));
  assert.deepEqual(r.json, { rank: 1, world_size: 2 });
}

Deno.test("server nccl: an NCCL update gives the kernel bytes of a disk update of the same weights", async () => {
  const dir = await Deno.makeTempDir({ prefix: "layerwise-nccl-" });
  try {
    const file = await scaled(2);
    await Deno.writeFile(`${dir}/model.safetensors`, file);
    const nccl = await withNccl(async (s, nccl) => {
      const base = await exported(s);
      const disk = await call(s, "POST", "/v1/update/disk", { path: dir });
      assert.equal(disk.status, 200, JSON.stringify(disk.json));
      const byDisk = await exported(s);
      await call(s, "POST", "/v1/update/disk", { path: LLAMA });
      assertSame(await exported(s), base, "back to the fixture");

      await join(s, nccl);
      const m = await call(s, "GET", "/v1/model");
      assert.deepEqual(m.json.nccl, { joined: true, rank: 1, world_size: 2 });
      const list = entries(file);
      // Small buckets: many of them, tensors larger than one, layers spread over several.
      for (const bucketBytes of [4096, 1 << 20]) {
        const n = broadcastAll(nccl, list, bucketBytes);
        const from = nccl.received.length;
        const r = await call(s, "POST", "/v1/update/nccl", table(list, bucketBytes, { tag: "n" }));
        assert.equal(r.status, 200, JSON.stringify(r.json));
        assert.equal(r.json.path, "nccl");
        assert.equal(r.json.tag, "n");
        assert.equal(r.json.storageKept, true);
        assert.equal(nccl.pending(), 0, "every bucket received");
        assert.equal(nccl.received.length - from, n);
        assert.ok(nccl.received.slice(from).every((x) => x.root === 0), "root is the trainer");
        assertSame(await exported(s), byDisk, `nccl (${bucketBytes}) vs disk`);
        await call(s, "POST", "/v1/update/disk", { path: LLAMA });
      }
      assert.ok(nccl.received.length > 5, `${nccl.received.length} buckets`);
    }, dir);
    assert.equal(nccl.closed(), 1, "the stop leaves the communicator");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("server nccl: refusals come before any receive, keep the model and leave the communicator", async () => {
  await withNccl(async (s, nccl) => {
    const list = entries(await scaled(2));
    const base = await exported(s);
    // No communicator yet.
    const none = await call(s, "POST", "/v1/update/nccl", table(list, 4096));
    assert.equal(none.status, 409);
    assert.equal(codeOf(none), "NO_COMMUNICATOR");

    const bf = list.find((e) => e.dtype === "BF16" && e.shape.length === 2)!;
    const cases: [string, unknown, number, string][] = [
      ["wrong dtype", table(list.map((e) => e === bf ? { ...e, dtype: "I32" } : e), 4096), 422, ""],
      [
        "wrong shape",
        table(list.map((e) => e === bf ? { ...e, shape: [1, 2] } : e), 4096),
        422,
        "",
      ],
      ["missing tensor", table(list.filter((e) => e !== bf), 4096), 422, ""],
      [
        "unknown, strict",
        table([...list, { ...bf, name: "model.extra" }], 4096, { strict: true }),
        422,
        "",
      ],
      ["name twice", table([...list, bf], 4096), 400, "BAD_NCCL_TABLE"],
      [
        "unknown dtype",
        table(list.map((e) => e === bf ? { ...e, dtype: "Q4" } : e), 4096),
        400,
        "BAD_NCCL_TABLE",
      ],
      ["bucket_bytes 0", table(list, 0), 400, "BAD_NCCL_TABLE"],
      ["src_rank is the server", table(list, 4096, { src_rank: 1 }), 400, "BAD_NCCL_TABLE"],
      ["unknown field", table(list, 4096, { bucket: 1 }), 400, "UNKNOWN_FIELD"],
    ];
    for (const [what, body, status, code] of cases) {
      await join(s, nccl);
      const r = await call(s, "POST", "/v1/update/nccl", body);
      assert.equal(r.status, status, `${what}: ${JSON.stringify(r.json)}`);
      if (code) assert.equal(codeOf(r), code, what);
      assert.equal(nccl.received.length, 0, `${what}: nothing received`);
      assertSame(await exported(s), base, what);
      const m = await call(s, "GET", "/v1/model");
      // The trainer's broadcasts are never matched: the server leaves the communicator.
      assert.deepEqual(m.json.nccl, { joined: false }, what);
      assert.equal((await call(s, "GET", "/v1/health")).status, 200, what);
    }
    assert.equal(nccl.joins.length, cases.length);
    // A unique id nobody made: the join fails, 422, nothing joined.
    const bad = await call(s, "POST", "/v1/update/nccl/init", {
      unique_id: btoa(String.fromCharCode(...new Uint8Array(128))),
      world_size: 2,
      rank_offset: 1,
    });
    assert.equal(bad.status, 422);
    assert.equal(codeOf(bad), "NCCL_INIT_FAILED");
    for (
      const body of [
        { unique_id: "abc", world_size: 2, rank_offset: 1 },
        { unique_id: nccl.uniqueId(), world_size: 1, rank_offset: 0 },
        { unique_id: nccl.uniqueId(), world_size: 2, rank_offset: 2 },
      ]
    ) {
      const r = await call(s, "POST", "/v1/update/nccl/init", body);
      assert.equal(r.status, 400, JSON.stringify(r.json));
      assert.equal(codeOf(r), "BAD_NCCL_INIT");
    }
  });
});

Deno.test("server nccl: a failure after the first receive still receives every bucket; atomic restores", async () => {
  await withNccl(async (s, nccl) => {
    const base = await exported(s);
    await join(s, nccl);
    const list = entries(await scaled(2));
    // An infinity in the last tensor the trainer sends: seen only once its bucket arrived.
    const last = list[list.length - 1];
    assert.equal(last.dtype, "BF16");
    const data = last.data.slice();
    new DataView(data.buffer).setUint16(0, 0x7f80, true);
    const bad = list.map((e) => e === last ? { ...e, data } : e);
    const n = broadcastAll(nccl, bad, 4096);
    const r = await call(s, "POST", "/v1/update/nccl", table(bad, 4096, { atomic: true }));
    assert.equal(r.status, 422, JSON.stringify(r.json));
    assert.match((r.json.error as { message: string }).message, /finite|Inf|inf/);
    assert.equal(nccl.received.length, n, "every bucket received");
    assert.equal(nccl.pending(), 0);
    assertSame(await exported(s), base, "restored");
    // Still in step: the next update over the same communicator works.
    broadcastAll(nccl, list, 4096);
    const ok = await call(s, "POST", "/v1/update/nccl", table(list, 4096));
    assert.equal(ok.status, 200, JSON.stringify(ok.json));
  });
});

Deno.test("server nccl: close, a backend without NCCL, a busy server", async () => {
  await withNccl(async (s, nccl) => {
    assert.equal(Deno.env.get("NCCL_NVLS_ENABLE"), "0", "NVLink multicast off for this process");
    await join(s, nccl);
    assert.deepEqual((await call(s, "POST", "/v1/update/nccl/close", {})).json, { closed: true });
    assert.deepEqual((await call(s, "POST", "/v1/update/nccl/close", {})).json, { closed: false });
    assert.equal(nccl.closed(), 1);
    await join(s, nccl);
    // Re-joining leaves the communicator joined before.
    await join(s, nccl);
    assert.equal(nccl.closed(), 2);
    const held = s.service.lock.acquire("test");
    try {
      const busy = await call(s, "POST", "/v1/update/nccl", table(entries(await scaled(1)), 4096));
      assert.equal(busy.status, 409);
      assert.equal(codeOf(busy), "UPDATE_RUNNING");
      const init = await call(s, "POST", "/v1/update/nccl/init", {
        unique_id: nccl.uniqueId(),
        world_size: 2,
        rank_offset: 1,
      });
      assert.equal(init.status, 409);
    } finally {
      s.service.lock.release(held);
    }
  });
  const s = await startServer({
    model: LLAMA,
    backend: "wasm",
    port: 0,
    ncclJoiner: () => undefined,
  });
  try {
    await s.ready;
    assert.equal((await call(s, "GET", "/v1/model")).json.nccl, false);
    for (
      const [path, body] of [
        ["/v1/update/nccl", { tensors: [], bucket_bytes: 1 }],
        ["/v1/update/nccl/init", {
          unique_id: btoa("x".repeat(128)),
          world_size: 2,
          rank_offset: 1,
        }],
      ] as const
    ) {
      const r = await call(s, "POST", path, body);
      assert.equal(r.status, 400, JSON.stringify(r.json));
      assert.equal(codeOf(r), "NCCL_UNSUPPORTED");
    }
  } finally {
    await s.stop();
  }
});

function hasPython(): boolean {
  return commandSucceeds("python3", ["--version"]);
}

Deno.test({
  name: "server nccl: the bucket plan is the Python client's pack_buckets",
  ignore: !hasPython(),
  fn: async () => {
    const cases = fc.sample(
      fc.record({
        sizes: fc.array(
          fc.oneof(fc.integer({ min: 0, max: 5000 }), fc.constantFrom(0, 1, 255, 256, 257)),
          { maxLength: 40 },
        ),
        bucketBytes: fc.integer({ min: 1, max: 6000 }),
      }),
      { numRuns: 300, seed: 17 },
    );
    const script = `
import json, sys
sys.path.insert(0, ${JSON.stringify(CLIENT_DIR)})
from layerwise_client import pack_buckets
out = []
for c in json.load(sys.stdin):
    cap, placements, lengths = pack_buckets(c["sizes"], c["bucketBytes"])
    out.append({"cap": cap, "placements": placements, "lengths": lengths})
print(json.dumps(out))
`;
    const p = new Deno.Command("python3", {
      args: ["-c", script],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const w = p.stdin.getWriter();
    await w.write(new TextEncoder().encode(JSON.stringify(cases)));
    await w.close();
    const o = await p.output();
    assert.ok(o.success, new TextDecoder().decode(o.stderr));
    const py = JSON.parse(new TextDecoder().decode(o.stdout));
    cases.forEach((c, k) => {
      const names = c.sizes.map((_, i) => `t${i}`);
      const plan = planBuckets(names, (n) => c.sizes[Number(n.slice(1))], c.bucketBytes);
      const placements: [number, number][] = [];
      plan.buckets.forEach((b, i) => b.offsets.forEach((o) => placements.push([i, o])));
      assert.deepEqual(
        { cap: plan.bucketBytes, placements, lengths: plan.buckets.map((b) => b.bytes) },
        py[k],
        JSON.stringify(c),
      );
      // The rule's promises: in order, aligned, within the capacity, no overlap.
      for (const b of plan.buckets) {
        b.offsets.forEach((o, j) => {
          assert.equal(o % 256, 0);
          const end = o + c.sizes[Number(b.names[j].slice(1))];
          assert.ok(end <= plan.bucketBytes);
          if (j + 1 < b.offsets.length) assert.ok(end <= b.offsets[j + 1]);
        });
      }
    });
  },
});

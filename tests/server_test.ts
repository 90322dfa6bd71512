/**
 * The weight-update server over real HTTP (fetch against an ephemeral port) on WebAssembly:
 * every endpoint, the streamed fixture against the PyTorch expectation, stream = disk = IPC,
 * and every failure with its status, the model state the contract promises, and a server that
 * answers the next request.
 */
import assert from "node:assert/strict";
import { loadSafetensors, parseSafetensorsHeader } from "../src/checkpoint/safetensors.ts";
import type { HostTensor } from "../src/checkpoint/safetensors.ts";
import { openWasmBackend } from "../src/backend/wasm.ts";
import { kernelTensors } from "../src/models/export.ts";
import {
  isLoopback,
  type ServeOptions,
  startServer,
  type WeightServer,
} from "../src/server/server.ts";
import { equalBytes, fakeIpc, fetchExport } from "../testing.ts";
import { ReplayCache } from "../src/server/replay.ts";

const FIXTURES = new URL("../../shared/fixtures/", import.meta.url).pathname;
const LLAMA = `${FIXTURES}ckpt/llama-tiny`;
const LLAMA_FILE = `${LLAMA}/model.safetensors`;
const EXPECT = `${FIXTURES}expect/llama-tiny.fp8-tensor.safetensors`;
const TOKEN = "0123456789abcdef-test-token";

// The GPU machine runs the same tests with LAYERWISE_SERVE_BACKEND=cuda; the IPC tests map fake
// buckets into WebAssembly memory and stay on wasm.
const BACKEND = (Deno.env.get("LAYERWISE_SERVE_BACKEND") ?? "wasm") as "wasm" | "cuda";

async function serve(o: Partial<ServeOptions> = {}): Promise<WeightServer> {
  const s = await startServer({ model: LLAMA, backend: BACKEND, port: 0, ...o });
  await s.ready;
  return s;
}

async function withServer(
  o: Partial<ServeOptions>,
  f: (s: WeightServer) => Promise<void>,
): Promise<void> {
  const s = await serve(o);
  try {
    await f(s);
  } finally {
    await s.stop();
  }
}

async function call(
  s: WeightServer,
  method: string,
  path: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; json: Record<string, unknown> }> {
  const r = await fetch(`${s.url}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, json: text === "" ? {} : JSON.parse(text) };
}

function errorOf(r: { json: Record<string, unknown> }): { code: string; message: string } {
  return r.json.error as { code: string; message: string };
}

/** The server's /v1/export, parsed. */
const exported = (s: WeightServer) => fetchExport(s.url);

function assertSameTensors(a: Map<string, HostTensor>, b: Map<string, HostTensor>, what: string) {
  assert.deepEqual([...a.keys()].sort(), [...b.keys()].sort(), `${what}: names`);
  for (const [name, t] of a) {
    const u = b.get(name)!;
    assert.equal(t.dtype.name, u.dtype.name, `${what}: ${name} dtype`);
    assert.deepEqual(t.shape, u.shape, `${what}: ${name} shape`);
    assert.ok(equalBytes(t.data, u.data), `${what}: ${name} bytes differ`);
  }
}

function assertDiffers(a: Map<string, HostTensor>, b: Map<string, HostTensor>, what: string) {
  assert.ok([...a].some(([n, t]) => !equalBytes(t.data, b.get(n)!.data)), `${what}: no change`);
}

/** Every kernel tensor's address, to check that none moved. */
function pointers(s: WeightServer): Map<string, number> {
  return new Map(kernelTensors(s.service.model!).map(([n, t]) => [n, t.ptr]));
}

/** The fixture with every bf16 value scaled by a power of two (exact), as another checkpoint. */
async function scaledCheckpoint(factor: number): Promise<Uint8Array<ArrayBuffer>> {
  const bytes = await Deno.readFile(LLAMA_FILE);
  const h = parseSafetensorsHeader(bytes, bytes.byteLength, LLAMA_FILE);
  const out = bytes.slice();
  const view = new DataView(out.buffer);
  for (const e of h.tensors.values()) {
    if (e.dtype.name !== "bf16") continue;
    for (let at = e.begin; at < e.end; at += 2) {
      const f = new Float32Array(new Uint32Array([view.getUint16(at, true) << 16]).buffer)[0];
      const g = new Uint32Array(new Float32Array([f * factor]).buffer)[0];
      view.setUint16(at, g >>> 16, true);
    }
  }
  return out;
}

async function putStream(
  s: WeightServer,
  body: BodyInit,
  query = "",
  headers: Record<string, string> = {},
) {
  const r = await fetch(`${s.url}/v1/update/stream${query}`, { method: "PUT", body, headers });
  return { status: r.status, json: JSON.parse(await r.text()) as Record<string, unknown> };
}

/** A body that sends `bytes[0, stopAt)` and then waits for `release` before the rest (or ends). */
function pausedBody(bytes: Uint8Array, stopAt: number, then: "rest" | "end" | "hang") {
  let release!: () => void;
  const gate = new Promise<void>((r) => release = r);
  let sent = false;
  const stream = new ReadableStream<Uint8Array>({
    async pull(c) {
      if (!sent) {
        sent = true;
        c.enqueue(bytes.slice(0, stopAt));
        return;
      }
      if (then === "hang") return await new Promise<void>(() => {});
      await gate;
      if (then === "rest") c.enqueue(bytes.slice(stopAt));
      c.close();
    },
  });
  return { stream, release };
}

async function waitFor(f: () => boolean | Promise<boolean>, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (await f()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Sends a PUT of the stream endpoint announcing all of `body` but sending `sent` bytes. */
async function rawPut(s: WeightServer, query: string, body: Uint8Array, sent: number) {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: s.port });
  const head =
    `PUT /v1/update/stream${query} HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.byteLength}\r\n\r\n`;
  await conn.write(new TextEncoder().encode(head));
  let at = 0;
  while (at < sent) at += await conn.write(body.subarray(at, sent));
  return conn;
}

/** Reads an answer (status line, headers, a JSON body) from a raw connection. */
async function readAnswer(conn: Deno.Conn): Promise<string> {
  const buf = new Uint8Array(4096);
  let text = "";
  while (!text.includes("}}")) {
    const n = await conn.read(buf);
    if (n === null) break;
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
  return text;
}

async function metricsText(s: WeightServer): Promise<string> {
  return await (await fetch(`${s.url}/metrics`)).text();
}

Deno.test("server: health is 503 before the first load and 200 after; model describes the tensors", async () => {
  const s = await startServer({ model: LLAMA, backend: BACKEND, port: 0 });
  try {
    const early = await fetch(`${s.url}/v1/health`);
    const body = await early.json();
    // The tiny model may load before the first request: either answer is the contract.
    if (early.status === 503) assert.equal(body.status, "loading");
    else assert.equal(body.status, "ok");
    await s.ready;
    const h = await call(s, "GET", "/v1/health");
    assert.equal(h.status, 200);
    assert.deepEqual(h.json, { status: "ok", version: 0, tag: null });
    const m = await call(s, "GET", "/v1/model");
    assert.equal(m.status, 200);
    assert.equal(m.json.architecture, "LlamaForCausalLM");
    assert.equal(m.json.quantization, "fp8-tensor");
    assert.equal(m.json.backend, BACKEND);
    assert.equal(m.json.ipc, BACKEND === "cuda");
    const header = parseSafetensorsHeader(
      await Deno.readFile(LLAMA_FILE),
      (await Deno.stat(LLAMA_FILE)).size,
      LLAMA_FILE,
    );
    const tensors = m.json.tensors as { name: string; dtype: string; shape: number[] }[];
    assert.equal(tensors.length, header.tensors.size);
    for (const t of tensors) {
      const e = header.tensors.get(t.name)!;
      assert.equal(t.dtype, e.dtype.safetensors, t.name);
      assert.deepEqual(t.shape, e.shape, t.name);
    }
  } finally {
    await s.stop();
  }
});

Deno.test("server: a streamed fixture gives the PyTorch expectation byte for byte, pointers kept", async () => {
  await withServer({}, async (s) => {
    const before = pointers(s);
    // Load something else first so the stream has to change every byte back.
    const other = await putStream(s, await scaledCheckpoint(4), "?tag=four");
    assert.equal(other.status, 200, JSON.stringify(other.json));
    const r = await putStream(s, await Deno.readFile(LLAMA_FILE), "?atomic=1&tag=step-1");
    assert.equal(r.status, 200, JSON.stringify(r.json));
    assert.equal(r.json.version, 2);
    assert.equal(r.json.tag, "step-1");
    assert.equal(r.json.storageKept, true);
    // Never the whole body: the scratch held at once stays within the largest module (the
    // fused gate_up_proj in bf16, [2 x 176, 64]).
    assert.ok(
      (r.json.peakScratchBytes as number) <= 2 * 176 * 64 * 2,
      `${r.json.peakScratchBytes}`,
    );
    const want = await loadSafetensors(EXPECT);
    const got = await exported(s);
    for (const [name, w] of want) {
      const g = got.get(name);
      assert.ok(g, `export lacks ${name}`);
      assert.equal(g.dtype.name, w.dtype.name, name);
      assert.deepEqual(g.shape, w.shape, name);
      assert.ok(equalBytes(g.data, w.data), `${name} differs from the expectation`);
    }
    assert.deepEqual(pointers(s), before);
    const m = await call(s, "GET", "/v1/model");
    assert.equal(m.json.version, 2);
    assert.equal(m.json.tag, "step-1");
    assert.equal((m.json.last_update as { path: string }).path, "stream");
  });
});

Deno.test("server: stream, disk and IPC updates give identical kernel tensors", async () => {
  const backend = await openWasmBackend();
  const ipc = fakeIpc(backend);
  const dir = await Deno.makeTempDir({ prefix: "layerwise-serve-" });
  try {
    const scaled = await scaledCheckpoint(2);
    await Deno.writeFile(`${dir}/model.safetensors`, scaled);
    await withServer(
      { backend, allowPaths: [LLAMA, dir], ipcMapper: () => ipc.mapper },
      async (s) => {
        const base = await exported(s);
        const byStream = await putStream(s, scaled);
        assert.equal(byStream.status, 200, JSON.stringify(byStream.json));
        const streamed = await exported(s);
        assertDiffers(base, streamed, "stream");

        const reset = await call(s, "POST", "/v1/update/disk", { path: LLAMA });
        assert.equal(reset.status, 200, JSON.stringify(reset.json));
        assertSameTensors(await exported(s), base, "disk back to the fixture");
        const byDisk = await call(s, "POST", "/v1/update/disk", { path: dir, atomic: true });
        assert.equal(byDisk.status, 200, JSON.stringify(byDisk.json));
        assertSameTensors(await exported(s), streamed, "disk vs stream");

        await call(s, "POST", "/v1/update/disk", { path: LLAMA });
        const table = packBuckets(scaled, ipc.addBucket, 2);
        const byIpc = await call(s, "POST", "/v1/update/ipc", { ...table, tag: "ipc-1" });
        assert.equal(byIpc.status, 200, JSON.stringify(byIpc.json));
        assert.equal(byIpc.json.path, "ipc");
        assertSameTensors(await exported(s), streamed, "ipc vs stream");
        // Buckets reused: the handles stay open and are not opened again.
        assert.equal(ipc.openCount(), 2);
        const again = await call(s, "POST", "/v1/update/ipc", table);
        assert.equal(again.status, 200);
        assert.equal(ipc.opened.length, 2);
        const rel = await call(s, "POST", "/v1/update/ipc/release", {});
        assert.deepEqual(rel.json, { released: 2 });
        assert.equal(ipc.openCount(), 0);
        // With release, the handles are closed after the update.
        const once = await call(s, "POST", "/v1/update/ipc", { ...table, release: true });
        assert.equal(once.status, 200);
        assert.equal(ipc.openCount(), 0);
        assert.equal(ipc.opened.length, 4);
        // A handle left open is closed by the stop.
        await call(s, "POST", "/v1/update/ipc", table);
        assert.equal(ipc.openCount(), 2);
      },
    );
    assert.equal(ipc.openCount(), 0, "stop closes IPC handles");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("server: IPC handles none of the last two updates sent are closed, alternating sets stay open", async () => {
  const backend = await openWasmBackend();
  const ipc = fakeIpc(backend);
  const scaled = await scaledCheckpoint(3);
  await withServer({ backend, ipcMapper: () => ipc.mapper }, async (s) => {
    const [a, b, c] = [0, 1, 2].map(() => packBuckets(scaled, ipc.addBucket, 2));
    const send = async (t: typeof a, label: string) => {
      const r = await call(s, "POST", "/v1/update/ipc", t);
      assert.equal(r.status, 200, `${label}: ${JSON.stringify(r.json)}`);
    };
    // Two sets in turn (one filled while the other is read): nothing is opened again.
    for (const [t, label] of [[a, "a"], [b, "b"], [a, "a again"], [b, "b again"]] as const) {
      await send(t, label);
    }
    assert.equal(ipc.opened.length, 4, "alternating sets open each handle once");
    assert.equal(ipc.openCount(), 4);
    // A third set: the one that neither of the last two updates sent is closed.
    await send(c, "c");
    assert.equal(ipc.openCount(), 4, "a closed, b and c open");
    await send(c, "c again");
    assert.equal(ipc.openCount(), 2, "only c open");
    assert.equal(ipc.opened.length, 6);
    // A table refused by validation opens nothing and closes nothing.
    const bad = await call(s, "POST", "/v1/update/ipc", { ...a, tensors: a.tensors.slice(1) });
    assert.equal(bad.status, 422, JSON.stringify(bad.json));
    assert.equal(ipc.openCount(), 2);
    assert.equal(ipc.opened.length, 6);
  });
  assert.equal(ipc.openCount(), 0, "stop closes IPC handles");
});

Deno.test("server: a zero-copy IPC table, an allocation per tensor and hundreds of buckets, is taken", async () => {
  // What the Python client sends by default: each tensor read where the trainer holds it, at an
  // offset inside its allocation, buckets sized to the furthest byte read, two tensors sharing
  // one allocation; and as many allocations as an 8B model's 291 parameters (and more).
  const backend = await openWasmBackend();
  const ipc = fakeIpc(backend);
  await withServer({ backend, ipcMapper: () => ipc.mapper }, async (s) => {
    const file = await scaledCheckpoint(2);
    const h = parseSafetensorsHeader(file, file.byteLength, "zero-copy");
    const entries = [...h.tensors.values()];
    const buckets: { handle: string; bytes: number }[] = [];
    const tensors: unknown[] = [];
    const shared = new Uint8Array(
      4096 + entries[0].end - entries[0].begin + entries[1].end -
        entries[1].begin,
    );
    const sharedAt = [512, 512 + entries[0].end - entries[0].begin];
    entries.forEach((e, i) => {
      const bytes = file.subarray(e.begin, e.end);
      let bucket: number, offset: number;
      if (i < 2) {
        shared.set(bytes, sharedAt[i]);
        if (i === 0) buckets.push({ handle: ipc.addBucket(shared), bytes: 0 });
        [bucket, offset] = [0, sharedAt[i]];
      } else {
        const allocation = new Uint8Array(1024 + bytes.byteLength + 256);
        allocation.set(bytes, 1024);
        [bucket, offset] = [buckets.length, 1024];
        buckets.push({ handle: ipc.addBucket(allocation), bytes: 0 });
      }
      buckets[bucket].bytes = Math.max(buckets[bucket].bytes, offset + bytes.byteLength);
      tensors.push({ name: e.name, dtype: e.dtype.safetensors, shape: e.shape, bucket, offset });
    });
    while (buckets.length < 300) {
      buckets.push({ handle: ipc.addBucket(new Uint8Array(512)), bytes: 512 });
    }
    const byStream = await putStream(s, file);
    assert.equal(byStream.status, 200, JSON.stringify(byStream.json));
    const streamed = await exported(s);
    await call(s, "POST", "/v1/update/disk", { path: LLAMA });
    const r = await call(s, "POST", "/v1/update/ipc", { buckets, tensors });
    assert.equal(r.status, 200, JSON.stringify(r.json));
    assertSameTensors(await exported(s), streamed, "zero-copy table vs stream");
    assert.equal(ipc.openCount(), 300);
    // The trainer's next step, same allocations: every handle from the cache.
    const again = await call(s, "POST", "/v1/update/ipc", { buckets, tensors });
    assert.equal(again.status, 200, JSON.stringify(again.json));
    assert.equal(ipc.opened.length, 300);
    assert.deepEqual((await call(s, "POST", "/v1/update/ipc/release", {})).json, {
      released: 300,
    });
  });
});

/** Packs a safetensors file's tensors into `n` buckets (8-byte aligned) and returns the table. */
function packBuckets(file: Uint8Array, addBucket: (b: Uint8Array) => string, n: number) {
  const h = parseSafetensorsHeader(file, file.byteLength, "pack");
  const entries = [...h.tensors.values()];
  const per = Math.ceil(entries.length / n);
  const buckets: { handle: string; bytes: number }[] = [];
  const tensors: unknown[] = [];
  for (let b = 0; b < n; b++) {
    const part = entries.slice(b * per, (b + 1) * per);
    let size = 0;
    const at: number[] = [];
    for (const e of part) {
      at.push(size);
      size += Math.ceil((e.end - e.begin) / 8) * 8;
    }
    const bytes = new Uint8Array(size);
    part.forEach((e, i) => {
      bytes.set(file.subarray(e.begin, e.end), at[i]);
      tensors.push({
        name: e.name,
        dtype: e.dtype.safetensors,
        shape: e.shape,
        bucket: b,
        offset: at[i],
      });
    });
    buckets.push({ handle: addBucket(bytes), bytes: size });
  }
  return { buckets, tensors };
}

Deno.test("server: a body cut mid-tensor: atomic restores, otherwise health says inconsistent", async () => {
  await withServer({}, async (s) => {
    const base = await exported(s);
    const scaled = await scaledCheckpoint(2);
    const cut = scaled.slice(0, Math.floor(scaled.byteLength * 0.7));
    // With a Content-Length the shortfall is known from the header: refused before any write.
    const short = await putStream(s, cut, "?atomic=1");
    assert.equal(short.status, 400);
    assert.equal(errorOf(short).code, "LENGTH_MISMATCH");
    // Chunked, the body simply ends mid-tensor.
    const chunked = () => pausedBody(cut, cut.byteLength, "end");
    const body1 = chunked();
    body1.release();
    const atomic = await putStream(s, body1.stream, "?atomic=1");
    assert.equal(atomic.status, 400);
    assert.equal(errorOf(atomic).code, "TRUNCATED_BODY");
    assert.match(errorOf(atomic).message, /tensor "/);
    assertSameTensors(await exported(s), base, "after an atomic cut");
    assert.equal((await call(s, "GET", "/v1/health")).status, 200);

    const body2 = chunked();
    body2.release();
    const plain = await putStream(s, body2.stream);
    assert.equal(plain.status, 400);
    assert.match(errorOf(plain).message, /model inconsistent/);
    const h = await call(s, "GET", "/v1/health");
    assert.equal(h.status, 503);
    assert.equal(h.json.status, "inconsistent");
    assert.ok((h.json.layers as string[]).length > 0);
    assert.ok((h.json.layers as string[]).every((l) => /^(model\.|lm_head)/.test(l)));
    assertDiffers(base, await exported(s), "layers written before the cut");
    // A complete update makes it consistent again.
    const full = await putStream(s, scaled);
    assert.equal(full.status, 200, JSON.stringify(full.json));
    assert.equal((await call(s, "GET", "/v1/health")).status, 200);
    assert.match(
      await metricsText(s),
      /layerwise_updates_total\{path="stream",outcome="error"\} 3/,
    );
  });
});

Deno.test("server: a client that disconnects mid-body: the update fails and is rolled back", async () => {
  await withServer({}, async (s) => {
    const base = await exported(s);
    const scaled = await scaledCheckpoint(2);
    const conn = await rawPut(s, "?atomic=1", scaled, Math.floor(scaled.byteLength / 2));
    await new Promise((r) => setTimeout(r, 100));
    conn.close();
    await waitFor(
      async () => /outcome="error"\} 1/.test(await metricsText(s)),
      "the failed update",
    );
    assertSameTensors(await exported(s), base, "after a disconnect");
    assert.equal((await call(s, "GET", "/v1/health")).status, 200);
  });
});

Deno.test("server: an idle body past the timeout gets 408 and the model is restored", async () => {
  await withServer({ idleTimeoutMs: 300 }, async (s) => {
    const base = await exported(s);
    const scaled = await scaledCheckpoint(2);
    // Raw HTTP: fetch would wait for its own body before reading the answer.
    const conn = await rawPut(s, "?atomic=1", scaled, Math.floor(scaled.byteLength / 2));
    const text = await readAnswer(conn);
    conn.close();
    assert.match(text, /^HTTP\/1\.1 408/);
    assert.match(text, /"code":"IDLE_TIMEOUT"/);
    assertSameTensors(await exported(s), base, "after an idle timeout");
    assert.equal((await call(s, "GET", "/v1/health")).status, 200);
  });
});

Deno.test("server: garbage, wrong-model and oversize bodies are refused before any write", async () => {
  await withServer({ maxBodyBytes: 300_000 }, async (s) => {
    const base = await exported(s);
    const garbage = await putStream(s, new TextEncoder().encode("this is not a safetensors body"));
    assert.equal(garbage.status, 400);
    assert.match(errorOf(garbage).code, /HEADER|TRUNCATED/);
    // A header announcing more than the limit: refused from the header alone.
    const big = new Uint8Array(8 + 64);
    new DataView(big.buffer).setBigUint64(0, 64n, true);
    big.set(
      new TextEncoder().encode(
        JSON.stringify({ x: { dtype: "U8", shape: [400000], data_offsets: [0, 400000] } })
          .padEnd(64),
      ),
      8,
    );
    const over = await putStream(s, big);
    assert.equal(over.status, 413);
    assert.equal(errorOf(over).code, "BODY_TOO_LARGE");
    const overLength = await putStream(s, new Uint8Array(300_001));
    assert.equal(overLength.status, 413);
    // A checkpoint of another shape: 422 with the checkpoint error's code.
    const wrong = await Deno.readFile(`${FIXTURES}ckpt/qwen2-tiny/model.safetensors`);
    const w = await putStream(s, wrong.byteLength <= 300_000 ? wrong : wrong.slice(0, 1000));
    assert.ok(w.status === 422 || w.status === 413, `got ${w.status}`);
    // Bytes past the end the header describes: found inside the last read, so atomic restores.
    const scaled = await scaledCheckpoint(2);
    const longer = new Uint8Array(scaled.byteLength + 16);
    longer.set(scaled);
    const trailing = pausedBody(longer, longer.byteLength, "end");
    trailing.release();
    const t = await putStream(s, trailing.stream, "?atomic=1");
    assert.equal(t.status, 400);
    assert.equal(errorOf(t).code, "TRAILING_BYTES");
    assertSameTensors(await exported(s), base, "after refused bodies");
    assert.equal((await call(s, "GET", "/v1/health")).status, 200);
  });
});

/** The tensors of a safetensors file laid out again in the order `names` gives. */
function reordered(file: Uint8Array, names: string[]): Uint8Array<ArrayBuffer> {
  const h = parseSafetensorsHeader(file, file.byteLength, "reorder");
  const entries = names.map((n) => h.tensors.get(n)!);
  let at = 0;
  const header: Record<string, unknown> = {};
  for (const e of entries) {
    header[e.name] = {
      dtype: e.dtype.safetensors,
      shape: e.shape,
      data_offsets: [at, at + e.end - e.begin],
    };
    at += e.end - e.begin;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - json.length % 8) % 8);
  const out = new Uint8Array(8 + json.length + at);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(new TextEncoder().encode(json), 8);
  let w = 8 + json.length;
  for (const e of entries) {
    out.set(file.subarray(e.begin, e.end), w);
    w += e.end - e.begin;
  }
  return out;
}

Deno.test("server: a body out of layer order is taken within the scratch bound, refused past it", async () => {
  // gate_up_proj of the tiny model is 45 KB of bf16 scratch; two of them waiting pass 60 KB.
  await withServer({ maxBufferedBytes: 60_000 }, async (s) => {
    const base = await exported(s);
    const scaled = await scaledCheckpoint(2);
    const names = [...parseSafetensorsHeader(scaled, scaled.byteLength, "x").tensors.keys()];
    // Reversed: every module still completes before the next one starts.
    const rev = await putStream(s, reordered(scaled, [...names].reverse()), "?atomic=1");
    assert.equal(rev.status, 200, JSON.stringify(rev.json));
    const changed = await exported(s);
    assertDiffers(base, changed, "reversed body");
    await call(s, "POST", "/v1/update/disk", { path: LLAMA });
    // Every gate_proj first: both layers' gate_up scratch wait at once.
    const gates = names.filter((n) => n.includes("gate_proj"));
    const bad = reordered(scaled, [...gates, ...names.filter((n) => !gates.includes(n))]);
    const r = await putStream(s, bad, "?atomic=1");
    assert.equal(r.status, 422, JSON.stringify(r.json));
    assert.equal(errorOf(r).code, "BUFFER_LIMIT");
    assertSameTensors(await exported(s), base, "after a refused order");
  });
});

Deno.test("server: a second update while one runs gets 409 with the running id", async () => {
  await withServer({}, async (s) => {
    const scaled = await scaledCheckpoint(2);
    const { stream, release } = pausedBody(scaled, 4096, "rest");
    const first = putStream(s, stream, "?atomic=1");
    await waitFor(() => s.service.lock.running !== null, "the first update");
    const running = s.service.lock.running!.id;
    const second = await call(s, "POST", "/v1/update/disk", { path: LLAMA });
    assert.equal(second.status, 409);
    assert.equal(errorOf(second).code, "UPDATE_RUNNING");
    assert.equal((second.json.error as { running: string }).running, running);
    const exp = await fetch(`${s.url}/v1/export`);
    assert.equal(exp.status, 409);
    await exp.body?.cancel();
    release();
    const r = await first;
    assert.equal(r.status, 200, JSON.stringify(r.json));
    assert.equal(r.json.id, running);
    assert.equal((await call(s, "POST", "/v1/update/disk", { path: LLAMA })).status, 200);
  });
});

Deno.test("server: a POST sent again with its Idempotency-Key gets the first answer, applied once", async () => {
  await withServer({}, async (s) => {
    const key = (k: string) => ({ "Idempotency-Key": k });
    const v0 = s.service.version;
    const first = await call(s, "POST", "/v1/update/disk", { path: LLAMA }, key("update-0001"));
    assert.equal(first.status, 200, JSON.stringify(first.json));
    assert.equal(first.json.version, v0 + 1);
    const again = await fetch(`${s.url}/v1/update/disk`, {
      method: "POST",
      headers: key("update-0001"),
      body: JSON.stringify({ path: LLAMA }),
    });
    assert.equal(again.status, 200);
    assert.equal(again.headers.get("layerwise-replayed"), "1");
    assert.deepEqual(await again.json(), first.json);
    assert.equal(s.service.version, v0 + 1, "the update ran once");

    // Sent twice at once: one run, both get its answer (no 409 for the second).
    const [a, b] = await Promise.all([
      call(s, "POST", "/v1/update/disk", { path: LLAMA }, key("update-0002")),
      call(s, "POST", "/v1/update/disk", { path: LLAMA }, key("update-0002")),
    ]);
    assert.equal(a.status, 200, JSON.stringify(a.json));
    assert.deepEqual(b, a);
    assert.equal(s.service.version, v0 + 2);

    // A new key, or the same key on another path, runs.
    await call(s, "POST", "/v1/update/disk", { path: LLAMA }, key("update-0003"));
    const sglang = await call(
      s,
      "POST",
      "/update_weights_from_disk",
      { model_path: LLAMA },
      key(
        "update-0003",
      ),
    );
    assert.equal(sglang.json.success, true);
    assert.equal(s.service.version, v0 + 4);

    // A refusal is kept as well; a malformed key is refused before anything runs.
    const denied = await call(s, "POST", "/v1/update/disk", { path: "/etc" }, key("update-0004"));
    assert.equal(errorOf(denied).code, "FORBIDDEN_PATH");
    assert.deepEqual(
      await call(s, "POST", "/v1/update/disk", { path: "/etc" }, key("update-0004")),
      denied,
    );
    const bad = await call(s, "POST", "/v1/update/disk", { path: LLAMA }, key("short"));
    assert.equal(bad.status, 400);
    assert.equal(errorOf(bad).code, "BAD_IDEMPOTENCY_KEY");
    assert.equal(s.service.version, v0 + 4);
  });
});

Deno.test("server: the replay cache keeps the last keys only, per path", async () => {
  const cache = new ReplayCache(2);
  let runs = 0;
  const post = (key: string, path = "/p") =>
    cache.answer(
      new Request("http://x/", { method: "POST", headers: { "Idempotency-Key": key } }),
      path,
      () => Promise.resolve(new Response(String(++runs))),
    ).then((r) => r.text());
  assert.equal(await post("key-aaaa"), "1");
  assert.equal(await post("key-aaaa"), "1");
  assert.equal(await post("key-aaaa", "/q"), "2");
  assert.equal(await post("key-bbbb"), "3"); // the oldest ("/p key-aaaa") goes
  assert.equal(await post("key-bbbb"), "3");
  assert.equal(await post("key-aaaa"), "4");
});

Deno.test("server: token required when set (constant-time compare); health stays open", async () => {
  await withServer({ token: TOKEN }, async (s) => {
    assert.equal((await call(s, "GET", "/v1/health")).status, 200);
    const none = await call(s, "GET", "/v1/model");
    assert.equal(none.status, 401);
    assert.equal(errorOf(none).code, "UNAUTHORIZED");
    const wrong = await call(s, "GET", "/v1/model", undefined, {
      authorization: `Bearer ${TOKEN}x`,
    });
    assert.equal(wrong.status, 401);
    const upd = await call(s, "POST", "/v1/update/disk", { path: LLAMA }, {
      authorization: "Bearer nope",
    });
    assert.equal(upd.status, 401);
    assert.equal(s.service.version, 0);
    const ok = await call(s, "GET", "/v1/model", undefined, { authorization: `Bearer ${TOKEN}` });
    assert.equal(ok.status, 200);
  });
});

Deno.test("server: paths outside the roots are 403, also through .. and a symlink", async () => {
  const root = await Deno.makeTempDir({ prefix: "layerwise-root-" });
  const outside = await Deno.makeTempDir({ prefix: "layerwise-outside-" });
  try {
    await Deno.copyFile(LLAMA_FILE, `${outside}/model.safetensors`);
    await Deno.copyFile(LLAMA_FILE, `${root}/model.safetensors`);
    await Deno.symlink(outside, `${root}/link`);
    await Deno.symlink(`${outside}/model.safetensors`, `${root}/file-link.safetensors`);
    await withServer({ allowPaths: [root] }, async (s) => {
      for (
        const path of [
          outside,
          `${outside}/model.safetensors`,
          `${root}/../${outside.split("/").pop()}`,
          `${root}/link`,
          `${root}/link/model.safetensors`,
          `${root}/file-link.safetensors`,
          "/etc/passwd",
        ]
      ) {
        const r = await call(s, "POST", "/v1/update/disk", { path });
        assert.equal(r.status, 403, `${path}: ${JSON.stringify(r.json)}`);
        assert.equal(errorOf(r).code, "FORBIDDEN_PATH");
        const g = await call(s, "POST", "/update_weights_from_disk", { model_path: path });
        assert.equal(g.status, 403);
        assert.equal(g.json.success, false);
      }
      const missing = await call(s, "POST", "/v1/update/disk", { path: `${root}/nothing` });
      assert.equal(missing.status, 404);
      assert.equal(s.service.version, 0);
      const ok = await call(s, "POST", "/v1/update/disk", { path: `${root}/model.safetensors` });
      assert.equal(ok.status, 200, JSON.stringify(ok.json));
    });
  } finally {
    await Deno.remove(root, { recursive: true });
    await Deno.remove(outside, { recursive: true });
  }
});

Deno.test("server: JSON bodies are validated; unknown paths and methods answer 404 and 405", async () => {
  await withServer({}, async (s) => {
    const cases: [unknown, string][] = [
      [{ path: LLAMA, extra: 1 }, "UNKNOWN_FIELD"],
      [{ path: 3 }, "BAD_FIELD"],
      [{ atomic: true }, "MISSING_FIELD"],
      [[1, 2], "BAD_JSON"],
      ["{not json", "BAD_JSON"],
    ];
    for (const [body, code] of cases) {
      const r = await call(s, "POST", "/v1/update/disk", body);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.equal(errorOf(r).code, code);
    }
    const q = await putStream(s, new Uint8Array(8), "?bogus=1");
    assert.equal(q.status, 400);
    assert.equal(errorOf(q).code, "UNKNOWN_FIELD");
    const nf = await call(s, "GET", "/v2/nothing");
    assert.equal(nf.status, 404);
    const m = await call(s, "DELETE", "/v1/model");
    assert.equal(m.status, 405);
    assert.equal((await call(s, "GET", "/v1/health")).status, 200);
  });
});

Deno.test("server: SGLang's update_weights_from_disk answers success and message", async () => {
  await withServer({}, async (s) => {
    const ok = await call(s, "POST", "/update_weights_from_disk", {
      model_path: LLAMA,
      load_format: null,
      abort_all_requests: false,
      weight_version: "v7",
    });
    assert.equal(ok.status, 200);
    assert.equal(ok.json.success, true);
    assert.equal(typeof ok.json.message, "string");
    assert.equal(s.service.tag, "v7");
    const bad = await call(s, "POST", "/update_weights_from_disk", { model_path: LLAMA, x: 1 });
    assert.equal(bad.status, 400);
    assert.equal(bad.json.success, false);
    assert.match(bad.json.message as string, /unknown field "x"/);
  });
});

Deno.test("server: /metrics is Prometheus text with updates, seconds, bytes, version, in flight", async () => {
  await withServer({}, async (s) => {
    await putStream(s, await Deno.readFile(LLAMA_FILE));
    await call(s, "POST", "/v1/update/disk", { path: "/etc" });
    const r = await fetch(`${s.url}/metrics`);
    assert.match(r.headers.get("content-type")!, /^text\/plain/);
    const text = await r.text();
    assert.match(text, /# TYPE layerwise_updates_total counter/);
    assert.match(text, /layerwise_updates_total\{path="stream",outcome="ok"\} 1/);
    assert.match(text, /# TYPE layerwise_update_seconds histogram/);
    assert.match(text, /layerwise_update_seconds_count\{path="stream"\} 1/);
    const bytes = (await Deno.stat(LLAMA_FILE)).size;
    const m = /layerwise_update_bytes_total\{path="stream"\} (\d+)/.exec(text);
    assert.ok(m && Number(m[1]) > 0 && Number(m[1]) < bytes);
    assert.match(text, /layerwise_model_version 1/);
    assert.match(text, /layerwise_update_in_flight 0/);
  });
});

Deno.test("server: the IPC table is validated before any handle is opened or byte written", async () => {
  const backend = await openWasmBackend();
  const ipc = fakeIpc(backend);
  await withServer({ backend, ipcMapper: () => ipc.mapper }, async (s) => {
    const base = await exported(s);
    const file = await Deno.readFile(LLAMA_FILE);
    const table = packBuckets(file, ipc.addBucket, 1);
    ipc.opened.length = 0;
    const t0 = table.tensors[0] as Record<string, unknown>;
    const rest = table.tensors.slice(1);
    const size = table.buckets[0].bytes;
    const bad: [unknown, number, string][] = [
      [{ ...table, buckets: [{ handle: "abc", bytes: size }] }, 400, "BAD_IPC_HANDLE"],
      [
        { ...table, buckets: [{ handle: btoa("x".repeat(63)), bytes: size }] },
        400,
        "BAD_IPC_HANDLE",
      ],
      [{ ...table, buckets: [{ ...table.buckets[0], bytes: 0 }] }, 400, "BAD_IPC_TABLE"],
      [{ ...table, buckets: [{ ...table.buckets[0], bytes: 8 }] }, 400, "BAD_IPC_TABLE"],
      [{ ...table, tensors: [{ ...t0, bucket: 1 }, ...rest] }, 400, "BAD_IPC_TABLE"],
      [{ ...table, tensors: [{ ...t0, offset: size }, ...rest] }, 400, "BAD_IPC_TABLE"],
      [{ ...table, tensors: [{ ...t0, offset: 1 }, ...rest] }, 400, "BAD_IPC_TABLE"],
      [{ ...table, tensors: [{ ...t0, dtype: "Q9" }, ...rest] }, 400, "BAD_IPC_TABLE"],
      [{ ...table, tensors: [t0, t0, ...rest.slice(1)] }, 400, "BAD_IPC_TABLE"],
      [{ ...table, tensors: [{ ...t0, extra: 1 }, ...rest] }, 400, "UNKNOWN_FIELD"],
      [{ ...table, tensors: [{ ...t0, dtype: "F32", shape: [1] }, ...rest] }, 422, ""],
      [{ ...table, tensors: rest }, 422, "MISSING_TENSOR"],
    ];
    for (const [body, status, code] of bad) {
      const r = await call(s, "POST", "/v1/update/ipc", body);
      assert.equal(r.status, status, JSON.stringify(r.json));
      if (code !== "") assert.equal(errorOf(r).code, code);
    }
    assert.equal(ipc.opened.length, 0, "no handle opened for a refused table");
    // A handle the GPU does not know: refused when opened, nothing written.
    const unknown = { ...table, buckets: [{ handle: btoa("y".repeat(64)), bytes: size }] };
    const u = await call(s, "POST", "/v1/update/ipc", unknown);
    assert.equal(u.status, 422);
    assert.equal(errorOf(u).code, "IPC_OPEN_FAILED");
    // A bucket claiming more bytes than its allocation holds: refused once mapped, before a read.
    const over = { ...table, buckets: [{ ...table.buckets[0], bytes: size + 64 }] };
    const o = await call(s, "POST", "/v1/update/ipc", over);
    assert.equal(o.status, 422);
    assert.equal(errorOf(o).code, "IPC_BUCKET_TOO_LARGE");
    assertSameTensors(await exported(s), base, "after refused IPC tables");
    assert.equal((await call(s, "GET", "/v1/health")).status, 200);
  });
});

Deno.test("server: an IPC table's validation is reused only for the same layout and options", async () => {
  // The service keeps the last successful validation; each case below would be answered 200
  // (with the weights written wrong, or a partial update taken without partial) if it reused
  // that validation for a table that differs in a shape, in coverage or in an option.
  const backend = await openWasmBackend();
  const ipc = fakeIpc(backend);
  await withServer({ backend, ipcMapper: () => ipc.mapper }, async (s) => {
    const scaled = await scaledCheckpoint(2);
    const table = packBuckets(scaled, ipc.addBucket, 2);
    const runs = () => s.service.tableValidations;
    const post = async (body: unknown, status: number, validated: boolean, code = "") => {
      const before = runs();
      const r = await call(s, "POST", "/v1/update/ipc", body);
      assert.equal(r.status, status, JSON.stringify(r.json));
      if (code !== "") assert.equal(errorOf(r).code, code);
      assert.equal(runs() - before, validated ? 1 : 0, `validations run (answered ${r.status})`);
      return r;
    };
    await post(table, 200, true);
    const updated = await exported(s);
    // Each IPC reply says where the server's time went: body read, table checks, update.
    const timed = await fetch(`${s.url}/v1/update/ipc`, {
      method: "POST",
      body: JSON.stringify(table),
    });
    const reply = await timed.json();
    assert.equal(timed.status, 200, JSON.stringify(reply));
    const parts = [...(timed.headers.get("server-timing") ?? "").matchAll(/(\w+);dur=([\d.]+)/g)];
    assert.deepEqual(parts.map((m) => m[1]), ["read", "parse", "update"]);
    // Printed to the microsecond: the update, which holds the reply's seconds, is not shorter.
    assert.ok(Number(parts[2][2]) + 0.001 >= reply.seconds * 1000, "the update spans its seconds");
    await post({ ...table, tag: "again" }, 200, false);
    assert.equal(runs(), 1, "the timed update reused the validation too");
    assertSameTensors(await exported(s), updated, "the same table again");
    // Same names, bytes and offsets; one shape transposed: a new layout, refused.
    const tensors = table.tensors as Record<string, unknown>[];
    const down = tensors.findIndex((t) => t.name === "model.layers.0.mlp.down_proj.weight");
    const transposed = tensors.map((t, i) => i === down ? { ...t, shape: [176, 64] } : t);
    await post({ ...table, tensors: transposed }, 422, true);
    // The table's own checks run on every body, whatever the validation kept.
    await post(table, 200, true);
    const norm = tensors.findIndex((t) => t.name === "model.norm.weight");
    const size = table.buckets[tensors[norm].bucket as number].bytes;
    const past = tensors.map((t, i) => i === norm ? { ...t, offset: size } : t);
    await post({ ...table, tensors: past }, 400, false, "BAD_IPC_TABLE");
    // A tensor left out: refused without partial, taken with it (an option is part of the key).
    const without = tensors.filter((_, i) => i !== norm);
    await post({ ...table, tensors: without }, 422, true, "MISSING_TENSOR");
    const partial = await post({ ...table, tensors: without, partial: true }, 200, true);
    assert.deepEqual(partial.json.missing, ["model.norm.weight"]);
    await post({ ...table, tensors: without }, 422, true, "MISSING_TENSOR");
    await post(table, 200, true);
    assertSameTensors(await exported(s), updated, "after the refused tables");
  });
});

Deno.test("server: IPC on a backend without a mapper is refused with a clear error", async () => {
  await withServer({ ipcMapper: () => undefined }, async (s) => {
    const r = await call(s, "POST", "/v1/update/ipc", { buckets: [], tensors: [] });
    assert.equal(r.status, 400);
    assert.equal(errorOf(r).code, "IPC_UNAVAILABLE");
  });
});

Deno.test("server: a non-loopback address without a token is refused before binding", async () => {
  assert.ok(isLoopback("127.0.0.1") && isLoopback("localhost") && isLoopback("[::1]"));
  assert.ok(!isLoopback("0.0.0.0") && !isLoopback("10.1.2.3") && !isLoopback("::"));
  await assert.rejects(
    () => startServer({ model: LLAMA, backend: "wasm", host: "0.0.0.0", port: 0 }),
    (e: Error & { code?: string }) => e.code === "INSECURE_BIND",
  );
});

Deno.test("server: stop lets a stalled update go past the deadline, rolls it back, closes all", async () => {
  const s = await serve({ stopDeadlineMs: 200, idleTimeoutMs: 60_000 });
  const base = await exported(s);
  const before = pointers(s);
  const scaled = await scaledCheckpoint(2);
  const conn = await rawPut(s, "?atomic=1", scaled, Math.floor(scaled.byteLength / 2));
  await waitFor(() => s.service.lock.running !== null, "the update");
  await new Promise((r) => setTimeout(r, 100));
  // The model is checked from inside: after stop the backend is closed.
  const model = s.service.model!;
  const kernels = () =>
    new Map(kernelTensors(model).map(([n, t]) => [n, model.device.download(t)]));
  const snapshots: Map<string, Uint8Array>[] = [];
  const origClose = model.device.close.bind(model.device);
  model.device.close = () => {
    snapshots.push(kernels());
    origClose();
  };
  const stopped = s.stop();
  const text = await readAnswer(conn);
  conn.close();
  await stopped;
  assert.match(text, /^HTTP\/1\.1 503/);
  assert.match(text, /"code":"SHUTTING_DOWN"/);
  assert.equal(snapshots.length, 1);
  for (const [name, t] of base) {
    assert.ok(equalBytes(snapshots[0].get(name)!, t.data), `${name} restored before closing`);
  }
  assert.equal(before.size, snapshots[0].size);
});

Deno.test("server: stop lets a running update finish within the deadline", async () => {
  const s = await serve({ stopDeadlineMs: 20_000 });
  const scaled = await scaledCheckpoint(2);
  const half = Math.floor(scaled.byteLength / 2);
  const conn = await rawPut(s, "", scaled, half);
  await waitFor(() => s.service.lock.running !== null, "the update");
  const stopped = s.stop();
  const late = await fetch(`${s.url}/v1/model`).catch(() => null);
  if (late !== null) {
    assert.equal(late.status, 503);
    await late.body?.cancel();
  }
  let at = half;
  while (at < scaled.byteLength) at += await conn.write(scaled.subarray(at));
  const text = await readAnswer(conn);
  conn.close();
  await stopped;
  assert.match(text, /^HTTP\/1\.1 200/);
  assert.match(text, /"version":1/);
});

const MAIN = new URL("../src/server/main.ts", import.meta.url).pathname;

async function serveCli(...args: string[]): Promise<{ code: number; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  // Deno's own "Download ..." lines (a machine whose npm cache is cold) are not the server's.
  const stderr = new TextDecoder().decode(out.stderr).replace(/^Download \S+\n/gm, "");
  return { code: out.code, stderr };
}

Deno.test("deno task serve: bad usage exits 2, an unsafe bind 1, both with one error line", async () => {
  for (const args of [[], ["--model", LLAMA, "--port", "x"], ["--model", LLAMA, "--bogus"]]) {
    const r = await serveCli(...args);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /^error: .*\(see --help\)\n$/);
  }
  const bind = await serveCli("--model", LLAMA, "--backend", "wasm", "--host", "0.0.0.0");
  assert.equal(bind.code, 1);
  assert.match(bind.stderr, /^error: refusing to listen on 0\.0\.0\.0 without a token/);
  const short = await Deno.makeTempFile();
  await Deno.writeTextFile(short, "short\n");
  const tok = await serveCli("--model", LLAMA, "--backend", "wasm", "--token-file", short);
  await Deno.remove(short);
  assert.equal(tok.code, 1);
  assert.match(tok.stderr, /^error: .*at least 16 characters/);
});

Deno.test("deno task serve: serves, prints a progress line per update, exits 0 on SIGTERM", async () => {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "--model", LLAMA, "--backend", "wasm", "--port", "0"],
    stdout: "null",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const lines = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  const until = async (re: RegExp) => {
    while (!re.test(text)) {
      const r = await lines.read();
      if (r.done) throw new Error(`serve ended before ${re}: ${text}`);
      text += r.value;
    }
    return re.exec(text)!;
  };
  try {
    const url = (await until(/listening on (http:\/\/\S+)/))[1];
    await until(/ready: LlamaForCausalLM/);
    const r = await fetch(`${url}/v1/update/stream?tag=cli`, {
      method: "PUT",
      body: await Deno.readFile(LLAMA_FILE),
    });
    assert.equal(r.status, 200, await r.text());
    await until(/update u1 stream: [\d.]+ GB in [\d.]+ s \([\d.]+ GB\/s\), version 1 tag "cli"/);
    child.kill("SIGTERM");
    await until(/stopping/);
    assert.equal((await child.status).code, 0);
  } finally {
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
    await lines.cancel();
  }
});

Deno.test("server: a failed first load answers 503 with its error, and the server keeps serving", async () => {
  const dir = await Deno.makeTempDir({ prefix: "layerwise-badmodel-" });
  try {
    await Deno.copyFile(`${LLAMA}/config.json`, `${dir}/config.json`);
    await Deno.writeFile(`${dir}/model.safetensors`, new TextEncoder().encode("not a checkpoint"));
    const s = await startServer({ model: dir, backend: BACKEND, port: 0 });
    try {
      await assert.rejects(() => s.ready);
      const h = await call(s, "GET", "/v1/health");
      assert.equal(h.status, 503);
      assert.equal(h.json.status, "load_failed");
      assert.match(h.json.error as string, /model\.safetensors/);
      const m = await call(s, "GET", "/v1/model");
      assert.equal(m.status, 503);
      assert.equal(errorOf(m).code, "LOAD_FAILED");
      const u = await call(s, "POST", "/v1/update/disk", { path: dir });
      assert.equal(u.status, 503);
      assert.equal((await call(s, "GET", "/v1/health")).status, 503);
    } finally {
      await s.stop();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// Reads into shared memory go to reader threads (src/checkpoint/read_threads.ts): the same
// bytes as the main thread's reads, the same typed errors, and a file replaced after it was
// checked is never read by them.
import assert from "node:assert/strict";
import { CheckpointError } from "../src/errors.ts";
import { fileSource, type WeightSource } from "../src/checkpoint/source.ts";
import { writeSafetensors } from "../src/checkpoint/safetensors.ts";
import {
  READ_PIECE_BYTES,
  readSession,
  ReadThreads,
  readThreads,
} from "../src/checkpoint/read_threads.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import { rng } from "../testing.ts";

async function bigCheckpoint(): Promise<{ file: string; data: Map<string, Uint8Array> }> {
  const dir = await Deno.makeTempDir({ prefix: "layerwise-read-threads-" });
  const next = rng(5);
  const data = new Map<string, Uint8Array>();
  // Sizes around the thresholds: one piece, several uneven pieces, below the threaded minimum.
  for (const [name, bytes] of [["a", READ_PIECE_BYTES + 6], ["b", 2.5 * READ_PIECE_BYTES + 2]]) {
    const u8 = new Uint8Array(bytes as number);
    for (let i = 0; i < u8.length; i++) u8[i] = Math.floor(next() * 256);
    data.set(name as string, u8);
  }
  data.set("small", new Uint8Array(64).map((_, i) => i));
  const file = `${dir}/model.safetensors`;
  await writeSafetensors(
    file,
    [...data].map(([n, d]) => [n, { dtype: DTYPES.u8, shape: [d.length], data: d }]),
  );
  return { file, data };
}

/** Runs `fn` on a new checkpoint and a file source of it; closes and removes both after. */
async function withCheckpoint(
  fn: (c: { file: string; data: Map<string, Uint8Array>; source: WeightSource }) => Promise<void>,
): Promise<void> {
  const { file, data } = await bigCheckpoint();
  const source = await fileSource(file);
  try {
    await fn({ file, data, source });
  } finally {
    source.close();
    await Deno.remove(file.replace(/\/[^/]*$/, ""), { recursive: true });
  }
}

// The first differing index, or -1 (assert.deepEqual would print megabytes of diff).
function firstDiff(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

function sharedView(bytes: number, at = 48): Uint8Array {
  return new Uint8Array(new SharedArrayBuffer(bytes + 2 * at), at, bytes);
}

Deno.test("reads into shared memory on reader threads give the file's bytes", async () => {
  const threads = await readThreads();
  assert.ok(threads === null || threads.threads >= 1);
  await withCheckpoint(async ({ data, source }) => {
    for (const [name, want] of data) {
      const dst = sharedView(want.length);
      // Bytes around the destination must stay as they were.
      new Uint8Array(dst.buffer).fill(0xAB);
      await source.readInto(name, dst);
      assert.equal(firstDiff(dst, want), -1, name);
      const whole = new Uint8Array(dst.buffer);
      assert.equal(whole[dst.byteOffset - 1], 0xAB);
      assert.equal(whole[dst.byteOffset + dst.byteLength], 0xAB);
    }
    // Many at once, as the read-ahead issues them.
    const views = [...data].map(([n, d]) => [n, sharedView(d.length)] as const);
    await Promise.all(views.map(([n, v]) => source.readInto(n, v)));
    for (const [n, v] of views) assert.equal(firstDiff(v, data.get(n)!), -1, n);
    // Rows of a tensor.
    const rows = sharedView(READ_PIECE_BYTES);
    await source.readRowsInto!("b", 100, 100 + READ_PIECE_BYTES, rows);
    assert.equal(firstDiff(rows, data.get("b")!.subarray(100, 100 + READ_PIECE_BYTES)), -1);
  });
});

Deno.test("a file cut before a threaded read is TRUNCATED with the size it now has", async () => {
  await withCheckpoint(async ({ file, data, source }) => {
    for (const size of [READ_PIECE_BYTES, 100]) {
      await Deno.truncate(file, size);
      await assert.rejects(source.readInto("b", sharedView(data.get("b")!.length)), (e) => {
        assert.ok(e instanceof CheckpointError && e.code === "TRUNCATED", String(e));
        assert.ok(e.message.includes(file) && e.message.includes("b"), e.message);
        assert.match(e.message, new RegExp(`the file now ends at ${size}$`));
        return true;
      });
    }
  });
});

Deno.test("a file replaced between reads: a tensor comes whole from one file, never mixed", async () => {
  await withCheckpoint(async ({ file, data, source }) => {
    const first = sharedView(data.get("a")!.length);
    await source.readInto("a", first);
    assert.equal(firstDiff(first, data.get("a")!), -1);
    // A new file under the name (another inode), other bytes at the same offsets. A thread that
    // opened the old file reads it; one that has not refuses the new one (not the file it was
    // told), and the source then reads the whole tensor on its own handle, as it always did.
    await Deno.writeFile(`${file}.new`, new Uint8Array((await Deno.stat(file)).size).fill(7));
    await Deno.rename(`${file}.new`, file);
    const b = data.get("b")!;
    const dst = sharedView(b.length);
    await source.readInto("b", dst);
    assert.ok(firstDiff(dst, b) === -1 || dst.every((x) => x === 7), "mixed bytes");
  });
});

Deno.test("a file removed before its first threaded read: the source's own error (MISSING_SHARD)", async () => {
  await withCheckpoint(async ({ file, data, source }) => {
    await Deno.remove(file);
    await assert.rejects(source.readInto("b", sharedView(data.get("b")!.length)), (e) => {
      assert.ok(e instanceof CheckpointError && e.code === "MISSING_SHARD", String(e));
      assert.ok(e.message.includes(file), e.message);
      return true;
    });
  });
});

Deno.test("reader threads: reads past the free slots fail over at once, slots are reused read after read, bytes always right", async () => {
  const pool = await ReadThreads.start(2, 3);
  assert.ok(pool !== null);
  const dir = await Deno.makeTempDir({ prefix: "layerwise-read-slots-" });
  const file = `${dir}/data.bin`;
  const data = new Uint8Array(4 * READ_PIECE_BYTES);
  const next = rng(8);
  for (let i = 0; i < data.length; i++) data[i] = Math.floor(next() * 256);
  await Deno.writeFile(file, data);
  const st = await Deno.stat(file);
  const f = { path: file, dev: st.dev, ino: st.ino };
  const session = readSession();
  try {
    // Eight reads at once, three slots: the others are refused without waiting (the caller
    // then reads on its own handle); each accepted one lands whole.
    const at = (k: number) => (k * 317 * 1024) % (2 * READ_PIECE_BYTES);
    const len = 1.5 * READ_PIECE_BYTES + 3;
    const views = Array.from({ length: 8 }, () => sharedView(len));
    const ok = await Promise.all(views.map((v, k) => pool.read(session, f, at(k), v)));
    const accepted = ok.filter((x) => x).length;
    assert.ok(accepted >= 1 && accepted <= 3, `${accepted} accepted`);
    views.forEach((v, k) => {
      if (ok[k]) assert.equal(firstDiff(v, data.subarray(at(k), at(k) + len)), -1, `read ${k}`);
    });
    // One after another, many times the slots: each slot comes back once its threads left it.
    for (let k = 0; k < 20; k++) {
      const v = sharedView(len);
      assert.ok(await pool.read(session, f, at(k), v), `read ${k} refused`);
      assert.equal(firstDiff(v, data.subarray(at(k), at(k) + len)), -1, `read ${k}`);
    }
    // Past the end of the file: short, so false (the caller's own read names the error).
    assert.equal(await pool.read(session, f, data.length - 100, sharedView(len)), false);
  } finally {
    pool.closeSession(session);
    await pool.close();
    await Deno.remove(dir, { recursive: true });
  }
});

/**
 * The reload bench: writes a synthetic Llama-shaped bf16 checkpoint, first-loads it
 * into an fp8 model, reloads it N times, then N times from a copy with the tensors shuffled
 * across shards; prints per run seconds, GB/s of checkpoint bytes and the ratio to a pinned
 * host-to-device copy of the same bytes measured in the same run (on WebAssembly: to a plain
 * one-thread memcpy, and to the reader threads reading the same files alone, the limit of a
 * reload that reads and quantizes on every core), peak extra device memory and peak buffered
 * bytes, each beside its limit. On CUDA it
 * also measures the stages alone: file reads into pinned memory, and the staged stream
 * (reads + copies) without the engine, so that what limits the reload shows in numbers.
 *
 *   deno run -A scripts/bench_reload.ts [--backend auto|cuda|wasm] [--shape 8b|small]
 *       [--runs N] [--dir DIR] [--keep] [--simple] [--json FILE]
 *       [--slot-mb N] [--slots N] [--chunk-mb N] [--readers N] [--ring-mb N]
 *
 * The checkpoint goes to /dev/shm when it has room (tmpfs: the page cache itself), else to a
 * temporary directory; either way every file is read once before timing (page cache warm).
 * @module
 */

import { parseArgs } from "node:util";
import type { Backend } from "../src/backend/backend.ts";
import { cudaHandle } from "../src/backend/cuda/device.ts";
import { openBackend } from "../src/backend/select.ts";
import { fileSource } from "../src/checkpoint/source.ts";
import {
  emptyStagingStats,
  flattenReads,
  planBlocks,
  type StagedTensor,
  STAGING_DEFAULTS,
  type StagingOptions,
  type StagingStats,
} from "../src/backend/cuda/staging_plan.ts";
import { releaseStaging, stageTensors } from "../src/checkpoint/staging.ts";
import { closeReadSession, readSession, readThreads } from "../src/checkpoint/read_threads.ts";
import { DTYPES } from "../src/tensor/dtype.ts";
import { bf16Bits, rng, synthConfig, type SynthShape, synthTensorShapes } from "../testing.ts";
import { loadModel, reloadWeights } from "../src/models/load.ts";
import { READ_CHUNK_BYTES, streamWeights, validateWeights } from "../src/models/weights.ts";
import type { CausalLM } from "../src/models/causal_lm.ts";
import type { Tensor } from "../src/tensor/tensor.ts";
import { trackPeak } from "../testing.ts";

/** Llama-3-8B's shape, untied (16.06 GB of bf16). */
export const SHAPE_8B: Readonly<SynthShape> = Object.freeze({
  hiddenSize: 4096,
  intermediateSize: 14336,
  numLayers: 32,
  numHeads: 32,
  numKvHeads: 8,
  vocabSize: 128256,
  tieWordEmbeddings: false,
});

/** A ~0.5 GB shape for CPUs. */
export const SHAPE_SMALL: Readonly<SynthShape> = Object.freeze({
  hiddenSize: 1024,
  intermediateSize: 3584,
  numLayers: 16,
  numHeads: 16,
  numKvHeads: 4,
  vocabSize: 32000,
  tieWordEmbeddings: false,
});

const GB = 1e9;
const MiB = 1 << 20;

/** Bytes of one decoder layer in model format (bf16 fused qkv, gate_up, o, down, 2 norms). */
export function layerModelBytes(s: SynthShape): number {
  const h = s.hiddenSize, d = h / s.numHeads;
  const qkv = (s.numHeads + 2 * s.numKvHeads) * d * h;
  return 2 * (qkv + h * s.numHeads * d + 3 * s.intermediateSize * h + 2 * h);
}

/**
 * Writes a checkpoint of `shape` into `dir` in shards of about `shardBytes`, tensors in
 * `order` (indices into the model-order list). One random block is generated once and every
 * tensor is a rotation of it, with its own leading values (so absmax and scales differ per
 * tensor); data goes out in writes of up to 64 MiB.
 */
async function writeCheckpoint(
  dir: string,
  shape: SynthShape,
  order: number[],
  shardBytes: number,
  block: Uint8Array,
): Promise<number> {
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(synthConfig(shape), null, 2));
  const all = synthTensorShapes(shape);
  const list = order.map((i) => ({ index: i, name: all[i][0], shape: all[i][1] }));
  const sizeOf = (s: number[]) => 2 * s.reduce((a, b) => a * b, 1);
  const shards: (typeof list)[] = [[]];
  let acc = 0;
  for (const t of list) {
    if (acc > 0 && acc + sizeOf(t.shape) > shardBytes) {
      shards.push([]);
      acc = 0;
    }
    shards[shards.length - 1].push(t);
    acc += sizeOf(t.shape);
  }
  const weightMap: Record<string, string> = {};
  let total = 0;
  for (const [k, part] of shards.entries()) {
    const file = `model-${String(k + 1).padStart(5, "0")}-of-${
      String(shards.length).padStart(5, "0")
    }.safetensors`;
    const parts: string[] = [`"__metadata__":{"format":"pt"}`];
    let off = 0;
    for (const t of part) {
      const n = sizeOf(t.shape);
      parts.push(
        `${JSON.stringify(t.name)}:{"dtype":"BF16","shape":[${t.shape}],"data_offsets":[${off},${
          off + n
        }]}`,
      );
      off += n;
      weightMap[t.name] = file;
    }
    let json = `{${parts.join(",")}}`;
    json += " ".repeat((8 - (json.length % 8)) % 8);
    const head = new Uint8Array(8 + json.length);
    new DataView(head.buffer).setBigUint64(0, BigInt(json.length), true);
    head.set(new TextEncoder().encode(json), 8);
    const f = await Deno.open(`${dir}/${file}`, { write: true, create: true, truncate: true });
    try {
      await writeAll(f, head);
      for (const t of part) {
        const n = sizeOf(t.shape);
        const lead = leadingValues(t.name, t.index, Math.min(n, 4096));
        await writeAll(f, lead);
        // A per-tensor rotation of the block, 2-byte aligned.
        let pos = ((t.index * 7919 * 4096) % block.length) & ~1;
        for (let done = lead.length; done < n;) {
          const k = Math.min(n - done, block.length - pos, 64 * MiB);
          await writeAll(f, block.subarray(pos, pos + k));
          done += k;
          pos = (pos + k) % block.length;
        }
        total += n;
      }
    } finally {
      f.close();
    }
  }
  await Deno.writeTextFile(
    `${dir}/model.safetensors.index.json`,
    JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }),
  );
  return total;
}

/**
 * Writes the bench's synthetic checkpoint of `shape` into `dir` (config.json, shards of up to
 * 5 GB, tensors in model order); returns the bytes of tensor data.
 */
export async function writeBenchCheckpoint(dir: string, shape: SynthShape): Promise<number> {
  const order = synthTensorShapes(shape).map((_, i) => i);
  return await writeCheckpoint(dir, shape, order, 5e9, randomBlock(64 * MiB));
}

async function writeAll(f: Deno.FsFile, data: Uint8Array): Promise<void> {
  for (let k = 0; k < data.length;) k += await f.write(data.subarray(k));
}

function leadingValues(name: string, index: number, bytes: number): Uint8Array {
  const next = rng(1000 + index);
  const bits = new Uint16Array(bytes / 2);
  const norm = name.endsWith("norm.weight");
  const spike = 0.05 + 0.2 * next();
  for (let i = 0; i < bits.length; i++) {
    bits[i] = bf16Bits(norm ? 1 + 0.1 * (next() - 0.5) : 0.02 * (next() + next() - 1));
  }
  if (!norm && bits.length > 0) bits[0] = bf16Bits(spike);
  return new Uint8Array(bits.buffer);
}

function randomBlock(bytes: number): Uint8Array {
  const next = rng(7);
  const bits = new Uint16Array(bytes / 2);
  for (let i = 0; i < bits.length; i++) bits[i] = bf16Bits(0.02 * (next() + next() - 1));
  return new Uint8Array(bits.buffer);
}

/** Reads every file once (page cache warm); returns bytes and seconds. */
async function warm(dir: string): Promise<[number, number]> {
  const t0 = performance.now();
  const buf = new Uint8Array(64 * MiB);
  let bytes = 0;
  for await (const e of Deno.readDir(dir)) {
    if (!e.isFile) continue;
    const f = await Deno.open(`${dir}/${e.name}`);
    try {
      for (;;) {
        const n = await f.read(buf);
        if (n === null) break;
        bytes += n;
      }
    } finally {
      f.close();
    }
  }
  return [bytes, (performance.now() - t0) / 1000];
}

/** Bytes free on the file system holding `path` (0 when `df` cannot tell). */
export function availableBytes(path: string): number {
  try {
    const out = new Deno.Command("df", { args: ["-B1", "--output=avail", path] }).outputSync();
    return Number(new TextDecoder().decode(out.stdout).trim().split("\n").pop());
  } catch {
    return 0;
  }
}

/** Seconds for a pinned host-to-device copy of `bytes` (512 MiB copies, one stream). */
function h2dSeconds(b: Backend, bytes: number): number {
  const h = cudaHandle(b)!;
  const d = h.device;
  const n = Math.min(512 * MiB, bytes);
  const host = d.hostAlloc(n);
  const dev = d.malloc(n);
  const ctx = d.createContext();
  try {
    d.h2d(ctx, dev, host.ptr, n);
    d.sync(ctx);
    const t0 = performance.now();
    for (let done = 0; done < bytes; done += n) {
      d.h2d(ctx, dev, host.ptr, Math.min(n, bytes - done));
    }
    d.sync(ctx);
    return (performance.now() - t0) / 1000;
  } finally {
    d.destroyContext(ctx);
    d.free(dev);
    d.hostFree(host);
  }
}

/**
 * SHA-256 of every kernel tensor of `model` (name order; tied names once), and one digest over
 * those: the figure to compare between backends for the same checkpoint (CUDA and WebAssembly
 * must give the same bytes).
 */
async function kernelDigests(
  backend: Backend,
  model: { namedTensors(): [string, { tensor: Tensor | null }][] },
): Promise<{ digest: string; tensors: Record<string, string>; bytes: number }> {
  const hex = (b: ArrayBuffer) =>
    Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, "0")).join("");
  const seen = new Set<Tensor>();
  const tensors: Record<string, string> = {};
  let bytes = 0;
  const named = model.namedTensors().sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  for (const [name, slot] of named) {
    const t = slot.tensor;
    if (!t || !t.storage || seen.has(t)) continue;
    seen.add(t);
    const data = backend.download(t) as Uint8Array<ArrayBuffer>;
    bytes += data.byteLength;
    tensors[name] = hex(await crypto.subtle.digest("SHA-256", data));
  }
  const all = new TextEncoder().encode(
    Object.entries(tensors).map(([n, d]) => `${n} ${d}\n`).join(""),
  );
  return { digest: hex(await crypto.subtle.digest("SHA-256", all)), tensors, bytes };
}

/** Seconds for a plain memcpy (Uint8Array.set) of `bytes`, 64 MiB at a time. */
function memcpySeconds(bytes: number): number {
  const n = Math.min(64 * MiB, bytes);
  const a = new Uint8Array(n).fill(1), b = new Uint8Array(n);
  b.set(a);
  const t0 = performance.now();
  for (let done = 0; done < bytes; done += n) {
    b.set(done + n <= bytes ? a : a.subarray(0, bytes - done));
  }
  return (performance.now() - t0) / 1000;
}

/**
 * Seconds for the reader threads alone (src/checkpoint/read_threads.ts) to read every
 * safetensors file of `dir` into the backend's memory, in reads of 16 MiB with up to four in
 * flight: the reload's reads with no kernels beside them, on the same threads and into the same
 * memory. The parallel limit of a WebAssembly reload (a one-thread memcpy is not: the reload
 * reads and quantizes on every core). Null without reader threads or a host view.
 */
async function threadedReadSeconds(b: Backend, dir: string): Promise<number | null> {
  const threads = await readThreads();
  if (!threads || !b.hostView) return null;
  const chunk = 16 * MiB, inFlight = 4;
  const window = b.empty([chunk * inFlight], DTYPES.u8);
  const session = readSession();
  try {
    const view = b.hostView(window);
    // Touched once before timing: fresh memory's first touch costs a page fault a page.
    b.fill(window, 0);
    const files: { path: string; dev: number | null; ino: number | null; size: number }[] = [];
    for await (const e of Deno.readDir(dir)) {
      if (!e.isFile || !e.name.endsWith(".safetensors")) continue;
      const path = `${dir}/${e.name}`;
      const st = await Deno.stat(path);
      files.push({ path, dev: st.dev, ino: st.ino, size: st.size });
    }
    const t0 = performance.now();
    const pending: Promise<boolean>[] = [];
    const check = async (p: Promise<boolean>) => {
      if (!(await p)) throw new Error(`bench: a threaded read of ${dir} failed`);
    };
    let k = 0;
    for (const f of files) {
      for (let pos = 0; pos < f.size; pos += chunk) {
        // The oldest read's part of the window is the one reused next.
        if (pending.length >= inFlight) await check(pending.shift()!);
        const at = (k++ % inFlight) * chunk;
        pending.push(
          threads.read(session, f, pos, view.subarray(at, at + Math.min(chunk, f.size - pos))),
        );
      }
    }
    for (const p of pending) await check(p);
    return (performance.now() - t0) / 1000;
  } finally {
    closeReadSession(session);
    b.free(window.storage!);
  }
}

/**
 * Seconds for the reload's read stream of `dir` (streamWeights: layer order, row chunks, reads
 * ahead into the backend's memory) with a consumer that does nothing.
 */
async function wasmStreamSeconds(b: Backend, model: CausalLM, dir: string): Promise<number> {
  const source = await fileSource(dir);
  try {
    const plan = validateWeights(model, source);
    const t0 = performance.now();
    for await (const _ of streamWeights(b, source, plan, model.readOrder)) { /* nothing */ }
    return (performance.now() - t0) / 1000;
  } finally {
    source.close();
  }
}

/**
 * Seconds for the library's staging threads to pread every file of `dir` into a pinned ring,
 * with no copies to the device: the stager runs on a plan of reads and empty pieces.
 */
async function readOnlySeconds(
  b: Backend,
  dir: string,
  o: Required<Pick<StagingOptions, "slotBytes" | "slots" | "chunkBytes" | "readers">>,
): Promise<number> {
  const h = cudaHandle(b)!;
  const d = h.device;
  const source = await fileSource(dir);
  const lib = Deno.dlopen("libc.so.6", {
    open: { parameters: ["buffer", "i32"], result: "i32" },
    close: { parameters: ["i32"], result: "i32" },
  });
  const ring = d.hostAlloc(o.slotBytes * o.slots);
  const ctx = d.createContext();
  const fds: number[] = [];
  try {
    const paths = [...new Set([...source.tensors.values()].map((i) => i.origin))];
    // Whole files as "tensors": the same bytes as the tensors, and the small headers.
    const files: StagedTensor[] = [];
    for (const [k, path] of paths.entries()) {
      fds.push(lib.symbols.open(new TextEncoder().encode(`${path}\0`), 0));
      files.push({ name: path, file: k, offset: 0, bytes: (await Deno.stat(path)).size });
    }
    const plan = planBlocks(files, o.slotBytes, o.chunkBytes);
    const blocks = plan.length;
    // One empty piece per block: each block is handed out (and its slot recycled) with no copy.
    const pieces = new BigUint64Array(6 * blocks);
    for (let k = 0; k < blocks; k++) pieces.set([BigInt(k), 0n, 0n, 0n, BigInt(k), 3n], 6 * k);
    const t0 = performance.now();
    const sg = d.stagerStart(ctx, h.ctx, {
      fds: Int32Array.from(fds),
      reads: flattenReads(plan),
      pieces,
      waitFor: new BigUint64Array(blocks),
      pinned: ring.ptr,
      slotBytes: o.slotBytes,
      slots: o.slots,
      readers: o.readers,
    });
    try {
      for (let k = 0; k < blocks; k++) {
        const st = await d.stagerNextAsync(sg, k);
        if (st !== 0) throw new Error(`reads alone: ${d.stagerError(sg)?.text}`);
        d.stagerDone(sg, k);
      }
    } finally {
      d.stagerFinish(sg);
    }
    return (performance.now() - t0) / 1000;
  } finally {
    for (const fd of fds) lib.symbols.close(fd);
    d.destroyContext(ctx);
    d.hostFree(ring);
    lib.close();
    source.close();
  }
}

/** Seconds to stream every tensor through the staging pipeline with a consumer that does nothing. */
async function streamOnlySeconds(
  b: Backend,
  dir: string,
  o: StagingOptions,
): Promise<[number, StagingStats]> {
  const source = await fileSource(dir);
  const stats = emptyStagingStats();
  try {
    const t0 = performance.now();
    for await (const _ of stageTensors(b, source, source.plan(), o, stats)) { /* nothing */ }
    b.synchronize();
    return [(performance.now() - t0) / 1000, stats];
  } finally {
    source.close();
  }
}

/** Options of {@link benchReload}. */
export interface ReloadBenchOptions {
  /** `8b` or `small` (default: 8b on CUDA, small on WebAssembly). */
  shape?: "8b" | "small";
  /** Reloads per checkpoint (default 3). */
  runs?: number;
  /** Where to write the checkpoints (default /dev/shm when it has room, else a temp dir). */
  dir?: string;
  /** Keep the checkpoints afterwards. */
  keep?: boolean;
  /** Also time one reload through the simple path (one tensor at a time). */
  simple?: boolean;
  /** Staging sizes. */
  staging?: StagingOptions;
  /** More staging sizes to time (stages and reloads) after the main table. */
  sweep?: StagingOptions[];
}

/** One timed reload. */
export interface ReloadRun {
  /** `ordered` or `shuffled`. */
  checkpoint: string;
  /** Seconds of the reload call. */
  seconds: number;
  /** Checkpoint GB per second. */
  gbps: number;
  /** gbps over the reference rate (pinned H2D on CUDA, memcpy on WebAssembly). */
  ratio: number;
  /** WebAssembly: GB/s of the reader threads reading the same files alone, measured after the run. */
  readsGbps?: number;
  /** WebAssembly: gbps over readsGbps. */
  readsRatio?: number;
  /** Most device bytes above the start, or null where not measured. */
  peakExtraBytes: number | null;
  /** The engine's peak buffered bytes. */
  peakBufferedBytes: number;
  /** The engine's peak scratch bytes. */
  peakScratchBytes: number;
}

/** Runs the bench and prints its table; returns the figures. */
export async function benchReload(
  backend: Backend,
  options: ReloadBenchOptions = {},
): Promise<Record<string, unknown>> {
  const cuda = backend.kind === "cuda";
  const shape = (options.shape ?? (cuda ? "8b" : "small")) === "8b" ? SHAPE_8B : SHAPE_SMALL;
  const runs = options.runs ?? 3;
  const all = synthTensorShapes(shape);
  const ckptBytes = all.reduce((a, [, s]) => a + 2 * s.reduce((x, y) => x * y, 1), 0);
  const shm = "/dev/shm";
  const root = options.dir ??
    (availableBytes(shm) > 2.2 * ckptBytes
      ? await Deno.makeTempDir({ dir: shm, prefix: "layerwise-bench-" })
      : await Deno.makeTempDir({ prefix: "layerwise-bench-" }));
  const log = (s: string) => console.log(s);
  const st: Required<StagingOptions> = { ...STAGING_DEFAULTS, ...options.staging };
  const result: Record<string, unknown> = {
    date: new Date().toISOString(),
    backend: backend.description,
    shape,
    checkpointBytes: ckptBytes,
    dir: root,
    staging: st,
  };
  try {
    log(
      `\nreload bench: ${backend.description}, Llama-shaped bf16 ${
        (ckptBytes / GB).toFixed(2)
      } GB (${shape.numLayers} layers, hidden ${shape.hiddenSize}, intermediate ${shape.intermediateSize}, vocab ${shape.vocabSize}) -> fp8 per tensor, in ${root}`,
    );
    let t0 = performance.now();
    const block = randomBlock(64 * MiB);
    const order = all.map((_, i) => i);
    await writeCheckpoint(`${root}/ordered`, shape, order, 5e9, block);
    const next = rng(99);
    const shuffled = [...order];
    for (let i = shuffled.length - 1; i > 0; i--) {
      const j = Math.floor(next() * (i + 1));
      [shuffled[i], shuffled[j]] = [shuffled[j], shuffled[i]];
    }
    await writeCheckpoint(`${root}/shuffled`, shape, shuffled, 5e9, block);
    log(`  wrote both checkpoints in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    for (const c of ["ordered", "shuffled"]) {
      const [b, s] = await warm(`${root}/${c}`);
      log(`  page cache warm: read ${c} once, ${(b / GB).toFixed(2)} GB in ${s.toFixed(2)} s`);
    }

    t0 = performance.now();
    const model = await loadModel(`${root}/ordered`, { backend, quant: "fp8", staging: st });
    const firstLoad = (performance.now() - t0) / 1000;
    log(
      `  first load (fp8): ${firstLoad.toFixed(2)} s, ${
        (ckptBytes / GB / firstLoad).toFixed(1)
      } GB/s`,
    );
    result.firstLoadSeconds = firstLoad;

    if (cuda) {
      const rd = await readOnlySeconds(backend, `${root}/ordered`, st);
      const [ss, stats] = await streamOnlySeconds(backend, `${root}/ordered`, st);
      const hd = h2dSeconds(backend, ckptBytes);
      log(
        `  stages alone: file reads into pinned memory ${
          (ckptBytes / GB / rd).toFixed(1)
        } GB/s (${st.readers} readers, ${
          st.chunkBytes / MiB
        } MiB chunks); staged stream without the engine ${
          (ckptBytes / GB / ss).toFixed(1)
        } GB/s (${stats.dedicated} dedicated tensors, ${stats.chunks} row chunks; consumer waited ${
          stats.readWaitSeconds.toFixed(3)
        } s, copy thread waited for reads ${
          (stats.copyWaitReadsSeconds ?? 0).toFixed(3)
        } s); pinned H2D ${(ckptBytes / GB / hd).toFixed(1)} GB/s`,
      );
      result.stages = {
        readGBps: ckptBytes / GB / rd,
        streamGBps: ckptBytes / GB / ss,
        streamReadWaitSeconds: stats.readWaitSeconds,
        streamCopyWaitReadsSeconds: stats.copyWaitReadsSeconds,
        h2dGBps: ckptBytes / GB / hd,
      };
      for (const readers of [4, 8, 32].filter((r) => r !== st.readers)) {
        const r = await readOnlySeconds(backend, `${root}/ordered`, { ...st, readers });
        log(`    reads with ${readers} readers: ${(ckptBytes / GB / r).toFixed(1)} GB/s`);
      }
    } else {
      // The same split on WebAssembly: the reader threads alone, then the reload's read stream
      // (layer order, row chunks, read-ahead) with a consumer that does nothing; what the
      // reload adds to the stream is the engine and the kernels.
      const rd = await threadedReadSeconds(backend, `${root}/ordered`);
      const ss = await wasmStreamSeconds(backend, model, `${root}/ordered`);
      const threads = (await readThreads())?.threads ?? 0;
      log(
        `  stages alone: reader threads (${threads}) reading the files into WebAssembly memory ${
          rd === null ? "n/a" : (ckptBytes / GB / rd).toFixed(1)
        } GB/s; the reload's read stream without the engine ${
          (ckptBytes / GB / ss).toFixed(1)
        } GB/s`,
      );
      result.stages = {
        readGBps: rd === null ? null : ckptBytes / GB / rd,
        streamGBps: ckptBytes / GB / ss,
        readThreads: threads,
      };
    }

    const limitLayer = layerModelBytes(shape);
    // The staged path's device ring, or the simple path's row chunk of a big tensor and, on
    // WebAssembly, the chunk read ahead while it is processed.
    const limitExtra = limitLayer + (cuda ? st.deviceRingBytes : 2 * READ_CHUNK_BYTES);
    const runsOut: ReloadRun[] = [];
    log(
      `\n  ${"checkpoint".padEnd(9)} ${"run".padStart(3)} ${"s".padStart(7)} ${
        "GB/s".padStart(7)
      } ${"ref GB/s".padStart(9)} ${"ratio".padStart(6)}${
        cuda ? "" : ` ${"reads GB/s".padStart(10)} ${"x reads".padStart(7)}`
      } ${"peak extra MB".padStart(14)} ${"buffered MB".padStart(12)} ${"scratch MB".padStart(11)}`,
    );
    for (const c of ["ordered", "shuffled"]) {
      for (let i = 0; i < runs; i++) {
        const pool = cuda ? cudaHandle(backend)!.pool : null;
        pool?.resetPeak();
        const start = pool ? pool.liveBytes + pool.cachedBytes : backend.allocatedBytes();
        // Without the CUDA pool's figures: the backend's allocated bytes, peak tracked on alloc.
        const tracker = pool ? null : trackPeak(backend);
        const t = performance.now();
        let r;
        try {
          r = await reloadWeights(model, `${root}/${c}`, { staging: st });
        } finally {
          tracker?.stop();
        }
        const s = (performance.now() - t) / 1000;
        const ref = cuda ? h2dSeconds(backend, ckptBytes) : memcpySeconds(ckptBytes);
        const reads = cuda ? null : await threadedReadSeconds(backend, `${root}/${c}`);
        const run: ReloadRun = {
          checkpoint: c,
          seconds: s,
          gbps: ckptBytes / GB / s,
          ratio: ref / s,
          peakExtraBytes: (pool ? pool.peakBytes : tracker!.peak) - start,
          peakBufferedBytes: r.peakBufferedBytes,
          peakScratchBytes: r.peakScratchBytes,
        };
        if (reads !== null) {
          run.readsGbps = ckptBytes / GB / reads;
          run.readsRatio = reads / s;
        }
        runsOut.push(run);
        log(
          `  ${c.padEnd(9)} ${String(i + 1).padStart(3)} ${s.toFixed(3).padStart(7)} ${
            run.gbps.toFixed(1).padStart(7)
          } ${(ckptBytes / GB / ref).toFixed(1).padStart(9)} ${run.ratio.toFixed(2).padStart(6)}${
            cuda
              ? ""
              : ` ${(run.readsGbps?.toFixed(1) ?? "n/a").padStart(10)} ${
                (run.readsRatio?.toFixed(2) ?? "n/a").padStart(7)
              }`
          } ${
            (run.peakExtraBytes === null ? "n/a" : (run.peakExtraBytes / MiB).toFixed(0)).padStart(
              14,
            )
          } ${(r.peakBufferedBytes / MiB).toFixed(0).padStart(12)} ${
            (r.peakScratchBytes / MiB).toFixed(0).padStart(11)
          }`,
        );
      }
    }
    log(
      `  limits: ${
        cuda
          ? ">= 0.85 x pinned H2D (ratio column)"
          : "none on speed here (ratio: x a one-thread memcpy; x reads: x the reader threads " +
            "reading the same files alone, the parallel limit)"
      }; peak extra <= one decoder layer in model format (${(limitLayer / MiB).toFixed(0)} MiB) + ${
        cuda
          ? `the device staging ring (${st.deviceRingBytes / MiB} MiB)`
          : `one read chunk and one read ahead (2 x ${READ_CHUNK_BYTES / MiB} MiB)`
      } = ${(limitExtra / MiB).toFixed(0)} MiB${
        cuda ? `; pinned host ring ${(st.slotBytes * st.slots) / MiB} MiB` : ""
      }`,
    );
    log(
      `  (the embedding and lm_head are layers of their own, ${
        (2 * shape.vocabSize * shape.hiddenSize / MiB).toFixed(0)
      } MiB each in model format)`,
    );
    result.limitExtraBytes = limitExtra;
    t0 = performance.now();
    const digests = await kernelDigests(backend, model);
    log(
      `  kernel tensors after the reloads: sha256 ${digests.digest} over ${
        Object.keys(digests.tensors).length
      } tensors, ${(digests.bytes / GB).toFixed(2)} GB (${
        ((performance.now() - t0) / 1000).toFixed(1)
      } s; the same checkpoint on another backend must print the same digest)`,
    );
    result.kernelDigest = digests.digest;
    result.kernelTensorDigests = digests.tensors;
    result.runs = runsOut;
    for (const alt of cuda ? options.sweep ?? [] : []) {
      const o = { ...st, ...alt };
      const rd = await readOnlySeconds(backend, `${root}/ordered`, o);
      const [ss] = await streamOnlySeconds(backend, `${root}/ordered`, o);
      const times: string[] = [];
      for (const c of ["ordered", "ordered", "shuffled"]) {
        const t = performance.now();
        await reloadWeights(model, `${root}/${c}`, { staging: o });
        const s = (performance.now() - t) / 1000;
        const ref = h2dSeconds(backend, ckptBytes);
        times.push(`${c} ${(ckptBytes / GB / s).toFixed(1)} GB/s (x${(ref / s).toFixed(2)})`);
      }
      log(
        `  sweep readers ${o.readers}, slots ${o.slots} x ${o.slotBytes / MiB} MiB, chunks ${
          o.chunkBytes / MiB
        } MiB: reads ${(ckptBytes / GB / rd).toFixed(1)} GB/s, stream ${
          (ckptBytes / GB / ss).toFixed(1)
        } GB/s, reloads ${times.join(", ")}`,
      );
    }
    if (options.simple) {
      const t = performance.now();
      await reloadWeights(model, `${root}/ordered`, { staging: false });
      const s = (performance.now() - t) / 1000;
      log(
        `  simple path (one tensor at a time): ${s.toFixed(2)} s, ${
          (ckptBytes / GB / s).toFixed(1)
        } GB/s`,
      );
      result.simpleSeconds = s;
    }
    if (cuda) releaseStaging(backend);
  } finally {
    if (!options.keep && !options.dir) await Deno.remove(root, { recursive: true });
  }
  return result;
}

/** Command-line options of the reload bench (parseArgs form; scripts/bench.ts takes them too). */
export const RELOAD_BENCH_ARGS = {
  shape: { type: "string" },
  runs: { type: "string", default: "3" },
  dir: { type: "string" },
  keep: { type: "boolean" },
  simple: { type: "boolean" },
  "slot-mb": { type: "string" },
  slots: { type: "string" },
  "chunk-mb": { type: "string" },
  readers: { type: "string" },
  "ring-mb": { type: "string" },
  sweep: { type: "string" },
} as const;

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      backend: { type: "string", default: "auto" },
      json: { type: "string" },
      help: { type: "boolean", short: "h" },
      ...RELOAD_BENCH_ARGS,
    },
  });
  if (values.help) {
    console.log(
      "usage: deno run -A scripts/bench_reload.ts [--backend auto|cuda|wasm] [--json FILE] " +
        "[--shape 8b|small] [--runs N] [--dir DIR] [--keep] [--simple] [--slot-mb N] [--slots N] " +
        "[--chunk-mb N] [--readers N] [--ring-mb N] [--sweep RxSxC[xSlotMiB],...]",
    );
    Deno.exit(0);
  }
  const backend = await openBackend({ backend: values.backend as "auto" | "cuda" | "wasm" });
  try {
    const r = await benchReload(backend, reloadOptions(values));
    if (values.json) await Deno.writeTextFile(values.json, JSON.stringify(r, null, 2));
  } finally {
    backend.close();
  }
}

/** Bench options from parsed command-line values (shared with scripts/bench.ts). */
export function reloadOptions(v: Record<string, string | boolean | undefined>): ReloadBenchOptions {
  const num = (k: string) => (typeof v[k] === "string" ? Number(v[k]) : undefined);
  const staging: StagingOptions = {};
  if (num("slot-mb")) staging.slotBytes = num("slot-mb")! * MiB;
  if (num("slots")) staging.slots = num("slots");
  if (num("chunk-mb")) staging.chunkBytes = num("chunk-mb")! * MiB;
  if (num("readers")) staging.readers = num("readers");
  if (num("ring-mb")) staging.deviceRingBytes = num("ring-mb")! * MiB;
  // --sweep readers x slots x chunk MiB [x slot MiB], comma-separated: 32x8x8,32x8x4x32
  const sweep = typeof v.sweep === "string"
    ? v.sweep.split(",").map((c) => {
      const [r, n, ch, sl] = c.split("x").map(Number);
      const o: StagingOptions = { readers: r, slots: n, chunkBytes: ch * MiB };
      if (sl) o.slotBytes = sl * MiB;
      return o;
    })
    : undefined;
  return {
    sweep,
    shape: v.shape as "8b" | "small" | undefined,
    runs: num("runs") ?? 3,
    dir: v.dir as string | undefined,
    keep: v.keep === true,
    simple: v.simple === true,
    staging,
  };
}

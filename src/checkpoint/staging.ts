/**
 * Staged reads for the CUDA backend: checkpoint tensors read from files by threads of the CUDA
 * library into a ring of pinned host memory, copied to the device asynchronously on a stream of
 * their own, and handed out as backend tensors in read order, so that reading the next tensors
 * overlaps copying and processing the current ones.
 *
 * This module plans; the library moves the bytes (cuda/stager.cu). The read order is cut into
 * blocks of one pinned slot; each block is read with parallel `pread`s (reads of neighbouring
 * tensors of one file are merged, then split into chunks), then copied to the device piece by
 * piece by one thread of the library, so no copy ever waits for the JavaScript thread. Tensors
 * land in a device ring and are handed out as soon as their last piece is queued; a tensor
 * larger than half of the ring (or than `maxChunkBytes`) travels as consecutive row chunks,
 * each handed out as a `rowWindow` of the tensor, so no whole big tensor is ever held in device
 * memory (only a 1-D tensor or a single row larger than half the ring, which no language model
 * has, gets a block of its own, allocated before the stream starts). The backend's stream waits
 * for each copy through an event, and the copy stream waits, through another event recorded
 * after the consumer is done, before it overwrites a tensor's place in the ring. Every place is
 * planned up front, so the library needs from JavaScript only "tensor i is done".
 *
 * {@link canStage} says whether a backend and a source can take this path (a CUDA backend and a
 * file-backed source on Linux); otherwise callers read through the source as before.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import {
  type CudaDevice,
  type CudaHandle,
  cudaHandle,
  type PinnedBuffer,
} from "../backend/cuda.ts";
import { BackendError, CheckpointError } from "../errors.ts";
import { rowWindow, type Storage, Tensor } from "../tensor/tensor.ts";
import { openCheckpoint } from "./sharded.ts";
import type { WeightSource } from "./source.ts";

/** Sizes of the staging pipeline. */
export interface StagingOptions {
  /** Bytes per pinned slot (default 8 MiB). */
  slotBytes?: number;
  /** Pinned slots in the ring (default 8). */
  slots?: number;
  /** Largest single pread (default 2 MiB): larger reads are split and run in parallel. */
  chunkBytes?: number;
  /** Reader threads (default: three per four CPU cores, from 2 to 16). */
  readers?: number;
  /** Bytes of the device ring tensors land in (default 256 MiB). */
  deviceRingBytes?: number;
  /**
   * Largest row chunk a tensor is cut into (default 128 MiB; half the device ring bounds it
   * too): a larger tensor is handed out as consecutive row chunks.
   */
  maxChunkBytes?: number;
  /**
   * Keep device blocks freed during the stream for exact-size reuse (default true): avoids a
   * cudaFree, which synchronizes the device, for every scratch tensor of every layer.
   */
  reuseAllocations?: boolean;
}

const MiB = 1 << 20;
// Measured on the H200 host (16 cores; BENCHMARKS.md, 2026-11-30): 8 x 8 MiB slots and 2 MiB
// preads; 12 reader threads reloaded the 8B shape at 47-48 GB/s where 16 gave 42-45 and 8 gave
// 36-38. Readers need cores, and so do the copy thread and the JavaScript thread: more readers
// than cores fell to 20-27 GB/s. So three readers per four cores, at most 16 (nothing larger
// was measured). Small rings stay in the host caches between read and DMA.
/** The sizes used when a StagingOptions field is not given. */
export const STAGING_DEFAULTS: Readonly<Required<StagingOptions>> = Object.freeze({
  slotBytes: 8 * MiB,
  slots: 8,
  chunkBytes: 2 * MiB,
  readers: Math.max(2, Math.min(16, Math.round((navigator.hardwareConcurrency || 2) * 3 / 4))),
  deviceRingBytes: 256 * MiB,
  maxChunkBytes: 128 * MiB,
  reuseAllocations: true,
});
const ALIGN = 256;

/** Where one tensor's bytes are: file (index into the file list), offset, length. */
export interface StagedTensor {
  /** Checkpoint name. */
  readonly name: string;
  /** Index of its file. */
  readonly file: number;
  /** Absolute offset of its first byte in the file. */
  readonly offset: number;
  /** Byte length. */
  readonly bytes: number;
  /** For a row chunk: the rows `[start, end)` of the tensor it holds. */
  readonly rows?: { readonly start: number; readonly end: number };
}

/**
 * Cuts each tensor larger than `maxBytes` into consecutive row chunks of at most `maxBytes`
 * (rows along dimension 0; `shapeOf` gives a tensor's shape). A 1-D (or 0-D) tensor, and one
 * whose single row is larger than `maxBytes`, stays whole. Exported for tests.
 */
export function splitRows(
  tensors: readonly StagedTensor[],
  shapeOf: (name: string) => readonly number[],
  maxBytes: number,
): StagedTensor[] {
  if (!(maxBytes > 0)) {
    throw new BackendError("BAD_OPTION", `staging: maxChunkBytes must be positive`);
  }
  const out: StagedTensor[] = [];
  for (const t of tensors) {
    const shape = shapeOf(t.name);
    const rows = shape.length >= 2 ? shape[0] : 0;
    const rowBytes = rows > 0 ? t.bytes / rows : 0;
    const per = rowBytes > 0 ? Math.floor(maxBytes / rowBytes) : 0;
    if (t.bytes <= maxBytes || per < 1 || t.rows) {
      out.push(t);
      continue;
    }
    for (let start = 0; start < rows; start += per) {
      const end = Math.min(rows, start + per);
      out.push({
        name: t.name,
        file: t.file,
        offset: t.offset + start * rowBytes,
        bytes: (end - start) * rowBytes,
        rows: { start, end },
      });
    }
  }
  return out;
}

/** A contiguous part of one tensor inside a pinned slot. */
export interface Piece {
  /** Index of the tensor in the read order. */
  readonly tensor: number;
  /** Byte offset of the piece inside the tensor. */
  readonly at: number;
  /** Byte offset of the piece inside the slot. */
  readonly slotAt: number;
  /** Length. */
  readonly bytes: number;
}

/** One pread into a slot. */
export interface ReadOp {
  /** File index. */
  readonly file: number;
  /** Absolute file offset. */
  readonly offset: number;
  /** Byte offset inside the slot. */
  readonly slotAt: number;
  /** Length. */
  readonly bytes: number;
}

/** What fills one pinned slot: the reads, then the pieces copied out of it. */
export interface Block {
  /** Reads into the slot (neighbours merged, then split into chunks). */
  readonly reads: readonly ReadOp[];
  /** Pieces copied to the device, in order. */
  readonly pieces: readonly Piece[];
}

/**
 * Cuts tensors, in read order, into blocks of at most `slotBytes`: each tensor's bytes go to
 * consecutive pieces (a tensor larger than a slot spans several blocks); reads of pieces that
 * follow each other in the same file and in the slot are merged, then split into reads of at
 * most `chunkBytes`.
 */
export function planBlocks(
  tensors: readonly StagedTensor[],
  slotBytes: number,
  chunkBytes: number,
): Block[] {
  if (!(slotBytes > 0) || !(chunkBytes > 0)) {
    throw new BackendError("BAD_OPTION", "staging: slot and chunk sizes must be positive");
  }
  const blocks: Block[] = [];
  let pieces: Piece[] = [];
  let used = 0;
  const flush = () => {
    if (pieces.length === 0) return;
    const merged: { file: number; offset: number; slotAt: number; bytes: number }[] = [];
    for (const p of pieces) {
      const t = tensors[p.tensor];
      const last = merged[merged.length - 1];
      if (
        last && last.file === t.file && last.offset + last.bytes === t.offset + p.at &&
        last.slotAt + last.bytes === p.slotAt
      ) last.bytes += p.bytes;
      else merged.push({ file: t.file, offset: t.offset + p.at, slotAt: p.slotAt, bytes: p.bytes });
    }
    const reads: ReadOp[] = [];
    for (const m of merged) {
      for (let k = 0; k < m.bytes; k += chunkBytes) {
        const n = Math.min(chunkBytes, m.bytes - k);
        reads.push({ file: m.file, offset: m.offset + k, slotAt: m.slotAt + k, bytes: n });
      }
    }
    blocks.push({ reads, pieces });
    pieces = [];
    used = 0;
  };
  tensors.forEach((t, i) => {
    // An empty tensor still needs a piece: it is handed out when its (only) piece is.
    if (t.bytes === 0) pieces.push({ tensor: i, at: 0, slotAt: used, bytes: 0 });
    let at = 0;
    while (at < t.bytes) {
      const n = Math.min(t.bytes - at, slotBytes - used);
      pieces.push({ tensor: i, at, slotAt: used, bytes: n });
      at += n;
      used += n;
      if (used === slotBytes) flush();
    }
  });
  flush();
  return blocks;
}

/**
 * Places tensors in a circular device ring in order; returns each tensor's offset, or -1 for
 * tensors that get a block of their own (larger than half the ring). Exported for tests.
 */
export class DeviceRing {
  readonly #capacity: number;
  #head = 0;
  /** Places in use: [begin, end) and who holds them. */
  readonly #held: { begin: number; end: number; owner: number }[] = [];

  /** A ring of `capacity` bytes. */
  constructor(capacity: number) {
    this.#capacity = capacity;
  }

  /** Whether a tensor of `bytes` goes into the ring. */
  fits(bytes: number): boolean {
    return bytes <= this.#capacity / 2;
  }

  /**
   * The offset for `bytes` (aligned), and the owners of the places it overwrites (which
   * must be released first; they are forgotten here).
   */
  place(bytes: number, owner: number): { offset: number; overwrites: number[] } {
    let begin = this.#head;
    if (begin + bytes > this.#capacity) begin = 0;
    const end = begin + bytes;
    const overwrites: number[] = [];
    for (let i = this.#held.length - 1; i >= 0; i--) {
      const h = this.#held[i];
      if (h.begin < end && begin < h.end) {
        overwrites.push(h.owner);
        this.#held.splice(i, 1);
      }
    }
    this.#held.push({ begin, end: Math.max(end, begin + 1), owner });
    this.#head = Math.ceil(end / ALIGN) * ALIGN;
    return { offset: begin, overwrites };
  }
}

// ------------------------------------------------------------------------------ files

const O_RDONLY = 0;
let libc:
  | Deno.DynamicLibrary<{
    open: { parameters: ["buffer", "i32"]; result: "i32" };
    close: { parameters: ["i32"]; result: "i32" };
  }>
  | null
  | undefined;

// Deno gives no file descriptors; pread in the CUDA library needs one.
function posix(): NonNullable<typeof libc> | null {
  if (libc !== undefined) return libc;
  if (Deno.build.os !== "linux") return libc = null;
  try {
    libc = Deno.dlopen("libc.so.6", {
      open: { parameters: ["buffer", "i32"], result: "i32" },
      close: { parameters: ["i32"], result: "i32" },
    });
  } catch {
    libc = null;
  }
  return libc;
}

function openFd(path: string): number {
  const fd = posix()!.symbols.open(new TextEncoder().encode(`${path}\0`), O_RDONLY);
  if (fd < 0) {
    throw new CheckpointError("MISSING_SHARD", `${path}: cannot open for reading`);
  }
  return fd;
}

/** Where a source's tensors are in files, or null when it is not file-backed. */
async function locate(
  source: WeightSource,
  names: readonly string[],
): Promise<{ files: string[]; tensors: StagedTensor[] } | null> {
  const infos = names.map((n) => source.tensors.get(n));
  if (infos.some((i) => i === undefined || i.origin === "memory")) return null;
  let ckpt;
  try {
    ckpt = await openCheckpoint(source.description);
  } catch {
    return null;
  }
  const files: string[] = [];
  const index = new Map<string, number>();
  const tensors: StagedTensor[] = [];
  for (const name of names) {
    const info = source.tensors.get(name)!;
    const e = ckpt.tensors.get(name);
    // The headers must be the ones the source validated: same file, dtype and size.
    if (
      !e || e.file !== info.origin || e.dtype.name !== info.dtype.name ||
      e.end - e.begin !== info.bytes
    ) return null;
    let f = index.get(e.file);
    if (f === undefined) {
      index.set(e.file, f = files.length);
      files.push(e.file);
    }
    tensors.push({ name, file: f, offset: e.begin, bytes: info.bytes });
  }
  return { files, tensors };
}

/** Whether {@link stageTensors} can run for this backend (CUDA, Linux, libc loadable). */
export function canStage(backend: Backend): boolean {
  return backend.kind === "cuda" && cudaHandle(backend) !== undefined && posix() !== null;
}

// ------------------------------------------------------------------------------ ring

interface HostRing {
  readonly slotBytes: number;
  readonly slots: number;
  /** `slots` x `slotBytes` of pinned memory. */
  readonly pinned: PinnedBuffer;
  /** The copy stream. */
  readonly ctx: number;
  busy: boolean;
}

const RINGS = new WeakMap<Backend, HostRing>();

function makeRing(d: CudaDevice, slotBytes: number, slots: number): HostRing {
  const pinned = d.hostAlloc(slotBytes * slots);
  try {
    return { slotBytes, slots, pinned, ctx: d.createContext(), busy: false };
  } catch (e) {
    d.hostFree(pinned);
    throw e;
  }
}

function freeRing(d: CudaDevice, ring: HostRing): void {
  d.destroyContext(ring.ctx); // waits for its copies first
  d.hostFree(ring.pinned);
}

/** The pinned ring kept for a backend (allocating pinned memory takes tens of ms). */
function ringFor(backend: Backend, h: CudaHandle, o: Required<StagingOptions>): HostRing {
  const kept = RINGS.get(backend);
  if (kept && !kept.busy && kept.slotBytes === o.slotBytes && kept.slots === o.slots) {
    return kept;
  }
  const ring = makeRing(h.device, o.slotBytes, o.slots);
  if (!kept || !kept.busy) {
    if (kept) freeRing(h.device, kept);
    RINGS.set(backend, ring);
  }
  return ring;
}

/**
 * Frees the pinned staging ring kept for `backend` (kept between reloads because pinning
 * memory is slow). Call before closing the backend; a later staged read makes a new one.
 */
export function releaseStaging(backend: Backend): void {
  const ring = RINGS.get(backend);
  const h = cudaHandle(backend);
  if (!ring || !h || ring.busy) return;
  RINGS.delete(backend);
  freeRing(h.device, ring);
}

/** Numbers a run of {@link stageTensors} reports. */
export interface StagingStats {
  /** Bytes read from files. */
  bytes: number;
  /** Pinned bytes of the ring. */
  pinnedBytes: number;
  /** Device bytes of the ring. */
  deviceRingBytes: number;
  /** Tensors that got device blocks of their own (only a 1-D tensor larger than half the ring). */
  dedicated: number;
  /** Row chunks handed out for tensors larger than half the ring or `maxChunkBytes`. */
  chunks?: number;
  /** Seconds the consumer waited for tensors (host). */
  readWaitSeconds: number;
  /** Seconds the copy thread waited for file reads to land (reads are the limit when high). */
  copyWaitReadsSeconds?: number;
  /**
   * Seconds the copy thread waited for the consumer to finish with device ring places (the
   * consumer, or a small device ring, is the limit when high).
   */
  copyWaitConsumerSeconds?: number;
}

/** Stats at zero, to pass to {@link stageTensors} and read afterwards. */
export function emptyStagingStats(): StagingStats {
  return {
    bytes: 0,
    pinnedBytes: 0,
    deviceRingBytes: 0,
    dedicated: 0,
    chunks: 0,
    readWaitSeconds: 0,
    copyWaitReadsSeconds: 0,
    copyWaitConsumerSeconds: 0,
  };
}

const POSITIVE: readonly (keyof StagingOptions)[] = [
  "slotBytes",
  "slots",
  "chunkBytes",
  "readers",
  "deviceRingBytes",
  "maxChunkBytes",
];

function checkOptions(o: Required<StagingOptions>): void {
  for (const k of POSITIVE) {
    const v = o[k] as number;
    if (!Number.isSafeInteger(v) || v <= 0) {
      throw new BackendError("BAD_OPTION", `staging: ${k} must be a positive integer, not ${v}`);
    }
  }
}

/** The reads of `blocks` flattened for the library: `{file, offset, slotAt, bytes, block}`. */
export function flattenReads(blocks: readonly Block[]): BigUint64Array {
  const reads = new BigUint64Array(5 * blocks.reduce((n, b) => n + b.reads.length, 0));
  let r = 0;
  blocks.forEach((b, k) => {
    for (const x of b.reads) {
      reads.set(
        [BigInt(x.file), BigInt(x.offset), BigInt(x.slotAt), BigInt(x.bytes), BigInt(k)],
        r,
      );
      r += 5;
    }
  });
  return reads;
}

/**
 * The pieces of `blocks` flattened for the library, each with the device address it lands at
 * (`dst[i]` + its offset in the tensor) and flags (1: the tensor's first piece, 2: its last).
 */
function flattenPieces(
  tensors: readonly StagedTensor[],
  blocks: readonly Block[],
  dst: readonly number[],
): BigUint64Array {
  const pieces = new BigUint64Array(6 * blocks.reduce((n, b) => n + b.pieces.length, 0));
  let p = 0;
  blocks.forEach((b, k) => {
    for (const x of b.pieces) {
      const t = tensors[x.tensor];
      const flags = (x.at === 0 ? 1 : 0) | (x.at + x.bytes === t.bytes ? 2 : 0);
      pieces.set([
        BigInt(x.tensor),
        BigInt(x.slotAt),
        BigInt(x.bytes),
        BigInt(dst[x.tensor] + x.at),
        BigInt(k),
        BigInt(flags),
      ], p);
      p += 6;
    }
  });
  return pieces;
}

/**
 * Reads `names` of a file-backed `source` (in that order) through the pinned ring and yields
 * each as a contiguous tensor in `backend` memory, borrowed: it is valid until the consumer
 * asks for the next one. A tensor larger than half the device ring (or `maxChunkBytes`) comes
 * as consecutive row chunks under its name, each a `rowWindow` of it. Yields nothing and
 * returns false when the source is not file-backed (call {@link canStage} for the backend
 * first); returns true after the last tensor.
 * Errors: CheckpointError `TRUNCATED` when a file came short, `MISSING_SHARD` when one
 * vanished; BackendError from the device, `BAD_OPTION` for sizes that are not positive
 * integers.
 */
export async function* stageTensors(
  backend: Backend,
  source: WeightSource,
  names: readonly string[],
  options: StagingOptions = {},
  stats?: StagingStats,
): AsyncGenerator<[string, Tensor], boolean> {
  const h = cudaHandle(backend);
  if (!h || posix() === null) return false;
  const o = { ...STAGING_DEFAULTS, ...options };
  checkOptions(o);
  const where = await locate(source, names);
  if (where === null) return false;
  const d = h.device;
  const ring = ringFor(backend, h, o);
  const kept = RINGS.get(backend) === ring;
  ring.busy = true;
  const fds: number[] = [];
  const dedicated = new Map<number, Storage>();
  let devRing: Storage | null = null;
  let stager = 0;
  let ok = false;
  if (o.reuseAllocations) h.pool.hold();
  try {
    for (const f of where.files) fds.push(openFd(f));
    // Chunks of at most half the ring always fit in it (see the ring size below).
    const tensors = splitRows(
      where.tensors,
      (n) => source.tensors.get(n)!.shape,
      Math.max(1, Math.min(o.maxChunkBytes, Math.floor(o.deviceRingBytes / 2))),
    );
    const blocks = planBlocks(tensors, o.slotBytes, o.chunkBytes);
    const largest = tensors.reduce((m, t) => Math.max(m, t.bytes), 0);
    const ringBytes = Math.min(o.deviceRingBytes, Math.ceil(2 * largest / ALIGN) * ALIGN + ALIGN);
    devRing = backend.alloc(ringBytes);
    if (stats) {
      stats.pinnedBytes = o.slotBytes * o.slots;
      stats.deviceRingBytes = ringBytes;
    }
    // Every place is known before the first read: the library's copy thread then needs only
    // "how many tensors must the consumer have finished" to know when a place is free.
    const places = new DeviceRing(ringBytes);
    const base: [Storage, number][] = [];
    const waitFor = new BigUint64Array(tensors.length);
    tensors.forEach((t, i) => {
      if (places.fits(t.bytes)) {
        const { offset, overwrites } = places.place(t.bytes, i);
        base.push([devRing!, offset]);
        waitFor[i] = BigInt(overwrites.reduce((m, w) => Math.max(m, w + 1), 0));
      } else {
        const s = backend.alloc(t.bytes);
        dedicated.set(i, s);
        base.push([s, 0]);
        if (stats) stats.dedicated++;
      }
    });
    stager = d.stagerStart(ring.ctx, h.ctx, {
      fds: Int32Array.from(fds),
      reads: flattenReads(blocks),
      pieces: flattenPieces(tensors, blocks, base.map(([s, off]) => s.ptr + off)),
      waitFor,
      pinned: ring.pinned.ptr,
      slotBytes: o.slotBytes,
      slots: o.slots,
      readers: o.readers,
    });

    for (let i = 0; i < tensors.length; i++) {
      const t = tensors[i];
      const t0 = performance.now();
      const st = d.stagerReady(stager, i)
        ? d.stagerNext(stager, i)
        : await d.stagerNextAsync(stager, i);
      if (stats) stats.readWaitSeconds += (performance.now() - t0) / 1000;
      if (st !== 0) throw stagingFailure(d, stager, where.files);
      const [storage, off] = base[i];
      const info = source.tensors.get(t.name)!;
      let tensor: Tensor;
      if (t.rows) {
        const shape = [t.rows.end - t.rows.start, ...info.shape.slice(1)];
        const chunk = new Tensor(shape, info.dtype, storage, off / info.dtype.size);
        tensor = rowWindow(chunk, t.rows.start, info.shape[0]);
        if (stats) stats.chunks = (stats.chunks ?? 0) + 1;
      } else tensor = new Tensor(info.shape, info.dtype, storage, off / info.dtype.size);
      if (stats) stats.bytes += t.bytes;
      yield [t.name, tensor];
      d.stagerDone(stager, i);
      const own = dedicated.get(i);
      if (own) {
        dedicated.delete(i);
        backend.free(own);
      }
    }
    ok = true;
    return true;
  } finally {
    let err: unknown = null;
    const attempt = (f: () => void) => {
      try {
        f();
      } catch (e) {
        err ??= e;
      }
    };
    if (stager !== 0) {
      if (stats) {
        attempt(() => {
          const w = d.stagerStats(stager);
          stats.copyWaitReadsSeconds = w.readWaitSeconds;
          stats.copyWaitConsumerSeconds = w.consumerWaitSeconds;
        });
      }
      // Stops the threads and waits for copies out of the pinned ring before anything goes.
      attempt(() => d.stagerFinish(stager));
    }
    attempt(() => backend.synchronize());
    for (const s of dedicated.values()) attempt(() => backend.free(s));
    if (devRing) attempt(() => backend.free(devRing!));
    if (o.reuseAllocations) attempt(() => h.pool.release((p) => d.free(p)));
    for (const fd of fds) posix()!.symbols.close(fd);
    ring.busy = false;
    if (!kept) attempt(() => freeRing(d, ring));
    // A cleanup failure after success is the error; after a failure the first error wins.
    // deno-lint-ignore no-unsafe-finally -- only after success, where nothing else is thrown
    if (ok && err !== null) throw err;
  }
}

/** The error for a stager that stopped: a failed read names its file, offset and length. */
function stagingFailure(d: CudaDevice, stager: number, files: readonly string[]): Error {
  const f = d.stagerError(stager);
  if (f === null) return new BackendError("DEVICE", `staging on cuda:${d.device}: stopped`);
  if (f.code !== "IO") {
    return new BackendError(f.code, `staging on cuda:${d.device}: ${f.text}`);
  }
  return new CheckpointError(
    "TRUNCATED",
    `${files[f.file]}: reading ${f.bytes} bytes at ${f.offset} failed or came short (${f.text})`,
  );
}

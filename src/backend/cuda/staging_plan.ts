/**
 * The pure half of staged reads: given where tensors lie in files and the staging sizes, the
 * blocks of pinned slots, the reads into them, the pieces copied out of them and the places in
 * the device ring. Nothing here touches a file or a device; {@link ./staging.ts} drives the
 * plan through the CUDA library (see ARCHITECTURE.md, "Staged reads").
 * @module
 */

import { BackendError } from "../../errors.ts";

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
/** Alignment of places in the device ring, in bytes. */
export const ALIGN = 256;

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

/** Numbers a run of a staged read reports. */
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

/** Stats at zero, to pass to a staged read and read afterwards. */
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

/** Throws BackendError `BAD_OPTION` unless every size of `o` is a positive integer. */
export function checkOptions(o: Required<StagingOptions>): void {
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
export function flattenPieces(
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

/** Everything a staged read does, decided before the first byte moves: see {@link planStaging}. */
export interface StagingPlan {
  /** The read order, big tensors cut into row chunks. */
  readonly tensors: readonly StagedTensor[];
  /** The pinned-slot blocks: reads into each slot and pieces copied out of it. */
  readonly blocks: readonly Block[];
  /** Bytes of the device ring. */
  readonly ringBytes: number;
  /** Per tensor: its offset in the device ring, or -1 when it gets a block of its own. */
  readonly ringOffsets: readonly number[];
  /** Per tensor: how many tensors the consumer must have finished before it may be copied. */
  readonly waitFor: BigUint64Array;
}

/**
 * Plans a staged read of `located` (in read order) with sizes `o`: cuts tensors larger than half
 * the device ring (or `maxChunkBytes`) into row chunks (`shapeOf` gives a tensor's shape), cuts
 * the order into pinned-slot blocks, sizes the device ring (twice the largest tensor, at most
 * `deviceRingBytes`) and places every tensor in it. Every place is known before the first read,
 * so the library's copy thread needs only "how many tensors has the consumer finished" to know
 * when a place is free. Pure: no file, no device.
 */
export function planStaging(
  located: readonly StagedTensor[],
  shapeOf: (name: string) => readonly number[],
  o: Required<StagingOptions>,
): StagingPlan {
  // Chunks of at most half the ring always fit in it (see the ring size below).
  const tensors = splitRows(
    located,
    shapeOf,
    Math.max(1, Math.min(o.maxChunkBytes, Math.floor(o.deviceRingBytes / 2))),
  );
  const blocks = planBlocks(tensors, o.slotBytes, o.chunkBytes);
  const largest = tensors.reduce((m, t) => Math.max(m, t.bytes), 0);
  const ringBytes = Math.min(o.deviceRingBytes, Math.ceil(2 * largest / ALIGN) * ALIGN + ALIGN);
  const places = new DeviceRing(ringBytes);
  const ringOffsets: number[] = [];
  const waitFor = new BigUint64Array(tensors.length);
  tensors.forEach((t, i) => {
    if (places.fits(t.bytes)) {
      const { offset, overwrites } = places.place(t.bytes, i);
      ringOffsets.push(offset);
      waitFor[i] = BigInt(overwrites.reduce((m, w) => Math.max(m, w + 1), 0));
    } else ringOffsets.push(-1);
  });
  return { tensors, blocks, ringBytes, ringOffsets, waitFor };
}

/**
 * Row chunks of host checkpoints for the chunked-load tests: each 2-D (or larger) tensor cut
 * into row chunks (random cuts, or of at most some bytes), each chunk uploaded into a backend
 * tensor of its own exact size and handed over as a `rowWindow` of the whole tensor.
 * @module
 */

import type { Backend } from "../src/backend/backend.ts";
import { rowWindow, type Tensor } from "../src/tensor/tensor.ts";
import { type HostWeight, rng } from "../testing.ts";

/** One row chunk of a host tensor (a whole tensor when it is not cut). */
export interface HostChunk {
  /** Checkpoint name. */
  name: string;
  /** The whole tensor. */
  whole: HostWeight;
  /** First row, or null for the whole tensor. */
  start: number | null;
  /** One past the last row. */
  end: number;
}

function rowBytes(h: HostWeight): number {
  return h.bytes.length / h.shape[0];
}

function cuts(h: HostWeight, at: number[]): HostChunk[] {
  const edges = [0, ...at, h.shape[0]];
  const out: HostChunk[] = [];
  for (let i = 0; i + 1 < edges.length; i++) {
    out.push({ name: h.name, whole: h, start: edges[i], end: edges[i + 1] });
  }
  return out;
}

function chunkable(h: HostWeight): boolean {
  return h.shape.length >= 2 && h.shape[0] > 1;
}

/** Every 2-D tensor cut at 1 to 5 random rows (seeded); 1-D tensors whole. */
export function randomChunks(host: readonly HostWeight[], seed: number): HostChunk[] {
  const r = rng(seed);
  const out: HostChunk[] = [];
  for (const h of host) {
    if (!chunkable(h)) {
      out.push({ name: h.name, whole: h, start: null, end: h.shape[0] });
      continue;
    }
    const n = 1 + Math.floor(r() * 5);
    const at = new Set<number>();
    for (let i = 0; i < n; i++) at.add(1 + Math.floor(r() * (h.shape[0] - 1)));
    out.push(...cuts(h, [...at].sort((a, b) => a - b)));
  }
  return out;
}

/** Every 2-D tensor larger than `maxBytes` cut into consecutive chunks of at most that. */
export function boundedChunks(host: readonly HostWeight[], maxBytes: number): HostChunk[] {
  const out: HostChunk[] = [];
  for (const h of host) {
    const per = chunkable(h) ? Math.floor(maxBytes / rowBytes(h)) : 0;
    if (h.bytes.length <= maxBytes || per < 1) {
      out.push({ name: h.name, whole: h, start: null, end: h.shape[0] });
      continue;
    }
    const at: number[] = [];
    for (let s = per; s < h.shape[0]; s += per) at.push(s);
    out.push(...cuts(h, at));
  }
  return out;
}

/** Host bytes of a chunk. */
export function chunkBytes(c: HostChunk): Uint8Array {
  if (c.start === null) return c.whole.bytes;
  const rb = rowBytes(c.whole);
  return c.whole.bytes.subarray(c.start * rb, c.end * rb);
}

/**
 * Uploads one chunk into a backend tensor of exactly its size and returns the load (a
 * rowWindow, or the whole tensor) and the storage to free.
 */
export function uploadChunk(b: Backend, c: HostChunk): [string, Tensor, Tensor] {
  const shape = c.start === null ? c.whole.shape : [c.end - c.start, ...c.whole.shape.slice(1)];
  const t = b.empty(shape, c.whole.dtype);
  b.upload(t, chunkBytes(c));
  const loaded = c.start === null ? t : rowWindow(t, c.start, c.whole.shape[0]);
  return [c.name, loaded, t];
}

/** Uploads every chunk; free them with {@link freeChunks}. */
export function uploadChunks(b: Backend, chunks: readonly HostChunk[]): [string, Tensor, Tensor][] {
  return chunks.map((c) => uploadChunk(b, c));
}

/** Frees uploaded chunks. */
export function freeChunks(b: Backend, up: readonly [string, Tensor, Tensor][]): void {
  for (const [, , t] of up) b.free(t.storage!);
}

/**
 * A source that uploads each chunk right before handing it over and frees it when the consumer
 * asks for the next one: at most one chunk is in backend memory at a time.
 */
export async function* streamChunks(
  b: Backend,
  chunks: readonly HostChunk[],
): AsyncGenerator<[string, Tensor]> {
  for (const c of chunks) {
    const [name, loaded, t] = uploadChunk(b, c);
    try {
      yield [name, loaded];
    } finally {
      b.free(t.storage!);
    }
  }
}

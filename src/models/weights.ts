/**
 * Between a weight source and the engine: validation of the whole new checkpoint against the
 * model from its description alone (names, shapes, dtypes, coverage) before any kernel tensor
 * is written, and the stream of backend tensors read in model layer order.
 * @module
 */

import type { Backend } from "../backend/backend.ts";
import type { WeightSource } from "../checkpoint/source.ts";
import type { StagingOptions } from "../backend/cuda/staging_plan.ts";
import { canStage, stageTensors } from "../checkpoint/staging.ts";
import { CheckpointError } from "../errors.ts";
import { validateTensors as checkAgainstModel } from "../reload/validate.ts";
import { scratchDestination, type ScratchPlacement } from "../reload/layerwise.ts";
import type { DType } from "../tensor/dtype.ts";
import { rowWindow, type Tensor } from "../tensor/tensor.ts";
import type { CausalLM } from "./causal_lm.ts";
import { checkFp8Checkpoint } from "./fp8_checkpoint.ts";
import { canonicalName, expectedCheckpointNames } from "./names.ts";
import { listNames, plural, quoteName } from "../messages.ts";

function refuseDuplicate(
  model: CausalLM,
  source: WeightSource,
  order: readonly string[],
  duplicate: string,
): never {
  const key = (name: string): string => {
    const t = model.mapCheckpointName(name);
    return t === null ? "" : `${t.path}|${t.param}|${t.shardId ?? ""}|${t.expertId ?? ""}`;
  };
  const k = key(duplicate);
  const first = order.find((n) => n !== duplicate && key(n) === k) ?? duplicate;
  throw new CheckpointError(
    "DUPLICATE",
    `${source.tensors.get(duplicate)!.origin}: tensors ${quoteName(first)} and ${
      quoteName(duplicate)
    } load the same model tensor`,
  );
}

/**
 * Refuses names that are not in canonical decimal (`experts.01`): each would alias the tensor
 * with the canonical spelling. Names both when both are there.
 */
function refuseAliases(source: WeightSource): void {
  for (const [name, info] of source.tensors) {
    const canonical = canonicalName(name);
    if (canonical === name) continue;
    const twin = source.tensors.get(canonical);
    if (twin !== undefined) {
      throw new CheckpointError(
        "DUPLICATE",
        `${info.origin}: tensors ${quoteName(name)} and ${quoteName(canonical)}${
          twin.origin === info.origin ? "" : ` (in ${twin.origin})`
        } name the same tensor (ids are compared as numbers)`,
      );
    }
    throw new CheckpointError(
      "NON_CANONICAL_NAME",
      `${info.origin}: tensor ${quoteName(name)} has an id with leading zeros (expected ${
        quoteName(canonical)
      })`,
    );
  }
}

/** What validation found: the names to load, and what it leaves out. */
export interface ValidatedWeights {
  /** Names to load, in read order (model layer order). */
  readonly names: readonly string[];
  /** Names the model ignores on purpose (rotary tables, a tied lm_head). */
  readonly skipped: readonly string[];
  /** Names the model does not have (only when not strict; strict makes them errors). */
  readonly unexpected: readonly string[];
  /** Model tensors the source does not cover (only with `partial`; else an error). */
  readonly missing: readonly string[];
  /** Bytes to load. */
  readonly bytes: number;
  /** Layer-order keys of the names, with how many names each has (for progress). */
  readonly layers: ReadonlyMap<number, number>;
}

/**
 * Checks every tensor of `source` against `model` from its description before anything is
 * read: fp8 tensors pair up as their format says (src/models/fp8_checkpoint.ts), the names the
 * architecture needs are all there (CheckpointError `MISSING_TENSOR`
 * naming them as the checkpoint would), then the engine's dry run of the real loaders
 * (src/reload/validate.ts) checks shapes, dtypes and coverage. Unknown names are errors with
 * `strict`, else listed. With `partial`, modules the source does not touch at all are listed
 * instead of being an error (they keep their weights); a module covered in part is an error
 * either way. Messages name the file and the tensor. The model must have recorded its metadata
 * (loadModel does).
 */
export function validateWeights(
  model: CausalLM,
  source: WeightSource,
  options: { strict?: boolean; partial?: boolean } = {},
): ValidatedWeights {
  const present = new Set(source.tensors.keys());
  refuseAliases(source);
  checkFp8Checkpoint(source, model.quant);
  const absent = expectedCheckpointNames(model.config, present).filter((n) => !present.has(n));
  if (absent.length > 0 && !options.partial) {
    throw new CheckpointError(
      "MISSING_TENSOR",
      `${source.description}: ${plural(absent.length, "tensor")} missing: ${listNames(absent)}`,
    );
  }
  const order = source.plan(model.readOrder);
  const report = checkAgainstModel(model, order.map((n) => source.tensors.get(n)!), {
    strict: options.strict ?? false,
  });
  // Two checkpoint names that load the same part of one parameter alias each other: a load
  // would silently keep one of them. Hugging Face names never do, so it is refused.
  if (report.duplicates.length > 0) refuseDuplicate(model, source, order, report.duplicates[0]);
  const left = new Set([...report.skipped, ...report.unknown]);
  const names = order.filter((n) => !left.has(n));
  let bytes = 0;
  const layers = new Map<number, number>();
  for (const n of names) {
    bytes += source.tensors.get(n)!.bytes;
    const k = model.readOrder(n);
    layers.set(k, (layers.get(k) ?? 0) + 1);
  }
  return {
    names,
    skipped: report.skipped,
    unexpected: report.unknown,
    missing: report.missing,
    bytes,
    layers,
  };
}

/**
 * Outside the staged path, a tensor larger than this (and with rows) is read and handed on as
 * row chunks of at most this many bytes, so no whole embedding is ever held beside the model.
 */
export const READ_CHUNK_BYTES: number = 16 * 1024 * 1024;

/** How {@link streamWeights} reads. */
export interface StreamOptions {
  /** Called after each tensor is read: layer groups done, their number, bytes read. */
  onProgress?: ProgressCallback;
  /** Staging sizes on CUDA with files, or false for one tensor at a time. */
  staging?: StagingOptions | false;
  /** Largest row chunk outside the staged path (default {@link READ_CHUNK_BYTES}). */
  readChunkBytes?: number;
  /**
   * Where a read may land in the memory its consumer writes it to (see
   * {@link placeInScratch}); used only where reads go straight into backend memory.
   */
  place?: PlaceRead;
}

/**
 * Asked before a read of tensor `name` (or of its rows from `rows.start`, of `rows.total`), of
 * `shape` and `dtype`: a backend tensor of that shape to read the bytes into, owned by the
 * consumer (never freed by the stream), or null for a buffer of the stream's own. The answer
 * may allocate up to `room` bytes for it (a layer's scratch); `startedBytes` says how much.
 */
export type PlaceRead = (
  name: string,
  shape: readonly number[],
  dtype: DType,
  rows: { readonly start: number; readonly total: number } | null,
  room: number,
) => ScratchPlacement | null;

/**
 * A {@link PlaceRead} for a layerwise reload of `model` (running when the stream reads):
 * bytes that a layer's loader would copy unchanged into a range of the layer's model-format
 * scratch are read straight there, so the loader's copy has nothing to move
 * (ARCHITECTURE.md, "Read paths"; `scratchDestination` in reload/layerwise.ts says which).
 */
export function placeInScratch(model: CausalLM): PlaceRead {
  return (name, shape, dtype, rows, room) => {
    let r;
    try {
      r = model.resolveWeight(name);
    } catch {
      return null; // the load raises it
    }
    if (!r) return null;
    return scratchDestination({
      layer: r.module,
      param: r.param,
      shape,
      dtype,
      rows: rows ?? undefined,
      shardId: r.shardId,
      expertId: r.expertId,
    }, room);
  };
}

/** Progress of a stream: layer-order groups fully read, of all, and bytes read. */
export type ProgressCallback = (layersDone: number, layersTotal: number, bytes: number) => void;

/**
 * Reads the validated names in order into backend tensors and yields them; each tensor is
 * borrowed: freed or overwritten when the consumer asks for the next one (the engine copies
 * what it keeps). On CUDA with a file-backed source, reads go through the pinned staging ring
 * of `checkpoint/staging.ts` (unless `staging` is false), which yields tensors larger than
 * half its device ring as consecutive row chunks (`rowWindow`s under the tensor's name).
 * Otherwise tensors are read one at a time, those over {@link READ_CHUNK_BYTES} as row chunks
 * when the source can read rows; on the WebAssembly backend straight into its memory.
 */
export function streamWeights(
  backend: Backend,
  source: WeightSource,
  plan: ValidatedWeights,
  readOrder: (name: string) => number,
  options: StreamOptions = {},
): AsyncGenerator<[string, Tensor]> {
  // Checked here, not when the stream starts: a bad option must fail before the engine begins.
  const chunkBytes = options.readChunkBytes ?? READ_CHUNK_BYTES;
  if (!(chunkBytes >= 1)) {
    throw new CheckpointError(
      "BAD_OPTION",
      `readChunkBytes must be a positive number of bytes, not ${chunkBytes}`,
    );
  }
  return stream(backend, source, plan, readOrder, options, chunkBytes);
}

async function* stream(
  backend: Backend,
  source: WeightSource,
  plan: ValidatedWeights,
  readOrder: (name: string) => number,
  options: StreamOptions,
  chunkBytes: number,
): AsyncGenerator<[string, Tensor]> {
  const { onProgress, staging } = options;
  const left = new Map(plan.layers);
  let done = 0, bytes = 0;
  const progress = (name: string, t: Tensor) => {
    bytes += t.windowRows().nbytes;
    // A tensor staged as row chunks is read when its last chunk is.
    if (t.window && t.window.end < t.shape[0]) {
      onProgress?.(done, plan.layers.size, bytes);
      return;
    }
    const k = readOrder(name);
    const m = left.get(k)! - 1;
    left.set(k, m);
    if (m === 0) done++;
    onProgress?.(done, plan.layers.size, bytes);
  };
  if (staging !== false && canStage(backend)) {
    // CUDA and a file-backed source: pinned ring, parallel reads, asynchronous copies.
    const staged = stageTensors(backend, source, plan.names, staging ?? {});
    let r = await staged.next();
    if (!(r.done && r.value === false)) {
      try {
        while (!r.done) {
          progress(r.value[0], r.value[1]);
          yield r.value;
          r = await staged.next();
        }
      } finally {
        await staged.return(true);
      }
      return;
    }
  }
  let buffer = new Uint8Array(0);
  // Reads `rows` of `name` (null: all) into a backend tensor of `shape`, or into `placed`.
  const read = async (
    name: string,
    shape: number[],
    rows: [number, number] | null,
    placed: Tensor | null,
  ) => {
    const info = source.tensors.get(name)!;
    const t = placed ?? backend.empty(shape, info.dtype);
    try {
      const into = async (dst: Uint8Array) => {
        if (rows) await source.readRowsInto!(name, rows[0], rows[1], dst);
        else await source.readInto(name, dst);
      };
      if (backend.hostView) await into(backend.hostView(t));
      else {
        const n = t.nbytes;
        if (buffer.byteLength < n) buffer = new Uint8Array(n);
        await into(buffer.subarray(0, n));
        backend.upload(t, buffer.subarray(0, n));
      }
    } catch (e) {
      if (!placed) backend.free(t.storage!);
      throw e;
    }
    return t;
  };
  // The units read: whole tensors, or row chunks of big ones (the embedding, the LM head), as
  // the staged path does.
  type Unit = { name: string; shape: number[]; rows: [number, number] | null; bytes: number };
  function* units(): Generator<Unit> {
    for (const name of plan.names) {
      const info = source.tensors.get(name)!;
      const rows = info.shape.length >= 2 ? info.shape[0] : 0;
      const per = rows > 0 ? Math.max(1, Math.floor(chunkBytes / (info.bytes / rows))) : 0;
      if (source.readRowsInto && info.bytes > chunkBytes && per < rows) {
        for (let start = 0; start < rows; start += per) {
          const end = Math.min(rows, start + per);
          const shape = [end - start, ...info.shape.slice(1)];
          yield { name, shape, rows: [start, end], bytes: (info.bytes / rows) * (end - start) };
        }
      } else yield { name, shape: [...info.shape], rows: null, bytes: info.bytes };
    }
  }
  // With a host view (WebAssembly) the reads go straight into the backend's memory, so the next
  // units are read while the consumer processes the current one (reads run on Deno's I/O
  // threads while the kernels hold this one), at most one chunk of bytes ahead; elsewhere one
  // unit at a time through the one host buffer.
  const overlap = backend.hostView !== undefined;
  // With a host view a read may go straight where its consumer puts it (`place`). Reads
  // ahead may begin the next layer the consumer has not reached, whatever its size, and more
  // layers after it up to one chunk of scratch, so that peak extra memory stays at the
  // consumer's layer, the next one and two chunks (ARCHITECTURE.md, "Read paths").
  const place = overlap ? options.place : undefined;
  let begunBytes = 0;
  const room = () => {
    const first = pending.find((p) => p.began > 0)?.began ?? 0;
    return first === 0 ? Infinity : chunkBytes - (begunBytes - first);
  };
  type Pending = { unit: Unit; tensor: Promise<Tensor>; placed: boolean; began: number };
  const pending: Pending[] = [];
  let pendingBytes = 0;
  const queue = units();
  let next = queue.next();
  const startReads = () => {
    // Without a host view every read goes through the one host buffer: one read at a time.
    while (
      !next.done &&
      (pending.length === 0 || (overlap && pendingBytes + next.value.bytes <= chunkBytes))
    ) {
      const unit = next.value;
      const info = source.tensors.get(unit.name)!;
      const at = place?.(
        unit.name,
        unit.shape,
        info.dtype,
        unit.rows && { start: unit.rows[0], total: info.shape[0] },
        room(),
      ) ?? null;
      const began = at?.startedBytes ?? 0;
      begunBytes += began;
      const tensor = read(unit.name, unit.shape, unit.rows, at?.tensor ?? null);
      // Awaited in turn; a failure before then must not count as an unhandled rejection.
      tensor.catch(() => {});
      pending.push({ unit, tensor, placed: at !== null, began });
      pendingBytes += unit.bytes;
      next = queue.next();
    }
  };
  try {
    startReads();
    while (pending.length > 0) {
      const { unit, tensor, placed, began } = pending.shift()!;
      pendingBytes -= unit.bytes;
      begunBytes -= began;
      const t = await tensor;
      try {
        if (overlap) startReads();
        const out = unit.rows
          ? rowWindow(t, unit.rows[0], source.tensors.get(unit.name)!.shape[0])
          : t;
        progress(unit.name, out);
        yield [unit.name, out];
      } finally {
        if (!placed) backend.free(t.storage!);
      }
      if (!overlap) startReads();
    }
  } finally {
    // Stopped early (an error, or the consumer returned): free what was read ahead, once every
    // read has settled (one placed in a layer's scratch must land before the reload's abort
    // frees that scratch).
    for (const { tensor, placed } of pending.splice(0)) {
      const t = await tensor.catch(() => null);
      if (t && !placed) backend.free(t.storage!);
    }
  }
}

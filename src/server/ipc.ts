/**
 * CUDA IPC updates: a trainer on the same GPU sends a table of buckets (an IPC memory handle,
 * base64, and the bucket's byte size) and tensors (name, dtype, shape, bucket, byte offset).
 * The whole table is checked first (handles of 64 bytes, sizes, every tensor inside its
 * bucket and aligned to its element size, no name twice), then against the model (names,
 * dtypes, shapes, coverage, as for any source), before any handle is opened or any byte
 * written. Handles stay open in a cache while the trainer keeps sending the same buckets; one
 * that the last few updates did not send is closed (an open mapping keeps the trainer's
 * allocation alive after the trainer frees it), as are all on request or when the server stops.
 *
 * The reload itself is {@link reloadFromMapped}, the one function that reads mapped memory: the
 * device-source reload reads the buckets in place.
 * @module
 */

import { quoteName } from "../messages.ts";
import { IPC_HANDLE_BYTES, type IpcMapper, type IpcMapping } from "../backend/ipc.ts";
import { describingSource, type TensorInfo, type WeightSource } from "../checkpoint/source.ts";
import { type DType, dtypeFromSafetensors, dtypeOf } from "../tensor/dtype.ts";
import type { Module } from "../nn/module.ts";
import type { CausalLM } from "../models/causal_lm.ts";
import { type ValidatedWeights, validateWeights } from "../models/weights.ts";
import type { ReloadLayerwiseOptions, ReloadReport } from "../reload/load.ts";
import { reloadFromDevice } from "../reload/device.ts";
import { checkFields } from "./json_body.ts";
import { serverError } from "./http_errors.ts";

/** One bucket of the table: a device allocation of the trainer. */
export interface IpcBucket {
  /** The CUDA IPC memory handle, base64 of 64 bytes. */
  readonly handle: string;
  /** Bytes of the bucket the tensors may use. */
  readonly bytes: number;
}

/** One tensor of the table. */
export interface IpcTensor {
  /** Checkpoint-format name. */
  readonly name: string;
  /** Element type. */
  readonly dtype: DType;
  /** Sizes of each dimension. */
  readonly shape: readonly number[];
  /** Index into the buckets. */
  readonly bucket: number;
  /** Byte offset inside the bucket. */
  readonly offset: number;
  /** numel x dtype size. */
  readonly bytes: number;
}

/** A checked `POST /v1/update/ipc` body. */
export interface IpcUpdate {
  /** The buckets. */
  readonly buckets: readonly IpcBucket[];
  /** The tensors, in the order given. */
  readonly tensors: readonly IpcTensor[];
  /** Restore every kernel tensor if the update fails. */
  readonly atomic: boolean;
  /** Unknown names are errors. */
  readonly strict: boolean;
  /** Modules not covered keep their weights. */
  readonly partial: boolean;
  /** The caller's tag for the new version. */
  readonly tag?: string;
  /** Close every cached handle of this table after the update. */
  readonly release: boolean;
}

const BASE64_64 = /^[A-Za-z0-9+/]{86}==$/;

/** Checks that `handle` is the base64 of exactly 64 bytes, else ServerError `BAD_IPC_HANDLE` (400). */
function checkHandle(handle: string, where: string): void {
  if (!BASE64_64.test(handle)) {
    throw serverError(
      "BAD_IPC_HANDLE",
      `${where}: a handle is the base64 of ${IPC_HANDLE_BYTES} bytes (88 characters), got ${
        quoteName(handle, 24)
      }`,
    );
  }
}

/** Decodes a base64 handle of exactly 64 bytes, else ServerError `BAD_IPC_HANDLE` (400). */
export function decodeHandle(handle: string, where: string): Uint8Array {
  checkHandle(handle, where);
  // A plain loop: Uint8Array.from with a mapping function costs ~8 us a handle, which a table
  // of an allocation per tensor pays hundreds of times.
  const text = atob(handle);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

function bad(message: string): never {
  throw serverError("BAD_IPC_TABLE", message);
}

/** A tensor of an update table: what the model is checked against before any byte moves. */
export interface TableTensor {
  /** Checkpoint-format name. */
  readonly name: string;
  /** Element type. */
  readonly dtype: DType;
  /** Sizes of each dimension. */
  readonly shape: readonly number[];
  /** numel x dtype size. */
  readonly bytes: number;
}

/**
 * Checks one tensor entry of an update table (IPC or NCCL): the name not seen before in
 * `names` (then added), a known dtype, a shape of non-negative integers whose byte size is safe.
 * `bad` throws the table's error.
 */
export function checkTableTensor(
  x: { name: string; dtype: string; shape: unknown[] },
  label: string,
  names: Set<string>,
  bad: (message: string) => never,
): TableTensor {
  if (names.has(x.name)) bad(`${label}: the name appears twice`);
  names.add(x.name);
  const dtype = dtypeFromSafetensors(x.dtype) ?? dtypeOf(x.dtype);
  if (dtype === undefined) bad(`${label}: unknown dtype ${quoteName(x.dtype, 24)}`);
  if (!x.shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
    bad(`${label}: shape must be an array of non-negative integers`);
  }
  const shape = x.shape as number[];
  const numel = shape.reduce((a, d) => a * d, 1);
  const bytes = numel * dtype.size;
  if (!Number.isSafeInteger(bytes)) bad(`${label}: shape [${shape}] is too large`);
  return { name: x.name, dtype, shape, bytes };
}

/** Checks a `POST /v1/update/ipc` body (see the module doc); throws ServerError 400. */
export function parseIpcUpdate(body: unknown): IpcUpdate {
  const where = "ipc update";
  const b = checkFields<{
    buckets: unknown[];
    tensors: unknown[];
    atomic?: boolean;
    strict?: boolean;
    partial?: boolean;
    tag?: string;
    release?: boolean;
  }>(body, {
    buckets: { type: "array", required: true },
    tensors: { type: "array", required: true },
    atomic: { type: "boolean" },
    strict: { type: "boolean" },
    partial: { type: "boolean" },
    tag: { type: "string", nullable: true },
    release: { type: "boolean" },
  }, where);
  const buckets: IpcBucket[] = b.buckets.map((raw, i) => {
    const at = `${where}: buckets[${i}]`;
    const x = checkFields<IpcBucket>(raw, {
      handle: { type: "string", required: true },
      bytes: { type: "integer", required: true },
    }, at);
    // The pattern is the whole check (atob takes every string it matches); the bytes are
    // decoded only when the handle is opened (IpcHandleCache.map), not for each update.
    checkHandle(x.handle, at);
    if (x.bytes <= 0) bad(`${at}: bytes must be positive, got ${x.bytes}`);
    return x;
  });
  // Two buckets may share a handle: an allocator can place both in one allocation.
  const names = new Set<string>();
  const tensors: IpcTensor[] = b.tensors.map((raw, i) => {
    const at = `${where}: tensors[${i}]`;
    const x = checkFields<
      { name: string; dtype: string; shape: unknown[]; bucket: number; offset: number }
    >(raw, {
      name: { type: "string", required: true },
      dtype: { type: "string", required: true },
      shape: { type: "array", required: true },
      bucket: { type: "integer", required: true },
      offset: { type: "integer", required: true },
    }, at);
    const label = `${at} (${quoteName(x.name)})`;
    const { dtype, shape, bytes } = checkTableTensor(x, label, names, bad);
    if (x.bucket < 0 || x.bucket >= buckets.length) {
      bad(`${label}: bucket ${x.bucket} does not exist (${buckets.length} buckets)`);
    }
    if (x.offset < 0 || x.offset % dtype.size !== 0) {
      bad(`${label}: offset ${x.offset} must be a non-negative multiple of ${dtype.size}`);
    }
    const size = buckets[x.bucket].bytes;
    if (x.offset + bytes > size) {
      bad(
        `${label}: bytes ${x.offset}-${
          x.offset + bytes
        } run past the end of bucket ${x.bucket} (${size} bytes)`,
      );
    }
    return { name: x.name, dtype, shape, bucket: x.bucket, offset: x.offset, bytes };
  });
  return {
    buckets,
    tensors,
    atomic: b.atomic ?? false,
    strict: b.strict ?? false,
    partial: b.partial ?? false,
    tag: b.tag,
    release: b.release ?? false,
  };
}

/**
 * The table as a weight source that only describes (for validation against the model): its
 * reads fail, the bytes are reached through the transport (the IPC mapper, NCCL).
 */
export function describedSource(
  update: { readonly tensors: readonly (TableTensor & { readonly bucket?: number })[] },
  description = "ipc update",
): WeightSource {
  const infos = new Map<string, TensorInfo>(
    update.tensors.map((t) => [t.name, {
      name: t.name,
      dtype: t.dtype,
      shape: t.shape,
      bytes: t.bytes,
      origin: t.bucket === undefined ? description : `${description} bucket ${t.bucket}`,
    }]),
  );
  return describingSource(description, infos, () => [...infos.keys()], "its transport");
}

/** The layout of a table: names, dtypes and shapes in order (what validation reads of it). */
function tableLayout(tensors: readonly TableTensor[]): string {
  let key = "";
  for (const t of tensors) key += `${t.name}\u0000${t.dtype.name}\u0000${t.shape.join(",")}\u0001`;
  return key;
}

/**
 * The last table's validation against the model, kept for the next update whose table has the
 * same layout. validateWeights reads only the table's names, dtypes and shapes in order, the
 * strict and partial options and the model's own description (fixed once it is loaded), so a
 * trainer that sends the same layout every step gets the same answer without the check running
 * again: the tensor-by-tensor dry run of the loaders is the bulk of a table's host time. Only a
 * success is kept; a changed layout, option or model is validated afresh (and a refusal keeps
 * nothing). Bucket indices and offsets play no part in validation: they are checked against
 * the buckets by the parse of each body (parseIpcUpdate, parseNcclUpdate).
 */
export class TableValidation {
  #model: CausalLM | null = null;
  #key = "";
  #plan: ValidatedWeights | null = null;
  /** Validations run (not reused) so far. */
  runs = 0;

  /**
   * The validation of `update`'s table against `model` (`description` names the source in
   * messages): the kept one when model, options and layout are those of the last success.
   */
  validate(
    model: CausalLM,
    update: {
      readonly tensors: readonly (TableTensor & { readonly bucket?: number })[];
      readonly strict?: boolean;
      readonly partial?: boolean;
    },
    description: string,
  ): ValidatedWeights {
    const key = `${description}\u0002${update.strict ?? false}\u0002${
      update.partial ?? false
    }\u0002${tableLayout(update.tensors)}`;
    if (this.#plan !== null && this.#model === model && this.#key === key) return this.#plan;
    this.#plan = null;
    this.runs++;
    const plan = validateWeights(model, describedSource(update, description), update);
    [this.#model, this.#key, this.#plan] = [model, key, plan];
    return plan;
  }
}

/**
 * Open IPC mappings by handle, reused while the trainer sends the same buckets. A mapping keeps
 * the trainer's allocation alive even after the trainer frees it, so a trainer that sends new
 * buckets every step (its allocator moved them) would otherwise pin a model's worth of device
 * memory per step: a handle that none of the last `keepUpdates` updates sent is closed at the
 * end of an update. Two by default: a trainer that alternates two sets of buckets (one filled
 * while the other is read) reopens nothing.
 */
export class IpcHandleCache {
  readonly #mapper: IpcMapper;
  readonly #keepUpdates: number;
  readonly #open = new Map<string, { mapping: IpcMapping; used: number }>();
  #update = 0;

  /** A cache over `mapper`, keeping handles the last `keepUpdates` updates sent (at least 1). */
  constructor(mapper: IpcMapper, keepUpdates = 2) {
    this.#mapper = mapper;
    this.#keepUpdates = Math.max(1, Math.floor(keepUpdates));
  }

  /** Handles open now. */
  get size(): number {
    return this.#open.size;
  }

  /** The mapping of a handle for the current update, opening it on first use. */
  map(handle: string): IpcMapping {
    let e = this.#open.get(handle);
    if (e === undefined) {
      e = { mapping: this.#mapper.open(decodeHandle(handle, "ipc")), used: this.#update };
      this.#open.set(handle, e);
    }
    e.used = this.#update;
    return e.mapping;
  }

  /**
   * Ends the current update (whatever its outcome; the device no longer reads the buckets):
   * closes the handles none of the last `keepUpdates` updates sent; returns how many.
   */
  endUpdate(): number {
    const oldest = this.#update - this.#keepUpdates + 1;
    this.#update++;
    return this.release([...this.#open].flatMap(([h, e]) => e.used < oldest ? [h] : []));
  }

  /** Closes the given handles (all when omitted); returns how many were open. */
  release(handles?: readonly string[]): number {
    let n = 0;
    for (const h of handles ?? [...this.#open.keys()]) {
      const e = this.#open.get(h);
      if (e === undefined) continue;
      this.#open.delete(h);
      n++;
      this.#mapper.close(e.mapping.address);
    }
    return n;
  }
}

/**
 * Reloads `model` from the mapped buckets (`addresses[i]` is bucket i's address) for the
 * validated `names`: the buckets are read in place by the device-source reload
 * (reloadFromDevice: a plan kept for the next update of the same layout, multi-tensor launches,
 * no scratch), since a mapping's address is memory of the model's backend. Returns once the
 * engine is done (the caller synchronizes the mapper before telling the trainer its buckets
 * are free).
 */
export function reloadFromMapped(
  model: Module,
  update: IpcUpdate,
  addresses: readonly number[],
  names: readonly string[],
  options: ReloadLayerwiseOptions,
): Promise<ReloadReport> {
  const byName = new Map(update.tensors.map((t) => [t.name, t]));
  const views = names.map((name) => {
    const t = byName.get(name)!;
    return { name, dtype: t.dtype, shape: t.shape, ptr: addresses[t.bucket] + t.offset };
  });
  // The table was validated against the model already (names, shapes, coverage, strictness):
  // `names` are the tensors to load, and what they leave out was accepted there.
  return reloadFromDevice(model, views, { ...options, strict: false, partial: true });
}

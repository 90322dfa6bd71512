/**
 * Weight sources: where a reload takes its checkpoint-format tensors from. A source first
 * describes every tensor (name, dtype, shape) so that the whole new checkpoint can be validated
 * against the model before anything is written; then it reads one tensor at a time into a
 * buffer the caller gives (which can be backend memory), in an order the caller chooses.
 * @module
 */

import { CheckpointError, type CheckpointErrorCode } from "../errors.ts";
import { type DType, dtypeFromSafetensors, dtypeOf } from "../tensor/dtype.ts";
import {
  checkHostTensor,
  type HostTensor,
  readTensorInto,
  type TensorEntry,
} from "./safetensors.ts";
import { openCheckpoint, sortForReading } from "./sharded.ts";
import { openRegularFile, statRegularFile } from "./files.ts";
import {
  closeReadSession,
  type ReadFile,
  readSession,
  readThreads,
  THREADED_READ_MIN_BYTES,
} from "./read_threads.ts";
import { quoteName } from "../messages.ts";

/** What a source knows about a tensor before reading it. */
export interface TensorInfo {
  /** The tensor's name in the checkpoint. */
  readonly name: string;
  /** Element type. */
  readonly dtype: DType;
  /** Sizes of each dimension. */
  readonly shape: readonly number[];
  /** numel x dtype size. */
  readonly bytes: number;
  /** Where it comes from, for messages: a file path or `memory`. */
  readonly origin: string;
}

/** A tensor handed out by iterating a source. */
export interface NamedTensor {
  /** The tensor's name in the checkpoint. */
  name: string;
  /** Its bytes, dtype and shape. */
  tensor: HostTensor;
}

/** A set of checkpoint-format tensors, described first and read on demand. */
export interface WeightSource extends AsyncIterable<NamedTensor> {
  /** A short description (path or `in-memory tensors`) for messages and reports. */
  readonly description: string;
  /** Every tensor, validated, by name; known before any tensor byte is read. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /**
   * The names in the order reads should follow: by `order(name)` (the model's layer order),
   * then by the source's own order (file and offset for files, insertion for memory).
   */
  plan(order?: (name: string) => number): string[];
  /**
   * Reads tensor `name` into `dst`, whose byte length must be the tensor's. Throws
   * CheckpointError `UNKNOWN_TENSOR`, `BAD_DESTINATION`, or `TRUNCATED` if a file shrank.
   * Concurrent calls are allowed.
   */
  readInto(name: string, dst: Uint8Array): Promise<void>;
  /**
   * Reads rows `[start, end)` (along dimension 0) of tensor `name` into `dst`, whose byte
   * length must be those rows'. Lets a reader hold a big tensor a part at a time. Throws as
   * {@link readInto}, and `BAD_ROWS` for a range outside the tensor or a tensor without rows.
   * Optional: readers fall back to {@link readInto} without it.
   */
  readRowsInto?(name: string, start: number, end: number, dst: Uint8Array): Promise<void>;
  /** Releases open files. The source must not be used afterwards. */
  close(): void;
}

/** A tensor given in memory: `data` is raw bytes or a typed array matching `dtype`. */
export interface TensorLike {
  /** Element type, as a DType or a name (`bf16`, `bfloat16`, `BF16`...). */
  dtype: DType | string;
  /** Sizes of each dimension. */
  shape: readonly number[];
  /** Little-endian, row-major, contiguous elements. */
  data: ArrayBufferView;
}

/** Pairs or records accepted by {@link memorySource}. */
export type TensorPairs =
  | Iterable<readonly [string, TensorLike]>
  | Iterable<{ name: string; tensor: TensorLike }>;

function fail(code: CheckpointErrorCode, message: string): never {
  throw new CheckpointError(code, message);
}

const quote = quoteName;

function checkDestination(info: TensorInfo, dst: Uint8Array): void {
  if (dst.byteLength !== info.bytes) {
    fail(
      "BAD_DESTINATION",
      `${info.origin}: tensor ${
        quote(info.name)
      } has ${info.bytes} bytes, destination holds ${dst.byteLength}`,
    );
  }
}

/** Checks a row range of `info` and `dst`'s length for it; returns the byte range. */
function checkRows(
  info: TensorInfo,
  start: number,
  end: number,
  dst: Uint8Array,
): [number, number] {
  const rows = info.shape.length >= 1 ? info.shape[0] : 0;
  if (
    info.shape.length === 0 || !Number.isSafeInteger(start) || !Number.isSafeInteger(end) ||
    start < 0 || end < start || end > rows
  ) {
    fail(
      "BAD_ROWS",
      `${info.origin}: tensor ${
        quote(info.name)
      } of shape [${info.shape}] has no rows [${start}, ${end})`,
    );
  }
  const rowBytes = rows === 0 ? 0 : info.bytes / rows;
  const range: [number, number] = [start * rowBytes, end * rowBytes];
  if (dst.byteLength !== range[1] - range[0]) {
    fail(
      "BAD_DESTINATION",
      `${info.origin}: rows [${start}, ${end}) of tensor ${quote(info.name)} have ${
        range[1] - range[0]
      } bytes, destination holds ${dst.byteLength}`,
    );
  }
  return range;
}

function unknown(description: string, name: string): never {
  fail("UNKNOWN_TENSOR", `${description}: no tensor ${quote(name)}`);
}

// Serializes reads per file handle: readTensorInto seeks, so two reads on one handle must not
// interleave. Big reads into shared memory go to the reader threads instead (on handles of
// their own); one that comes up short is read again here, which reports the error.
class FileLane {
  private tail: Promise<unknown> = Promise.resolve();
  private handle: Deno.FsFile | null = null;
  private identity: Promise<ReadFile> | null = null;
  constructor(private readonly path: string, private readonly session: number) {}

  async read(entry: TensorEntry, dst: Uint8Array): Promise<void> {
    if (
      dst.buffer instanceof SharedArrayBuffer && dst.byteLength >= THREADED_READ_MIN_BYTES &&
      entry.end - entry.begin === dst.byteLength
    ) {
      const threads = await readThreads();
      const file = threads ? await this.checked() : null;
      if (file && await threads!.read(this.session, file, entry.begin, dst)) return;
    }
    return this.readHere(entry, dst);
  }

  // The file as checked now (regular, its device and inode), for the threads; null when the
  // check fails, so the read goes through readHere, which reports why.
  private async checked(): Promise<ReadFile | null> {
    this.identity ??= statRegularFile(this.path, "MISSING_SHARD", "a safetensors file").then(
      (i) => ({ path: this.path, dev: i.dev, ino: i.ino }),
    );
    try {
      return await this.identity;
    } catch {
      this.identity = null;
      return null;
    }
  }

  private readHere(entry: TensorEntry, dst: Uint8Array): Promise<void> {
    const run = async (): Promise<void> => {
      if (this.handle === null) {
        // Checked again: the file could have been replaced by a FIFO since its header was read.
        this.handle =
          (await openRegularFile(this.path, "MISSING_SHARD", "a safetensors file")).file;
      }
      await readTensorInto(this.handle, entry, dst);
    };
    const p = this.tail.then(run, run);
    this.tail = p.catch(() => {});
    return p;
  }

  close(): void {
    this.handle?.close();
    this.handle = null;
  }
}

async function* iterate(source: WeightSource): AsyncGenerator<NamedTensor> {
  for (const name of source.plan()) {
    const info = source.tensors.get(name)!;
    const data = new Uint8Array(info.bytes);
    await source.readInto(name, data);
    yield { name, tensor: { dtype: info.dtype, shape: [...info.shape], data } };
  }
}

/**
 * Opens a checkpoint on disk (file, directory or index; see `openCheckpoint`) as a source.
 * Every header is validated before this resolves.
 */
export async function fileSource(path: string): Promise<WeightSource> {
  const ckpt = await openCheckpoint(path);
  const infos = new Map<string, TensorInfo>();
  for (const [name, e] of ckpt.tensors) {
    infos.set(name, {
      name,
      dtype: e.dtype,
      shape: e.shape,
      bytes: e.end - e.begin,
      origin: e.file,
    });
  }
  const session = readSession();
  const lanes = new Map<string, FileLane>(ckpt.files.map((f) => [f, new FileLane(f, session)]));
  const source: WeightSource = {
    description: ckpt.index ?? (ckpt.files.length === 1 ? ckpt.files[0] : path),
    tensors: infos,
    plan: (order) => ckpt.readPlan(order).map((e) => e.name),
    readInto: async (name, dst) => {
      const entry = ckpt.tensors.get(name);
      if (entry === undefined) unknown(path, name);
      checkDestination(infos.get(name)!, dst);
      await lanes.get(entry.file)!.read(entry, dst);
    },
    readRowsInto: async (name, start, end, dst) => {
      const entry = ckpt.tensors.get(name);
      if (entry === undefined) unknown(path, name);
      const [a, b] = checkRows(infos.get(name)!, start, end, dst);
      // A part of the entry: a short file is then reported with that part's byte range.
      const part = { ...entry, begin: entry.begin + a, end: entry.begin + b };
      await lanes.get(entry.file)!.read(part, dst);
    },
    close: () => {
      lanes.forEach((l) => l.close());
      closeReadSession(session);
    },
    [Symbol.asyncIterator]: () => iterate(source),
  };
  return source;
}

// Typed arrays other than Uint8Array (raw bytes) must hold the dtype's elements.
function typedArrayFits(data: ArrayBufferView, dtype: DType): boolean {
  if (data instanceof Uint8Array || data instanceof DataView) return true;
  if (data instanceof Float32Array) return dtype.name === "f32";
  if (data instanceof Uint16Array) return dtype.name === "f16" || dtype.name === "bf16";
  if (data instanceof Int8Array) return dtype.name === "i8";
  if (data instanceof Uint8ClampedArray) return dtype.name === "u8" || dtype.name === "bool";
  if (data instanceof Int32Array) return dtype.name === "i32";
  if (data instanceof BigInt64Array) return dtype.name === "i64";
  const f16 = (globalThis as { Float16Array?: new () => unknown }).Float16Array;
  if (f16 !== undefined && data instanceof f16) return dtype.name === "f16";
  return false;
}

/**
 * Turns a tensor given in memory into a HostTensor (a view of the same bytes, not a copy),
 * checking the dtype name, the shape, that a typed array's element type fits the dtype and that
 * the byte length is numel x dtype size. `where` names the source in messages.
 */
export function toHostTensor(name: string, t: TensorLike, where: string): HostTensor {
  const dtype = typeof t.dtype === "string"
    ? dtypeOf(t.dtype) ?? dtypeFromSafetensors(t.dtype)
    : t.dtype;
  if (dtype === undefined) {
    fail(
      "BAD_DTYPE",
      `${where}: tensor ${quote(name)} has unknown dtype ${quote(String(t.dtype))}`,
    );
  }
  if (!ArrayBuffer.isView(t.data)) {
    fail("BAD_DATA", `${where}: tensor ${quote(name)} data is not a typed array or DataView`);
  }
  if (!typedArrayFits(t.data, dtype)) {
    fail(
      "DTYPE_MISMATCH",
      `${where}: tensor ${
        quote(name)
      } is ${dtype.safetensors} but its data is a ${t.data.constructor.name}`,
    );
  }
  if (!Array.isArray(t.shape)) {
    fail("BAD_SHAPE", `${where}: tensor ${quote(name)} has no shape array`);
  }
  const host: HostTensor = {
    dtype,
    shape: [...t.shape],
    data: new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength),
  };
  checkHostTensor(name, host, where);
  return host;
}

/**
 * A source that only describes its tensors, for validation against a model: their bytes travel
 * another way (`via`: CUDA IPC, NCCL), so every read is refused (CheckpointError `NOT_LOADABLE`).
 */
export function describingSource(
  description: string,
  tensors: ReadonlyMap<string, TensorInfo>,
  plan: (order?: (name: string) => number) => string[],
  via: string,
): WeightSource {
  const refusal = () => new CheckpointError("NOT_LOADABLE", `${description}: read through ${via}`);
  const refuse = (): Promise<never> => Promise.reject(refusal());
  return {
    description,
    tensors,
    plan,
    readInto: refuse,
    readRowsInto: refuse,
    close: () => {},
    [Symbol.asyncIterator]: (): AsyncIterator<NamedTensor> => ({ next: refuse }),
  };
}

/**
 * A source over tensors held in memory, given as `[name, tensor]` pairs or `{ name, tensor }`
 * records in any order. Everything is validated here (duplicate names, dtypes, byte lengths);
 * the bytes are not copied, so they must not change while the source is in use.
 */
export function memorySource(pairs: TensorPairs, description = "in-memory tensors"): WeightSource {
  const held = new Map<string, HostTensor>();
  const infos = new Map<string, TensorInfo>();
  for (const item of pairs as Iterable<unknown>) {
    let name: unknown;
    let t: unknown;
    if (Array.isArray(item)) [name, t] = item;
    else if (typeof item === "object" && item !== null) {
      ({ name, tensor: t } = item as { name: unknown; tensor: unknown });
    }
    if (typeof name !== "string" || typeof t !== "object" || t === null) {
      fail("BAD_DATA", `${description}: expected [name, tensor] pairs or { name, tensor } records`);
    }
    if (held.has(name)) fail("DUPLICATE", `${description}: tensor ${quote(name)} given twice`);
    const host = toHostTensor(name, t as TensorLike, description);
    held.set(name, host);
    infos.set(name, {
      name,
      dtype: host.dtype,
      shape: host.shape,
      bytes: host.data.byteLength,
      origin: description,
    });
  }
  const names = [...held.keys()];
  const source: WeightSource = {
    description,
    tensors: infos,
    plan: (order) => {
      if (order === undefined) return [...names];
      const pseudo = names.map((n, i) => ({ name: n, begin: i, file: "" }) as TensorEntry);
      return sortForReading(pseudo, [""], order).map((e) => e.name);
    },
    // The executor turns a throw into a rejection, as an async file read would.
    readInto: (name, dst) =>
      new Promise<void>((resolve) => {
        const host = held.get(name);
        if (host === undefined) unknown(description, name);
        checkDestination(infos.get(name)!, dst);
        dst.set(host.data);
        resolve();
      }),
    readRowsInto: (name, start, end, dst) =>
      new Promise<void>((resolve) => {
        const host = held.get(name);
        if (host === undefined) unknown(description, name);
        const [a, b] = checkRows(infos.get(name)!, start, end, dst);
        dst.set(host.data.subarray(a, b));
        resolve();
      }),
    close: () => held.clear(),
    [Symbol.asyncIterator]: () => iterate(source),
  };
  return source;
}

/**
 * Opens any weight source: a path (file, directory or index), a sync iterable of pairs, or an
 * async iterable of pairs (collected first, because a source must describe every tensor before
 * the first is read: the bytes are held in memory until the source is closed).
 */
export async function openWeightSource(
  input: string | TensorPairs | AsyncIterable<readonly [string, TensorLike] | NamedTensor>,
): Promise<WeightSource> {
  if (typeof input === "string") return await fileSource(input);
  if (Symbol.asyncIterator in input) {
    const items: unknown[] = [];
    for await (const item of input) items.push(item);
    return memorySource(items as TensorPairs, "streamed tensors");
  }
  return memorySource(input);
}

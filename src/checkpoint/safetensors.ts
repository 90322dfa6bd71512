/**
 * safetensors read and write. Every rule of the format is checked on the header before any
 * tensor byte is used, as the format's reference (Rust) reader does: header length bound,
 * UTF-8 JSON object, known dtypes, shapes, offsets whose byte length matches the shape, tensors
 * covering the data area contiguously from 0 to the end of the file, no duplicate names.
 *
 * The header is parsed by a small strict JSON parser of our own rather than `JSON.parse`
 * because `JSON.parse` silently keeps the last of two duplicate keys and turns `1e3`, `1.0` or
 * integers past 2^53 into numbers we could not tell apart from valid offsets.
 * @module
 */

import { CheckpointError, type CheckpointErrorCode } from "../errors.ts";
import { quoteName } from "../messages.ts";
import { type DType, dtypeFromSafetensors } from "../tensor/dtype.ts";
import { openRegularFile } from "./files.ts";
import { writeFileAtomic } from "./atomic_write.ts";
import { JsonNumber, JsonObject, type JsonValue, parseStrictJson } from "./json.ts";

/** A tensor held in host memory: its bytes are little-endian, row-major and contiguous. */
export interface HostTensor {
  /** Element type. */
  dtype: DType;
  /** Sizes of each dimension. */
  shape: number[];
  /** The tensor's bytes; `byteLength` is numel x dtype size. */
  data: Uint8Array;
}

/** One tensor as described by a safetensors header. */
export interface TensorEntry {
  /** The tensor's name in the file. */
  name: string;
  /** Element type. */
  dtype: DType;
  /** Sizes of each dimension. */
  shape: number[];
  /** Absolute offset of the tensor's first byte in the file. */
  begin: number;
  /** Absolute offset one past the tensor's last byte in the file. */
  end: number;
  /** The file the entry was read from (as given to the parser), for messages. */
  file: string;
}

/** A validated safetensors header. */
export interface SafetensorsHeader {
  /** The file the header was read from (as given to the parser), for messages. */
  file: string;
  /** N, the length of the JSON header in bytes. */
  headerLength: number;
  /** Absolute offset of the data area (8 + N). */
  dataStart: number;
  /** The `__metadata__` map, empty when the file has none. */
  metadata: Record<string, string>;
  /** Every tensor by name, in data order. */
  tensors: Map<string, TensorEntry>;
}

/** Largest header the reader accepts, the same bound as the reference reader (100 MB). */
export const MAX_HEADER_LENGTH = 100_000_000;

/** safetensors dtype names that exist in the format but that this package does not handle. */
const UNSUPPORTED_DTYPES: ReadonlySet<string> = new Set([
  "F64",
  "I16",
  "U16",
  "U32",
  "U64",
  "C64",
  "F8_E8M0",
  "F6_E2M3",
  "F6_E3M2",
  "F4",
]);

function fail(code: CheckpointErrorCode, message: string): never {
  throw new CheckpointError(code, message);
}

// Messages stay one short line even when a hostile header holds megabyte-long strings.
const quote = quoteName;

function shapeText(shape: readonly number[]): string {
  return `[${shape.join(", ")}]`;
}

// ---------------------------------------------------------------------------------------------
// Header validation

const UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

// The first bytes of a file in hex and as text, for a file that is not safetensors at all.
function firstBytes(prefix: Uint8Array): string {
  const b = prefix.subarray(0, 16);
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join(" ");
  const text = String.fromCharCode(...b).replace(/[^\x20-\x7e]/g, ".");
  return `${hex} (${quote(text)})`;
}

/**
 * Reads and bounds-checks N, the header length, from the first bytes of a file of `fileSize`
 * bytes. Throws CheckpointError `TRUNCATED` when the file is shorter than 8 bytes or than
 * 8 + N, `HEADER_TOO_LARGE` past {@link MAX_HEADER_LENGTH}, and `NOT_SAFETENSORS` when N is
 * out of bounds and the byte after it (when `prefix` holds it) does not open a JSON header:
 * the file is something else, and its first bytes are shown.
 */
export function safetensorsHeaderLength(
  prefix: Uint8Array,
  fileSize: number,
  file: string,
): number {
  if (fileSize < 8) {
    fail("TRUNCATED", `${file}: file has ${fileSize} bytes, a safetensors file needs at least 8`);
  }
  if (prefix.byteLength < 8) {
    fail("TRUNCATED", `${file}: got ${prefix.byteLength} bytes, the header length needs 8`);
  }
  const view = new DataView(prefix.buffer, prefix.byteOffset, 8);
  const big = view.getBigUint64(0, true);
  const inBounds = big <= BigInt(MAX_HEADER_LENGTH) && 8n + big <= BigInt(fileSize);
  // `{` or JSON whitespace: what every safetensors header starts with.
  const opensJson = prefix.byteLength <= 8 || [0x7b, 0x20, 0x0a, 0x0d, 0x09].includes(prefix[8]);
  if (!inBounds && !opensJson) {
    fail(
      "NOT_SAFETENSORS",
      `${file}: not a safetensors file: its first bytes are ${
        firstBytes(prefix)
      }, where a safetensors file starts with an 8-byte header length (little-endian) and a JSON header`,
    );
  }
  if (big > BigInt(MAX_HEADER_LENGTH)) {
    fail(
      "HEADER_TOO_LARGE",
      `${file}: header length ${big} exceeds the ${MAX_HEADER_LENGTH}-byte limit`,
    );
  }
  const n = Number(big);
  if (8 + n > fileSize) {
    fail(
      "TRUNCATED",
      `${file}: header length ${n} runs past the end of the file (${fileSize} bytes, needs at least ${
        8 + n
      })`,
    );
  }
  return n;
}

function asObject(v: JsonValue | undefined): JsonObject | null {
  return v instanceof JsonObject ? v : null;
}

function describe(v: JsonValue | undefined): string {
  if (v === undefined) return "missing";
  if (v instanceof JsonNumber) return v.raw.length > 40 ? `${v.raw.slice(0, 40)}...` : v.raw;
  if (v instanceof JsonObject) return "an object";
  if (Array.isArray(v)) return "an array";
  return typeof v === "string" ? quote(v) : JSON.stringify(v);
}

// A usize as the reference reader accepts it: a plain non-negative integer literal. We also
// need it to be a safe integer to hold it exactly in a JS number.
function toIndex(v: JsonValue): number | null {
  if (!(v instanceof JsonNumber) || !/^(?:0|[1-9][0-9]*)$/.test(v.raw)) return null;
  const n = Number(v.raw);
  return Number.isSafeInteger(n) ? n : null;
}

function rawList(v: JsonValue[]): string {
  const shown = v.slice(0, 8).map(describe);
  if (v.length > 8) shown.push("...");
  return `[${shown.join(", ")}]`;
}

function checkedBytes(shape: number[], size: number): number | null {
  // Left to right with an overflow check at each step, like the reference's checked_mul fold.
  let n = size;
  for (const d of shape) {
    n *= d;
    if (!Number.isSafeInteger(n)) return null;
  }
  return n;
}

// Offsets stay relative to the data area until the whole layout is validated, so that huge
// values never meet the (inexact) sum with the data start.
function parseEntry(file: string, name: string, v: JsonValue): TensorEntry {
  // Built only on failure: a large header has many entries and this is the hot path.
  const where = (): string => `${file}: tensor ${quote(name)}`;
  const obj = asObject(v);
  if (obj === null) {
    fail("BAD_ENTRY", `${where()}: header entry is ${describe(v)}, expected an object`);
  }
  // Unknown keys are ignored, as the reference reader does.
  const dtypeV = obj.entries.get("dtype");
  if (typeof dtypeV !== "string") {
    fail("BAD_DTYPE", `${where()}: dtype is ${describe(dtypeV)}, expected a string`);
  }
  const dtype = dtypeFromSafetensors(dtypeV);
  if (dtype === undefined) {
    if (UNSUPPORTED_DTYPES.has(dtypeV)) {
      fail("UNSUPPORTED_DTYPE", `${where()}: dtype ${quote(dtypeV)} is not supported`);
    }
    fail("BAD_DTYPE", `${where()}: unknown dtype ${quote(dtypeV)}`);
  }
  const shapeV = obj.entries.get("shape");
  if (!Array.isArray(shapeV)) {
    fail("BAD_SHAPE", `${where()}: shape is ${describe(shapeV)}, expected an array of integers`);
  }
  const shape: number[] = [];
  for (const d of shapeV) {
    const n = toIndex(d);
    if (n === null) {
      fail(
        "BAD_SHAPE",
        `${where()}: shape ${rawList(shapeV)} is not a list of non-negative integers`,
      );
    }
    shape.push(n);
  }
  const offV = obj.entries.get("data_offsets");
  if (!Array.isArray(offV) || offV.length !== 2) {
    fail(
      "BAD_OFFSETS",
      `${where()}: data_offsets is ${
        Array.isArray(offV) ? rawList(offV) : describe(offV)
      }, expected [begin, end]`,
    );
  }
  const b = toIndex(offV[0]);
  const e = toIndex(offV[1]);
  if (b === null || e === null) {
    fail("BAD_OFFSETS", `${where()}: data_offsets ${rawList(offV)} are not non-negative integers`);
  }
  if (b > e) fail("BAD_OFFSETS", `${where()}: data_offsets [${b}, ${e}] end before they begin`);
  const need = checkedBytes(shape, dtype.size);
  if (need === null) {
    fail("BAD_SHAPE", `${where()}: ${dtype.safetensors} ${shapeText(shape)} is too large`);
  }
  if (e - b !== need) {
    fail(
      "SIZE_MISMATCH",
      `${where()} data_offsets [${b}, ${e}] hold ${e - b} bytes, ${dtype.safetensors} ${
        shapeText(shape)
      } needs ${need}`,
    );
  }
  return { name, dtype, shape, begin: b, end: e, file };
}

function parseMetadata(file: string, v: JsonValue): Record<string, string> {
  const out: Record<string, string> = {};
  if (v === null) return out; // the reference reads `__metadata__` as an Option
  const obj = asObject(v);
  if (obj === null) {
    fail(
      "BAD_METADATA",
      `${file}: __metadata__ is ${describe(v)}, expected a string-to-string map`,
    );
  }
  for (const [k, val] of obj.entries) {
    if (typeof val !== "string") {
      fail(
        "BAD_METADATA",
        `${file}: __metadata__ key ${quote(k)} is ${describe(val)}, expected a string`,
      );
    }
    Object.defineProperty(out, k, { value: val, enumerable: true, writable: true });
  }
  return out;
}

function range(e: TensorEntry): string {
  return `data_offsets [${e.begin}, ${e.end}]`;
}

// Sorts `entries` (relative offsets) by offset and checks that they tile the data area exactly.
// A header that tiles [0, X) with X past the data area is a truncated file; a tensor past the
// end that also breaks the tiling is a bad offset.
function checkLayout(file: string, entries: TensorEntry[], dataLength: number): void {
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let expected = 0;
  let prev: TensorEntry | null = null;
  let tilingError: [CheckpointErrorCode, string] | null = null;
  for (const e of entries) {
    if (e.begin < expected) {
      tilingError = [
        "OVERLAP",
        `${file}: tensor ${quote(e.name)} ${range(e)} overlap tensor ${quote(prev!.name)} ${
          range(prev!)
        }`,
      ];
      break;
    }
    if (e.begin > expected) {
      tilingError = [
        "GAP",
        `${file}: tensor ${quote(e.name)} begins at ${e.begin}, expected ${expected} (${
          prev === null ? "the data area starts" : `tensor ${quote(prev.name)} ends`
        } there)`,
      ];
      break;
    }
    expected = e.end;
    prev = e;
  }
  const outside = entries.find((e) => e.end > dataLength);
  if (outside !== undefined) {
    if (tilingError !== null) {
      fail(
        "BAD_OFFSETS",
        `${file}: tensor ${quote(outside.name)} ${
          range(outside)
        } run past the data area of ${dataLength} bytes`,
      );
    }
    fail(
      "TRUNCATED",
      `${file}: tensor ${quote(prev!.name)} ${
        range(prev!)
      } ends past the data area of ${dataLength} bytes: the file is ${
        expected - dataLength
      } bytes short`,
    );
  }
  if (tilingError !== null) fail(...tilingError);
  if (expected !== dataLength) {
    fail(
      "GAP",
      `${file}: ${dataLength - expected} bytes after ${
        prev === null ? "the header" : `tensor ${quote(prev.name)}`
      } belong to no tensor (data area is ${dataLength} bytes, tensors cover ${expected})`,
    );
  }
}

/**
 * Parses and validates a safetensors header from the first bytes of a file (pure: it uses
 * only `prefix` and `fileSize`). `prefix` must hold at least 8 + N bytes; otherwise it throws
 * CheckpointError `TRUNCATED`. Every returned entry lies inside `[8 + N, fileSize)`, and the
 * entries cover the data area exactly. Any rule broken throws a CheckpointError with a specific
 * code and a message naming `file`, the tensor and the expectation.
 */
export function parseSafetensorsHeader(
  prefix: Uint8Array,
  fileSize: number,
  file: string,
): SafetensorsHeader {
  const n = safetensorsHeaderLength(prefix, fileSize, file);
  if (prefix.byteLength < 8 + n) {
    fail("TRUNCATED", `${file}: got ${prefix.byteLength} bytes, the header needs ${8 + n}`);
  }
  let text: string;
  try {
    text = UTF8.decode(prefix.subarray(8, 8 + n));
  } catch {
    fail("HEADER_NOT_JSON", `${file}: header is not valid UTF-8`);
  }
  // Leading whitespace is accepted: the reference reader's "must start with '{'" check is still
  // disabled, and we are exactly as strict as it is.
  const root = parseStrictJson(text, file, {
    syntaxCode: "HEADER_NOT_JSON",
    what: "header",
    duplicate: (key, owner, depth) => {
      if (depth === 0) {
        fail("DUPLICATE", `${file}: tensor ${quote(key)} appears twice in the header`);
      }
      fail(
        "DUPLICATE",
        `${file}: key ${quote(key)} appears twice in the header entry of ${quote(owner ?? "")}`,
      );
    },
  });
  if (!(root instanceof JsonObject)) {
    fail("HEADER_NOT_OBJECT", `${file}: header is ${describe(root)}, expected a JSON object`);
  }
  const dataStart = 8 + n;
  const dataLength = fileSize - dataStart;
  let metadata: Record<string, string> = {};
  const entries: TensorEntry[] = [];
  for (const [name, v] of root.entries) {
    if (name === "__metadata__") metadata = parseMetadata(file, v);
    else entries.push(parseEntry(file, name, v));
  }
  checkLayout(file, entries, dataLength);
  for (const e of entries) {
    e.begin += dataStart;
    e.end += dataStart;
  }
  return {
    file,
    headerLength: n,
    dataStart,
    metadata,
    tensors: new Map(entries.map((e) => [e.name, e])),
  };
}

// ---------------------------------------------------------------------------------------------
// Reading

async function readFully(f: Deno.FsFile, dst: Uint8Array, at: number): Promise<number> {
  await f.seek(at, Deno.SeekMode.Start);
  let got = 0;
  while (got < dst.byteLength) {
    const r = await f.read(dst.subarray(got));
    if (r === null || r === 0) break;
    got += r;
  }
  return got;
}

/**
 * Reads and validates the header of the safetensors file at `path`, reading only the header
 * bytes (not the tensors).
 */
export async function readSafetensorsHeader(path: string): Promise<SafetensorsHeader> {
  // A FIFO or a device would block or never end: only regular files are opened.
  const { file: f, size } = await openRegularFile(path, "NOT_A_FILE", "a safetensors file");
  try {
    const head = new Uint8Array(Math.min(16, size));
    const got16 = await readFully(f, head, 0);
    const n = safetensorsHeaderLength(head.subarray(0, got16), size, path);
    const prefix = new Uint8Array(8 + n);
    const got = await readFully(f, prefix, 0);
    return parseSafetensorsHeader(prefix.subarray(0, got), size, path);
  } finally {
    f.close();
  }
}

/**
 * Reads exactly `entry`'s bytes from `file` into `dst`, whose length must be the entry's byte
 * length. Throws CheckpointError `TRUNCATED` naming the file and tensor if the file is shorter
 * than at validation. It seeks `file`, so calls on one handle must not overlap in time.
 */
export async function readTensorInto(
  file: Deno.FsFile,
  entry: TensorEntry,
  dst: Uint8Array,
): Promise<void> {
  const bytes = entry.end - entry.begin;
  if (dst.byteLength !== bytes) {
    fail(
      "BAD_DESTINATION",
      `${entry.file}: tensor ${
        quote(entry.name)
      } has ${bytes} bytes, destination holds ${dst.byteLength}`,
    );
  }
  const got = await readFully(file, dst, entry.begin);
  if (got !== bytes) {
    // The size now, not begin + got: a file cut before `begin` reads nothing at all.
    const now = (await file.stat()).size;
    fail(
      "TRUNCATED",
      `${entry.file}: tensor ${
        quote(entry.name)
      } needs bytes [${entry.begin}, ${entry.end}) but the file now ends at ${now}`,
    );
  }
}

/**
 * Reads and validates a whole safetensors file. Meant for small files: every tensor is copied
 * into its own buffer (so typed-array views of it are aligned).
 */
export async function loadSafetensors(path: string): Promise<Map<string, HostTensor>> {
  const { file, size } = await openRegularFile(path, "NOT_A_FILE", "a safetensors file");
  const bytes = new Uint8Array(size);
  let got: number;
  try {
    got = await readFully(file, bytes, 0);
  } finally {
    file.close();
  }
  if (got !== size) fail("TRUNCATED", `${path}: shrank to ${got} bytes while being read`);
  const header = parseSafetensorsHeader(bytes, bytes.byteLength, path);
  const out = new Map<string, HostTensor>();
  for (const e of header.tensors.values()) {
    out.set(e.name, { dtype: e.dtype, shape: e.shape, data: bytes.slice(e.begin, e.end) });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing

/**
 * Checks that a host tensor's shape is valid and its byte length is numel x dtype size;
 * throws CheckpointError `BAD_SHAPE` or `SIZE_MISMATCH` naming the tensor and `where`.
 */
export function checkHostTensor(name: string, t: HostTensor, where: string): void {
  for (const d of t.shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      fail("BAD_SHAPE", `${where}: tensor ${quote(name)} has invalid shape ${shapeText(t.shape)}`);
    }
  }
  const need = checkedBytes(t.shape, t.dtype.size);
  if (need === null || t.data.byteLength !== need) {
    fail(
      "SIZE_MISMATCH",
      `${where}: tensor ${quote(name)} has ${t.data.byteLength} bytes, ${t.dtype.safetensors} ${
        shapeText(t.shape)
      } needs ${need ?? "more than 2^53"}`,
    );
  }
}

// The reference writer sorts by its Dtype enum's declaration order, descending (which puts
// wider types first); using the same order makes our files byte-identical to its output.
const WRITE_ORDER: readonly string[] = [
  "BOOL",
  "F4",
  "F6_E2M3",
  "F6_E3M2",
  "U8",
  "I8",
  "F8_E5M2",
  "F8_E4M3",
  "F8_E8M0",
  "I16",
  "U16",
  "F16",
  "BF16",
  "I32",
  "U32",
  "F32",
  "C64",
  "F64",
  "I64",
  "U64",
];

function writeRank(d: DType): number {
  return WRITE_ORDER.indexOf(d.safetensors);
}

/** What {@link layoutSafetensors} needs of a tensor: its dtype, shape and byte length. */
export interface TensorLayoutInput {
  /** Element type. */
  dtype: DType;
  /** Sizes of each dimension. */
  shape: readonly number[];
  /** numel x dtype size. */
  bytes: number;
}

/** A safetensors file's layout: its first bytes and the order of the tensors' data after them. */
export interface SafetensorsLayout {
  /** The 8-byte header length and the JSON header, padded with spaces to a multiple of 8. */
  prefix: Uint8Array;
  /** Tensor names in the order their bytes follow the prefix. */
  order: string[];
  /** Bytes of the whole file. */
  totalBytes: number;
}

/**
 * Lays tensors out as the reference writer does: by dtype (wider first, so every tensor stays
 * aligned to its element size) then by name; the header is padded with spaces to a multiple of
 * 8 bytes. Lets a writer stream a file tensor by tensor. Throws CheckpointError on a duplicate
 * or non-UTF-8-representable name, a `__metadata__` tensor name or bad metadata.
 */
export function layoutSafetensors(
  tensors: Iterable<[string, TensorLayoutInput]>,
  metadata?: Record<string, string>,
  where = "layoutSafetensors",
): SafetensorsLayout {
  const seen = new Set<string>();
  const list: [string, TensorLayoutInput][] = [];
  for (const [name, t] of tensors) {
    if (seen.has(name)) fail("DUPLICATE", `${where}: tensor ${quote(name)} given twice`);
    if (name === "__metadata__" || !name.isWellFormed()) {
      fail("BAD_NAME", `${where}: tensor name ${quote(name)} cannot be written`);
    }
    seen.add(name);
    list.push([name, t]);
  }
  list.sort(([an, a], [bn, b]) =>
    writeRank(b.dtype) - writeRank(a.dtype) || (an < bn ? -1 : an > bn ? 1 : 0)
  );
  const parts: string[] = [];
  if (metadata !== undefined) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string" || !k.isWellFormed() || !v.isWellFormed()) {
        fail("BAD_METADATA", `${where}: __metadata__ key ${quote(k)} must map to a string`);
      }
    }
    parts.push(`"__metadata__":${JSON.stringify(metadata)}`);
  }
  let offset = 0;
  for (const [name, t] of list) {
    const end = offset + t.bytes;
    parts.push(
      `${JSON.stringify(name)}:{"dtype":"${t.dtype.safetensors}","shape":[${
        t.shape.join(",")
      }],"data_offsets":[${offset},${end}]}`,
    );
    offset = end;
  }
  const json = new TextEncoder().encode(`{${parts.join(",")}}`);
  const n = json.byteLength + ((8 - (json.byteLength % 8)) % 8);
  if (n > MAX_HEADER_LENGTH) {
    fail("HEADER_TOO_LARGE", `${where}: header of ${n} bytes exceeds ${MAX_HEADER_LENGTH}`);
  }
  const prefix = new Uint8Array(8 + n);
  new DataView(prefix.buffer).setBigUint64(0, BigInt(n), true);
  prefix.set(json, 8);
  prefix.fill(0x20, 8 + json.byteLength, 8 + n);
  return { prefix, order: list.map(([name]) => name), totalBytes: 8 + n + offset };
}

/** Checks host tensors and lays them out; their bytes by name, for the writer. */
function layoutHostTensors(
  tensors: Iterable<[string, HostTensor]>,
  metadata: Record<string, string> | undefined,
  where: string,
): { layout: SafetensorsLayout; held: Map<string, HostTensor> } {
  const held = new Map<string, HostTensor>();
  const list: [string, TensorLayoutInput][] = [];
  for (const [name, t] of tensors) {
    checkHostTensor(name, t, where);
    held.set(name, t);
    list.push([name, { dtype: t.dtype, shape: t.shape, bytes: t.data.byteLength }]);
  }
  // A name given twice is refused here, before `held` is read.
  return { layout: layoutSafetensors(list, metadata, where), held };
}

/**
 * Encodes tensors as a safetensors file laid out by {@link layoutSafetensors}. Throws
 * CheckpointError as it does, and on a tensor whose byte length does not fit its shape.
 */
export function encodeSafetensors(
  tensors: Iterable<[string, HostTensor]>,
  metadata?: Record<string, string>,
): Uint8Array {
  const { layout, held } = layoutHostTensors(tensors, metadata, "encodeSafetensors");
  const out = new Uint8Array(layout.totalBytes);
  out.set(layout.prefix);
  let at = layout.prefix.byteLength;
  for (const name of layout.order) {
    const t = held.get(name)!;
    out.set(t.data, at);
    at += t.data.byteLength;
  }
  return out;
}

/**
 * Writes tensors as {@link encodeSafetensors} encodes them to `path` atomically (a temporary
 * file beside it, then a rename: see `writeFileAtomic`), so an interrupted write never leaves a
 * truncated file where the previous one was. The tensors are written one after the other, with
 * no copy of the whole file in memory; every check is made before the file is created.
 */
export async function writeSafetensors(
  path: string,
  tensors: Iterable<[string, HostTensor]>,
  metadata?: Record<string, string>,
): Promise<void> {
  const { layout, held } = layoutHostTensors(tensors, metadata, "encodeSafetensors");
  await writeFileAtomic(
    path,
    (async function* () {
      yield layout.prefix;
      for (const name of layout.order) yield held.get(name)!.data;
    })(),
  );
}

/**
 * Checkpoints on disk: a single safetensors file, a directory holding `model.safetensors`, or a
 * sharded checkpoint described by `model.safetensors.index.json`. Every shard header is read and
 * validated when the checkpoint is opened, so the place of every tensor is known before any
 * tensor byte is read, and reads can be scheduled in model layer order.
 *
 * Strictness: `transformers` raises only when a shard file named by the index is missing; a
 * tensor the index names but its shard lacks (or the reverse) ends up, at most, in its
 * "missing keys"/"unexpected keys" warning. We reject both, and a tensor present in two shards,
 * because a reload that silently skips or double-writes a tensor is worse than one that stops.
 * @module
 */

import { CheckpointError, type CheckpointErrorCode } from "../errors.ts";
import { readSafetensorsHeader, type SafetensorsHeader, type TensorEntry } from "./safetensors.ts";

/** Name of the index file of a sharded checkpoint. */
export const INDEX_FILE = "model.safetensors.index.json";
/** Name of the file of a single-file checkpoint directory. */
export const SINGLE_FILE = "model.safetensors";

/** A validated checkpoint: every tensor with the file and byte range it is read from. */
export interface Checkpoint {
  /** The path the checkpoint was opened from. */
  readonly path: string;
  /** The index file, or null when the checkpoint is a single file. */
  readonly index: string | null;
  /** The safetensors files (paths), in the order reads prefer when keys tie. */
  readonly files: readonly string[];
  /** Each file's validated header, by path. */
  readonly headers: ReadonlyMap<string, SafetensorsHeader>;
  /** Every tensor by name; `entry.file` is the path to read it from. */
  readonly tensors: ReadonlyMap<string, TensorEntry>;
  /**
   * Every tensor sorted by `order(name)` (the model's layer order; ties and NaN last keep file
   * order), then by file, then by offset in the file, so reads follow the model whatever the
   * order in the files.
   */
  readPlan(order?: (name: string) => number): TensorEntry[];
}

function fail(code: CheckpointErrorCode, message: string): never {
  throw new CheckpointError(code, message);
}

function join(dir: string, name: string): string {
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

async function statOrNull(path: string): Promise<Deno.FileInfo | null> {
  try {
    return await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

/** Sorts entries by a caller key, then file rank, then offset. */
export function sortForReading(
  entries: Iterable<TensorEntry>,
  files: readonly string[],
  order?: (name: string) => number,
): TensorEntry[] {
  const rank = new Map(files.map((f, i) => [f, i]));
  const keyed = [...entries].map((e) => {
    const k = order === undefined ? 0 : order(e.name);
    return { e, k: Number.isNaN(k) ? Infinity : k, f: rank.get(e.file) ?? files.length };
  });
  keyed.sort((a, b) => (a.k < b.k ? -1 : a.k > b.k ? 1 : 0) || a.f - b.f || a.e.begin - b.e.begin);
  return keyed.map((x) => x.e);
}

function makeCheckpoint(
  path: string,
  index: string | null,
  headers: Map<string, SafetensorsHeader>,
  tensors: Map<string, TensorEntry>,
): Checkpoint {
  const files = [...headers.keys()];
  return {
    path,
    index,
    files,
    headers,
    tensors,
    readPlan: (order?: (name: string) => number): TensorEntry[] =>
      sortForReading(tensors.values(), files, order),
  };
}

async function openSingle(path: string, file: string): Promise<Checkpoint> {
  const header = await readSafetensorsHeader(file);
  return makeCheckpoint(path, null, new Map([[file, header]]), new Map(header.tensors));
}

function parseIndex(index: string, text: string): Map<string, string> {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    fail("BAD_INDEX", `${index}: not valid JSON (${(e as Error).message})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    fail("BAD_INDEX", `${index}: expected a JSON object with a "weight_map"`);
  }
  const map = (json as Record<string, unknown>).weight_map;
  if (typeof map !== "object" || map === null || Array.isArray(map)) {
    fail("BAD_INDEX", `${index}: "weight_map" is missing or not an object of tensor -> shard`);
  }
  const out = new Map<string, string>();
  for (const [name, shard] of Object.entries(map)) {
    if (typeof shard !== "string" || shard.length === 0) {
      fail(
        "BAD_INDEX",
        `${index}: tensor ${JSON.stringify(name)} maps to ${
          JSON.stringify(shard)
        }, expected a shard file name`,
      );
    }
    // Shards live next to the index; refuse names that would reach elsewhere.
    if (shard.startsWith("/") || shard.split(/[\\/]/).includes("..")) {
      fail(
        "BAD_INDEX",
        `${index}: tensor ${JSON.stringify(name)} maps to shard ${
          JSON.stringify(shard)
        } outside the checkpoint directory`,
      );
    }
    out.set(name, shard);
  }
  return out;
}

async function openSharded(path: string, index: string): Promise<Checkpoint> {
  const dir = index.includes("/") ? index.slice(0, index.lastIndexOf("/")) : ".";
  const weightMap = parseIndex(index, await Deno.readTextFile(index));
  // Sorted by name so that file order follows the shard numbering, whatever order the index
  // lists tensors in.
  const shardNames = [...new Set(weightMap.values())].sort();
  const headers = new Map<string, SafetensorsHeader>();
  for (const shard of shardNames) {
    const file = join(dir, shard);
    const info = await statOrNull(file);
    if (info === null || !info.isFile) {
      fail(
        "MISSING_SHARD",
        `${index}: shard ${JSON.stringify(shard)} is missing (${file} not found)`,
      );
    }
    headers.set(shard, await readSafetensorsHeader(file));
  }
  // Duplicates first: a tensor in two shards is the more specific diagnosis than the index
  // mismatch it also causes.
  const tensors = new Map<string, TensorEntry>();
  const owner = new Map<string, string>();
  for (const [shard, header] of headers) {
    for (const [name, entry] of header.tensors) {
      const other = owner.get(name);
      if (other !== undefined) {
        fail(
          "DUPLICATE",
          `${index}: tensor ${JSON.stringify(name)} is in both ${other} and ${shard}`,
        );
      }
      owner.set(name, shard);
      tensors.set(name, entry);
    }
  }
  for (const [name, shard] of owner) {
    const listed = weightMap.get(name);
    if (listed === undefined) {
      fail(
        "UNINDEXED_TENSOR",
        `${headers.get(shard)!.file}: tensor ${JSON.stringify(name)} is not in ${index}`,
      );
    }
    if (listed !== shard) {
      fail(
        "INDEX_MISMATCH",
        `${index}: tensor ${JSON.stringify(name)} is listed in ${listed} but found in ${shard}`,
      );
    }
  }
  for (const [name, shard] of weightMap) {
    if (!tensors.has(name)) {
      fail(
        "MISSING_TENSOR",
        `${index}: tensor ${
          JSON.stringify(name)
        } is listed in ${shard} but that shard does not hold it`,
      );
    }
  }
  const byPath = new Map<string, SafetensorsHeader>();
  for (const h of headers.values()) byPath.set(h.file, h);
  return makeCheckpoint(path, index, byPath, tensors);
}

/**
 * Opens and validates a checkpoint: a `.safetensors` file, a `model.safetensors.index.json`
 * file, or a directory holding either (the index wins). Every shard header is read and
 * validated; throws CheckpointError `MISSING_SHARD`, `MISSING_TENSOR`, `UNINDEXED_TENSOR`,
 * `INDEX_MISMATCH`, `DUPLICATE`, `BAD_INDEX`, `NO_CHECKPOINT` or any header error.
 */
export async function openCheckpoint(path: string): Promise<Checkpoint> {
  const info = await statOrNull(path);
  if (info === null) fail("NO_CHECKPOINT", `${path}: no such file or directory`);
  if (info.isDirectory) {
    const index = join(path, INDEX_FILE);
    if ((await statOrNull(index))?.isFile) return await openSharded(path, index);
    const single = join(path, SINGLE_FILE);
    if ((await statOrNull(single))?.isFile) return await openSingle(path, single);
    fail("NO_CHECKPOINT", `${path}: directory holds neither ${INDEX_FILE} nor ${SINGLE_FILE}`);
  }
  if (path.endsWith(".index.json")) return await openSharded(path, path);
  return await openSingle(path, path);
}

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
import { escapeText, pathText, quoteName } from "../messages.ts";
import { fileKind, readBoundedText, statOrNull } from "./files.ts";
import { JsonObject, parseStrictJson } from "./json.ts";
import {
  MAX_HEADER_LENGTH,
  readSafetensorsHeader,
  type SafetensorsHeader,
  type TensorEntry,
} from "./safetensors.ts";

/** Name of the index file of a sharded checkpoint. */
export const INDEX_FILE = "model.safetensors.index.json";
/** Name of the file of a single-file checkpoint directory. */
export const SINGLE_FILE = "model.safetensors";
/** Largest index file read (an index lists every tensor once: far below this). */
export const MAX_INDEX_BYTES: number = MAX_HEADER_LENGTH;

/** A validated checkpoint: every tensor with the file and byte range it is read from. */
export interface Checkpoint {
  /** The path the checkpoint was opened from. */
  readonly path: string;
  /** The index file, or null when the checkpoint is a single file. */
  readonly index: string | null;
  /**
   * An index that was not used because the directory also holds `model.safetensors` (the
   * single file wins, as in Hugging Face `from_pretrained`); null otherwise.
   */
  readonly unusedIndex: string | null;
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
  unusedIndex: string | null = null,
): Checkpoint {
  const files = [...headers.keys()];
  return {
    path,
    index,
    unusedIndex,
    files,
    headers,
    tensors,
    readPlan: (order?: (name: string) => number): TensorEntry[] =>
      sortForReading(tensors.values(), files, order),
  };
}

async function openSingle(
  path: string,
  file: string,
  unusedIndex: string | null = null,
): Promise<Checkpoint> {
  const header = await readSafetensorsHeader(file);
  return makeCheckpoint(
    path,
    null,
    new Map([[file, header]]),
    new Map(header.tensors),
    unusedIndex,
  );
}

/**
 * A shard name of an index as a plain relative path: `./` and empty segments dropped, so
 * `./x` and `x` name one shard. Null for a name that would leave the directory (absolute,
 * `..`) or that holds control characters.
 */
export function normalizeShardName(shard: string): string | null {
  if (shard.startsWith("/") || shard.includes("\\") || escapeText(shard) !== shard) return null;
  const parts = shard.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.length === 0 || parts.includes("..")) return null;
  return parts.join("/");
}

function parseIndex(index: string, text: string): Map<string, string> {
  const where = pathText(index);
  // Strict: a tensor listed twice would otherwise silently take its last place.
  const json = parseStrictJson(text, index, {
    syntaxCode: "BAD_INDEX",
    what: "index",
    duplicate: (key, owner, depth) => {
      if (depth === 1 && owner === "weight_map") {
        fail("DUPLICATE", `${where}: weight_map lists tensor ${quoteName(key)} twice`);
      }
      fail(
        "BAD_INDEX",
        `${where}: key ${quoteName(key)} appears twice${
          owner === null ? "" : ` under ${quoteName(owner)}`
        }`,
      );
    },
  });
  if (!(json instanceof JsonObject)) {
    fail("BAD_INDEX", `${where}: expected a JSON object with a "weight_map"`);
  }
  const map = json.entries.get("weight_map");
  if (!(map instanceof JsonObject)) {
    fail("BAD_INDEX", `${where}: "weight_map" is missing or not an object of tensor -> shard`);
  }
  const out = new Map<string, string>();
  for (const [name, shard] of map.entries) {
    if (typeof shard !== "string" || shard.length === 0) {
      fail(
        "BAD_INDEX",
        `${where}: tensor ${quoteName(name)} maps to ${
          typeof shard === "string" ? '""' : "a non-string"
        }, expected a shard file name`,
      );
    }
    // Shards live next to the index; refuse names that would reach elsewhere.
    const norm = normalizeShardName(shard);
    if (norm === null) {
      fail(
        "BAD_INDEX",
        `${where}: tensor ${quoteName(name)} maps to shard ${
          quoteName(shard)
        }, outside the checkpoint directory (or not a plain file name)`,
      );
    }
    out.set(name, norm);
  }
  return out;
}

async function openSharded(path: string, index: string): Promise<Checkpoint> {
  const dir = index.includes("/") ? index.slice(0, index.lastIndexOf("/")) : ".";
  const text = await readBoundedText(index, MAX_INDEX_BYTES, "BAD_INDEX", "an index file");
  const weightMap = parseIndex(index, text);
  // Sorted by name so that file order follows the shard numbering, whatever order the index
  // lists tensors in.
  const shardNames = [...new Set(weightMap.values())].sort();
  const headers = new Map<string, SafetensorsHeader>();
  // Two names of one file (a link): its tensors would be "in both"; name both instead.
  const byInode = new Map<string, string>();
  for (const shard of shardNames) {
    const file = join(dir, shard);
    const info = await statOrNull(file);
    if (info === null || !info.isFile) {
      fail(
        "MISSING_SHARD",
        `${pathText(index)}: shard ${quoteName(shard)} ${
          info === null
            ? `is missing (${pathText(file)} not found)`
            : `is ${fileKind(info)}, expected a safetensors file`
        }`,
      );
    }
    const id = `${info.dev}:${info.ino}`;
    const twin = byInode.get(id);
    if (info.ino !== null && twin !== undefined) {
      fail(
        "DUPLICATE",
        `${pathText(index)}: shards ${quoteName(twin)} and ${quoteName(shard)} are the same file`,
      );
    }
    byInode.set(id, shard);
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
          `${pathText(index)}: tensor ${quoteName(name)} is in both ${quoteName(other)} and ${
            quoteName(shard)
          }`,
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
        `${pathText(headers.get(shard)!.file)}: tensor ${quoteName(name)} is not in ${
          pathText(index)
        }`,
      );
    }
    if (listed !== shard) {
      fail(
        "INDEX_MISMATCH",
        `${pathText(index)}: tensor ${quoteName(name)} is listed in ${
          quoteName(listed)
        } but found in ${quoteName(shard)}`,
      );
    }
  }
  for (const [name, shard] of weightMap) {
    if (!tensors.has(name)) {
      fail(
        "MISSING_TENSOR",
        `${pathText(index)}: tensor ${quoteName(name)} is listed in ${
          quoteName(shard)
        } but that shard does not hold it`,
      );
    }
  }
  const byPath = new Map<string, SafetensorsHeader>();
  for (const h of headers.values()) byPath.set(h.file, h);
  return makeCheckpoint(path, index, byPath, tensors);
}

/**
 * Opens and validates a checkpoint: a `.safetensors` file, a `model.safetensors.index.json`
 * file, or a directory holding either. A directory holding both is read from
 * `model.safetensors`, as Hugging Face `from_pretrained` does (the index is then
 * `unusedIndex`). Only regular files are opened (a FIFO or device is refused before it is
 * read). Every shard header is read and validated; throws CheckpointError `MISSING_SHARD`,
 * `MISSING_TENSOR`, `UNINDEXED_TENSOR`, `INDEX_MISMATCH`, `DUPLICATE`, `BAD_INDEX`,
 * `NO_CHECKPOINT`, `NOT_A_FILE` or any header error.
 */
export async function openCheckpoint(path: string): Promise<Checkpoint> {
  const info = await statOrNull(path);
  if (info === null) fail("NO_CHECKPOINT", `${pathText(path)}: no such file or directory`);
  if (info.isDirectory) {
    const index = join(path, INDEX_FILE);
    const single = join(path, SINGLE_FILE);
    const [indexInfo, singleInfo] = [await statOrNull(index), await statOrNull(single)];
    if (singleInfo?.isFile) {
      return await openSingle(path, single, indexInfo === null ? null : index);
    }
    if (indexInfo?.isFile) return await openSharded(path, index);
    const odd = singleInfo ?? indexInfo;
    if (odd !== null) {
      fail(
        "NOT_A_FILE",
        `${pathText(singleInfo ? single : index)}: is ${fileKind(odd)}, expected a file`,
      );
    }
    fail(
      "NO_CHECKPOINT",
      `${pathText(path)}: directory holds neither ${INDEX_FILE} nor ${SINGLE_FILE}`,
    );
  }
  if (!info.isFile) {
    fail(
      "NOT_A_FILE",
      `${pathText(path)}: is ${
        fileKind(info)
      }, expected a safetensors file, an index or a directory`,
    );
  }
  if (path.endsWith(".index.json")) return await openSharded(path, path);
  return await openSingle(path, path);
}

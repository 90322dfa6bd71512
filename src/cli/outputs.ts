/**
 * The CLI's output files (`--export`, `--json`), checked before the run starts so that a
 * failed run is never reported as a failed write, and written atomically.
 * @module
 */

import { checkWritable, writeFileAtomic } from "../checkpoint/atomic_write.ts";
import { statOrNull } from "../checkpoint/files.ts";
import { INDEX_FILE, openCheckpoint } from "../checkpoint/sharded.ts";
import { CheckpointError } from "../errors.ts";
import { pathText } from "../messages.ts";
import { readModelConfig } from "../models/config.ts";
import type { CliOptions } from "./args.ts";

function identity(info: Deno.FileInfo): string | null {
  return info.ino === null ? null : `${info.dev}:${info.ino}`;
}

// An absolute path with `.`, `..` and repeated slashes resolved (links are not followed:
// an existing file is compared by identity instead).
function absolute(path: string): string {
  const parts: string[] = [];
  for (const p of (path.startsWith("/") ? path : `${Deno.cwd()}/${path}`).split("/")) {
    if (p === "" || p === ".") continue;
    if (p === "..") parts.pop();
    else parts.push(p);
  }
  return `/${parts.join("/")}`;
}

/**
 * Checks the output paths before anything runs: each is writable (see `checkWritable`), the
 * two are not one file, and neither is one of the files the run reads (config.json, the
 * checkpoint files of --model and --weights). Returns the file the first load reads, in words
 * (a directory holding both model.safetensors and an index is read from model.safetensors).
 * Throws CheckpointError `BAD_OUTPUT`, or the config or checkpoint error found on the way.
 */
export async function checkOutputs(o: CliOptions, dir: string, weights: string): Promise<string> {
  // Config first: it is what the first load reads first, so its error is the first cause.
  await readModelConfig(dir);
  const model = await openCheckpoint(dir);
  const inputs = [`${dir.replace(/\/+$/, "")}/config.json`, ...model.files];
  if (model.index !== null) inputs.push(model.index);
  if (weights !== dir) {
    try {
      const w = await openCheckpoint(weights);
      inputs.push(...w.files);
      if (w.index !== null) inputs.push(w.index);
    } catch (e) {
      if (!(e instanceof CheckpointError)) throw e;
      // Its error belongs to the reload (after the first load, so --export shows the model
      // then); meanwhile every file it could name counts as read.
      inputs.push(weights);
      if ((await statOrNull(weights))?.isDirectory) {
        for (const entry of Deno.readDirSync(weights)) inputs.push(`${weights}/${entry.name}`);
      }
    }
  }
  const outputs: [string, string][] = [];
  if (o.export !== undefined) outputs.push(["--export", o.export]);
  if (o.json !== undefined) outputs.push(["--json", o.json]);
  for (const [flag, path] of outputs) await checkWritable(path, flag);
  if (outputs.length === 2) {
    const [a, b] = outputs.map(([, p]) => p);
    const [ia, ib] = [await statOrNull(a), await statOrNull(b)];
    const same = absolute(a) === absolute(b) ||
      (ia !== null && ib !== null && identity(ia) !== null && identity(ia) === identity(ib));
    if (same) {
      throw new CheckpointError("BAD_OUTPUT", `--export and --json name one file: ${pathText(a)}`);
    }
  }
  const read = new Map<string, string>();
  for (const p of inputs) {
    const info = await statOrNull(p);
    const id = info === null ? null : identity(info);
    if (id !== null) read.set(id, p);
  }
  for (const [flag, path] of outputs) {
    const info = await statOrNull(path);
    const id = info === null ? null : identity(info);
    const input = id === null ? undefined : read.get(id);
    if (input !== undefined) {
      throw new CheckpointError(
        "BAD_OUTPUT",
        `${flag} ${pathText(path)}: is a file this run reads${
          absolute(input) === absolute(path) ? "" : ` (${pathText(input)})`
        }; writing it would replace the checkpoint`,
      );
    }
  }
  const file = model.index ?? model.files[0];
  return model.unusedIndex === null
    ? file
    : `${file} (${INDEX_FILE} beside it not used: the single file wins, as in Hugging Face)`;
}

/** Writes the JSON report atomically. */
export async function writeJsonReport(path: string, report: unknown): Promise<void> {
  await writeFileAtomic(path, new TextEncoder().encode(JSON.stringify(report, null, 2) + "\n"));
}

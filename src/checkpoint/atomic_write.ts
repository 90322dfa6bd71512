/**
 * Output files written whole or not at all: bytes go to a temporary file beside the target
 * (same directory, so the rename cannot cross file systems), are flushed, and the temporary is
 * renamed over the target. A reader sees the old file or the new one, never a part. A SIGINT or
 * SIGTERM during the write removes the temporary file and ends the process as the signal would
 * have (exit status 128 + signal number).
 *
 * @example
 * ```ts
 * import { writeFileAtomic } from "./atomic_write.ts";
 * const dir = await Deno.makeTempDir();
 * await writeFileAtomic(`${dir}/report.json`, new TextEncoder().encode("{}\n"));
 * ```
 * @module
 */

import { CheckpointError } from "../errors.ts";
import { pathText } from "../messages.ts";

const SIGNALS: readonly [Deno.Signal, number][] = Deno.build.os === "windows"
  ? [["SIGINT", 2]]
  : [["SIGINT", 2], ["SIGTERM", 15]];

// Temporary files being written now; removed by the signal handlers.
const pending = new Set<string>();
let handlers: [Deno.Signal, () => void][] = [];

function removeQuietly(path: string): void {
  try {
    Deno.removeSync(path);
  } catch {
    // Already gone.
  }
}

function watchSignals(): void {
  if (handlers.length > 0) return;
  handlers = SIGNALS.map(([sig, no]) => {
    const h = () => {
      for (const p of pending) removeQuietly(p);
      Deno.exit(128 + no);
    };
    Deno.addSignalListener(sig, h);
    return [sig, h];
  });
}

function unwatchSignals(): void {
  if (pending.size > 0) return;
  for (const [sig, h] of handlers) Deno.removeSignalListener(sig, h);
  handlers = [];
}

/** The directory part of a path (`.` when it has none). */
function dirOf(path: string): string {
  const i = path.lastIndexOf("/");
  return i < 0 ? "." : i === 0 ? "/" : path.slice(0, i);
}

/** The name of a fresh temporary file beside `path`. */
export function tempPathFor(path: string): string {
  const i = path.lastIndexOf("/");
  const rand = crypto.getRandomValues(new Uint32Array(2)).join("");
  return `${path.slice(0, i + 1)}.${path.slice(i + 1)}.${Deno.pid}.${rand}.tmp`;
}

/**
 * Checks, before any work, that `path` can be written: its directory exists and takes a new
 * file (a temporary is created and removed), and `path` is not something other than a regular
 * file. Throws CheckpointError `BAD_OUTPUT` naming `flag` (e.g. `--export`) and the path.
 */
export async function checkWritable(path: string, flag: string): Promise<void> {
  const fail = (why: string): never => {
    throw new CheckpointError("BAD_OUTPUT", `${flag} ${pathText(path)}: ${why}`);
  };
  try {
    const info = await Deno.stat(path);
    if (!info.isFile) fail(info.isDirectory ? "is a directory" : "is not a regular file");
  } catch (e) {
    if (e instanceof CheckpointError) throw e;
    if (!(e instanceof Deno.errors.NotFound)) fail(`cannot be inspected (${(e as Error).name})`);
  }
  const dir = dirOf(path);
  try {
    const d = await Deno.stat(dir);
    if (!d.isDirectory) fail(`${pathText(dir)} is not a directory`);
  } catch (e) {
    if (e instanceof CheckpointError) throw e;
    fail(`directory ${pathText(dir)} does not exist`);
  }
  const tmp = tempPathFor(path);
  try {
    (await Deno.open(tmp, { write: true, createNew: true, mode: 0o600 })).close();
  } catch (e) {
    fail(`cannot create a file in ${pathText(dir)} (${(e as Error).name})`);
  }
  removeQuietly(tmp);
}

/**
 * Writes `data` to `path` atomically (see the module doc). On any failure the temporary file
 * is removed and the target is left as it was; the error is CheckpointError `WRITE_FAILED`
 * naming the path.
 */
export async function writeFileAtomic(
  path: string,
  data: Uint8Array | AsyncIterable<Uint8Array>,
): Promise<void> {
  const tmp = tempPathFor(path);
  pending.add(tmp);
  watchSignals();
  try {
    const f = await Deno.open(tmp, { write: true, createNew: true, mode: 0o644 });
    try {
      const chunks = data instanceof Uint8Array ? [data] : data;
      for await (const chunk of chunks) {
        let at = 0;
        while (at < chunk.byteLength) at += await f.write(chunk.subarray(at));
      }
      await f.syncData();
    } finally {
      f.close();
    }
    await Deno.rename(tmp, path);
  } catch (e) {
    removeQuietly(tmp);
    if (e instanceof CheckpointError) throw e;
    throw new CheckpointError(
      "WRITE_FAILED",
      `${pathText(path)}: could not be written (${(e as Error).name}: ${
        pathText((e as Error).message)
      })`,
    );
  } finally {
    pending.delete(tmp);
    unwatchSignals();
  }
}

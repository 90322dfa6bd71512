/**
 * Opening input files without trusting them: a path is checked to be a regular file before it
 * is opened (opening a FIFO for reading waits for a writer forever; a character device such as
 * `/dev/zero` never ends), the handle is checked to be the file that was checked, and every
 * read is bounded by a size known beforehand.
 *
 * @example
 * ```ts
 * import { readBoundedText } from "./files.ts";
 * // Refuses a FIFO, a device or a directory before reading, and anything over 1 MiB.
 * const text = await readBoundedText("/etc/hostname", 1 << 20, "BAD_CONFIG");
 * ```
 * @module
 */

import { CheckpointError, type CheckpointErrorCode } from "../errors.ts";
import { pathText } from "../messages.ts";

/** What a path is, in words, when it is not a regular file. */
export function fileKind(info: Deno.FileInfo): string {
  if (info.isFile) return "a file";
  if (info.isDirectory) return "a directory";
  if (info.isFifo) return "a FIFO (named pipe)";
  if (info.isCharDevice) return "a character device";
  if (info.isBlockDevice) return "a block device";
  if (info.isSocket) return "a socket";
  return "not a regular file";
}

/** `Deno.stat` (following links), or null when nothing is there. Other failures throw. */
export async function statOrNull(path: string): Promise<Deno.FileInfo | null> {
  try {
    return await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound || e instanceof Deno.errors.NotADirectory) return null;
    throw e;
  }
}

/**
 * Checks that `path` is a regular file; throws CheckpointError `code` naming it and what it is
 * instead (missing, a directory, a FIFO...). `what` says what the file was expected to be.
 */
export async function statRegularFile(
  path: string,
  code: CheckpointErrorCode,
  what = "a file",
): Promise<Deno.FileInfo> {
  let info: Deno.FileInfo | null;
  try {
    info = await statOrNull(path);
  } catch (e) {
    throw new CheckpointError(code, `${pathText(path)}: cannot be read (${(e as Error).name})`);
  }
  if (info === null) throw new CheckpointError(code, `${pathText(path)}: not found`);
  if (!info.isFile) {
    throw new CheckpointError(
      code,
      `${pathText(path)}: is ${fileKind(info)}, expected ${what}`,
    );
  }
  return info;
}

/**
 * Opens a regular file for reading after checking it is one, and checks that the opened handle
 * is that file (same device and inode), so a FIFO or device swapped in meanwhile is refused
 * before it is read. Returns the handle and the size it had.
 */
export async function openRegularFile(
  path: string,
  code: CheckpointErrorCode,
  what = "a file",
): Promise<{ file: Deno.FsFile; size: number }> {
  const before = await statRegularFile(path, code, what);
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (e) {
    throw new CheckpointError(code, `${pathText(path)}: cannot be opened (${(e as Error).name})`);
  }
  const after = await file.stat();
  if (!after.isFile || after.ino !== before.ino || after.dev !== before.dev) {
    file.close();
    throw new CheckpointError(code, `${pathText(path)}: changed while being opened`);
  }
  return { file, size: after.size };
}

/**
 * Reads a whole small file (config, index) as UTF-8 text, refusing anything that is not a
 * regular file or that is larger than `maxBytes`; the read stops at the size the file had when
 * opened, so a file that grows meanwhile cannot make it read more.
 */
export async function readBoundedText(
  path: string,
  maxBytes: number,
  code: CheckpointErrorCode,
  what = "a file",
): Promise<string> {
  const { file, size } = await openRegularFile(path, code, what);
  try {
    if (size > maxBytes) {
      throw new CheckpointError(
        code,
        `${pathText(path)}: is ${size} bytes, more than the ${maxBytes}-byte limit for ${what}`,
      );
    }
    const buf = new Uint8Array(size);
    let got = 0;
    while (got < size) {
      const r = await file.read(buf.subarray(got));
      if (r === null || r === 0) break;
      got += r;
    }
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(buf.subarray(0, got));
    } catch {
      throw new CheckpointError(code, `${pathText(path)}: is not UTF-8 text`);
    }
  } finally {
    file.close();
  }
}

/**
 * The two libc calls staged reads need: Deno gives no file descriptors, and `pread` in the CUDA
 * library needs one.
 * @module
 */

import { CheckpointError } from "../../errors.ts";

const O_RDONLY = 0;
// Linux's value on x86-64 and arm64. A FIFO swapped in for a shard since its header was read
// would block open() until a writer came; non-blocking, it opens at once and its first pread
// fails (a read error naming the file). Regular files ignore the flag.
const O_NONBLOCK = 0o4000;
let libc:
  | Deno.DynamicLibrary<{
    open: { parameters: ["buffer", "i32"]; result: "i32" };
    close: { parameters: ["i32"]; result: "i32" };
  }>
  | null
  | undefined;

function posix(): NonNullable<typeof libc> | null {
  if (libc !== undefined) return libc;
  if (Deno.build.os !== "linux") return libc = null;
  try {
    libc = Deno.dlopen("libc.so.6", {
      open: { parameters: ["buffer", "i32"], result: "i32" },
      close: { parameters: ["i32"], result: "i32" },
    });
  } catch {
    libc = null;
  }
  return libc;
}

/** Opens `path` read-only; CheckpointError `MISSING_SHARD` when it cannot. */
export function openFd(path: string): number {
  const fd = posix()!.symbols.open(
    new TextEncoder().encode(`${path}\0`),
    O_RDONLY | O_NONBLOCK,
  );
  if (fd < 0) {
    throw new CheckpointError("MISSING_SHARD", `${path}: cannot open for reading`);
  }
  return fd;
}

/** Whether libc could be loaded (Linux only). */
export function haveLibc(): boolean {
  return posix() !== null;
}

/** Closes a descriptor from {@link openFd}. */
export function closeFd(fd: number): void {
  posix()!.symbols.close(fd);
}

/**
 * Reader threads for file reads into shared memory (the WebAssembly backend's memory): a few
 * workers that read byte ranges of checkpoint files with synchronous `seek` + `read` on their
 * own handles (ARCHITECTURE.md, "Read paths").
 *
 * Why threads: Deno's asynchronous file reads go one operation at a time per handle (seek, then
 * read), and each next operation is started by the main thread's event loop, which a kernel
 * call holds for its whole duration; so reads queued ahead barely moved while the kernels ran,
 * and one handle's reads never went faster than one core copies. A reader thread goes through
 * its queue on its own, and several share a big read.
 *
 * Process-wide, started at the first read that can use them, unref'd while idle (they never
 * keep the process alive). `LAYERWISE_READ_THREADS` sets their number (0: none, reads stay on
 * the sources' own handles).
 * @module
 */

import { Worker } from "node:worker_threads";
import { CheckpointError } from "../errors.ts";
import { quoteName } from "../messages.ts";

/** A message to a reader thread. */
export type ReadRequest =
  | {
    kind: "read";
    /** Answered with this id. */
    id: number;
    /** The source the read is for (its handles are closed with it). */
    session: number;
    /** The file, with the device and inode it had when checked. */
    path: string;
    dev: number | null;
    ino: number | null;
    /** File offset of the first byte. */
    position: number;
    /**
     * Where the bytes go: `bytes` at `offset` of `buffer`, or of the buffer the thread was
     * last sent when null (posting a WebAssembly memory's buffer costs far more than a read's
     * other fields, so it is sent once, not with every read).
     */
    buffer: SharedArrayBuffer | null;
    offset: number;
    bytes: number;
  }
  | { kind: "close"; session: number };

/** A reader thread's answer: bytes read, or -1 when the read failed. */
export interface ReadReply {
  /** The request's id (-1: the thread is ready). */
  id: number;
  /** Bytes read; fewer than asked at the end of the file, -1 on any failure. */
  got: number;
}

/** A file as the reader threads open it: the path and the identity it was checked with. */
export interface ReadFile {
  /** Path of the file. */
  readonly path: string;
  /** Device of the file when checked (a thread refuses a file that is not this one). */
  readonly dev: number | null;
  /** Inode of the file when checked. */
  readonly ino: number | null;
}

/** Reads of at least this many bytes go to the threads; smaller ones are not worth a message. */
export const THREADED_READ_MIN_BYTES: number = 256 * 1024;

/**
 * A read is cut into one piece per thread, none smaller than this: each thread gets at most
 * one message per read (a message wakes a thread, which on a machine with few cores takes the
 * core from the main thread).
 */
export const READ_PIECE_BYTES: number = 1024 * 1024;

/**
 * Reader threads: `LAYERWISE_READ_THREADS`, else an eighth of the cores, from 2 to 4. Few: two
 * read faster than a single core copies out of the page cache, and every thread more competes
 * with the kernel threads (one per core by default) while both run.
 */
export function readThreadCount(): number {
  let v: string | undefined;
  try {
    v = Deno.env.get("LAYERWISE_READ_THREADS");
  } catch {
    // No env permission: the default.
  }
  if (v === undefined || v === "") {
    const cores = navigator.hardwareConcurrency || 1;
    return Math.min(4, Math.max(2, Math.ceil(cores / 8)));
  }
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 64) {
    throw new CheckpointError(
      "BAD_OPTION",
      `LAYERWISE_READ_THREADS must be a whole number of threads from 0 to 64, not ${
        quoteName(v, 40)
      }`,
    );
  }
  return n;
}

/** The reader threads of this process. */
export class ReadThreads {
  readonly #workers: Worker[];
  // The buffer each thread holds (it keeps the memory alive: dropped when a source closes).
  readonly #sent: (SharedArrayBuffer | null)[];
  readonly #waiting = new Map<number, (got: number) => void>();
  #next = 0;
  #turn = 0;
  #dead = false;

  private constructor(workers: Worker[]) {
    this.#workers = workers;
    this.#sent = workers.map(() => null);
    for (const w of workers) {
      w.on("message", (m: ReadReply) => {
        const done = this.#waiting.get(m.id);
        if (!done) return;
        this.#waiting.delete(m.id);
        if (this.#waiting.size === 0) { for (const x of this.#workers) x.unref(); }
        done(m.got);
      });
      // A thread that dies (it should not) must not leave reads waiting: they fail over to the
      // sources' own handles, and so do all later ones.
      w.on("exit", () => {
        this.#dead = true;
        const waiting = [...this.#waiting.values()];
        this.#waiting.clear();
        for (const x of this.#workers) x.unref();
        for (const done of waiting) done(-1);
      });
      w.unref();
    }
  }

  /** Starts `n` threads; null when they cannot start (reads then stay on the main thread). */
  static async start(n: number): Promise<ReadThreads | null> {
    const workers: Worker[] = [];
    try {
      await Promise.all(Array.from({ length: n }, () => {
        const w = new Worker(new URL("./read_worker.ts", import.meta.url));
        workers.push(w);
        return new Promise<void>((resolve, reject) => {
          w.once("message", () => resolve());
          w.once("error", reject);
        });
      }));
    } catch {
      for (const w of workers) w.terminate();
      return null;
    }
    for (const w of workers) w.removeAllListeners();
    return new ReadThreads(workers);
  }

  /** Threads in the pool. */
  get threads(): number {
    return this.#workers.length;
  }

  /**
   * Reads `dst.byteLength` bytes of `file` from `position` into `dst` (a view of a
   * SharedArrayBuffer), in pieces on the threads. True when every byte was read; false on a
   * short read or any failure, which the caller then reports through its own checked read.
   */
  async read(session: number, file: ReadFile, position: number, dst: Uint8Array): Promise<boolean> {
    if (this.#dead) return false;
    const buffer = dst.buffer as SharedArrayBuffer;
    const pieces = Math.max(
      1,
      Math.min(this.#workers.length, Math.floor(dst.byteLength / READ_PIECE_BYTES)),
    );
    const parts: Promise<boolean>[] = [];
    for (let i = 0; i < pieces; i++) {
      const a = Math.floor((dst.byteLength * i) / pieces);
      const b = Math.floor((dst.byteLength * (i + 1)) / pieces);
      const id = this.#next++;
      if (this.#waiting.size === 0) { for (const w of this.#workers) w.ref(); }
      parts.push(
        new Promise<number>((resolve) => this.#waiting.set(id, resolve)).then((got) =>
          got === b - a
        ),
      );
      const k = this.#turn++ % this.#workers.length;
      const fresh = this.#sent[k] !== buffer;
      this.#sent[k] = buffer;
      this.#workers[k].postMessage(
        {
          kind: "read",
          id,
          session,
          path: file.path,
          dev: file.dev,
          ino: file.ino,
          position: position + a,
          buffer: fresh ? buffer : null,
          offset: dst.byteOffset + a,
          bytes: b - a,
        } satisfies ReadRequest,
      );
    }
    return (await Promise.all(parts)).every((ok) => ok);
  }

  /** Closes the threads' handles of `session`; they drop the buffer they hold. */
  closeSession(session: number): void {
    this.#sent.fill(null);
    for (const w of this.#workers) w.postMessage({ kind: "close", session } satisfies ReadRequest);
  }
}

let started: Promise<ReadThreads | null> | undefined;
let ready: ReadThreads | null = null;
let sessions = 0;

/**
 * The process's reader threads, started at the first call (null when there are none: the
 * setting is 0, or they could not start).
 */
export function readThreads(): Promise<ReadThreads | null> {
  started ??= (async () => {
    const n = readThreadCount();
    ready = n > 0 ? await ReadThreads.start(n) : null;
    return ready;
  })();
  return started;
}

/** A new session id (one per file source). */
export function readSession(): number {
  return ++sessions;
}

/** Closes a session's handles in the threads, if they were started. */
export function closeReadSession(session: number): void {
  ready?.closeSession(session);
}

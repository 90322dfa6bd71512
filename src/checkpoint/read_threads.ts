/**
 * Reader threads for file reads into shared memory (the WebAssembly backend's memory): a few
 * workers that read byte ranges of checkpoint files with synchronous `seek` + `read` on their
 * own handles (ARCHITECTURE.md, "Read paths").
 *
 * Why threads: Deno's asynchronous file reads go one operation at a time per handle (seek, then
 * read), and each next operation is started by the main thread's event loop, which a kernel
 * call holds for its whole duration; so reads queued ahead barely moved while the kernels ran,
 * and one handle's reads never went faster than one core copies. A reader thread goes through
 * its queue on its own, and every thread sent a read takes its 1 MiB pieces from a shared claim
 * block as it is free, so the threads share a big read whichever of them is busy.
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
    /** The read's job: its slot in the claim block, named in the thread's answer. */
    job: number;
    /**
     * The job's generation in its slot: pieces are taken only under it (a guard; a slot is
     * reused only once every thread sent its job has left it).
     */
    generation: number;
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
    /** Bytes of each piece (the last may be shorter). */
    piece: number;
  }
  | {
    kind: "start";
    /** The claim block every thread shares (see {@link CLAIM}). */
    claims: SharedArrayBuffer;
  }
  | { kind: "close"; session: number };

/**
 * A reader thread's answer, sent only by the thread that finished a read's last piece (one
 * message per read, however many threads shared it).
 */
export interface ReadReply {
  /** The job (-1: the thread is ready). */
  job: number;
  /** The generation of the job. */
  generation: number;
  /** True when every piece of the job was read whole. */
  ok: boolean;
}

/**
 * Layout of one job's slot in the claim block, in 32-bit words. Threads take pieces of a read
 * by raising NEXT, so a busy or descheduled thread never holds up the others: whoever is free
 * reads the next piece.
 */
export const CLAIM = {
  /** Words per slot. */
  INTS: 8,
  /** Generation << 16 | index of the next piece to take (compare-exchanged as one word). */
  NEXT: 0,
  /** Pieces finished. */
  DONE: 1,
  /** Raised when a piece failed or came up short. */
  FAILED: 2,
  /** Pieces of the job. */
  PIECES: 3,
  /**
   * Threads sent the job that have not yet left it (each lowers it when it finds no piece
   * left); the slot is reused only at 0, so no thread can take a piece of the next job under
   * this one's fields.
   */
  MEMBERS: 4,
} as const;

/** Jobs in flight at most (a read finding no free slot is read on the source's own handle). */
export const JOB_SLOTS: number = 4096;
/** Most pieces of one job (the piece grows for reads larger than this many pieces). */
const MAX_PIECES = 0xFFFF;

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
 * Threads read in pieces of this many bytes, taken in file order by whichever thread is free:
 * a piece this size stays in the core's caches on its way (a read of 16 MiB at once went at
 * about half the rate of 1 MiB pieces), and many pieces share one read across every thread.
 */
export const READ_PIECE_BYTES: number = 1024 * 1024;

/**
 * Reader threads: `LAYERWISE_READ_THREADS`, else a quarter of the cores, from 2 to 8. They
 * take pieces as they are free, so one busy thread holds up nothing; but each one more competes
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
    return Math.min(8, Math.max(2, Math.ceil(cores / 4)));
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
  readonly #claims: Int32Array;
  // Reads not answered yet, by slot: what resolves each.
  readonly #jobs = new Map<number, (ok: boolean) => void>();
  readonly #generation: Uint16Array;
  readonly #slots: number;
  #cursor = 0;
  #turn = 0;
  #dead = false;

  private constructor(workers: Worker[], claims: SharedArrayBuffer, slots: number) {
    this.#slots = slots;
    this.#generation = new Uint16Array(slots);
    this.#workers = workers;
    this.#claims = new Int32Array(claims);
    this.#sent = workers.map(() => null);
    for (const w of workers) {
      w.on("message", (m: ReadReply) => {
        const done = this.#jobs.get(m.job);
        if (!done || this.#generation[m.job] !== m.generation) return;
        this.#jobs.delete(m.job);
        if (this.#jobs.size === 0) { for (const x of this.#workers) x.unref(); }
        done(m.ok);
      });
      // A thread that dies (it should not) must not leave reads waiting: they fail over to the
      // sources' own handles, and so do all later ones.
      w.on("exit", () => {
        this.#dead = true;
        const jobs = [...this.#jobs.values()];
        this.#jobs.clear();
        for (const x of this.#workers) x.unref();
        for (const done of jobs) done(false);
      });
      w.unref();
    }
  }

  /**
   * Starts `n` threads with room for `slots` reads in flight; null when they cannot start
   * (reads then stay on the main thread).
   */
  static async start(n: number, slots: number = JOB_SLOTS): Promise<ReadThreads | null> {
    const workers: Worker[] = [];
    const claims = new SharedArrayBuffer(slots * CLAIM.INTS * 4);
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
    for (const w of workers) {
      w.removeAllListeners();
      w.postMessage({ kind: "start", claims } satisfies ReadRequest);
    }
    return new ReadThreads(workers, claims, slots);
  }

  /** Threads in the pool. */
  get threads(): number {
    return this.#workers.length;
  }

  /**
   * Reads `dst.byteLength` bytes of `file` from `position` into `dst` (a view of a
   * SharedArrayBuffer), in pieces of {@link READ_PIECE_BYTES} that the threads take as they are
   * free. True when every byte was read; false on a short read or any failure, which the caller
   * then reports through its own checked read.
   */
  read(session: number, file: ReadFile, position: number, dst: Uint8Array): Promise<boolean> {
    const slot = this.#dead ? undefined : this.#freeSlot();
    if (slot === undefined) return Promise.resolve(false);
    const buffer = dst.buffer as SharedArrayBuffer;
    const piece = Math.max(READ_PIECE_BYTES, Math.ceil(dst.byteLength / MAX_PIECES));
    const pieces = Math.max(1, Math.ceil(dst.byteLength / piece));
    const generation = this.#generation[slot] = (this.#generation[slot] + 1) & 0x7FFF;
    const c = this.#claims, at = slot * CLAIM.INTS;
    Atomics.store(c, at + CLAIM.DONE, 0);
    Atomics.store(c, at + CLAIM.FAILED, 0);
    Atomics.store(c, at + CLAIM.PIECES, pieces);
    // One message to as many threads as there are pieces; each takes pieces until none is left.
    const members = Math.min(this.#workers.length, pieces);
    Atomics.store(c, at + CLAIM.MEMBERS, members);
    Atomics.store(c, at + CLAIM.NEXT, generation << 16);
    if (this.#jobs.size === 0) { for (const w of this.#workers) w.ref(); }
    const result = new Promise<boolean>((resolve) => this.#jobs.set(slot, resolve));
    for (let i = 0; i < members; i++) {
      const k = this.#turn++ % this.#workers.length;
      const fresh = this.#sent[k] !== buffer;
      this.#sent[k] = buffer;
      this.#workers[k].postMessage(
        {
          kind: "read",
          job: slot,
          generation,
          session,
          path: file.path,
          dev: file.dev,
          ino: file.ino,
          position,
          buffer: fresh ? buffer : null,
          offset: dst.byteOffset,
          bytes: dst.byteLength,
          piece,
        } satisfies ReadRequest,
      );
    }
    return result;
  }

  // A slot whose read is answered and that every thread sent it has left; undefined when all
  // are busy (the read then goes to the source's own handle).
  #freeSlot(): number | undefined {
    for (let i = 0; i < this.#slots; i++) {
      const slot = this.#cursor;
      this.#cursor = (this.#cursor + 1) % this.#slots;
      if (this.#jobs.has(slot)) continue;
      if (Atomics.load(this.#claims, slot * CLAIM.INTS + CLAIM.MEMBERS) === 0) return slot;
    }
    return undefined;
  }

  /** Ends the threads (a read waiting then fails over to the caller's own read). */
  async close(): Promise<void> {
    await Promise.all(this.#workers.map((w) => w.terminate()));
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

/**
 * A reader thread of src/checkpoint/read_threads.ts: it reads byte ranges of checkpoint files
 * into shared memory with synchronous `seek` + `read` on handles of its own, so reads go on
 * while the main thread runs kernels. It takes a read's pieces one at a time from the claim
 * block shared with the other threads, until none is left; the thread that finishes the last
 * piece answers for the read. A failed or short piece fails the whole read; the caller then reads it through its own checked
 * path, which reports the typed error. Started by the pool; not an API.
 * @module
 */

import { parentPort } from "node:worker_threads";
import { CLAIM, type ReadReply, type ReadRequest } from "./read_threads.ts";

// Handles by session (one per open source) and path; a session's are closed with it, so a
// replaced or deleted file is not kept open past its source.
const handles = new Map<number, Map<string, Deno.FsFile>>();
// The buffer reads go into when a request names none (see ReadRequest).
let buffer: SharedArrayBuffer | null = null;

function open(r: Extract<ReadRequest, { kind: "read" }>): Deno.FsFile {
  let files = handles.get(r.session);
  if (!files) handles.set(r.session, files = new Map());
  let f = files.get(r.path);
  if (f) return f;
  // The same checks as openRegularFile: a regular file before opening (a FIFO would block the
  // open forever), and after it the very file the main thread checked.
  const before = Deno.statSync(r.path);
  if (!before.isFile || before.dev !== r.dev || before.ino !== r.ino) throw new Error("changed");
  f = Deno.openSync(r.path, { read: true });
  const after = f.statSync();
  if (!after.isFile || after.dev !== r.dev || after.ino !== r.ino) {
    f.close();
    throw new Error("changed");
  }
  files.set(r.path, f);
  return f;
}

// The claim block (see CLAIM), sent once before any read.
let claims: Int32Array | null = null;

// Takes the next piece of a job: its index, or -1 when none is left (or the slot holds another
// job by now: this message came late).
function claim(at: number, generation: number): number {
  const c = claims!;
  for (;;) {
    const w = Atomics.load(c, at + CLAIM.NEXT);
    if (w >>> 16 !== generation) return -1;
    const k = w & 0xFFFF;
    if (k >= Atomics.load(c, at + CLAIM.PIECES)) return -1;
    if (Atomics.compareExchange(c, at + CLAIM.NEXT, w, w + 1) === w) return k;
  }
}

function readPiece(r: Extract<ReadRequest, { kind: "read" }>, k: number): boolean {
  try {
    const f = open(r);
    const a = k * r.piece, n = Math.min(r.piece, r.bytes - a);
    const dst = new Uint8Array(buffer!, r.offset + a, n);
    f.seekSync(r.position + a, Deno.SeekMode.Start);
    let got = 0;
    while (got < n) {
      const m = f.readSync(dst.subarray(got));
      if (m === null || m === 0) break;
      got += m;
    }
    return got === n;
  } catch {
    return false;
  }
}

parentPort!.on("message", (r: ReadRequest) => {
  if (r.kind === "start") {
    claims = new Int32Array(r.claims);
    return;
  }
  if (r.kind === "close") {
    for (const f of handles.get(r.session)?.values() ?? []) f.close();
    handles.delete(r.session);
    buffer = null;
    return;
  }
  if (r.buffer) buffer = r.buffer;
  const c = claims!, at = r.job * CLAIM.INTS;
  let last = false, ok = false;
  for (let k = claim(at, r.generation); k >= 0; k = claim(at, r.generation)) {
    // After a failure the rest is not worth reading: the caller reads the whole tensor again.
    if (Atomics.load(c, at + CLAIM.FAILED) !== 0 || !readPiece(r, k)) {
      Atomics.store(c, at + CLAIM.FAILED, 1);
    }
    if (Atomics.add(c, at + CLAIM.DONE, 1) + 1 === Atomics.load(c, at + CLAIM.PIECES)) {
      last = true;
      ok = Atomics.load(c, at + CLAIM.FAILED) === 0;
    }
  }
  // Left: the slot may now be reused (once every thread sent the job has left).
  Atomics.sub(c, at + CLAIM.MEMBERS, 1);
  if (last) {
    parentPort!.postMessage({ job: r.job, generation: r.generation, ok } satisfies ReadReply);
  }
});
parentPort!.postMessage({ job: -1, generation: 0, ok: false } satisfies ReadReply);

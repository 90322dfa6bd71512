/**
 * A reader thread of src/checkpoint/read_threads.ts: it reads byte ranges of checkpoint files
 * into shared memory with synchronous `seek` + `read` on handles of its own, so reads go on
 * while the main thread runs kernels. Any failure is answered with `got: -1`; the caller then
 * reads through its own checked path, which reports the typed error. Started by the pool; not
 * an API.
 * @module
 */

import { parentPort } from "node:worker_threads";
import type { ReadReply, ReadRequest } from "./read_threads.ts";

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

parentPort!.on("message", (r: ReadRequest) => {
  if (r.kind === "close") {
    for (const f of handles.get(r.session)?.values() ?? []) f.close();
    handles.delete(r.session);
    buffer = null;
    return;
  }
  if (r.buffer) buffer = r.buffer;
  let got = 0;
  try {
    const f = open(r);
    const dst = new Uint8Array(buffer!, r.offset, r.bytes);
    f.seekSync(r.position, Deno.SeekMode.Start);
    while (got < r.bytes) {
      const n = f.readSync(dst.subarray(got));
      if (n === null || n === 0) break;
      got += n;
    }
  } catch {
    got = -1;
  }
  parentPort!.postMessage({ id: r.id, got } satisfies ReadReply);
});
parentPort!.postMessage({ id: -1, got: 0 } satisfies ReadReply);

/**
 * A weight source fed by a request body holding a safetensors byte stream. The header comes
 * first, so every tensor is described (and can be validated against the model) before any
 * tensor byte is read. Tensors are then read in the order of the body, the only order a stream
 * allows: `plan` returns the body's order whatever order is asked for, and the engine takes
 * tensors in any order (a layer waits in model-format scratch until its last tensor arrives,
 * bounded by `maxBufferedBytes`), so nothing of the body is ever buffered here beyond the
 * chunk being copied. Big tensors are read as row chunks (`readRowsInto`) in increasing rows.
 * After the last tensor to be read, the rest of the body is drained and must end exactly where
 * the header says (no trailing bytes), still inside that last read, so that a bad ending fails
 * the update before it completes.
 * @module
 */

import { quoteName } from "../messages.ts";
import { CheckpointError } from "../errors.ts";
import {
  parseSafetensorsHeader,
  type SafetensorsHeader,
  safetensorsHeaderLength,
  type TensorEntry,
} from "../checkpoint/safetensors.ts";
import type { NamedTensor, TensorInfo, WeightSource } from "../checkpoint/source.ts";
import type { BodyReader } from "./body.ts";
import { serverError } from "./http_errors.ts";

/** A weight source over a streamed body; see the module doc. */
export interface StreamSource extends WeightSource {
  /** Total body size the header announces (8 + header + data). */
  readonly totalBytes: number;
  /**
   * Names the reload will read (validated, in plan order): after the last of them the rest of
   * the body is drained and its end checked. Without a call, the end is checked after the last
   * tensor of the body.
   */
  willRead(names: readonly string[]): void;
  /** Drains the rest of the body and checks that it ends where the header says. */
  finish(): Promise<void>;
}

/** Options of {@link openStreamSource}. */
export interface StreamSourceOptions {
  /** Name of the stream in messages (default `request body`). */
  description?: string;
  /** Largest body accepted: a header announcing more is ServerError `BODY_TOO_LARGE`. */
  maxBytes: number;
  /** The body's Content-Length when the client sent one; it must match the header. */
  contentLength?: number;
}

// The size a header announces: 8 + N + the largest data end. A header the strict parser would
// refuse gives 8 + N; the parser then says what is wrong with it.
function announcedSize(prefix: Uint8Array, n: number): number {
  try {
    const h = JSON.parse(new TextDecoder().decode(prefix.subarray(8, 8 + n)));
    let end = 0;
    for (const [k, v] of Object.entries(h ?? {})) {
      if (k === "__metadata__") continue;
      const off = (v as { data_offsets?: unknown })?.data_offsets;
      if (Array.isArray(off) && Number.isSafeInteger(off[1])) end = Math.max(end, off[1]);
    }
    return 8 + n + end;
  } catch {
    return 8 + n;
  }
}

function malformed(e: unknown): never {
  // A malformed body is a bad request (400), not weights that do not fit the model (422).
  if (e instanceof CheckpointError) throw serverError(e.code, e.message, 400);
  throw e;
}

/**
 * Reads and validates the safetensors header at the start of `body` and returns the source
 * that reads the tensors from the rest. Throws ServerError (400) for a malformed header, with
 * the CheckpointError's code; `BODY_TOO_LARGE` (413) when the announced size passes
 * `maxBytes`; `LENGTH_MISMATCH` when Content-Length disagrees with the header.
 */
export async function openStreamSource(
  body: BodyReader,
  options: StreamSourceOptions,
): Promise<StreamSource> {
  const where = options.description ?? "request body";
  const head = new Uint8Array(8);
  await body.readExactly(head, "the safetensors header length");
  let n = 0;
  try {
    n = safetensorsHeaderLength(head, Number.MAX_SAFE_INTEGER, where);
  } catch (e) {
    malformed(e);
  }
  if (8 + n > options.maxBytes) {
    throw serverError(
      "BODY_TOO_LARGE",
      `${where}: header of ${n} bytes passes the body limit of ${options.maxBytes} bytes`,
    );
  }
  const prefix = new Uint8Array(8 + n);
  prefix.set(head);
  await body.readExactly(prefix.subarray(8), "the safetensors header");
  const total = announcedSize(prefix, n);
  if (total > options.maxBytes) {
    throw serverError(
      "BODY_TOO_LARGE",
      `${where}: the header announces ${total} bytes, over the body limit of ${options.maxBytes} bytes (--max-body-bytes)`,
    );
  }
  if (options.contentLength !== undefined && options.contentLength !== total) {
    throw serverError(
      "LENGTH_MISMATCH",
      `${where}: Content-Length is ${options.contentLength} but the safetensors header describes ${total} bytes`,
    );
  }
  let header: SafetensorsHeader;
  try {
    header = parseSafetensorsHeader(prefix, total, where);
  } catch (e) {
    malformed(e);
  }
  return streamSource(body, header, total, where);
}

function streamSource(
  body: BodyReader,
  header: SafetensorsHeader,
  total: number,
  where: string,
): StreamSource {
  const entries = [...header.tensors.values()].sort((a, b) => a.begin - b.begin);
  const infos = new Map<string, TensorInfo>();
  for (const e of entries) {
    infos.set(e.name, {
      name: e.name,
      dtype: e.dtype,
      shape: e.shape,
      bytes: e.end - e.begin,
      origin: where,
    });
  }
  // Body offset after which the rest is drained (the end of the last tensor to be read).
  let lastEnd = entries.length > 0 ? entries[entries.length - 1].end : header.dataStart;
  let finished = false;
  const entryOf = (name: string): TensorEntry => {
    const e = header.tensors.get(name);
    if (e === undefined) {
      throw new CheckpointError("UNKNOWN_TENSOR", `${where}: no tensor ${quoteName(name)}`);
    }
    return e;
  };
  const finish = async (): Promise<void> => {
    if (finished) return;
    finished = true;
    if (body.position < total) await body.skip(total - body.position, "the end of the body");
    if (!(await body.atEnd())) {
      body.cancel();
      throw serverError(
        "TRAILING_BYTES",
        `${where}: the body goes on past the ${total} bytes its safetensors header describes`,
      );
    }
  };
  // Reads body bytes [begin, end) of tensor `e` into dst.
  const readRange = async (e: TensorEntry, begin: number, end: number, dst: Uint8Array) => {
    if (dst.byteLength !== end - begin) {
      throw new CheckpointError(
        "BAD_DESTINATION",
        `${where}: ${end - begin} bytes of tensor ${
          quoteName(e.name)
        } asked for, destination holds ${dst.byteLength}`,
      );
    }
    if (begin < body.position) {
      throw new CheckpointError(
        "OUT_OF_ORDER",
        `${where}: tensor ${
          quoteName(e.name)
        } (bytes ${begin}-${end}) was asked for after the body passed byte ${body.position}; a streamed body is read in its own order`,
      );
    }
    const what = `tensor ${quoteName(e.name)}`;
    await body.skip(begin - body.position, `the bytes before ${what}`);
    await body.readExactly(dst, what);
    if (end >= lastEnd) await finish();
  };
  // Reads may be asked for concurrently (a reader reads ahead) but the body is one sequence:
  // each read runs after the one asked for before it, and after a failure every later read
  // fails with the same error.
  let tail: Promise<void> = Promise.resolve();
  let failure: unknown = null;
  const inTurn = (read: () => Promise<void>): Promise<void> => {
    const run = async () => {
      if (failure !== null) throw failure;
      try {
        await read();
      } catch (e) {
        failure ??= e;
        throw e;
      }
    };
    const p = tail.then(run, run);
    tail = p.catch(() => {});
    return p;
  };
  const source: StreamSource = {
    description: where,
    tensors: infos,
    totalBytes: total,
    plan: () => entries.map((e) => e.name),
    willRead: (names) => {
      lastEnd = header.dataStart;
      for (const n of names) lastEnd = Math.max(lastEnd, entryOf(n).end);
    },
    finish: () => inTurn(finish),
    readInto: (name, dst) => {
      const e = entryOf(name);
      return inTurn(() => readRange(e, e.begin, e.end, dst));
    },
    readRowsInto: (name, start, end, dst) => {
      const e = entryOf(name);
      const rows = e.shape.length > 0 ? e.shape[0] : 0;
      if (
        e.shape.length === 0 || !Number.isSafeInteger(start) || !Number.isSafeInteger(end) ||
        start < 0 || end < start || end > rows
      ) {
        throw new CheckpointError(
          "BAD_ROWS",
          `${where}: tensor ${
            quoteName(name)
          } of shape [${e.shape}] has no rows [${start}, ${end})`,
        );
      }
      const rowBytes = rows === 0 ? 0 : (e.end - e.begin) / rows;
      return inTurn(() => readRange(e, e.begin + start * rowBytes, e.begin + end * rowBytes, dst));
    },
    close: () => body.cancel(),
    [Symbol.asyncIterator]: async function* (): AsyncGenerator<NamedTensor> {
      for (const e of entries) {
        const data = new Uint8Array(e.end - e.begin);
        await source.readInto(e.name, data);
        yield { name: e.name, tensor: { dtype: e.dtype, shape: [...e.shape], data } };
      }
    },
  };
  return source;
}

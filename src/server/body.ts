/**
 * Reading request bodies under limits: at most `maxBytes` in all (413 past it), no wait for the
 * next piece longer than `idleMs` (408), and an abort signal (the server stopping). A client
 * that disconnects or a body that ends early is a typed error naming what was being read.
 * Bytes are copied from the body's own chunks straight into the caller's buffer: nothing is
 * held beyond the chunk being read.
 * @module
 */

import { ServerError, serverError } from "./http_errors.ts";

/** Limits of one body. */
export interface BodyLimits {
  /** Most bytes the body may have. */
  readonly maxBytes: number;
  /** Longest wait for the next chunk, in milliseconds. */
  readonly idleMs: number;
  /** Aborts reading (ServerError `SHUTTING_DOWN`). */
  readonly signal?: AbortSignal;
}

const EMPTY = new Uint8Array(0);

/** A request body read piece by piece under {@link BodyLimits}. */
export class BodyReader {
  readonly #reader: ReadableStreamDefaultReader<Uint8Array> | null;
  readonly #limits: BodyLimits;
  #chunk: Uint8Array = EMPTY;
  #ended = false;
  /** Bytes handed out or skipped so far. */
  position = 0;
  /** Bytes received from the client so far. */
  received = 0;

  /** Reads `body` (null: an empty body). */
  constructor(body: ReadableStream<Uint8Array> | null, limits: BodyLimits) {
    this.#reader = body?.getReader() ?? null;
    this.#limits = limits;
  }

  async #next(): Promise<boolean> {
    if (this.#ended || this.#reader === null) return false;
    const { signal, idleMs, maxBytes } = this.#limits;
    if (signal?.aborted) {
      this.cancel();
      throw serverError("SHUTTING_DOWN", "the server is stopping; the body was not read");
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    let onAbort: (() => void) | undefined;
    const stop = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            serverError(
              "IDLE_TIMEOUT",
              `no body bytes for ${idleMs} ms after ${this.received} bytes; the update was abandoned`,
            ),
          ),
        idleMs,
      );
      onAbort = () =>
        reject(serverError("SHUTTING_DOWN", "the server is stopping; the update was abandoned"));
      signal?.addEventListener("abort", onAbort, { once: true });
    });
    try {
      const r = await Promise.race([this.#reader.read(), stop]);
      if (r.done) {
        this.#ended = true;
        return false;
      }
      this.received += r.value.byteLength;
      if (this.received > maxBytes) {
        throw serverError(
          "BODY_TOO_LARGE",
          `the body passed the limit of ${maxBytes} bytes (--max-body-bytes)`,
        );
      }
      this.#chunk = r.value;
      return true;
    } catch (e) {
      this.cancel();
      if (e instanceof ServerError) throw e;
      throw serverError(
        "DISCONNECTED",
        `the body broke off after ${this.received} bytes (${
          e instanceof Error ? e.message.split("\n")[0] : e
        })`,
      );
    } finally {
      clearTimeout(timer);
      if (onAbort) signal?.removeEventListener("abort", onAbort);
    }
  }

  /** Fills as much of `dst` as the body has; returns the bytes written. */
  async read(dst: Uint8Array): Promise<number> {
    let got = 0;
    while (got < dst.byteLength) {
      if (this.#chunk.byteLength === 0 && !(await this.#next())) break;
      const n = Math.min(this.#chunk.byteLength, dst.byteLength - got);
      dst.set(this.#chunk.subarray(0, n), got);
      this.#chunk = this.#chunk.subarray(n);
      got += n;
    }
    this.position += got;
    return got;
  }

  /**
   * Fills `dst` exactly, else throws ServerError `TRUNCATED_BODY` saying that the body ended
   * early while reading `what`.
   */
  async readExactly(dst: Uint8Array, what: string): Promise<void> {
    const at = this.position;
    const got = await this.read(dst);
    if (got < dst.byteLength) throw this.#short(what, at, dst.byteLength, got);
  }

  /** Discards `n` bytes (throws as {@link readExactly} when fewer come). */
  async skip(n: number, what: string): Promise<void> {
    const at = this.position;
    let left = n;
    while (left > 0) {
      if (this.#chunk.byteLength === 0 && !(await this.#next())) {
        this.position += n - left;
        throw this.#short(what, at, n, n - left);
      }
      const k = Math.min(left, this.#chunk.byteLength);
      this.#chunk = this.#chunk.subarray(k);
      left -= k;
    }
    this.position += n;
  }

  /** Whether the body has no byte left (reads ahead by one chunk to know). */
  async atEnd(): Promise<boolean> {
    return this.#chunk.byteLength === 0 && !(await this.#next());
  }

  /** Reads the whole rest of the body (for small JSON bodies). */
  async readAll(): Promise<Uint8Array> {
    const parts: Uint8Array[] = [];
    let n = 0;
    while (this.#chunk.byteLength > 0 || await this.#next()) {
      parts.push(this.#chunk);
      n += this.#chunk.byteLength;
      this.#chunk = EMPTY;
    }
    const out = new Uint8Array(n);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.byteLength;
    }
    this.position += n;
    return out;
  }

  /** Stops reading; the rest of the body is dropped. */
  cancel(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#chunk = EMPTY;
    this.#reader?.cancel().catch(() => {});
  }

  #short(what: string, at: number, want: number, got: number) {
    return serverError(
      "TRUNCATED_BODY",
      `the body ended at byte ${at + got} while reading ${what} (bytes ${at}-${
        at + want
      } expected)`,
    );
  }
}

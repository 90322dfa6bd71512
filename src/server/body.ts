/**
 * Reading request bodies under limits: at most `maxBytes` in all (413 past it), no wait for the
 * next piece longer than `idleMs` (408), and an abort signal (the server stopping). A client
 * that disconnects or a body that ends early is a typed error naming what was being read.
 * Bytes are copied from the body's own chunks straight into the caller's buffer: nothing is
 * held beyond the chunk being read.
 * @module
 */

import { serverError } from "./http_errors.ts";

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

  // One watchdog timer per body rather than one per chunk (a body is tens of thousands of
  // 64 KiB chunks): it fires at most every `idleMs` and fails the read pending that long.
  #pendingSince: number | null = null;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #failure: Error | null = null;
  #onAbort = (): void =>
    this.#fail(serverError("SHUTTING_DOWN", "the server is stopping; the update was abandoned"));

  #fail(e: Error): void {
    this.#failure ??= e;
    this.#reader?.cancel().catch(() => {});
  }

  #watch(): void {
    if (this.#timer !== undefined || this.#ended) return;
    const { idleMs } = this.#limits;
    const check = () => {
      this.#timer = undefined;
      if (this.#ended) return;
      const waited = this.#pendingSince === null ? 0 : performance.now() - this.#pendingSince;
      if (waited >= idleMs) {
        this.#fail(
          serverError(
            "IDLE_TIMEOUT",
            `no body bytes for ${idleMs} ms after ${this.received} bytes; the update was abandoned`,
          ),
        );
        return;
      }
      this.#timer = setTimeout(check, idleMs - waited);
    };
    this.#timer = setTimeout(check, idleMs);
  }

  #stopWatching(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#limits.signal?.removeEventListener("abort", this.#onAbort);
  }

  async #next(): Promise<boolean> {
    if (this.#ended || this.#reader === null) return false;
    const { signal, maxBytes } = this.#limits;
    if (this.#failure === null && signal?.aborted) this.#onAbort();
    if (this.#failure !== null) {
      this.cancel();
      throw this.#failure;
    }
    if (this.#timer === undefined) {
      signal?.addEventListener("abort", this.#onAbort, { once: true });
      this.#watch();
    }
    this.#pendingSince = performance.now();
    let r: ReadableStreamReadResult<Uint8Array>;
    try {
      r = await this.#reader.read();
    } catch (e) {
      const failure = this.#failure ?? serverError(
        "DISCONNECTED",
        `the body broke off after ${this.received} bytes (${
          e instanceof Error ? e.message.split("\n")[0] : e
        })`,
      );
      this.cancel();
      throw failure;
    } finally {
      this.#pendingSince = null;
    }
    if (this.#failure !== null) {
      this.cancel();
      throw this.#failure;
    }
    if (r.done) {
      this.#ended = true;
      this.#stopWatching();
      return false;
    }
    this.received += r.value.byteLength;
    if (this.received > maxBytes) {
      this.cancel();
      throw serverError(
        "BODY_TOO_LARGE",
        `the body passed the limit of ${maxBytes} bytes (--max-body-bytes)`,
      );
    }
    this.#chunk = r.value;
    return true;
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
    this.#stopWatching();
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

/**
 * Answers kept by idempotency key: a POST that carries `Idempotency-Key` is run once, and the
 * same key on the same path gets the first run's answer again (waiting for it if it still runs)
 * instead of a second run. A client that sent an update and lost the connection before the reply
 * can send it again without the update being applied twice (ARCHITECTURE.md, "Read paths",
 * resent requests).
 * @module
 */

import { serverError } from "./http_errors.ts";

/** The request header that names a request for replay. */
export const IDEMPOTENCY_HEADER = "idempotency-key";

/** The header set on an answer given again from the cache. */
export const REPLAYED_HEADER = "layerwise-replayed";

/** Keys kept by default: a client resends only its latest request. */
export const REPLAY_KEEP = 64;

// Opaque tokens (a UUID, a hex digest) of a sane length; anything else is refused.
const KEY = /^[A-Za-z0-9._:-]{8,128}$/;

interface Kept {
  readonly status: number;
  readonly headers: [string, string][];
  readonly body: Uint8Array<ArrayBuffer>;
}

/** The answers of the last {@link REPLAY_KEEP} keyed requests (per server). */
export class ReplayCache {
  readonly #keep: number;
  // Insertion order is age order: the oldest entry is the first.
  readonly #answers = new Map<string, Promise<Kept>>();

  /** Keeps the answers of the last `keep` keys. */
  constructor(keep: number = REPLAY_KEEP) {
    this.#keep = keep;
  }

  /**
   * The answer for `req`: `run()`'s, kept under the request's key, or the kept one when the
   * key was seen on the same path. Requests without the header just run. Throws ServerError
   * `BAD_IDEMPOTENCY_KEY` for a malformed key, before anything runs.
   */
  async answer(req: Request, path: string, run: () => Promise<Response>): Promise<Response> {
    const key = req.headers.get(IDEMPOTENCY_HEADER);
    if (key === null) return await run();
    if (!KEY.test(key)) {
      throw serverError(
        "BAD_IDEMPOTENCY_KEY",
        `${IDEMPOTENCY_HEADER}: expected 8 to 128 characters of A-Z a-z 0-9 . _ : -`,
      );
    }
    const id = `${path} ${key}`;
    const seen = this.#answers.get(id);
    if (seen !== undefined) return replay(await seen, true);
    const kept = run().then(keep);
    this.#answers.set(id, kept);
    while (this.#answers.size > this.#keep) {
      this.#answers.delete(this.#answers.keys().next().value!);
    }
    return replay(await kept, false);
  }
}

async function keep(r: Response): Promise<Kept> {
  return {
    status: r.status,
    headers: [...r.headers],
    body: new Uint8Array(await r.arrayBuffer()),
  };
}

function replay(k: Kept, again: boolean): Response {
  const headers = new Headers(k.headers);
  if (again) headers.set(REPLAYED_HEADER, "1");
  return new Response(k.body.length === 0 ? null : k.body.slice(), {
    status: k.status,
    headers,
  });
}

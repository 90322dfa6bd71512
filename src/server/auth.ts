/**
 * The bearer token: read from a file once at start, compared in constant time (both sides are
 * hashed to 32 bytes first, so neither the content nor the length leaks through timing).
 * @module
 */

import { createHash, timingSafeEqual } from "node:crypto";
import { serverError } from "./http_errors.ts";

/** Shortest token accepted: a guessable token on a network port is no protection. */
export const MIN_TOKEN_LENGTH = 16;

/**
 * Reads the token from `path` (surrounding whitespace removed). Throws when the file cannot be
 * read, or the token is shorter than {@link MIN_TOKEN_LENGTH} or holds whitespace.
 */
export async function readTokenFile(path: string): Promise<string> {
  const token = (await Deno.readTextFile(path)).trim();
  if (token.length < MIN_TOKEN_LENGTH || /\s/.test(token)) {
    throw serverError(
      "BAD_TOKEN_FILE",
      `${path}: the token must be one word of at least ${MIN_TOKEN_LENGTH} characters`,
    );
  }
  return token;
}

function digest(s: string): Uint8Array {
  return createHash("sha256").update(s).digest();
}

/** A checker of `Authorization: Bearer <token>` headers for one token. */
export class BearerAuth {
  readonly #want: Uint8Array;

  /** Keeps the token's digest only. */
  constructor(token: string) {
    this.#want = digest(token);
  }

  /** Whether the request carries the token (compared in constant time). */
  accepts(req: Request): boolean {
    const header = req.headers.get("authorization") ?? "";
    const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
    // Compare even without a header, so a missing one takes the same time as a wrong one.
    return timingSafeEqual(digest(m?.[1] ?? ""), this.#want) && m !== null;
  }

  /** Throws ServerError `UNAUTHORIZED` (401) unless the request carries the token. */
  check(req: Request): void {
    if (!this.accepts(req)) {
      throw serverError(
        "UNAUTHORIZED",
        "missing or wrong bearer token (Authorization: Bearer ...)",
      );
    }
  }
}

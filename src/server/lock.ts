/**
 * One update at a time: an update (or an export, which must not read half-written layers)
 * takes the lock for its whole duration; a second one gets ServerError `UPDATE_RUNNING` (409)
 * carrying the running one's id.
 * @module
 */

import { serverError } from "./http_errors.ts";

/** The update holding the lock. */
export interface RunningUpdate {
  /** Its id (`u1`, `u2`, ...), in answers, progress lines and 409 errors. */
  readonly id: string;
  /** `disk`, `stream`, `ipc` or `export`. */
  readonly path: string;
  /** When it began (ms since the epoch). */
  readonly since: number;
}

/** The lock; see the module doc. */
export class UpdateLock {
  #running: RunningUpdate | null = null;
  #count = 0;
  #waiters: (() => void)[] = [];

  /** The update holding the lock, if any. */
  get running(): RunningUpdate | null {
    return this.#running;
  }

  /** Takes the lock for `path`, or throws ServerError `UPDATE_RUNNING` (409). */
  acquire(path: string): RunningUpdate {
    const r = this.#running;
    if (r !== null) {
      throw serverError(
        "UPDATE_RUNNING",
        `update ${r.id} (${r.path}) is running since ${
          new Date(r.since).toISOString()
        }; one update at a time`,
        409,
        { running: r.id },
      );
    }
    this.#running = { id: `u${++this.#count}`, path, since: Date.now() };
    return this.#running;
  }

  /** Gives the lock back (only its holder may). */
  release(held: RunningUpdate): void {
    if (this.#running !== held) return;
    this.#running = null;
    for (const w of this.#waiters.splice(0)) w();
  }

  /** Resolves once no update holds the lock. */
  idle(): Promise<void> {
    if (this.#running === null) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push(resolve));
  }
}

/**
 * Which rows of each load target (slot, shard, expert) arrived, so that a load sent twice is
 * ignored whether it came whole or as row chunks (see `rowWindow`): a load whose rows all came
 * already is a duplicate, one that overlaps rows that came only in part is an error.
 * @module
 */

import { CheckpointError } from "../errors.ts";
import type { Tensor } from "../tensor/tensor.ts";

/** The rows received per load target. */
export class RowLedger {
  readonly #ranges = new Map<string, [number, number][]>();

  /**
   * Whether the rows of `loaded` for target `key` all arrived already (true: ignore the load).
   * Throws CheckpointError `OVERLAPPING_ROWS` when some of them arrived and others did not;
   * `where` names the load.
   */
  seen(key: string, loaded: Tensor, where: string): boolean {
    const { start, end } = loaded.rowRange;
    const got = this.#ranges.get(key);
    if (!got) return false;
    let covered = 0;
    for (const [s, e] of got) covered += Math.max(0, Math.min(e, end) - Math.max(s, start));
    if (covered === 0 && end > start) return false;
    if (covered >= end - start) return true;
    throw new CheckpointError(
      "OVERLAPPING_ROWS",
      `${where}: rows [${start}, ${end}) overlap rows loaded already (${
        describe(got)
      }); send each row once`,
    );
  }

  /** Records that the rows of `loaded` for target `key` arrived. */
  add(key: string, loaded: Tensor): void {
    const { start, end } = loaded.rowRange;
    const got = this.#ranges.get(key) ?? [];
    got.push([start, end]);
    this.#ranges.set(key, got);
  }
}

function describe(ranges: [number, number][]): string {
  const list = ranges.slice(0, 4).map(([s, e]) => `[${s}, ${e})`).join(", ");
  return ranges.length > 4 ? `${list}, ...` : list;
}

/** A label for progress and gap messages: the shard (and expert), and the rows of a window. */
export function loadLabel(
  loaded: Tensor,
  shardId: string | number | undefined,
  expertId: number | undefined,
): string | null {
  const w = loaded.window;
  const shard = shardId === undefined
    ? ""
    : expertId === undefined
    ? `${shardId}`
    : `${shardId}@${expertId}`;
  if (!w) return shardId === undefined ? null : shard;
  return `${shard}${shard === "" ? "" : " "}rows ${w.start}-${w.end}`;
}

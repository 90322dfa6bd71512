/**
 * planStaging, the pure step of a staged read (ARCHITECTURE.md, "Read paths"): big tensors cut
 * into row chunks that fit half the device ring, a 1-D tensor too big for the ring on a block of
 * its own, and no tensor copied into a ring place before every tensor it overwrites is done.
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  planStaging,
  type StagedTensor,
  STAGING_DEFAULTS,
  type StagingOptions,
} from "../src/backend/cuda/staging_plan.ts";

const KiB = 1024;

function options(o: StagingOptions): Required<StagingOptions> {
  return { ...STAGING_DEFAULTS, ...o };
}

Deno.test("planStaging: chunks, a dedicated block, and waits before places are reused", () => {
  const shapes = new Map<string, number[]>([
    ["small", [4, 64]], // 256 B
    ["big", [64, 64]], // 4 KiB: cut into chunks of at most half the 4 KiB ring
    ["flat", [4096]], // 4 KiB, 1-D: cannot be cut, gets a block of its own
  ]);
  const located: StagedTensor[] = [
    { name: "small", file: 0, offset: 0, bytes: 256 },
    { name: "big", file: 0, offset: 256, bytes: 4 * KiB },
    { name: "flat", file: 1, offset: 0, bytes: 4 * KiB },
  ];
  const p = planStaging(
    located,
    (n) => shapes.get(n)!,
    options({ deviceRingBytes: 4 * KiB, slotBytes: 1 * KiB, chunkBytes: 512 }),
  );
  assert.deepEqual(
    p.tensors.map((t) => [t.name, t.bytes, t.rows ? [t.rows.start, t.rows.end] : null]),
    [
      ["small", 256, null],
      ["big", 2048, [0, 32]],
      ["big", 2048, [32, 64]],
      ["flat", 4096, null],
    ],
  );
  assert.ok(p.ringBytes <= 4 * KiB);
  assert.equal(p.ringOffsets[3], -1, "the 1-D tensor has a block of its own");
  assert.ok(p.ringOffsets.slice(0, 3).every((o) => o >= 0));
  // Every byte of the read order is in exactly one piece of one block.
  const pieceBytes = p.blocks.flatMap((b) => b.pieces).reduce((n, x) => n + x.bytes, 0);
  assert.equal(pieceBytes, 256 + 8 * KiB);
  assert.ok(p.blocks.every((b) => b.reads.every((r) => r.bytes <= 512)));
});

Deno.test("planStaging: a ring place is reused only after its last holder is done", () => {
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 30 }),
      fc.integer({ min: 2, max: 64 }),
      (rows, ringKiB) => {
        const located = rows.map((r, i) => ({
          name: `t${i}`,
          file: 0,
          offset: 0,
          bytes: r * 256,
        }));
        const p = planStaging(
          located,
          (n) => [rows[Number(n.slice(1))], 64],
          options({ deviceRingBytes: ringKiB * KiB, slotBytes: 2 * KiB, chunkBytes: KiB }),
        );
        assert.ok(p.ringBytes <= ringKiB * KiB);
        // The copy thread copies in read order, so tensor j is copied only after every earlier
        // tensor's wait is over: what counts is the largest wait up to j.
        let waited = 0n;
        for (let j = 0; j < p.tensors.length; j++) {
          const oj = p.ringOffsets[j];
          if (p.waitFor[j] > waited) waited = p.waitFor[j];
          assert.ok(oj >= 0, "2-D tensors are chunked to fit the ring");
          assert.ok(oj + p.tensors[j].bytes <= p.ringBytes, "inside the ring");
          for (let i = 0; i < j; i++) {
            const oi = p.ringOffsets[i];
            const overlap = oi < oj + p.tensors[j].bytes && oj < oi + p.tensors[i].bytes;
            // Overlapping an earlier tensor's place: wait until it (and all before it) is done.
            if (overlap) assert.ok(waited >= BigInt(i + 1), `${j} waits for ${i}`);
          }
          assert.ok(p.waitFor[j] <= BigInt(j), "never waits for itself or a later tensor");
        }
      },
    ),
  );
});

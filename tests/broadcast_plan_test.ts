/**
 * planBuckets, the pure step of a broadcast reload: tensors in read order, each at an aligned
 * offset, in buckets no larger than asked unless one tensor is larger on its own. Runs anywhere
 * (the broadcast itself needs GPUs: tests/nccl_test.ts).
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import { planBuckets } from "../src/parallel/broadcast.ts";

Deno.test("planBuckets: aligned offsets, read order kept, a big tensor widens the blocks", () => {
  const sizes = new Map([["a", 100], ["b", 300], ["c", 50], ["d", 2000], ["e", 10]]);
  const p = planBuckets([...sizes.keys()], (n) => sizes.get(n)!, 1024);
  assert.equal(p.bucketBytes, 2048, "d (2000 B, aligned to 2048) is larger than the 1024 asked");
  assert.equal(p.bytes, 2460);
  assert.deepEqual(p.buckets.map((b) => [b.names, b.offsets, b.bytes]), [
    [["a", "b", "c"], [0, 256, 768], 818],
    [["d"], [0], 2000],
    [["e"], [0], 10],
  ]);
});

Deno.test("planBuckets: every tensor once, in order, inside its bucket, buckets within the cap", () => {
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: 0, max: 5000 }), { maxLength: 40 }),
      fc.integer({ min: 1, max: 4096 }),
      (bytes, cap) => {
        const names = bytes.map((_, i) => `t${i}`);
        const p = planBuckets(names, (n) => bytes[Number(n.slice(1))], cap);
        assert.deepEqual(p.buckets.flatMap((b) => b.names), names);
        assert.equal(p.bytes, bytes.reduce((a, b) => a + b, 0));
        assert.ok(p.bucketBytes >= cap);
        for (const b of p.buckets) {
          assert.ok(b.names.length > 0);
          assert.ok(b.bytes <= p.bucketBytes, `${b.bytes} > ${p.bucketBytes}`);
          b.offsets.forEach((o, k) => {
            assert.equal(o % 256, 0);
            const end = o + bytes[Number(b.names[k].slice(1))];
            if (k + 1 < b.offsets.length) assert.ok(end <= b.offsets[k + 1], "no overlap");
            else assert.equal(end, b.bytes);
          });
        }
      },
    ),
  );
});

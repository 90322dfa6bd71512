/**
 * Soak: 1000 alternating reloads A/B of a tiny model on every available backend (see
 * src/testing/soak.ts for the checks after each reload and for longer runs): always exact, no
 * storage moved, device and WebAssembly memory flat after the first few, host RSS flat within
 * a tolerance.
 */

import assert from "node:assert/strict";
import { soak } from "../testing.ts";
import { testBackends } from "../testing.ts";

const BACKENDS = await testBackends();
const COUNT = 1000;
// Host RSS moves with the V8 heap reservation (the checks' downloads and the snapshots are
// garbage): +25 MiB over 1000 reloads measured here, while the live heap after a full GC stayed
// at 4.3 MiB over 12000 (scripts/soak.ts with --expose-gc). A leak of one snapshot (~0.7 MiB of
// kernel bytes) per reload would add ~700 MiB.
const RSS_TOLERANCE = 96 * 2 ** 20;

for (const [bn, b] of BACKENDS) {
  Deno.test(`${bn}: soak: ${COUNT} alternating reloads, exact, in place, memory flat`, async () => {
    const s = await soak(b, { count: COUNT, warmup: 5, rssWarmup: 100 });
    assert.equal(s.reloads, COUNT);
    assert.ok(s.allocatedAfterWarmup > 0);
    if (bn === "wasm") assert.ok(s.wasmMemory[0] > 0 && s.wasmMemory[1] === s.wasmMemory[0]);
    assert.ok(
      s.rss[1] - s.rss[0] < RSS_TOLERANCE,
      `rss grew by ${s.rss[1] - s.rss[0]} bytes (from ${s.rss[0]})`,
    );
    console.log(
      `${bn}: ${s.reloads} reloads in ${s.seconds.toFixed(1)} s; rss ${s.rss[0]} -> max ${
        s.rss[1]
      }`,
    );
  });
}

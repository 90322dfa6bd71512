/**
 * `deno task serve`'s command line (src/server/args.ts): defaults, every option, and the usage
 * errors a bad value gets (one line naming the flag and what it expected).
 */
import assert from "node:assert/strict";
import { parseServeArgs, SERVE_HELP } from "../src/server/args.ts";
import { SERVE_DEFAULTS } from "../src/server/server.ts";

Deno.test("serve args: defaults, every option, and --help", () => {
  const d = parseServeArgs(["--model", "m"]);
  assert.equal(d.model, "m");
  assert.equal(d.quant, "auto");
  assert.equal(d.backend, "auto");
  assert.equal(d.host, SERVE_DEFAULTS.host);
  assert.equal(d.port, SERVE_DEFAULTS.port);
  assert.equal(d.maxBodyBytes, SERVE_DEFAULTS.maxBodyBytes);
  assert.equal(d.idleTimeoutSeconds, SERVE_DEFAULTS.idleTimeoutMs / 1000);
  assert.equal(d.ipcKeepUpdates, 2);
  assert.deepEqual(d.allowPaths, []);
  assert.equal(d.allowNonFinite || d.quiet || d.help, false);
  const o = parseServeArgs([
    "--model=m",
    ...["--quant", "int8", "--backend", "wasm", "--host", "0.0.0.0", "--port", "0"],
    ...["--token-file", "t", "--allow-path", "a", "--allow-path", "b"],
    ...["--max-body-bytes", "10", "--max-buffered-bytes", "20", "--idle-timeout", "3"],
    ...["--ipc-keep-updates", "5", "--allow-non-finite", "--quiet"],
  ]);
  assert.deepEqual(
    [o.quant, o.backend, o.host, o.port, o.tokenFile, o.allowPaths],
    ["int8", "wasm", "0.0.0.0", 0, "t", ["a", "b"]],
  );
  assert.deepEqual(
    [o.maxBodyBytes, o.maxBufferedBytes, o.idleTimeoutSeconds, o.ipcKeepUpdates],
    [10, 20, 3, 5],
  );
  assert.equal(o.allowNonFinite && o.quiet, true);
  assert.equal(parseServeArgs(["-h"]).help, true);
  for (const flag of ["--ipc-keep-updates", "--max-body-bytes", "--idle-timeout"]) {
    assert.ok(SERVE_HELP.includes(flag), flag);
  }
});

Deno.test("serve args: bad values are one-line usage errors naming the flag", () => {
  const cases: [string[], RegExp][] = [
    [[], /--model DIR is required/],
    [
      ["--model", "m", "--ipc-keep-updates", "0"],
      /--ipc-keep-updates 0: expected a whole number >= 1/,
    ],
    [["--model", "m", "--ipc-keep-updates", "two"], /--ipc-keep-updates two: expected/],
    [["--model", "m", "--port", "70000"], /--port 70000: expected 0-65535/],
    [["--model", "m", "--quant", "fp4"], /--quant fp4: expected one of/],
    [["--model", "m", "--nope"], /nope/],
  ];
  for (const [argv, re] of cases) {
    assert.throws(() => parseServeArgs(argv), (e: unknown) => {
      const m = (e as Error).message;
      return re.test(m) && !m.includes("\n");
    }, argv.join(" "));
  }
});

import assert from "node:assert/strict";
import { HELP, parseCliArgs, UsageError } from "../src/cli/args.ts";
import { createProgressBar, formatBytes, formatRate, NO_PROGRESS } from "../src/cli/progress.ts";
import {
  bf16Bits,
  bf16Value,
  DEMO_SHAPE,
  synthConfig,
  synthTensors,
  synthTensorShapes,
} from "../testing.ts";
import { parseModelConfig } from "../src/models/config.ts";
import { loadSafetensors } from "../src/checkpoint/safetensors.ts";

const CKPT = new URL("../../shared/fixtures/ckpt/", import.meta.url).pathname;

Deno.test("args: defaults, every option, and --help", () => {
  const d = parseCliArgs([]);
  assert.equal(d.model, undefined);
  assert.equal(d.quant, "auto");
  assert.equal(d.backend, "auto");
  assert.equal(d.repeat, 1);
  assert.equal(d.atomic || d.strict || d.quiet || d.help, false);
  const o = parseCliArgs([
    "--model=m",
    "--weights",
    "w",
    "--quant",
    "int8",
    "--backend",
    "wasm",
    "--export",
    "e.safetensors",
    "--json",
    "r.json",
    "--atomic",
    "--strict",
    "--repeat",
    "3",
    "--quiet",
  ]);
  assert.deepEqual(o, {
    model: "m",
    weights: "w",
    quant: "int8",
    backend: "wasm",
    export: "e.safetensors",
    json: "r.json",
    atomic: true,
    strict: true,
    rejectNonFinite: true,
    repeat: 3,
    quiet: true,
    help: false,
  });
  assert.equal(parseCliArgs(["--help"]).help, true);
  assert.equal(parseCliArgs(["--allow-non-finite"]).rejectNonFinite, false);
  for (const flag of ["--model", "--weights", "--quant", "--backend", "--export", "--json"]) {
    assert.ok(HELP.includes(flag), flag);
  }
});

Deno.test("args: bad usage is a one-line UsageError", () => {
  const bad: [string[], RegExp][] = [
    [["--bogus"], /bogus/],
    [["positional"], /positional/],
    [
      ["--quant", "fp4"],
      /--quant fp4: expected one of auto, none, fp8, fp8-channel, fp8-block, int8/,
    ],
    [["--backend", "tpu"], /--backend tpu/],
    [["--repeat", "two"], /--repeat two/],
    [["--repeat", "1.5"], /--repeat 1\.5/],
    [["--model"], /model/],
    [["--weights", "w"], /--weights needs --model/],
    [["--model", ""], /--model needs a value/],
    [["--quiet=1"], /quiet/],
  ];
  for (const [argv, re] of bad) {
    assert.throws(() => parseCliArgs(argv), (e: unknown) => {
      assert.ok(e instanceof UsageError, argv.join(" "));
      assert.match(e.message, re);
      assert.ok(!e.message.includes("\n"));
      return true;
    });
  }
});

Deno.test("progress: hidden off a terminal, with --quiet, and during the first second", () => {
  assert.equal(createProgressBar({ isTerminal: false }), NO_PROGRESS);
  assert.equal(createProgressBar({ isTerminal: true, quiet: true }), NO_PROGRESS);
  let t = 0;
  const out: string[] = [];
  const bar = createProgressBar({ isTerminal: true, now: () => t, write: (s) => out.push(s) });
  bar.update(1, 4, 1e9);
  assert.equal(out.length, 0, "nothing in the first second");
  t = 2000;
  bar.update(2, 4, 4e9);
  assert.equal(out.length, 1);
  assert.match(out[0], /2\/4 layers/);
  assert.match(out[0], /2\.00 GB\/s/);
  t = 2050;
  bar.update(3, 4, 5e9);
  assert.equal(out.length, 1, "throttled");
  bar.update(4, 4, 6e9);
  assert.equal(out.length, 2, "the last update always draws");
  bar.finish();
  assert.equal(out.at(-1), "\r\x1b[2K");
});

Deno.test("synth: bf16 rounding is nearest-even, against the fixture's own bf16 values", async () => {
  // Every bf16 value of a real checkpoint must survive a round trip through f32.
  const t = await loadSafetensors(`${CKPT}llama-tiny/model.safetensors`);
  const w = t.get("model.layers.0.self_attn.q_proj.weight")!;
  const bits = new Uint16Array(w.data.buffer, w.data.byteOffset, w.data.byteLength / 2);
  for (const b of bits) assert.equal(bf16Bits(bf16Value(b)), b);
  // Ties go to even: 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7.
  assert.equal(bf16Bits(1 + 2 ** -8), bf16Bits(1));
  assert.equal(bf16Bits(1 + 3 * 2 ** -8), bf16Bits(1 + 2 ** -6));
});

Deno.test("synth: the demo shape is a valid Llama config of about 100 MB, seeds reproduce", () => {
  const cfg = parseModelConfig(synthConfig(DEMO_SHAPE));
  assert.equal(cfg.numLayers, DEMO_SHAPE.numLayers);
  const bytes = synthTensorShapes(DEMO_SHAPE)
    .reduce((a, [, s]) => a + s.reduce((x, y) => x * y, 1) * 2, 0);
  assert.ok(bytes > 80e6 && bytes < 130e6, `${bytes}`);
  const small = {
    ...DEMO_SHAPE,
    hiddenSize: 64,
    intermediateSize: 96,
    vocabSize: 50,
    numLayers: 2,
  };
  const a = synthTensors(small, 7);
  const b = synthTensors(small, 7);
  const c = synthTensors(small, 8);
  for (const [name, t] of a) {
    assert.deepEqual(t.data, b.get(name)!.data);
    assert.notDeepEqual(t.data, c.get(name)!.data);
  }
});

Deno.test("progress: byte counts and rates in the largest fitting unit", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(999), "999 B");
  assert.equal(formatBytes(267_000), "267 kB");
  assert.equal(formatBytes(7_470_000), "7.47 MB");
  assert.equal(formatBytes(16_060_522_496), "16.06 GB");
  assert.equal(formatRate(16_060_522_496, 0.4), "40.15 GB/s");
  assert.equal(formatRate(1, 0), "0 B/s");
});

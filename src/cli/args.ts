/**
 * Command-line arguments of `deno task reload`. Parsing never exits: a bad command line is a
 * {@link UsageError}, which `main` turns into exit status 2.
 * @module
 */

import { parseArgs } from "node:util";
import { oneLine } from "../messages.ts";
import { QUANT_NAMES, type QuantName } from "../models/quant_names.ts";

/** Backend choices on the command line. */
export const BACKEND_CHOICES: readonly string[] = Object.freeze(["auto", "cuda", "wasm"]);

/** What the command line asks for. */
export interface CliOptions {
  /** Hugging Face directory of the first load; undefined runs the demo. */
  model?: string;
  /** File or directory of the reload; defaults to `model`. */
  weights?: string;
  /** Quantization of the model (default auto). */
  quant: QuantName;
  /** Backend (default auto). */
  backend: "auto" | "cuda" | "wasm";
  /** Where to write the kernel tensors after the reload step. */
  export?: string;
  /** Where to write the JSON report. */
  json?: string;
  /** Restore kernel tensors bit-exactly when a reload fails. */
  atomic: boolean;
  /** Unknown tensors in the weights are errors (instead of being reported). */
  strict: boolean;
  /** Scan incoming tensors and refuse NaN/Inf (default on; `--allow-non-finite` turns it off). */
  rejectNonFinite: boolean;
  /** How many reloads to run. */
  repeat: number;
  /** No progress bar and no report on stdout. */
  quiet: boolean;
  /** Print the help and exit. */
  help: boolean;
}

/** A bad command line; `main` prints it with a hint to --help and exits with status 2. */
export class UsageError extends Error {
  /** Creates a usage error with a one-line message. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** The text of `--help`. */
export const HELP: string =
  `deno task reload: load a model, reload its weights layer by layer, report

Usage:
  deno task reload                      run the built-in demo (generated ~100 MB model)
  deno task reload --model DIR [options]

Options:
  --model DIR        Hugging Face directory (config.json + safetensors) for the first load
  --weights PATH     safetensors file or directory to reload from (default: the --model directory)
  --quant Q          auto | none | fp8 | fp8-channel | fp8-block | int8 (default auto: the
                     checkpoint's own quantization when its config.json has one, else fp8)
  --backend B        auto | cuda | wasm (default auto: CUDA when usable, else WebAssembly)
  --export FILE      write the kernel tensors after the reload step as safetensors
                     (also after a failed reload, to inspect the state)
  --json FILE        write the report as JSON
  --atomic           on a failed reload, restore every kernel tensor bit-exactly
  --strict           tensors the model does not have are errors (default: reported)
  --allow-non-finite accept NaN/Inf in incoming weights (default: refused; the check costs one
                     extra read of every incoming tensor on the device)
  --repeat N         reload N times (default 1; 0 only loads and checks --weights)
  --quiet            no progress bar, no report on stdout
  --help             show this help

Exit status: 0 success, 1 failed load or reload (one line "error: ..." on stderr), 2 bad usage.
`;

function choice<T extends string>(flag: string, value: string, allowed: readonly string[]): T {
  if (!allowed.includes(value)) {
    throw new UsageError(`--${flag} ${oneLine(value, 40)}: expected one of ${allowed.join(", ")}`);
  }
  return value as T;
}

const OPTIONS = {
  model: { type: "string" },
  weights: { type: "string" },
  quant: { type: "string" },
  backend: { type: "string" },
  export: { type: "string" },
  json: { type: "string" },
  atomic: { type: "boolean" },
  strict: { type: "boolean" },
  "allow-non-finite": { type: "boolean" },
  repeat: { type: "string" },
  quiet: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

/**
 * `--flag VALUE` where VALUE starts with `-` becomes `--flag=VALUE` (node's parser calls it
 * "ambiguous", which hides the real problem, e.g. `--repeat -1`), unless VALUE is itself one
 * of our flags: then the flag lacks its value.
 */
function joinDashValues(argv: readonly string[]): string[] {
  const out: string[] = [];
  const isFlag = (a: string) =>
    /^--?[a-zA-Z]/.test(a) &&
    (Object.hasOwn(OPTIONS, a.replace(/^--?/, "").split("=")[0]) || a === "-h");
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const name = a.startsWith("--") ? a.slice(2) : "";
    const spec = Object.hasOwn(OPTIONS, name) ? OPTIONS[name as keyof typeof OPTIONS] : null;
    if (spec?.type === "string" && i + 1 < argv.length && argv[i + 1].startsWith("-")) {
      if (isFlag(argv[i + 1])) throw new UsageError(`${a} needs a value`);
      out.push(`${a}=${argv[++i]}`);
      continue;
    }
    out.push(a);
  }
  return out;
}

/** Parses the arguments (without the program name). Throws {@link UsageError}. */
export function parseCliArgs(argv: readonly string[]): CliOptions {
  let parsed;
  try {
    parsed = parseArgs({
      args: joinDashValues(argv),
      strict: true,
      allowPositionals: false,
      options: OPTIONS,
    });
  } catch (e) {
    // node:util's messages are multi-line in places; keep the first line, escaped (it can
    // quote an argument).
    throw new UsageError(oneLine(String((e as Error).message).split("\n")[0], 300));
  }
  const v = parsed.values;
  for (const flag of ["model", "weights", "export", "json"] as const) {
    if (v[flag] !== undefined && v[flag] === "") throw new UsageError(`--${flag} needs a value`);
  }
  let repeat = 1;
  if (v.repeat !== undefined) {
    if (!/^\d+$/.test(v.repeat) || !Number.isSafeInteger(Number(v.repeat))) {
      throw new UsageError(
        `--repeat ${oneLine(v.repeat, 40)}: expected a whole number (0 or more)`,
      );
    }
    repeat = Number(v.repeat);
  }
  if (v.weights !== undefined && v.model === undefined) {
    throw new UsageError("--weights needs --model (without --model the demo generates its own)");
  }
  return {
    model: v.model,
    weights: v.weights,
    quant: choice<QuantName>("quant", v.quant ?? "auto", QUANT_NAMES),
    backend: choice<CliOptions["backend"]>("backend", v.backend ?? "auto", BACKEND_CHOICES),
    export: v.export,
    json: v.json,
    atomic: v.atomic ?? false,
    strict: v.strict ?? false,
    rejectNonFinite: !(v["allow-non-finite"] ?? false),
    repeat,
    quiet: v.quiet ?? false,
    help: v.help ?? false,
  };
}

/**
 * `deno task reload`: load a Hugging Face model, reload its weights layer by layer, report.
 * Without arguments it runs the built-in demo. Exit status: 0 success, 1 failed load or
 * reload (one line `error: ...` on stderr), 2 bad usage.
 * @module
 */

import { type CliOptions, HELP, parseCliArgs, UsageError } from "./args.ts";
import { runDemo } from "./demo.ts";
import { runReload } from "./run.ts";
import { oneLine } from "../messages.ts";

/** Exit status of a run. */
export type ExitCode = 0 | 1 | 2;

/**
 * One line for any error: its message without a stack, newlines folded, control characters
 * escaped and the whole cut to a terminal line's worth (names from input are escaped and cut
 * where messages are made; this is the last guard).
 */
export function errorLine(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  return oneLine(msg) || (e instanceof Error ? e.name : "unknown error");
}

function say(line: string): void {
  Deno.stderr.writeSync(new TextEncoder().encode(line + "\n"));
}

/** Runs the CLI on `argv` and returns the exit status (it never exits itself). */
export async function main(argv: readonly string[]): Promise<ExitCode> {
  let options: CliOptions;
  try {
    options = parseCliArgs(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    say(`error: ${errorLine(e)} (see --help)`);
    return 2;
  }
  if (options.help) {
    console.log(HELP);
    return 0;
  }
  try {
    if (options.model === undefined) await runDemo(options);
    else await runReload(options);
    return 0;
  } catch (e) {
    // Every failure, ours (LayerwiseError) or not, is one line: the user needs the cause, and
    // a stack trace would bury it.
    say(`error: ${errorLine(e)}`);
    return 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}

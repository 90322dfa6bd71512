/**
 * Whether an outside tool that a test or bench needs is here (python3 and its packages, curl),
 * so that what needs it is skipped instead of failing.
 * @module
 */

/**
 * Runs `command` with `args`, output discarded, and says whether it exited 0; false when it
 * cannot be started at all.
 *
 * @param command The program, looked up on PATH.
 * @param args Its arguments.
 * @returns True when the program ran and exited 0.
 */
export function commandSucceeds(command: string, args: readonly string[]): boolean {
  try {
    return new Deno.Command(command, { args: [...args], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

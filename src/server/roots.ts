/**
 * The filesystem roots disk updates may read (`--allow-path`, default the model directory).
 * A path is first checked lexically (after `..` is resolved) and then again after every link
 * is followed (realpath): both must lie inside a root, itself taken through realpath, so
 * neither `..` nor a symlink leads outside. Outside is ServerError `FORBIDDEN_PATH` (403).
 * @module
 */

import { quoteName } from "../messages.ts";
import { isAbsolute, relative, resolve, sep } from "node:path";
import { serverError } from "./http_errors.ts";

function inside(path: string, root: string): boolean {
  const rel = relative(root, path);
  return rel === "" || (!rel.startsWith(`..${sep}`) && rel !== ".." && !isAbsolute(rel));
}

/** Allowed roots, each resolved through realpath. */
export class PathRoots {
  /** The roots, real paths. */
  readonly roots: readonly string[];
  /** The roots as given, made absolute (a lexical path is compared with these too). */
  readonly #given: readonly string[];

  private constructor(roots: string[], given: string[]) {
    this.roots = roots;
    this.#given = given;
  }

  /** Resolves every root through realpath; a root that does not exist is an error. */
  static async of(paths: readonly string[]): Promise<PathRoots> {
    const roots: string[] = [];
    for (const p of paths) roots.push(await Deno.realPath(p));
    return new PathRoots(roots, paths.map((p) => resolve(p)));
  }

  /**
   * The real path of `path` (relative paths from the server's working directory), when it
   * lies inside a root both before and after links are followed. Throws ServerError
   * `FORBIDDEN_PATH` (403) outside, `PATH_NOT_FOUND` (404) for a missing path inside.
   */
  async resolve(path: string): Promise<string> {
    const forbidden = () =>
      serverError(
        "FORBIDDEN_PATH",
        `${quoteName(path)} is outside the allowed roots (--allow-path)`,
      );
    if (path.includes("\0")) throw forbidden();
    const lexical = resolve(path);
    // Checked before the filesystem is asked anything, so a path outside cannot even learn
    // whether something exists there.
    if (![...this.roots, ...this.#given].some((r) => inside(lexical, r))) throw forbidden();
    let real: string;
    try {
      real = await Deno.realPath(lexical);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        throw serverError("PATH_NOT_FOUND", `${quoteName(path)} does not exist`);
      }
      throw forbidden();
    }
    if (!this.roots.some((r) => inside(real, r))) throw forbidden();
    return real;
  }
}

/**
 * Typing shared by the FFI bindings (CUDA library, NCCL): Deno's FFI takes JS numbers for
 * 64-bit parameters as well as bigints, though its types say bigint; pointers and sizes here
 * are numbers, so the bindings widen those parameter types.
 * @module
 */

/** A 64-bit parameter type widened to accept a JS number too. */
export type Wide<T> = T extends bigint ? number | bigint : T;

/** A foreign function with its 64-bit parameters widened. */
export type WideFn<F> = F extends (...args: infer A) => infer R
  ? (...args: { [K in keyof A]: Wide<A[K]> }) => R
  : F;

/** The functions of a library opened with symbol table `S`, 64-bit parameters widened. */
export type WideSymbols<S extends Deno.ForeignLibraryInterface> = {
  readonly [K in keyof Deno.DynamicLibrary<S>["symbols"]]: WideFn<
    Deno.DynamicLibrary<S>["symbols"][K]
  >;
};

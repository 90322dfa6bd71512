/**
 * Element types. The numeric `code` is the C ABI's (cuda/layerwise.h); `safetensors` is the
 * name the safetensors format uses.
 * @module
 */

/** Names of the element types this package handles. */
export type DTypeName =
  | "f32"
  | "f16"
  | "bf16"
  | "f8_e4m3fn"
  | "f8_e5m2"
  | "i8"
  | "u8"
  | "i32"
  | "i64"
  | "bool";

/** An element type: its name, ABI code, size in bytes and safetensors name. */
export interface DType {
  /** Our name, used in messages and the API. */
  readonly name: DTypeName;
  /** The code in the kernel ABI. */
  readonly code: number;
  /** Bytes per element. */
  readonly size: number;
  /** The safetensors dtype string. */
  readonly safetensors: string;
  /** Whether the kernels treat it as floating point (casts, absmax, quantization). */
  readonly floating: boolean;
}

function dt(
  name: DTypeName,
  code: number,
  size: number,
  safetensors: string,
  floating: boolean,
): DType {
  return Object.freeze({ name, code, size, safetensors, floating });
}

/** All element types by name. */
export const DTYPES: Readonly<Record<DTypeName, DType>> = Object.freeze({
  f32: dt("f32", 0, 4, "F32", true),
  f16: dt("f16", 1, 2, "F16", true),
  bf16: dt("bf16", 2, 2, "BF16", true),
  f8_e4m3fn: dt("f8_e4m3fn", 3, 1, "F8_E4M3", true),
  f8_e5m2: dt("f8_e5m2", 4, 1, "F8_E5M2", true),
  i8: dt("i8", 5, 1, "I8", false),
  u8: dt("u8", 6, 1, "U8", false),
  i32: dt("i32", 7, 4, "I32", false),
  i64: dt("i64", 8, 8, "I64", false),
  bool: dt("bool", 9, 1, "BOOL", false),
});

const BY_SAFETENSORS: ReadonlyMap<string, DType> = new Map(
  Object.values(DTYPES).map((d) => [d.safetensors, d]),
);

/** Looks a dtype up by our name or a common alias (`bfloat16`, `float16`, `float32`...). */
export function dtypeOf(name: string): DType | undefined {
  const alias: Record<string, DTypeName> = {
    float32: "f32",
    float: "f32",
    float16: "f16",
    half: "f16",
    bfloat16: "bf16",
    float8_e4m3fn: "f8_e4m3fn",
    float8_e5m2: "f8_e5m2",
    int8: "i8",
    uint8: "u8",
    int32: "i32",
    int64: "i64",
  };
  const key = (alias[name] ?? name) as DTypeName;
  return Object.hasOwn(DTYPES, key) ? DTYPES[key] : undefined;
}

/**
 * Whether a dtype is f32, f16 or bf16: the dtypes of unquantized weights, which loaders cast
 * between and quantization reads (`lw_dtype_is_quant_input` in cuda/lw_numeric.h).
 */
export function isModelFloat(dtype: DType): boolean {
  return dtype.name === "f32" || dtype.name === "f16" || dtype.name === "bf16";
}

/** Looks a dtype up by its safetensors name (`BF16`, `F8_E4M3`...). */
export function dtypeFromSafetensors(name: string): DType | undefined {
  return BY_SAFETENSORS.get(name);
}

/**
 * The heap of the WebAssembly backend, kept on the host side: the kernels are freestanding C
 * with no allocator, and the one memory is shared by every worker thread, so the host hands out
 * its ranges. First fit over a sorted list of free ranges, neighbours merged on free; the memory
 * grows (never shrinks) when no free range fits.
 * @module
 */

/** Alignment of every allocation: a cache line, and more than any SIMD load needs. */
export const HEAP_ALIGN = 64;

/** A range allocator over [base, limit) of a memory that grows on demand. */
export class WasmHeap {
  /** Free ranges [start, end), sorted by start, never adjacent. */
  readonly #free: [number, number][] = [];
  readonly #sizes = new Map<number, number>();
  #top: number;
  #inUse = 0;

  /**
   * @param base first usable byte (the module's heap base)
   * @param limit the memory maximum in bytes
   * @param size the current memory size in bytes
   * @param grow makes the memory at least `bytes` long
   */
  constructor(
    base: number,
    readonly limit: number,
    private size: number,
    private readonly grow: (bytes: number) => void,
  ) {
    this.#top = align(base);
  }

  /** Bytes handed out and not freed (rounded up to the alignment). */
  get inUse(): number {
    return this.#inUse;
  }

  /** Bytes the memory holds now. */
  get memoryBytes(): number {
    return this.size;
  }

  /** Allocates `bytes` (> 0); returns its offset, or 0 when the memory maximum is reached. */
  alloc(bytes: number): number {
    const n = align(bytes);
    for (let i = 0; i < this.#free.length; i++) {
      const [s, e] = this.#free[i];
      if (e - s < n) continue;
      if (e - s === n) this.#free.splice(i, 1);
      else this.#free[i][0] = s + n;
      return this.#take(s, n);
    }
    // Nothing free fits: extend from the top, reusing a free range that ends there.
    const last = this.#free[this.#free.length - 1];
    const start = last && last[1] === this.#top ? last[0] : this.#top;
    if (start + n > this.limit) return 0;
    if (start + n > this.size) {
      this.grow(start + n);
      this.size = start + n;
    }
    if (start !== this.#top) this.#free.pop();
    this.#top = start + n;
    return this.#take(start, n);
  }

  /** The size asked for at `ptr`, or undefined when `ptr` is not a live allocation. */
  sizeOf(ptr: number): number | undefined {
    return this.#sizes.get(ptr);
  }

  /** Frees a live allocation (the caller checks {@link sizeOf} first). */
  free(ptr: number): void {
    const n = this.#sizes.get(ptr)!;
    this.#sizes.delete(ptr);
    this.#inUse -= n;
    const s = ptr;
    let e = ptr + n;
    // Binary search for the first free range after ptr, then merge with both neighbours.
    let lo = 0, hi = this.#free.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.#free[mid][0] < s) lo = mid + 1;
      else hi = mid;
    }
    const next = this.#free[lo];
    const prev = this.#free[lo - 1];
    if (next && next[0] === e) {
      e = next[1];
      this.#free.splice(lo, 1);
    }
    if (prev && prev[1] === s) {
      prev[1] = e;
      return;
    }
    this.#free.splice(lo, 0, [s, e]);
  }

  /** Forgets every allocation. */
  clear(): void {
    this.#free.length = 0;
    this.#sizes.clear();
    this.#inUse = 0;
  }

  #take(start: number, n: number): number {
    this.#sizes.set(start, n);
    this.#inUse += n;
    return start;
  }
}

function align(n: number): number {
  return Math.ceil(n / HEAP_ALIGN) * HEAP_ALIGN;
}

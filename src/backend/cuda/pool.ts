/**
 * The device memory pool of one CUDA backend: accounting, and exact-size reuse while a staged
 * read holds it.
 * @module
 */

/**
 * Device memory accounting of one CUDA backend, and an exact-size reuse cache for the staged
 * reload path. Every layer of a model has the same shapes, so the blocks a layer frees are the
 * blocks the next one asks for: while the cache is held, `free` keeps blocks for reuse instead
 * of calling cudaFree, which would synchronize the whole device (and stall the copy stream).
 * Reuse is safe because every kernel of the backend runs on its one stream, in order; other
 * streams writing into backend memory must first wait for an event recorded on that stream
 * after the allocation.
 */
export class DevicePool {
  readonly #sizes = new Map<number, number>();
  readonly #cache = new Map<number, number[]>();
  /** When each cached block came in (allocation count), oldest first. */
  readonly #ages: { ptr: number; bytes: number; at: number }[] = [];
  #clock = 0;
  #holds = 0;
  #cached = 0;
  #live = 0;
  #peak = 0;

  /**
   * A cached block of exactly `bytes`, if the cache is held and has one. Blocks nobody asked
   * for during the last {@link DevicePool.STALE} allocations (another kind of layer: the
   * embedding's before the decoder layers) are given back through `free` first.
   */
  take(bytes: number, free: (ptr: number) => void): number | undefined {
    if (this.#holds === 0) return undefined;
    this.#clock++;
    while (this.#ages.length > 0 && this.#clock - this.#ages[0].at > DevicePool.STALE) {
      const old = this.#ages.shift()!;
      const list = this.#cache.get(old.bytes)!;
      list.splice(list.indexOf(old.ptr), 1);
      this.#cached -= old.bytes;
      free(old.ptr);
    }
    const list = this.#cache.get(bytes);
    const p = list?.pop();
    if (p !== undefined) {
      this.#cached -= bytes;
      this.#ages.splice(this.#ages.findIndex((a) => a.ptr === p), 1);
    }
    return p;
  }

  /** Allocations after which an unused cached block is given back (a few layers' worth). */
  static readonly STALE = 64;

  /** Records a block handed out. */
  allocated(ptr: number, bytes: number): void {
    this.#sizes.set(ptr, bytes);
    this.#live += bytes;
    this.#peak = Math.max(this.#peak, this.#live + this.#cached);
  }

  /** Takes a freed block into the cache when held (true), else forgets it (false). */
  give(ptr: number): boolean {
    const bytes = this.#sizes.get(ptr) ?? 0;
    this.#sizes.delete(ptr);
    this.#live -= bytes;
    if (this.#holds === 0) return false;
    const list = this.#cache.get(bytes) ?? [];
    list.push(ptr);
    this.#cache.set(bytes, list);
    this.#ages.push({ ptr, bytes, at: this.#clock });
    this.#cached += bytes;
    return true;
  }

  /** Starts caching (nested holds count). */
  hold(): void {
    this.#holds++;
  }

  /** Ends one hold; the last one gives every cached block back through `free`. */
  release(free: (ptr: number) => void): void {
    if (this.#holds > 0) this.#holds--;
    if (this.#holds === 0) this.trim(free);
  }

  /** Gives every cached block back through `free`. */
  trim(free: (ptr: number) => void): void {
    const blocks = [...this.#cache.values()].flat();
    this.#cache.clear();
    this.#ages.length = 0;
    this.#cached = 0;
    for (const p of blocks) free(p);
  }

  /** Bytes in live blocks. */
  get liveBytes(): number {
    return this.#live;
  }

  /** Bytes held in the cache. */
  get cachedBytes(): number {
    return this.#cached;
  }

  /** Most live + cached bytes since the last {@link resetPeak}. */
  get peakBytes(): number {
    return this.#peak;
  }

  /** Starts a new peak measurement from the current bytes. */
  resetPeak(): void {
    this.#peak = this.#live + this.#cached;
  }
}

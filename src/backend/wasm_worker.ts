/**
 * A worker thread of the WebAssembly backend's pool (src/backend/wasm_pool.ts): it instantiates
 * the kernels module on the backend's shared memory, then waits on its slot of the control block
 * and runs the kernel call it finds there, until told to stop. Started by the pool; not an API.
 * @module
 */

import { parentPort, workerData } from "node:worker_threads";
import { instantiateKernels, numberExports, wasmGlobals, type WasmSignature } from "./wasm_abi.ts";
import { SLOT, type WorkerInit } from "./wasm_pool.ts";

const init = workerData as WorkerInit;
const instance = instantiateKernels(init.module, init.memory);
wasmGlobals(instance).setStackPointer(init.stackTop);
const fns = numberExports(instance, init.signatures as Map<string, WasmSignature>);
const calls = init.names.map((n) => fns[n]);
const ctl = new Int32Array(init.control);
const args = new Float64Array(init.control);
const text = new Uint8Array(init.control);
const base = init.index * SLOT.INTS;
parentPort!.postMessage("ready");

let seen = 0;
for (;;) {
  // Kernels come in bursts (a reload's tensors, a kernel's passes): spin a little before
  // parking, since waking a parked thread costs tens of microseconds per call.
  const spins = ctl[SLOT.SPINS];
  for (let i = 0; i < spins && Atomics.load(ctl, base + SLOT.SEQ) === seen; i++);
  Atomics.wait(ctl, base + SLOT.SEQ, seen);
  const seq = Atomics.load(ctl, base + SLOT.SEQ);
  if (seq === seen) continue;
  if (seq < 0) break;
  seen = seq;
  let status: number;
  try {
    const fn = calls[ctl[base + SLOT.FN]];
    const a: number[] = [];
    const at = (base + SLOT.ARGS) / 2;
    for (let i = 0; i < ctl[base + SLOT.ARGC]; i++) a.push(args[at + i]);
    status = fn(...a);
  } catch (e) {
    // A trap: the text goes back through the slot, the caller throws it.
    const msg = new TextEncoder().encode(String(e).slice(0, SLOT.TEXT_BYTES - 1));
    const t = (base + SLOT.TEXT) * 4;
    text.fill(0, t, t + SLOT.TEXT_BYTES);
    text.set(msg, t);
    status = SLOT.TRAPPED;
  }
  ctl[base + SLOT.STATUS] = status;
  Atomics.store(ctl, base + SLOT.DONE, seq);
  Atomics.notify(ctl, base + SLOT.DONE);
}

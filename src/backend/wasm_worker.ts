/**
 * A worker thread of the WebAssembly backend's pool (src/backend/wasm_pool.ts): it instantiates
 * the kernels module on the backend's shared memory, then waits on the control block and, each
 * time it is woken, takes parts of the current call until none is left, until told to stop.
 * Started by the pool; not an API.
 * @module
 */

import { parentPort, workerData } from "node:worker_threads";
import { instantiateKernels, numberExports, wasmGlobals, type WasmSignature } from "./wasm_abi.ts";
import { CONTROL, runParts, type WorkerInit } from "./wasm_pool.ts";

const init = workerData as WorkerInit;
const instance = instantiateKernels(init.module, init.memory);
wasmGlobals(instance).setStackPointer(init.stackTop);
const fns = numberExports(instance, init.signatures as Map<string, WasmSignature>);
const calls = init.names.map((n) => fns[n]);
const ctl = new Int32Array(init.control);
const args = new Float64Array(init.control);
const run = (fn: number, a: number[]) => calls[fn](...a);
parentPort!.postMessage("ready");

let seen = 0;
for (;;) {
  // Kernels come in bursts (a reload's tensors, a kernel's passes): spin a little before
  // parking, since waking a parked thread costs tens of microseconds per call.
  const spins = ctl[CONTROL.SPINS];
  for (let i = 0; i < spins && Atomics.load(ctl, CONTROL.SEQ) === seen; i++);
  Atomics.wait(ctl, CONTROL.SEQ, seen);
  const seq = Atomics.load(ctl, CONTROL.SEQ);
  if (seq < 0) break;
  if (seq === seen) continue;
  seen = seq;
  runParts(ctl, args, run);
}

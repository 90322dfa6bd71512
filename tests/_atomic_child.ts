// Child process of the atomic-writer signal test: writes one chunk to the target through
// writeFileAtomic, says so on stdout, then waits for a signal before the next chunk.
import { writeFileAtomic } from "../src/checkpoint/atomic_write.ts";

async function* chunks(): AsyncGenerator<Uint8Array> {
  yield new Uint8Array(1 << 16).fill(7);
  await Deno.stdout.write(new TextEncoder().encode("writing\n"));
  await new Promise((r) => setTimeout(r, 60_000));
  yield new Uint8Array(1 << 16).fill(8);
}

await writeFileAtomic(Deno.args[0], chunks());

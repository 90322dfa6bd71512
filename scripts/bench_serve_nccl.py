"""A trainer process pushing weights over NCCL to a server on another GPU (needs 2 GPUs,
PyTorch and NCCL; the acceptance run of the NCCL transport).

    NCCL_NVLS_ENABLE=0 LAYERWISE_NCCL_LIB=<nvidia.nccl>/lib/libnccl.so.2 \\
      python3 scripts/bench_serve_nccl.py --model DIR [--updates 3] [--bucket-mib 256]
          [--trainer-gpu 0] [--server-gpu 1] [--port 8472] [--quant fp8]

Starts `deno run -A src/server/main.ts --model DIR` on --server-gpu (CUDA_VISIBLE_DEVICES), reads
DIR's safetensors into CUDA tensors on --trainer-gpu in the order of GET /v1/model, joins an
NCCL communicator with the server (client.init_nccl) and then:

1. verify: pushes the weights x2 (exact in bf16) over NCCL, the export must differ from the
   first load's; pushes the weights themselves, the export must equal the first load's (a disk
   load of the same weights), and again after POST /v1/update/disk; compared as SHA-256 of the
   whole export.
2. time: --updates NCCL updates of the same weights, milliseconds each from the client's call
   to the server's reply (the first, which makes the device plan, is listed apart).
3. NCCL broadcast bandwidth of the same bucket sizes from --trainer-gpu to --server-gpu in this
   process (ncclCommInitAll over both GPUs, the best of 3), in the same run.

Prints JSON, then `ratio` = (bytes / median update seconds) / NCCL bandwidth beside its limit 0.8.
"""

import argparse
import ctypes
import hashlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

import torch  # noqa: E402

from layerwise_client import LayerwiseClient, _load_nccl, _nccl_check, pack_buckets  # noqa: E402

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def read_checkpoint(directory: str, wanted: list, device: torch.device) -> list:
    """The tensors named in `wanted` (GET /v1/model order) from DIR's *.safetensors."""
    where = {}
    for f in sorted(os.listdir(directory)):
        if not f.endswith(".safetensors"):
            continue
        path = os.path.join(directory, f)
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, e in header.items():
            if name != "__metadata__":
                where[name] = (path, 8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1], e)
    out = []
    for t in wanted:
        path, begin, end, e = where[t["name"]]
        with open(path, "rb") as fh:
            fh.seek(begin)
            raw = bytearray(fh.read(end - begin))
        host = torch.frombuffer(raw, dtype=DTYPES[e["dtype"]]).reshape(e["shape"]) if raw else \
            torch.empty(e["shape"], dtype=DTYPES[e["dtype"]])
        out.append((t["name"], host.to(device)))
    return out


def export_sha(url: str) -> str:
    h = hashlib.sha256()
    with urllib.request.urlopen(url + "/v1/export") as r:
        while True:
            chunk = r.read(64 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def nccl_bandwidth(lengths: list, cap: int, a: int, b: int) -> float:
    """Bytes per second of broadcasting buckets of `lengths` from GPU a to GPU b (best of 3)."""
    lib = _load_nccl()
    lib.ncclCommInitAll.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    comms = (ctypes.c_void_p * 2)()
    devs = (ctypes.c_int * 2)(a, b)
    _nccl_check(lib, "ncclCommInitAll", lib.ncclCommInitAll(comms, 2, devs))
    bufs = [torch.empty(cap, dtype=torch.uint8, device=f"cuda:{d}") for d in (a, b)]
    streams = [torch.cuda.Stream(f"cuda:{d}") for d in (a, b)]
    best = float("inf")
    try:
        for _ in range(3):
            for d in (a, b):
                torch.cuda.synchronize(d)
            t0 = time.perf_counter()
            for n in lengths:
                _nccl_check(lib, "ncclGroupStart", lib.ncclGroupStart())
                for r in range(2):
                    p = ctypes.c_void_p(bufs[r].data_ptr())
                    _nccl_check(lib, "ncclBroadcast", lib.ncclBroadcast(
                        p, p, n, 1, 0, ctypes.c_void_p(comms[r]),
                        ctypes.c_void_p(streams[r].cuda_stream)))
                _nccl_check(lib, "ncclGroupEnd", lib.ncclGroupEnd())
            for s in streams:
                s.synchronize()
            best = min(best, time.perf_counter() - t0)
    finally:
        for r in range(2):
            lib.ncclCommDestroy(ctypes.c_void_p(comms[r]))
    return sum(lengths) / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--bucket-mib", type=int, default=256)
    ap.add_argument("--trainer-gpu", type=int, default=0)
    ap.add_argument("--server-gpu", type=int, default=1)
    ap.add_argument("--port", type=int, default=8472)
    ap.add_argument("--quant", default="fp8")
    a = ap.parse_args()
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    url = f"http://127.0.0.1:{a.port}"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(a.server_gpu))
    server = subprocess.Popen(
        ["deno", "run", "-A", os.path.join(ROOT, "src/server/main.ts"), "--model", a.model,
         "--quant", a.quant, "--backend", "cuda", "--port", str(a.port), "--quiet"],
        env=env)
    try:
        client = LayerwiseClient(url)
        for _ in range(1200):
            try:
                if client.health().get("status") == "ok":
                    break
            except OSError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode})")
            time.sleep(0.5)
        device = torch.device("cuda", a.trainer_gpu)
        torch.cuda.set_device(device)
        expected = client.model()["tensors"]
        tensors = read_checkpoint(a.model, expected, device)
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        bucket_bytes = a.bucket_mib << 20
        client.init_nccl(world_size=2, rank=0, server_rank=1, device=device)

        first = export_sha(url)
        doubled = [(n, t * 2) for n, t in tensors]
        r = client.update_from_tensors(doubled, transport="nccl", bucket_bytes=bucket_bytes)
        assert r["path"] == "nccl" and r["storageKept"], r
        del doubled
        changed = export_sha(url)
        millis = []
        for i in range(a.updates + 1):
            t0 = time.perf_counter()
            r = client.update_from_tensors(tensors, transport="nccl", bucket_bytes=bucket_bytes,
                                           tag=f"bench-{i}")
            millis.append((time.perf_counter() - t0) * 1000)
            assert r["path"] == "nccl" and r["storageKept"], r
        by_nccl = export_sha(url)
        client.update_from_disk(a.model)
        by_disk = export_sha(url)
        verify = {"changed_by_x2": changed != first, "nccl_equals_first_load": by_nccl == first,
                  "nccl_equals_disk_update": by_nccl == by_disk}

        cap, _placements, lengths = pack_buckets([t.numel() * t.element_size() for _, t in tensors],
                                                 bucket_bytes)
        client.close_nccl()
        bandwidth = nccl_bandwidth(lengths, cap, a.trainer_gpu, a.server_gpu)
        timed = millis[1:]
        rate = total / (statistics.median(timed) / 1000)
        print(json.dumps({"bytes": total, "buckets": len(lengths), "bucket_bytes": cap,
                          "first_ms": millis[0], "millis": timed, "update_GBps": rate / 1e9,
                          "nccl_GBps": bandwidth / 1e9, "verify": verify}))
        print(f"nccl update {rate / 1e9:.1f} GB/s, NCCL broadcast {bandwidth / 1e9:.1f} GB/s: "
              f"ratio {rate / bandwidth:.3f} (limit 0.8); verify {'ok' if all(verify.values()) else verify}")
        if not all(verify.values()):
            raise SystemExit(1)
    finally:
        server.terminate()
        server.wait(timeout=120)


if __name__ == "__main__":
    main()

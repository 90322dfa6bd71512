"""The PyTorch side of the serve bench's IPC figure (needs CUDA and PyTorch).

    python3 scripts/bench_serve_ipc.py URL UPDATES

Builds bf16 CUDA tensors of every checkpoint tensor the served model expects (GET /v1/model),
pushes them UPDATES times over CUDA IPC with the same buckets, and prints JSON: bytes per
update, milliseconds of each update from the client's call to its reply, the server's own
time for each (its reply's seconds: from taking the update lock to the end of the reload),
buckets used.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "clients", "python"))

import torch  # noqa: E402

from layerwise_client import LayerwiseClient  # noqa: E402

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def main() -> None:
    url, updates = sys.argv[1], int(sys.argv[2])
    client = LayerwiseClient(url)
    expected = client.model()["tensors"]
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = []
    for t in expected:
        x = torch.randn(t["shape"], generator=g, device="cuda", dtype=torch.float32) * 0.02
        tensors.append((t["name"], x.to(DTYPES[t["dtype"]])))
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    torch.cuda.synchronize()
    millis, server_millis = [], []
    for i in range(updates):
        t0 = time.perf_counter()
        r = client.update_from_tensors(tensors, transport="ipc", bucket_bytes=1 << 30, tag=f"bench-{i}")
        millis.append((time.perf_counter() - t0) * 1000)
        server_millis.append(r["seconds"] * 1000)
        assert r["path"] == "ipc" and r["storageKept"], r
    buckets = len([b for b in client._buckets if b is not None])
    client.close()
    print(json.dumps({"bytes": total, "millis": millis, "server_millis": server_millis, "buckets": buckets}))


if __name__ == "__main__":
    main()

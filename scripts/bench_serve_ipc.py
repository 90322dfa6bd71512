"""The PyTorch side of the serve bench's IPC figure (needs CUDA and PyTorch).

    python3 scripts/bench_serve_ipc.py URL UPDATES

Builds bf16 CUDA tensors of every checkpoint tensor the served model expects (GET /v1/model)
and pushes them UPDATES times over CUDA IPC the default way, zero-copy (the server reads the
tensors in place; the same handles every time), then UPDATES times with ``ipc_copy=True`` (the
client packs them into its reused buckets first) for comparison. Prints JSON: bytes per update;
for each path (``zero_copy``, ``copy``): the path the client reports it took, milliseconds of
each update from the client's call to its reply, the server's own time for each (its reply's
seconds: from taking the update lock to the end of the reload), buckets (allocations) in the
table and handles new to the client in each update (the first update's are opened by the
server too); and where each update's time went: ``table_millis`` (the client before the request:
stream sync, locating allocations, bucket copies, the table and its JSON), ``request_millis``
(request out to reply read), ``server_timing`` (the server's Server-Timing figures of each
reply: ``read`` the body and its JSON parse, ``parse`` the table's checks, ``update`` the update
itself), all in milliseconds.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "clients", "python"))

import torch  # noqa: E402

from layerwise_client import LayerwiseClient  # noqa: E402

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def run(client: LayerwiseClient, tensors: list, updates: int, copy: bool, label: str) -> dict:
    millis, server_millis, new_handles, table_millis, request_millis, timing = [], [], [], [], [], []
    for i in range(updates):
        t0 = time.perf_counter()
        r = client.update_from_tensors(tensors, transport="ipc", ipc_copy=copy, bucket_bytes=1 << 30,
                                       tag=f"bench-{label}-{i}")
        millis.append((time.perf_counter() - t0) * 1000)
        server_millis.append(r["seconds"] * 1000)
        st = client.last_ipc
        new_handles.append(st.new_handles)
        table_millis.append(st.table_seconds * 1000)
        request_millis.append(st.request_seconds * 1000)
        timing.append(st.server_timing or {})
        assert r["path"] == "ipc" and r["storageKept"], r
    st = client.last_ipc
    print(f"bench_serve_ipc: {label}: path {st.path}, {st.zero_copy} tensors read in place, "
          f"{sum(st.packed.values())} packed, {st.buckets} allocations in the table",
          file=sys.stderr)
    return {"path": st.path, "zero_copy_tensors": st.zero_copy, "packed_tensors": sum(st.packed.values()),
            "buckets": st.buckets, "new_handles": new_handles, "millis": millis,
            "server_millis": server_millis, "table_millis": table_millis, "request_millis": request_millis,
            "server_timing": timing}


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
    zero_copy = run(client, tensors, updates, False, "zero-copy")
    copy = run(client, tensors, updates, True, "ipc_copy")
    client.close()
    print(json.dumps({"bytes": total, "tensors": len(tensors), "zero_copy": zero_copy, "copy": copy}))


if __name__ == "__main__":
    main()

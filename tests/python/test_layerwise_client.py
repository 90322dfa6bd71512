"""Tests of clients/python/layerwise_client.py against a running server (standard library only).

Run by tests/client_py_test.ts, which starts the server and sets LW_URL, LW_TOKEN, LW_CKPT (a
safetensors file of the served model's shape), LW_SCALED (another one), LW_OUTSIDE (a path
outside the allowed roots) and LW_OUT (a folder for the exports the Deno side compares).
"""

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import types
import unittest
import http.server

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))

from layerwise_client import (  # noqa: E402
    CudaAllocation,
    CudaDriver,
    IpcHandleCache,
    IpcSource,
    LayerwiseClient,
    LayerwiseError,
    RawTensor,
    ipc_packing,
    ipc_routes,
    ipc_table,
    safetensors_header,
)

URL = os.environ["LW_URL"]
TOKEN = os.environ["LW_TOKEN"]
CKPT = os.environ["LW_CKPT"]
SCALED = os.environ["LW_SCALED"]
OUTSIDE = os.environ["LW_OUTSIDE"]
OUT = os.environ["LW_OUT"]


def read_safetensors(path):
    """(name, RawTensor) pairs in data order: a tiny reader for the test."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    start = 8 + n
    out = []
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = e["data_offsets"]
        out.append((name, RawTensor(e["dtype"], tuple(e["shape"]), memoryview(data)[start + a:start + b])))
    return out


GIB = 1 << 30


class FakeDriver:
    """Allocations by (id, base, size, ipc) and 64-byte handles made from the id, in place of
    libcuda; counts the handles it was asked for."""

    def __init__(self):
        self.allocations = []
        self.handle_calls = 0
        self.locate_calls = 0
        self._next_id = 1
        self._next_base = 0x7F00_0000_0000

    def alloc(self, size, base=None, ipc=True):
        if base is None:
            base, self._next_base = self._next_base, self._next_base + GIB
        a = CudaAllocation(self._next_id, base, size, ipc)
        self._next_id += 1
        self.allocations = [x for x in self.allocations if x.base != base] + [a]
        return a

    def locate(self, ptr):
        self.locate_calls += 1
        for a in self.allocations:
            if a.base <= ptr < a.base + a.size:
                return a
        raise ValueError(f"address {ptr:#x} is not in a CUDA allocation of this process")

    def ipc_handle(self, a):
        self.handle_calls += 1
        return a.id.to_bytes(8, "little") + b"fake-handle" + bytes(45)


def b64_handle(a):
    return base64.b64encode(a.id.to_bytes(8, "little") + b"fake-handle" + bytes(45)).decode("ascii")


def src(name, ptr, nbytes=64, device=0, contiguous=True, dtype="BF16"):
    return IpcSource(name, dtype, (nbytes // _SIZE[dtype],), nbytes, device, ptr, contiguous)


_SIZE = {"BF16": 2, "F32": 4, "U8": 1}


class IpcTableTest(unittest.TestCase):
    """The zero-copy IPC table from fake allocations and handles (no GPU, no PyTorch)."""

    def setUp(self):
        self.driver = FakeDriver()
        self.handles = IpcHandleCache(self.driver.ipc_handle)

    def table(self, sources, device=0):
        routes = ipc_routes(sources, device, self.driver.locate)
        self.assertTrue(all(isinstance(r, CudaAllocation) for r in routes), routes)
        return ipc_table([(s, r, s.ptr) for s, r in zip(sources, routes)], self.handles)

    def test_offsets_from_the_allocation_base_and_one_bucket_per_allocation(self):
        a = self.driver.alloc(20 << 20)
        b = self.driver.alloc(2 << 20)
        sources = [
            src("x", a.base + 512, 1024),
            src("y", b.base, 16, dtype="F32"),
            src("z", a.base + 4096 + 6, 10),  # a view at an odd element offset of a storage
            src("tied", a.base + 512, 1024),  # two names on one storage
        ]
        buckets, tensors, ids = self.table(sources)
        self.assertEqual(buckets, [{"handle": b64_handle(a), "bytes": 4096 + 6 + 10},
                                   {"handle": b64_handle(b), "bytes": 16}])
        self.assertEqual(ids, [a.id, b.id])
        self.assertEqual([(t["name"], t["bucket"], t["offset"]) for t in tensors],
                         [("x", 0, 512), ("y", 1, 0), ("z", 0, 4102), ("tied", 0, 512)])
        self.assertEqual(tensors[1], {"name": "y", "dtype": "F32", "shape": [4], "bucket": 1, "offset": 0})
        self.assertEqual(self.driver.handle_calls, 2)

    def test_cached_handles_hit_and_a_reallocated_address_gets_a_new_handle(self):
        a = self.driver.alloc(4 << 20)
        b = self.driver.alloc(4 << 20)
        sources = [src("x", a.base), src("y", b.base + 256)]
        first, _, ids = self.table(sources)
        self.assertEqual((self.handles.misses, self.handles.hits), (2, 0))
        self.assertEqual(self.handles.keep_only(ids), [])
        # In place: the same allocations, the same handles, no driver call.
        again, _, ids = self.table(sources)
        self.assertEqual(again, first)
        self.assertEqual((self.handles.misses, self.handles.hits, self.driver.handle_calls), (2, 2, 2))
        self.assertEqual(self.handles.keep_only(ids), [])
        # b freed and a new allocation at its very address: another buffer id, so a miss and its
        # own handle, never b's cached one; b's handle comes back for the server to close.
        c = self.driver.alloc(8 << 20, base=b.base)
        self.assertNotEqual(c.id, b.id)
        moved, _, ids = self.table(sources)
        self.assertEqual(moved[0], first[0])
        self.assertEqual(moved[1]["handle"], b64_handle(c))
        self.assertNotEqual(moved[1]["handle"], first[1]["handle"])
        self.assertEqual(self.handles.misses, 3)
        self.assertEqual(self.handles.keep_only(ids), [first[1]["handle"]])
        self.assertEqual(len(self.handles), 2)
        self.assertEqual(sorted(self.handles.keep_only(())), sorted([first[0]["handle"], moved[1]["handle"]]))

    def test_the_driver_is_asked_once_per_allocation_per_call(self):
        a = self.driver.alloc(4 << 20)
        b = self.driver.alloc(4 << 20)
        c = self.driver.alloc(4 << 20)
        # Interleaved, and out of address order: each allocation is located once, by whichever
        # of its tensors comes first; the rest are placed by the ranges this call located.
        sources = [src("a0", a.base + 1024), src("b0", b.base), src("a1", a.base),
                   src("c0", c.base + 64), src("b1", b.base + 1024, 2048), src("a2", a.base + (4 << 20) - 64),
                   src("c1", c.base)]
        _, tensors, ids = self.table(sources)
        self.assertEqual(self.driver.locate_calls, 3)
        self.assertEqual(ids, [a.id, b.id, c.id])
        self.assertEqual([(t["name"], t["bucket"], t["offset"]) for t in tensors], [
            ("a0", 0, 1024), ("b0", 1, 0), ("a1", 0, 0), ("c0", 2, 64), ("b1", 1, 1024),
            ("a2", 0, (4 << 20) - 64), ("c1", 2, 0)])
        # Nothing is kept across calls: b freed and another allocation at its address (smaller,
        # so b1 now runs past its end) is located again, and b1 is packed, not read in place.
        b2 = self.driver.alloc(2048, base=b.base)
        routes = ipc_routes(sources, 0, self.driver.locate)
        self.assertEqual(self.driver.locate_calls, 6)
        self.assertEqual([r.id if isinstance(r, CudaAllocation) else r for r in routes],
                         [a.id, b2.id, a.id, c.id, "runs past the end of its allocation", a.id, c.id])

    def test_what_zero_copy_cannot_take_is_packed_with_its_reason(self):
        a = self.driver.alloc(4 << 20)
        pooled = self.driver.alloc(4 << 20, ipc=False)
        sources = [
            src("ok", a.base),
            src("host", 0x1000, device=None),
            src("other", a.base, device=1),
            src("strided", a.base, contiguous=False),
            src("empty", 0, nbytes=0),
            src("pooled", pooled.base),
        ]
        routes = ipc_routes(sources, 0, self.driver.locate)
        self.assertEqual(routes[0], a)
        self.assertEqual(routes[1:], [
            "on the host", "on cuda:1, the server reads cuda:0", "not contiguous", "empty",
            "in memory no IPC handle can share (expandable segment or pool)",
        ])
        self.assertEqual(ipc_routes(sources[:1], 0, self.driver.locate, copy=True), ["ipc_copy"])
        # A bucket in such memory cannot be shared either: the error names the setting.
        with self.assertRaisesRegex(ValueError, "expandable_segments"):
            self.handles.handle(pooled)

    def test_packing_aligns_to_256_and_gives_a_big_tensor_its_own_bucket(self):
        placements, needs = ipc_packing([10, 300, 0, 700, 2000, 5], 1024)
        self.assertEqual(placements, [(0, 0), (0, 256), (0, 768), (1, 0), (2, 0), (3, 0)])
        self.assertEqual(needs, [768, 768, 2048, 256])
        self.assertEqual(ipc_packing([], 1024), ([], []))


FAKE_LIBCUDA = r"""
#include <stdint.h>
#include <string.h>
#include <stdbool.h>
/* One allocation [BASE, BASE + SIZE) with buffer id 42, not IPC-capable past ODD. */
#define BASE 0x7f0000000000ULL
#define SIZE (64ULL << 20)
#define ODD 0x7f0001000000ULL
int cuPointerGetAttributes(unsigned n, const int *attrs, void **data, uint64_t ptr) {
  for (unsigned i = 0; i < n; i++) {
    bool inside = ptr >= BASE && ptr < BASE + SIZE;
    switch (attrs[i]) {
      case 7: *(unsigned long long *)data[i] = inside ? 42 : 0; break;
      case 11: *(uint64_t *)data[i] = inside ? BASE : 0; break;
      case 12: *(size_t *)data[i] = inside ? SIZE : 0; break;
      case 10: *(bool *)data[i] = inside && ptr < ODD; break; /* one byte, as a C bool */
      default: return 1; /* CUDA_ERROR_INVALID_VALUE */
    }
  }
  return 0;
}
int cuIpcGetMemHandle(unsigned char *handle, uint64_t base) {
  if (base != BASE) return 400; /* CUDA_ERROR_INVALID_HANDLE */
  for (int i = 0; i < 64; i++) handle[i] = (unsigned char)(i * 3 + 1);
  return 0;
}
int cuGetErrorString(int status, const char **text) {
  *text = status == 400 ? "invalid resource handle" : "invalid argument";
  return 0;
}
"""


@unittest.skipUnless(shutil.which("cc"), "needs a C compiler for the fake libcuda")
class CudaDriverTest(unittest.TestCase):
    """CudaDriver's ctypes calls against a fake libcuda built here: the attributes asked, the
    slots they are written to (a one-byte bool among 8-byte values), the handle's bytes, errors."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="fake-libcuda-")
        src = os.path.join(cls.dir, "fake.c")
        with open(src, "w") as f:
            f.write(FAKE_LIBCUDA)
        cls.lib = os.path.join(cls.dir, "libcuda.so.1")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", cls.lib, src], check=True)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)

    def test_locate_and_handle(self):
        d = CudaDriver(self.lib)
        base = 0x7F00_0000_0000
        a = d.locate(base + 4096)
        self.assertEqual(a, CudaAllocation(42, base, 64 << 20, True))
        self.assertFalse(d.locate(base + (16 << 20)).ipc)
        self.assertEqual(d.ipc_handle(a), bytes((i * 3 + 1) % 256 for i in range(64)))
        with self.assertRaisesRegex(ValueError, "not in a CUDA allocation"):
            d.locate(0x1000)
        with self.assertRaisesRegex(RuntimeError, r"cuIpcGetMemHandle: invalid resource handle \(CUresult 400\)"):
            d.ipc_handle(CudaAllocation(1, base + 512, 4096, True))


class FakeDType:
    def __init__(self, name, size):
        self.name, self.size = name, size

    def __repr__(self):
        return f"torch.{self.name}"


class FakeDevice:
    def __init__(self, kind, index=None):
        self.type, self.index = kind, index

    def __eq__(self, other):
        return (self.type, self.index) == (other.type, other.index)

    def __hash__(self):
        return hash((self.type, self.index))


class FakeTensor:
    """Just what the client asks of a torch tensor: an address, a device, a dtype, a shape."""

    def __init__(self, world, dtype, shape, device, ptr, contiguous=True, name="?"):
        self.world, self.dtype, self.shape, self.device = world, dtype, tuple(shape), device
        self.ptr, self.contiguous, self.name = ptr, contiguous, name

    @property
    def is_cuda(self):
        return self.device.type == "cuda"

    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self):
        return self.dtype.size

    def data_ptr(self):
        return self.ptr

    def is_contiguous(self):
        return self.contiguous

    def detach(self):
        return self

    def __getitem__(self, s):
        size = self.dtype.size
        return FakeTensor(self.world, self.dtype, (s.stop - s.start,), self.device, self.ptr + s.start * size)

    def view(self, to):
        if isinstance(to, FakeDType):
            return FakeTensor(self.world, to, (self.numel() * self.dtype.size // to.size,), self.device, self.ptr)
        return FakeTensor(self.world, self.dtype, to, self.device, self.ptr)

    def copy_(self, other):
        self.world.copies.append((self.ptr, other.name, self.dtype, self.shape))
        return self


FakeTensor.__module__ = "torch"


class FakeTorch(types.ModuleType):
    """A stand-in ``torch`` module over a FakeDriver: ``empty`` allocates a fake allocation."""

    def __init__(self, driver):
        super().__init__("torch")
        self.driver = driver
        self.copies = []
        self.syncs = 0
        self.empties = 0
        names = [("float64", 8), ("float32", 4), ("float16", 2), ("bfloat16", 2), ("int64", 8),
                 ("int32", 4), ("int16", 2), ("int8", 1), ("uint8", 1), ("bool", 1)]
        for n, size in names:
            setattr(self, n, FakeDType(n, size))
        world = self

        class Stream:
            def synchronize(self):
                world.syncs += 1

        self.cuda = types.SimpleNamespace(
            device=lambda d: contextlib.nullcontext(), current_stream=lambda d: Stream())

    def no_grad(self):
        return contextlib.nullcontext()

    def empty(self, n, dtype, device):
        self.empties += 1
        a = self.driver.alloc(n + 4096)
        return FakeTensor(self, dtype, (n,), device, a.base + 512, name="bucket")

    def tensor(self, name, dtype, shape, device, ptr, contiguous=True):
        return FakeTensor(self, getattr(self, dtype), shape, device, ptr, contiguous, name)


def reply_json(handler, body):
    """Answers the request `handler` serves with 200 and the JSON bytes `body`."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Recorder(http.server.BaseHTTPRequestHandler):
    """A local server that answers every request with {"path": "ipc"} and records it."""

    calls = []

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        Recorder.calls.append((self.path, json.loads(self.rfile.read(n) or b"{}")))
        reply_json(self, b'{"path": "ipc", "version": 1}')

    def do_GET(self):
        Recorder.calls.append((self.path, None))
        reply_json(self, b'{"ipc": true}' if self.path == "/v1/model" else b"{}")

    def log_message(self, *args):
        pass


class FakeCudaServerCase(unittest.TestCase):
    """A client with a fake ``torch`` and fake driver, against a local server answering with
    ``handler`` (a BaseHTTPRequestHandler class), started for each test."""

    handler = None

    def setUp(self):
        self.driver = FakeDriver()
        self.torch = FakeTorch(self.driver)
        self.saved = sys.modules.get("torch")
        sys.modules["torch"] = self.torch
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()
        self.client = LayerwiseClient(f"http://127.0.0.1:{self.srv.server_address[1]}")
        self.client._driver = self.driver
        self.client._handles = IpcHandleCache(self.driver.ipc_handle)

    def tearDown(self):
        self.srv.shutdown()
        self.srv.server_close()
        if self.saved is None:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = self.saved


class ZeroCopyClientTest(FakeCudaServerCase):
    """``update_from_tensors(transport="ipc")`` end to end against a recording server, with a
    fake ``torch`` and fake driver: which tensors go zero-copy, the bucket copies of the rest,
    the table posted, handles reused across calls and stale ones released."""

    handler = Recorder

    def setUp(self):
        Recorder.calls = []
        super().setUp()

    def push(self, items, **kw):
        Recorder.calls = []
        self.client.update_from_tensors(items, transport="ipc", **kw)
        return list(Recorder.calls)

    def test_auto_asks_the_server_once_whether_it_takes_ipc(self):
        t = self.torch
        a = self.driver.alloc(2 << 20)
        items = [("w", t.tensor("w", "bfloat16", (4, 8), FakeDevice("cuda", 0), a.base))]
        paths = []
        for _ in range(3):
            Recorder.calls = []
            self.client.update_from_tensors(items, transport="auto")
            paths.append([c[0] for c in Recorder.calls])
        self.assertEqual(paths, [["/v1/model", "/v1/update/ipc"], ["/v1/update/ipc"], ["/v1/update/ipc"]])

    def test_zero_copy_mixed_with_packing_then_cached_then_released(self):
        t = self.torch
        gpu0, gpu1, cpu = FakeDevice("cuda", 0), FakeDevice("cuda", 1), FakeDevice("cpu")
        a = self.driver.alloc(64 << 20)
        b = self.driver.alloc(2 << 20)
        items = [
            ("w1", t.tensor("w1", "bfloat16", (4, 8), gpu0, a.base + 1024)),
            ("w2", t.tensor("w2", "bfloat16", (16,), gpu0, a.base + 2048)),
            ("n1", t.tensor("n1", "float32", (2, 2), gpu0, b.base)),
            ("cpu", t.tensor("cpu", "float32", (3,), cpu, 0x5000)),
            ("strided", t.tensor("strided", "bfloat16", (8, 4), gpu0, a.base + 4096, contiguous=False)),
            ("far", t.tensor("far", "bfloat16", (5,), gpu1, 0x9000_0000_0000)),
        ]
        calls = self.push(items)
        self.assertEqual([c[0] for c in calls], ["/v1/update/ipc"])
        body = calls[0][1]
        (bucket,) = self.client._buckets
        c = self.driver.locate(bucket.data_ptr())
        at = bucket.data_ptr() - c.base  # the bucket's own offset in its allocation
        self.assertEqual(body["buckets"], [
            {"handle": b64_handle(a), "bytes": 2048 + 32},
            {"handle": b64_handle(b), "bytes": 16},
            {"handle": b64_handle(c), "bytes": at + 512 + 10},
        ])
        self.assertEqual([(x["name"], x["dtype"], x["shape"], x["bucket"], x["offset"]) for x in body["tensors"]], [
            ("w1", "BF16", [4, 8], 0, 1024), ("w2", "BF16", [16], 0, 2048), ("n1", "F32", [2, 2], 1, 0),
            ("cpu", "F32", [3], 2, at), ("strided", "BF16", [8, 4], 2, at + 256), ("far", "BF16", [5], 2, at + 512),
        ])
        # Each packed tensor copied once, as itself, into its place; the stream synchronized
        # before the tensors are read and after the copies.
        self.assertEqual([(p - bucket.data_ptr(), n, d.name, s) for p, n, d, s in t.copies], [
            (0, "cpu", "float32", (3,)), (256, "strided", "bfloat16", (8, 4)), (512, "far", "bfloat16", (5,)),
        ])
        self.assertEqual(t.syncs, 2)
        st = self.client.last_ipc
        self.assertEqual((st.zero_copy, st.buckets, st.new_handles, st.released, st.path), (3, 3, 3, 0, "mixed"))
        self.assertEqual(st.packed, {"on the host": 1, "not contiguous": 1, "on cuda:1, the server reads cuda:0": 1})

        # Same tensors again: the same table, no handle asked of the driver, the bucket reused.
        t.copies.clear()
        again = self.push(items)
        self.assertEqual(again, calls)
        self.assertEqual((self.driver.handle_calls, t.empties, len(t.copies)), (3, 1, 3))
        self.assertEqual(self.client.last_ipc.new_handles, 0)

        # n1 now lives in a new allocation at b's old address: b's handle is released first.
        b2 = self.driver.alloc(2 << 20, base=b.base)
        moved = self.push(items, tag="t")
        self.assertEqual([p for p, _ in moved], ["/v1/update/ipc/release", "/v1/update/ipc"])
        self.assertEqual(moved[0][1], {"handles": [b64_handle(b)]})
        self.assertEqual(moved[1][1]["buckets"][1]["handle"], b64_handle(b2))
        self.assertEqual(moved[1][1]["tag"], "t")
        self.assertEqual((self.client.last_ipc.new_handles, self.client.last_ipc.released), (1, 1))

        # Only zero-copy tensors: one sync; the bucket goes back and its handle is released.
        t.syncs = 0
        self.push(items[:3])
        self.assertEqual(t.syncs, 1)
        self.assertEqual(self.client._buckets, [])
        self.assertEqual(Recorder.calls[0], ("/v1/update/ipc/release", {"handles": [b64_handle(c)]}))
        self.assertEqual(self.client.last_ipc.path, "zero-copy")

        # ipc_copy: everything through a (new, bigger) bucket; a and b2 are no longer sent.
        t.copies.clear()
        forced = self.push(items[:3], ipc_copy=True)
        self.assertEqual(forced[0], ("/v1/update/ipc/release", {"handles": [b64_handle(a), b64_handle(b2)]}))
        self.assertEqual(len(forced[1][1]["buckets"]), 1)
        self.assertEqual([n for _, n, _, _ in t.copies], ["w1", "w2", "n1"])
        self.assertEqual(self.client.last_ipc.path, "copy")
        self.assertEqual(self.client.last_ipc.packed, {"ipc_copy": 3})

        # close() asks the server to close what it still holds of this client.
        last = forced[1][1]["buckets"][0]["handle"]
        Recorder.calls = []
        self.client.close()
        self.assertEqual(Recorder.calls, [("/v1/update/ipc/release", {"handles": [last]})])
        self.assertEqual(len(self.client._handles), 0)

    def test_the_tensors_json_is_reused_only_while_the_tensors_are_the_same(self):
        t, gpu = self.torch, FakeDevice("cuda", 0)
        a = self.driver.alloc(64 << 20)
        w1 = t.tensor("w1", "bfloat16", (4, 8), gpu, a.base)

        def sent(w2, name="w2", **kw):
            call = self.push([("w1", w1), (name, w2)], **kw)[-1]
            self.assertEqual(call[0], "/v1/update/ipc")
            return [(x["name"], x["dtype"], x["shape"], x["bucket"], x["offset"]) for x in call[1]["tensors"]]

        first = sent(t.tensor("w2", "bfloat16", (16,), gpu, a.base + 1024))
        self.assertEqual(first, [("w1", "BF16", [4, 8], 0, 0), ("w2", "BF16", [16], 0, 1024)])
        self.assertEqual(sent(t.tensor("w2", "bfloat16", (16,), gpu, a.base + 1024), tag="x"), first)
        # Each change of a tensor's place, shape, dtype or name is what the body says.
        self.assertEqual(sent(t.tensor("w2", "bfloat16", (16,), gpu, a.base + 2048))[1],
                         ("w2", "BF16", [16], 0, 2048))
        self.assertEqual(sent(t.tensor("w2", "bfloat16", (4, 4), gpu, a.base + 2048))[1],
                         ("w2", "BF16", [4, 4], 0, 2048))
        self.assertEqual(sent(t.tensor("w2", "float16", (4, 4), gpu, a.base + 2048))[1],
                         ("w2", "F16", [4, 4], 0, 2048))
        self.assertEqual(sent(t.tensor("w2", "float16", (4, 4), gpu, a.base + 2048), name="w3")[1],
                         ("w3", "F16", [4, 4], 0, 2048))
        b = self.driver.alloc(2 << 20)
        self.assertEqual(sent(t.tensor("w2", "bfloat16", (16,), gpu, b.base + 1024))[1],
                         ("w2", "BF16", [16], 1, 1024))
        self.assertEqual(sent(t.tensor("w2", "bfloat16", (16,), gpu, a.base + 1024)), first)

    def test_ipc_needs_torch_tensors_one_on_cuda(self):
        cpu = FakeDevice("cpu")
        with self.assertRaisesRegex(ValueError, "at least one of them on CUDA"):
            self.client.update_from_tensors([("x", self.torch.tensor("x", "float32", (1,), cpu, 0x10))],
                                            transport="ipc")
        self.assertEqual(Recorder.calls, [])


class KeptAlive(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 server that keeps connections open, counts them, records each request, answers
    with a Server-Timing header, and, when told, closes a connection after answering as a server
    closing an idle one would (no ``Connection: close`` in the answer)."""

    protocol_version = "HTTP/1.1"
    connections = 0
    calls: list = []
    close_after = False
    busy = False  # release answers 409
    drop_unanswered = 0  # requests read, then their connection closed with no answer
    keys: list = []  # the Idempotency-Key of each request

    def setup(self):
        super().setup()
        KeptAlive.connections += 1
        # Answers go out as two writes (headers, body): without this, Nagle's algorithm holds
        # the body for the client's delayed ACK on a kept connection.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        KeptAlive.calls.append((self.path, json.loads(self.rfile.read(n) or b"{}")))
        KeptAlive.keys.append(self.headers.get("Idempotency-Key"))
        if KeptAlive.drop_unanswered > 0:
            # As a server that applied the update and lost the connection before its answer.
            KeptAlive.drop_unanswered -= 1
            self.close_connection = True
            return
        if self.path == "/v1/update/ipc/release" and KeptAlive.busy:
            body = b'{"error": {"code": "BUSY", "message": "an update is running"}}'
            self.send_response(409)
        else:
            body = b'{"path": "ipc", "version": 1}'
            self.send_response(200)
            self.send_header("Server-Timing", "read;dur=0.250, parse;dur=1.5, update;dur=12.125")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if KeptAlive.close_after:
            self.close_connection = True

    def log_message(self, *args):
        pass


class KeepAliveTest(FakeCudaServerCase):
    """JSON requests share one kept-alive connection; one the server closed is replaced and the
    request is sent once."""

    handler = KeptAlive

    def setUp(self):
        KeptAlive.connections, KeptAlive.calls, KeptAlive.close_after, KeptAlive.busy = 0, [], False, False
        KeptAlive.drop_unanswered, KeptAlive.keys = 0, []
        super().setUp()
        a = self.driver.alloc(2 << 20)
        self.items = [("w", self.torch.tensor("w", "bfloat16", (4, 8), FakeDevice("cuda", 0), a.base))]

    def tearDown(self):
        self.client.close()
        super().tearDown()

    def push(self):
        return self.client.update_from_tensors(self.items, transport="ipc")

    def test_one_connection_for_many_requests_errors_included(self):
        for _ in range(3):
            self.assertEqual(self.push()["path"], "ipc")
        KeptAlive.busy = True
        with self.assertRaises(LayerwiseError) as e:
            self.client.release_ipc()
        KeptAlive.busy = False
        self.assertEqual((e.exception.status, e.exception.code), (409, "BUSY"))
        self.push()
        self.assertEqual(KeptAlive.connections, 1)
        self.assertEqual([c[0] for c in KeptAlive.calls],
                         ["/v1/update/ipc"] * 3 + ["/v1/update/ipc/release", "/v1/update/ipc"])
        st = self.client.last_ipc
        self.assertEqual(st.server_timing, {"read": 0.25, "parse": 1.5, "update": 12.125})
        self.assertGreater(st.request_seconds, 0)
        self.assertGreater(st.table_seconds, 0)

    def test_a_connection_the_server_closed_is_replaced_and_the_request_sent_once(self):
        import layerwise_client

        KeptAlive.close_after = True
        self.push()
        # Seen closed before it is used.
        for _ in range(20):
            if layerwise_client._dropped(self.client._idle):
                break
            threading.Event().wait(0.01)
        self.push()
        self.assertEqual((KeptAlive.connections, len(KeptAlive.calls)), (2, 2))
        # Closed unseen (as if the server closed it just as the request went out): the request
        # fails on the kept connection before any answer, and goes once more on a new one.
        saved = layerwise_client._dropped
        layerwise_client._dropped = lambda conn: False
        try:
            threading.Event().wait(0.05)
            self.push()
        finally:
            layerwise_client._dropped = saved
        self.assertEqual((KeptAlive.connections, len(KeptAlive.calls)), (3, 3))


    def test_a_resent_post_carries_the_key_of_the_first_send(self):
        # The server reads the update and the kept connection breaks before its answer: the
        # client sends it once more on a new connection, with the same Idempotency-Key, so a
        # server that applied the first answers the second from its cache instead of applying
        # it again. Different calls carry different keys.
        self.push()
        KeptAlive.drop_unanswered = 1
        self.assertEqual(self.push()["path"], "ipc")
        self.assertEqual(len(KeptAlive.calls), 3)
        first, dropped, resent = KeptAlive.keys
        self.assertRegex(dropped, r"^[0-9a-f]{32}$")
        self.assertEqual(resent, dropped)
        self.assertNotEqual(first, dropped)
        self.assertEqual(KeptAlive.connections, 2)

class ClientTest(unittest.TestCase):
    def setUp(self):
        self.client = LayerwiseClient(URL, token=TOKEN)

    def tearDown(self):
        self.client.close()

    def test_1_model_describes_expected_tensors(self):
        m = self.client.model()
        self.assertEqual(m["architecture"], "LlamaForCausalLM")
        names = {t["name"] for t in m["tensors"]}
        self.assertEqual(names, {n for n, _ in read_safetensors(CKPT)})
        for t in m["tensors"]:
            self.assertIn(t["dtype"], ("BF16", "F32", "F16"))
        self.assertEqual(self.client.health()["status"], "ok")

    def test_2_http_stream_from_tensors_then_export(self):
        before = self.client.model()["version"]
        # Reversed: layers arrive out of order, the server must still take them.
        tensors = list(reversed(read_safetensors(SCALED)))
        r = self.client.update_from_tensors(tensors, transport="http", atomic=True, tag="py-scaled")
        self.assertEqual(r["version"], before + 1)
        self.assertEqual(r["tag"], "py-scaled")
        self.assertTrue(r["storageKept"])
        with open(os.path.join(OUT, "scaled-http.safetensors"), "wb") as f:
            f.write(self.client.export())
        r = self.client.update_from_tensors(read_safetensors(CKPT), transport="auto", tag="py-ckpt")
        self.assertEqual(r["path"], "stream")  # RawTensors never go over IPC
        with open(os.path.join(OUT, "ckpt-http.safetensors"), "wb") as f:
            f.write(self.client.export())

    def test_3_update_from_disk(self):
        before = self.client.model()["version"]
        r = self.client.update_from_disk(SCALED, atomic=True, tag="disk")
        self.assertEqual(r["version"], before + 1)
        self.assertEqual(r["path"], "disk")
        with open(os.path.join(OUT, "scaled-disk.safetensors"), "wb") as f:
            f.write(self.client.export())
        self.assertEqual(self.client.model()["tag"], "disk")

    def test_4_errors_carry_status_and_code(self):
        with self.assertRaises(LayerwiseError) as e, LayerwiseClient(URL, token="wrong-token-0123456789") as c:
            c.model()
        self.assertEqual((e.exception.status, e.exception.code), (401, "UNAUTHORIZED"))
        with self.assertRaises(LayerwiseError) as e:
            self.client.update_from_disk(OUTSIDE)
        self.assertEqual((e.exception.status, e.exception.code), (403, "FORBIDDEN_PATH"))
        tensors = read_safetensors(CKPT)
        name, t = tensors[0]
        # Same bytes, a 1-D shape the model does not have.
        bad = [(name, RawTensor(t.dtype, (len(t.data) // 2,), t.data))] + tensors[1:]
        before = self.client.model()["version"]
        with self.assertRaises(LayerwiseError) as e:
            self.client.update_from_tensors(bad, transport="http", atomic=True)
        self.assertEqual(e.exception.status, 422)
        self.assertEqual(e.exception.code, "SHAPE_MISMATCH")
        self.assertEqual(self.client.model()["version"], before)
        with self.assertRaises(ValueError):
            self.client.update_from_tensors(tensors, transport="ipc")
        with self.assertRaises(ValueError):
            self.client.update_from_tensors([("x", RawTensor("BF16", (3,), b"\0" * 5))], transport="http")

    def test_5_body_is_streamed_header_first(self):
        # A local server that records what arrives: the header comes first, with offsets from
        # the shapes, then each tensor's bytes in the given order, and Content-Length matches.
        seen = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                n = int(self.headers["Content-Length"])
                seen["body"] = self.rfile.read(n)
                seen["path"] = self.path
                reply_json(self, b'{"version": 1}')

            def log_message(self, *args):
                pass

        srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=srv.handle_request)
        thread.start()
        try:
            a = RawTensor("BF16", (2, 3), bytes(range(12)))
            b = RawTensor("F32", (1,), struct.pack("<f", 1.5))
            client = LayerwiseClient(f"http://127.0.0.1:{srv.server_address[1]}")
            client.update_from_tensors([("b.weight", b), ("a.weight", a)], transport="http", atomic=True, tag="t 1")
        finally:
            thread.join(10)
            srv.server_close()
        body = seen["body"]
        header = safetensors_header([("b.weight", "F32", (1,), 4), ("a.weight", "BF16", (2, 3), 12)])
        self.assertEqual(body[:len(header)], header)
        self.assertEqual(body[len(header):], struct.pack("<f", 1.5) + bytes(range(12)))
        (n,) = struct.unpack("<Q", body[:8])
        self.assertEqual(n % 8, 0)
        h = json.loads(body[8:8 + n])
        self.assertEqual(h["b.weight"]["data_offsets"], [0, 4])
        self.assertEqual(h["a.weight"]["data_offsets"], [4, 16])
        self.assertEqual(seen["path"], "/v1/update/stream?atomic=true&tag=t+1")


if __name__ == "__main__":
    unittest.main(verbosity=2)

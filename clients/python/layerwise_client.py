"""Trainer-side client of the layerwise weight-update server (`deno task serve`).

One file, the Python standard library only; PyTorch is imported only when the client is handed
torch tensors. Copy it next to your training script.

    from layerwise_client import LayerwiseClient

    client = LayerwiseClient("http://127.0.0.1:8471", token=None)
    print(client.model()["version"])
    client.update_from_disk("/checkpoints/step-1200", atomic=True, tag="step-1200")
    client.update_from_tensors(model.state_dict().items(), transport="auto", tag="step-1201")

Transports of ``update_from_tensors``:

* ``"http"``: a safetensors body streamed tensor by tensor (``PUT /v1/update/stream``). The
  header is written first from the tensors' dtypes and shapes, then each tensor's bytes; only
  one tensor is copied to host memory at a time, the body is never built in memory.
* ``"ipc"``: CUDA tensors are packed into a few device buckets that the client keeps and
  reuses (one CUDA IPC handle per bucket); the server maps them (cached while they stay the
  same), reloads straight from them and answers once it no longer reads them.
* ``"nccl"``: after :meth:`LayerwiseClient.init_nccl` (the trainer and the server join one
  NCCL communicator), the tensor list is posted and the tensors are broadcast from the
  trainer's rank packed into buckets by :func:`pack_buckets`, the server's rule; the server
  reloads each bucket as it arrives. NCCL is reached through ``ctypes`` on the
  ``libnccl.so.2`` PyTorch ships (``LAYERWISE_NCCL_LIB`` overrides the path).
* ``"auto"``: IPC when every tensor is a CUDA tensor and the server runs on CUDA; if the server
  cannot open the handles (another GPU, another host) it falls back to HTTP.

Errors from the server raise :class:`LayerwiseError` with the HTTP status and the server's
error code and one-line message.
"""

from __future__ import annotations

import base64
import ctypes
import glob
import http.client
import json
import os
import struct
import threading
import time
import urllib.parse
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple

__all__ = ["LayerwiseClient", "LayerwiseError", "RawTensor", "pack_buckets"]

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024
_IPC_ALIGN = 256
# Offsets of tensors in an NCCL bucket are multiples of this (the server's rule).
NCCL_ALIGN = 256

# safetensors dtype -> element size
_DTYPE_SIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}


class LayerwiseError(Exception):
    """An error answer of the server: HTTP status, error code, one-line message."""

    def __init__(self, status: int, code: str, message: str, body: Optional[dict] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}


class RawTensor(NamedTuple):
    """A tensor given as bytes: safetensors dtype name, shape, little-endian row-major data."""

    dtype: str
    shape: Tuple[int, ...]
    data: Any  # bytes, bytearray or memoryview


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _is_torch(t: Any) -> bool:
    return type(t).__module__.startswith("torch") and hasattr(t, "data_ptr")


def _torch_dtype_name(t: Any) -> str:
    import torch  # only when handed torch tensors

    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
        torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
        torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    }
    for attr, name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = name
    if t.dtype not in names:
        raise ValueError(f"dtype {t.dtype} has no safetensors name")
    return names[t.dtype]


def _describe(name: str, t: Any) -> Tuple[str, Tuple[int, ...], int]:
    if isinstance(t, RawTensor):
        shape = tuple(int(d) for d in t.shape)
        if t.dtype not in _DTYPE_SIZE:
            raise ValueError(f"{name}: unknown dtype {t.dtype!r}")
        nbytes = _numel(shape) * _DTYPE_SIZE[t.dtype]
        if len(memoryview(t.data).cast("B")) != nbytes:
            raise ValueError(f"{name}: {len(memoryview(t.data))} bytes for {t.dtype}{list(shape)}")
        return t.dtype, shape, nbytes
    if _is_torch(t):
        return _torch_dtype_name(t), tuple(int(d) for d in t.shape), t.numel() * t.element_size()
    raise TypeError(f"{name}: expected a torch.Tensor or a RawTensor, got {type(t).__name__}")


def _host_bytes(t: Any) -> Tuple[memoryview, Any]:
    """The tensor's bytes on the host (one tensor at a time) and an owner to keep alive."""
    if isinstance(t, RawTensor):
        return memoryview(t.data).cast("B"), t
    host = t.detach()
    if host.is_cuda:
        host = host.to("cpu")
    host = host.contiguous()
    n = host.numel() * host.element_size()
    if n == 0:
        return memoryview(b""), host
    # ctypes view of the CPU tensor's memory: no numpy needed, no extra copy.
    buf = (ctypes.c_char * n).from_address(host.data_ptr())
    return memoryview(buf).cast("B"), host


def _align(n: int, to: int = NCCL_ALIGN) -> int:
    return (n + to - 1) // to * to


def ipc_mem_handle(shared: bytes) -> bytes:
    """The 64-byte ``cudaIpcMemHandle_t`` in the handle PyTorch's ``_share_cuda_()`` returns.

    PyTorch before 2.3 gives the 64 bytes alone; later versions prefix a version byte (2) and
    the kind of memory: ``c`` for the caching allocator's ``cudaMalloc`` blocks, ``e`` for
    expandable segments, which are shared by file descriptor and cannot be opened from a handle.
    """
    raw = bytes(shared)
    if len(raw) == 64:
        return raw
    if len(raw) == 66 and raw[0] == 2:
        if raw[1:2] == b"c":
            return raw[2:]
        if raw[1:2] == b"e":
            raise ValueError(
                "this tensor lives in an expandable segment (PYTORCH_CUDA_ALLOC_CONF="
                "expandable_segments:True), which CUDA IPC handles cannot share: turn it off in "
                "the trainer, or use transport='http'"
            )
    raise ValueError(
        f"unknown CUDA IPC handle from PyTorch: {len(raw)} bytes starting {raw[:2].hex()} "
        "(expected 64 bytes, or 66 with version 2 and kind 'c')"
    )


def pack_buckets(sizes: Sequence[int], bucket_bytes: int) -> Tuple[int, List[Tuple[int, int]], List[int]]:
    """The packing of an NCCL update, identical to the server's: tensors of byte sizes ``sizes``
    in order; each starts at the next multiple of 256 after the end of the one before it in its
    bucket; a tensor that would end past the capacity starts the next bucket at offset 0. The
    capacity is ``bucket_bytes`` raised to the largest tensor rounded up to 256.

    Returns (capacity, (bucket, offset) of each tensor, bytes broadcast per bucket: up to the
    end of its last tensor).
    """
    cap = max([int(bucket_bytes)] + [_align(int(n)) for n in sizes])
    placements: List[Tuple[int, int]] = []
    lengths: List[int] = []
    used, count = 0, 0
    for n in sizes:
        n = int(n)
        if count > 0 and _align(used) + n > cap:
            lengths.append(used)
            used, count = 0, 0
        at = _align(used)
        placements.append((len(lengths), at))
        used, count = at + n, count + 1
    if count > 0:
        lengths.append(used)
    return cap, placements, lengths


class _NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]


_NCCL_UINT8 = 1


def _load_nccl() -> Any:
    """libnccl.so.2: LAYERWISE_NCCL_LIB, else the one PyTorch ships (torch/lib or the
    nvidia-nccl wheel), else the dynamic loader's search path."""
    candidates = []
    if os.environ.get("LAYERWISE_NCCL_LIB"):
        candidates.append(os.environ["LAYERWISE_NCCL_LIB"])
    try:
        import torch  # noqa: F401  (loads the NCCL it was built with)

        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        site = os.path.dirname(os.path.dirname(torch.__file__))
        candidates += sorted(glob.glob(os.path.join(torch_lib, "libnccl.so*")))
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "nccl", "lib", "libnccl.so*")))
    except ImportError:
        pass
    candidates.append("libnccl.so.2")
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                         _NcclUniqueId, ctypes.c_int]
        lib.ncclBroadcast.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ncclCommAbort.argtypes = [ctypes.c_void_p]
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        lib.ncclCommGetAsyncError.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        return lib
    raise RuntimeError("NCCL not found (set LAYERWISE_NCCL_LIB): " + "; ".join(errors))


def _nccl_check(lib: Any, op: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"{op}: {lib.ncclGetErrorString(status).decode()} (ncclResult {status})")


class _Background:
    """A request answered on a thread while this one drives NCCL."""

    def __init__(self, call: Any):
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Any) -> None:
        try:
            self.result = call()
        except BaseException as e:  # handed to the caller's thread
            self.error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def get(self) -> Any:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.result


def safetensors_header(described: Sequence[Tuple[str, str, Tuple[int, ...], int]]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file whose tensors follow in order."""
    header = {}
    offset = 0
    for name, dtype, shape, nbytes in described:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text


class LayerwiseClient:
    """A client of one server. Not thread-safe; one update at a time (the server enforces it)."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 600.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"url must be http:// or https://, got {url!r}")
        self._scheme = parsed.scheme
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._base = parsed.path.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._buckets: list = []  # reused CUDA buckets: (tensor, handle_b64, base_offset, bytes)
        self._nccl: Any = None  # (library, communicator, rank, device)
        self._nccl_slots: list = []  # two device buckets of the NCCL transport

    # ------------------------------------------------------------------ plumbing

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self._timeout)

    def _headers(self, extra: Optional[dict] = None) -> dict:
        h = dict(extra or {})
        if self._token is not None:
            h["Authorization"] = f"Bearer {self._token}"
        return h

    @staticmethod
    def _answer(resp: http.client.HTTPResponse) -> Any:
        raw = resp.read()
        ctype = resp.getheader("content-type", "")
        body: Any = raw
        if "json" in ctype:
            body = json.loads(raw.decode("utf-8")) if raw else {}
        if resp.status >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise LayerwiseError(
                resp.status,
                err.get("code", "HTTP_ERROR"),
                err.get("message", body.get("message", "") if isinstance(body, dict) else str(raw[:200])),
                body if isinstance(body, dict) else None,
            )
        return body

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        conn = self._connection()
        try:
            data = None if payload is None else json.dumps(payload).encode("utf-8")
            headers = self._headers({"Content-Type": "application/json"} if data is not None else {})
            conn.request(method, self._base + path, body=data, headers=headers)
            return self._answer(conn.getresponse())
        finally:
            conn.close()

    # ------------------------------------------------------------------ endpoints

    def health(self) -> dict:
        """``GET /v1/health`` (also the 503 answers, as a dict with ``status``)."""
        conn = self._connection()
        try:
            conn.request("GET", self._base + "/v1/health", headers=self._headers())
            resp = conn.getresponse()
            return json.loads(resp.read().decode("utf-8"))
        finally:
            conn.close()

    def model(self) -> dict:
        """``GET /v1/model``: architecture, quantization, version, tag, expected tensors."""
        return self._request("GET", "/v1/model")

    def update_from_disk(self, path: str, *, atomic: bool = False, strict: bool = False,
                         partial: bool = False, tag: Optional[str] = None) -> dict:
        """``POST /v1/update/disk``: reload from a file or directory the server can read."""
        body: dict = {"path": str(path), "atomic": atomic, "strict": strict, "partial": partial}
        if tag is not None:
            body["tag"] = tag
        return self._request("POST", "/v1/update/disk", body)

    def update_from_tensors(self, named_tensors: Iterable[Tuple[str, Any]], *,
                            transport: str = "auto", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                            atomic: bool = False, strict: bool = False, partial: bool = False,
                            tag: Optional[str] = None) -> dict:
        """Pushes (name, tensor) pairs: torch tensors or :class:`RawTensor`. See the module doc."""
        items = [(str(n), t) for n, t in named_tensors]
        if transport not in ("auto", "http", "ipc", "nccl"):
            raise ValueError(f"transport must be auto, http, ipc or nccl, got {transport!r}")
        options = {"atomic": atomic, "strict": strict, "partial": partial, "tag": tag}
        all_cuda = bool(items) and all(_is_torch(t) and t.is_cuda for _, t in items)
        if transport == "nccl":
            if not all_cuda:
                raise ValueError("transport='nccl' needs CUDA torch tensors")
            return self._update_nccl(items, bucket_bytes, options)
        if transport == "ipc":
            if not all_cuda:
                raise ValueError("transport='ipc' needs CUDA torch tensors")
            return self._update_ipc(items, bucket_bytes, options)
        if transport == "auto" and all_cuda and self.model().get("ipc"):
            try:
                return self._update_ipc(items, bucket_bytes, options)
            except LayerwiseError as e:
                if e.code not in ("IPC_UNAVAILABLE", "IPC_OPEN_FAILED"):
                    raise
                self.release_buckets()
        return self._update_http(items, options)

    def export(self) -> bytes:
        """``GET /v1/export``: the kernel tensors as safetensors bytes."""
        return self._request("GET", "/v1/export")

    def metrics(self) -> str:
        """``GET /metrics`` in Prometheus text format."""
        return self._request("GET", "/metrics").decode("utf-8")

    def release_ipc(self, handles: Optional[Sequence[str]] = None) -> dict:
        """``POST /v1/update/ipc/release``: the server closes the given handles (all if None)."""
        return self._request("POST", "/v1/update/ipc/release", {} if handles is None else {"handles": list(handles)})

    def release_buckets(self) -> None:
        """Asks the server to close this client's handles, then frees the buckets."""
        if self._buckets:
            try:
                self.release_ipc([b[1] for b in self._buckets])
            finally:
                self._buckets = []

    def init_nccl(self, *, world_size: int = 2, rank: int = 0, server_rank: int = 1,
                  device: Any = None) -> dict:
        """Joins an NCCL communicator with the server (``POST /v1/update/nccl/init``): this
        process is ``rank`` on ``device`` (default: the current CUDA device), the server
        ``server_rank``. Blocks until both sides have joined; an earlier communicator of this
        client is aborted first."""
        import torch

        self.close_nccl(server=False)
        lib = _load_nccl()
        uid = _NcclUniqueId()
        _nccl_check(lib, "ncclGetUniqueId", lib.ncclGetUniqueId(ctypes.byref(uid)))
        body = {"unique_id": base64.b64encode(ctypes.string_at(ctypes.addressof(uid), 128)).decode("ascii"),
                "world_size": world_size, "rank_offset": server_rank}
        device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        answer = _Background(lambda: self._request("POST", "/v1/update/nccl/init", body))
        comm = ctypes.c_void_p()
        with torch.cuda.device(device):
            status = lib.ncclCommInitRank(ctypes.byref(comm), world_size, uid, rank)
        try:
            _nccl_check(lib, "ncclCommInitRank", status)
            result = answer.get()
        except BaseException:
            if comm.value:
                lib.ncclCommAbort(comm)
            raise
        self._nccl = (lib, comm, rank, device)
        return result

    def close_nccl(self, server: bool = True) -> None:
        """Leaves the communicator (this side aborts it) and asks the server to leave too."""
        if self._nccl is not None:
            lib, comm = self._nccl[0], self._nccl[1]
            self._nccl = None
            self._nccl_slots = []
            lib.ncclCommAbort(comm)
        if server:
            self._request("POST", "/v1/update/nccl/close", {})

    def close(self) -> None:
        """Releases the IPC buckets, if any, and aborts this side of the NCCL communicator."""
        self.release_buckets()
        if self._nccl is not None:
            self.close_nccl(server=False)

    def __enter__(self) -> "LayerwiseClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP transport

    def _update_http(self, items: list, options: dict) -> dict:
        described = [(n,) + _describe(n, t) for n, t in items]
        header = safetensors_header(described)
        total = len(header) + sum(d[3] for d in described)
        query = {k: "true" for k in ("atomic", "strict", "partial") if options.get(k)}
        if options.get("tag") is not None:
            query["tag"] = options["tag"]
        path = self._base + "/v1/update/stream" + ("?" + urllib.parse.urlencode(query) if query else "")
        conn = self._connection()
        try:
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            for k, v in self._headers({"Content-Type": "application/octet-stream",
                                       "Content-Length": str(total)}).items():
                conn.putheader(k, v)
            conn.endheaders()
            try:
                conn.send(header)
                for name, t in items:
                    data, owner = _host_bytes(t)
                    conn.send(data)
                    del data, owner
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered early (an error); read it below
            return self._answer(conn.getresponse())
        finally:
            conn.close()

    # ------------------------------------------------------------------ IPC transport

    def _bucket(self, index: int, nbytes: int, device: Any) -> tuple:
        import torch

        while len(self._buckets) <= index:
            self._buckets.append(None)
        b = self._buckets[index]
        if b is not None and b[3] >= nbytes and b[0].device == device:
            return b
        if b is not None:
            self.release_ipc([b[1]])
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        # (device, handle, size, offset, ...): the handle maps the allocator's whole block; the
        # bucket starts `offset` bytes into it.
        shared = buf.untyped_storage()._share_cuda_()
        handle, base = shared[1], int(shared[3])
        b = (buf, base64.b64encode(ipc_mem_handle(handle)).decode("ascii"), base, nbytes)
        self._buckets[index] = b
        return b

    def _update_ipc(self, items: list, bucket_bytes: int, options: dict) -> dict:
        import torch

        device = items[0][1].device
        # Plan: tensors in order, a new bucket when the current one is full; a tensor bigger
        # than a bucket gets a bucket of its own size.
        plan: list = []  # (bucket index, offset, name, tensor, dtype, shape, nbytes)
        sizes: list = []
        cur, used = -1, bucket_bytes
        for name, t in items:
            dtype, shape, nbytes = _describe(name, t)
            if t.device != device:
                raise ValueError(f"{name}: all tensors must be on {device}, got {t.device}")
            at = _align(used, _IPC_ALIGN)
            if cur < 0 or at + nbytes > sizes[cur]:
                cur += 1
                sizes.append(max(bucket_bytes, nbytes))
                at = 0
            plan.append((cur, at, name, t, dtype, shape, nbytes))
            used = at + nbytes
        buckets = [self._bucket(i, size, device) for i, size in enumerate(sizes)]
        with torch.no_grad():
            for i, at, _name, t, _dtype, _shape, nbytes in plan:
                if nbytes:
                    src = t.detach().contiguous().reshape(-1).view(torch.uint8)
                    buckets[i][0][at:at + nbytes].copy_(src)
        # The server reads on its own stream: every copy must be done before it is told.
        torch.cuda.current_stream(device).synchronize()
        body = {
            "buckets": [{"handle": b[1], "bytes": b[2] + b[3]} for b in buckets],
            "tensors": [
                {"name": name, "dtype": dtype, "shape": list(shape), "bucket": i,
                 "offset": buckets[i][2] + at}
                for i, at, name, _t, dtype, shape, _n in plan
            ],
            "atomic": options["atomic"], "strict": options["strict"], "partial": options["partial"],
        }
        if options.get("tag") is not None:
            body["tag"] = options["tag"]
        return self._request("POST", "/v1/update/ipc", body)

    # ------------------------------------------------------------------ NCCL transport

    def _update_nccl(self, items: list, bucket_bytes: int, options: dict) -> dict:
        import torch

        if self._nccl is None:
            raise ValueError("transport='nccl' needs init_nccl() first")
        lib, comm, rank, device = self._nccl
        described = [(name,) + _describe(name, t) for name, t in items]
        cap, placements, lengths = pack_buckets([d[3] for d in described], bucket_bytes)
        if len(self._nccl_slots) != 2 or self._nccl_slots[0].numel() < cap:
            self._nccl_slots = [torch.empty(cap, dtype=torch.uint8, device=device) for _ in range(2)]
        slots = self._nccl_slots
        body = {
            "tensors": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s, _ in described],
            "bucket_bytes": bucket_bytes, "src_rank": rank,
            "atomic": options["atomic"], "strict": options["strict"], "partial": options["partial"],
        }
        if options.get("tag") is not None:
            body["tag"] = options["tag"]
        by_bucket: list = [[] for _ in lengths]
        for (i, at), (_name, t), d in zip(placements, items, described):
            by_bucket[i].append((at, t, d[3]))
        answer = _Background(lambda: self._request("POST", "/v1/update/nccl", body))
        # Copies into a slot run on one stream, broadcasts on another; each waits for the
        # other through events, so bucket i+1 is packed while bucket i is on the wire.
        copy, wire = torch.cuda.Stream(device), torch.cuda.Stream(device)
        copy.wait_stream(torch.cuda.current_stream(device))
        packed = [torch.cuda.Event() for _ in slots]
        sent = [torch.cuda.Event() for _ in slots]
        with torch.no_grad():
            for i, n in enumerate(lengths):
                slot = slots[i % 2]
                with torch.cuda.stream(copy):
                    if i >= 2:
                        copy.wait_event(sent[i % 2])
                    for at, t, nbytes in by_bucket[i]:
                        if nbytes:
                            slot[at:at + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
                    packed[i % 2].record(copy)
                wire.wait_event(packed[i % 2])
                _nccl_check(lib, "ncclBroadcast", lib.ncclBroadcast(
                    ctypes.c_void_p(slot.data_ptr()), ctypes.c_void_p(slot.data_ptr()), n,
                    _NCCL_UINT8, rank, comm, ctypes.c_void_p(wire.cuda_stream)))
                sent[i % 2].record(wire)
        # A refused update receives nothing: the broadcasts would wait forever. Watch the
        # answer while they run; on an error, abort this side (the server left already).
        done = torch.cuda.Event()
        done.record(wire)
        while not done.query():
            if answer.done() and answer.error is not None:
                self.close_nccl(server=False)
                raise answer.error
            time.sleep(0.0005)
        return answer.get()

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
* ``"ipc"``: zero-copy: the server reads each CUDA tensor in place, from the trainer's own
  memory. The table names the CUDA allocations that hold the tensors (one IPC handle per
  allocation, however many tensors share it; handles cached across calls, so a loop that
  updates its parameters in place sends the same ones every step and the server maps nothing
  new) and each tensor's offset in its allocation. What cannot be read in place (a tensor on
  the host or another GPU, a non-contiguous one), or everything with ``ipc_copy=True``, is
  first copied into a few device buckets the client keeps and reuses. The server answers once
  it no longer reads any of them: until then the trainer must not modify those tensors.
  Memory of PyTorch's expandable segments (or a ``cudaMallocAsync`` pool) has no IPC handle,
  and neither have buckets allocated there: such a trainer gets a ``ValueError`` naming the
  setting, and uses ``"http"`` or ``"nccl"``.
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
import bisect
import ctypes
import glob
import http.client
import json
import os
import select
import struct
import threading
import time
import urllib.parse
import uuid
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "CudaAllocation", "CudaDriver", "IpcHandleCache", "IpcSource", "IpcStats", "LayerwiseClient",
    "LayerwiseError", "RawTensor", "ipc_packing", "ipc_routes", "ipc_table", "pack_buckets",
]

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


_TORCH_TYPES: dict = {}  # type -> whether it is a torch tensor type (asked per tensor, per call)


def _is_torch(t: Any) -> bool:
    k = type(t)
    r = _TORCH_TYPES.get(k)
    if r is None:
        r = _TORCH_TYPES[k] = k.__module__.startswith("torch") and hasattr(k, "data_ptr")
    return r


_TORCH_DTYPE_NAMES: dict = {}


def _torch_dtype_name(t: Any) -> str:
    names = _TORCH_DTYPE_NAMES
    if t.dtype in names:
        return names[t.dtype]
    import torch  # only when handed torch tensors

    names.update({
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
        torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
        torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    })
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
        return _torch_dtype_name(t), tuple(map(int, t.shape)), t.numel() * t.element_size()
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


def _ipc_source(name: str, t: Any) -> "IpcSource":
    dtype, shape, nbytes = _describe(name, t)
    return IpcSource(name, dtype, shape, nbytes, t.device.index if t.is_cuda else None,
                     int(t.data_ptr()) if nbytes else 0, bool(t.is_contiguous()))


def _server_timing(header: Optional[str]) -> Optional[dict]:
    """The durations (ms) of a Server-Timing header, by name; None without one."""
    if not header:
        return None
    out: dict = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "dur":
                try:
                    out[name.strip()] = float(v)
                except ValueError:
                    pass
    return out


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether a kept-alive connection can no longer carry a request: the server closed it (its
    end of file is readable) or sent something unasked."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _align(n: int, to: int = NCCL_ALIGN) -> int:
    return (n + to - 1) // to * to


class CudaAllocation(NamedTuple):
    """One CUDA allocation (one ``cudaMalloc``: a segment of PyTorch's caching allocator, which
    holds many tensors), as the driver describes the address of a tensor inside it."""

    id: int  # CU_POINTER_ATTRIBUTE_BUFFER_ID: unique over the process lifetime, never reused
    base: int  # its first byte: what an IPC handle maps, and what tensor offsets count from
    size: int  # its bytes
    ipc: bool  # cudaIpcGetMemHandle can share it (not an expandable segment, not a memory pool)


class IpcSource(NamedTuple):
    """What the IPC transport needs of one tensor (taken from a torch tensor by the client)."""

    name: str
    dtype: str  # safetensors name
    shape: Tuple[int, ...]
    nbytes: int
    device: Optional[int]  # CUDA device index; None for a tensor on the host
    ptr: int  # address of its first element (tensor.data_ptr(): storage + storage offset)
    contiguous: bool


class CudaDriver:
    """The two driver calls the zero-copy transport needs, through ``ctypes`` on ``libcuda.so.1``
    (``LAYERWISE_CUDA_LIB`` overrides the path): ``cuPointerGetAttributes`` (which allocation
    holds an address) and ``cuIpcGetMemHandle`` (its IPC handle). The driver is asked instead of
    PyTorch's ``storage._share_cuda_()``, which re-wraps the storage on every call (a new
    interprocess event and reference-counter slot each time) and, when the storage is freed,
    keeps its memory in "limbo" until the receiver decrements that counter, which this server
    (not a PyTorch process) never does: a training loop would leak a model's worth per step."""

    # CU_POINTER_ATTRIBUTE_BUFFER_ID, _RANGE_START_ADDR, _RANGE_SIZE, _IS_LEGACY_CUDA_IPC_CAPABLE
    _ATTRIBUTES = (7, 11, 12, 10)

    def __init__(self, path: Optional[str] = None):
        lib = ctypes.CDLL(path or os.environ.get("LAYERWISE_CUDA_LIB") or "libcuda.so.1")
        lib.cuPointerGetAttributes.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_int),
                                               ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint64]
        lib.cuPointerGetAttributes.restype = ctypes.c_int
        lib.cuIpcGetMemHandle.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        lib.cuIpcGetMemHandle.restype = ctypes.c_int
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorString.restype = ctypes.c_int
        self._lib = lib
        n = len(self._ATTRIBUTES)
        self._attributes = (ctypes.c_int * n)(*self._ATTRIBUTES)
        # One zeroed 8-byte slot per attribute: the driver writes a bool, an int, a size_t or a
        # 64-bit address into the low bytes (little-endian), so each reads back as a uint64.
        self._values = (ctypes.c_uint64 * n)()
        self._slots = (ctypes.c_void_p * n)(*[ctypes.addressof(self._values) + 8 * i for i in range(n)])

    def _check(self, call: str, status: int) -> None:
        if status != 0:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorString(status, ctypes.byref(text))
            raise RuntimeError(f"{call}: {(text.value or b'unknown error').decode()} (CUresult {status})")

    def locate(self, ptr: int) -> CudaAllocation:
        """The allocation that holds device address ``ptr``."""
        ctypes.memset(self._values, 0, ctypes.sizeof(self._values))
        self._check("cuPointerGetAttributes", self._lib.cuPointerGetAttributes(
            len(self._ATTRIBUTES), self._attributes, self._slots, ctypes.c_uint64(ptr)))
        buffer_id, base, size, ipc = (int(v) for v in self._values)
        if size == 0 or not base <= ptr < base + size:
            raise ValueError(f"address {ptr:#x} is not in a CUDA allocation of this process")
        return CudaAllocation(buffer_id, base, size, ipc != 0)

    def ipc_handle(self, allocation: CudaAllocation) -> bytes:
        """The 64-byte ``cudaIpcMemHandle_t`` of an allocation (the same bytes on every call)."""
        out = ctypes.create_string_buffer(64)
        self._check("cuIpcGetMemHandle", self._lib.cuIpcGetMemHandle(out, ctypes.c_uint64(allocation.base)))
        return out.raw


class IpcHandleCache:
    """Base64 IPC handles of the allocations this client has sent, kept across calls, so a
    training loop that updates its parameters in place finds every handle here and sends the
    same ones each step (the server then maps nothing new).

    The key is the driver's buffer id, unique over the process lifetime and never reused after a
    free. An address is not a safe key: once an allocation is freed (``empty_cache``, or memory
    outside the caching allocator) a new one can start at the same address, and it has another
    handle (``cuIpcGetMemHandle`` gives new memory at an old address a new one); a cache by
    address would send the old handle, which the server may still hold mapped to the old memory,
    and it would read those stale bytes without any error. A storage's ``data_ptr`` is no better
    (a live storage can move to another allocation: ``resize_``, FSDP freeing its storage)."""

    def __init__(self, get_handle: Any):
        self._get = get_handle  # CudaAllocation -> 64 bytes
        self._by_id: dict = {}  # buffer id -> base64 handle
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def handle(self, allocation: CudaAllocation) -> str:
        """The allocation's handle, from the cache or (first use) from the driver."""
        h = self._by_id.get(allocation.id)
        if h is not None:
            self.hits += 1
            return h
        if not allocation.ipc:
            raise ValueError(
                "a CUDA allocation cannot be shared by an IPC handle: PyTorch's expandable segments "
                "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) or a cudaMallocAsync pool; turn "
                "them off in the trainer, or use transport='http'"
            )
        self.misses += 1
        h = base64.b64encode(bytes(self._get(allocation))).decode("ascii")
        self._by_id[allocation.id] = h
        return h

    def keep_only(self, ids: Iterable[int]) -> List[str]:
        """Forgets the allocations not in ``ids``; returns their handles, for the server to close
        (the trainer may have freed them: the server's cache holds only what is still sent)."""
        keep = set(ids)
        gone = [i for i in self._by_id if i not in keep]
        return [self._by_id.pop(i) for i in gone]


def ipc_routes(sources: Sequence[IpcSource], device: int, locate: Any,
               copy: bool = False) -> List[Any]:
    """How each tensor travels over IPC: the :class:`CudaAllocation` that holds its own storage
    (zero-copy: the server reads the trainer's tensor in place), or, as a string, why it is
    copied into one of the client's buckets instead: ``ipc_copy`` asked for it, a tensor on the
    host or on another GPU than ``device`` (the one the server reads), one not contiguous, one
    empty, or an allocation that no IPC handle can share. ``locate`` maps an address to its
    allocation (:meth:`CudaDriver.locate`).

    ``locate`` is asked once per allocation per call, not once per tensor: an allocation it
    gave in this call holds one of the tensors handed in, so it stays allocated for the call,
    and live allocations do not overlap, so any other address inside its range is in it too.
    Nothing is kept across calls (memory freed and allocated again at the same address is
    another allocation, with another buffer id and handle: see :class:`IpcHandleCache`)."""
    routes: List[Any] = []
    bases: List[int] = []  # allocations located in this call, by base address
    found: List[CudaAllocation] = []
    last: Optional[CudaAllocation] = None
    for s in sources:
        if copy:
            routes.append("ipc_copy")
        elif s.device is None:
            routes.append("on the host")
        elif s.device != device:
            routes.append(f"on cuda:{s.device}, the server reads cuda:{device}")
        elif not s.contiguous:
            routes.append("not contiguous")
        elif s.nbytes == 0:
            routes.append("empty")
        else:
            a = last
            if a is None or not a.base <= s.ptr < a.base + a.size:
                k = bisect.bisect_right(bases, s.ptr) - 1
                a = found[k] if k >= 0 and s.ptr < found[k].base + found[k].size else None
                if a is None:
                    a = locate(s.ptr)
                    k = bisect.bisect_right(bases, a.base)
                    bases.insert(k, a.base)
                    found.insert(k, a)
                last = a
            if not a.ipc:
                routes.append("in memory no IPC handle can share (expandable segment or pool)")
            elif s.ptr + s.nbytes > a.base + a.size:
                routes.append("runs past the end of its allocation")
            else:
                routes.append(a)
    return routes


def ipc_packing(sizes: Sequence[int], bucket_bytes: int) -> Tuple[List[Tuple[int, int]], List[int]]:
    """Places tensors of byte sizes ``sizes`` (in order) in the client's buckets: each at the
    next multiple of 256 in the current bucket, a new bucket when it would pass ``bucket_bytes``
    (a bigger tensor gets a bucket of its own). Returns the (bucket, offset) of each tensor and
    the bytes each bucket needs (its used bytes rounded up to 256)."""
    placements: List[Tuple[int, int]] = []
    needs: List[int] = []
    used = 0
    for n in sizes:
        at = _align(used, _IPC_ALIGN)
        if not needs or (at + n > bucket_bytes and at > 0):
            needs.append(0)
            at = 0
        placements.append((len(needs) - 1, at))
        used = at + n
        needs[-1] = max(_IPC_ALIGN, _align(used, _IPC_ALIGN))
    return placements, needs


def ipc_table(entries: Sequence[Tuple[IpcSource, CudaAllocation, int]],
              handles: IpcHandleCache) -> Tuple[list, list, List[int]]:
    """The ``POST /v1/update/ipc`` table of (tensor, allocation, address its bytes are read at)
    entries: one bucket per allocation, whichever tensors share it (the tensor's own storage or
    a client bucket), sized to the furthest byte any of its tensors reads; each tensor's offset
    counts from the allocation's base. Returns (buckets, tensors, allocation ids in bucket order).
    """
    index: dict = {}
    buckets: list = []
    ids: List[int] = []
    tensors: list = []
    for s, a, ptr in entries:
        i = index.get(a.id)
        if i is None:
            i = index[a.id] = len(buckets)
            buckets.append({"handle": handles.handle(a), "bytes": 0})
            ids.append(a.id)
        offset = ptr - a.base
        if offset < 0 or offset + s.nbytes > a.size:
            raise ValueError(f"{s.name}: bytes {offset}-{offset + s.nbytes} are outside its allocation ({a.size} bytes)")
        buckets[i]["bytes"] = max(buckets[i]["bytes"], offset + s.nbytes, 1)
        tensors.append({"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "bucket": i, "offset": offset})
    return buckets, tensors, ids


class IpcStats(NamedTuple):
    """How the last IPC update travelled (``LayerwiseClient.last_ipc``)."""

    zero_copy: int  # tensors sent from their own storage
    packed: dict  # tensors copied into the client's buckets, by reason
    buckets: int  # buckets of the table (allocations)
    new_handles: int  # handles asked of the driver (allocations not sent before)
    released: int  # handles the server was asked to close (allocations no longer sent)
    # Seconds from the transport's start to the request going out: the stream wait, locating allocations,
    # bucket copies, the table and its JSON (and any release request).
    table_seconds: float = 0.0
    # Seconds from the request going out to the whole reply read: the connection and the server.
    request_seconds: float = 0.0
    # The server's own milliseconds by step (its Server-Timing header: read, parse, update).
    server_timing: Optional[dict] = None

    @property
    def path(self) -> str:
        """``zero-copy``, ``copy`` or ``mixed``."""
        if not self.packed:
            return "zero-copy"
        return "copy" if self.zero_copy == 0 else "mixed"


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
        self._buckets: list = []  # the IPC transport's reused CUDA buckets (uint8 tensors)
        self._driver: Optional[CudaDriver] = None
        self._handles: Optional[IpcHandleCache] = None  # handles the server may hold open
        self.last_ipc: Optional[IpcStats] = None  # how the last IPC update travelled
        self._nccl: Any = None  # (library, communicator, rank, device)
        self._nccl_slots: list = []  # two device buckets of the NCCL transport
        # Whether the server takes IPC, asked once for "auto" (a running server's backend does not
        # change; an IPC refusal asks again next time): no extra round trip per update.
        self._server_ipc: Optional[bool] = None
        # One kept-alive connection for JSON requests (a connect per update costs a round trip
        # and the server's accept); taken under the lock, so a request from another thread
        # (init_nccl's, the NCCL update's) opens its own instead of sharing it.
        self._idle: Optional[http.client.HTTPConnection] = None
        self._idle_lock = threading.Lock()
        # The JSON text of the last IPC table's tensors, reused while they are the same.
        self._ipc_tensors: Optional[list] = None
        self._ipc_tensors_json = ""

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
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        return self._exchange(method, path, data)[0]

    def _exchange(self, method: str, path: str, data: Optional[bytes]) -> Tuple[Any, Optional[str]]:
        """Sends a request with a JSON body (or none) on the kept-alive connection, or a new one;
        returns the answer (see ``_answer``) and the reply's Server-Timing header. A kept
        connection the server has closed meanwhile (it closes idle ones) is replaced before use;
        one that breaks before any byte of the reply arrives (it closed as the request went out,
        so it read none of it) is replaced and the request sent once more. A POST carries an
        ``Idempotency-Key``, the same on both sends: should the server have read and applied it
        after all, it answers the second send with the first's answer instead of applying it
        twice."""
        headers = self._headers({"Content-Type": "application/json"} if data is not None else {})
        if method == "POST":
            headers["Idempotency-Key"] = uuid.uuid4().hex
        with self._idle_lock:
            conn, self._idle = self._idle, None
        if conn is not None and _dropped(conn):
            conn.close()
            conn = None
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connection()
            try:
                conn.request(method, self._base + path, body=data, headers=headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError):
                conn.close()
                conn = None
                if not reused:
                    raise
                reused = False
                continue
            except BaseException:
                conn.close()
                raise
            try:
                answer = self._answer(resp)  # reads the whole reply
            except LayerwiseError:
                self._keep(conn, resp)
                raise
            except BaseException:
                conn.close()
                raise
            self._keep(conn, resp)
            return answer, resp.getheader("server-timing")

    def _keep(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Keeps ``conn`` for the next request when the reply left it open, else closes it."""
        if resp.will_close or conn.sock is None:
            conn.close()
            return
        with self._idle_lock:
            conn, self._idle = (conn, None) if self._idle is not None else (None, conn)
        if conn is not None:
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
                            ipc_copy: bool = False, atomic: bool = False, strict: bool = False,
                            partial: bool = False, tag: Optional[str] = None) -> dict:
        """Pushes (name, tensor) pairs: torch tensors or :class:`RawTensor`. See the module doc.

        Over IPC the server reads the CUDA tensors themselves (zero-copy) unless ``ipc_copy`` is
        true, which copies every tensor into the client's buckets first. Until this returns the
        trainer must not modify (or free) the tensors; the reply means the server no longer reads
        them."""
        items = [(str(n), t) for n, t in named_tensors]
        if transport not in ("auto", "http", "ipc", "nccl"):
            raise ValueError(f"transport must be auto, http, ipc or nccl, got {transport!r}")
        options = {"atomic": atomic, "strict": strict, "partial": partial, "tag": tag}
        if transport == "ipc":
            if not (all(_is_torch(t) for _, t in items) and any(t.is_cuda for _, t in items)):
                raise ValueError("transport='ipc' needs torch tensors, at least one of them on CUDA")
            return self._update_ipc(items, bucket_bytes, ipc_copy, options)
        all_cuda = bool(items) and all(_is_torch(t) and t.is_cuda for _, t in items)
        if transport == "nccl":
            if not all_cuda:
                raise ValueError("transport='nccl' needs CUDA torch tensors")
            return self._update_nccl(items, bucket_bytes, options)
        if transport == "auto" and all_cuda and self._server_ipc is None:
            self._server_ipc = bool(self.model().get("ipc"))
        if transport == "auto" and all_cuda and self._server_ipc:
            try:
                return self._update_ipc(items, bucket_bytes, ipc_copy, options)
            except LayerwiseError as e:
                if e.code not in ("IPC_UNAVAILABLE", "IPC_OPEN_FAILED"):
                    raise
                self._server_ipc = None
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
        """Asks the server to close every handle this client sent (its buckets' and the
        tensors' own allocations'), then frees the buckets."""
        handles = self._handles.keep_only(()) if self._handles is not None else []
        try:
            if handles:
                self.release_ipc(handles)
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
        """Releases the IPC buckets, if any, aborts this side of the NCCL communicator and closes
        the kept-alive connection."""
        try:
            self.release_buckets()
            if self._nccl is not None:
                self.close_nccl(server=False)
        finally:
            with self._idle_lock:
                conn, self._idle = self._idle, None
            if conn is not None:
                conn.close()

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

    def _update_ipc(self, items: list, bucket_bytes: int, copy: bool, options: dict) -> dict:
        import torch

        t0 = time.perf_counter()
        device = next(t.device for _, t in items if t.is_cuda)
        if self._driver is None:
            self._driver = CudaDriver()
            self._handles = IpcHandleCache(self._driver.ipc_handle)
        driver, handles = self._driver, self._handles
        assert handles is not None
        sources = [_ipc_source(name, t) for name, t in items]
        with torch.cuda.device(device), torch.no_grad():
            # The server reads on its own stream: what produced the tensors must be done before
            # it is told. This also makes the device's context current for the driver calls.
            stream = torch.cuda.current_stream(device)
            stream.synchronize()
            routes = ipc_routes(sources, device.index, driver.locate, copy)
            packed = [i for i, r in enumerate(routes) if isinstance(r, str)]
            placements, needs = ipc_packing([sources[i].nbytes for i in packed], bucket_bytes)
            while len(self._buckets) < len(needs):
                self._buckets.append(None)
            for k, n in enumerate(needs):
                b = self._buckets[k]
                if b is None or b.numel() < n or b.device != device:
                    self._buckets[k] = None  # back to the allocator before the bigger one
                    self._buckets[k] = torch.empty(n, dtype=torch.uint8, device=device)
            bucket_of = [driver.locate(b.data_ptr()) for b in self._buckets[:len(needs)]]
            entries: list = [None] * len(items)
            for i, r in enumerate(routes):
                if not isinstance(r, str):
                    entries[i] = (sources[i], r, sources[i].ptr)
            for i, (k, at) in zip(packed, placements):
                s, t = sources[i], items[i][1]
                dst = self._buckets[k][at:at + s.nbytes]
                if s.nbytes:
                    # One strided copy (from the host, another GPU or a non-contiguous view)
                    # straight into the bucket, viewed as the tensor.
                    dst.view(t.dtype).view(t.shape).copy_(t.detach())
                entries[i] = (s, bucket_of[k], self._buckets[k].data_ptr() + at)
            if packed:
                stream.synchronize()  # the bucket copies, likewise
            misses = handles.misses
            buckets, tensors, ids = ipc_table(entries, handles)
        del self._buckets[len(needs):]  # buckets this update did not need go back to the allocator
        new_handles = handles.misses - misses
        stale = [h for h in handles.keep_only(ids) if h not in {b["handle"] for b in buckets}]
        if stale:
            self.release_ipc(stale)
        reasons: dict = {}
        for i in packed:
            reasons[routes[i]] = reasons.get(routes[i], 0) + 1
        # A training loop sends the same tensors (names, shapes, offsets) every step: their
        # JSON, most of the body, is written once and reused while they compare equal.
        if tensors != self._ipc_tensors:
            self._ipc_tensors_json = json.dumps(tensors, separators=(",", ":"))
            self._ipc_tensors = tensors
        rest = {"atomic": options["atomic"], "strict": options["strict"], "partial": options["partial"]}
        if options.get("tag") is not None:
            rest["tag"] = options["tag"]
        body = (f'{{"buckets":{json.dumps(buckets, separators=(",", ":"))},'
                f'"tensors":{self._ipc_tensors_json},{json.dumps(rest, separators=(",", ":"))[1:]}')
        t1 = time.perf_counter()
        stats = IpcStats(len(items) - len(packed), reasons, len(buckets), new_handles, len(stale), t1 - t0)
        self.last_ipc = stats
        answer, timing = self._exchange("POST", "/v1/update/ipc", body.encode("utf-8"))
        self.last_ipc = stats._replace(request_seconds=time.perf_counter() - t1,
                                       server_timing=_server_timing(timing))
        return answer

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

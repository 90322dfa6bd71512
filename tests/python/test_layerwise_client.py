"""Tests of clients/python/layerwise_client.py against a running server (standard library only).

Run by tests/client_py_test.ts, which starts the server and sets LW_URL, LW_TOKEN, LW_CKPT (a
safetensors file of the served model's shape), LW_SCALED (another one), LW_OUTSIDE (a path
outside the allowed roots) and LW_OUT (a folder for the exports the Deno side compares).
"""

import json
import os
import struct
import sys
import threading
import unittest
import http.server

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))

from layerwise_client import (  # noqa: E402
    LayerwiseClient,
    LayerwiseError,
    RawTensor,
    ipc_mem_handle,
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


class IpcHandleTest(unittest.TestCase):
    """PyTorch's ``_share_cuda_()`` handle, as each version writes it (no GPU needed)."""

    def test_plain_and_versioned_handles_give_the_64_bytes(self):
        h = bytes(range(64))
        self.assertEqual(ipc_mem_handle(h), h)
        self.assertEqual(ipc_mem_handle(b"\x02c" + h), h)

    def test_expandable_segments_and_unknown_layouts_are_refused(self):
        h = bytes(64)
        with self.assertRaisesRegex(ValueError, "expandable_segments"):
            ipc_mem_handle(b"\x02e" + h)
        for bad in (b"\x03c" + h, h[:63], h + b"\x00"):
            with self.assertRaisesRegex(ValueError, "unknown CUDA IPC handle"):
                ipc_mem_handle(bad)


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.client = LayerwiseClient(URL, token=TOKEN)

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
        with self.assertRaises(LayerwiseError) as e:
            LayerwiseClient(URL, token="wrong-token-0123456789").model()
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
                body = b'{"version": 1}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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

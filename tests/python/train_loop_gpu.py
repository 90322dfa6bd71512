"""The GPU half of the Python client's tests: a real PyTorch training loop (needs CUDA, PyTorch
and transformers; run by tests/client_py_test.ts on a GPU machine).

    python3 train_loop_gpu.py prepare DIR      writes a tiny transformers Llama (bf16) to DIR
    python3 train_loop_gpu.py train URL DIR    trains it three optimizer steps; after each step
                                               pushes its weights (IPC zero-copy with one tensor
                                               packed, HTTP, then IPC zero-copy twice and IPC with
                                               ipc_copy=True) and checks after every push that the
                                               server's /v1/export equals PyTorch's own fp8
                                               per-tensor quantization of the current weights,
                                               byte for byte; prints a JSON summary

fp8 per tensor as the fixtures define it: scale = max(absmax / 448, 1 / (448 * 512)) in float32,
q = float8_e4m3fn(clamp(x / scale, -448, 448)); fused qkv_proj (q, k, v on dim 0) and gate_up_proj
(gate, up) are quantized as one tensor each.
"""

import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))

import torch  # noqa: E402

from layerwise_client import LayerwiseClient  # noqa: E402

FP8_MAX = 448.0
MIN_SCALE = 1.0 / (448.0 * 512.0)


def prepare(out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def f32(v: float) -> float:
    """``v`` rounded to float32 (to nearest, ties to even)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def quant_fp8(x: torch.Tensor):
    x = x.float()
    # The scale's division is done here in float64 and rounded once to float32, which is the
    # correctly rounded float32 quotient: PyTorch's CUDA `tensor / python_scalar` multiplies by
    # the reciprocal instead and can be one ulp off the definition.
    amax = float(x.abs().max())
    scale = torch.tensor([max(f32(amax / FP8_MAX), f32(MIN_SCALE))], dtype=torch.float32, device=x.device)
    q = torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def expected_kernels(sd: dict, layers: int) -> dict:
    """name -> bytes the server's export must hold, from the trainer's current bf16 weights."""
    out = {}

    def put(name, t):
        out[name] = bytes(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).tolist())

    for i in range(layers):
        p = f"model.layers.{i}"
        fused = {
            f"{p}.self_attn.qkv_proj": [f"{p}.self_attn.{n}_proj.weight" for n in "qkv"],
            f"{p}.self_attn.o_proj": [f"{p}.self_attn.o_proj.weight"],
            f"{p}.mlp.gate_up_proj": [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"],
            f"{p}.mlp.down_proj": [f"{p}.mlp.down_proj.weight"],
        }
        for name, parts in fused.items():
            q, s = quant_fp8(torch.cat([sd[n] for n in parts], dim=0))
            put(f"{name}.weight", q)
            put(f"{name}.weight_scale", s)
        for n in ("input_layernorm", "post_attention_layernorm"):
            put(f"{p}.{n}.weight", sd[f"{p}.{n}.weight"])
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        put(n, sd[n])
    return out


def parse_safetensors(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {k: data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]] for k, v in header.items()}


def train(url: str, ckpt: str) -> None:
    from transformers import LlamaForCausalLM

    device = torch.device("cuda")
    # Trained in float32; every push sends its bf16 rounding (the checkpoint's dtype).
    model = LlamaForCausalLM.from_pretrained(ckpt).to(device=device, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    client = LayerwiseClient(url)
    expected_names = {t["name"] for t in client.model()["tensors"]}
    layers = model.config.num_hidden_layers
    g = torch.Generator(device="cpu").manual_seed(1)
    steps = []

    def push(sd, transport, step, **kw):
        """Pushes, checks the export against PyTorch's quantization, returns the summary."""
        r = client.update_from_tensors(sd.items(), transport=transport, atomic=True,
                                       tag=f"step-{step}", **kw)
        assert r["path"] == ("ipc" if transport == "ipc" else "stream"), r
        assert r["storageKept"], r
        got = parse_safetensors(client.export())
        want = expected_kernels(sd, layers)
        bad = [n for n, b in want.items() if got.get(n) != b]
        assert not bad, f"step {step} ({transport}): export differs from PyTorch for {bad[:5]}"
        out = {"step": step, "transport": transport, "version": r["version"],
               "seconds": r["seconds"], "loss": float(loss), "tensors": len(want)}
        if transport == "ipc":
            st = client.last_ipc
            out.update(ipc=st.path, zero_copy=st.zero_copy, packed=st.packed,
                       buckets=st.buckets, new_handles=st.new_handles)
        steps.append(out)
        return out

    for step in range(3):
        ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sd = {n: p.detach().to(torch.bfloat16) for n, p in model.state_dict().items() if n in expected_names}
        if step == 0:
            # Zero-copy, but for one non-contiguous view (same values) that goes through a bucket.
            sd["lm_head.weight"] = sd["lm_head.weight"].t().contiguous().t()
            out = push(sd, "ipc", step)
            assert out["ipc"] == "mixed" and out["packed"] == {"not contiguous": 1}, out
            assert out["zero_copy"] == len(sd) - 1, out
            # Small tensors share the caching allocator's segments: fewer handles than tensors.
            assert out["buckets"] < len(sd), out
        elif step == 1:
            push(sd, "http", step)
        else:
            first = push(sd, "ipc", step)
            assert first["ipc"] == "zero-copy" and first["zero_copy"] == len(sd), first
            # The same tensors again: every handle from the client's cache, none new.
            again = push(sd, "ipc", step)
            assert again["new_handles"] == 0 and again["buckets"] == first["buckets"], again
            # Forced packing: every tensor copied into the client's buckets.
            forced = push(sd, "ipc", step, ipc_copy=True)
            assert forced["ipc"] == "copy" and forced["packed"] == {"ipc_copy": len(sd)}, forced
    client.close()
    print(json.dumps({"steps": steps}))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2])
    else:
        train(sys.argv[2], sys.argv[3])

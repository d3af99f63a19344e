"""The Triton implementations registered by ``register_cuda_kernels`` (nanovllm/kernels/cuda.py): which kernel each
op runs, that ``reference_kernels`` sends every op back to its twin from the next call on, and that registering
twice changes nothing.

There is no GPU in CI, so a fresh process registers the functions for CPU tensors (``device_type="cpu"``), which
the Triton interpreter runs; every op must agree with its twin.  A fresh process, because the registration is
process-wide and would route every other test's CPU ops through the interpreter.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import torch
    from nanovllm.kernels import cuda, ops, reference, sampling
    from nanovllm.kernels.options import KernelOptions, set_options
    from nanovllm.layers.rotary import RotaryEmbedding

    calls = []
    for name in ("store_kv_triton", "decode_attention_triton", "prefill_attention_triton", "rope_store_kv_triton",
                 "linear_triton", "silu_mul_triton", "fused_moe_triton", "moe_experts_triton",
                 "process_logits_triton", "gumbel_argmax_triton"):
        def spy(*args, _name=name, _fn=getattr(cuda, name)):
            calls.append(_name)
            return _fn(*args)
        setattr(cuda, name, spy)
    cuda.register_cuda_kernels("cpu")
    cuda.register_cuda_kernels("cpu")  # idempotent

    def case():
        gen = torch.Generator().manual_seed(0)
        k = torch.randn(6, 2, 16, 32, generator=gen).to(torch.bfloat16)
        v = torch.randn(6, 2, 16, 32, generator=gen).to(torch.bfloat16)
        tables = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
        lens = torch.tensor([20, 0, 32], dtype=torch.int32)
        return k, v, tables, lens

    def run_all():
        """Every op once; returns the outputs (and the caches the stores wrote)."""
        k, v, tables, lens = case()
        q = torch.randn(3, 4, 32).to(torch.bfloat16)
        out = {"decode": ops.paged_attention(q, k, v, torch.arange(4, dtype=torch.int32), lens, tables, 0.2)}
        cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
        out["prefill"] = ops.paged_attention(torch.randn(7, 4, 32).to(torch.bfloat16), k, v, cu, lens, tables, 0.2)
        ops.store_kv(torch.randn(3, 2, 32).to(torch.bfloat16), torch.randn(3, 2, 32).to(torch.bfloat16), k, v,
                     torch.tensor([5, -1, 40], dtype=torch.int32))
        rope = RotaryEmbedding(32, 64, 10000.0)
        for dtype in (torch.bfloat16, torch.float32):
            qkv = torch.randn(3, 8 * 32).to(dtype)
            out[f"rope_{dtype}"] = ops.rope_store_kv(qkv, torch.tensor([1, 2, 3]), rope.cos_cache, rope.sin_cache,
                                                     None, None, 1e-6, k.to(dtype), v.to(dtype),
                                                     torch.tensor([7, -1, 8], dtype=torch.int32), 4, 2)
        x, w = torch.randn(3, 32), torch.randn(48, 32)
        out["linear_fp32"] = ops.linear(x, w, None, silu_mul=True)
        out["linear_bf16"] = ops.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), None, silu_mul=True)
        moe = (torch.randn(3, 32), torch.randn(3, 4), torch.randn(4, 16, 32) / 6, torch.randn(4, 32, 8) / 3)
        out["moe_fp32"] = ops.fused_moe(*moe, 2, True)
        out["moe_bf16"] = ops.fused_moe(*(t.to(torch.bfloat16) for t in moe), 2, True)
        routed = (torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]]), torch.tensor([[1, 3], [0, 2], [3, 3]]))
        out["experts_bf16"] = ops.moe_experts(moe[0].to(torch.bfloat16), *routed, moe[2].to(torch.bfloat16),
                                              moe[3].to(torch.bfloat16))
        params = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.2, 0.5, 0.5]])
        out["logits"] = ops.process_logits(torch.randn(3, 500).to(torch.bfloat16), torch.tensor([1, 0, 1]), params,
                                           torch.randint(-2**31, 2**31 - 1, (2, 16), dtype=torch.int32),
                                           torch.randint(0, 3, (2, 500), dtype=torch.int32), torch.rand(2, 500) < 0.5)
        out["sample"] = ops.gumbel_argmax(torch.randn(3, 500), torch.tensor([0.0, 1.0, 0.5]), torch.arange(3),
                                          torch.arange(3))
        out["k"], out["v"] = k, v
        return out

    set_options(KernelOptions(triton_matmul=False))  # bf16 linear: cuBLAS's stand-in, then the silu kernel
    torch.manual_seed(1)
    fast = run_all()
    print("TRITON", sorted(calls))
    calls.clear()
    set_options(KernelOptions(reference_kernels=True))
    torch.manual_seed(1)
    twin = run_all()
    print("REFERENCE", sorted(calls))
    for key in fast:
        a, b = fast[key].float(), twin[key].float()
        tol = 0 if key in ("k", "v", "sample", "logits") else 2e-2
        assert torch.allclose(a, b, rtol=tol, atol=tol), key
    print("AGREE")
''')


def test_cuda_kernels_route_by_shape_and_options():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert eval(lines["TRITON"]) == sorted([
        "decode_attention_triton", "prefill_attention_triton", "store_kv_triton",
        "rope_store_kv_triton", "store_kv_triton",  # bf16 rope: fused; fp32: torch rope, then the store kernel
        "silu_mul_triton", "fused_moe_triton", "moe_experts_triton", "process_logits_triton",
        "gumbel_argmax_triton"])  # fp32 linear
    # and MoE stay torch
    assert eval(lines["REFERENCE"]) == []
    assert "AGREE" in proc.stdout

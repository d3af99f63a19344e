"""The NPU kernels (nanovllm/kernels/npu.py) against the ops' twins, on "npu" tensors of the stand-in device, and the
stand-ins' checks themselves: each documented constraint the kernels rely on is one the stand-in enforces.

No Ascend card ran this; the stand-in computes FIA and the scatter with the twins (``standins/npu_ops.py``).
"""
import pytest
import torch

from nanovllm.kernels import npu as npu_kernels
from nanovllm.kernels import reference
from standins import install_npu, npu_ops

pytestmark = pytest.mark.platform

BLOCKS, KV_HEADS, BLOCK, DIM = 6, 2, 16, 32


@pytest.fixture
def npu(monkeypatch):
    install_npu(monkeypatch)
    npu_ops.calls.clear()


def _case(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(BLOCKS, KV_HEADS, BLOCK, DIM, generator=gen).to(dtype)
    v = torch.randn(BLOCKS, KV_HEADS, BLOCK, DIM, generator=gen).to(dtype)
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    lens = torch.tensor([20, 0, 32], dtype=torch.int32)
    return k, v, tables, lens


def _npu(*tensors):
    return [t.to("npu") for t in tensors]


def test_fia_decode_equals_the_twin_with_gqa_and_an_empty_row(npu):
    k, v, tables, lens = _case()
    q = torch.randn(3, 4, DIM).to(torch.bfloat16)
    want = reference.paged_attention_reference(q, k, v, torch.arange(4, dtype=torch.int32), lens, tables, 0.2)
    got = npu_kernels.paged_attention_npu(*_npu(q, k, v, torch.arange(4, dtype=torch.int32), lens, tables), 0.2)
    assert got.device.type == "npu" and torch.equal(got.cpu(), want)
    assert npu_ops.calls == ["npu_fused_infer_attention_score"]


@pytest.mark.parametrize("slots", [[5, -1, 40, -1], [-1, -1, -1, -1], [7, 8, 9, 10]])
def test_scatter_store_equals_the_twin_and_padding_writes_nothing(npu, slots):
    k, v, _, _ = _case()
    key, value = torch.randn(4, KV_HEADS, DIM).to(torch.bfloat16), torch.randn(4, KV_HEADS, DIM).to(torch.bfloat16)
    slot_mapping = torch.tensor(slots)
    want_k, want_v = k.clone(), v.clone()
    reference.store_kv_reference(key, value, want_k, want_v, slot_mapping)
    dk, dv = _npu(k, v)
    npu_kernels.store_kv_npu(*_npu(key, value), dk, dv, slot_mapping.to("npu"))
    assert torch.equal(dk.cpu(), want_k) and torch.equal(dv.cpu(), want_v)
    assert npu_ops.calls == ["npu_scatter_nd_update_"] * 2


def _fia_args(**overrides):
    k, v, tables, lens = _case()
    q = torch.randn(3, 4, 1, DIM).to(torch.bfloat16)
    kw = dict(actual_seq_lengths_kv=[20, 1, 32], block_table=tables, block_size=BLOCK, num_heads=4,
              num_key_value_heads=KV_HEADS, scale=0.2, input_layout="BNSD")
    tensors = {"query": q, "key": k, "value": v}
    for name, value in overrides.items():
        (tensors if name in tensors else kw)[name] = value
    kw = {n: (t.to("npu") if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return [tensors[n].to("npu") for n in ("query", "key", "value")], kw


@pytest.mark.parametrize("override,fact", [
    ({"query": torch.randn(3, 4, 1, DIM)}, "float16/bfloat16"),
    ({"block_table": torch.tensor([[0, 1], [2, 3], [4, 5]])}, "block_table int32"),
    ({"block_size": 8}, "block_size"),
    ({"actual_seq_lengths_kv": [20, 1, 33]}, "actual_seq_lengths_kv"),
    ({"num_key_value_heads": 3}, "num_heads / num_key_value_heads"),
    ({"block_table": torch.tensor([[0, 9], [2, 3], [4, 5]], dtype=torch.int32)}, "block ids"),
    ({"key": torch.randn(BLOCKS, BLOCK, KV_HEADS, DIM).to(torch.bfloat16),
      "value": torch.randn(BLOCKS, BLOCK, KV_HEADS, DIM).to(torch.bfloat16)}, "BnNBsD"),
])
def test_the_fia_stand_in_enforces_the_documented_constraints(npu, override, fact):
    args, kw = _fia_args(**override)
    with pytest.raises(RuntimeError, match=fact):
        npu_ops.npu_fused_infer_attention_score(*args, **kw)


def test_the_fia_stand_in_knows_the_documented_keywords_only(npu):
    args, kw = _fia_args()
    with pytest.raises(TypeError, match="scale_value"):
        npu_ops.npu_fused_infer_attention_score(*args, **kw, scale_value=0.2)
    with pytest.raises(NotImplementedError, match="pse_shift"):
        npu_ops.npu_fused_infer_attention_score(*args, **kw, pse_shift=torch.zeros(1).to("npu"))


def test_torchairs_fia_runs_only_in_max_autotune_graphs(npu):
    args, kw = _fia_args(actual_seq_lengths_kv=torch.tensor([20, 1, 32]))
    with pytest.raises(NotImplementedError, match="max-autotune"):
        torch.ops.air.npu_fused_infer_attention_score(*args, **kw)


def test_the_scatter_stand_in_rejects_out_of_range_and_unequal_duplicates(npu):
    cache = torch.zeros(4, 3).to("npu")
    with pytest.raises(RuntimeError, match="越界"):
        npu_ops.npu_scatter_nd_update_(cache, torch.tensor([[4]]).to("npu"), torch.ones(1, 3).to("npu"))
    with pytest.raises(RuntimeError, match="duplicate"):
        npu_ops.npu_scatter_nd_update_(cache, torch.tensor([[1], [1]]).to("npu"),
                                       torch.tensor([[1.0] * 3, [2.0] * 3]).to("npu"))
    assert npu_ops.npu_scatter_nd_update_(cache, torch.tensor([[1], [1]]).to("npu"),
                                          torch.ones(2, 3).to("npu")) is cache
    assert cache.cpu()[1].tolist() == [1.0] * 3


@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead"])
def test_every_registered_op_has_a_traced_npu_implementation(mode):
    """torchair converts no nanovllm op, so each one (a new op and the tensor-parallel collectives included) needs
    what Dynamo traces in its place: the platform registers the ops' and the collectives' (``traced.py``)."""
    from nanovllm import traced
    from nanovllm.distributed import functional
    from nanovllm.kernels import ops
    defined = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("nanovllm::")}
    assert defined == set(ops._OPS) | set(functional.TRACED)
    npu_kernels.register_npu_traced(mode)
    functional.register_traced_collectives("npu")
    assert all(traced.has(name, "npu") for name in defined)

"""The fused all-reduce + residual add + RMSNorm (nanovllm/distributed/fused_norm.py, triton_fused_norm.py) on the
CPU: one rank of two under the Triton interpreter, its peer played by the test (the peer's rows written into the
peer's buffer and its flags raised beforehand), so the kernel's protocol and arithmetic run end to end; a call past
the buffer (the collective's sum, then the kernel's add and norm); where the models take it; and the op's torch path
where a process has no buffer."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, as in the other kernel tests

import pytest  # noqa: E402
import torch  # noqa: E402

from nanovllm.distributed import fused_norm  # noqa: E402
from nanovllm.distributed.triton_fused_norm import add_norm, fused  # noqa: E402
from nanovllm.kernels.norm_rope import rms_norm  # noqa: E402
from nanovllm.layers.norm import ZeroCenteredRMSNorm  # noqa: E402

FLAG_BYTES = fused_norm._FLAG_BYTES


class TwoRanks:
    """Rank 0's buffers and its peer's, as host tensors laid out as ``fused_norm._Buffers`` lays them out."""

    def __init__(self, max_numel: int, dtype: torch.dtype, programs: int):
        self.raw = [torch.zeros(FLAG_BYTES + 2 * max_numel * dtype.itemsize, dtype=torch.uint8) for _ in range(2)]
        self.flag_pads = tuple(r[:FLAG_BYTES].view(torch.int32) for r in self.raw)
        self.datas = tuple(r[FLAG_BYTES:].view(dtype) for r in self.raw)
        self.counters = torch.zeros(2, dtype=torch.int32)
        self.max_numel, self.dtype, self.programs = max_numel, dtype, programs

    def flags(self, rank: int) -> torch.Tensor:
        return self.flag_pads[rank]

    def half(self, rank: int, which: int, rows: int, hidden: int) -> torch.Tensor:
        data = self.datas[rank]
        return data[which * self.max_numel:which * self.max_numel + rows * hidden].view(rows, hidden)

    def peer_arrives(self, y_peer: torch.Tensor, programs: int):
        """What rank 1 does before rank 0's call: copies its rows into its half of this call, takes rank 0's
        previous flags and raises its own in rank 0's pad."""
        which = int(self.counters[0]) % 2
        self.half(1, which, *y_peer.shape).copy_(y_peer)
        for p in range(programs):
            self.flags(1)[p * 2 + 0] = 0
            self.flags(0)[p * 2 + 1] = 1

    def call(self, y, residual, weight, eps, zero_centered):
        return fused(y, residual, weight, eps, self.datas, self.flag_pads, self.counters, 0, self.programs,
                     self.max_numel, zero_centered)


def norm_of(x, weight, eps, zero_centered=False):
    """What the models' norm gives: ``rms_norm``, or a ``ZeroCenteredRMSNorm`` holding ``weight``."""
    if not zero_centered:
        return rms_norm(x, weight, eps)
    norm = ZeroCenteredRMSNorm(x.shape[-1], eps)
    norm.weight.data = weight
    return norm(x)


def expected(ys, residual, weight, eps, zero_centered):
    summed = (ys[0].float() + ys[1].float()).to(ys[0].dtype)
    x = residual + summed
    return x, norm_of(x, weight, eps, zero_centered)


@pytest.mark.parametrize("rows,hidden,programs,dtype,zero_centered", [
    (5, 96, 3, torch.float16, False), (2, 64, 4, torch.float16, False), (7, 100, 7, torch.bfloat16, False),
    (5, 96, 3, torch.float16, True), (3, 100, 2, torch.bfloat16, True)])
def test_one_rank_of_two_sums_adds_and_norms(rows, hidden, programs, dtype, zero_centered):
    """float16 sums and adds bit for bit; bfloat16 within its truncations (the interpreter's float32 to bfloat16
    conversion truncates, a GPU's rounds to nearest: tests/gpu/test_symmetric_all_reduce.py checks those bits);
    the norm as ``rms_norm`` or, ``zero_centered``, as ``ZeroCenteredRMSNorm``."""
    torch.manual_seed(rows)
    eps = 1e-6
    ranks = TwoRanks(max_numel=8 * 128, dtype=dtype, programs=programs)
    weight = torch.randn(hidden, dtype=dtype)
    used = min(rows, programs)
    for call in range(3):  # the halves alternate: 0, 1, 0
        ys = [torch.randn(rows, hidden, dtype=dtype) for _ in range(2)]
        residual = torch.randn(rows, hidden + 3, dtype=dtype)[:, :hidden]  # rows with a stride of their own
        ranks.peer_arrives(ys[1], used)
        x, h = ranks.call(ys[0], residual, weight, eps, zero_centered)
        want_x, want_h = expected(ys, residual, weight, eps, zero_centered)
        if dtype == torch.float16:
            assert torch.equal(x, want_x)
            assert torch.allclose(h.float(), want_h.float(), rtol=2 ** -10, atol=0)  # rsqrt may round apart
        else:  # two truncations, each within one unit in the last place of its operands
            size = residual.float().abs() + ys[0].float().abs() + ys[1].float().abs()
            assert ((x.float() - want_x.float()).abs() <= 2 ** -6 * size).all()
            assert torch.allclose(h.float(), norm_of(x, weight, eps, zero_centered).float(), rtol=2 ** -6, atol=0)
        assert torch.equal(ranks.half(0, call % 2, rows, hidden), ys[0])  # rank 0's rows, where its peer reads them
        flags0, flags1 = ranks.flags(0), ranks.flags(1)
        assert all(flags1[p * 2 + 0] == 1 for p in range(used))  # raised in the peer's pad
        assert all(flags0[p * 2 + 1] == 0 for p in range(used))  # the peer's taken
        assert ranks.counters.tolist() == [call + 1, 0]


def test_where_it_applies(monkeypatch):
    y = torch.zeros(4, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert not fused_norm.usable(y, y, w)  # no buffer in this process
    buffers = type("B", (), {"max_numel": 256})()
    monkeypatch.setitem(fused_norm._state, torch.bfloat16, buffers)
    assert not fused_norm.usable(y, y, w)  # a CPU tensor
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    assert fused_norm.usable(y, y, w)
    big = torch.zeros(5, 64, dtype=torch.bfloat16)
    assert fused_norm.usable(big, big, w)  # no guard on the rows: past the buffer the op's torch path runs
    assert not fused_norm.usable(y, y, w.float())
    assert not fused_norm.usable(y, y.float(), w)
    assert not fused_norm.usable(y.float(), y.float(), w.float())  # no float32 buffer
    assert not fused_norm.usable(y, y[:, :32], w)
    assert not fused_norm.usable(y.t().contiguous().t(), y, w)  # columns not unit-strided


def test_prepare_keeps_only_16_bit_buffers():
    fused_norm.prepare(torch.device("cpu"), torch.float32, 1024, "unused")
    assert torch.float32 not in fused_norm._state


def test_only_the_default_setting_makes_the_buffer(monkeypatch):
    """``NANOVLLM_ALLREDUCE=auto`` (the default) prepares the fused buffer beside the two-shot kernels; ``unfused``
    does not."""
    from types import SimpleNamespace

    import nanovllm.distributed as distributed
    from nanovllm.kernels.options import KernelOptions
    from nanovllm.platforms.cuda import CudaPlatform
    calls = []
    monkeypatch.setattr(distributed, "current", lambda: SimpleNamespace(size=2, rank=0))
    monkeypatch.setattr(distributed, "use_symmetric_all_reduce", lambda *a, **kw: calls.append(kw))
    platform = object.__new__(CudaPlatform)
    platform.device = torch.device("cuda", 0)
    for setting in (None, "unfused", "one_shot", "nccl"):
        env = {} if setting is None else {"NANOVLLM_ALLREDUCE": setting}
        platform.options = KernelOptions.from_env(env)
        platform.prepare_tensor_parallel(torch.bfloat16, 1024)
    assert calls == [{"two_shot": True, "fuse_norm": True}, {"two_shot": True, "fuse_norm": False},
                     {"two_shot": False, "fuse_norm": False}]


def test_a_row_parallel_sum_takes_the_fused_op_where_usable(monkeypatch):
    from types import SimpleNamespace

    import nanovllm.distributed as distributed
    from nanovllm.layers.norm import RMSNorm
    from nanovllm.models import tensor_parallel as tp
    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(8, 16, bias=False), RMSNorm(16, 1e-6)
    x, residual = torch.randn(3, 8), torch.randn(3, 16)
    monkeypatch.setattr(distributed, "current", lambda: SimpleNamespace(size=2, rank=0))
    monkeypatch.setattr(distributed, "all_reduce", lambda y: 2 * y)  # a peer holding the same partial
    unfused = tp.row_parallel_add_norm(linear, x, residual, norm)
    want = residual + 2 * (x @ linear.weight.T)
    assert torch.allclose(unfused[0], want) and torch.allclose(unfused[1], norm(want))
    seen = []
    monkeypatch.setattr(fused_norm, "usable", lambda y, r, w: True)
    monkeypatch.setattr(fused_norm, "all_reduce_add_rms_norm", lambda y, r, w, eps, zc: seen.append(eps) or (r, r))
    assert tp.row_parallel_add_norm(linear, x, residual, norm)[0] is residual and seen == [1e-6]
    linear.bias = torch.nn.Parameter(torch.zeros(16))  # a bias is added after the sum: not fused
    tp.row_parallel_add_norm(linear, x, residual, norm)
    assert seen == [1e-6]


@pytest.mark.parametrize("zero_centered", [False, True], ids=["rms_norm", "zero_centered"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_torch_path_rounds_as_the_models_norms(dtype, zero_centered):
    """The op's torch path (and the NPU's traced one) is ``kernels/norm_rope.rms_norm`` after the add, or
    ``ZeroCenteredRMSNorm``, bit for bit."""
    torch.manual_seed(1)
    residual, summed = torch.randn(4, 48, dtype=dtype), torch.randn(4, 48, dtype=dtype)
    weight = torch.randn(48, dtype=dtype)
    x, h = fused_norm.add_rms_norm(residual, summed, weight, 1e-5, zero_centered)
    assert torch.equal(x, residual + summed)
    assert torch.equal(h, norm_of(residual + summed, weight, 1e-5, zero_centered))


def test_a_moe_layer_fuses_its_attention_and_expert_sums_with_the_norms_after_them(monkeypatch):
    """``decoder._after_attention`` on a mixture-of-experts layer: the attention output's sum and the experts'
    (``SparseMoe.forward(reduce=False)``, then ``tensor_parallel.sum_add_norm``) each take the fused op where it
    is usable, and give what the unfused sums give."""
    from types import SimpleNamespace

    import nanovllm.distributed as distributed
    from nanovllm.layers.norm import RMSNorm
    from nanovllm.models import decoder
    from nanovllm.models.moe import MoeArgs, SparseMoe
    torch.manual_seed(3)
    hidden = 16
    moe = SparseMoe(hidden, MoeArgs(num_experts=4, top_k=2, intermediate_size=8, renormalize=True))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = SimpleNamespace(self_attn=SimpleNamespace(o_proj=torch.nn.Linear(12, hidden, bias=False)),
                            post_attention_layernorm=RMSNorm(hidden, 1e-6), mlp=moe)
    next_norm = RMSNorm(hidden, 1e-6)
    x, o = torch.randn(3, hidden), torch.randn(3, 12)
    monkeypatch.setattr(distributed, "current", lambda: SimpleNamespace(size=2, rank=0))
    monkeypatch.setattr(distributed, "all_reduce", lambda y: 2 * y)  # a peer holding the same partial
    x1 = x + 2 * layer.self_attn.o_proj(o)
    x2 = x1 + 2 * moe(layer.post_attention_layernorm(x1), reduce=False)
    unfused = decoder._after_attention(layer, next_norm, x, o)
    assert torch.allclose(unfused[0], x2, atol=1e-6) and torch.allclose(unfused[1], next_norm(x2), atol=1e-6)
    calls = []

    def fake_fused(y, residual, weight, eps, zero_centered):
        assert not zero_centered
        calls.append(weight)
        summed = residual + 2 * y
        return summed, weight * rms_norm(summed, torch.ones_like(weight), eps)

    monkeypatch.setattr(fused_norm, "usable", lambda y, r, w: True)
    monkeypatch.setattr(fused_norm, "all_reduce_add_rms_norm", fake_fused)
    fused_out = decoder._after_attention(layer, next_norm, x, o)
    assert [w is n.weight for w, n in zip(calls, (layer.post_attention_layernorm, next_norm))] == [True, True]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused_out, unfused))


@pytest.mark.parametrize("dtype,zero_centered", [(torch.float16, False), (torch.bfloat16, False),
                                                 (torch.bfloat16, True)])
def test_a_call_past_the_buffer_sums_collectively_then_adds_and_norms_in_one_launch(monkeypatch, dtype,
                                                                                    zero_centered):
    """Past the buffer's numel (a prefill step), the op takes the collective's sum and the kernel's add and norm,
    which round as the models' norm after the add (float16 bit for bit but the rsqrt; bfloat16 within the
    interpreter's truncation); rows with a stride of their own."""
    from nanovllm.distributed import collectives, triton_fused_norm
    launched = []
    monkeypatch.setattr(triton_fused_norm, "add_norm", lambda *a: launched.append(1) or add_norm(*a))
    torch.manual_seed(2)
    rows, hidden, eps = 9, 80, 1e-6
    y, weight = torch.randn(rows, hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
    residual = torch.randn(rows, hidden + 5, dtype=dtype)[:, :hidden]
    monkeypatch.setitem(fused_norm._state, dtype, type("B", (), {"max_numel": rows * hidden - 1})())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda t: t.mul_(2))  # a peer holding the same partial
    x, h = torch.ops.nanovllm.tp_all_reduce_add_rms_norm(y, residual, weight, eps, zero_centered)
    want_x = residual + 2 * y
    if dtype == torch.float16:
        assert torch.equal(x, want_x)
        assert torch.allclose(h.float(), norm_of(want_x, weight, eps).float(), rtol=2 ** -10, atol=0)
    else:
        assert ((x.float() - want_x.float()).abs() <= 2 ** -7 * (residual.float().abs() + 2 * y.float().abs())).all()
        assert torch.allclose(h.float(), norm_of(x, weight, eps, zero_centered).float(), rtol=2 ** -6, atol=0)
    assert launched == [1]
    assert add_norm(y[:0], residual[:0], weight, eps)[0].shape == (0, hidden)  # no rows: no launch


@pytest.mark.parametrize("dense", [True, False], ids=["mlp", "moe"])
def test_a_hybrid_layer_fuses_both_sums_with_its_zero_centred_norms(monkeypatch, dense):
    """``hybrid._after_mixer``: the mixer's output projection and the MLP's (or the experts') sums each take the
    fused op with ``zero_centered`` where it is usable, and give what the unfused sums give."""
    from types import SimpleNamespace

    import nanovllm.distributed as distributed
    from nanovllm.models import hybrid
    from nanovllm.models.decoder import MLP
    from nanovllm.models.moe import MoeArgs, SparseMoe
    torch.manual_seed(4)
    hidden = 16
    mlp = MLP(hidden, 8) if dense else SparseMoe(hidden, MoeArgs(num_experts=4, top_k=2, intermediate_size=8,
                                                                 renormalize=True, shared_intermediate_size=8))
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    norms = [ZeroCenteredRMSNorm(hidden, 1e-6) for _ in range(2)]
    for n in norms:
        torch.nn.init.normal_(n.weight, std=0.3)
    layer, out_proj = SimpleNamespace(post_attention_layernorm=norms[0], mlp=mlp), torch.nn.Linear(12, hidden, False)
    x, o = torch.randn(3, hidden), torch.randn(3, 12)
    monkeypatch.setattr(distributed, "current", lambda: SimpleNamespace(size=2, rank=0))
    monkeypatch.setattr(distributed, "all_reduce", lambda y: 2 * y)  # a peer holding the same partial
    unfused = hybrid._after_mixer(out_proj, layer, norms[1], x, o)
    x1 = x + 2 * out_proj(o)
    x2 = x1 + mlp(norms[0](x1))  # the block's own sum over the ranks, which the patched all_reduce doubles
    assert torch.allclose(unfused[0], x2, atol=1e-5) and torch.allclose(unfused[1], norms[1](x2), atol=1e-5)
    calls = []

    def fake_fused(y, residual, weight, eps, zero_centered):
        calls.append((weight, zero_centered))
        return fused_norm.add_rms_norm(residual, 2 * y, weight, eps, zero_centered)

    monkeypatch.setattr(fused_norm, "usable", lambda y, r, w: True)
    monkeypatch.setattr(fused_norm, "all_reduce_add_rms_norm", fake_fused)
    fused_out = hybrid._after_mixer(out_proj, layer, norms[1], x, o)
    assert [(w is n.weight, zc) for (w, zc), n in zip(calls, norms)] == [(True, True), (True, True)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused_out, unfused))

"""Stand-ins of the three Ascend ops nanovllm calls, checked against their documentation and computed on the CPU
with nanovllm's pure-PyTorch twins (tests only; see ``host_device.py`` for the "npu" tensors they run on).

Sources (someone with an Ascend card can check each fact below against them):

* [FIA] ``torch_npu.npu_fused_infer_attention_score``: Ascend/op-plugin
  ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_fused_infer_attention_score.md`` (commit 56bbfdf, 2026-08-10), also
  https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_001232.html
* [AIR] ``torchair.ops.npu_fused_infer_attention_score``: Ascend/torchair
  ``docs/zh/ascend_ir/api/ops/npu_fused_infer_attention_score.md`` and ``python/torchair/ops/
  _npu_fused_infer_attention_score.py`` (commit fced884), also hiascend.com .../torchairuseguide/torchair_00086.html
* [SND] ``torch_npu.npu_scatter_nd_update_``: Ascend/op-plugin
  ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_scatter_nd_update_.md`` (commit 517f2e7)

What each stand-in checks is what those pages state; what they leave open is marked "not documented" where the
stand-in had to choose.  Only the combinations nanovllm uses are computed (paged decode, Q_S = 1, BNSD query over a
BnNBsD cache); any other documented combination raises ``NotImplementedError`` rather than guess.
"""
import math

import torch

from nanovllm.kernels.reference import decode_attention_reference
from .host_device import to_device, to_host

_MODELLED = {"atten_mask", "actual_seq_lengths", "actual_seq_lengths_kv", "block_table", "num_heads", "scale",
             "pre_tokens", "next_tokens", "input_layout", "num_key_value_heads", "sparse_mode", "inner_precise",
             "block_size", "softmax_lse_flag"}
# [FIA] "函数原型": every keyword the API documents.  Passing one outside this list is a TypeError on a card too.
FIA_KEYWORDS = _MODELLED | {
    "pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
    "antiquant_scale", "antiquant_offset", "query_padding_size", "kv_padding_size", "key_antiquant_scale",
    "key_antiquant_offset", "value_antiquant_scale", "value_antiquant_offset", "key_shared_prefix",
    "value_shared_prefix", "actual_shared_prefix_len", "query_rope", "key_rope", "key_rope_antiquant_scale",
    "antiquant_mode", "key_antiquant_mode", "value_antiquant_mode"}
_FIA_DEFAULTS = {"num_heads": 1, "scale": 1.0, "pre_tokens": 2147483647, "next_tokens": 2147483647,
                 "input_layout": "BSH", "num_key_value_heads": 0, "sparse_mode": 0, "inner_precise": 0,
                 "block_size": 0, "softmax_lse_flag": False, "antiquant_mode": 0, "key_antiquant_mode": 0,
                 "value_antiquant_mode": 0}
calls: list[str] = []  # names of the stand-in ops run, in order (tests assert which path ran)


def _require(cond: bool, fact: str) -> None:
    if not cond:
        raise RuntimeError(f"Ascend stand-in: documented constraint violated: {fact}")


def check_paged_decode(query, key, value, lengths: list[int], kw: dict) -> tuple[int, int]:
    """Check one FIA call against [FIA]; returns (num_heads, num_key_value_heads)."""
    unknown = set(kw) - FIA_KEYWORDS
    if unknown:
        raise TypeError(f"npu_fused_infer_attention_score() got unexpected keyword arguments {sorted(unknown)}")
    for name in set(kw) - _MODELLED:
        if kw[name] is not None and kw[name] != _FIA_DEFAULTS.get(name):
            raise NotImplementedError(f"the stand-in does not model {name}")
    args = {**_FIA_DEFAULTS, **kw}
    _require(query.dtype in (torch.float16, torch.bfloat16), "query dtype float16/bfloat16 ([FIA] query)")
    _require(query.is_contiguous() and key.is_contiguous() and value.is_contiguous(),
             "query/key/value must be contiguous ([FIA] 不支持非连续的Tensor)")
    _require(key.shape == value.shape, "key and value shapes equal ([FIA] 通用基础约束)")
    _require(key.dtype == value.dtype == query.dtype, "key/value dtype matches float16/bfloat16 query")
    if args["input_layout"] != "BNSD" or args["block_table"] is None or query.shape[2] != 1:
        raise NotImplementedError("the stand-in models paged decode only: input_layout='BNSD', block_table, Q_S=1")
    batch, heads, _, head_dim = query.shape
    kv_heads = args["num_key_value_heads"] or heads
    _require(args["num_heads"] == heads, "num_heads equals the query's N axis in BNSD ([FIA] num_heads)")
    _require(heads % kv_heads == 0 and heads // kv_heads <= 64, "num_heads / num_key_value_heads integer <= 64")
    _require(batch <= 65536 and heads <= 256 and head_dim <= 512, "B <= 65536, N <= 256, D <= 512 (Q_S = 1)")
    _require(head_dim * query.element_size() % 16 == 0, "D 16-byte aligned for float16/bfloat16 ([FIA] D)")
    table, block_size = args["block_table"], args["block_size"]
    # [FIA] PageAttention: block_table int32 2-D [B, >= maxBlockNumPerSeq]; block_size non-zero, <= 512, 16-aligned
    # for float16/bfloat16 when Q_S = 1; with a BNSD query the cache may be BnNBsD [blockNum, KV_N, blockSize, D].
    _require(table.dtype == torch.int32 and table.dim() == 2 and table.shape[0] == batch,
             "block_table int32 [B, maxBlockNumPerSeq]")
    _require(0 < block_size <= 512 and block_size % 16 == 0, "block_size non-zero, <= 512, 16-aligned (Q_S = 1)")
    _require(key.dim() == 4 and key.shape[1] == kv_heads and key.shape[2] == block_size and key.shape[3] == head_dim,
             "BnNBsD cache [blockNum, KV_N, blockSize, D] with KV_N = num_key_value_heads (BNSD layout)")
    _require(len(lengths) in (1,) or len(lengths) >= batch, "actual_seq_lengths_kv of length 1 or >= B")
    lengths = (lengths * batch) if len(lengths) == 1 else lengths[:batch]
    width = table.shape[1] * block_size
    _require(all(0 <= n <= width for n in lengths), "each actual_seq_lengths_kv <= its KV_S (table width x block)")
    host_table = to_host(table) if table.device.type != "cpu" else table
    for b, n in enumerate(lengths):  # "blockid合法性由用户保证": every block a row reads must exist
        used = host_table[b, :math.ceil(n / block_size)]
        _require(bool(((used >= 0) & (used < key.shape[0])).all()), f"row {b} reads block ids in [0, blockNum)")
    return heads, kv_heads


def _fia_compute(query, key, value, table, lengths: list[int], scale: float):
    """[FIA] result of paged decode: softmax(scale * q k^T) v over each row's first ``lengths[b]`` cache tokens,
    through nanovllm's twin (every block of the row is read, the mask hides the rest)."""
    q, k, v, t = (to_host(x) for x in (query, key, value, table))
    ctx = torch.tensor(lengths if len(lengths) > 1 else lengths * q.shape[0], dtype=torch.int32,
                       device="cpu")[:q.shape[0]]
    out = decode_attention_reference(q[:, :, 0], k, v, t, ctx, scale)[:, :, None]
    return to_device(out.contiguous(), query.device.type), to_device(torch.zeros(1, dtype=torch.float32, device="cpu"), "npu")


def npu_fused_infer_attention_score(query, key, value, **kw):
    """torch_npu.npu_fused_infer_attention_score (eager): ``actual_seq_lengths_kv`` is a host ``List[int]`` ([FIA]
    "actual_seq_lengths_kv (List[int])"; required with PageAttention)."""
    lengths = kw.get("actual_seq_lengths_kv")
    _require(isinstance(lengths, (list, tuple)) and all(isinstance(n, int) for n in lengths),
             "actual_seq_lengths_kv is a List[int] in torch_npu's eager API ([FIA])")
    check_paged_decode(query, key, value, list(lengths), kw)
    calls.append("npu_fused_infer_attention_score")
    return _fia_compute(query, key, value, kw["block_table"], list(lengths), kw["scale"])


# [AIR] graph-mode variant: same arguments, but actual_seq_lengths(_kv) are int64 Tensors on the device; the
# real implementation raises in eager mode ("本接口只支持图模式") and only the Ascend IR converter computes it.
_air = torch.library.Library("air", "FRAGMENT")
_air.define("npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? atten_mask=None, "
            "Tensor? actual_seq_lengths=None, Tensor? actual_seq_lengths_kv=None, Tensor? block_table=None, "
            "int num_heads=1, float scale=1.0, int pre_tokens=2147483647, int next_tokens=2147483647, "
            "str input_layout=\"BSH\", int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, "
            "int block_size=0, bool softmax_lse_flag=False) -> (Tensor, Tensor)")
ge_running = [False]  # set by the torchair stand-in while it runs a converted (Ascend IR) graph


def _air_fia(query, key, value, **kw):
    if not ge_running[0]:
        raise NotImplementedError("torchair.ops.npu_fused_infer_attention_score does not support in this mode, "
                                  "only support in max-autotune mode")
    lengths_t = kw.get("actual_seq_lengths_kv")
    _require(isinstance(lengths_t, torch.Tensor) and lengths_t.dtype == torch.int64 and lengths_t.dim() == 1,
             "actual_seq_lengths_kv an int64 Tensor ([AIR] 数据类型支持int64)")
    lengths = to_host(lengths_t).tolist()
    check_paged_decode(query, key, value, lengths, kw)
    calls.append("air.npu_fused_infer_attention_score")
    return _fia_compute(query, key, value, kw["block_table"], lengths, kw["scale"])


def _air_fia_meta(query, key, value, **kw):
    return torch.empty_like(query), query.new_empty(1, dtype=torch.float32)


_air.impl("npu_fused_infer_attention_score", _air_fia, "PrivateUse1")
_air.impl("npu_fused_infer_attention_score", _air_fia_meta, "Meta")


@torch.library.custom_op("npu::npu_scatter_nd_update_", mutates_args=("input",))
def _scatter_nd_update_(input: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> None:
    """[SND]: ``input[indices[..., 0], ..., indices[..., a-1]] = updates`` in place, a = indices.shape[-1]."""
    _require(input.device.type == "npu", "input is a device tensor")
    _require(1 <= input.dim() <= 8, "input has 1 to 8 dims ([SND] input)")
    _require(input.dtype in (torch.float32, torch.float16, torch.bool, torch.bfloat16, torch.int64, torch.int8),
             "input dtype float32/float16/bool/bfloat16/int64/int8 on Atlas A2/A3 ([SND] input)")
    _require(updates.dtype == input.dtype, "updates dtype equals input's ([SND] updates)")
    _require(indices.dtype in (torch.int32, torch.int64) and indices.dim() >= 2, "indices int32/int64, >= 2 dims")
    a = indices.shape[-1]
    _require(a <= input.dim(), "indices' last dim <= input's rank ([SND] 约束说明)")
    _require(tuple(updates.shape) == tuple(indices.shape[:-1]) + tuple(input.shape[a:]),
             "updates shape = indices.shape[:-1] + input.shape[a:] ([SND] 约束说明)")
    host, idx, upd = to_host(input), to_host(indices).long().reshape(-1, a), to_host(updates).reshape(-1,
                                                                                                    *input.shape[a:])
    bounds = torch.tensor(input.shape[:a], device="cpu")
    _require(bool(((idx >= 0) & (idx < bounds)).all()), "indices in range ([SND] 索引数据不支持越界)")
    # Not documented: what duplicate indices do.  nanovllm relies only on duplicates that write equal values.
    _, inverse = torch.unique(idx, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long, device="cpu").scatter_reduce(
        0, inverse, torch.arange(len(idx), device="cpu"), "amin", include_self=False)
    _require(bool((upd == upd[first[inverse]]).all()), "duplicate indices write equal values (not documented)")
    host[tuple(idx.unbind(-1))] = upd
    calls.append("npu_scatter_nd_update_")


@_scatter_nd_update_.register_fake
def _(input, indices, updates):
    return None


def npu_scatter_nd_update_(input, indices, updates):
    """torch_npu.npu_scatter_nd_update_(input, indices, updates) -> Tensor: ``input``, updated in place."""
    torch.ops.npu.npu_scatter_nd_update_(input, indices, updates)
    return input

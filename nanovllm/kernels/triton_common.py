"""Pieces shared by the Triton attention kernels: device facts, the ``tl.dot`` mode, paged-KV addressing and the
online-softmax step over one KV tile.

``triton_attention.py`` (KV store, prefill) and ``triton_decode.py`` (decode) build on these.  The cache
layout is ``cache[num_blocks, num_kv_heads, block_size, head_dim]`` (see ``reference.py``).
"""
import functools

import torch
import triton
import triton.language as tl

from nanovllm.kernels.options import current_options

_LOG2E = 1.4426950408889634
_SM_COUNT: dict = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter runs: any fixed number keeps the split logic exercised
    index = _index(device)
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, cached: kernel dispatch asks at every launch."""
    return _capability(_index(device))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _hopper_or_newer(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use Hopper features (TMA loads, PDL): a CUDA GPU of compute capability 9.0
    or newer, unless ``KernelOptions.hopper_features`` is off (``NANOVLLM_HOPPER_FEATURES=0``), which sends a
    Hopper GPU down the pre-Hopper path."""
    if device.type != "cuda" or not current_options().hopper_features:
        return False
    return device_capability(device)[0] >= 9


def _dot_precision(q: torch.Tensor) -> str:
    """``tl.dot`` mode: exact fp32 for fp32 inputs; "upcast" off GPU, where the Triton interpreter
    multiplies bf16 operands as their raw uint16 bits, so both operands go to fp32 first."""
    if not q.is_cuda:
        return "upcast"
    return "ieee" if q.dtype == torch.float32 else "tf32"  # the flag only matters for fp32 operands


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _kv_offsets(block_table_row, start, n, valid, stride_cb, stride_ct,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets (without the head term) of KV tokens ``n`` of one sequence in the paged cache."""
    if BLOCK_N == BLOCK_SIZE:  # the tile is one cache block
        block = tl.load(block_table_row + start // BLOCK_SIZE).to(tl.int64)
        return block * stride_cb + tl.arange(0, BLOCK_N) * stride_ct
    elif BLOCK_N < BLOCK_SIZE:  # the tile sits inside one cache block
        block = tl.load(block_table_row + start // BLOCK_SIZE).to(tl.int64)
        return block * stride_cb + (start % BLOCK_SIZE + tl.arange(0, BLOCK_N)) * stride_ct
    else:
        block = tl.load(block_table_row + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        return block * stride_cb + (n % BLOCK_SIZE) * stride_ct


@triton.jit
def _attend_tile(q, k_cache_ptr, v_cache_ptr, offs, kv_valid, keep, m_i, l_i, acc, qk_scale,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of q [M, D] over the KV tile at ``offs`` [N, D]; ``keep`` [M, N] if MASKED."""
    if MASKED:
        k = tl.load(k_cache_ptr + offs, mask=kv_valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=kv_valid[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + offs)
        v = tl.load(v_cache_ptr + offs)
    return _softmax_step(q, k, v, keep, m_i, l_i, acc, qk_scale, MASKED, DOT_PRECISION)


@triton.jit
def _softmax_step(q, k, v, keep, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The online-softmax update of ``_attend_tile`` for K and V tiles already loaded."""
    s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale  # log2 units
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "K and V caches must match"
    assert k_cache.stride(3) == 1, "head_dim must be contiguous in the cache"

"""Pieces shared by the Triton attention kernels: device facts, the ``tl.dot`` mode, paged-KV addressing, the FP8
KV element's rounding (``kv_quant.py``) and the online-softmax step over one KV tile, with its score softcap and
the sink-seeded start of the softmax (``reference.py`` states what window, sinks and softcap mean).

``triton_attention.py`` (KV store, prefill) and ``triton_decode.py`` (decode) build on these.  The cache
layout is ``cache[num_blocks, num_kv_heads, block_size, head_dim]`` (see ``reference.py``).
"""
import functools

import torch
import triton
import triton.language as tl

from nanovllm.kernels import kv_quant
from nanovllm.kernels.options import current_options

_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(_LOG2E)  # the same, readable inside kernels
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


_FITTED: dict = {}  # (kernel, its launch's static facts) -> index of the first of its configs that fit


def shrink_configs(block_m: int, block_n: int, num_stages: int) -> list[tuple[int, int, int]]:
    """(block_m, block_n, num_stages) from the tuned ones down: stages to 2, then ``block_n`` halved to 16, then
    ``block_m`` halved to 16, then one stage: smaller tiles for heads wider than the tuning's (Gemma 4's 512)."""
    configs = [(block_m, block_n, num_stages)]
    while True:
        m, n, s = configs[-1]
        if s > 2:
            s -= 1
        elif n > 16:
            n //= 2
        elif m > 16:
            m //= 2
        elif s > 1:
            s = 1
        else:
            return configs
        configs.append((m, n, s))


def launch_fitting(key: tuple, configs: list, launch):
    """``launch(config)`` for the first of ``configs`` whose kernel the device can hold: Triton raises
    ``OutOfResources`` (shared memory) when a compiled kernel asks for more than a program may take, before it
    queues anything, so the next config is tried.  The one that fit is kept per ``key`` (the kernel and what its
    resources depend on: head size, dtypes, constant arguments), so later launches, graph captures among them
    (after the warm-up), start there.  The tuned tiles fit heads of up to 256; estimating the need beforehand missed
    Triton's own buffers (a 512-wide head asked 327,680 bytes of 232,448)."""
    from triton.runtime.errors import OutOfResources
    first = _FITTED.get(key, 0)
    for i in range(first, len(configs)):
        try:
            result = launch(configs[i])
        except OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        _FITTED[key] = i
        return result


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


# Four bytes b0..b3 of $4 -> $0, $1: the low nibbles of (b0, b1), (b2, b3) as 16-bit halves ORed with MAGIC (the
# exponent of 128 in bf16 or of 1024 in fp16, both halves); $2, $3: the high nibbles alike.  prmt 0x4140 spreads
# b0 and b1 into the low bytes of the two halves (selector 4 picks a zero byte), lop3 0xEA is (a & b) | c.
_NIBBLES = """{
.reg .b32 lo, hi;
prmt.b32 lo, $4, 0, 0x4140;
prmt.b32 hi, $4, 0, 0x4342;
lop3.b32 $0, lo, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $1, hi, 0x000F000F, MAGIC, 0xEA;
shr.u32 lo, lo, 4;
shr.u32 hi, hi, 4;
lop3.b32 $2, lo, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $3, hi, 0x000F000F, MAGIC, 0xEA;
}"""
_NIBBLES_BF16 = tl.constexpr(_NIBBLES.replace("MAGIC", "0x43004300"))
_NIBBLES_FP16 = tl.constexpr(_NIBBLES.replace("MAGIC", "0x64006400"))


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _quantize_fp8(x, scale):
    """x / scale rounded to the nearest e4m3 value, saturated at ±448, as ``kv_quant.quantize`` (IEEE division).

    Normal values are rounded to e4m3's three mantissa bits (nearest even) by integer arithmetic on the float's
    bits, so the conversion that follows is exact: the interpreter's own rounding loses the carry into the
    exponent (1.97 became 1).  Subnormals (below 2^-6) are left to the conversion, which the interpreter flushes
    to zero and the GPU rounds."""
    y = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32), scale), -448.0), 448.0)
    bits = y.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(y) >= 0.015625, rounded, y).to(tl.float8e4nv)


@triton.jit
def _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, SCALED: tl.constexpr):
    """(k_scale, v_scale) of one KV head of an FP8 cache; (1, 1) for a cache in the model's dtype."""
    if SCALED:
        return tl.load(k_scale_ptr + kv_head), tl.load(v_scale_ptr + kv_head)
    else:
        return 1.0, 1.0


@triton.jit
def _fp8_mma_dtype(q):
    """q as the MMA operand type of attention over an FP8 cache: fp16 in place of bf16, since e4m3 widens to fp16 in
    one instruction and to bf16 only through it.  Exact for q (bf16 values inside fp16's range) and for K and V."""
    if q.dtype == tl.bfloat16:
        return q.to(tl.float16)
    else:
        return q


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
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax step of q [M, D] over the KV tile at ``offs`` [N, D]; ``keep`` [M, N] if MASKED."""
    if MASKED:
        k = tl.load(k_cache_ptr + offs, mask=kv_valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=kv_valid[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + offs)
        v = tl.load(v_cache_ptr + offs)
    return _softmax_step(q, k, v, keep, m_i, l_i, acc, qk_scale, MASKED, DOT_PRECISION, SOFTCAP)


@triton.jit
def _softmax_step(q, k, v, keep, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    """The online-softmax update of ``_attend_tile`` for K and V tiles already loaded.  K and V of an FP8 cache
    are widened to q's dtype here (exact), and multiplied in it; their scales are the callers'.  ``SOFTCAP`` > 0
    caps the scores before the mask.  A row that has seen no key yet and sees none here (a window's first tiles)
    keeps m = -inf, l = 0 and acc = 0."""
    s = _dot(q, tl.trans(k.to(q.dtype)), DOT_PRECISION) * qk_scale  # log2 units
    if SOFTCAP > 0:
        s = _softcap(s, SOFTCAP)
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # -inf - -inf is NaN: a row with nothing seen yet subtracts 0 instead (its p and alpha are 0)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _softcap(s, SOFTCAP: tl.constexpr):
    """Scores ``s`` in log2 units capped as ``SOFTCAP * tanh(natural score / SOFTCAP)``, still in log2 units.
    tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow (Triton has no tanh)."""
    cap = SOFTCAP * _LOG2E_C  # the cap in log2 units: s / cap is the natural score over SOFTCAP
    e = tl.exp2(tl.abs(s) * (-2.0 * _LOG2E_C / cap))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(s < 0, -t, t) * cap


@triton.jit
def _softmax_start(sinks_ptr, heads, heads_mask, first, ROWS: tl.constexpr, SINKS: tl.constexpr):
    """(m, l) to start an online softmax of ROWS rows: (-inf, 0), or where ``first`` (the program that owns the
    sink; split 0 of a split decode) each row's head's sink logit in log2 units with weight 1 (e^0), so the sink
    joins the denominator once and adds no value.  ``heads``: each row's query head (a scalar for a prefill tile)."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    if SINKS:
        sink = tl.load(sinks_ptr + heads, mask=heads_mask, other=0.0).to(tl.float32) * _LOG2E_C
        m = tl.where(first, l_i + sink, m)
        l_i = tl.where(first, l_i + 1.0, l_i)
    return m, l_i


def attention_kind_args(q: torch.Tensor, window: int, sinks, softcap: float) -> tuple:
    """(sinks or a placeholder, the launch's WINDOW, SINKS and SOFTCAP constants), checked as the twin checks."""
    from nanovllm.kernels.reference import check_attention_kinds
    check_attention_kinds(q, window, sinks, softcap)
    if sinks is not None:
        assert sinks.is_contiguous() and sinks.device == q.device, "sinks: a contiguous [Hq] tensor beside q"
    return (q if sinks is None else sinks), dict(WINDOW=int(window), SINKS=sinks is not None, SOFTCAP=float(softcap))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "K and V caches must match"
    assert k_cache.stride(3) == 1, "head_dim must be contiguous in the cache"


def kv_scale_args(k_cache: torch.Tensor, k_scale, v_scale) -> tuple[tuple, bool]:
    """((k_scale, v_scale) to pass a kernel, whether the cache is FP8): the scales of an FP8 cache, which it must
    have, else the cache itself twice as unused placeholders."""
    if k_cache.dtype != kv_quant.FP8_DTYPE:
        return (k_cache, k_cache), False
    assert k_scale is not None and v_scale is not None, "an FP8 KV cache needs k_scale and v_scale"
    assert k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.shape == (k_cache.shape[1],)
    return (k_scale, v_scale), True


@triton.jit
def _int4_minus_zero(packed, zero, dtype: tl.constexpr, ASM: tl.constexpr):
    """(even, odd): the low- and high-nibble codes of the uint8 bytes ``packed`` minus ``zero`` (uint8, broadcast to
    it), exact small integers in ``dtype``.

    ``ASM`` (a GPU; 16-bit ``dtype``): four bytes at a time in one register, each code ORed under the exponent of
    128 (bf16) or 1024 (fp16) in both halves of a word, so two codes become two exact 16-bit numbers (128 or 1024)
    + q per instruction, and that + zero is subtracted in pairs; Triton's own code would unpack every byte into a register of
    its own, and those instructions, not the bytes, bound a decode-sized dequantizing matmul.  Otherwise the same
    values through float32 (the interpreter has no inline assembly)."""
    if ASM and dtype == tl.bfloat16:
        even, odd = tl.inline_asm_elementwise(_NIBBLES_BF16, "=r,=r,=r,=r,r", [packed],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        base = (zero.to(tl.float32) + 128.0).to(tl.bfloat16)
        return even - base, odd - base
    if ASM and dtype == tl.float16:
        even, odd = tl.inline_asm_elementwise(_NIBBLES_FP16, "=r,=r,=r,=r,r", [packed],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        base = (zero.to(tl.float32) + 1024.0).to(tl.float16)
        return even - base, odd - base
    z = zero.to(tl.float32)
    return ((packed & 0xF).to(tl.float32) - z).to(dtype), ((packed >> 4).to(tl.float32) - z).to(dtype)

"""GPTQ's and AWQ's on-disk int4 tensors, converted to and from the in-memory int4 format (``kernels/int4_quant.py``).

Both pack eight 4-bit codes into an int32 word, word position i in bits 4i..4i+3; the real weight is
``(q - zero) * scale`` of the column's group, G = ceil(K / group) groups, group -1 meaning one group of K columns.

* GPTQ, as AutoGPTQ's ``QuantLinear.pack`` and GPTQModel's packer write it (vLLM's ``gptq``/``gptq_marlin`` read it):
  ``qweight`` int32 [K/8, N], position i of word [r, n] the code of input column 8r + i; ``qzeros`` int32 [G, N/8],
  position i of word [g, c] the zero of output column 8c + i; ``scales`` float16 [G, N]; ``g_idx`` int32 [K], each
  input column's group (not k // group under desc_act).  "v1" checkpoints (AutoGPTQ, optimum) store zero - 1 in
  qzeros (a stored 15 reads back as 16, as their kernels read it); "gptq_v2" (GPTQModel's) the zero itself.
* AWQ GEMM, as AutoAWQ's ``WQLinear_GEMM.from_linear`` writes it (vLLM's ``awq`` reads it): ``qweight`` int32
  [K, N/8] and ``qzeros`` int32 [G, N/8] pack output columns, word c's position i holding column 8c + AWQ_ORDER[i];
  ``scales`` float16 [G, N]; zeros stored as they are.
A desc_act GPTQ weight becomes ours with its columns sorted by group: column j is the stored column perm[j], so the
op multiplies ``x[:, perm]`` by it.
"""
import torch

from nanovllm.kernels import int4_quant

WORD = 8  # codes per int32 word
PARTS = ("qweight", "qzeros", "scales", "g_idx")  # a quantized Linear X's tensors on disk: X.qweight, ...
GPTQ_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's ``order_map``: word position i holds column AWQ_ORDER[i]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def group_width(group: int, k: int) -> int:
    """The columns per group of a K-column weight: ``group``, or K where ``group`` is -1 (one group per row)."""
    return k if group == -1 else group


def pack_words(codes: torch.Tensor, order=GPTQ_ORDER) -> torch.Tensor:
    """Codes [..., 8M] (0..15) -> int32 [..., M], word position i holding code ``order[i]`` of its eight."""
    if codes.shape[-1] % WORD:
        raise ValueError(f"packing 4-bit codes into int32 needs a multiple of {WORD} of them, got {codes.shape[-1]}")
    grouped = codes.to(torch.int64).unflatten(-1, (-1, WORD))[..., list(order)]
    words = (grouped << _SHIFTS).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_words(words: torch.Tensor, order=GPTQ_ORDER) -> torch.Tensor:
    """int32 [..., M] -> codes uint8 [..., 8M]: the inverse of ``pack_words``."""
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS) & 0xF
    inverse = sorted(range(WORD), key=lambda j: order[j])  # position of column j within its word
    return nibbles[..., inverse].flatten(-2).to(torch.uint8)


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def _sorting_perm(g_idx: torch.Tensor, k: int, group: int) -> torch.Tensor | None:
    """The stable order of columns by group (None where ``g_idx`` is already k // group); every group must hold
    ``group`` columns (the last one the rest)."""
    _check_shape("g_idx", g_idx, (k,))
    trivial = torch.arange(k) // group
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, trivial):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], trivial):
        counts = torch.bincount(g_idx.clamp(min=0)).tolist()
        raise ValueError(f"g_idx does not put {group} columns in each group (group sizes {counts}, min "
                         f"{int(g_idx.min())}); it cannot describe a weight of {k} columns in groups of {group}")
    return perm


def gptq_to_int4(qweight, qzeros, scales, g_idx, group: int, v2: bool = False):
    """GPTQ tensors -> (qweight uint8 [N, K/2], scale float16 [N, G], zero uint8 [N, G], perm int32 [K] or None).

    ``g_idx`` None means k // group; ``v2`` False: a v1 checkpoint, whose qzeros hold zero - 1."""
    k, n = qweight.shape[0] * WORD, qweight.shape[1]
    width = group_width(group, k)
    groups = int4_quant.num_groups(k, width)
    _check_shape("qzeros", qzeros, (groups, n // WORD))
    _check_shape("scales", scales, (groups, n))
    codes = unpack_words(qweight.t())  # [N, K]
    zero = unpack_words(qzeros).t() + (0 if v2 else 1)
    perm = None if g_idx is None else _sorting_perm(g_idx, k, width)
    if perm is not None:
        codes = codes[:, perm]
    return (int4_quant.pack(codes), scales.t().to(torch.float16).contiguous(), zero.contiguous(),
            None if perm is None else perm.to(torch.int32))


def int4_to_gptq(qweight, scale, zero, group: int, g_idx=None, v2: bool = False):
    """Our (qweight, scale, zero) -> GPTQ (qweight, qzeros, scales, g_idx), the inverse of ``gptq_to_int4``.

    With ``g_idx`` (desc_act) our columns are the stored ones sorted by group, stored column perm[j] = our column j;
    without, ``g_idx`` is written as k // group.  A v1 checkpoint cannot hold a zero of 0 (it stores zero - 1)."""
    codes = int4_quant.unpack(qweight)
    n, k = codes.shape
    width = group_width(group, k)
    if n % WORD:
        raise ValueError(f"a GPTQ weight packs its zeros {WORD} output rows to a word; {n} rows are not a multiple")
    if g_idx is None:
        g_idx = torch.arange(k) // width
    perm = _sorting_perm(g_idx, k, width)
    if perm is not None:
        stored = torch.empty_like(codes)
        stored[:, perm] = codes
        codes = stored
    stored_zero = zero.to(torch.int64) - (0 if v2 else 1)
    if (stored_zero < 0).any() or (stored_zero > int4_quant.MAX_CODE).any():
        raise ValueError(f"zeros {sorted(set(zero.flatten().tolist()))} cannot be stored in a GPTQ "
                         f"{'v2' if v2 else 'v1 (zero - 1, so 1..16)'} checkpoint")
    return (pack_words(codes).t().contiguous(), pack_words(stored_zero.t()),
            scale.t().to(torch.float16).contiguous(), g_idx.to(torch.int32))


def awq_to_int4(qweight, qzeros, scales, group: int):
    """AWQ GEMM tensors -> (qweight uint8 [N, K/2], scale float16 [N, G], zero uint8 [N, G])."""
    k, n = qweight.shape[0], qweight.shape[1] * WORD
    groups = int4_quant.num_groups(k, group_width(group, k))
    _check_shape("qzeros", qzeros, (groups, n // WORD))
    _check_shape("scales", scales, (groups, n))
    codes = unpack_words(qweight, AWQ_ORDER).t()  # [N, K]
    return (int4_quant.pack(codes), scales.t().to(torch.float16).contiguous(),
            unpack_words(qzeros, AWQ_ORDER).t().contiguous())


def int4_to_awq(qweight, scale, zero):
    """Our (qweight, scale, zero) -> AWQ GEMM (qweight, qzeros, scales), the inverse of ``awq_to_int4``."""
    codes = int4_quant.unpack(qweight)
    if codes.shape[0] % WORD:
        raise ValueError(f"an AWQ weight packs {WORD} output rows to a word; {codes.shape[0]} rows are not a multiple")
    return (pack_words(codes.t(), AWQ_ORDER), pack_words(zero.t(), AWQ_ORDER),
            scale.t().to(torch.float16).contiguous())

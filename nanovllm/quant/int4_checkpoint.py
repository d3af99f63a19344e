"""GPTQ and AWQ int4 checkpoints: their ``quantization_config`` validated and normalized (``int4_fields``), and a
safetensors checkpoint rewritten in either layout (``quantize_checkpoint_int4``, for tests and synthesis).

A quantized Linear ``X.weight`` is stored as ``X.qweight``, ``X.qzeros``, ``X.scales`` (and ``X.g_idx`` for GPTQ);
``int4_formats.py`` defines those tensors and converts them to the in-memory int4 format.  Supported: 4 bits,
``group_size`` -1 or a positive int; GPTQ with ``sym`` either way, ``desc_act`` either way, ``checkpoint_format``
"gptq" (zero - 1 stored, also when the field is absent) or "gptq_v2"; AWQ ``version`` "gemm" with ``zero_point``.
Anything else is a ValueError naming the field and its value, so such weights are never loaded.
"""
import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from nanovllm.kernels import int4_quant
from nanovllm.quant import int4_formats
from nanovllm.quant.fp8_checkpoint import quantizable
from nanovllm.quant.scheme import refuse

METHODS = ("gptq", "awq")
GPTQ_FORMATS = {"gptq": False, "gptq_v2": True}  # checkpoint_format -> whether qzeros hold the zero itself (v2)
_ONE_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
              "w1": "w13", "w3": "w13"}  # Linears that read one input, so GPTQ gives them one act order




def _field(quant: dict, names: tuple[str, ...], default):
    """(the name found, its value): the first of ``names`` present in ``quant`` (AutoAWQ's own config spells
    bits and group_size ``w_bit`` and ``q_group_size``), else (names[0], ``default``)."""
    for name in names:
        if name in quant:
            return name, quant[name]
    return names[0], default


def _flag(method: str, quant: dict, name: str, default: bool) -> bool:
    value = quant.get(name, default)
    if not isinstance(value, bool):
        refuse(method, name, value, "true or false")
    return value


def int4_fields(method: str, quant: dict) -> dict:
    """The normalized fields of a GPTQ or AWQ ``quantization_config`` (``method``: "gptq" | "awq"): a dict of
    ``method``, ``group`` (columns per group; -1 means one group per row), ``sym``, ``desc_act``, ``v2`` (GPTQ
    qzeros hold the zero itself, not zero - 1) and ``modules_to_not_convert`` (a list, maybe empty)."""
    name, bits = _field(quant, ("bits", "w_bit"), None)
    if bits != 4 or isinstance(bits, bool):
        refuse(method, name, bits, "4")
    name, group = _field(quant, ("group_size", "q_group_size"), 128)
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        refuse(method, name, group, "-1 (one group per row) or a positive int, e.g. 128")
    skip = quant.get("modules_to_not_convert") or []
    if not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        refuse(method, "modules_to_not_convert", skip, "a list of module names")
    if method == "awq":
        version = quant.get("version", "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            refuse(method, "version", version, "'gemm'")
        if not _flag(method, quant, "zero_point", True):
            refuse(method, "zero_point", False, "true")
        return dict(method=method, group=group, sym=False, desc_act=False, v2=False, modules_to_not_convert=skip)
    name, fmt = _field(quant, ("checkpoint_format", "format"), "gptq")
    if fmt not in GPTQ_FORMATS:
        refuse(method, name, fmt, " or ".join(map(repr, GPTQ_FORMATS)))
    if quant.get("is_marlin_format"):  # AutoGPTQ's pre-repacked Marlin layout
        refuse(method, "is_marlin_format", quant["is_marlin_format"], "false")
    return dict(method=method, group=group, sym=_flag(method, quant, "sym", True),
                desc_act=_flag(method, quant, "desc_act", False), v2=GPTQ_FORMATS[fmt], modules_to_not_convert=skip)


def quantization_config_of(method: str, group: int, sym: bool, desc_act: bool, skip: list[str]) -> dict:
    """config.json's ``quantization_config`` as AutoGPTQ/optimum (v1 zeros) or AutoAWQ write it."""
    if method == "gptq":
        quant = dict(quant_method="gptq", bits=4, group_size=group, desc_act=desc_act, sym=sym,
                     checkpoint_format="gptq")
    else:
        quant = dict(quant_method="awq", bits=4, group_size=group, zero_point=True, version="gemm")
    return dict(quant, modules_to_not_convert=skip) if skip else quant


def quantize_linear(weight: torch.Tensor, method: str, group: int, sym: bool,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one Linear weight [N, K] by suffix ("qweight", "qzeros", "scales"; "g_idx" for
    GPTQ), round to nearest.  ``generator`` (GPTQ only): desc_act, the columns grouped in a random order of it."""
    k = weight.shape[1]
    width = int4_formats.group_width(group, k)
    if method == "awq":
        qweight, qzeros, scales = int4_formats.int4_to_awq(*int4_quant.quantize(weight, width, sym))
        return dict(qweight=qweight, qzeros=qzeros, scales=scales)
    g_idx = None
    if generator is not None:
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[torch.randperm(k, generator=generator)] = torch.arange(k) // width
        weight = weight[:, torch.argsort(g_idx, stable=True)]
    qweight, scale, zero = int4_quant.quantize(weight, width, sym)
    if (zero == 0).any():  # v1 stores zero - 1, so cannot hold 0: such a group (all >= -scale/2) takes zero 1
        codes, lifted = int4_quant.unpack(qweight), int4_quant.expand_columns(zero == 0, k, width)
        qweight = int4_quant.pack(torch.where(lifted, (codes + 1).clamp(max=int4_quant.MAX_CODE), codes))
        zero = zero.clamp(min=1)
    qweight, qzeros, scales, g_idx = int4_formats.int4_to_gptq(qweight, scale, zero, group, g_idx=g_idx)
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)


def quantize_checkpoint_int4(model_dir, method: str, group: int = 128, sym: bool | None = None,
                             desc_act: bool = False, skip: list[str] | None = None, seed: int = 0) -> None:
    """Rewrite the safetensors checkpoint in ``model_dir`` in place in ``method``'s layout ("gptq" v1 or "awq"):
    every quantizable weight (``fp8_checkpoint.quantizable``, MoE experts stored per expert included; outside
    ``skip``) ``X.weight`` becomes ``X.qweight``/``X.qzeros``/``X.scales`` (+ ``X.g_idx``), the sharded index (if
    any) and config.json's ``quantization_config`` follow.  ``sym`` None: GPTQ symmetric, AWQ asymmetric (AWQ
    stores zeros either way).  ``desc_act`` (GPTQ): each weight's columns grouped in an order drawn from ``seed``
    and its input (q/k/v, gate/up share one, as GPTQ's act order comes from the input's activations)."""
    from safetensors.torch import load_file, save_file
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not an int4 checkpoint layout (supported: {', '.join(METHODS)})")
    if not (isinstance(group, int) and (group == -1 or group > 0)):
        raise ValueError(f"group={group!r} is not supported (supported: -1, one group per row, or a positive int)")
    if desc_act and method != "gptq":
        raise ValueError(f"desc_act=True is a GPTQ option; method={method!r} has none")
    sym = (method == "gptq") if sym is None else sym
    model_dir, skip = Path(model_dir), list(skip or [])
    added, removed = {}, set()
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        weights = load_file(str(path))
        for name in [n for n, t in weights.items() if quantizable(n, t, skip)]:
            base = name[:-len("weight")]
            module, _, leaf = base[:-1].rpartition(".")
            order = f"{module}.{_ONE_INPUT.get(leaf, leaf)}".encode()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(order)) if desc_act else None
            try:
                stored = quantize_linear(weights.pop(name), method, group, sym, generator)
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from e
            weights.update((base + suffix, t) for suffix, t in stored.items())
            added.update((base + suffix, path.name) for suffix in stored)
            removed.add(name)
        save_file(weights, str(path), metadata=metadata or {"format": "pt"})
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():  # a sharded checkpoint: its index names the new tensors instead of the weights
        index = json.loads(index_path.read_text())
        index["weight_map"] = {n: f for n, f in index["weight_map"].items() if n not in removed} | added
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config_of(method, group, sym, desc_act, skip)
    config_path.write_text(json.dumps(config, indent=2) + "\n")

"""The registry of weight-quantization schemes: a checkpoint's ``quant_method`` -> its scheme (``CHECKPOINT``),
the ``quantization=`` option's values -> theirs (``ONLINE``).  Adding a scheme is a class (``scheme.QuantScheme``)
and a line here.

* ``checkpoint_scheme(hf_config)``: the scheme of a checkpoint's ``quantization_config`` (its one reader), every
  field validated, else None; an unsupported ``quant_method`` is a ValueError naming it and the supported ones.
* ``online_scheme(quantization, checkpoint, dummy)``: what quantizes the weights at load time, if anything.
* ``write_oracle(src, dst, quantization, dtype)``: the dequantized checkpoint that transformers runs as the oracle.
"""
import json
from pathlib import Path

from nanovllm.quant.fp8_schemes import BlockFp8, CompressedFp8, OnlineFp8
from nanovllm.quant.hf import quantization_config
from nanovllm.quant.int4_schemes import Awq, Gptq
from nanovllm.quant.mxfp4_schemes import Mxfp4
from nanovllm.quant.scheme import QuantScheme

CHECKPOINT: dict[str, type[QuantScheme]] = {s.method: s for s in (BlockFp8, CompressedFp8, Gptq, Awq, Mxfp4)}
ONLINE: dict[str, type[QuantScheme]] = {s.method: s for s in (OnlineFp8,)}


def checkpoint_scheme(hf_config: dict) -> QuantScheme | None:
    quant = quantization_config(hf_config)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in CHECKPOINT:
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported (supported: "
                         f"{', '.join(CHECKPOINT)})")
    return CHECKPOINT[method](quant)


def online_scheme(quantization: str | None, checkpoint: QuantScheme | None, dummy: bool) -> QuantScheme | None:
    """``quantization``'s scheme where the weights are not a quantized checkpoint read as stored; dummy weights of
    a quantized checkpoint's config quantized as that scheme says (``for_dummy_weights``); else None.  A
    ``quantization`` the checkpoint's scheme does not take is a ValueError."""
    if quantization is not None and quantization not in ONLINE:
        raise ValueError(f"quantization must be None or one of {', '.join(map(repr, ONLINE))}, got {quantization!r}")
    if checkpoint is not None and quantization not in (None, *getattr(checkpoint, "takes_quantization", ())):
        raise ValueError(f"quantization={quantization!r} cannot apply to a quant_method={checkpoint.method!r} "
                         f"checkpoint")
    if checkpoint is not None and not dummy:
        return None
    if quantization is not None:
        return ONLINE[quantization]()
    return checkpoint.for_dummy_weights() if checkpoint is not None else None


def write_oracle(src, dst, quantization: str | None = None, dtype=None) -> str:
    """The checkpoint in ``src`` as the engine computes with it under ``quantization``, dequantized for
    transformers, written to ``dst`` (``dtype``: the model's, in which online quantization rounds); its path."""
    checkpoint = checkpoint_scheme(json.loads((Path(src) / "config.json").read_text()))
    scheme = checkpoint if checkpoint is not None else online_scheme(quantization, None, False)
    if scheme is None:
        raise ValueError(f"{str(src)!r} is not quantized and quantization={quantization!r}: it is its own oracle")
    return scheme.write_oracle(src, dst, dtype)

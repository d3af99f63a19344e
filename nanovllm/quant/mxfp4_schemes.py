"""The MXFP4 scheme (``scheme.QuantScheme``, ``quant_method`` "mxfp4"): GPT-OSS's published checkpoints, whose
stacked routed experts are MXFP4 (``mxfp4_checkpoint.py``: the layout and config), read into the held MXFP4 format
(``mxfp4_weights.py``; ``kernels/mxfp4_quant.py`` states the numbers).  Every other weight loads as a plain one.
Dummy weights of such a config are drawn plain and quantized (``mxfp4_quant.quantize``), an expert at a time.

Fields: ``modules_to_not_convert`` (a list: what the checkpoint left plain; informative, the stored tensors say
it) and transformers' loading option ``dequantize`` (false only); any other is refused by name.
"""
from nanovllm.quant import mxfp4_checkpoint, mxfp4_weights
from nanovllm.quant.checkpoint import Checkpoint
from nanovllm.quant.scheme import QuantScheme, refuse

OWNED = tuple(f".experts.{p}_{part}" for p in mxfp4_checkpoint.PROJECTIONS for part in ("blocks", "scales"))


class Mxfp4(QuantScheme):
    method = "mxfp4"
    draws_held = True  # GPT-OSS-120B's experts are 234 GB in bf16

    def __init__(self, quant: dict | None = None):
        super().__init__(quant)
        for field, value in self.quant.items():
            if field == "modules_to_not_convert":
                if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    refuse(self.method, field, value, "a list of module names")
            elif field == "dequantize":
                if value not in (False, None):
                    refuse(self.method, field, value, "false: the experts are read as MXFP4")
            elif field != "quant_method":
                refuse(self.method, field, value, "modules_to_not_convert, dequantize")

    def owns(self, name: str, checkpoint: Checkpoint) -> bool:
        return name.endswith(OWNED)

    def load(self, model, checkpoint: Checkpoint, placement, filled: dict[str, set]) -> None:
        mxfp4_weights.load(model, checkpoint, placement, filled)

    def draw_held(self, name: str, module, attr: str, draw, device) -> None:
        mxfp4_weights.draw_held(name, module, attr, draw, device)

    def quantize_online(self, model, device=None) -> None:
        mxfp4_weights.quantize_online(model, device)

    def describe(self, model) -> str | None:
        return mxfp4_weights.describe(model)

    def write_checkpoint(self, model_dir, skip: list[str] | None = None, **options) -> None:
        if skip or options:
            raise ValueError(f"quantization 'mxfp4' writes the experts only and takes no options, got skip={skip!r}, "
                             f"{options}")
        mxfp4_checkpoint.write_checkpoint(model_dir)

    def write_oracle(self, src, dst, dtype=None) -> str:
        return mxfp4_checkpoint.write_dequantized(src, dst)

"""The int4 weight schemes (``scheme.QuantScheme``): GPTQ and AWQ checkpoints (``quant_method`` "gptq", "awq";
their fields: ``int4_checkpoint.int4_fields``), read into the in-memory int4 format (``int4_weights.py``) by
``int4_loader.py``.  Dummy weights of such a config are quantized round-to-nearest in the same groups.
"""
from nanovllm.quant import int4_checkpoint, int4_loader, int4_oracle, int4_weights
from nanovllm.quant.checkpoint import Checkpoint
from nanovllm.quant.int4_formats import PARTS
from nanovllm.quant.scheme import QuantScheme

OWNED = tuple("." + part for part in PARTS)  # X.qweight, X.qzeros, X.scales, X.g_idx of a quantized Linear X


class Int4Checkpoint(QuantScheme):
    quantize_from_host = True

    def __init__(self, quant: dict | None = None):
        super().__init__(quant)
        self.fields = int4_checkpoint.int4_fields(self.method, {"bits": 4} if quant is None else quant)

    def owns(self, name: str, checkpoint: Checkpoint) -> bool:
        return name.endswith(OWNED)

    def load(self, model, checkpoint: Checkpoint, placement, filled: dict[str, set]) -> None:
        int4_loader.load(model, checkpoint, self.fields, filled, placement)

    def quantize_online(self, model, device=None) -> None:
        int4_weights.quantize_online(model, self.fields, device)

    def describe(self, model) -> str | None:
        return int4_weights.describe(model)

    def write_checkpoint(self, model_dir, skip: list[str] | None = None, group: int = 128, sym: bool | None = None,
                         desc_act: bool = False, seed: int = 0) -> None:
        int4_checkpoint.quantize_checkpoint_int4(model_dir, self.method, group, sym, desc_act, skip, seed)

    def write_oracle(self, src, dst, dtype=None) -> str:
        return int4_oracle.write_dequantized(src, dst, self.fields)


class Gptq(Int4Checkpoint):
    method = "gptq"


class Awq(Int4Checkpoint):
    method = "awq"

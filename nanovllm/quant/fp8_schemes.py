"""The FP8 weight schemes (``scheme.QuantScheme``): ``quantization="fp8"`` (``OnlineFp8``: one scale per row,
computed at load), block-FP8 checkpoints (``BlockFp8``: ``quant_method: "fp8"``, Qwen3-*-FP8 / DeepSeek-V3) and
llm-compressor's FP8 (``CompressedFp8``: ``quant_method: "compressed-tensors"``, per channel or per tensor).

A checkpoint scheme owns its float8 tensors and their scales (``fp8_checkpoint.py``: the layouts and
``ScaleReader``): each is kept in float8 where every checkpoint part of its parameter is float8 and the model
quantizes that parameter (``fp8_weights.py``), else dequantized into the model's dtype.  Dummy weights of either
checkpoint's config are quantized online.
"""
from nanovllm.kernels import weight_quant
from nanovllm.quant import fp8_checkpoint, fp8_oracle, fp8_weights
from nanovllm.quant.checkpoint import Checkpoint
from nanovllm.quant.compressed_tensors import ChannelLayout, check_compressed_fp8
from nanovllm.quant.scheme import QuantScheme, refuse


class OnlineFp8(QuantScheme):
    """``quantization="fp8"``: the decoder layers' projections and experts quantized at load, a scale per row."""
    method = "fp8"

    def quantize_online(self, model, device=None) -> None:
        fp8_weights.quantize_online(model)

    def describe(self, model) -> str | None:
        return fp8_weights.describe(model)

    def write_oracle(self, src, dst, dtype=None) -> str:
        return fp8_oracle.write_dequantized(src, dst, online=dtype)


class Fp8Checkpoint(QuantScheme):
    """A checkpoint of float8 weights with scales in ``self.layout``."""
    takes_quantization = ("fp8",)  # quantization="fp8" on such a checkpoint: read as stored
    layout = None

    def owns(self, name: str, checkpoint: Checkpoint) -> bool:
        return fp8_checkpoint.is_scale_name(self.layout, name) or fp8_checkpoint.is_float8(checkpoint, name)

    def load(self, model, checkpoint: Checkpoint, placement, filled: dict[str, set]) -> None:
        float8 = [n for n in checkpoint.names() if fp8_checkpoint.is_float8(checkpoint, n)]
        fp8_checkpoint.prepare_model(model, _whole_targets(float8, checkpoint, placement), self.layout)
        params = placement.params()  # after prepare_model: the parameters it made float8 are new ones
        reader = fp8_checkpoint.ScaleReader(checkpoint, self.layout)
        for name in float8:
            target, where = placement.target(name)
            if target not in params:
                continue
            param = params[target]
            cut = placement.cut(target, where, placement.local_shape(target, where, param.shape))
            if weight_quant.is_fp8(param):  # the float8 piece and its scales, each into its place
                piece, scale = reader.read_quantized(name, cut)
                owner, attr = target.rsplit(".", 1)
                placement.copy(name, target, where, scale, getattr(model.get_submodule(owner), attr + "_scale"))
            else:
                piece = reader.read(name, cut)
            placement.copy(name, target, where, piece, param)
            filled.setdefault(target, set()).add(where)

    def for_dummy_weights(self) -> QuantScheme:
        return OnlineFp8()

    def describe(self, model) -> str | None:
        kept = fp8_weights.describe(model)
        if kept is None:
            return f"fp8 checkpoint ({self.layout.name}), dequantized at load"
        return f"{kept}, from an fp8 checkpoint ({self.layout.name})"

    def write_checkpoint(self, model_dir, skip: list[str] | None = None, **options) -> None:
        fp8_checkpoint.quantize_checkpoint(model_dir, self.layout, skip)

    def write_oracle(self, src, dst, dtype=None) -> str:
        return fp8_oracle.write_dequantized(src, dst, layout=self.layout)


def _whole_targets(float8: list[str], checkpoint: Checkpoint, placement) -> set[str]:
    """Our parameters every checkpoint part of which is float8 (a packed or stacked one mixing float8 and other
    parts is dequantized instead)."""
    parts = placement.places(checkpoint.names())
    return {t for t, places in placement.places(float8).items() if places == parts[t]}


class BlockFp8(Fp8Checkpoint):
    """``quant_method: "fp8"``: ``weight_block_size`` two positive ints, ``fmt`` "e4m3", ``activation_scheme``
    "dynamic"."""
    method = "fp8"

    def __init__(self, quant: dict | None = None):
        super().__init__(quant)
        quant = {"weight_block_size": [128, 128]} if quant is None else quant
        block = quant.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            refuse(self.method, "weight_block_size", block, "a list of two positive ints, e.g. [128, 128]")
        for field, allowed in (("fmt", "e4m3"), ("activation_scheme", "dynamic")):
            if field in quant and quant[field] != allowed:
                refuse(self.method, field, quant[field], repr(allowed))
        self.layout = fp8_checkpoint.BlockLayout(tuple(block))


class CompressedFp8(Fp8Checkpoint):
    """``quant_method: "compressed-tensors"`` with FP8 weights (``compressed_tensors.check_compressed_fp8``)."""
    method = "compressed-tensors"

    def __init__(self, quant: dict | None = None):
        super().__init__(quant)
        if quant is None:
            self.layout = ChannelLayout("channel")
            return
        check_compressed_fp8(quant)
        self.layout = ChannelLayout(sorted({group["weights"].get("strategy") or "tensor"
                                            for group in quant["config_groups"].values()}))

"""compressed-tensors FP8 checkpoints (``quant_method: "compressed-tensors"``, what llm-compressor writes, e.g.
Qwen3-8B-FP8-dynamic): the layout of their quantized weights, as ``fp8_checkpoint.ScaleReader`` reads it.

A quantized Linear ``X.weight`` is float8_e4m3fn [N, K] with ``X.weight_scale`` float32 [N, 1] (strategy "channel")
or [1] / [] (strategy "tensor"; [N] and [1, 1] are taken too): the real weight is the float8 value times its scale.
In ``kernels/weight_quant.py``'s format that is one scale per row over all K columns (group >= K): a per-tensor
scale is repeated on every row, so packing q/k/v or gate/up, stacking experts and splitting rows over
tensor-parallel ranks keep each row's own scale, and a column shard keeps its rows' scales whole.  Input
activations are not quantized (``check_compressed_fp8`` takes only dynamic ones, or none): compute is
weight-only.  ``ChannelLayout.quantize`` and ``quantization_config`` write this layout (``synthesize --quantize
compressed-fp8``, via ``fp8_checkpoint.quantize_checkpoint``).
"""
import torch

from nanovllm.kernels.kv_quant import FP8_DTYPE, FP8_MAX

STRATEGIES = ("channel", "tensor")
_COMPRESSED_FP8 = {  # compressed-tensors FP8: config group part -> key -> (the library's default, values supported)
    "weights": dict(num_bits=(8, [8]), type=("int", ["float"]), strategy=("tensor", ["channel", "tensor"]),
                    symmetric=(True, [True]), dynamic=(False, [False])),
    "input_activations": dict(num_bits=(8, [8]), type=("int", ["float"]), dynamic=(False, [True]))}


def check_compressed_fp8(quant: dict) -> None:
    """llm-compressor's FP8 (``_COMPRESSED_FP8``), computed weight-only: no static input or output activation scales."""
    groups = quant.get("config_groups")
    checks = [("format", quant.get("format"), [None, "float-quantized"]),
              ("config_groups", "a dict" if isinstance(groups, dict) and groups else groups, ["a dict"])]
    for g, group in (groups if isinstance(groups, dict) else {}).items():
        checks += [(f"config_groups.{g}.format", group.get("format"), [None, "float-quantized"]),
                   (f"config_groups.{g}.output_activations", group.get("output_activations"), [None])]
        for part, rules in _COMPRESSED_FP8.items():
            spec = group.get(part)
            if spec is not None or part == "weights":
                checks += [(f"config_groups.{g}.{part}.{key}", (spec or {}).get(key, default), allowed)
                           for key, (default, allowed) in rules.items()]
    for field, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"quantization_config.{field}={value!r} is not supported for quant_method="
                             f"'compressed-tensors' (supported: {' or '.join(map(repr, allowed))})")


class ChannelLayout:
    """One float32 scale per output row (or one per tensor, repeated on every row) over all the weight's columns."""
    suffix = "_scale"  # X.weight -> X.weight_scale
    row_block = 1  # rows are scaled one by one: a rank's rows are read as they are (``fp8_checkpoint.ScaleReader``)

    def __init__(self, strategy: str | list[str] = "channel"):
        self.strategies = [strategy] if isinstance(strategy, str) else list(strategy)
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ValueError(f"compressed-tensors strategy {bad[0]!r} is not supported (supported: "
                             f"{', '.join(map(repr, STRATEGIES))})")
        self.name = f"compressed-tensors, per {'/'.join(self.strategies)}"

    @staticmethod
    def group(k: int) -> int:
        """Columns per scale of a parameter of ``k`` (this rank's) columns: all of them."""
        return k

    def scale_piece(self, name: str, shape: tuple, scales, cut: tuple[int, int, int] | None) -> torch.Tensor:
        """float32 [rows, 1]: the scales of the rows of float8 tensor ``name`` (stored ``shape``) that ``cut``
        (None, or ``(dim, start, stop)``) keeps; ``scales`` is the stored scale tensor's safetensors slice.  A
        column cut keeps every row's scale: a row's scale holds over any of its columns."""
        stored, rows = tuple(scales.get_shape()), shape[0]
        if stored in ((), (1,), (1, 1)):
            per_row = scales[()].float().reshape(1, 1).expand(rows, 1)  # [()]: a 0-d slice takes no [:]
        elif stored in ((rows,), (rows, 1)):
            per_row = scales[()].float().reshape(rows, 1)
        else:
            raise ValueError(f"tensor {name + self.suffix!r} has shape {stored}; {name!r} of shape {tuple(shape)} "
                             f"needs ({rows}, 1) (strategy 'channel') or (1,) (strategy 'tensor')")
        if cut is not None and cut[0] == 0:
            per_row = per_row[cut[1]:cut[2]]
        return per_row.contiguous()

    @staticmethod
    def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float32 ``weight * scale`` of a float8 piece and its ``scale_piece`` (or of a whole weight and its scale
        as stored: any of the shapes above)."""
        return weight.float() * scale.float().reshape(-1, 1)

    @staticmethod
    def row_scales(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale_piece``'s scales in ``weight_quant.py``'s format: already [rows, 1]."""
        return scale

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8 weight, float32 scale [N, 1] or [1]) of ``weight`` [N, K] in the first strategy: the largest
        magnitude of each row (or of the tensor) becomes FP8_MAX."""
        w = weight.float()
        amax = w.abs().amax(dim=1, keepdim=True) if self.strategies[0] == "channel" else w.abs().amax().reshape(1)
        scale = amax.clamp(min=1e-12) / FP8_MAX
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale

    def quantization_config(self, skip: list[str]) -> dict:
        """config.json's ``quantization_config``, as llm-compressor writes an FP8-dynamic checkpoint."""
        weights = dict(num_bits=8, type="float", strategy=self.strategies[0], symmetric=True, dynamic=False,
                       group_size=None, observer="minmax")
        activations = dict(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": activations, "output_activations": None}},
                "ignore": ["lm_head", *skip], "kv_cache_scheme": None}

"""What a checkpoint's ``quantization_config`` says, and which ones the engine takes (checked before any weight is
read, so that quantized weights are never loaded as if they were not).

``quantization_config(hf_config)`` finds it (a vision-language model's may sit in its ``text_config``);
``check_quantization`` refuses an unsupported one naming the field and its value: "fp8" is the block layout
(``models/fp8_checkpoint.py``), "compressed-tensors" llm-compressor's FP8 (``models/compressed_tensors.py``),
"gptq" and "awq" the int4 ones, whose fields ``models/int4_checkpoint.py`` checks where the model is built.
"""
INT4_METHODS = ("gptq", "awq")
SUPPORTED_QUANT_METHODS = ("fp8", "compressed-tensors") + INT4_METHODS  # a checkpoint's quant_method values
_COMPRESSED_FP8 = {  # compressed-tensors FP8: config group part -> key -> (the library's default, values supported)
    "weights": dict(num_bits=(8, [8]), type=("int", ["float"]), strategy=("tensor", ["channel", "tensor"]),
                    symmetric=(True, [True]), dynamic=(False, [False])),
    "input_activations": dict(num_bits=(8, [8]), type=("int", ["float"]), dynamic=(False, [True]))}


def quantization_config(hf_config: dict) -> dict | None:
    """The checkpoint's ``quantization_config`` (a vision-language model's may sit in its ``text_config``)."""
    for config in (hf_config, hf_config.get("text_config") or {}):
        if config.get("quantization_config") is not None:
            return config["quantization_config"]
    return None


def check_quantization(hf_config: dict) -> None:
    """Refuse a quantized checkpoint whose ``quantization_config`` is not supported, naming the field and its value,
    so that its weights are never loaded as if they were unquantized (a vision-language model's may sit in its
    ``text_config``).  "fp8" is the block layout (``models/fp8_checkpoint.py``): ``weight_block_size`` two positive
    ints, ``fmt`` "e4m3", ``activation_scheme`` "dynamic"; "compressed-tensors" as ``_check_compressed_fp8`` says;
    "gptq" and "awq" where the model is built (``models/int4_checkpoint.py``)."""
    for config in (hf_config, hf_config.get("text_config") or {}):
        quant = config.get("quantization_config")
        if quant is None:
            continue
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method not in SUPPORTED_QUANT_METHODS:
            raise ValueError(f"quantization_config.quant_method={method!r} is not supported (supported: "
                             f"{', '.join(SUPPORTED_QUANT_METHODS)})")
        if method == "compressed-tensors":
            _check_compressed_fp8(quant)
        if method != "fp8":
            continue
        block = quant.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"quantization_config.weight_block_size={block!r} is not supported for "
                             f"quant_method='fp8' (supported: a list of two positive ints, e.g. [128, 128])")
        for field, allowed in (("fmt", "e4m3"), ("activation_scheme", "dynamic")):
            if field in quant and quant[field] != allowed:
                raise ValueError(f"quantization_config.{field}={quant[field]!r} is not supported for "
                                 f"quant_method='fp8' (supported: {allowed!r})")


def _check_compressed_fp8(quant: dict) -> None:
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

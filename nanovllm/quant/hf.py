"""A checkpoint's ``quantization_config``, found where config.json keeps it (a vision-language model's may sit in
its ``text_config``).  ``registry.checkpoint_scheme`` is its one reader: the schemes validate its fields.
"""


def quantization_config(hf_config: dict):
    """The checkpoint's ``quantization_config`` (None where it has none)."""
    for config in (hf_config, hf_config.get("text_config") or {}):
        if config.get("quantization_config") is not None:
            return config["quantization_config"]
    return None

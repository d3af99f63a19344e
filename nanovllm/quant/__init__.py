"""Weight quantization: one interface per scheme (``scheme.QuantScheme``) and a registry from a checkpoint's
``quant_method`` or the ``quantization=`` option to the scheme (``registry.py``).  A layer of its own, above
kernels/ (the formats' ops) and below config.py and models/ (which declare what a scheme quantizes:
``DecoderForCausalLM.quant_targets``; and where a checkpoint tensor goes: ``models/placement.Placement``).

* ``scheme.py``, ``registry.py``: the interface and the registry; ``hf.py``: where config.json keeps
  ``quantization_config``; ``checkpoint.py``: a checkpoint's tensors, headers read once;
* FP8: ``fp8_schemes.py`` (online, block, compressed-tensors), ``fp8_checkpoint.py`` (the block layout, reading
  and writing float8 checkpoints), ``compressed_tensors.py`` (its layout and fields), ``fp8_weights.py`` (the
  held format in a model, online quantization), ``fp8_oracle.py`` (the dequantized oracle);
* int4: ``int4_schemes.py`` (GPTQ, AWQ), ``int4_checkpoint.py`` (fields, writing), ``int4_formats.py`` (the
  on-disk layouts), ``int4_loader.py`` (reading), ``int4_weights.py`` (the held format), ``int4_oracle.py``.
"""

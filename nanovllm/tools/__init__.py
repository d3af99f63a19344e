"""Command-line tools (``python -m nanovllm.tools.<name>``), above the library they use: ``convert_gguf`` (a GGUF file
to a checkpoint), ``synthesize`` (a real config with random weights), ``minicpm`` (MiniCPM configs and their
transformers oracle), ``compress_experts`` with ``svd_fit`` and ``collect_moe_calib`` (low-rank experts),
``oracle`` (greedy parity with transformers) and ``default_model`` (the model used when none is given).
"""

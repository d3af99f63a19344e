"""Multi-LoRA (Punica's design): ops add, to a projection's output, each token's own adapter's low-rank product.
The ops (``ops.py``), their pure-PyTorch twins (``reference.py``, any device, the CPU path and the oracle) and, for
CUDA, Triton kernels (``triton_lora.py``, registered by ``kernels/cuda.py``; past 16 tokens the stacked products of
``stacked.py``; a pool stacked under its weight: ``folded.py``).

Adapters live in a pool of slots per projection: ``a`` [S, R, K] (the shrink, rank R padded with zero rows) and
``b`` [S, N, R] (the expand), ``scaling`` [S] float32; slot 0 is "no adapter" and adds nothing.  A
step names each token's slot (``StepInputs.lora_slots``); the pool's contents change between steps, never its
shapes, so a captured graph serves every mix of adapters.
"""

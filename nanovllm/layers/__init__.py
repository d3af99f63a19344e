"""Building blocks of the model graphs as modules (norms, rotary tables) and the sampler; they call the ops and
pure functions of ``nanovllm.kernels`` and never import anything above it."""

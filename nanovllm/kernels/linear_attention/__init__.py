"""Linear attention (Gated DeltaNet, the hybrid Qwen3-Next / Qwen3.5 layers): the causal short convolution and the
gated delta rule as registered ops over per-sequence state pools (``ops.py``), their pure-PyTorch twins
(``reference.py``, the CPU path and the oracle) and Triton kernels for CUDA (``triton_kernels.py``, registered by
``kernels/cuda.py``).

State pools hold one row per state slot: the convolution state ``[S, D, K-1]`` (the last K-1 inputs of every
channel, in the model's dtype) and the recurrent state ``[S, HV, DK, DV]`` (float32).  A step names each sequence
row's slot in ``StepInputs.state_slots``; a row whose context before this step is 0 (a new prompt, a padding row)
starts from zeros, any other from its slot, and every row writes its final state back to its slot.
"""

"""The ops of a step and their implementations; beside ``distributed`` at the bottom of the packages, above only the
top-level modules (``envs.py`` and the like).

``ops.py`` defines each fused op (attention, KV store, rope, linear, MoE, sampling) as a registered torch op whose
default is its pure-PyTorch twin (``reference.py``, ``moe_reference.py``, ``sampling.py``): the CPU path and the test
oracle.  A platform registers faster implementations per device type: ``cuda.py`` (the ``triton_*`` kernels, tuned
by ``matmul_configs.py`` and ``moe_configs.py``), ``npu.py`` and ``cpu.py``.  ``options.py`` holds the switches.
"""

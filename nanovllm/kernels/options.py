"""The switches a user or a debugging engineer may flip for the kernels and the platforms, read from the environment
in one place.

``KernelOptions.from_env()`` is the only reader of these variables:

* ``NANOVLLM_KERNELS``: ``auto`` (default) or ``reference``, which runs the pure-PyTorch twins of every op on
  every device, CUDA included (a debugging aid: the twins are the oracle).
* ``NANOVLLM_MATMUL``: ``auto`` (default) or ``cublas``, which turns the tuned Triton decode matmuls off.
* ``NANOVLLM_MATMUL_TABLE``: the path of another matmul dispatch table (what a tuning benchmark writes).
* ``NANOVLLM_PDL``: ``1`` (default) or ``0``, which turns programmatic dependent launch off.  It is always off
  under ``TRITON_INTERPRET=1`` (the interpreter cannot launch with it).
* ``NANOVLLM_HOPPER_FEATURES``: ``1`` (default) or ``0``, which makes a Hopper (sm_90+) GPU take the pre-Hopper
  path: no TMA loads and no programmatic dependent launch (``triton_common._hopper_or_newer``), so that path can be
  run on an H100.
* ``NANOVLLM_NPU_GRAPH_MODE``: ``max-autotune`` (default: torchair lowers each decode graph to Ascend IR) or
  ``reduce-overhead`` (torchair captures it as an aclgraph); see ``nanovllm/platforms/npu.py``.
* ``NANOVLLM_ALLREDUCE``: ``one_shot`` (default) or ``nccl``: how a tensor-parallel step on CUDA all-reduces up to
  a decode step's worth of rows (``nanovllm/distributed/collectives.py``); larger ones always take NCCL.
* ``NANOVLLM_MPS_COMPILE``: ``0`` (default: MPS runs eagerly) or ``1``, which compiles the step with
  MPSInductor, with a warning (``nanovllm/platforms/mps.py``).

A value outside those raises ``ValueError`` naming the variable and the value.

The options in force are process-wide: each platform builds its own from the environment and installs them
with ``set_options`` when it is made, so the last engine made decides.  Until then ``current_options()`` is
``from_env()``, evaluated once on first use.  Kernels and ops call ``current_options()`` each time they choose an
implementation (an attribute read), never ``os.environ``.
"""
import os
from dataclasses import asdict, dataclass

_CHOICES = {"NANOVLLM_KERNELS": ("auto", "reference"), "NANOVLLM_MATMUL": ("auto", "cublas"),
            "NANOVLLM_PDL": ("1", "0"), "NANOVLLM_HOPPER_FEATURES": ("1", "0"),
            "NANOVLLM_NPU_GRAPH_MODE": ("max-autotune", "reduce-overhead"), "NANOVLLM_MPS_COMPILE": ("0", "1"),
            "NANOVLLM_ALLREDUCE": ("one_shot", "nccl")}


def _read(env, name: str) -> str:
    value = env.get(name) or _CHOICES[name][0]
    if value not in _CHOICES[name]:
        raise ValueError(f"{name}={value!r} is not allowed; expected one of {', '.join(_CHOICES[name])}")
    return value


@dataclass(frozen=True)
class KernelOptions:
    reference_kernels: bool = False  # every op runs its pure-PyTorch twin, on every device
    triton_matmul: bool = True  # decode projections may take the tuned Triton matmul (else cuBLAS)
    matmul_table: str | None = None  # another matmul dispatch table (None: the one shipped beside the kernels)
    pdl: bool = True  # Triton kernels take part in programmatic dependent launch (where the GPU supports it)
    hopper_features: bool = True  # TMA and PDL where the GPU has them; False: the pre-Hopper path everywhere
    npu_graph_mode: str = "max-autotune"  # torchair's CompilerConfig().mode on the NPU platform
    mps_compile: bool = False  # compile the step on MPS (MPSInductor) instead of running it eagerly
    one_shot_all_reduce: bool = True  # tensor parallelism on CUDA: decode-sized all-reduces by symmetric memory

    @classmethod
    def from_env(cls, env=None) -> "KernelOptions":
        """The options the environment (``os.environ`` unless ``env`` is given) asks for."""
        env = os.environ if env is None else env
        return cls(reference_kernels=_read(env, "NANOVLLM_KERNELS") == "reference",
                   triton_matmul=_read(env, "NANOVLLM_MATMUL") == "auto",
                   matmul_table=env.get("NANOVLLM_MATMUL_TABLE") or None,
                   pdl=_read(env, "NANOVLLM_PDL") == "1" and env.get("TRITON_INTERPRET") != "1",
                   hopper_features=_read(env, "NANOVLLM_HOPPER_FEATURES") == "1",
                   npu_graph_mode=_read(env, "NANOVLLM_NPU_GRAPH_MODE"),
                   mps_compile=_read(env, "NANOVLLM_MPS_COMPILE") == "1",
                   one_shot_all_reduce=_read(env, "NANOVLLM_ALLREDUCE") == "one_shot")

    def as_dict(self) -> dict:
        return asdict(self)


_current: KernelOptions | None = None


def current_options() -> KernelOptions:
    """The options in force (see the module docstring)."""
    global _current
    if _current is None:
        _current = KernelOptions.from_env()
    return _current


def set_options(options: KernelOptions) -> None:
    """Install ``options`` for every op and kernel of this process, from their next call on."""
    global _current
    if not isinstance(options, KernelOptions):
        raise TypeError(f"set_options expects a KernelOptions, got {type(options).__name__}")
    _current = options

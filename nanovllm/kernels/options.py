"""The switches a user or a debugging engineer may flip for the kernels and the platforms, as one frozen value.

``KernelOptions.from_env()`` builds them from the ``NANOVLLM_*`` variables declared in ``nanovllm/envs.py`` (which
also documents each one and refuses a value it does not allow, naming the variable and the value).

The options in force are process-wide: each platform builds its own from the environment and installs them
with ``set_options`` when it is made, so the last engine made decides.  Until then ``current_options()`` is
``from_env()``, evaluated once on first use.  Kernels and ops call ``current_options()`` each time they choose an
implementation (an attribute read), never the environment.
"""
from dataclasses import asdict, dataclass

from nanovllm.envs import get


@dataclass(frozen=True)
class KernelOptions:
    reference_kernels: bool = False  # every op runs its pure-PyTorch twin, on every device
    triton_matmul: bool = True  # decode projections may take the tuned Triton matmul (else cuBLAS)
    matmul_table: str | None = None  # another matmul dispatch table (None: the one shipped beside the kernels)
    pdl: bool = True  # Triton kernels take part in programmatic dependent launch (where the GPU supports it)
    hopper_features: bool = True  # TMA and PDL where the GPU has them; False: the pre-Hopper path everywhere
    npu_graph_mode: str = "max-autotune"  # torchair's CompilerConfig().mode on the NPU platform
    mps_compile: bool = False  # compile the step on MPS (MPSInductor) instead of running it eagerly
    all_reduce: str = "auto"  # tensor parallelism on CUDA, decode-sized all-reduces: auto, unfused, one_shot or nccl
    moe_w8a8: bool = True  # FP8 experts multiply e4m3 activations (act_quant.py); False: weight-only
    moe_table: str | None = None  # another fused-MoE tile table (None: the one shipped beside the kernels)
    cuda_kernels: bool = True  # the CUDA C++ kernels (cuda_build.py) where nvcc can build them; else Triton's
    dequantized_copies: str = "auto"  # quantized projections keep a dequantized copy (quant/dequantized.py)

    @classmethod
    def from_env(cls, env=None) -> "KernelOptions":
        """The options the environment (``os.environ`` unless ``env`` is given) asks for."""
        return cls(reference_kernels=get("NANOVLLM_KERNELS", env) == "reference",
                   triton_matmul=get("NANOVLLM_MATMUL", env) == "auto",
                   matmul_table=get("NANOVLLM_MATMUL_TABLE", env),
                   pdl=get("NANOVLLM_PDL", env) and not get("TRITON_INTERPRET", env),
                   hopper_features=get("NANOVLLM_HOPPER_FEATURES", env),
                   npu_graph_mode=get("NANOVLLM_NPU_GRAPH_MODE", env),
                   mps_compile=get("NANOVLLM_MPS_COMPILE", env),
                   all_reduce=get("NANOVLLM_ALLREDUCE", env),
                   moe_w8a8=get("NANOVLLM_MOE_W8A8", env),
                   moe_table=get("NANOVLLM_MOE_TABLE", env),
                   cuda_kernels=get("NANOVLLM_CUDA_KERNELS", env) == "auto",
                   dequantized_copies=get("NANOVLLM_DEQUANTIZED_COPIES", env))

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

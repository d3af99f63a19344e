"""Every environment variable nanovllm reads, declared once: name, default, meaning and the check of its value.

``get(name)`` is the only reader of ``os.environ`` for these names (a test holds the package to it): it returns
the parsed value, or the default when the variable is unset or empty; a value the variable does not allow raises
``ValueError`` naming the variable and the value.  ``get(name, env)`` reads a mapping instead (tests, and
``KernelOptions.from_env``).  ``python -m nanovllm.cli env`` prints the table of the ``NANOVLLM_*`` ones
(docs/ENVIRONMENT.md).

The process-wide settings nanovllm changes outside itself (an environment variable set for child processes, a
compiler setting that outlives an engine) are recorded with ``note_process_setting`` where they are made, and
``process_settings()`` lists them for the start-up line, so none is changed behind the user's back.  A change that
can be undone when its work ends is scoped instead, and not recorded.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: object  # what ``get`` returns when the variable is unset or empty (a callable: what it returns then)
    meaning: str  # docs/ENVIRONMENT.md's words for it (markdown)
    parse: Callable[[str, str], object]  # (name, raw value) -> value; raises ValueError naming both

    def default_value(self):
        return self.default() if callable(self.default) else self.default


def _choice(*allowed: str, upper: bool = False) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.upper() if upper else raw
        if value not in allowed:
            raise ValueError(f"{name}={raw!r} is not allowed; expected one of {', '.join(allowed)}")
        return value
    return parse


def _flag(name: str, raw: str) -> bool:
    return _choice("0", "1")(name, raw) == "1"


def _truthy(name: str, raw: str) -> bool:
    """Another project's switch, read as that project reads it (never refused: it is not ours to check)."""
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _positive_seconds(name: str, raw: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{name}={raw!r}: expected a positive number of seconds")
    return seconds


def _text(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


_VARIABLES = (
    EnvVar("NANOVLLM_LOG_LEVEL", "INFO", "the package logger's level: `DEBUG`, `INFO` (default), `WARNING`, `ERROR`",
           _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True)),
    EnvVar("NANOVLLM_CACHE_DIR", lambda: Path.home() / ".cache" / "nanovllm",
           "root for converted models and compile artifacts (default `~/.cache/nanovllm`)", _path),
    EnvVar("NANOVLLM_DISABLE_COMPILE_CACHE", False, "`1` turns the persistent compile cache off; `0` (default)",
           _flag),
    EnvVar("NANOVLLM_KERNELS", "auto", "`reference` runs the pure-PyTorch twins of every op, on CUDA too (a "
           "debugging aid: the twins are the oracle); `auto` (default)", _choice("auto", "reference")),
    EnvVar("NANOVLLM_MATMUL", "auto", "`cublas` turns the tuned Triton decode matmuls off "
           "(`nanovllm/kernels/matmul_configs.py`); `auto` (default)", _choice("auto", "cublas")),
    EnvVar("NANOVLLM_CUDA_KERNELS", "auto", "`off` keeps every projection on its Triton kernel; `auto` (default) "
           "builds the CUDA C++ kernels (`nanovllm/kernels/cuda_build.py`: the few-row int4 and FP8 projections) "
           "with the system's nvcc where there is one", _choice("auto", "off")),
    EnvVar("NANOVLLM_DEQUANTIZED_COPIES", "auto", "whether FP8 and int4 projections keep their weight dequantized "
           "beside it, so the products cuBLAS takes (past the few-row kernels) skip dequantizing it on every call "
           "(`nanovllm/quant/dequantized.py`): `auto` (default) where the copies add at most an eighth to the "
           "weights' bytes (a mixture of experts' attention), `on`, `off`", _choice("auto", "on", "off")),
    EnvVar("NANOVLLM_MATMUL_TABLE", None, "path of another matmul dispatch table (what a tuning benchmark writes; "
           "default: the one shipped beside the kernels)", _text),
    EnvVar("NANOVLLM_PDL", True, "`0` turns programmatic dependent launch off (`1`, default: on where the GPU has it, "
           "Hopper and newer; always off under `TRITON_INTERPRET=1`; `nanovllm/kernels/pdl.py`)", _flag),
    EnvVar("NANOVLLM_MOE_W8A8", True, "`0` keeps FP8 experts weight-only (activations in the model's dtype); `1` "
           "(default): W8A8, activations rounded to e4m3 per 128 columns (`nanovllm/kernels/act_quant.py`)", _flag),
    EnvVar("NANOVLLM_MOE_TABLE", None, "path of another fused-MoE tile table (what `python -m benchmarks.moe_kernel "
           "--write-table` writes; default: `nanovllm/kernels/moe_tuned.json`)", _text),
    EnvVar("NANOVLLM_HOPPER_FEATURES", True, "`0` sends a Hopper GPU down the pre-Hopper path: no TMA loads, no "
           "programmatic dependent launch; `1` (default)", _flag),
    EnvVar("NANOVLLM_NPU_GRAPH_MODE", "max-autotune", "torchair's `CompilerConfig().mode` on the NPU: "
           "`max-autotune` (default, Ascend IR) or `reduce-overhead` (aclgraph)",
           _choice("max-autotune", "reduce-overhead")),
    EnvVar("NANOVLLM_ALLREDUCE", "auto", "a tensor-parallel CUDA step's decode-sized all-reduces: `auto` (default) "
           "takes symmetric memory's one-shot kernel below 512 KiB and its two-shot kernel from there, and a sum "
           "that a residual add and RMSNorm follow (attention's, the MLP's or the experts') runs in one launch with "
           "them (a sum past the decode size: NCCL's, then the add and norm in one launch); `unfused` as `auto`, "
           "the norm apart; `one_shot` the one-shot kernel at every such size, unfused; `nccl` NCCL",
           _choice("auto", "unfused", "one_shot", "nccl")),
    EnvVar("NANOVLLM_MPS_COMPILE", False, "`1` compiles the step on MPS with MPSInductor, with a warning; `0` "
           "(default: eager)", _flag),
    EnvVar("NANOVLLM_TP_TIMEOUT_S", 30.0, "seconds a tensor-parallel peer may stop answering (no heartbeat, or a "
           "step or collective that waits for it) before rank 0 raises naming it; also the collectives' timeout "
           "(default 30)", _positive_seconds),
    EnvVar("NANOVLLM_API_KEY", None, "the server's API key when `--api-key` is not given (default: none, no key "
           "required)", _text),
    # read, never set, by nanovllm: other projects' variables that change what it does
    EnvVar("TRITON_INTERPRET", False, "`1` runs Triton kernels in Triton's CPU interpreter (the tests set it); "
           "programmatic dependent launch is then off", _truthy),
    EnvVar("TORCHINDUCTOR_ENABLE_PDL", None, "when set, Inductor's own choice of programmatic dependent launch is "
           "left alone instead of following `NANOVLLM_PDL`", _text),
)
VARIABLES: dict[str, EnvVar] = {v.name: v for v in _VARIABLES}


def get(name: str, env: Mapping[str, str] | None = None):
    """The value of the declared variable ``name`` in ``env`` (default ``os.environ``), parsed; its default when
    it is unset or empty."""
    var = VARIABLES.get(name)
    if var is None:
        raise KeyError(f"{name} is not a declared environment variable (nanovllm/envs.py)")
    raw = (os.environ if env is None else env).get(name)
    return var.default_value() if not raw else var.parse(name, raw)


def is_set(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether the declared variable ``name`` is set (to anything, even empty) in ``env``."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a declared environment variable (nanovllm/envs.py)")
    return name in (os.environ if env is None else env)


_process_settings: dict[str, str] = {}


def note_process_setting(name: str, value) -> None:
    """Record that nanovllm set ``name`` (an environment variable or a compiler setting) to ``value`` for the
    whole process; the start-up line lists it."""
    _process_settings[name] = str(value)


def process_settings() -> dict[str, str]:
    """The process-wide settings nanovllm has changed so far, in the order first made (see the module doc)."""
    return dict(_process_settings)


def markdown_table() -> str:
    """docs/ENVIRONMENT.md's table of the ``NANOVLLM_*`` variables (a test keeps that page equal to it)."""
    rows = ["| variable | effect |", "|---|---|"]
    rows += [f"| `{v.name}` | {v.meaning} |" for v in _VARIABLES if v.name.startswith("NANOVLLM_")]
    return "\n".join(rows)


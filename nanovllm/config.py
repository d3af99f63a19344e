"""Engine configuration: the validated arguments of ``LLM(...)`` plus what is read from the checkpoint."""
import json
import os
from dataclasses import dataclass, field

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def normalize_graph_batch_sizes(sizes, max_num_seqs: int) -> tuple[int, ...]:
    """Validate, deduplicate and sort decode buckets; ``None`` gives the defaults capped at ``max_num_seqs``."""
    if sizes is None:
        capped = [s for s in DEFAULT_GRAPH_BATCH_SIZES if s <= max_num_seqs]
        if max_num_seqs not in capped and max_num_seqs < DEFAULT_GRAPH_BATCH_SIZES[-1]:
            capped.append(max_num_seqs)
        return tuple(sorted(set(capped)))
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"graph_batch_sizes must be a list of positive ints, got {sizes!r}")
    sizes = list(sizes)
    if not sizes:
        raise ValueError("graph_batch_sizes must not be empty (use enforce_eager=True to disable graphs)")
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"graph_batch_sizes must hold positive ints, got {s!r} in {sizes}")
        if s > max_num_seqs:
            raise ValueError(f"graph batch size {s} exceeds max_num_seqs={max_num_seqs}; "
                             f"raise max_num_seqs or drop the bucket")
    return tuple(sorted(set(sizes)))


def normalize_prefill_graph_sizes(sizes, max_num_seqs: int, max_step_tokens: int) -> tuple[int, ...] | None:
    """Validate, deduplicate and sort the token counts prefill steps are captured at; ``None`` stays ``None``
    (the platform's default, see ``compile/prefill_graphs.py``) and an empty list turns prefill graphs off.

    A prefill graph has ``max_num_seqs + 1`` sequence rows and must hold more tokens than rows (a step with one
    token per row is a decode step), and no step holds more than ``max_step_tokens`` tokens."""
    if sizes is None:
        return None
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"prefill_graph_sizes must be a list of token counts, got {sizes!r}")
    sizes = list(sizes)
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or not max_num_seqs + 1 < s <= max_step_tokens:
            raise ValueError(f"prefill graph sizes must be ints in (max_num_seqs + 1, the most tokens a step holds] "
                             f"= ({max_num_seqs + 1}, {max_step_tokens}], got {s!r} in {sizes}")
    return tuple(sorted(set(sizes)))


@dataclass
class EngineConfig:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    enforce_eager: bool = False
    graph_batch_sizes: tuple | None = None
    prefill_graph_sizes: tuple | None = None  # None: the platform's default; (): prefill steps are not captured
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    kvcache_block_size: int = 64  # measured best on H100: see docs/PERFORMANCE.md
    num_kvcache_blocks: int | None = None
    seed: int = 0
    # Engine steps queued on the device before the host reads the oldest one's tokens: 1 queues the next step
    # while the current one runs; 3 also rides out host stalls of up to about two steps (engine/engine.py).
    pipeline_depth: int = 3
    hf_config: dict = field(default_factory=dict)
    eos_token_ids: tuple = ()

    def __post_init__(self):
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(f"model must be a path to an HF checkpoint directory, got {type(self.model).__name__}")
        self.model = os.fspath(self.model)
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"model directory not found: {self.model!r}")
        if not isinstance(self.enforce_eager, bool):
            raise TypeError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_model_len", self.max_model_len, 1)
        _check_int("seed", self.seed, 0)
        _check_int("pipeline_depth", self.pipeline_depth, 1)
        _check_int("kvcache_block_size", self.kvcache_block_size, 16)
        if self.kvcache_block_size & (self.kvcache_block_size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= 16, got {self.kvcache_block_size}")
        if self.num_kvcache_blocks is not None:
            _check_int("num_kvcache_blocks", self.num_kvcache_blocks, 1)
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got {self.dtype!r}")
        self.graph_batch_sizes = normalize_graph_batch_sizes(self.graph_batch_sizes, self.max_num_seqs)
        config_path = os.path.join(self.model, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in model directory {self.model!r}")
        with open(config_path) as f:
            self.hf_config = json.load(f)
        limit = self.hf_config.get("max_position_embeddings")
        if limit:
            self.max_model_len = min(self.max_model_len, int(limit))
        self.eos_token_ids = read_eos_token_ids(self.model, self.hf_config)
        self.prefill_graph_sizes = normalize_prefill_graph_sizes(self.prefill_graph_sizes, self.max_num_seqs,
                                                                 self.max_step_tokens)

    @property
    def max_step_tokens(self) -> int:
        """The most tokens a prefill step holds: the step budget, or every sequence at its longest."""
        return min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)


def read_eos_token_ids(model_dir: str, hf_config: dict) -> tuple[int, ...]:
    """Every EOS id the checkpoint declares: config.json and generation_config.json may each list several."""
    ids = []
    sources = [hf_config]
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            sources.append(json.load(f))
    for src in sources:
        eos = src.get("eos_token_id")
        if eos is None:
            continue
        for e in (eos if isinstance(eos, list) else [eos]):
            if int(e) not in ids:
                ids.append(int(e))
    return tuple(ids)

"""``EngineConfig``: every argument of ``LLM(...)``, validated, plus what is read from the checkpoint.

This dataclass is the one place the engine's options are written down.  ``LLM``'s keyword arguments, the
command-line flags of ``precompile``, ``bench.py`` and ``example.py`` (``nanovllm/cli.py``) and the README's
argument table (checked by a test) are all derived from its fields: each field's ``metadata["help"]`` is its
documentation.  Fields with ``init=False`` are filled from the checkpoint directory.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field, fields

from nanovllm.graph_sizes import normalize_graph_batch_sizes, normalize_prefill_graph_sizes
from nanovllm.hub import resolve_model
from nanovllm.pooling_params import resolve_pooler
from nanovllm.quant import registry
from nanovllm.speculative import SpeculativeConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; both FP8 spellings are e4m3
KV_CACHE_SCALES = ("auto", "one", "tensor", "head")
CUDA_OFFLOAD_HOST_SHARE = 0.45  # offload_host_share's default on CUDA (docs/PERFORMANCE.md, expert offload)
QUANTIZATIONS = tuple(registry.ONLINE)  # the ``quantization`` option's values (None: as the checkpoint says)
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|npu)(:\d+)?")


def _opt(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass
class EngineConfig:
    model: str = field(metadata={"help": "HF checkpoint directory (config.json plus safetensors, one file or "
                                         "sharded with an index; with load_format='dummy' config.json alone), or "
                                         "a hub repo id `org/name` whose config, tokenizer and safetensors are "
                                         "downloaded (`nanovllm/hub.py`)"})
    revision: str | None = _opt(None, "with a hub repo id: the branch, tag or commit hash to download (default: "
                                      "`main`); unused for a directory")
    download_dir: str | None = _opt(None, "with a hub repo id: the cache directory it is downloaded to (default: "
                                          "huggingface_hub's cache, `$HF_HUB_CACHE`); `HF_HUB_OFFLINE=1` reads "
                                          "the snapshot already there")
    device: str = _opt("auto", "`auto` (CUDA, else an Ascend NPU, else Apple MPS, else CPU), `cpu`, `cuda`, `cuda:N`, "
                               "`npu`, `npu:N` or `mps`")
    dtype: str = _opt("auto", "the checkpoint's dtype on CUDA (float16 below compute capability 8.0) and NPU, "
                              "float16 on MPS, float32 on CPU; or `float32`, `bfloat16`, `float16`", choices=DTYPES)
    load_format: str = _opt("safetensors", "`safetensors` reads the checkpoint; `dummy` draws random weights on "
                                           "the device from config.json alone, deterministic under `seed`",
                            choices=LOAD_FORMATS)
    enforce_eager: bool = _opt(False, "skip compilation and graphs: every step runs eagerly")
    graph_batch_sizes: tuple | None = _opt(None, "decode buckets; default `[1, 2, 4, 8, 16, 32, 48, 64, 96, 128, "
                                                 "160, 192, 224, 256]` capped at `max_num_seqs` (times 1 + k "
                                                 "when speculating)", list_of=int)
    prefill_graph_sizes: tuple | None = _opt(
        None, "token counts prefill steps are captured at (CUDA default: 128, 192, 256, 384, ..., powers of two "
              "and 1.5 times each, below a quarter of `max_num_batched_tokens`, then 1/4, 2/4, 3/4 and all of "
              "it, those above `max_num_seqs + 1`); `[]` (flag: `none`) turns prefill graphs off", list_of=int)
    tensor_parallel_size: int = _opt(1, "ranks the model is split over (heads, MLP and vocabulary), one process "
                                         "and device each on this node, started by `LLM` (or torchrun's ranks)")
    max_num_seqs: int = _opt(256, "sequences decoding at once")
    max_num_batched_tokens: int = _opt(16384, "tokens per prefill step; longer prompts are chunked")
    mixed_prefill: bool = _opt(True, "a prefill step also carries the next token of every decoding sequence that "
                                      "fits its token budget (not constrained ones), as vLLM mixes prefill chunks "
                                      "and decodes, so decoding does not stall while prompts arrive")
    max_model_len: int = _opt(4096, "prompt + completion limit (capped by the checkpoint's "
                                    "`max_position_embeddings`)")
    gpu_memory_utilization: float = _opt(0.92, "share of device memory for weights, activations and KV cache "
                                                "(vLLM's default; on MPS: of `torch.mps.recommended_max_memory()`)")
    kvcache_block_size: int = _opt(64, "tokens per KV block (a power of two >= 16; docs/PERFORMANCE.md has the "
                                       "measurement behind the default)")
    kv_cache_dtype: str = _opt("auto", "`auto` keeps K and V in the model's dtype; `fp8` (or `fp8_e4m3`) stores "
                                       "them as float8 e4m3 with per-layer scales, about twice the tokens in the "
                                       "same memory", choices=KV_CACHE_DTYPES)
    kv_cache_scales: str = _opt("auto", "scales of an FP8 KV cache: `auto` takes the checkpoint's "
                                        "`k_scale`/`v_scale` (or `kv_scale`) and otherwise `head`; `one` is 1.0; "
                                        "`tensor` and `head` are calibrated at start-up per layer, or per layer "
                                        "and KV head (docs/PERFORMANCE.md compares them)", choices=KV_CACHE_SCALES)
    quantization: str | None = _opt(None, "weights' quantization: unset follows the checkpoint (a block-FP8 "
                                          "checkpoint runs in FP8 as stored); `fp8` quantizes an unquantized "
                                          "checkpoint, or dummy weights, at load time: the decoder layers' "
                                          "projections and experts in float8 e4m3 with a float32 scale per row",
                                      choices=QUANTIZATIONS)
    num_kvcache_blocks: int | None = _opt(None, "fixed number of KV blocks (default: from free device memory; on "
                                                "CPU 1 GiB worth)")
    state_snapshots: int | None = _opt(None, "hybrid linear-attention models: state slots kept as prefix-cache "
                                             "snapshots, each a sequence's recurrent and convolution states in "
                                             "every layer (default: max_num_seqs // 4 + 2, plus, where device memory "
                                             "is measured, half of what the running sequences' KV blocks leave; 0: "
                                             "no prefix hits)")
    seed: int = _opt(0, "seeds requests that have no seed of their own, and dummy weights")
    pipeline_depth: int = _opt(3, "engine steps queued on the device before the host reads the oldest one's "
                                  "tokens (1 queues only the next step), offline and in the server alike; deeper "
                                  "hides longer host stalls, and a sequence that stops on EOS is computed for up to "
                                  "this many steps past it.  The most: on a GPU with one rank, fewer while steps "
                                  "are long enough to cover the host's time (a new prompt waits behind them)")
    offload_experts: bool = _opt(False, "keep mixture-of-experts weights in (pinned) host memory and a per-layer "
                                        "device cache of `experts_on_device` experts, evicted least recently "
                                        "used; the model then runs eagerly")
    experts_on_device: int | None = _opt(None, "device slots per MoE layer with `offload_experts` (default: all "
                                               "of the layer's experts)")
    offload_host_share: float | None = _opt(None, "with `offload_experts`, the share of a step's non-resident "
                                                  "experts that the host computes from its own copy instead of "
                                                  "copying them to the device, the expert on the boundary split "
                                                  "along its intermediate rows (0: copy every one; default: "
                                                  f"{CUDA_OFFLOAD_HOST_SHARE} on CUDA, else 0; 0 for int4 experts)")
    speculative_config: dict | None = _opt(None, "speculative decoding, vLLM's keys (a JSON object on the "
                                                 "command line): `{\"method\": \"ngram\", "
                                                 "\"num_speculative_tokens\": k, \"prompt_lookup_min\": a, "
                                                 "\"prompt_lookup_max\": b}` proposes up to k tokens from the "
                                                 "sequence's own text, `{\"method\": \"draft_model\", \"model\": "
                                                 "DIR, \"num_speculative_tokens\": k}` has a small model with the "
                                                 "same tokenizer draw them; the model keeps those it draws itself "
                                                 "at each position (docs/SPECULATIVE.md)")
    pooler_config: dict | None = _opt(None, "how `LLM.embed` and `/v1/embeddings` pool, vLLM's keys (a JSON object "
                                            "on the command line): `{\"pooling_type\": \"LAST\" or \"MEAN\", "
                                            "\"normalize\": true}` over the checkpoint's sentence-transformers "
                                            "`modules.json`, itself over LAST + normalize "
                                            "(`nanovllm/pooling_params.py`); `\"classifier_from_token\": "
                                            "[\"no\", \"yes\"]` makes `LLM.score` and the score/rerank "
                                            "endpoints a yes/no reranker (`nanovllm/scoring.py`)")
    enable_lora: bool = _opt(False, "serve LoRA adapters (PEFT format, on q/k/v/o/gate/up/down) beside the base "
                                    "model, several in one batch (`LoRARequest`; `nanovllm/lora/`)")
    max_loras: int = _opt(1, "with `enable_lora`: adapters held on the device at once (a request for another "
                             "waits for a slot)")
    max_lora_rank: int = _opt(16, "with `enable_lora`: the largest adapter rank (the pool's); a higher one is "
                                  "refused")
    max_cpu_loras: int | None = _opt(None, "with `enable_lora`: adapters kept loaded in host memory, least recently "
                                           "used evicted (default: `max_loras`)")
    hf_config: dict = field(default_factory=dict, init=False)
    eos_token_ids: tuple = field(default=(), init=False)

    def __post_init__(self):
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(f"model must be a path to an HF checkpoint directory, got {type(self.model).__name__}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(map(repr, LOAD_FORMATS))}, "
                             f"got {self.load_format!r}")
        # a directory stays as given; a hub repo id becomes its downloaded snapshot (LLM resolves it first)
        self.model = resolve_model(self.model, self.revision, self.download_dir,
                                   weights=self.load_format != "dummy")
        if not isinstance(self.enforce_eager, bool):
            raise TypeError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        for name, minimum in dict(tensor_parallel_size=1, max_num_seqs=1, max_num_batched_tokens=1, max_model_len=1,
                                  seed=0, pipeline_depth=1, kvcache_block_size=16).items():
            _check_int(name, getattr(self, name), minimum)
        if self.state_snapshots is not None:
            _check_int("state_snapshots", self.state_snapshots, 0)
        for name in ("offload_experts", "mixed_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        share = self.offload_host_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0.0 <= share <= 1.0):
            raise ValueError(f"offload_host_share must be a number in [0, 1], got {share!r}")
        if share and not self.offload_experts:
            raise ValueError(f"offload_host_share={self.offload_host_share} needs offload_experts=True")
        if self.experts_on_device is not None:
            _check_int("experts_on_device", self.experts_on_device, 1)
            if not self.offload_experts:
                raise ValueError(f"experts_on_device={self.experts_on_device} needs offload_experts=True")
        if not isinstance(self.enable_lora, bool):
            raise TypeError(f"enable_lora must be a bool, got {self.enable_lora!r}")
        _check_int("max_loras", self.max_loras, 1)
        _check_int("max_lora_rank", self.max_lora_rank, 1)
        self.max_cpu_loras = self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras
        _check_int("max_cpu_loras", self.max_cpu_loras, self.max_loras)
        if self.kvcache_block_size & (self.kvcache_block_size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= 16, got {self.kvcache_block_size}")
        if self.num_kvcache_blocks is not None:
            _check_int("num_kvcache_blocks", self.num_kvcache_blocks, 1)
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not math.isfinite(u) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'npu', 'npu:N' or 'mps', "
                             f"got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_scales not in KV_CACHE_SCALES:
            raise ValueError(f"kv_cache_scales must be one of {', '.join(map(repr, KV_CACHE_SCALES))}, "
                             f"got {self.kv_cache_scales!r}")
        if self.kv_cache_scales != "auto" and self.kv_cache_dtype == "auto":
            raise ValueError(f"kv_cache_scales={self.kv_cache_scales!r} needs kv_cache_dtype='fp8'")
        self.speculative = SpeculativeConfig.parse(self.speculative_config)
        self.graph_batch_sizes = normalize_graph_batch_sizes(
            self.graph_batch_sizes, self.max_num_seqs,
            1 + (self.speculative.num_speculative_tokens if self.speculative is not None else 0))
        config_path = os.path.join(self.model, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in model directory {self.model!r}")
        with open(config_path) as f:
            self.hf_config = json.load(f)
        self.quant_scheme = registry.checkpoint_scheme(self.hf_config)  # every field checked
        self.online_scheme = registry.online_scheme(self.quantization, self.quant_scheme, self.load_format == "dummy")
        limit = (self.hf_config.get("max_position_embeddings")  # vision-language models: their text config's
                 or (self.hf_config.get("text_config") or {}).get("max_position_embeddings"))
        if limit:
            self.max_model_len = min(self.max_model_len, int(limit))
        self.eos_token_ids = read_eos_token_ids(self.model, self.hf_config)
        self.pooler = resolve_pooler(self.model, self.pooler_config)  # an unsupported override raises here
        self.prefill_graph_sizes = normalize_prefill_graph_sizes(self.prefill_graph_sizes, self.max_num_seqs,
                                                                 self.max_step_tokens)

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype != "auto"

    @property
    def online_quantization(self) -> str | None:
        """The quantization applied at load time (``online_scheme``'s method): ``quantization``, unless the
        checkpoint is already quantized and read as it is; dummy weights of a quantized config as it says."""
        return self.online_scheme.method if self.online_scheme is not None else None

    @property
    def max_step_tokens(self) -> int:
        """The most tokens a prefill step holds: the step budget, or every sequence at its longest."""
        return min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)


def engine_fields() -> list:
    """The user-settable fields of ``EngineConfig`` (``model`` first), in declaration order."""
    return [f for f in fields(EngineConfig) if f.init]


def resolve_model_option(model, options: dict) -> str:
    """``LLM(model, **options)``'s checkpoint directory, before any rank starts: ``model`` itself if a directory,
    else the hub repo's snapshot (``nanovllm/hub.py``, with the options ``revision``, ``download_dir`` and
    ``load_format``).  Unknown option names raise ``TypeError`` first, so that a typo costs no download."""
    unknown = sorted(set(options) - {f.name for f in engine_fields()})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}: the options are "
                        f"EngineConfig's fields (nanovllm/config.py)")
    return resolve_model(model, options.get("revision"), options.get("download_dir"),
                         weights=options.get("load_format", "safetensors") != "dummy")


def read_eos_token_ids(model_dir: str, hf_config: dict) -> tuple[int, ...]:
    """Every EOS id the checkpoint declares: config.json and generation_config.json may each list several."""
    ids = []
    sources = [hf_config, hf_config.get("text_config") or {}]  # a vision-language model's may sit in the latter
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

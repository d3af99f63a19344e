"""Shared fixtures: tiny random-weight checkpoints built with transformers' config classes, and an HF oracle."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The kernel tests run Triton on CPU tensors.  The switch must be set before anything imports triton: a triton
# imported without it keeps its library functions (tl.max, tl.sum, ...) compiled, and interpreted kernels that
# call them fail, so the outcome would depend on which test module pytest happens to import first.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (the README's ``-n``) the workers share the cores: one OpenMP thread each, passed on to the
# processes tests start, since spinning threads of several workers on a core made some tests ten times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

pytest_plugins = ["slow_tests"]  # the slow tests run only when asked for

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is neither a zombie nor dead (an orphan's zombie may never be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def processes_with(marker: str) -> list[int]:
    """The ``running`` processes of this machine whose environment holds ``marker`` (a process that started with it
    passes it on to the processes it starts)."""
    import os
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if marker.encode() in f.read() and running(int(name)):
                        found.append(int(name))
            except OSError:  # gone meanwhile, or another user's
                pass
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a group's rendezvous or a server)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ends_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` stops ``running`` within ``seconds``."""
    import time
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running(pid)


def make_config(arch: str, **overrides):
    import transformers
    kw = dict(TINY, **overrides)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=32, rope_theta=1e6, **kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(rope_theta=1e6, **kw)
    if arch == "llama":
        return transformers.LlamaConfig(**kw)
    if arch == "llama3":
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64, rope_theta=500000.0)
        return transformers.LlamaConfig(rope_scaling=scaling, rope_theta=500000.0, **dict(kw, tie_word_embeddings=True))
    if arch == "qwen3_moe":  # sparse, dense, sparse
        return transformers.Qwen3MoeConfig(head_dim=32, rope_theta=1e6, num_experts=8, num_experts_per_tok=2,
                                           moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1,
                                           mlp_only_layers=[1], **dict(kw, num_hidden_layers=3))
    if arch == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
                                          **{"sliding_window": None, **kw, "intermediate_size": 48})
    if arch == "mistral":  # full attention unless a test sets sliding_window (transformers' default is 4096)
        return transformers.MistralConfig(rope_theta=1e6, **{"sliding_window": None, **kw})
    if arch == "qwen2_moe":  # dense, then sparse with a shared expert
        return transformers.Qwen2MoeConfig(rope_theta=1e6, num_experts=6, num_experts_per_tok=2,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                           norm_topk_prob=False, decoder_sparse_step=2, **kw)
    if arch == "gpt_oss":  # sliding, full, sliding, full (transformers' default alternation)
        return transformers.GptOssConfig(**dict(kw, **GPT_OSS_KW, swiglu_limit=gpt_oss_limit(GPT_OSS_LIMIT)))
    if arch == "gemma3":  # sliding, sliding, full: a 12-token window ends mid-block in 16-token blocks
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
        return transformers.Gemma3TextConfig(head_dim=32, query_pre_attn_scalar=24, sliding_window=12,
                                             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                             rope_parameters=rope, **dict(kw, num_hidden_layers=3, tie_word_embeddings=True))
    if arch in HYBRID:  # linear, linear, full, linear (what the caller overrides wins)
        moe = HYBRID_MOE_KW if "moe" in arch or "next" in arch else {}
        return HYBRID[arch](**dict(dict(kw, **HYBRID_KW, **moe), **overrides))
    raise ValueError(arch)


def _hybrid_configs() -> dict:
    import transformers
    return {"qwen3_next": transformers.Qwen3NextConfig, "qwen3_5": transformers.Qwen3_5TextConfig,
            "qwen3_5_moe": transformers.Qwen3_5MoeTextConfig}


class _Lazy(dict):
    def __getitem__(self, key):
        return _hybrid_configs()[key]

    def __contains__(self, key):
        return key in ("qwen3_next", "qwen3_5", "qwen3_5_moe")


HYBRID = _Lazy()  # tiny Gated DeltaNet hybrids (models/hybrid.py)
HYBRID_KW = dict(num_hidden_layers=4, head_dim=32, layer_types=["linear_attention", "linear_attention",
                 "full_attention", "linear_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
# GPT-OSS: a 12-token window ends mid-block (16-token blocks); YaRN as its configs declare it (original length 32,
# so the tests run past it); swiglu_limit 1 so the clamps bite at these weights' scale (``gpt_oss_limit``)
GPT_OSS_LIMIT = 1.0
GPT_OSS_KW = dict(num_hidden_layers=4, head_dim=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                  sliding_window=12,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 16.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32})


def gpt_oss_limit(wanted: float) -> float:
    """``wanted`` where the installed transformers honours a config's ``swiglu_limit``; else the limit its experts
    hard-code (transformers 5.17, the GPU image's, sets 7.0 whatever the config says, so an oracle built with
    another limit would compute a model the checkpoint does not describe)."""
    import transformers
    from transformers.models.gpt_oss import modeling_gpt_oss
    config = transformers.GptOssConfig(**dict(TINY, num_local_experts=1, intermediate_size=4, swiglu_limit=wanted))
    return float(modeling_gpt_oss.GptOssExperts(config).limit)


HYBRID_MOE_KW = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48)


def build_checkpoint(path, arch: str, seed: int = 0, std: float = 0.08, **overrides):
    """Save a random-weight HF checkpoint (safetensors + config) and return its directory as str."""
    import transformers
    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and arch in ZERO_CENTRED and "linear_attn.norm" not in name:
                p.uniform_(-0.2, 0.2)  # a zero-centred norm's weight is an offset from 1: the same gains
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            elif name.endswith(".sinks"):  # GPT-OSS's per-head sink logits: large enough to matter
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, std)
    model.save_pretrained(path)
    return str(path)


# families whose RMSNorm weights (all but a Gated DeltaNet's output norm) multiply by 1 + w: drawn near 0, as trained
# ones are, not near 1 (a gain near 2 at every norm made bf16 rounding 20 times louder than in the dense families)
ZERO_CENTRED = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "gemma3")


@pytest.fixture
def restore_options():
    """Put back the kernel options in force (``nanovllm.kernels.options``) after a test that sets others."""
    from nanovllm.kernels.options import current_options, set_options
    saved = current_options()
    yield
    set_options(saved)


@pytest.fixture(scope="session", params=["qwen3", "qwen2", "llama"])
def tiny_model(request, tmp_path_factory):
    return request.param, build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int, w8a8: int = 0,
              **load) -> list[list[int]]:
    """The oracle: transformers' own generate, greedy, float32, one prompt at a time (no padding); ``load`` goes to
    ``from_pretrained`` (e.g. an ``attn_implementation``); ``w8a8`` (True, or a tensor-parallel size): MoE experts
    as W8A8 FP8 ones compute (``quant/w8a8_oracle.py``)."""
    import contextlib

    import transformers
    from nanovllm.quant.w8a8_oracle import w8a8_experts
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **load).eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad(), (w8a8_experts(int(w8a8)) if w8a8 else contextlib.nullcontext()):
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                               min_new_tokens=0, eos_token_id=None, pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


def hf_logprobs(model_dir: str, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """transformers' float32 log_softmax of the distribution each completion token was drawn from:
    [len(completion), vocab], one forward pass over the prompt and the completion."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion[:-1]])).logits[0, len(prompt) - 1:]
    return logits.float().log_softmax(-1)


def check_against_transformers(model_dir: str, prompt: list[int], out: dict, k: int) -> None:
    """``out`` (one ``generate`` result with ``logprobs=k``) holds, per token, transformers' logprob of the sampled
    token first, then its top ``k`` tokens' (float32, within 1e-4)."""
    want = hf_logprobs(model_dir, prompt, out["token_ids"])
    assert len(out["logprobs"]) == len(out["token_ids"]) == len(want)
    for row, token, entry in zip(want, out["token_ids"], out["logprobs"]):
        assert next(iter(entry)) == token
        assert entry[token] == pytest.approx(row[token].item(), abs=1e-4)
        top, ids = row.topk(k)
        assert set(entry) == {token, *ids.tolist()}  # the sampled token first, then the top k
        assert [entry[t] for t in ids.tolist()] == pytest.approx(top.tolist(), abs=1e-4)


# A tiny MiniCPM4: tied embeddings (the key omitted, as in openbmb's config.json), MiniCPM4's scale_emb and
# scale_depth, hidden_size / dim_model_base = 4, and LongRoPE whose short factors are not 1 and whose long factors
# differ, switching past 64 tokens.
MINICPM_TINY = dict(
    architectures=["MiniCPMForCausalLM"], model_type="minicpm", vocab_size=384, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, scale_emb=12, scale_depth=1.4, dim_model_base=16,
    rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.3, 1.9, 2.8, 4.0, 5.5, 7.0, 8.0],
                      long_factor=[1.0, 1.6, 2.9, 4.5, 7.0, 10.0, 14.0, 16.0], original_max_position_embeddings=64))


def build_minicpm_checkpoint(path, seed: int = 0, **overrides) -> str:
    """Save a random-weight MiniCPM checkpoint (``MINICPM_TINY`` with ``overrides``; a None value drops the key)
    and return its directory.  Weights: embedding std 0.02 and the rest 0.2, so that scale_emb (12) does not make
    every next token the current one."""
    import json
    import transformers
    from nanovllm.tools import minicpm
    cfg = {k: v for k, v in dict(MINICPM_TINY, **overrides).items() if v is not None}
    torch.manual_seed(seed)
    tied = minicpm.with_defaults(cfg)["tie_word_embeddings"]
    model = transformers.LlamaForCausalLM(minicpm.llama_config(cfg, tie_word_embeddings=tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.02 if "embed_tokens" in name else 0.2)
    model.save_pretrained(path)
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    return str(path)


# the model-family tests' engine and prompts (gemma3, gpt_oss, hybrid): 16-token blocks, 48-token prefill chunks, so
# the long prompts span several blocks and chunks; 5 prompts outnumber the 4 rows, so rows start at different steps
STAGGERED_ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=160,
                        max_num_batched_tokens=48)
STAGGERED_PROMPTS = [[5, 9, 33, 100, 7, 8] * 12, [3, 4, 5], list(range(10, 110)), [200, 17, 17, 3] * 5, [42]]


def greedy_tokens(llm, prompts, max_tokens: list[int]) -> list[list[int]]:
    """Each prompt's greedy tokens from ``llm``, exactly ``max_tokens[i]`` of them (EOS ignored)."""
    from nanovllm import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]

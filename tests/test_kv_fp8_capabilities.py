"""``kv_cache_dtype="fp8"`` across the capabilities beyond dense and Qwen3-MoE/Mixtral (``test_kv_fp8.py``):
MiniCPM4, Qwen2-MoE's shared expert, vision-language, tensor parallelism, expert offload, graph mode with
preemption, prefix hits and chunked prefill, and the server's flag.

The oracle is ``test_kv_fp8.py``'s: transformers in float32 with an attention function
(``tools/oracle.py:fp8_kv_attention``) that rounds each layer's K and V as our cache does with our engine's scales.
MiniCPM's oracle is transformers' Llama on the equivalent checkpoint (``tools/minicpm.py:to_llama``).  It folds
``scale_emb`` into the embedding and ``scale_depth / sqrt(layers)`` into ``o_proj`` and ``down_proj`` exactly as our
model does, so the residual stream, and with it every layer's K and V, is the same on both sides, with no constant
factor between them; the two differ only at the LM head (our final norm is divided by the width ratio, and by
``scale_emb`` when tied, the oracle's head by the width ratio), which the cache never sees.  So the same scales
round the same values.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_checkpoint, build_minicpm_checkpoint, hf_greedy
from nanovllm import LLM
from nanovllm.tools import minicpm, oracle
from test_kv_fp8 import ENGINE, fp8_oracle, greedy, prompts_of
from vl_checkpoints import IMAGE_PAD, build_vl_checkpoint, picture

PH = "<|vision_start|><|image_pad|><|vision_end|>"


def _calibrated(path, **kw):
    return LLM(path, **dict(ENGINE, kv_cache_scales="head", **kw))


# MiniCPM4: prompts on both sides of the LongRoPE boundary (64 tokens), and one that decodes across it.
MINICPM_PROMPTS = prompts_of(3, seed=5, max_len=40) + [prompts_of(1, seed=6, max_len=1)[0] * 58, list(range(3, 83))]


@pytest.fixture(scope="module")
def minicpm_checkpoint(tmp_path_factory):
    """(MiniCPM4 checkpoint, its Llama oracle checkpoint, the eager engine's tokens and scales)."""
    root = tmp_path_factory.mktemp("minicpm")
    path = build_minicpm_checkpoint(root / "minicpm")
    llama = str(minicpm.to_llama(path, root / "llama"))
    llm = _calibrated(path, enforce_eager=True)
    return path, llama, greedy(llm, MINICPM_PROMPTS, 10), oracle.engine_kv_scales(llm)


def test_minicpm4_eager_matches_the_rounding_oracle(minicpm_checkpoint):
    path, llama, eager, scales = minicpm_checkpoint
    assert eager == fp8_oracle(llama, MINICPM_PROMPTS, 10, scales)
    assert eager != hf_greedy(llama, MINICPM_PROMPTS, 10)  # the rounding shows in the tokens


@pytest.mark.slow
def test_minicpm4_graph_mode_equals_eager(minicpm_checkpoint):
    path, _, eager, scales = minicpm_checkpoint
    llm = _calibrated(path)
    assert llm.engine.runner.mode == "graph"
    assert all(torch.equal(a, b) for pair, other in zip(oracle.engine_kv_scales(llm), scales)
               for a, b in zip(pair, other))
    with torch.compiler.set_stance("fail_on_recompile"):
        assert greedy(llm, MINICPM_PROMPTS, 10) == eager


def test_qwen2_moe_shared_expert_matches_the_rounding_oracle(tmp_path):
    path = build_checkpoint(tmp_path, "qwen2_moe", std=0.3)
    llm = _calibrated(path, enforce_eager=True)
    prompts = prompts_of(4, seed=8, max_len=40)
    got = greedy(llm, prompts, 12)
    assert got == fp8_oracle(path, prompts, 12, oracle.engine_kv_scales(llm))
    assert got != hf_greedy(path, prompts, 12)


# Vision-language: the text layers' projections are scaled from std 0.08 (vl_checkpoints) to 0.3, as test_kv_fp8's
# checkpoints, so that the rounding changes tokens.  The rounding attention is the text model's only: the vision
# tower's attention has no KV cache (and no layer_idx) and keeps SDPA.
VL_PROMPTS = [{"prompt": f"Describe {PH} in a few words.", "multi_modal_data": {"image": picture(120, 90, 1)}},
              {"prompt": f"Compare {PH} with this.", "multi_modal_data": {"image": picture(200, 150, 2)}}]
VL_ENGINE = dict(ENGINE, max_model_len=256, max_num_seqs=2, graph_batch_sizes=[1, 2], dtype="float32")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def vl_checkpoint(request, tmp_path_factory):
    """(checkpoint, the eager engine, its tokens on ``VL_PROMPTS``)."""
    path = build_vl_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    weights = load_file(f"{path}/model.safetensors")
    for name in weights:
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            weights[name] = weights[name] * (0.3 / 0.08)
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    llm = LLM(path, enforce_eager=True, kv_cache_scales="head", **VL_ENGINE)
    return path, llm, greedy(llm, VL_PROMPTS, 10)


def vl_oracle(path, llm, scales) -> list[list[int]]:
    """transformers' VL model's greedy tokens on ``VL_PROMPTS`` (``llm``'s token ids and pixels), its text attention
    rounding K and V with ``scales`` (None: plain SDPA)."""
    import transformers
    attention = {} if scales is None else {
        "attn_implementation": {"text_config": oracle.fp8_kv_attention(scales), "vision_config": "sdpa"}}
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **attention).eval()
    out = []
    for i, prompt in enumerate(VL_PROMPTS):
        ids, images = llm.encode_request(prompt, i)
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10,
                               min_new_tokens=0, eos_token_id=None, pad_token_id=0, pixel_values=images.pixel_values,
                               image_grid_thw=torch.tensor(images.grid_thw), mm_token_type_ids=(x == IMAGE_PAD).int())
        out.append(y[0, len(ids):].tolist())
    return out


def test_vision_language_eager_matches_the_rounding_oracle(vl_checkpoint):
    path, llm, eager = vl_checkpoint
    assert eager == vl_oracle(path, llm, oracle.engine_kv_scales(llm))
    assert eager != vl_oracle(path, llm, None)


@pytest.mark.slow
def test_vision_language_graph_mode_equals_eager(vl_checkpoint):
    path, _, eager = vl_checkpoint
    llm = LLM(path, kv_cache_scales="head", **VL_ENGINE)
    assert llm.engine.runner.mode == "graph"
    assert greedy(llm, VL_PROMPTS, 10) == eager


@pytest.mark.parametrize("choice", ["one", "tensor"])
def test_two_tensor_parallel_ranks_equal_one(tmp_path, choice):
    """A per-tensor scale is agreed over the ranks (its amax is the largest of theirs), so rank 0 holds the scale
    of one rank and both store what one rank stores."""
    path = build_checkpoint(tmp_path, "qwen3", std=0.3)
    prompts = prompts_of(4, seed=9, max_len=40)
    one = LLM(path, enforce_eager=True, kv_cache_scales=choice, **ENGINE)
    want = greedy(one, prompts, 12)
    with LLM(path, enforce_eager=True, kv_cache_scales=choice, tensor_parallel_size=2, **ENGINE) as two:
        assert greedy(two, prompts, 12) == want
        for (k2, v2), (k1, v1) in zip(oracle.engine_kv_scales(two), oracle.engine_kv_scales(one)):
            assert len(k2) == 1 and len(k1) == 2  # rank 0 holds one of the two KV heads
            assert k2.tolist() == pytest.approx(k1[:1].tolist()) and v2.tolist() == pytest.approx(v1[:1].tolist())


def test_expert_offload_changes_no_token(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3_moe", std=0.3)
    prompts = prompts_of(4, seed=10, max_len=30)
    plain = _calibrated(path, enforce_eager=True)
    offload = _calibrated(path, offload_experts=True, experts_on_device=1)
    assert greedy(offload, prompts, 10) == greedy(plain, prompts, 10)
    assert offload.engine.describe()["expert_offload"]["misses"] > 0


@pytest.mark.slow
def test_graph_mode_matches_the_rounding_oracle_with_chunks_prefix_hits_and_preemption(tmp_path):
    """``test_kv_fp8.py``'s eager test, in graph mode: the same prompts, cache and step budget."""
    path = build_checkpoint(tmp_path, "qwen3", std=0.3)
    shared = prompts_of(1, seed=0, max_len=1)[0] * 40
    prompts = [shared + tail for tail in prompts_of(6, seed=1, max_len=30)]
    llm = LLM(path, **dict(ENGINE, max_num_batched_tokens=40, num_kvcache_blocks=10))
    assert llm.engine.runner.mode == "graph"
    got = greedy(llm, prompts, 24)
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.block_manager.cache_hit_tokens > 0
    assert got == fp8_oracle(path, prompts, 24, oracle.engine_kv_scales(llm))


def _server_args(path, *flags):
    from nanovllm.entrypoints.cli import make_parser
    return make_parser().parse_args([path, *flags])


def test_the_servers_command_line_takes_the_kv_cache_dtype(capsys):
    from nanovllm.cli import engine_kwargs
    kwargs = engine_kwargs(_server_args("m", "--kv-cache-dtype", "fp8", "--kv-cache-scales", "head"))
    assert kwargs["kv_cache_dtype"] == "fp8" and kwargs["kv_cache_scales"] == "head"
    assert "kv_cache_dtype" not in engine_kwargs(_server_args("m"))  # not given: LLM's default ("auto")
    with pytest.raises(SystemExit):
        _server_args("m", "--kv-cache-dtype", "fp16")
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_a_request_to_the_server_is_answered_by_an_fp8_engine(tmp_path):
    """The in-process app (``test_server_echo.py``'s ``served``) over an engine built from the server's flags:
    greedy text and logprobs equal the same engine's offline ones."""
    pytest.importorskip("fastapi")
    from nanovllm import SamplingParams
    from nanovllm.cli import engine_kwargs
    from serve_helpers import build_text_checkpoint
    from test_server_echo import completion, served
    path, _ = build_text_checkpoint(tmp_path)
    args = _server_args(path, "--kv-cache-dtype", "fp8", "--kv-cache-scales", "tensor", "--enforce-eager")
    with LLM(path, **dict(engine_kwargs(args), kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=128)) as llm:
        assert llm.engine.describe()["kv_cache_dtype"] == "float8_e4m3fn"
        assert llm.engine.describe()["kv_scales"] == "tensor"
        prompt = "The quick brown fox"
        offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=1), use_tqdm=False)[0]
        with served(llm) as client:
            choice = completion(client, prompt=prompt, max_tokens=6, logprobs=1)["choices"][0]
    assert choice["text"] == offline["text"]
    want = [entry[t] for entry, t in zip(offline["logprobs"], offline["token_ids"])]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-6)

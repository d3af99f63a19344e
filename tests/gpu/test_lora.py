"""Multi-LoRA on a GPU: the Triton ``lora_add`` (kernels/lora) against its twin at model shapes, in both its paths
(per-slot kernels for a few tokens, the stacked products past them, from 4 tokens on a wide output:
``stacked.chosen``), eager and replayed from a CUDA graph with new slots; ``lora_expand`` on a shrink made beside
the base product (a pool stacked under plain weights), the same two ways; and a tiny
Qwen3 with two PEFT adapters and the base in one batch, float32 greedy in graph mode, token-identical to
transformers + PEFT on the same GPU."""
import math
import os

import pytest
import torch

from gpu.conftest import skip_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def rel_err(out, want) -> float:
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).nan_to_num(math.inf).item()


def pool(tokens: int, k: int, n: int, r: int, slots: int, dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randn(tokens, n, device="cuda", generator=g).to(dtype)
    x = torch.randn(tokens, k, device="cuda", generator=g).to(dtype)
    a = (torch.randn(slots, r, k, device="cuda", generator=g) * 0.05).to(dtype)
    b = (torch.randn(slots, n, r, device="cuda", generator=g) * 0.05).to(dtype)
    scaling = torch.rand(slots, device="cuda", generator=g) + 0.5
    ids = torch.randint(0, slots, (tokens,), device="cuda", generator=g)
    return y, x, ids, a, b, scaling


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 7, 63, 64, 300, 2048])
def test_lora_add_matches_its_twin_at_model_shapes(tokens, dtype):
    from nanovllm.kernels.lora.reference import lora_add_reference
    from nanovllm.kernels.lora.triton_lora import lora_add_triton
    for k, n in ((1024, 3072), (4096, 1024), (1024, 6144)):  # the last: wide, stacked from 4 tokens
        y, x, ids, a, b, scaling = pool(tokens, k, n, 16, 5, dtype)
        out, want = lora_add_triton(y, x, ids, a, b, scaling), lora_add_reference(y, x, ids, a, b, scaling)
        assert rel_err(out - y, want - y) < (2e-2 if dtype == torch.bfloat16 else 1e-4), (k, n)
        base = ids == 0
        assert torch.equal(out[base], y[base])  # slot 0 adds nothing


@pytest.mark.parametrize("tokens", [16, 256])
def test_lora_add_replays_in_a_cuda_graph_with_new_slots(tokens):
    from nanovllm.kernels.lora.reference import lora_add_reference
    from nanovllm.kernels.lora.triton_lora import lora_add_triton
    y, x, ids, a, b, scaling = pool(tokens, 1024, 2048, 16, 4, torch.bfloat16)
    lora_add_triton(y, x, ids, a, b, scaling)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_add_triton(y, x, ids, a, b, scaling)
    for seed in (1, 2):
        ids.copy_(torch.randint(0, 4, (tokens,), device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        assert rel_err(out - y, lora_add_reference(y, x, ids, a, b, scaling) - y) < 2e-2


def test_a_mixed_batch_of_adapters_is_token_identical_to_peft_in_graph_mode(tmp_path):
    peft = pytest.importorskip("peft", reason="the oracle is transformers + peft (carry its wheel to the GPU image)")
    import transformers

    from conftest import build_checkpoint
    from nanovllm import LLM, LoRARequest, SamplingParams
    base = build_checkpoint(tmp_path / "base", "qwen3")
    paths = []
    for i, (r, targets) in enumerate([(8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]), (16, ["q_proj", "v_proj", "down_proj"])]):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                           init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.1)
        model.save_pretrained(os.fspath(tmp_path / f"a{i}"))
        paths.append(os.fspath(tmp_path / f"a{i}"))
    prompts = [[5, 9, 33, 100, 7, 8] * 3, [3, 4, 5], list(range(10, 40)), [200, 17, 17, 3] * 5]
    loras = [LoRARequest("a0", 1, paths[0]), None, LoRARequest("a1", 2, paths[1]), LoRARequest("a0", 1, paths[0])]
    llm = LLM(base, dtype="float32", device="cuda", enable_lora=True, max_loras=2, kvcache_block_size=16,
              num_kvcache_blocks=64, max_model_len=128, max_num_seqs=4, graph_batch_sizes=[4])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ours = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]
    del llm
    for prompt, lora, got in zip(prompts, loras, ours):
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if lora is not None:
            model = peft.PeftModel.from_pretrained(model, lora.lora_path)
        x = torch.tensor([prompt], device="cuda")
        out = model.to("cuda").generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                                        eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist(), lora


@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_lora_expand_on_the_stacked_shrink_matches_its_twin_and_replays_in_a_cuda_graph(tokens):
    from nanovllm.kernels.lora.reference import lora_expand_reference
    from nanovllm.kernels.lora.triton_lora import lora_expand_triton
    k, n, r, slots = 1024, 6144, 16, 5
    y, x, ids, a, b, scaling = pool(tokens, k, n, r, slots, torch.bfloat16)
    fold = torch.cat([torch.randn(n, k, device="cuda").to(torch.bfloat16) * 0.03, a.reshape(slots * r, k)])
    z = x @ fold.T  # the base product with every slot's shrink beside it (lora/pool.py)
    lora_expand_triton(z[:, :n], z[:, n:], ids, b, scaling)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_expand_triton(z[:, :n], z[:, n:], ids, b, scaling)
    for seed in (1, 2):
        g = torch.Generator("cuda").manual_seed(seed)
        ids.copy_(torch.randint(0, slots, (tokens,), device="cuda", generator=g))
        graph.replay()
        want = lora_expand_reference(z[:, :n], z[:, n:], ids, b, scaling)
        assert rel_err(out - z[:, :n], want - z[:, :n]) < 2e-2
        assert torch.equal(out[ids == 0], z[:, :n][ids == 0])

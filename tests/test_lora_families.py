"""Multi-LoRA on the families whose projections differ from the shared decoder's, PEFT as the oracle: a batch
mixing three adapters and the base gives transformers + PEFT's float32 greedy tokens, eager and graph mode.

- Gemma 4: q, k and v separate, full layers with their own head size and KV heads and K as V (no v_proj), the last
  two layers KV-shared (no k/v: PEFT adapts only q and o there) with double-wide MLPs; with a MoE block beside every
  MLP, PEFT adapts the dense MLP only (its experts are stacked parameters, not the modules it targets).
- MiniCPM: its loader folds the residual scale into o_proj and down_proj, and the adapters' products on them get it
  too (the oracle: its Llama stand-in with stand-in adapters, ``lora_helpers.STAND_INS``).
"""
import pytest

from lora_helpers import ENGINE, PROMPTS, build_family, expected, generate
from nanovllm import LLM, LoRARequest

peft = pytest.importorskip("peft")

GEMMA4 = dict(num_kv_shared_layers=2, use_double_wide_mlp=True)
GEMMA4_MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                  num_kv_shared_layers=1, use_double_wide_mlp=True)
MINICPM = dict(scale_depth=2.8)  # a residual scale of 1.98 (MiniCPM4's 1.4 gives 0.99 at 2 layers: too near 1 to tell)
FAMILIES = {"gemma4": ("gemma4", GEMMA4), "gemma4_moe": ("gemma4", GEMMA4_MOE), "minicpm": ("minicpm", MINICPM)}


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    arch, overrides = FAMILIES[request.param]
    base, paths = build_family(str(tmp_path_factory.mktemp(request.param)), arch, **overrides)
    return request.param, base, {name: LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(sorted(paths.items()))}


def check_targets(name: str, llm) -> None:
    """The pool adapts what PEFT adapts: Gemma 4's shared layers have q and o only, its full K-as-V layer no v."""
    sizes = llm.engine.runner.loras.pool.sizes
    if name == "gemma4":
        assert sorted(m for (layer, m) in sizes if layer == 3) == ["down_proj", "gate_proj", "o_proj", "q_proj",
                                                                    "up_proj"]
        assert (2, "v_proj") not in sizes and sizes[(2, "k_proj")] == (64, 32) and sizes[(1, "k_proj")] == (64, 32)
        assert sizes[(2, "q_proj")] == (64, 128) and sizes[(4, "gate_proj")] == (64, 192)  # full heads; double wide
    if name == "minicpm":
        scales = {parts[0][0]: parts[0][3] for _, _, parts, _ in llm.engine.runner.loras.pool.targets}
        assert scales["o_proj"] == scales["down_proj"] == pytest.approx(2.8 / 2 ** 0.5) and scales["q_proj"] == 1.0


SLOW = pytest.mark.slow
CASES = [("gemma4", True), pytest.param("gemma4", False, marks=SLOW), ("minicpm", True),
         pytest.param("minicpm", False, marks=SLOW), pytest.param("gemma4_moe", True, marks=SLOW)]


# no graph case for the MoE variant: the adapters' path in a graph does not pass the MoE block (gemma4-graph has it)
@pytest.mark.parametrize("family,eager", CASES, indirect=["family"],
                         ids=["gemma4-eager", "gemma4-graph", "minicpm-eager", "minicpm-graph", "gemma4_moe-eager"])
def test_a_batch_mixing_three_adapters_and_the_base(family, eager):
    name, base, a = family
    requests = [a["a1"], None, a["a2"], a["a3"]]
    llm = LLM(base, **dict(ENGINE, enforce_eager=eager, graph_batch_sizes=[2, 4]))
    check_targets(name, llm)
    want, plain = expected(base, requests, PROMPTS), expected(base, [None] * 4, PROMPTS)
    assert [w != p for w, p in zip(want, plain)] == [True, False, True, True]  # each adapter changes its tokens
    assert generate(llm, PROMPTS, requests) == want
    requests = requests[::-1]
    assert generate(llm, PROMPTS, requests) == expected(base, requests, PROMPTS)
    llm.close()

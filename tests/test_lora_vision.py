"""Multi-LoRA on the vision-language families (Qwen2.5-VL: q/k/v biases; Qwen3-VL: q/k norms and deepstack), PEFT
as the oracle: adapters on the language model's seven projections (the tower's modules are left out, as a text
adapter of these models leaves them), a batch mixing images, text and two adapters with the base gives
transformers + PEFT's float32 greedy tokens (Qwen2.5-VL eager and graph mode, Qwen3-VL eager: the same decoder
path).  A bias dropped from the stacked product fails the Qwen2.5-VL case.  An adapter on the vision tower is
refused naming its tensor."""
import pytest

from lora_helpers import make_adapter
from test_vision_language import MAX_NEW, greedy, mixed_prompts
from vl_checkpoints import build_vl_checkpoint, hf_greedy_vl
from nanovllm import LLM, LoRARequest

peft = pytest.importorskip("peft")

SLOW = pytest.mark.slow
LANGUAGE = r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def vl_adapter(base: str, path: str, r: int, seed: int, targets=LANGUAGE) -> str:
    return make_adapter(base, path, r, targets, seed, auto="AutoModelForImageTextToText")


@pytest.fixture(scope="module")
def vl_family(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    base = build_vl_checkpoint(tmp / "base", request.param)
    return base, [LoRARequest(f"a{i}", i, vl_adapter(base, str(tmp / f"a{i}"), 8 * i, i)) for i in (1, 2)]


@pytest.mark.parametrize("vl_family,eager", [("qwen2_5_vl", True), pytest.param("qwen2_5_vl", False, marks=SLOW),
                                             pytest.param("qwen3_vl", True, marks=SLOW)],
                         ids=["qwen2_5_vl-eager", "qwen2_5_vl-graph", "qwen3_vl-eager"], indirect=["vl_family"])
def test_images_text_and_two_adapters_in_one_batch(vl_family, eager):
    base, (a1, a2) = vl_family
    requests = [a1, None, a2, a1]
    llm = LLM(base, dtype="float32", device="cpu", max_model_len=1024, enforce_eager=eager, enable_lora=True,
              max_loras=2, max_lora_rank=16, graph_batch_sizes=[2, 4])
    prompts = mixed_prompts()
    got = [o["token_ids"] for o in llm.generate(prompts, greedy(), use_tqdm=False, lora_request=requests)]
    want = [hf_greedy_vl(base, [p], MAX_NEW, llm, r and r.lora_path)[0] for p, r in zip(prompts, requests)]
    plain = hf_greedy_vl(base, prompts, MAX_NEW, llm)
    assert [w != p for w, p in zip(want, plain)] == [True, False, True, True]  # each adapter changes its tokens
    assert got == want
    llm.close()


@pytest.mark.parametrize("vl_family", ["qwen2_5_vl"], indirect=True)
def test_an_adapter_on_the_vision_tower_is_refused_naming_its_tensor(vl_family, tmp_path):
    base, _ = vl_family
    tower = vl_adapter(base, str(tmp_path / "tower"), 8, 3, targets=["gate_proj"])  # the tower's MLP has one too
    llm = LLM(base, dtype="float32", device="cpu", max_model_len=1024, enforce_eager=True, enable_lora=True)
    with pytest.raises(ValueError, match=r"tensor '.*visual\.blocks\.0\.mlp\.gate_proj\.lora_A"):
        llm.generate(["a prompt"], greedy(), use_tqdm=False, lora_request=LoRARequest("tower", 3, tower))
    llm.close()

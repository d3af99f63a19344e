"""GPT-OSS (``models/gpt_oss.py``): greedy float32 tokens identical to transformers in eager and graph mode for a
tiny model with every part of the real one (sliding and full layers alternating, a 12-token window ending mid-block
in 16-token blocks, per-head sinks of unit scale, YaRN rope run past its original length, q/k/v/o biases, a router
with a bias, experts with biases and the clamped SwiGLU at a limit the values reach), on prompts and generations
longer than the window and than a prefill chunk, in batches whose rows start and finish at different steps; the
checkpoint's interleaved, transposed experts read into our layout, whole and by two tensor-parallel ranks; what is
not served (expert offloading) is refused by name.  The MoE op itself: ``test_gpt_oss_moe.py``; MXFP4 experts:
``test_mxfp4.py``.
"""
import pytest
import torch

from conftest import STAGGERED_ENGINE as ENGINE, STAGGERED_PROMPTS as PROMPTS, build_checkpoint, hf_greedy
from conftest import greedy_tokens as tokens
from family_checks import check_staggered_batch
from nanovllm import LLM


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(checkpoint dir, eager LLM, graph LLM)."""
    path = build_checkpoint(tmp_path_factory.mktemp("gpt_oss"), "gpt_oss")
    return path, LLM(path, enforce_eager=True, **ENGINE), LLM(path, graph_batch_sizes=[1, 2, 4], **ENGINE)


def test_layers_follow_the_config_and_graph_mode_is_used(engines):
    path, eager, graph = engines
    assert (eager.engine.runner.mode, graph.engine.runner.mode) == ("eager", "graph")
    model = graph.engine.runner.model
    assert type(model).__name__ == "GptOssForCausalLM"
    attn = [layer.self_attn for layer in model.model.layers]
    assert [a.window for a in attn] == [12, 0, 12, 0]  # sliding, full, sliding, full
    assert all(a.sinks is not None and a.sinks.abs().max() > 0.5 for a in attn)


def test_experts_are_read_into_our_layout(engines):
    """w13 [E, 2I, H]: the checkpoint's even columns (gate) as rows, then its odd ones (up); w2 [E, H, I]."""
    import transformers
    path, eager, _ = engines
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.layers[1].mlp.experts
    ours = eager.engine.runner.model.model.layers[1].mlp.experts
    inter = hf.down_proj.shape[1]
    assert torch.equal(ours.gate_up_proj[:, :inter], hf.gate_up_proj[..., ::2].transpose(1, 2))
    assert torch.equal(ours.gate_up_proj[:, inter:], hf.gate_up_proj[..., 1::2].transpose(1, 2))
    assert torch.equal(ours.gate_up_proj_bias, torch.cat([hf.gate_up_proj_bias[:, ::2], hf.gate_up_proj_bias[:, 1::2]],
                                                         dim=1))
    assert torch.equal(ours.down_proj, hf.down_proj.transpose(1, 2))
    assert torch.equal(ours.down_proj_bias, hf.down_proj_bias)


def test_staggered_batch_matches_transformers_in_both_modes(engines):
    path, eager, graph = engines
    lengths = [12, 5, 20, 16, 3]  # rows finish at different steps; the 5 prompts outnumber max_num_seqs
    check_staggered_batch(path, eager, graph, lengths)


def test_sinks_and_the_window_change_the_tokens(engines, tmp_path):
    """The oracle is not blind to them: without sinks, or with every layer full, transformers' tokens differ, and
    ours stay equal to transformers' (so both parts are exercised above)."""
    path, eager, _ = engines
    import json
    import shutil
    import safetensors.torch as st
    want = hf_greedy(path, PROMPTS[:3], 8)
    for name, edit in (("no_sinks", "sinks"), ("all_full", "layer_types")):
        other = tmp_path / name
        shutil.copytree(path, other)
        if edit == "sinks":  # sinks of -1e4: exp() of them is 0 in float32
            tensors = st.load_file(other / "model.safetensors")
            st.save_file({k: torch.full_like(v, -1e4) if k.endswith(".sinks") else v for k, v in tensors.items()},
                         other / "model.safetensors", metadata={"format": "pt"})
        else:
            cfg = json.loads((other / "config.json").read_text())
            cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
            (other / "config.json").write_text(json.dumps(cfg))
        changed = hf_greedy(str(other), PROMPTS[:3], 8)
        assert changed != want, name
        assert tokens(LLM(str(other), enforce_eager=True, **ENGINE), PROMPTS[:3], [8] * 3) == changed, name


def test_unsupported_features_are_refused_by_name(tmp_path):
    path = build_checkpoint(tmp_path, "gpt_oss")
    with pytest.raises(ValueError, match="no mixture-of-experts layer that can be offloaded"):
        LLM(path, enforce_eager=True, offload_experts=True, **ENGINE)
    from nanovllm.models.gpt_oss import layer_types
    with pytest.raises(ValueError, match="layer_types must name 2 layers.*'chunked_attention'"):
        layer_types({"num_hidden_layers": 2, "layer_types": ["sliding_attention", "chunked_attention"]})


@pytest.mark.slow
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_two_ranks_give_transformers_tokens(tmp_path, eager):
    """Heads, sinks and the experts' intermediate split over two ranks: each reads its contiguous piece of the
    interleaved gate/up columns; the down bias is added once."""
    from test_tp_model import PROMPTS as TP_PROMPTS
    from test_tp_model import _run
    path = build_checkpoint(tmp_path, "gpt_oss")
    want = hf_greedy(path, TP_PROMPTS, 6)
    for got in _run(path, 2, eager):
        assert got == want

"""Compressed (low-rank) experts end to end: calibration inputs collected by running the model, checkpoints
written by ``compress_experts`` (both methods) that ``LLM`` recognises from their config and runs; at full rank
the logprobs equal the original model's within float32 tolerance, and graph mode gives the same tokens;
re-running either tool is safe.
"""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams
from nanovllm.models.svd_moe import SvdMoe
from nanovllm.tools.collect_moe_calib import collect
from nanovllm.tools.compress_experts import compress
from test_moe_models import ENGINE, prompts_of

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)


def _run(path, prompts):
    outs = LLM(path, enforce_eager=True, **ENGINE).generate(prompts, PARAMS, use_tqdm=False)
    return [o["token_ids"] for o in outs], [[v for step in o["logprobs"] for v in step.values()] for o in outs]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.mark.slow
def test_full_rank_pca_gives_the_original_logprobs(mixtral, tmp_path):
    out = tmp_path / "svd"
    hf = json.load(open(f"{mixtral}/config.json"))
    full = max(hf["intermediate_size"], hf["hidden_size"])
    compress(mixtral, str(out), rank=full, method="pca")
    prompts = prompts_of(3, seed=8, max_len=20)
    llm = LLM(str(out), enforce_eager=True, **ENGINE)
    assert all(isinstance(layer.mlp, SvdMoe) for layer in llm.engine.runner.model.model.layers)
    want_tokens, want_lp = _run(mixtral, prompts)
    got_tokens, got_lp = _run(str(out), prompts)
    assert got_tokens == want_tokens
    assert torch.allclose(torch.tensor(got_lp), torch.tensor(want_lp), atol=1e-4, rtol=0)
    assert compress(mixtral, str(out), rank=full, method="pca")["rank"] == full  # re-run: kept
    graph = LLM(str(out), graph_batch_sizes=[1, 2, 4], **ENGINE)
    assert graph.engine.runner.mode == "graph"
    assert [o["token_ids"] for o in graph.generate(prompts, PARAMS, use_tqdm=False)] == want_tokens


def test_calibrated_low_rank_model_loads_and_generates_and_tools_rerun_safely(mixtral, tmp_path):
    calib = str(tmp_path / "calib.safetensors")
    collect(mixtral, calib, num_prompts=4, max_new_tokens=3, cap_per_group=50, device="cpu")
    with safe_open(calib, framework="pt") as f:
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}
    hidden = json.load(open(f"{mixtral}/config.json"))["hidden_size"]
    assert shapes and all(s[1] == hidden and 0 < s[0] <= 50 for s in shapes.values())
    mtime = (tmp_path / "calib.safetensors").stat().st_mtime_ns
    collect(mixtral, calib, num_prompts=4, max_new_tokens=3, cap_per_group=50, device="cpu")
    assert (tmp_path / "calib.safetensors").stat().st_mtime_ns == mtime  # same settings: not redone
    out = tmp_path / "act"
    c = compress(mixtral, str(out), rank=8, method="activation", calib=calib, ridge=1e-3)
    assert json.load(open(out / "config.json"))["expert_compression"] == c
    assert c["ranks"] == {"gate": 8, "up": 8, "down": 8}
    tokens, _ = _run(str(out), prompts_of(2, seed=9, max_len=10))
    assert [len(t) for t in tokens] == [6, 6]


def test_bad_compression_arguments_name_the_value(mixtral, tmp_path):
    with pytest.raises(ValueError, match="method='svd'"):
        compress(mixtral, str(tmp_path / "o"), rank=4, method="svd")
    with pytest.raises(ValueError, match="needs --calib"):
        compress(mixtral, str(tmp_path / "o"), rank=4, method="activation")



def test_a_config_only_model_gives_a_config_only_compressed_one_that_runs_on_dummy_weights(mixtral, tmp_path):
    import shutil
    src = tmp_path / "config_only"
    src.mkdir()
    shutil.copy(f"{mixtral}/config.json", src / "config.json")
    out = tmp_path / "out"
    compress(str(src), str(out), rank=4, method="pca")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    llm = LLM(str(out), load_format="dummy", enforce_eager=True, **ENGINE)
    assert llm.engine.runner.model.model.layers[0].mlp.experts.gate_V.shape[1] == 4
    assert len(llm.generate([[5, 6, 7]], PARAMS, use_tqdm=False)[0]["token_ids"]) == 6


def test_an_interrupted_compression_resumes_and_keeps_finished_layers(mixtral, tmp_path):
    out = tmp_path / "r"
    compress(mixtral, str(out), rank=4, method="pca")
    (out / "config.json").unlink()  # as if stopped before the end
    (out / "experts-0001.safetensors").unlink()
    kept = (out / "experts-0000.safetensors").stat().st_mtime_ns
    compress(mixtral, str(out), rank=4, method="pca")
    assert (out / "experts-0001.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "experts-0000.safetensors").stat().st_mtime_ns == kept
    compress(mixtral, str(out), rank=3, method="pca")  # other settings: every layer redone
    assert (out / "experts-0000.safetensors").stat().st_mtime_ns != kept
    assert json.load(open(out / "config.json"))["expert_compression"]["rank"] == 3


def test_a_compressed_class_pickles_by_reference_so_the_compile_cache_can_save_its_step():
    import pickle

    from nanovllm.models.mixtral import MixtralForCausalLM
    from nanovllm.models.svd_moe import compressed_class
    compression = {"method": "pca", "rank": 4, "ridge": 1e-4, "ranks": {"gate": 4, "up": 4, "down": 3}}
    cls = compressed_class(MixtralForCausalLM, compression)
    assert compressed_class(MixtralForCausalLM, dict(compression)) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls
    other = compressed_class(MixtralForCausalLM, dict(compression, ranks={"gate": 4, "up": 4, "down": 4}))
    assert other is not cls and pickle.loads(pickle.dumps(other)) is other

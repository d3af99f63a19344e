"""The server's LoRA adapters (vLLM's conventions), on the CPU: ``--enable-lora --lora-modules`` (name=path and JSON
items), /v1/models listing them, ``model=<adapter>`` equal to offline ``LLM.generate(lora_request=...)``, unknown
models a 404, /v1/load_lora_adapter and /v1/unload_lora_adapter at run time (a bad adapter refused, one in use a
409), and ``--lora-modules`` without ``--enable-lora`` refused before the engine is built."""
import json
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from nanovllm import LLM, LoRARequest, SamplingParams  # noqa: E402
from serve_helpers import build_text_checkpoint, post, running_server  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINE = dict(enable_lora=True, max_loras=2, max_lora_rank=8, enforce_eager=True, max_model_len=512,
              num_kvcache_blocks=64, kvcache_block_size=16)
PROMPT = "The quick brown fox"


def save_adapter(model_dir, out_dir, seed: int, r: int = 8) -> str:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                       init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model, _ = build_text_checkpoint(root / "model")
    return {"model": model, "alpha": save_adapter(model, root / "alpha", 1),
            "beta": save_adapter(model, root / "beta", 2), "wide": save_adapter(model, root / "wide", 3, r=16)}


@pytest.fixture(scope="module")
def server(paths, tmp_path_factory):
    beta = json.dumps({"name": "beta", "path": paths["beta"]})
    with running_server(paths["model"], tmp_path_factory.mktemp("log"), "--served-model-name", "tiny",
                        "--lora-modules", f"alpha={paths['alpha']}", beta, **ENGINE) as base:
        yield base


@pytest.fixture(scope="module")
def offline(paths):
    llm = LLM(paths["model"], **ENGINE)
    yield llm
    llm.close()


def complete(server, model, max_tokens=8):
    r = post(server, "/v1/completions", {"model": model, "prompt": PROMPT, "temperature": 0,
                                         "max_tokens": max_tokens}, None)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


def test_models_lists_the_base_and_each_adapter(server, paths):
    data = httpx.get(server + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny", "alpha", "beta"]
    for m in data[1:]:
        assert m["parent"] == "tiny" and m["root"] == paths[m["id"]] and m["object"] == "model"


def test_adapter_completions_equal_offline_and_differ_from_the_base(server, offline, paths):
    params = SamplingParams(temperature=0, max_tokens=8)
    want = {"tiny": offline.generate([PROMPT], params, use_tqdm=False)[0]["text"]}
    for i, name in enumerate(("alpha", "beta"), start=1):  # ids in order of registration
        request = LoRARequest(name, i, paths[name])
        want[name] = offline.generate([PROMPT], params, use_tqdm=False, lora_request=request)[0]["text"]
    assert len(set(want.values())) == 3, want  # the adapters change the output
    for name, text in want.items():
        assert complete(server, name) == text


def test_chat_runs_the_adapter_and_unknown_models_are_a_404(server):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0}
    r = post(server, "/v1/chat/completions", dict(body, model="beta"), None)
    assert r.status_code == 200 and r.json()["model"] == "beta"
    for path, extra in (("/v1/chat/completions", body), ("/v1/completions", {"prompt": PROMPT})):
        r = post(server, path, dict(extra, model="gamma"), None)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and "gamma" in error["message"] and error["param"] == "model"


def test_load_use_and_unload_at_run_time(server, paths):
    beta_text = complete(server, "beta")
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": paths["beta"]}, None)
    assert r.status_code == 200, r.text
    assert [m["id"] for m in httpx.get(server + "/v1/models").json()["data"]] == ["tiny", "alpha", "beta", "gamma"]
    assert complete(server, "gamma") == beta_text  # beta's weights, under another name and id
    for body, named in (({"lora_name": "gamma", "lora_path": paths["alpha"]}, "gamma"),  # the name is taken
                        ({"lora_name": "wide", "lora_path": paths["wide"]}, "wide"),  # rank 16 > --max-lora-rank
                        ({"lora_name": "nowhere", "lora_path": paths["beta"] + "-missing"}, "nowhere")):
        r = post(server, "/v1/load_lora_adapter", body, None)
        assert r.status_code == 400 and named in r.json()["error"]["message"], r.text
    assert complete(server, "tiny") != beta_text  # the refused loads left the server up

    # in use by a running sequence: 409, then unloaded once it has ended
    with httpx.stream("POST", server + "/v1/completions", timeout=60, json={
            "model": "gamma", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the stream, which aborts the request
        assert next(lines).startswith("data: ")  # a token out: the sequence runs
        r = post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}, None)
        assert r.status_code == 409 and "gamma" in r.json()["error"]["message"], r.text
    deadline = time.monotonic() + 30
    while (r := post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}, None)).status_code == 409:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert post(server, "/v1/completions", {"model": "gamma", "prompt": PROMPT}, None).status_code == 404
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}, None)
    assert r.status_code == 404 and "gamma" in r.json()["error"]["message"]


@pytest.mark.parametrize("argv,match", [
    (["--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
    (["--enable-lora", "--lora-modules", "a"], "name=path"),
    (["--enable-lora", "--lora-modules", '{"name": "a"}'], "name=path"),
    (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "twice"),
])
def test_bad_lora_flags_exit_before_the_engine_is_built(argv, match):
    from nanovllm.entrypoints.cli import serve
    with pytest.raises(SystemExit, match=match):
        serve(["/nonexistent-model", *argv])


def test_an_adapter_that_does_not_load_stops_the_server_naming_it(paths, tmp_path):
    import os
    import subprocess
    import sys

    from serve_helpers import ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    flags = ["--enable-lora", "--max-lora-rank", "8", "--enforce-eager", "--max-model-len", "512",
             "--num-kvcache-blocks", "64", "--lora-modules", f"wide={paths['wide']}"]
    done = subprocess.run([sys.executable, "-m", "nanovllm.serve", paths["model"], "--port", "0", *flags],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode != 0 and "--lora-modules wide=" in done.stderr + done.stdout

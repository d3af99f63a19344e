"""``python -m nanovllm.tools.perplexity``: on a tiny checkpoint with a tokenizer and a small text file, the count,
mean negative log-likelihood and perplexity it prints equal those computed here from transformers' float32
log_softmax over the same windows; and its argument errors name the bad value."""
import json
import math
import subprocess
import sys

import pytest
import torch

from nanovllm.tools import perplexity
from serve_helpers import ROOT, build_text_checkpoint

TEXT = ("A server streams tokens to every client that asks. The quick brown fox jumps over the lazy dog.\n"
        "Numbers like 12345 and 67890 appear here and there, and Paris is in France.\n") * 2
ENGINE = ["--kvcache-block-size", "16", "--num-kvcache-blocks", "32", "--max-model-len", "64",
          "--max-num-batched-tokens", "16"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_text_checkpoint(tmp_path_factory.mktemp("ppl"))[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def transformers_nll(model: str, window: int) -> tuple[int, float]:
    """(scored tokens, summed negative log-likelihood) over the tool's windows, from transformers in float32."""
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    count, nll = 0, 0.0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start:start + window]])
        with torch.no_grad():
            logprobs = hf(chunk).logits[0, :-1].float().log_softmax(-1)
        nll -= logprobs.gather(1, chunk[0, 1:, None]).sum().item()
        count += chunk.shape[1] - 1
    return count, nll


def test_the_printed_perplexity_is_transformers_over_the_same_windows(model, text_file, capsys):
    # windows of 24 tokens, each over more than one prefill chunk of 16; the default window is max_model_len
    results = {}
    for window, flags in ((24, ["--window", "24"]), (64, [])):
        result = results[window] = perplexity.main([model, text_file, *flags, *ENGINE])
        count, nll = transformers_nll(model, window)
        assert result["window"] == window and result["tokens"] == count
        assert result["mean_nll"] == pytest.approx(nll / count, abs=1e-4)
        assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0] == f"tokens: {count}" and lines[1].startswith("mean_nll: ")
        assert float(lines[2].split()[1]) == pytest.approx(result["perplexity"], rel=1e-5)
    assert results[24]["mean_nll"] != pytest.approx(results[64]["mean_nll"], abs=1e-3)  # the windows count
    perplexity.main([model, text_file, "--json", "--window", "24", *ENGINE])
    assert json.loads(capsys.readouterr().out) == pytest.approx(results[24], rel=1e-9)


def test_a_window_under_two_tokens_is_refused_by_value(model, text_file):
    r = subprocess.run([sys.executable, "-m", "nanovllm.tools.perplexity", model, text_file, "--window", "1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--window must be >= 2" in r.stderr and "got 1" in r.stderr

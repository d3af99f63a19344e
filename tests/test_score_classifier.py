"""``LLM.score`` and ``/v1/rerank`` on ``*ForSequenceClassification`` checkpoints against transformers: tiny random
Qwen3 and Llama classifiers (float32, the tiny tokenizer) with one label and with two; every pair's score is
transformers' own (sigmoid of its one logit, or label 1's softmax probability) within 1e-5, in eager and graph mode,
also where a pair ends in pad tokens (transformers' last non-pad token).  The head is the checkpoint's
``score.weight``; ``instruction`` and heads that disagree with config.json are refused by name."""
import json
import shutil

import pytest
import torch

from conftest import make_config
from nanovllm import LLM
from nanovllm.scoring import ClassifierHead
from serve_helpers import build_tokenizer, threaded_server

QUERY = "Where is Paris?"
DOCS = ["Paris is in France.", "The quick brown fox jumps over the lazy dog.", "Hello world", "no yes no",
        "Hello world<|endoftext|><|endoftext|>"]  # the last ends in pad tokens
COMMON = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256,
              max_num_batched_tokens=64)
CASES = [("qwen3", 1, "eager"), ("qwen3", 2, "graph"), ("llama", 2, "eager"), ("llama", 1, "graph")]
SLOW = {("llama", 1, "graph")}  # the second architecture in graph mode: the slow part's


def build_classifier(out_dir, arch: str, num_labels: int) -> str:
    """A random ``{Qwen3,Llama}ForSequenceClassification`` saved by transformers, pad token ``<|endoftext|>``."""
    import transformers
    tok = build_tokenizer(out_dir)
    config = make_config(arch, num_labels=num_labels, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), max_position_embeddings=4096)
    cls = {"qwen3": transformers.Qwen3ForSequenceClassification,
           "llama": transformers.LlamaForSequenceClassification}[arch]
    torch.manual_seed(num_labels)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.5 if name == "score.weight" else 0.08)
    model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {(arch, n): build_classifier(tmp_path_factory.mktemp(f"{arch}{n}"), arch, n)
            for arch, n in {(a, n) for a, n, _ in CASES}}


def reference(path: str):
    """transformers' score of a pair (the tokenizer's pair encoding), float32."""
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    @torch.no_grad()
    def score(q, d):
        logits = model(torch.tensor([tok(q, d)["input_ids"]])).logits[0]
        return (torch.sigmoid(logits[0]) if logits.numel() == 1 else torch.softmax(logits, -1)[1]).item()
    return score


def build_llm(path: str, mode: str) -> LLM:
    if mode == "eager":
        return LLM(path, enforce_eager=True, **COMMON)
    llm = LLM(path, graph_batch_sizes=[1, 2, 4], prefill_graph_sizes=[16, 64], **COMMON)
    assert llm.engine.runner.mode == "graph"
    return llm


@pytest.mark.parametrize("arch,num_labels,mode", [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW else c
                                                  for c in CASES])
def test_scores_match_transformers_in_pair_order(checkpoints, arch, num_labels, mode):
    path = checkpoints[arch, num_labels]
    want = reference(path)
    with build_llm(path, mode) as llm:
        head = llm.score_head()
        assert isinstance(head, ClassifierHead) and head.weight.shape == (num_labels, 64)
        outs = llm.score(QUERY, DOCS, use_tqdm=False)  # 1:N
        expected = [want(QUERY, d) for d in DOCS]
        assert len(set(round(w, 4) for w in expected[:4])) == 4  # distinct: the order is checked
        assert abs(expected[4] - expected[2]) < 1e-6  # trailing pads: transformers reads the last non-pad token
        assert [o.request_id for o in outs] == [str(i) for i in range(len(DOCS))]
        for out, w in zip(outs, expected, strict=True):
            assert isinstance(out.outputs.score, float) and abs(out.outputs.score - w) < 1e-5
        pad = llm.tokenizer.pad_token_id
        assert outs[-1].prompt_token_ids[-1] != pad and outs[2].prompt_token_ids == outs[-1].prompt_token_ids
        zipped = llm.score(DOCS[:3], DOCS[1:4], use_tqdm=False)  # N:N
        for out, q, d in zip(zipped, DOCS[:3], DOCS[1:4], strict=True):
            assert abs(out.outputs.score - want(q, d)) < 1e-5
        with pytest.raises(ValueError, match="instruction is for yes/no rerankers"):
            llm.score(QUERY, DOCS[0], instruction="x", use_tqdm=False)


def test_the_head_is_score_weight_and_bad_heads_are_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    path = checkpoints["qwen3", 2]
    config = json.loads(open(f"{path}/config.json").read())
    tok = AutoTokenizer.from_pretrained(path)
    weights = load_file(f"{path}/model.safetensors")
    head = ClassifierHead(path, config, tok)
    assert "lm_head.weight" not in weights and head.num_labels == 2 and head.pad_token_id == tok.pad_token_id
    torch.testing.assert_close(torch.from_numpy(head.weight), weights["score.weight"])
    assert head.score([0.0] * 64) == 0.5
    with pytest.raises(ValueError, match="id2label names 3 labels"):
        ClassifierHead(path, dict(config, id2label={"0": "a", "1": "b", "2": "c"}), tok)
    copy = shutil.copytree(path, tmp_path / "biased")
    save_file(dict(weights, **{"score.bias": torch.zeros(2)}), str(copy / "model.safetensors"))
    with pytest.raises(ValueError, match="score.bias"):
        ClassifierHead(str(copy), config, tok)
    with LLM(path, enforce_eager=True, pooler_config={"classifier_from_token": ["no", "yes"]}, **COMMON) as llm:
        with pytest.raises(ValueError, match="leave pooler_config's classifier_from_token out"):
            llm.score_head()


def test_rerank_through_the_server(checkpoints):
    path = checkpoints["llama", 2]
    llm = LLM(path, enforce_eager=True, **COMMON)
    try:
        scores = [o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)]
        with threaded_server(llm) as (client, _):
            r = client.post("/v1/rerank", json={"model": "tiny", "query": QUERY, "documents": DOCS, "top_n": 3})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert [x["index"] for x in results] == sorted(range(len(DOCS)), key=lambda i: -scores[i])[:3]
            assert all(abs(x["relevance_score"] - scores[x["index"]]) < 1e-6 for x in results)
            r = client.post("/v1/score", json={"text_1": QUERY, "text_2": DOCS[0], "instruction": "x"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "instruction"
    finally:
        llm.close()

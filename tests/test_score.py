"""``LLM.score`` against transformers on a tiny random Qwen3 (float32) with a real tiny tokenizer holding "yes" and
"no": as a yes/no reranker (``pooler_config`` ``classifier_from_token``) every pair's score is transformers'
softmax over the [no, yes] logits at the last position of the same Qwen3-Reranker prompt, within 1e-5, in eager
and graph mode, in pair order for 1:1, 1:N and N:N, also chunked; without it (or with the tokens in config.json)
the score is the cosine of transformers' last-token embeddings.  Bad pairs and heads are refused by name."""
import json
import os
import shutil

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM
from nanovllm.pooling_params import resolve_pooler
from nanovllm.scoring import DEFAULT_INSTRUCTION, YesNoHead, format_pair, pairs
from serve_helpers import build_tokenizer

QUERY = "Where is Paris?"
DOCS = ["Paris is in France.", "The quick brown fox jumps over the lazy dog.", "Hello world", "no yes no"]
RERANK = {"classifier_from_token": ["no", "yes"]}
COMMON = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=512,
              max_num_batched_tokens=64)


def build_yes_no_checkpoint(out_dir) -> str:
    """The tiny Qwen3 with conftest's random weights and the tiny tokenizer, "yes" and "no" tokens of their own."""
    tok = build_tokenizer(out_dir, ("yes", "no"))
    return build_checkpoint(out_dir, "qwen3", eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                            max_position_embeddings=4096)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_yes_no_checkpoint(tmp_path_factory.mktemp("score"))


@pytest.fixture(scope="module")
def reference(path):
    """transformers' (reranker score of a pair, last-token embedding of a text) functions, float32."""
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    no, yes = tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")

    @torch.no_grad()
    def rerank(q, d, instruction=None):
        ids = tok(format_pair(q, d, instruction), add_special_tokens=False)["input_ids"]
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1, [no, yes]], -1)[1].item()

    @torch.no_grad()
    def embed(text):
        ids = tok(text)["input_ids"]
        h = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return torch.nn.functional.normalize(h, dim=-1)
    return rerank, embed


@pytest.fixture(scope="module")
def eager(path):
    return LLM(path, enforce_eager=True, pooler_config=RERANK, **COMMON)


@pytest.fixture(scope="module")
def graph(path):
    llm = LLM(path, graph_batch_sizes=[1, 2, 4], prefill_graph_sizes=[16, 64], pooler_config=RERANK, **COMMON)
    assert llm.engine.runner.mode == "graph"
    return llm


def test_the_reranker_prompt_is_qwen3_rerankers():
    assert format_pair("q", "d", "i") == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
        "<Instruct>: i\n<Query>: q\n<Document>: d<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert f"<Instruct>: {DEFAULT_INSTRUCTION}\n" in format_pair("q", "d")


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_reranker_scores_match_transformers_in_pair_order(request, reference, mode):
    llm, (rerank, _) = request.getfixturevalue(mode), reference
    outs = llm.score(QUERY, DOCS, use_tqdm=False)  # 1:N, prompts of 100+ tokens: chunked over 64-token steps
    assert [o.request_id for o in outs] == ["0", "1", "2", "3"] and all(o.finished for o in outs)
    want = [rerank(QUERY, d) for d in DOCS]
    assert len(set(round(w, 3) for w in want)) == 4  # distinct scores: the order is checked
    for out, w in zip(outs, want, strict=True):
        assert isinstance(out.outputs.score, float) and abs(out.outputs.score - w) < 1e-5
        assert len(out.prompt_token_ids) > 64
    one = llm.score(DOCS[0], DOCS[2], instruction="Is it about France?", use_tqdm=False)  # 1:1, own instruction
    assert len(one) == 1 and abs(one[0].outputs.score - rerank(DOCS[0], DOCS[2], "Is it about France?")) < 1e-5
    zipped = llm.score(DOCS[:3], DOCS[1:], use_tqdm=False)  # N:N
    for out, q, d in zip(zipped, DOCS[:3], DOCS[1:], strict=True):
        assert abs(out.outputs.score - rerank(q, d)) < 1e-5


def test_the_head_is_the_checkpoints_yes_minus_no_rows(path, eager):
    from safetensors.torch import load_file
    head = eager.score_head()
    w = load_file(os.path.join(path, "model.safetensors"))["lm_head.weight"]
    no, yes = head.token_ids
    assert (no, yes) == (eager.tokenizer.convert_tokens_to_ids("no"), eager.tokenizer.convert_tokens_to_ids("yes"))
    torch.testing.assert_close(torch.from_numpy(head.weight), w[yes] - w[no])
    assert head.score([0.0] * 64) == 0.5


def test_without_classifier_tokens_the_score_is_the_cosine_of_embeddings(path, reference):
    _, embed = reference
    llm = LLM(path, enforce_eager=True, **COMMON)
    try:
        outs = llm.score([QUERY, DOCS[1]], [DOCS[0], DOCS[1]], use_tqdm=False)
        assert abs(outs[0].outputs.score - torch.dot(embed(QUERY), embed(DOCS[0])).item()) < 1e-5
        assert abs(outs[1].outputs.score - 1.0) < 1e-5  # a text against itself
        ids = llm.tokenizer.encode(QUERY) + llm.tokenizer.encode(DOCS[0])
        assert outs[0].prompt_token_ids == ids
        with pytest.raises(ValueError, match="instruction is for yes/no rerankers"):
            llm.score(QUERY, DOCS[0], instruction="x", use_tqdm=False)
        with pytest.raises(ValueError, match="scores by cosine"):
            llm.score_head()
    finally:
        llm.close()


def test_classifier_tokens_come_from_config_json_and_bad_ones_are_refused(tmp_path, path):
    copy = shutil.copytree(path, tmp_path / "ckpt")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, classifier_from_token=["no", "yes"])))
    assert resolve_pooler(str(copy)).classifier_from_token == ("no", "yes")
    assert resolve_pooler(str(copy), {"classifier_from_token": ["n", "y"]}).classifier_from_token == ("n", "y")
    with pytest.raises(ValueError, match="classifier_from_token must be a list of two tokens"):
        resolve_pooler(path, {"classifier_from_token": "yes"})
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    with pytest.raises(ValueError, match="'maybe' is not a token"):
        YesNoHead(path, config, tok, ("no", "maybe"))
    with pytest.raises(ValueError, match="Qwen3ForSequenceClassification checkpoints score with their own head"):
        YesNoHead(path, dict(config, architectures=["Qwen3ForSequenceClassification"]), tok, ("no", "yes"))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        YesNoHead(path, dict(config, final_logit_softcapping=30.0), tok, ("no", "yes"))


@pytest.mark.parametrize("text_1,text_2,error", [
    ("a", [], "text_2 must be a str or a non-empty list"),
    (["a", "b"], "c", "text_2 must be a list when text_1 is a list"),
    (["a", "b"], ["c"], "must have the same length"),
    (1, "a", "text_1 must be a str"),
])
def test_bad_pairs_are_refused_by_name(text_1, text_2, error):
    with pytest.raises(ValueError, match=error):
        pairs(text_1, text_2)

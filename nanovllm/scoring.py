"""``LLM.score``: a score per text pair, vLLM's two kinds (also the score and rerank endpoints' rules).

* Pairs (``pairs``): str and str, one pair; str and a list, 1:N; two lists of one length, zipped N:N.
* Yes/no reranker, where the engine's pooler names ``classifier_from_token`` ``[no, yes]`` (Qwen3-Reranker served
  as vLLM's converted classifier): each pair is sent as ``format_pair(query, document, instruction)``, the
  Qwen3-Reranker template, tokenized without special tokens; pooled LAST, not normalised (h, the final normed
  hidden state of its last token); scored ``sigmoid(h . (W[yes] - W[no]))`` in float32, W the checkpoint's LM head
  rows (``YesNoHead``): vLLM's ``from_2_way_softmax``, softmax over the [no, yes] logits, yes's probability.
* Otherwise, an embedding model: each distinct text is embedded by the engine's pooler (tokenized with special
  tokens) and the score is the cosine similarity of the two vectors.
* ``truncate_prompt_tokens=k`` keeps each prompt's last k tokens (-1: ``max_model_len``), as ``LLM.embed`` does.
Results come in pair order as vLLM's ``ScoringRequestOutput`` (``.outputs.score``, a float).
"""
import glob
import math
import os
from dataclasses import dataclass

import numpy as np

from nanovllm import embedding
from nanovllm.pooling_params import PoolingParams

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
          "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_PARAMS = PoolingParams(pooling_type="LAST", normalize=False)  # the reranker's: h itself
# config.json fields under which the logits are not h . W (scaled or capped): refused by name
_LOGIT_FIELDS = ("final_logit_softcapping", "logit_softcapping", "logits_scaling", "logit_scale", "dim_model_base")


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True


def format_pair(query: str, document: str, instruction: str | None = None) -> str:
    """The Qwen3-Reranker prompt of one pair (its model card's): PREFIX, the body, SUFFIX."""
    body = f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
    return PREFIX + body + SUFFIX


def pairs(text_1, text_2, names: tuple[str, str] = ("text_1", "text_2")) -> list[tuple[str, str]]:
    """The (query, document) pairs of vLLM's rule (module docstring); ``ValueError`` naming ``names`` otherwise."""
    for value, name in zip((text_1, text_2), names):
        if not (isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                           and all(isinstance(t, str) for t in value))):
            raise ValueError(f"{name} must be a str or a non-empty list of str, got {value!r}")
    if isinstance(text_1, str):
        return [(text_1, t) for t in ([text_2] if isinstance(text_2, str) else text_2)]
    if isinstance(text_2, str):
        raise ValueError(f"{names[1]} must be a list when {names[0]} is a list (N:N pairs), got a str")
    if len(text_1) != len(text_2):
        raise ValueError(f"{names[0]} and {names[1]} must have the same length (N:N pairs), got {len(text_1)} "
                         f"and {len(text_2)}; a str {names[0]} scores against every item (1:N)")
    return list(zip(text_1, text_2))


class YesNoHead:
    """``weight`` = W[yes] - W[no] (float32 [H]) of a checkpoint's LM head (its tied embeddings if tied);
    ``token_ids`` = (no, yes).  ``ValueError`` naming what it cannot use: a token that is not one token of the
    vocabulary, a classification checkpoint, logits that are not h . W, no such tensor."""

    def __init__(self, model_dir: str, hf_config: dict, tokenizer, tokens: tuple[str, str]):
        archs = hf_config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(f"{archs[0]} checkpoints are not served: nanovllm scores with a causal LM's head "
                             f"(pooler_config classifier_from_token [no, yes]); use the original causal-LM reranker")
        text = hf_config.get("text_config") or hf_config
        bad = [f for f in _LOGIT_FIELDS if text.get(f) not in (None, 1, 1.0) or hf_config.get(f) not in (None, 1, 1.0)]
        if bad:
            raise ValueError(f"this checkpoint's logits are not h . W ({', '.join(bad)} in config.json): the yes/no "
                             f"reranker head is not supported for it")
        if tokenizer is None:
            raise ValueError("a yes/no reranker needs the checkpoint's tokenizer to find its tokens")
        ids = []
        for t in tokens:
            i = tokenizer.convert_tokens_to_ids(t)
            if i is None or i == tokenizer.unk_token_id and t != tokenizer.unk_token:
                raise ValueError(f"classifier_from_token: {t!r} is not a token of the vocabulary")
            ids.append(int(i))
        self.token_ids = tuple(ids)
        no, yes = _head_rows(model_dir, bool(hf_config.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
                             ids)
        self.weight = (yes - no).astype(np.float32)

    def score(self, hidden) -> float:
        """sigmoid(h . weight), the dot product in float32."""
        x = float(np.dot(np.asarray(hidden, dtype=np.float32), self.weight))
        return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _head_rows(model_dir: str, tied: bool, ids: list[int]) -> list[np.ndarray]:
    """Rows ``ids`` of the checkpoint's LM head (its embedding matrix when tied and no head is stored), float32."""
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    for suffixes in (("lm_head.weight",), ("embed_tokens.weight",) if tied else ()):
        for path in files:
            with safe_open(path, framework="pt") as f:
                names = [n for n in f.keys() if n.endswith(suffixes) and "mtp" not in n and "vision" not in n]
                if not names:
                    continue
                tensor = f.get_slice(sorted(names, key=len)[0])
                if tensor.get_dtype() not in ("F32", "F16", "BF16"):
                    raise ValueError(f"the LM head is stored as {tensor.get_dtype()}: the yes/no reranker head "
                                     f"reads float32, float16 or bfloat16 rows")
                return [tensor[i:i + 1].float().numpy()[0] for i in ids]
    raise ValueError(f"no LM head tensor (lm_head.weight{', embed_tokens.weight' if tied else ''}) in the "
                     f"safetensors files of {model_dir!r}")


def cosine(a, b) -> float:
    """The cosine similarity of two vectors, in float32 (0 where one is zero)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return float(np.dot(a, b) / max(float(np.linalg.norm(a)) * float(np.linalg.norm(b)), 1e-12))


def score(llm, text_1, text_2, instruction: str | None = None, truncate_prompt_tokens: int | None = None,
          use_tqdm: bool = True) -> list[ScoringRequestOutput]:
    """The score of every pair of ``llm`` (an ``LLM``), in pair order (module docstring)."""
    todo = pairs(text_1, text_2)
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    tokens = llm.config.pooler.classifier_from_token
    if tokens is not None:
        head = llm.score_head()
        prompts = [llm.tokenizer.encode(format_pair(q, d, instruction), add_special_tokens=False) for q, d in todo]
        outs = embedding.embed(llm, prompts, RERANK_PARAMS, truncate_prompt_tokens, use_tqdm)
        return [ScoringRequestOutput(str(i), ScoringOutput(head.score(o.outputs.embedding)), o.prompt_token_ids)
                for i, o in enumerate(outs)]
    if instruction is not None:
        raise ValueError("instruction is for yes/no rerankers (pooler_config classifier_from_token); this engine "
                         "scores by the cosine of embeddings")
    texts = list(dict.fromkeys(t for pair in todo for t in pair))
    outs = dict(zip(texts, embedding.embed(llm, texts, None, truncate_prompt_tokens, use_tqdm)))
    return [ScoringRequestOutput(str(i), ScoringOutput(cosine(outs[q].outputs.embedding, outs[d].outputs.embedding)),
                                 outs[q].prompt_token_ids + outs[d].prompt_token_ids) for i, (q, d) in enumerate(todo)]


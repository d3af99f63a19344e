"""``LLM.score``: a score per text pair (also the score and rerank endpoints' rules), by one of three heads.

* Pairs (``pairs``): str and str, one pair; str and a list, 1:N; two lists of one length, zipped N:N.
* Yes/no reranker, the pooler naming ``classifier_from_token`` ``[no, yes]`` (``YesNoHead``, Qwen3-Reranker): each
  pair as ``format_pair(query, document, instruction)``, no special tokens; h the final normed hidden state of the
  last token (pooled LAST, not normalised); ``sigmoid(h . (W[yes] - W[no]))``, W the LM head: vLLM's 2-way softmax.
* A Llama/Qwen2/Qwen3 ``*ForSequenceClassification`` checkpoint (``ClassifierHead``): each pair as the tokenizer's
  pair encoding (``tokenizer(query, document)``, trailing pad tokens dropped: transformers' last non-pad token),
  pooled LAST; logits ``W h``, W its ``score.weight`` [num_labels, H].  num_labels 1: ``sigmoid(logit)`` (vLLM's
  cross-encoder rule); >= 2: softmax, label 1's probability (nanovllm's own: vLLM scores only num_labels == 1).
* Otherwise an embedding model: the cosine of the two texts' embeddings (the engine's pooler, special tokens).
Heads compute in float32 on the host; ``instruction`` is the yes/no reranker's only.  ``truncate_prompt_tokens=k``
keeps each prompt's last k tokens (-1: ``max_model_len``).  Results come in pair order as vLLM's
``ScoringRequestOutput`` (``.outputs.score``, a float).
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
RERANK_PARAMS = PoolingParams(pooling_type="LAST", normalize=False)  # the heads': h itself
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


def is_classifier(hf_config: dict) -> bool:
    """Whether config.json names a ``*ForSequenceClassification`` architecture (``ClassifierHead``'s)."""
    return any(str(a).endswith("ForSequenceClassification") for a in hf_config.get("architectures") or [])


def make_head(model_dir: str, hf_config: dict, tokenizer, pooler):
    """The scoring head of an engine (module docstring): a ``ClassifierHead``, a ``YesNoHead`` where the pooler names
    ``classifier_from_token``, else None (cosine); ``ValueError`` naming what it cannot use."""
    if pooler.classifier_from_token is not None:
        return YesNoHead(model_dir, hf_config, tokenizer, pooler.classifier_from_token)
    return ClassifierHead(model_dir, hf_config, tokenizer) if is_classifier(hf_config) else None


class YesNoHead:
    """``weight`` = W[yes] - W[no] (float32 [H]) of a checkpoint's LM head (its tied embeddings if tied);
    ``token_ids`` = (no, yes).  ``ValueError`` naming what it cannot use: a token that is not one token of the
    vocabulary, a classification checkpoint, logits that are not h . W, no such tensor."""
    takes_instruction = True

    def __init__(self, model_dir: str, hf_config: dict, tokenizer, tokens: tuple[str, str]):
        archs = hf_config.get("architectures") or []
        if is_classifier(hf_config):
            raise ValueError(f"{archs[0]} checkpoints score with their own head (score.weight), not with "
                             f"classifier_from_token [no, yes]: leave pooler_config's classifier_from_token out")
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
        tied = bool(hf_config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        rows = _stored_tensor(model_dir, ("lm_head.weight",) + (("embed_tokens.weight",) if tied else ()),
                              "the yes/no reranker's LM head", ids)
        self.weight = (rows[1] - rows[0]).astype(np.float32)

    def prompts(self, tokenizer, todo: list[tuple[str, str]], instruction: str | None) -> list[list[int]]:
        """The token ids of each pair: the Qwen3-Reranker prompt, no special tokens added (one batched call)."""
        texts = [format_pair(q, d, instruction) for q, d in todo]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def score(self, hidden) -> float:
        """sigmoid(h . weight), the dot product in float32."""
        return _sigmoid(float(np.dot(np.asarray(hidden, dtype=np.float32), self.weight)))


class ClassifierHead:
    """``weight``: a ``*ForSequenceClassification`` checkpoint's ``score.weight`` (float32 [num_labels, H]);
    ``pad_token_id``: config.json's (None: none).  ``ValueError`` without a tokenizer, the tensor, or where its rows
    disagree with config.json's ``id2label``; a ``score.bias`` (not transformers' layout) is refused."""
    takes_instruction = False

    def __init__(self, model_dir: str, hf_config: dict, tokenizer):
        if tokenizer is None:
            raise ValueError("a sequence classifier needs the checkpoint's tokenizer to encode its pairs")
        self.weight = _stored_tensor(model_dir, ("score.weight",), "the classifier's head").astype(np.float32)
        if self.weight.ndim != 2:
            raise ValueError(f"score.weight must be [num_labels, hidden_size], got shape {list(self.weight.shape)}")
        labels = hf_config.get("id2label")
        if labels and len(labels) != self.weight.shape[0]:
            raise ValueError(f"score.weight has {self.weight.shape[0]} rows but config.json's id2label names "
                             f"{len(labels)} labels")
        if _has_tensor(model_dir, "score.bias"):
            raise ValueError("score.bias: nanovllm's classifier head is transformers' layout, score.weight only")
        self.num_labels = self.weight.shape[0]
        self.pad_token_id = hf_config.get("pad_token_id")

    def prompts(self, tokenizer, todo: list[tuple[str, str]], instruction: str | None) -> list[list[int]]:
        """The token ids of each pair: the tokenizer's pair encoding, trailing pad tokens dropped (one batched call)."""
        if instruction is not None:
            raise ValueError("instruction is for yes/no rerankers (pooler_config classifier_from_token); a sequence "
                             "classifier scores the tokenizer's encoding of the pair as it is")
        out = []
        for ids in tokenizer([q for q, _ in todo], [d for _, d in todo])["input_ids"]:
            ids = list(ids)
            while len(ids) > 1 and self.pad_token_id is not None and ids[-1] == self.pad_token_id:
                ids.pop()
            out.append(ids)
        return out

    def logits(self, hidden) -> np.ndarray:
        """W h in float32, [num_labels]."""
        return self.weight @ np.asarray(hidden, dtype=np.float32)

    def score(self, hidden) -> float:
        """sigmoid(logit) with one label, else label 1's softmax probability."""
        z = self.logits(hidden).astype(np.float64)
        if self.num_labels == 1:
            return _sigmoid(float(z[0]))
        e = np.exp(z - z.max())
        return float(e[1] / e.sum())


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _files(model_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def _has_tensor(model_dir: str, suffix: str) -> bool:
    from safetensors import safe_open
    for path in _files(model_dir):
        with safe_open(path, framework="pt") as f:
            if any(n.endswith(suffix) for n in f.keys()):
                return True
    return False


def _stored_tensor(model_dir: str, suffixes: tuple[str, ...], what: str, rows: list[int] | None = None):
    """The first tensor stored under one of ``suffixes`` (tried in order; the shortest name of a file, MTP and vision
    towers' left out), float32: its rows ``rows`` (a list of arrays) or the whole of it (an array)."""
    from safetensors import safe_open
    for suffix in suffixes:
        for path in _files(model_dir):
            with safe_open(path, framework="pt") as f:
                names = [n for n in f.keys() if n.endswith(suffix) and "mtp" not in n and "vision" not in n]
                if not names:
                    continue
                tensor = f.get_slice(sorted(names, key=len)[0])
                if tensor.get_dtype() not in ("F32", "F16", "BF16"):
                    raise ValueError(f"{what} is stored as {tensor.get_dtype()}: nanovllm reads float32, float16 or "
                                     f"bfloat16 rows")
                if rows is None:
                    return tensor[:].float().numpy()
                return [tensor[i:i + 1].float().numpy()[0] for i in rows]
    raise ValueError(f"no tensor for {what} ({', '.join(suffixes)}) in the safetensors files of {model_dir!r}")


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
    if llm.config.pooler.classifier_from_token is not None or is_classifier(llm.config.hf_config):
        head = llm.score_head()
        prompts = head.prompts(llm.tokenizer, todo, instruction)
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


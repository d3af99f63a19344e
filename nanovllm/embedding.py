"""``LLM.embed``: one embedding per prompt, in input order, as vLLM's ``EmbeddingRequestOutput``.

* Prompts: a str, a token-id list, or a list of those (no images).  ``truncate_prompt_tokens=k`` keeps a prompt's
  last k tokens (-1: ``max_model_len``), as vLLM does; any prompt over ``max_model_len`` is refused by index.
* ``pooling_params``: None (the engine's pooler, ``EngineConfig.pooler``), one ``PoolingParams`` for all, or one per
  prompt; every one is resolved (``PoolingParams.resolve``) before any request is queued, so a refused one queues
  nothing.
* Each result has ``request_id`` (its index, as a str), ``prompt_token_ids``, ``finished`` (True) and ``outputs``,
  an ``EmbeddingOutput`` whose ``embedding`` is a list of floats (``hidden_size`` long, or ``dimensions``).
The requests run in the engine's steps like any others (``engine/pooling.py``): chunked, batched, in graph mode.
"""
from dataclasses import dataclass

from tqdm.auto import tqdm

from nanovllm.pooling_params import PoolingParams


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


def embed(llm, prompts, pooling_params=None, truncate_prompt_tokens: int | None = None,
          use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
    """The embedding of every prompt of ``llm`` (an ``LLM``), in order (module docstring)."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str, a list of token ids, or a list of those, got {type(prompts).__name__}")
    params = _params(pooling_params, len(prompts))
    config = llm.config
    resolved = [p.resolve(config.pooler, config.hf_config, config.model) for p in params]
    token_lists = [truncated(llm.prompts, p, i, truncate_prompt_tokens) for i, p in enumerate(prompts)]
    engine = llm.engine
    seqs = {engine.add_request(ids, p).seq_id: i for i, (ids, p) in enumerate(zip(token_lists, resolved))}
    vectors = [None] * len(seqs)
    with tqdm(total=len(seqs), desc="Embedding", dynamic_ncols=True, disable=not use_tqdm) as bar:
        while engine.has_work():
            for out in engine.step().outputs:
                i = seqs.get(out.seq_id)
                if i is not None and out.finish_reason is not None:
                    vectors[i] = out.embedding
                    bar.update(1)
    return [EmbeddingRequestOutput(str(i), EmbeddingOutput(v.tolist()), ids)
            for i, (v, ids) in enumerate(zip(vectors, token_lists))]


def truncated(prompts, prompt, index: int, keep: int | None) -> list[int]:
    """A prompt's checked token ids (``Prompts.encode_prompt``), its last ``keep`` only when ``keep`` is set (-1: up
    to ``max_model_len``)."""
    if isinstance(prompt, dict):
        raise TypeError(f"prompt {index}: embed takes text or token ids, not a dict (images are not embedded)")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or not (keep >= 1 or keep == -1):
            raise ValueError(f"truncate_prompt_tokens must be a positive int or -1, got {keep!r}")
        if isinstance(prompt, str) and prompts.tokenizer is not None:
            prompt = prompts.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            prompt = list(prompt)[-(prompts.max_model_len if keep == -1 else keep):]
    return prompts.encode_prompt(prompt, index)


def _params(pooling_params, n: int) -> list[PoolingParams]:
    if pooling_params is None:
        pooling_params = PoolingParams()
    if isinstance(pooling_params, PoolingParams):
        return [pooling_params] * n
    if not isinstance(pooling_params, (list, tuple)) or len(pooling_params) != n:
        raise ValueError(f"pooling_params must be one PoolingParams or a list of {n} (one per prompt)")
    for i, p in enumerate(pooling_params):
        if not isinstance(p, PoolingParams):
            raise TypeError(f"pooling_params[{i}] must be a PoolingParams, got {type(p).__name__}")
    return list(pooling_params)

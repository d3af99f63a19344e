"""``LLM``: the user-facing offline batch-generation API (vLLM style)."""
import atexit
import dataclasses
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from nanovllm import embedding, envs, parallel, scoring
from nanovllm.completion import Completion
from nanovllm.config import EngineConfig, resolve_model_option
from nanovllm.engine import grammar
from nanovllm.engine.engine import Engine
from nanovllm.logger import logger
from nanovllm.multimodal import chat_prompt
from nanovllm.prompts import Prompts
from nanovllm.sampling_params import SamplingParams


def _close_engine(engine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()


class LLM:
    """``LLM(model, **options)``: an engine on one HF checkpoint, a directory or a hub repo id (``nanovllm/hub.py``:
    downloaded before anything else, and ``config.model`` is then the local snapshot directory).  Every option is
    keyword-only and is a field of ``EngineConfig`` (``nanovllm/config.py``, where each is documented); an unknown
    one raises ``TypeError``.

    ``tensor_parallel_size=N`` > 1: ``LLM`` starts ranks 1..N-1 (or joins torchrun's; ``nanovllm/parallel/``),
    and ``engine`` is then a ``MirroredEngine``: rank 0 validates and encodes every request, and only engine calls
    travel to the other ranks.  Under torchrun only rank 0 returns from ``LLM(...)``; every other rank serves rank
    0's engine calls and ends its process when rank 0 closes.  If the engine fails to build after the other ranks
    started, ``LLM(...)`` stops them before the error propagates; if a rank died meanwhile and rank 0's error is a
    ``RuntimeError`` (a collective's), it raises ``RuntimeError`` naming that rank and carrying its error instead.
    ``close()`` (or ``with LLM(...) as llm:``) releases the engine and the other ranks."""
    engine_class = Engine  # what every rank builds; a subclass must be importable in a spawned process

    def __init__(self, model, **options):
        # a hub repo id is downloaded here, once: every later stage and rank sees only the local snapshot directory
        # (under torchrun each process resolves it; huggingface_hub's file locks let one of them fetch each file)
        model = resolve_model_option(model, options)
        peers = parallel.start(model, options, self.engine_class)  # None at one rank
        self.config = EngineConfig(model=model, **parallel.rank_options(options))
        start = time.perf_counter()
        try:
            engine = self.engine_class(self.config)
            # what generate and the server step: at N > 1 its mutating calls run on every rank
            self.engine = engine if peers is None else parallel.MirroredEngine(engine, peers)
            # closed when this LLM is collected, or at exit while every module still works (a __del__ left for
            # the interpreter's teardown finds torch half dismantled)
            self._finalizer = weakref.finalize(self, _close_engine, self.engine)
            # ... and at exit before any hook registered earlier (atexit runs last-registered first): weakref's
            # own exit hook was registered at import, after the peers' (launch.py), which would leave the group
            # while this engine's CUDA graphs still hold it (NCCL's abort then waits 30 s and the process aborts)
            atexit.register(self._finalizer)
            self.prompts = Prompts(self.config.model, self.config.hf_config, engine.runner.vocab_size,
                                   self.config.max_model_len)
            self.tokenizer = self.prompts.tokenizer
        except BaseException as e:  # the other ranks started (and may wait on a collective): stop them, leave the group
            if peers is not None:
                try:
                    peers.build_failed(e)  # raises a dead peer's own error instead of the collective's
                finally:
                    peers.close(serving=False)
            raise
        self.init_seconds = time.perf_counter() - start
        d = self.engine.describe()
        notes = f", scales {d['kv_scales']}" if d["kv_scales"] else ""
        if "state_slots" in d:  # a hybrid model's state pools (engine/hybrid_state.py)
            notes += (f"; state pools: {d['state_slots']} slots + {d['state_snapshots']} prefix snapshots, "
                      f"{d['state_bytes'] / 2**30:.2f} GiB")
        logger.info("ready in %.1fs: device=%s dtype=%s quantization=%s mode=%s kv_blocks=%d x %d tokens (%.2f GiB, "
                    "%s%s); kernel options: %s; seconds by phase: %s", self.init_seconds, self.engine.platform.device,
                    d["dtype"], d["quantization"], d["mode"], d["num_kv_blocks"], d["kvcache_block_size"],
                    d["num_kv_blocks"] * d["kvcache_block_size"] * d["kv_bytes_per_token"] / 2**30,
                    d["kv_cache_dtype"], notes,
                    ", ".join(f"{k}={v}" for k, v in d["kernel_options"].items()),
                    ", ".join(f"{k} {v}" for k, v in d["init_phases"].items()))
        changed = envs.process_settings()
        if changed:
            logger.info("process-wide settings nanovllm changed: %s", ", ".join(f"{k}={v}" for k, v in changed.items()))
        if "expert_offload" in d:
            o = d["expert_offload"]
            logger.info("expert offload: device memory %.2f GiB non-expert weights + %.2f GiB expert cache + %.2f "
                        "GiB split-expert scratch + %.2f GiB KV cache; %.2f GiB of experts in host memory",
                        d["weight_bytes"] / 2**30, o["expert_cache_bytes"] / 2**30, o["split_scratch_bytes"] / 2**30,
                        d["num_kv_blocks"] * d["kvcache_block_size"] * d["kv_bytes_per_token"] / 2**30,
                        o["expert_host_bytes"] / 2**30)

    def close(self) -> None:
        """Release the engine: this rank's engine is closed (its device memory and CUDA graphs freed), then the
        other tensor-parallel ranks close theirs, end their processes, and the group is left; no step waits on a
        peer without a deadline (``parallel/control.py``).  Idempotent; also on leaving a ``with`` block, on
        deletion and at interpreter exit, where it runs in an ``atexit`` hook before the interpreter's
        finalization, so a script that ends without calling it exits with status 0 and leaves no process.  The
        LLM cannot generate afterwards."""
        finalizer = getattr(self, "_finalizer", None)  # None: __init__ failed before the engine existed
        if finalizer is not None:
            finalizer()  # runs once
            atexit.unregister(finalizer)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _validate(self, prompts, sampling_params):
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str, a dict, a list of str or dicts, or a list of token-id lists, "
                            f"got {type(prompts).__name__}")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, "
                            f"got {type(sampling_params).__name__}")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling_params; "
                             f"pass one SamplingParams or a list of the same length")
        for i, params in enumerate(sampling_params):
            if not isinstance(params, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(params).__name__}")
            params.validate()
            if params.structured_outputs is not None:
                try:
                    grammar.check(params.structured_outputs)
                except ValueError as e:
                    raise ValueError(f"sampling_params[{i}]: {e}") from None
            if params.stop and self.tokenizer is None:
                raise ValueError(f"sampling_params[{i}] has stop strings but {self.config.model!r} has no tokenizer")
        if self.prompts.images is not None and sum(isinstance(p, dict) for p in prompts) > 1:
            # image preprocessing takes milliseconds per image, mostly outside the GIL: spread it over threads
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                encoded = list(pool.map(self.encode_request, prompts, range(len(prompts))))
        else:
            encoded = [self.encode_request(p, i) for i, p in enumerate(prompts)]
        return [ids for ids, _ in encoded], list(sampling_params), [im for _, im in encoded]

    def encode_request(self, prompt, index: int = 0):
        """(token ids, ``ImageInputs`` or None) of one prompt (``Prompts.encode_request``, ``nanovllm/prompts.py``)."""
        return self.prompts.encode_request(prompt, index)

    def encode_prompt(self, prompt, index: int = 0) -> list[int]:
        """A prompt's checked token ids (``Prompts.encode_prompt``)."""
        return self.prompts.encode_prompt(prompt, index)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """One conversation's token ids through the chat template (``Prompts.apply_chat_template``)."""
        return self.prompts.apply_chat_template(messages)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template_kwargs: dict | None = None) -> list[dict]:
        """``generate`` for one conversation (a list of ``{"role", "content"}`` dicts) or a list of them, each
        through the chat template; returns one output per conversation.  A content may be a list of OpenAI-style
        parts, ``{"type": "text", "text": ...}`` and, for vision-language models, ``{"type": "image", "image":
        PIL.Image or path}``.  ``chat_template_kwargs``: extra template variables (``{"enable_thinking": False}``),
        ``Prompts.apply_chat_template``."""
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            messages = [messages]
        if not isinstance(messages, list) or not all(isinstance(m, list) for m in messages):
            raise TypeError("messages must be a list of {'role', 'content'} dicts, or a list of such lists")
        prompts = []
        for conversation in messages:
            text_messages, images = chat_prompt(conversation)
            ids = self.prompts.apply_chat_template(text_messages, chat_template_kwargs=chat_template_kwargs)
            prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}} if images else ids)
        return self.generate(prompts, sampling_params, use_tqdm)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, lora_request=None) -> list[dict]:
        """Generate for every prompt; returns one output per prompt, in input order (``Completion.output``,
        ``nanovllm/completion.py``), a dict of:

        * ``"text"``, ``"token_ids"`` (the completion's), ``"finish_reason"`` ("stop", "length");
        * ``"logprobs"``, only with ``SamplingParams(logprobs=k)``: per completion token a dict ``{token id:
          logprob}``, the sampled token first, then the ``k`` most likely tokens (1 to k + 1 entries);
        * ``"prompt_logprobs"``: None unless ``SamplingParams(prompt_logprobs=k)``, else a list as long as the
          prompt: None for its first token, then per prompt token a dict ``{token id: logprob}``, that token first
          (its logprob given the tokens before it), then the ``k`` most likely tokens there (1 to k + 1 entries);
        * ``"outputs"``, only with ``SamplingParams(n=k)``, k > 1: the k completions' outputs (the first is the dict
          itself), choice i drawn with ``seed + i`` where the params give a seed.

        ``lora_request``: a ``LoRARequest`` for every prompt, or a list of one per prompt (None: the base model),
        with ``enable_lora``; an adapter that fails to load or fit queues no prompt of the call."""
        token_lists, params, images = self._validate(prompts, sampling_params)
        loras = _per_prompt(lora_request, len(token_lists))
        engine, seqs, groups = self.engine, [], []
        try:
            for ids, p, im, lora in zip(token_lists, params, images, loras):
                groups.append([])
                for choice in _choices(p):
                    seqs.append(engine.add_request(ids, choice, im, lora))
                    groups[-1].append(seqs[-1])
        except BaseException:
            for seq in seqs:
                engine.abort(seq)
            raise
        completions = {s.seq_id: Completion(self.tokenizer, s.params) for s in seqs}
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        outputs = {}  # seq_id -> output, made as each finishes (while the device runs the steps queued)
        try:
            self._steps(engine, {s.seq_id: s for s in seqs}, completions, outputs, bar)
        finally:
            bar.close()
        return [outputs[g[0].seq_id] if len(g) == 1 else
                dict(outputs[g[0].seq_id], outputs=[outputs[s.seq_id] for s in g]) for g in groups]

    def embed(self, prompts, pooling_params=None, use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None) -> list:
        """One embedding per prompt (a str or token ids), in input order, as vLLM's ``EmbeddingRequestOutput``
        (``.outputs.embedding``, a list of floats); pooled as the engine's pooler says (``pooler_config``, the
        checkpoint's sentence-transformers modules, else LAST + normalize) or ``PoolingParams`` ask
        (``nanovllm/embedding.py``, ``nanovllm/pooling_params.py``)."""
        return embedding.embed(self, prompts, pooling_params, truncate_prompt_tokens, use_tqdm)

    def score(self, text_1, text_2, instruction: str | None = None, use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None) -> list:
        """One score per pair, in pair order, as vLLM's ``ScoringRequestOutput`` (``.outputs.score``, a float):
        ``text_1`` and ``text_2`` a str and a str (one pair), a str and a list (1:N) or two lists (zipped N:N).  With
        ``pooler_config={"classifier_from_token": ["no", "yes"]}`` (or config.json's) a yes/no reranker: each pair
        through the Qwen3-Reranker template (``instruction``, else its default), the probability of yes against no
        at the last token; a ``*ForSequenceClassification`` checkpoint: its ``score.weight`` head on the pair's last
        token, sigmoid (one label) or label 1's softmax probability; otherwise the cosine similarity of the two
        embeddings (``nanovllm/scoring.py``)."""
        return scoring.score(self, text_1, text_2, instruction, truncate_prompt_tokens, use_tqdm)

    def score_head(self):
        """The scoring head (``scoring.make_head``: a ``ClassifierHead`` for a ``*ForSequenceClassification``
        checkpoint, a ``YesNoHead`` where the pooler names ``classifier_from_token``), built once; ``ValueError`` if
        this engine scores by cosine or the checkpoint cannot give one."""
        if getattr(self, "_score_head", None) is None:
            head = scoring.make_head(self.config.model, self.config.hf_config, self.tokenizer, self.config.pooler)
            if head is None:
                raise ValueError("this engine's pooler names no classifier_from_token: it scores by cosine")
            self._score_head = head
        return self._score_head

    def _steps(self, engine, seqs: dict, completions: dict, outputs: dict, bar) -> None:
        """``generate``'s loop: step until every request finished, feeding each step's outputs to the
        completions; a completion that a stop string ended has its sequence aborted."""
        prefill_tps = decode_tps = 0.0
        while engine.has_work():
            t = time.perf_counter()
            result = engine.step()
            done = 0
            for out in result.outputs:
                completion = completions[out.seq_id]
                completion.add(out)
                if completion.finish_reason is not None:
                    if out.finish_reason is None:  # a stop string ended it: the engine still runs it
                        engine.abort(seqs[out.seq_id])
                    outputs[out.seq_id] = completion.output()
                    done += 1
            rate = result.num_tokens / max(time.perf_counter() - t, 1e-9)
            if result.is_prefill:
                prefill_tps = rate
            else:
                decode_tps = rate
            bar.set_postfix(Prefill=f"{prefill_tps:.0f}tok/s", Decode=f"{decode_tps:.0f}tok/s", refresh=False)
            bar.update(done)


def _choices(params: SamplingParams) -> list[SamplingParams]:
    """The ``n`` requests of a prompt: choice i draws with ``seed + i`` where a seed is given (as the server's)."""
    if params.n == 1:
        return [params]
    return [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            for i in range(params.n)]


def _per_prompt(lora_request, n: int) -> list:
    """``generate``'s ``lora_request`` as one entry per prompt."""
    if isinstance(lora_request, (list, tuple)):
        if len(lora_request) != n:
            raise ValueError(f"lora_request has {len(lora_request)} entries for {n} prompts: give one, or one per "
                             f"prompt")
        return list(lora_request)
    return [lora_request] * n

"""The executor contract: ``Executor.run`` launches one step of a scheduled batch, in as many parts as its shapes need.

An executor sees only an ``ExecutorSpec``: the step function (``nanovllm.step.make_step``) and its variants, the
platform, the shapes it must serve and builders of all-padding inputs.  ``run`` takes the step's kind, size and
variant and two callbacks of the runner: ``build(part)`` returns the inputs of one ``Part`` (a decode chunk of at
most the largest bucket, or the whole prefill), padded to ``part.shape`` and written into ``part.target`` (a
captured graph's static buffers) when it has one; ``emit(outputs, inputs, part)`` takes that part's outputs
(``step_outputs``) and runs before the next part is launched, whose replay may overwrite them.

Subclasses say how a step is padded (``decode_chunks``, ``padded_rows``, ``prefill_shape``, ``static_inputs``) and
how a part runs (``run_decode``, ``run_prefill``); the padding defaults here pad nothing.
``close`` drops what the executor built (graphs, compiled steps) so their device memory can be freed.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple

from nanovllm.compile.buckets import pick_bucket, split_batch
from nanovllm.step import StepInputs


@dataclass(frozen=True)
class ExecutorSpec:
    step: Callable  # make_step(model, kv_caches, token_buffer): StepInputs -> (tokens, logits, hidden)
    variants: dict  # name -> make_step(..., variant=name) (nanovllm.step.STEPS)
    platform: object  # nanovllm.platforms.base.Platform
    graph_batch_sizes: tuple[int, ...]
    prefill_graph_sizes: tuple[int, ...] | None  # None: the platform's default
    max_num_seqs: int
    max_step_tokens: int  # the most tokens a prefill step holds
    dummy_prefill: Callable[..., StepInputs]  # (tokens, rows, packed=False): an all-padding prefill
    decode_inputs: Callable[[int], StepInputs]  # rows -> all-padding decode inputs of that many rows
    cache_key: dict  # compile/cache.py key_fields


class Part(NamedTuple):
    """One launch of a step: batch rows [start, start + rows), padded to ``shape``, built into ``target``."""
    index: int  # of the step's parts, in launch order
    start: int  # the first batch row it holds
    rows: int  # the live rows (sequences) it holds
    shape: tuple[int, int] | None  # (tokens, rows) it is padded to; None: a prefill with one padding sequence
    target: StepInputs | None  # the static input buffers to build into; None: new inputs


def step_outputs(out: tuple) -> tuple:
    """(tokens, logits, None or (values, ids), None or the raw logits, hidden states [T, H] or None) of the outputs
    of the step or a variant (``nanovllm.step.STEPS``, each with the hidden states last): a processed variant's
    logits are those it sampled from, its raw logits the model's; the ``forward`` variant samples nothing (tokens
    None); the ``sample`` variants run no model (hidden states None)."""
    *out, hidden = out
    if len(out) == 1:
        return None, out[0], None, None, hidden
    logprobs = (out[2], out[3]) if len(out) >= 4 else None
    raw = out[-1] if len(out) in (3, 5) else None
    return out[0], out[1], logprobs, raw, hidden


class Executor:
    mode: str

    def __init__(self, spec: ExecutorSpec):
        self.step, self.variants = spec.step, dict(spec.variants)
        self.buckets: tuple[int, ...] | None = None
        self.variant_graphs: dict = {}  # graph executors: variant name -> its decode graphs, built as asked for

    def step_of(self, variant: str | None):
        """The uncompiled step function of ``variant`` (None: the plain step)."""
        return self.step if variant is None else self.variants[variant]

    def run(self, *, prefill: bool, rows: int, tokens: int, build: Callable[[Part], StepInputs],
            emit: Callable[[tuple, StepInputs, Part], None], variant: str | None = None) -> None:
        """Launch a step of ``rows`` sequences and ``tokens`` tokens (module docstring); ``variant``: run that
        variant of the step instead (a key of ``ExecutorSpec.variants``)."""
        if prefill:
            part = Part(0, 0, rows, *self.prefill_shape(tokens))
            inputs = build(part)
            emit(self.run_prefill(inputs, variant), inputs, part)
            return
        for index, (start, live, padded) in enumerate(self.decode_chunks(rows)):
            part = Part(index, start, live, (padded, padded), self.static_inputs(padded, variant))
            inputs = build(part)
            emit(self.run_decode(inputs, padded, variant), inputs, part)

    @staticmethod
    def padded_rows(bucket: int) -> int:
        """The rows a bucket's graph has."""
        return bucket

    def decode_chunks(self, n: int) -> list[tuple[int, int, int]]:
        """(first row, live rows, padded rows) per chunk of a decode batch of ``n`` rows."""
        if not self.buckets:
            return [(0, n, n)]
        return [(start, rows, self.padded_rows(pick_bucket(rows, self.buckets)))
                for start, rows in split_batch(n, self.buckets)]

    def static_inputs(self, padded_rows: int, variant: str | None = None) -> StepInputs | None:
        """The buffers the captured graph of this decode step (of ``variant``) reads, for the runner to fill
        directly; None when there are none."""
        return None

    def prefill_shape(self, num_tokens: int) -> tuple[tuple[int, int] | None, StepInputs | None]:
        """((tokens, rows) to pad a prefill step of ``num_tokens`` tokens to, the buffers to fill), or (None, None):
        unpadded (one trailing padding sequence of one token), into new inputs."""
        return None, None

    def run_decode(self, inputs: StepInputs, padded_rows: int, variant: str | None = None) -> tuple:
        """The outputs of one decode part, ``inputs`` padded to ``padded_rows`` (``step_outputs``)."""
        raise NotImplementedError

    def run_prefill(self, inputs: StepInputs, variant: str | None = None) -> tuple:
        """The outputs of a prefill step (``step_outputs``)."""
        raise NotImplementedError

    def captures_every_prefill(self) -> bool:
        """Whether every prefill step runs in a prefill graph, so that start-up need not warm the other path."""
        return False

    def variant_graph_sizes(self, variant: str) -> list[int]:
        """The decode buckets whose graph of ``variant`` has been built so far."""
        graphs = self.variant_graphs.get(variant)
        return sorted(graphs.graphs) if graphs is not None else []

    def built_variant_graphs(self) -> dict[str, list[int]]:
        """Every variant with a graph built so far -> its decode buckets."""
        return {name: sorted(v.graphs) for name, v in self.variant_graphs.items() if v.graphs}

    def build_variant_graphs(self, variant: str) -> None:
        """Build ``variant``'s graph of every decode bucket now, rather than when first asked for."""
        if variant in self.variant_graphs:
            self.variant_graphs[variant].build_all(self.buckets)

    def describe(self) -> dict:
        return {"mode": self.mode, "prefill_graph_sizes": [], "compile_cache": None, "step_origin": None,
                "variant_graph_sizes": self.built_variant_graphs()}

    def close(self) -> None:
        """Drop the step functions and everything built from them (idempotent); the executor cannot run after."""
        self.step, self.variants = None, {}

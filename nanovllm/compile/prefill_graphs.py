"""``PrefillGraphs``: prefill steps captured as graphs at a few token counts, so a captured prefill step costs the
host one input copy and one replay instead of a Python launch of every kernel.

Shapes: every graph has ``max_num_seqs + 1`` sequence rows and one of a few token counts
(``default_prefill_sizes``).  A step of ``t`` tokens runs in the smallest graph of at least ``t`` tokens, padded by
``PrefillInputBuilder.build`` (``nanovllm/engine/prefill_inputs.py``): the tokens past ``t`` form one padding
sequence of context 0 (attention gives it zeros; its slots are -1, so nothing is stored) and the rows after it are
sequences of no tokens.  There is always at least one padding row, since a step holds at most ``max_num_seqs``
sequences.  Padding rows sample into the token buffer's scratch row.  A step no graph holds runs uncaptured.

Every graph is the one compiled step (symbolic token and sequence counts) at another size, so capturing
compiles nothing.  The graphs share the decode graphs' memory pool and are captured before them, largest
first, so the smaller graphs reuse the largest one's memory.
"""
import bisect

from tqdm.auto import tqdm

from nanovllm.compile.bucket_graph import BucketGraph


def default_prefill_sizes(max_num_seqs: int, max_step_tokens: int) -> tuple[int, ...]:
    """Powers of two from 128 and one and a half times each, below a quarter of the most tokens a step holds
    (``EngineConfig.max_step_tokens``), then 1/4, 2/4, 3/4 (multiples of 64) and all of it; only those above
    ``max_num_seqs + 1``."""
    # The fractions serve chunked prefill, which fills every step of a batch but the last; the small sizes serve
    # the prefills of sequences admitted while others decode (a step pads to the next size: at most 1.5 times its
    # tokens, where a large model's step costs about its tokens), and a hybrid model's chunk cut at a snapshot.
    sizes = {max_step_tokens * k // 4 // 64 * 64 for k in (1, 2, 3)} | {max_step_tokens}
    size = 128
    while size < max_step_tokens // 4:
        sizes |= {size, size * 3 // 2} if size * 3 // 2 < max_step_tokens // 4 else {size}
        size *= 2
    return tuple(sorted(s for s in sizes if s > max_num_seqs + 1))


class PrefillGraphs:
    def __init__(self, compiled_step, sizes: tuple[int, ...], spec, pool):
        """``spec``: the executor's ``ExecutorSpec`` (max_num_seqs, max_step_tokens, dummy_prefill, platform)."""
        self.sizes = tuple(sorted(sizes))
        self.rows = spec.max_num_seqs + 1
        # Whether every prefill step runs in a graph: no step holds more than max_step_tokens.
        self.cover_every_step = bool(self.sizes) and self.sizes[-1] >= spec.max_step_tokens
        self.graphs: dict[int, BucketGraph] = {}
        if not self.sizes:
            return
        # Anything a prefill this wide sets up lazily happens here, outside the capture.
        compiled_step(spec.dummy_prefill(self.sizes[0], self.rows))
        for size in tqdm(self.sizes[::-1], desc="Capturing prefill steps", dynamic_ncols=True):
            graph = BucketGraph(size, compiled_step, spec.dummy_prefill(size, self.rows, packed=True), spec.platform)
            graph.capture(pool)
            self.graphs[size] = graph

    def shape_for(self, num_tokens: int) -> tuple[int, int] | None:
        """(tokens, rows) a step of ``num_tokens`` tokens is padded to, or None if no graph holds it."""
        i = bisect.bisect_left(self.sizes, num_tokens)
        return (self.sizes[i], self.rows) if i < len(self.sizes) else None

    def graph_for(self, inputs) -> BucketGraph | None:
        if inputs.context_lens.shape[0] != self.rows:
            return None
        return self.graphs.get(inputs.input_ids.shape[0])

"""``BucketGraph``: one step shape (a decode batch size, or a prefill token count), captured as a graph where
the platform can.

Invariants: the compiled function is only ever called with inputs of exactly this bucket's shapes, and on a
capturing platform every replay reads the same static input buffers, into which ``run`` copies the live
batch (already padded to the bucket by the runner) unless the runner filled them directly.
"""
import time

from nanovllm.step import StepInputs


class BucketGraph:
    def __init__(self, size: int, compiled_step, static_inputs: StepInputs, platform):
        self.size = size
        self.compiled_step = compiled_step
        self.static_inputs = static_inputs
        self.platform = platform
        self.graph = None
        self.static_outputs = None
        self.compile_seconds = 0.0

    def compile(self) -> None:
        """Trace and lower the step for this shape (the first call compiles; the second checks it is cached)."""
        start = time.perf_counter()
        for _ in range(2):
            self.compiled_step(self.static_inputs)
        self.platform.synchronize()
        self.compile_seconds = time.perf_counter() - start

    def capture(self, pool) -> None:
        if not self.platform.supports_graph_capture:
            return
        with self.platform.capture(pool) as graph:
            self.static_outputs = self.compiled_step(self.static_inputs)
        self.graph = graph

    def run(self, inputs: StepInputs):
        """The step's outputs (tokens [rows], logits [rows, V], and the logprobs variant's values and ids) for a
        batch padded to this bucket."""
        if self.graph is None:
            return self.compiled_step(inputs)
        if inputs is not self.static_inputs:
            inputs.copy_into(self.static_inputs)
        self.graph.replay()
        return self.static_outputs

"""``EagerExecutor``: the step function called directly, uncompiled; decode batches are not padded."""
from nanovllm.compile.base import Executor, step_outputs
from nanovllm.step import StepInputs


class EagerExecutor(Executor):
    mode = "eager"

    def run_decode(self, inputs: StepInputs, padded_rows: int, variant: str | None = None) -> tuple:
        return step_outputs(self.step_of(variant)(inputs))

    def run_prefill(self, inputs: StepInputs, variant: str | None = None) -> tuple:
        return step_outputs(self.step_of(variant)(inputs))

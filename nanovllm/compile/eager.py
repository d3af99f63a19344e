"""``EagerExecutor``: the step function called directly, uncompiled; decode batches are not padded."""
from nanovllm.compile.base import Executor, step_outputs
from nanovllm.step import StepInputs


class EagerExecutor(Executor):
    mode = "eager"

    def run_decode(self, inputs: StepInputs, padded_rows: int, logprobs: bool = False) -> tuple:
        return step_outputs((self.logprob_step if logprobs else self.step)(inputs))

    def run_prefill(self, inputs: StepInputs, logprobs: bool = False) -> tuple:
        return step_outputs((self.logprob_step if logprobs else self.step)(inputs))

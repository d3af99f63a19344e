"""The step: ``StepInputs`` (everything the host hands the device for one model step) and the function of it
that engine, compile and models share (``run_step``).  It sits below ``models``, ``compile`` and ``engine``."""
from nanovllm.step.function import (make_step, rechoose_logprob, redraw_filtered, run_step, run_step_with_logprobs,
                                    token_logprobs)
from nanovllm.step.inputs import PADDING, StepInputs

__all__ = ["PADDING", "StepInputs", "make_step", "rechoose_logprob", "redraw_filtered", "run_step",
           "run_step_with_logprobs", "token_logprobs"]

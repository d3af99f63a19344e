"""The step: ``StepInputs`` (everything the host hands the device for one model step) and the function of it
that engine, compile and models share (``run_step`` and its variants).  It sits below ``models``, ``compile`` and
``engine``."""
from nanovllm.step.function import (STEPS, VARIANTS, make_step, rechoose_logprob, redraw_filtered, run_step,
                                    run_step_with_logprobs, token_logprobs, variant_name)
from nanovllm.step.inputs import PADDING, StepInputs, WindowStepInputs
from nanovllm.step.logits_state import LogitsState

__all__ = ["PADDING", "STEPS", "VARIANTS", "LogitsState", "StepInputs", "WindowStepInputs", "make_step",
           "rechoose_logprob", "redraw_filtered", "run_step", "run_step_with_logprobs", "token_logprobs",
           "variant_name"]

"""The start-up runs of a ``ModelRunner`` (``model_runner.py``) beside its step launches: what sits beside the
model (a LoRA adapters' pool, a draft model, the CUDA C++ kernels its weights take), planning the pools beside
the KV blocks, calibrating an FP8 KV cache's scales, probing the peak memory of the largest step before the KV cache
is sized, allocating it, and warming the largest uncaptured prefill so its activations sit in the caching allocator
before the first request.
Each takes the runner and reads its model, builders, specs and config; none changes what a step computes.  Under
tensor parallelism every rank runs the same of them (what could differ, whether the checkpoint holds scales, is
agreed), so their collectives pair up."""
import dataclasses

import torch

import nanovllm.distributed as distributed

from nanovllm.engine import hybrid_state, verify_step
from nanovllm.engine.drafter import Drafter
from nanovllm.engine.lora_slots import EngineLoras
from nanovllm.engine.kv_cache import KVCacheSpec
from nanovllm.kernels import cuda_moe, cuda_w4a16, cuda_w8a16
from nanovllm.layers.sampler import sample
from nanovllm.models import kv_scales
from nanovllm.models.loader import checkpoint_files
from nanovllm.quant import dequantized, held

CALIBRATION_TOKENS = 1024  # random tokens of the one prefill that calibrates an FP8 cache's scales


def beside_model(runner) -> tuple:
    """(the ``EngineLoras`` of ``enable_lora``, the ``Drafter`` of a draft-model speculative config), each or None:
    made after the model and before the KV cache is sized, so their memory counts.  The CUDA C++ kernels the
    model's weights take are built and loaded here too (``kernels/cuda_build.py``), not in the first request, and
    quantized projections keep their dequantized copies where the options allow (``quant/dequantized.py``)."""
    config = runner.config
    formats = {held.format_of(m) for m in runner.model.modules()} if runner.device.type == "cuda" else set()
    if held.INT4 in formats:
        cuda_w4a16.prepare(runner.device)
        cuda_moe.prepare(runner.device, fp8=False)
    if held.FP8 in formats:
        cuda_w8a16.prepare(runner.device)
        cuda_moe.prepare(runner.device, fp8=True)
    dequantized.keep(runner.model, runner.dtype, runner.platform.options.dequantized_copies)
    return EngineLoras.make(runner.model, config), Drafter.make(config, runner.platform, runner.dtype)


def plan_pools(runner) -> bool:
    """Plan the pools beside the KV blocks: a hybrid model's state pools (``hybrid_state``; returns whether it is
    one, whose verify steps then chain a sequence's rows) and a sliding-window model's window pool
    (``KVCacheSpec.plan_window_pool``; a verify step's rows too)."""
    config = runner.config
    hybrid = hybrid_state.size_state_pools(runner.kv_spec, config)
    if hybrid:
        runner.model.chain_rows(verify_step.rows_per_sequence(config))
    runner.kv_spec.plan_window_pool(config, verify_step.rows_per_sequence(config))
    return hybrid


def allocate_kv_cache(runner) -> list:
    """The KV cache of ``runner.num_blocks`` blocks (and their window pool); the input builders learn whether the
    sliding layers have that pool (the start-up probes before ran without it)."""
    runner.prefill_builder.window = runner.decode_builder.window = runner.kv_spec.window
    return runner.kv_spec.allocate(runner.num_blocks, runner.device)


def set_kv_scales(runner) -> str:
    """Fill the FP8 cache's scales as ``kv_cache_scales`` says (``models/kv_scales.py``); returns their source:
    "checkpoint", "one", or the calibration ("tensor", "head") over ``CALIBRATION_TOKENS`` random tokens.
    Without checkpoint scales ``auto`` calibrates per head, the scheme that measured best."""
    choice, cfg = runner.config.kv_cache_scales, runner.config
    if choice == "auto" and cfg.load_format == "safetensors":
        found = kv_scales.load_checkpoint_scales(runner.model, checkpoint_files(cfg.model))
        if distributed.agree_min(int(found), runner.device):  # every rank calibrates, or none (its collectives)
            return "checkpoint"
    if choice == "one":
        return "one"
    choice = "head" if choice == "auto" else choice
    n = min(CALIBRATION_TOKENS, cfg.max_model_len, cfg.max_num_batched_tokens)
    spec = runner.kv_spec
    calibration = KVCacheSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size, runner.dtype,
                              spec.states, spec.state_dtype, shapes=spec.shapes)
    calibration.num_state_slots = 1  # a hybrid model's one prompt runs in state slot 0 and snapshots nothing
    kv = calibration.allocate(-(-n // runner.block_size), runner.device)
    inputs = runner.prefill_builder.probe(1, n)
    inputs = dataclasses.replace(inputs, state_slots=torch.zeros_like(inputs.state_slots),
                                 capture_slots=torch.zeros_like(inputs.capture_slots))
    ids = torch.randint(runner.vocab_size, (n,), generator=torch.Generator().manual_seed(cfg.seed))
    with torch.inference_mode():
        runner.model(ids.to(runner.device), inputs, kv)
    kv_scales.calibrate(runner.model, kv, per_head=choice == "head")
    return choice


def probe_peak_memory(runner) -> list:
    """Run the largest prefill (with a temporary cache) and a full-batch filtered sample once, so the peak
    memory they need is known before the KV cache takes the rest; returns the temporary cache."""
    cfg = runner.config
    seq_len = min(cfg.max_model_len, cfg.max_num_batched_tokens)
    num_seqs = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens // seq_len))
    blocks = num_seqs * -(-seq_len // runner.block_size)  # as many in a window pool: the probe writes both alike
    kv = runner.kv_spec.allocate(blocks, runner.device, blocks)
    inputs = runner.prefill_builder.probe(num_seqs, seq_len)
    with torch.inference_mode():
        runner.model(inputs.input_ids, inputs, kv)
        logits = torch.zeros(cfg.max_num_seqs, runner.vocab_size, device=runner.device)
        z = torch.zeros(cfg.max_num_seqs, device=runner.device)
        sample(logits, z + 1, z.long() + 5, z + 0.5, z.long(), z.long(), filtered=True, min_p=z + 0.1)
    return kv


def warm_largest_prefill(runner) -> None:
    """Run the largest uncaptured prefill once (all padding: nothing is written), so that its activation
    memory sits in the caching allocator before the first generate instead of being allocated inside it."""
    cfg = runner.config
    real = cfg.max_step_tokens
    with torch.inference_mode():  # plus the trailing padding sequence
        runner.executor.run_prefill(runner.prefill_builder.dummy(real + 1, min(cfg.max_num_seqs, real) + 1))
    runner.platform.synchronize()
